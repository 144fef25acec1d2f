"""The group/history index against a brute-force reference, its memory bound, its sources."""

from __future__ import annotations

import random
import tracemalloc
from collections import Counter

import pytest

from sglang_er.history.store import PROMPT_STREAM, HistoryIndex


def brute_force_match_len(streams: dict, context: list[int], m: int) -> int:
    """Longest suffix match (>= m, else 0) of context over every indexed position of every
    stream (a sample's text is the prompt followed by its output)."""
    best = 0
    for s_id, s in streams.items():
        full = s if s_id == PROMPT_STREAM else streams[PROMPT_STREAM] + s
        off = len(full) - len(s)
        for end in range(m if s_id == PROMPT_STREAM else 1, len(s)):  # something must follow the match
            n = 0
            while n < min(end + off, len(context)) and full[end + off - n - 1] == context[-n - 1]:
                n += 1
            best = max(best, n if n >= m else 0)
    return best


def _positions(streams, context, m, length):
    out = []
    for s_id, s in streams.items():
        full = s if s_id == PROMPT_STREAM else streams[PROMPT_STREAM] + s
        off = len(full) - len(s)
        for end in range(m if s_id == PROMPT_STREAM else 1, len(s)):
            n = 0
            while n < min(end + off, len(context)) and full[end + off - n - 1] == context[-n - 1]:
                n += 1
            if n == length:
                out.append((s_id, end))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_incremental_index_matches_brute_force(seed):
    rng = random.Random(seed)
    vocab, m, gamma = rng.choice([3, 5, 8]), rng.choice([2, 3]), 5
    idx = HistoryIndex(min_match=m, max_candidates=10**9)
    prompt = [rng.randrange(vocab) for _ in range(12)]
    key = idx.group_key(prompt)
    idx.group(key, prompt)
    streams = {PROMPT_STREAM: list(prompt)}
    sids = [f"r{i}" for i in range(4)]
    for step in range(300):  # interleaved commits of 1-3 tokens, as decode iterations would
        sid = rng.choice(sids)
        toks = [rng.randrange(vocab) for _ in range(rng.randint(1, 3))]
        idx.extend(key, sid, toks)
        streams.setdefault(sid, []).extend(toks)
        if step % 7:
            continue
        who = rng.choice(sids)
        context = prompt + streams.get(who, [])
        got = idx.propose(key, who, context, gamma)
        want_len = brute_force_match_len(streams, context, m)
        if want_len == 0:
            assert got is None
            continue
        assert got is not None and got.match_len == want_len
        # replay the vote with the index's own choices: every choice is a most-voted token
        live = None
        for j, (tok, votes) in enumerate(zip(got.tokens, got.votes)):
            if live is None:
                live = _positions(streams, context, m, want_len)
                assert got.support == len(live)
            c = Counter(streams[s][e + j] for s, e in live if e + j < len(streams[s]))
            assert votes == c[tok] == max(c.values()), (j, tok, c)
            live = [(s, e) for s, e in live if e + j < len(streams[s]) and streams[s][e + j] == tok]
        # it stops only when no agreeing position continues
        if len(got.tokens) < gamma:
            j = len(got.tokens)
            assert not any(e + j < len(streams[s]) for s, e in live)


def test_sources_group_and_self():
    idx = HistoryIndex(min_match=3)
    prompt = [1, 2, 3, 4]
    key = idx.group_key(prompt)
    idx.group(key, prompt)
    idx.extend(key, "a", [10, 11, 12, 13, 14, 15])
    # b starts writing what a wrote: proposals come from a's stream (another sample: "group")
    idx.extend(key, "b", [10, 11, 12])
    p = idx.propose(key, "b", prompt + [10, 11, 12], 3)
    assert p.tokens == [13, 14, 15] and p.source == "group" and p.match_len == 7
    # a repeats itself: the only match is in its own earlier tokens ("self", n-gram lookup)
    idx.extend(key, "c", [20, 21, 22, 23, 20, 21, 22])
    p = idx.propose(key, "c", prompt + [20, 21, 22, 23, 20, 21, 22], 2)
    assert p.tokens == [23, 20] and p.source == "self"
    # the prompt's own tokens are indexed: answers copy its numbers and phrases
    idx.extend(key, "d", [7, 1, 2, 3])
    p = idx.propose(key, "d", prompt + [7, 1, 2, 3], 1)
    assert p.tokens == [4] and p.source == "prompt"
    # never seen before: nothing to propose
    assert idx.propose(key, "e", [90, 91, 92], 3) is None
    assert idx.propose(idx.group_key([5]), "x", [1, 2, 3], 3) is None


