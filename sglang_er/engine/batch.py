"""What the worker reads off SGLang's ``ScheduleBatch`` and ``Req`` objects, in one place.

Under SGLang's overlap scheduler a request's ``output_ids`` lag one iteration when the worker runs
(the previous result is processed after the next forward is launched): the last committed token
comes from the batch's carried input (:mod:`sglang_er.engine.draft_input`), the committed lengths
from ``seq_lens``. The scheduler has allocated this iteration's KV slots in ``req_to_token``
before the worker runs, in both modes.
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
    """x0 [B]: each request's last committed token, which has no KV yet, as the previous step
    handed it on (relayed by the overlap scheduler); ``output_ids`` only for a batch that carries
    none, which the synchronous scheduler alone could produce."""
    carried = getattr(batch.spec_info, "bonus_tokens", None)
    if carried is not None:
        return carried.to(device=device, dtype=torch.int64)
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


def committed_outputs(seq_lens: list[int], recent):
    """outputs(i, req) -> request i's committed output ids up to x0, or None when they are not at
    hand (see :meth:`~sglang_er.history.proposer.HistoryProposer.plan`). Under the overlap
    scheduler ``output_ids`` lack what the previous step committed: ``recent`` = (rids, tokens
    [B', w], lens [B']) of that step, read from the device on first need. seq_lens [B]: committed
    tokens with KV (the prompt and the outputs before x0)."""
    host = None

    def outputs(i: int, req):
        nonlocal host
        out = req.output_ids
        missing = seq_lens[i] - len(req.origin_input_ids) + 1 - len(out)
        if missing <= 0:
            return out
        if host is None:
            rids, tokens, lens = recent if recent is not None else ([], torch.empty(0, 1), torch.empty(0))
            host = {rid: row[:n] for rid, row, n in zip(rids, tokens.tolist(), lens.tolist())}
        tail = host.get(req.rid, [])
        return [*out, *tail[len(tail) - missing :]] if len(tail) >= missing else None

    return outputs
