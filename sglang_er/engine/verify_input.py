"""The verify's ``spec_info``: a chain of γ+1 tokens per request (topk 1) in SGLang's TARGET_VERIFY.

A GPU attention backend plans a TARGET_VERIFY forward from its ``spec_info``, not from
``extend_*`` lengths, and reads ``seq_lens`` as the committed prefix only (it adds the verify
width itself). SGLang's DFLASH verify has exactly our shape -- a linear block per request,
causal attention, no tree -- so :class:`ChainVerifyInput` reuses ``DFlashVerifyInput``
(its fields, ``generate_attn_arg_prefill``, ``num_tokens_per_req``) instead of copying
NGRAM's; what it adds:

- ``tree_topk = 1``: read by the intel_amx backend, which then uses its causal path;
- a causal mask only for backends SGLang's own DFLASH policy says need one
  (``resolve_dflash_verify_mask_policy``: triton, flashinfer and fa3 take ``None`` = causal);
- a uniform ``RaggedVerifyLayout`` when γ+1 is below the server's static verify width: fa3
  otherwise sizes the verify by ``speculative_num_draft_tokens`` instead of the spec input.

Where each backend reads these fields: the table in docs/design.md.
"""

from __future__ import annotations

import torch
from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode
from sglang.srt.speculative.dflash_info import DFlashVerifyInput
from sglang.srt.speculative.ragged_verify import RaggedVerifyLayout


class ChainVerifyInput(DFlashVerifyInput):
    """TARGET_VERIFY input of ``width`` chained tokens per request; build with :meth:`build`."""

    tree_topk = 1  # a chain: intel_amx skips the tree mask, as for EAGLE topk 1

    @property
    def max_tree_depth(self) -> int:
        return self.draft_token_num

    @classmethod
    def build(
        cls,
        input_ids: torch.Tensor,
        prefix_lens: torch.Tensor,
        width: int,
        static_width: int,
        with_mask: bool = False,
    ) -> ChainVerifyInput:
        """input_ids [bs * width]; prefix_lens [bs] committed tokens with KV (SGLang's ``seq_lens``
        in TARGET_VERIFY); ``static_width`` = speculative_num_draft_tokens (γmax + 1)."""
        bs = prefix_lens.shape[0]
        layout = None
        if width < static_width:
            layout = RaggedVerifyLayout.from_verify_lens(
                verify_lens_cpu=[width] * bs, device=prefix_lens.device, grid=[max(bs * width, 1)]
            )
        return cls(
            draft_token=input_ids,
            positions=chain_positions(prefix_lens, width),
            draft_token_num=width,
            custom_mask=chain_mask(prefix_lens, width) if with_mask else None,
            capture_hidden_mode=CaptureHiddenMode.NULL,
            ragged_verify_layout=layout,
        )


def chain_positions(prefix_lens: torch.Tensor, width: int) -> torch.Tensor:
    """[bs * width] int64: token j of request b sits at position prefix_lens[b] + j."""
    offsets = torch.arange(width, dtype=torch.int64, device=prefix_lens.device)
    return (prefix_lens.to(torch.int64)[:, None] + offsets).flatten()


def chain_mask(prefix_lens: torch.Tensor, width: int) -> torch.Tensor:
    """SGLang's flat verify mask [Σ_b width·(prefix_b + width)] bool, request after request, row
    j of request b over its prefix_b + width keys: the prefix and draft tokens 0..j (causal)."""
    p = prefix_lens.to(torch.int64)
    row_len = (p + width).repeat_interleave(width)  # [bs * width]
    limit = (p[:, None] + torch.arange(width, device=p.device)).flatten()  # last key row r sees
    starts = torch.cumsum(row_len, 0) - row_len
    col = torch.arange(int(row_len.sum()), device=p.device) - starts.repeat_interleave(row_len)
    return col <= limit.repeat_interleave(row_len)
