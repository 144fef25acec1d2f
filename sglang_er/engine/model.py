"""The target model and KV pool read out of SGLang 0.5.23, as :mod:`sglang_er.draft.views`.

Module attribute names of the Llama/Qwen2 model classes, the rotary class and the KV pool's
buffer accessors: what an SGLang upgrade may rename.
"""

from __future__ import annotations

import torch

from sglang_er.draft.views import KVView, LayerView, ModelView, TensorParallel

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")


def model_view(model: torch.nn.Module) -> ModelView:
    """Read a loaded SGLang Llama-family model; raise a clear error for other architectures.

    Under tensor parallelism these are this rank's shards, as SGLang loaded them: the drafter
    quantizes them as they are and joins its partial results on the target's own TP group."""
    arch = type(model).__name__
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"EFFROLLOUT's drafter supports {', '.join(SUPPORTED_ARCHITECTURES)}; this model is {arch}. "
            "Serve it without --speculative-algorithm EFFROLLOUT."
        )
    inner = model.model
    layers = []
    for layer in inner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        layers.append(
            LayerView(
                layer_id=attn.attn.layer_id,
                qkv_weight=attn.qkv_proj.weight,
                qkv_bias=getattr(attn.qkv_proj, "bias", None),
                o_weight=attn.o_proj.weight,
                gate_up_weight=mlp.gate_up_proj.weight,
                down_weight=mlp.down_proj.weight,
                input_norm=layer.input_layernorm.weight,
                input_norm_eps=layer.input_layernorm.variance_epsilon,
                post_norm=layer.post_attention_layernorm.weight,
                post_norm_eps=layer.post_attention_layernorm.variance_epsilon,
                rotary_emb=attn.rotary_emb,
                linears={"qkv": attn.qkv_proj, "o": attn.o_proj, "gate_up": mlp.gate_up_proj, "down": mlp.down_proj},
                num_heads=attn.num_heads,
                num_kv_heads=attn.num_kv_heads,
                head_dim=attn.head_dim,
                scaling=attn.scaling,
            )
        )
    rope = layers[0].rotary_emb
    shared_rope = all(lv.rotary_emb is rope for lv in layers)
    return ModelView(
        layers=layers,
        rope_table=neox_rope_table(rope, layers[0].head_dim) if shared_rope else None,
        embed=inner.embed_tokens,
        final_norm=inner.norm.weight,
        final_norm_eps=inner.norm.variance_epsilon,
        lm_head_weight=model.lm_head.weight,
        vocab_size=model.config.vocab_size,
        vocab_start=model.lm_head.shard_indices.org_vocab_start_index,
        parallel=tensor_parallel(),
    )


def tensor_parallel() -> TensorParallel:
    """This rank's place in the target's TP group, with SGLang's own collectives on that group
    (the ones the target's row-parallel linears and logits processor use)."""
    from sglang.srt.distributed import get_tp_group, tensor_model_parallel_all_gather, tensor_model_parallel_all_reduce

    group = get_tp_group()
    if group.world_size == 1:
        return TensorParallel()
    return TensorParallel(
        rank=group.rank_in_group,
        size=group.world_size,
        all_reduce=tensor_model_parallel_all_reduce,
        all_gather=tensor_model_parallel_all_gather,
    )


def neox_rope_table(rotary_emb, head_dim: int) -> torch.Tensor | None:
    """The [max_position, head_dim] cos|sin table of a full-width neox-style rotary embedding
    whose forward is SGLang's stock one (variants such as Llama-3 or linear scaling differ only
    in this table), so the drafter may apply it itself; None for any other rotary module."""
    from sglang.srt.layers.rotary_embedding import RotaryEmbedding

    t = type(rotary_emb)
    stock = (
        isinstance(rotary_emb, RotaryEmbedding)
        and t.forward_native is RotaryEmbedding.forward_native
        and t.forward_cpu is RotaryEmbedding.forward_cpu
    )
    if not stock or not rotary_emb.is_neox_style or hasattr(rotary_emb, "sin_cos_cache"):
        return None
    if rotary_emb.rotary_dim != head_dim or rotary_emb.head_size != head_dim:
        return None
    return rotary_emb.cos_sin_cache


def kv_view(model_runner) -> KVView:
    pool = model_runner.token_to_kv_pool
    start = getattr(pool, "start_layer", 0) or 0
    n = pool.layer_num
    return KVView(
        k=[pool.get_key_buffer(start + i) for i in range(n)],
        v=[pool.get_value_buffer(start + i) for i in range(n)],
    )
