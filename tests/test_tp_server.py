"""EFFROLLOUT inside one tensor-parallel engine (``--tp-size 2`` on CPU, gloo): each rank drafts
from its own shard of the target, and every rank commits rank 0's decisions.

Against the shared plain single-rank server: greedy output token for token (prompts with radix
hits), the sampled first-token distribution (T = 1, top-p) by a chi-square test that a planted
accept-every-draft rule fails, and weight updates, from disk and broadcast by a trainer process
(``update_weights_from_distributed`` over gloo), after which the output follows the new weights
and acceptance stays up (every rank re-quantized its drafter).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import FP32, FaultSwitch, hf_greedy, joint_first3, same_distribution_pvalue, start_server
from helpers import greedy_all as _greedy_all

# one OpenMP thread per rank, pinned to its own core (SGLang's CPU TP needs an explicit binding)
TP2 = ["--tp-size", "2"]
TP_ENV = {"SGLANG_CPU_OMP_THREADS_BIND": "0|1", "SGLANG_ER_GAMMA": "3"}
EFF = ["--speculative-algorithm", "EFFROLLOUT", "--speculative-num-draft-tokens", "4"]
PROMPT = "Alice has 12 apples. She buys 7 more. How many"
N_SAMPLES = 2000
SAMPLING = {"temperature": 1.0, "top_p": 0.9}


@pytest.fixture(scope="module")
def eff_tp(tiny_model):
    srv = start_server(tiny_model, [*FP32, *TP2, *EFF], env=TP_ENV, faults=FaultSwitch())
    yield srv
    srv.stop()


def test_each_rank_runs_on_its_own_core(eff_tp):
    """SGLANG_CPU_OMP_THREADS_BIND = "0|1": rank r on core r with one torch thread (SGLang applies
    the variable only on AMX / arm64 CPUs; sglang_er.engine.cpu.threads elsewhere)."""
    import psutil

    ranks = [
        (p.cpu_affinity(), p.num_threads())
        for p in psutil.Process(eff_tp.proc.pid).children(recursive=True)
        if p.name().startswith("sglang::schedul")
    ]
    assert sorted(cores for cores, _ in ranks) == [[0], [1]], ranks


def _accept_rate(srv) -> float:
    m = srv.effrollout_state()["metrics"]
    return m["accepted"] / max(m["drafted"], 1)


def test_greedy_identical_to_plain(eff_tp, plain_greedy):
    prompts, expected = plain_greedy
    assert _greedy_all(eff_tp, prompts) == expected
    # the drafter really ran on both shards: a drafter missing a rank's half would be rejected
    assert _accept_rate(eff_tp) > 0.3


def test_sampled_distribution_matches_plain_and_a_wrong_rule_is_caught(plain, eff_tp):
    reference = joint_first3(plain, PROMPT, N_SAMPLES, **SAMPLING)
    p = same_distribution_pvalue(reference, joint_first3(eff_tp, PROMPT, N_SAMPLES, **SAMPLING))
    if p <= 0.01:  # a correct sampler lands here 1% of the time: one fresh draw decides
        p = same_distribution_pvalue(reference, joint_first3(eff_tp, PROMPT, N_SAMPLES, **SAMPLING))
    assert p > 0.01, f"TP 2 EFFROLLOUT's first-3-token distribution differs from plain (p={p:.2e})"
    with eff_tp.faults.planted("accept_all"):  # on every rank
        p = same_distribution_pvalue(reference, joint_first3(eff_tp, PROMPT, N_SAMPLES, **SAMPLING))
    assert p < 1e-4, f"accept-every-draft went undetected at TP 2 (p={p:.2e})"


def _broadcast_update(srv, named_tensors: dict, group: str = "er_trainer") -> None:
    """What an RL trainer does (verl, slime): join a gloo group as rank 0 beside the engine's TP
    ranks (1..tp), then broadcast each new tensor inside a begin/end weight-update session."""
    import torch.distributed as dist
    from sglang.srt.utils.common import init_custom_process_group  # the helper trainers copy

    from sglang_er.launcher import free_port

    port, tp = free_port(), 2
    init = {
        "master_address": "127.0.0.1",
        "master_port": port,
        "rank_offset": 1,
        "world_size": 1 + tp,
        "group_name": group,
        "backend": "gloo",
    }
    with ThreadPoolExecutor(1) as ex:
        joined = ex.submit(srv._checked, "/init_weights_update_group", init, 300)
        pg = init_custom_process_group(
            backend="gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=1 + tp, rank=0, group_name=group
        )
        joined.result()
        srv._checked("/begin_weight_update", {}, 300)
        try:
            body = {
                "names": list(named_tensors),
                "dtypes": [str(t.dtype).removeprefix("torch.") for t in named_tensors.values()],
                "shapes": [list(t.shape) for t in named_tensors.values()],
                "group_name": group,
            }
            received = ex.submit(srv._checked, "/update_weights_from_distributed", body, 300)
            for t in named_tensors.values():
                dist.broadcast(t.contiguous(), src=0, group=pg)
            received.result()
        finally:
            srv._checked("/end_weight_update", {}, 300)
    srv._checked("/destroy_weights_update_group", {"group_name": group}, 300)
    dist.destroy_process_group(pg)


@pytest.mark.parametrize("path", ["disk", "distributed"])
def test_weight_update_requantizes_every_rank(eff_tp, path):
    from safetensors.torch import load_file

    from sglang_er.models.factory import build_model

    new = build_model("tiny", seed=1 if path == "disk" else 2)  # same shapes and tokenizer, new weights
    before = eff_tp.effrollout_state()
    if path == "disk":
        eff_tp.update_weights_from_disk(new)
    else:
        _broadcast_update(eff_tp, load_file(str(new / "model.safetensors")))
    out = eff_tp.generate(PROMPT, max_new_tokens=40, temperature=0, ignore_eos=True)
    assert out["output_ids"] == hf_greedy(new, [PROMPT])[0]
    after = eff_tp.effrollout_state()
    assert after["requantizations"] == before["requantizations"] + 1
    m0, m1 = before["metrics"], after["metrics"]
    # a drafter left on the old weights on either rank would agree with the new policy almost never
    assert (m1["accepted"] - m0["accepted"]) / (m1["drafted"] - m0["drafted"]) > 0.3
