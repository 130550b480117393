"""Where the sink writes: SQLite (the state and default store), CSV files, InfluxDB 1.x.

The SQLite store is always there: it remembers the ids already stored (duplicates of QoS 1's at-least-once delivery
are dropped and counted) and holds the tidy tables, so it decides which rows a message really changes (a filled
value never overwrites a revised one). The other targets get exactly those rows, inside the SQLite transaction: if
a target refuses the write, the transaction is rolled back and nothing is acknowledged to the broker, which delivers
the messages again.

Tables (SQLite; ``ts``, ``origin``: seconds since the epoch, UTC)::

    series    (station, channel, ts) -> value, status (observed | filled | revised), model_version, rank, unit, msg_id
    forecasts (station, origin, ts) -> lead, "values" (JSON channel -> value), issued (RFC 3339), method,
                                        model_version, msg_id
    units     channel -> unit          (the payloads' units, newest wins)
    seen      id -> received_s          ids stored in the last ``dedup_window_s`` (older duplicates still cannot
                                        overwrite a revision: the rank rule holds without them)

InfluxDB (1.x, HTTP ``/write``, precision seconds): measurement ``gapcast_series`` with tags ``station``,
``channel`` and fields ``value``, ``status``, ``model_version``; ``gapcast_forecast`` with tags ``station``,
``lead`` and one field per channel plus ``origin``, ``issued``, ``method``, ``model_version``. A point with the
same measurement, tags and time overwrites the earlier one, so a revision replaces its steps there too.

Sources: SQLite UPSERT (https://sqlite.org/lang_upsert.html); InfluxDB 1.x line protocol and ``/write``
(https://docs.influxdata.com/influxdb/v1/write_protocols/line_protocol_reference/).
"""

from __future__ import annotations

import base64
import csv
import json
import logging
import os
import sqlite3
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

from gapcast.sink import SinkError
from gapcast.sink.rows import Decoded, ForecastRow, ValueRow
from gapcast.timefmt import format_rfc3339

__all__ = ["CsvStore", "InfluxStore", "SQLiteStore", "Target", "open_target"]

log = logging.getLogger(__name__)


class Target(Protocol):
    """A secondary target: gets the rows the SQLite store accepted, before the SQLite commit."""

    name: str

    def write(self, values: list[ValueRow], forecasts: list[ForecastRow]) -> None:
        """Write the rows durably (raise :class:`SinkError` when the target refuses)."""
        ...

    def close(self) -> None: ...


