"""A durable outbox on SQLite (WAL mode): every message the agent publishes waits here until the broker acks it.

(Over 600 lines on purpose: the outbox and the input journal share one database and one transaction per drained
batch, the group commit that makes "acknowledged to a station" imply "stored"; the in-memory twin for tests and
diskless gateways is :mod:`gapcast.edge.outbox_memory`, the interface both declare is :class:`Outbox`.)

paho-mqtt keeps its own queue of QoS 1 messages in memory, and that queue dies with the process. The agent
therefore writes each outgoing message to this outbox first; the MQTT shell takes batches from it, publishes them
with QoS 1 and calls :meth:`SQLiteOutbox.ack` from ``on_publish`` when the broker's PUBACK arrives. Only then does
the row leave the database. A crash, a reboot or a long broker outage loses nothing: at the next start the backlog
is read back and flushed in its original order, rate limited by a :class:`TokenBucket` so that a gateway that was
offline for a day does not flood the broker and starve live traffic.

The outbox is bounded by bytes and by age (:class:`OutboxConfig`). When a new message does not fit, the OLDEST
FORECASTS are dropped first (a newer forecast supersedes them), then the other kinds in ``drop_order``, and
filled values only when nothing else is left. Every drop is counted by kind, logged, and reported by
:meth:`SQLiteOutbox.stats` so that the status message says what was lost. Nothing leaves silently.

Delivery is at-least-once: a message acked by the broker but not yet deleted here when the process dies is sent
again after the restart. Subscribers deduplicate by the stable message id each output carries.

The same database holds the agent's input journal: every input the pure core took since the last window snapshot
(``ingest`` of a reading, ``tick`` of the clock), written in the SAME transaction as the outputs it produced, before
the reading is acknowledged to the broker. After a crash the agent restores the last snapshot and replays the journal
through the core (its outputs are already stored here), so the windows come back exactly as they were: no reading
acknowledged to the broker is lost, and no step is closed twice. A snapshot truncates the journal.

Thread model: the agent's main thread calls ``put``/``next_batch``; paho's network thread calls ``ack`` and
``release``. All methods take one lock; SQLite runs with ``check_same_thread=False`` under that lock.

Sources: SQLite write-ahead logging (https://sqlite.org/wal.html), PRAGMA synchronous/auto_vacuum
(https://sqlite.org/pragma.html); MQTT 5.0 section 4.3.2 (QoS 1: at least once delivery); the token bucket of
RFC 2697/2698 (single rate, without colour marking).
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from gapcast.edge import EdgeError

__all__ = [
    "DEFAULT_MIN_FREE_BYTES",
    "JournalEntry",
    "Outbox",
    "OutboxConfig",
    "OutboxError",
    "OutboxFull",
    "OutboxMessage",
    "SQLiteOutbox",
    "TokenBucket",
    "is_disk_full",
]

log = logging.getLogger(__name__)

_SCHEMA_VERSION = 1
# Ack deletes are batched: a delete lost in a crash only means one duplicate after the restart (deduplicated by id).
_ACK_FLUSH_EVERY = 64


#: Default free-space reserve of the state file system, bytes: room for the WAL (1 MiB), a window snapshot of a few
#: thousand stations and the system's own logs on a small (16 GB) eMMC.
DEFAULT_MIN_FREE_BYTES = 64 * 1024 * 1024


class OutboxError(EdgeError):
    """The outbox database cannot be opened or written (disk full, wrong schema, unreadable file)."""


class OutboxFull(OutboxError):
    """The outbox cannot store right now: the file system is full (``ENOSPC``, SQLite ``SQLITE_FULL``) or the
    database could not be opened for lack of space. Nothing was stored and the caller's state is unchanged; the
    MQTT shell keeps the outputs in memory, stops acknowledging readings and retries (QoS 1 back-pressure)."""


def is_disk_full(exc: BaseException) -> bool:
    """Whether an SQLite or OS error means "no space left" (``SQLITE_FULL``, ``ENOSPC``, ``EDQUOT``)."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and (code & 0xFF) == sqlite3.SQLITE_FULL:
        return True
    return "disk is full" in str(exc) or "No space left" in str(exc)


@dataclass(frozen=True)
class OutboxMessage:
    """One message waiting to be published.

    Attributes:
        topic: MQTT topic.
        payload: the exact bytes to publish (JSON, UTF-8).
        qos: MQTT QoS (the agent uses 1 for everything it publishes through the outbox).
        retain: the MQTT retain flag.
        kind: what it is, for the drop policy and the counters: ``filled``, ``revision``, ``forecast``,
            ``status``, ``deadletter``...
        msg_id: the stable message id (station, step, kind, model version) subscribers deduplicate by; may be empty.
        created_s: wall-clock time it was created, Unix seconds (for the age bound; survives a restart).
    """

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    kind: str = "other"
    msg_id: str = ""
    created_s: float = 0.0

    @property
    def size_bytes(self) -> int:
        """Bytes the message occupies in the cap: payload plus topic, UTF-8."""
        return len(self.payload) + len(self.topic.encode())


