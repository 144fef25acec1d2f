"""What live measurements teach the cost model: per-phase correction, the draft's setup, outside time.

The roofline prior (:mod:`sglang_er.gamma.cost_model`) is only as good as its profile; overheads and
the KV traffic of real kernels differ from any profile. :class:`Correction` maps the prior's raw
prediction of each phase to the seconds measured on this machine, learns κ (the first draft
step's extra cost, in steps) and the scheduler's time around the forwards, and keeps the errors
of the predictions in force for the server's state.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from sglang_er.gamma.roofline import PHASES

__all__ = ["DRAFT_SETUP_MAX", "DRAFT_SETUP_PRIOR", "MULT_RANGE", "Correction", "LineFit", "Observation"]

# The drafter's first step of an iteration also gathers every layer's committed KV, which the
# later steps reuse: a draft of γ steps costs about (γ + κ) steps. κ is measured from iterations
# with γ ≥ 2 (first step against the rest); gsm8k-lm on this CPU showed κ = 0.4-1.0 across
# B = 1-32. DRAFT_SETUP_PRIOR is κ before any measurement; DRAFT_SETUP_MAX bounds one outlier.
DRAFT_SETUP_PRIOR = 0.5
DRAFT_SETUP_MAX = 4.0
# A corrected prediction stays within this factor range of the raw one, and so does one
# observation's ratio, so one outlier (a GC pause) cannot wreck the model.
MULT_RANGE = (0.2, 5.0)


@dataclass(slots=True)  # not frozen: built on every measured phase, and frozen init costs 2x
class Observation:
    """Result of :meth:`CostModel.observe` (seconds, and relative errors |pred − meas| / meas)."""

    phase: str
    measured_s: float
    predicted_raw_s: float  # profile only
    predicted_s: float  # with the multiplier in force before this observation
    rel_err_raw: float
    rel_err: float
    bw_util: float  # predicted bytes / measured seconds / BW
    multiplier: float  # after the update


class LineFit:
    """y ≈ a + b·x by least squares with exponential forgetting (factor ``decay`` per point),
    b ≥ 0; ``intercept="nonneg"`` also keeps a ≥ 0 (a line through the origin otherwise). O(1)
    per point."""

    __slots__ = ("_coef", "_spread", "decay", "n", "nonneg", "s1", "sx", "sxx", "sxy", "sy")

    def __init__(self, decay: float = 0.97, intercept: str = "nonneg") -> None:
        self.decay = decay
        self.nonneg = intercept == "nonneg"
        self.s1 = self.sx = self.sxx = self.sy = self.sxy = 0.0
        self.n = 0
        self._coef = self._spread = None  # cached between points: predictions run per candidate γ

    def add(self, x: float, y: float) -> None:
        d = self.decay
        self.s1, self.sx, self.sxx = d * self.s1 + 1.0, d * self.sx + x, d * self.sxx + x * x
        self.sy, self.sxy = d * self.sy + y, d * self.sxy + x * y
        self.n += 1
        self._coef = self._spread = None

    def spread(self) -> float:
        """Coefficient of variation of the (weighted) x seen: how well b is determined."""
        if self._spread is None:
            mx = self.sx / self.s1 if self.s1 else 0.0
            var = max(0.0, self.sxx / self.s1 - mx * mx) if self.s1 else 0.0
            self._spread = math.sqrt(var) / abs(mx) if mx else 0.0
        return self._spread

    def coef(self) -> tuple[float, float]:
        if self._coef is None:
            self._coef = self._solve()
        return self._coef

    def _solve(self) -> tuple[float, float]:
        mx, my = self.sx / self.s1, self.sy / self.s1
        var = self.sxx / self.s1 - mx * mx
        b = max(0.0, (self.sxy / self.s1 - mx * my) / var) if var > 1e-9 * max(1.0, mx * mx) else 0.0
        a = my - b * mx
        if self.nonneg and a < 0.0:  # a line through the origin instead
            a, b = 0.0, (self.sxy / self.sxx if self.sxx > 0 else 0.0)
        return a, max(0.0, b)

    def predict(self, x: float) -> float:
        a, b = self.coef()
        return a + b * x


class Correction:
    """Measured seconds from the cost model's raw (profile) predictions, learnt live.

    Per phase, ``multiplier`` starts at 1 and follows measurements (:meth:`observe`): the first
    measurement sets it, then an EMA of log(measured / raw prediction) with weight ``ema``,
    per-observation ratio and multiplier clamped to :data:`MULT_RANGE`. Once a phase has been
    measured over a spread of raw predictions, the correction becomes affine, a + b·raw (see
    :meth:`correct`), still clamped to :data:`MULT_RANGE` × raw. ``draft_setup`` is κ
    (:meth:`observe_draft_setup`); the scheduler's time around the forwards is learnt separately
    (:meth:`observe_outside`).

    The first ``warmup`` phase / ``outside_warmup`` outside-time measurements of the process are
    reported but not learnt from. Off in the server: its first phase measurements must replace a
    profile that may be far off, and the one-time work found inside an iteration (the drafter's
    AWQ switch) is kept out of the clock instead.
    """

    def __init__(self, *, ema: float = 0.2, window: int = 256, warmup: int = 0, outside_warmup: int = 0) -> None:
        if not 0.0 < ema <= 1.0:
            raise ValueError(f"ema must be in (0, 1], got {ema}")
        self.ema = float(ema)
        self.multiplier = {p: 1.0 for p in PHASES}
        self.draft_setup = DRAFT_SETUP_PRIOR  # κ: see DRAFT_SETUP_PRIOR
        self._hist = {p: deque(maxlen=window) for p in PHASES}
        self._count = {p: 0 for p in PHASES}
        self._warmup = {p: int(warmup) for p in PHASES}
        self._warmup_outside = {"plain": int(outside_warmup), "spec": int(outside_warmup)}
        self._outside = {"plain": LineFit(), "spec": LineFit()}  # scheduler time around the forwards
        self._fit = {p: LineFit(intercept="any") for p in PHASES}  # measured vs raw prediction

    # ------------------------------------------------------------------ the correction
    def coefficients(self, phase: str) -> tuple[float | None, float]:
        """(a, b) of the affine correction measured ≈ a + b·raw once ``phase`` has been measured
        over a spread of raw predictions; before that (None, the smoothed multiplier)."""
        fit = self._fit[phase]
        return fit.coef() if fit.n >= 3 and fit.spread() >= 0.25 else (None, self.multiplier[phase])

    def correct(self, phase: str, raw: float, steps: int = 1) -> float:
        """The corrected prediction for a raw (profile) one. Once a phase has been measured over
        a spread of raw predictions (different batch sizes, lengths, γ), measured ≈ a + b·raw
        by least squares with forgetting: a profile's fixed overhead and its per-request slope
        are then corrected separately (a profile measured on a deeper model overestimates
        the first and underestimates the second -- no single factor fits both). Before that,
        the smoothed multiplier.

        The draft phase is corrected per effective step: ``steps`` = γ drafter steps cost
        (γ + κ)·c(raw / γ), κ the first step's KV gather (:meth:`observe_draft_setup`). A fit per
        iteration, learnt from γ = 1, priced γ = 7 at 4x its measured time on gsm8k-lm."""
        if phase == "draft":
            u = raw / steps
            return (steps + self.draft_setup) * self._correct_unit(phase, u)
        return self._correct_unit(phase, raw)

    def _correct_unit(self, phase: str, raw: float) -> float:
        a, b = self.coefficients(phase)
        if a is None:
            return raw * b
        lo, hi = MULT_RANGE
        return min(max(a + b * raw, lo * raw), hi * raw)

    # ------------------------------------------------------------------ learning
    def observe(
        self, phase: str, raw: float, measured: float, steps: int, bytes_: float, bandwidth: float
    ) -> Observation:
        """Learn from one measured phase whose raw (profile) prediction was ``raw`` seconds
        (draft: all ``steps`` = γ steps, without κ); ``bytes_`` it moved at peak ``bandwidth``."""
        m_old = self.multiplier[phase]
        pred = self.correct(phase, raw, steps)
        # the correction is learnt per unit: one effective draft step, or one forward
        u_raw, u_meas = (raw / steps, measured / (steps + self.draft_setup)) if phase == "draft" else (raw, measured)
        if phase == "draft":  # "raw": the profile with the draft's structure, (γ + κ) steps
            raw *= (steps + self.draft_setup) / steps
        err_raw, err = abs(raw - measured) / measured, abs(pred - measured) / measured
        bw_util = bytes_ / measured / bandwidth
        if self._warmup[phase]:  # reported, never learnt from
            self._warmup[phase] -= 1
            return Observation(phase, measured, raw, pred, err_raw, err, bw_util, m_old)
        self._fit[phase].add(u_raw, u_meas)
        lo, hi = MULT_RANGE
        ratio = min(max(u_meas / u_raw, lo), hi)
        # the first measurement replaces the profile's guess outright; later ones are smoothed
        ema = self.ema if self._count[phase] else 1.0
        log_m = (1.0 - ema) * math.log(m_old) + ema * math.log(ratio)
        m_new = min(max(math.exp(log_m), lo), hi)
        self.multiplier[phase] = m_new
        obs = Observation(phase, measured, raw, pred, err_raw, err, bw_util, m_new)
        self._hist[phase].append((obs.rel_err_raw, obs.rel_err, obs.bw_util))
        self._count[phase] += 1
        return obs

    def observe_draft_setup(self, first_s: float, rest_s: float, gamma: int) -> None:
        """Learn κ from one draft of γ ≥ 2 steps: its first step took ``first_s`` seconds, the
        other γ − 1 together ``rest_s``. EMA with weight ``ema``, κ clamped to [0, DRAFT_SETUP_MAX]."""
        if gamma < 2 or not (first_s > 0 and rest_s > 0 and math.isfinite(first_s + rest_s)):
            return
        k = min(max(first_s * (gamma - 1) / rest_s - 1.0, 0.0), DRAFT_SETUP_MAX)
        self.draft_setup += self.ema * (k - self.draft_setup)

    # ------------------------------------------------------------------ time outside the forwards
    def observe_outside(self, gamma: int, batch: int, seconds: float) -> None:
        """Wall time of an iteration minus its forwards: the scheduler's result processing,
        streaming and KV bookkeeping. Learnt per mode (a speculative iteration commits more
        tokens per request) as a + b·B by least squares with exponential forgetting."""
        if batch < 1 or not (seconds >= 0 and math.isfinite(seconds)):
            return
        mode = "spec" if gamma else "plain"
        if self._warmup_outside[mode]:
            self._warmup_outside[mode] -= 1
            return
        self._outside[mode].add(float(batch), float(seconds))

    def t_outside(self, gamma: int, batch: int) -> float:
        """Predicted scheduler seconds around an iteration's forwards; a mode not yet seen
        borrows the other's fit (so an unmeasured mode is neither favoured nor penalised)."""
        mine, other = (
            (self._outside["spec"], self._outside["plain"])
            if gamma
            else (self._outside["plain"], self._outside["spec"])
        )
        fit = mine if mine.n else other
        return fit.predict(batch) if fit.n else 0.0

    @property
    def outside_fit(self) -> dict[str, tuple[float, float] | None]:
        """Per mode (a, b) of outside seconds = a + b·B, None before any observation."""
        return {m: (f.coef() if f.n else None) for m, f in self._outside.items()}

    # ------------------------------------------------------------------ diagnostics
    def error_stats(self, last: int | None = None) -> dict[str, dict[str, float]]:
        """Per phase, over the most recent ``last`` observations (default: the whole window):
        n (all observations seen), window (how many the means cover), mean_rel_err_raw (profile
        alone, "before correction"), mean_rel_err_corrected (the prediction in force when the
        measurement arrived, "after correction"), bw_util (mean achieved fraction of peak BW),
        multiplier (current)."""
        out = {}
        for p in PHASES:
            h = list(self._hist[p])
            if last is not None:
                h = h[-last:] if last > 0 else []
            k = len(h)
            out[p] = {
                "n": self._count[p],
                "window": k,
                "mean_rel_err_raw": sum(e[0] for e in h) / k if k else float("nan"),
                "mean_rel_err_corrected": sum(e[1] for e in h) / k if k else float("nan"),
                "bw_util": sum(e[2] for e in h) / k if k else float("nan"),
                "multiplier": self.multiplier[p],
            }
        return out
