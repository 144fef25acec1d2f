"""A drafter built from two tensor-parallel shards of a model (column-parallel qkv / gate_up,
row-parallel o / down, a vocab-parallel embedding and head) computes, through its injected
all-reduce and all-gather, the logits of the drafter built from the whole model, on every rank;
with the draft head restricted to a vocabulary subset spread unevenly over the shards too.

Shapes keep every shard's 4-bit groups aligned with the whole model's (group 128 divides each
shard's input width), so both drafters quantize the same numbers and only sums are reordered."""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from sglang_er.draft.drafter import Drafter
from sglang_er.draft.views import KVView, LayerView, ModelView, TensorParallel

D, H, KVH, HD, FF, V, LAYERS, SLOTS = 256, 8, 4, 32, 512, 320, 2, 64
TP = 2


class _Group:
    """Collectives over threads: every rank hands in its tensor; all get the combination."""

    def __init__(self, n: int):
        self.slots, self.barrier = [None] * n, threading.Barrier(n)

    def bind(self, rank: int) -> TensorParallel:
        def collective(combine):
            def run(t):
                self.slots[rank] = t
                self.barrier.wait()
                out = combine(list(self.slots))
                self.barrier.wait()
                return out

            return run

        return TensorParallel(
            rank, len(self.slots), collective(lambda ts: sum(ts)), collective(lambda ts: torch.cat(ts, -1))
        )


class _Embed(torch.nn.Module):
    """The rows of ids [start, start + rows) of the embedding, others zero, summed over ranks."""

    def __init__(self, weight, start, reduce):
        super().__init__()
        self.weight, self.start, self.reduce = weight, start, reduce

    def forward(self, ids):
        local = ids - self.start
        inside = (local >= 0) & (local < self.weight.shape[0])
        return self.reduce(F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight) * inside[:, None])


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.05):
        return torch.randn(*shape, generator=g) * scale

    layers = [
        {
            "qkv": r((H + 2 * KVH) * HD, D),
            "o": r(D, H * HD),
            "gate_up": r(2 * FF, D),
            "down": r(D, FF),
            "k": r(SLOTS, KVH, HD, scale=1.0),
            "v": r(SLOTS, KVH, HD, scale=1.0),
        }
        for _ in range(LAYERS)
    ]
    return {"layers": layers, "embed": r(V, D, scale=1.0), "head": r(V, D, scale=0.5)}


def _shard(w: dict, rank: int, tp: int) -> dict:
    """Rank ``rank``'s shards, laid out as SGLang's parallel linears hold them."""

    def part(t, dim):
        return t.chunk(tp, dim)[rank]

    out = []
    for lw in w["layers"]:
        q, k, v = lw["qkv"].split([H * HD, KVH * HD, KVH * HD])
        gate, up = lw["gate_up"].chunk(2)
        out.append(
            {
                "qkv": torch.cat([part(q, 0), part(k, 0), part(v, 0)]),
                "o": part(lw["o"], 1),
                "gate_up": torch.cat([part(gate, 0), part(up, 0)]),
                "down": part(lw["down"], 1),
                "k": part(lw["k"], 1),
                "v": part(lw["v"], 1),
            }
        )
    return {"layers": out, "embed": part(w["embed"], 0), "head": part(w["head"], 0)}


def _rope_table(max_pos=128):
    inv = 1.0 / (10000 ** (torch.arange(0, HD, 2).float() / HD))
    f = torch.outer(torch.arange(max_pos).float(), inv)
    return torch.cat([f.cos(), f.sin()], -1)  # [max_pos, hd] cos|sin


def _view(w: dict, tp: TensorParallel) -> tuple[ModelView, KVView]:
    heads, kv_heads = H // tp.size, KVH // tp.size
    ones = torch.ones(D)
    layers = [
        LayerView(
            layer_id=i,
            qkv_weight=lw["qkv"],
            qkv_bias=None,
            o_weight=lw["o"],
            gate_up_weight=lw["gate_up"],
            down_weight=lw["down"],
            input_norm=ones,
            input_norm_eps=1e-6,
            post_norm=ones,
            post_norm_eps=1e-6,
            rotary_emb=None,
            linears={},
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=HD,
            scaling=HD**-0.5,
        )
        for i, lw in enumerate(w["layers"])
    ]
    start = tp.rank * w["head"].shape[0]
    view = ModelView(
        layers=layers,
        embed=_Embed(w["embed"], start, tp.all_reduce),
        final_norm=ones,
        final_norm_eps=1e-6,
        lm_head_weight=w["head"],
        vocab_size=V,
        rope_table=_rope_table(),
        vocab_start=start,
        parallel=tp,
    )
    return view, KVView([lw["k"] for lw in w["layers"]], [lw["v"] for lw in w["layers"]])


def _logits(view: ModelView, kv: KVView, vocab: torch.Tensor | None) -> torch.Tensor:
    """Logits [B, V] of one draft step after a committed prefix read from the pool."""
    drafter = Drafter(view, head="shared")
    if vocab is not None:
        drafter.set_vocab(vocab)
    kv_index = torch.tensor([[3, 9, 17, 30, 41], [5, 6, 7, 0, 0]])  # [B, L]
    seq_lens = torch.tensor([5, 3])
    attn = drafter.attention(kv, kv_index, seq_lens, 2)
    return drafter.step(torch.tensor([11, 250]), seq_lens, 0, attn)


def _sharded_logits(w: dict, vocab) -> list[torch.Tensor]:
    group, outs = _Group(TP), [None] * TP

    def rank(r):
        outs[r] = _logits(*_view(_shard(w, r, TP), group.bind(r)), vocab)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(TP)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outs


def test_sharded_drafter_equals_the_whole_one_on_every_rank():
    w = _weights()
    whole = _logits(*_view(w, TensorParallel()), None)
    for got in _sharded_logits(w, None):
        torch.testing.assert_close(got, whole, rtol=1e-4, atol=1e-4)


def test_sharded_vocabulary_subset_equals_the_whole_one():
    w = _weights()
    vocab = torch.tensor([300, 2, 170, 7, 161, 5, 319, 0])  # 3 ids in rank 0's rows, 5 in rank 1's
    whole = _logits(*_view(w, TensorParallel()), vocab)
    assert torch.isinf(whole).sum() == 2 * (V - len(vocab))
    for got in _sharded_logits(w, vocab):
        torch.testing.assert_close(got, whole, rtol=1e-4, atol=1e-4)