@dataclass(frozen=True)
class JournalEntry:
    """One input the agent core took, recorded for replay after a crash.

    Attributes:
        seq: journal sequence number (increasing, never reused).
        op: ``ingest`` (a reading) or ``tick`` (the clock closed due steps).
        now_s: the gateway clock the core was given, seconds since the epoch.
        topic, payload, retained: the MQTT message (``ingest`` only; empty for ``tick``).
    """

    seq: int
    op: str
    now_s: float
    topic: str = ""
    payload: bytes = b""
    retained: bool = False


class Outbox(Protocol):
    """What the MQTT shell needs from an outbox; :class:`SQLiteOutbox` and
    ``gapcast.edge.outbox_memory.MemoryOutbox`` implement it (``tests/edge/test_outbox_contract.py`` runs one
    contract suite over both).

    Attributes:
        durable: the content survives the process. The shell journals the core's inputs only into a durable outbox
            and replays them after a restart.
        bucket: the token bucket that paces a backlog flush, or None for no pacing.

    Thread model: ``put``/``put_many``/``next_batch``/``journal_*`` from the agent's main thread; ``ack`` and
    ``release`` may come from paho's network thread.
    """

    durable: bool
    bucket: TokenBucket | None

    @property
    def ready(self) -> bool:
        """The store is open (False while a full disk kept it from opening at start-up; each call retries)."""
        ...

    def put(self, msg: Any) -> int:
        """Store one message; its outbox id (-1: larger than the whole cap, dropped and counted).

        Raises:
            OutboxFull: no space to store it (nothing stored). OutboxError: any other write failure.
        """
        ...

    def put_many(self, msgs: Iterable[Any], journal: Iterable[tuple] = ()) -> list[int]:
        """Store messages, and the core inputs ``(op, now_s, topic, payload, retained)`` that produced them, in ONE
        transaction; their ids in order.

        Raises:
            OutboxFull: no space (nothing stored). OutboxError: any other write failure.
        """
        ...

    def next_batch(self, n: int) -> list[tuple[int, OutboxMessage]]:
        """Up to ``n`` oldest messages not in flight, as ``(outbox_id, message)``, now marked in flight."""
        ...

    def ack(self, outbox_id: int) -> None:
        """The broker acknowledged it (PUBACK): it leaves the outbox."""
        ...

    def release(self, outbox_ids: Iterable[int] | None = None) -> int:
        """Put in-flight messages back in the queue (all when None); how many."""
        ...

    def journal_seq(self) -> int:
        """The newest journal sequence number (0: nothing journaled)."""
        ...

    def journal_entries(self, after_seq: int = 0) -> list[JournalEntry]:
        """Journal entries newer than ``after_seq``, oldest first."""
        ...

    def journal_truncate(self, through_seq: int) -> int:
        """Forget journal entries up to ``through_seq``; how many."""
        ...

    def stats(self) -> dict[str, Any]:
        """Counters for the status message: ``depth``, ``bytes``, ``inflight``, ``oldest_age_s``, ``max_bytes``,
        per-kind ``put``/``acked``/``dropped``/``expired``, ``dropped_total``, ``disk_full``, ``free_bytes``."""
        ...

    def flush(self) -> None:
        """Make pending state durable (a no-op in memory)."""
        ...

    def close(self) -> None:
        """Flush and release resources."""
        ...

    def __len__(self) -> int:
        """Messages waiting, in flight included."""
        ...


@dataclass(frozen=True)
class OutboxConfig:
    """Bounds and durability of the outbox.

    Attributes:
        path: the SQLite database file (its ``-wal`` and ``-shm`` siblings live beside it).
        max_bytes: cap on the stored messages' payload + topic bytes; the database files stay within about twice
            the cap plus 2 MiB (SQLite page and index overhead, a WAL checkpointed every 1 MiB).
        max_age_s: messages older than this are dropped as ``expired``, seconds; 0 disables. Age is the agent's
            running time since the message was stored (the monotonic clock within a run; across a restart an entry
            keeps the age it had reached, the time the agent was stopped does not count), so no wall-clock step,
            while running or while off, can expire anything.
        drop_order: kinds dropped first, in this order, oldest first within a kind, when a message does not fit;
            kinds not listed (``filled``, ``revision``...) are dropped oldest-first only when nothing listed is left.
        synchronous: SQLite ``PRAGMA synchronous``: ``FULL`` survives power loss (an fsync per commit), ``NORMAL``
            survives a crash of the process and may lose the last commits on power loss.
        rate_per_s: steady publish rate the shell's :class:`TokenBucket` allows when flushing, messages/second.
        burst: token bucket depth, messages.
        min_free_bytes: free-space reserve of the file system holding the database, bytes. Below it the outbox
            stops growing for the kinds in ``drop_order`` (each new one replaces the oldest droppable message, or is
            dropped itself, counted as ``dropped`` and ``reserve_dropped``); filled values and the journal still go
            into the reserve, and when a write fails for lack of space :class:`OutboxFull` is raised.
    """

    path: Path
    max_bytes: int = 64 * 1024 * 1024
    max_age_s: float = 7 * 24 * 3600.0
    drop_order: tuple[str, ...] = ("forecast", "deadletter", "status")
    synchronous: str = "FULL"
    rate_per_s: float = 200.0
    burst: int = 500
    min_free_bytes: int = DEFAULT_MIN_FREE_BYTES

    def __post_init__(self) -> None:
        if self.max_bytes <= 0:
            msg = f"outbox max_bytes must be positive, got {self.max_bytes}"
            raise ValueError(msg)
        if self.max_age_s < 0:
            msg = f"outbox max_age_s must be >= 0, got {self.max_age_s}"
            raise ValueError(msg)
        if self.synchronous.upper() not in {"FULL", "NORMAL", "EXTRA"}:
            msg = f"outbox synchronous must be FULL, NORMAL or EXTRA, got {self.synchronous!r}"
            raise ValueError(msg)
        if self.rate_per_s <= 0 or self.burst < 1:
            msg = f"outbox rate_per_s must be > 0 and burst >= 1, got {self.rate_per_s}, {self.burst}"
            raise ValueError(msg)
        if self.min_free_bytes < 0:
            msg = f"outbox min_free_bytes must be >= 0, got {self.min_free_bytes}"
            raise ValueError(msg)


