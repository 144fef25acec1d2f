"""Limits shared by the engine-side modules and the light ones (the γ cost model, the ``sglang-er``
parser), defined here once, stdlib only: :mod:`sglang_er.config` needs pydantic and
:mod:`sglang_er.quant.quantizer` needs torch, and neither may be a cost of importing :mod:`sglang_er.gamma`
or of starting the CLI.
"""

from __future__ import annotations

__all__ = ["MAX_GAMMA", "SUPPORTED_GROUP_SIZES", "largest_group_size"]

MAX_GAMMA = 16  # the longest draft chain the worker, the settings and the CLI accept
# 4-bit group sizes: the intersection of the CPU int4pack kernel's {32, 64, 128, 256} and Marlin's
# {32, 64, 128}, largest first (fewer scales, same kernels).
SUPPORTED_GROUP_SIZES = (128, 64, 32)


def largest_group_size(in_features: int, preferred: int) -> int | None:
    """The largest of :data:`SUPPORTED_GROUP_SIZES` not above ``preferred`` that divides
    ``in_features``; None when none does (the callers word the error)."""
    for g in SUPPORTED_GROUP_SIZES:
        if g <= preferred and in_features % g == 0:
            return g
    return None
