"""``gapcast bench agent``: how fast the gateway agent ingests, how soon it forecasts, how much memory it holds.

Everything runs on this machine through a private Mosquitto on loopback (:class:`gapcast.tools.localbroker.
LocalBroker`). For each station count N (100, 1,000 and 5,000 by default) the stations are real Beijing test-month
histories (the 10 stations, each reused with a different time offset and a new name), published by the replayer
(:func:`gapcast.tools.replay.replay`, QoS 1, as fast as the broker acknowledges):

1. raw ceiling: a bare paho-mqtt subscriber (MQTT 5, QoS 1) counts the stream of ``ingest`` readings; rate = readings
   / (last one received - publishing start);
2. agent: ``gapcast edge run`` (its own process, the bundle's default onnxruntime variant on the CPU) ingests the same
   stream; rate = readings / (the last step it must close published as ``filled`` - publishing start). Each reading
   closes its station's previous step, so this rate includes one window imputation + forecast per reading: the
   agent's real work, batched as it does it;
3. latency: then ``latency_steps`` more steps, one at a time for all N stations at once (how stations report at the
   top of the hour): step-close-to-forecast latency = forecast received - the closing reading published, p50/p99
   over stations and steps;
4. the agent's resident memory (psutil, sampled every 0.1 s): peak over the whole run.

Agent settings stated in the output: windows start empty, so ``max_missing_share = 1`` makes every closed step
forecast (inference costs the same whatever the window holds); SQLite outbox with ``synchronous = NORMAL``; window
snapshots off during the run; ``clock = readings`` (the replayed history is years old).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["AgentBenchOptions", "run_agent_bench", "synthetic_network"]

log = logging.getLogger(__name__)

PREFIX = "gapcast/v1"
GATEWAY = "bench-gw"
INGEST_RATIO_TARGET = 0.7
P99_TARGET_MS = 250.0
P99_TARGET_STATIONS = 1000
RSS_TARGET_MB = 300.0


@dataclass(frozen=True)
class AgentBenchOptions:
    """What the agent benchmark runs.

    Attributes:
        stations: station counts N.
        ingest_messages: readings in the ingest stream per N (rounded up to whole steps; at least 2 steps).
        latency_steps: paced steps for the latency figures.
        threads: onnxruntime threads of the agent.
        max_batch: the agent's ``model.max_batch`` (windows per backend call; its default is 256).
        step_timeout_s: give up waiting for a step's forecasts after this long, seconds.
        ingest_timeout_s: give up waiting for the agent to work through the ingest stream, seconds.
    """

    stations: tuple[int, ...] = (100, 1000, 5000)
    ingest_messages: int = 20_000
    latency_steps: int = 3
    threads: int = 2
    max_batch: int = 256
    step_timeout_s: float = 120.0
    ingest_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if not self.stations or min(self.stations) < 1 or self.latency_steps < 1 or self.ingest_messages < 1:
            msg = "stations, latency_steps and ingest_messages must be >= 1"
            raise ValueError(msg)


def _default_split(first):
    from gapcast.train.loader import split_indices
    from gapcast.train.spec import load_spec

    return split_indices(load_spec("beijing"), first, check=False)


def synthetic_network(series: dict, n: int, steps: int, spec=None) -> dict:
    """N stations from the real ones: station k replays real station ``k % len(series)`` of the test months, shifted
    by ``(k // len(series)) * 25`` hours (wrapping around inside the test months) so that stations sharing a source
    do not send identical values.

    Args:
        series: the real stations (``load_beijing``).
        n: stations wanted.
        steps: hourly steps per station.

    Returns:
        name -> :class:`gapcast.train.data.StationSeries` on one common time axis.

    Raises:
        ValueError: when the test months are too short for the shifts.
    """
    from gapcast.train.data import StationSeries
    from gapcast.train.loader import split_indices

    names = sorted(series)
    first = series[names[0]]
    sp = split_indices(spec, first, check=False) if spec is not None else _default_split(first)
    t0 = sp.test.start
    epoch = first.epoch_s[t0 : t0 + steps]
    out = {}
    for k in range(n):
        src = series[names[k % len(names)]]
        off = t0 + (k // len(names)) * 25 % max(1, sp.test.stop - t0 - steps)
        vals = src.values[off : off + steps]
        if len(vals) < steps:
            msg = f"not enough test-month history for {steps} steps at offset {off}"
            raise ValueError(msg)
        out[f"{names[k % len(names)]}-{k:05d}"] = StationSeries(
            station=f"{names[k % len(names)]}-{k:05d}", epoch_s=epoch, values=vals, observed=~np.isnan(vals),
            channels=src.channels)
    return out


class _Counter:
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


class _RssSampler:
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


def _agent_toml(path: Path, *, port: int, bundle: Path, trusted: str, state: Path, n: int, threads: int,
                max_batch: int) -> None:
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
max_stations = {n}

[model]
bundle = {json.dumps(str(bundle))}
trusted_keys = [{json.dumps(trusted)}]
backend = "auto"
threads = {threads}
max_batch = {max_batch}

[input]
lateness_s = 3600.0

[agent]
clock = "readings"
max_missing_share = 1.0
tick_interval_s = 0.2
status_interval_s = 1.0
state_dir = {json.dumps(str(state))}
snapshot_interval_s = 86400.0

[outbox]
kind = "sqlite"
synchronous = "NORMAL"
rate_per_s = 1000000.0
burst = 1000000
""")


