"""An O(1) summary of a decode batch, computed once per γ decision in O(B).

Attention cost is linear in every request's own length, and pages shared through the radix
cache may be read once per group rather than once per request, so the cost model needs Σ L,
max L (the padded drafter pays for the longest) and the shared prefix tokens, never the mean.
``seq_lens`` [B] are committed lengths (tokens that already have KV); the token being decoded
has no KV yet, as in :mod:`sglang_er.engine.worker`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["BatchStats", "PrefixGroups", "SeqLens", "batch_stats"]

SeqLens = Sequence[int] | Any  # list/tuple of ints, or a tensor/array with .tolist()
PrefixGroups = Iterable[tuple[int, Iterable[int]]] | None


@dataclass(frozen=True)
class BatchStats:
    """O(1) summary of a batch, computed once per decision in O(B).

    batch B; sum_len Σ_b L_b; max_len max_b L_b; shared_tokens: prefix tokens a shared-once
    kernel does not re-read (Σ over requests of the longest prefix shared with an earlier
    request), 0 without prefix groups.
    """

    batch: int
    sum_len: int
    max_len: int
    shared_tokens: int = 0

    @classmethod
    def uniform(cls, batch: int, seq_len: int) -> BatchStats:
        return cls(batch=batch, sum_len=batch * seq_len, max_len=seq_len)

    def prefix_kv_tokens(self, rule: str) -> int:
        """KV tokens of the committed prefixes that the attention reads under ``rule``."""
        return self.sum_len - (self.shared_tokens if rule == "shared_once" else 0)


def _seq_len(v) -> int:
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError(f"seq_lens must be non-negative integers, got {v!r}")
    return v


def batch_stats(seq_lens: SeqLens | BatchStats, prefix_groups: PrefixGroups = None) -> BatchStats:
    """Summarise ``seq_lens`` [B] (each request's own length) and radix ``prefix_groups``.

    ``prefix_groups``: (shared_prefix_len P, member indices) per group of requests whose first
    P tokens are the same cached pages. Groups may nest (a radix tree: 8 samples share the
    prompt, 4 of them also share a longer prefix). The pages a shared-once kernel reads are
    the union of the requests' paths in that tree: Σ_b L_b − Σ_b (longest prefix request b
    shares with a lower-indexed request) — for each group every member but the first saves P.
    """
    if isinstance(seq_lens, BatchStats):
        if prefix_groups:
            raise ValueError("pass prefix_groups with seq_lens, not with precomputed BatchStats")
        return seq_lens
    lens = seq_lens.tolist() if hasattr(seq_lens, "tolist") else list(seq_lens)
    if not lens:
        raise ValueError("seq_lens is empty: a decode batch has at least one request")
    # the hot path (a list of ints, once per decode iteration) runs at C speed
    if set(map(type, lens)) != {int} or min(lens) < 0:
        lens = [_seq_len(v) for v in lens]
    total, mx = sum(lens), max(lens)
    shared = 0
    if prefix_groups:
        B = len(lens)
        save: dict[int, int] = {}
        for gi, grp in enumerate(prefix_groups):
            try:
                plen, members = grp
                members = sorted(map(int, members))
            except (TypeError, ValueError):
                raise ValueError(f"prefix_groups[{gi}] must be (shared_prefix_len, member indices)") from None
            plen = int(plen)
            if not members:
                continue
            if plen < 0:
                raise ValueError(f"prefix_groups[{gi}]: shared prefix length {plen} < 0")
            if len(set(members)) != len(members):
                raise ValueError(f"prefix_groups[{gi}]: a request is listed twice")
            for m in (members[0], members[-1]):
                if not 0 <= m < B:
                    raise ValueError(f"prefix_groups[{gi}]: member {m} is not a request index in 0..{B - 1}")
            if min(map(lens.__getitem__, members)) < plen:
                m = next(m for m in members if lens[m] < plen)
                raise ValueError(
                    f"prefix_groups[{gi}]: shared prefix {plen} is longer than request "
                    f"{m}'s sequence ({lens[m]} tokens)"
                )
            for m in members[1:]:  # the first member reads the prefix; the others share it
                if plen > save.get(m, 0):
                    save[m] = plen
        shared = sum(save.values())
    return BatchStats(batch=len(lens), sum_len=total, max_len=mx, shared_tokens=shared)
