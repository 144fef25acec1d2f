"""The self-drafter: a 4-bit copy of the target that owns no KV cache.

Built in process from the weights SGLang already loaded: every decoder linear (fused qkv, o,
fused gate_up, down) becomes a :class:`~sglang_er.quant.w4linear.W4Linear`; norms, biases, rotary
embedding, the embedding and the lm_head are the target's own tensors and modules, shared by
reference. Its attention reads the target's KV pool for the committed prefix (gathered once per
iteration) and keeps the draft tokens' own K/V in per-iteration buffers; it writes nothing into
the pool, whose slots for those tokens the verify pass fills with the target's K/V.

The step is a lean loop over the layers (gpt-fast style) rather than an SGLang forward: no
ForwardBatch, no attention-backend metadata, so the per-token overhead that dominates a small
model's decode step on a CPU is paid by the verify only.

Quantization is RTN, or AWQ when an :class:`~sglang_er.quant.awq.AWQQuantizer` with live activation
statistics is given: ``1/s`` folds into the drafter's *own copies* of the two RMSNorm weights
in front of qkv and gate_up (the target's norms are never touched) and is applied inside the
W4 linear for o and down. Groups whose statistics are not ready yet stay RTN (s = 1).

Draft head: ``shared`` (the target's lm_head), ``w8`` (int8 per-row copy, used up to
:data:`W8_HEAD_MAX_BATCH` requests, where its CPU kernel beats bf16) or ``w4``.

Under tensor parallelism the view holds this rank's shards and every copy above is of a shard; the
step sums the row-parallel outputs and gathers the head's vocabulary shards with the collectives the
view carries (:class:`~sglang_er.draft.views.TensorParallel`), as the target's own forward does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sglang_er import sampler
from sglang_er.draft import kv_rows
from sglang_er.draft.proposal import Proposal
from sglang_er.draft.views import KVView, LayerView, ModelView
from sglang_er.quant.awq import AWQQuantizer
from sglang_er.quant.awq_search import fold_into_norm
from sglang_er.quant.w4linear import W4Linear
from sglang_er.quant.w8linear import W8Linear

HEADS = ("shared", "w8", "w4")
W8_HEAD_MAX_BATCH = 8  # measured: int8pack mm beats bf16 up to batch ~8 on this CPU, loses 2x at 16


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf.to(x.dtype) * weight


def _rope_at(table: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin [B, 1, hd] of ``positions`` [B] from a neox cos|sin ``table``, laid out so that
    ``x * cos + x.roll(hd // 2, -1) * sin`` rotates x [B, heads, hd] (bit-identical to SGLang's
    native rotary in bf16). Gathered once per draft step for all layers; SGLang's module re-gathers
    per layer and runs ~25 small ops per call on CPU (72 us against 11 us per layer at batch 1)."""
    cos, sin = table.index_select(0, positions).chunk(2, dim=-1)
    return torch.cat([cos, cos], -1).to(dtype).unsqueeze(1), torch.cat([-sin, sin], -1).to(dtype).unsqueeze(1)


# Gather each layer's committed KV once per iteration while it takes at most this many bytes
# (all layers together); above it, every draft step gathers again (the memory-lean path).
PREFIX_CACHE_BYTES = 512 << 20
# On CPU, attention over a layer's prefix of at most this many float32 K+V bytes runs in float32:
# small bf16 bmm calls carry a fixed cost. Draft step, 4 layers of 4 KV heads x 64, B x L tokens:
# 4 x 150: 3.25 ms bf16, 2.68 float32; 4 x 400: 3.61, 3.29; 12 x 150 (3.7 MB): 5.89, 5.71;
# 8 x 400 (6.6 MB): 5.33, 6.21 -- there bandwidth rules and bf16's half-size reads win.
FP32_ATTENTION_BYTES = 4 << 20


