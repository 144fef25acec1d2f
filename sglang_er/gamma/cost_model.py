"""Predicted seconds of the three forwards of a decode iteration (plain, draft step, verify).

Speculation pays while the target forward is memory-bound (verifying γ+1 tokens costs about one
weight read) and stops paying once the batch makes it compute-bound, so the γ choice needs the
cost of each forward at the current batch, on this machine. A roofline over the model's bytes and
flops (:mod:`sglang_er.gamma.roofline`, with the machine's numbers from a
:class:`~sglang_er.gamma.hardware_profile.HardwareProfile`) gives a prior before anything ran;
live measurements then correct it per phase (:mod:`sglang_er.gamma.correction`), because
overheads and the KV traffic of real kernels differ from any profile.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from sglang_er.gamma.batch import BatchStats, SeqLens, batch_stats
from sglang_er.gamma.calibration import CalibrationSample
from sglang_er.gamma.correction import MULT_RANGE, Correction, Observation
from sglang_er.gamma.hardware_profile import HardwareProfile
from sglang_er.gamma.model_cost import ModelCost
from sglang_er.gamma.roofline import PHASES, phase_seconds

__all__ = ["KV_READ_RULE", "KV_TRAFFIC_FACTOR", "CostModel", "Work"]

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


class CostModel:
    """Predicted seconds of the three forwards of a decode iteration on one machine.

    Every phase: ``c_phase(max(bytes/BW, Σ_k flops_k/F_k) + per_seq·B + fixed)``, where
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

    ``c_phase`` is the live :class:`~sglang_er.gamma.correction.Correction` (``correction``),
    trained by :meth:`observe`; ``corrected=False`` gives the profile's raw prediction.
    """

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
        self.correction = Correction(ema=ema, window=window, warmup=warmup, outside_warmup=outside_warmup)
        self.attention_backend = backend
        self.kv_read_rule = kv_read_rule
        self.kv_traffic_factor = float(
            kv_traffic_factor if kv_traffic_factor is not None else KV_TRAFFIC_FACTOR.get(backend, 1.0)
        )
        self.draft_kv_layout = draft_kv_layout
        self.draft_kv_traffic_factor = (
            float(draft_kv_traffic_factor) if draft_kv_layout == "padded" else self.kv_traffic_factor
        )
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

    # ------------------------------------------------------------------ work accounting
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
        """Raw (profile) seconds of one forward: the roofline formula of :mod:`sglang_er.gamma.roofline`."""
        if phase == "draft":
            compute = w.flops["layers"] / self._f_draft_layers + w.flops["head"] / self._f_draft_head
        else:
            compute = w.flops["target"] / self._f_target
        return phase_seconds(self.profile, phase, w.bytes, compute, w.batch)

    def _raw(self, phase: str, st: BatchStats, gamma: int) -> tuple[float, float]:
        """Raw (profile) seconds and bytes of ``phase`` (γ ignored for plain; draft: all γ steps)."""
        if phase == "plain":
            w = self.work_plain(st)
            return self._seconds(w, "plain"), w.bytes
        gamma = self._check_gamma(gamma)
        if phase == "verify":
            w = self.work_verify(st, gamma)
            return self._seconds(w, "verify"), w.bytes
        if self.draft_kv_layout == "padded":  # every step identical
            w = self.work_draft_step(st, 0, gamma)
            return gamma * self._seconds(w, "draft"), gamma * w.bytes
        ws = [self.work_draft_step(st, j, gamma) for j in range(gamma)]
        return sum(self._seconds(w, "draft") for w in ws), sum(w.bytes for w in ws)

    # ------------------------------------------------------------------ predictions
    @staticmethod
    def _check_gamma(gamma: int) -> int:
        if not isinstance(gamma, int) or isinstance(gamma, bool) or gamma < 1:
            raise ValueError(f"γ must be an integer >= 1 here, got {gamma!r}")
        return gamma

    def t_plain(self, seq_lens: SeqLens | BatchStats, *, corrected: bool = True) -> float:
        """Seconds of one plain decode forward of the batch (γ = 0)."""
        t = self._raw("plain", batch_stats(seq_lens), 0)[0]
        return self.correction.correct("plain", t) if corrected else t

    def t_draft(self, seq_lens: SeqLens | BatchStats, gamma: int, *, corrected: bool = True) -> float:
        """Seconds of all γ drafter steps of one iteration (Σ_j T_D(step j))."""
        t = self._raw("draft", batch_stats(seq_lens), gamma)[0]
        return self.correction.correct("draft", t, steps=gamma) if corrected else t

    def t_verify(self, seq_lens: SeqLens | BatchStats, gamma: int, *, corrected: bool = True) -> float:
        """Seconds of the target verify forward over γ+1 tokens per request."""
        t = self._raw("verify", batch_stats(seq_lens), gamma)[0]
        return self.correction.correct("verify", t) if corrected else t

    def iteration_times(
        self, st: BatchStats, gammas: Sequence[int], raw: dict[int, float] | None = None
    ) -> dict[int, float]:
        """Corrected seconds of one iteration for each γ in ``gammas`` (0 = plain), scheduler time
        included: :meth:`t_plain`, or :meth:`t_draft` + :meth:`t_verify`, plus
        :meth:`Correction.t_outside`, for a summarised batch without the argument checks.
        ``raw``, when given, receives each γ's forwards as the profile alone prices them (no
        correction, no κ, no scheduler time): what :mod:`sglang_er.gamma.measured` divides by.

        The γ choice's hot path (every decode iteration, every candidate γ), so the ``work_*`` /
        ``_seconds`` (:func:`sglang_er.gamma.roofline.roofline_seconds`) / ``Correction.correct``
        arithmetic is inlined here as plain float expressions; a test keeps it equal to those methods."""
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
        lo, hi = MULT_RANGE
        corr = self.correction
        # (a, b) of each phase's affine correction, or (None, multiplier)
        a_plain, b_plain = corr.coefficients("plain")
        a_verify, b_verify = corr.coefficients("verify")
        a_draft, b_draft = corr.coefficients("draft")
        out_plain, out_spec = corr.t_outside(0, B), corr.t_outside(1, B)
        kappa = corr.draft_setup
        out = {}
        for g in gammas:
            if g == 0:
                byt = self._w_target + (P + B) * kv_tok * kvf + B * out_tok
                raw_g = (
                    max(byt / bw, (B * self._flops_tok + attn * (L + B)) / self._f_target)
                    + p.per_seq_s * B
                    + p.fixed_plain_s
                )
                a, b = a_plain, b_plain
                out[g] = (raw_g * b if a is None else min(max(a + b * raw_g, lo * raw_g), hi * raw_g)) + out_plain
                if raw is not None:
                    raw[g] = raw_g
                continue
            q = g + 1
            byt = w_target + (P + B * q) * kv_tok * kvf + B * q * out_tok
            flops = B * q * flops_tok + attn * (q * L + B * q * (q + 1) / 2)
            t_v = max(byt / bw, flops / f_target) + seq_fixed_v
            t_v_raw = t_v
            a, b = a_verify, b_verify
            t_v = t_v * b if a is None else min(max(a + b * t_v, lo * t_v), hi * t_v)
            if padded:  # every step reads [B, max L + γ]
                ctx = B * (Lmax + g)
                t_d = g * (max((d_bytes0 + ctx * d_kv) / bw, (d_flops0 + attn * ctx) / f_dl + d_head) + d_fixed)
            else:
                t_d = sum(self._seconds(self.work_draft_step(st, j, g), "draft") for j in range(g))
            if raw is not None:
                raw[g] = t_d + t_v_raw
            a, b = a_draft, b_draft  # per effective step (see Correction.correct)
            u = t_d / g
            t_d = (g + kappa) * (u * b if a is None else min(max(a + b * u, lo * u), hi * u))
            out[g] = t_d + t_v + out_spec
        return out

    def calibration_sample(
        self, phase: str, seq_lens: SeqLens | BatchStats, gamma: int, seconds: float
    ) -> CalibrationSample:
        """A :class:`~sglang_er.gamma.calibration.CalibrationSample` for a measured phase, with this
        model's byte/flop accounting (draft: all γ steps, ``forwards`` = γ), for fit_profile."""
        st = batch_stats(seq_lens)
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
    def observe(self, phase: str, seq_lens: SeqLens | BatchStats, gamma: int, measured_seconds: float) -> Observation:
        """Feed one measured phase time to the correction; returns the errors of the predictions.

        ``phase``: "plain" (γ ignored), "draft" (``measured_seconds`` = all γ steps of the
        iteration), "verify". O(B) (for the batch summary) + O(γ).
        """
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        meas = float(measured_seconds)
        if not (meas > 0 and math.isfinite(meas)):
            raise ValueError(f"measured_seconds must be a positive finite number, got {measured_seconds!r}")
        raw, byt = self._raw(phase, batch_stats(seq_lens), gamma)
        return self.correction.observe(phase, raw, meas, gamma if phase == "draft" else 1, byt, self._bw)
