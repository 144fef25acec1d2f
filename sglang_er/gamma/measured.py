"""Measured over modelled: what each γ's iterations really cost, per batch-size octave.

The cost model's live correction (:mod:`sglang_er.gamma.correction`) is one factor per phase,
learnt at the γ being run. Its error in the *slope* over γ stays: on 2 CPU cores at B = 8 the
profile priced a verify of 3 tokens per request 40% above one of 2, the measured step was 7%, so
the corrected model kept γ = 1 (1.2x plain) where γ = 2-3 ran 1.4x. Near the best γ the options
differ by 5-20%, less than any profile's error, so the choice there must rest on measurements.

:class:`MeasuredTimes` keeps, per (batch-size octave, γ), the ratio of the measured iteration
seconds (its forwards and the scheduler's work around them, entry to entry) to the profile's raw
prediction of its forwards for the same batch (an EMA). The raw prediction carries the batch size
and lengths within the octave; the ratio, measured at that very γ, carries the rest, including the
scheduler's per-token work, which grows with the tokens an iteration commits. A speculative γ
not measured lately borrows the ratio of the nearest one measured in its octave. An entry goes stale
after ``stale_after`` iterations without a measurement; the chooser then falls back to the model,
and its exploration (:meth:`GammaChooser._explore`) measures the γ next to the one it runs, so the
entries it compares are fresh.
"""

from __future__ import annotations

__all__ = ["MEASURED_EMA", "MeasuredTimes", "nearest_ratio"]

# Weight of a new measurement in an entry: a few iterations settle it, one outlier (a GC pause)
# moves it by less than a third.
MEASURED_EMA = 0.3


class MeasuredTimes:
    """(octave, γ) -> EMA of measured / raw forward seconds, and the iteration it was last updated."""

    def __init__(self, stale_after: int, ema: float = MEASURED_EMA) -> None:
        if stale_after < 1 or not 0.0 < ema <= 1.0:
            raise ValueError("stale_after must be >= 1 and ema in (0, 1]")
        self.stale_after = int(stale_after)
        self.ema = float(ema)
        self._ratio: dict[tuple[int, int], float] = {}
        self._when: dict[tuple[int, int], int] = {}

    @staticmethod
    def octave(batch: int) -> int:
        """Batch sizes 2^(k-1) .. 2^k - 1 share octave k."""
        return int(batch).bit_length()

    def observe(self, batch: int, gamma: int, measured_s: float, raw_s: float, iteration: int) -> None:
        """One timed iteration at ``gamma`` took ``measured_s``; the profile priced its forwards at ``raw_s``."""
        if not (measured_s > 0.0 and raw_s > 0.0):
            return
        key, r = (self.octave(batch), int(gamma)), measured_s / raw_s
        old = self._ratio.get(key)
        self._ratio[key] = r if old is None or self.fresh_at(key, iteration) is False else old + self.ema * (r - old)
        self._when[key] = iteration

    def fresh_at(self, key: tuple[int, int], iteration: int) -> bool | None:
        """None: never measured; else whether its last measurement is within ``stale_after``."""
        when = self._when.get(key)
        return None if when is None else iteration - when <= self.stale_after

    def ratio(self, batch: int, gamma: int, iteration: int) -> float | None:
        """measured / raw for ``gamma`` in ``batch``'s octave; None when never measured or stale."""
        key = (self.octave(batch), int(gamma))
        return self._ratio[key] if self.fresh_at(key, iteration) else None

    def last_measured(self, batch: int, gamma: int) -> int | None:
        """The iteration ``gamma`` was last measured in ``batch``'s octave (None: never)."""
        return self._when.get((self.octave(batch), int(gamma)))


def nearest_ratio(ratios: dict[int, float], gamma: int) -> float | None:
    """For a γ not measured lately in an octave: the ratio of the nearest γ that was (ties: the
    smaller), from ``ratios`` {γ: fresh ratio} of that octave's speculative γs; None if none was.
    The profile's slope over γ errs by less than its level does between octaves: at 16 requests
    on 2 CPU cores, with the correction learnt at 8, unmeasured γ = 1-8 were each predicted
    1.05-1.2x plain and each ran 0.8x."""
    if not ratios:
        return None
    return ratios[min(ratios, key=lambda g: (abs(g - gamma), g))]