class TokenBucket:
    """A token bucket: ``rate_per_s`` tokens per second, at most ``burst`` stored.

    Pure: the caller passes monotonic time, so tests need no clock and a wall-clock jump cannot mint tokens.

    Args:
        rate_per_s: refill rate, tokens/second.
        burst: bucket depth, tokens (also the initial fill).
    """

    def __init__(self, rate_per_s: float, burst: int) -> None:
        if rate_per_s <= 0 or burst < 1:
            msg = f"token bucket needs rate_per_s > 0 and burst >= 1, got {rate_per_s}, {burst}"
            raise ValueError(msg)
        self.rate_per_s = float(rate_per_s)
        self.burst = int(burst)
        self._tokens = float(burst)
        self._last_s: float | None = None

    def _refill(self, now_s: float) -> None:
        if self._last_s is not None and now_s > self._last_s:
            self._tokens = min(float(self.burst), self._tokens + (now_s - self._last_s) * self.rate_per_s)
        if self._last_s is None or now_s > self._last_s:
            self._last_s = now_s

    def take(self, n: int, now_s: float) -> int:
        """Take up to ``n`` whole tokens.

        Args:
            n: tokens wanted (messages to publish).
            now_s: monotonic time, seconds.

        Returns:
            How many were granted, 0..n.
        """
        self._refill(now_s)
        granted = min(int(n), int(self._tokens))
        self._tokens -= granted
        return max(granted, 0)

    def wait_s(self, now_s: float) -> float:
        """Seconds until one token is available (0 when one is available now)."""
        self._refill(now_s)
        return 0.0 if self._tokens >= 1 else (1.0 - self._tokens) / self.rate_per_s


@dataclass
class _Counters:
    put: Counter = field(default_factory=Counter)
    acked: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    expired: Counter = field(default_factory=Counter)
    reserve_dropped: int = 0
    disk_full: int = 0


def _statvfs_free(folder: Path) -> Callable[[], int]:
    def free() -> int:
        st = os.statvfs(folder)
        return int(st.f_bavail * st.f_frsize)

    return free


# How often a database that could not be opened (full disk at start-up) is tried again, seconds (monotonic).
_REOPEN_EVERY_S = 2.0


def release_inflight(inflight: set[int], outbox_ids: Iterable[int] | None) -> int:
    """Take ``outbox_ids`` (every one when None) out of an outbox's in-flight set, in place; ids not in flight are
    ignored. Shared by :class:`SQLiteOutbox` and :class:`gapcast.edge.outbox_memory.MemoryOutbox`, whose caller
    holds the outbox's lock.

    Returns:
        How many were in flight (and are now released).
    """
    ids = set(inflight) if outbox_ids is None else set(outbox_ids) & inflight
    inflight -= ids
    return len(ids)


