"""Portable CPU platform: SGLang on any CPU through its torch-native code paths.

SGLang 0.5.23's own CPU engine (``SGLANG_USE_CPU_ENGINE=1``) needs a source build of
sgl-kernel for Intel AMX. This out-of-tree platform derives from SGLang's CPU platform but
declares itself ``PlatformEnum.OOT``, which makes layers take their ``forward_native`` paths,
and picks backends that exist in plain torch (attention ``torch_native``, sampling
``pytorch``, no graph capture). The few Triton-only helpers still reached on that path are
replaced by torch versions in :mod:`sglang_er.engine.cpu.ops`.

Activation (entry point ``sglang.srt.platforms: portable_cpu``):
- ``SGLANG_PLATFORM=portable_cpu`` selects it explicitly, on any machine;
- otherwise it activates only when torch sees no CUDA/ROCm/XPU/NPU/MPS device and SGLang's
  own CPU engine was not asked for, so installing sglang-er on a GPU machine changes nothing.
"""

from __future__ import annotations

import os

PLATFORM_NAME = "portable_cpu"
# Imported only once SGLang resolves the platform: this module must not import SGLang, since
# SGLang imports it while its own platform package is still initialising.
PLATFORM_CLASS = "sglang_er.engine.cpu.portable.PortableCpuPlatform"
# Speculative algorithms verified on this platform (tests/test_worker_*.py).
SUPPORTED_SPECULATIVE_ALGORITHMS = frozenset({"EFFROLLOUT"})
# Backends that run without Triton or sgl-kernel. "intel_amx" is SGLang's x86 CPU default and
# needs the AMX build of sgl-kernel, so it is replaced rather than honoured.
TORCH_ATTENTION_BACKENDS = frozenset({"torch_native"})


def accelerator_present() -> str | None:
    """Name of an accelerator torch can see, or None."""
    import torch

    if torch.cuda.is_available():
        return "rocm" if torch.version.hip else "cuda"
    for name in ("xpu", "npu", "mps"):
        mod = getattr(torch, name, None)
        try:
            if mod is not None and mod.is_available():
                return name
        except Exception:  # a half-installed backend must not stop platform discovery
            continue
    return None


def activate() -> str | None:
    """Entry point for ``sglang.srt.platforms``: the platform class path, or None to stay out."""
    if os.environ.get("SGLANG_PLATFORM") == PLATFORM_NAME:
        return PLATFORM_CLASS
    if os.environ.get("SGLANG_PLATFORM") or os.environ.get("SGLANG_USE_CPU_ENGINE") == "1":
        return None
    return None if accelerator_present() else PLATFORM_CLASS
