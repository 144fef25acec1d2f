"""Every SGLang 0.5.23 internal that sglang-er's worker and drafter touch, in one place.

The next SGLang upgrade should have to change this file only: module attribute names of the
Llama/Qwen2 model classes, the KV pool's buffer accessors, and how a verify forward is
expressed through ``ScheduleBatch`` / ``ForwardBatch``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")


_hooked: set = set()


def hook_after(target: str, fn) -> None:
    """Run ``fn(result, *args, **kwargs)`` after SGLang's ``target`` (dotted path), once per
    process, through SGLang's plugin HookRegistry (applied by ``load_plugins``)."""
    if target in _hooked:
        return
    _hooked.add(target)
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(target, fn, HookType.AFTER)


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


def model_view(model: torch.nn.Module) -> ModelView:
    """Read a loaded SGLang Llama-family model; raise a clear error for other architectures."""
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
    return ModelView(
        layers=layers,
        embed=inner.embed_tokens,
        final_norm=inner.norm.weight,
        final_norm_eps=inner.norm.variance_epsilon,
        lm_head_weight=model.lm_head.weight,
        vocab_size=model.config.vocab_size,
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


@dataclass
class KVView:
    """The target's KV pool, per layer: buffers [num_slots, KVH, hd]."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]


def kv_view(model_runner) -> KVView:
    pool = model_runner.token_to_kv_pool
    start = getattr(pool, "start_layer", 0) or 0
    n = pool.layer_num
    return KVView(
        k=[pool.get_key_buffer(start + i) for i in range(n)],
        v=[pool.get_value_buffer(start + i) for i in range(n)],
    )


def verify_forward(
    target_worker, batch, input_ids: torch.Tensor, out_cache_loc: torch.Tensor, prefix_lens: torch.Tensor, width: int
):
    """One target forward over ``width`` new tokens per request; returns logits [bs * width, V].

    input_ids, out_cache_loc: [bs * width]; prefix_lens [bs] = committed tokens with KV.
    Expressed as EXTEND metadata (which every attention backend runs, with a causal mask that
    is correct for a chain) and flipped to TARGET_VERIFY after ``ForwardBatch.init_new`` so the
    logits processor keeps every row. The scheduler restores every ScheduleBatch field after
    the worker returns (``Scheduler._forward_isolation``).
    """
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

    bs = prefix_lens.shape[0]
    prefix_cpu = prefix_lens.cpu()
    seq_cpu = prefix_cpu + width
    batch.forward_mode = ForwardMode.EXTEND
    batch.input_ids = input_ids
    batch.out_cache_loc = out_cache_loc
    batch.seq_lens = prefix_lens + width
    batch.seq_lens_cpu = seq_cpu
    batch.seq_lens_sum = int(seq_cpu.sum())
    batch.prefix_lens = prefix_cpu.tolist()
    batch.extend_lens = [width] * bs
    batch.extend_num_tokens = width * bs
    batch.extend_logprob_start_lens = [width] * bs
    batch.return_logprob = False
    batch.spec_info = None
    fb = ForwardBatch.init_new(batch, target_worker.model_runner, return_hidden_states_before_norm=False)
    fb.forward_mode = ForwardMode.TARGET_VERIFY
    out = target_worker.forward_batch_generation(batch=None, forward_batch=fb, is_verify=True)
    return out.logits_output


def decode_forward(
    target_worker, batch, input_ids: torch.Tensor, out_cache_loc: torch.Tensor, prefix_lens: torch.Tensor
):
    """A plain decode step through SGLang's sampler: the γ = 0 iteration.

    ``batch.return_logprob`` is cleared (the scheduler restores it): a speculative server's result
    processor reads per-request lists, which the worker fills with ``spec_logprobs``, so SGLang's
    flat decode logprobs would be computed only to be thrown away.
    """
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    batch.forward_mode = ForwardMode.DECODE
    batch.input_ids = input_ids
    batch.out_cache_loc = out_cache_loc
    batch.seq_lens = prefix_lens + 1
    if batch.seq_lens_cpu is not None:
        batch.seq_lens_cpu = batch.seq_lens_cpu + 1
        batch.seq_lens_sum = int(batch.seq_lens_cpu.sum())
    batch.spec_info = None
    batch.return_logprob = False
    return target_worker.forward_batch_generation(batch)


def spec_settings() -> tuple[int, int]:
    """(γ max, draft tokens) as resolved at startup; the scheduler's ServerArgs copy may hold raw input."""
    from sglang.srt.runtime_context import get_spec

    spec = get_spec()
    return spec.speculative_num_steps, spec.speculative_num_draft_tokens


def attention_backend_name(model_runner) -> str:
    # A built runner stamps its resolved (prefill, decode) pair; decode is what the policy models.
    return getattr(model_runner, "decode_attention_backend_str", None) or "torch_native"


def generation_result(**kw):
    from sglang.srt.managers.utils import GenerationBatchResult

    return GenerationBatchResult(**kw)


def spec_logprobs(batch, logits_output, tokens: torch.Tensor, stride: int) -> None:
    """Fill the target's logprobs of ``tokens`` [bs * stride] into ``logits_output`` (SGLang's own code)."""
    from sglang.srt.layers.logprob_processor import compute_spec_logprobs

    compute_spec_logprobs(batch, logits_output, tokens, chain_stride=stride)