def test_most_frequent_continuation_wins():
    idx = HistoryIndex(min_match=2)
    key = idx.group_key([0])
    idx.group(key, [0])
    for i, tail in enumerate([[5, 6], [5, 6], [7, 8]]):
        idx.extend(key, f"s{i}", [1, 2, *tail])
    p = idx.propose(key, "new", [0, 1, 2], 2)
    assert p.tokens == [5, 6] and p.votes == [2, 2] and p.support == 3


def test_same_prompt_is_one_group_across_requests_and_samples():
    idx = HistoryIndex()
    a, b = idx.group_key([3, 1, 4, 1, 5]), idx.group_key([3, 1, 4, 1, 5])
    assert a == b and a != idx.group_key([3, 1, 4, 1, 6])


def test_eviction_keeps_memory_within_budget_over_10000_requests():
    rng = random.Random(0)
    idx = HistoryIndex(min_match=3, budget_tokens=20_000)
    prompts = [[rng.randrange(500) for _ in range(30)] for _ in range(400)]
    peak = 0
    for r in range(10_000):
        p = prompts[rng.randrange(len(prompts))]
        key = idx.group_key(p)
        idx.group(key, p)
        idx.extend(key, r, [rng.randrange(500) for _ in range(40)])
        peak = max(peak, idx.tokens)
    assert peak <= 20_000 + 70  # one group's prompt + one commit above the budget at most, transiently
    assert idx.tokens <= 20_000 and idx.evicted_groups > 0
    assert sum(g.tokens for g in idx._groups.values()) == idx.tokens


def test_memory_per_indexed_token_is_bounded():
    """The measured figure the README states (Python objects; a GRPO group of 8 × 1000 tokens)."""
    rng = random.Random(1)
    idx = HistoryIndex(min_match=3)
    prompt = [rng.randrange(32000) for _ in range(100)]
    key = idx.group_key(prompt)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    idx.group(key, prompt)
    for s in range(8):
        idx.extend(key, s, [rng.randrange(32000) for _ in range(1000)])
    per_token = (tracemalloc.get_traced_memory()[0] - before) / idx.tokens
    tracemalloc.stop()
    assert per_token < 400, per_token


def test_meta_info_splits_a_requests_drafts_by_source():
    from sglang_er.engine import spec_meta

    tagged = [(1, 0)] + [(2, 3, "group")] * 4 + [(3, 3, "w4")] * 2 + [(4, 2, "none")] * 1
    meta = {spec_meta.KEY: tagged, "completion_tokens": 8, "spec_num_correct_drafts": 4}
    spec_meta.correct(meta)
    assert meta["spec_gamma"] == [0, 3, 3, 2]
    assert meta["spec_sources"] == {
        "group": {"iterations": 1, "proposed": 3, "accepted": 3},
        "w4": {"iterations": 1, "proposed": 3, "accepted": 1},
        "none": {"iterations": 1, "proposed": 0, "accepted": 0},
    }


def _group_with_history(n: int, probe_every: int = 1):
    """A HistoryProposer over one prompt: a finished sample's whole text indexed, and n live samples
    5-7 tokens into the same text (each has a proposal); W4 iterations look up every proposal
    unless ``probe_every`` says otherwise."""
    from types import SimpleNamespace

    from sglang_er.history.proposer import HistoryProposer

    prompt = list(range(100, 140))
    text = [7, 8, 9, 10, 11, 12, 13, 14, 15, 16] * 3
    done = SimpleNamespace(rid="done", origin_input_ids=prompt, output_ids=text)
    reqs = [SimpleNamespace(rid=f"r{i}", origin_input_ids=prompt, output_ids=text[: 5 + i % 3]) for i in range(n)]
    hd = HistoryProposer(gamma_max=4, probe_every=probe_every)
    hd.sync([done])
    hd.sync(reqs)  # "done" left the batch: its whole text is indexed
    return hd, reqs, done


