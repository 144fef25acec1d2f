"""Measured forward costs per (batch-size octave, γ) (sglang_er.gamma.measured): engine-free."""

from __future__ import annotations

import pytest

from sglang_er.gamma.measured import MEASURED_EMA, MeasuredTimes


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


def test_an_unmeasured_gamma_borrows_the_nearest_fresh_speculative_ratio_of_its_octave():
    m = MeasuredTimes(stale_after=10)
    assert m.nearest_ratio(16, 3, 0) is None  # nothing measured
    m.observe(16, 0, 0.3, 0.1, iteration=1)  # plain's ratio is never lent to a γ
    assert m.nearest_ratio(16, 3, 1) is None
    m.observe(16, 1, 0.2, 0.1, iteration=2)
    m.observe(20, 6, 0.5, 0.1, iteration=3)
    m.observe(8, 3, 0.1, 0.1, iteration=3)  # another octave
    assert m.nearest_ratio(16, 3, 3) == pytest.approx(2.0)  # γ = 1 is nearer than γ = 6
    assert m.nearest_ratio(31, 5, 3) == pytest.approx(5.0)
    assert m.nearest_ratio(16, 0, 3) is None  # plain borrows nothing
    assert m.nearest_ratio(16, 3, 13) == pytest.approx(5.0)  # γ = 1 went stale, γ = 6 has not
    assert m.nearest_ratio(16, 3, 14) is None
