"""Issue 18 items 1 and 3: wall clocks that lie, and a broker that forgot the agent's session.

The shell (``MqttAgent.run``) runs in a thread against a private Mosquitto on a fake clock the test moves by hand:
``mono`` (never steps), true time (what the stations' clocks say) and the gateway's wall clock = true time + ``jump_s``.
Every test checks that each step's filled value arrives exactly once, with the real readings in it (0 lost).
"""

from __future__ import annotations

import json
import threading
import time

import pytest
from conftest import CADENCE, T0, FakeBackend
from test_faults import Cloud

from gapcast.edge.clock import ClockWatch, EventClock

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]

DAY = 86_400.0


class ManualClock:
    def __init__(self, true_s: float) -> None:
        self.true_s, self.mono_s, self.jump_s = float(true_s), 1000.0, 0.0
        self.synced: bool | None = None

    def advance(self, s: float) -> None:
        self.true_s += s
        self.mono_s += s

    def wall(self) -> float:
        return self.true_s + self.jump_s

    def mono(self) -> float:
        return self.mono_s


def wait(cond, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not cond():
        time.sleep(0.02)
    return bool(cond())


class Rig:
    """MqttAgent (gateway clock, FakeBackend, station s1) in a thread + a publisher + the cloud subscriber."""

    def __init__(self, broker, tmp_path, make_core, clock: ManualClock, outbox=None) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        from gapcast.edge.config import parse_config
        from gapcast.edge.mqtt import MqttAgent
        from gapcast.edge.outbox import OutboxConfig, SQLiteOutbox

        cfg = parse_config({
            "gateway": {"id": "gw"}, "stations": {"names": ["s1"]},
            "mqtt": {"host": "127.0.0.1", "port": broker.port, "keepalive_s": 5, "reconnect_min_s": 1,
                     "reconnect_max_s": 1},
            "agent": {"state_dir": str(tmp_path / "state"), "status_interval_s": 0.2, "tick_interval_s": 0.05},
        })
        self.clock = clock
        self.box = outbox or SQLiteOutbox(OutboxConfig(path=tmp_path / "state" / "outbox.sqlite"), wall=clock.wall)
        self.core = make_core(backend=FakeBackend(), stations=("s1",))
        self.cloud = Cloud(broker.port, client_id="cloud-clock")
        self.agent = MqttAgent(cfg, self.core, self.box, wall=clock.wall, mono=clock.mono, snapshot_path="",
                               clock_probe=lambda: clock.synced)
        self.pub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.pub.connect("127.0.0.1", broker.port)
        self.pub.loop_start()
        self.stop = threading.Event()
        self.th = threading.Thread(target=self.agent.run, args=(self.stop,), daemon=True)
        self.th.start()
        assert wait(self.agent.connected.is_set)

    def send(self, j: int) -> None:
        body = {"ts": T0 + j * CADENCE, "values": {"a": 10.0 + j, "b": 1.0}}
        self.pub.publish("gapcast/v1/stations/s1/readings", json.dumps(body), qos=1).wait_for_publish(5)

    def send_paced(self, steps: range) -> None:
        """Each reading a minute after its step starts, true time moving on between them."""
        for j in steps:
            self.at(T0 + j * CADENCE + 60)
            self.send(j)

    def at(self, true_s: float) -> None:
        """Move true (and monotonic) time to ``true_s``, in 10-minute strides the agent's loop sees one by one
        (each stride waits for two whole passes of the step loop)."""
        while self.clock.true_s < true_s:
            self.clock.advance(min(600.0, true_s - self.clock.true_s))
            self.passes(2)

    def passes(self, n: int) -> None:
        """Wait until the agent's step loop has made ``n`` more whole passes (it has seen the clock as it is now)."""
        target = self.agent.loop_passes + n + 1  # +1: the pass running now may have read the clock before the move
        assert wait(lambda: self.agent.loop_passes >= target), f"the step loop stalled at pass {self.agent.loop_passes}"

    def filled(self) -> dict[int, list]:
        out: dict[int, list] = {}
        for b in self.cloud.bodies("/filled"):
            if not b.get("revision"):
                out.setdefault(b["epoch_s"], []).append(b)
        return out

    def close(self) -> None:
        self.stop.set()
        self.th.join(20)
        self.pub.loop_stop()
        self.cloud.close()


def assert_steps_once_observed(rig: Rig, steps: range) -> None:
    want = [T0 + j * CADENCE for j in steps]

    def done() -> bool:
        rig.clock.advance(1.0)  # time goes on (ticks run on the monotonic clock)
        return sorted(rig.filled())[: len(want)] == want

    assert wait(done, 20), sorted(rig.filled())
    got = rig.filled()
    for e in want:
        assert len({b["id"] for b in got[e]}) == 1, f"step {e} published under two ids"
        assert got[e][0]["imputed"] == [], f"step {e}: a reading was lost"
    dead = [d["kind"] for d in rig.cloud.bodies("/deadletter/gw")]
    assert dead == [], dead


def test_start_90_days_behind_then_corrected(broker, tmp_path, make_core, caplog):
    clock = ManualClock(T0 + 60)
    clock.jump_s, clock.synced = -90 * DAY, False  # no RTC battery: the board starts 90 days in the past
    with caplog.at_level("WARNING", logger="gapcast.edge"):
        rig = Rig(broker, tmp_path, make_core, clock)
        try:
            assert wait(lambda: any(b.get("clock") == "unsynced" for b in rig.cloud.bodies("/status")))
            for j in range(4):
                rig.send(j)
            rig.at(T0 + 4 * CADENCE + 700)
            rig.passes(10)  # ten more passes past the step's closing time: nothing closed, nothing rejected
            assert rig.filled() == {} and rig.cloud.bodies("/deadletter/gw") == []  # held, not rejected
            assert rig.agent._inbound.qsize() == 4
            clock.jump_s, clock.synced = 0.0, True  # NTP's first sync
            assert_steps_once_observed(rig, range(4))
            assert rig.agent.clock_watch.corrections == 1
            assert rig.agent.clock_watch.last_shift_s == pytest.approx(90 * DAY, abs=1.0)
        finally:
            rig.close()
    assert caplog.text.count("clock: unsynced") == 1  # logged once


def test_minus_90_days_step_holds_then_resumes(broker, tmp_path, make_core):
    clock = ManualClock(T0 + 60)
    rig = Rig(broker, tmp_path, make_core, clock)
    try:
        rig.send_paced(range(2))
        assert wait(lambda: rig.agent.counters["inbound"] == 2)
        rig.at(T0 + 2 * CADENCE + 700)
        assert wait(lambda: sorted(rig.filled()) == [T0, T0 + CADENCE])
        clock.jump_s = -90 * DAY  # the wall clock steps back 90 days: earlier than the newest reading held
        assert wait(lambda: rig.agent.clock_watch.synced is False)
        rig.send_paced(range(2, 4))
        rig.at(T0 + 4 * CADENCE + 700)
        rig.passes(10)
        assert sorted(rig.filled()) == [T0, T0 + CADENCE] and rig.cloud.bodies("/deadletter/gw") == []
        assert any(b.get("clock") == "unsynced" for b in rig.cloud.bodies("/status"))
        clock.jump_s = 0.0  # corrected again
        assert_steps_once_observed(rig, range(4))
    finally:
        rig.close()


def test_plus_90_days_step_with_a_full_backlog_expires_nothing(broker, tmp_path, make_core):
    clock = ManualClock(T0 + 60)
    rig = Rig(broker, tmp_path, make_core, clock)
    try:
        rig.send_paced(range(4))
        assert wait(lambda: rig.agent.counters["inbound"] == 4)
        broker.stop()  # clean stop: the cloud's persistent session survives
        rig.at(T0 + 4 * CADENCE + 700)  # steps 0..3 close into the outbox: the backlog
        assert wait(lambda: rig.box.stats()["put"].get("filled", 0) == 4)
        clock.jump_s = 90 * DAY  # more than max_age_s (7 days): the bug deleted the whole backlog here
        assert wait(lambda: rig.agent.clock_watch.corrections == 1)
        rig.passes(10)  # the loop ran on past the correction (an expiry would run there): nothing expired
        assert rig.box.stats()["expired"] == {}
        broker.start()
        assert_steps_once_observed(rig, range(4))
        # The corrected span closes like a downtime: at most max_catchup_steps, the rest skipped and counted.
        assert rig.core.counters["steps_skipped"] > 0
        assert rig.box.stats()["expired"] == {} and rig.box.stats()["dropped"] == {}
    finally:
        rig.close()


def test_broker_restarted_without_persistence_is_told(broker, tmp_path, make_core, caplog):
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    clock = ManualClock(T0 + 60)
    with caplog.at_level("WARNING", logger="gapcast.edge.mqtt"):
        rig = Rig(broker, tmp_path, make_core, clock)
        try:
            assert wait(lambda: rig.agent.counters["connects"] == 1)
            broker.stop()
            (broker.workdir / "mosquitto.db").unlink()  # mosquitto #2639: the persistence file is gone
            broker.start()
            notices: list[dict] = []
            watcher = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
            ready = threading.Event()
            watcher.on_subscribe = lambda *a: ready.set()
            watcher.on_message = lambda c, u, m: notices.append(json.loads(m.payload))  # watcher's network thread
            watcher.connect("127.0.0.1", broker.port)
            watcher.subscribe("gapcast/v1/gateways/gw/notice", qos=1)
            watcher.loop_start()
            assert ready.wait(10)
            assert wait(lambda: notices)
            watcher.loop_stop()
            (n,) = notices
            assert n["schema"] == "gapcast/notice/1" and n["kind"] == "session_lost" and n["gateway"] == "gw"
            assert n["at_risk"]["from"] <= n["at_risk"]["to"]
            assert rig.agent.counters["sessions_lost"] == 1
            assert wait(lambda: any(b.get("session", {}).get("lost") == 1 for b in rig.cloud.bodies("/status")))
        finally:
            rig.close()
    assert "NO session for this agent" in caplog.text


def test_clock_watch_unit():
    c = EventClock(1000.0, 0.0)
    w = ClockWatch(c, step_s=5.0)
    assert w.observe(1004.0, 0.0).shift_s == 0.0  # a slew below the threshold changes nothing
    v = w.observe(1010.0 + 3600, 10.0)
    assert v.synced and v.shift_s == pytest.approx(3600.0) and c.now(10.0) == 4610.0
    assert w.observe(10.0, 20.0, floor_s=4000.0).synced is False  # earlier than the newest reading
    assert w.observe(4630.0, 30.0, floor_s=4000.0).synced is True and w.corrections == 1
    assert w.observe(4640.0, 40.0, probe=False).reason.startswith("the clock is not synchronised")
