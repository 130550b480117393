"""Fault tests (issue 6): nothing is lost across broker crashes, agent crashes, a late broker, a long outage with a
full outbox, hostile input through the broker, and wall-clock jumps.

Every test uses a private Mosquitto on a free port (the ``broker`` fixture), the signed tiny bundle (a real ONNX
model on onnxruntime), and real readings of Beijing stations replayed at full speed. A subscriber with a
persistent session (QoS 1, fixed client id, clean_start false) stands for the cloud; it deduplicates by the stable
message ``id`` every output carries.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest
from support.agent_config import write_agent_config
from support.contracts import assert_contracts
from support.edge_replay import PREFIX, readings_stream

from gapcast.tools.localbroker import LocalBroker, free_port

pytestmark = [pytest.mark.broker, pytest.mark.timeout(240)]

STATIONS = ("Aotizhongxin", "Changping")
START = 24_000  # 2015-11-25 16:00 UTC
NAMES = ("PM2.5", "PM10", "SO2", "NO2", "CO", "O3", "TEMP", "PRES", "DEWP", "RAIN", "WSPM", "wd_sin", "wd_cos")


# -- harness ----------------------------------------------------------------------------------------------------


def write_config(path: Path, port: int, bundle: Path, key: Path, stations, *, agent=None, outbox=None, mqtt=None,
                 backend: str = "auto") -> Path:
    """edge.toml for the fault tests; ``agent``/``outbox``/``mqtt`` override the defaults below."""
    ag = {"clock": "readings", "max_missing_share": 1.0, "tick_interval_s": 0.2}
    return write_agent_config(
        path, host="127.0.0.1", port=port, bundle=bundle, trusted_key=key, stations=stations, gateway="gw-fault",
        mqtt=mqtt, model={"backend": backend}, agent={**ag, **(agent or {})}, outbox=outbox or {},
    )


class AgentProcess:
    """``python -m gapcast.cli edge run`` as a child process (so it can be SIGKILLed), logging to a file."""

    def __init__(self, cfg: Path, log_path: Path) -> None:
        self.cfg, self.log_path, self.proc = cfg, log_path, None

    def start(self) -> AgentProcess:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gapcast.cli", "-v", "edge", "run", "--config", str(self.cfg)],
                stdout=log, stderr=subprocess.STDOUT, env=env,
            )
        return self

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class Cloud:
    """The subscriber with rights: persistent MQTT 5 session on ``gapcast/v1/#`` (QoS 1); keeps every message."""

    def __init__(self, port: int, client_id: str = "cloud-subscriber") -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self.msgs: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.c.reconnect_delay_set(1, 1)
        self.c.on_message = self._on_message
        self.c.on_subscribe = lambda *a: self.subscribed.set()
        self.c.on_connect = lambda c, u, f, rc, p: c.subscribe(f"{PREFIX}/#", qos=1)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.c.connect("127.0.0.1", port, keepalive=5, clean_start=False, properties=props)
        self.c.loop_start()
        assert self.subscribed.wait(15), "cloud subscriber did not subscribe"

    def _on_message(self, client, userdata, msg) -> None:
        """Runs on the subscriber's paho network thread."""
        with self.lock:
            self.msgs.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def bodies(self, suffix: str) -> list[dict]:
        with self.lock:
            return [json.loads(p) for t, p, _ in self.msgs if t.endswith(suffix)]

    def by_id(self, suffix: str) -> dict[str, list[bytes]]:
        """id -> every payload received with it (QoS 1 is at-least-once)."""
        out: dict[str, list[bytes]] = defaultdict(list)
        with self.lock:
            for t, p, _ in self.msgs:
                if t.endswith(suffix):
                    out[json.loads(p)["id"]].append(p)
        return out

    def wait(self, cond, timeout_s: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if cond():
                return True
            time.sleep(0.05)
        return cond()

    def settle(self, quiet_s: float = 0.5, timeout_s: float = 15.0,
               suffixes: tuple[str, ...] = ("/filled", "/forecast", "/revisions")) -> bool:
        """Wait until no output on ``suffixes`` arrived for ``quiet_s`` (stragglers, duplicates and late revisions
        have had their chance), at most ``timeout_s``; returns whether it went quiet. Status messages do not count:
        a fast test clock makes them steady."""

        def count() -> int:
            with self.lock:
                return sum(1 for t, _, _ in self.msgs if t.endswith(suffixes))

        deadline = time.monotonic() + timeout_s
        n, since = count(), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.05)
            m = count()
            if m != n:
                n, since = m, time.monotonic()
            elif time.monotonic() - since >= quiet_s:
                return True
        return False

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()
        with self.lock:
            assert_contracts((t, p) for t, p, _ in self.msgs)  # every recorded output against its JSON Schema


