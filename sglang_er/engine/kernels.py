"""SGLang's kernels and runtime settings that product code outside the engine uses.

Each function imports lazily: the GPU kernels exist only in a CUDA build, and the runtime
settings only inside a running server.
"""

from __future__ import annotations

import functools


def marlin_importable() -> bool:
    """SGLang's AWQ-Marlin GEMM and repack ops import (a CUDA build)."""
    try:
        import sglang.kernels.ops.gemm.gptq_marlin  # noqa: F401
        import sglang.kernels.ops.quantization.awq_marlin_repack  # noqa: F401
    except Exception:  # pragma: no cover - depends on the CUDA build
        return False
    return True


@functools.cache
def marlin_gemm_and_uint4():  # pragma: no cover - CUDA only
    """``(gptq_marlin_gemm, scalar type uint4)``, resolved once: a per-call lookup would show in a
    one-token draft step."""
    from sglang.kernels.ops.gemm.gptq_marlin import gptq_marlin_gemm
    from sglang.srt.layers.quantization.utils import get_scalar_types

    return gptq_marlin_gemm, get_scalar_types()[1].uint4


def marlin_repack_ops():  # pragma: no cover - CUDA only
    """``(awq_marlin_repack, awq_to_marlin_zero_points, marlin_make_workspace, marlin_permute_scales)``."""
    from sglang.kernels.ops.quantization.awq_marlin_repack import awq_marlin_repack
    from sglang.srt.layers.quantization.marlin_utils import (
        awq_to_marlin_zero_points,
        marlin_make_workspace,
        marlin_permute_scales,
    )

    return awq_marlin_repack, awq_to_marlin_zero_points, marlin_make_workspace, marlin_permute_scales


def sampling_backend() -> str:
    """The running server's ``--sampling-backend``; "pytorch" outside a server."""
    try:
        from sglang.srt.runtime_context import get_exec

        return get_exec().kernel.sampling_backend or "pytorch"
    except Exception:
        return "pytorch"


def platform_summary() -> str:
    """The platform SGLang resolved here, e.g. ``PortableCpuPlatform (out-of-tree)``."""
    from sglang.srt.platforms import current_platform

    oot = " (out-of-tree)" if current_platform.is_out_of_tree() else ""
    return f"{type(current_platform).__name__}{oot}"


def serialize_named_tensors(named_tensors: list) -> str:
    """SGLang's wire form of ``[(name, tensor)]`` for ``/update_weights_from_tensor``."""
    from sglang.srt.utils import MultiprocessingSerializer

    return MultiprocessingSerializer.serialize(list(named_tensors), output_str=True)
