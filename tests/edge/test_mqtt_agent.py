"""The MQTT agent against a private Mosquitto, with the tiny signed bundle and real Beijing readings.

- 10 days of Aotizhongxin replayed at full speed (event time from the readings, no sleeping) with a 24 h outage
  injected: one filled message and one forecast per step, timestamps right, imputed flags exactly on the injected and
  the real missing values, observed values passed through, H-step forecasts, one revision covering exactly the outage;
- two stations in parallel, one of them silent for 12 h (closed on the readings clock by the other);
- the Last Will "offline" status when the agent process (``python -m gapcast.cli edge run``) is SIGKILLed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from support.agent_config import write_agent_config
from support.contracts import assert_contracts

from gapcast.tools.collector import Recorder, wait_until
from gapcast.train.data import BEIJING_CHANNELS

pytestmark = pytest.mark.timeout(180)

PREFIX = "gapcast/v1"
NAMES = tuple(c.name for c in BEIJING_CHANNELS)
VMIN = np.array([c.valid_min for c in BEIJING_CHANNELS])
VMAX = np.array([c.valid_max for c in BEIJING_CHANNELS])
START = 24_000  # hour index of 2015-11-25 16:00 UTC: test months, 66 real missing values in the next 10 days
CAD = 3600


def write_config(path: Path, broker, bundle, public_key, stations, mqtt_version="5", **agent) -> Path:
    return write_agent_config(path, host=broker.host, port=broker.port, bundle=bundle, trusted_key=public_key,
                              stations=stations, mqtt={"version": mqtt_version}, agent=agent)


def settled(col, timeout=60.0) -> bool:
    """True once a status published after this call says the agent holds nothing: no reading unacknowledged, an
    empty outbox, nothing in flight. The broker forwards one client's messages in order, so every output published
    before that status has arrived by then (a positive condition in place of "sleep, then check nothing more came")."""
    seen = len(col.of("/status"))

    def idle(b):
        ob, held = b.get("outbox") or {}, b.get("held") or {}
        return ob.get("depth") == 0 and ob.get("inflight") == 0 and held.get("readings") == 0

    return col.wait(lambda: any(idle(b) for b in col.of("/status")[seen:]), timeout)


class Collector(Recorder):
    """The shared recorder on ``gapcast/v1/#`` with the two verbs these tests use (``of``, ``wait``)."""

    def __init__(self, broker, topic=f"{PREFIX}/#"):
        super().__init__(broker.host, broker.port, topic)

    def of(self, suffix):
        return [b for b in self.bodies(suffix)]

    def wait(self, cond, timeout=90.0):
        return wait_until(cond, timeout)

    def close(self):
        msgs = [(m.topic, m.body) for m in self.messages()]
        super().close()
        assert_contracts(msgs)  # every recorded output against its JSON Schema


def publisher(broker):
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    p = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    p.max_inflight_messages_set(1000)
    p.connect(broker.host, broker.port)
    p.loop_start()
    return p


def reading(series, i):
    vals = {n: (float(series.values[i, c]) if series.observed[i, c] else None) for c, n in enumerate(NAMES)}
    return json.dumps({"ts": int(series.epoch_s[i]), "values": vals}).encode()


def find_outage(series, lo, hi, n=24):
    """First start in [lo, hi) where the steps just before and just after an n-step outage are complete."""
    comp = series.observed.all(axis=1)
    for s in range(lo, hi):
        if comp[s - 1] and comp[s + n]:
            return s
    raise AssertionError("no place for the outage")


@pytest.fixture
def run_agent(tmp_path):
    """Start the MQTT agent in this process (a thread); returns a starter; stops it at the end."""
    started = []

    def start(cfg_path):
        from gapcast.edge.agent import AgentCore
        from gapcast.edge.cli import load_runtime
        from gapcast.edge.config import load_config
        from gapcast.edge.mqtt import MqttAgent
        from gapcast.edge.outbox_memory import MemoryOutbox

        cfg = load_config(cfg_path)
        bundle, backend, note = load_runtime(cfg)
        assert backend is not None and backend.name == "onnxruntime", note
        core = AgentCore.from_config(cfg, bundle.card, backend)
        agent = MqttAgent(cfg, core, MemoryOutbox(), snapshot_path="")
        stop = threading.Event()
        th = threading.Thread(target=agent.run, args=(stop,), daemon=True)
        th.start()
        started.append((stop, th))
        agent.test_stop = lambda: (stop.set(), th.join(15))
        return agent

    yield start
    for stop, th in started:
        stop.set()
        th.join(15)


