"""Policy updates reach the drafter: after each weight update (from disk, from tensors, while
requests are in flight) the W4 copy is re-quantized from the new weights, so acceptance stays
at its level and the output is lossless w.r.t. the new weights. A server whose drafter is left
on the old weights (test-only switch) keeps lossless output but its acceptance collapses:
proof that the re-quantization is what keeps the drafter useful."""

from __future__ import annotations

import threading

import pytest
import requests

from conftest import start_server

PROMPT = "Alice has 12 apples. She buys 7 more. How many"
ARGS = ["--dtype", "float32", "--speculative-algorithm", "EFFROLLOUT", "--speculative-num-draft-tokens", "4"]


def _hf_greedy(model_dir, n=40):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, -n:].tolist()


@pytest.fixture(scope="module")
def policies(tiny_model):
    from sglang_er.models.factory import build_model

    w1 = build_model("tiny", seed=1)  # same shapes and tokenizer, new weights
    return {"w0": tiny_model, "w1": w1, "greedy0": _hf_greedy(tiny_model), "greedy1": _hf_greedy(w1)}


@pytest.fixture(scope="module")
def srv(tiny_model):
    s = start_server(tiny_model, ARGS, env={"SGLANG_ER_GAMMA": "3"})
    yield s
    s.stop()


def _greedy(server):
    r = server.generate(PROMPT, max_new_tokens=40, temperature=0, ignore_eos=True)
    return r["output_ids"], r["meta_info"]["spec_accept_rate"]


def _state(server):
    return requests.get(server.url + "/get_server_info", timeout=30).json()["internal_states"][0]["effrollout"]


def _update_from_disk(server, path):
    r = requests.post(server.url + "/update_weights_from_disk", json={"model_path": str(path)}, timeout=300)
    assert r.status_code == 200 and r.json()["success"], r.text


def _update_from_tensor(server, path):
    """The RL-framework path: begin, push named tensors, end (SGLang 0.5.23's session protocol)."""
    import torch.multiprocessing
    from safetensors.torch import load_file
    from sglang.srt.utils import MultiprocessingSerializer

    # CPU tensors travel as shared-memory files: the default fd-passing strategy needs the
    # receiver to share this process's multiprocessing authkey, which a server does not.
    torch.multiprocessing.set_sharing_strategy("file_system")
    named = list(load_file(str(path / "model.safetensors")).items())
    payload = MultiprocessingSerializer.serialize(named, output_str=True)
    for path_, body in (("/begin_weight_update", {}),
                        ("/update_weights_from_tensor", {"serialized_named_tensors": [payload]}),
                        ("/end_weight_update", {})):
        r = requests.post(server.url + path_, json=body, timeout=300)
        assert r.status_code == 200 and r.json().get("success", True), (path_, r.text)


def test_update_from_disk_then_tensor_requantizes_the_drafter(srv, policies):
    out, rate0 = _greedy(srv)
    assert out == policies["greedy0"]
    n0 = _state(srv)["requantizations"]

    _update_from_disk(srv, policies["w1"])
    out, rate1 = _greedy(srv)
    assert out == policies["greedy1"]
    st = _state(srv)
    assert st["requantizations"] == n0 + 1 and st["last_requantize_s"] > 0

    _update_from_tensor(srv, policies["w0"])
    out, rate2 = _greedy(srv)
    assert out == policies["greedy0"]
    assert _state(srv)["requantizations"] == n0 + 2
    # A drafter left on the old weights would agree with the new policy almost never.
    for r in (rate1, rate2):
        assert r > 0.5 * rate0 and r > 0.2, (rate0, rate1, rate2)


def test_stale_drafter_collapses_without_requantization(tiny_model, srv, policies):
    """Same update on a server whose re-quantization is switched off: still lossless, but the
    drafter proposes the old policy's tokens and acceptance collapses."""
    _update_from_disk(srv, policies["w1"])
    _, fresh_rate = _greedy(srv)
    stale = start_server(tiny_model, ARGS, env={"SGLANG_ER_GAMMA": "3", "SGLANG_ER_REQUANTIZE": "0"})
    try:
        _update_from_disk(stale, policies["w1"])
        out, stale_rate = _greedy(stale)
        assert _state(stale)["requantizations"] == 0
    finally:
        stale.stop()
    assert out == policies["greedy1"]
    assert stale_rate < 0.5 * fresh_rate, (stale_rate, fresh_rate)


def test_update_while_requests_are_in_flight(srv, policies):
    """SGLang lets in-flight requests finish on the weights they started with, then updates;
    nothing errors, nothing is lost, and the next requests are lossless on the new weights."""
    _update_from_disk(srv, policies["w0"])
    results, errors = [], []

    def job(i):
        try:
            r = srv.generate(f"{PROMPT} {i}", max_new_tokens=120, temperature=1.0, ignore_eos=True)
            results.append(len(r["output_ids"]))
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(repr(e))

    threads = [threading.Thread(target=job, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    _update_from_tensor(srv, policies["w1"])
    for t in threads:
        t.join(timeout=300)
    assert not errors and results == [120] * 6
    out, rate = _greedy(srv)
    assert out == policies["greedy1"] and rate > 0.2