class SQLiteStore:
    """The sink's state and tidy store.

    Args:
        path: the database file (created with its folder).
        dedup_window_s: how long stored ids are remembered, seconds.
        synchronous: SQLite ``PRAGMA synchronous`` (``FULL``: a commit survives power loss; ``NORMAL``: a crash of
            the process).

    Raises:
        SinkError: the database cannot be opened.
    """

    name = "sqlite"

    def __init__(self, path: str | Path, *, dedup_window_s: float = 7 * 86400.0, synchronous: str = "FULL") -> None:
        self.path = Path(path)
        self.dedup_window_s = float(dedup_window_s)
        self.counters: Counter = Counter()
        self._batches = 0
        self._units_seen: dict[str, dict[str, str]] = {}  # bounded by the stations served
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(str(self.path), isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            self.db.executescript(
                """
                CREATE TABLE IF NOT EXISTS series (
                  station TEXT NOT NULL, channel TEXT NOT NULL, ts INTEGER NOT NULL, value REAL NOT NULL,
                  status TEXT NOT NULL, model_version INTEGER NOT NULL, rank INTEGER NOT NULL, unit TEXT NOT NULL,
                  msg_id TEXT NOT NULL, PRIMARY KEY (station, channel, ts)) WITHOUT ROWID;
                CREATE TABLE IF NOT EXISTS forecasts (
                  station TEXT NOT NULL, origin INTEGER NOT NULL, ts INTEGER NOT NULL, lead INTEGER NOT NULL,
                  "values" TEXT NOT NULL, issued TEXT NOT NULL, method TEXT NOT NULL, model_version INTEGER NOT NULL,
                  msg_id TEXT NOT NULL, PRIMARY KEY (station, origin, ts)) WITHOUT ROWID;
                CREATE TABLE IF NOT EXISTS units (channel TEXT PRIMARY KEY, unit TEXT NOT NULL);
                CREATE TABLE IF NOT EXISTS seen (id TEXT PRIMARY KEY, received_s REAL NOT NULL);
                CREATE INDEX IF NOT EXISTS seen_received ON seen (received_s);
                """
            )
        except sqlite3.Error as exc:
            msg = f"cannot open the sink database {self.path}: {exc}"
            raise SinkError(msg) from exc

    def apply(self, batch: list[Decoded], now_s: float, targets: list[Target] = ()) -> dict[str, int]:
        """Store a batch in ONE transaction; the other ``targets`` write the accepted rows before the commit.

        Args:
            batch: decoded messages, in arrival order.
            now_s: wall-clock time, seconds since the epoch (stamps ids for the dedup window).
            targets: secondary targets (InfluxDB, CSV).

        Returns:
            Counts of this batch: ``messages`` stored, ``duplicates`` dropped, ``values`` and ``forecasts`` written,
            ``superseded`` (filled values not written because a revision of the step is stored).

        Raises:
            SinkError: SQLite or a target failed; nothing of the batch is stored (the caller does not ack).
        """
        counts: Counter = Counter()
        values: list[ValueRow] = []
        forecasts: list[ForecastRow] = []
        db = self.db
        try:
            db.execute("BEGIN IMMEDIATE")
            for d in batch:
                if db.execute("INSERT OR IGNORE INTO seen VALUES (?, ?)", (d.msg_id, now_s)).rowcount == 0:
                    counts["duplicates"] += 1
                    continue
                counts["messages"] += 1
                rows = d.values
                if d.kind == "filled" and rows:
                    revised = {
                        r[0]
                        for r in db.execute(
                            "SELECT channel FROM series WHERE station = ? AND ts = ? AND rank >= 2",
                            (d.station, rows[0].ts),
                        )
                    }
                    if revised:
                        counts["superseded"] += sum(1 for r in rows if r.channel in revised)
                        rows = [r for r in rows if r.channel not in revised]
                if rows:
                    db.executemany(
                        "INSERT INTO series VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (station, channel, ts)"
                        " DO UPDATE SET value = excluded.value, status = excluded.status,"
                        " model_version = excluded.model_version, rank = excluded.rank, unit = excluded.unit,"
                        " msg_id = excluded.msg_id WHERE excluded.rank >= series.rank",
                        [(*r, d.msg_id) for r in rows],
                    )
                    values += rows
                if d.forecasts:
                    db.executemany(
                        "INSERT OR REPLACE INTO forecasts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [(f.station, f.origin, f.ts, f.lead, json.dumps(f.values, separators=(",", ":")), f.issued,
                          f.method, f.model_version, d.msg_id) for f in d.forecasts],
                    )
                    forecasts += d.forecasts
                    if d.units != self._units_seen.get(d.station):
                        db.executemany("INSERT OR REPLACE INTO units VALUES (?, ?)", list(d.units.items()))
                        self._units_seen[d.station] = d.units
            for t in targets:
                if values or forecasts:
                    t.write(values, forecasts)
            self._batches += 1
            if self._batches % 200 == 0:
                n = db.execute("DELETE FROM seen WHERE received_s < ?", (now_s - self.dedup_window_s,)).rowcount
                if n:
                    log.info("forgot %d stored id(s) older than the dedup window (%.0f s)", n, self.dedup_window_s)
            db.execute("COMMIT")
        except (sqlite3.Error, SinkError) as exc:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            if isinstance(exc, SinkError):
                raise
            msg = f"sink database write failed: {exc}"
            raise SinkError(msg) from exc
        counts["values"] = len(values)
        counts["forecasts"] = len(forecasts)
        self.counters.update(counts)
        return dict(counts)

    def close(self) -> None:
        self.db.close()


class CsvStore:
    """Appends the accepted rows to ``DIR/series.csv`` and ``DIR/forecasts.csv`` (RFC 3339 times, a header when new).

    An append-only log: when a revision supersedes a step, its rows come later in the file; the LAST row of a
    (station, channel, ts) is the current value (``status`` says which kind it is).
    """

    name = "csv"
    SERIES = ("station", "channel", "ts", "value", "status", "model_version", "unit")
    FORECASTS = ("station", "origin", "issued", "channel", "ts", "lead", "value", "method", "model_version")

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._files = {n: self._open(n, h) for n, h in (("series", self.SERIES), ("forecasts", self.FORECASTS))}
        except OSError as exc:
            msg = f"cannot write CSV files in {self.folder}: {exc}"
            raise SinkError(msg) from exc

    def _open(self, name: str, header: tuple[str, ...]):
        path = self.folder / f"{name}.csv"
        new = not path.exists() or path.stat().st_size == 0
        f = open(path, "a", newline="", encoding="utf-8")  # noqa: SIM115 - kept open for the sink's life
        if new:
            csv.writer(f).writerow(header)
        return f

    def write(self, values: list[ValueRow], forecasts: list[ForecastRow]) -> None:
        try:
            if values:
                csv.writer(self._files["series"]).writerows(
                    (r.station, r.channel, format_rfc3339(r.ts), repr(r.value), r.status, r.model_version, r.unit)
                    for r in values
                )
            if forecasts:
                csv.writer(self._files["forecasts"]).writerows(
                    (f.station, format_rfc3339(f.origin), f.issued, c, format_rfc3339(f.ts), f.lead, repr(float(v)),
                     f.method, f.model_version)
                    for f in forecasts
                    for c, v in f.values.items()
                )
            for f in self._files.values():
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            msg = f"CSV write in {self.folder} failed: {exc}"
            raise SinkError(msg) from exc

    def close(self) -> None:
        for f in self._files.values():
            f.close()


def _tag(s: str) -> str:
    return s.replace("\\", "\\\\").replace(",", "\\,").replace("=", "\\=").replace(" ", "\\ ")


