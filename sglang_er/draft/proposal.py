"""What a proposer hands the verify: γ draft tokens per request and the distribution each was
drawn from.

Two proposers fill it (as vLLM's EAGLE and n-gram proposers do): the W4 self-drafter
(:meth:`sglang_er.draft.drafter.Drafter.propose`: sampled drafts with their q, or greedy
drafts) and the history drafts (:class:`sglang_er.history.proposer.HistoryProposer`: tokens
copied from text already written, one-hot q). The rejection sampler needs only tokens and q,
so it never asks which proposer a row came from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Proposal:
    tokens: torch.Tensor  # [B, γ] int64
    q: torch.Tensor | None  # [B, γ, V] the distributions the drafts were drawn from (None: greedy)
    ran_drafter: bool  # the W4 drafter ran (its phase time is "draft", else "propose")

    @property
    def gamma(self) -> int:
        return self.tokens.shape[1]
