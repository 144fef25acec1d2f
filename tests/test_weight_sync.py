"""Policy updates reach the drafter: after each weight update (from disk, from tensors, while
requests are in flight) the W4 copy is re-quantized from the new weights, so acceptance stays
at its level and the output is lossless w.r.t. the new weights. A server whose drafter is left
on the old weights (test-only switch) keeps lossless output but its acceptance collapses:
proof that the re-quantization is what keeps the drafter useful."""

from __future__ import annotations

import threading

import pytest
from helpers import FaultSwitch, hf_greedy, start_server

PROMPT = "Alice has 12 apples. She buys 7 more. How many"
ARGS = ["--dtype", "float32", "--speculative-algorithm", "EFFROLLOUT", "--speculative-num-draft-tokens", "4"]


@pytest.fixture(scope="module")
def policies(tiny_model):
    from sglang_er.models.factory import build_model

    w1 = build_model("tiny", seed=1)  # same shapes and tokenizer, new weights
    greedy0, greedy1 = (hf_greedy(m, [PROMPT])[0] for m in (tiny_model, w1))
    return {"w0": tiny_model, "w1": w1, "greedy0": greedy0, "greedy1": greedy1}


@pytest.fixture(scope="module")
def srv(tiny_model):
    s = start_server(tiny_model, ARGS, env={"SGLANG_ER_GAMMA": "3"}, faults=FaultSwitch())
    yield s
    s.stop()


def _greedy(server):
    r = server.generate(PROMPT, max_new_tokens=40, temperature=0, ignore_eos=True)
    return r["output_ids"], r["meta_info"]["spec_accept_rate"]


def _state(server):
    return server.effrollout_state()


def _update_from_disk(server, path):
    server.update_weights_from_disk(path)


def _update_from_tensor(server, path):
    from safetensors.torch import load_file

    server.update_weights_from_tensor(load_file(str(path / "model.safetensors")).items())


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


def test_stale_drafter_collapses_without_requantization(srv, policies):
    """The same update with re-quantization planted away (test harness): still lossless, but the
    drafter proposes the old policy's tokens and acceptance collapses. The next honest update
    re-quantizes again."""
    _update_from_disk(srv, policies["w0"])
    _update_from_disk(srv, policies["w1"])
    _, fresh_rate = _greedy(srv)
    _update_from_disk(srv, policies["w0"])
    n = _state(srv)["requantizations"]
    with srv.faults.planted("stale_drafter"):
        _update_from_disk(srv, policies["w1"])  # the drafter stays on w0
        out, stale_rate = _greedy(srv)
        assert _state(srv)["requantizations"] == n
    _update_from_disk(srv, policies["w1"])
    assert _state(srv)["requantizations"] == n + 1
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


def test_updates_every_few_seconds_under_load(srv, policies):
    """RL-style churn: weights pushed every ~2 s, alternating disk and tensor updates, while
    greedy and sampled requests keep arriving. Each update runs the way RL frameworks drive
    SGLang under load (pause with retraction, update, continue: the KV cache can be flushed and
    retracted requests are re-prefilled on the new weights). No error, no hang, the drafter is
    re-quantized each time, and right after each update the output is the new policy's."""
    import itertools
    import time

    stop, errors, served = threading.Event(), [], []

    def load(i):
        while not stop.is_set():
            try:
                r = srv.generate(
                    f"{PROMPT} {i}", max_new_tokens=60, temperature=1.0 if i % 2 else 0, ignore_eos=True, timeout=120
                )
                served.append(len(r["output_ids"]))
            except Exception as e:  # noqa: BLE001 - collected and asserted below
                errors.append(repr(e))

    workers = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    for t in workers:
        t.start()
    n0 = _state(srv)["requantizations"]
    try:
        for k, (push, w) in enumerate(
            itertools.islice(
                itertools.cycle(
                    [
                        (_update_from_tensor, "1"),
                        (_update_from_disk, "0"),
                        (_update_from_disk, "1"),
                        (_update_from_tensor, "0"),
                    ]
                ),
                4,
            )
        ):
            time.sleep(2.0)
            with srv.generation_paused():
                push(srv, policies["w" + w])
            out, _ = _greedy(srv)
            assert out == policies["greedy" + w], f"update {k}: output is not the new policy's"
            assert _state(srv)["requantizations"] == n0 + k + 1
    finally:
        stop.set()
        for t in workers:
            t.join(timeout=300)
    assert not any(t.is_alive() for t in workers)
    assert not errors, errors[:3]
    assert served and all(n == 60 for n in served)
