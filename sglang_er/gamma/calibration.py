"""Calibration: timed forwards as samples, and the exact fit of a hardware profile to them.

A :class:`CalibrationSample` is one timed forward (or several identical ones timed together) with
the bytes it moved and the flops it computed. :func:`fit_profile` estimates BW, F and the
overheads of a :class:`~sglang_er.gamma.hardware_profile.HardwareProfile` from clean samples
(phase, bytes, flops, batch, seconds) by non-negative least squares on the roofline form
(:func:`sglang_er.gamma.roofline.roofline_seconds`); ``sglang-er calibrate`` uses the bounded,
validated fit of :mod:`sglang_er.gamma.robust_fit`.

This module does not import SGLang (nor torch).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sglang_er.gamma.builtin_profiles import BUILTIN_PROFILES
from sglang_er.gamma.hardware_profile import ComputeClass, HardwareProfile
from sglang_er.gamma.roofline import FIXED_FIELD, PER_SEQ_FIELD, Phase, compute_seconds, phase_seconds, roofline_seconds

__all__ = ["CalibrationSample", "SampleLike", "as_sample", "fit_profile", "fitted_profile", "sample_seconds"]


class CalibrationSample(BaseModel):
    """One timed forward (or ``forwards`` identical ones timed together).

    bytes: total bytes moved (weights + KV + logits) over all ``forwards``;
    flops: total flop per compute class (a bare number means ``bf16``);
    batch: requests per forward; seconds: measured wall time of all ``forwards``.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    phase: Phase = "plain"
    bytes: float = Field(ge=0.0)
    flops: dict[ComputeClass, float]
    batch: int = Field(ge=1)
    seconds: float = Field(gt=0.0)
    forwards: int = Field(1, ge=1)

    @field_validator("flops", mode="before")
    @classmethod
    def _scalar_flops(cls, v):
        if isinstance(v, (int, float)):
            return {"bf16": float(v)}
        return v

    @field_validator("flops")
    @classmethod
    def _nonneg(cls, v):
        if any(f < 0 for f in v.values()):
            raise ValueError("flops must be non-negative")
        return v


SampleLike = CalibrationSample | dict | Sequence


def as_sample(s: SampleLike) -> CalibrationSample:
    """A sample from any of its accepted forms (see :func:`fit_profile`)."""
    if isinstance(s, CalibrationSample):
        return s
    if isinstance(s, dict):
        return CalibrationSample.model_validate(s)
    s = tuple(s)
    if len(s) == 4:  # (bytes, flops, batch, seconds): a plain decode forward
        return CalibrationSample(bytes=s[0], flops=s[1], batch=s[2], seconds=s[3])
    if len(s) == 5:  # (phase, bytes, flops, batch, seconds)
        return CalibrationSample(phase=s[0], bytes=s[1], flops=s[2], batch=s[3], seconds=s[4])
    raise ValueError(
        f"a calibration sample is (bytes, flops, batch, seconds) or "
        f"(phase, bytes, flops, batch, seconds), got {len(s)} values"
    )


