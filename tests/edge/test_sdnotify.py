"""systemd notify/watchdog (gapcast.edge.sdnotify) with a fake NOTIFY_SOCKET: a unix datagram socket in tmp.

The agent test runs the real MqttAgent against a private Mosquitto: READY, periodic WATCHDOG from the step loop, and
no WATCHDOG while the step loop is stuck in a backend call (then the pings resume).
"""

from __future__ import annotations

import os
import socket
import time
import uuid

import pytest
from support.small_agent import HoldableBackend, Publisher, RunningAgent, current_step, reading, small_config

from gapcast.edge.sdnotify import Notifier, watchdog_interval_s

pytestmark = pytest.mark.timeout(60)


class FakeSystemd:
    """The receiving end of NOTIFY_SOCKET: keeps every datagram with its monotonic arrival time."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.got: list[tuple[float, dict[str, str]]] = []

    def recv(self, timeout_s: float) -> dict[str, str] | None:
        self.sock.settimeout(timeout_s)
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return None
        fields = dict(line.split("=", 1) for line in data.decode().split("\n"))
        self.got.append((time.monotonic(), fields))
        return fields

    def wait_for(self, key: str, timeout_s: float = 10.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            f = self.recv(left)
            if f is not None and key in f:
                return f
        raise AssertionError(f"no {key} datagram within {timeout_s} s: {self.got}")

    def close(self) -> None:
        self.sock.close()


def test_watchdog_interval_is_half_of_watchdog_usec_for_this_pid():
    assert watchdog_interval_s({"WATCHDOG_USEC": "60000000"}) == 30.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid())}) == 30.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"}) is None  # for another process
    assert watchdog_interval_s({}) is None and watchdog_interval_s({"WATCHDOG_USEC": "0"}) is None


def test_without_notify_socket_everything_is_a_no_op():
    n = Notifier({})
    assert not n.enabled and n.ready("x") is False and n.watchdog(1e9) is False and n.sent == 0


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_ready_status_and_rate_limited_watchdog(tmp_path, abstract):
    name = f"@gapcast-test-{uuid.uuid4().hex}" if abstract else str(tmp_path / "notify.sock")
    systemd = FakeSystemd(b"\0" + name[1:].encode() if abstract else name)
    try:
        n = Notifier({"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "2000000"})  # ping every 1 s
        assert n.ready("serving 3 stations")
        assert systemd.recv(2) == {"READY": "1", "STATUS": "serving 3 stations"}
        assert n.status("line one\nline two") and systemd.recv(2) == {"STATUS": "line one line two"}
        assert n.watchdog(100.0) is True and n.watchdog(100.5) is False and n.watchdog(101.0) is True
        assert systemd.recv(2) == {"WATCHDOG": "1"} and systemd.recv(2) == {"WATCHDOG": "1"}
        assert systemd.recv(0.05) is None  # the rate-limited call sent nothing
        assert n.sent == 4 and n.errors == 0
    finally:
        systemd.close()


def test_a_vanished_socket_is_counted_not_raised(tmp_path, caplog):
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert n.ready() is False and n.ready() is False
    assert n.errors == 2 and caplog.text.count("sd_notify to NOTIFY_SOCKET failed") == 1


@pytest.mark.broker
def test_agent_pings_from_its_step_loop_and_stops_when_the_loop_is_stuck(broker, tmp_path):
    systemd = FakeSystemd(str(tmp_path / "notify.sock"))
    backend = HoldableBackend()
    cfg = small_config(broker.host, broker.port, tmp_path / "state")
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "200000"})  # every 0.1 s
    ra = RunningAgent(cfg, backend, notifier=notifier).start()
    pub = None
    try:
        assert systemd.wait_for("READY")["READY"] == "1"
        t_ready = time.monotonic()
        for _ in range(5):
            systemd.wait_for("WATCHDOG", 2)
        pings = [t for t, f in systemd.got if "WATCHDOG" in f]
        assert len(pings) == 5 and pings[-1] - t_ready < 2.0  # periodic: five pings in well under two seconds
        assert any("connected to" in f.get("STATUS", "") for _, f in systemd.got) or systemd.wait_for("STATUS")

        # A stuck step loop: the backend call for the closed step blocks, so the pings stop.
        backend.hold()
        pub = Publisher(broker.host, broker.port)
        k = current_step()
        for step in (k - 1, k):  # the second reading closes step k-1: one backend call
            pub.publish(*reading(step))
        assert backend.holding.wait(10), "the backend was never called"
        while systemd.recv(0.05) is not None:  # drain pings sent before the loop got stuck
            pass
        assert systemd.recv(1.0) is None  # 10 ping intervals without a WATCHDOG
        backend.release()
        systemd.wait_for("WATCHDOG", 3)  # the loop runs again: the pings resume
    finally:
        backend.release()
        if pub is not None:
            pub.close()
        ra.stop()
    try:
        assert systemd.wait_for("STOPPING", 5)["STOPPING"] == "1"
        assert not ra.thread.is_alive()
    finally:
        systemd.close()
