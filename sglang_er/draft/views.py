"""The target as the drafter sees it: weights, modules and KV pool by reference, no SGLang types.

:mod:`sglang_er.engine.model` fills these from SGLang's loaded model; the drafter, the AWQ
statistics and the tests only ever read these.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerView:
    """The target's tensors and modules of one decoder layer, shared by reference."""

    layer_id: int
    qkv_weight: torch.Tensor  # [(H + 2 KVH) * hd, D]
    qkv_bias: torch.Tensor | None
    o_weight: torch.Tensor  # [D, H * hd]
    gate_up_weight: torch.Tensor  # [2 I, D]
    down_weight: torch.Tensor  # [D, I]
    input_norm: torch.Tensor  # [D]
    input_norm_eps: float
    post_norm: torch.Tensor  # [D]
    post_norm_eps: float
    rotary_emb: torch.nn.Module  # rotary_emb(positions [T], q [T, H*hd], k [T, KVH*hd]) -> (q, k)
    linears: dict[str, torch.nn.Module]  # "qkv" / "o" / "gate_up" / "down": the target's modules (for hooks)
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float


@dataclass
class ModelView:
    layers: list[LayerView]
    embed: torch.nn.Module  # embed(ids [T]) -> [T, D]
    final_norm: torch.Tensor
    final_norm_eps: float
    lm_head_weight: torch.Tensor  # [V_padded, D]
    vocab_size: int
    # [max_position, head_dim] cos|sin of the one stock neox rotary every layer shares, else None
    # (the drafter may then apply it itself instead of calling the target's module)
    rope_table: torch.Tensor | None = None


@dataclass
class KVView:
    """The target's KV pool, per layer: buffers [num_slots, KVH, hd]."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
