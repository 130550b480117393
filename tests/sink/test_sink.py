"""gapcast sink: rows, revisions and duplicates by hand; a sink SIGKILLed mid-stream loses nothing; the agent, the
replayer and the sink against a private Mosquitto and a private InfluxDB 1.x, the two stores equal value for value."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from support.agent_config import write_agent_config
from support.contracts import assert_contracts

from gapcast.edge.messages import Topics, filled_message, forecast_message, revision_message
from gapcast.sink import SinkError
from gapcast.sink.rows import Checker, decode
from gapcast.sink.stores import CsvStore, SQLiteStore, open_target, series_lines

pytestmark = pytest.mark.timeout(240)

T0 = 1_483_228_800  # 2017-01-01T00:00:00Z
TOPICS = Topics("gapcast/v1", "gw")
NAMES = ("a", "b")
UNITS = {"a": "ug/m3", "b": "degC"}


def decoded(msg):
    body = json.loads(msg.payload)
    kind, _ = TOPICS.output_of(msg.topic)
    assert Checker().problem(kind, body) is None
    return decode(kind, body)


def rows(db_path, table="series"):
    con = sqlite3.connect(db_path)
    try:
        if table == "series":
            q = "SELECT station, channel, ts, value, status, model_version FROM series ORDER BY station, ts, channel"
        else:
            q = 'SELECT station, origin, ts, lead, "values" FROM forecasts ORDER BY station, origin, ts'
            return [(*r[:4], json.loads(r[4])) for r in con.execute(q)]
        return con.execute(q).fetchall()
    finally:
        con.close()


def test_a_revision_supersedes_filled_values_and_duplicates_are_dropped(tmp_path):
    store = SQLiteStore(tmp_path / "s.db")
    f0 = filled_message(TOPICS, "s1", T0, 3600, NAMES, np.array([10.0, 1.0]), np.array([False, True]), "model", 3,
                        units=UNITS)
    f1 = filled_message(TOPICS, "s1", T0 + 3600, 3600, NAMES, np.array([11.0, 2.0]), np.array([True, True]), "model", 3,
                        units=UNITS)
    rev = revision_message(TOPICS, "s1", T0, 3600, NAMES, np.array([[10.0, 1.5], [12.5, 2.5]]),
                           np.array([[False, True], [True, True]]), "model", 3, "gap_end", units=UNITS)
    assert store.apply([decoded(f0), decoded(f1)], now_s=T0) == {"messages": 2, "values": 4, "forecasts": 0}
    assert store.apply([decoded(rev)], now_s=T0) == {"messages": 1, "values": 4, "forecasts": 0}
    # The same filled message again (a QoS 1 redelivery): dropped by id. A filled message of the same step under
    # another id (another model) cannot overwrite the revised values: 2 superseded, nothing written.
    f1_v4 = filled_message(TOPICS, "s1", T0 + 3600, 3600, NAMES, np.array([99.0, 99.0]), np.array([True, True]),
                           "model", 4, units=UNITS)
    assert store.apply([decoded(f1), decoded(f1_v4)], now_s=T0) == {
        "duplicates": 1, "messages": 1, "superseded": 2, "values": 0, "forecasts": 0}
    assert rows(tmp_path / "s.db") == [
        ("s1", "a", T0, 10.0, "observed", 3), ("s1", "b", T0, 1.5, "revised", 3),
        ("s1", "a", T0 + 3600, 12.5, "revised", 3), ("s1", "b", T0 + 3600, 2.5, "revised", 3),
    ]
    units = sqlite3.connect(tmp_path / "s.db").execute("SELECT DISTINCT channel, unit FROM series").fetchall()
    assert sorted(units) == [("a", "ug/m3"), ("b", "degC")]
    store.close()


def test_forecast_rows_are_keyed_by_origin_with_their_lead(tmp_path):
    store = SQLiteStore(tmp_path / "s.db")
    fc = forecast_message(TOPICS, "s1", T0, 3600, NAMES, np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), 0.0,
                          "model", 3, issued_s=T0 + 3700, units=UNITS)
    store.apply([decoded(fc)], now_s=T0)
    assert rows(tmp_path / "s.db", "forecasts") == [
        ("s1", T0, T0 + 3600, 1, {"a": 1.0, "b": 2.0}), ("s1", T0, T0 + 7200, 2, {"a": 3.0, "b": 4.0}),
        ("s1", T0, T0 + 10800, 3, {"a": 5.0, "b": 6.0}),
    ]
    con = sqlite3.connect(tmp_path / "s.db")  # tidy on demand: SQLite unnests the channels
    assert con.execute("SELECT COUNT(*) FROM forecasts, json_each(forecasts.\"values\")").fetchone() == (6,)
    assert sorted(con.execute("SELECT channel, unit FROM units")) == [("a", "ug/m3"), ("b", "degC")]
    con.close()
    store.close()


def test_csv_export_and_line_protocol_escaping(tmp_path):
    csv = open_target(f"csv:{tmp_path / 'out'}")
    assert isinstance(csv, CsvStore)
    d = decoded(filled_message(TOPICS, "s1", T0, 3600, NAMES, np.array([10.25, 1.0]), np.array([False, True]),
                               "model", 3, units=UNITS))
    csv.write(d.values, [])
    csv.close()
    lines = (tmp_path / "out" / "series.csv").read_text().splitlines()
    assert lines == ["station,channel,ts,value,status,model_version,unit",
                     "s1,a,2017-01-01T00:00:00Z,10.25,observed,3,ug/m3", "s1,b,2017-01-01T00:00:00Z,1.0,filled,3,degC"]
    (row,) = [r for r in d.values if r.channel == "a"]
    odd = type(row)(station="x y,z", channel="P=1", ts=T0, value=0.1, status="observed", model_version=3, rank=1)
    assert series_lines([odd]) == [
        'gapcast_series,station=x\\ y\\,z,channel=P\\=1 value=0.1,status="observed",model_version=3i 1483228800']
    with pytest.raises(SinkError, match="unknown target"):
        open_target("postgres://x")
    with pytest.raises(SinkError, match="influxdb://"):
        open_target("influxdb://host:8086")  # no database


def test_the_checker_names_what_is_wrong():
    body = json.loads(filled_message(TOPICS, "s1", T0, 3600, NAMES, np.array([1.0, 2.0]), np.array([False, False]),
                                     "model", 3).payload)
    body["values"]["a"] = "12"
    assert Checker().problem("filled", body) == 'values/a: "12" is not of type "number"'


# -- broker tests ------------------------------------------------------------------------------------------------


def start_sink(tmp_path, broker, *targets, client_id="sink-test", log_name="sink.log"):
    log = open(tmp_path / log_name, "ab")
    args = [sys.executable, "-m", "gapcast.cli", "sink", "--broker", broker.url, "--client-id", client_id]
    for t in targets:
        args += ["--to", t]
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    log.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = (tmp_path / log_name).read_text(errors="replace")
        if text.count("sink subscribed to") > (start_sink.subscribed.get(str(tmp_path / log_name), 0)):
            start_sink.subscribed[str(tmp_path / log_name)] = text.count("sink subscribed to")
            return proc
        assert proc.poll() is None, text[-3000:]
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("sink did not subscribe: " + (tmp_path / log_name).read_text()[-3000:])


start_sink.subscribed = {}


def wait_for(cond, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def count(db, table):
    if not Path(db).exists():
        return 0
    con = sqlite3.connect(db, timeout=5)
    try:
        return con.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    except sqlite3.OperationalError:  # tables not created yet
        return 0
    finally:
        con.close()


@pytest.mark.broker
def test_a_sink_killed_mid_stream_loses_nothing(broker, tmp_path):
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    db = tmp_path / "sink.db"
    sink = start_sink(tmp_path, broker, f"sqlite:///{db}")
    n = 600
    rng = np.random.default_rng(0)
    vals = np.round(rng.uniform(0, 100, size=(n, 2)), 2)
    msgs = [filled_message(TOPICS, "s1", T0 + i * 3600, 3600, NAMES, vals[i], np.array([False, i % 3 == 0]),
                           "model", 3, units=UNITS) for i in range(n)]
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    done, killed = threading.Event(), threading.Event()

    def publish():
        for i, m in enumerate(msgs):
            if i == n // 2:  # the second half goes out once the sink is dead: the kill lands in the middle
                killed.wait(60)
            pub.publish(m.topic, m.payload, qos=1).wait_for_publish(10)
        done.set()

    th = threading.Thread(target=publish, daemon=True)
    th.start()
    try:
        assert wait_for(lambda: count(db, "seen") >= 100), "the sink stored nothing"
        sink.send_signal(signal.SIGKILL)  # mid-stream: messages received and not yet written are not acked
        sink.wait(10)
        killed.set()
        at_kill = count(db, "seen")
        assert at_kill <= n // 2, "the sink stored more than was published before the kill"
        assert done.wait(60)
        sink = start_sink(tmp_path, broker, f"sqlite:///{db}")  # same client id: the broker hands over the rest
        assert wait_for(lambda: count(db, "seen") == n, 60), f"{count(db, 'seen')} of {n} stored"
        # A marker from another station, published after the stream: the broker redelivers unacked messages at the
        # reconnect, before it, so once it is stored any duplicate would be too.
        marker = filled_message(TOPICS, "s2", T0, 3600, NAMES, vals[0], np.array([False, False]), "model", 3,
                                units=UNITS)
        pub.publish(marker.topic, marker.payload, qos=1).wait_for_publish(10)
        assert wait_for(lambda: count(db, "seen") == n + 1, 30), f"{count(db, 'seen')} of {n + 1} stored"
        assert count(db, "seen") == n + 1
        expected = sorted(("s1", c, T0 + i * 3600, float(vals[i, j]), "filled" if (j == 1 and i % 3 == 0) else "observed", 3)
                          for i in range(n) for j, c in enumerate(NAMES))
        assert sorted(r for r in rows(db) if r[0] == "s1") == expected  # every value of every step, exactly once
    finally:
        sink.send_signal(signal.SIGTERM)
        assert sink.wait(15) == 0
        pub.loop_stop()
    text = (tmp_path / "sink.log").read_text()
    assert "sink stopped:" in text


def write_sink_test_agent_config(path: Path, broker, bundle, public_key, stations) -> Path:
    return write_agent_config(
        path, host=broker.host, port=broker.port, bundle=bundle, trusted_key=public_key, stations=stations,
        gateway="gw-sink", agent={"clock": "readings", "max_missing_share": 1.0, "tick_interval_s": 0.2},
    )


class Recorder:
    """Records every message under gapcast/v1/# (to check the contracts of what flowed)."""

    def __init__(self, broker):
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.msgs: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        sub = threading.Event()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.c.on_message = lambda c, u, m: self._add(m.topic, bytes(m.payload))
        self.c.on_subscribe = lambda *a: sub.set()
        self.c.on_connect = lambda c, u, f, rc, p: c.subscribe("gapcast/v1/#", qos=1)
        self.c.connect(broker.host, broker.port)
        self.c.loop_start()
        assert sub.wait(10)

    def _add(self, topic, payload):
        with self.lock:
            self.msgs.append((topic, payload))

    def of(self, suffix):
        with self.lock:
            return [json.loads(p) for t, p in self.msgs if t.endswith(suffix)]

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()
        with self.lock:
            return assert_contracts(self.msgs)


