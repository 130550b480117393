"""`gapcast fleet ...` against a private Mosquitto: releases reach the right gateways, retained, and switch cleanly.

The gateways here are the real :class:`~gapcast.edge.updater.Updater` and :class:`~gapcast.edge.guard.GuardedBackend` behind a small
paho client (the same wiring the agent's MQTT shell does), with the numpy fake backends of ``support.fleet_fakes``.
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
from support.contracts import assert_contracts
from support.fleet_fakes import FLEET, PREFIX, MqttGateway, committed, make_bundle, new_key, step_until
from support.small_agent import wait_for

from gapcast.cli import main
from gapcast.deploy.fleet import FleetClient, FleetError, fleet_status, pack_bundle, rollback
from gapcast.edge.release import FleetTopics, percent_bucket

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]


@pytest.fixture
def fleet_setup(tmp_path):
    priv, pub, key = new_key(tmp_path / "keys", "release")
    v1 = make_bundle(tmp_path / "v1", key, version=1)
    v2 = make_bundle(tmp_path / "v2", key, version=2, fake={"bias": 0.1})
    return priv, pub, v1, v2


def _cli(broker, *args):
    return main(["fleet", *args, "--fleet", FLEET, "--broker", broker.url])


def test_release_mid_replay_switches_at_one_step_and_status_shows_it(broker, tmp_path, fleet_setup, capsys):
    priv, pub, v1, v2 = fleet_setup
    gw = MqttGateway(broker, tmp_path, pub, v1, "gw-a").connect()
    try:
        for _ in range(5):
            gw.step()
        t = threading.Thread(target=lambda: _cli(broker, "publish", str(v2), "--sign-key", str(priv),
                                                 "--chunk-bytes", "1000"))  # fmt: skip
        t.start()
        step_until([gw], lambda: committed(gw, 2))
        t.join(30)
        for _ in range(3):
            gw.step()
        _status_until(broker, FLEET, lambda rows: [(r.gateway, r.model_version, r.stage) for r in rows]
                      == [("gw-a", 2, "active")])  # the gateway's retained reports reached the broker
        assert _cli(broker, "status", "--json") == 0
    finally:
        gw.close()
    v = gw.versions
    switch = v.index(2)
    assert v[:switch] == [1] * switch and v[switch:] == [2] * (len(v) - switch) and switch >= 5
    assert len(gw.forecasts) == len(v) and all(np.isfinite(f).all() for f in gw.forecasts)  # no step missed
    assert gw.stages == ["received", "verified", "staged", "active", "active"]
    out = capsys.readouterr().out
    assert "published release v2 of confill to fleet city (everyone)" in out
    rows = json.loads(out[out.index("["):])
    assert [(r["gateway"], r["online"], r["model_version"], r["stage"], r["update_version"]) for r in rows] == [
        ("gw-a", True, 2, "active", 2)
    ]


def test_canary_then_percent_then_promote(broker, tmp_path, fleet_setup, capsys):
    priv, pub, v1, v2 = fleet_setup
    names = ["gw-a", "gw-b", "gw-c", "gw-d", "gw-e"]
    gws = [MqttGateway(broker, tmp_path, pub, v1, n).connect() for n in names]
    try:
        assert _cli(broker, "publish", str(v2), "--sign-key", str(priv), "--canary", "gw-b,gw-d") == 0
        assert "(canary gw-b,gw-d)" in capsys.readouterr().out
        step_until(gws, lambda: committed(gws[1], 2) and committed(gws[3], 2))
        step_until(gws, lambda: all(g.updater.last_sequence_seen > 0 for g in gws))  # everyone saw it
        assert [g.guard.model_version for g in gws] == [1, 2, 1, 2, 1]
        assert [g.stages for g in (gws[0], gws[2], gws[4])] == [[], [], []]  # not targeted: nothing reported
        with FleetClient(broker.url) as client:
            rows = {r.gateway: r for r in fleet_status(client, PREFIX, FLEET)}
        assert {n: rows[n].model_version for n in names} == {"gw-a": 1, "gw-b": 2, "gw-c": 1, "gw-d": 2, "gw-e": 1}
        assert _cli(broker, "promote", "--sign-key", str(priv)) == 0
        assert "promoted release v2 of confill to fleet city (everyone)" in capsys.readouterr().out
        step_until(gws, lambda: all(committed(g, 2) for g in (gws[0], gws[2], gws[4])))
        assert [g.guard.model_version for g in gws] == [2] * 5
        assert gws[1].stages == ["received", "verified", "staged", "active", "active"]  # promote: no second install
    finally:
        for g in gws:
            g.close()


def test_percent_ring_is_the_deterministic_bucket(broker, tmp_path, fleet_setup):
    priv, pub, v1, v2 = fleet_setup
    names = [f"gw-{i}" for i in range(6)]
    inside = {n for n in names if percent_bucket(FLEET, n) < 5000}
    assert 0 < len(inside) < 6  # the ids are chosen so that the ring splits them
    gws = [MqttGateway(broker, tmp_path, pub, v1, n).connect() for n in names]
    try:
        assert _cli(broker, "publish", str(v2), "--sign-key", str(priv), "--percent", "50") == 0
        step_until(gws, lambda: all(committed(g, 2) for g in gws if g.name in inside))
        step_until(gws, lambda: all(g.updater.last_sequence_seen > 0 for g in gws))
        assert {g.name for g in gws if g.guard.model_version == 2} == inside
    finally:
        for g in gws:
            g.close()


def test_offline_gateway_gets_the_retained_release_when_it_connects(broker, tmp_path, fleet_setup):
    priv, pub, v1, v2 = fleet_setup
    assert _cli(broker, "publish", str(v2), "--sign-key", str(priv)) == 0
    broker.stop()  # even across a broker restart: retained messages are persisted
    broker.start()
    gw = MqttGateway(broker, tmp_path, pub, v1, "gw-late").connect()
    try:
        step_until([gw], lambda: committed(gw, 2))
    finally:
        gw.close()
    assert gw.versions[0] == 1 and gw.versions[-1] == 2


def test_flipped_byte_in_a_retained_chunk_is_refused(broker, tmp_path, fleet_setup):
    priv, pub, v1, v2 = fleet_setup
    assert _cli(broker, "publish", str(v2), "--sign-key", str(priv), "--chunk-bytes", "2000") == 0
    _, art = pack_bundle(v2)
    import hashlib

    art_id = hashlib.sha256(art).hexdigest()[:16]
    bad = bytearray(art[2000:4000])
    bad[5] ^= 0x01
    with FleetClient(broker.url) as client:  # someone with broker access alters chunk 1
        client.publish([(FleetTopics(PREFIX, FLEET).chunk(art_id, 1), bytes(bad))])
    gw = MqttGateway(broker, tmp_path, pub, v1, "gw-a").connect()
    try:
        step_until([gw], lambda: gw.stages[-1:] == ["rejected"])
        for _ in range(3):
            gw.step()
    finally:
        gw.close()
    assert set(gw.versions) == {1}
    assert "artifact refused: chunk 1 has sha256" in gw.reports[-1]["reason"]


def test_rollback_to_an_earlier_release(broker, tmp_path, fleet_setup, capsys):
    priv, pub, v1, v2 = fleet_setup
    # v1 was released to the fleet before v2 (its artifact is still retained).
    gw = MqttGateway(broker, tmp_path, pub, v1, "gw-a").connect()
    try:
        assert _cli(broker, "publish", str(v1), "--sign-key", str(priv)) == 0
        step_until([gw], lambda: gw.updater.last_sequence_seen > 0)  # the running bundle already: no install
        assert _cli(broker, "publish", str(v2), "--sign-key", str(priv)) == 0
        step_until([gw], lambda: committed(gw, 2))
        assert _cli(broker, "rollback", "--to", "1", "--sign-key", str(priv)) == 0
        assert "issued rollback v1 of confill to fleet city (everyone)" in capsys.readouterr().out
        step_until([gw], lambda: committed(gw, 1))
        assert [(r["stage"], r.get("kind")) for r in gw.reports[-5:]] == [
            ("received", "rollback"), ("verified", "rollback"), ("staged", "rollback"), ("active", "rollback"),
            ("active", None),
        ]
        # Publishing v1 as a normal release now is refused by the CLI: it is not above the current release.
        assert _cli(broker, "publish", str(v1), "--sign-key", str(priv)) == 1
        assert "not newer than the fleet's current release v1" in capsys.readouterr().err
        assert _cli(broker, "rollback", "--to", "7", "--sign-key", str(priv)) == 1
        assert "has no retained release v7" in capsys.readouterr().err
    finally:
        gw.close()
    assert gw.versions[-1] == 1


def test_publish_refuses_a_version_not_above_the_current_release(broker, tmp_path, fleet_setup):
    priv, pub, v1, v2 = fleet_setup
    assert _cli(broker, "publish", str(v2), "--sign-key", str(priv)) == 0
    from gapcast.deploy.fleet import load_private_key, publish_release
    from gapcast.edge.release import Targets

    with FleetClient(broker.url) as client, pytest.raises(FleetError, match="not newer than the fleet's current"):
        publish_release(client, FleetTopics(PREFIX, FLEET), v1, load_private_key(priv), Targets(everyone=True))
    with FleetClient(broker.url) as client, pytest.raises(FleetError, match="already the fleet's current"):
        rollback(client, FleetTopics(PREFIX, FLEET), load_private_key(priv), 2)


def test_gateway_killed_between_staging_and_switching_comes_back_on_one_bundle(broker, tmp_path, fleet_setup):
    """SIGKILL while the new backend is being built (staged, not switched), then a restart on the same state."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    priv, pub, v1, v2 = fleet_setup
    tests_dir = Path(__file__).resolve().parents[1]
    child = f"""
import sys, time
sys.path.insert(0, {str(tests_dir)!r})
from pathlib import Path
from support.fleet_fakes import MqttGateway
class B:
    host, port = {broker.host!r}, {broker.port}
gw = MqttGateway(B, Path({str(tmp_path)!r}), {str(pub)!r}, {str(v1)!r}, "gw-k", slow={{2: 120.0}}).connect()
print("ready", flush=True)
while True:
    gw.step()
    time.sleep(0.02)
"""
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    journal = tmp_path / "state-gw-k" / "journal.json"
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        assert _cli(broker, "publish", str(v2), "--sign-key", str(priv)) == 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and '"phase": "staged"' not in (
            journal.read_text() if journal.exists() else ""
        ):
            time.sleep(0.02)
        assert '"phase": "staged"' in journal.read_text()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    slots = tmp_path / "state-gw-k" / "slots"
    assert len([p for p in slots.iterdir() if not p.name.startswith(".")]) == 2  # v1 and the staged v2 on disk

    gw = MqttGateway(broker, tmp_path, pub, v1, "gw-k")  # restart: recovery runs before connecting
    assert gw.guard.model_version == 1
    assert [p.name for p in slots.iterdir()] == [gw.updater.store.current_name()]
    assert gw.stages == ["rolled_back"] and "restart interrupted the update" in gw.reports[0]["reason"]
    gw.connect()
    try:
        step_until([gw], lambda: committed(gw, 2))  # the retained release is retried, and completes
    finally:
        gw.close()
    assert gw.updater.store.read_journal()["attempts"] == {}


