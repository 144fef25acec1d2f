"""What the worker reads off SGLang's ``ScheduleBatch`` and ``Req`` objects, in one place.

Synchronous scheduling (no overlap) means every request's ``output_ids`` already hold the token
sampled last iteration, and the scheduler has allocated this iteration's KV slots in
``req_to_token`` before the worker runs.
"""

from __future__ import annotations

import torch


def seq_lens_host(batch) -> list[int]:
    """Committed lengths [B] (tokens with KV), from the host copy when there is one: no device sync."""
    return (batch.seq_lens_cpu if batch.seq_lens_cpu is not None else batch.seq_lens).tolist()


def rids(batch) -> list[str]:
    return [r.rid for r in batch.reqs]


def prompt_key(req) -> tuple[int, int]:
    """``(prompt length, hash of its ids)``, cached on the request: the n samples of one GRPO prompt
    share it (and the prompt's radix-cached KV); the γ choice and the history drafts group by it."""
    key = getattr(req, "_er_prompt_key", None)
    if key is None:
        ids = req.origin_input_ids
        key = req._er_prompt_key = (len(ids), hash(tuple(ids)))
    return key


def prompt_keys(batch) -> list[tuple[int, int]]:
    return [prompt_key(r) for r in batch.reqs]


def last_tokens(batch, device: torch.device) -> torch.Tensor:
    """x0 [B]: each request's last sampled token, which has no KV yet."""
    return torch.tensor([r.output_ids[-1] for r in batch.reqs], dtype=torch.int64, device=device)


def slots(req_to_token: torch.Tensor, batch, width: int) -> torch.Tensor:
    """KV slots [B, width] the scheduler allocated for positions seq_lens .. seq_lens + width - 1."""
    cols = batch.seq_lens[:, None].to(torch.int64) + torch.arange(width, device=req_to_token.device)
    return req_to_token[batch.req_pool_indices[:, None], cols].to(torch.int64)


def committed_slots(req_to_token: torch.Tensor, batch, max_len: int) -> torch.Tensor:
    """KV slots [B, max_len] of the committed prefix (rows past a request's length are padding)."""
    cols = torch.arange(max_len, device=req_to_token.device)
    return req_to_token[batch.req_pool_indices[:, None], cols[None, :]].to(torch.int64)


def logits_only_features(batch) -> bool:
    """Features SGLang's sampler applies to the logits only: speculating without them would not be
    lossless, so such batches decode plainly. Grammars are not among them: constrained requests
    draft and verify under the grammar's masks (:mod:`sglang_er.engine.grammar`)."""
    info = batch.sampling_info
    return bool(
        # the scheduler hands the worker a forward copy whose penalties are folded into tensors
        info.acc_additive_penalties is not None
        or info.acc_scaling_penalties is not None
        or (info.penalizer_orchestrator is not None and info.penalizer_orchestrator.is_required)
        or info.logit_bias is not None
        or info.has_custom_logit_processor
    )


def has_grammar(batch) -> bool:
    """Whether a request carries a grammar. Read off the requests: SGLang copies them into
    ``sampling_info.grammars`` only when it builds the forward batch, after the γ choice."""
    return any(req.grammar is not None for req in batch.reqs)