def _wait(cond, timeout_s: float, poll_s: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(poll_s)
    return bool(cond())


def _publish_step(client, readings, sent: dict[str, float]) -> None:
    from gapcast.tools.replay import format_ts, readings_topic

    for r in readings:
        payload = json.dumps({"ts": format_ts(r.ts), "values": r.values}, separators=(",", ":")).encode()
        sent[r.station] = time.monotonic()
        client.publish(readings_topic(PREFIX, r.station), payload, qos=1)


def _one_count(n: int, series: dict, bundle: Path, trusted: str, opts: AgentBenchOptions, work: Path,
               progress: bool, spec=None) -> dict[str, Any]:
    import paho.mqtt.client as mqtt

    from gapcast.tools.demo import Collector
    from gapcast.tools.localbroker import LocalBroker
    from gapcast.tools.replay import ReplayOptions, plan_replay, replay

    ingest_steps = max(2, math.ceil(opts.ingest_messages / n))
    total_steps = ingest_steps + opts.latency_steps + 1
    net = synthetic_network(series, n, total_steps, spec)
    epoch = next(iter(net.values())).epoch_s
    cadence = int(epoch[1] - epoch[0])
    plan = plan_replay(net, start_s=int(epoch[0]), end_s=int(epoch[ingest_steps]))
    m = len(plan.readings)
    res: dict[str, Any] = {"stations": n, "ingest_steps": ingest_steps, "ingest_readings": m}
    ropts = ReplayOptions(speed=0.0, qos=1, prefix=PREFIX, max_inflight=1000, drain_timeout_s=120.0)
    say = print if progress else log.info

    # A fresh broker and agent state every time: a persistent session or a window snapshot left by an earlier run
    # would make the agent treat the stream as duplicates.
    for stale in (work / f"broker-{n}", work / f"state-{n}"):
        shutil.rmtree(stale, ignore_errors=True)
    bdir = work / f"broker-{n}"
    bdir.mkdir(parents=True)
    broker = LocalBroker(workdir=bdir)
    broker.start()
    agent = None
    sampler = None
    collector = None
    try:
        # 1. raw ceiling
        raw = _Counter(broker.host, broker.port)
        t0 = time.monotonic()
        summary = replay(plan, broker.url, ropts, progress=False)
        _wait(lambda: raw.count >= m, 60.0)
        raw.close()
        raw_rate = raw.count / max(raw.last_rx - t0, 1e-9)
        res["raw"] = {"received": raw.count, "seconds": round(raw.last_rx - t0, 3), "rate_per_s": raw_rate,
                      "publisher_rate_per_s": summary.rate_per_s}
        say(f"  N={n}: raw subscriber {raw.count:,} readings at {raw_rate:,.0f}/s")

        # 2. the agent on the same stream
        toml = work / f"edge-{n}.toml"
        _agent_toml(toml, port=broker.port, bundle=bundle, trusted=trusted, state=work / f"state-{n}", n=n,
                    threads=opts.threads, max_batch=opts.max_batch)
        log_path = work / f"agent-{n}.log"
        with open(log_path, "w") as logf:
            agent = subprocess.Popen([sys.executable, "-m", "gapcast.cli", "edge", "run", "--config", str(toml)],
                                     stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        sampler = _RssSampler(agent.pid)
        collector = Collector(broker.host, broker.port, PREFIX)
        if not _wait(lambda: collector.latest_status().get("state") == "online" or agent.poll() is not None, 120):
            msg = "the agent did not come online within 120 s"
            raise RuntimeError(msg)
        if agent.poll() is not None:
            msg = f"the agent exited with code {agent.returncode}: {log_path.read_text()[-800:]}"
            raise RuntimeError(msg)
        status0 = collector.latest_status()
        res["agent_backend"] = status0.get("backend")
        res["rss_idle_mb"] = sampler.last_mb
        # Every step from a station's first reading to the step before its last one closes (a silent step too).
        first: dict[str, int] = {}
        last: dict[str, int] = {}
        for r in plan.readings:
            first[r.station] = min(first.get(r.station, r.ts), r.ts)
            last[r.station] = max(last.get(r.station, r.ts), r.ts)
        want_filled = sum((last[s] - first[s]) // cadence for s in first)
        t0 = time.monotonic()
        replay(plan, broker.url, ropts, progress=False)
        ok = _wait(lambda: collector.counts()["filled"] >= want_filled, opts.ingest_timeout_s, 0.01)
        times = sorted(t for t, _ in list(collector.filled))  # the collector's lists only grow (paho thread)
        done = times[min(want_filled, len(times)) - 1] if times else time.monotonic()
        agent_rate = m / max(done - t0, 1e-9)
        res["agent"] = {"filled_expected": want_filled, "filled_received": len(times), "complete": ok,
                        "seconds": round(done - t0, 3), "rate_per_s": agent_rate}
        res["ingest_ratio"] = agent_rate / raw_rate if raw_rate else None
        say(f"  N={n}: agent {agent_rate:,.0f} readings/s ({res['ingest_ratio']:.2f} of raw)"
            + ("" if ok else " INCOMPLETE"))

        # 3. latency: one step at a time for all stations
        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{os.getpid()}",
                          protocol=mqtt.MQTTv5)
        pub.max_inflight_messages_set(2000)
        pub.max_queued_messages_set(0)
        pub.connect(broker.host, broker.port, keepalive=30)
        pub.loop_start()
        lat: list[float] = []
        missing = 0
        for k in range(opts.latency_steps):
            step = ingest_steps + k
            step_plan = plan_replay(net, start_s=int(epoch[step]), end_s=int(epoch[step]) + cadence)
            closing = {r.station for r in step_plan.readings}
            origin = int(epoch[step - 1])
            pos = [len(collector.forecasts)]
            arrived: dict[str, float] = {}
            sent: dict[str, float] = {}
            _publish_step(pub, step_plan.readings, sent)

            def got(pos=pos, arrived=arrived, origin=origin, closing=closing):
                new = collector.forecasts[pos[0] :]  # the collector's list only grows (paho thread appends)
                pos[0] += len(new)
                for t, b in new:  # each forecast parsed once
                    if b["station"] in closing and _origin(b) == origin:
                        arrived.setdefault(b["station"], t)
                return len(arrived) >= len(closing)

            _wait(got, opts.step_timeout_s, 0.02)
            missing += len(closing) - len(arrived)
            lat += [(t - sent[s]) * 1e3 for s, t in arrived.items()]
        pub.disconnect()
        pub.loop_stop()
        a = np.asarray(lat) if lat else np.zeros(0)
        res["latency_ms"] = {"n": len(lat), "missing": missing,
                             **({"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)),
                                 "max": float(a.max())} if lat else {})}
        if lat:
            say(f"  N={n}: step-to-forecast p50 {res['latency_ms']['p50']:.0f} ms, p99 {res['latency_ms']['p99']:.0f} ms")
        status = collector.latest_status()
        res["agent_counters"] = status.get("counters", {})
        res["agent_rejected"] = status.get("rejected", {})
    finally:
        if sampler is not None:
            sampler.stop()
            res["rss_peak_mb"] = sampler.peak_mb
            res["rss_last_mb"] = sampler.last_mb
        if agent is not None and agent.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(agent.pid, signal.SIGTERM)
            try:
                agent.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(agent.pid, signal.SIGKILL)
                agent.wait(timeout=10)
        if collector is not None:
            collector.close()
        broker.close()
    return res


def _origin(body: dict) -> int:
    from gapcast.tools.replay import parse_time

    return int(parse_time(body["origin"]))


def run_agent_bench(
    bundle_path: str | os.PathLike,
    *,
    trusted_key: str | None = None,
    data=None,
    options: AgentBenchOptions | None = None,
    workdir: str | os.PathLike | None = None,
    bundle_note: str = "",
    progress: bool = True,
    dataset=None,
) -> dict[str, Any]:
    """Run the agent benchmark for every station count (``dataset``: spec or preset; default the bundle's own).

    Args:
        bundle_path: the signed bundle the agent serves.
        trusted_key: its public key (PEM path or 64 hex chars); None: the card's own ``public_key_hex``.
        data: data root (None: ``$GAPCAST_DATA`` / cache).
        options: :class:`AgentBenchOptions`.
        workdir: where configs, logs and broker files go (None: a temporary folder, removed afterwards).
        bundle_note: what the bundle is (real or tiny), written into the results.
        progress: print one line per phase.

    Returns:
        A JSON-ready dict: protocol, per-N results, targets.

    Raises:
        GapcastError: no data, a bundle without a key, a broker that does not start.
    """
    from gapcast.edge import BundleError
    from gapcast.train.evaluate import spec_of_run
    from gapcast.train.loader import load_dataset

    opts = options or AgentBenchOptions()
    bundle = Path(bundle_path)
    if trusted_key is None:
        card = json.loads((bundle / "card.json").read_text())
        trusted_key = (card.get("signature") or {}).get("public_key_hex")
        if not trusted_key:
            msg = f"{bundle} is unsigned; the agent refuses unsigned bundles (export it with --sign-key)"
            raise BundleError(msg)
    card_raw = json.loads((bundle / "card.json").read_text()) if (bundle / "card.json").is_file() else {}
    spec = spec_of_run({"dataset": card_raw.get("dataset")}, dataset)
    series = load_dataset(spec, data)
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="gapcast-bench-agent-")
        work = Path(tmp.name)
    else:
        work = Path(workdir)
        work.mkdir(parents=True, exist_ok=True)
    results = []

    def _on_term(signum, frame):  # SIGTERM (e.g. `timeout`): unwind so the agent and the broker are stopped
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _on_term) if threading.current_thread() is threading.main_thread() else None
    try:
        for n in opts.stations:
            try:
                results.append(_one_count(n, series, bundle.resolve(), trusted_key, opts, work, progress, spec))
            except Exception as exc:  # one station count failing must not lose the others' figures
                log.exception("agent bench at %d stations failed", n)
                results.append({"stations": n, "error": f"{type(exc).__name__}: {exc}"})
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if tmp is not None:
            tmp.cleanup()
    return {
        "benchmark": "agent",
        "protocol": __doc__.split("\n\n", 1)[1].replace("\n", " "),
        "bundle": str(bundle),
        "bundle_note": bundle_note,
        "options": asdict(opts),
        "results": results,
        "targets": agent_targets(results),
    }


