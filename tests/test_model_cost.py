"""Bytes and flops of the target and its W4 drafter (sglang_er.gamma.model_cost): engine-free."""

from __future__ import annotations

import pytest
from gamma_helpers import QWEN2_05B

from sglang_er.gamma import (
    ModelCost,
)


def test_model_cost_qwen2_05b(qwen):
    assert qwen.head_dim == 64 and qwen.attention_bias and qwen.tie_word_embeddings
    # tied: the lm_head is the embedding, so one forward streams every one of the 494M bf16 weights once
    assert abs(qwen.target_read_bytes / 2 - 494e6) / 494e6 < 0.01
    assert qwen.kv_bytes_per_token == 2 * 24 * 2 * 64 * 2  # K+V · layers · kv heads · hd · bf16
    # W4 linears: 0.5 byte/param + (bf16 scale + bf16 zero) per group of 128 input channels
    lin = 24 * qwen.layer_linear_params
    assert qwen.drafter_layer_bytes == pytest.approx(lin * 0.5 + lin / 128 * 4.0)
    assert qwen.head_bytes == 151936 * 896 * 2  # shared bf16 head
    assert qwen.draft_read_bytes < 0.5 * qwen.target_read_bytes
    w4h = ModelCost.from_config(QWEN2_05B, w4_head=True)
    assert w4h.head_bytes < qwen.head_bytes / 3.5
    assert qwen.flops_per_token == pytest.approx(2 * (lin + 151936 * 896))
    explicit = ModelCost(
        num_layers=24,
        hidden=896,
        intermediate=4864,
        num_heads=14,
        num_kv_heads=2,
        head_dim=64,
        vocab=151936,
        tie_word_embeddings=True,
        attention_bias=True,
    )
    assert explicit == qwen


def test_a_tensor_parallel_rank_streams_its_share(qwen):
    """At TP 2 each rank holds half of every head, MLP and vocabulary shard: the cost model of a
    rank prices half the weight bytes (norms and biases are what is not split)."""
    half = qwen.shard(2)
    assert (half.num_heads, half.num_kv_heads, half.intermediate, half.vocab) == (7, 1, 2432, 75968)
    assert half.head_dim == qwen.head_dim and half.hidden == qwen.hidden
    assert 0.49 < half.target_read_bytes / qwen.target_read_bytes < 0.51
    assert 0.49 < half.draft_read_bytes / qwen.draft_read_bytes < 0.51
    assert qwen.shard(1) is qwen
    with pytest.raises(ValueError, match="does not divide"):
        qwen.shard(3)


def test_model_cost_group_rule_matches_quantizer():
    from sglang_er.gamma import model_cost
    from sglang_er.quant.quantizer import SUPPORTED_GROUP_SIZES, choose_group_size

    assert model_cost._SUPPORTED_GROUPS == SUPPORTED_GROUP_SIZES
    for k in (576, 896, 1536, 4864, 1152, 160):
        assert model_cost._w4_group(k, 128) == choose_group_size(k, 128)


def test_model_cost_config_errors():
    bad = dict(QWEN2_05B)
    del bad["intermediate_size"]
    with pytest.raises(ValueError, match="intermediate_size"):
        ModelCost.from_config(bad)
    with pytest.raises(ValueError, match="dtype"):
        ModelCost.from_config({**QWEN2_05B, "torch_dtype": "int8"})
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelCost.from_config({**QWEN2_05B, "num_key_value_heads": 3})


def test_a_draft_vocabulary_subset_shrinks_the_heads_bytes_and_flops():
    full = ModelCost.from_config(QWEN2_05B, w8_head=True)
    sub = ModelCost.from_config(QWEN2_05B, w8_head=True, draft_vocab=32768)
    assert sub.head_bytes == pytest.approx(full.head_bytes * 32768 / 151936)
    assert full.draft_read_bytes - sub.draft_read_bytes == pytest.approx(full.head_bytes - sub.head_bytes)
    assert sub.draft_head_flops_per_token == 2.0 * 32768 * 896
    assert sub.head_flops_per_token == full.head_flops_per_token  # the target still scores every token
    # a subset as large as the vocabulary is the whole head
    assert (
        ModelCost.from_config(QWEN2_05B, draft_vocab=151936).head_bytes == ModelCost.from_config(QWEN2_05B).head_bytes
    )
