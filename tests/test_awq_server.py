"""AWQ in a real server: live activation statistics switch the drafter from RTN to AWQ, and on
a model whose activations have outlier channels the AWQ drafter is accepted at least as often
as the RTN one (and the output stays the target's).

The outlier model is the tiny model with a function-preserving rescale: a few channels of
every RMSNorm weight (and of up_proj's rows) are multiplied by 50 and the weight columns that
read them divided by 50 -- the target computes the same function, but its activations now have
the outlier channels real LLMs have, which is where round-to-nearest W4 loses accuracy.
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import start_server

from sglang_er.models.corpus import math_corpus

FACTOR = 50.0
ARGS = ["--dtype", "float32", "--speculative-algorithm", "EFFROLLOUT", "--speculative-num-draft-tokens", "4"]


@pytest.fixture(scope="module")
def outlier_model(tiny_model, tmp_path_factory):
    import torch
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("outlier") / "tiny-outlier"
    shutil.copytree(tiny_model, out)
    sd = {k: v.float() for k, v in load_file(str(tiny_model / "model.safetensors")).items()}
    gen = torch.Generator().manual_seed(0)
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("model.layers.")})
    for i in layers:
        p = f"model.layers.{i}."
        hidden = sd[p + "input_layernorm.weight"].numel()
        inter = sd[p + "mlp.up_proj.weight"].shape[0]
        c = torch.randperm(hidden, generator=gen)[:4]
        sd[p + "input_layernorm.weight"][c] *= FACTOR
        for n in ("q_proj", "k_proj", "v_proj"):
            sd[p + f"self_attn.{n}.weight"][:, c] /= FACTOR
        c = torch.randperm(hidden, generator=gen)[:4]
        sd[p + "post_attention_layernorm.weight"][c] *= FACTOR
        for n in ("gate_proj", "up_proj"):
            sd[p + f"mlp.{n}.weight"][:, c] /= FACTOR
        c = torch.randperm(inter, generator=gen)[:4]
        sd[p + "mlp.up_proj.weight"][c, :] *= FACTOR
        sd[p + "mlp.down_proj.weight"][:, c] /= FACTOR
    save_file(sd, str(out / "model.safetensors"))
    return out


def _run(model, quant):
    srv = start_server(
        model,
        ARGS,
        env={
            "SGLANG_ER_GAMMA": "3",
            "SGLANG_ER_QUANT": quant,
            "SGLANG_ER_AWQ_MIN_TOKENS": "256",
            "SGLANG_ER_AWQ_SAMPLE_EVERY": "1",
        },
    )
    try:
        docs = math_corpus(24, seed=3)
        # live traffic the statistics are collected from (one batched call: the AWQ statistics
        # count tokens, not requests)
        srv.generate([d[:200] for d in docs[:12]], max_new_tokens=24, temperature=1.0, ignore_eos=True)
        rs = srv.generate([d[:80] for d in docs[12:]], max_new_tokens=48, temperature=0, ignore_eos=True)
        correct = sum(r["meta_info"]["spec_num_correct_drafts"] for r in rs)
        outputs = [r["output_ids"] for r in rs]
        state = srv.effrollout_state()
    finally:
        srv.stop()
    return correct, outputs, state["quantizer"]


def test_awq_drafter_is_accepted_at_least_as_often_as_rtn(outlier_model):
    with ThreadPoolExecutor(2) as ex:  # side by side: each server mostly waits for the other's core
        rtn, awq = ex.map(lambda quant: _run(outlier_model, quant), ("rtn", "awq"))
    (rtn_correct, rtn_out, rtn_q), (awq_correct, awq_out, awq_q) = rtn, awq
    assert rtn_q == {"kind": "rtn"}
    assert awq_q["kind"] == "awq" and awq_q["active"] and awq_q["awq_groups"] > 0, awq_q
    assert awq_out == rtn_out  # both are the target's greedy output
    print("accepted drafts rtn", rtn_correct, "awq", awq_correct, awq_q)
    assert awq_correct >= rtn_correct, (awq_correct, rtn_correct)