def agent_targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's agent targets with the measured value and the margin (positive = met by that much)."""
    out = []
    for r in results:
        n = r["stations"]
        if r.get("ingest_ratio") is not None:
            v = r["ingest_ratio"]
            out.append({"target": f"agent ingest >= {INGEST_RATIO_TARGET} of raw ({n} stations)", "measured": v,
                        "goal": INGEST_RATIO_TARGET, "met": v >= INGEST_RATIO_TARGET,
                        "margin": v - INGEST_RATIO_TARGET})
        p99 = r.get("latency_ms", {}).get("p99")
        if p99 is not None and n == P99_TARGET_STATIONS:
            out.append({"target": f"step-to-forecast p99 < {P99_TARGET_MS:.0f} ms ({n} stations)", "measured": p99,
                        "goal": P99_TARGET_MS, "met": p99 < P99_TARGET_MS, "margin": P99_TARGET_MS - p99})
        if r.get("rss_peak_mb") and n <= P99_TARGET_STATIONS:
            v = r["rss_peak_mb"]
            out.append({"target": f"agent RSS < {RSS_TARGET_MB:.0f} MB ({n} stations)", "measured": v,
                        "goal": RSS_TARGET_MB, "met": v < RSS_TARGET_MB, "margin": RSS_TARGET_MB - v})
    return out
