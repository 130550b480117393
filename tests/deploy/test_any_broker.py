"""A second, independent MQTT implementation: RabbitMQ's MQTT plugin (Debian's rabbitmq-server 3.10, MQTT 3.1.1).

One broker for the module (starting a node takes seconds). On it, in one test: the real agent (MQTT 3.1.1, persistent
session, retained status with a Last Will, fleet updates on), ``gapcast replay`` publishing real Beijing readings,
and ``gapcast fleet publish --mqtt 3.1.1`` releasing v2, which the agent switches to between two steps. What RabbitMQ
3.10 lacks (MQTT 5; retained messages for wildcard subscriptions, so ``gapcast fleet status`` and ``rollback`` see
nothing) is asserted too, so the README's broker table stays true.
"""

from __future__ import annotations

import json
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from support.fleet_fakes import FLEET, PREFIX, fake_factory, make_bundle, new_key
from support.rabbitmq import LocalRabbitMQ, find_rabbitmq_server

pytestmark = [pytest.mark.broker, pytest.mark.timeout(180)]

STATION = "Aotizhongxin"


@pytest.fixture(scope="module")
def rabbit(tmp_path_factory):
    if find_rabbitmq_server() is None:
        pytest.skip("rabbitmq-server is not installed (make test installs it with apt-get)")
    r = LocalRabbitMQ(tmp_path_factory.mktemp("rabbitmq")).start()
    try:
        yield r
    finally:
        r.stop()


class Watcher:
    """A 3.1.1 subscriber on exact topics (QoS 1); keeps every message parsed (network thread appends)."""

    def __init__(self, broker, topics: list[str]) -> None:
        self.got: list[tuple[str, dict, bool]] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"watch-{time.monotonic_ns()}", protocol=mqtt.MQTTv311)
        self.c.on_message = self._on_message
        self.c.on_subscribe = lambda *a: self.subscribed.set()
        self.c.connect(broker.host, broker.port)
        self.c.subscribe([(t, 1) for t in topics])
        self.c.loop_start()
        assert self.subscribed.wait(10)

    def _on_message(self, c, u, msg):
        with self.lock:
            self.got.append((msg.topic, json.loads(msg.payload) if msg.payload else {}, bool(msg.retain)))

    def of(self, suffix: str) -> list[dict]:
        with self.lock:
            return [b for t, b, _ in self.got if t.endswith(suffix)]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def _wait(pred, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out: {what}")
        time.sleep(0.05)


def test_rabbitmq_refuses_mqtt5_so_the_agent_needs_version_311(rabbit):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="v5-probe", protocol=mqtt.MQTTv5)
    acked = threading.Event()
    c.on_connect = lambda *a: acked.set() if not a[3].is_failure else None
    c.connect(rabbit.host, rabbit.port)
    c.loop_start()
    try:
        assert not acked.wait(2)  # RabbitMQ 3.10 closes an MQTT 5 CONNECT: no session
    finally:
        c.loop_stop()


