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
    Backends with a TARGET_VERIFY path (triton, flashinfer, fa3, ...) get SGLang's contract:
    ``seq_lens`` = the prefix, a :class:`~sglang_er.engine.verify_input.ChainVerifyInput` as
    ``spec_info``, TARGET_VERIFY before ``ForwardBatch.init_new``. torch_native has no such path
    (it reads ``extend_*``, which init_new leaves unset in TARGET_VERIFY), so there the verify
    runs as EXTEND metadata (causal, correct for a chain) and is flipped to TARGET_VERIFY after
    init_new only so the logits processor keeps every row. The scheduler restores every
    ScheduleBatch field after the worker returns (``Scheduler._forward_isolation``).
    """
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

    backend, needs_mask = verify_attention_backend(target_worker.model_runner)
    batch.input_ids = input_ids
    batch.out_cache_loc = out_cache_loc
    batch.return_logprob = False
    if backend in EXTEND_VERIFY_BACKENDS:
        _as_extend(batch, prefix_lens, width)
        fb = ForwardBatch.init_new(batch, target_worker.model_runner, return_hidden_states_before_norm=False)
        fb.forward_mode = ForwardMode.TARGET_VERIFY
    else:
        as_target_verify(batch, input_ids, prefix_lens, width, spec_settings()[1], needs_mask)
        fb = ForwardBatch.init_new(batch, target_worker.model_runner, return_hidden_states_before_norm=False)
    out = target_worker.forward_batch_generation(batch=None, forward_batch=fb, is_verify=True)
    return out.logits_output


# Backends without a TARGET_VERIFY path: the verify runs as EXTEND on them (by class name, as
# SGLang's ``resolve_dflash_verify_mask_policy`` names them).
EXTEND_VERIFY_BACKENDS = frozenset({"TorchNativeAttnBackend"})


def verify_attention_backend(model_runner) -> tuple[str, bool]:
    """(class name of the backend that runs TARGET_VERIFY, whether it needs an explicit chain mask),
    resolved through hybrid/TBO wrappers by SGLang's own DFLASH policy (a chain verify, like ours)."""
    from sglang.srt.speculative.dflash_utils import resolve_dflash_verify_mask_policy

    return resolve_dflash_verify_mask_policy(model_runner.attn_backend)


def as_target_verify(
    batch, input_ids: torch.Tensor, prefix_lens: torch.Tensor, width: int, static_width: int, with_mask: bool
) -> None:
    """SGLang's TARGET_VERIFY convention, as EAGLE and NGRAM set it: ``seq_lens`` (device and host)
    and ``seq_lens_sum`` count the committed prefix only; the width rides on ``spec_info``."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from sglang_er.engine.verify_input import ChainVerifyInput

    batch.forward_mode = ForwardMode.TARGET_VERIFY
    batch.seq_lens = prefix_lens.to(batch.seq_lens.dtype)
    if batch.seq_lens_cpu is None:  # the scheduler's host copy already holds the prefix: no sync
        batch.seq_lens_cpu = prefix_lens.cpu()
    batch.seq_lens_sum = int(batch.seq_lens_cpu.sum())
    batch.spec_info = ChainVerifyInput.build(input_ids, prefix_lens, width, static_width, with_mask)


def _as_extend(batch, prefix_lens: torch.Tensor, width: int) -> None:
    """EXTEND metadata for the verify: ``seq_lens`` = prefix + width, ``extend_*`` = width each."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    bs = prefix_lens.shape[0]
    prefix_cpu = prefix_lens.cpu()
    seq_cpu = prefix_cpu + width
    batch.forward_mode = ForwardMode.EXTEND
    batch.seq_lens = prefix_lens + width
    batch.seq_lens_cpu = seq_cpu
    batch.seq_lens_sum = int(seq_cpu.sum())
    batch.prefix_lens = prefix_cpu.tolist()
    batch.extend_lens = [width] * bs
    batch.extend_num_tokens = width * bs
    batch.extend_logprob_start_lens = [width] * bs
    batch.spec_info = None


def decode_forward(
    target_worker, batch, input_ids: torch.Tensor, out_cache_loc: torch.Tensor, prefix_lens: torch.Tensor
):
    """A plain decode step through SGLang's sampler: the γ = 0 iteration.

    Its logprobs are the sampler's own, exactly plain SGLang's. They cannot be recomputed from the
    logits afterwards: at T > 0 the sampler overwrites the logits in place with the tempered
    probabilities. A speculative server's result processor reads one list per request, so the
    flat [B] token logprobs become [B, 1] (the top and token-id logprobs are per request already).
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
    res = target_worker.forward_batch_generation(batch)
    out = res.logits_output
    if batch.return_logprob and out.next_token_logprobs is not None:
        out.next_token_logprobs = out.next_token_logprobs.view(-1, 1)  # [B] -> [B, 1]
    return res


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
