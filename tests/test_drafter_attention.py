"""The drafter's decode attention (grouped-query heads as batched matmuls over the target's KV
pool) equals PyTorch's reference attention, padding masked, for MHA and GQA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sglang_er.drafter import _decode_attention


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (14, 2)])
def test_decode_attention_matches_sdpa(heads, kv_heads):
    g = torch.Generator().manual_seed(0)
    B, L, hd, slots = 3, 11, 16, 64
    kbuf, vbuf = torch.randn(slots, kv_heads, hd, generator=g), torch.randn(slots, kv_heads, hd, generator=g)
    kv_index = torch.randint(0, slots, (B, L), generator=g)
    kv_len = torch.tensor([11, 4, 1])
    q = torch.randn(B, heads * hd, generator=g)
    pad = torch.arange(L)[None, :] >= kv_len[:, None]
    bias = torch.zeros(B, 1, 1, L).masked_fill_(pad.view(B, 1, 1, L), float("-inf"))
    got = _decode_attention(q.view(B, kv_heads, heads // kv_heads, hd), kbuf, vbuf, kv_index, bias, hd**-0.5)
    ref = F.scaled_dot_product_attention(q.view(B, heads, 1, hd), kbuf[kv_index].transpose(1, 2),
                                         vbuf[kv_index].transpose(1, 2), attn_mask=~pad.view(B, 1, 1, L),
                                         enable_gqa=heads != kv_heads)
    torch.testing.assert_close(got.reshape(B, heads * hd), ref.reshape(B, heads * hd), rtol=1e-5, atol=1e-5)
