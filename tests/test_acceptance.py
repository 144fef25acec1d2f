"""Per-position acceptance and the tokens an iteration commits (sglang_er.gamma.acceptance): engine-free."""

from __future__ import annotations

import math
import random

import pytest
from gamma_helpers import accepted_run

from sglang_er.gamma import (
    AcceptanceModel,
)


@pytest.mark.parametrize("alphas", [[0.8] * 4, [0.9, 0.8, 0.65, 0.5]])
def test_acceptance_estimates_alpha(alphas):
    rng = random.Random(1)
    acc = AcceptanceModel(4, window=16384)
    for _ in range(1000):  # batches of 8 at γ = 4
        acc.observe(4, [accepted_run(rng, alphas, 4) for _ in range(8)])
    est = acc.alphas()
    assert all(abs(e - a) < 0.03 for e, a in zip(est, alphas)), (est, alphas)
    e_true = 1 + sum(math.prod(alphas[:k]) for k in range(1, 5))
    assert acc.expected_tokens_table()[4] == pytest.approx(e_true, abs=0.08)


def test_acceptance_closed_form_and_cold_start():
    for alpha in (0.3, 0.7, 0.95):
        acc = AcceptanceModel(6, prior_alpha=alpha)  # cold start: every α_k is the prior
        assert acc.alphas() == pytest.approx([alpha] * 6)
        table = acc.expected_tokens_table()
        for g in range(7):
            assert table[g] == pytest.approx((1 - alpha ** (g + 1)) / (1 - alpha))
    acc = AcceptanceModel(4)
    with pytest.raises(ValueError, match="accept_len"):
        acc.observe(2, [3])
    with pytest.raises(ValueError, match="outside"):
        acc.observe(5, [1])


def test_acceptance_window_and_unvisited_positions():
    rng = random.Random(2)
    acc = AcceptanceModel(4, window=2000, prior_alpha=0.7)
    for _ in range(250):
        acc.observe(1, [accepted_run(rng, [0.9] * 4, 1) for _ in range(8)])
    # only position 1 was ever tried (γ = 1): deeper positions follow the pooled rate, not 0.7
    assert all(abs(a - 0.9) < 0.03 for a in acc.alphas())
    for _ in range(250):  # the regime changes; the window forgets the old one
        acc.observe(4, [accepted_run(rng, [0.3] * 4, 4) for _ in range(8)])
    assert acc.num_observations == 2000
    assert abs(acc.alphas()[0] - 0.3) < 0.05


def test_acceptance_per_request():
    """Per-request acceptance as the controller records it (``observe`` with rids) and the chooser
    reads it (``batch_expected_tokens``): a request's own counts are used once it has
    ``request_min_obs`` records, shrunk towards the server-wide rates."""
    acc = AcceptanceModel(4, prior_alpha=0.8, request_min_obs=8)
    rng = random.Random(3)
    for _ in range(500):
        acc.observe(4, [accepted_run(rng, [0.8] * 4, 4) for _ in range(6)])

    def own(rid):  # E[L|γ=4] of one request, as the chooser sees it
        return acc.batch_expected_tokens(1, [rid])[4]

    def srv():  # server-wide E[L|γ=4]
        return acc.expected_tokens_table()[4]

    for i in range(7):
        acc.observe(4, [0], rids=["hard"])  # a request whose drafts are always rejected
    assert own("hard") == srv()  # not enough history yet
    acc.observe(4, [0], rids=["hard"])
    assert own("hard") < srv() - 1  # 8 records: shrunk halfway to the server's α
    for i in range(32):
        acc.observe(4, [0], rids=["hard"])
    assert own("hard") < 1.5 < srv()
    acc.observe(4, [4, 0], rids=["easy", "hard"])  # observe(rids=) records per request and server-wide
    assert acc.num_observations == 500 * 6 + 40 + 2
    assert own("hard") < 1.5
    s = srv()
    total = acc.batch_expected_tokens(3, ["hard", "x", "y"])
    assert total[4] == pytest.approx(acc.expected_tokens_table("hard")[4] + 2 * s)  # Σ_b of each table
    assert total[0] == 3.0
    assert acc.batch_expected_tokens(3, ["hard", "x", "y"]) == total  # the same batch, nothing new: cached
    acc.forget("hard")
    assert acc.batch_expected_tokens(3, ["hard", "x", "y"])[4] == pytest.approx(3 * s)  # forget clears it
    for _ in range(8):
        acc.observe(4, [0], rids=["x"])
    assert acc.batch_expected_tokens(3, ["hard", "x", "y"])[4] < 3 * s - 1  # so does a new record
