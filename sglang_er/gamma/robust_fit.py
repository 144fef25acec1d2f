"""A bounded, multi-start fit of a hardware profile that no single component can hijack.

:func:`sglang_er.gamma.calibration.fit_profile` solves the roofline form exactly for clean
samples, but on a real sweep one term can absorb another's time: with the weight-read time a
constant per phase, the fixed overheads can take it over and the bandwidth runs off to 50 TB/s;
a rate the sweep never exercises (W4 compute on a memory-bound GPU) keeps whatever value it had.
:func:`fit_bounded` avoids both:

1. every rate stays inside what real devices reach (:data:`BANDWIDTH_BOUNDS`, :data:`FLOPS_BOUNDS`),
   every overhead is >= 0;
2. the rates are fitted from many starting points, with the overheads solved exactly (non-negative
   least squares) for each trial of the rates, then all parameters are refined together under a
   robust (soft-L1) loss; samples more than 3 scaled MADs off are dropped and the fit repeated;
3. each rate is then scanned across its bounds (the overheads re-solved at each value): a rate whose
   whole range of acceptable values spans more than :data:`IDENT_SPAN`x, or reaches a bound, is not
   determined by the sweep. It is *held* at the base profile's value, moved into that acceptable
   range, and reported with the reason, instead of silently keeping an arbitrary number.

Predictions use :func:`sglang_er.gamma.roofline.roofline_seconds`, the one roofline formula.
No SGLang, no torch: numpy and scipy only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import least_squares, nnls

from sglang_er.gamma.calibration import CalibrationSample, SampleLike, as_sample, fitted_profile
from sglang_er.gamma.hardware_profile import HardwareProfile
from sglang_er.gamma.roofline import FIXED_FIELD, PER_SEQ_FIELD, roofline_seconds

__all__ = ["BANDWIDTH_BOUNDS", "FLOPS_BOUNDS", "IDENT_SPAN", "RobustFit", "fit_bounded"]

# What real devices reach: 10 GB/s (a small CPU's effective stream) .. 10 TB/s (above any HBM stack
# shipping); compute from a laptop core to a next-generation accelerator's dense rate.
BANDWIDTH_BOUNDS = (1e10, 1e13)
FLOPS_BOUNDS = {"bf16": (1e10, 5e15), "fp16": (1e10, 5e15), "fp32": (1e9, 2e15), "w4": (1e10, 5e15)}
OVERHEAD_MAX_S = {"fixed": 0.5, "per_seq": 0.05}
ROBUST_SCALE = 0.02  # soft-L1: relative residuals beyond ~2% count linearly, not squared
IDENT_SPAN = 4.0  # a rate whose acceptable values span more than this factor is not determined
# A value of a rate is acceptable when the fit's sum of squares grows by less than what noise
# explains (a chi-square of IDENT_CHI2 for one parameter), or its RMS by less than IDENT_FLOOR
# (noise-free sweeps).
IDENT_CHI2 = 4.0
IDENT_FLOOR = 0.002
MAX_DROP = 0.2  # more samples off the fit than this are not glitches but a sweep off the model: keep them
_OVERHEADS = ("per_seq_s", "per_seq_draft_s", "fixed_plain_s", "fixed_draft_step_s", "fixed_verify_s")
_SCAN_POINTS = 49
_RIDGES = (5.0, 50.0, 300.0)  # starting F/BW (flop/byte): CPU-like, mid-range, datacenter GPU


@dataclass
class RobustFit:
    """The fitted profile, how many samples were dropped as outliers, and the parameters held
    (name -> why, with the value)."""

    profile: HardwareProfile
    dropped: int = 0
    held: dict[str, str] = field(default_factory=dict)


class _Problem:
    """The samples as arrays, and the roofline model of them for a parameter vector.

    Rates are log10 values ``[BW, F_k for k in classes]``; overheads are seconds in
    :data:`_OVERHEADS` order. ``free_rates``/``free_over`` mark what the optimizer moves."""

    def __init__(self, ss: list[CalibrationSample], base: HardwareProfile):
        self.ss = ss
        self.classes = sorted({k for s in ss for k, f in s.flops.items() if f > 0})
        self.t = np.array([s.seconds for s in ss])
        self.byt = np.array([s.bytes for s in ss])
        self.flo = np.array([[s.flops.get(k, 0.0) for k in self.classes] for s in ss]).reshape(len(ss), -1)
        self.batch = np.array([float(s.batch) for s in ss])
        self.fwd = np.array([float(s.forwards) for s in ss])
        self.seq_col = np.array([_OVERHEADS.index(PER_SEQ_FIELD[s.phase]) for s in ss])
        self.fixed_col = np.array([_OVERHEADS.index(FIXED_FIELD[s.phase]) for s in ss])
        self.over = np.zeros((len(ss), len(_OVERHEADS)))
        self.over[np.arange(len(ss)), self.seq_col] = self.fwd * self.batch
        self.over[np.arange(len(ss)), self.fixed_col] = self.fwd
        self.rate_names = ["bandwidth_bytes_per_s", *[f"flops_per_s.{k}" for k in self.classes]]
        self.bounds = np.log10([BANDWIDTH_BOUNDS, *[FLOPS_BOUNDS[k] for k in self.classes]])
        self.base_rates = np.log10([base.bandwidth_bytes_per_s, *[base.flops(k) for k in self.classes]])
        self.base_over = np.array([getattr(base, c) for c in _OVERHEADS])
        kinds = ["per_seq" if c.startswith("per_seq") else "fixed" for c in _OVERHEADS]
        self.over_max = np.array([OVERHEAD_MAX_S[k] for k in kinds])
        self.free_rates = np.array([self.byt.any(), *self.flo.any(0)], dtype=bool)
        self.free_over = np.array([self._identifies(j) for j in range(len(_OVERHEADS))])

    def _identifies(self, j: int) -> bool:
        """An overhead is determined when its phase was measured; a per-request one also needs two
        batch sizes (with one, it is indistinguishable from the fixed part)."""
        used = self.over[:, j] != 0
        if not used.any():
            return False
        return not _OVERHEADS[j].startswith("per_seq") or len(np.unique(self.batch[used])) >= 2

    def roof(self, rates: np.ndarray) -> np.ndarray:
        """max(bytes / BW, Σ flops_k / F_k) of every sample: the roofline term alone."""
        comp = self.flo @ (10.0 ** -rates[1:]) if self.classes else np.zeros_like(self.t)
        return roofline_seconds(self.byt * 10.0 ** -rates[0], comp, 0.0, self.batch, 0.0, self.fwd, maximum=np.maximum)

    def predict(self, rates: np.ndarray, over: np.ndarray) -> np.ndarray:
        comp = self.flo @ (10.0 ** -rates[1:]) if self.classes else np.zeros_like(self.t)
        return roofline_seconds(
            self.byt * 10.0 ** -rates[0],
            comp,
            over[self.seq_col],
            self.batch,
            over[self.fixed_col],
            self.fwd,
            maximum=np.maximum,
        )

    def project(self, rates: np.ndarray, keep: np.ndarray) -> np.ndarray:
        """The non-negative overheads that best explain what the roofline leaves of each sample
        (relative least squares); held overheads keep the base value."""
        held = ~self.free_over
        rest = self.t - self.roof(rates) - self.over[:, held] @ self.base_over[held]
        w = 1.0 / self.t[keep]
        A = self.over[keep][:, self.free_over] * w[:, None]
        scale = np.linalg.norm(A, axis=0)
        scale[scale == 0] = 1.0
        x = nnls(A / scale, rest[keep] * w, maxiter=50 * A.shape[1])[0] / scale
        out = self.base_over.copy()
        out[self.free_over] = np.minimum(x, self.over_max[self.free_over])
        return out

    def rel(self, rates: np.ndarray, over: np.ndarray, keep: np.ndarray) -> np.ndarray:
        return (self.predict(rates, over)[keep] - self.t[keep]) / self.t[keep]

    def rms(self, rates: np.ndarray, keep: np.ndarray) -> float:
        return float(np.sqrt(np.mean(self.rel(rates, self.project(rates, keep), keep) ** 2)))


# ---------------------------------------------------------------------- stages
def _fit_rates(pb: _Problem, keep: np.ndarray, free: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Stage 1: the free rates from several starting points, overheads solved for each trial."""
    if not free.any():
        return start.copy()
    lo, hi = pb.bounds[free, 0], pb.bounds[free, 1]

    def resid(z: np.ndarray) -> np.ndarray:
        r = start.copy()
        r[free] = z
        return pb.rel(r, pb.project(r, keep), keep)

    starts = []
    for bw in np.linspace(pb.bounds[0, 0] + 0.5, pb.bounds[0, 1] - 0.5, 5):
        for ridge in _RIDGES:
            r = start.copy()
            r[0] = bw if free[0] else r[0]
            r[1:] = np.where(free[1:], r[0] + math.log10(ridge), r[1:])
            starts.append(np.clip(r[free], lo + 1e-6, hi - 1e-6))
    starts.append(np.clip(start[free], lo + 1e-6, hi - 1e-6))
    best = None
    for z0 in starts:
        sol = least_squares(resid, z0, bounds=(lo, hi), loss="soft_l1", f_scale=ROBUST_SCALE, diff_step=1e-4)
        if best is None or sol.cost < best.cost:
            best = sol
    out = start.copy()
    out[free] = best.x
    return out


