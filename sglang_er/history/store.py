"""Group/history drafts: propose tokens from what a prompt's other samples already wrote.

In GRPO every prompt is sampled n times and comes back every epoch; its samples share long runs
of tokens. A :class:`HistoryIndex` keeps, per prompt (the *group*, keyed by the prompt's token
ids), every token stream written for it — the prompt itself, the outputs of in-flight and
finished samples, and earlier requests with the same prompt — and proposes the continuation of a
request's recent tokens that those streams followed most often. A proposal costs no forward pass.

Index: per group, a dict from each ``m``-gram (``m = min_match``) to the positions where it
ends, appended per committed token (amortised O(1)). Lookup of a context: the positions of its
last ``m`` tokens (the most recent ``max_candidates``), each extended backwards to its match
length (O(match length) per candidate); the longest matches win. Proposal: among the winning
positions, the most frequent next token, then the most frequent token after that among the
positions that agreed, and so on up to γ tokens (ties: the most recent stream position).

Memory is bounded by ``budget_tokens`` over all groups; the least recently used group is dropped
first. A proposal's source is ``"group"`` when a winning position lies in another sample's or an
earlier request's output, else ``"prompt"`` (copied from the prompt) or ``"self"`` (the
request's own earlier tokens: n-gram lookup).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

PROMPT_STREAM = "<prompt>"


@dataclass
class Proposal:
    """Up to γ tokens, the match length behind them, their vote counts and source."""

    tokens: list[int]
    match_len: int
    votes: list[int]  # per proposed token: how many matched positions continued with it
    support: int  # matched positions the first vote was taken over
    source: str  # "group" (another sample/request of the prompt), "prompt" (copied from it) or "self"


@dataclass
class _Group:
    streams: dict[Hashable, list[int]] = field(default_factory=dict)
    ends: dict[tuple, list[tuple[Hashable, int]]] = field(default_factory=dict)  # m-gram -> (stream, end)
    tokens: int = 0


class HistoryIndex:
    """Per-prompt token streams with m-gram position lists; see the module docstring."""

    def __init__(self, min_match: int = 3, budget_tokens: int = 4_000_000, max_candidates: int = 64):
        if min_match < 1 or budget_tokens < 1 or max_candidates < 1:
            raise ValueError("min_match, budget_tokens and max_candidates must be >= 1")
        self.min_match = int(min_match)
        self.budget_tokens = int(budget_tokens)
        self.max_candidates = int(max_candidates)
        self._groups: OrderedDict[Hashable, _Group] = OrderedDict()
        self.tokens = 0
        self.evicted_groups = 0

    # ------------------------------------------------------------------ groups and streams
    @staticmethod
    def group_key(prompt_ids: Sequence[int]) -> Hashable:
        return hash(tuple(prompt_ids))

    def group(self, key: Hashable, prompt_ids: Sequence[int] | None = None) -> _Group:
        """The group for ``key`` (created, with the prompt indexed as its first stream)."""
        g = self._groups.get(key)
        if g is None:
            g = self._groups[key] = _Group()
            if prompt_ids:
                self._extend(g, PROMPT_STREAM, prompt_ids)
            self._evict(keep=key)
        else:
            self._groups.move_to_end(key)
        return g

    def stream_len(self, key: Hashable, sid: Hashable) -> int:
        g = self._groups.get(key)
        return len(g.streams.get(sid, ())) if g is not None else 0

    def extend(self, key: Hashable, sid: Hashable, tokens: Sequence[int]) -> None:
        """Append committed tokens to stream ``sid`` of group ``key`` (amortised O(1) each)."""
        g = self._groups.get(key)
        if g is None or not tokens:
            return
        self._groups.move_to_end(key)
        self._extend(g, sid, tokens)
        self._evict(keep=key)

    def _extend(self, g: _Group, sid: Hashable, tokens: Sequence[int]) -> None:
        s = g.streams.setdefault(sid, [])
        m = self.min_match
        # a sample's text is its prompt followed by its output: its first m-grams end in the prompt
        head = [] if sid == PROMPT_STREAM else g.streams.get(PROMPT_STREAM, [])[-m:]
        for t in tokens:
            s.append(int(t))
            if len(s) >= m:
                g.ends.setdefault(tuple(s[-m:]), []).append((sid, len(s)))
            elif len(head) + len(s) >= m:
                g.ends.setdefault(tuple((head + s)[-m:]), []).append((sid, len(s)))
        g.tokens += len(tokens)
        self.tokens += len(tokens)

    def _evict(self, keep: Hashable) -> None:
        while self.tokens > self.budget_tokens and len(self._groups) > 1:
            key, g = next(iter(self._groups.items()))
            if key == keep:
                self._groups.move_to_end(key)
                continue
            del self._groups[key]
            self.tokens -= g.tokens
            self.evicted_groups += 1

    def drop_group(self, key: Hashable) -> None:
        g = self._groups.pop(key, None)
        if g is not None:
            self.tokens -= g.tokens

    @property
    def num_groups(self) -> int:
        return len(self._groups)

    # ------------------------------------------------------------------ proposals
    def propose(self, key: Hashable, sid: Hashable, context: Sequence[int], gamma: int) -> Proposal | None:
        """The most frequent continuation (≤ γ tokens) of ``context``'s longest match in the
        group's streams, or None without a match of at least ``min_match`` tokens.

        ``context``: the requester's tokens (prompt + output so far, last token last). Cost:
        O(max_candidates · match length + γ · candidates).
        """
        g = self._groups.get(key)
        m = self.min_match
        if g is None or gamma < 1 or len(context) < m:
            return None
        cands = g.ends.get(tuple(context[-m:]))
        if not cands:
            return None
        best, matched = 0, []
        prompt = g.streams.get(PROMPT_STREAM, [])
        for s_id, end in reversed(cands[-self.max_candidates :]):  # most recent first
            stream = g.streams[s_id]
            if end >= len(stream):
                continue  # nothing follows yet (e.g. the requester's own last tokens)
            n = _match_len(stream, end, context, m, () if s_id == PROMPT_STREAM else prompt)
            if n > best:
                best, matched = n, [(s_id, end)]
            elif n == best:
                matched.append((s_id, end))
        if not matched:
            return None
        return _follow(g.streams, matched, gamma, best, sid)


def _match_len(stream: list[int], end: int, context: Sequence[int], m: int, prompt: Sequence[int]) -> int:
    """Length of the common suffix of (prompt + stream)[:end] and context; the m-gram ending
    there matched already (a sample's text is its prompt followed by its output)."""
    n, limit = m, min(end + len(prompt), len(context))
    while n < limit:
        i = end - n - 1
        tok = stream[i] if i >= 0 else prompt[len(prompt) + i]
        if tok != context[-n - 1]:
            break
        n += 1
    return n


def _follow(streams, matched: list[tuple[Hashable, int]], gamma: int, match_len: int, sid) -> Proposal:
    """Vote token by token among the matched positions that agree with the proposal so far."""
    support = len(matched)
    origins = {s for s, _ in matched}
    source = "group" if origins - {sid, PROMPT_STREAM} else "prompt" if PROMPT_STREAM in origins else "self"
    tokens, votes, live = [], [], matched
    for j in range(gamma):
        counts: Counter = Counter()
        first: dict[int, int] = {}
        for k, (s_id, end) in enumerate(live):
            stream = streams[s_id]
            if end + j < len(stream):
                t = stream[end + j]
                counts[t] += 1
                first.setdefault(t, k)  # live is most-recent-first: ties go to the most recent
        if not counts:
            break
        tok = max(counts, key=lambda t: (counts[t], -first[t]))
        tokens.append(tok)
        votes.append(counts[tok])
        live = [(s_id, end) for s_id, end in live if end + j < len(streams[s_id]) and streams[s_id][end + j] == tok]
    return Proposal(tokens, match_len, votes, support, source)
