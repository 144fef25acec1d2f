"""The draft head over a vocabulary subset: counting and selection alone, then a real server whose
drafter scores only 48 of the tiny model's 512 tokens, lossless against plain SGLang (greedy token
for token, sampled by a chi-square test of the first three tokens' joint distribution)."""

from __future__ import annotations

import pytest
import torch
from helpers import FP32, joint_first3, same_distribution_pvalue, start_server
from helpers import greedy_all as _greedy_all

from sglang_er.draft.vocab import FIRST_REFRESH, DraftVocab

K = 48


def test_selection_is_the_most_counted_then_the_lowest_ids():
    v = DraftVocab(20, 4)
    assert v.select().tolist() == [0, 1, 2, 3]  # nothing counted: BPE order
    v.observe(torch.tensor([[7, 7, 7, 19], [19, 5, -1, 25]]))  # -1 (padding) and 25 (out of range) ignored
    assert v.seen == 6
    assert v.select().tolist() == [0, 5, 7, 19]  # 7 x3, 19 x2, 5 x1, then the lowest id
    assert v.coverage(torch.tensor([7, 19])) == pytest.approx(5 / 6)


def test_reselection_period_doubles():
    v = DraftVocab(100, 10)
    assert not v.due()
    v.observe(torch.zeros(FIRST_REFRESH, dtype=torch.int64))
    assert v.due()
    v.select()
    assert not v.due() and v.next_refresh == 2 * FIRST_REFRESH


@pytest.mark.parametrize("k", [0, 20, -3])
def test_a_size_outside_the_vocabulary_is_refused(k):
    with pytest.raises(ValueError, match="draft vocabulary"):
        DraftVocab(20, k)


@pytest.fixture(scope="module")
def eff_vocab(tiny_model):
    srv = start_server(
        tiny_model,
        [*FP32, "--speculative-algorithm", "EFFROLLOUT", "--speculative-num-draft-tokens", "4"],
        env={"SGLANG_ER_GAMMA": "3", "SGLANG_ER_DRAFT_VOCAB": str(K)},
    )
    yield srv
    srv.stop()


def test_greedy_identical_to_plain(eff_vocab, plain_greedy):
    prompts, expected = plain_greedy
    got = _greedy_all(eff_vocab, prompts)
    mismatched = [i for i, (a, b) in enumerate(zip(got, expected)) if a != b]
    assert not mismatched, f"{len(mismatched)} of {len(prompts)} prompts differ, e.g. #{mismatched[0]}"
    state = eff_vocab.effrollout_state()["draft_vocab"]
    assert state["size"] == K
    assert state["selections"] >= 2, "the subset was never re-selected from the traffic"
    assert 0.0 < state["coverage"] < 1.0  # 48 of 512 tokens: the target writes outside the subset


def test_sampled_joint_distribution_matches_plain(plain, eff_vocab):
    prompt, n = "Alice has 12 apples. She buys 7 more. How many", 2000

    def pvalue():
        return same_distribution_pvalue(
            joint_first3(plain, prompt, n, temperature=1.0), joint_first3(eff_vocab, prompt, n, temperature=1.0)
        )

    p = pvalue()
    if p <= 0.01:  # a correct sampler lands here 1% of the time: one fresh draw decides
        p = pvalue()
    assert p > 0.01, f"with a vocabulary subset the first-3-token distribution differs from plain (p={p:.2e})"
