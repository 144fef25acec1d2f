"""The drafter's decode attention (grouped-query heads as batched matmuls over the target's KV
pool) equals PyTorch's reference attention, padding masked, for MHA and GQA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sglang_er.draft.drafter as drafter
from sglang_er.draft import kv_rows


def _gather(kbuf, vbuf, kv_index, dtype):
    """Pool rows kv_index [B, L] -> keys, values [B, KVH, L, hd]."""
    B, L = kv_index.shape
    flat = kv_index.reshape(-1)
    keys = kv_rows.gather(kbuf, flat).view(B, L, *kbuf.shape[1:]).to(dtype).transpose(1, 2)
    vals = kv_rows.gather(vbuf, flat).view(B, L, *vbuf.shape[1:]).to(dtype).transpose(1, 2)
    return keys, vals


def _reference_attention(
    q: torch.Tensor, kbuf: torch.Tensor, vbuf: torch.Tensor, kv_index: torch.Tensor, bias: torch.Tensor, scale: float
) -> torch.Tensor:
    """Reference: one query token per request over its KV rows, grouped-query heads as matmuls.

    q [B, KVH, G, hd] (query head h = kv·G + g), kbuf/vbuf [slots, KVH, hd] (the target's pool),
    kv_index [B, L], bias [B, 1, 1, L] -> [B, KVH, G, hd]; the softmax runs in float32, as in
    ``DraftAttention``.
    """
    keys, vals = _gather(kbuf, vbuf, kv_index, q.dtype)
    probs = torch.softmax(torch.matmul(q, keys.transpose(-1, -2)).float() * scale + bias, dim=-1)  # [B, KVH, G, L]
    return torch.matmul(probs.to(q.dtype), vals)


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
    got = _reference_attention(q.view(B, kv_heads, heads // kv_heads, hd), kbuf, vbuf, kv_index, bias, hd**-0.5)
    ref = F.scaled_dot_product_attention(
        q.view(B, heads, 1, hd),
        kbuf[kv_index].transpose(1, 2),
        vbuf[kv_index].transpose(1, 2),
        attn_mask=~pad.view(B, 1, 1, L),
        enable_gqa=heads != kv_heads,
    )
    torch.testing.assert_close(got.reshape(B, heads * hd), ref.reshape(B, heads * hd), rtol=1e-5, atol=1e-5)


def test_draft_attention_equals_attention_over_the_pool_with_draft_kv_written():
    """The per-iteration path (prefix gathered once, the draft tokens' K/V in own buffers, nothing
    written to the pool) equals attending over the pool with each draft token's K/V written
    into its slot, at every draft step, for requests of different lengths; the memory-lean
    path (prefix gathered every step) too."""
    import types

    g = torch.Generator().manual_seed(1)
    B, KVH, G, hd, slots, gamma = 3, 2, 3, 8, 64, 3
    kbuf, vbuf = torch.randn(slots, KVH, hd, generator=g), torch.randn(slots, KVH, hd, generator=g)
    seq_lens = torch.tensor([5, 9, 1])
    rows = torch.randperm(slots, generator=g)[: B * (9 + gamma)].view(B, 9 + gamma)  # each request's slots
    for cache in (True, False):
        pool_k, pool_v = kbuf.clone(), vbuf.clone()
        kv = types.SimpleNamespace(k=[kbuf.clone()], v=[vbuf.clone()])
        old = drafter.PREFIX_CACHE_BYTES
        drafter.PREFIX_CACHE_BYTES = old if cache else 0
        try:
            attn = drafter.DraftAttention(kv, rows[:, :9], seq_lens, gamma, 1, torch.float32)
        finally:
            drafter.PREFIX_CACHE_BYTES = old
        assert attn.cache_prefix is cache
        for j in range(gamma):
            q = torch.randn(B, KVH, G, hd, generator=g)
            k, v = torch.randn(B, KVH, hd, generator=g), torch.randn(B, KVH, hd, generator=g)
            loc = rows[torch.arange(B), seq_lens + j]
            pool_k[loc], pool_v[loc] = k, v
            width = int(seq_lens.max()) + j + 1
            idx = torch.stack(
                [
                    torch.cat([rows[b, : seq_lens[b] + j + 1], rows[b, :1].repeat(width - seq_lens[b] - j - 1)])
                    for b in range(B)
                ]
            )
            pad = torch.arange(width)[None, :] >= (seq_lens + j + 1)[:, None]
            bias = torch.zeros(B, 1, 1, width).masked_fill_(pad.view(B, 1, 1, width), float("-inf"))
            ref = _reference_attention(q, pool_k, pool_v, idx, bias, hd**-0.5)
            torch.testing.assert_close(attn(0, j, q, k, v, hd**-0.5), ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(kv.k[0], kbuf) and torch.equal(kv.v[0], vbuf)  # the pool is never written


def test_drafter_rotary_is_sglang_rotary_bit_for_bit():
    """The drafter's once-per-step rotary (q and k heads together) equals SGLang's module in bf16;
    modules it cannot reproduce (GPT-J style, partial rotary) give no table, so the drafter calls them."""
    from sglang.srt.layers.rotary_embedding import get_rope

    from sglang_er.engine.model import neox_rope_table

    g = torch.Generator().manual_seed(0)
    H, KVH, hd, B = 8, 2, 64, 5
    rope = get_rope(hd, rotary_dim=hd, max_position=512, base=10000, is_neox_style=True, dtype=torch.bfloat16)
    table = neox_rope_table(rope, hd)
    assert table is not None
    positions = torch.tensor([0, 1, 7, 300, 511])
    q = torch.randn(B, H * hd, generator=g).bfloat16()
    k = torch.randn(B, KVH * hd, generator=g).bfloat16()
    ref_q, ref_k = rope.forward_native(positions, q.clone(), k.clone())
    cos, sin = drafter._rope_at(table, positions, torch.bfloat16)
    qk = torch.cat([q, k], -1).view(B, H + KVH, hd)
    got = qk * cos + qk.roll(hd // 2, -1) * sin
    assert torch.equal(got[:, :H].reshape(B, -1), ref_q.reshape(B, -1))
    assert torch.equal(got[:, H:].reshape(B, -1), ref_k.reshape(B, -1))
    assert (
        neox_rope_table(
            get_rope(hd, rotary_dim=hd, max_position=512, base=10000, is_neox_style=False, dtype=torch.bfloat16), hd
        )
        is None
    )
    assert (
        neox_rope_table(
            get_rope(hd, rotary_dim=hd // 2, max_position=512, base=10000, is_neox_style=True, dtype=torch.bfloat16), hd
        )
        is None
    )
