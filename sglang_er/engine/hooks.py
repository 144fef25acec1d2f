"""Every change sglang-er makes to SGLang's own code, as one table, applied in one place.

Each :class:`Hook` names its SGLang 0.5.23 target, how it changes it (``after``: runs after the
original and may amend its result; ``replace``; ``around``: receives the original), the handler in
sglang-er and why. :func:`apply` registers a group through SGLang's ``HookRegistry`` once per
process and logs it, so a server's startup log lists every change in effect. An SGLang upgrade
checks this table first (``tests/test_hooks.py`` resolves every target against the installed SGLang).
"""

from __future__ import annotations

import logging
import pkgutil
from dataclasses import dataclass

logger = logging.getLogger("sglang_er")


@dataclass(frozen=True)
class Hook:
    target: str  # dotted path in SGLang
    kind: str  # "after" | "replace" | "around"
    handler: str  # "module:function" in sglang_er
    why: str
    group: str = "server"  # "server": every process; "cpu": only on the portable CPU platform


_SCHED = "sglang.srt.managers.scheduler_components."
_UPDATER = _SCHED + "weight_updater.SchedulerWeightUpdaterManager."
_TORCH_NATIVE = "sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend."
_OPS = "sglang_er.engine.cpu.ops:"

HOOKS: tuple[Hook, ...] = (
    *(
        Hook(_UPDATER + op, "after", "sglang_er.engine.weight_sync:after_update", why)
        for op, why in (
            ("update_weights_from_disk", "re-quantize the drafter from the weights just loaded"),
            ("end_weight_update", "re-quantize once per tensor/distributed/IPC update session, not per chunk"),
            ("resume_memory_occupation", "re-quantize from the weights restored after a release"),
        )
    ),
    Hook(
        _SCHED + "internal_state.SchedulerInternalStateController._add_speculative",
        "after",
        "sglang_er.engine.server_info:add_effrollout",
        "the worker's counters, settings and γ timeline in /get_server_info",
    ),
    Hook(
        "sglang.srt.managers.tokenizer_manager.TokenizerManager._calculate_spec_decoding_metrics",
        "after",
        "sglang_er.engine.spec_meta:after_metrics",
        "meta_info counts γ = 0 iterations as plain decoding and returns the request's γ timeline",
    ),
    Hook(
        "sglang.srt.mem_cache.memory_pool.MHATokenToKVPool._init_kv_copy_and_warmup",
        "replace",
        _OPS + "no_kv_copy_warmup",
        "the Triton KV-copy warm-up has no CPU driver; a chain drafter never moves KV",
        "cpu",
    ),
    Hook(
        "sglang.srt.mem_cache.allocation.assign_req_to_token_pool_func",
        "replace",
        _OPS + "assign_req_to_token_pool",
        "speculative decode allocation reaches a Triton kernel; torch indexing instead",
        "cpu",
    ),
    Hook(
        _TORCH_NATIVE + "_run_sdpa_forward_extend",
        "replace",
        _OPS + "sdpa_forward_extend",
        "a verify is an EXTEND of γ+1 rows: attend those rows only, not an L×L square",
        "cpu",
    ),
    Hook(
        _TORCH_NATIVE + "_run_sdpa_forward_decode",
        "replace",
        _OPS + "sdpa_forward_decode",
        "one padded SDPA per batch instead of one per request",
        "cpu",
    ),
    Hook(
        "sglang.srt.distributed.bootstrap._init_cpu_threads_env",
        "around",
        "sglang_er.engine.cpu.threads:bind_rank_threads",
        "SGLANG_CPU_OMP_THREADS_BIND pins a rank to its cores only on AMX / arm64 CPUs; pin it everywhere",
        "cpu",
    ),
    Hook(
        "sglang.srt.utils.common.get_device",
        "around",
        _OPS + "device_as_str",
        "an out-of-tree platform's device is a torch.device; SGLang splits it as a string",
        "cpu",
    ),
)

_registered: set[str] = set()


def target_of(handler: str) -> str:
    """The SGLang target a handler (``module:function``) is hooked on."""
    (hook,) = [h for h in HOOKS if h.handler == handler]
    return hook.target


def apply(group: str) -> list[Hook]:
    """Register ``group``'s hooks (once per process). The CPU group is applied at once: the
    platform needs it before SGLang builds its first pool; the server group is applied by
    SGLang's ``load_plugins`` after the plugin returns."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    todo = [h for h in HOOKS if h.group == group and h.target + h.handler not in _registered]
    if not todo:
        return []
    if group == "cpu":
        from sglang_er.engine.cpu import ops

        ops.keep_originals()  # SGLang's own attention for the paths the replacements leave to it
    kinds = {"after": HookType.AFTER, "replace": HookType.REPLACE, "around": HookType.AROUND}
    for h in todo:
        HookRegistry.register(h.target, pkgutil.resolve_name(h.handler), kinds[h.kind])
        _registered.add(h.target + h.handler)
        logger.info("sglang-er hook: %s %s -> %s (%s)", h.kind, h.target, h.handler.split(":")[1], h.why)
    if group == "cpu":
        HookRegistry.apply_hooks()
    return todo