class Replayer(threading.Thread):
    """Publishes readings with QoS 1 at ``rate_per_s``, in order; while the broker is down paho keeps them and
    re-sends them after the reconnect. ``sent`` counts messages handed to paho."""

    def __init__(self, port: int, msgs: list[tuple[str, bytes]], rate_per_s: float = 40.0) -> None:
        super().__init__(daemon=True)
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.msgs, self.rate = msgs, rate_per_s
        self.sent = 0
        self.infos = []
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="replayer", protocol=mqtt.MQTTv5)
        self.c.reconnect_delay_set(1, 1)
        self.c.max_inflight_messages_set(20)
        self.c.max_queued_messages_set(0)
        self.acked: set[int] = set()
        self.c.on_publish = lambda c, u, mid, rc, props: self.acked.add(mid)  # paho's network thread
        self.c.connect("127.0.0.1", port, keepalive=5)
        self.c.loop_start()

    def run(self) -> None:
        for topic, payload in self.msgs:
            self.infos.append(self.c.publish(topic, payload, qos=1))
            self.sent += 1
            time.sleep(1.0 / self.rate)

    def unacked(self) -> list[int]:
        """Message ids handed to paho that the broker has not acknowledged yet (``acked`` grows on paho's thread:
        only membership is tested, the set is never iterated here)."""
        return [i.mid for i in list(self.infos) if i.mid not in self.acked]

    def all_at_broker(self) -> bool:
        """Every reading handed to paho and acknowledged by the broker."""
        return self.sent == len(self.msgs) and not self.unacked()

    def finish(self, timeout_s: float = 60.0) -> None:
        self.join(timeout_s)
        deadline = time.monotonic() + timeout_s
        # Messages published while the broker was down have rc NO_CONN but stay queued in paho; their info objects
        # turn "published" when the PUBACK finally arrives.
        mids = {i.mid for i in self.infos}
        while not mids <= self.acked and time.monotonic() < deadline:
            time.sleep(0.05)
        assert mids <= self.acked, f"{len(mids - self.acked)} reading(s) never acknowledged by the broker"
        self.c.disconnect()
        self.c.loop_stop()


def expected_steps(series: dict, stations, start: int, steps: int) -> dict[str, list[int]]:
    """Every step of the replay but the newest (it stays open: no later reading closes it)."""
    return {n: [int(series[n].epoch_s[i]) for i in range(start, start + steps - 1)] for n in stations}


def _content(payload: bytes) -> str:
    """A payload without its ``replayed`` mark, canonical."""
    return json.dumps({k: v for k, v in json.loads(payload).items() if k != "replayed"}, sort_keys=True)


def check_outputs(cloud: Cloud, series: dict, stations, start: int, steps: int) -> dict[str, int]:
    """Zero lost, no step with two ids or two contents, imputed flags exactly on the real missing values.

    Returns:
        Figures for the report: expected and received messages, duplicates (same id, same bytes).
    """
    exp = expected_steps(series, stations, start, steps)
    filled = cloud.by_id("/filled")
    forecast = cloud.by_id("/forecast")
    dups = 0
    revisions = cloud.by_id("/revisions")
    for ids in (filled, forecast, revisions):
        for mid, payloads in ids.items():
            # A copy re-sent from the outbox after an outage says so ("replayed"); nothing else may differ.
            assert len({_content(p) for p in payloads}) == 1, f"{mid} was published with different contents"
            dups += len(payloads) - 1
    for name in stations:
        s = series[name]
        got = sorted(
            (b for b in (json.loads(p[0]) for p in filled.values()) if b["station"] == name and not b["revision"]),
            key=lambda b: b["epoch_s"],
        )
        assert [b["epoch_s"] for b in got] == exp[name], f"{name}: filled steps lost or repeated"
        for b in got:
            i = start + (b["epoch_s"] - int(s.epoch_s[start])) // 3600
            real_missing = [n for c, n in enumerate(NAMES) if not s.observed[i, c]]
            assert b["imputed"] == real_missing, f"{name} {b['ts']}: a reading was lost (imputed {b['imputed']})"
        fc = sorted(b["origin"] for b in (json.loads(p[0]) for p in forecast.values()) if b["station"] == name)
        assert fc == [b["ts"] for b in got], f"{name}: forecasts lost or repeated"
    # One id per (station, step, kind): a restart never re-publishes a step under another id.
    bodies = [json.loads(p[0]) for p in list(filled.values()) + list(revisions.values()) + list(forecast.values())]
    keys = [
        (b["station"], "revision", b["start"], b["end"]) if b.get("revision")
        else (b["station"], "filled", b["ts"]) if "epoch_s" in b
        else (b["station"], "forecast", b["origin"])
        for b in bodies
    ]
    assert len(keys) == len(set(keys)), "a step was published under two different ids"
    n_exp = 2 * sum(len(v) for v in exp.values())
    return {"expected": n_exp, "received": sum(1 for k in keys if k[1] != "revision"), "duplicates": dups}


