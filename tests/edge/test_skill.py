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


def test_real_time_fills_scored_once_against_the_revision_by_hand():
    t = SkillTracker(["a", "b"], np.array([1.0, 2.0]), horizon=2, cadence_s=3600, settings=SkillSettings(fill_steps=4))
    t.note_fill("s", 10, np.array([5.0, 1.0]), np.array([True, True]))
    t.note_fill("s", 10, np.array([9.0, 9.0]), np.array([True, True]))  # only the first real-time fill counts
    t.note_fill("s", 11, np.array([6.0, 2.0]), np.array([False, True]))  # a observed in real time: not scored
    t.note_fill("s", 12, np.array([7.0, 3.0]), np.array([False, False]))  # nothing imputed: nothing kept
    # revision of steps 10..12: a |5 - 4| = 1; b |1 - 4| = 3, |2 - 0| = 2
    assert t.observe_revision("s", 10, np.array([[4.0, 4.0], [6.0, 0.0], [7.0, 3.0]])) == 3
    r = t.revision_mae("s")
    assert r["channels"] == {"a": {"mae": 1.0, "n": 1}, "b": {"mae": 2.5, "n": 2}} and r["n"] == 3
    assert r["mae_norm"] == pytest.approx((1 / 1 + 3 / 2 + 2 / 2) / 3)  # pooled over channels: error / scale
    assert t.observe_revision("s", 10, np.array([[0.0, 0.0], [0.0, 0.0]])) == 0  # each fill is scored once
    assert t.revision_mae() == r  # the gateway pools its one station
    assert t.revision_mae("other") == {"channels": {"a": {"mae": None, "n": 0}, "b": {"mae": None, "n": 0}},
                                       "mae_norm": None, "n": 0}


def test_real_time_fills_are_a_bounded_ring_and_roll_with_the_span():
    t = SkillTracker(["a"], np.array([1.0]), horizon=2, cadence_s=3600,
                     settings=SkillSettings(fill_steps=3, span_s=2 * 86400.0, n_bins=2))  # fmt: skip
    for step in range(10):  # ten steps through a ring of three: steps 7, 8, 9 are kept
        t.note_fill("s", step, np.array([float(step)]), np.array([True]))
    st = t.stations["s"]
    assert sorted(st.rt_step.tolist()) == [7, 8, 9] and st.rt_fill.shape == (3, 1)
    assert t.observe_revision("s", 0, np.zeros((10, 1))) == 3  # steps 0..6 were evicted: 7 + 8 + 9 over 3
    assert t.revision_mae("s")["channels"]["a"] == {"mae": 8.0, "n": 3}
    # two days later (two 1-day bins), that day's bin rolls out of the span
    t.note_fill("s", 58, np.array([1.0]), np.array([True]))
    assert t.observe_revision("s", 58, np.array([[0.0]])) == 1
    assert t.revision_mae("s")["channels"]["a"] == {"mae": 1.0, "n": 1}
    # a revision of a step older than the span is counted nowhere (not in a newer bin either)
    t.note_fill("s", 9, np.array([5.0]), np.array([True]))
    assert t.observe_revision("s", 9, np.array([[0.0]])) == 0
    assert t.revision_mae("s")["channels"]["a"] == {"mae": 1.0, "n": 1}


def test_revision_skill_round_trips_and_is_off_without_fill_steps():
    settings = SkillSettings(fill_steps=4)
    t = SkillTracker(["a"], np.array([2.0]), horizon=2, cadence_s=3600, settings=settings)
    t.note_fill("s", 1, np.array([3.0]), np.array([True]))
    t.note_fill("s", 2, np.array([4.0]), np.array([True]))
    assert t.observe_revision("s", 1, np.array([[1.0]])) == 1
    again = SkillTracker(["a"], np.array([2.0]), horizon=2, cadence_s=3600, settings=settings)
    assert again.restore_state(t.export_state()) == 1
    assert again.revision_mae("s") == t.revision_mae("s") == {"channels": {"a": {"mae": 2.0, "n": 1}}, "mae_norm": 1.0, "n": 1}
    assert again.observe_revision("s", 2, np.array([[0.0]])) == 1  # the pending real-time fill came along
    assert again.revision_mae("s")["channels"]["a"] == {"mae": 3.0, "n": 2}
    # a snapshot from before the revision skill (no rt_* / rev_* arrays) still restores the forecast skill
    old = {k: {n: v for n, v in a.items() if not n.startswith(("rt_", "rev_"))} for k, a in t.export_state().items()}
    fresh = SkillTracker(["a"], np.array([2.0]), horizon=2, cadence_s=3600, settings=settings)
    assert fresh.restore_state(old) == 1 and fresh.revision_mae("s")["n"] == 0
    off = SkillTracker(["a"], np.array([2.0]), horizon=2, cadence_s=3600)
    off.note_fill("s", 1, np.array([3.0]), np.array([True]))
    assert off.observe_revision("s", 1, np.array([[1.0]])) == 0 and "s" not in off.stations
