"""The pure agent core: closing on readings and on the clock, batching, revisions, fallbacks, policy, state.

Card used throughout (tests/edge/conftest.py): channels a (valid 0..100, mean 10, std 2) and b (valid -50..50,
mean 0, std 5), cadence 1 h, lookback 6, horizon 3. The fake backend imputes 0.5 (normalised) everywhere, i.e.
a = 10 + 0.5 * 2 = 11 and b = 0 + 0.5 * 5 = 2.5 in physical units.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import CADENCE, T0, FakeBackend, card_dict

from gapcast.edge.bundle import Card

NOW = T0 + 100 * CADENCE  # a tick time after every reading (on the readings clock it is not used to close steps)


def send(core, station, t, values, now=None):
    """Publish a reading; the gateway clock reads a minute after its timestamp unless ``now`` says otherwise."""
    payload = json.dumps({"ts": t, "values": values}).encode()
    return core.ingest(f"gapcast/v1/stations/{station}/readings", payload, t + 60 if now is None else now)


def bodies(msgs, kind=None):
    return [json.loads(m.payload) for m in msgs if kind is None or m.kind == kind]


def path(fc, channel):
    """One channel's forecast path from a forecast body's ``steps``."""
    return [st["values"][channel] for st in fc["steps"]]


def test_steps_close_when_a_later_reading_arrives(make_core):
    be = FakeBackend()
    core = make_core(backend=be)
    assert send(core, "s1", T0, {"a": 10.0, "b": 1.0}) == []
    assert core.tick(T0 + 60) == []  # step 0 still open: nothing due
    send(core, "s1", T0 + CADENCE, {"a": 12.0})
    assert core.has_due
    out = core.tick(T0 + CADENCE + 60)
    assert [m.kind for m in out] == ["filled", "forecast"]
    f, fc = bodies(out)
    assert f["ts"] == "2017-01-01T00:00:00Z" and f["values"] == {"a": 10.0, "b": 1.0} and f["imputed"] == []
    # Forecast of the fake backend, by hand: observed normalised means a = 0, b = 0.2 (the 5 unobserved steps
    # before the first reading do not count); + 0.1 (h + 1) + 0.01 * hour_sin of the forecast step (hours 1..3 UTC).
    hs = np.sin(2 * np.pi * np.arange(1, 4) / 24)
    np.testing.assert_allclose(path(fc, "a"), 10 + 2 * (0.1 * np.arange(1, 4) + 0.01 * hs), atol=1e-3)
    np.testing.assert_allclose(path(fc, "b"), 5 * (0.2 + 0.1 * np.arange(1, 4) + 0.01 * hs), atol=1e-3)
    assert fc["imputed_share"] == pytest.approx(10 / 12, abs=1e-4) and fc["horizon"] == 3
    assert be.calls == [1]


def test_silent_station_is_filled_on_the_clock(make_core):
    core = make_core(backend=FakeBackend(), lateness_s=600.0)
    for j in range(3):
        send(core, "s1", T0 + j * CADENCE, {"a": 10.0 + j, "b": 0.0})
    core.tick(T0 + 3 * CADENCE)  # steps 0, 1 close (a later reading arrived)
    assert core.counters["filled"] == 2
    # The station goes silent. At step 5's end + lateness (T0 + 6 h + 600 s) steps 2..5 are due.
    assert core.tick(T0 + 6 * CADENCE + 599)[-2:] != []  # steps 2..4 by then
    assert core.counters["filled"] == 5
    out = core.tick(T0 + 6 * CADENCE + 600)
    (f,) = bodies(out, "filled")
    assert f["ts"] == "2017-01-01T05:00:00Z" and f["imputed"] == ["a", "b"] and f["values"] == {"a": 11.0, "b": 2.5}
    assert core.missing["missing_step"] == 3  # steps 3, 4, 5 had no reading at all
    assert core.tick(T0 + 6 * CADENCE + 601) == []  # nothing repeats


def test_each_missing_kind_is_counted(make_core):
    core = make_core(backend=FakeBackend(), clock="readings")
    send(core, "s1", T0, {"a": None, "b": -200})
    send(core, "s1", T0 + 60, {"a": 101.0, "b": -9999})
    core.ingest("gapcast/v1/stations/s1/readings", b'{"ts": 1483228920, "values": {"a": NaN}}', NOW)
    assert core.missing == {"null": 1, "sentinel": 2, "out_of_range": 1, "nan": 1}
    send(core, "s1", T0 + 2 * CADENCE, {"a": 1.0})  # step 1 never heard from: a missing step
    out = core.tick(NOW)
    assert core.missing["missing_step"] == 1
    assert [b["imputed"] for b in bodies(out, "filled")] == [["a", "b"], ["a", "b"]]
    assert core.counters["imputed_values"] == 4


def test_batched_inference_equals_one_at_a_time(make_core):
    rng = np.random.default_rng(0)
    data = {s: rng.uniform(0, 40, size=(8, 2)) for s in ("s1", "s2", "s3")}
    for s in data:
        data[s][rng.random((8, 2)) < 0.3] = np.nan

    def feed(core, stations):
        out = []
        for j in range(8):
            for s in stations:
                vals = {c: (None if np.isnan(v) else float(v)) for c, v in zip("ab", data[s][j])}
                out += send(core, s, T0 + j * CADENCE, vals)
        return out + core.tick(T0 + 8 * CADENCE)

    be = FakeBackend()
    together = feed(make_core(backend=be, clock="readings", max_pending=16), ("s1", "s2", "s3"))
    assert be.calls == [21]  # 3 stations x 7 closed steps in ONE backend call
    alone = []
    for s in ("s1", "s2", "s3"):
        b1 = FakeBackend()
        alone += feed(make_core(backend=b1, clock="readings", max_pending=16), (s,))
        assert b1.calls == [7]
    key = lambda m: (m.topic, m.msg_id)  # noqa: E731
    assert sorted((key(m), m.payload) for m in together) == sorted((key(m), m.payload) for m in alone)
    assert sum(m.kind in ("filled", "forecast") for m in together) == 3 * 7 * 2
    assert any(m.kind == "revision" for m in together)  # the random gaps were revised too, identically


def test_gap_end_revision_covers_exactly_the_gap(make_core):
    core = make_core(backend=FakeBackend(), clock="readings", lateness_s=0.0)
    full = {"a": 12.0, "b": 1.0}
    send(core, "s1", T0, full)
    send(core, "s1", T0 + CADENCE, full)
    send(core, "s1", T0 + 2 * CADENCE, {"a": 12.0})  # step 2 partial: the gap starts here
    # steps 3, 4: outage (no readings)
    send(core, "s1", T0 + 5 * CADENCE, full)
    out = core.tick(NOW)
    assert bodies(out, "revision") == []  # step 5 is not closed yet: the gap has not ended
    send(core, "s1", T0 + 6 * CADENCE, full)
    out = core.tick(NOW)
    (rev,) = bodies(out, "revision")
    assert rev["reason"] == "gap_end" and rev["method"] == "model"
    assert (rev["start"], rev["end"]) == ("2017-01-01T02:00:00Z", "2017-01-01T04:00:00Z")
    assert [s["imputed"] for s in rev["steps"]] == [["b"], ["a", "b"], ["a", "b"]]
    assert [s["values"] for s in rev["steps"]] == [{"a": 12.0, "b": 2.5}, {"a": 11.0, "b": 2.5}, {"a": 11.0, "b": 2.5}]
    # The revision is published before step 5's own filled message, and only once.
    assert [m.kind for m in out] == ["revision", "filled", "forecast"]
    send(core, "s1", T0 + 7 * CADENCE, full)
    assert bodies(core.tick(NOW), "revision") == []


def test_late_reading_is_revised(make_core):
    core = make_core(backend=FakeBackend(), lateness_s=1800.0)
    send(core, "s1", T0, {"a": 12.0})
    send(core, "s1", T0 + CADENCE, {"a": 12.0, "b": 1.0})
    core.tick(T0 + CADENCE + 10)
    assert send(core, "s1", T0 + 30, {"b": 4.0}) == []  # within lateness: accepted as late
    out = core.tick(T0 + CADENCE + 20)
    (rev,) = bodies(out)
    assert rev["reason"] == "late_reading" and rev["steps"] == [
        {"ts": "2017-01-01T00:00:00Z", "epoch_s": T0, "values": {"a": 12.0, "b": 4.0}, "imputed": []}
    ]
    # Past step end + lateness it is rejected and dead-lettered.
    send(core, "s1", T0 + 2 * CADENCE + 1000, {"a": 1.0})
    (dl,) = bodies(send(core, "s1", T0 + 40, {"b": 5.0}))
    assert dl["kind"] == "too_late" and core.rejected["too_late"] == 1


def test_backend_failure_falls_back_to_interpolation_and_locf(make_core):
    core = make_core(backend=FakeBackend(fail=True), clock="readings", lateness_s=0.0, max_pending=8)
    out = send(core, "s1", T0, {"a": 10.0, "b": 1.0})
    out += send(core, "s1", T0 + CADENCE, {"a": 12.0, "b": 1.0})
    out += send(core, "s1", T0 + 2 * CADENCE, {"b": 1.0})  # a missing: LOCF -> 12
    out += send(core, "s1", T0 + 3 * CADENCE, {"b": 1.0})
    out += send(core, "s1", T0 + 4 * CADENCE, {"a": 18.0, "b": 1.0})  # a back: interpolation 12 -> 18
    out += send(core, "s1", T0 + 5 * CADENCE, {"a": 18.0, "b": 1.0})
    out += core.tick(NOW)
    filled = bodies(out, "filled")
    assert [f["values"]["a"] for f in filled] == [10.0, 12.0, 12.0, 12.0, 18.0]
    assert [f["method"] for f in filled] == ["observed", "observed", "locf", "locf", "observed"]
    (rev,) = bodies(out, "revision")
    assert rev["method"] == "interpolation" and [s["values"]["a"] for s in rev["steps"]] == [14.0, 16.0]
    fc = bodies(out, "forecast")
    # lookback 6 < 24 steps: no daily season fits, so the forecast is persistence of the last filled value.
    assert fc[-1]["method"] == "persistence" and path(fc[-1], "a") == [18.0, 18.0, 18.0]
    assert core.counters["backend_errors"] >= 1 and core.counters["fallback_steps"] == 5


def test_no_model_uses_the_interpolation_backend_with_a_daily_season(make_core):
    card = Card.from_dict(card_dict(lookback=24, horizon=2))
    core = make_core(backend=None, card_=card, clock="readings", lateness_s=0.0)
    for j in range(26):
        send(core, "s1", T0 + j * CADENCE, {"a": float(j), "b": 0.0})
    out = core.tick(NOW)
    fc = bodies(out, "forecast")[-1]  # origin step 24: the window holds steps 1..24
    assert fc["origin"] == "2017-01-02T00:00:00Z" and fc["method"] == "seasonal_naive"
    assert path(fc, "a") == [1.0, 2.0]  # one day before steps 25, 26
    assert [st["ts"] for st in fc["steps"]] == ["2017-01-02T01:00:00Z", "2017-01-02T02:00:00Z"]
    assert fc["units"] == {"a": "u", "b": "u"}  # from the card
    assert core.status_body()["backend"] == "interpolation"


def test_window_too_empty_gives_no_forecast_and_a_status_reason(make_core):
    core = make_core(backend=FakeBackend(), max_missing_share=0.5, clock="readings", lateness_s=0.0, max_pending=8)
    for j in range(7):
        send(core, "s1", T0 + j * CADENCE, {"a": 1.0, "b": 1.0})
    out = core.tick(NOW)
    fcs = bodies(out, "forecast")
    # Window of step j holds j + 1 observed steps of 6: missing share (5 - j) / 6 > 0.5 for j = 0, 1.
    assert [f["origin"][11:13] for f in fcs] == ["02", "03", "04", "05"]
    assert core.counters["no_forecast"] == 2 and core.counters["filled"] == 6
    assert core.no_forecast == {}  # forecasts resumed: the reason is cleared
    send(core, "s1", T0 + 8 * CADENCE, {"a": 1.0})
    send(core, "s1", T0 + 20 * CADENCE, {"a": 1.0})  # far ahead: the agent closes older steps first
    core.tick(NOW)
    assert "missing > max_missing_share 50%" in core.status_body()["no_forecast"]["s1"]


def test_station_registration_and_rejections(make_core):
    core = make_core(backend=FakeBackend(), stations=("s1",), auto_register=False)
    (dl,) = bodies(send(core, "zz", T0, {"a": 1.0}))
    assert dl["kind"] == "unknown_station" and dl["topic"] == "gapcast/v1/stations/zz/readings"
    auto = make_core(backend=FakeBackend(), stations=(), auto_register=True, max_stations=2)
    assert send(auto, "x1", T0, {"a": 1.0}) == [] and send(auto, "x2", T0, {"a": 1.0}) == []
    (dl,) = bodies(send(auto, "x3", T0, {"a": 1.0}))
    assert dl["kind"] == "station_limit" and set(auto.windows) == {"x1", "x2"}
    (dl,) = bodies(send(core, "s1", NOW + 301, {"a": 1.0}, now=NOW))  # max_future_s = 300
    assert dl["kind"] == "future"
    (dl,) = bodies(core.ingest("gapcast/v1/stations/s1/readings", b'{"ts": 1483228800, "values": {}}', NOW,
                               retained=True))
    assert dl["kind"] == "retained"
    (dl,) = bodies(core.ingest("other/topic", b"{}", NOW))
    assert dl["kind"] == "bad_topic"
    assert core.rejected == {"unknown_station": 1, "future": 1, "retained": 1, "bad_topic": 1}
    assert "s1" not in core.windows  # no rejected payload made a window


def test_a_reading_far_ahead_closes_older_steps_first(make_core):
    core = make_core(backend=FakeBackend(), max_pending=4, clock="readings")
    send(core, "s1", T0, {"a": 1.0, "b": 1.0})
    out = send(core, "s1", T0 + 10 * CADENCE, {"a": 1.0, "b": 1.0})  # 10 steps ahead of a 4-step slack
    assert [b["ts"][11:13] for b in bodies(out, "filled")] == ["00", "01", "02", "03", "04", "05", "06", "07", "08", "09"]
    assert core.tick(NOW) == []


def test_readings_clock_closes_a_silent_station_by_the_others(make_core):
    core = make_core(backend=FakeBackend(), clock="readings", lateness_s=0.0)
    send(core, "s1", T0, {"a": 1.0, "b": 1.0})
    send(core, "s2", T0, {"a": 2.0, "b": 2.0})
    for j in range(1, 4):
        send(core, "s1", T0 + j * CADENCE, {"a": 1.0, "b": 1.0})
    out = core.tick(NOW)  # gateway clock ignored; the newest reading (step 3) closes steps <= 2 everywhere
    by = {}
    for b in bodies(out, "filled"):
        by.setdefault(b["station"], []).append(b["ts"][11:13])
    assert by == {"s1": ["00", "01", "02"], "s2": ["00", "01", "02"]}


def test_state_restore_does_not_republish(make_core):
    core = make_core(backend=FakeBackend(), clock="readings", lateness_s=0.0)
    for j in range(3):
        send(core, "s1", T0 + j * CADENCE, {"a": 1.0, "b": 1.0})
    first = core.tick(NOW)
    assert len(bodies(first, "filled")) == 2
    state = core.export_state()
    core2 = make_core(backend=FakeBackend(), clock="readings", lateness_s=0.0)
    assert core2.restore_state(state) == 1
    assert core2.tick(NOW) == []
    send(core2, "s1", T0 + 3 * CADENCE, {"a": 1.0, "b": 1.0})
    assert [b["ts"][11:13] for b in bodies(core2.tick(NOW), "filled")] == ["02"]


def test_a_backlog_beyond_max_catchup_is_skipped_and_counted(make_core):
    core = make_core(backend=FakeBackend(), max_catchup_steps=5, lateness_s=0.0)
    send(core, "s1", T0, {"a": 1.0, "b": 1.0})
    out = core.tick(T0 + 20 * CADENCE)  # step 19 ends at T0 + 20 h: steps 0..19 due, the oldest 15 skipped
    assert core.counters["steps_skipped"] == 15
    assert [b["ts"][11:13] for b in bodies(out, "filled")] == ["15", "16", "17", "18", "19"]


def test_vectorised_interpolation_equals_the_shared_baseline():
    from gapcast.baselines import linear_interpolate
    from gapcast.edge.agent import interpolate_batch

    rng = np.random.default_rng(1)
    v = rng.normal(size=(5, 24, 3)).astype(np.float32)
    m = rng.random((5, 24, 3)) < 0.4
    m[0, :, 0] = False  # a channel never observed -> 0
    m[1, :, 1] = False
    m[1, 7, 1] = True  # a single observation -> constant
    np.testing.assert_allclose(interpolate_batch(v, m), linear_interpolate(v, m), rtol=1e-6, atol=1e-6)