@pytest.mark.parametrize("case", ["healthy", "nan_after_activation"])
def test_agent_takes_a_release_mid_replay_without_missing_a_forecast(broker, tmp_path, fleet_setup, case):
    """The real agent (core + MQTT shell) replays hourly readings; a release lands in the middle."""
    import math

    import paho.mqtt.client as mqtt
    from support.fleet_fakes import fake_factory

    from gapcast.edge.agent import AgentCore
    from gapcast.edge.config import parse_config
    from gapcast.edge.guard import build_update_link
    from gapcast.edge.mqtt import MqttAgent, make_outbox
    from gapcast.edge.updater import UpdaterConfig

    priv, pub, v1, v2 = fleet_setup
    cfg = parse_config(
        {
            "gateway": {"id": "gw-r", "fleet": FLEET},
            "mqtt": {"host": broker.host, "port": broker.port},
            "stations": {"names": ["s1"]},
            "model": {"bundle": str(v1), "trusted_keys": [str(pub)]},
            "agent": {"clock": "readings", "tick_interval_s": 0.02, "state_dir": str(tmp_path / "agent"),
                      "max_missing_share": 1.0,
                      "status_interval_s": 0.5},  # fmt: skip
            "outbox": {"kind": "memory"},
            "update": {"enabled": True, "health_steps": 3},
        },
        base=tmp_path,
    )
    ucfg = UpdaterConfig(gateway="gw-r", fleet=FLEET, state_dir=cfg.update.state_dir, health_steps=3)
    fail = {2: 3} if case == "nan_after_activation" else None  # golden + shadow + 1 live call, then NaN
    link, guard = build_update_link(
        ucfg, trusted_keys=[str(pub)], backend_factory=fake_factory(fail), seed=cfg.model.bundle
    )
    core = AgentCore.from_config(cfg, guard.bundle.card, guard)
    agent = MqttAgent(cfg, core, make_outbox(cfg), snapshot_path="", update_link=link)
    got: dict[str, list] = {"forecast": [], "model": []}
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="watcher", protocol=mqtt.MQTTv5)

    recorded = []

    def on_message(c, u, msg):
        kind = msg.topic.rsplit("/", 1)[-1]
        recorded.append((msg.topic, bytes(msg.payload)))
        if kind in got:
            got[kind].append(json.loads(msg.payload))

    sub.on_message = on_message
    sub.connect(broker.host, broker.port)
    sub.subscribe([(f"{PREFIX}/stations/s1/forecast", 1), (f"{PREFIX}/gateways/gw-r/model", 1)])
    sub.loop_start()
    pubc = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="station", protocol=mqtt.MQTTv5)
    pubc.connect(broker.host, broker.port)
    pubc.loop_start()
    stop = threading.Event()
    runner = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    runner.start()
    t0 = 1_483_228_800  # 2017-01-01T00:00Z
    hours = 40
    try:
        assert agent.connected.wait(10)
        # Its online status is put after its subscriptions are sent on the same connection: once the broker
        # acknowledged the status, the subscription to the readings is in place.
        wait_for(lambda: agent.outbox.stats()["acked"].get("status"), 10, "the agent's online status acknowledged")
        for i in range(hours):
            vals = {"PM2.5": 30 + 10 * math.sin(i / 4), "TEMP": 20 + 5 * math.cos(i / 6), "WSPM": 2.0 + (i % 5) * 0.3}
            pubc.publish(f"{PREFIX}/stations/s1/readings", json.dumps({"ts": t0 + 3600 * i, "values": vals}), qos=1)
            if i == 15:
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and len(got["forecast"]) < 14:  # steps 0..13 closed
                    time.sleep(0.02)
                assert _cli(broker, "publish", str(v2), "--sign-key", str(priv)) == 0
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and not guard.updater.update_ready:
                    time.sleep(0.02)
                assert guard.updater.update_ready
            time.sleep(0.05)  # deliberate pacing: readings arrive one by one, as from a station, not in one burst
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and len(got["forecast"]) < hours - 1:
            time.sleep(0.05)
    finally:
        stop.set()
        runner.join(15)
        for c in (sub, pubc):
            c.disconnect()
            c.loop_stop()
    checked = assert_contracts(recorded)  # the forecasts and the update reports against their JSON Schemas
    assert checked["model"] >= 3 and checked["forecast"] == len(got["forecast"])
    fc = sorted(got["forecast"], key=lambda m: m["origin"])
    origins = [m["origin"] for m in fc]
    assert len(origins) == len(set(origins)) == hours - 1  # one forecast per closed step, none missed
    assert all(m["method"] == "model" for m in fc)
    versions = [m["model_version"] for m in fc]
    switch = versions.index(2)
    assert 14 <= switch <= 16  # the release landed at hour 15: it serves from the next step boundary
    stages = [m["stage"] for m in got["model"]]
    if case == "healthy":
        assert versions == [1] * switch + [2] * (hours - 1 - switch)
        assert stages == ["received", "verified", "staged", "active", "active"] and got["model"][-1]["committed"]
    else:
        assert versions == [1] * switch + [2] + [1] * (hours - 2 - switch)  # rolled back after one step
        assert stages == ["received", "verified", "staged", "active", "rolled_back"]
        assert "non-finite" in got["model"][-1]["reason"]


