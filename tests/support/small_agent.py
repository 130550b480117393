"""A small real MQTT agent for operations tests: a one-channel hourly card, a deterministic backend that can be
held (to simulate a stuck step loop), the real :class:`gapcast.edge.mqtt.MqttAgent` in a thread, and a publisher."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from gapcast.edge.backends import Backend

CADENCE = 3600
STATION = "s1"
PREFIX = "gapcast/v1"


def small_card():
    from gapcast.edge.bundle import Card

    return Card.from_dict(
        {
            "schema_version": 1, "model": {"name": "confill", "version": 3}, "created": "2026-11-29T00:00:00Z",
            "channels": [{"name": "PM2.5", "unit": "ug/m3", "valid_min": 0, "valid_max": 2000, "mean": 80, "std": 80}],
            "cadence_s": CADENCE, "lookback": 4, "horizon": 2,
            "calendar": {"features": [], "utc_offset_s": 0}, "inputs": [], "outputs": [],
            "files": {"model.onnx": {"sha256": "0" * 64, "bytes": 1}},
            "variants": {"fp32": {"file": "model.onnx", "precision": "fp32"}},
        }
    )


class HoldableBackend(Backend):
    """imputed = 0 (the normalised mean), forecast = 0; ``hold`` makes :meth:`run` block until ``release``."""

    name = "fake"

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.holding = threading.Event()  # set while a call is blocked
        self._go = threading.Event()
        self._go.set()

    def describe(self) -> str:
        return "fake (test, holdable)"

    def hold(self) -> None:
        self._go.clear()

    def release(self) -> None:
        self._go.set()

    def run(self, values, observed, calendar):
        self.calls.append(int(values.shape[0]))
        if not self._go.is_set():
            self.holding.set()
            self._go.wait(60)
            self.holding.clear()
        B, L, C = values.shape
        H = calendar.shape[1] - L
        return np.zeros((B, L, C), np.float32), np.zeros((B, H, C), np.float32)


def small_config(host: str, port: int, state_dir: Path, *, mqtt: dict | None = None, **sections: dict):
    """An :class:`EdgeConfig` for gateway ``gw-01`` serving station ``s1`` on the readings clock."""
    from gapcast.edge.config import parse_config

    data: dict[str, Any] = {
        "gateway": {"id": "gw-01"},
        "mqtt": {"host": host, "port": port, "reconnect_min_s": 1, "reconnect_max_s": 1, "keepalive_s": 5, **(mqtt or {})},
        "stations": {"names": [STATION]},
        "agent": {"state_dir": str(state_dir), "clock": "readings", "tick_interval_s": 0.1, "max_missing_share": 1.0,
                  "status_interval_s": 0.5},
        "outbox": {"kind": "memory"},
    }
    for k, v in sections.items():
        data[k] = {**data.get(k, {}), **v}
    return parse_config(data, base=state_dir)


class RunningAgent:
    """The real MqttAgent in a thread; :meth:`stop` ends it (also on test failure, via the fixture that owns it)."""

    def __init__(self, cfg, backend=None, **kw) -> None:
        from gapcast.edge.agent import AgentCore
        from gapcast.edge.mqtt import MqttAgent
        from gapcast.edge.outbox_memory import MemoryOutbox

        core = AgentCore.from_config(cfg, small_card(), backend)
        self.agent = MqttAgent(cfg, core, MemoryOutbox(), snapshot_path="", **kw)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self.agent.run, args=(self._stop,), kwargs={"drain_timeout_s": 1.0}, daemon=True)

    def start(self) -> RunningAgent:
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(20)


def reading(step: int, value: float | None = 50.0, station: str = STATION) -> tuple[str, bytes]:
    """A reading of step ``step`` (hours since the epoch) on its topic."""
    return f"{PREFIX}/stations/{station}/readings", json.dumps({"ts": step * CADENCE, "values": {"PM2.5": value}}).encode()


def current_step() -> int:
    """The newest whole hour (readings must not be in the future)."""
    return int(time.time() // CADENCE) - 1


class Publisher:
    """A paho client that publishes QoS 1 and waits for each PUBACK (MQTT ``version``: ``5`` or ``3.1.1``)."""

    def __init__(self, host: str, port: int, version: str = "5", username: str | None = None, password: str | None = None):
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5 if version == "5" else mqtt.MQTTv311)
        if username:
            self.c.username_pw_set(username, password)
        self.c.connect(host, port)
        self.c.loop_start()

    def publish(self, topic: str, payload: bytes, timeout_s: float = 10.0) -> None:
        info = self.c.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout_s)
        assert info.is_published(), f"no PUBACK for {topic}"

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def wait_for(pred, timeout_s: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
