"""The roofline formula: the predicted seconds of a forward, written once.

A phase's predicted time is ``max(bytes / BW, Σ_class flops_class / F_class) + per_seq · B +
fixed``, where BW and F_class are a :class:`~sglang_er.gamma.hardware_profile.HardwareProfile`'s
bandwidth and compute rates and the overheads are the phase's. The cost model's predictions
(:class:`sglang_er.gamma.cost_model.CostModel`; its per-iteration hot path inlines it, kept equal
by a test), :func:`sglang_er.gamma.calibration.fit_profile`, the bounded fit of
:mod:`sglang_er.gamma.robust_fit` and the ``sglang-er calibrate`` residuals all call
:func:`roofline_seconds`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import numpy as np

    from sglang_er.gamma.hardware_profile import HardwareProfile

    Num = float | np.ndarray

__all__ = ["FIXED_FIELD", "PER_SEQ_FIELD", "PHASES", "Phase", "compute_seconds", "phase_seconds", "roofline_seconds"]

# The three forwards of a decode iteration: plain and verify are SGLang forwards of the target,
# draft is one lean drafter step.
Phase = Literal["plain", "draft", "verify"]
PHASES = ("plain", "draft", "verify")
# The profile field holding each phase's per-forward and per-request overhead.
FIXED_FIELD = {"plain": "fixed_plain_s", "draft": "fixed_draft_step_s", "verify": "fixed_verify_s"}
PER_SEQ_FIELD = {"plain": "per_seq_s", "draft": "per_seq_draft_s", "verify": "per_seq_s"}


def roofline_seconds(
    mem_s: Num,
    compute_s: Num,
    per_seq_s: Num,
    batch: Num,
    fixed_s: Num,
    forwards: Num = 1,
    *,
    maximum: Callable[[Num, Num], Num] = max,
) -> Num:
    """Seconds of ``forwards`` identical forwards of ``batch`` requests: max(bytes/BW, Σ_k flops_k/F_k)
    + forwards·(per_seq·B + fixed), given ``mem_s`` = bytes/BW and ``compute_s`` = Σ_k flops_k/F_k
    over all of them. ``maximum=np.maximum`` evaluates it for arrays (fit_profile: every sample at
    once, for a trial parameter vector that need not be a valid profile)."""
    return maximum(mem_s, compute_s) + per_seq_s * batch * forwards + fixed_s * forwards


def compute_seconds(profile: HardwareProfile, flops: Mapping[str, float]) -> float:
    """Σ_k flops_k / F_k over compute classes (a class the profile lacks runs at its bf16 rate)."""
    return sum(f / profile.flops(k) for k, f in flops.items())


def phase_seconds(
    profile: HardwareProfile, phase: str, bytes_: float, compute_s: float, batch: int, forwards: int = 1
) -> float:
    """:func:`roofline_seconds` with ``profile``'s bandwidth and ``phase``'s overheads;
    ``forwards=0``: the roofline term alone."""
    return roofline_seconds(
        bytes_ / profile.bandwidth_bytes_per_s,
        compute_s,
        getattr(profile, PER_SEQ_FIELD[phase]),
        batch,
        getattr(profile, FIXED_FIELD[phase]),
        forwards,
    )
