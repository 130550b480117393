"""`gapcast replay`: planning (pure) and publishing to a private Mosquitto."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from gapcast.tools.collector import Recorder, wait_until
from gapcast.tools.replay import (
    Outage,
    ReplayError,
    ReplayOptions,
    parse_broker_url,
    parse_outage,
    parse_time,
    plan_replay,
    readings_topic,
    replay,
)
from gapcast.train.data import BEIJING_CHANNELS, BEIJING_POLLUTANTS, StationSeries

NAMES = [c.name for c in BEIJING_CHANNELS]
POLLUTANTS = [NAMES[i] for i in BEIJING_POLLUTANTS]
T0 = 1_464_739_200  # 2016-06-01T00:00:00Z
MAY_2016_LOCAL = 1_462_032_000  # 2016-05-01T00:00 China Standard Time = 2016-04-30T16:00:00Z


def _series(name: str, n: int, *, nan_at: tuple[tuple[int, int], ...] = ()) -> StationSeries:
    """A synthetic station: value[i, j] = 100 * i + j, with NaN at the given (row, column) cells."""
    values = (100.0 * np.arange(n)[:, None] + np.arange(len(NAMES))[None, :]).astype(np.float32)
    for i, j in nan_at:
        values[i, j] = np.nan
    return StationSeries(
        station=name,
        epoch_s=T0 + 3600 * np.arange(n, dtype=np.int64),
        values=values,
        observed=~np.isnan(values),
        channels=BEIJING_CHANNELS,
    )


# ------------------------------------------------------------------------------------------------- parsing


def test_parse_time_forms():
    assert parse_time("2016-06-01") == T0
    assert parse_time("2016-06-01T00:00:00Z") == T0
    assert parse_time("2016-06-01T08:00+08:00") == T0
    assert parse_time("2016-06-01T06") == T0 + 6 * 3600
    assert parse_time("+36h", relative_to=T0) == T0 + 36 * 3600
    assert parse_time("+1.5d", relative_to=T0) == T0 + 129_600
    with pytest.raises(ReplayError, match="reference"):
        parse_time("+3d")
    with pytest.raises(ReplayError, match="bad time"):
        parse_time("June 1st")


def test_parse_outage_forms():
    o = parse_outage("Aotizhongxin:2016-06-01T00:72:pollutants", channels=NAMES, groups={"pollutants": POLLUTANTS})
    assert (o.station, o.start_s, o.hours, o.end_s) == ("Aotizhongxin", T0, 72.0, T0 + 72 * 3600)
    assert o.channels == ("PM2.5", "PM10", "SO2", "NO2", "CO", "O3")
    # A length with a unit; a group mixed with a channel (de-duplicated, order kept).
    o = parse_outage("Tiantan:2016-06-01:90min:CO,air", channels=NAMES, groups={"air": ["PM2.5", "CO"]})
    assert (o.hours, o.end_s, o.channels) == (1.5, T0 + 5400, ("CO", "PM2.5"))
    assert parse_outage("Tiantan:2016-06-01:1h30min", channels=NAMES).end_s == T0 + 5400
    with pytest.raises(ReplayError, match="unknown channel 'pollutants'.*groups: none"):
        parse_outage("Tiantan:2016-06-01:6:pollutants", channels=NAMES)
    with pytest.raises(ReplayError, match="bad length"):
        parse_outage("Tiantan:2016-06-01:6parsecs", channels=NAMES)
    # Colons inside the time are not separators; hours stay the third field.
    o = parse_outage("Tiantan:2016-06-01T00:00:00Z:24", channels=NAMES)
    assert (o.start_s, o.hours, o.channels) == (T0, 24.0, None)
    o = parse_outage("Tiantan:+2d:6:PM2.5,CO,PM2.5", channels=NAMES, relative_to=T0)
    assert (o.start_s, o.end_s, o.channels) == (T0 + 172_800, T0 + 172_800 + 21_600, ("PM2.5", "CO"))
    assert parse_outage("Tiantan:2016-06-01:1:all", channels=NAMES).channels is None
    assert parse_outage(o.spec(), channels=NAMES) == o  # spec() round-trips
    with pytest.raises(ReplayError, match="unknown channel 'PM25'"):
        parse_outage("Tiantan:2016-06-01:6:PM25", channels=NAMES)
    with pytest.raises(ReplayError, match="bad outage"):
        parse_outage("Tiantan:2016-06-01", channels=NAMES)
    with pytest.raises(ReplayError, match="> 0 hours"):
        parse_outage("Tiantan:2016-06-01:0", channels=NAMES)


def test_a_one_row_series_needs_the_cadence():
    with pytest.raises(ReplayError, match="single row: pass cadence_s"):
        plan_replay({"A": _series("A", 1)})
    plan = plan_replay({"A": _series("A", 1)}, cadence_s=600)
    assert (plan.cadence_s, plan.end_s - plan.start_s, len(plan.readings)) == (600, 600, 1)


def test_parse_broker_url():
    b = parse_broker_url("mqtts://ann:s%40cret@gw.example:8884")
    assert (b.host, b.port, b.tls, b.username, b.password) == ("gw.example", 8884, True, "ann", "s@cret")
    assert parse_broker_url("mqtt://127.0.0.1").port == 1883
    assert parse_broker_url("localhost:1999").port == 1999
    with pytest.raises(ReplayError, match="scheme"):
        parse_broker_url("http://x")


# ------------------------------------------------------------------------------------------------- planning


def test_plan_payloads_keep_missing_absent_and_outages_exact():
    a = _series("A", 10, nan_at=((2, 0), (2, 4), (7, 11), (7, 12)))
    b = _series("B", 10)
    # Every channel of B missing at row 5: a silent step, no message.
    b.values[5, :] = np.nan
    outages = [
        Outage("A", T0 + 3 * 3600, 2.0, tuple(POLLUTANTS)),  # rows 3, 4: pollutants withheld
        Outage("B", T0 + 8 * 3600, 1.0),  # row 8: the whole station silent
    ]
    plan = plan_replay({"A": a, "B": b}, start_s=T0 + 3600, end_s=T0 + 9 * 3600, outages=outages)
    by = {(r.station, r.ts): r for r in plan.readings}
    # Range [row 1, row 9): A sends rows 1..8; B rows 1..8 minus the silent row 5 and the outage row 8.
    assert sorted(ts for s, ts in by if s == "A") == [T0 + 3600 * i for i in range(1, 9)]
    assert sorted(ts for s, ts in by if s == "B") == [T0 + 3600 * i for i in (1, 2, 3, 4, 6, 7)]
    # Real NA: absent from the payload, the rest exact.
    r2 = by[("A", T0 + 2 * 3600)].values
    assert "PM2.5" not in r2 and "CO" not in r2 and len(r2) == 11
    assert r2["PM10"] == 201.0 and r2["wd_cos"] == 212.0
    assert set(by[("A", T0 + 7 * 3600)].values) == set(NAMES) - {"wd_sin", "wd_cos"}
    # Injected pollutant outage: exactly rows 3 and 4 lose exactly the six pollutants.
    for i in range(1, 9):
        keys = set(by[("A", T0 + i * 3600)].values)
        assert keys.isdisjoint(POLLUTANTS) == (i in (3, 4))
        if i in (3, 4):
            assert keys == set(NAMES[6:])
    # Hidden mask: observed values withheld by outages, nothing else (the range starts at row 1).
    hidden_a = np.zeros((8, 13), bool)
    hidden_a[2:4, :6] = True
    hidden_b = np.zeros((8, 13), bool)
    hidden_b[7, :] = True
    np.testing.assert_array_equal(plan.hidden["A"], hidden_a)
    np.testing.assert_array_equal(plan.hidden["B"], hidden_b)
    c = plan.counts()
    assert c == {
        "steps": 16,
        "messages": 14,
        "values_sent": 16 * 13 - 4 - 13 - 12 - 13,  # minus real NA of A, B's silent row, the two outages
        "real_missing_values": 4 + 13,
        "hidden_values": 12 + 13,
        "silent_steps": 2,
        "late": 0,
        "out_of_order": 0,
    }
    # In order: by time, stations interleaved in a fixed order.
    assert [(r.ts, r.station) for r in plan.readings[:3]] == [(T0 + 3600, "A"), (T0 + 3600, "B"), (T0 + 7200, "A")]


def test_plan_late_and_out_of_order_exact():
    series = {"A": _series("A", 200), "B": _series("B", 200)}
    plan = plan_replay(series, late_share=0.05, out_of_order_share=0.1, seed=3)
    for name in series:
        mine = [r for r in plan.readings if r.station == name]
        assert sum(r.late for r in mine) == 10 and sum(r.out_of_order for r in mine) == 20  # round(share * 200)
        assert all(r.send_s == r.ts + 5400 for r in mine if r.late)  # default delay: 1.5 cadences
        assert not any(r.late and r.out_of_order for r in mine)
        # Nothing lost, nothing duplicated.
        assert sorted(r.ts for r in mine) == [T0 + 3600 * i for i in range(200)]
    assert [r.send_s for r in plan.readings] == sorted(r.send_s for r in plan.readings)
    # Deterministic for a seed.
    again = plan_replay(series, late_share=0.05, out_of_order_share=0.1, seed=3)
    assert [(r.station, r.ts) for r in again.readings] == [(r.station, r.ts) for r in plan.readings]


def test_plan_late_readings_arrive_after_the_next_step():
    plan = plan_replay({"A": _series("A", 100)}, late_share=0.2, seed=5)
    arrival = [(r.ts, r.late) for r in plan.readings]
    late = [ts for ts, is_late in arrival if is_late]
    assert len(late) == 20
    for ts in late:
        k = arrival.index((ts, True))
        before = {t for t, is_late in arrival[:k] if not is_late}
        after = {t for t, is_late in arrival[k + 1 :] if not is_late}
        # Every on-time reading up to the next step came first; every on-time one from two steps on comes after.
        assert {t for t in range(T0, ts + 3601, 3600) if t <= T0 + 99 * 3600} - set(late) <= before
        assert {t for t in range(ts + 7200, T0 + 100 * 3600, 3600)} - set(late) <= after


def test_plan_out_of_order_readings_follow_their_next_step():
    plan = plan_replay({"A": _series("A", 100)}, out_of_order_share=0.2, seed=5)
    arrival = [r.ts for r in plan.readings]
    swapped = [r.ts for r in plan.readings if r.out_of_order]
    assert len(swapped) == 20
    for ts in swapped:
        k = arrival.index(ts)
        assert arrival[k - 1] == ts + 3600  # right after the station's next reading
    # Apart from the swapped pairs, the order is the time order.
    fixed = list(arrival)
    for ts in swapped:
        k = fixed.index(ts)
        fixed[k - 1], fixed[k] = fixed[k], fixed[k - 1]
    assert fixed == [T0 + 3600 * i for i in range(100)]


def test_plan_rejects_bad_requests():
    series = {"A": _series("A", 5)}
    with pytest.raises(ReplayError, match="not replayed"):
        plan_replay(series, outages=[Outage("Z", T0, 1.0)])
    with pytest.raises(ReplayError, match="empty replay range"):
        plan_replay(series, start_s=T0 + 7200, end_s=T0 + 7200)
    with pytest.raises(ReplayError, match=r"late_share must lie in \[0, 1\]"):
        plan_replay(series, late_share=1.5)


def test_plan_real_station_keeps_every_real_na(beijing):
    """May 2016 (local time) at Aotizhongxin: the NA counts of the CSV (counted by hand with pandas) are absent."""
    plan = plan_replay(
        {"Aotizhongxin": beijing["Aotizhongxin"]}, start_s=MAY_2016_LOCAL, end_s=MAY_2016_LOCAL + 31 * 86400
    )
    assert len(plan.readings) == 744  # 31 days x 24 h, no step without any channel
    absent = {n: sum(n not in r.values for r in plan.readings) for n in NAMES}
    assert absent == {
        "PM2.5": 7, "PM10": 5, "SO2": 12, "NO2": 12, "CO": 12, "O3": 26,
        "TEMP": 0, "PRES": 0, "DEWP": 0, "RAIN": 0, "WSPM": 0, "wd_sin": 2, "wd_cos": 2,
    }  # fmt: skip
    # 2016-05-10 07:00 local: every pollutant NA in the CSV; the weather channels as written there.
    r = next(r for r in plan.readings if r.ts == MAY_2016_LOCAL + (9 * 24 + 7) * 3600)
    assert set(r.values) == {"TEMP", "PRES", "DEWP", "RAIN", "WSPM", "wd_sin", "wd_cos"}
    assert (r.values["TEMP"], r.values["PRES"], r.values["DEWP"], r.values["WSPM"]) == (16.7, 1007.3, 10.1, 0.8)
    # NNE = 22.5 degrees.
    assert r.values["wd_sin"] == pytest.approx(np.sin(np.deg2rad(22.5)), abs=1e-6)


# ------------------------------------------------------------------------------------------------- broker


class _Collector(Recorder):
    """The shared recorder on the readings topics, returning (topic, payload) in arrival order."""

    def __init__(self, broker, prefix: str = "gapcast/v1") -> None:
        super().__init__(broker.host, broker.port, f"{prefix}/stations/+/readings")

    def wait_for(self, n: int, timeout_s: float = 20.0) -> list[tuple[str, dict]]:
        wait_until(lambda: self.count() >= n, timeout_s)
        self.close()
        return [(m.topic, m.body) for m in self.messages()]


@pytest.mark.broker
def test_replay_publishes_the_plan_exactly(broker, tmp_path):
    a = _series("A", 48, nan_at=((5, 0), (5, 1)))
    b = _series("B", 48)
    outages = [Outage("A", T0 + 10 * 3600, 24.0, tuple(POLLUTANTS)), Outage("B", T0 + 20 * 3600, 3.0)]
    plan = plan_replay({"A": a, "B": b}, outages=outages, late_share=0.1, out_of_order_share=0.1, seed=1)
    sub = _Collector(broker)
    journal = tmp_path / "journal.jsonl"
    summary = replay(plan, broker.url, ReplayOptions(speed=0, ts_format="epoch"), progress=False, journal=journal)
    got = sub.wait_for(len(plan.readings))
    assert summary.published == summary.acknowledged == len(plan.readings) == 48 + 45
    assert summary.per_station == {"A": 48, "B": 45}
    assert not summary.interrupted
    # Exactly the planned payloads, in the planned order (one publisher, QoS 1: the broker keeps the order).
    assert got == [(readings_topic("gapcast/v1", r.station), {"ts": r.ts, "values": r.values}) for r in plan.readings]
    a_msgs = [p for t, p in got if t == "gapcast/v1/stations/A/readings"]
    in_outage = [p for p in a_msgs if T0 + 10 * 3600 <= p["ts"] < T0 + 34 * 3600]
    assert len(in_outage) == 24 and all(set(p["values"]) == set(NAMES[6:]) for p in in_outage)
    assert {p["ts"] for t, p in got if t.endswith("/B/readings")}.isdisjoint({T0 + 3600 * i for i in (20, 21, 22)})
    # The journal has one line per message with a monotonic send time, in order.
    lines = [json.loads(x) for x in journal.read_text().splitlines()]
    assert [(x["station"], x["ts"]) for x in lines] == [(r.station, r.ts) for r in plan.readings]
    assert all(x1["sent_mono"] <= x2["sent_mono"] for x1, x2 in zip(lines, lines[1:]))
    assert sum(x["late"] for x in lines) == round(0.1 * 48) + round(0.1 * 45)


@pytest.mark.broker
def test_replay_cli_end_to_end(broker, tmp_path, data_root, capsys):
    from gapcast.cli import main

    sub = _Collector(broker, prefix="site1")
    out = tmp_path / "summary.json"
    rc = main(
        [
            "replay", "--data", str(data_root), "--broker", broker.url, "--stations", "Aotizhongxin",
            "--start", "2016-04-30T16:00Z", "--days", "2", "--speed", "0", "--prefix", "site1",
            "--outage", "Aotizhongxin:+1d:6:pollutants", "--no-progress", "--summary-json", str(out),
        ]
    )  # fmt: skip
    assert rc == 0
    got = sub.wait_for(48)
    assert len(got) == 48 and all(t == "site1/stations/Aotizhongxin/readings" for t, _ in got)
    assert got[0][1]["ts"] == "2016-04-30T16:00:00Z"  # RFC 3339 by default
    withheld = [p for _, p in got if "2016-05-01T16" <= p["ts"] < "2016-05-01T22"]
    assert len(withheld) == 6 and all(not set(p["values"]) & set(POLLUTANTS) for p in withheld)
    s = json.loads(out.read_text())
    assert s["published"] == 48 and s["outages"] == ["Aotizhongxin:2016-05-01T16:00:00Z:6:" + ",".join(POLLUTANTS)]
    # May 1 04:00 local (2016-04-30T20:00Z) has O3 NA in the CSV: 1 real NA value in the two days.
    assert s["counts"]["real_missing_values"] == 1 and s["counts"]["hidden_values"] == 36
    assert "replay done: 48 readings (48 acknowledged)" in capsys.readouterr().out


@pytest.mark.broker
@pytest.mark.parametrize("version,qos", [("3.1.1", 0), ("5", 2)])
def test_replay_other_protocol_versions_and_qos(broker, version, qos):
    plan = plan_replay({"A": _series("A", 5)})
    sub = _Collector(broker)
    summary = replay(plan, broker.url, ReplayOptions(mqtt_version=version, qos=qos), progress=False)
    got = sub.wait_for(5)
    assert summary.published == summary.acknowledged == 5
    assert [p["ts"] for _, p in got] == [f"2016-06-01T0{i}:00:00Z" for i in range(5)]


@pytest.mark.broker
def test_replay_stop_event_interrupts(broker):
    plan = plan_replay({"A": _series("A", 100)})
    stop = threading.Event()
    stop.set()
    summary = replay(plan, broker.url, ReplayOptions(speed=1.0), progress=False, stop=stop)
    assert summary.interrupted and summary.published == 0
    # At real speed (1 simulated s per s) the first reading goes at once and the second is due an hour later:
    # a stop while it waits ends the replay after exactly one reading, acknowledged.
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    summary = replay(plan, broker.url, ReplayOptions(speed=1.0), progress=False, stop=stop)
    assert summary.interrupted and summary.published == summary.acknowledged == 1
    assert summary.per_station == {"A": 1}


def test_replay_unreachable_broker_raises():
    from gapcast.tools.localbroker import free_port

    plan = plan_replay({"A": _series("A", 3)})
    with pytest.raises(ReplayError, match="no answer from the broker"):
        replay(plan, f"mqtt://127.0.0.1:{free_port()}", ReplayOptions(connect_timeout_s=1.0), progress=False)


@pytest.mark.parametrize("prefix", ["a/#", "site/+/x", "", "/site", "site/"])
def test_replay_cli_refuses_a_prefix_it_cannot_publish_under(prefix, capsys):
    from gapcast.cli import main

    with pytest.raises(SystemExit) as exc:  # a usage error, before any data is read or broker reached
        main(["replay", "--broker", "mqtt://127.0.0.1:1", "--dry-run", "--prefix", prefix])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --prefix:" in err and "Traceback" not in err


def test_topic_prefix_arg_keeps_a_good_prefix():
    import argparse

    from gapcast.tools.replay import topic_prefix_arg

    assert topic_prefix_arg("site1/gapcast/v1") == "site1/gapcast/v1"
    with pytest.raises(argparse.ArgumentTypeError, match=r"nor hold \+ #"):
        topic_prefix_arg("a/#")
    with pytest.raises(argparse.ArgumentTypeError, match="must not be empty"):
        topic_prefix_arg("")


def test_an_outage_outside_the_replayed_range_is_refused():
    with pytest.raises(ReplayError, match="outside the replayed range"):
        plan_replay({"A": _series("A", 10)}, outages=[Outage("A", T0 + 30 * 3600, 3.0)])
    plan = plan_replay({"A": _series("A", 10)}, outages=[Outage("A", T0 + 8 * 3600, 5.0)])  # overlaps the end
    assert int(plan.hidden["A"].sum()) == 2 * len(NAMES)