def check_station(col, series, idx, outage, H):
    """Assert one filled (non-revision) message and one forecast per closed step, with exact flags and values.

    ``idx``: every step of the replay (row indices), outage steps included; ``outage``: steps with no reading.
    """
    name = series.station
    exp_steps = [int(series.epoch_s[i]) for i in idx[:-1]]  # the newest step stays open (no later reading)
    filled = sorted((b for b in col.of(f"/stations/{name}/filled") if not b["revision"]), key=lambda b: b["epoch_s"])
    assert [b["epoch_s"] for b in filled] == exp_steps
    obs = series.observed & (series.values >= VMIN) & (series.values <= VMAX)
    for b, i in zip(filled, idx[:-1]):
        assert b["ts"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(series.epoch_s[i]))
        expected_imputed = list(NAMES) if i in outage else [n for c, n in enumerate(NAMES) if not obs[i, c]]
        assert b["imputed"] == expected_imputed, (b["ts"], b["imputed"])
        assert len(b["values"]) == 13 and all(np.isfinite(v) for v in b["values"].values())
        for c, n in enumerate(NAMES):
            if i not in outage and obs[i, c]:
                assert b["values"][n] == pytest.approx(float(series.values[i, c]), abs=1e-3)
            else:
                assert VMIN[c] <= b["values"][n] <= VMAX[c]
        assert b["method"] == ("model" if b["imputed"] else "observed")
    fcs = sorted(col.of(f"/stations/{name}/forecast"), key=lambda b: b["origin"])
    assert [b["origin"] for b in fcs] == [b["ts"] for b in filled]
    for f in fcs:
        assert f["horizon"] == H and f["method"] == "model" and f["model_version"] == 1
        assert len(f["steps"]) == H and all(set(st["values"]) == set(NAMES) for st in f["steps"])
        assert f["steps"][0]["ts"] == f["start"] and f["units"]["PM2.5"] == "ug/m3"
    return filled, fcs


@pytest.mark.broker
def test_replay_ten_days_with_a_24h_outage(broker, tmp_path, beijing, tiny_bundle, signing_key, run_agent):
    series = beijing["Aotizhongxin"]
    n_steps = 240
    o0 = find_outage(series, START + 110, START + 200)
    outage = set(range(o0, o0 + 24))
    idx = list(range(START, START + n_steps))
    cfg = write_config(tmp_path / "edge.toml", broker, tiny_bundle, signing_key.public, ["Aotizhongxin"],
                       clock="readings", max_missing_share=1.0, tick_interval_s=0.2, status_interval_s=0.5)
    col = Collector(broker)
    agent = run_agent(cfg)
    assert col.wait(lambda: any(b.get("state") == "online" for b in col.of("/status")), 30), "agent not online"
    pub = publisher(broker)
    infos = [
        pub.publish(f"{PREFIX}/stations/Aotizhongxin/readings", reading(series, i), qos=1)
        for i in idx
        if i not in outage
    ]
    for info in infos:
        info.wait_for_publish(10)
    n_expected = n_steps - 1  # every step but the newest (still open), the 24 outage steps included
    assert col.wait(lambda: len(col.of("/Aotizhongxin/forecast")) >= n_expected), (
        f"got {len(col.of('/Aotizhongxin/forecast'))} forecasts of {n_expected}"
    )
    assert settled(col), "the agent never went idle"  # whatever it published has arrived: nothing more may come
    filled, fcs = check_station(col, series, idx, outage, H=24)
    assert len(filled) == len(fcs) == n_expected
    # The outage: closed when the readings resumed, then re-filled as ONE revision covering exactly the 24 steps.
    revs = col.of("/Aotizhongxin/revisions")
    assert all(not b["revision"] for b in col.of("/Aotizhongxin/filled"))  # revisions have their own topic
    (gap,) = [r for r in revs if r["start"] == filled[o0 - START]["ts"]]
    assert gap["end"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(series.epoch_s[o0 + 23]))
    assert gap["reason"] == "gap_end" and len(gap["steps"]) == 24
    assert all(s["imputed"] == list(NAMES) for s in gap["steps"])
    # Every other revision is a real gap of the data (no revision of a complete step).
    for r in revs:
        assert all(s["imputed"] for s in r["steps"])
    c = agent.core
    assert c.counters["filled"] == n_expected and c.counters["forecasts"] == n_expected
    assert c.missing["missing_step"] == 24
    sent = [i for i in idx if i not in outage]
    assert c.missing["null"] == int((~series.observed[sent]).sum())
    assert sum(c.rejected.values()) == 0 and c.counters["backend_errors"] == 0
    pub.loop_stop()
    col.close()


