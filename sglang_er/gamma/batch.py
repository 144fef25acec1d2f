"""An O(1) summary of a decode batch, computed once per γ decision in O(B).

Attention cost is linear in every request's own length, and pages shared through the radix
cache may be read once per group rather than once per request, so the cost model needs Σ L,
max L (the padded drafter pays for the longest) and the shared prefix tokens, never the mean.
``seq_lens`` [B] are committed lengths (tokens that already have KV); the token being decoded
has no KV yet, as in :mod:`sglang_er.engine.worker`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["BatchStats", "SeqLens", "batch_stats"]

SeqLens = Sequence[int] | Any  # list/tuple of ints, or a tensor/array with .tolist()


@dataclass(frozen=True)
class BatchStats:
    """O(1) summary of a batch, computed once per decision in O(B).

    batch B; sum_len Σ_b L_b; max_len max_b L_b; shared_tokens: prefix tokens a shared-once
    kernel does not re-read (Σ over requests of the longest prefix shared with an earlier
    request), 0 when no request shares a prefix.
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


def batch_stats(seq_lens: SeqLens | BatchStats) -> BatchStats:
    """Summarise ``seq_lens`` [B] (each request's own length); a :class:`BatchStats` passes through.

    The shared prefix tokens are not in the lengths: the caller that knows the batch's prompt
    groups sets :attr:`BatchStats.shared_tokens`
    (:func:`sglang_er.gamma.controller.shared_prefix_tokens`).
    """
    if isinstance(seq_lens, BatchStats):
        return seq_lens
    lens = seq_lens.tolist() if hasattr(seq_lens, "tolist") else list(seq_lens)
    if not lens:
        raise ValueError("seq_lens is empty: a decode batch has at least one request")
    # the hot path (a list of ints, once per decode iteration) runs at C speed
    if set(map(type, lens)) != {int} or min(lens) < 0:
        lens = [_seq_len(v) for v in lens]
    return BatchStats(batch=len(lens), sum_len=sum(lens), max_len=max(lens))
