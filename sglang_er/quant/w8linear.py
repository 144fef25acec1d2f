"""Int8 weight-only linear for the drafter's own copy of the lm_head.

The bf16 lm_head is the largest single read of a small model's draft step (Qwen2-0.5B: 272 MB
of the ~400 MB a step reads; measured here 19 ms of a 41 ms step at batch 1). Symmetric
per-output-row int8 halves it with an output error far below the drafter's W4 error, so
acceptance is unchanged. On CPU ``torch.ops.aten._weight_int8pack_mm`` runs it (~1.9x faster
than the bf16 matmul at batch 1, slower beyond batch ~8, where the drafter uses the shared
bf16 head instead: see :meth:`sglang_er.draft.drafter.Drafter.head_for`); elsewhere the layer is
computed from its dequantized weight, which is why the drafter only uses it on CPU.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

_BLOCK_ROWS = 512  # cache-sized row blocks: a head re-quantizes after every policy update


def quantize_int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q int8 [N, K], scale float32 [N]) with w ≈ q * scale[:, None]."""
    w = w.detach()
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for r in range(0, w.shape[0], _BLOCK_ROWS):
        wf = w[r : r + _BLOCK_ROWS].float()
        sc = (wf.abs().amax(dim=1) / 127.0).clamp_min_(1e-12)
        q[r : r + _BLOCK_ROWS] = wf.div_(sc[:, None]).round_().clamp_(-127, 127)
        scale[r : r + _BLOCK_ROWS] = sc
    return q, scale


class W8Linear(nn.Module):
    """``y = x @ (q * scale).T`` with q int8 [N, K], scale [N] (no bias: an lm_head has none)."""

    def __init__(self, weight: torch.Tensor, act_dtype: torch.dtype | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.act_dtype = act_dtype or weight.dtype
        q, scale = quantize_int8_rows(weight)
        self.register_buffer("q", q)
        self.register_buffer("scale", scale.to(self.act_dtype))
        self.cpu_kernel = (
            weight.device.type == "cpu"
            and self.act_dtype == torch.bfloat16
            and hasattr(torch.ops.aten, "_weight_int8pack_mm")
        )

    @torch.no_grad()
    def requantize_(self, weight: torch.Tensor) -> None:
        """In place (buffers keep their storage)."""
        q, scale = quantize_int8_rows(weight.to(self.q.device))
        self.q.copy_(q)
        self.scale.copy_(scale)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.q.to(dtype) * self.scale.to(dtype)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, K] -> [B, N] in x's dtype."""
        if self.cpu_kernel and x.dtype == torch.bfloat16 and x.device.type == "cpu":
            return torch.ops.aten._weight_int8pack_mm(x.contiguous(), self.q, self.scale)
        return F.linear(x, self.dequantize(x.dtype))