@pytest.mark.broker
def test_two_stations_in_parallel_over_mqtt_311(broker, tmp_path, beijing, tiny_bundle, signing_key, run_agent):
    """Two stations interleaved; the agent speaks MQTT 3.1.1 here (clean_session = false)."""
    a, b = beijing["Aotizhongxin"], beijing["Changping"]
    n_steps = 72
    silent = set(range(START + 30, START + 42))  # Changping silent 12 h: closed by Aotizhongxin's readings
    cfg = write_config(tmp_path / "edge.toml", broker, tiny_bundle, signing_key.public, ["Aotizhongxin", "Changping"],
                       mqtt_version="3.1.1", clock="readings", max_missing_share=1.0, tick_interval_s=0.2,
                       status_interval_s=0.5)
    col = Collector(broker)
    agent = run_agent(cfg)
    assert agent.cfg.broker.mqtt_version == "3.1.1"
    assert col.wait(lambda: any(x.get("state") == "online" for x in col.of("/status")), 30)
    pub = publisher(broker)
    infos = []
    for i in range(START, START + n_steps):
        infos.append(pub.publish(f"{PREFIX}/stations/Aotizhongxin/readings", reading(a, i), qos=1))
        if i not in silent:
            infos.append(pub.publish(f"{PREFIX}/stations/Changping/readings", reading(b, i), qos=1))
    for info in infos:
        info.wait_for_publish(10)
    assert col.wait(lambda: len(col.of("/forecast")) >= 2 * (n_steps - 1))
    assert settled(col), "the agent never went idle"
    idx = list(range(START, START + n_steps))
    check_station(col, a, idx, set(), H=24)
    # Changping's silent steps were closed on the readings clock and flagged all-imputed; its idx list includes
    # them (they are published) but its readings skipped them.
    check_station(col, b, idx, silent, H=24)
    pub.loop_stop()
    col.close()


@pytest.mark.broker
def test_readings_sent_while_the_agent_is_away_arrive_after_it_reconnects(
    broker, tmp_path, beijing, tiny_bundle, signing_key, run_agent
):
    """Persistent session (MQTT 5 clean_start = false + session expiry): the broker queues QoS 1 readings."""
    series = beijing["Aotizhongxin"]
    cfg = write_config(tmp_path / "edge.toml", broker, tiny_bundle, signing_key.public, ["Aotizhongxin"],
                       clock="readings", max_missing_share=1.0, tick_interval_s=0.2)
    col = Collector(broker)
    first = run_agent(cfg)
    assert col.wait(lambda: any(b.get("state") == "online" for b in col.of("/status")), 30)
    first.test_stop()  # clean stop: "offline", DISCONNECT; the session (and its subscription) stays at the broker
    assert col.wait(lambda: any(b.get("state") == "offline" for b in col.of("/status")), 10)
    pub = publisher(broker)
    for i in range(START, START + 6):
        pub.publish(f"{PREFIX}/stations/Aotizhongxin/readings", reading(series, i), qos=1).wait_for_publish(10)
    pub.loop_stop()
    second = run_agent(cfg)  # same client id: the broker delivers what it queued
    assert col.wait(lambda: second.core.counters["readings"] == 6, 30), dict(second.core.counters)
    assert col.wait(lambda: len(col.of("/Aotizhongxin/forecast")) == 5, 30)
    assert [b["ts"] for b in col.of("/Aotizhongxin/filled")] == [
        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(series.epoch_s[i])) for i in range(START, START + 5)
    ]
    col.close()