class DraftAttention:
    """The attention of one draft (γ steps) over the target's committed KV plus its own tokens.

    The committed prefix is the same for all γ steps, so each layer gathers it from the pool once
    per iteration (``kv_index`` [B, Lp], valid below ``seq_lens`` [B]) into a per-iteration buffer
    with γ more columns, where draft token ``j`` writes its K/V at column Lp + j: one matmul for the
    scores and one for the output per call, over keys [B, KVH, hd, Lp + j + 1]. Nothing is written
    to the pool, whose slots for those tokens the verify pass fills with the target's K/V. Shapes per
    call: q [B, KVH, G, hd], k, v [B, KVH, hd] -> [B, KVH, G, hd]. Grouped-query heads run as batched
    matmuls with a float32 softmax: on CPU 2-4x faster than ``scaled_dot_product_attention`` with
    ``enable_gqa`` and a mask, which takes the math path and expands the KV heads. Keeping the draft
    tokens in the same buffer halves the matmuls of a separate prefix and own part (draft step
    attention, gsm8k-lm shapes: 0.38 -> 0.24 ms at B = 1, 0.72 -> 0.44 at B = 4, 1.5 -> 1.0 at B = 8).
    """

    def __init__(
        self,
        kv: KVView,
        kv_index: torch.Tensor,
        seq_lens: torch.Tensor,
        gamma: int,
        num_layers: int,
        dtype: torch.dtype,
    ):
        B, Lp = kv_index.shape
        k0 = kv.k[0]
        elems = 2 * B * Lp * k0.shape[1] * k0.shape[2]  # one layer's prefix K + V
        if k0.device.type == "cpu" and elems * 4 <= FP32_ATTENTION_BYTES:
            dtype = torch.float32
        self.kv, self.kv_index, self.gamma, self.dtype, self.lp = kv, kv_index, gamma, dtype, Lp
        self.bias = torch.zeros(B, 1, 1, Lp + gamma, device=kv_index.device)
        self.bias[..., :Lp].masked_fill_(
            (torch.arange(Lp, device=kv_index.device)[None, :] >= seq_lens[:, None]).view(B, 1, 1, Lp), float("-inf")
        )
        self.cache_prefix = elems * dtype.itemsize * num_layers <= PREFIX_CACHE_BYTES
        # per layer: (K^T [B, KVH, hd, W], V [B, KVH, W, hd]); W = Lp + γ with the prefix cached, else
        # γ (the memory-lean path keeps only the draft tokens and gathers the prefix every call)
        self.buffers: list = [None] * num_layers

    def _prefix(self, layer: int):
        """The committed prefix of ``layer``: K^T [B, KVH, hd, Lp], V [B, KVH, Lp, hd] (views)."""
        B, Lp = self.kv_index.shape
        flat = self.kv_index.reshape(-1)
        kbuf, vbuf = self.kv.k[layer], self.kv.v[layer]
        keys = kv_rows.gather(kbuf, flat).view(B, Lp, *kbuf.shape[1:]).permute(0, 2, 3, 1)
        vals = kv_rows.gather(vbuf, flat).view(B, Lp, *vbuf.shape[1:]).transpose(1, 2)
        return keys, vals

    def __call__(
        self, layer: int, j: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        buf = self.buffers[layer]
        lp = self.lp if self.cache_prefix else 0  # column of draft token 0
        if buf is None:
            B, KVH, hd = k.shape
            width = lp + self.gamma
            buf = self.buffers[layer] = (
                torch.empty(B, KVH, hd, width, dtype=self.dtype, device=k.device),
                torch.empty(B, KVH, width, hd, dtype=self.dtype, device=k.device),
            )
            if self.cache_prefix:
                keys, vals = self._prefix(layer)
                buf[0][..., :lp] = keys
                buf[1][:, :, :lp] = vals
        n = lp + j + 1
        buf[0][..., n - 1] = k
        buf[1][:, :, n - 1] = v
        keys, vals = buf[0][..., :n], buf[1][:, :, :n]
        if not self.cache_prefix:
            pk, pv = self._prefix(layer)
            keys, vals = torch.cat([pk.to(self.dtype), keys], -1), torch.cat([pv.to(self.dtype), vals], 2)
        scores = torch.matmul(q.to(self.dtype), keys).float() * scale + self.bias[..., : self.lp + j + 1]
        return torch.matmul(torch.softmax(scores, dim=-1).to(self.dtype), vals)  # [B, KVH, G, hd]


class DraftLayer:
    def __init__(self, view: LayerView, index: int, awq: AWQQuantizer | None):
        self.view = view
        self.index = index
        self.awq = awq
        # drafter-owned norm copies: AWQ folds 1/s into them (== the target's values under RTN)
        self.input_norm = view.input_norm.detach().clone()
        self.post_norm = view.post_norm.detach().clone()
        ones = (lambda w: torch.ones(w.shape[1], device=w.device)) if awq is not None else (lambda w: None)
        self.qkv = W4Linear.from_float(view.qkv_weight, view.qkv_bias)
        self.o = W4Linear.from_float(view.o_weight, None, input_scale=ones(view.o_weight))
        self.gate_up = W4Linear.from_float(view.gate_up_weight, None)
        self.down = W4Linear.from_float(view.down_weight, None, input_scale=ones(view.down_weight))
        self.betas: dict[str, float] = {}

    def requantize(self) -> None:
        v = self.view
        if self.awq is None:
            self.input_norm.copy_(v.input_norm)
            self.post_norm.copy_(v.post_norm)
            self.qkv.requantize_(v.qkv_weight, bias=v.qkv_bias)
            self.o.requantize_(v.o_weight)
            self.gate_up.requantize_(v.gate_up_weight)
            self.down.requantize_(v.down_weight)
            return
        c = self.awq.search_layer(
            self.index, {"qkv": v.qkv_weight, "o": v.o_weight, "gate_up": v.gate_up_weight, "down": v.down_weight}
        )
        self.betas = {g: ch.beta for g, ch in c.items()}
        # qkv / gate_up: y = (norm(h) / s) Q(W diag(s)), with 1/s folded into the norm copy
        self.input_norm.copy_(fold_into_norm(v.input_norm, c["qkv"].s))
        self.qkv.requantize_(v.qkv_weight, bias=v.qkv_bias, weight_scale=c["qkv"].s)
        self.post_norm.copy_(fold_into_norm(v.post_norm, c["gate_up"].s))
        self.gate_up.requantize_(v.gate_up_weight, weight_scale=c["gate_up"].s)
        self.o.requantize_(v.o_weight, input_scale=c["o"].s)
        self.down.requantize_(v.down_weight, input_scale=c["down"].s)

    def linears(self) -> list[W4Linear]:
        return [self.qkv, self.o, self.gate_up, self.down]


class Drafter:
    """``step`` proposes one token distribution per request from the W4 copy.

    Shapes: B requests, L = longest KV row read this step, D hidden, V vocab.
    """

    def __init__(self, view: ModelView, head: str = "shared", awq: AWQQuantizer | None = None):
        if head not in HEADS:
            raise ValueError(f"draft head must be one of {HEADS}, got {head!r}")
        self.view = view
        self.awq = awq
        self.head_kind = head
        with torch.inference_mode():
            self.layers = [DraftLayer(lv, i, awq) for i, lv in enumerate(view.layers)]
            # The bf16 head is the largest single read of a small model's draft step (Qwen2-0.5B:
            # 272 MB of ~400 MB); an int8 copy halves it at no measurable cost in acceptance, a
            # W4 copy cuts it ~4x at a small cost.
            self.head = None
            if head == "w4":
                self.head = W4Linear.from_float(view.lm_head_weight, None)
            elif head == "w8":
                self.head = W8Linear(view.lm_head_weight)
        self.vocab: torch.Tensor | None = None  # [K] ids the head scores (None: every token)
        # (the head kind's own head over this rank's subset rows, their dense copy, the all-gathered
        # columns to keep, the subset's ids in column order)
        self._vocab_heads: tuple = (None, None, None, None)
        self._bind_rope(view)

    def _bind_rope(self, view: ModelView) -> None:
        """Use the drafter's own rotary (see :func:`_rope_at`) on CPU when every layer shares one
        stock neox table; otherwise each layer calls the target's module (on CUDA: one fused kernel)."""
        self.rope_table = view.rope_table if view.layers[0].qkv_weight.device.type == "cpu" else None

    def head_for(self, batch: int):
        """The head module for a step of ``batch`` requests (None: the target's shared head)."""
        if self.head is None or (self.head_kind == "w8" and batch > W8_HEAD_MAX_BATCH):
            return None
        return self.head

    @torch.inference_mode()
    def set_vocab(self, ids: torch.Tensor | None) -> None:
        """Score only the tokens ``ids`` [K] from now on (None: every token); see
        :mod:`sglang_er.draft.vocab`. Builds K-row copies of the head from the target's weights."""
        was_subset = self.vocab is not None
        self.vocab = None if ids is None else ids.to(device=self.view.lm_head_weight.device, dtype=torch.int64)
        if was_subset and self.vocab is None and self.head is not None:  # back to the whole head: bring it up to date
            self.head.requantize_(self.view.lm_head_weight)
        self._build_vocab_heads()

    def _build_vocab_heads(self) -> None:
        """K-row heads over this rank's rows of the subset. Under tensor parallelism each rank
        scores the subset's ids in its vocabulary shard, padded to the largest rank's count so
        that one all-gather joins them; ``keep`` picks the real columns, in ``ids`` order."""
        if self.vocab is None:
            self._vocab_heads = (None, None, None, None)
            return
        w, tp = self.view.lm_head_weight, self.view.parallel
        ids = self.vocab.sort().values  # [K]
        owner = ids // w.shape[0]  # [K] the rank whose shard holds each id
        counts = torch.bincount(owner, minlength=tp.size).tolist()
        width = max(counts)
        local = torch.zeros(width, dtype=torch.int64, device=ids.device)  # padded with row 0
        mine = ids[owner == tp.rank] - self.view.vocab_start
        local[: mine.numel()] = mine
        keep = None  # one rank: the columns are the ids
        if tp.size > 1:
            keep = torch.cat([r * width + torch.arange(c, device=ids.device) for r, c in enumerate(counts)])
        rows = w.index_select(0, local)  # [width, D], the target's dtype
        own = None  # shared: the dense rows are the head
        if self.head_kind == "w8":
            own = W8Linear(rows)
        elif self.head_kind == "w4":
            own = W4Linear.from_float(rows, None)
        self._vocab_heads = (own, rows, keep, ids)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """[B, V] float32 logits of the final hidden states h [B, D]; -inf outside the vocabulary subset.
        Each rank scores its vocabulary shard; the all-gather gives every rank all of them."""
        B = h.shape[0]
        gather = self.view.parallel.all_gather
        if self.vocab is None:
            head = self.head_for(B)
            logits = head(h) if head is not None else F.linear(h, self.view.lm_head_weight)  # [B, V_padded / tp]
            return gather(logits)[:, : self.view.vocab_size].float()
        own, rows, keep, ids = self._vocab_heads
        use_own = own is not None and not (self.head_kind == "w8" and B > W8_HEAD_MAX_BATCH)
        sub = own(h) if use_own else F.linear(h, rows)  # [B, width]
        if keep is not None:
            sub = gather(sub)[:, keep]  # [B, K]
        logits = torch.full((B, self.view.vocab_size), float("-inf"), dtype=torch.float32, device=h.device)
        return logits.index_copy_(1, ids, sub.float())

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
            self._bind_rope(view)
        for layer in self.layers:
            layer.requantize()
        if self.vocab is None:
            if self.head is not None:
                self.head.requantize_(self.view.lm_head_weight)
        else:  # a subset scores only its own rows: the whole head is brought up to date if it comes back
            self._build_vocab_heads()

    def awq_summary(self) -> dict:
        """How many linear groups run AWQ scales (β > 0) and their mean β."""
        betas = [b for layer in self.layers for b in layer.betas.values()]
        scaled = [b for b in betas if b > 0]
        return {
            "groups": len(betas),
            "awq_groups": len(scaled),
            "mean_beta": sum(scaled) / len(scaled) if scaled else 0.0,
        }

    def _linears(self) -> list[W4Linear | W8Linear]:
        """Every quantized linear the drafter owns: each layer's four, then its own head if any."""
        return [lin for layer in self.layers for lin in layer.linears()] + ([self.head] if self.head else [])

    def kernels(self) -> dict[str, str]:
        """The W4 kernels the drafter's linears run on, each with why it was chosen (first reason)."""
        out: dict[str, str] = {}
        for lin in self._linears():
            if isinstance(lin, W4Linear):
                out.setdefault(lin.kernel, lin.kernel_reason)
        return out

    def weight_bytes(self) -> int:
        """Bytes the drafter adds to the target's: packed weights, scales, zeros, norm copies."""
        lins = self._linears()
        norms = sum(2 * layer.input_norm.numel() * layer.input_norm.element_size() for layer in self.layers)
        return norms + sum(
            b.numel() * b.element_size()
            for lin in lins
            for name, b in lin.named_buffers()
            if b is not None and name != "w_dequant"
        )

    def attention(self, kv: KVView, kv_index: torch.Tensor, seq_lens: torch.Tensor, gamma: int) -> DraftAttention:
        """The per-iteration attention state of a γ-step draft (see :class:`DraftAttention`)."""
        return DraftAttention(kv, kv_index, seq_lens, gamma, len(self.layers), self.view.lm_head_weight.dtype)

    def propose(
        self,
        x0: torch.Tensor,  # [B] the last sampled token, no KV yet
        seq_lens: torch.Tensor,  # [B] int64 committed tokens with KV
        attn: DraftAttention,
        params: sampler.SamplingParamsTensor | None,  # None: greedy drafts, no q
        after_first_step=None,  # called once the first step (which also gathers the KV) is done
        constraint=None,  # masks step j's logits and hears its drafts (engine.grammar.GrammarChain)
        generator: torch.Generator | None = None,  # the draws' random stream (None: torch's global one)
    ) -> Proposal:
        """γ = ``attn.gamma`` drafter steps at positions seq_lens .. seq_lens+γ-1, each drawn
        with the request's own sampling parameters (q kept for the rejection test) and, for
        constrained requests, under the grammar's mask."""
        tokens, drafts, qs = x0, [], []
        for j in range(attn.gamma):
            logits = self.step(tokens, seq_lens + j, j, attn)  # [B, V]
            if constraint is not None:
                constraint.mask(j, logits)
            if params is None:
                tokens = logits.argmax(-1)
            else:
                q = sampler.target_probs(logits, params)
                tokens = sampler.sample(q, generator)
                qs.append(q)
            drafts.append(tokens)
            if constraint is not None:
                constraint.advance(j, tokens)
            if j == 0 and after_first_step is not None:
                after_first_step()
        return Proposal(torch.stack(drafts, 1), torch.stack(qs, 1) if qs else None, ran_drafter=True)

    @torch.inference_mode()
    def step(
        self,
        tokens: torch.Tensor,  # [B] int64: the token at `positions`
        positions: torch.Tensor,  # [B] int64: seq_lens + j
        j: int,  # draft step, 0..γ-1
        attn: DraftAttention,
    ) -> torch.Tensor:
        """Logits [B, V] (float32) of the next token after ``tokens``."""
        B = tokens.shape[0]
        reduce = self.view.parallel.all_reduce  # row-parallel outputs are partial sums under TP
        residual = self.view.embed(tokens)
        rope = None if self.rope_table is None else _rope_at(self.rope_table, positions, residual.dtype)
        for i, layer in enumerate(self.layers):
            lv = layer.view
            H, KVH, hd = lv.num_heads, lv.num_kv_heads, lv.head_dim
            x = _rms_norm(residual, layer.input_norm, lv.input_norm_eps)
            qkv = layer.qkv(x)
            if rope is None:
                q, k, v = qkv.split([H * hd, KVH * hd, KVH * hd], dim=-1)
                q, k = lv.rotary_emb(positions, q, k)
                q, k = q.reshape(B, H, hd), k.reshape(B, KVH, hd)
            else:  # q and k heads rotated together: they are adjacent in the fused qkv output
                qk = qkv[:, : (H + KVH) * hd].view(B, H + KVH, hd)
                qk = qk * rope[0] + qk.roll(hd // 2, -1) * rope[1]
                q, k = qk[:, :H], qk[:, H:]
            v = qkv[:, (H + KVH) * hd :].view(B, KVH, hd)
            out = attn(i, j, q.reshape(B, KVH, H // KVH, hd), k, v, lv.scaling)
            residual = residual + reduce(layer.o(out.to(residual.dtype).reshape(B, H * hd)))
            x = _rms_norm(residual, layer.post_norm, lv.post_norm_eps)
            gate, up = layer.gate_up(x).chunk(2, dim=-1)
            residual = residual + reduce(layer.down(F.silu(gate) * up))
        return self._logits(_rms_norm(residual, self.view.final_norm, self.view.final_norm_eps))