@pytest.mark.broker
@pytest.mark.skipif(shutil.which("influxd") is None, reason="influxd (InfluxDB 1.x) is not installed: make influxdb")
def test_agent_replay_sink_into_sqlite_and_influxdb_agree(broker, tmp_path, beijing, tiny_bundle, signing_key):
    from support.influx import LocalInflux

    from gapcast.tools.replay import ReplayOptions, plan_replay, replay

    stations = ("Aotizhongxin", "Changping")
    influx = LocalInflux(tmp_path / "influx").start()
    db = tmp_path / "sink.db"
    rec = Recorder(broker)
    sink = start_sink(tmp_path, broker, f"sqlite:///{db}", f"influxdb://127.0.0.1:{influx.http_port}/gapcast")
    cfg = write_sink_test_agent_config(tmp_path / "edge.toml", broker, tiny_bundle, signing_key.public, stations)
    agent_log = open(tmp_path / "agent.log", "wb")
    agent = subprocess.Popen([sys.executable, "-m", "gapcast.cli", "edge", "run", "--config", str(cfg)],
                             stdout=agent_log, stderr=subprocess.STDOUT)
    try:
        assert wait_for(lambda: any(b.get("state") == "online" for b in rec.of("/status")), 60), (
            (tmp_path / "agent.log").read_text()[-3000:])
        series = {s: beijing[s] for s in stations}
        start = int(series["Aotizhongxin"].epoch_s[24_000])
        plan = plan_replay(series, start_s=start, end_s=start + 72 * 3600)
        summary = replay(plan, broker.url, ReplayOptions(speed=0.0), progress=False)
        assert summary.published == len(plan.readings)
        n_steps = 2 * 71  # every step but each station's newest (still open)
        assert wait_for(lambda: len(rec.of("/forecast")) >= n_steps, 90), len(rec.of("/forecast"))
        assert wait_for(lambda: count(db, "seen") == n_steps * 2 + len(rec.of("/revisions")), 60), count(db, "seen")

        def influx_count(query: str) -> int:
            res = influx.query("gapcast", query)["results"][0].get("series")
            return int(res[0]["values"][0][1]) if res else 0

        assert wait_for(  # both stores finished writing: every forecast row, and InfluxDB holds every series row
            lambda: count(db, "forecasts") == n_steps * 24
            and influx_count('SELECT COUNT("PM2.5") FROM gapcast_forecast') == n_steps * 24
            and influx_count("SELECT COUNT(value) FROM gapcast_series") == count(db, "series"),
            60,
        ), (count(db, "forecasts"), count(db, "series"))
        con = sqlite3.connect(db)
        store = {(s, c, t): (v, st) for s, c, t, v, st in
                 con.execute("SELECT station, channel, ts, value, status FROM series")}
        n_fc = con.execute("SELECT COUNT(*) FROM forecasts").fetchone()[0]
        con.close()
        assert len(store) == n_steps * 13
        # Observed values are the real readings; every revision the agent published is applied.
        a = series["Aotizhongxin"]
        i = 24_010
        for c, ch in enumerate(a.channels):
            if a.observed[i, c]:
                assert store[("Aotizhongxin", ch.name, int(a.epoch_s[i]))] == (pytest.approx(float(a.values[i, c]), abs=1e-3), "observed")
        revised = {(r["station"], c, s["epoch_s"]) for r in rec.of("/revisions") for s in r["steps"] for c in s["imputed"]}
        assert revised and all(store[k][1] == "revised" for k in revised)
        # InfluxDB holds the same series, value for value and status for status.
        got = influx.query("gapcast", "SELECT value, status FROM gapcast_series GROUP BY station, channel")
        influx_rows = {}
        for s in got["results"][0]["series"]:
            for t, v, st in s["values"]:
                influx_rows[(s["tags"]["station"], s["tags"]["channel"], int(t))] = (v, st)
        assert influx_rows == store
        fc = influx.query("gapcast", 'SELECT COUNT("PM2.5") FROM gapcast_forecast')
        assert fc["results"][0]["series"][0]["values"][0][1] == n_fc == n_steps * 24
    finally:
        for p in (agent, sink):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(10)
        agent_log.close()
        influx.stop()
    checked = rec.close()
    assert checked["filled"] >= n_steps and checked["forecast"] >= n_steps and checked["status"] >= 1