@pytest.fixture
def replay(beijing):
    def make(stations=STATIONS, start=START, steps=48):
        series = {n: beijing[n] for n in stations}
        msgs = [(t, p) for t, p, _ in readings_stream(series, stations, start, steps)]
        return series, msgs

    return make


def progress(cloud: Cloud) -> int:
    """Distinct step messages received: filled (not revisions) + forecasts, deduplicated by id."""
    filled = {b["id"] for b in cloud.bodies("/filled") if not b["revision"]}
    return len(filled) + len(cloud.by_id("/forecast"))


def wait_online(cloud: Cloud, timeout_s: float = 60.0, after: int = 0) -> bool:
    return cloud.wait(lambda: sum(b.get("state") == "online" for b in cloud.bodies("/status")) > after, timeout_s)


FIGURES: dict[str, dict] = {}


def record(fault: str, figures: dict) -> None:
    """Keep and print (pytest -s) one row of the table of faults tried and data lost."""
    FIGURES[fault] = figures
    print(f"FAULT {fault}: {figures}")


# -- 1. broker SIGKILLed mid-stream ---------------------------------------------------------------------------


@pytest.mark.slow
def test_broker_killed_mid_stream_loses_nothing(broker, tmp_path, tiny_bundle, signing_key, replay):
    series, msgs = replay()
    cfg = write_config(tmp_path / "edge.toml", broker.port, tiny_bundle, signing_key.public, STATIONS)
    cloud = Cloud(broker.port)
    agent = AgentProcess(cfg, tmp_path / "agent.log").start()
    try:
        assert wait_online(cloud), agent.log()[-3000:]
        # Mosquitto persists sessions every autosave_interval (1 s here): let it save the agent's session once, as
        # it long has on a real deployment, or a crash right now would forget the agent's subscription.
        time.sleep(2.5)
        rep = Replayer(broker.port, msgs)
        rep.start()
        assert cloud.wait(lambda: len(cloud.bodies("/forecast")) >= 20, 60)  # outputs are flowing
        broker.kill()  # SIGKILL: no clean save
        # The outage lasts until the agent has failed to reconnect twice (it backs off between) and every reading
        # has been handed to the replayer's client, which holds those the dead broker could not acknowledge.
        assert cloud.wait(lambda: "(2 failed attempt(s)" in agent.log() and rep.sent == len(msgs), 60), \
            agent.log()[-3000:]
        held = rep.unacked()
        assert held, "no reading was held through the outage: the broker went down after the replay"
        broker.start()
        rep.finish()
        n_exp = 2 * 2 * 47
        ok = cloud.wait(lambda: progress(cloud) >= n_exp, 90)
        cloud.settle(1.0)  # duplicates and revisions still in flight arrive before the check
        assert ok, agent.log()[-3000:]
        record("broker SIGKILL, restart after two failed reconnects", check_outputs(cloud, series, STATIONS, START, 48))
        assert agent.proc.poll() is None
        assert "connected to" in agent.log()
    finally:
        agent.stop()
        cloud.close()


# -- 2. agent SIGKILLed mid-stream ----------------------------------------------------------------------------


