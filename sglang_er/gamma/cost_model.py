"""Predicted seconds of the three forwards of a decode iteration (plain, draft step, verify).

Speculation pays while the target forward is memory-bound (verifying γ+1 tokens costs about one
weight read) and stops paying once the batch makes it compute-bound, so the γ choice needs the
cost of each forward at the current batch, on this machine. A roofline over the model's bytes and
flops (:mod:`sglang_er.gamma.calibration` holds the machine's numbers and the formula) gives a prior
before anything ran; live measurements then correct it per phase, because overheads and the KV
traffic of real kernels differ from any profile.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from sglang_er.gamma.batch import BatchStats, PrefixGroups, SeqLens, batch_stats
from sglang_er.gamma.calibration import CalibrationSample, HardwareProfile, phase_seconds
from sglang_er.gamma.model_cost import ModelCost

__all__ = [
    "DRAFT_SETUP_MAX",
    "DRAFT_SETUP_PRIOR",
    "KV_READ_RULE",
    "KV_TRAFFIC_FACTOR",
    "PHASES",
    "CostModel",
    "Observation",
    "Work",
]

# How many times an attention kernel reads KV pages that several requests share through the
# radix cache (a common prompt, or GRPO's n samples of one prompt):
#   per_request: each request streams its whole KV, shared pages included. SGLang's
#     torch_native backend gathers every request's KV separately (k_cache[req_to_token[...]]);
#     flashinfer's BatchDecodeWithPagedKVCacheWrapper and SGLang's triton decode kernel walk
#     each request's page table independently. (On a GPU the L2 may absorb some repeats; the
#     live correction picks that up.)
#   shared_once: a cascade / shared-prefix kernel (flashinfer's MultiLevelCascadeAttention)
#     attends the shared prefix once for the whole group and merges states, so shared pages
#     are read once per group.
KV_READ_RULE: dict[str, str] = {
    "torch_native": "per_request",
    "flashinfer": "per_request",
    "flashinfer_cascade": "shared_once",
    "triton": "per_request",
}
_RULES = ("per_request", "shared_once")

# KV bytes actually moved per KV byte attended. torch_native materialises each request's KV
# with an index gather (read the pool + write a copy) and SDPA then reads the copy: ~3×.
# Fused paged kernels read the pool once.
KV_TRAFFIC_FACTOR: dict[str, float] = {
    "torch_native": 3.0,
    "flashinfer": 1.0,
    "flashinfer_cascade": 1.0,
    "triton": 1.0,
}

PHASES = ("plain", "draft", "verify")
# The drafter's first step of an iteration also gathers every layer's committed KV, which the
# later steps reuse: a draft of γ steps costs about (γ + κ) steps. κ is measured from iterations
# with γ ≥ 2 (first step against the rest); gsm8k-lm on this CPU showed κ = 0.4-1.0 across
# B = 1-32. DRAFT_SETUP_PRIOR is κ before any measurement; DRAFT_SETUP_MAX bounds one outlier.
DRAFT_SETUP_PRIOR = 0.5
DRAFT_SETUP_MAX = 4.0


@dataclass(frozen=True)
class Work:
    """What one forward moves and computes. bytes: total, of which kv_bytes is attention KV
    traffic; flops by component: ``target`` (a target forward, at the target's compute rate)
    or ``layers`` / ``head`` (a draft step: W4 layers at the ``w4`` rate, the head at the bf16
    or ``w4`` rate); batch: requests."""

    bytes: float
    kv_bytes: float
    flops: dict
    batch: int


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


class _LineFit:
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


class CostModel:
    """Predicted seconds of the three forwards of a decode iteration on one machine.

    Every phase: ``mult_phase · [max(bytes/BW, Σ_k flops_k/F_k) + per_seq·B + fixed]``, where
    bytes = weights streamed + KV traffic + new KV written + logits written, KV traffic from
    each request's own length (and the radix sharing rule), never the batch mean: attention
    cost is linear in every length, but the padded drafter pays for the longest.

    * plain (γ = 0): target forward, 1 query token per request, attends L_b + 1 tokens.
    * draft step j (0..γ-1): lean W4 drafter, 1 token per request at position L_b + j. Its
      attention (``draft_kv_layout="padded"``, what :class:`sglang_er.draft.drafter.Drafter` does)
      gathers a [B, max L + γ] KV index and runs SDPA with a mask, so every request streams
      max L + γ tokens, ~3× (gather read, copy write, SDPA read); ``"ragged"`` models a paged
      kernel with the target backend's rule and factor.
    * verify: target forward over γ+1 tokens per request; the kernel loads a request's KV once
      for all its γ+1 queries.

    ``mult_phase`` starts at 1 and follows measurements (:meth:`observe`): the first measurement
    sets it, then an EMA of log(measured / raw prediction) with weight ``ema``, per-observation
    ratio and multiplier clamped to [0.2, 5], so one outlier (a GC pause) cannot wreck the model.
    Once a phase has been measured over a spread of raw predictions, the correction becomes
    affine, a + b·raw (see :meth:`_correct`), still clamped to [0.2, 5]× raw. The scheduler's
    time around the forwards is learnt separately (:meth:`observe_outside`).
    """

    MULT_RANGE = (0.2, 5.0)

    def __init__(
        self,
        profile: HardwareProfile,
        model_cost: ModelCost,
        *,
        attention_backend: str | None = None,
        kv_read_rule: str | None = None,
        kv_traffic_factor: float | None = None,
        draft_kv_layout: str = "padded",
        draft_kv_traffic_factor: float = 3.0,
        target_compute: str = "bf16",
        ema: float = 0.2,
        window: int = 256,
        warmup: int = 0,
        outside_warmup: int = 0,
    ) -> None:
        self.profile = profile
        self.model = model_cost
        backend = attention_backend or profile.attention_backend
        if kv_read_rule is None:
            if backend not in KV_READ_RULE:
                raise ValueError(
                    f"attention backend {backend!r} has no known KV read rule; pass "
                    f"kv_read_rule= one of {_RULES} (known backends: {', '.join(KV_READ_RULE)})"
                )
            kv_read_rule = KV_READ_RULE[backend]
        if kv_read_rule not in _RULES:
            raise ValueError(f"kv_read_rule must be one of {_RULES}, got {kv_read_rule!r}")
        if draft_kv_layout not in ("padded", "ragged"):
            raise ValueError(f"draft_kv_layout must be 'padded' or 'ragged', got {draft_kv_layout!r}")
        if not 0.0 < ema <= 1.0:
            raise ValueError(f"ema must be in (0, 1], got {ema}")
        self.attention_backend = backend
        self.kv_read_rule = kv_read_rule
        self.kv_traffic_factor = float(
            kv_traffic_factor if kv_traffic_factor is not None else KV_TRAFFIC_FACTOR.get(backend, 1.0)
        )
        self.draft_kv_layout = draft_kv_layout
        self.draft_kv_traffic_factor = (
            float(draft_kv_traffic_factor) if draft_kv_layout == "padded" else self.kv_traffic_factor
        )
        self.ema = float(ema)
        m = model_cost
        # Constants of the hot path, hoisted once.
        self._bw = profile.bandwidth_bytes_per_s
        self._f_target = profile.flops(target_compute)
        self._f_draft_layers = profile.flops("w4")
        self._f_draft_head = profile.flops("w4" if m.w4_head else target_compute)
        self._kv_tok = m.kv_bytes_per_token
        self._logit_tok = m.vocab * m.logits_bytes
        self._attn = m.attn_flops_per_context_token
        # compute class of each Work.flops component (for calibration samples)
        self._class_of = {"target": target_compute, "layers": "w4", "head": "w4" if m.w4_head else target_compute}
        self._w_target = m.target_read_bytes
        self._w_draft = m.draft_read_bytes
        self._flops_tok = m.flops_per_token
        self._layer_flops_tok = m.layer_flops_per_token
        self._head_flops_tok = m.head_flops_per_token
        self._draft_head_flops_tok = m.draft_head_flops_per_token
        self.multiplier = {p: 1.0 for p in PHASES}
        self.draft_setup = DRAFT_SETUP_PRIOR  # κ: see DRAFT_SETUP_PRIOR
        self._hist = {p: deque(maxlen=window) for p in PHASES}
        self._count = {p: 0 for p in PHASES}
        # The first ``warmup`` phase / ``outside_warmup`` outside-time measurements of the process
        # are reported but not learnt from (not reset with the correction). Off in the server: its
        # first phase measurements must replace a profile that may be far off, and the one-time work
        # found inside an iteration (the drafter's AWQ switch) is kept out of the clock instead.
        self._warmup = {p: int(warmup) for p in PHASES}
        self._warmup_outside = {"plain": int(outside_warmup), "spec": int(outside_warmup)}
        self._outside = {"plain": _LineFit(), "spec": _LineFit()}  # scheduler time around the forwards
        self._fit = {p: _LineFit(intercept="any") for p in PHASES}  # measured vs raw prediction

    # ------------------------------------------------------------------ work accounting
    def batch_stats(self, seq_lens: SeqLens | BatchStats, prefix_groups: PrefixGroups = None) -> BatchStats:
        return batch_stats(seq_lens, prefix_groups)

    def work_plain(self, st: BatchStats) -> Work:
        B = st.batch
        kv_read = (st.prefix_kv_tokens(self.kv_read_rule) + B) * self._kv_tok * self.kv_traffic_factor
        byt = self._w_target + kv_read + B * (self._kv_tok + self._logit_tok)
        flops = B * self._flops_tok + self._attn * (st.sum_len + B)
        return Work(byt, kv_read, {"target": flops}, B)

    def work_verify(self, st: BatchStats, gamma: int) -> Work:
        B, q = st.batch, gamma + 1
        kv_read = (st.prefix_kv_tokens(self.kv_read_rule) + B * q) * self._kv_tok * self.kv_traffic_factor
        byt = self._w_target + kv_read + B * q * (self._kv_tok + self._logit_tok)
        # query i (0..γ) attends L_b + i + 1 tokens
        flops = B * q * self._flops_tok + self._attn * (q * st.sum_len + B * q * (q + 1) / 2)
        return Work(byt, kv_read, {"target": flops}, B)

    def work_draft_step(self, st: BatchStats, step: int, gamma: int) -> Work:
        B = st.batch
        if self.draft_kv_layout == "padded":
            ctx = B * (st.max_len + gamma)  # the worker's kv_index is [B, max L + γ] for every step
            kv_read = ctx * self._kv_tok * self.draft_kv_traffic_factor
        else:
            ctx = st.sum_len + B * (step + 1)
            kv_read = (
                (st.prefix_kv_tokens(self.kv_read_rule) + B * (step + 1)) * self._kv_tok * self.draft_kv_traffic_factor
            )
        byt = self._w_draft + kv_read + B * (self._kv_tok + self._logit_tok)
        flops = {"layers": B * self._layer_flops_tok + self._attn * ctx, "head": B * self._draft_head_flops_tok}
        return Work(byt, kv_read, flops, B)

    def _seconds(self, w: Work, phase: str) -> float:
        """Raw (profile) seconds of one forward: the roofline formula of :mod:`sglang_er.gamma.calibration`."""
        if phase == "draft":
            compute = w.flops["layers"] / self._f_draft_layers + w.flops["head"] / self._f_draft_head
        else:
            compute = w.flops["target"] / self._f_target
        return phase_seconds(self.profile, phase, w.bytes, compute, w.batch)

    # ------------------------------------------------------------------ predictions
    @staticmethod
    def _check_gamma(gamma: int) -> int:
        if not isinstance(gamma, int) or isinstance(gamma, bool) or gamma < 1:
            raise ValueError(f"γ must be an integer >= 1 here, got {gamma!r}")
        return gamma

    def t_plain(
        self, seq_lens: SeqLens | BatchStats, prefix_groups: PrefixGroups = None, *, corrected: bool = True
    ) -> float:
        """Seconds of one plain decode forward of the batch (γ = 0)."""
        st = batch_stats(seq_lens, prefix_groups)
        t = self._seconds(self.work_plain(st), "plain")
        return self._correct("plain", t) if corrected else t

    def t_draft(
        self, seq_lens: SeqLens | BatchStats, gamma: int, prefix_groups: PrefixGroups = None, *, corrected: bool = True
    ) -> float:
        """Seconds of all γ drafter steps of one iteration (Σ_j T_D(step j))."""
        st = batch_stats(seq_lens, prefix_groups)
        gamma = self._check_gamma(gamma)
        if self.draft_kv_layout == "padded":  # every step identical
            t = gamma * self._seconds(self.work_draft_step(st, 0, gamma), "draft")
        else:
            t = sum(self._seconds(self.work_draft_step(st, j, gamma), "draft") for j in range(gamma))
        return self._correct("draft", t, steps=gamma) if corrected else t

    def t_verify(
        self, seq_lens: SeqLens | BatchStats, gamma: int, prefix_groups: PrefixGroups = None, *, corrected: bool = True
    ) -> float:
        """Seconds of the target verify forward over γ+1 tokens per request."""
        st = batch_stats(seq_lens, prefix_groups)
        t = self._seconds(self.work_verify(st, self._check_gamma(gamma)), "verify")
        return self._correct("verify", t) if corrected else t

    def iteration_times(self, st: BatchStats, gammas: Sequence[int]) -> dict[int, float]:
        """Corrected seconds of one iteration for each γ in ``gammas`` (0 = plain), scheduler time
        included: :meth:`t_iteration` for a summarised batch without the argument checks.

        The γ choice's hot path (every decode iteration, every candidate γ), so the ``work_*`` /
        ``_seconds`` (:func:`sglang_er.gamma.calibration.roofline_seconds`) / ``_correct`` arithmetic is
        inlined here as plain float expressions; a test keeps it equal to :meth:`t_iteration`."""
        p, B, L, Lmax = self.profile, st.batch, st.sum_len, st.max_len
        P = st.prefix_kv_tokens(self.kv_read_rule)
        bw, kv_tok, kvf, attn = self._bw, self._kv_tok, self.kv_traffic_factor, self._attn
        out_tok = kv_tok + self._logit_tok  # bytes written per new token (its KV row, its logits)
        w_target, flops_tok, f_target = self._w_target, self._flops_tok, self._f_target
        seq_fixed_v = p.per_seq_s * B + p.fixed_verify_s
        padded = self.draft_kv_layout == "padded"
        if padded:
            d_kv = kv_tok * self.draft_kv_traffic_factor
            d_bytes0 = self._w_draft + B * out_tok
            d_flops0 = B * self._layer_flops_tok
            d_head = B * self._draft_head_flops_tok / self._f_draft_head
            f_dl = self._f_draft_layers
            d_fixed = p.per_seq_draft_s * B + p.fixed_draft_step_s
        lo, hi = self.MULT_RANGE
        cor = {}
        for phase in PHASES:  # (a, b) of the affine correction, or (None, multiplier)
            fit = self._fit[phase]
            cor[phase] = fit.coef() if fit.n >= 3 and fit.spread() >= 0.25 else (None, self.multiplier[phase])
        out_plain, out_spec = self.t_outside(0, B), self.t_outside(1, B)
        kappa = self.draft_setup
        out = {}
        for g in gammas:
            if g == 0:
                byt = self._w_target + (P + B) * kv_tok * kvf + B * out_tok
                raw = (
                    max(byt / bw, (B * self._flops_tok + attn * (L + B)) / self._f_target)
                    + p.per_seq_s * B
                    + p.fixed_plain_s
                )
                a, b = cor["plain"]
                out[g] = (raw * b if a is None else min(max(a + b * raw, lo * raw), hi * raw)) + out_plain
                continue
            q = g + 1
            byt = w_target + (P + B * q) * kv_tok * kvf + B * q * out_tok
            flops = B * q * flops_tok + attn * (q * L + B * q * (q + 1) / 2)
            t_v = max(byt / bw, flops / f_target) + seq_fixed_v
            a, b = cor["verify"]
            t_v = t_v * b if a is None else min(max(a + b * t_v, lo * t_v), hi * t_v)
            if padded:  # every step reads [B, max L + γ]
                ctx = B * (Lmax + g)
                t_d = g * (max((d_bytes0 + ctx * d_kv) / bw, (d_flops0 + attn * ctx) / f_dl + d_head) + d_fixed)
            else:
                t_d = sum(self._seconds(self.work_draft_step(st, j, g), "draft") for j in range(g))
            a, b = cor["draft"]  # per effective step (see _correct)
            u = t_d / g
            t_d = (g + kappa) * (u * b if a is None else min(max(a + b * u, lo * u), hi * u))
            out[g] = t_d + t_v + out_spec
        return out

    def t_iteration(
        self, seq_lens: SeqLens | BatchStats, gamma: int, prefix_groups: PrefixGroups = None, *, corrected: bool = True
    ) -> float:
        """Seconds of one decode iteration at γ (γ = 0: plain; else draft + verify), and when
        ``corrected`` the measured scheduler time around the forwards."""
        st = batch_stats(seq_lens, prefix_groups)
        if gamma == 0:
            t = self.t_plain(st, corrected=corrected)
        else:
            t = self.t_draft(st, gamma, corrected=corrected) + self.t_verify(st, gamma, corrected=corrected)
        return t + self.t_outside(gamma, st.batch) if corrected else t

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

    def predicted_bytes(
        self, phase: str, seq_lens: SeqLens | BatchStats, gamma: int = 0, prefix_groups: PrefixGroups = None
    ) -> float:
        """Bytes the phase moves (draft: all γ steps)."""
        st = batch_stats(seq_lens, prefix_groups)
        if phase == "plain":
            return self.work_plain(st).bytes
        gamma = self._check_gamma(gamma)
        if phase == "verify":
            return self.work_verify(st, gamma).bytes
        if phase == "draft":
            return sum(self.work_draft_step(st, j, gamma).bytes for j in range(gamma))
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")

    def calibration_sample(
        self, phase: str, seq_lens: SeqLens | BatchStats, gamma: int, seconds: float, prefix_groups: PrefixGroups = None
    ) -> CalibrationSample:
        """A :class:`~sglang_er.gamma.calibration.CalibrationSample` for a measured phase, with this
        model's byte/flop accounting (draft: all γ steps, ``forwards`` = γ), for fit_profile."""
        st = batch_stats(seq_lens, prefix_groups)
        if phase == "plain":
            works, n = [self.work_plain(st)], 1
        elif phase == "verify":
            works, n = [self.work_verify(st, self._check_gamma(gamma))], 1
        elif phase == "draft":
            n = self._check_gamma(gamma)
            works = [self.work_draft_step(st, j, n) for j in range(n)]
        else:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        flops: dict[str, float] = {}
        for w in works:
            for comp, f in w.flops.items():
                cls = self._class_of[comp]
                flops[cls] = flops.get(cls, 0.0) + f
        return CalibrationSample(
            phase=phase, bytes=sum(w.bytes for w in works), flops=flops, batch=st.batch, seconds=seconds, forwards=n
        )

    # ------------------------------------------------------------------ live correction
    def observe(
        self,
        phase: str,
        seq_lens: SeqLens | BatchStats,
        gamma: int,
        measured_seconds: float,
        prefix_groups: PrefixGroups = None,
    ) -> Observation:
        """Feed one measured phase time; returns the errors and moves the phase multiplier.

        ``phase``: "plain" (γ ignored), "draft" (``measured_seconds`` = all γ steps of the
        iteration), "verify". O(B) (for the batch summary) + O(γ).
        """
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        meas = float(measured_seconds)
        if not (meas > 0 and math.isfinite(meas)):
            raise ValueError(f"measured_seconds must be a positive finite number, got {measured_seconds!r}")
        st = batch_stats(seq_lens, prefix_groups)
        if phase == "plain":
            w = self.work_plain(st)
            raw, byt = self._seconds(w, "plain"), w.bytes
        elif phase == "verify":
            w = self.work_verify(st, self._check_gamma(gamma))
            raw, byt = self._seconds(w, "verify"), w.bytes
        elif self.draft_kv_layout == "padded":  # every step identical
            w = self.work_draft_step(st, 0, self._check_gamma(gamma))
            raw, byt = gamma * self._seconds(w, "draft"), gamma * w.bytes
        else:
            ws = [self.work_draft_step(st, j, self._check_gamma(gamma)) for j in range(gamma)]
            raw, byt = sum(self._seconds(w, "draft") for w in ws), sum(w.bytes for w in ws)
        m_old = self.multiplier[phase]
        steps = gamma if phase == "draft" else 1
        pred = self._correct(phase, raw, steps)
        # the correction is learnt per unit: one effective draft step, or one forward
        u_raw, u_meas = (raw / steps, meas / (steps + self.draft_setup)) if phase == "draft" else (raw, meas)
        if phase == "draft":  # "raw": the profile with the draft's structure, (γ + κ) steps
            raw *= (steps + self.draft_setup) / steps
        if self._warmup[phase]:  # reported, never learnt from
            self._warmup[phase] -= 1
            return Observation(
                phase, meas, raw, pred, abs(raw - meas) / meas, abs(pred - meas) / meas, byt / meas / self._bw, m_old
            )
        self._fit[phase].add(u_raw, u_meas)
        lo, hi = self.MULT_RANGE
        ratio = min(max(u_meas / u_raw, lo), hi)
        # the first measurement replaces the profile's guess outright; later ones are smoothed
        ema = self.ema if self._count[phase] else 1.0
        log_m = (1.0 - ema) * math.log(m_old) + ema * math.log(ratio)
        m_new = min(max(math.exp(log_m), lo), hi)
        self.multiplier[phase] = m_new
        obs = Observation(
            phase, meas, raw, pred, abs(raw - meas) / meas, abs(pred - meas) / meas, byt / meas / self._bw, m_new
        )
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

    def _correct(self, phase: str, raw: float, steps: int = 1) -> float:
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
        fit = self._fit[phase]
        lo, hi = self.MULT_RANGE
        if fit.n >= 3 and fit.spread() >= 0.25:
            a, b = fit.coef()
            return min(max(a + b * raw, lo * raw), hi * raw)
        return raw * self.multiplier[phase]

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

    def reset_correction(self) -> None:
        self.multiplier = {p: 1.0 for p in PHASES}
        self._fit = {p: _LineFit(intercept="any") for p in PHASES}
        self._outside = {"plain": _LineFit(), "spec": _LineFit()}
        for p in PHASES:
            self._hist[p].clear()
            self._count[p] = 0
