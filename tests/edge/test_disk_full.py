"""Issue 18 item 2: a full disk never stops the agent and loses nothing.

Faults are injected two ways: an SQLite connection that answers ``SQLITE_FULL`` ("database or disk is full") on
every write while the test says so, and a real 2 MiB tmpfs filled to the last byte (root only; skipped otherwise).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest

from gapcast.edge.outbox import OutboxConfig, OutboxFull, OutboxMessage, SQLiteOutbox

WRITES = ("INSERT", "DELETE", "UPDATE", "CREATE", "ALTER", "COMMIT")


class Disk:
    """The switch the fault-injected connections look at."""

    def __init__(self) -> None:
        self.full = False
        self.refuse_open = False
        self.write_errors = 0


class FullDiskConnection:
    """An sqlite3 connection that raises SQLITE_FULL on every write statement while ``disk.full`` is set."""

    def __init__(self, disk: Disk, *args, **kwargs) -> None:
        if disk.refuse_open:
            raise sqlite3.OperationalError("database or disk is full")
        self._disk = disk
        self._db = sqlite3.connect(*args, **kwargs)

    def _check(self, sql: str) -> None:
        if self._disk.full and sql.lstrip().upper().startswith(WRITES):
            self._disk.write_errors += 1
            raise sqlite3.OperationalError("database or disk is full")

    def execute(self, sql, params=()):
        self._check(sql)
        return self._db.execute(sql, params)

    def executemany(self, sql, rows):
        rows = list(rows)
        if rows:
            self._check(sql)
        return self._db.executemany(sql, rows)

    def close(self):
        self._db.close()


def faulty(disk: Disk):
    return lambda *a, **k: FullDiskConnection(disk, *a, **k)


def msg(i: int, kind: str = "filled", size: int = 100) -> OutboxMessage:
    return OutboxMessage(topic=f"t/{i}", payload=(b"%06d" % i).ljust(size, b"x"), kind=kind, msg_id=f"id-{i}")


def test_sqlite_full_on_write_raises_outbox_full_and_changes_nothing(tmp_path):
    disk = Disk()
    box = SQLiteOutbox(OutboxConfig(path=tmp_path / "o.db", min_free_bytes=0), connect=faulty(disk))
    box.put_many([msg(0), msg(1)], journal=[("ingest", 1.0, "t", b"{}", False)])
    (oid, _), = box.next_batch(1)
    box.ack(oid)
    disk.full = True
    with pytest.raises(OutboxFull):
        box.put_many([msg(2)], journal=[("ingest", 2.0, "t", b"{}", False)])
    st = box.stats()  # stats, next_batch, ack, flush keep working on a full disk
    assert st["disk_full"] is True and st["depth"] == 1 and st["disk_full_episodes"] == 1
    assert [m.msg_id for _, m in box.next_batch(5)] == ["id-1"]
    box.release()
    box.flush()
    assert box.journal_seq() == 1  # the failed transaction wrote no journal entry either
    disk.full = False  # space is back: the same write goes through, nothing was lost
    box.put_many([msg(2)], journal=[("ingest", 2.0, "t", b"{}", False)])
    assert [m.msg_id for _, m in box.next_batch(5)] == ["id-1", "id-2"]
    assert box.stats()["disk_full"] is False and box.journal_seq() == 2
    assert box.stats()["acked"] == {"filled": 1}
    box.close()


def test_full_disk_at_start_up_starts_degraded_then_opens(tmp_path, caplog):
    disk = Disk()
    path = tmp_path / "o.db"
    box = SQLiteOutbox(OutboxConfig(path=path, min_free_bytes=0), connect=faulty(disk))
    box.put(msg(0))
    box.close()
    disk.refuse_open = True
    t = [0.0]
    with caplog.at_level("ERROR", logger="gapcast.edge.outbox"):
        box = SQLiteOutbox(OutboxConfig(path=path, min_free_bytes=0), clock=lambda: t[0], connect=faulty(disk))
    assert "starting degraded" in caplog.text
    assert box.ready is False and box.stats()["disk_full"] is True and box.next_batch(5) == []
    with pytest.raises(OutboxFull):
        box.put(msg(1))
    disk.refuse_open = False
    assert box.ready is False  # retried at most every 2 s of the age clock
    t[0] += 2.5
    assert box.ready is True
    assert [m.msg_id for _, m in box.next_batch(5)] == ["id-0"]  # the previous run's backlog is intact
    box.close()


def test_below_the_reserve_droppable_kinds_stop_growing_filled_values_stay(tmp_path):
    free = [10 << 20]
    box = SQLiteOutbox(OutboxConfig(path=tmp_path / "o.db", min_free_bytes=1 << 20), free_bytes=lambda: free[0])
    box.put_many([msg(0, "forecast"), msg(1, "forecast"), msg(2, "filled")])
    free[0] = 1000  # below the 1 MiB reserve
    ids = box.put_many([msg(3, "forecast"), msg(4, "filled"), msg(5, "status")])
    assert ids[0] > 0 and ids[1] > 0 and ids[2] > 0
    # id-3 replaced id-0, id-5 replaced id-1 (the oldest droppable), the filled value went into the reserve.
    assert [m.msg_id for _, m in box.next_batch(10)] == ["id-2", "id-3", "id-4", "id-5"]
    box.release()
    assert box.put(msg(6, "deadletter")) > 0  # replaces id-3 (oldest forecast)
    st = box.stats()
    assert st["dropped"] == {"forecast": 3} and st["reserve_dropped"] == 3
    assert st["free_bytes"] == 1000 and st["min_free_bytes"] == 1 << 20
    box.next_batch(10)  # everything in flight: nothing droppable is left, a new forecast is itself dropped
    assert box.put(msg(7, "forecast")) == -1
    assert box.stats()["dropped"] == {"forecast": 4} and box.stats()["reserve_dropped"] == 4
    box.close()


def _mount_tmpfs(path: Path, size: str = "2m") -> str | None:
    """Mount a tmpfs at ``path``; the reason when this process cannot."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return "mounting a tmpfs needs root and mount(8)"
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    return None if r.returncode == 0 else f"mount -t tmpfs failed: {r.stderr.strip()}"