def test_agent_killed_mid_stream_restores_windows(broker, tmp_path, tiny_bundle, signing_key, replay):
    series, msgs = replay()
    cfg = write_config(tmp_path / "edge.toml", broker.port, tiny_bundle, signing_key.public, STATIONS,
                       agent={"snapshot_interval_s": 1.0})
    cloud = Cloud(broker.port)
    agent = AgentProcess(cfg, tmp_path / "agent.log").start()
    try:
        assert wait_online(cloud), agent.log()[-3000:]
        rep = Replayer(broker.port, msgs)
        rep.start()
        assert cloud.wait(lambda: len(cloud.bodies("/forecast")) >= 30, 60)
        agent.kill()  # mid-stream: readings keep arriving at the broker for its persistent session
        assert cloud.wait(lambda: any(b.get("state") == "offline" for b in cloud.bodies("/status")), 30)
        (will,) = [b for b in cloud.bodies("/status") if b.get("state") == "offline"]
        assert will == {"schema": "gapcast/status/1", "gateway": "gw-fault", "state": "offline", "reason": "connection lost", "fleet": "default"}  # the Last Will
        # The agent stays dead until the broker has acknowledged every reading: those after the Last Will wait in
        # the agent's persistent session for the restarted agent.
        acked_at_will = len(rep.acked)
        assert cloud.wait(rep.all_at_broker, 60), f"{len(rep.unacked())} reading(s) never reached the broker"
        queued = len(msgs) - acked_at_will
        agent.start()
        rep.finish()
        n_exp = 2 * 2 * 47
        ok = cloud.wait(lambda: progress(cloud) >= n_exp, 90)
        cloud.settle(1.0)  # duplicates and revisions still in flight arrive before the check
        assert ok, agent.log()[-3000:]
        record("agent SIGKILL, restart once every reading is at the broker",
               {**check_outputs(cloud, series, STATIONS, START, 48), "readings_after_the_will": queued})
        log = agent.log()
        assert "restored 2 station window(s)" in log or "replayed" in log, log[-3000:]
    finally:
        agent.stop()
        cloud.close()


# -- 3. broker down when the agent starts ---------------------------------------------------------------------


def test_broker_down_at_start_agent_retries(tmp_path, tiny_bundle, signing_key, replay):
    port = free_port()
    late = LocalBroker(port=port, workdir=tmp_path / "mosquitto")
    late.workdir.mkdir()
    series, msgs = replay(stations=STATIONS[:1], steps=24)
    cfg = write_config(tmp_path / "edge.toml", port, tiny_bundle, signing_key.public, STATIONS[:1])
    agent = AgentProcess(cfg, tmp_path / "agent.log").start()
    cloud = None
    try:
        # No broker yet: the agent tries, fails, backs off (reconnect_min_s 1 .. reconnect_max_s 2) and tries again.
        deadline = time.monotonic() + 30
        while "(2 failed attempt(s)" not in agent.log() and agent.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "(2 failed attempt(s)" in agent.log(), agent.log()[-3000:]
        assert agent.proc.poll() is None, agent.log()[-3000:]
        assert "connected to" not in agent.log()
        late.start()
        cloud = Cloud(port)
        assert wait_online(cloud, 30), agent.log()[-3000:]
        rep = Replayer(port, msgs, rate_per_s=200)
        rep.start()
        rep.finish()
        assert cloud.wait(lambda: len(cloud.by_id("/forecast")) >= 23, 60), agent.log()[-3000:]
        cloud.settle(0.5)  # stragglers arrive before the check
        record("broker down at agent start (two failed attempts)", check_outputs(cloud, series, STATIONS[:1], START, 24))
    finally:
        agent.stop()
        if cloud:
            cloud.close()
        late.close()


# -- in-process agent on a fast, injectable clock -------------------------------------------------------------


class FastClock:
    """Test time running ``speed`` times faster than real time.

    ``mono()`` is the agent's monotonic clock (never jumps); ``event()`` is true time (what the stations' clocks
    say), starting at ``t0``; ``wall()`` is the gateway's wall clock: event time plus ``jump_s``, which the test moves
    to simulate an NTP step or a manual change.
    """

    def __init__(self, t0: float, speed: float) -> None:
        self.t0, self.speed, self.jump_s = float(t0), float(speed), 0.0
        self.r0 = time.monotonic()

    def mono(self) -> float:
        return (time.monotonic() - self.r0) * self.speed

    def event(self) -> float:
        return self.t0 + self.mono()

    def wall(self) -> float:
        return self.event() + self.jump_s

    def sleep_until(self, event_s: float) -> None:
        while self.event() < event_s:
            time.sleep(min(max((event_s - self.event()) / self.speed, 0.0), 0.02) or 0.001)