def _plain_agent(broker, tmp_path, bundle, pub, gateway: str, fleet: str):
    """The real agent (core + MQTT shell) with fleet updates OFF (no ``[update]``): the common gateway."""
    from gapcast.edge.agent import AgentCore
    from gapcast.edge.bundle import verify_bundle
    from gapcast.edge.config import parse_config
    from gapcast.edge.mqtt import MqttAgent, make_outbox

    cfg = parse_config(
        {
            "gateway": {"id": gateway, "fleet": fleet},
            "mqtt": {"host": broker.host, "port": broker.port},
            "stations": {"names": ["s1"]},
            "model": {"bundle": str(bundle), "trusted_keys": [str(pub)]},
            "agent": {"tick_interval_s": 0.05, "status_interval_s": 0.3, "state_dir": str(tmp_path / gateway)},
            "outbox": {"kind": "memory"},
        },
        base=tmp_path,
    )
    assert not cfg.update.enabled
    core = AgentCore.from_config(cfg, verify_bundle(bundle, [pub]).card)  # no backend: the interpolation fallback
    return MqttAgent(cfg, core, make_outbox(cfg), snapshot_path="")


def _status_until(broker, fleet, done, timeout_s=20.0):
    with FleetClient(broker.url, timeout_s=10) as client:
        deadline = time.monotonic() + timeout_s
        while True:
            rows = fleet_status(client, PREFIX, fleet)
            if done(rows) or time.monotonic() > deadline:
                return rows
            time.sleep(0.1)


