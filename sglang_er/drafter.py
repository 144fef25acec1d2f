"""The self-drafter: a 4-bit copy of the target that owns no KV cache.

Built in process from the weights SGLang already loaded: every decoder linear (fused qkv, o,
fused gate_up, down) becomes a :class:`~sglang_er.w4linear.W4Linear`; norms, biases, rotary
embedding, the embedding and the lm_head are the target's own tensors and modules, shared by
reference. Its attention reads the target's KV pool for the committed prefix and writes the
draft token's K/V only into the slot allocated to that token for this iteration, which the
verify pass then overwrites with the target's K/V.

The step is a lean loop over the layers (gpt-fast style) rather than an SGLang forward: no
ForwardBatch, no attention-backend metadata, so the per-token overhead that dominates a small
model's decode step on a CPU is paid by the verify only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sglang_er._sglang import KVView, LayerView, ModelView
from sglang_er.w4linear import W4Linear


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf.to(x.dtype) * weight


class DraftLayer:
    def __init__(self, view: LayerView, quantize):
        self.view = view
        self.qkv = quantize(view.qkv_weight, view.qkv_bias)
        self.o = quantize(view.o_weight, None)
        self.gate_up = quantize(view.gate_up_weight, None)
        self.down = quantize(view.down_weight, None)

    def requantize(self) -> None:
        v = self.view
        self.qkv.requantize_(v.qkv_weight, bias=v.qkv_bias)
        self.o.requantize_(v.o_weight)
        self.gate_up.requantize_(v.gate_up_weight)
        self.down.requantize_(v.down_weight)

    def linears(self) -> list[W4Linear]:
        return [self.qkv, self.o, self.gate_up, self.down]


class Drafter:
    """``step`` proposes one token distribution per request from the W4 copy.

    Shapes: B requests, L = longest KV row read this step, D hidden, V vocab.
    """

    def __init__(self, view: ModelView, quantize=None, w4_head: bool = False):
        self.view = view
        quantize = quantize or (lambda w, b: W4Linear.from_float(w, b))
        with torch.inference_mode():
            self.layers = [DraftLayer(lv, quantize) for lv in view.layers]
            # The bf16 head is the largest single read of a small model's draft step (Qwen2-0.5B:
            # 272 MB of 462 MB); a W4 copy cuts it ~4x at a small cost in acceptance.
            self.head = quantize(view.lm_head_weight, None) if w4_head else None

    @torch.inference_mode()
    def requantize(self, view: ModelView | None = None) -> None:
        """Re-quantize every layer from the target's current weights, in place.

        ``view``: a fresh view of the target, for updates that replaced its tensors rather
        than writing into them (the shared embedding / head / norms are re-bound too).
        """
        if view is not None:
            self.view = view
            for layer, lv in zip(self.layers, view.layers):
                layer.view = lv
        for layer in self.layers:
            layer.requantize()
        if self.head is not None:
            self.head.requantize_(self.view.lm_head_weight)

    def weight_bytes(self) -> int:
        """Bytes the drafter adds to the target's: its packed W4 weights, scales and zeros."""
        lins = [lin for layer in self.layers for lin in layer.linears()] + ([self.head] if self.head else [])
        return sum(b.numel() * b.element_size() for lin in lins for name, b in lin.named_buffers()
                   if b is not None and name != "w_dequant")

    @torch.inference_mode()
    def step(
        self,
        tokens: torch.Tensor,  # [B] int64: the token at `positions`
        positions: torch.Tensor,  # [B] int64
        out_loc: torch.Tensor,  # [B] KV slot allocated to this token (overwritten by the verify)
        kv_index: torch.Tensor,  # [B, L] KV slots of positions 0..L-1 (padding past kv_len)
        kv_len: torch.Tensor,  # [B] valid entries of kv_index, this token included
        kv: KVView,
    ) -> torch.Tensor:
        """Logits [B, V] (float32) of the next token after ``tokens``."""
        B, L = kv_index.shape
        mask = (torch.arange(L, device=kv_index.device)[None, :] < kv_len[:, None]).view(B, 1, 1, L)
        residual = self.view.embed(tokens)
        for i, layer in enumerate(self.layers):
            lv = layer.view
            H, KVH, hd = lv.num_heads, lv.num_kv_heads, lv.head_dim
            x = _rms_norm(residual, lv.input_norm, lv.input_norm_eps)
            q, k, v = layer.qkv(x).split([H * hd, KVH * hd, KVH * hd], dim=-1)
            q, k = lv.rotary_emb(positions, q, k)
            kbuf, vbuf = kv.k[i], kv.v[i]
            kbuf[out_loc] = k.reshape(B, KVH, hd).to(kbuf.dtype)
            vbuf[out_loc] = v.reshape(B, KVH, hd).to(vbuf.dtype)
            keys = kbuf[kv_index].transpose(1, 2).to(q.dtype)  # [B, KVH, L, hd]
            vals = vbuf[kv_index].transpose(1, 2).to(q.dtype)
            attn = F.scaled_dot_product_attention(
                q.reshape(B, H, 1, hd), keys, vals, attn_mask=mask, scale=lv.scaling, enable_gqa=H != KVH
            )
            residual = residual + layer.o(attn.reshape(B, H * hd))
            x = _rms_norm(residual, lv.post_norm, lv.post_norm_eps)
            gate, up = layer.gate_up(x).chunk(2, dim=-1)
            residual = residual + layer.down(F.silu(gate) * up)
        h = _rms_norm(residual, self.view.final_norm, self.view.final_norm_eps)
        logits = self.head(h) if self.head is not None else F.linear(h, self.view.lm_head_weight)
        return logits[:, : self.view.vocab_size].float()
