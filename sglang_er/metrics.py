"""Speculation counters kept by the worker (server-wide), exported on SGLang's ``/metrics``.

With ``--enable-metrics`` SGLang sets ``PROMETHEUS_MULTIPROC_DIR`` before it spawns the
scheduler, so prometheus_client metrics created here (in the scheduler process) are served by
the main process's ``/metrics`` next to SGLang's own, under the ``sglang_er:`` prefix.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque

import torch


class _Prom:
    def __init__(self, gamma_max: int):
        from prometheus_client import Counter, Gauge, Histogram  # after PROMETHEUS_MULTIPROC_DIR is set

        self.iterations = Counter("sglang_er:iterations", "Decode iterations", ["mode"])
        self.drafted = Counter("sglang_er:drafted_tokens", "Draft tokens proposed")
        self.accepted = Counter("sglang_er:accepted_tokens", "Draft tokens accepted")
        self.pos_proposed = Counter("sglang_er:position_proposed", "Drafts proposed at position", ["position"])
        self.pos_accepted = Counter("sglang_er:position_accepted", "Drafts accepted at position", ["position"])
        self.phase_seconds = Counter("sglang_er:phase_seconds", "Wall time per phase", ["phase"])
        self.phase_calls = Counter("sglang_er:phase_calls", "Forwards per phase", ["phase"])
        self.gamma = Gauge("sglang_er:gamma", "γ of the last decode iteration", multiprocess_mode="mostrecent")
        self.gamma_hist = Histogram(
            "sglang_er:gamma_chosen",
            "γ per decode iteration",
            buckets=[g + 0.5 for g in range(gamma_max)] + [float("inf")],
        )
        self.bw_util = Gauge(
            "sglang_er:bandwidth_utilisation",
            "Achieved fraction of the profile's peak bandwidth (auto mode, recent window)",
            ["phase"],
            multiprocess_mode="mostrecent",
        )
        self.model_error = Gauge(
            "sglang_er:model_rel_error",
            "Mean |predicted - measured| / measured phase time after live correction (auto mode)",
            ["phase"],
            multiprocess_mode="mostrecent",
        )
        self.alpha = Gauge(
            "sglang_er:alpha",
            "Acceptance α_k at draft position k (auto mode)",
            ["position"],
            multiprocess_mode="mostrecent",
        )
        self.source_drafted = Counter(
            "sglang_er:source_drafted_tokens",
            "Draft tokens proposed, by source (w4; group, prompt, self: history drafts; none: verify-only padding)",
            ["source"],
        )
        self.source_accepted = Counter(
            "sglang_er:source_accepted_tokens", "Draft tokens accepted, by source", ["source"]
        )
        self.requantizations = Counter("sglang_er:requantizations", "Drafter re-quantizations after weight updates")
        self.requantize_seconds = Gauge(
            "sglang_er:last_requantize_seconds", "Wall time of the last re-quantization", multiprocess_mode="mostrecent"
        )


class SpecMetrics:
    """Totals since start: iterations with and without speculation, drafted and accepted
    tokens, per-position acceptance counts (position k accepted ⇔ accept_len > k), and wall
    time per phase (plain decode, draft step, verify)."""

    def __init__(self, gamma_max: int):
        self.gamma_max = gamma_max
        self._lock = threading.Lock()
        self.iterations_spec = 0
        self.iterations_plain = 0
        self.drafted = 0
        self.accepted = 0
        self.verified_requests = 0
        self.position_proposed = [0] * gamma_max
        self.position_accepted = [0] * gamma_max
        self.source_counts: dict[str, list[int]] = {}  # source -> [drafted, accepted]
        self.phase_seconds = {"plain": 0.0, "draft_step": 0.0, "verify": 0.0}
        self.phase_calls = {"plain": 0, "draft_step": 0, "verify": 0}
        self._prom = _Prom(gamma_max) if os.environ.get("PROMETHEUS_MULTIPROC_DIR") else None

    def record(
        self,
        gamma: int,
        accept_lens: torch.Tensor | None,
        bs: int,
        phases: dict[str, tuple[float, int]] | None = None,
        sources: list[str] | None = None,
    ) -> None:
        """One iteration: γ, accepted drafts per request [B] (None for γ = 0),
        ``phases`` = {name: (seconds, forwards)}, and where each request's drafts came from
        (``sources`` [B]; None: all from the W4 drafter)."""
        prom = self._prom
        with self._lock:
            for name, (sec, calls) in (phases or {}).items():
                self.phase_seconds[name] += sec
                self.phase_calls[name] += calls
                if prom:
                    prom.phase_seconds.labels(phase=name).inc(sec)
                    prom.phase_calls.labels(phase=name).inc(calls)
            if prom:
                prom.gamma.set(gamma)
                prom.gamma_hist.observe(gamma)
            if gamma == 0 or accept_lens is None:
                self.iterations_plain += 1
                if prom:
                    prom.iterations.labels(mode="plain").inc()
                return
            acc = accept_lens.to("cpu", torch.int64).tolist()  # one transfer, then plain ints
            accepted_at = [sum(1 for a in acc if a > k) for k in range(gamma)]
            self.iterations_spec += 1
            self.verified_requests += bs
            self.drafted += gamma * bs
            total = sum(acc)
            self.accepted += total
            for k in range(gamma):
                self.position_proposed[k] += bs
                self.position_accepted[k] += accepted_at[k]
            by_source: dict[str, list[int]] = {}
            for i, src in enumerate(sources or ["w4"] * bs):
                d = by_source.setdefault(src, [0, 0])
                d[0] += gamma
                d[1] += acc[i]
            for src, (d, a) in by_source.items():
                tot = self.source_counts.setdefault(src, [0, 0])
                tot[0] += d
                tot[1] += a
                if prom:
                    prom.source_drafted.labels(source=src).inc(d)
                    prom.source_accepted.labels(source=src).inc(a)
            if prom:
                prom.iterations.labels(mode="spec").inc()
                prom.drafted.inc(gamma * bs)
                prom.accepted.inc(total)
                for k in range(gamma):
                    prom.pos_proposed.labels(position=str(k)).inc(bs)
                    prom.pos_accepted.labels(position=str(k)).inc(accepted_at[k])

    def record_policy(self, policy_state: dict) -> None:
        """Export the γ chooser's live estimates (called every few iterations)."""
        prom = self._prom
        if not prom:
            return
        for phase, e in policy_state["model_error"].items():
            if e["window"] and e["bw_util"] is not None:
                prom.bw_util.labels(phase=phase).set(e["bw_util"])
                prom.model_error.labels(phase=phase).set(e["mean_rel_err_corrected"])
        for k, a in enumerate(policy_state["alphas"], start=1):
            prom.alpha.labels(position=str(k)).set(a)

    def record_requantize(self, seconds: float) -> None:
        if self._prom:
            self._prom.requantizations.inc()
            self._prom.requantize_seconds.set(seconds)

    @property
    def mean_accept_length(self) -> float:
        """Tokens emitted per verified request-iteration (accepted drafts + 1)."""
        return (self.accepted + self.verified_requests) / max(1, self.verified_requests)

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "iterations_spec": self.iterations_spec,
                "iterations_plain": self.iterations_plain,
                "drafted": self.drafted,
                "accepted": self.accepted,
                "mean_accept_length": self.mean_accept_length,
                "by_source": {k: {"drafted": d, "accepted": a} for k, (d, a) in self.source_counts.items()},
                "position_acceptance": [
                    a / p if p else None for a, p in zip(self.position_accepted, self.position_proposed)
                ],
                "mean_phase_seconds": {
                    k: self.phase_seconds[k] / self.phase_calls[k] if self.phase_calls[k] else None
                    for k in self.phase_seconds
                },
            }


class Timeline:
    """The last ``capacity`` decode iterations, one dict each, for the eval harness's γ timeline
    and for calibration sweeps (read through ``/get_server_info``; see :mod:`sglang_er.engine.server_info`).

    Record keys: iteration, time (unix s), gamma, batch_size, seq_lens (committed lengths [B]),
    plain_s / draft_s (all γ steps) / verify_s (None where not run), accepted (Σ accepted drafts,
    None at γ = 0), predicted_speedup (auto mode: predicted tokens/s at γ over γ = 0),
    best_spec_speedup (auto mode: the best speculative γ's predicted tokens/s over γ = 0), wall_s
    (entry of this decode iteration to entry of the next, scheduler work included; absent when
    a prefill or an idle spell came between).
    """

    def __init__(self, capacity: int = 4096):
        self._buf: deque = deque(maxlen=capacity)
        self._lock = threading.Lock()

    def append(self, **record) -> dict:
        record["time"] = time.time()
        with self._lock:
            self._buf.append(record)
        return record

    def snapshot(self, last: int | None = None) -> list[dict]:
        with self._lock:
            out = list(self._buf)
        return out[-last:] if last else out
