"""The target as the drafter sees it: weights, modules and KV pool by reference, no SGLang types.

:mod:`sglang_er.engine.model` fills these from SGLang's loaded model; the drafter, the AWQ
statistics and the tests only ever read these.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass
class TensorParallel:
    """How this rank's shard of the target joins the others' (identity on one rank).

    Under tensor parallelism every rank holds its shard of each linear (column-parallel qkv and
    gate_up: its heads and intermediate rows; row-parallel o and down: the matching input
    columns) and of the vocabulary. The drafter copies exactly those shards, so it needs the
    target's own collectives, passed in as plain callables: the engine side binds them to the
    target's TP group, and the drafter stays free of any serving framework."""

    rank: int = 0
    size: int = 1
    all_reduce: Callable[[torch.Tensor], torch.Tensor] = _identity  # sum over ranks (row-parallel outputs)
    all_gather: Callable[[torch.Tensor], torch.Tensor] = _identity  # concatenate over ranks along dim -1


@dataclass
class LayerView:
    """The target's tensors and modules of one decoder layer, shared by reference (this rank's
    shards under tensor parallelism: heads and sizes below are per rank)."""

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
    embed: torch.nn.Module  # embed(ids [T]) -> [T, D], complete on every rank (the module reduces its shards)
    final_norm: torch.Tensor
    final_norm_eps: float
    lm_head_weight: torch.Tensor  # [V_padded / tp, D]: rows for ids vocab_start .. vocab_start + rows - 1
    vocab_size: int
    # [max_position, head_dim] cos|sin of the one stock neox rotary every layer shares, else None
    # (the drafter may then apply it itself instead of calling the target's module)
    rope_table: torch.Tensor | None = None
    vocab_start: int = 0  # the first token id of this rank's lm_head rows
    parallel: TensorParallel = field(default_factory=TensorParallel)


@dataclass
class KVView:
    """The target's KV pool, per layer: buffers [num_slots, KVH, hd]."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
