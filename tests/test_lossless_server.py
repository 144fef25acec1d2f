"""Losslessness where it is hard: every draft position and the bonus token, through a server.

``test_worker.py`` compares the first three tokens at γ = 3. Here each request samples 18 tokens:
the prefill's token, then 17 decode positions, which one γ = 16 iteration can cover whole (16 drafts
and the bonus) and two γ = 8 iterations can (8 drafts and the bonus each). Every position's
distribution over many requests is compared with plain SGLang's (one chi-square per position,
Bonferroni over the positions): at γ = 16 with T = 1, top-p, top-k and min-p; at γ = 8 with T = 1
and min-p; with γ chosen per iteration by the auto policy (γmax = 16) at T = 1. Greedy output at
γ = 16 must be identical. The same statistic must reject servers with a planted wrong acceptance
rule: accepting every draft, and after a rejection drawing from p instead of norm(max(p - q, 0)).
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from helpers import FP32, FaultSwitch, greedy_all, same_distribution_pvalue, start_servers, tiny_prompts

EFF = ["--speculative-algorithm", "EFFROLLOUT"]
EFF16 = [*EFF, "--speculative-num-draft-tokens", "17"]
EFF8 = [*EFF, "--speculative-num-draft-tokens", "9"]
ENV16 = {"SGLANG_ER_GAMMA": "16"}
ENV8 = {"SGLANG_ER_GAMMA": "8"}
PROMPT = "Alice has 12 apples. She buys 7 more. How many"
TOKENS = 18  # the prefill's token, then one γ = 16 iteration (16 drafts and the bonus), or two of γ = 8
N = 1200
SAMPLINGS = {
    "t1": {"temperature": 1.0},
    "min_p": {"temperature": 1.0, "min_p": 0.05},
    "top_p": {"temperature": 1.0, "top_p": 0.9},
    "top_k": {"temperature": 1.0, "top_k": 20},
}
# (server fixture, sampling) pairs of the per-position test on the fixed-γ servers
FIXED_CASES = [("eff16", s) for s in SAMPLINGS] + [("eff8", "t1"), ("eff8", "min_p")]
# The planted server's draft vocabulary. Counted traffic is the prompt's 17 distinct tokens (each once
# per request) and the sampled ones: 48 holds the prompt and the outputs covering ~40 % of the target's
# mass at each position, where a planted bug's shift, about m(1 - m) for covered mass m, is near its
# peak. At 16 (prompt tokens only, m ~ 0.02) the no-residual bug escaped detection.
PLANTED_VOCAB = 48
PLANTED_ENV = {**ENV16, "SGLANG_ER_DRAFT_VOCAB": str(PLANTED_VOCAB)}
DEEP = 9  # the planted accept-all bug is asserted on positions 9-17: drafts 9-16 of γ = 16 and the bonus


def positions(srv, n: int = N, **sampling) -> list[Counter]:
    """Per output position, the counts of the token sampled there over ``n`` requests."""

    def chunk(k):
        body = {"text": [PROMPT] * k, "sampling_params": {"max_new_tokens": TOKENS, "ignore_eos": True, **sampling}}
        r = requests.post(srv.url + "/generate", json=body, timeout=600)
        r.raise_for_status()
        return [o["output_ids"] for o in r.json()]

    with ThreadPoolExecutor(4) as ex:
        outs = [ids for part in ex.map(chunk, [n // 12] * 12) for ids in part]
    return [Counter(ids[t] for ids in outs) for t in range(TOKENS)]


def min_adjusted_pvalue(a: list[Counter], b: list[Counter], first: int = 0) -> tuple[float, int]:
    """The smallest per-position p-value from position ``first`` on, times the number of those
    positions (Bonferroni), and where."""
    ps = [same_distribution_pvalue(x, y) for x, y in zip(a[first:], b[first:])]
    t = min(range(len(ps)), key=ps.__getitem__)
    return min(1.0, ps[t] * len(ps)), first + t


def assert_follows_plain(
    srv, sampling: str, plain_positions, got: list[Counter], label: str, n: int = N, first: int = 0
) -> None:
    """The decision of every test here: the positions follow plain SGLang's unless the adjusted
    p-value is at most 0.01 twice, on ``got`` and on a fresh draw of ``n`` requests from ``srv``
    (the statistic looks at positions ``first`` on)."""
    p, t = min_adjusted_pvalue(plain_positions[sampling], got, first)
    print(f"{label} {sampling}: adjusted p = {p:.2e} at position {t}")
    if p <= 0.01:  # a correct sampler lands here 1% of the time: one fresh draw decides
        p, t = min_adjusted_pvalue(plain_positions[sampling], positions(srv, n=n, **SAMPLINGS[sampling]), first)
        print(f"{label} {sampling}, fresh draw: adjusted p = {p:.2e} at position {t}")
    assert p > 0.01, f"position {t}: {label} differs from plain at {sampling} (adjusted p = {p:.2e})"


@pytest.fixture(scope="module")
def servers(tiny_model):
    """The module's four servers, started side by side: fixed γ = 16 and 8, auto with γmax 16, and
    the planted one (γ = 16, a restricted draft vocabulary, a planted rule switched on per test)."""
    started = start_servers(
        (tiny_model, [*FP32, *EFF16], {"env": ENV16}),
        (tiny_model, [*FP32, *EFF8], {"env": ENV8}),
        (tiny_model, [*FP32, *EFF16]),
        (tiny_model, [*FP32, *EFF16], {"env": PLANTED_ENV, "faults": FaultSwitch()}),
    )
    yield dict(zip(("eff16", "eff8", "auto16", "planted16"), started))
    for srv in started:
        srv.stop()


@pytest.fixture(scope="module")
def eff16(servers):
    return servers["eff16"]


@pytest.fixture(scope="module")
def eff8(servers):
    return servers["eff8"]


@pytest.fixture(scope="module")
def plain_positions(plain):
    return {name: positions(plain, **s) for name, s in SAMPLINGS.items()}


def test_greedy_identical_at_gamma_16(plain, eff16):
    prompts = tiny_prompts(24)
    assert greedy_all(eff16, prompts) == greedy_all(plain, prompts)
    st = eff16.effrollout_state()
    assert st["gamma_max"] == 16 and {r["gamma"] for r in st["timeline"]} == {16}


@pytest.mark.parametrize(("server", "sampling"), FIXED_CASES, ids=[f"{g}-{s}" for g, s in FIXED_CASES])
def test_every_draft_position_and_the_bonus_follow_plain(server, sampling, request, plain_positions):
    srv = request.getfixturevalue(server)
    before = srv.effrollout_state()["metrics"]["iterations_spec"]
    got = positions(srv, **SAMPLINGS[sampling])
    st = srv.effrollout_state()
    assert st["metrics"]["iterations_spec"] > before  # it did speculate
    assert {r["gamma"] for r in st["timeline"]} == {int(server.removeprefix("eff"))}
    assert_follows_plain(srv, sampling, plain_positions, got, f"EFFROLLOUT γ = {server.removeprefix('eff')}")


def test_every_position_follows_plain_when_the_auto_policy_chooses_gamma(servers, plain_positions):
    """γmax = 16, γ chosen per iteration by the auto policy with its default settings: it
    speculates at some γs and decodes plainly at others within the same requests (on the tiny
    model, forced explorations alone speculate in every batch-size octave it has not run at), so
    the positions cover switches of γ between iterations. The sampled requests must have been
    decoded with several speculative iterations that accepted drafts."""
    srv = servers["auto16"]
    st = srv.effrollout_state()
    assert st["mode"] == "auto" and st["gamma_max"] == 16
    last = max((r["iteration"] for r in st["timeline"]), default=-1)
    got = positions(srv, **SAMPLINGS["t1"])
    ran = [r for r in srv.effrollout_state()["timeline"] if r["iteration"] > last]
    spec = [r for r in ran if r["gamma"] > 0]
    print(f"auto: γ per iteration {[r['gamma'] for r in ran]}")
    assert len(spec) >= 3 and sum(r["accepted"] for r in spec) > 0, [r["gamma"] for r in ran]
    assert_follows_plain(srv, "t1", plain_positions, got, "EFFROLLOUT auto γ")


@pytest.fixture(scope="module")
def planted16(servers):
    """γ = 16 with a drafter restricted to :data:`PLANTED_VOCAB` tokens, a planted rule switched on
    per test. The restricted drafter is rejected often, and where it is accepted every draft it puts
    all of q on those tokens, so each planted bug moves the positions far enough that its detection
    does not ride on chance. Honest traffic first: the vocabulary starts as the lowest ids, which a
    random model almost never samples, and follows the traffic after its first re-selection."""
    srv = servers["planted16"]
    positions(srv, n=N // 4, **SAMPLINGS["t1"])
    assert srv.effrollout_state()["draft_vocab"]["selections"] >= 1
    return srv


def test_the_position_test_detects_accepting_every_draft_at_deep_positions(planted16, plain_positions):
    """Drafts from the W4 copy of the target itself follow p closely, so accepting every one moves
    the deep positions too little for a few hundred requests to show; drafts from the restricted
    vocabulary do not, so the decision above, restricted to the deep positions, rejects the bug."""
    with planted16.faults.planted("accept_all"), pytest.raises(AssertionError, match="differs from plain"):
        got = positions(planted16, n=N // 4, **SAMPLINGS["t1"])
        assert_follows_plain(planted16, "t1", plain_positions, got, "planted accept_all", n=N // 4, first=DEEP)
    assert {r["gamma"] for r in planted16.effrollout_state()["timeline"]} == {16}


def test_the_position_test_detects_resampling_without_the_residual(planted16, plain_positions):
    """The bug moves each position by a fraction of the rejection rate; the restricted drafter is
    rejected often. The decision and the statistic are those of the tests above, on half as many
    requests per draw."""
    with planted16.faults.planted("no_residual"), pytest.raises(AssertionError, match="differs from plain"):
        got = positions(planted16, n=N // 2, **SAMPLINGS["t1"])
        assert_follows_plain(planted16, "t1", plain_positions, got, "planted no_residual", n=N // 2)
