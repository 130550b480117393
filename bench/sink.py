"""``gapcast bench sink``: how many messages a second ``gapcast sink`` stores, and whether its memory stays flat.

Against a private Mosquitto, the sink runs as its own process (``python -m gapcast.cli sink``, SQLite target,
schema validation on unless asked) while one publisher sends, as fast as the broker takes them, the outputs of
``stations`` stations for ``steps`` steps: per station and step one filled message (13 Beijing channels) and one
24-step forecast, built with the agent's own builders (so the payloads are byte-for-byte what a gateway sends).

Figures: the ceiling = messages stored / seconds from the first publish to the last message stored (the sink's
``seen`` table); what 1,000 stations at a step every 10 s need (200 messages/s: 100 filled + 100 forecasts); the
sink's CPU seconds and its RSS sampled every 0.5 s (first quarter of the run against the end: flat or not).
"""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["run_sink_bench"]

CHANNELS = ("PM2.5", "PM10", "SO2", "NO2", "CO", "O3", "TEMP", "PRES", "DEWP", "RAIN", "WSPM", "wd_sin", "wd_cos")


def _payloads(stations: int, steps: int, horizon: int, t0: int = 1_483_228_800) -> list[tuple[str, bytes]]:
    from gapcast.edge.messages import Topics, filled_message, forecast_message

    topics = Topics("gapcast/v1", "gw-bench")
    rng = np.random.default_rng(0)
    units = dict.fromkeys(CHANNELS, "ug/m3")
    out = []
    for k in range(steps):
        ts = t0 + k * 3600
        for s in range(stations):
            name = f"st{s:05d}"
            v = np.round(rng.uniform(0, 100, len(CHANNELS)), 2)
            imp = rng.random(len(CHANNELS)) < 0.1
            m = filled_message(topics, name, ts, 3600, CHANNELS, v, imp, "model", 1, units=units)
            f = forecast_message(topics, name, ts, 3600, CHANNELS, np.tile(v, (horizon, 1)), 0.1, "model", 1, ts + 1,
                                 units=units)
            out += [(m.topic, m.payload), (f.topic, f.payload)]
    return out


def _seen(db: Path) -> int:
    try:
        con = sqlite3.connect(db, timeout=5)
        try:
            return con.execute("SELECT COUNT(*) FROM seen").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def run_sink_bench(*, stations: int = 1000, steps: int = 20, horizon: int = 24, validate: bool = True,
                   paced_s: float = 120.0, step_s: float = 10.0, workdir: str | Path | None = None,
                   timeout_s: float = 900.0) -> dict[str, Any]:
    """Run the benchmark once.

    Stages: the broker and the sink process (:func:`_start_sink`, :func:`_wait_subscribed`), the burst at full
    speed (:func:`_burst`), the paced phase (:func:`_paced`), then the figures.

    Args:
        stations, steps: the stream: ``2 * stations * steps`` messages.
        horizon: forecast steps per forecast message.
        validate: the sink checks each payload against its schema (its default).
        paced_s: then this long at the target pace (``stations`` stations, a step every ``step_s``), seconds, with
            the sink's RSS sampled: the memory figure (0: skip).
        step_s: the paced phase's step interval, seconds.
        workdir: where the broker and the database live (default: a temporary folder).
        timeout_s: give up waiting for the sink after this long, seconds.

    Returns:
        ``messages``, ``publish_s``, ``store_s``, ``ceiling_msg_per_s``, ``needed_msg_per_s`` (1,000 stations at
        10 s), ``stations_at_10s`` (what the ceiling carries), ``sink_cpu_s``, ``rss_mb`` samples summary.

    Raises:
        RuntimeError: the sink did not subscribe within 60 s.
    """
    import psutil

    from gapcast.tools.localbroker import LocalBroker

    tmp = tempfile.TemporaryDirectory(prefix="gapcast-bench-sink-") if workdir is None else None
    wd = Path(workdir or tmp.name)
    wd.mkdir(parents=True, exist_ok=True)
    msgs = _payloads(stations, steps, horizon)
    broker = LocalBroker(workdir=wd / "mosquitto")
    broker.workdir.mkdir(exist_ok=True)
    broker.start()
    db = wd / "sink.db"
    for p in (db, db.with_name("sink.db-wal"), db.with_name("sink.db-shm")):
        p.unlink(missing_ok=True)
    logf = open(wd / "sink.log", "wb")  # noqa: SIM115 - closed below
    sink = _start_sink(broker, db, validate, logf)
    res: dict[str, Any] = {"stations": stations, "steps": steps, "horizon": horizon, "channels": len(CHANNELS),
                           "validate": validate, "messages": len(msgs), "cpus": os.cpu_count()}
    try:
        _wait_subscribed(wd / "sink.log", sink)
        proc = psutil.Process(sink.pid)
        cpu0 = proc.cpu_times()
        rss = _RssLog(proc)
        pub = _publisher(broker)
        t0 = time.monotonic()
        t_pub, stored, store_s = _burst(pub, msgs, db, t0, timeout_s)
        n = len(msgs)
        q = [r for t, r in rss.samples if t <= t0 + store_s / 4] or [rss.samples[0][1]]
        paced = _paced(pub, db, rss, n, stations, steps, horizon, paced_s, step_s) if paced_s > 0 else {}
        res["paced"] = paced
        rss.stop()
        cpu1 = proc.cpu_times()
        pub.loop_stop()
        res.update(_figures(n, stored, t_pub - t0, store_s, cpu1, cpu0, paced, rss.samples, q, wd))
    finally:
        sink.terminate()
        try:
            sink.wait(20)
        except subprocess.TimeoutExpired:
            sink.kill()
            sink.wait(10)
        logf.close()
        broker.close()
        if tmp is not None:
            tmp.cleanup()
    return res