def start_inprocess(cfg_path: Path, clock: FastClock, outbox=None):
    """The real shell (MqttAgent) in a thread, on ``clock``; returns (agent, stop, thread)."""
    from gapcast.edge.agent import AgentCore
    from gapcast.edge.cli import load_runtime
    from gapcast.edge.config import load_config
    from gapcast.edge.mqtt import MqttAgent, make_outbox

    cfg = load_config(cfg_path)
    bundle, backend, note = load_runtime(cfg)
    core = AgentCore.from_config(cfg, bundle.card, backend)
    cfg.agent.state_dir.mkdir(parents=True, exist_ok=True)
    agent = MqttAgent(cfg, core, outbox if outbox is not None else make_outbox(cfg), wall=clock.wall, mono=clock.mono)
    stop = threading.Event()
    th = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    th.start()
    return agent, stop, th


def paced_publisher(port: int, clock: FastClock, series: dict, plan: list[tuple[str, int]], delay_s: float = 120.0):
    """A thread that publishes each planned (station, row) reading when event time reaches its step + delay_s."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from support.edge_replay import reading_payload

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="paced-publisher", protocol=mqtt.MQTTv5)
    c.max_queued_messages_set(0)
    c.connect("127.0.0.1", port, keepalive=5)
    c.loop_start()

    def run():
        for name, i in plan:
            s = series[name]
            clock.sleep_until(float(s.epoch_s[i]) + delay_s)
            c.publish(f"{PREFIX}/stations/{name}/readings", reading_payload(int(s.epoch_s[i]), s.values[i], NAMES), qos=1)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return c, th


# -- 4. the outbox cap reached during a long outage ------------------------------------------------------------


@pytest.mark.slow
def test_long_outage_fills_outbox_drops_oldest_forecasts_counted(broker, tmp_path, tiny_bundle, signing_key, beijing):
    from gapcast.edge.outbox import OutboxConfig, SQLiteOutbox

    series = {n: beijing[n] for n in STATIONS}
    t0 = float(series[STATIONS[0]].epoch_s[START])
    clock = FastClock(t0, speed=36_000)  # one hour of event time in 0.1 s
    cap = 256 * 1024  # filled values of the whole outage fit (~0.7 KB each); forecasts (~3 KB each) do not
    cfg = write_config(
        tmp_path / "edge.toml", broker.port, tiny_bundle, signing_key.public, STATIONS,
        agent={"clock": "gateway", "tick_interval_s": 60.0, "status_interval_s": 3600.0, "snapshot_interval_s": 3600.0},
    )
    cloud = Cloud(broker.port)
    box = SQLiteOutbox(OutboxConfig(path=tmp_path / "state" / "outbox.sqlite", max_bytes=cap), clock=clock.wall)
    agent, stop, th = start_inprocess(cfg, clock, outbox=box)
    pub = None
    try:
        assert wait_online(cloud, 30)
        time.sleep(1.5)  # Mosquitto saves sessions every second: the subscriber's must survive the crash below
        first = START + int((clock.event() - t0) // 3600) + 1
        plan = [(n, i) for i in range(first, first + 12) for n in STATIONS]  # 12 h of real readings
        pub, pth = paced_publisher(broker.port, clock, series, plan)
        pth.join(30)
        clock.sleep_until(float(series[STATIONS[0]].epoch_s[first + 12]))
        broker.kill()
        outage_start = clock.event()
        samples = []
        while clock.event() < outage_start + 72 * 3600:  # 3 days of outage: every step still closes on the clock
            samples.append((box.stats()["bytes"], box.disk_bytes(), len(agent._pending)))
            time.sleep(0.1)
        broker.start()
        n_closed = lambda: agent.core.counters["filled"]  # noqa: E731
        assert cloud.wait(lambda: len({b["id"] for b in cloud.bodies("/filled") if not b["revision"]}) >= n_closed() - 4, 60)
        clock_end = clock.event()
        final = box.stats()
        stop.set()
        th.join(30)
        assert not th.is_alive()
        # Bounded: the outbox never held more than the cap, on disk it stayed within 2 x cap + 2 MiB, and paho never
        # held more than the in-flight window (nothing is handed to paho while disconnected).
        assert max(s[0] for s in samples) <= cap
        assert max(s[1] for s in samples) <= 2 * cap + 2 * 1024 * 1024
        assert max(s[2] for s in samples) <= agent.cfg.broker.max_inflight
        produced_fc = agent.core.counters["forecasts"]
        assert final["dropped"].get("filled", 0) == 0
        stats_seen = [b["outbox"] for b in cloud.bodies("/status") if b.get("state") == "online"]
        final_dropped = max(s["dropped"].get("forecast", 0) for s in stats_seen)
        assert final_dropped > 0, "the outage was meant to overflow the outbox"
        # Only the kinds of drop_order are ever dropped (filled values never). A dead letter can be among them (seen
        # once in a loaded full run: a reading this 36,000x clock rejected), and it is as droppable as a forecast.
        drop_order = set(agent.cfg.outbox.drop_order)
        assert drop_order == {"forecast", "deadletter", "status"}
        assert all(set(s["dropped"]) <= drop_order for s in stats_seen), [s["dropped"] for s in stats_seen]
        # Zero filled values lost: every closed step of both stations arrived exactly once (by id).
        filled = {}
        for b in cloud.bodies("/filled"):
            if not b["revision"]:
                filled.setdefault((b["station"], b["epoch_s"]), set()).add(b["id"])
        for name in STATIONS:
            steps = sorted(e for (n, e) in filled if n == name)
            assert steps == list(range(steps[0], steps[0] + 3600 * len(steps), 3600)), f"{name}: a filled step lost"
            assert steps[-1] >= outage_start
        assert all(len(ids) == 1 for ids in filled.values())
        for name in STATIONS:  # the backlog was flushed in order
            arrival = [b["epoch_s"] for b in cloud.bodies("/filled") if b["station"] == name and not b["revision"]]
            assert arrival == sorted(arrival)
        # Forecasts: received + dropped (counted, in the status) = produced; the dropped ones are the OLDEST.
        fc = {(b["station"], b["origin"]) for b in cloud.bodies("/forecast")}
        assert len(fc) + final_dropped >= produced_fc - 4  # the last few may still be in flight at stop
        by_station = defaultdict(list)
        for name, origin in fc:
            by_station[name].append(origin)
        for name in STATIONS:
            got = sorted(by_station[name])
            exp = sorted(b["ts"] for b in cloud.bodies("/filled") if b["station"] == name and not b["revision"])
            missing = sorted(set(exp) - set(got))
            assert missing, f"{name}: no forecast was dropped"
            later = [o for o in got if o > missing[0]]
            assert not later or max(missing) < min(later), f"{name}: a newer forecast was dropped before an older one"
        record("broker down 3 days (outbox cap 256 KiB)", {
            "filled_lost": 0, "forecasts_dropped_counted": final_dropped, "forecasts_produced": produced_fc,
            "max_outbox_bytes": max(s[0] for s in samples), "max_disk_bytes": max(s[1] for s in samples),
            "event_hours": round((clock_end - t0) / 3600, 1),
        })
    finally:
        stop.set()
        th.join(10)
        if pub is not None:
            pub.loop_stop()
        cloud.close()


# -- 5. hostile input through the broker ----------------------------------------------------------------------


def hostile_messages(n: int, ts_valid: int) -> list[tuple[str, bytes, str]]:
    """``n`` unique hostile messages (topic, payload, expected dead-letter kind), cycling through every family."""
    st = f"{PREFIX}/stations/Aotizhongxin/readings"
    future = int(time.time()) + 10 * 86400
    makers = [
        lambda k: (st, b'{"ts":1,"values":{},"x":"' + b"A" * (17000 + k) + b'"}', "payload_too_large"),
        lambda k: (st, b'{"ts":\xff' + str(k).encode(), "bad_encoding"),
        lambda k: (st, f'{{"ts": {k} garbage'.encode(), "bad_json"),
        lambda k: (st, (f'{{"ts":{ts_valid},"values":{{}},"x":' + "[" * (9 + k) + "]" * (9 + k) + "}").encode(), "too_deep"),
        lambda k: (st, f"[{k}]".encode(), "bad_schema"),
        lambda k: (st, json.dumps({"ts": ts_valid, "values": {"PM2.5": str(k)}}).encode(), "bad_type"),
        lambda k: (st, f'{{"ts":{ts_valid},"values":{{"CO":Infinity}},"n":{k}}}'.encode(), "non_finite"),
        lambda k: (st, f'{{"ts":NaN,"values":{{}},"n":{k}}}'.encode(), "non_finite"),
        lambda k: (st, json.dumps({"ts": ts_valid, "values": {f"PM25_{k}": 1.0}}).encode(), "unknown_channel"),
        lambda k: (st, json.dumps({"ts": "2015-13-01T00:00:00Z", "values": {}, "n": k}).encode(), "bad_timestamp"),
        lambda k: (f"{PREFIX}/stations/bad topic {k}/readings", b'{"ts":1,"values":{}}', "bad_topic"),
        lambda k: (f"{PREFIX}/stations/Unknown{k}/readings", json.dumps({"ts": ts_valid, "values": {}}).encode(), "unknown_station"),
        lambda k: (st, json.dumps({"ts": future + k, "values": {"PM2.5": 1.0}}).encode(), "future"),
        lambda k: (st, json.dumps({"ts": 1_000_000_000 + k, "values": {"PM2.5": 1.0}}).encode(), "too_old"),
    ]
    return [makers[k % len(makers)](k) for k in range(n)]


def test_hostile_input_through_the_broker(broker, tmp_path, tiny_bundle, signing_key, replay):
    """The broker-level version of test_fuzz.py: 300 hostile messages interleaved with a real day of readings, plus a
    flood of 50 retained readings waiting at subscribe (MQTT 3.1.1, so the broker sends them flagged retained)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from gapcast.edge.agent import AgentCore
    from gapcast.edge.cli import load_runtime
    from gapcast.edge.config import load_config

    series, msgs = replay(stations=STATIONS[:1], steps=24)
    cfg_path = write_config(tmp_path / "edge.toml", broker.port, tiny_bundle, signing_key.public, STATIONS[:1],
                            mqtt={"version": "3.1.1"}, agent={"status_interval_s": 0.5}, backend="interpolation")
    ts0 = int(series[STATIONS[0]].epoch_s[START])
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="hostile", protocol=mqtt.MQTTv5)
    pub.max_inflight_messages_set(50)
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    flood = [pub.publish(f"{PREFIX}/stations/Flood{k}/readings", msgs[0][1], qos=1, retain=True) for k in range(50)]
    for info in flood:
        info.wait_for_publish(10)
    cloud = Cloud(broker.port)
    agent = AgentProcess(cfg_path, tmp_path / "agent.log").start()
    try:
        assert wait_online(cloud), agent.log()[-3000:]
        hostile = hostile_messages(300, ts0)
        infos = [pub.publish(*msgs[0], qos=1)]
        per = -(-len(hostile) // (len(msgs) - 1))  # all 300, spread between the valid readings
        for i, (topic, payload) in enumerate(msgs[1:]):
            for h in hostile[i * per : (i + 1) * per]:
                infos.append(pub.publish(h[0], h[1], qos=1))
            infos.append(pub.publish(topic, payload, qos=1))
        for info in infos:
            info.wait_for_publish(20)
        n_dead = 300 + 50
        cloud.wait(lambda: len(cloud.by_id("/deadletter/gw-fault")) >= n_dead and progress(cloud) >= 2 * 23, 30)
        cloud.settle(0.5, suffixes=("/filled", "/forecast", "/revisions", "/deadletter/gw-fault"))  # stragglers
        assert agent.proc.poll() is None  # stayed up
        dead = [json.loads(p[0]) for p in cloud.by_id("/deadletter/gw-fault").values()]
        got_kinds = defaultdict(int)
        for d in dead:
            got_kinds[d["kind"]] += 1
        exp_kinds = defaultdict(int)
        for _, _, kind in hostile:
            exp_kinds[kind] += 1
        exp_kinds["retained"] += 50
        assert dict(got_kinds) == dict(exp_kinds)
        assert len(dead) == n_dead and progress(cloud) == 2 * 23
        # Counted too: the status message's rejected counters (the agent's newest online status).
        assert cloud.wait(lambda: sum(cloud.bodies("/status")[-1].get("rejected", {}).values()) == n_dead, 30)
        # The outputs are exactly a clean run's: the pure core fed only the valid readings.
        cfg = load_config(cfg_path)
        bundle, backend, _ = load_runtime(cfg)
        core = AgentCore.from_config(cfg, bundle.card, backend)
        clean = []
        for topic, payload in msgs:
            now = time.time()
            clean += core.ingest(topic, payload, now) + core.tick(now)
        assert all(m.kind != "deadletter" for m in clean)

        def strip(b):
            return {k: v for k, v in json.loads(b).items() if k != "issued"}

        ref = sorted(json.dumps(strip(m.payload), sort_keys=True) for m in clean if m.kind in ("filled", "revision", "forecast"))
        got = sorted(
            json.dumps(strip(p[0]), sort_keys=True)
            for suffix in ("/filled", "/revisions", "/forecast") for p in cloud.by_id(suffix).values()
        )
        assert got == ref
        record("350 hostile msgs via broker (300 + 50 retained flood)", {"dead_lettered": len(dead), "outputs_equal_clean_run": True})
    finally:
        agent.stop()
        pub.loop_stop()
        cloud.close()


# -- 6. wall-clock jumps ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_wall_clock_jumps_neither_skip_nor_repeat_steps(broker, tmp_path, tiny_bundle, signing_key, beijing, monkeypatch):
    """The gateway clock closes silent stations' steps; its wall clock jumps +1 h, then back -1 h. Ticks run on the
    monotonic clock, so every step is published exactly once."""
    from gapcast.edge.outbox import OutboxConfig, SQLiteOutbox

    series = {n: beijing[n] for n in STATIONS}
    t = series[STATIONS[0]].epoch_s
    n_steps = 30
    silent = set(range(START + 10, START + 16))  # Changping silent 6 h: those steps close on the gateway clock
    clock = FastClock(float(t[START]) - 600, speed=7200)  # one hour in 0.5 s
    monkeypatch.setattr(time, "time", clock.wall)  # anything reading the wall clock sees the jumps
    cfg = write_config(tmp_path / "edge.toml", broker.port, tiny_bundle, signing_key.public, STATIONS,
                       agent={"clock": "gateway", "tick_interval_s": 60.0, "status_interval_s": 3600.0,
                              "snapshot_interval_s": 3600.0})
    cloud = Cloud(broker.port)
    box = SQLiteOutbox(OutboxConfig(path=tmp_path / "state" / "outbox.sqlite"), clock=clock.wall)
    agent, stop, th = start_inprocess(cfg, clock, outbox=box)
    pub = None
    try:
        assert wait_online(cloud, 30)
        plan = [(n, i) for i in range(START, START + n_steps) for n in STATIONS if not (n == "Changping" and i in silent)]
        pub, pth = paced_publisher(broker.port, clock, series, plan)
        clock.sleep_until(float(t[START + 10]))
        clock.jump_s = 3600.0  # NTP steps the wall clock forward one hour
        clock.sleep_until(float(t[START + 20]))
        clock.jump_s = 0.0  # ... and back
        pth.join(60)
        clock.sleep_until(float(t[START + n_steps - 1]) + 3600 + 300 + 1800)  # the last step closes on the clock
        cloud.settle(0.3)  # its messages reach the subscriber
        stop.set()
        th.join(30)
        for name in STATIONS:
            got = [b for b in cloud.bodies("/filled") if b["station"] == name and not b["revision"]]
            steps = [b["epoch_s"] for b in got]
            assert len(steps) == len(set(steps)), f"{name}: a step was published twice"
            want = [int(t[i]) for i in range(START, START + n_steps)]
            assert steps[: len(want)] == want, f"{name}: a step was skipped or reordered"
            fcs = [b["origin"] for b in cloud.bodies("/forecast") if b["station"] == name]
            assert len(fcs) == len(set(fcs)) == len(steps)
        silent_steps = {int(t[i]) for i in silent}
        for b in cloud.bodies("/filled"):
            if b["station"] == "Changping" and not b["revision"] and b["epoch_s"] in silent_steps:
                assert b["imputed"] == list(NAMES)  # closed on the clock, all channels filled in
        record("wall clock +1 h then -1 h (gateway clock)", {"steps_per_station": n_steps, "skipped": 0, "repeated": 0})
    finally:
        stop.set()
        th.join(10)
        if pub is not None:
            pub.loop_stop()
        cloud.close()

