"""Losslessness where it is hard: γ = 16, every draft position and the bonus token, through a server.

``test_worker.py`` compares the first three tokens at γ = 3. Here one γ = 16 iteration produces
17 tokens per request (16 drafts and the bonus); every position's distribution over many requests
is compared with plain SGLang's (one chi-square per position, Bonferroni over the positions), at
T = 1 and with min-p, and greedy output must be identical. The same statistic must reject a server
with the subtle planted bug: after a rejection, drawing from p instead of norm(max(p - q, 0)).
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from helpers import FP32, greedy_all, planted, same_distribution_pvalue, start_server, tiny_prompts

EFF16 = ["--speculative-algorithm", "EFFROLLOUT", "--speculative-num-draft-tokens", "17"]
ENV16 = {"SGLANG_ER_GAMMA": "16"}
PROMPT = "Alice has 12 apples. She buys 7 more. How many"
TOKENS = 18  # the prefill's token, then one γ = 16 iteration: 16 drafts and the bonus
N = 1200
SAMPLINGS = {"t1": {"temperature": 1.0}, "min_p": {"temperature": 1.0, "min_p": 0.05}}


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


def min_adjusted_pvalue(a: list[Counter], b: list[Counter]) -> tuple[float, int]:
    """The smallest per-position p-value times the number of positions (Bonferroni), and where."""
    ps = [same_distribution_pvalue(x, y) for x, y in zip(a, b)]
    t = min(range(len(ps)), key=ps.__getitem__)
    return min(1.0, ps[t] * len(ps)), t


@pytest.fixture(scope="module")
def eff16(tiny_model):
    srv = start_server(tiny_model, [*FP32, *EFF16], env=ENV16)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def plain_positions(plain):
    return {name: positions(plain, **s) for name, s in SAMPLINGS.items()}


def test_greedy_identical_at_gamma_16(plain, eff16):
    prompts = tiny_prompts(24)
    assert greedy_all(eff16, prompts) == greedy_all(plain, prompts)
    st = eff16.effrollout_state()
    assert st["gamma_max"] == 16 and {r["gamma"] for r in st["timeline"]} == {16}


@pytest.mark.parametrize("sampling", list(SAMPLINGS))
def test_every_draft_position_and_the_bonus_follow_plain(sampling, eff16, plain_positions):
    before = eff16.effrollout_state()["metrics"]["iterations_spec"]
    got = positions(eff16, **SAMPLINGS[sampling])
    assert eff16.effrollout_state()["metrics"]["iterations_spec"] > before  # it did speculate
    p, t = min_adjusted_pvalue(plain_positions[sampling], got)
    if p <= 0.01:  # a correct sampler lands here 1% of the time: one fresh draw decides
        p, t = min_adjusted_pvalue(plain_positions[sampling], positions(eff16, **SAMPLINGS[sampling]))
    assert p > 0.01, f"position {t}: EFFROLLOUT γ = 16 differs from plain (adjusted p = {p:.2e})"


def test_the_position_test_detects_resampling_without_the_residual(tiny_model, plain_positions):
    """The bug moves each position by a fraction of the rejection rate; a drafter restricted to a
    16-token vocabulary is rejected often, so the proof that the statistic sees the bug does not
    ride on chance (the acceptance rule and the statistic are those of the tests above)."""
    env = {**ENV16, "SGLANG_ER_DRAFT_VOCAB": "16", **planted("no_residual")}
    wrong = start_server(tiny_model, [*FP32, *EFF16], env=env)
    try:
        p, t = min_adjusted_pvalue(plain_positions["t1"], positions(wrong, **SAMPLINGS["t1"]))
    finally:
        wrong.stop()
    print(f"planted no_residual: adjusted p = {p:.2e} at position {t}")
    assert p < 1e-3, f"the planted bug went unnoticed (best position {t}, adjusted p = {p:.2e})"
