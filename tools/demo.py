"""``gapcast demo``: the whole system on real data, end to end, in one command (``make demo``).

(Over 600 lines on purpose: the demo's stages are one ordered script; processes and the report
live in tools/demo_procs.py and tools/demo_report.py.)

Stages, each a real ``gapcast`` sub-command run as a subprocess (so the demo exercises exactly what users run):

1. ``train``     ConFill on the Beijing training months within a CPU time budget (progress bar);
2. ``evaluate``  the evaluation table on the test months of the demo stations;
3. ``keys``      an Ed25519 signing key pair;
4. ``export``    the signed bundle (fp32 + int8);
5. ``verify``    the bundle's signature and hashes (:func:`gapcast.edge.bundle.verify_bundle`), fp32 + int8 present;
6. ``broker``    a private Mosquitto on a free port (:class:`gapcast.tools.localbroker.LocalBroker`);
7. ``agent``     ``gapcast edge check`` on a generated ``edge.toml``, then ``gapcast edge run`` with the bundle and
                 the best backend available (it must be a model backend, not the interpolation fallback);
8. ``replay``    ``gapcast replay`` of a slice of the test months of the demo stations, with their real outages
                 plus one injected 24 h and one injected 72 h outage of all pollutants per station, while a
                 subscriber collects every filled, revision, forecast, status and dead-letter message;
9. ``score``     real-time fill MAE on the injected outages (agent vs linear interpolation vs LOCF, the same hidden
                 values, original units), forecast MAE vs seasonal naive, step-to-forecast latency p50/p99;
                 one printed table, the same as JSON, and a PNG figure.

Everything started is stopped on success, failure, Ctrl-C or SIGTERM (process groups, ``try``/``finally``); the exit
code is non-zero when any stage failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gapcast import GapcastError
from gapcast.tools.demo_procs import GATEWAY, Proc, agent_toml, gapcast_argv
from gapcast.tools.demo_report import (
    POLLUTANTS,
    PREFIX,
    Collector,
    DemoError,
    format_table,
    injected_outages,
    plot_figure,
    score_run,
)

__all__ = [
    "STAGES",
    "Collector",
    "DemoError",
    "DemoOptions",
    "format_table",
    "injected_outages",
    "plot_figure",
    "register",
    "run_demo",
    "score_run",
]

log = logging.getLogger(__name__)

#: The demo's stages, in order.
STAGES = ("train", "evaluate", "keys", "export", "verify", "broker", "agent", "replay", "score")


class _Terminated(Exception):
    """SIGTERM arrived (treated like Ctrl-C: stop everything, exit non-zero)."""


@dataclass(frozen=True)
class DemoOptions:
    """What the demo runs.

    Attributes:
        out: output folder (run, keys, bundle, logs, summary, figure).
        data: data root (None: ``$GAPCAST_DATA``, then the cache).
        train_minutes: training time budget, minutes of CPU wall time.
        train_config: training TOML (None: the packaged ``beijing.toml``).
        stations: how many stations to replay (the first N of the data folder, sorted), >= 1.
        days: length of the replayed slice of the test months, days.
        start: first replayed step, ISO 8601 (None: the start of the test months).
        speed: replay speed, simulated seconds per wall second (0: as fast as possible).
        late_share, out_of_order_share: shares of late and out-of-order readings in the replay.
        eval_windows: at most this many test windows per station in ``gapcast evaluate``.
        drain_timeout_s: after the replay, how long to wait for the agent's last messages, seconds.
        seed: seed for the replay's late/out-of-order choice.
        bundle: an existing signed bundle: skips train, evaluate, keys and export (they are reported as skipped).
        trusted_key: the public key that bundle's signature verifies under (required with ``bundle``).
        quick: small export samples (calibration, parity, accuracy gate) and no CPU INT8 variant: for tests, not
            for figures.
        dashboard: ``HOST:PORT``: serve the live dashboard from the broker stage on, print its URL, and after the
            run keep the broker, the agent and the page up until Ctrl-C; empty: off.
    """

    out: Path = Path("demo-out")
    data: str | None = None
    train_minutes: float = 5.0
    train_config: str | None = None
    stations: int = 3
    days: float = 30.0
    start: str | None = None
    speed: float = 72_000.0
    late_share: float = 0.01
    out_of_order_share: float = 0.01
    eval_windows: int = 40
    drain_timeout_s: float = 60.0
    seed: int = 0
    bundle: str | None = None
    trusted_key: str | None = None
    quick: bool = False
    dashboard: str = ""  # HOST:PORT: serve the live dashboard (gapcast.edge.dashboard) and keep it up until Ctrl-C


@dataclass
class StageResult:
    """One stage's outcome: ``ok`` None = not run."""

    name: str
    ok: bool | None = None
    seconds: float = 0.0
    detail: str = ""
    log: str | None = None