def _nnls(A: np.ndarray, b: np.ndarray, max_iter: int = 200) -> np.ndarray:
    """Lawson–Hanson non-negative least squares: argmin_x≥0 ‖Ax − b‖₂. A [m, n], b [m]."""
    m, n = A.shape
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    tol = 1e-12 * max(1.0, float(np.abs(A).max(initial=0.0))) * max(m, n)
    for _ in range(max_iter):
        w = A.T @ (b - A @ x)
        cand = (~passive) & (w > tol)
        if not cand.any():
            break
        passive[np.argmax(np.where(cand, w, -np.inf))] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(A[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            neg = passive & (z <= 0)
            alpha = np.min(x[neg] / np.maximum(x[neg] - z[neg], 1e-300))
            x = x + alpha * (z - x)
            passive &= x > tol
            x[~passive] = 0.0
    return x


def sample_seconds(profile: HardwareProfile, s: CalibrationSample) -> float:
    """:func:`fit_profile`'s model of one sample under ``profile``."""
    return phase_seconds(profile, s.phase, s.bytes, compute_seconds(profile, s.flops), s.batch, s.forwards)


def fit_profile(
    samples: Iterable[SampleLike],
    *,
    base: HardwareProfile | None = None,
    name: str = "calibrated",
    device: str | None = None,
    measured_with: str = "fit_profile",
    attention_backend: str | None = None,
) -> HardwareProfile:
    """Fit BW, F (per compute class) and the overheads to measured samples.

    Model per sample i (n_i forwards of batch B_i)::

        seconds_i = max(bytes_i / BW, Σ_k flops_ik / F_k) + n_i·B_i·per_seq(phase) + n_i·fixed(phase)

    Every unknown enters as a non-negative coefficient (1/BW, 1/F_k, overheads), so for a
    fixed memory/compute classification of the samples the fit is linear NNLS. The roofline
    classification is a threshold on arithmetic intensity (flop/byte vs the ridge F/BW), so we
    try every intensity threshold (≤ 64 quantiles), refine each by re-classifying with the
    fitted ridge, and keep the fit with the lowest error of the true max() model. Rows are
    weighted by 1/seconds: relative errors, so a 1 ms forward counts as much as a 1 s one.

    Parameters the samples cannot determine (a compute class never compute-bound, a phase
    never measured) keep ``base``'s value (default: the ``cpu-2core`` built-in); the result's
    ``fitted`` lists those that were determined, ``fit_rel_rms`` the relative RMS error.
    Raises ValueError for fewer than 2 samples or an implausible result.
    """
    ss = [as_sample(s) for s in samples]
    if len(ss) < 2:
        raise ValueError(f"fit_profile needs at least 2 samples, got {len(ss)}")
    base = base or BUILTIN_PROFILES["cpu-2core"]
    classes = sorted({k for s in ss for k, f in s.flops.items() if f > 0})
    cols = [
        "inv_bw",
        *[f"inv_f:{k}" for k in classes],
        "per_seq_s",
        "per_seq_draft_s",
        "fixed_plain_s",
        "fixed_draft_step_s",
        "fixed_verify_s",
    ]
    ci = {c: i for i, c in enumerate(cols)}
    m, n = len(ss), len(cols)

    t = np.array([s.seconds for s in ss])
    wgt = 1.0 / t
    byt = np.array([s.bytes for s in ss])
    flo = np.zeros((m, len(classes)))
    over = np.zeros((m, n))  # overhead columns, independent of the classification
    for i, s in enumerate(ss):
        for j, k in enumerate(classes):
            flo[i, j] = s.flops.get(k, 0.0)
        over[i, ci[PER_SEQ_FIELD[s.phase]]] = s.forwards * s.batch
        over[i, ci[FIXED_FIELD[s.phase]]] = s.forwards
    seq_col = np.array([ci[PER_SEQ_FIELD[s.phase]] for s in ss])
    fixed_col = np.array([ci[FIXED_FIELD[s.phase]] for s in ss])
    batch = np.array([float(s.batch) for s in ss])
    fwd = np.array([float(s.forwards) for s in ss])
    intensity = flo.sum(1) / np.maximum(byt, 1e-30)

    def solve(mem: np.ndarray) -> np.ndarray:
        A = over.copy()
        A[:, 0] = np.where(mem, byt, 0.0)
        A[:, 1 : 1 + len(classes)] = np.where(mem[:, None], 0.0, flo)
        A *= wgt[:, None]
        scale = np.linalg.norm(A, axis=0)
        scale[scale == 0] = 1.0  # an empty column stays 0: unidentified
        return _nnls(A / scale, t * wgt) / scale

    def predict(x: np.ndarray) -> np.ndarray:
        return roofline_seconds(
            byt * x[0], flo @ x[1 : 1 + len(classes)], x[seq_col], batch, x[fixed_col], fwd, maximum=np.maximum
        )

    def classify(x: np.ndarray) -> np.ndarray:
        return byt * x[0] >= flo @ x[1 : 1 + len(classes)]

    thresholds = np.unique(intensity)
    if len(thresholds) > 64:
        thresholds = np.quantile(intensity, np.linspace(0, 1, 64))
    best_x, best_err = None, math.inf
    for thr in [-math.inf, *thresholds.tolist()]:
        mem = intensity <= thr  # at or below the threshold: memory-bound (-inf: all compute-bound)
        for _ in range(20):
            x = solve(mem)
            new = classify(x)
            if (new == mem).all():
                break
            mem = new
        err = float(np.sqrt(np.mean(((predict(x) - t) / t) ** 2)))
        if err < best_err - 1e-15:
            best_x, best_err = x, err
    x = best_x
    used = np.zeros(n, dtype=bool)
    mem = classify(x)
    used[0] = bool((mem & (byt > 0)).any())
    for j in range(len(classes)):
        used[1 + j] = bool(((~mem) & (flo[:, j] > 0)).any())
    used[1 + len(classes) :] = (over != 0).any(0)[1 + len(classes) :]

    fitted: list[str] = []
    fields = base.model_dump()
    if used[0] and x[0] > 0:
        fields["bandwidth_bytes_per_s"] = 1.0 / x[0]
        fitted.append("bandwidth_bytes_per_s")
    flops = dict(base.flops_per_s)
    for j, k in enumerate(classes):
        if used[1 + j] and x[1 + j] > 0:
            flops[k] = float(1.0 / x[1 + j])
            fitted.append(f"flops_per_s.{k}")
    fields["flops_per_s"] = flops
    for c in cols[1 + len(classes) :]:
        if used[ci[c]]:
            fields[c] = float(x[ci[c]])
            fitted.append(c)
    fields.update(
        name=name, device=device or base.device, measured_with=measured_with, fit_rel_rms=best_err, fitted=fitted
    )
    if attention_backend is not None:
        fields["attention_backend"] = attention_backend
    return fitted_profile(fields, "fit_profile")


def fitted_profile(fields: dict, fit: str) -> HardwareProfile:
    """A fit's parameters as a checked profile; out-of-range ones mean the samples do not follow the
    roofline form, which is what the error says."""
    try:
        return HardwareProfile.model_validate(fields)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ValueError(
            f"{fit} produced an implausible profile ({problems}); the samples do not follow the roofline form"
        ) from None
