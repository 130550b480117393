"""edge.skill: online forecast skill against persistence / seasonal naive, and drift (hand-computed)."""

from __future__ import annotations

import numpy as np
import pytest

from gapcast.edge.skill import SkillSettings, SkillTracker, horizon_buckets


def test_buckets_are_durations():
    assert horizon_buckets(24, 3600) == [("1h-6h", 1, 6), ("7h-24h", 7, 24)]
    assert horizon_buckets(144, 600) == [("10min-360min", 1, 36), ("370min-1440min", 37, 144)]
    assert horizon_buckets(96, 3600) == [("1h-24h", 1, 24), ("25h-96h", 25, 96)]
    assert horizon_buckets(7, 86400) == [("24h-24h", 1, 1), ("2d-7d", 2, 7)]


def test_one_forecast_scored_by_hand():
    t = SkillTracker(["a", "b"], np.array([1.0, 2.0]), horizon=4, cadence_s=3600)
    fc = np.array([[1, 2], [2, 4], [3, 6], [4, 8]], dtype=float)
    t.issue("s1", 10, fc, last_value=np.array([0.0, 0.0]))
    # step 11 (h = 1): truth [1.5, 2] -> model |err| / scale = [0.5, 0]; persistence [1.5, 1]
    assert t.observe("s1", 11, np.array([1.5, 2.0]), np.array([True, True])) == 2
    # step 12 (h = 2): only channel b observed: truth 6 -> model |4-6|/2 = 1, persistence 6/2 = 3
    assert t.observe("s1", 12, np.array([9.0, 6.0]), np.array([False, True])) == 1
    figs = t.station_mae("s1")
    b1, b2 = figs["buckets"]["1h-1h"], figs["buckets"]["2h-4h"]
    assert b1["model"] == pytest.approx(0.25) and b1["persistence"] == pytest.approx(1.25) and b1["n"] == 2
    assert b2["model"] == pytest.approx(1.0) and b2["persistence"] == pytest.approx(3.0) and b2["n"] == 1
    assert figs["ratio"] == pytest.approx((0.5 + 1.0) / (2.5 + 3.0))
    assert t.observe("s1", 15, np.array([1.0, 1.0]), np.array([True, True])) == 0  # h = 5 > H: nothing pending


def test_seasonal_naive_needs_its_value_and_is_the_reference_when_better():
    t = SkillTracker(["a"], np.array([1.0]), horizon=2, cadence_s=3600, settings=SkillSettings(season_steps=24))
    t.issue("s", 0, np.array([[5.0], [5.0]]), last_value=np.array([0.0]))
    # no seasonal value observed -> the step is not scored for anyone (same steps for every method)
    assert t.observe("s", 1, np.array([4.0]), np.array([True]), np.array([4.0]), np.array([False])) == 0
    assert t.observe("s", 2, np.array([4.0]), np.array([True]), np.array([4.5]), np.array([True])) == 1
    b = t.station_mae("s")["buckets"]
    (label,) = [k for k in b if b[k]["n"]]
    assert b[label]["model"] == pytest.approx(1.0) and b[label]["persistence"] == pytest.approx(4.0)
    assert b[label]["seasonal_naive"] == pytest.approx(0.5)
    assert t.station_mae("s")["ratio"] == pytest.approx(1.0 / 0.5)  # model vs the better naive (seasonal)


def _run(tracker, model_fn, steps, truth_fn):
    drift = []
    for s in range(steps):
        truth = truth_fn(s)
        tracker.observe("st", s, truth, np.ones(2, bool))
        last = truth
        fc = np.stack([model_fn(s + h) for h in range(1, tracker.H + 1)])
        tracker.issue("st", s, fc, last)
        ev = tracker.check_drift("st", s * tracker.cadence_s)
        drift.append(ev)
    return drift


def test_garbage_forecasts_raise_drift_within_the_span_and_good_ones_never():
    truth = lambda s: np.array([10 + np.sin(s / 3), 5 + np.cos(s / 5)])  # noqa: E731
    settings = SkillSettings(span_s=2 * 86400, n_bins=4, drift_after_s=6 * 3600, min_count=50)
    good = SkillTracker(["a", "b"], np.array([1.0, 1.0]), 6, 3600, settings)
    assert all(ev is None for ev in _run(good, truth, 200, truth))  # a perfect model: ratio 0
    bad = SkillTracker(["a", "b"], np.array([1.0, 1.0]), 6, 3600, settings)
    events = _run(bad, lambda s: np.array([100.0, -100.0]), 200, truth)
    first = next(i for i, ev in enumerate(events) if ev is not None)
    # min_count 50 values is reached after ~5 steps; drift needs 6 h more of being worse: raised by step ~12
    assert 6 <= first <= 14, first
    ev = events[-1]
    assert ev["ratio"] > 10 and ev["for_s"] >= 6 * 3600 and ev["n"] >= 50


def test_span_rolls_and_state_round_trips():
    settings = SkillSettings(span_s=4 * 3600, n_bins=4)
    t = SkillTracker(["a"], np.array([1.0]), 1, 3600, settings)
    for s in range(10):
        t.issue("x", s, np.array([[1.0]]), np.array([0.0]))
        t.observe("x", s + 1, np.array([2.0]), np.array([True]))
    assert t.station_mae("x")["n"] == 4  # only the last 4 hourly bins count
    u = SkillTracker(["a"], np.array([1.0]), 1, 3600, settings)
    assert u.restore_state(t.export_state()) == 1
    assert u.station_mae("x") == t.station_mae("x")
    assert sorted(u.stations["x"].pending) == sorted(t.stations["x"].pending)
    with pytest.raises(ValueError, match="positive"):
        SkillTracker(["a"], np.array([0.0]), 1, 3600)