def test_the_shell_acks_after_the_write_and_counts_what_it_skips(tmp_path):
    from gapcast.brokerurl import parse_broker_url
    from gapcast.sink.client import SinkClient, _In

    class FailingOnce:
        name = "flaky"

        def __init__(self):
            self.calls = 0

        def write(self, values, forecasts):
            self.calls += 1
            if self.calls == 1:
                raise SinkError("target down")

        def close(self):
            pass

    acks = []
    target = FailingOnce()
    sink = SinkClient(parse_broker_url("mqtt://127.0.0.1:1"), SQLiteStore(tmp_path / "s.db"), [target])
    sink.client = type("C", (), {"ack": lambda self, mid, qos: acks.append(mid)})()
    f = filled_message(TOPICS, "s1", T0, 3600, NAMES, np.array([1.0, 2.0]), np.array([False, False]), "model", 3)
    bad_schema = f.payload.replace(b'"a":1.0', b'"a":"1"')
    items = [_In(f.topic, f.payload, 1, 1, 0), _In(f.topic, b"{nope", 2, 1, 0), _In(f.topic, bad_schema, 3, 1, 0),
             _In("gapcast/v1/stations/s1/readings", b"{}", 4, 1, 0)]
    decoded = sink.decode_all(items)
    assert dict(sink.rejected) == {"bad_json": 1, "bad_schema": 1, "bad_topic": 1} and len(decoded) == 1
    with pytest.raises(SinkError, match="target down"):
        sink.process(items, decoded)
    assert acks == [] and count(tmp_path / "s.db", "seen") == 0  # rolled back, nothing acknowledged
    assert sink.process(items, decoded) == {"messages": 1, "values": 2, "forecasts": 0}
    assert acks == [1, 2, 3, 4] and count(tmp_path / "s.db", "seen") == 1  # in arrival order, after the write
    assert dict(sink.rejected) == {"bad_json": 1, "bad_schema": 1, "bad_topic": 1}  # counted once
