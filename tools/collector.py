"""One MQTT recorder for the demo, the benchmarks and the tests: subscribe, keep every message, wait for a condition.

``Recorder`` is a paho-mqtt subscriber (VERSION2 callbacks, MQTT 5 by default, QoS 1) that keeps every message it
receives as a :class:`Recorded` (arrival time on the monotonic clock, topic, raw payload, parsed JSON or None,
retain flag). Callers select by topic suffix and wait for a condition with a deadline (never a fixed sleep).

Threads: paho's network thread runs ``_on_message`` (append under a lock); every reader takes the lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from gapcast import GapcastError

__all__ = ["CollectorError", "Recorded", "Recorder", "wait_until"]


class CollectorError(GapcastError):
    """The recorder could not connect or subscribe."""


@dataclass(frozen=True)
class Recorded:
    """One received message.

    Attributes:
        t: arrival, ``time.monotonic()`` seconds.
        topic: the MQTT topic.
        payload: the raw bytes.
        body: the payload parsed as JSON (None when it is not JSON / not UTF-8).
        retain: the retain flag as delivered (True for a retained message sent on subscribe).
    """

    t: float
    topic: str
    payload: bytes
    body: Any
    retain: bool


def wait_until(cond: Callable[[], bool], timeout_s: float, *, poll_s: float = 0.02) -> bool:
    """Poll ``cond`` until it is true or ``timeout_s`` (seconds) passed; returns whether it became true."""
    deadline = time.monotonic() + timeout_s
    while True:
        if cond():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)


class Recorder:
    """Subscribe to ``topics`` on a broker and keep every message.

    Args:
        host, port: the broker.
        topics: topic filters (``gapcast/v1/#``), each subscribed with QoS 1.
        client_id: defaults to ``gapcast-recorder-<pid>-<n>``.
        protocol: ``"5"`` (default) or ``"3.1.1"``.
        username, password: broker credentials, if any.
        subscribe_timeout_s: how long to wait for the SUBACK.

    Raises:
        CollectorError: no SUBACK within ``subscribe_timeout_s`` (broker down, refused, ACL).
    """

    _count = 0

    def __init__(
        self,
        host: str,
        port: int,
        topics: str | Sequence[str],
        *,
        client_id: str | None = None,
        protocol: str = "5",
        username: str | None = None,
        password: str | None = None,
        subscribe_timeout_s: float = 10.0,
    ) -> None:
        import paho.mqtt.client as mqtt

        Recorder._count += 1
        self.topics = [topics] if isinstance(topics, str) else list(topics)
        self._messages: list[Recorded] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        proto = mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id or f"gapcast-recorder-{os.getpid()}-{Recorder._count}",
            protocol=proto,
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self._subscribed.set()
        self.client.on_message = self._on_message
        try:
            self.client.connect(host, port, keepalive=30)
        except OSError as exc:
            msg = f"the recorder could not connect to {host}:{port}: {exc}"
            raise CollectorError(msg) from exc
        self.client.loop_start()
        if not self._subscribed.wait(subscribe_timeout_s):
            self.close()
            msg = f"the recorder could not subscribe to {self.topics} on {host}:{port}"
            raise CollectorError(msg)

    def _on_connect(self, client, userdata, flags, reason_code, properties):  # paho network thread
        client.subscribe([(t, 1) for t in self.topics])

    def _on_message(self, client, userdata, msg):  # paho network thread
        now = time.monotonic()
        try:
            body = json.loads(msg.payload)
        except (ValueError, UnicodeDecodeError):
            body = None
        with self._lock:
            self._messages.append(Recorded(now, msg.topic, bytes(msg.payload), body, bool(msg.retain)))

    def messages(self, suffix: str | Iterable[str] = "") -> list[Recorded]:
        """The messages so far whose topic ends with ``suffix`` (or any of several), in arrival order."""
        ends = (suffix,) if isinstance(suffix, str) else tuple(suffix)
        with self._lock:
            return [m for m in self._messages if m.topic.endswith(ends)]

    def bodies(self, suffix: str | Iterable[str] = "") -> list[Any]:
        """The parsed payloads of :meth:`messages` (None for a payload that was not JSON)."""
        return [m.body for m in self.messages(suffix)]

    def count(self, suffix: str | Iterable[str] = "") -> int:
        """How many messages so far end with ``suffix``."""
        return len(self.messages(suffix))

    def wait_for(self, cond: Callable[[Recorder], bool], timeout_s: float = 30.0) -> bool:
        """Wait until ``cond(self)`` holds (polled every 20 ms) or ``timeout_s`` passed; returns whether it held."""
        return wait_until(lambda: cond(self), timeout_s)

    def wait_count(self, n: int, suffix: str | Iterable[str] = "", timeout_s: float = 30.0) -> bool:
        """Wait until at least ``n`` messages ending with ``suffix`` arrived."""
        return self.wait_for(lambda r: r.count(suffix) >= n, timeout_s)

    def close(self) -> None:
        """Disconnect and stop the network thread (idempotent)."""
        with contextlib.suppress(Exception):
            self.client.disconnect()
        with contextlib.suppress(Exception):
            self.client.loop_stop()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