def _str_field(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def series_lines(values: list[ValueRow]) -> list[str]:
    """InfluxDB line protocol of series rows (precision seconds)."""
    return [
        f"gapcast_series,station={_tag(r.station)},channel={_tag(r.channel)} value={r.value!r},"
        f"status={_str_field(r.status)},model_version={r.model_version}i {r.ts}"
        for r in values
    ]


def forecast_lines(forecasts: list[ForecastRow]) -> list[str]:
    """InfluxDB line protocol of forecast steps (precision seconds): one point per (station, lead, ts), a field per
    channel."""
    out = []
    for f in forecasts:
        fields = ",".join(f"{_tag(c)}={float(v)!r}" for c, v in f.values.items())
        out.append(
            f"gapcast_forecast,station={_tag(f.station)},lead={f.lead} {fields},origin={f.origin}i,"
            f"issued={_str_field(f.issued)},method={_str_field(f.method)},model_version={f.model_version}i {f.ts}"
        )
    return out


class InfluxStore:
    """InfluxDB 1.x through its HTTP API (``POST /write``, line protocol, precision seconds), with urllib.

    Args:
        url: ``influxdb://[user[:password]@]host[:port]/database`` (``influxdbs://`` for HTTPS); port 8086.
        timeout_s: per request, seconds.
        create: ``CREATE DATABASE`` at start (idempotent in InfluxDB 1.x).
        lines_per_request: the most points per ``/write`` (InfluxDB suggests 5,000 - 10,000).

    Raises:
        SinkError: a bad URL, or the server refuses or cannot be reached.
    """

    name = "influxdb"

    def __init__(self, url: str, *, timeout_s: float = 10.0, create: bool = True, lines_per_request: int = 5000) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("influxdb", "influxdbs") or not parts.hostname or not parts.path.strip("/"):
            msg = f"InfluxDB target {url!r} must be influxdb://[user:password@]host[:port]/database"
            raise SinkError(msg)
        self.db = unquote(parts.path.strip("/"))
        self.base = f"{'https' if parts.scheme == 'influxdbs' else 'http'}://{parts.hostname}:{parts.port or 8086}"
        self.timeout_s = timeout_s
        self.lines_per_request = lines_per_request
        self._headers = {}
        if parts.username:
            token = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            self._headers["Authorization"] = "Basic " + base64.b64encode(token).decode()
        if create:
            self.query(f'CREATE DATABASE "{self.db}"', post=True)

    def _request(self, path: str, params: dict[str, str], body: bytes | None) -> bytes:
        url = f"{self.base}{path}?{urllib.parse.urlencode(params)}"
        req = urllib.request.Request(url, data=body, headers=self._headers, method="POST" if body is not None else "GET")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:300].decode(errors="replace")
            msg = f"InfluxDB {self.base} refused {path}: HTTP {exc.code} {detail}"
            raise SinkError(msg) from exc
        except (urllib.error.URLError, OSError) as exc:
            msg = f"InfluxDB {self.base} cannot be reached: {getattr(exc, 'reason', exc)}"
            raise SinkError(msg) from exc

    def query(self, q: str, *, post: bool = False) -> dict:
        """Run an InfluxQL query (``/query``) on the database; the parsed JSON answer."""
        import json

        params = {"q": q, "db": self.db, "epoch": "s"}
        return json.loads(self._request("/query", params, b"" if post else None) or b"{}")

    def write(self, values: list[ValueRow], forecasts: list[ForecastRow]) -> None:
        lines = series_lines(values) + forecast_lines(forecasts)
        for i in range(0, len(lines), self.lines_per_request):
            body = "\n".join(lines[i : i + self.lines_per_request]).encode()
            self._request("/write", {"db": self.db, "precision": "s"}, body)

    def close(self) -> None:
        """Nothing to release (one HTTP request per write)."""


def open_target(spec: str) -> SQLiteStore | CsvStore | InfluxStore:
    """A target from ``--to``: ``sqlite:///path.db`` (or ``sqlite:relative.db``), ``csv:DIR``,
    ``influxdb://host:8086/db``.

    Raises:
        SinkError: an unknown scheme or a target that cannot be opened.
    """
    if spec.startswith("sqlite:"):
        path = spec[len("sqlite:") :]
        path = path[2:] if path.startswith("//") else path  # sqlite:///abs -> /abs; sqlite:rel.db -> rel.db
        if not path:
            raise SinkError(f"SQLite target {spec!r} names no file (sqlite:///path/to/sink.db)")
        return SQLiteStore(path)
    if spec.startswith("csv:"):
        folder = spec[len("csv:") :]
        folder = folder[2:] if folder.startswith("//") else folder
        if not folder:
            raise SinkError(f"CSV target {spec!r} names no folder (csv:DIR)")
        return CsvStore(folder)
    if spec.startswith(("influxdb://", "influxdbs://")):
        return InfluxStore(spec)
    msg = f"unknown target {spec!r}: use sqlite:///path.db, influxdb://host:8086/db or csv:DIR"
    raise SinkError(msg)
