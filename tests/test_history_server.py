"""History drafts through a real server (SGLANG_ER_HISTORY=all, tiny float32 model): lossless
greedy on repeated prompts with n=4, the sampled distribution equals the plain server's, a
wrong acceptance rule for history drafts is detected, and history drafts are proposed for
prompts seen before and not for new ones.

γ is fixed at 2 so that every history proposal of 2+ tokens is verified (in auto mode the
measured acceptance decides, and on a random-weight model at temperature 1 it rightly prefers
the W4 drafter, which would leave the distribution tests nothing to check). History drafts in
auto mode are exercised under load by tests/test_hardening.py."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from helpers import FP32, FaultSwitch, joint_first3, same_distribution_pvalue, start_server, tiny_prompts

EFF_HIST = [*FP32, "--speculative-algorithm", "EFFROLLOUT", "--speculative-num-steps", "4", "--enable-metrics"]
ENV = {"SGLANG_ER_HISTORY": "all", "SGLANG_ER_GAMMA": "2"}
PROMPT = "Alice has 12 apples. She buys 7 more. How many"


@pytest.fixture(scope="module")
def hist(tiny_model):
    srv = start_server(tiny_model, EFF_HIST, env=ENV, faults=FaultSwitch())
    yield srv
    srv.stop()


def _by_source(srv) -> dict[str, tuple[float, float]]:
    text = requests.get(srv.url + "/metrics", timeout=30).text
    out: dict[str, list[float]] = {}
    for kind, idx in (("drafted", 0), ("accepted", 1)):
        for m in re.finditer(rf'^sglang_er:source_{kind}_tokens_total{{source="(\w+)"}} ([0-9.eE+-]+)$', text, re.M):
            out.setdefault(m.group(1), [0.0, 0.0])[idx] = float(m.group(2))
    return {k: (v[0], v[1]) for k, v in out.items()}


def _completions(srv, prompt, n, **kw):
    r = srv.post("/v1/completions", {"model": "m", "prompt": prompt, "n": n, **kw})
    return [c["text"] for c in r["choices"]]


def test_greedy_lossless_on_repeated_prompts_with_n4(hist, plain):
    prompts = tiny_prompts(8)
    expected = [_completions(plain, p, 1, max_tokens=48, temperature=0)[0] for p in prompts]
    before = _by_source(hist).get("group", (0.0, 0.0))
    for _ in range(3):  # epochs: the same prompts come back
        with ThreadPoolExecutor(8) as ex:
            got = list(ex.map(lambda p: _completions(hist, p, 4, max_tokens=48, temperature=0), prompts))
        for i, texts in enumerate(got):
            assert texts == [expected[i]] * 4, f"prompt #{i} differs from the plain server"
    drafted, accepted = (a - b for a, b in zip(_by_source(hist)["group"], before))
    assert drafted > 0 and accepted > 0.5 * drafted, (drafted, accepted)  # greedy repeats: mostly accepted
    st = hist.effrollout_state()
    assert st["history"]["mode"] == "all" and st["history"]["groups"] >= 8 and st["history"]["hits"] > 0
    assert st["metrics"]["by_source"]["group"]["accepted"] > 0


@pytest.mark.parametrize("sampling", [{"temperature": 1.0}, {"temperature": 1.0, "top_p": 0.9}], ids=["t1", "top_p"])
def test_sampled_distribution_matches_plain(hist, plain, sampling):
    """Small batches (4 prompts per call): memory-bound iterations where history drafts are used."""
    before = _by_source(hist)

    def pvalue():
        return same_distribution_pvalue(
            joint_first3(plain, PROMPT, 2000, **sampling), joint_first3(hist, PROMPT, 2000, per_call=4, **sampling)
        )

    p = pvalue()
    if p <= 0.01:  # a correct sampler lands here 1% of the time: one fresh draw decides
        p = pvalue()
    after = _by_source(hist)
    used = sum(after.get(s, (0, 0))[0] - before.get(s, (0, 0))[0] for s in ("group", "prompt", "self"))
    assert used > 0, "no history draft was verified: the test would prove nothing"
    assert p > 0.01, f"first-3-token distribution with history drafts differs from plain (p={p:.2e})"


def test_history_proposed_for_seen_prompts_only(hist):
    fresh = "Zebra quilt 913 xylophone ruby 47 lantern"
    before = _by_source(hist).get("group", (0.0, 0.0))[0]
    first = hist.generate(fresh, max_new_tokens=24, temperature=0, ignore_eos=True)["meta_info"]
    assert _by_source(hist).get("group", (0.0, 0.0))[0] == before, "group drafts for a prompt never seen"
    assert "group" not in first["spec_sources"]
    again = hist.generate(fresh, max_new_tokens=24, temperature=0, ignore_eos=True)[
        "meta_info"
    ]  # an earlier epoch now exists
    assert _by_source(hist)["group"][0] > before
    # the request's own meta_info splits its drafts by source; greedy repeats its earlier epoch
    group = again["spec_sources"]["group"]
    assert group["proposed"] > 0 and group["accepted"] > 0.5 * group["proposed"], again["spec_sources"]
    assert sum(1 for g in again["spec_gamma"] if g) == sum(d["iterations"] for d in again["spec_sources"].values())


def test_wrong_history_acceptance_rule_is_detected(hist, plain):
    joint_first3(hist, PROMPT, 400, per_call=4, temperature=1.0)  # history for the prompt exists from here on
    reference = joint_first3(plain, PROMPT, 2000, temperature=1.0)
    with hist.faults.planted("accept_all_history"):
        p = same_distribution_pvalue(reference, joint_first3(hist, PROMPT, 2000, per_call=4, temperature=1.0))
    assert p < 1e-4, f"accepting every history draft went undetected (p={p:.2e})"
