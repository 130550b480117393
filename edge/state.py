"""Window-state snapshots: each station's rolling window survives a restart, and no step is published twice.

A snapshot is ONE file, a NumPy ``.npz`` archive (a zip of ``.npy`` members, each with a CRC-32). Its member
``__header__`` holds a UTF-8 JSON header::

    {"format": "gapcast-window-state", "version": 1, "saved_s": 1700000000.0,
     "meta": {...the agent's compatibility keys: model version, channels, cadence_s, lookback...},
     "stations": [{"name": "site-A", "meta": {"last_published_step_s": 1362096000, ...},
                   "arrays": {"values": {"key": "s0/values", "shape": [96, 13], "dtype": "float32"}, ...}}]}

and the arrays are stored under the keys the header names. Writes are atomic (a temporary file in the same
folder, ``fsync``, ``os.replace``, then ``fsync`` of the folder), so a crash or power loss at any moment leaves
either the previous snapshot or the new one, never a mix. A snapshot that is truncated, corrupt, of another
version, or inconsistent with its header is detected on load, logged, moved aside as ``*.corrupt`` for inspection,
and the agent starts with empty windows instead of crashing.

Sources: POSIX ``rename(2)`` atomicity and the "fsync the directory" rule (see e.g. the SQLite and LevelDB
write-ahead designs, and ext4's ``auto_da_alloc`` notes); NumPy's ``.npz`` format (NEP 1).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import time
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gapcast.edge import ConfigError, EdgeError

__all__ = [
    "SNAPSHOT_FORMAT",
    "SNAPSHOT_VERSION",
    "Snapshot",
    "SnapshotError",
    "SnapshotScheduler",
    "StateDirLock",
    "StationState",
    "atomic_write_bytes",
    "lock_state_dir",
    "load_snapshot",
    "read_snapshot",
    "replay_journal",
    "save_snapshot",
]

log = logging.getLogger(__name__)

SNAPSHOT_FORMAT = "gapcast-window-state"
SNAPSHOT_VERSION = 1
_HEADER_KEY = "__header__"


class SnapshotError(EdgeError):
    """A snapshot cannot be read: truncated, corrupt, of an unknown version, or inconsistent with its header."""


@dataclass(frozen=True)
class StationState:
    """What one station's window needs to resume.

    Attributes:
        arrays: named arrays of the window (e.g. ``values [L, C] float32`` in physical units with NaN for missing,
            ``observed [L, C] bool``, ``epoch_s [L] int64``); whatever the window object exports.
        meta: JSON-able scalars, at least ``last_published_step_s`` (Unix seconds of the last step published, so a
            restart does not publish it again).
    """

    arrays: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Snapshot:
    """A loaded snapshot.

    Attributes:
        saved_s: wall-clock time it was written, Unix seconds.
        meta: the agent-wide header fields (model version, channel names, cadence...), to check compatibility.
        stations: station name -> :class:`StationState`.
    """

    saved_s: float
    meta: dict[str, Any]
    stations: dict[str, StationState]


def _fsync_dir(folder: Path) -> None:
    """fsync a directory so a rename inside it is durable. A no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably: temp file, fsync, rename, fsync of the folder.

    Raises:
        OSError: the write failed (the previous file, if any, is untouched and the temporary file removed).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def save_snapshot(
    path: str | Path,
    stations: Mapping[str, StationState],
    meta: Mapping[str, Any] | None = None,
    *,
    saved_s: float | None = None,
) -> int:
    """Write a snapshot atomically.

    Args:
        path: the snapshot file (``.npz``).
        stations: station name -> its state.
        meta: agent-wide compatibility fields (JSON-able).
        saved_s: wall-clock stamp, Unix seconds (default: now).

    Returns:
        The size of the file written, bytes.

    Raises:
        SnapshotError: a station's meta or the header is not JSON-able, or an array has an object dtype.
        OSError: the write failed (the previous snapshot is untouched).
    """
    arrays: dict[str, np.ndarray] = {}
    entries = []
    for k, (name, st) in enumerate(stations.items()):
        described = {}
        for aname, arr in st.arrays.items():
            a = np.asarray(arr)
            if a.dtype == object:
                msg = f"snapshot: station {name!r} array {aname!r} has dtype object (not storable without pickle)"
                raise SnapshotError(msg)
            key = f"s{k}/{aname}"
            arrays[key] = a
            described[aname] = {"key": key, "shape": list(a.shape), "dtype": a.dtype.str}
        entries.append({"name": str(name), "meta": dict(st.meta), "arrays": described})
    header = {
        "format": SNAPSHOT_FORMAT,
        "version": SNAPSHOT_VERSION,
        "saved_s": float(time.time() if saved_s is None else saved_s),
        "meta": dict(meta or {}),
        "stations": entries,
    }
    try:
        header_bytes = json.dumps(header, allow_nan=False, sort_keys=True).encode()
    except (TypeError, ValueError) as exc:
        msg = f"snapshot header is not JSON-able: {exc}"
        raise SnapshotError(msg) from exc
    buf = io.BytesIO()
    np.savez(buf, **{_HEADER_KEY: np.frombuffer(header_bytes, dtype=np.uint8)}, **arrays)
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    return len(data)