@pytest.fixture
def tiny_fs(tmp_path):
    mnt = tmp_path / "tmpfs"
    why = _mount_tmpfs(mnt)
    if why:
        pytest.skip(why)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(folder: Path) -> Path:
    """Fill the file system of ``folder`` to the last byte; returns the ballast file."""
    ballast = folder / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for chunk in (65536, 4096, 512, 1):
            while True:
                try:
                    os.write(fd, b"\0" * chunk)
                except OSError:
                    break
    finally:
        os.close(fd)
    return ballast


def test_real_full_tmpfs_write_then_start_up_then_recovery(tiny_fs):
    path = tiny_fs / "state" / "o.db"
    cfg = OutboxConfig(path=path, min_free_bytes=64 * 1024, max_bytes=1 << 20)
    box = SQLiteOutbox(cfg)
    box.put_many([msg(i) for i in range(50)])
    ballast = _fill(tiny_fs)
    with pytest.raises(OutboxFull):  # ENOSPC from a real file system
        for k in range(2000):
            box.put_many([msg(1000 + 10 * k + j, size=2000) for j in range(10)])
    assert box.stats()["disk_full"] is True
    stored = box.stats()["depth"]
    assert stored >= 50
    box.close()
    t = [0.0]
    box = SQLiteOutbox(cfg, clock=lambda: t[0])  # start-up on the full disk: degraded, not an exception
    try:
        if box.ready:  # SQLite found room for its -wal/-shm: writes still fail, as in the running case
            with pytest.raises(OutboxFull):
                box.put_many([msg(9_000_000 + j, size=2000) for j in range(200)])
        ballast.unlink()
        t[0] += 3.0
        assert box.ready is True
        assert box.stats()["depth"] == stored  # nothing lost
        assert box.put(msg(99_999_999)) > 0
        assert box.stats()["disk_full"] is False
    finally:
        box.close()


