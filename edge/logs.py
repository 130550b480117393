"""The gateway's log output: ``[log] format = "text" | "json"``, journald-friendly.

- Under journald (systemd sets ``JOURNAL_STREAM`` to the ``device:inode`` of the stream it reads, and stderr is that
  stream) a line carries no timestamp of its own (the journal stamps it) and starts with a ``<N>`` syslog priority
  prefix (``<3>`` error, ``<4>`` warning, ``<6>`` info, ``<7>`` debug; sd-daemon(3)), which journald strips and
  stores as the entry's priority: ``journalctl -u gapcast-edge -p warning`` shows only what needs a person.
- Elsewhere the text format is ``2026-12-02T15:04:05.123Z INFO gapcast.edge.mqtt: message`` (UTC).
- ``json`` writes one object per line: ``{"ts", "level", "logger", "message"}`` (``ts`` omitted under journald,
  ``exc`` with the traceback when there is one), for log shippers (Loki, Vector, Fluent Bit).

What the agent logs at which level: one INFO line per round ("closed 1,000 steps for 1,000 stations in 1.31 s, 12
imputed, 0 fallback"), the per-station step and revision lines at DEBUG on the ``gapcast.edge.steps`` logger
(``[log] steps = true`` shows them without turning on DEBUG for everything), WARNING and ERROR only for what a
person should look at (broker unreachable, a backend failure, a dropped backlog).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import IO

__all__ = ["FORMATS", "JournalTextFormatter", "JsonFormatter", "STEPS_LOGGER", "TextFormatter", "configure_logging", "under_journald"]

FORMATS = ("text", "json")
#: The logger of the per-station step lines (DEBUG).
STEPS_LOGGER = "gapcast.edge.steps"

#: syslog priorities (RFC 5424) of Python's levels.
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


def priority(levelno: int) -> int:
    """The syslog priority of a Python log level (levels in between round to the more severe one)."""
    for lvl in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if levelno >= lvl:
            return _PRIORITY[lvl]
    return 7


def under_journald(stream: IO | None = None, environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``stream`` (default stderr) is the journal's stream: ``JOURNAL_STREAM`` names its ``device:inode``.

    A child process that inherited ``JOURNAL_STREAM`` but writes elsewhere (a pipe, a file) is not under journald.
    """
    env = os.environ if environ is None else environ
    js = env.get("JOURNAL_STREAM", "")
    if not js:
        return False
    stream = sys.stderr if stream is None else stream
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    dev, _, ino = js.partition(":")
    return dev.isdigit() and ino.isdigit() and (int(dev), int(ino)) == (st.st_dev, st.st_ino)


def _utc(record: logging.LogRecord) -> str:
    t = time.gmtime(record.created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z"


class TextFormatter(logging.Formatter):
    """``2026-12-02T15:04:05.123Z INFO gapcast.edge.mqtt: message`` (UTC)."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_utc(record)} {record.levelname} {record.name}: {record.getMessage()}"
        return _with_exc(self, record, line)


class JournalTextFormatter(logging.Formatter):
    """``<6>gapcast.edge.mqtt: message``: no timestamp, a priority prefix on every line of a multi-line record."""

    def format(self, record: logging.LogRecord) -> str:
        line = _with_exc(self, record, f"{record.name}: {record.getMessage()}")
        p = f"<{priority(record.levelno)}>"
        return "\n".join(p + part for part in line.split("\n"))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (RFC 3339 UTC; omitted when ``journal``), ``level``, ``logger``,
    ``message``, ``exc`` (traceback) when present; under journald prefixed with ``<N>``.

    Args:
        journal: stderr is the journal's stream.
    """

    def __init__(self, journal: bool = False) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, str] = {}
        if not self.journal:
            obj["ts"] = _utc(record)
        obj.update(level=record.levelname, logger=record.name, message=record.getMessage())
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        line = json.dumps(obj, ensure_ascii=False)
        return f"<{priority(record.levelno)}>{line}" if self.journal else line


def _with_exc(fmt: logging.Formatter, record: logging.LogRecord, line: str) -> str:
    if record.exc_info:
        line += "\n" + fmt.formatException(record.exc_info)
    if record.stack_info:
        line += "\n" + fmt.formatStack(record.stack_info)
    return line


def configure_logging(
    fmt: str = "text",
    *,
    level: int = logging.INFO,
    steps: bool = False,
    stream: IO | None = None,
    environ: Mapping[str, str] | None = None,
) -> logging.Handler:
    """Replace the root logger's handlers with one that writes ``fmt`` to ``stream``.

    Args:
        fmt: ``text`` or ``json``.
        level: the root level (``logging.INFO`` for the agent).
        steps: also show the per-station step lines (the ``gapcast.edge.steps`` logger at DEBUG).
        stream: where to write (default stderr).
        environ: the environment, for ``JOURNAL_STREAM`` (default ``os.environ``).

    Returns:
        The installed handler.

    Raises:
        ValueError: an unknown ``fmt``.
    """
    if fmt not in FORMATS:
        msg = f"log format {fmt!r}: must be one of {', '.join(FORMATS)}"
        raise ValueError(msg)
    stream = sys.stderr if stream is None else stream
    journal = under_journald(stream, environ)
    handler = logging.StreamHandler(stream)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(journal=journal))
    else:
        handler.setFormatter(JournalTextFormatter() if journal else TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger(STEPS_LOGGER).setLevel(logging.DEBUG if steps else logging.NOTSET)
    return handler
