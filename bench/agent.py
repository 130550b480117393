"""``gapcast bench agent``: the gateway agent's own overhead against its backend, its latency, memory and CPU split.

(Over 600 lines on purpose: the six figures of one agent benchmark run on one broker and bundle;
the processes and harness live in bench/agent_harness.py.)

Everything runs on this machine through a private Mosquitto on loopback (:class:`gapcast.tools.localbroker.
LocalBroker`); the stations are real test-month histories of the bundle's dataset (each source station reused with a
time offset and a new name, :func:`synthetic_network`). The six figures of issue 17, in one run on one bundle:

1. backend ceiling: windows/s of the backend the agent runs (the same onnxruntime variant, pinned in the agent's
   config, the same threads), alone in this process, at the agent's batch size (``model.max_batch``), on real
   test-range windows with their real masks (:func:`gapcast.bench.runtime.load_bench_windows`); also the time of
   one batch of 1,000 windows run as the agent runs it (chunks of ``max_batch``);
2. step throughput: for each station count N, ``gapcast edge run`` (its own process) ingests whole-step readings as
   fast as the broker takes them (QoS 1); each reading closes its station's previous step; rate = station-steps /
   (the last forecast received by a subscriber - publishing start): reading in -> filled + forecast stored,
   published and acknowledged by the broker. Reported as a ratio to (1);
3. ingest without inference (at ``ingest_stations``): a fresh agent gets one message per channel per station for
   one step (as stations that publish one channel per message do); none closes a step. A sentinel station's
   reading for the next step ends the stream (one forecast); rate = messages / (that forecast received -
   publishing start), as a ratio to a bare paho subscriber (MQTT 5, QoS 1) counting the same stream;
4. latency (at ``latency_stations``): then ``latency_steps`` steps, one at a time, all stations at once (as they
   report at the top of the hour); the reading that closes a step -> its forecast at the subscriber, p50/p99;
5. memory: the agent's peak RSS at each N (psutil, every 0.1 s) and the slope in MiB per 1,000 stations; the
   window-state snapshot's write time and size at the largest N (written at shutdown, timed inside the agent);
6. CPU split: the agent runs with ``GAPCAST_PROFILE`` (:mod:`gapcast.edge.profile`, explicit per-stage timers):
   CPU seconds of parse / window / inference / encode / outbox / publish / other (main thread) and the network
   thread, per 1,000 station-steps, over phase (2) at the profile's station count.

Agent settings stated in the output: the default delivery guarantees (SQLite outbox, ``synchronous = FULL``,
readings acknowledged after their outputs are stored) with a 1 GiB cap (a round of 10,000 stations is ~60 MiB
of forecasts, over the 64 MiB default while the broker drains it); ``max_missing_share = 1`` (every closed step is forecast:
inference costs the same whatever the window holds); window snapshots only at shutdown; ``clock = readings``
(the replayed history is years old). The publisher and subscribers share the CPUs with the agent.
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

from gapcast.bench.agent_harness import (
    PREFIX,
    SENTINEL,
    Publisher,
    RawCounter,
    RssSampler,
    agent_toml,
    dump_profile,
    forecast_times,
    per_channel,
    readings_topic,
    wait_for,
    whole_step,
)

__all__ = ["AgentBenchOptions", "agent_targets", "run_agent_bench", "synthetic_network"]

log = logging.getLogger(__name__)

#: Targets of issue 17 (goal, and the station count each applies at).
STEP_RATIO_TARGET = 0.85
INGEST_RATIO_TARGET = 0.8
P99_SLACK_MS = 150.0
RSS_TARGET_MB = 200.0
TARGET_STATIONS = 1000
STAGES = ("parse", "window", "inference", "encode", "outbox", "publish", "other", "network_thread")


@dataclass(frozen=True)
class AgentBenchOptions:
    """What the agent benchmark runs.

    Attributes:
        stations: station counts N (throughput and memory at each).
        steps_readings: whole-step readings in the throughput stream per N (rounded up to whole steps, >= 2 steps).
        ingest_stations: N of the ingest-without-inference figure (one of ``stations``; 0: none).
        latency_stations: N of the latency figure (one of ``stations``; 0: none).
        profile_stations: N whose throughput phase gives the CPU split (one of ``stations``; 0: none).
        latency_steps: paced steps for the latency figures.
        threads: onnxruntime threads of the agent (and of the ceiling).
        max_batch: the agent's ``model.max_batch`` (windows per backend call).
        variant: onnxruntime variant: ``auto`` (timed here once at ``max_batch``, then pinned for every agent) or a name.
        ceiling_s: seconds the backend ceiling is timed.
        step_timeout_s: give up waiting for a step's forecasts after this long, seconds.
        stream_timeout_s: give up waiting for the agent to work through a stream, seconds.
    """

    stations: tuple[int, ...] = (100, 1000, 10000)
    steps_readings: int = 20_000
    ingest_stations: int = 1000
    latency_stations: int = 1000
    profile_stations: int = 1000
    latency_steps: int = 3
    threads: int = 2
    max_batch: int = 64
    variant: str = "auto"
    ceiling_s: float = 3.0
    step_timeout_s: float = 120.0
    stream_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if not self.stations or min(self.stations) < 1 or self.latency_steps < 1 or self.steps_readings < 1:
            msg = "stations, latency_steps and steps_readings must be >= 1"
            raise ValueError(msg)
        for name in ("ingest_stations", "latency_stations", "profile_stations"):
            v = getattr(self, name)
            if v and v not in self.stations:
                msg = f"{name} = {v} must be one of stations {self.stations} (or 0)"
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


def _one_count(n: int, series: dict, bundle: Path, trusted: str, variant: str, opts: AgentBenchOptions, work: Path,
               progress: bool, spec=None) -> dict[str, Any]:
    """Every figure at one station count N: (3) ingest against raw paho, (2) step throughput, (4) latency; memory
    and the CPU split along the way (see the module docstring). Each phase is a method of :class:`_CountRun`.

    Returns:
        The figures at N (``stations``, ``throughput_steps``, ``ingest``, ``throughput``, ``latency_ms``,
        ``rss_*``, ``agent_counters``, ``snapshot``; a phase not run at N is absent).

    Raises:
        RuntimeError: the agent did not come online within 180 s, or exited; what the broker's start raises.
    """
    do_ingest = n == opts.ingest_stations
    tp_steps = max(2, math.ceil(opts.steps_readings / n))
    total = 1 + tp_steps + (opts.latency_steps if n == opts.latency_stations else 0) + 1
    net = synthetic_network(series, n, total, spec)
    run = _CountRun(n, net, opts, work, print if progress else log.info)
    run.res["throughput_steps"] = tp_steps
    try:
        if do_ingest:  # 3a. the raw subscriber on the per-channel stream
            run.raw_ingest()
        run.start_agent(bundle, trusted, variant)
        first_tp = 0
        if do_ingest:  # 3b. the agent on the same stream
            run.agent_ingest()
            first_tp = 1
        run.throughput(first_tp, tp_steps, do_ingest)
        if n == opts.latency_stations:  # 4. one step at a time for all stations
            run.latency(first_tp + tp_steps - 1)
        run.res["agent_counters"] = run.collector.latest_status().get("counters", {})
    finally:
        run.close()
    return run.res


class _CountRun:
    """One station count's run: a private broker, the agent process and the clients that feed and watch it.

    ``res`` collects the figures; :meth:`close` stops everything this run started (always call it).
    """

    def __init__(self, n: int, net: dict, opts: AgentBenchOptions, work: Path, say) -> None:
        from gapcast.tools.localbroker import LocalBroker

        self.n, self.net, self.opts, self.work, self.say = n, net, opts, work, say
        self.res: dict[str, Any] = {"stations": n}
        self.sentinel = {SENTINEL: next(iter(net.values()))}
        for stale in (work / f"broker-{n}", work / f"state-{n}"):
            shutil.rmtree(stale, ignore_errors=True)
        bdir = work / f"broker-{n}"
        bdir.mkdir(parents=True)
        self.broker = LocalBroker(workdir=bdir)
        self.broker.start()
        self.agent = self.sampler = self.collector = self.pub = None
        self.prof_prefix = work / f"profile-{n}"
        for old in work.glob(f"profile-{n}.*"):
            old.unlink()
        self.dumps = 0
        self.stream: list[tuple[str, bytes]] = []
        self.raw_rate = 0.0
        self.raw_received = 0

    def _profile(self) -> dict[str, Any] | None:
        self.dumps += 1
        return dump_profile(self.agent, self.prof_prefix, self.dumps)

    def raw_ingest(self) -> None:
        """(3a) A bare paho subscriber's rate on the per-channel stream (the ceiling of (3)); raises RuntimeError
        when it cannot subscribe."""
        b = self.broker
        self.stream = whole_step(self.sentinel, 0) + per_channel(self.net, 0) + whole_step(self.sentinel, 1)
        raw = RawCounter(b.host, b.port)
        p = Publisher(b.host, b.port, "raw")
        t0 = time.monotonic()
        p.publish(self.stream)
        wait_for(lambda: raw.count >= len(self.stream), 60.0)
        raw.close()
        p.close()
        self.raw_rate = raw.count / max(raw.last_rx - t0, 1e-9)
        self.raw_received = raw.count
        self.res["ingest"] = {"messages": len(self.stream), "raw_received": raw.count, "raw_per_s": self.raw_rate}

    def start_agent(self, bundle: Path, trusted: str, variant: str) -> None:
        """Start ``gapcast edge run`` (profiled, RSS sampled), the collector and the publisher; wait until online.

        Raises:
            RuntimeError: not online within 180 s, or the agent exited (with its log's tail).
        """
        from gapcast.tools.demo import Collector

        n, opts, work, b = self.n, self.opts, self.work, self.broker
        toml = work / f"edge-{n}.toml"
        agent_toml(toml, port=b.port, bundle=bundle, trusted=trusted, state=work / f"state-{n}", n=n,
                   threads=opts.threads, max_batch=opts.max_batch, variant=variant)
        log_path = work / f"agent-{n}.log"
        env = {**os.environ, "GAPCAST_PROFILE": str(self.prof_prefix)}
        with open(log_path, "w") as logf:
            agent = self.agent = subprocess.Popen(
                [sys.executable, "-m", "gapcast.cli", "edge", "run", "--config", str(toml)],
                stdout=logf, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        self.sampler = RssSampler(agent.pid)
        collector = self.collector = Collector(b.host, b.port, PREFIX)
        if not wait_for(lambda: collector.latest_status().get("state") == "online" or agent.poll() is not None, 180):
            msg = "the agent did not come online within 180 s"
            raise RuntimeError(msg)
        if agent.poll() is not None:
            msg = f"the agent exited with code {agent.returncode}: {log_path.read_text()[-800:]}"
            raise RuntimeError(msg)
        self.res["agent_backend"] = collector.latest_status().get("backend")
        self.res["rss_idle_mib"] = self.sampler.last_mb
        self.pub = Publisher(b.host, b.port, "pub")

    def agent_ingest(self) -> None:
        """(3b) The agent on the raw phase's stream: messages / (the sentinel's forecast received - start)."""
        collector, stream = self.collector, self.stream
        t0 = time.monotonic()
        self.pub.publish(stream)
        ok = wait_for(lambda: any(b["station"] == SENTINEL for _, b in list(collector.forecasts)),
                      self.opts.stream_timeout_s)
        t_end = next((t for t, b in list(collector.forecasts) if b["station"] == SENTINEL), time.monotonic())
        rate = len(stream) / max(t_end - t0, 1e-9)
        ing = self.res["ingest"]
        ing.update({"agent_per_s": rate, "complete": ok, "ratio": rate / self.raw_rate if self.raw_rate else None})
        ing["profile"] = self._profile()
        self.say(f"  N={self.n}: ingest without inference: agent {rate:,.0f} msg/s, raw paho {self.raw_rate:,.0f} "
                 f"msg/s ({ing['ratio'] or 0:.2f}; raw received {self.raw_received:,} of {len(stream):,})"
                 + ("" if ok else " INCOMPLETE"))

    def throughput(self, first_tp: int, tp_steps: int, after_ingest: bool) -> None:
        """(2) Whole-step readings as fast as the broker takes them, each closing its station's previous step
        (after the ingest phase its open step closes too): station-steps / (the last forecast - start)."""
        n, collector = self.n, self.collector
        epoch = next(iter(self.net.values())).epoch_s
        # A reading at step k closes step k - 1: the forecasts' origins are the closed steps.
        closed = range(0, tp_steps) if after_ingest else range(0, tp_steps - 1)
        want_origins = {int(epoch[k]) for k in closed}
        msgs = [m for k in range(first_tp, first_tp + tp_steps) for m in whole_step(self.net, k)]
        closing = n * len(want_origins)
        seen: dict[str, float] = {}
        pos = [len(collector.forecasts)]
        t0 = time.monotonic()
        self.pub.publish(msgs)

        def done_tp() -> bool:
            forecast_times(collector, pos, seen, want_origins)
            return len(seen) >= closing

        ok = wait_for(done_tp, self.opts.stream_timeout_s, 0.02)
        t_end = max(seen.values()) if seen else time.monotonic()
        rate = len(seen) / max(t_end - t0, 1e-9)
        self.res["throughput"] = {"readings": len(msgs), "station_steps": closing, "received": len(seen),
                                  "complete": ok, "seconds": round(t_end - t0, 3), "steps_per_s": rate,
                                  "rss_mib_after": self.sampler.last_mb}
        self.say(f"  N={n}: {closing:,} station-steps at {rate:,.0f}/s" + ("" if ok else " INCOMPLETE"))
        if n == self.opts.profile_stations:
            self.res["throughput"]["profile"] = self._profile()

    def latency(self, last: int) -> None:
        """(4) ``latency_steps`` steps after step ``last``, one at a time, all stations at once: the reading that
        closes a step -> its forecast at the subscriber, p50 / p99 / max in ms."""
        n, collector, opts = self.n, self.collector, self.opts
        epoch = next(iter(self.net.values())).epoch_s
        lat: list[float] = []
        missing = 0
        for k in range(opts.latency_steps):
            step = last + 1 + k
            origin = int(epoch[step - 1])
            sent: dict[str, float] = {}
            got: dict[str, float] = {}
            pos = [len(collector.forecasts)]
            self.pub.publish(whole_step(self.net, step), sent)
            wait_for(lambda got=got, pos=pos, origin=origin: (
                forecast_times(collector, pos, got, {origin}), len(got) >= n)[1], opts.step_timeout_s, 0.02)
            missing += n - len(got)
            lat += [(t - sent[readings_topic(key.split("@")[0])]) * 1e3 for key, t in got.items()]
        a = np.asarray(lat) if lat else np.zeros(0)
        self.res["latency_ms"] = {"n": len(lat), "missing": missing,
                                  **({"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)),
                                      "max": float(a.max())} if lat else {})}
        if lat:
            self.say(f"  N={n}: step-to-forecast p50 {self.res['latency_ms']['p50']:.0f} ms, "
                     f"p99 {self.res['latency_ms']['p99']:.0f} ms")

    def close(self) -> None:
        """Stop the publisher, the sampler (peak RSS), the agent (SIGTERM, then SIGKILL after 60 s; its final
        snapshot figures), the collector and the broker."""
        res = self.res
        if self.pub is not None:
            self.pub.close()
        if self.sampler is not None:
            self.sampler.stop()
            res["rss_peak_mib"] = self.sampler.peak_mb
        agent = self.agent
        if agent is not None and agent.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(agent.pid, signal.SIGTERM)
            try:
                agent.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(agent.pid, signal.SIGKILL)
                agent.wait(timeout=10)
        final = self.prof_prefix.with_name(f"{self.prof_prefix.name}.final.json")
        if final.exists():
            snap = json.loads(final.read_text()).get("snapshot")
            if snap:
                res["snapshot"] = snap
        if self.collector is not None:
            self.collector.close()
        self.broker.close()


def measure_ceiling(bundle, *, threads: int, max_batch: int, variant: str, seconds: float, data=None,
                    dataset=None) -> dict[str, Any]:
    """The backend alone: windows/s at ``max_batch`` on real windows, and one batch of 1,000 as the agent runs it.

    Args:
        bundle: a verified :class:`gapcast.edge.bundle.Bundle`.
        threads: onnxruntime intra-op threads.
        max_batch: windows per call.
        variant: ``auto`` (the agent's own timed choice at ``max_batch``) or a variant name.
        seconds: how long the ceiling is timed.

    Returns:
        ``{"variant", "windows_per_s", "batch", "batch_ms", "batch_1000_ms", "windows"}``.

    Raises:
        BackendError: no onnxruntime variant runs.
    """
    from gapcast.bench.runtime import load_bench_windows
    from gapcast.edge.backends import select_backend
    from gapcast.edge.variant import variant_status

    backend = select_backend(bundle, prefer="onnxruntime", threads=threads, variant=variant, variant_batch=max_batch)
    chosen = (variant_status(backend) or {}).get("chosen") or variant
    w, where = load_bench_windows(bundle, max(1000, max_batch), data=data, dataset=dataset)
    v, o, c = (w[k].astype(np.float32) for k in ("values", "observed", "calendar"))
    sl = slice(0, max_batch)
    for _ in range(3):
        backend.run(v[sl], o[sl], c[sl])
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 5:
        t0 = time.perf_counter()
        backend.run(v[sl], o[sl], c[sl])
        times.append(time.perf_counter() - t0)
    med = float(np.median(times))
    t1000 = []
    for _ in range(3):
        t0 = time.perf_counter()
        for s in range(0, 1000, max_batch):
            backend.run(v[s : min(1000, s + max_batch)], o[s : min(1000, s + max_batch)], c[s : min(1000, s + max_batch)])
        t1000.append(time.perf_counter() - t0)
    backend.close()
    return {"variant": chosen, "windows_per_s": max_batch / med, "batch": max_batch, "batch_ms": med * 1e3,
            "batch_1000_ms": float(np.median(t1000)) * 1e3, "runs": len(times), "windows": where}


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
    """Run the agent benchmark (see the module docstring; ``dataset``: spec or preset, default the bundle's own).

    Args:
        bundle_path: the signed bundle the agent serves.
        trusted_key: its public key (PEM path or 64 hex chars); None: the card's own ``public_key_hex``.
        data: data root (None: ``$GAPCAST_DATA`` / cache).
        options: :class:`AgentBenchOptions`.
        workdir: where configs, logs and broker files go (None: a temporary folder, removed afterwards).
        bundle_note: what the bundle is (real or tiny), written into the results.
        progress: print one line per phase.

    Returns:
        A JSON-ready dict: the figures under plain keys (``backend_ceiling_windows_per_s``,
        ``step_throughput_ratio``, ``ingest_ratio``, ``latency_p99_ms``, ``rss_peak_mib``,
        ``rss_mib_per_1000_stations``, ``snapshot_write_s``, ``cpu_s_per_1000_steps``, ...), per-N results, targets.

    Raises:
        GapcastError: no data, a bundle without a key, a broker that does not start.
    """
    from gapcast.edge.bundle import verify_bundle
    from gapcast.train.evaluate import spec_of_run
    from gapcast.train.loader import load_dataset

    opts = options or AgentBenchOptions()
    bundle = Path(bundle_path)
    if trusted_key is None:
        trusted_key = _card_key(bundle)
    card_raw = json.loads((bundle / "card.json").read_text()) if (bundle / "card.json").is_file() else {}
    spec = spec_of_run({"dataset": card_raw.get("dataset")}, dataset)
    series = load_dataset(spec, data)
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="gapcast-bench-agent-")
        work = Path(tmp.name)
    else:
        work = Path(workdir).resolve()  # the agent resolves its state_dir against its config's folder
        work.mkdir(parents=True, exist_ok=True)
    say = print if progress else log.info
    verified = verify_bundle(bundle, [trusted_key], unpack_dir=work / "bundle-unpack")
    ceiling = measure_ceiling(verified, threads=opts.threads, max_batch=opts.max_batch, variant=opts.variant,
                              seconds=opts.ceiling_s, data=data, dataset=dataset)
    say(f"  backend ceiling: {ceiling['variant']} {ceiling['windows_per_s']:,.0f} windows/s at batch "
        f"{ceiling['batch']} ({ceiling['batch_ms']:.1f} ms); 1,000 windows {ceiling['batch_1000_ms']:.0f} ms")
    try:
        results = _every_count(series, bundle.resolve(), trusted_key, ceiling["variant"], opts, work, progress, spec)
    finally:
        if tmp is not None:
            tmp.cleanup()
    figures = summarize(ceiling, results)
    return {
        "benchmark": "agent",
        "protocol": __doc__.split("\n\n", 1)[1].replace("\n", " "),
        "bundle": str(bundle),
        "bundle_note": bundle_note,
        "options": asdict(opts),
        "cpus": os.cpu_count(),
        "backend_ceiling": ceiling,
        **figures,
        "results": results,
        "targets": agent_targets(figures),
    }


def _card_key(bundle: Path) -> str:
    """The public key (hex) the bundle's card was signed with.

    Raises:
        BundleError: the bundle is unsigned (the agent refuses unsigned bundles).
    """
    from gapcast.edge import BundleError

    card = json.loads((bundle / "card.json").read_text())
    key = (card.get("signature") or {}).get("public_key_hex")
    if not key:
        msg = f"{bundle} is unsigned; the agent refuses unsigned bundles (export it with --sign-key)"
        raise BundleError(msg)
    return key


def _every_count(series: dict, bundle: Path, trusted_key: str, variant: str, opts: AgentBenchOptions, work: Path,
                 progress: bool, spec) -> list[dict[str, Any]]:
    """:func:`_one_count` at each station count; a count that fails is logged and recorded with its ``error`` (the
    others' figures are kept). SIGTERM (e.g. ``timeout``) unwinds as KeyboardInterrupt, so the agent and the broker
    are stopped; the previous handler is restored."""
    results = []

    def _on_term(signum, frame):  # SIGTERM (e.g. `timeout`): unwind so the agent and the broker are stopped
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _on_term) if threading.current_thread() is threading.main_thread() else None
    try:
        for n in opts.stations:
            try:
                results.append(_one_count(n, series, bundle, trusted_key, variant, opts, work, progress, spec))
            except Exception as exc:  # one station count failing must not lose the others' figures
                log.exception("agent bench at %d stations failed", n)
                results.append({"stations": n, "error": f"{type(exc).__name__}: {exc}"})
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return results


def summarize(ceiling: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures under plain keys, from the ceiling and the per-N results (pure)."""
    ok = [r for r in results if "error" not in r]
    ceil = ceiling["windows_per_s"]
    out: dict[str, Any] = {
        "backend_ceiling_windows_per_s": ceil,
        "backend_batch": ceiling["batch"],
        "backend_batch_1000_ms": ceiling["batch_1000_ms"],
        "step_throughput_per_s": {str(r["stations"]): r["throughput"]["steps_per_s"] for r in ok if "throughput" in r},
    }
    out["step_throughput_ratio"] = {k: v / ceil for k, v in out["step_throughput_per_s"].items()}
    ing = next((r["ingest"] for r in ok if "ingest" in r), None)
    if ing is not None:
        out.update(ingest_ratio=ing.get("ratio"), ingest_agent_per_s=ing.get("agent_per_s"),
                   ingest_raw_per_s=ing["raw_per_s"], ingest_stations=next(r["stations"] for r in ok if "ingest" in r))
    lat = next(((r["stations"], r["latency_ms"]) for r in ok if r.get("latency_ms", {}).get("p99") is not None), None)
    if lat is not None:
        out.update(latency_stations=lat[0], latency_p50_ms=lat[1]["p50"], latency_p99_ms=lat[1]["p99"])
    rss = {r["stations"]: r["rss_peak_mib"] for r in ok if r.get("rss_peak_mib")}
    out["rss_peak_mib"] = {str(k): v for k, v in sorted(rss.items())}
    if len(rss) >= 2:
        ns = np.array(sorted(rss), dtype=float)
        slope = np.polyfit(ns, np.array([rss[int(k)] for k in ns]), 1)[0]
        out["rss_mib_per_1000_stations"] = float(slope * 1000)
    snap = next((r["snapshot"] for r in sorted(ok, key=lambda r: -r["stations"]) if r.get("snapshot")), None)
    if snap is not None:
        out.update(snapshot_write_s=snap["write_s"], snapshot_bytes=snap["bytes"], snapshot_stations=snap["stations"])
    prof = next(((r["stations"], r["throughput"]["profile"]) for r in ok
                 if (r.get("throughput") or {}).get("profile")), None)
    if prof is not None:
        steps = max(prof[1]["counters"]["filled"], 1)
        out["cpu_profile_stations"] = prof[0]
        out["cpu_profile_steps"] = prof[1]["counters"]["filled"]
        out["cpu_s_per_1000_steps"] = {k: prof[1]["cpu_s"][k] / steps * 1000 for k in STAGES}
        out["cpu_s_per_1000_steps"]["total"] = prof[1]["process_cpu_s"] / steps * 1000
    return out


def agent_targets(fig: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 17's targets with the measured value and the margin (positive = met by that much) (pure)."""
    out = []
    n = str(TARGET_STATIONS)

    def add(target, v, goal, higher_is_better):
        met = v >= goal if higher_is_better else v <= goal
        out.append({"target": target, "measured": v, "goal": goal, "met": bool(met),
                    "margin": (v - goal) if higher_is_better else (goal - v)})

    if n in fig.get("step_throughput_ratio", {}):
        add(f"step throughput >= {STEP_RATIO_TARGET} of the backend ceiling ({n} stations)",
            fig["step_throughput_ratio"][n], STEP_RATIO_TARGET, True)
    if fig.get("ingest_ratio") is not None:
        add(f"ingest without inference >= {INGEST_RATIO_TARGET} of raw paho ({fig['ingest_stations']} stations)",
            fig["ingest_ratio"], INGEST_RATIO_TARGET, True)
    if fig.get("latency_p99_ms") is not None:
        goal = fig["backend_batch_1000_ms"] + P99_SLACK_MS
        add(f"p99 step-to-forecast <= backend batch of 1,000 + {P99_SLACK_MS:.0f} ms ({fig['latency_stations']} "
            "stations)", fig["latency_p99_ms"], goal, False)
    if n in fig.get("rss_peak_mib", {}):
        add(f"peak RSS <= {RSS_TARGET_MB:.0f} MB ({n} stations)", fig["rss_peak_mib"][n] * 2**20 / 1e6,
            RSS_TARGET_MB, False)
    return out