def _publisher(broker):
    """A paho publisher (MQTT 5, 1,000 in flight, no queue limit) connected to ``broker``, its loop running.

    Raises:
        OSError: the broker does not accept the connection.
    """
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    pub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.max_inflight_messages_set(1000)
    pub.max_queued_messages_set(0)
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    return pub


def _figures(n: int, stored: int, publish_s: float, store_s: float, cpu1, cpu0, paced: dict[str, Any],
             samples: list[tuple[float, float]], q: list[float], wd: Path) -> dict[str, Any]:
    """The burst's figures: stored / complete, times, the ceiling and what it carries at 10 s, the sink's CPU,
    its RSS summary and the database size. ``q``: the RSS samples of the burst's first quarter. Raises nothing."""
    ceiling = stored / store_s
    return dict(
        stored=stored, complete=stored == n, publish_s=round(publish_s, 2), store_s=round(store_s, 2),
        ceiling_msg_per_s=round(ceiling, 1), needed_msg_per_s=200.0,
        stations_at_10s=int(ceiling / 0.2), headroom=round(ceiling / 200.0, 2),
        sink_cpu_s=round((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system), 2),
        sink_cpu_per_msg_ms=round(1000 * ((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system))
                                  / max(stored + paced.get("stored", 0), 1), 3),
        rss_mb={"start": round(samples[0][1], 1), "first_quarter_max": round(max(q), 1),
                "end": round(samples[-1][1], 1), "max": round(max(r for _, r in samples), 1),
                "samples": len(samples)},
        db_mb=round(sum(p.stat().st_size for p in wd.glob("sink.db*")) / 2**20, 1),
    )


def _start_sink(broker, db: Path, validate: bool, logf) -> subprocess.Popen:
    """``gapcast sink`` into SQLite at ``db`` as its own process, output to ``logf``; raises OSError from Popen."""
    args = [sys.executable, "-m", "gapcast.cli", "sink", "--broker", broker.url, "--to", f"sqlite:///{db}",
            "--client-id", "bench-sink"] + ([] if validate else ["--no-validate"])
    return subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def _wait_subscribed(log_path: Path, sink: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """Wait until the sink logs that it subscribed.

    Raises:
        RuntimeError: it exited, or did not subscribe within ``timeout_s`` seconds (with the log's tail).
    """
    deadline = time.monotonic() + timeout_s
    while "sink subscribed" not in log_path.read_text(errors="replace"):
        if time.monotonic() > deadline or sink.poll() is not None:
            raise RuntimeError("sink did not subscribe: " + log_path.read_text()[-2000:])
        time.sleep(0.05)


class _RssLog:
    """The sink's RSS, ``(monotonic s, MiB)`` every 0.5 s on a daemon thread, from construction to :meth:`stop`."""

    def __init__(self, proc) -> None:
        self.samples: list[tuple[float, float]] = []
        self._proc = proc
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def _loop(self) -> None:  # the sampler thread
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), self._proc.memory_info().rss / 2**20))
            self._stop.wait(0.5)

    def stop(self) -> None:
        """Stop sampling (waits up to 2 s for the thread)."""
        self._stop.set()
        self._t.join(2)


def _burst(pub, msgs: list[tuple[str, bytes]], db: Path, t0: float, timeout_s: float) -> tuple[float, int, float]:
    """Publish every message at once (QoS 1) and wait until the sink stored them all or ``timeout_s`` passed.

    Returns:
        ``(t_pub, stored, store_s)``: when the broker had acknowledged the last one (monotonic s), the messages
        stored, and the seconds from ``t0`` to the last one stored. Raises nothing.
    """
    infos = [pub.publish(t, p, qos=1) for t, p in msgs]
    for i in infos:
        i.wait_for_publish(120)
    t_pub = time.monotonic()
    n = len(msgs)
    while _seen(db) < n and time.monotonic() - t0 < timeout_s:
        time.sleep(0.2)
    t_end = time.monotonic()
    return t_pub, _seen(db), t_end - t0


def _paced(pub, db: Path, rss: _RssLog, n: int, stations: int, steps: int, horizon: int, paced_s: float,
           step_s: float) -> dict[str, Any]:
    """The same stream again at the target pace (new ids: the next steps), one step of every station per
    ``step_s``, spread evenly, with the sink's RSS over it (it must not grow with time). ``n``: messages stored
    before. Returns the phase's figures; raises nothing."""
    more = _payloads(stations, int(math.ceil(paced_s / step_s)), horizon, t0=1_483_228_800 + steps * 3600)
    rate = 2 * stations / step_s
    mark = len(rss.samples)
    p0 = time.monotonic()
    for k, (t, p) in enumerate(more):
        due = p0 + k / rate
        if due > time.monotonic():
            time.sleep(due - time.monotonic())
        pub.publish(t, p, qos=1)
    p_end = time.monotonic()
    while _seen(db) < n + len(more) and time.monotonic() - p_end < 120:
        time.sleep(0.1)
    lag = time.monotonic() - p_end
    prss = [r for _, r in rss.samples[mark:]]
    quarter = max(1, len(prss) // 4)
    return {"messages": len(more), "rate_msg_per_s": rate, "seconds": round(p_end - p0, 1),
            "stored": _seen(db) - n, "lag_after_last_s": round(lag, 2),
            "rss_mb_first_quarter_mean": round(sum(prss[:quarter]) / quarter, 1),
            "rss_mb_last_quarter_mean": round(sum(prss[-quarter:]) / quarter, 1),
            "rss_mb_max": round(max(prss), 1), "samples": len(prss)}