def read_snapshot(path: str | Path) -> Snapshot:
    """Read and check a snapshot, raising on any problem (see :func:`load_snapshot` for the forgiving version).

    Raises:
        FileNotFoundError: no snapshot at ``path``.
        SnapshotError: truncated or corrupt archive (bad zip, CRC mismatch), missing or malformed header, another
            format or version, or an array whose key, shape or dtype disagrees with the header.
    """
    path = Path(path)
    data = path.read_bytes()
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            if _HEADER_KEY not in z.files:
                msg = f"snapshot {path} has no header"
                raise SnapshotError(msg)
            header = json.loads(z[_HEADER_KEY].tobytes().decode())
            if not isinstance(header, dict) or header.get("format") != SNAPSHOT_FORMAT:
                msg = f"snapshot {path} is not a {SNAPSHOT_FORMAT} file"
                raise SnapshotError(msg)
            if header.get("version") != SNAPSHOT_VERSION:
                msg = f"snapshot {path} has version {header.get('version')!r}; this agent reads {SNAPSHOT_VERSION}"
                raise SnapshotError(msg)
            stations: dict[str, StationState] = {}
            for entry in header["stations"]:
                arrays = {}
                for aname, d in entry["arrays"].items():
                    a = z[d["key"]]
                    if list(a.shape) != list(d["shape"]) or a.dtype.str != d["dtype"]:
                        msg = (
                            f"snapshot {path}: station {entry['name']!r} array {aname!r} is {a.dtype.str}{list(a.shape)},"
                            f" the header says {d['dtype']}{d['shape']}"
                        )
                        raise SnapshotError(msg)
                    arrays[aname] = a
                stations[str(entry["name"])] = StationState(arrays=arrays, meta=dict(entry["meta"]))
            return Snapshot(saved_s=float(header["saved_s"]), meta=dict(header["meta"]), stations=stations)
    except SnapshotError:
        raise
    except (zipfile.BadZipFile, ValueError, KeyError, TypeError, EOFError, OSError, UnicodeDecodeError) as exc:
        # zipfile raises BadZipFile on a CRC mismatch or truncation; np.load raises ValueError/OSError on garbage.
        msg = f"snapshot {path} is corrupt or truncated: {type(exc).__name__}: {exc}"
        raise SnapshotError(msg) from exc


def load_snapshot(path: str | Path, expect_meta: Mapping[str, Any] | None = None) -> Snapshot | None:
    """Load the snapshot for start-up; never raises for a bad file.

    Args:
        path: the snapshot file.
        expect_meta: fields that must match the header's ``meta`` (e.g. channel names, cadence_s, lookback);
            a mismatch means the windows do not fit the running model, so they are not restored.

    Returns:
        The snapshot, or None when there is none, it is unreadable (logged at ERROR and moved aside to
        ``<name>.corrupt``), or it does not match ``expect_meta`` (logged at WARNING).
    """
    path = Path(path)
    if not path.exists():
        log.info("no window-state snapshot at %s: starting with empty windows", path)
        return None
    try:
        snap = read_snapshot(path)
    except (SnapshotError, OSError) as exc:
        aside = path.with_name(path.name + ".corrupt")
        with contextlib.suppress(OSError):
            os.replace(path, aside)
        log.error("window-state snapshot unusable, starting with empty windows (moved to %s): %s", aside, exc)
        return None
    for key, want in (expect_meta or {}).items():
        got = snap.meta.get(key)
        if _jsonish(got) != _jsonish(want):
            log.warning(
                "window-state snapshot %s was written for %s=%r, the agent now runs %r: not restored", path, key, got, want
            )
            return None
    log.info("window-state snapshot %s restored: %d station(s), saved at %.0f", path, len(snap.stations), snap.saved_s)
    return snap


def _jsonish(v: Any) -> Any:
    """Normalise tuples to lists (JSON round trip) so expected meta compares equal to the stored one."""
    return json.loads(json.dumps(v, sort_keys=True, default=str))


