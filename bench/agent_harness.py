"""The clients that drive and watch one benchmarked agent (:mod:`gapcast.bench.agent`): its ``edge.toml``, a
publisher that waits for the broker's acknowledgements, a bare paho subscriber (the raw ceiling), an RSS sampler,
the reading streams, and the forecast and profile readers."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from gapcast.timefmt import format_rfc3339, parse_rfc3339

__all__ = [
    "GATEWAY",
    "PREFIX",
    "SENTINEL",
    "Publisher",
    "RawCounter",
    "RssSampler",
    "agent_toml",
    "dump_profile",
    "forecast_times",
    "per_channel",
    "readings_topic",
    "wait_for",
    "whole_step",
]

log = logging.getLogger(__name__)

PREFIX = "gapcast/v1"
GATEWAY = "bench-gw"
#: A station whose reading ends a stream (its forecast says the agent worked through everything before it).
SENTINEL = "bench-sentinel"


class RawCounter:
    """A bare paho subscriber counting readings (the raw ceiling). Callbacks run on paho's network thread."""

    def __init__(self, host: str, port: int) -> None:
        import paho.mqtt.client as mqtt

        self.count = 0
        self.last_rx = 0.0
        self._ready = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-raw-{os.getpid()}",
                                  protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"{PREFIX}/stations/+/readings", qos=1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self._ready.set()
        self.client.on_message = self._on_message
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()
        if not self._ready.wait(10):
            msg = "the raw subscriber could not subscribe"
            raise RuntimeError(msg)

    def _on_message(self, client, userdata, msg) -> None:  # paho network thread
        self.count += 1
        self.last_rx = time.monotonic()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class RssSampler:
    """Samples another process's RSS every ``interval_s`` on a daemon thread (psutil)."""

    def __init__(self, pid: int, interval_s: float = 0.1) -> None:
        import psutil

        self.proc = psutil.Process(pid)
        self.peak_mb = 0.0
        self.last_mb = 0.0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, args=(interval_s,), daemon=True)
        self._t.start()

    def _loop(self, interval_s: float) -> None:
        import psutil

        while not self._stop.wait(interval_s):
            try:
                self.last_mb = self.proc.memory_info().rss / 2**20
            except psutil.Error:
                return
            self.peak_mb = max(self.peak_mb, self.last_mb)

    def stop(self) -> None:
        self._stop.set()
        self._t.join()


def agent_toml(path: Path, *, port: int, bundle: Path, trusted: str, state: Path, n: int, threads: int,
               max_batch: int, variant: str) -> None:
    """Write the benchmarked agent's ``edge.toml`` (the settings the module docstring of
    :mod:`gapcast.bench.agent` states). Raises OSError when it cannot be written."""
    path.write_text(f"""# Written by `gapcast bench agent`.
[gateway]
id = "{GATEWAY}"

[mqtt]
host = "127.0.0.1"
port = {port}
topic_prefix = "{PREFIX}"
client_id = "gapcast-bench-agent"
max_inflight = 1000

[stations]
names = []
auto_register = true
max_stations = {n + 1}

[model]
bundle = {json.dumps(str(bundle))}
trusted_keys = [{json.dumps(trusted)}]
backend = "onnxruntime"
variant = {json.dumps(variant)}
threads = {threads}
max_batch = {max_batch}

[input]
lateness_s = 3600.0

[agent]
clock = "readings"
max_missing_share = 1.0
tick_interval_s = 0.2
status_interval_s = 2.0
state_dir = {json.dumps(str(state))}
snapshot_interval_s = 86400.0

[outbox]
kind = "sqlite"
max_bytes = 1073741824
rate_per_s = 1000000.0
burst = 1000000
""")


def wait_for(cond, timeout_s: float, poll_s: float = 0.01) -> bool:
    """Poll ``cond()`` every ``poll_s`` until it is true or ``timeout_s`` seconds passed; its last value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(poll_s)
    return bool(cond())


class Publisher:
    """A paho publisher (MQTT 5, QoS 1, 1,000 in flight) that can wait until the broker acknowledged everything."""

    def __init__(self, host: str, port: int, name: str) -> None:
        import paho.mqtt.client as mqtt

        self.acked = 0
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-publisher-{name}-{os.getpid()}",
                                  protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.on_publish = self._on_publish
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()
        self.sent = 0

    def _on_publish(self, client, userdata, mid, rc, props) -> None:  # paho network thread
        self.acked += 1

    def publish(self, msgs: list[tuple[str, bytes]], stamps: dict[str, float] | None = None) -> None:
        for topic, payload in msgs:
            if stamps is not None:
                stamps[topic] = time.monotonic()
            self.client.publish(topic, payload, qos=1)
        self.sent += len(msgs)

    def wait_acked(self, timeout_s: float) -> bool:
        return wait_for(lambda: self.acked >= self.sent, timeout_s)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def readings_topic(station: str) -> str:
    """The readings topic of ``station`` under the bench's prefix."""
    return f"{PREFIX}/stations/{station}/readings"


def whole_step(net: dict, step: int) -> list[tuple[str, bytes]]:
    """One message per station with all its channels at ``step`` (NaN -> null: missing)."""
    out = []
    for name, s in net.items():
        ts = format_rfc3339(float(s.epoch_s[step]))
        vals = {c: (None if not np.isfinite(v) else round(float(v), 3)) for c, v in zip((ch.name for ch in s.channels), s.values[step])}
        out.append((readings_topic(name), json.dumps({"ts": ts, "values": vals}, separators=(",", ":")).encode()))
    return out


def per_channel(net: dict, step: int) -> list[tuple[str, bytes]]:
    """One message per channel per station at ``step``, observed values only (per-channel stations)."""
    out = []
    for name, s in net.items():
        ts = format_rfc3339(float(s.epoch_s[step]))
        for c, v in zip((ch.name for ch in s.channels), s.values[step]):
            if np.isfinite(v):
                out.append((readings_topic(name), json.dumps({"ts": ts, "values": {c: round(float(v), 3)}},
                                                     separators=(",", ":")).encode()))
    return out


def forecast_times(collector, pos: list[int], seen: dict[str, float], want: set[int] | None = None,
                    skip: str = SENTINEL) -> None:
    """Record the first arrival of each (station, origin) forecast the collector got since ``pos[0]``."""
    new = collector.forecasts[pos[0] :]  # the collector's list only grows (paho thread appends)
    pos[0] += len(new)
    for t, b in new:
        if b["station"] == skip:
            continue
        o = int(parse_rfc3339(b["origin"]))
        if want is None or o in want:
            seen.setdefault(f"{b['station']}@{o}", t)


def dump_profile(agent, prefix: Path, k: int, timeout_s: float = 30.0) -> dict[str, Any] | None:
    """Ask the agent (SIGUSR1) for its ``k``-th profile dump and read it; None (logged) when none came in time."""
    path = prefix.with_name(f"{prefix.name}.{k}.json")
    os.kill(agent.pid, signal.SIGUSR1)
    if not wait_for(path.exists, timeout_s, 0.05):
        log.warning("the agent wrote no profile dump %s within %.0f s", path, timeout_s)
        return None
    return json.loads(path.read_text())
