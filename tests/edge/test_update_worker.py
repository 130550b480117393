"""The real agent (core + MQTT shell + updater) keeps closing steps and acknowledging readings while a release is
staged on the worker thread for as long as the test wants (a TensorRT build, say); the swap waits for a step."""

from __future__ import annotations

import json
import math
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from support.fleet_fakes import FLEET, PREFIX, fake_factory, make_bundle, new_key

from gapcast.cli import main

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]


def _until(pred, timeout_s=15.0):
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def test_agent_keeps_closing_steps_and_acking_readings_while_a_slow_staging_runs(broker, tmp_path):
    from gapcast.edge.agent import AgentCore
    from gapcast.edge.config import parse_config
    from gapcast.edge.guard import build_update_link
    from gapcast.edge.mqtt import MqttAgent, make_outbox
    from gapcast.edge.updater import UpdaterConfig

    priv, pub, key = new_key(tmp_path / "keys", "release")
    v1 = make_bundle(tmp_path / "v1", key, version=1)
    v2 = make_bundle(tmp_path / "v2", key, version=2, fake={"bias": 0.1})
    cfg = parse_config(
        {
            "gateway": {"id": "gw-w", "fleet": FLEET},
            "mqtt": {"host": broker.host, "port": broker.port},
            "stations": {"names": ["s1"]},
            "model": {"bundle": str(v1), "trusted_keys": [str(pub)]},
            "agent": {"clock": "readings", "tick_interval_s": 0.02, "state_dir": str(tmp_path / "agent"),
                      "max_missing_share": 1.0, "status_interval_s": 0.5},  # fmt: skip
            "outbox": {"kind": "memory"},
            "update": {"enabled": True, "health_steps": 2},
        },
        base=tmp_path,
    )
    build = threading.Event()  # v2's backend build ends when the test says so
    ucfg = UpdaterConfig(gateway="gw-w", fleet=FLEET, state_dir=cfg.update.state_dir, health_steps=2)
    link, guard = build_update_link(
        ucfg, trusted_keys=[str(pub)], backend_factory=fake_factory(gate={2: build}), seed=cfg.model.bundle
    )
    core = AgentCore.from_config(cfg, guard.bundle.card, guard)
    agent = MqttAgent(cfg, core, make_outbox(cfg), snapshot_path="", update_link=link)
    acks: list[int] = []
    real_ack = agent.client.ack

    def ack(mid, qos):  # the shell's inbound PUBACK, after the outputs are stored
        acks.append(mid)
        return real_ack(mid, qos)

    agent.client.ack = ack
    forecasts: list[dict] = []
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="watcher", protocol=mqtt.MQTTv5)
    sub.on_message = lambda c, u, msg: forecasts.append(json.loads(msg.payload))
    sub.connect(broker.host, broker.port)
    sub.subscribe(f"{PREFIX}/stations/s1/forecast", 1)
    sub.loop_start()
    station = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="station", protocol=mqtt.MQTTv5)
    station.connect(broker.host, broker.port)
    station.loop_start()
    stop = threading.Event()
    runner = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    t0 = 1_483_228_800

    def reading(i):
        vals = {"PM2.5": 30 + 10 * math.sin(i / 4), "TEMP": 20 + 5 * math.cos(i / 6), "WSPM": 2.0}
        station.publish(f"{PREFIX}/stations/s1/readings", json.dumps({"ts": t0 + 3600 * i, "values": vals}), qos=1)

    try:
        runner.start()
        assert agent.connected.wait(10)
        _until(lambda: agent.counters["connects"] >= 1)
        for i in range(6):
            reading(i)
        _until(lambda: len(forecasts) == 5)
        assert main(["fleet", "publish", str(v2), "--sign-key", str(priv), "--fleet", FLEET, "--broker",
                     broker.url]) == 0  # fmt: skip
        _until(lambda: guard.updater.status()["update_phase"] == "staging")
        acks_before, steps_before = len(acks), len(forecasts)
        for i in range(6, 16):
            reading(i)
        _until(lambda: len(forecasts) == 15)  # 10 more steps closed and published while the build is blocked
        assert guard.updater.status()["update_phase"] == "staging" and not build.is_set()
        assert len(acks) - acks_before >= 10  # ... and every reading of them acknowledged
        during = forecasts[steps_before:]
        build.set()
        _until(lambda: guard.updater.update_ready or guard.model_version == 2)
        for i in range(16, 20):
            reading(i)
        _until(lambda: len(forecasts) == 19)
    finally:
        build.set()
        stop.set()
        runner.join(15)
        for c in (sub, station):
            c.disconnect()
            c.loop_stop()
        guard.updater.close()
    assert [m["model_version"] for m in during] == [1] * 10
    versions = [m["model_version"] for m in sorted(forecasts, key=lambda m: m["origin"])]
    assert versions == [1] * 15 + [2] * 4  # the swap waited for the first step boundary after the staging
    assert len({m["origin"] for m in forecasts}) == 19  # no step lost, none twice
