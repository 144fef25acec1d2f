"""The γ choice: each decode iteration, γ = argmax over {0} ∪ ladder of predicted tokens/s.

γ = 0 is one plain target forward (1 token per request); γ ≥ 1 is γ W4-drafter steps plus one
verify over γ+1 tokens, committing E[L|γ] tokens per request. RL rollouts start with a large
batch (compute-bound: speculation loses) and end in a long tail of few requests (memory- and
overhead-bound: it wins), so γ must follow the batch. What is never chosen is never measured, so
the choice also explores the option it rejects now and then (:meth:`GammaChooser._explore`), and
where an option was measured lately its measured cost replaces the model's
(:mod:`sglang_er.gamma.measured`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sglang_er.gamma.acceptance import AcceptanceModel
from sglang_er.gamma.batch import BatchStats, SeqLens, batch_stats
from sglang_er.gamma.cost_model import CostModel
from sglang_er.gamma.measured import MeasuredTimes, nearest_ratio

__all__ = ["EXPLORE_RUN", "FORCED_EXPLORE_PERIODS", "RETIME_ITERATIONS", "Decision", "GammaChooser"]

# A batch-size octave where plain, or speculation, has not run for this many iterations gets one
# iteration of it (see GammaChooser._explore).
RETIME_ITERATIONS = 2048
# Whatever it predicts, the γ chooser speculates once after this many explore_every periods of
# plain iterations (256 by default: at most 0.4% of iterations at a predicted loss), so an
# estimate that a bad measurement pushed below the exploration floor is measured again.
FORCED_EXPLORE_PERIODS = 8
# An exploration (of speculation, of plain, of a neighbouring γ) runs this many iterations in a row:
# an iteration that changes γ is not timed (see GammaChooser.observe_forwards; a plain step right
# after speculative ones took 125 ms against 105-113 ms among plain ones, Qwen2.5-0.5B at B = 8 on
# 2 CPU cores), nor are the cold draft steps after plain ones (see Controller.observe; 1.5-2.5x warm
# ones on gsm8k-lm), so a single one would teach nothing.
EXPLORE_RUN = 2


@dataclass(frozen=True)
class Decision:
    """γ for this iteration and why. Per candidate γ (0 = plain): predicted tokens/s of the
    batch, predicted iteration seconds, expected tokens committed (Σ_b E[L_b|γ])."""

    gamma: int
    predicted_tokens_per_s: dict[int, float]
    reason: str
    predicted_iter_s: dict[int, float] = field(default_factory=dict)
    expected_tokens: dict[int, float] = field(default_factory=dict)

    @property
    def speedup(self) -> float:
        """Predicted tokens/s at the chosen γ over plain decoding (nan without predictions)."""
        tps = self.predicted_tokens_per_s
        if self.gamma in tps and tps.get(0):
            return tps[self.gamma] / tps[0]
        return float("nan")

    @property
    def best_spec_speedup(self) -> float:
        """The best speculative γ's predicted tokens/s over plain (on a plain iteration: by how
        much speculation was predicted to lose; nan without predictions)."""
        tps = self.predicted_tokens_per_s
        spec = [v for g, v in tps.items() if g]
        return max(spec) / tps[0] if spec and tps.get(0) else float("nan")


class GammaChooser:
    """γ* = argmax over {0} ∪ ladder of predicted tokens/s, O(|ladder|·γmax + B) per call.

    tokens/s(γ) = Σ_b E[L_b|γ] / (Σ_{j<γ} T_D(j) + T_V(γ)); tokens/s(0) = B / T_T.
    Ties go to the smaller γ. Speculation must beat plain by ``min_gain`` (1.0: any gain). A
    change from the previous choice must gain more than ``hysteresis`` (relative), so γ does
    not flap between two nearly equal options as lengths creep up. The decision is a pure
    function of (inputs, previous γ, the models' state), plus exploration (:meth:`_explore`).
    """

    def __init__(
        self,
        cost_model: CostModel,
        acceptance: AcceptanceModel,
        ladder: Iterable[int] | None = None,
        min_gain: float = 1.0,
        hysteresis: float = 0.02,
        explore_every: int = 32,
        explore_floor: float = 0.7,
    ) -> None:
        self.cost_model = cost_model
        self.acceptance = acceptance
        gmax = acceptance.gamma_max
        if ladder is None:
            ladder = range(1, gmax + 1)
        lad = sorted({int(g) for g in ladder} - {0})
        if any(g < 0 for g in lad):
            raise ValueError(f"ladder entries must be >= 0, got {sorted(ladder)}")
        if lad and lad[-1] > gmax:
            raise ValueError(f"ladder {lad} exceeds the acceptance model's γmax = {gmax}")
        if min_gain <= 0 or hysteresis < 0:
            raise ValueError("min_gain must be > 0 and hysteresis >= 0")
        self.ladder = lad
        self.min_gain = float(min_gain)
        self.hysteresis = float(hysteresis)
        if explore_every < 0 or not 0.0 <= explore_floor <= 1.0:
            raise ValueError("explore_every must be >= 0 and explore_floor in [0, 1]")
        self.explore_every = int(explore_every)
        self.explore_floor = float(explore_floor)
        self.last_gamma: int | None = None
        self._plain_streak = self._spec_streak = 0
        self._iteration = 0
        self._explore_run, self._explore_gamma = 0, 0  # iterations left of an exploration, and its γ
        # batch-size octave -> how many explore_every periods of plain iterations the next speculative
        # exploration there waits (doubled each time one ends with plain still chosen; see _explore)
        self._backoff: dict[int, int] = {}
        self._explored_octave: int | None = None  # the octave of the exploration not yet judged
        self._plain_timed: dict[int, int] = {}  # batch-size octave -> iteration plain last ran
        self._spec_timed: dict[int, int] = {}  # batch-size octave -> iteration speculation last ran
        # measured iteration costs per (octave, γ); an entry unrefreshed for this long is the model's again
        self.measured = MeasuredTimes(FORCED_EXPLORE_PERIODS * self.explore_every or RETIME_ITERATIONS)
        self._since_neighbour = 0  # speculative iterations since a neighbouring γ was measured
        self._pending: tuple | None = None  # (batch, γ, forward seconds, raw) until its wall time is known
        self._ran: int | None = None  # γ of the latest iteration
        self._switched = True  # whether it changed γ (then it is not measured)
        self._neighbour_left, self._neighbour_gamma = 0, 0  # iterations left of a neighbour's exploration

    def reset(self) -> None:
        """A new drafter: no previous choice to keep, and what explorations taught about it is moot."""
        self.last_gamma = None
        self._backoff.clear()

    # ------------------------------------------------------------------ evaluation
    def _predict(self, st: BatchStats, rids) -> tuple[dict, dict, dict]:
        cm, acc = self.cost_model, self.acceptance
        exp = acc.batch_expected_tokens(st.batch, rids)
        cands = [0, *self.ladder]
        raw: dict[int, float] = {}
        secs = cm.iteration_times(st, cands, raw)
        # measured lately in this octave: the measurement, scaled to this batch; a speculative γ
        # not measured here lately: the level of its nearest measured one (see MeasuredTimes)
        ratios = {g: self.measured.ratio(st.batch, g, self._iteration) for g in cands}
        spec = {g: r for g, r in ratios.items() if g and r is not None}
        for g in cands:
            r = ratios[g] if ratios[g] is not None or not g else nearest_ratio(spec, g)
            if r is not None:
                secs[g] = r * raw[g]
        toks = {g: exp[g] for g in cands}
        tps = {g: exp[g] / secs[g] for g in cands}
        return tps, secs, toks

    def choose(self, seq_lens: SeqLens | BatchStats, rids: Sequence[Any] | None = None) -> Decision:
        """γ for this iteration (with hysteresis against the previous choice, which it updates).

        seq_lens [B]: committed length of each request, or a :class:`BatchStats` already
        summarised (with the radix-shared prefix tokens); rids [B]: request ids for per-request
        acceptance. After :meth:`reset` there is no previous choice to keep.
        """
        st = batch_stats(seq_lens)
        d = self._decide(st, rids, prev=self.last_gamma)
        e = self._explore(d, st.batch)
        # a neighbouring γ measured in passing is not a choice to keep (hysteresis stays with d)
        self.last_gamma = d.gamma if d.gamma and e.gamma else e.gamma
        self._switched, self._ran = e.gamma != self._ran, e.gamma
        self._iteration += 1
        (self._spec_timed if e.gamma else self._plain_timed)[st.batch.bit_length()] = self._iteration
        return e

    def observe_forwards(self, seq_lens: SeqLens | BatchStats, gamma: int, seconds: float) -> None:
        """The forwards of the iteration just chosen for this batch took ``seconds`` (plain: the
        target step; γ ≥ 1: every draft step and the verify). Held until :meth:`observe_outside`
        completes the iteration's wall time. An iteration that changed γ is not kept: on 2 CPU
        cores one at γ = 2 took 0.25 s between γ = 6 ones and 0.21 s among γ = 2 ones, and that
        toll, taken for the cost of γ, made every γ but the current one look slower than it is."""
        if self._switched:
            self._pending = None
            return
        st = batch_stats(seq_lens)
        raw: dict[int, float] = {}
        self.cost_model.iteration_times(st, [gamma], raw)
        self._pending = (st.batch, gamma, seconds, raw[gamma])

    def observe_outside(self, gamma: int, batch: int, seconds: float) -> None:
        """The scheduler's time around that iteration's forwards: with them, an entry of
        :attr:`measured`. The whole iteration, because the work around the forwards grows with
        the tokens an iteration commits (at 4 requests on 2 CPU cores: 13 ms at γ = 2, 40 ms at
        γ = 4), which a per-mode fit of it does not see."""
        pending, self._pending = self._pending, None
        if pending is not None and pending[:2] == (batch, gamma):
            self.measured.observe(batch, gamma, pending[2] + seconds, pending[3], self._iteration)

    def _explore(self, d: Decision, batch: int) -> Decision:
        """What is never chosen is never measured, so a wrong estimate of it would stand for good.

        While γ = 0 is chosen, acceptance is not measured: an estimate that was low once (a cold
        start, the RTN drafter before AWQ, an old policy) would keep speculation off. While
        speculating, the plain step is not timed: a profile that overestimates it (its fixed
        overhead was measured on a deeper model) would keep speculation on. So every
        ``explore_every``-th consecutive iteration of one kind runs the other -- the best γ, or
        plain, for EXPLORE_RUN iterations, the first of which is not timed -- where that is
        predicted within ``explore_floor`` of the choice (never in a clearly one-sided regime).
        Timed, plain's step teaches the correction and its measured cost replaces the model's,
        as speculation's does; learnt from single plain steps between speculative ones alone,
        each carrying the toll of a change of γ, the correction priced plain too high and could
        keep speculation on where it lost. Besides, plain runs after 4 speculative iterations in
        every batch-size octave where it has not been timed for ``RETIME_ITERATIONS``:
        as a rollout's batch shrinks, that gives the correction plain times across batch sizes
        (a handful of iterations per rollout). Likewise the best γ runs once after 4 plain
        iterations in every octave where speculation has not run for that long, whatever is
        predicted: a profile whose error grows with the batch (seen on gsm8k-lm) otherwise keeps a large batch plain,
        because the tail's speculative iterations reset the plain streak the forced exploration
        waits for. Otherwise at most 1/explore_every of the iterations, each losing at most
        1 − floor -- plus, whatever is predicted, one γ iteration after
        ``FORCED_EXPLORE_PERIODS · explore_every`` consecutive plain ones, so that no
        estimate, however it went wrong, keeps speculation off without being measured again.

        A speculative exploration that ends with plain still chosen doubles the wait before the
        next one in its octave, up to that forced period; speculation chosen there, or a new
        drafter (:meth:`reset`), restores it. Where every γ loses (Qwen2.5-0.5B at B = 16 on 2 CPU
        cores: 72 against plain's 84 tok/s, the first iteration cold), explorations every 32
        plain iterations cost 4% of the time; backed off, under 1%."""
        if not self.explore_every or not self.ladder:
            self._plain_streak = self._spec_streak = 0
            return d
        tps = d.predicted_tokens_per_s
        if self._explore_run:
            self._explore_run -= 1
            g = self._explore_gamma
            if bool(d.gamma) != bool(g) and g in tps:  # the exploration's timed iteration(s)
                if g:
                    self._spec_streak += 1
                return Decision(
                    g,
                    tps,
                    f"explore {f'γ={g}' if g else 'plain'}, continued (its first iteration changed γ and is not timed)",
                    d.predicted_iter_s,
                    d.expected_tokens,
                )
            self._explore_run = 0
        octave = batch.bit_length()
        if self._explored_octave is not None:  # the exploration is over: it taught what it could
            o, self._explored_octave = self._explored_octave, None
            if o == octave:
                self._backoff[o] = 1 if d.gamma else min(2 * self._backoff.get(o, 1), FORCED_EXPLORE_PERIODS)
        if d.gamma:
            self._backoff.pop(octave, None)
            self._plain_streak = 0
            self._spec_streak += 1
            self._since_neighbour += 1
            # a batch-size octave where plain was not timed lately: the correction's shape there
            # is a guess (fixed overhead vs per-request slope), so time it once whatever it predicts
            unseen = self._unseen(self._plain_timed, batch)
            if (unseen and self._spec_streak >= min(4, self.explore_every)) or (
                self._spec_streak >= self.explore_every and tps[0] >= self.explore_floor * tps[d.gamma]
            ):
                self._spec_streak = 0
                self._explore_run, self._explore_gamma = EXPLORE_RUN - 1, 0
                return Decision(
                    0,
                    tps,
                    f"explore plain: re-time the plain step at batch {batch} "
                    f"(predicted {tps[0] / tps[d.gamma]:.3f}× γ={d.gamma})",
                    d.predicted_iter_s,
                    d.expected_tokens,
                )
            return self._explore_neighbour(d, batch)
        self._spec_streak = 0
        self._plain_streak += 1
        best = max(self.ladder, key=lambda g: (tps.get(g, 0.0), -g))
        forced = self._plain_streak >= FORCED_EXPLORE_PERIODS * self.explore_every or (
            self._unseen(self._spec_timed, batch) and self._plain_streak >= min(4, self.explore_every)
        )
        period = self.explore_every * self._backoff.get(octave, 1)
        if forced or (self._plain_streak >= period and tps.get(best, 0.0) >= self.explore_floor * tps[0]):
            streak, self._plain_streak = self._plain_streak, 0
            self._explore_run, self._explore_gamma = EXPLORE_RUN - 1, best
            self._explored_octave = octave
            return Decision(
                best,
                tps,
                f"explore γ={best}: refresh acceptance after {streak} plain "
                f"iterations (predicted {tps[best] / tps[0]:.3f}× plain)",
                d.predicted_iter_s,
                d.expected_tokens,
            )
        return d

    def _explore_neighbour(self, d: Decision, batch: int) -> Decision:
        """While speculating at γ, measure γ − 1 or γ + 1 now and then, so that the choice between
        neighbours rests on :attr:`measured` rather than on the model's slope over γ (see
        :mod:`sglang_er.gamma.measured`). A neighbour not measured lately in this batch-size octave
        runs after 4 speculative iterations, otherwise the one measured longest ago every
        ``explore_every``; only where predicted within ``explore_floor`` of γ. Two iterations each:
        the first, a change of γ, is not timed (see :meth:`observe_forwards`)."""
        g, tps = d.gamma, d.predicted_tokens_per_s
        if self._neighbour_left:
            self._neighbour_left -= 1
            n = self._neighbour_gamma
            if n in tps:
                return Decision(
                    n,
                    tps,
                    f"explore γ={n}, continued (its first iteration is not timed)",
                    d.predicted_iter_s,
                    d.expected_tokens,
                )
        near = [n for n in (g - 1, g + 1) if n in tps and n and tps[n] >= self.explore_floor * tps[g]]
        if not near:
            return d
        last = {n: self.measured.last_measured(batch, n) for n in near}
        n = min(near, key=lambda n: -1 if last[n] is None else last[n])
        unseen = not self.measured.fresh_at((self.measured.octave(batch), n), self._iteration)
        if self._since_neighbour < (min(4, self.explore_every) if unseen else self.explore_every):
            return d
        self._since_neighbour = 0
        self._neighbour_left, self._neighbour_gamma = EXPLORE_RUN - 1, n
        return Decision(
            n,
            tps,
            f"explore γ={n}: measure the neighbour of γ={g} at batch {batch} (predicted {tps[n] / tps[g]:.3f}× it)",
            d.predicted_iter_s,
            d.expected_tokens,
        )

    def _unseen(self, timed: dict, batch: int) -> bool:
        """No iteration of that kind in this batch-size octave for RETIME_ITERATIONS iterations."""
        last = timed.get(batch.bit_length())
        return last is None or self._iteration - last > RETIME_ITERATIONS

    def _decide(self, st: BatchStats, rids: Sequence[Any] | None, prev: int | None) -> Decision:
        if rids is not None and len(rids) != st.batch:
            raise ValueError(f"{len(rids)} rids for a batch of {st.batch}")
        tps, secs, toks = self._predict(st, rids)
        best = 0
        for g in self.ladder:  # ascending, strict '>': ties keep the smaller γ
            if tps[g] > tps[best]:
                best = g
        plain = tps[0]
        if best and tps[best] < self.min_gain * plain:
            reason = f"plain: best γ={best} predicts {tps[best] / plain:.3f}× plain, below min_gain {self.min_gain:g}"
            best = 0
        elif best:
            reason = f"γ={best}: {tps[best]:.4g} tok/s vs plain {plain:.4g} (×{tps[best] / plain:.3f})"
        else:
            sb = max(self.ladder, key=lambda g: (tps[g], -g)) if self.ladder else None
            reason = (
                "plain: no speculative γ in the ladder"
                if sb is None
                else f"plain: best γ={sb} predicts only {tps[sb] / plain:.3f}× plain"
            )
        # Stick with the previous γ unless the new best beats it by the hysteresis margin; a
        # previous speculative γ must still clear min_gain within that margin to be kept.
        prev_ok = prev in tps and (prev == 0 or tps[prev] * (1.0 + self.hysteresis) >= self.min_gain * plain)
        if prev is not None and prev != best and prev_ok and tps[best] <= tps[prev] * (1.0 + self.hysteresis):
            reason = (
                f"kept γ={prev} (hysteresis {self.hysteresis:g}): γ={best} predicts only "
                f"{tps[best] / tps[prev]:.3f}× it"
            )
            best = prev
        return Decision(best, tps, reason, secs, toks)