# -- the agent on a full disk, against a real broker --------------------------------------------------------------


@pytest.mark.broker
@pytest.mark.timeout(120)
def test_agent_on_a_full_disk_stops_acking_keeps_running_and_recovers_everything(
    broker, tmp_path, make_core, monkeypatch
):
    import paho.mqtt.client as mqtt
    from conftest import T0, FakeBackend
    from paho.mqtt.enums import CallbackAPIVersion

    from gapcast.edge.config import parse_config
    from gapcast.edge.mqtt import MqttAgent

    cfg = parse_config({
        "gateway": {"id": "gw"}, "stations": {"names": ["s1"]},
        "mqtt": {"host": "127.0.0.1", "port": broker.port, "keepalive_s": 5, "reconnect_min_s": 1, "reconnect_max_s": 1},
        "agent": {"state_dir": str(tmp_path / "state"), "clock": "readings", "status_interval_s": 0.3,
                  "tick_interval_s": 0.1},
    })
    disk = Disk()
    box = SQLiteOutbox(OutboxConfig(path=tmp_path / "state" / "outbox.sqlite", min_free_bytes=0), connect=faulty(disk))
    core = make_core(backend=FakeBackend(), clock="readings", lateness_s=0.0, stations=("s1",))
    agent = MqttAgent(cfg, core, box, snapshot_path=str(tmp_path / "state" / "windows.npz"), clock_probe=lambda: None)
    got: list[tuple[str, dict]] = []
    lock = threading.Lock()
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)

    def on_message(client, userdata, m):  # the subscriber's network thread
        with lock:
            got.append((m.topic, json.loads(m.payload)))

    sub.on_message = on_message
    subscribed = threading.Event()
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.on_connect = lambda c, u, f, rc, p: c.subscribe("gapcast/v1/#", qos=1)
    sub.connect("127.0.0.1", broker.port)
    sub.loop_start()
    assert subscribed.wait(10)
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    stop = threading.Event()
    th = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    th.start()

    def wait(cond, timeout_s=20.0):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not cond():
            time.sleep(0.02)
        return cond()

    def filled_steps():
        with lock:
            return sorted({b["epoch_s"] for t, b in got if t.endswith("/filled") and not b.get("revision")})

    def send(j):
        body = {"ts": T0 + j * 3600, "values": {"a": 10.0 + j, "b": 1.0}}
        pub.publish("gapcast/v1/stations/s1/readings", json.dumps(body), qos=1).wait_for_publish(5)

    try:
        assert wait(agent.connected.is_set)
        for j in range(4):
            send(j)
        assert wait(lambda: filled_steps() == [T0 + j * 3600 for j in range(3)])
        disk.full = True
        for j in range(4, 10):
            send(j)
        assert wait(lambda: agent._unacked or agent.counters["store_blocked"], 10)
        # Degraded, not dead: the status says disk_full (sent past the outbox), nothing new is published.
        assert wait(lambda: any(b.get("disk_full") for t, b in got if t.endswith("/status")), 10)
        assert th.is_alive() and filled_steps() == [T0 + j * 3600 for j in range(3)]
        # The 6 readings are held unacknowledged (taken with the failed write, or still queued behind it).
        assert len(agent._unacked) + agent._inbound.qsize() == 6
        disk.full = False
        want = [T0 + j * 3600 for j in range(9)]
        assert wait(lambda: filled_steps() == want, 20), filled_steps()
        with lock:
            imputed = {b["epoch_s"]: b["imputed"] for t, b in got if t.endswith("/filled") and not b.get("revision")}
        assert all(v == [] for v in imputed.values())  # every reading arrived: none imputed, none lost
        assert wait(lambda: any(b.get("disk_full") is False and b["outbox"]["disk_full_episodes"] >= 1
                                for t, b in got if t.endswith("/status") and "outbox" in b), 10)
    finally:
        stop.set()
        th.join(20)
        pub.loop_stop()
        sub.loop_stop()
