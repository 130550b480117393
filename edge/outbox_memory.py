"""A small in-memory outbox (tests, or a gateway without writable storage).

Every message the agent publishes goes through an outbox and leaves it only when the broker acknowledged it
(QoS 1 PUBACK). The durable implementation is ``gapcast.edge.outbox.SQLiteOutbox``; both implement the protocol
``gapcast.edge.outbox.Outbox`` (re-exported here) and pass the same contract suite
(``tests/edge/test_outbox_contract.py``). This one loses its content with the process: use it only where that is
acceptable (it is not ``durable``, so the shell does not journal into it).

Thread model: the agent's main thread calls ``put``/``put_many``/``next_batch``; ``ack`` and ``release`` may be
called from paho's network thread. One lock guards everything.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from gapcast.edge.outbox import JournalEntry, Outbox, TokenBucket, release_inflight

__all__ = ["MemoryOutbox", "Outbox"]

log = logging.getLogger(__name__)


class MemoryOutbox:
    """An in-memory outbox bounded by bytes; when full, the oldest messages of the kinds in ``drop_order`` go first
    (forecasts before dead letters before status), then the oldest of any kind. Drops are counted and logged.

    Args:
        max_bytes: cap on stored payload + topic bytes.
        drop_order: kinds dropped first, in order.
        clock: the age clock, seconds (monotonic; injected in tests).
        max_age_s: messages older than this (on ``clock``) are dropped as ``expired``; 0 disables.
    """

    durable = False
    bucket: TokenBucket | None = None

    def __init__(
        self,
        max_bytes: int = 64 * 1024 * 1024,
        drop_order: tuple[str, ...] = ("forecast", "deadletter", "status"),
        clock: Callable[[], float] = time.monotonic,
        max_age_s: float = 0.0,
    ) -> None:
        self.max_bytes = int(max_bytes)
        self.max_age_s = float(max_age_s)
        self.drop_order = tuple(drop_order)
        self._clock = clock
        self._lock = threading.Lock()
        self._items: OrderedDict[int, Any] = OrderedDict()
        self._sizes: dict[int, int] = {}
        self._kinds: dict[int, str] = {}
        self._born: dict[int, float] = {}
        self._journal: list[JournalEntry] = []
        self._journal_seq = 0
        self._inflight: set[int] = set()
        self._next = 1
        self._bytes = 0
        self.put_counts: Counter = Counter()
        self.acked: Counter = Counter()
        self.dropped: Counter = Counter()
        self.expired: Counter = Counter()

    @property
    def ready(self) -> bool:
        """Always open."""
        return True

    def put(self, msg: Any) -> int:
        """Store one message; returns its outbox id (-1 when it alone exceeds ``max_bytes``: dropped, counted)."""
        return self.put_many([msg])[0]

    def put_many(self, msgs: Iterable[Any], journal: Iterable[tuple] = ()) -> list[int]:
        """Store several messages in order, and the core inputs ``(op, now_s, topic, payload, retained)`` that
        produced them; returns their ids."""
        ids = []
        with self._lock:
            self._expire_locked()
            for op, now, t, p, r in journal:
                self._journal_seq += 1
                self._journal.append(JournalEntry(self._journal_seq, str(op), float(now), str(t), bytes(p), bool(r)))
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
                self._born[i] = self._clock()
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
        self._born.pop(i, None)
        self._inflight.discard(i)

    def _expire_locked(self) -> None:
        if not self.max_age_s:
            return
        cutoff = self._clock() - self.max_age_s
        old = [i for i, b in self._born.items() if b < cutoff]
        for i in old:
            self.expired[self._kinds[i]] += 1
            self._remove_locked(i)
        if old:
            log.warning("outbox: %d message(s) older than %.0f s expired", len(old), self.max_age_s)

    def next_batch(self, n: int) -> list[tuple[int, Any]]:
        """Up to ``n`` oldest messages not in flight, marked in flight."""
        out = []
        with self._lock:
            self._expire_locked()
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
            return release_inflight(self._inflight, outbox_ids)

    def journal_seq(self) -> int:
        """The newest journal sequence number (0: nothing journaled)."""
        with self._lock:
            return self._journal_seq

    def journal_entries(self, after_seq: int = 0) -> list[JournalEntry]:
        """Journal entries newer than ``after_seq``, oldest first."""
        with self._lock:
            return [e for e in self._journal if e.seq > after_seq]

    def journal_truncate(self, through_seq: int) -> int:
        """Forget journal entries up to ``through_seq``; how many."""
        with self._lock:
            keep = [e for e in self._journal if e.seq > through_seq]
            n = len(self._journal) - len(keep)
            self._journal = keep
            return n

    def flush(self) -> None:
        """Nothing to make durable in memory."""

    def close(self) -> None:
        """Nothing to release."""

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def stats(self) -> dict[str, Any]:
        """The keys of ``Outbox.stats``; ``disk_full`` is always False and ``free_bytes`` None (no disk)."""
        with self._lock:
            oldest = min(self._born.values(), default=None)
            return {
                "depth": len(self._items),
                "bytes": self._bytes,
                "inflight": len(self._inflight),
                "oldest_age_s": round(max(self._clock() - oldest, 0.0), 3) if oldest is not None else 0.0,
                "max_bytes": self.max_bytes,
                "put": dict(self.put_counts),
                "acked": dict(self.acked),
                "dropped": dict(self.dropped),
                "expired": dict(self.expired),
                "dropped_total": sum(self.dropped.values()) + sum(self.expired.values()),
                "reserve_dropped": 0,
                "disk_full": False,
                "disk_full_episodes": 0,
                "free_bytes": None,
                "min_free_bytes": 0,
                "ready": True,
            }
