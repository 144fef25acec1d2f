"""Bytes and flops of the target model and of its W4 self-drafter, from the model's shapes.

The γ choice prices every forward with a roofline (:mod:`sglang_er.gamma.cost_model`), which needs
what a forward streams from memory and computes. Both follow from ``config.json`` alone, so a cost
model can be built before any weight is loaded, and for a model on another machine.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from sglang_er.limits import SUPPORTED_GROUP_SIZES as _SUPPORTED_GROUPS
from sglang_er.limits import largest_group_size

__all__ = ["ModelCost"]


def _w4_group(k: int, preferred: int) -> int:
    """The group size :func:`sglang_er.quant.quantizer.choose_group_size` picks for in_features ``k``."""
    g = largest_group_size(k, preferred)
    if g is None:
        raise ValueError(f"no 4-bit group size <= {preferred} from {_SUPPORTED_GROUPS} divides in_features={k}")
    return g


@dataclass(frozen=True)
class ModelCost:
    """Bytes and flops of one decoder-only transformer (Llama/Qwen2 family: GQA attention,
    SwiGLU MLP, RMSNorm) and of its W4 self-drafter.

    Shapes: ``num_layers`` L, ``hidden`` D, ``intermediate`` I, ``num_heads`` H,
    ``num_kv_heads`` KVH, ``head_dim`` hd, ``vocab`` V. ``dtype_bytes``: target weights and
    activations (2 = bf16); ``kv_dtype_bytes``: KV cache (default = dtype_bytes).
    Drafter: every decoder linear (fused qkv, o, fused gate_up, down) in 4 bits, 0.5 byte per
    parameter plus ``w4_group_bytes`` per group of ``group_size`` input channels for its scale
    and zero point (4.0: bf16 scale + bf16 zero, the CPU int4pack layout; Marlin is 2.5);
    norms/biases/embedding shared with the target; the lm_head shared in bf16, or its own W4
    copy with ``w4_head``. ``logits_bytes``: bytes per vocabulary entry of a token's logits
    (fp32 = 4), written once per scored token.
    """

    num_layers: int
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int
    dtype_bytes: float = 2.0
    kv_dtype_bytes: float | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    group_size: int = 128
    w4_group_bytes: float = 4.0
    w4_head: bool = False
    w8_head: bool = False  # the drafter's int8 per-row copy of the head (1 byte/param + a scale per row)
    draft_vocab: int = 0  # rows of the head a draft step scores (sglang_er.draft.vocab); 0: all
    logits_bytes: float = 4.0

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden", "intermediate", "num_heads", "num_kv_heads", "head_dim", "vocab"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"ModelCost.{name} must be a positive integer, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.dtype_bytes <= 0 or self.logits_bytes < 0 or self.w4_group_bytes < 0:
            raise ValueError("dtype_bytes must be > 0; logits_bytes and w4_group_bytes >= 0")
        if self.kv_dtype_bytes is None:
            object.__setattr__(self, "kv_dtype_bytes", self.dtype_bytes)
        elif self.kv_dtype_bytes <= 0:
            raise ValueError(f"kv_dtype_bytes must be > 0, got {self.kv_dtype_bytes}")
        for _, k in self.linear_shapes():  # fail now, not mid-serving, if a K cannot be W4-grouped
            _w4_group(k, self.group_size)
        if self.w4_head:
            _w4_group(self.hidden, self.group_size)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides: Any) -> ModelCost:
        """From an HF ``config.json`` dict (Llama / Qwen2 / Mistral style keys)."""
        if hasattr(config, "to_dict"):
            config = config.to_dict()

        def need(key: str) -> Any:
            if key not in config:
                raise ValueError(f"model config has no {key!r}; cannot build its cost model")
            return config[key]

        heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16").replace("torch.", "")
        dtype_bytes = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4}.get(dtype)
        if dtype_bytes is None:
            raise ValueError(f"model config dtype {dtype!r} is not one of bfloat16/float16/float32")
        # Qwen2 has q/k/v biases without saying so in config.json; Llama says attention_bias.
        bias = bool(config.get("attention_bias", config.get("model_type") in ("qwen2", "qwen2_moe")))
        kw = {
            "num_layers": int(need("num_hidden_layers")),
            "hidden": hidden,
            "intermediate": int(need("intermediate_size")),
            "num_heads": heads,
            "num_kv_heads": int(config.get("num_key_value_heads") or heads),
            "head_dim": int(config.get("head_dim") or hidden // heads),
            "vocab": int(need("vocab_size")),
            "dtype_bytes": float(dtype_bytes),
            "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
            "attention_bias": bias,
        }
        kw.update(overrides)
        return cls(**kw)

    def shard(self, tp: int) -> ModelCost:
        """One tensor-parallel rank's share, as SGLang shards it: attention heads, the MLP's
        intermediate size and the vocabulary split ``tp`` ways, KV heads split too or replicated
        when there are fewer than ``tp``. Each rank streams its share, so that is what a rank's
        forward costs; the all-reduces between ranks are not priced (the live correction of the
        measured phase times absorbs them)."""
        if tp < 1 or self.num_heads % tp or self.intermediate % tp:
            raise ValueError(
                f"tensor parallel size {tp} does not divide {self.num_heads} heads and intermediate size "
                f"{self.intermediate}"
            )
        if tp == 1:
            return self
        return replace(
            self,
            num_heads=self.num_heads // tp,
            num_kv_heads=max(1, self.num_kv_heads // tp),
            intermediate=self.intermediate // tp,
            vocab=-(-self.vocab // tp),
        )

    # ------------------------------------------------------------------ shapes
    def linear_shapes(self) -> list[tuple[int, int]]:
        """(out N, in K) of one layer's linears as SGLang fuses them: qkv, o, gate_up, down."""
        D, H, KVH, hd, F = self.hidden, self.num_heads, self.num_kv_heads, self.head_dim, self.intermediate
        return [((H + 2 * KVH) * hd, D), (D, H * hd), (2 * F, D), (D, F)]

    @property
    def layer_linear_params(self) -> int:
        return sum(n * k for n, k in self.linear_shapes())

    @property
    def layer_small_params(self) -> int:
        """Norms (2 per layer) and q/k/v biases: kept in bf16 and shared by the drafter."""
        bias = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim if self.attention_bias else 0
        return 2 * self.hidden + bias

    @property
    def head_params(self) -> int:
        return self.vocab * self.hidden

    # ------------------------------------------------------------------ bytes
    @property
    def target_read_bytes(self) -> float:
        """Weight bytes one target forward streams: all layers + final norm + lm_head.
        The embedding lookup touches only B rows (negligible), so an untied embedding is not read."""
        per_layer = self.layer_linear_params + self.layer_small_params
        return (self.num_layers * per_layer + self.hidden + self.head_params) * self.dtype_bytes

    def _w4_bytes(self, n: int, k: int) -> float:
        g = _w4_group(k, self.group_size)
        return n * k * 0.5 + n * (k // g) * self.w4_group_bytes

    @property
    def drafter_layer_bytes(self) -> float:
        """W4 decoder linears of all layers: packed nibbles + per-group scale/zero."""
        return self.num_layers * sum(self._w4_bytes(n, k) for n, k in self.linear_shapes())

    @property
    def draft_head_rows(self) -> int:
        return self.draft_vocab if 0 < self.draft_vocab < self.vocab else self.vocab

    @property
    def head_bytes(self) -> float:
        """lm_head bytes one drafter step reads: the target's bf16 head, or its W4 / int8 copy, over
        the rows it scores."""
        rows = self.draft_head_rows
        if self.w4_head:
            return self._w4_bytes(rows, self.hidden)
        if self.w8_head:
            return rows * (self.hidden + self.dtype_bytes)
        return rows * self.hidden * self.dtype_bytes

    @property
    def draft_read_bytes(self) -> float:
        """Weight bytes one drafter step streams: W4 layers, shared bf16 norms/biases, head."""
        shared_small = (self.num_layers * self.layer_small_params + self.hidden) * self.dtype_bytes
        return self.drafter_layer_bytes + shared_small + self.head_bytes

    @property
    def kv_bytes_per_token(self) -> float:
        """K and V of one token across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.kv_dtype_bytes

    # ------------------------------------------------------------------ flops
    @property
    def layer_flops_per_token(self) -> float:
        """Linear-layer flop per token, all layers (2 per multiply-add)."""
        return 2.0 * self.num_layers * self.layer_linear_params

    @property
    def head_flops_per_token(self) -> float:
        return 2.0 * self.head_params

    @property
    def draft_head_flops_per_token(self) -> float:
        return 2.0 * self.draft_head_rows * self.hidden

    @property
    def flops_per_token(self) -> float:
        """Linear flop per decoded token (layers + head), attention excluded."""
        return self.layer_flops_per_token + self.head_flops_per_token

    @property
    def attn_flops_per_context_token(self) -> float:
        """Attention flop per (query token × attended context token): QKᵀ and PV, all layers."""
        return 4.0 * self.num_layers * self.num_heads * self.head_dim