def _refine(pb: _Problem, keep: np.ndarray, free: np.ndarray, rates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stage 2: rates and overheads together under the robust loss, from stage 1's solution."""
    over = pb.project(rates, keep)
    fo = pb.free_over
    nr = int(free.sum())
    x0 = np.concatenate([rates[free], over[fo] * 1e3])  # overheads in ms: comparable scales
    lo = np.concatenate([pb.bounds[free, 0], np.zeros(fo.sum())])
    hi = np.concatenate([pb.bounds[free, 1], pb.over_max[fo] * 1e3])
    x0 = np.clip(x0, lo, hi)

    def unpack(x):
        r, o = rates.copy(), over.copy()
        r[free], o[fo] = x[:nr], x[nr:] / 1e3
        return r, o

    sol = least_squares(
        lambda x: pb.rel(*unpack(x), keep), x0, bounds=(lo, hi), loss="soft_l1", f_scale=ROBUST_SCALE, x_scale="jac"
    )
    return unpack(sol.x)


def _acceptable_range(pb: _Problem, keep: np.ndarray, rates: np.ndarray, j: int) -> tuple[float, float, bool]:
    """Stage 3: the log10 values of rate ``j`` that fit about as well as the best (the others fixed,
    overheads re-solved), edges refined by bisection. Returns (lo, hi, determined)."""
    dof = max(int(keep.sum()) - len(pb.rate_names) - int(pb.free_over.sum()), 1)

    def ms(v: float) -> float:
        r = rates.copy()
        r[j] = v
        return pb.rms(r, keep) ** 2

    grid = np.unique(np.append(np.linspace(*pb.bounds[j], _SCAN_POINTS), rates[j]))
    vals = [ms(v) for v in grid]
    limit = min(vals) * (1 + IDENT_CHI2 / dof) + IDENT_FLOOR**2
    i = int(np.searchsorted(grid, rates[j]))
    a = b = i
    while a > 0 and vals[a - 1] <= limit:
        a -= 1
    while b < len(grid) - 1 and vals[b + 1] <= limit:
        b += 1
    lo = grid[a] if a == 0 else _edge(ms, limit, grid[a], grid[a - 1])
    hi = grid[b] if b == len(grid) - 1 else _edge(ms, limit, grid[b], grid[b + 1])
    determined = a > 0 and b < len(grid) - 1 and hi - lo <= math.log10(IDENT_SPAN)
    return float(lo), float(hi), determined


def _edge(ms, limit: float, inside: float, outside: float, steps: int = 8) -> float:
    """The acceptable value nearest where ``ms`` crosses ``limit`` between two grid points."""
    for _ in range(steps):
        mid = 0.5 * (inside + outside)
        inside, outside = (mid, outside) if ms(mid) <= limit else (inside, mid)
    return inside


def _held_value(pb: _Problem, j: int, lo: float, hi: float) -> tuple[float, str]:
    """The value an undetermined rate is held at, and why. A range open upwards only says the rate
    is at least ``lo`` (the term binds only when slower): hold it there, the rate that keeps the
    sweep's heaviest rows right, rather than a faster base value that would make them too cheap.
    Otherwise the base profile's value, moved into the range."""
    if hi >= pb.bounds[j, 1] - 1e-9 and lo > pb.bounds[j, 0] + 1e-9:
        return lo, "the slowest rate the sweep allows; it only shows the rate is at least this"
    value = float(np.clip(pb.base_rates[j], lo, hi))
    return value, "the base profile's value" if value == pb.base_rates[j] else "the acceptable value nearest the base's"


def _outliers(res: np.ndarray, mad_k: float, min_rel: float) -> np.ndarray:
    med = float(np.median(res))
    mad = 1.4826 * float(np.median(np.abs(res - med)))
    return np.abs(res - med) > max(mad_k * mad, min_rel)


def _fit_all(pb: _Problem, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """Stages 1-3 on the kept samples, then the final fit with undetermined rates held."""
    free = pb.free_rates.copy()
    rates = _fit_rates(pb, keep, free, pb.base_rates.copy())
    rates, _ = _refine(pb, keep, free, rates)
    held: dict[str, str] = {}
    for j in np.flatnonzero(pb.free_rates):
        lo, hi, determined = _acceptable_range(pb, keep, rates, j)
        if determined:
            continue
        value, how = _held_value(pb, j, lo, hi)
        held[pb.rate_names[j]] = (
            f"held at {_fmt_rate(j, value)} ({how}): any value from {_fmt_rate(j, lo)} to "
            f"{_fmt_rate(j, hi)} fits the sweep equally well"
        )
        rates[j], free[j] = value, False
    if held:
        rates = _fit_rates(pb, keep, free, rates)
    rates, over = _refine(pb, keep, free, rates)
    return rates, over, held


def _fmt_rate(j: int, log_value: float) -> str:
    v = 10.0**log_value
    return f"{v / 1e9:.3g} GB/s" if j == 0 else f"{v / 1e12:.3g} TFLOP/s"


def fit_bounded(
    samples: Iterable[SampleLike],
    *,
    base: HardwareProfile,
    name: str = "calibrated",
    device: str | None = None,
    measured_with: str = "fit_bounded",
    attention_backend: str | None = None,
    mad_k: float = 3.0,
    min_rel: float = 0.02,
) -> RobustFit:
    """Fit a profile to ``samples`` (see the module docstring). Parameters the samples cannot
    determine come from ``base`` (overheads of an unmeasured phase; rates: moved into the range
    the sweep allows). Raises ValueError for fewer than 2 samples or an implausible profile."""
    ss = [as_sample(s) for s in samples]
    if len(ss) < 2:
        raise ValueError(f"fitting a profile needs at least 2 samples, got {len(ss)}")
    pb = _Problem(ss, base)
    keep = np.ones(len(ss), dtype=bool)
    # Outliers first, from a fit of every rate: judging what the sweep determines is only
    # meaningful once a glitch no longer dominates the error.
    rates, over = _refine(pb, keep, pb.free_rates, _fit_rates(pb, keep, pb.free_rates, pb.base_rates.copy()))
    out = _outliers(pb.rel(rates, over, keep), mad_k, min_rel)
    dropped = 0
    phases_kept = {s.phase for s, o in zip(ss, out) if not o} == {s.phase for s in ss}
    if out.any() and out.sum() <= MAX_DROP * len(ss) and phases_kept:
        keep = ~out
        dropped = int(out.sum())
    rates, over, held = _fit_all(pb, keep)
    rel_rms = float(np.sqrt(np.mean(pb.rel(rates, over, np.ones(len(ss), dtype=bool)) ** 2)))
    profile = _profile(pb, base, rates, over, held, name, device, measured_with, attention_backend, rel_rms)
    return RobustFit(profile, dropped, held)


def _profile(pb, base, rates, over, held, name, device, measured_with, backend, rel_rms) -> HardwareProfile:
    fields = base.model_dump()
    fitted = [n for j, n in enumerate(pb.rate_names) if pb.free_rates[j] and n not in held]
    fitted += [c for j, c in enumerate(_OVERHEADS) if pb.free_over[j]]
    fields["bandwidth_bytes_per_s"] = float(10.0 ** rates[0])
    fields["flops_per_s"] = {**base.flops_per_s, **{k: float(10.0 ** rates[1 + i]) for i, k in enumerate(pb.classes)}}
    fields.update({c: float(over[j]) if over[j] > 1e-12 else 0.0 for j, c in enumerate(_OVERHEADS)})
    fields.update(
        name=name,
        device=device or base.device,
        measured_with=measured_with,
        fit_rel_rms=rel_rms,
        fitted=fitted,
        held=list(held),
        fit_holdout_mape=None,
        forced=False,
    )
    if backend is not None:
        fields["attention_backend"] = backend
    return fitted_profile(fields, "the fit")
