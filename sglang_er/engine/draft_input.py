"""What a batch carries from one EFFROLLOUT iteration to the next: each request's last committed token.

That token (x0) has no KV yet; the next iteration starts its chain from it. The drafter holds no
state between iterations, so this is all there is to carry.

SGLang 0.5.23 carries it two ways. Without the overlap scheduler the worker's ``next_draft_input``
becomes ``batch.spec_info`` as it is, and ``bonus_tokens`` is filtered and merged with the batch. With
it, the scheduler runs the next forward before it has processed this one's result (``req.output_ids``
lags an iteration), so it relays the tokens through its ``FutureMap``. It stashes ``bonus_tokens``
in a buffer indexed by request slot (``RelayPayload.from_draft_input``, which reads EAGLE's field
names, hence the fields that stay None here), tracks the batch by ``future_indices``, and fills
``bonus_tokens`` back in just before the next forward (``FutureMap._resolve_spec_extras``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sglang.srt.speculative.spec_info import SpecInput, SpecInputType


@dataclass
class ChainDraftInput(SpecInput):
    bonus_tokens: torch.Tensor | None = None  # [B] int64: x0 of the next iteration
    # request slots the FutureMap relays through (overlap scheduler only; set by the scheduler)
    future_indices: torch.Tensor | None = None
    # read by the FutureMap's relay payload; EFFROLLOUT relays no draft state
    topk_p: torch.Tensor | None = None
    topk_index: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None
    draft_probs: torch.Tensor | None = None
    dsa_topk_indices: torch.Tensor | None = None
    future_dsa_topk_indices_available: bool = False

    def __post_init__(self):
        # no forward ever runs on it (the worker clears spec_info before each target call)
        super().__init__(SpecInputType.PP_SPEC_RELAY)

    def filter_batch(self, new_indices: torch.Tensor, new_indices_cpu: list[int] | None = None) -> None:
        if self.future_indices is not None:
            self.future_indices = self.future_indices[new_indices]
            self.bonus_tokens = None  # gathered again from the FutureMap before the next forward
            return
        self.bonus_tokens = self.bonus_tokens[new_indices]

    def merge_batch(self, other: ChainDraftInput) -> None:
        if self.future_indices is not None:
            assert other.future_indices is not None, "one batch relays through the FutureMap, the other not"
            self.future_indices = torch.cat([self.future_indices, other.future_indices])
            self.bonus_tokens = None
            return
        self.bonus_tokens = torch.cat([self.bonus_tokens, other.bonus_tokens])