class SQLiteOutbox:
    """The durable outbox (the other implementation of :class:`Outbox` is the in-memory ``MemoryOutbox``).

    Args:
        config: bounds, durability, rate and free-space reserve (see :class:`OutboxConfig`).
        clock: the age clock, seconds; must not step (default ``time.monotonic``). Ages are measured on it and,
            across restarts, on a running-time total stored in the database (see ``max_age_s``).
        wall: wall clock, Unix seconds, only to stamp ``created_s`` on messages that carry none (information).
        connect: opens the SQLite connection (``sqlite3.connect``; tests inject faults through it).
        free_bytes: free bytes of the database's file system (default: ``os.statvfs``; tests inject it).

    Raises:
        OutboxError: the database cannot be opened (other than for lack of space), or it was written by an
            incompatible schema. A FULL disk at start-up does not raise: the outbox starts not :attr:`ready`, says so
            in its stats, and opens as soon as space returns.
    """

    durable = True

    def __init__(
        self,
        config: OutboxConfig,
        clock: Callable[[], float] = time.monotonic,
        *,
        wall: Callable[[], float] = time.time,
        connect: Callable[..., Any] = sqlite3.connect,
        free_bytes: Callable[[], int] | None = None,
    ) -> None:
        self.config = config
        self._clock = clock
        self._wall = wall
        self._connect = connect
        self._lock = threading.Lock()
        self._inflight: set[int] = set()
        self._acked: set[int] = set()
        self._counters = _Counters()
        self.bucket: TokenBucket | None = TokenBucket(config.rate_per_s, config.burst)
        self._path = Path(config.path)
        self._free = free_bytes or _statvfs_free(self._path.parent)
        self._db: Any = None
        self._bytes = self._count = 0
        self._run_base_s = 0.0
        self._clock0 = clock()
        self._last_open_try = -float("inf")
        self._full_since: float | None = None
        self._open_error = ""
        # Counter updates of the open transaction: applied on COMMIT, forgotten on ROLLBACK (see _begin/_commit).
        self._txn_counts: list[tuple[Counter, Counter]] = []
        self._txn_acked: set[int] = set()
        with self._lock:
            self._open_locked(first=True)

    # -- opening -------------------------------------------------------------------------------------------------

    def _open_locked(self, *, first: bool = False) -> bool:
        """Open (or retry opening) the database. A full disk leaves it closed; other failures raise."""
        self._last_open_try = self._clock()
        db = None
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            db = self._connect(str(self._path), check_same_thread=False, isolation_level=None)
            self._db = db
            self._setup()
            self._bytes, self._count = db.execute("SELECT COALESCE(SUM(bytes), 0), COUNT(*) FROM outbox").fetchone()
            row = db.execute("SELECT value FROM meta WHERE key = 'run_s'").fetchone()
            self._run_base_s = float(row[0]) if row else 0.0
            self._clock0 = self._clock()
        except (sqlite3.Error, OSError, OutboxError) as exc:
            self._db = None
            if db is not None:
                try:
                    db.close()
                except sqlite3.Error:
                    pass
            if isinstance(exc, OutboxError):
                raise
            if not self._no_space(exc):
                msg = f"cannot open the outbox database {self._path}: {exc}"
                raise OutboxError(msg) from exc
            if first or not self._open_error:
                log.error(
                    "outbox %s cannot be opened, the disk is full (%s; %s bytes free): starting degraded, readings "
                    "stay unacknowledged at the broker until space returns", self._path, exc, self._free_or_none(),
                )
            self._open_error = str(exc)
            self._mark_full_locked()
            return False
        if self._open_error:
            log.warning("outbox %s opened: space is back", self._path)
            self._open_error = ""
        self._full_since = None
        if self._count:
            log.info("outbox %s: %d message(s), %d bytes waiting from the previous run", self._path, self._count, self._bytes)
        return True

    def _no_space(self, exc: BaseException) -> bool:
        """A full disk: ENOSPC/SQLITE_FULL, or an I/O error while free space is below the reserve (SQLite reports
        a failed ``-shm``/``-wal`` creation on a full file system as a generic I/O error)."""
        if is_disk_full(exc):
            return True
        free = self._free_or_none()
        return isinstance(exc, sqlite3.OperationalError) and free is not None and free < max(self.config.min_free_bytes, 1)

    def _free_or_none(self) -> int | None:
        try:
            return int(self._free())
        except OSError:
            return None

    def _mark_full_locked(self) -> None:
        if self._full_since is None:
            self._full_since = self._clock()
            self._counters.disk_full += 1

    @property
    def ready(self) -> bool:
        """The database is open. While it is not (full disk at start-up), each call retries at most every 2 s."""
        with self._lock:
            return self._ready_locked()

    def _ready_locked(self) -> bool:
        if self._db is not None:
            return True
        if self._clock() - self._last_open_try < _REOPEN_EVERY_S:
            return False
        return self._open_locked()

    def _setup(self) -> None:
        db = self._db
        # auto_vacuum must be chosen before the first table exists; INCREMENTAL lets us hand freed pages back.
        db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            msg = f"SQLite refused WAL mode (got {mode!r})"
            raise OutboxError(msg)
        db.execute(f"PRAGMA synchronous={self.config.synchronous.upper()}")
        # Keep the WAL small: checkpoint every 256 pages (1 MiB) and truncate it back to 1 MiB afterwards, so disk
        # use stays within the cap plus a constant during long outages.
        db.execute("PRAGMA wal_autocheckpoint=256")
        db.execute("PRAGMA journal_size_limit=1048576")
        db.execute(
            "CREATE TABLE IF NOT EXISTS outbox ("
            " id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, payload BLOB NOT NULL,"
            " qos INTEGER NOT NULL, retain INTEGER NOT NULL, kind TEXT NOT NULL, msg_id TEXT NOT NULL,"
            " created_s REAL NOT NULL, bytes INTEGER NOT NULL, born_run_s REAL NOT NULL DEFAULT 0)"
        )
        cols = {r[1] for r in db.execute("PRAGMA table_info(outbox)").fetchall()}
        if "born_run_s" not in cols:  # a database of an agent that aged by the wall clock: its rows start at age 0
            db.execute("ALTER TABLE outbox ADD COLUMN born_run_s REAL NOT NULL DEFAULT 0")
        db.execute("CREATE INDEX IF NOT EXISTS outbox_kind ON outbox (kind, id)")
        db.execute("CREATE INDEX IF NOT EXISTS outbox_born ON outbox (born_run_s)")
        db.execute(
            "CREATE TABLE IF NOT EXISTS journal (seq INTEGER PRIMARY KEY AUTOINCREMENT, op TEXT NOT NULL,"
            " now_s REAL NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL, retained INTEGER NOT NULL)"
        )
        db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None:
            db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(_SCHEMA_VERSION),))
        elif int(row[0]) != _SCHEMA_VERSION:
            msg = f"outbox schema version {row[0]} is not supported (this agent writes {_SCHEMA_VERSION})"
            raise OutboxError(msg)

    def run_s(self) -> float:
        """The outbox's running time, seconds: the total of earlier runs plus the age clock since this one opened."""
        return self._run_base_s + max(self._clock() - self._clock0, 0.0)

    # -- writing -------------------------------------------------------------------------------------------------

    def put(self, msg: Any) -> int:
        """Store one message durably (committed before this returns).

        Args:
            msg: an :class:`OutboxMessage`, or any object with ``topic``, ``payload`` (bytes or str) and optionally
                ``qos``, ``retain``, ``kind``, ``msg_id``.

        Returns:
            The outbox id of the message (``ack`` takes it), or -1 when the message alone exceeds ``max_bytes`` or
            was dropped by the free-space reserve (dropped, counted and logged).

        Raises:
            OutboxFull: no space left (nothing stored).
            OutboxError: the database write failed otherwise.
        """
        return self.put_many([msg])[0]

    def put_many(self, msgs: Iterable[Any], journal: Iterable[tuple] = ()) -> list[int]:
        """Store several messages in ONE transaction (one fsync), in order.

        Args:
            msgs: the messages (see :meth:`put`).
            journal: core inputs that produced them, ``(op, now_s, topic, payload, retained)`` each, written in the
                same transaction (see :class:`JournalEntry`).

        Returns:
            Their outbox ids, in the same order (-1 for a message larger than the whole cap or dropped by the
            free-space reserve).

        Raises:
            OutboxFull: no space left, or the database is not open (full disk at start-up); nothing was stored.
            OutboxError: the database write failed otherwise.
        """
        items = [self._coerce(m) for m in msgs]
        journal = list(journal)
        with self._lock:
            if not self._ready_locked():
                msg = f"outbox {self._path} is not open: the disk is full ({self._open_error})"
                raise OutboxFull(msg)
            free = self._free_or_none()
            low = free is not None and free < self.config.min_free_bytes
            born = self.run_s()
            try:
                self._begin_locked()
                self._flush_acks_locked()
                self._expire_locked()
                ids, stored, dropped, reserve = self._insert_locked(items, journal, low, born)
                self._db.execute("INSERT OR REPLACE INTO meta VALUES ('run_s', ?)", (repr(born),))
                self._commit_locked()
                self._counters.put.update(stored)
            except sqlite3.Error as exc:
                self._rollback_locked()
                if self._no_space(exc):
                    self._mark_full_locked()
                    msg = f"outbox write failed, no space left ({exc}; {self._free_or_none()} bytes free)"
                    raise OutboxFull(msg) from exc
                msg = f"outbox write failed: {exc}"
                raise OutboxError(msg) from exc
            self._note_put_locked(dropped, reserve, free, low)
        return ids

    def _insert_locked(
        self, items: list[OutboxMessage], journal: list[tuple], low: bool, born: float
    ) -> tuple[list[int], Counter, Counter, int]:
        """Inside the open transaction: write the journal rows, then each message, making room by the drop policy.

        A message over the whole cap is dropped; while free space is ``low`` a droppable kind is stored only if the
        reserve can be made, else dropped (and counted in ``reserve``).

        Returns:
            ``(ids, stored, dropped, reserve)``: the ids in order (-1 when dropped), stored and dropped counts by
            kind, and how many were dropped by the free-space reserve.

        Raises:
            sqlite3.Error: a write failed (the caller rolls back and converts it).
        """
        droppable = set(self.config.drop_order)
        ids: list[int] = []
        dropped: Counter = Counter()
        stored: Counter = Counter()
        reserve = 0
        self._db.executemany(
            "INSERT INTO journal (op, now_s, topic, payload, retained) VALUES (?, ?, ?, ?, ?)",
            [(str(op), float(now), str(t), bytes(p), int(bool(r))) for op, now, t, p, r in journal],
        )
        for m in items:
            size = m.size_bytes
            if size > self.config.max_bytes:
                dropped[m.kind] += 1
                ids.append(-1)
                continue
            if low and m.kind in droppable and not self._make_reserve_room_locked(size, dropped):
                dropped[m.kind] += 1
                reserve += 1
                ids.append(-1)
                continue
            self._make_room_locked(size, dropped)
            cur = self._db.execute(
                "INSERT INTO outbox (topic, payload, qos, retain, kind, msg_id, created_s, bytes, born_run_s)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (m.topic, m.payload, m.qos, int(m.retain), m.kind, m.msg_id, m.created_s, size, born),
            )
            ids.append(int(cur.lastrowid))
            self._bytes += size
            self._count += 1
            stored[m.kind] += 1
        return ids, stored, dropped, reserve

    def _note_put_locked(self, dropped: Counter, reserve: int, free: int | None, low: bool) -> None:
        """After a committed put: log the end of a full-disk spell, and count and log what was dropped (and why)."""
        if self._full_since is not None:
            log.warning("outbox: writes succeed again after %.0f s of a full disk", self._clock() - self._full_since)
            self._full_since = None
        if reserve:
            self._counters.reserve_dropped += reserve
        if dropped:
            self._counters.dropped.update(dropped)
            why = (
                f"free space {free} bytes below outbox.min_free_bytes {self.config.min_free_bytes}"
                if low else f"{self.config.max_bytes} bytes cap"
            )
            log.warning("outbox full (%s): dropped %s; totals dropped %s", why, dict(dropped), dict(self._counters.dropped))

    def _coerce(self, m: Any) -> OutboxMessage:
        if isinstance(m, OutboxMessage) and m.created_s:
            return m
        payload = m.payload
        if isinstance(payload, str):
            payload = payload.encode()
        elif not isinstance(payload, bytes | bytearray):
            msg = f"outbox payload must be bytes or str, got {type(payload).__name__}"
            raise TypeError(msg)
        return OutboxMessage(
            topic=str(m.topic),
            payload=bytes(payload),
            qos=int(getattr(m, "qos", 1)),
            retain=bool(getattr(m, "retain", False)),
            kind=str(getattr(m, "kind", "other") or "other"),
            msg_id=str(getattr(m, "msg_id", "") or getattr(m, "id", "") or ""),
            created_s=float(getattr(m, "created_s", 0.0) or self._wall()),
        )

    def _make_reserve_room_locked(self, size: int, dropped: Counter) -> bool:
        """Below the free-space reserve: delete the oldest messages of the ``drop_order`` kinds (not in flight)
        until ``size`` bytes are freed inside the database file (SQLite reuses the freed pages, so the file does not
        grow). Returns False when there is not enough droppable content. Caller holds the lock + txn."""
        need = size
        chosen: list[tuple[int, str, int]] = []
        for kind in self.config.drop_order:
            after = -1
            while need > 0:
                rows = self._db.execute(
                    "SELECT id, kind, bytes FROM outbox WHERE kind = ? AND id > ? ORDER BY id LIMIT 32", (kind, after)
                ).fetchall()
                if not rows:
                    break
                for r in rows:
                    after = r[0]
                    if r[0] in self._inflight or r[0] in self._acked:
                        continue
                    chosen.append(r)
                    need -= r[2]
                    if need <= 0:
                        break
            if need <= 0:
                break
        if need > 0:
            return False
        self._delete_rows_locked(chosen, dropped)
        self._counters.reserve_dropped += len(chosen)
        return True

    def _make_room_locked(self, size: int, dropped: Counter) -> None:
        """Delete the oldest rows by the drop policy until ``size`` more bytes fit. Caller holds the lock + txn."""
        kinds = list(self.config.drop_order) + [None]  # None: any kind, oldest first
        for kind in kinds:
            while self._bytes + size > self.config.max_bytes:
                if kind is None:
                    rows = self._db.execute("SELECT id, kind, bytes FROM outbox ORDER BY id LIMIT 32").fetchall()
                else:
                    rows = self._db.execute(
                        "SELECT id, kind, bytes FROM outbox WHERE kind = ? ORDER BY id LIMIT 32", (kind,)
                    ).fetchall()
                # Messages handed to paho are probably on the wire: keep them unless nothing else is left.
                victims = [r for r in rows if r[0] not in self._inflight] or rows
                if not victims:
                    break
                need = self._bytes + size - self.config.max_bytes
                chosen = []
                for r in victims:
                    chosen.append(r)
                    need -= r[2]
                    if need <= 0:
                        break
                self._delete_rows_locked(chosen, dropped)
            if self._bytes + size <= self.config.max_bytes:
                return

    def _delete_rows_locked(self, rows: list[tuple[int, str, int]], counter: Counter) -> None:
        self._db.executemany("DELETE FROM outbox WHERE id = ?", [(r[0],) for r in rows])
        for rid, kind, nbytes in rows:
            counter[kind] += 1
            self._bytes -= nbytes
            self._count -= 1
            self._inflight.discard(rid)
            self._acked.discard(rid)

    def _expire_locked(self) -> None:
        if not self.config.max_age_s:
            return
        cutoff = self.run_s() - self.config.max_age_s
        rows = self._db.execute("SELECT id, kind, bytes FROM outbox WHERE born_run_s < ?", (cutoff,)).fetchall()
        if rows:
            expired: Counter = Counter()
            self._delete_rows_locked(rows, expired)
            self._txn_counts.append((self._counters.expired, expired))
            log.warning("outbox: %s message(s) older than %.0f s expired: %s", len(rows), self.config.max_age_s, dict(expired))

    def _begin_locked(self) -> None:
        self._txn_counts = []
        self._txn_acked = set(self._acked)
        self._db.execute("BEGIN IMMEDIATE")

    def _commit_locked(self) -> None:
        self._db.execute("COMMIT")
        for target, delta in self._txn_counts:
            target.update(delta)
        self._txn_counts = []

    def _rollback_locked(self) -> None:
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass
        self._txn_counts = []
        # Acknowledged rows whose delete was rolled back stay acknowledged (never handed out again).
        self._acked |= self._txn_acked
        self._txn_acked = set()
        # Resynchronise the in-memory totals with what is really stored.
        try:
            self._bytes, self._count = self._db.execute("SELECT COALESCE(SUM(bytes), 0), COUNT(*) FROM outbox").fetchone()
        except sqlite3.Error as exc:  # pragma: no cover - a read after a rollback fails only on a broken file
            log.error("outbox: cannot re-read its totals after a failed write: %s", exc)

    def _housekeeping_locked(self) -> None:
        """Delete acknowledged and expired rows; best effort (a full disk only delays it: the rows are skipped)."""
        if not self._acked and not self.config.max_age_s:
            return
        try:
            self._begin_locked()
            self._flush_acks_locked()
            self._expire_locked()
            self._commit_locked()
        except sqlite3.Error as exc:
            self._rollback_locked()
            if self._no_space(exc):
                self._mark_full_locked()
                log.debug("outbox: housekeeping postponed, no space: %s", exc)
            else:
                log.error("outbox: could not delete acknowledged/expired messages (they will be re-sent): %s", exc)

    # -- reading and acknowledging -------------------------------------------------------------------------------

    def next_batch(self, n: int) -> list[tuple[int, OutboxMessage]]:
        """The ``n`` oldest messages not yet handed out, marked in flight until :meth:`ack` or :meth:`release`.

        Args:
            n: the most messages to return (the shell passes what the token bucket granted).

        Returns:
            ``[(outbox_id, message), ...]`` in the order they were put (empty while the database is not open).

        Raises:
            OutboxError: the database read failed.
        """
        if n <= 0:
            return []
        with self._lock:
            if not self._ready_locked():
                return []
            self._housekeeping_locked()
            try:
                busy = self._inflight | self._acked
                out: list[tuple[int, OutboxMessage]] = []
                after = -1
                while len(out) < n:
                    rows = self._db.execute(
                        "SELECT id, topic, payload, qos, retain, kind, msg_id, created_s FROM outbox"
                        " WHERE id > ? ORDER BY id LIMIT ?",
                        (after, n - len(out) + len(busy)),
                    ).fetchall()
                    if not rows:
                        break
                    for r in rows:
                        after = r[0]
                        if r[0] in busy:
                            continue
                        out.append((r[0], OutboxMessage(r[1], bytes(r[2]), r[3], bool(r[4]), r[5], r[6], r[7])))
                        if len(out) == n:
                            break
            except sqlite3.Error as exc:
                self._rollback_locked()
                msg = f"outbox read failed: {exc}"
                raise OutboxError(msg) from exc
            self._inflight.update(i for i, _ in out)
        return out

    def ack(self, outbox_id: int) -> None:
        """The broker acknowledged the message (PUBACK): it leaves the outbox.

        Called from paho's network thread. The delete is batched; until it is flushed the message is never handed
        out again, and a crash before the flush only causes one duplicate after the restart.
        """
        with self._lock:
            if outbox_id < 0 or self._db is None:
                return
            if outbox_id in self._inflight:
                self._inflight.discard(outbox_id)
            elif self._db.execute("SELECT 1 FROM outbox WHERE id = ?", (outbox_id,)).fetchone() is None:
                # Already gone (dropped for room or expired while on the wire): its row was counted out then, so
                # adding it to the pending acks would make the depth (stored rows minus pending acks) too small.
                return
            self._acked.add(outbox_id)
            if len(self._acked) >= _ACK_FLUSH_EVERY:
                self._housekeeping_locked()

    def _flush_acks_locked(self) -> None:
        if not self._acked:
            return
        ids = sorted(self._acked)
        rows: list[tuple[int, str, int]] = []
        for k in range(0, len(ids), 500):
            chunk = ids[k : k + 500]
            marks = ",".join("?" * len(chunk))
            rows += self._db.execute(f"SELECT id, kind, bytes FROM outbox WHERE id IN ({marks})", chunk).fetchall()
        acked: Counter = Counter()
        self._delete_rows_locked(rows, acked)
        self._txn_counts.append((self._counters.acked, acked))
        self._acked.clear()

    def release(self, outbox_ids: Iterable[int] | None = None) -> int:
        """Put in-flight messages back in the queue (publish failed, or the connection dropped before the PUBACK).

        Args:
            outbox_ids: which ones; None releases every in-flight message (what the shell does on disconnect when
                paho will not resend them itself).

        Returns:
            How many were released. They are handed out again by :meth:`next_batch`, in their original order.
        """
        with self._lock:
            return release_inflight(self._inflight, outbox_ids)

    # -- the input journal ------------------------------------------------------------------------------------

    def journal_seq(self) -> int:
        """The newest journal sequence number (0 when nothing was ever journaled, or the database is not open)."""
        with self._lock:
            if not self._ready_locked():
                return 0
            row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'journal'").fetchone()
            return int(row[0]) if row else 0

    def journal_entries(self, after_seq: int = 0) -> list[JournalEntry]:
        """Journal entries newer than ``after_seq``, oldest first (none while the database is not open)."""
        with self._lock:
            if not self._ready_locked():
                return []
            rows = self._db.execute(
                "SELECT seq, op, now_s, topic, payload, retained FROM journal WHERE seq > ? ORDER BY seq", (after_seq,)
            ).fetchall()
        return [JournalEntry(r[0], r[1], r[2], r[3], bytes(r[4]), bool(r[5])) for r in rows]

    def journal_truncate(self, through_seq: int) -> int:
        """Forget journal entries up to ``through_seq`` (a snapshot now covers them). Returns how many.

        Raises:
            OutboxFull: no space for the delete (retried after the next snapshot).
            OutboxError: the delete failed otherwise.
        """
        with self._lock:
            if not self._ready_locked():
                return 0
            try:
                cur = self._db.execute("DELETE FROM journal WHERE seq <= ?", (through_seq,))
            except sqlite3.Error as exc:
                msg = f"outbox journal truncate failed: {exc}"
                if self._no_space(exc):
                    raise OutboxFull(msg) from exc
                raise OutboxError(msg) from exc
            return cur.rowcount

    def flush(self) -> None:
        """Write pending ack deletes and return freed pages to the file system (call on shutdown, or when idle)."""
        with self._lock:
            if self._db is None:
                return
            self._housekeeping_locked()
            try:
                self._db.execute("INSERT OR REPLACE INTO meta VALUES ('run_s', ?)", (repr(self.run_s()),))
                self._db.execute("PRAGMA incremental_vacuum")
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:
                log.error("outbox flush failed: %s", exc)

    def close(self) -> None:
        """Flush and close the database. The outbox cannot be used afterwards."""
        self.flush()
        with self._lock:
            if self._db is not None:
                self._db.close()

    # -- reporting -----------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Messages waiting (in flight included): stored rows minus acknowledged ones not yet deleted; never < 0."""
        with self._lock:
            return max(self._count - len(self._acked), 0)

    def stats(self) -> dict[str, Any]:
        """Counters for the status message.

        Returns:
            ``depth`` (messages waiting, in flight included), ``bytes`` (their size), ``inflight``,
            ``oldest_age_s`` (running-time seconds, 0 when empty), ``max_bytes``, per-kind dicts ``put``,
            ``acked``, ``dropped`` (cap and free-space reserve), ``expired`` (age), ``dropped_total`` (dropped +
            expired, all kinds), ``reserve_dropped`` (of those, by the reserve), ``disk_full`` (a write is failing
            for lack of space now, or the database could not be opened), ``disk_full_episodes``, ``free_bytes``,
            ``min_free_bytes`` and ``ready``.
        """
        with self._lock:
            ready = self._ready_locked()
            oldest = None
            if ready:
                if self._acked:
                    self._housekeeping_locked()
                oldest = self._db.execute("SELECT MIN(born_run_s) FROM outbox").fetchone()[0]
            c = self._counters
            return {
                "depth": max(self._count - len(self._acked), 0),
                "bytes": self._bytes,
                "inflight": len(self._inflight),
                "oldest_age_s": round(max(self.run_s() - oldest, 0.0), 3) if oldest is not None else 0.0,
                "max_bytes": self.config.max_bytes,
                "put": dict(c.put),
                "acked": dict(c.acked),
                "dropped": dict(c.dropped),
                "expired": dict(c.expired),
                "dropped_total": sum(c.dropped.values()) + sum(c.expired.values()),
                "reserve_dropped": c.reserve_dropped,
                "disk_full": self._full_since is not None,
                "disk_full_episodes": c.disk_full,
                "free_bytes": self._free_or_none(),
                "min_free_bytes": self.config.min_free_bytes,
                "ready": ready,
            }

    def disk_bytes(self) -> int:
        """Bytes the database uses on disk: the main file plus its WAL and shared-memory files."""
        p = self._path
        return sum(q.stat().st_size for q in (p, p.with_name(p.name + "-wal"), p.with_name(p.name + "-shm")) if q.exists())

    def __enter__(self) -> SQLiteOutbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