def test_status_lists_gateways_without_updates_and_keeps_stopped_and_lost_ones(broker, tmp_path, fleet_setup, capsys):
    """Fleet membership comes from the agent's own status, Last Will and shutdown status (``gateway.fleet``)."""
    _, pub, v1, _ = fleet_setup
    agents = {g: _plain_agent(broker, tmp_path, v1, pub, g, f)
              for g, f in [("gw-on", FLEET), ("gw-stop", FLEET), ("gw-lost", FLEET), ("gw-other", "other")]}  # fmt: skip
    stops = {g: threading.Event() for g in ("gw-on", "gw-stop", "gw-other")}
    runners = {g: threading.Thread(target=agents[g].run, args=(stops[g],), daemon=True) for g in stops}
    lost = agents["gw-lost"]
    try:
        for t in runners.values():
            t.start()
        lost.start()  # connected (Last Will registered), never publishes: its network then dies
        assert lost.connected.wait(10)
        lost.client.loop_stop()
        lost.client.socket().close()  # no DISCONNECT: the broker publishes the Last Will
        rows = _status_until(broker, FLEET, lambda rs: [(r.gateway, r.online) for r in rs] == [
            ("gw-lost", False), ("gw-on", True), ("gw-stop", True)])  # fmt: skip
        assert [(r.gateway, r.online) for r in rows] == [("gw-lost", False), ("gw-on", True), ("gw-stop", True)]
        on = rows[1]
        assert (on.model_version, on.backend, on.status["fleet"]) == (1, "interpolation", FLEET)
        assert rows[0].status == {"schema": "gapcast/status/1", "gateway": "gw-lost", "state": "offline",
                                  "reason": "connection lost",
                                  "fleet": FLEET}  # fmt: skip
        stops["gw-stop"].set()  # clean shutdown: the retained status turns "offline", still naming the fleet
        runners["gw-stop"].join(15)
        rows = _status_until(broker, FLEET, lambda rs: len(rs) == 3 and rs[2].online is False)
        assert [(r.gateway, r.online) for r in rows] == [("gw-lost", False), ("gw-on", True), ("gw-stop", False)]
        assert rows[2].status == {"schema": "gapcast/status/1", "gateway": "gw-stop", "state": "offline",
                                  "reason": "shutdown", "fleet": FLEET}
        other = _status_until(broker, "other", lambda rs: len(rs) == 1)
        assert [(r.gateway, r.online, r.model_version) for r in other] == [("gw-other", True, 1)]
        capsys.readouterr()
        assert _cli(broker, "status") == 0
        table = capsys.readouterr().out.splitlines()
    finally:
        for s in stops.values():
            s.set()
        for t in runners.values():
            if t.is_alive():
                t.join(15)
        lost.outbox.close()
    assert [line.split()[:4] for line in table] == [
        ["gateway", "online", "model", "backend"],
        ["gw-lost", "no", "-", "-"],
        ["gw-on", "yes", "v1", "interpolation"],
        ["gw-stop", "no", "-", "-"],
    ]


