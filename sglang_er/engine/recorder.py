"""What one decode iteration leaves behind: phase times, counters, the γ choice's feedback, the timeline.

Kept apart from the worker so the speculative step reads as draft, verify, commit. Phase times come
from :class:`PhaseClock`, which on an accelerator records events instead of synchronising the device
at every phase; a speculative iteration's are read once its one host copy (the accepted lengths) has
synchronised anyway. A plain (γ = 0) iteration has no host copy: its time is read at the next
iteration's entry, when the scheduler has waited for it, so the overlap scheduler keeps launching
the next forward while the device runs it.
"""

from __future__ import annotations

import logging
import time

import torch

from sglang_er.engine import spec_meta
from sglang_er.metrics import SpecMetrics, Timeline

logger = logging.getLogger("sglang_er.engine.worker")
IDLE_GAP_S = 0.25  # time outside the forwards beyond this (and beyond the forwards') is idling


class PhaseClock:
    """Marks between phases; :meth:`seconds` gives each phase's duration.

    On CUDA the marks are events on the current stream, so marking costs no synchronisation;
    read them after something synchronised the stream (a host copy), or :meth:`seconds` waits
    for the last mark. On CPU the marks are wall-clock readings.
    """

    def __init__(self, device: torch.device):
        self._cuda = device.type == "cuda"
        self._marks: list[tuple[str, object]] = [("start", self._now())]

    def _now(self):
        if self._cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def mark(self, phase: str) -> None:
        """The phase named ``phase`` ends now (it began at the previous mark)."""
        self._marks.append((phase, self._now()))

    def done(self) -> bool:
        """Whether reading :meth:`seconds` would not wait for the device."""
        return not self._cuda or self._marks[-1][1].query()

    def seconds(self) -> dict[str, float]:
        """``{phase: seconds}`` of the phases marked so far."""
        if self._cuda:
            self._marks[-1][1].synchronize()  # a no-op once a host copy synchronised the stream
            return {name: a.elapsed_time(b) / 1e3 for (_, a), (name, b) in zip(self._marks, self._marks[1:])}
        return {name: b - a for (_, a), (name, b) in zip(self._marks, self._marks[1:])}