# --------------------------------------------------------------------------------------------------- the demo


class _Demo:
    """One run of the demo: its stages, the processes it started, and what it measured."""

    def __init__(self, opts: DemoOptions) -> None:
        self.o = opts
        self.out = Path(opts.out).resolve()
        self.logs = self.out / "logs"
        self.stages: list[StageResult] = []
        self.procs: list[Proc] = []
        self.broker = None
        self.dashboard = None  # (server, stop) of the live dashboard, with --dashboard
        self.collector: Collector | None = None
        self.summary: dict[str, Any] = {}
        self.artifacts: dict[str, str] = {}
        self.plan = None  # the ReplayPlan that was published (set by the replay stage)
        self.outs: list[tuple[str, int, int]] = []  # the injected outages
        self.replay_journal: list[dict] = []
        self.env = dict(os.environ)
        if opts.data:
            self.env["GAPCAST_DATA"] = str(Path(opts.data).resolve())

    # -- stage plumbing
    @contextlib.contextmanager
    def stage(self, name: str):
        """Time a stage and record its outcome; any exception (Ctrl-C included) marks it failed and propagates."""
        r = StageResult(name)
        self.stages.append(r)
        t0 = time.monotonic()
        print(f"\n[demo] {name} ...", flush=True)
        try:
            yield r
        except BaseException as exc:
            r.ok = False
            first = str(exc).splitlines()[0] if str(exc) else ""
            r.detail = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
            raise
        else:
            r.ok = True
        finally:
            r.seconds = time.monotonic() - t0
            print(f"[demo] {name}: {'ok' if r.ok else 'FAILED'} in {r.seconds:.1f} s  {r.detail}", flush=True)

    def run_cmd(self, r: StageResult, name: str, argv: list[str], timeout_s: float, *, show: bool = False) -> None:
        log_path = None if show else self.logs / f"{name}.log"
        p = Proc(name, argv, log_path, env=self.env)
        self.procs.append(p)
        rc = p.wait(timeout_s)
        p.stop()
        self.procs.remove(p)
        r.log = str(log_path) if log_path else None
        if rc != 0:
            tail = p.tail()
            msg = f"`gapcast {' '.join(argv[3:])}` exited with {rc}" + (f"; log {log_path}:\n{tail}" if tail else "")
            raise DemoError(msg)

    # -- the stages
    def run(self) -> int:
        """Run every stage, then write and print the summary and the table.

        Returns:
            0 when every stage ran and passed, else 1. A stage's failure (GapcastError, OSError, ValueError, a
            failed sub-process), Ctrl-C and SIGTERM are caught here: the run stops, everything it started is
            stopped, and the report says which stage failed.
        """
        t_start = time.monotonic()
        self.out.mkdir(parents=True, exist_ok=True)
        # A re-run starts fresh: an old window snapshot, outbox or broker session would replay stale state into
        # this run. The signing keys are kept (a release key is never thrown away).
        owned = ("agent-state", "broker", "logs") + (() if self.o.bundle else ("run", "bundle"))
        for name in owned:
            shutil.rmtree(self.out / name, ignore_errors=True)
        self.logs.mkdir(exist_ok=True)
        ok = True
        try:
            self._run_stages()
            self._hold_dashboard()
        except KeyboardInterrupt:
            ok = False
            print("\n[demo] interrupted: stopping everything it started", file=sys.stderr)
        except _Terminated:
            ok = False
            print("\n[demo] SIGTERM: stopping everything it started", file=sys.stderr)
        except (GapcastError, OSError, ValueError, subprocess.SubprocessError) as exc:
            ok = False
            print(f"\n[demo] stopped: {exc}", file=sys.stderr)
        finally:
            self._cleanup()
        return self._report(ok, t_start)

    def _run_stages(self) -> None:
        """The stages in order: build (or take --bundle), verify, broker, agent, replay, score.

        Raises:
            DemoError: a stage failed (``--bundle`` without ``--trusted-key``, an agent that runs the interpolation
                fallback, a failed sub-command); other GapcastError / OSError from the stages.
        """
        run_dir, keys_dir, bundle = self.out / "run", self.out / "keys", self.out / "bundle"
        stations = self._stations()
        if self.o.bundle:
            if not self.o.trusted_key:
                raise DemoError("--bundle needs --trusted-key (the public key its signature verifies under)")
            bundle, pub = Path(self.o.bundle).resolve(), Path(self.o.trusted_key).resolve()
            for n in ("train", "evaluate", "keys", "export"):
                self.stages.append(StageResult(n, ok=True, detail=f"skipped: --bundle {bundle}"))
        else:
            pub = keys_dir / "gapcast-signing.pub"
            self._build(run_dir, keys_dir, bundle, stations)
        with self.stage("verify") as r:
            card = self._verify(bundle, pub)
            toml = self.out / "edge.toml"
            r.detail = f"signature ok, variants {', '.join(sorted(card.variants))}"
        with self.stage("broker") as r:
            from gapcast.tools.localbroker import LocalBroker

            (self.out / "broker").mkdir(exist_ok=True)
            self.broker = LocalBroker(workdir=self.out / "broker").start()
            r.detail = self.broker.url
            agent_toml(toml, port=self.broker.port, stations=stations, bundle=bundle,
                        pubkey=pub, state=self.out / "agent-state")  # fmt: skip
            self.artifacts["agent_config"] = str(toml)
            if self.o.dashboard:
                self._start_dashboard()
        with self.stage("agent") as r:
            self.run_cmd(r, "edge-check", gapcast_argv("edge", "check", "--config", str(toml)), timeout_s=300)
            self.collector = Collector(self.broker.host, self.broker.port)
            agent = Proc("agent", gapcast_argv("-v", "edge", "run", "--config", str(toml)), self.logs / "agent.log", self.env)
            self.procs.append(agent)
            r.log = str(self.logs / "agent.log")
            backend = self.summary["backend"] = self._wait_online(agent, timeout_s=300)
            r.detail = f"online, backend {backend}"
            if backend.startswith("interpolation"):
                # A model bundle that no backend can run is a failure, not a demo of the model.
                msg = f"the agent runs the interpolation fallback, not the model: see {self.logs / 'agent.log'}"
                raise DemoError(msg)
        with self.stage("replay") as r:
            self._replay(r, stations, agent)
        with self.stage("score") as r:
            self._score(r, card)

    def _report(self, ok: bool, t_start: float) -> int:
        """Write ``demo-summary.json`` and ``demo-table.txt``, print the table and the artifacts; 0 when ``ok`` and
        every stage ran and passed, else 1. Raises OSError when the files cannot be written."""
        ok = ok and [s.name for s in self.stages] == list(STAGES) and all(s.ok for s in self.stages)
        self.summary.update(
            ok=ok,
            wall_s=time.monotonic() - t_start,
            stages=[asdict(s) for s in self.stages],
            options={k: str(v) if isinstance(v, Path) else v for k, v in asdict(self.o).items()},
            artifacts=self.artifacts,
        )
        names = {s.name for s in self.stages}
        for n in STAGES:
            if n not in names:
                self.summary["stages"].append(asdict(StageResult(n)))
        table = format_table(self.summary)
        js = self.out / "demo-summary.json"
        js.write_text(json.dumps(self.summary, indent=2, default=_json_default) + "\n")
        (self.out / "demo-table.txt").write_text(table + "\n")
        self.artifacts.update(summary_json=str(js), table=str(self.out / "demo-table.txt"))
        print("\n" + table)
        print("\nartifacts:")
        for k, v in {**self.artifacts, "logs": str(self.logs)}.items():
            print(f"  {k:<14} {v}")
        return 0 if ok else 1

    def _start_dashboard(self) -> None:
        from gapcast.edge.dashboard import DashboardServer, DashboardState, mqtt_feed

        state = DashboardState(PREFIX, max_steps=24 * 31)
        server = DashboardServer(state, self.o.dashboard).start()
        client = mqtt_feed(state, self.broker.url, client_id="gapcast-demo-dashboard")

        def stop() -> None:
            client.loop_stop()
            client.disconnect()
            server.stop()

        self.dashboard = (server, stop)
        self.artifacts["dashboard"] = server.url
        print(f"[demo] dashboard: {server.url}", flush=True)

    def _hold_dashboard(self) -> None:
        """With --dashboard: keep the broker, the agent and the page up until Ctrl-C (or SIGTERM)."""
        if self.dashboard is None:
            return
        print(f"\n[demo] dashboard: {self.dashboard[0].url}  (the agent and the broker stay up; Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(0.5)
        except (KeyboardInterrupt, _Terminated):
            print("\n[demo] stopping the dashboard, the agent and the broker", file=sys.stderr)

    def _build(self, run_dir: Path, keys_dir: Path, bundle: Path, stations: list[str]) -> None:
        """train -> evaluate -> keys -> export, each a ``gapcast`` sub-command."""
        with self.stage("train") as r:
            argv = gapcast_argv("train", "--out", str(run_dir), "--time-budget-min", f"{self.o.train_minutes:g}")
            if self.o.train_config:
                argv += ["--config", str(self.o.train_config)]
            self.run_cmd(r, "train", argv, timeout_s=self.o.train_minutes * 60 + 600, show=True)
            r.detail = f"{self.o.train_minutes:g} min budget -> {run_dir / 'best.pt'}"
            self.artifacts["run"] = str(run_dir)
        with self.stage("evaluate") as r:
            argv = gapcast_argv("evaluate", str(run_dir), "--stations", *stations,
                            "--max-windows", str(self.o.eval_windows))  # fmt: skip
            self.run_cmd(r, "evaluate", argv, timeout_s=900)
            r.detail = f"{run_dir / 'metrics.json'}"
            self.artifacts["evaluation"] = str(run_dir / "metrics.md")
            with contextlib.suppress(OSError):
                print((run_dir / "metrics.md").read_text())
        with self.stage("keys") as r:
            if not (keys_dir / "gapcast-signing.key").exists():
                self.run_cmd(r, "keys", gapcast_argv("keys", "generate", "--out", str(keys_dir)), timeout_s=120)
            r.detail = str(keys_dir)
            self.artifacts["keys"] = str(keys_dir)
        with self.stage("export") as r:
            argv = gapcast_argv("export", str(run_dir), "--out", str(bundle),
                            "--sign-key", str(keys_dir / "gapcast-signing.key"), "--overwrite")  # fmt: skip
            if self.o.quick:
                argv += ["--calib-windows", "16", "--parity-windows", "16", "--gate-windows", "64",
                         "--cpu-variant", "none"]  # fmt: skip
            self.run_cmd(r, "export", argv, timeout_s=900)
            with contextlib.suppress(OSError):
                print((self.logs / "export.log").read_text().strip())
            r.detail = str(bundle)
            self.artifacts["bundle"] = str(bundle)

    def _stations(self) -> list[str]:
        from gapcast.train.data import beijing_dir, list_beijing_stations, resolve_data_dir

        names = list_beijing_stations(beijing_dir(resolve_data_dir(self.o.data)))
        if self.o.stations < 1 or self.o.stations > len(names):
            msg = f"--stations must be 1..{len(names)}, got {self.o.stations}"
            raise DemoError(msg)
        return names[: self.o.stations]

    def _verify(self, bundle: Path, pub: Path):
        from gapcast.edge.bundle import verify_bundle

        b = verify_bundle(bundle, [str(pub)])
        missing = {"fp32"} - set(b.card.variants)
        if missing or not any("int8" in v for v in b.card.variants):
            msg = f"the bundle lacks a variant: has {sorted(b.card.variants)}, the demo needs fp32 and an int8 one"
            raise DemoError(msg)
        return b.card

    def _wait_online(self, agent: Proc, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            st = self.collector.latest_status()
            if st.get("state") == "online" and st.get("gateway") == GATEWAY:
                backend = st.get("backend")
                name = backend if isinstance(backend, str) else json.dumps(backend)
                # The agent's log line says more (provider, precision, variant) than the status' name.
                with contextlib.suppress(OSError):
                    for line in agent.log_path.read_text(errors="replace").splitlines():
                        if "inference backend: " in line:
                            name = line.split("inference backend: ", 1)[1].strip()
                return name
            if not agent.running():
                msg = f"the agent exited with {agent.proc.returncode} before going online:\n{agent.tail()}"
                raise DemoError(msg)
            time.sleep(0.1)
        msg = f"the agent did not publish an online status within {timeout_s:.0f} s:\n{agent.tail()}"
        raise DemoError(msg)

    def _plan(self, stations: list[str]):
        from gapcast.tools.replay import Outage, parse_time, plan_replay
        from gapcast.train.data import load_beijing, time_split

        series = load_beijing(self.o.data, stations)
        first = series[stations[0]]
        start_s = parse_time(self.o.start) if self.o.start else int(first.epoch_s[time_split(first.epoch_s).test.start])
        hours = int(round(self.o.days * 24))
        outs = injected_outages(stations, start_s, hours)
        outages = [Outage(s, t, float(h), POLLUTANTS) for s, t, h in outs]
        plan = plan_replay(
            series,
            start_s=start_s,
            end_s=start_s + hours * 3600,
            outages=outages,
            late_share=self.o.late_share,
            out_of_order_share=self.o.out_of_order_share,
            seed=self.o.seed,
        )
        return plan, outs

    def _replay(self, r: StageResult, stations: list[str], agent: Proc) -> None:
        from gapcast.tools.replay import format_ts

        plan, outs = self._plan(stations)
        self.plan, self.outs = plan, outs
        journal = self.out / "replay-journal.jsonl"
        rsum = self.out / "replay-summary.json"
        argv = gapcast_argv(
            "replay", "--broker", self.broker.url, "--stations", *stations,
            "--start", format_ts(plan.start_s), "--end", format_ts(plan.end_s), "--speed", f"{self.o.speed:g}",
            "--late-share", f"{self.o.late_share:g}", "--out-of-order-share", f"{self.o.out_of_order_share:g}",
            "--seed", str(self.o.seed), "--journal", str(journal), "--summary-json", str(rsum), "--no-progress",
        )  # fmt: skip
        for o in plan.outages:
            argv += ["--outage", o.spec()]
        if self.o.data:
            argv += ["--data", str(self.o.data)]
        self.run_cmd(r, "replay", argv, timeout_s=max(600.0, 3 * plan.counts()["messages"] * 0.01))
        rs = json.loads(rsum.read_text())
        self.summary["replay"] = rs
        self.artifacts["replay_journal"] = str(journal)
        if rs["counts"] != plan.counts():
            msg = f"the replay published another plan than the demo scores: {rs['counts']} vs {plan.counts()}"
            raise DemoError(msg)
        # Drain: the agent closes each station's last-but-one step when the last reading arrives.
        want = {s: {int(plan.epoch_s[s][-2])} for s in stations if len(plan.epoch_s[s]) > 1}
        deadline = time.monotonic() + self.o.drain_timeout_s
        while time.monotonic() < deadline:
            got = self.collector.filled_steps()
            if all(want[s] <= got.get(s, set()) for s in want) and time.monotonic() - self.collector.last_rx > 2.0:
                break
            if not agent.running():
                msg = f"the agent died during the replay (exit {agent.proc.returncode}):\n{agent.tail()}"
                raise DemoError(msg)
            time.sleep(0.2)
        else:
            log.warning("drain timeout: the agent's last steps did not all arrive within %.0f s", self.o.drain_timeout_s)
        self.replay_journal = [json.loads(x) for x in journal.read_text().splitlines()]
        r.detail = f"{rs['published']:,} readings in {rs['wall_s']:.1f} s"

    def _score(self, r: StageResult, card) -> None:
        st = self.collector.latest_status()
        counters = st.get("counters", {}) if isinstance(st.get("counters"), dict) else {}
        rejected = st.get("rejected", {})
        self.summary["io"] = {
            "readings_published": self.summary["replay"]["published"],
            "agent_readings": counters.get("readings"),
            "agent_rejected": sum(rejected.values()) if isinstance(rejected, dict) else rejected,
            "messages_out": self.collector.counts(),
        }
        self.summary["agent_status"] = st
        std = {c.name: c.std for c in card.channels}
        scores = score_run(self.plan, self.collector, self.replay_journal, channel_std=std, horizon=card.horizon)
        self.summary["scores"] = scores
        fig = self.out / "demo-figure.png"
        o72 = next(o for o in self.outs if o[2] == 72)
        plot_figure(fig, self.plan, self.collector, o72)
        self.artifacts["figure"] = str(fig)
        fill = scores["fill"]
        if "agent_realtime" not in fill or not scores["forecast"].get("forecasts_scored"):
            msg = f"nothing to score: fills {fill.get('coverage')}, forecasts {scores['forecast'].get('forecasts_scored')}"
            raise DemoError(msg)
        cov = fill["coverage"]
        r.detail = f"{cov['realtime']:,}/{cov['hidden_values']:,} hidden values filled in real time"

    def _cleanup(self) -> None:
        """Stop the dashboard, every child process group, the collector and the broker; each step is logged with
        its duration (DEBUG; WARNING past 5 s), so a slow exit says what it waited on."""

        def step(what: str, fn) -> None:
            t0 = time.monotonic()
            with contextlib.suppress(Exception):
                fn()
            took = time.monotonic() - t0
            log.log(logging.WARNING if took > 5.0 else logging.DEBUG, "exit: %s stopped in %.1f s", what, took)

        if self.dashboard is not None:
            step("the dashboard", self.dashboard[1])
            self.dashboard = None
        for p in reversed(self.procs):
            step(f"{p.name} (pid {p.proc.pid})", p.stop)
        self.procs.clear()
        if self.collector is not None:
            step("the collector", self.collector.close)
        if self.broker is not None:
            step("the broker", self.broker.stop)


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def run_demo(opts: DemoOptions) -> int:
    """Run the whole demo.

    SIGTERM is handled like Ctrl-C while it runs (everything started is stopped), and Ctrl-C (SIGINT) is handled
    even when the process inherited it ignored; the previous handlers are restored.

    Returns:
        0 when every stage passed, 1 otherwise.
    """

    def _on_term(signum, frame):
        raise _Terminated

    previous = previous_int = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_term)
        # Ctrl-C is set explicitly: a process started as a background job of a non-interactive shell (`make test &`,
        # a CI runner, nohup) inherits SIGINT *ignored*, and Python then installs no KeyboardInterrupt handler, so
        # the demo would never stop on SIGINT (and --dashboard would hold forever).
        previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
        if previous_int is signal.SIG_IGN:
            log.debug("SIGINT was inherited ignored; the demo handles it (Ctrl-C stops everything it started)")
    try:
        return _Demo(opts).run()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if previous_int is not None:
            signal.signal(signal.SIGINT, previous_int)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``gapcast demo``."""
    d = DemoOptions()
    p = subparsers.add_parser(
        "demo",
        help="the whole system on real data: train, evaluate, export, broker, agent, replay, scores",
        description=(
            "Train ConFill within a time budget, evaluate, sign and export the bundle, start a private Mosquitto and "
            "the edge agent, replay real stations with injected outages, and print fill/forecast accuracy against "
            "LOCF, linear interpolation and seasonal naive, with latency. Writes JSON and a PNG."
        ),
    )
    p.add_argument("--out", default=str(d.out), help=f"output folder (default {d.out})")
    p.add_argument("--data", help="data root holding beijing-multisite/ (default: $GAPCAST_DATA, then the cache)")
    p.add_argument("--train-minutes", type=float, default=d.train_minutes, help=f"training time budget, minutes (default {d.train_minutes:g})")
    p.add_argument("--train-config", help="training TOML (default: the packaged beijing.toml)")
    p.add_argument("--stations", type=int, default=d.stations, help=f"number of stations to replay (default {d.stations})")
    p.add_argument("--days", type=float, default=d.days, help=f"days of the test months to replay (default {d.days:g})")
    p.add_argument("--start", help="first replayed step, ISO 8601 (default: the start of the test months)")
    p.add_argument("--speed", type=float, default=d.speed, help=f"replay speed, simulated s per wall s (default {d.speed:g}; 0: as fast as possible)")
    p.add_argument("--late-share", type=float, default=d.late_share, help=f"share of late readings (default {d.late_share:g})")
    p.add_argument("--out-of-order-share", type=float, default=d.out_of_order_share, help=f"share of out-of-order readings (default {d.out_of_order_share:g})")
    p.add_argument("--eval-windows", type=int, default=d.eval_windows, help=f"test windows per station to evaluate (default {d.eval_windows})")
    p.add_argument("--bundle", help="use this signed bundle: skip train, evaluate, keys and export")
    p.add_argument("--trusted-key", help="public key the --bundle signature verifies under")
    p.add_argument("--quick", action="store_true", help="small export samples (tests; not for reported figures)")
    p.add_argument("--dashboard", nargs="?", const="127.0.0.1:8080", default="", metavar="HOST:PORT",
                   help="serve the live dashboard (default 127.0.0.1:8080), print its URL and keep everything up "
                        "after the run until Ctrl-C")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    opts = DemoOptions(
        out=Path(args.out),
        data=args.data,
        train_minutes=args.train_minutes,
        train_config=args.train_config,
        stations=args.stations,
        days=args.days,
        start=args.start,
        speed=args.speed,
        late_share=args.late_share,
        out_of_order_share=args.out_of_order_share,
        eval_windows=args.eval_windows,
        bundle=args.bundle,
        trusted_key=args.trusted_key,
        quick=args.quick,
        dashboard=args.dashboard,
    )
    return run_demo(opts)