@pytest.mark.broker
def test_last_will_when_the_agent_is_killed(broker, tmp_path, tiny_bundle, signing_key):
    cfg = write_config(tmp_path / "edge.toml", broker, tiny_bundle, signing_key.public, ["Aotizhongxin"],
                       status_interval_s=0.5)
    col = Collector(broker, f"{PREFIX}/gateways/gw-test/status")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log = open(tmp_path / "agent.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "gapcast.cli", "edge", "run", "--config", str(cfg)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        ok = col.wait(lambda: any(x.get("state") == "online" for x in col.of("/status")), 60)
        assert ok, (tmp_path / "agent.log").read_text()[-3000:]
        online = [x for x in col.of("/status") if x.get("state") == "online"][-1]
        assert online["gateway"] == "gw-test" and online["backend"] == "onnxruntime" and online["model"]["version"] == 1
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert col.wait(lambda: any(x.get("state") == "offline" for x in col.of("/status")), 30)
        (off,) = [x for x in col.of("/status") if x.get("state") == "offline"]
        assert off == {"schema": "gapcast/status/1", "gateway": "gw-test", "state": "offline",
                       "reason": "connection lost", "fleet": "default"}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
        col.close()
    # The Last Will is retained: a new subscriber sees "offline" at once.
    late = Collector(broker, f"{PREFIX}/gateways/gw-test/status")
    assert late.wait(lambda: late.of("/status") != [], 10)
    assert late.of("/status")[-1]["state"] == "offline"
    late.close()


@pytest.mark.broker
def test_sigterm_publishes_offline_and_snapshots_the_windows(broker, tmp_path, tiny_bundle, signing_key):
    cfg = write_config(tmp_path / "edge.toml", broker, tiny_bundle, signing_key.public, ["Aotizhongxin"],
                       status_interval_s=0.5)
    col = Collector(broker, f"{PREFIX}/gateways/gw-test/status")
    log = open(tmp_path / "agent.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "gapcast.cli", "edge", "run", "--config", str(cfg)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        ok = col.wait(lambda: any(x.get("state") == "online" for x in col.of("/status")), 60)
        assert ok, (tmp_path / "agent.log").read_text()[-3000:]
        pub = publisher(broker)
        now = int(time.time()) // CAD * CAD
        pub.publish(f"{PREFIX}/stations/Aotizhongxin/readings",
                    json.dumps({"ts": now, "values": {"PM2.5": 12.0}}), qos=1).wait_for_publish(10)
        pub.loop_stop()
        # The reading is in: a status after it counts it and holds nothing (the window has it for the snapshot).
        seen = len(col.of("/status"))
        assert col.wait(lambda: any((b.get("shell") or {}).get("inbound", 0) >= 1 and (b.get("held") or {}).get("readings") == 0
                                    for b in col.of("/status")[seen:]), 60), (tmp_path / "agent.log").read_text()[-3000:]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
    assert col.wait(lambda: any(x.get("state") == "offline" for x in col.of("/status")), 10)
    assert [x for x in col.of("/status") if x.get("state") == "offline"][-1]["reason"] == "shutdown"
    col.close()
    from gapcast.edge.state import read_snapshot

    snap = read_snapshot(tmp_path / "state" / "windows.npz")
    assert list(snap.stations) == ["Aotizhongxin"]
    assert (tmp_path / "state" / "outbox.sqlite").is_file()


def test_wall_clock_jumps_neither_skip_nor_repeat_steps(make_core, tmp_path):
    """The shell maps monotonic time to event time once; the wall clock jumping +1 h and -1 h changes nothing."""
    from conftest import T0, FakeBackend

    from gapcast.edge.config import parse_config
    from gapcast.edge.messages import iso
    from gapcast.edge.mqtt import MqttAgent
    from gapcast.edge.outbox_memory import MemoryOutbox

    cfg = parse_config({"gateway": {"id": "gw"}, "stations": {"names": ["s1"]}, "outbox": {"kind": "memory"},
                        "model": {"bundle": "b", "trusted_keys": ["k"]}}, base=tmp_path)
    core = make_core(backend=FakeBackend(), lateness_s=0.0)
    wall, mono = [T0 + 0.0], [1000.0]
    agent = MqttAgent(cfg, core, MemoryOutbox(), wall=lambda: wall[0], mono=lambda: mono[0], snapshot_path="")
    core.ingest("gapcast/v1/stations/s1/readings", b'{"ts": 1483228800, "values": {"a": 1, "b": 1}}', agent.now())
    published = []
    for minute in range(1, 6 * 60 + 1):  # 6 h of ticks, one a minute; the station is silent after step 0
        mono[0] += 60.0
        wall[0] += 60.0
        if minute == 90:
            wall[0] += 3600.0  # NTP steps the wall clock forward 1 h...
        if minute == 200:
            wall[0] -= 3600.0  # ...and back
        published += [json.loads(m.payload)["ts"] for m in core.tick(agent.now()) if m.kind == "filled"]
    assert published == [iso(T0 + j * 3600) for j in range(6)]  # steps 0..5, each once, in order
    assert agent.now() == T0 + 6 * 3600


def test_event_clock_ignores_wall_clock_jumps():
    """Ticks use monotonic time mapped once to event time: a wall-clock jump (either way) changes nothing."""
    from gapcast.edge.mqtt import EventClock

    wall = [1_483_228_800.0]
    clock = EventClock(wall[0], 100.0)
    assert clock.now(100.0) == 1_483_228_800.0
    wall[0] += 3600  # the wall clock jumps forward 1 h...
    assert clock.now(160.0) == 1_483_228_860.0  # ...event time advances by the monotonic 60 s only
    wall[0] -= 7200  # ...and back 2 h
    assert clock.now(220.0) == 1_483_228_920.0


def test_connect_failure_log_warns_once_per_back_off_step(caplog):
    from gapcast.edge.mqtt import ConnectFailureLog

    flog = ConnectFailureLog("broker.lan", 8883)
    with caplog.at_level("WARNING", logger="gapcast.edge.mqtt"):
        logged = [flog.failed(ConnectionRefusedError(111, "Connection refused")) for _ in range(9)]
    assert logged == [True, True, False, True, False, False, False, True, False]  # attempts 1, 2, 4, 8
    assert len(caplog.records) == 4 and all(r.levelname == "WARNING" for r in caplog.records)
    assert "cannot connect to the broker broker.lan:8883: [Errno 111] Connection refused (8 failed" in caplog.text
    assert flog.failed(OSError("No route to host")) is True  # a new reason is always told
    flog.connected()
    assert flog.failures == 0 and flog.failed(OSError("No route to host")) is True


def test_unreachable_broker_gives_a_warning_with_host_port_and_reason(make_core, caplog):
    from gapcast.edge.config import parse_config
    from gapcast.edge.mqtt import MqttAgent
    from gapcast.edge.outbox_memory import MemoryOutbox
    from gapcast.tools.localbroker import free_port

    port = free_port()  # nobody listens there: every attempt is refused
    cfg = parse_config(
        {"gateway": {"id": "gw"}, "stations": {"names": ["s1"]},
         "mqtt": {"host": "127.0.0.1", "port": port, "reconnect_min_s": 1, "reconnect_max_s": 1}}
    )
    agent = MqttAgent(cfg, make_core(), MemoryOutbox(), snapshot_path="")
    with caplog.at_level("DEBUG"):
        agent.start()
        try:
            deadline = time.monotonic() + 10.0
            while agent._connect_failures.failures < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            agent.client.loop_stop()
    assert agent._connect_failures.failures >= 2
    warnings = [r.getMessage() for r in caplog.records if r.name == "gapcast.edge.mqtt" and r.levelname == "WARNING"]
    assert warnings and warnings[0].startswith(f"cannot connect to the broker 127.0.0.1:{port}: ")
    assert "refused" in warnings[0].lower()
    assert not [r for r in caplog.records if r.name == "gapcast.edge.paho" and "not connected" in r.getMessage()]
