"""The outbox interface and a small in-memory implementation (tests, or a gateway without writable storage).

Every message the agent publishes goes through an outbox and leaves it only when the broker acknowledged it
(QoS 1 PUBACK). The durable implementation is ``gapcast.edge.outbox.SQLiteOutbox``; both have the same methods,
described by :class:`Outbox`. This one loses its content with the process: use it only where that is acceptable.

Thread model: the agent's main thread calls ``put``/``put_many``/``next_batch``; ``ack`` and ``release`` may be
called from paho's network thread. One lock guards everything.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, Protocol

__all__ = ["MemoryOutbox", "Outbox"]

log = logging.getLogger(__name__)


class Outbox(Protocol):
    """What the MQTT shell needs from an outbox."""

    def put(self, msg: Any) -> int:
        """Store one message (``topic``, ``payload``, ``qos``, ``retain``, ``kind``, ``msg_id``); its outbox id."""
        ...

    def put_many(self, msgs: Iterable[Any]) -> list[int]:
        """Store several messages in order; their outbox ids."""
        ...

    def next_batch(self, n: int) -> list[tuple[int, Any]]:
        """Up to ``n`` oldest messages not in flight, as ``(outbox_id, message)``, now marked in flight."""
        ...

    def ack(self, outbox_id: int) -> None:
        """The broker acknowledged it: remove it."""
        ...

    def release(self, outbox_ids: Iterable[int] | None = None) -> int:
        """Put in-flight messages back in the queue (all when None); how many."""
        ...

    def stats(self) -> dict[str, Any]:
        """Counters for the status message (``depth``, ``bytes``, ``inflight``, ``dropped``...)."""
        ...

    def flush(self) -> None:
        """Make pending state durable (a no-op in memory)."""
        ...

    def close(self) -> None:
        """Flush and release resources."""
        ...

    def __len__(self) -> int: ...


class MemoryOutbox:
    """An in-memory outbox bounded by bytes; when full, the oldest messages of the kinds in ``drop_order`` go first
    (forecasts before dead letters before status), then the oldest of any kind. Drops are counted and logged.

    Args:
        max_bytes: cap on stored payload + topic bytes.
        drop_order: kinds dropped first, in order.
        clock: wall clock for stamps (injected in tests).
    """

    def __init__(
        self,
        max_bytes: int = 64 * 1024 * 1024,
        drop_order: tuple[str, ...] = ("forecast", "deadletter", "status"),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_bytes = int(max_bytes)
        self.drop_order = tuple(drop_order)
        self._clock = clock
        self._lock = threading.Lock()
        self._items: OrderedDict[int, Any] = OrderedDict()
        self._sizes: dict[int, int] = {}
        self._kinds: dict[int, str] = {}
        self._inflight: set[int] = set()
        self._next = 1
        self._bytes = 0
        self.put_counts: Counter = Counter()
        self.acked: Counter = Counter()
        self.dropped: Counter = Counter()

    def put(self, msg: Any) -> int:
        """Store one message; returns its outbox id (-1 when it alone exceeds ``max_bytes``: dropped, counted)."""
        return self.put_many([msg])[0]

    def put_many(self, msgs: Iterable[Any]) -> list[int]:
        """Store several messages in order; returns their ids."""
        ids = []
        with self._lock:
            for m in msgs:
                size = len(m.payload) + len(m.topic.encode())
                kind = str(getattr(m, "kind", "other") or "other")
                if size > self.max_bytes:
                    self.dropped[kind] += 1
                    log.warning("outbox: a %s message of %d bytes exceeds the whole cap; dropped", kind, size)
                    ids.append(-1)
                    continue
                while self._bytes + size > self.max_bytes and self._drop_one_locked():
                    pass
                i = self._next
                self._next += 1
                self._items[i] = m
                self._sizes[i] = size
                self._kinds[i] = kind
                self._bytes += size
                self.put_counts[kind] += 1
                ids.append(i)
        return ids

    def _drop_one_locked(self) -> bool:
        for kind in (*self.drop_order, None):
            for i, k in self._kinds.items():
                if i in self._inflight or (kind is not None and k != kind):
                    continue
                self._remove_locked(i)
                self.dropped[k] += 1
                log.warning("outbox full (%d bytes): dropped the oldest %s; dropped so far %s", self.max_bytes, k, dict(self.dropped))
                return True
        return False

    def _remove_locked(self, i: int) -> None:
        self._items.pop(i, None)
        self._bytes -= self._sizes.pop(i, 0)
        self._kinds.pop(i, None)
        self._inflight.discard(i)

    def next_batch(self, n: int) -> list[tuple[int, Any]]:
        """Up to ``n`` oldest messages not in flight, marked in flight."""
        out = []
        with self._lock:
            for i, m in self._items.items():
                if len(out) >= n:
                    break
                if i not in self._inflight:
                    out.append((i, m))
            self._inflight.update(i for i, _ in out)
        return out

    def ack(self, outbox_id: int) -> None:
        """Remove an acknowledged message."""
        with self._lock:
            kind = self._kinds.get(outbox_id)
            if kind is not None:
                self.acked[kind] += 1
                self._remove_locked(outbox_id)

    def release(self, outbox_ids: Iterable[int] | None = None) -> int:
        """Return in-flight messages to the queue (all when None)."""
        with self._lock:
            ids = set(self._inflight) if outbox_ids is None else set(outbox_ids) & self._inflight
            self._inflight -= ids
            return len(ids)

    def flush(self) -> None:
        """Nothing to make durable in memory."""

    def close(self) -> None:
        """Nothing to release."""

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def stats(self) -> dict[str, Any]:
        """``depth``, ``bytes``, ``inflight``, ``max_bytes``, per-kind ``put``/``acked``/``dropped``, ``dropped_total``."""
        with self._lock:
            return {
                "depth": len(self._items),
                "bytes": self._bytes,
                "inflight": len(self._inflight),
                "max_bytes": self.max_bytes,
                "put": dict(self.put_counts),
                "acked": dict(self.acked),
                "dropped": dict(self.dropped),
                "dropped_total": sum(self.dropped.values()),
            }
