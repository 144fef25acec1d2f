"""The target's forwards through SGLang 0.5.23: a verify over γ+1 tokens, a plain decode step.

Both are expressed through ``ScheduleBatch`` / ``ForwardBatch``, whose fields the scheduler
restores after the worker returns (``Scheduler._forward_isolation``); the result goes back as
SGLang's ``GenerationBatchResult``.
"""

from __future__ import annotations

import torch


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