def _target_agrees(hd, n: int) -> None:
    """Measure the shadow proposals of the last plan with a target that puts all its mass on
    them (drafts [n, 4] = the proposals, p one-hot on each proposed token)."""
    import torch

    props = dict(hd.shadow)
    probs = torch.zeros(n, 5, 32)
    for i, h in props.items():
        for k, t in enumerate(h):
            probs[i, k, t] = 1.0
    hd.observe_shadow(torch.tensor([props[i] for i in range(n)]), probs)


def test_unused_proposals_are_measured_in_the_shadow_of_the_w4_drafts():
    """Auto mode: history drafts are used only where their measured E[L] beats the W4 drafter's,
    and a proposal left unused is measured anyway from the verify's distributions (no W4 row is
    given up to explore): scored while it agrees with the verified drafts, censored after the
    first disagreement. Fixed γ (no W4 estimate): every proposal is verified."""
    import torch

    from sglang_er.history.proposer import HistoryProposer

    hd, reqs, done = _group_with_history(16)
    w4 = [1.0, 1.9, 2.7, 3.4, 4.0]  # E[L | W4, γ]: α ≈ 0.9
    assert hd.plan(reqs, 4, None).history_rows == list(range(16))  # fixed γ

    assert hd.plan(reqs, 4, w4) is None  # the prior (α 0.5) expects less than W4
    props = dict(hd.shadow)
    assert sorted(props) == list(range(16)) and all(len(h) == 4 for h in props.values())
    drafts = torch.tensor([props[i] for i in range(16)])  # the W4 drafter proposed the same tokens
    drafts[8:, 1] = 0  # ... except on rows 8-15 from position 2 on
    probs = torch.zeros(16, 5, 32)
    for i in range(16):
        for k, t in enumerate(props[i]):
            probs[i, k, t] = 1.0  # the target agrees with the history text
    hd.observe_shadow(drafts, probs)
    assert hd.shadow_records == 16 and hd.shadow == []
    # rows 0-7 scored over 4 positions, all accepted; rows 8-15 censored after position 2
    assert hd.acceptance._srv.tried == [16, 16, 8, 8] and hd.acceptance._srv.acc == [16, 16, 8, 8]
    plan, rounds = None, 0
    while plan is None and rounds < 8:  # the measured E[L] overtakes W4's: history drafts are used
        hd.observe_shadow(torch.tensor([props[i] for i in range(16)]), probs)
        plan, rounds = hd.plan(reqs, 4, w4), rounds + 1
    assert plan is not None and plan.history_rows == list(range(16)) and not plan.run_drafter

    greedy = HistoryProposer(gamma_max=4, probe_every=1)  # greedy: a proposal is accepted where it is the argmax
    greedy.sync([done])
    greedy.sync(reqs)
    assert greedy.plan(reqs, 4, w4) is None
    argmax = torch.zeros(16, 5, dtype=torch.long)
    argmax[:, 0] = torch.tensor([dict(greedy.shadow)[i][0] for i in range(16)])
    greedy.observe_shadow(torch.tensor([dict(greedy.shadow)[i] for i in range(16)]), argmax=argmax)
    assert greedy.acceptance._srv.tried[:2] == [16, 16] and greedy.acceptance._srv.acc[:2] == [16, 0]


def test_lookups_are_sampled_while_no_proposal_could_beat_the_w4_drafter():
    """While the measured E[L] of a full-length proposal is below the W4 drafter's, the lookups
    only feed the shadow measurement: one W4 iteration in ``probe_every`` makes them. Live
    requests' tokens are indexed when lookups need them; a request that leaves the batch is
    indexed at once."""
    from types import SimpleNamespace

    hd, reqs, done = _group_with_history(4, probe_every=4)
    assert hd.index.stream_len(hd._key(done), "done") == len(done.output_ids)
    assert all(hd.index.stream_len(hd._key(r), r.rid) == 0 for r in reqs)  # nothing looked up yet
    w4 = [1.0, 1.9, 2.7, 3.4, 4.0]
    shadows = []
    for _ in range(8):
        hd.sync(reqs)
        assert hd.plan(reqs, 4, w4) is None  # the prior (α 0.5) expects less than W4
        shadows.append(len(hd.shadow))
    assert shadows == [0, 0, 0, 4] * 2 and hd.lookups == 8 and hd.skipped_lookups == 6
    assert all(hd.index.stream_len(hd._key(r), r.rid) == len(r.output_ids) for r in reqs)
    assert hd.plan(reqs, 4, None).history_rows == [0, 1, 2, 3]  # fixed γ: always looked up

    late = SimpleNamespace(rid="late", origin_input_ids=done.origin_input_ids, output_ids=[7, 8, 9, 10])
    hd.sync(reqs + [late])
    hd.sync(reqs)  # it finished: indexed without a lookup
    assert hd.index.stream_len(hd._key(late), "late") == 4