class SnapshotScheduler:
    """Decides when to snapshot: every ``interval_s`` of monotonic time, and whenever :meth:`save_now` is called.

    The shell calls :meth:`maybe_save` from its tick (passing monotonic time) and :meth:`save_now` on shutdown.
    A failed write is logged and retried at the next tick; it never stops the agent.

    Args:
        path: the snapshot file.
        collect: returns ``(stations, meta)`` to store; called under the caller's thread (the agent's main loop).
        interval_s: seconds between periodic snapshots (monotonic).
        on_saved: called with the stored meta after each successful snapshot (the agent truncates its input journal
            there); an exception in it is logged, never raised.
    """

    def __init__(
        self,
        path: str | Path,
        collect: Callable[[], tuple[Mapping[str, StationState], Mapping[str, Any]]],
        interval_s: float = 60.0,
        on_saved: Callable[[Mapping[str, Any]], Any] | None = None,
    ) -> None:
        if interval_s <= 0:
            msg = f"snapshot interval_s must be positive, got {interval_s}"
            raise ValueError(msg)
        self.path = Path(path)
        self.collect = collect
        self.interval_s = float(interval_s)
        self.on_saved = on_saved
        self._last_mono: float | None = None
        self.saves = 0
        self.failures = 0

    def maybe_save(self, now_mono_s: float) -> bool:
        """Snapshot if ``interval_s`` has passed since the last one (or none was taken). Returns whether it saved."""
        if self._last_mono is not None and now_mono_s - self._last_mono < self.interval_s:
            return False
        self._last_mono = now_mono_s
        return self.save_now()

    def save_now(self) -> bool:
        """Snapshot now. Returns True on success; a failure is logged and counted, never raised."""
        try:
            stations, meta = self.collect()
            nbytes = save_snapshot(self.path, stations, meta)
        except (SnapshotError, OSError, ValueError) as exc:
            self.failures += 1
            log.error("window-state snapshot to %s failed (%d failures so far): %s", self.path, self.failures, exc)
            return False
        self.saves += 1
        log.debug("window-state snapshot %s: %d station(s), %d bytes", self.path, len(stations), nbytes)
        if self.on_saved is not None:
            try:
                self.on_saved(meta)
            except Exception as exc:  # the snapshot itself is good; a failed follow-up is retried next time
                log.error("after the window-state snapshot: %s", exc)
        return True


def replay_journal(core: Any, entries: Iterable[Any]) -> int:
    """Re-apply journaled core inputs after restoring a snapshot (see ``gapcast.edge.outbox`` and its journal).

    The core is pure and deterministic, so the same inputs with the same clock values rebuild the windows exactly.
    The outputs they produce are discarded: they were stored in the outbox in the same transaction as the journal
    entries the first time.

    Args:
        core: the agent core (``ingest(topic, payload, now_s, retained=...)`` and ``tick(now_s)``).
        entries: :class:`gapcast.edge.outbox.JournalEntry` items, oldest first.

    Returns:
        How many entries were replayed.
    """
    n = 0
    for e in entries:
        if e.op == "ingest":
            core.ingest(e.topic, e.payload, e.now_s, retained=e.retained)
        elif e.op == "tick":
            core.tick(e.now_s)
        else:
            log.warning("journal entry %d has unknown op %r: skipped", e.seq, e.op)
            continue
        n += 1
    if n:
        log.info("replayed %d journaled input(s) since the snapshot", n)
    return n


#: The lock file :func:`lock_state_dir` holds in ``agent.state_dir``.
LOCK_NAME = "agent.lock"


class StateDirLock:
    """An exclusive ``flock`` on ``<state_dir>/agent.lock``, held while the agent runs (see :func:`lock_state_dir`).

    The kernel drops the lock when the process exits, however it exits, so a stale lock file never blocks a restart.

    Attributes:
        path: the lock file.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        """Release the lock (idempotent)."""
        if self._fd is not None:
            import fcntl

            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> StateDirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_state_dir(state_dir: str | Path) -> StateDirLock:
    """Take the exclusive, non-blocking lock on an agent state folder (created if missing).

    Two agents sharing one ``agent.state_dir`` (the same ``edge.toml`` started twice) would share the outbox
    database and the window snapshots and, with the same client id, keep kicking each other off the broker. The
    second one therefore refuses to start.

    Args:
        state_dir: the agent's ``agent.state_dir``.

    Returns:
        The held lock; keep it referenced for the agent's lifetime (or call ``release``).

    Raises:
        ConfigError: another process holds the lock ("another gapcast agent is running with state_dir X (pid N)"),
            or the folder or lock file cannot be created.
    """
    import fcntl

    d = Path(state_dir)
    path = d / LOCK_NAME
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        msg = f"agent.state_dir: cannot create the lock file {path}: {exc}"
        raise ConfigError(msg) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        try:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
        finally:
            os.close(fd)
        msg = f"another gapcast agent is running with state_dir {d} (pid {holder}); stop it or give this one its own"
        raise ConfigError(msg) from exc
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return StateDirLock(path, fd)
