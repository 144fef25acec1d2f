"""Measured forward costs per (batch-size octave, γ) (sglang_er.gamma.measured): engine-free."""

from __future__ import annotations

import pytest

from sglang_er.gamma.measured import MEASURED_EMA, MeasuredTimes, nearest_ratio


def test_an_entry_is_the_smoothed_ratio_of_measured_to_raw_seconds_in_its_octave():
    m = MeasuredTimes(stale_after=10)
    assert m.ratio(8, 2, 0) is None and m.last_measured(8, 2) is None
    m.observe(8, 2, 0.30, 0.15, iteration=1)  # the first measurement sets it
    assert m.ratio(8, 2, 1) == pytest.approx(2.0)
    m.observe(12, 2, 0.40, 0.40, iteration=2)  # batch 12 is in 8's octave (8..15)
    assert m.ratio(15, 2, 2) == pytest.approx(2.0 + MEASURED_EMA * (1.0 - 2.0))
    assert m.ratio(16, 2, 2) is None and m.ratio(8, 3, 2) is None  # another octave, another γ
    assert m.last_measured(9, 2) == 2


def test_an_entry_goes_stale_and_a_fresh_measurement_replaces_it():
    m = MeasuredTimes(stale_after=10)
    m.observe(4, 0, 0.2, 0.1, iteration=5)
    assert m.ratio(4, 0, 15) == pytest.approx(2.0) and m.ratio(4, 0, 16) is None
    m.observe(4, 0, 0.1, 0.1, iteration=30)  # stale: not averaged with the old ratio
    assert m.ratio(4, 0, 30) == pytest.approx(1.0)
    m.observe(4, 0, 0.0, 0.1, iteration=31)  # not a measurement
    assert m.ratio(4, 0, 31) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="stale_after"):
        MeasuredTimes(stale_after=0)


def test_an_unmeasured_gamma_borrows_the_nearest_measured_ratio():
    assert nearest_ratio({}, 3) is None  # nothing measured in the octave
    assert nearest_ratio({1: 2.0, 6: 5.0}, 3) == pytest.approx(2.0)  # γ = 1 is nearer than γ = 6
    assert nearest_ratio({1: 2.0, 6: 5.0}, 5) == pytest.approx(5.0)
    assert nearest_ratio({2: 2.0, 4: 4.0}, 3) == pytest.approx(2.0)  # a tie: the smaller γ