def test_verify_only_iterations_need_measured_history_acceptance():
    """Where the W4 policy decodes plainly, a verify-only iteration of history drafts runs only
    on acceptance the records vouch for: the cold prior (α 0.5, E[L|4] ≈ 1.9) never starts one,
    and where even the vouched rate at every row could not pay, no lookup is made."""

    hd, reqs, _ = _group_with_history(8)
    asked = []

    def pays(gamma, expected):  # a verify of γ+1 tokens costing 1.5 plain steps
        asked.append(expected)
        return expected / (1.5 * len(reqs))

    assert hd.acceptance.expected_tokens_table()[4] > 1.5  # the prior alone would bet on it
    assert hd.plan(reqs, 0, None, pays) is None and asked[-1] == pytest.approx(len(reqs))
    assert hd.lookups == 0  # not even a perfect index could pay: the lookups are skipped
    w4 = [1.0, 1.9, 2.7, 3.4, 4.0]
    hd.plan(reqs, 4, w4)  # a W4 iteration: the proposals are measured in its shadow
    _target_agrees(hd, 8)
    plan = hd.plan(reqs, 0, None, pays)  # 8 records of full acceptance: E[L|4] = 1 + Σ (8/16)^k
    assert plan is not None and plan.history_rows == list(range(8)) and not plan.run_drafter
    assert asked[-1] == pytest.approx(len(reqs) * sum(0.5**k for k in range(5)))


def test_a_verify_only_iteration_runs_at_the_width_with_the_best_predicted_gain():
    """Where the W4 policy decodes plainly, a verify-only iteration is cut to the width the cost
    model predicts best: the longest where the verify is memory-bound, one draft where every
    verified token costs; in W4 iterations it never replaces the W4 drafts."""

    hd, reqs, _ = _group_with_history(8)
    w4 = [1.0, 2.0, 3.0, 4.0, 5.0]  # a W4 drafter that never misses: no proposal commits more

    def memory_bound(gamma, expected):  # a verify costs 1.2 plain steps at any width
        return expected / (1.2 * len(reqs))

    def compute_bound(gamma, expected):  # each verified token costs half a plain step
        return expected / ((1 + gamma) * 0.5 * len(reqs))

    assert hd.plan(reqs, 0, None, memory_bound) is None  # cold: vouched E[L] = 1
    for _ in range(6):  # the target agrees with every proposal, measured in the W4 drafts' shadow
        assert hd.plan(reqs, 4, w4, memory_bound) is None  # a W4 iteration keeps its drafts
        _target_agrees(hd, 8)
    plan = hd.plan(reqs, 0, None, memory_bound)
    assert plan is not None and not plan.run_drafter and plan.history_rows == list(range(8)) and plan.gamma == 4
    plan = hd.plan(reqs, 0, None, compute_bound)
    assert plan is not None and plan.gamma == 1 and plan.history_rows == list(range(8))


def test_controller_prices_a_verify_only_iteration_against_a_plain_step():
    """Controller.verify_only_gain(γ, tokens): a verify-only iteration that commits every
    request's γ + 1 tokens beats a plain step where the verify is memory-bound; one that commits
    a token per request does not."""
    from types import SimpleNamespace

    import torch
    from gamma_helpers import QWEN2_05B

    from sglang_er.engine.batch import prompt_key
    from sglang_er.gamma.builtin_profiles import builtin_profile
    from sglang_er.gamma.controller import Controller

    ctl = Controller(QWEN2_05B, 7, torch.device("cpu"), "torch_native", profile=builtin_profile("h100"))
    reqs = [SimpleNamespace(rid=f"r{i}", origin_input_ids=[i, 1, 2]) for i in range(2)]
    seq = torch.tensor([300, 400])
    g = ctl.choose(seq.tolist(), [r.rid for r in reqs], lambda: [prompt_key(r) for r in reqs])
    assert g > 0  # memory-bound: the policy speculates
    assert ctl.verify_only_gain(g, 2 * (g + 1)) > 1.0 > ctl.verify_only_gain(g, 2 * 1.0)
