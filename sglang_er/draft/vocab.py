"""The draft head's vocabulary: score only the K tokens the server's own traffic uses most.

A 150k-token head is the largest single read of a small policy's draft step (Qwen2.5-0.5B: an
int8 head of 136 MB beside 179 MB of W4 layers), yet a math rollout writes a few thousand distinct
tokens. A head over the K most frequent ones reads K/V of it.

Still lossless: the draft distribution q is zero outside the subset, which rejection sampling
allows (a token q cannot propose is drawn from the residual max(p - q, 0) when the target wants
it), and a greedy draft is checked against the target's argmax as always. The price is
acceptance: the target's probability mass outside the subset.

The subset follows the traffic: token ids of prompts and committed outputs are counted as the
server runs, and the subset is re-selected after 1k, 2k, 4k, ... counted tokens (each re-selection
rebuilds a K-row head). Before any count, and for ties, lower ids win: BPE vocabularies number
their tokens in merge order, roughly most frequent first.
"""

from __future__ import annotations

import torch

FIRST_REFRESH = 1024  # counted tokens before the first re-selection
MAX_REFRESH_PERIOD = 1 << 20  # re-selections stop doubling their period here


class DraftVocab:
    """Token counts over [0, vocab_size) and the K ids a draft head scores."""

    def __init__(self, vocab_size: int, k: int, device: torch.device | str = "cpu"):
        if not 0 < k < vocab_size:
            raise ValueError(f"draft vocabulary of {k} tokens: use 1..{vocab_size - 1} (0 scores every token)")
        self.vocab_size, self.k = vocab_size, k
        self.counts = torch.zeros(vocab_size, dtype=torch.int64, device=device)
        self._offered = 0  # positions passed to observe (a host-side count: no device sync)
        self.next_refresh = FIRST_REFRESH
        self.selections = 0

    def observe(self, ids: torch.Tensor) -> None:
        """Count token ids (any shape; negative or out-of-range ids, e.g. padding, are ignored).

        Called every iteration, so no device sync: out-of-range ids add a weight of 0 instead of
        being filtered out (a boolean mask would sync to learn its length), and the refresh
        schedule counts the positions offered, a host-side shape."""
        ids = ids.reshape(-1).to(device=self.counts.device, dtype=torch.int64)
        valid = ((ids >= 0) & (ids < self.vocab_size)).to(torch.int64)
        self.counts.index_add_(0, ids.clamp(0, self.vocab_size - 1), valid)
        self._offered += ids.numel()

    @property
    def seen(self) -> int:
        """Tokens counted (reads the device counts: for reports, not the hot path)."""
        return int(self.counts.sum())

    def due(self) -> bool:
        """Whether enough new tokens were counted to re-select the subset."""
        return self._offered >= self.next_refresh

    def select(self) -> torch.Tensor:
        """[K] int64 ids, ascending: the most counted, ties (and no counts) by the lowest id."""
        v = self.vocab_size
        rank = self.counts * v + (v - 1 - torch.arange(v, device=self.counts.device))
        ids = torch.topk(rank, self.k).indices.sort().values
        n = self._offered
        self.next_refresh = max(self.next_refresh, min(2 * max(n, 1), n + MAX_REFRESH_PERIOD))
        self.selections += 1
        return ids

    def coverage(self, ids: torch.Tensor) -> float:
        """Share of the counted tokens that ``ids`` covers (1.0 before any count)."""
        total = self.seen
        return float(self.counts[ids].sum()) / total if total else 1.0
