"""Torch-native stand-ins for the Triton-only helpers SGLang reaches on the portable CPU path.

The list is short on purpose; each entry names the SGLang target it replaces, why it is
reached, and is tested against a plain-torch reference (tests/test_cpu_ops.py). They are
installed through SGLang's HookRegistry only when the portable CPU platform is active.

| target | reached when | replacement |
|---|---|---|
| ``MHATokenToKVPool._init_kv_copy_and_warmup`` | any speculative algorithm is on: the pool warms a Triton KV-copy kernel at creation | no copy config (a chain drafter never moves KV between slots) |
| ``allocation.assign_req_to_token_pool_func`` | speculative decode allocation writes new slots into ``req_to_token`` | :func:`assign_req_to_token_pool` |
"""

from __future__ import annotations

import torch

_installed = False


def assign_req_to_token_pool(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    batch_size: int,
) -> None:
    """``req_to_token[req_pool_indices[i], start[i]:end[i]] = out_cache_loc[ofs_i : ofs_i + end[i]-start[i]]``.

    ``out_cache_loc`` holds the slots of all requests back to back, in batch order.
    Shapes: req_pool_indices, start_offset, end_offset [bs]; req_to_token [pool, max_ctx].
    """
    lens = (end_offset[:batch_size] - start_offset[:batch_size]).to(torch.int64)
    total = int(lens.sum())
    if total == 0:
        return
    rows = torch.repeat_interleave(req_pool_indices[:batch_size].to(torch.int64), lens)
    firsts = torch.cumsum(lens, 0) - lens
    cols = torch.arange(total, device=lens.device) - torch.repeat_interleave(firsts, lens)
    cols += torch.repeat_interleave(start_offset[:batch_size].to(torch.int64), lens)
    req_to_token[rows, cols] = out_cache_loc[:total].to(req_to_token.dtype)


def _no_kv_copy_warmup(self) -> None:
    # The Triton tiled KV copy has no CPU driver. Only tree drafts (topk > 1) move KV
    # between slots; EFFROLLOUT drafts a chain and rewrites slots in place.
    self._kv_copy_config = None


def install() -> None:
    """Register the replacements with SGLang's HookRegistry and apply them (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(
        "sglang.srt.mem_cache.memory_pool.MHATokenToKVPool._init_kv_copy_and_warmup",
        _no_kv_copy_warmup, HookType.REPLACE,
    )
    HookRegistry.register(
        "sglang.srt.mem_cache.allocation.assign_req_to_token_pool_func",
        assign_req_to_token_pool, HookType.REPLACE,
    )
    HookRegistry.apply_hooks()
