"""Scale-out on SGLang's own machinery: two EFFROLLOUT engines behind ``sglang-router``.

Requests through the router spread over both engines and come back as the plain server's; each
engine chooses γ from its own batch; a weight update reaches every engine (sglang-router 0.3.2
does not forward ``/update_weights_from_disk``, so it goes to each engine the router lists) and
re-quantizes each drafter, after which every engine answers as the new policy with its acceptance
intact. One router and two engines for the module, a few prompts.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from helpers import FP32, hf_greedy, start_servers

from eval.router import Router

PROMPTS = [
    "Alice has 12 apples. She buys 7 more. How many",
    "A train leaves at 3 pm and travels 60 miles per hour. After two hours",
    "Tom reads 15 pages a day. In a week he reads",
    "The sum of two numbers is 20 and their difference is",
    "Grace has 41 stickers. She gives away 9 stickers. Then",
    "A rectangle is 8 cm long and 5 cm wide. Its area",
    "Each box holds 6 eggs. There are 4 boxes, so",
    "Sam saves 3 dollars a week. After 10 weeks",
]
ENGINE = [*FP32, "--speculative-algorithm", "EFFROLLOUT", "--enable-metrics"]
# auto mode, as a fleet runs. The tiny model is overhead-bound: the γ choice measures plain decoding
# faster and explores speculation only now and then. Exploring after every plain iteration
# (forced after 8) makes each 32-token request speculate a few times, so its acceptance is measured.
ENGINE_ENV = {"SGLANG_ER_EXPLORE_EVERY": "1"}


@pytest.fixture(scope="module")
def fleet(tiny_model):
    engines = start_servers(*[(tiny_model, ENGINE, {"max_total_tokens": 4096, "env": ENGINE_ENV})] * 2)
    router = None
    try:
        router = Router([e.url for e in engines], policy="round_robin").start()
        yield router, engines
    finally:
        if router is not None:
            router.stop()
        for e in engines:
            e.stop()


def _metric(url: str, name: str) -> float:
    total = 0.0
    for line in requests.get(url + "/metrics", timeout=30).text.splitlines():
        m = re.match(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.eE+-]+)$", line)
        if m:
            total += float(m.group(1))
    return total


def _completions(url: str, prompts: list[str], n: int = 24) -> list[str]:
    def one(p):
        body = {"model": "m", "prompt": p, "max_tokens": n, "temperature": 0, "ignore_eos": True}
        r = requests.post(url + "/v1/completions", json=body, timeout=300)
        r.raise_for_status()
        return r.json()["choices"][0]["text"]

    with ThreadPoolExecutor(len(prompts)) as ex:
        return list(ex.map(one, prompts))


def _greedy_ids(url: str, prompts: list[str], n: int) -> list[dict]:
    def one(p):
        body = {"text": p, "sampling_params": {"max_new_tokens": n, "temperature": 0, "ignore_eos": True}}
        r = requests.post(url + "/generate", json=body, timeout=300)
        r.raise_for_status()
        return r.json()

    with ThreadPoolExecutor(len(prompts)) as ex:
        return list(ex.map(one, prompts))


def test_openai_requests_spread_over_both_engines_and_equal_plain(fleet, plain):
    router, engines = fleet
    before = [_metric(e.url, "sglang:num_requests_total") for e in engines]
    spec0 = [e.effrollout_state()["metrics"] for e in engines]
    assert _completions(router.url, PROMPTS) == _completions(plain.url, PROMPTS)

    chat = {"model": "m", "messages": [{"role": "user", "content": "What is 2+3?"}], "max_tokens": 12}
    replies = [router.post("/v1/chat/completions", {**chat, "temperature": 0}) for _ in range(2)]
    expected = plain.post("/v1/chat/completions", {**chat, "temperature": 0})["choices"][0]["message"]["content"]
    assert [r["choices"][0]["message"]["content"] for r in replies] == [expected] * 2

    # round robin: each engine served half of the requests, and decoded them itself
    served = [_metric(e.url, "sglang:num_requests_total") - b for e, b in zip(engines, before)]
    assert served == [(len(PROMPTS) + 2) / 2] * 2, served
    for e, s0 in zip(engines, spec0):
        s = e.effrollout_state()["metrics"]
        assert s["iterations_spec"] + s["iterations_plain"] > s0["iterations_spec"] + s0["iterations_plain"]
    # the router gathers every engine's EFFROLLOUT counters, labelled by engine
    gathered = requests.get(router.url + "/engine_metrics", timeout=30).text
    for e in engines:
        assert re.search(rf'^sglang_er_iterations_total{{.*worker_addr="{e.url}"', gathered, re.M), e.url


def test_each_engine_chooses_gamma_from_its_own_batch(fleet):
    """Eight concurrent requests through the router: each engine decodes its four, and its timeline
    shows batches of its own share (never the fleet's eight), each with the cost model's verdict."""
    router, engines = fleet
    last = [max((r["iteration"] for r in e.effrollout_state()["timeline"]), default=-1) for e in engines]
    _greedy_ids(router.url, PROMPTS, 64)
    for e, i0 in zip(engines, last):
        new = [r for r in e.effrollout_state()["timeline"] if r["iteration"] > i0]
        batches = [r["batch_size"] for r in new]
        assert new and 2 <= max(batches) <= len(PROMPTS) // 2, batches
        assert all(r["best_spec_speedup"] is not None for r in new)  # γ was chosen here, per iteration


def test_weight_update_reaches_and_requantizes_every_engine(fleet, tiny_model):
    from sglang_er.models.factory import build_model

    router, engines = fleet
    w1 = build_model("tiny", seed=1)  # same shapes and tokenizer, new weights
    expected = hf_greedy(w1, PROMPTS[:4], 32)
    # sglang-router 0.3.2 does not forward weight updates: they go to every engine it lists
    assert (
        requests.post(router.url + "/update_weights_from_disk", json={"model_path": str(w1)}, timeout=60).status_code
        == 404
    )
    assert router.worker_urls() == sorted(e.url for e in engines)
    n0 = [e.effrollout_state()["requantizations"] for e in engines]
    router.update_weights_from_disk(w1)
    for e, n in zip(engines, n0):
        assert e.effrollout_state()["requantizations"] == n + 1

    # through the router (two prompts per engine) and to each engine directly: the new policy's output
    assert [r["output_ids"] for r in _greedy_ids(router.url, PROMPTS[:4], 32)] == expected
    for e in engines:
        outs = _greedy_ids(e.url, PROMPTS[:4], 32)
        assert [r["output_ids"] for r in outs] == expected
        # a drafter left on the old weights would agree with the new policy almost never
        metas = [r["meta_info"] for r in outs]
        assert all(m.get("spec_num_proposed_drafts", 0) > 0 for m in metas), metas  # each one speculated
        # over the engine's four requests (~100 drafts): ~0.4 fresh, near 0 stale
        rate = sum(m["spec_num_correct_drafts"] for m in metas) / sum(m["spec_num_proposed_drafts"] for m in metas)
        assert rate > 0.2, metas