class IterationRecorder:
    """Feeds the counters (:class:`~sglang_er.metrics.SpecMetrics`), the γ choice's measurements
    (:class:`~sglang_er.gamma.controller.Controller`), the per-iteration timeline and the per-token
    γ tags behind ``meta_info`` from each iteration's outcome, and measures each iteration's wall
    time entry to entry (the scheduler's work around the forwards is part of speculation's price)."""

    def __init__(self, metrics: SpecMetrics, timeline: Timeline, controller, device: torch.device):
        self.metrics, self.timeline, self.controller, self.device = metrics, timeline, controller, device
        self.iteration = 0
        self._last = None  # the previous iteration's timeline record, until its wall time is known
        self._entered = 0.0
        self._unread = None  # a plain iteration whose time the device has not finished measuring

    def clock(self) -> PhaseClock:
        return PhaseClock(self.device)

    # ------------------------------------------------------------------ iteration boundaries
    def enter(self, now: float) -> None:
        """A decode iteration starts: the previous one's wall time is now known."""
        self._read_plain()
        self._close(now)
        self._entered = now

    def restart(self) -> None:
        """One-time work ran at entry (an AWQ switch, a vocabulary refresh): not the scheduler's
        per-iteration cost (a 0.17 s switch counted as "outside" time taught the γ choice that
        speculating costs 170 ms more per iteration)."""
        self._entered = time.perf_counter()

    def prefill(self) -> None:
        self._read_plain()
        self._last = None

    def _close(self, now: float) -> None:
        rec, self._last = self._last, None
        if rec is None:
            return
        wall = now - self._entered
        busy = rec["plain_s"] if rec["gamma"] == 0 else (rec["draft_s"] or 0.0) + rec["verify_s"]
        if wall - busy > max(IDLE_GAP_S, busy):  # the scheduler idled: not an iteration's cost
            return
        rec["wall_s"] = wall
        if self.controller is not None:
            self.controller.observe_outside(rec["gamma"], rec["batch_size"], max(0.0, wall - busy))

    # ------------------------------------------------------------------ outcomes
    def plain(self, reqs, seq_lens: list[int], clock: PhaseClock) -> None:
        """A plain step's outcome; its time (``clock``'s "plain" phase) is read now if the device is
        done, else at the next entry (:meth:`_read_plain`)."""
        spec_meta.tag(reqs, seq_lens, self.iteration, 0, [1] * len(reqs))
        self._unread = (clock, len(reqs), seq_lens)
        if clock.done():
            self._read_plain()

    def _read_plain(self) -> None:
        if self._unread is None:
            return
        (clock, bs, seq_lens), self._unread = self._unread, None
        t_plain = clock.seconds()["plain"]
        if self.controller is not None:
            self.controller.observe(0, {"plain": t_plain})
        self.metrics.record(0, None, bs, {"plain": (t_plain, 1)})
        self._log(bs, seq_lens, 0, plain_s=t_plain)

    def speculative(self, reqs, seq_lens: list[int], gamma: int, accepted: torch.Tensor, times: dict, plan) -> None:
        """accepted [B] (host): drafts accepted per request; times: {"draft", "draft_first", "verify"}
        seconds (no "draft*" when no drafter ran); plan: the history drafts' plan, or None."""
        bs = len(reqs)
        ran_drafter = "draft" in times
        phases = {"verify": (times["verify"], 1)}
        if ran_drafter:
            phases["draft_step"] = (times["draft"], gamma)
        sources = plan.source if plan is not None else None
        self.metrics.record(gamma, accepted, bs, phases, sources=sources)
        if self.controller is not None:
            timed = {k: times[k] for k in ("draft", "verify") if k in times}
            split = (times["draft_first"], times["draft"] - times["draft_first"]) if "draft_first" in times else None
            self.controller.observe(
                gamma, timed, accepted, rows=plan.w4_rows if plan is not None else None, draft_split=split
            )
        spec_meta.tag(reqs, seq_lens, self.iteration, gamma, (accepted + 1).tolist(), sources)
        self._log(
            bs,
            seq_lens,
            gamma,
            draft_s=times.get("draft"),
            verify_s=times["verify"],
            accepted=int(accepted.sum()),
            history_rows=len(plan.history_rows) if plan is not None else 0,
            sources=sources,
        )

    def _log(self, bs: int, seq_lens: list[int], gamma: int, **times) -> None:
        if self.controller is not None and self.iteration % 64 == 0:
            state = self.controller.state()
            self.metrics.record_policy(state)
            logger.info(
                "EFFROLLOUT auto: %s speculating so far, α %s, phase error %s",
                f"{self.metrics.iterations_spec / max(1, self.iteration):.0%}",
                [round(a, 2) for a in state["alphas"]],
                {
                    p: round(e["mean_rel_err_corrected"], 2)
                    for p, e in state["model_error"].items()
                    if e["window"] and e["mean_rel_err_corrected"] is not None
                },
            )
        decision = self.controller.last_decision if self.controller is not None else None
        self._last = self.timeline.append(
            iteration=self.iteration,
            gamma=gamma,
            batch_size=bs,
            seq_lens=seq_lens,
            plain_s=times.get("plain_s"),
            draft_s=times.get("draft_s"),
            verify_s=times.get("verify_s"),
            accepted=times.get("accepted"),
            history_rows=times.get("history_rows", 0),
            predicted_speedup=None if decision is None else _finite(decision.speedup),
            best_spec_speedup=None if decision is None else _finite(decision.best_spec_speedup),
        )


def _finite(x: float):
    return x if x == x and x not in (float("inf"), float("-inf")) else None