def test_fleet_commands_turn_bad_names_and_chunk_sizes_into_clean_errors(broker, tmp_path, fleet_setup, capsys):
    priv, _, v1, _ = fleet_setup
    for argv in (["status"], ["promote", "--sign-key", str(priv)], ["rollback", "--to", "1", "--sign-key", str(priv)],
                 ["publish", str(v1), "--sign-key", str(priv)]):  # fmt: skip
        assert main(["fleet", *argv, "--fleet", "a/b", "--broker", broker.url]) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("gapcast: error: fleet name 'a/b' must be one non-empty topic level"), (argv, err)
    for bad in ("0", "-5", "8388609"):  # 0 used to mean "the default" silently; 8 MiB is the gateway's cap
        with pytest.raises(SystemExit) as exc:
            _cli(broker, "publish", str(v1), "--sign-key", str(priv), "--chunk-bytes", bad)
        assert exc.value.code == 2
        assert "argument --chunk-bytes: must be within 1..8388608 bytes" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _cli(broker, "status", "--prefix", "gapcast/#")
    assert "argument --prefix:" in capsys.readouterr().err
    # Above 1 MiB: published (the private broker has no size limit) with a warning about the production broker.
    assert _cli(broker, "publish", str(v1), "--sign-key", str(priv), "--chunk-bytes", "2000000") == 0
    cap = capsys.readouterr()
    assert "--chunk-bytes 2000000 is above 1 MiB" in cap.err and "message_size_limit 1048576" in cap.err
    assert "published release v1" in cap.out
    from gapcast.deploy.fleet import load_private_key
    from gapcast.edge.release import open_envelope

    topics = FleetTopics(PREFIX, FLEET)
    with FleetClient(broker.url) as client:
        got = client.retained([topics.manifest], probe_base=topics.base)
    m = open_envelope(got[topics.manifest], [load_private_key(priv).public_key()])
    assert m.raw["artifact"]["chunk_bytes"] == 2_000_000 and len(m.chunk_sha256) == 1
    assert assert_contracts(got.items()) == {"manifest": 1}  # the envelope and its decoded manifest
