"""History drafts, the second proposer beside the W4 drafter: keep the
:class:`~sglang_er.history.store.HistoryIndex` in step with the requests SGLang decodes, and
decide per request and per iteration where drafts come from. The worker asks it once per
iteration (:meth:`HistoryProposer.propose`), merges its rows with the drafter's
(:meth:`Plan.merge`) and reports the verdict once (:meth:`HistoryProposer.observe`).

Sources: ``group`` (another sample of the same prompt or an earlier request with it),
``prompt`` (copied from the prompt), ``self`` (the request's own earlier tokens: n-gram lookup),
``w4`` (the self-drafter), ``none`` (padding rows of a verify-only iteration).
A history proposal costs no forward: only its share of the verify. Acceptance stays exact: a
proposal x is one-hot q, so the rejection sampler accepts it with probability p(x) and on a
rejection resamples from p with x removed (greedy: argmax match). Each source keeps its own
per-position acceptance (:class:`~sglang_er.gamma.acceptance.AcceptanceModel`), and the choice compares
expected committed tokens: a request takes its history proposal where E[L | history, length]
beats E[L | W4, γ]; an iteration the W4 policy would decode plainly runs a verify-only
iteration when the cost model predicts more tokens/s from the history proposals alone, by
the acceptance their records vouch for, not the prior (the W4 iterations that measure
proposals in their shadow are not running then).

A proposal left unused beside the W4 drafter's is still measured, at no cost (*shadow*
acceptance): the verify scored the target's distribution p_k at every position the W4 drafts
reached, so while the proposal h agrees with those drafts, the chance the rejection sampler
would have accepted h_k is p_k(h_k) (greedy: h_k is the argmax), drawn as a Bernoulli. The chain
conditions match the real one's (it reaches position k with probability Π p_j(h_j) ≈ Π q_j(h_j)
when the drafter is good). No W4 row is given up to learn that history drafts lose, which cost
hybrid 10-17% against W4-only auto at B = 1-4 while 64 exploratory records were collected.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from sglang_er.draft.proposal import Proposal
from sglang_er.engine.batch import prompt_key
from sglang_er.gamma import AcceptanceModel
from sglang_er.history.store import HistoryIndex

HISTORY_SOURCES = ("group", "prompt", "self")
CONTEXT_TAIL = 64  # tokens of a request's text a match may span (bounds a lookup's cost)
EXPLORE = 64  # fixed γ: history-draft records before only proposals that fill γ are verified
# Auto: while no proposal could beat the W4 drafter (its measured E[L] at full length is below
# the drafter's), lookups only feed the shadow measurement, so they run one W4 iteration in this
# many. On gsm8k-lm at T = 1 that is every iteration (the best proposals, those 2+ indexed
# continuations agree on, commit E[L] 1.5-2.0 against the drafter's 6.9), where looking up and
# indexing every iteration cost 26-3252 us at B = 1-64 (eval.bench_decision --history).
PROBE_EVERY = 8


@dataclass
class Plan:
    """Where this iteration's drafts come from.

    gamma: drafts per request verified this iteration (uniform width γ+1 in the verify);
    run_drafter: whether the W4 drafter runs (some request takes W4 drafts);
    tokens [B, γ] (history rows filled; others -1) and lengths [B] (proposal length per row,
    0 = W4 or padding); source per row: "group" | "prompt" | "self" | "w4" | "none".
    """

    gamma: int
    run_drafter: bool
    tokens: list[list[int]]
    lengths: list[int]
    source: list[str]

    @property
    def history_rows(self) -> list[int]:
        return [i for i, s in enumerate(self.source) if s in HISTORY_SOURCES]

    @property
    def w4_rows(self) -> list[int]:
        return [i for i, s in enumerate(self.source) if s == "w4"]

    def merge(self, x0: torch.Tensor, w4: Proposal | None, vocab: int, greedy: bool) -> Proposal:
        """The iteration's proposal: history rows from the index, W4 rows from the drafter's
        proposal ``w4`` (None: a verify-only iteration). Rows with no proposal propose their
        last token x0 [B] (any proposal whose q is known is lossless; this one is merely rarely
        accepted). q is one-hot at every non-W4 row (None when greedy)."""
        hist = torch.tensor(self.tokens, dtype=torch.int64, device=x0.device)  # [B, γ]
        hist = torch.where(hist < 0, x0[:, None], hist)
        mine = torch.tensor([s != "w4" for s in self.source], device=x0.device)  # [B]
        tokens = hist if w4 is None else torch.where(mine[:, None], hist, w4.tokens)
        q = None
        if not greedy:
            q = torch.zeros(*tokens.shape, vocab, device=x0.device)  # [B, γ, V]
            q.scatter_(2, tokens[:, :, None], 1.0)
            if w4 is not None:
                q = torch.where(mine[:, None, None], q, w4.q.float())
        return Proposal(tokens, q, ran_drafter=w4 is not None)


class HistoryProposer:
    def __init__(
        self,
        gamma_max: int,
        min_match: int = 3,
        budget_tokens: int = 4_000_000,
        include_finished: bool = True,
        probe_every: int = PROBE_EVERY,
    ):
        """Requests are read for ``rid``, ``origin_input_ids`` and ``output_ids``, and grouped by
        their prompt (:func:`sglang_er.engine.batch.prompt_key`, cached on the request)."""
        self.gamma_max = gamma_max
        self._key = prompt_key
        self.probe_every = max(1, int(probe_every))
        self._since_probe = 0
        self.skipped_lookups = 0  # W4 iterations whose lookups were skipped (no proposal could win)
        self.index = HistoryIndex(min_match=min_match, budget_tokens=budget_tokens)
        self.include_finished = include_finished
        self.acceptance = AcceptanceModel(gamma_max, prior_alpha=0.5)
        self.lookups = 0
        self.hits = 0
        self.shadow_records = 0
        # (row, proposal) of W4 rows whose proposal went unused this iteration (see observe_shadow)
        self.shadow: list[tuple[int, list[int]]] = []
        self._rng = random.Random(0)  # shadow Bernoulli draws: statistics only, never a token
        self._live: dict = {}  # rid -> Req decoded last iteration

    # ------------------------------------------------------------------ index upkeep
    def sync(self, reqs) -> None:
        """Track the batch, every iteration, in O(B): requests that left it since the last call
        (finished, aborted, retracted) get their remaining tokens indexed now, while their text
        is at hand. The live requests' new tokens are indexed lazily, by :meth:`_catch_up` before
        an iteration's lookups, so iterations that look nothing up index nothing."""
        self.shadow = []  # set again by plan() when this iteration has unused proposals
        live = {r.rid: r for r in reqs}
        for rid, r in self._live.items():
            if rid not in live:
                self._append(r)
        if not self.include_finished:  # group only: a group goes once none of its requests decodes
            for key in {self._key(r) for r in self._live.values()} - {self._key(r) for r in reqs}:
                self.index.drop_group(key)
        self._live = live

    def _catch_up(self, reqs) -> None:
        """Index every live request's committed tokens (its siblings' proposals read them)."""
        for r in reqs:
            self._append(r)

    def _append(self, r) -> None:
        key = self._key(r)
        self.index.group(key, r.origin_input_ids)
        have = self.index.stream_len(key, r.rid)
        if len(r.output_ids) > have:
            self.index.extend(key, r.rid, r.output_ids[have:])

    # ------------------------------------------------------------------ the choice
    def propose(
        self,
        reqs,
        gamma_w4: int,
        w4_expected: list[float] | None,
        verify_only_gain=None,
        speculate: bool = True,
        outputs=None,
    ) -> Plan | None:
        """This iteration's history drafts, or None (see :meth:`plan`). Called every decode
        iteration, also when nothing may be drafted (``speculate`` False), so the index never
        misses a token."""
        self.sync(reqs)
        if not speculate:
            return None
        return self.plan(reqs, gamma_w4, w4_expected, verify_only_gain, outputs)

    def plan(
        self, reqs, gamma_w4: int, w4_expected: list[float] | None, verify_only_gain=None, outputs=None
    ) -> Plan | None:
        """The drafts of this iteration, or None to keep the W4 choice as it is.

        gamma_w4: the W4 policy's γ (0 = it would decode plainly); w4_expected: E[L | W4, γ]
        for γ = 0..γmax; verify_only_gain(γ, expected_tokens) -> float: the cost model's
        predicted gain of a verify-only iteration over a plain step, paying above 1 (None: never
        run one, e.g. fixed mode). outputs(i, req) -> the request's committed output ids, ending
        with the token the drafts continue, or None when they are not at hand (no proposal for
        it); None: ``req.output_ids``, which lag an iteration under an overlapping scheduler.

        Where the W4 policy speculates, a request takes its proposal where the proposal's
        measured E[L] beats the W4 drafter's (the drafter still runs for the batch). Where it
        would decode plainly, a *verify-only* iteration (no drafter: requests with a proposal
        verify it, cut to the width with the best predicted gain, the others commit one token)
        runs where the cost model predicts more tokens/s than plain decoding, by the acceptance
        the records vouch for. Verify-only iterations do not replace W4 ones: when they did (the
        cost model predicting them faster than the W4 policy's γ), hybrid lost 6-13% against
        W4-only auto at B = 1-64 on gsm8k-lm-rl, likely to what that choice did not price: the
        drafter's first step after an iteration without it runs cold.
        """
        self.shadow = []
        table = self.acceptance.expected_tokens_table()
        vouched = self.acceptance.vouched_expected_tokens_table() if gamma_w4 == 0 else None
        if gamma_w4 == 0:
            # Could any verify-only plan pay, even with every request proposing at the vouched
            # rate? If not, skip the B lookups, which are pure Python.
            if verify_only_gain is None or not any(
                verify_only_gain(g, len(reqs) * vouched[g]) > 1.0 for g in range(1, self.gamma_max + 1)
            ):
                return None
        elif w4_expected is not None and table[gamma_w4] < w4_expected[gamma_w4]:
            self._since_probe += 1  # E[L] grows with a proposal's length: none could be used
            if self._since_probe < self.probe_every:
                self.skipped_lookups += 1
                return None
        self._since_probe = 0
        self._catch_up(reqs)
        props = []
        for i, r in enumerate(reqs):
            self.lookups += 1
            out = r.output_ids if outputs is None else outputs(i, r)
            if out is None:
                props.append(None)
                continue
            ctx = (
                list(out[-CONTEXT_TAIL:])
                if len(out) >= CONTEXT_TAIL
                else [*r.origin_input_ids[len(out) - CONTEXT_TAIL :], *out]
            )
            p = self.index.propose(self._key(r), r.rid, ctx, self.gamma_max)
            self.hits += p is not None
            props.append(p)
        if not any(props):
            return None
        if gamma_w4 == 0:
            longest = max(len(p.tokens) for p in props if p)
            gains = {
                g: verify_only_gain(g, sum(vouched[min(len(p.tokens), g)] if p else 1.0 for p in props))
                for g in range(1, longest + 1)
            }
            gamma = max(gains, key=gains.get)
            return self._plan(props, [p is not None for p in props], gamma, 0) if gains[gamma] > 1.0 else None
        gamma = gamma_w4
        # a shorter proposal is padded (verified, rarely accepted)
        if w4_expected is None:  # fixed γ: no W4 estimate to weigh against; cold start tries all
            explore = self.acceptance.num_observations < EXPLORE
            use = [p is not None and (explore or table[min(len(p.tokens), gamma)] >= table[gamma]) for p in props]
        else:  # the measured (shadow and real) E[L] against the W4 drafter's
            use = [p is not None and table[min(len(p.tokens), gamma)] >= w4_expected[gamma] for p in props]
        self.shadow = [(i, p.tokens) for i, (p, u) in enumerate(zip(props, use)) if p and not u]
        return self._plan(props, use, gamma, gamma_w4) if any(use) else None

    @staticmethod
    def _plan(props, use: list[bool], gamma: int, gamma_w4: int) -> Plan:
        """Rows that ``use`` their proposal take it (padded to γ); the others take W4 drafts in a
        W4 iteration (``gamma_w4`` > 0), nothing in a verify-only one."""
        tokens, lengths, source = [], [], []
        for p, u in zip(props, use):
            if u:
                toks = p.tokens[:gamma]
                tokens.append(toks + [toks[-1]] * (gamma - len(toks)))  # padding: verified, rarely accepted
                lengths.append(len(toks))
                source.append(p.source)
            else:
                tokens.append([-1] * gamma)
                lengths.append(0)
                source.append("w4" if gamma_w4 else "none")
        return Plan(gamma, gamma_w4 > 0 and not all(use), tokens, lengths, source)

    def observe(
        self,
        plan: Plan | None,
        drafts: torch.Tensor,
        accept_len: list[int],
        probs: torch.Tensor | None,
        logits: torch.Tensor,
    ) -> None:
        """The verdict of this iteration's verify: per-position acceptance of the proposals that
        were verified (``plan``; only over their own length) and of those left unused beside the
        W4 drafts (:meth:`observe_shadow`). drafts [B, γ]; accept_len [B] (host); probs
        [B, γ+1, V] the target's distributions (None: greedy, scored by the argmax of logits)."""
        if self.shadow:
            self.observe_shadow(drafts, probs, logits.argmax(-1) if probs is None else None)
        if plan is None:
            return
        for i in plan.history_rows:
            n = plan.lengths[i]
            self.acceptance.observe(n, [min(accept_len[i], n)])

    def observe_shadow(
        self, drafts: torch.Tensor, probs: torch.Tensor | None = None, argmax: torch.Tensor | None = None
    ) -> None:
        """Measure this iteration's unused proposals (:attr:`shadow`) against the verify's output.

        drafts [B, γ]: the tokens verified; probs [B, γ+1, V]: the target's distribution at each
        verified position (sampling), or argmax [B, γ+1] (greedy). Position k of a proposal h is
        scored while h_1..h_{k-1} equal the verified drafts (there p_k is the distribution h_k
        would have met); the record is censored at the first position that cannot be scored.
        """
        rows, self.shadow = self.shadow, []
        if not rows:
            return
        gamma = drafts.shape[1]
        verified = drafts[[r for r, _ in rows]].tolist()
        scored = []
        for (r, h), d in zip(rows, verified):
            e = 1
            while e < min(len(h), gamma + 1) and h[e - 1] == d[e - 1]:
                e += 1
            scored.append((r, h[:e]))
        ri = torch.tensor([r for r, h in scored for _ in h], device=drafts.device)
        ki = torch.tensor([k for _, h in scored for k in range(len(h))], device=drafts.device)
        ti = torch.tensor([t for _, h in scored for t in h], device=drafts.device)
        chance = (probs[ri, ki, ti] if probs is not None else (argmax[ri, ki] == ti).float()).tolist()
        at = 0
        for _, h in scored:
            a = 0
            while a < len(h) and self._rng.random() < chance[at + a]:
                a += 1
            at += len(h)
            self.acceptance.observe(len(h), [a])
        self.shadow_records += len(scored)

    def state(self) -> dict:
        return {
            "groups": self.index.num_groups,
            "indexed_tokens": self.index.tokens,
            "evicted_groups": self.index.evicted_groups,
            "lookups": self.lookups,
            "hits": self.hits,
            "shadow_records": self.shadow_records,
            "skipped_lookups": self.skipped_lookups,
            "alphas": [round(a, 4) for a in self.acceptance.alphas()],
        }
