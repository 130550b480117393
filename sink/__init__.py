"""``gapcast sink``: the reference subscriber. Filled, revision and forecast messages into a tidy time-series store.

- :mod:`gapcast.sink.rows`: pure: a validated message -> the rows it writes (no I/O);
- :mod:`gapcast.sink.stores`: SQLite (the state: seen ids, the series and forecasts; the default target), CSV
  files and InfluxDB 1.x (HTTP ``/write`` line protocol);
- :mod:`gapcast.sink.client`: the MQTT shell (persistent session, QoS 1, acks only after the write);
- :mod:`gapcast.sink.cli`: the command.
"""

from __future__ import annotations

from gapcast import GapcastError

__all__ = ["SinkError"]


class SinkError(GapcastError):
    """The sink cannot do what was asked: a bad target URL, an unreachable or refusing store (the message says)."""