def test_agent_replay_and_fleet_update_on_rabbitmq(rabbit, tmp_path, data_root):
    import sqlite3

    from gapcast.brokerurl import parse_broker_url
    from gapcast.cli import main
    from gapcast.edge.agent import AgentCore
    from gapcast.edge.config import parse_config
    from gapcast.edge.mqtt import MqttAgent, make_outbox
    from gapcast.edge.updater import UpdaterConfig, build_update_link
    from gapcast.sink.client import SinkClient, SinkOptions
    from gapcast.sink.stores import SQLiteStore
    from gapcast.tools.replay import ReplayOptions, plan_replay, replay
    from gapcast.train.data import load_beijing

    priv, pub, key = new_key(tmp_path / "keys", "release")
    v1 = make_bundle(tmp_path / "v1", key, version=1)
    v2 = make_bundle(tmp_path / "v2", key, version=2, fake={"bias": 0.1})
    cfg = parse_config(
        {
            "gateway": {"id": "gw-r", "fleet": FLEET},
            "mqtt": {"host": rabbit.host, "port": rabbit.port, "version": "3.1.1", "reconnect_min_s": 1, "reconnect_max_s": 2},
            "stations": {"names": [STATION]},
            "model": {"bundle": str(v1), "trusted_keys": [str(pub)]},
            "input": {"unknown_channels": "ignore"},  # the fake bundle has 3 of Beijing's 13 channels
            "agent": {"clock": "readings", "tick_interval_s": 0.05, "state_dir": str(tmp_path / "agent"),
                      "max_missing_share": 1.0, "status_interval_s": 0.5},  # fmt: skip
            "outbox": {"kind": "memory"},
            "update": {"enabled": True, "health_steps": 2},
        },
        base=tmp_path,
    )
    ucfg = UpdaterConfig(gateway="gw-r", fleet=FLEET, state_dir=cfg.update.state_dir, health_steps=2)
    link, guard = build_update_link(ucfg, trusted_keys=[str(pub)], backend_factory=fake_factory(), seed=cfg.model.bundle)
    core = AgentCore.from_config(cfg, guard.bundle.card, guard)
    agent = MqttAgent(cfg, core, make_outbox(cfg), snapshot_path="", update_link=link)
    watch = Watcher(rabbit, [f"{PREFIX}/stations/{STATION}/filled", f"{PREFIX}/stations/{STATION}/forecast",
                             f"{PREFIX}/gateways/gw-r/model"])  # fmt: skip
    stop = threading.Event()
    # The reference sink on the same broker (MQTT 3.1.1, persistent session): it must store what the agent sends.
    sink_db = tmp_path / "sink.db"
    sinks: list[SinkClient] = []
    sink_built = threading.Event()

    def run_sink():  # the store's SQLite connection belongs to the thread that writes
        sinks.append(SinkClient(parse_broker_url(rabbit.url), SQLiteStore(sink_db),
                                options=SinkOptions(prefix=PREFIX, client_id="sink-rmq", mqtt_version="3.1.1")))
        sink_built.set()
        sinks[0].run(stop)

    sink_runner = threading.Thread(target=run_sink, daemon=True)
    sink_runner.start()
    assert sink_built.wait(15) and sinks[0].subscribed.wait(15), "the sink did not subscribe on RabbitMQ"
    runner = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    runner.start()
    series = load_beijing(data_root, [STATION])
    t0 = 1_464_739_200  # 2016-06-01T00:00Z
    opts = ReplayOptions(speed=0, prefix=PREFIX, qos=1, mqtt_version="3.1.1", client_id="replay-rmq")
    try:
        assert agent.connected.wait(15), "the agent did not connect to RabbitMQ"
        _wait(lambda: agent.counters["connects"] >= 1, 10, "the agent's first status")
        # 1) 24 h of real readings: 23 steps close on model v1.
        first = replay(plan_replay(series, start_s=t0, end_s=t0 + 24 * 3600), rabbit.url, opts)
        assert first.acknowledged == 24
        _wait(lambda: len(watch.of("/forecast")) >= 23, 30, "23 forecasts from v1")
        # 2) a signed release over MQTT 3.1.1: retained manifest and chunks, fetched by exact chunk topics.
        assert main(["fleet", "publish", str(v2), "--sign-key", str(priv), "--fleet", FLEET, "--broker", rabbit.url,
                     "--mqtt", "3.1.1", "--chunk-bytes", "1000"]) == 0  # fmt: skip
        _wait(lambda: guard.updater.update_ready, 30, "the release's artifact complete at the gateway")
        # 3) 24 h more: the switch happens at a step boundary, then the health window commits v2.
        second = replay(plan_replay(series, start_s=t0 + 24 * 3600, end_s=t0 + 48 * 3600), rabbit.url, opts)
        assert second.acknowledged == 24
        _wait(lambda: len(watch.of("/forecast")) >= 47, 30, "47 forecasts in all")
        _wait(lambda: any(m.get("committed") for m in watch.of("/model")), 15, "v2 committed")

        def sink_forecasts():
            con = sqlite3.connect(sink_db)
            try:
                return con.execute("SELECT COUNT(DISTINCT origin) FROM forecasts").fetchone()[0]
            except sqlite3.OperationalError:  # the sink has not created its tables yet
                return 0
            finally:
                con.close()

        _wait(lambda: sink_forecasts() >= 47, 30, "the sink stored 47 forecasts")
    finally:
        stop.set()
        runner.join(20)
        sink_runner.join(20)
        watch.close()
    fc = sorted(watch.of("/forecast"), key=lambda m: m["origin"])
    origins = [m["origin"] for m in fc]
    assert len(origins) == len(set(origins)) == 47  # one forecast per closed step, none twice, none missed
    versions = [m["model_version"] for m in fc]
    switch = versions.index(2)
    assert switch >= 23 and versions == [1] * switch + [2] * (47 - switch)
    filled = watch.of("/filled")
    assert len({m["id"] for m in filled if not m.get("revision")}) >= 47
    assert [m["stage"] for m in watch.of("/model")] == ["received", "verified", "staged", "active", "active"]
    con = sqlite3.connect(sink_db)
    stored_ts = {t for (t,) in con.execute("SELECT DISTINCT ts FROM series WHERE station = ?", (STATION,))}
    stored_origins = {o for (o,) in con.execute("SELECT DISTINCT origin FROM forecasts")}
    con.close()
    assert stored_ts == {m["epoch_s"] for m in filled if not m.get("revision")}  # every filled step, in the store
    assert len(stored_origins) == 47

    # The retained status and Last Will work on RabbitMQ for an exact subscription...
    status = Watcher(rabbit, [f"{PREFIX}/gateways/gw-r/status"])
    try:
        _wait(lambda: status.got, 10, "the retained status")
        topic, body, retained = status.got[0]
        assert retained and body["state"] == "offline" and body["reason"] == "shutdown"
    finally:
        status.close()
    # ...but not for a wildcard one: `gapcast fleet status` (gateways/+/status) finds no gateway on RabbitMQ 3.10.
    from gapcast.deploy.fleet import FleetClient, fleet_status

    with FleetClient(rabbit.url, mqtt_version="3.1.1", timeout_s=10) as client:
        assert fleet_status(client, PREFIX, FLEET) == []


def test_check_connect_passes_on_rabbitmq(rabbit, tmp_path):
    from support.small_agent import small_config

    from gapcast.edge.brokercheck import check_broker

    res = check_broker(small_config(rabbit.host, rabbit.port, tmp_path, mqtt={"version": "3.1.1"}), timeout_s=10)
    assert [(s.name, s.ok) for s in res.steps] == [("tcp", True), ("connect", True), ("subscribe", True), ("publish", True)]

