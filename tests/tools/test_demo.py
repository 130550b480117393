"""`gapcast demo`: outage placement and scoring (hand-computed), and a short end-to-end run (slow)."""

from __future__ import annotations

import json
import math
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from gapcast.tools.demo import POLLUTANTS, STAGES, DemoError, injected_outages, score_run
from gapcast.tools.replay import Outage, plan_replay
from gapcast.train.data import BEIJING_CHANNELS, StationSeries

T0 = 1_464_739_200  # 2016-06-01T00:00:00Z
NAMES = [c.name for c in BEIJING_CHANNELS]


def test_injected_outages_layout():
    # 30 days: 96 h of context, the 24 h outage, a 48 h gap, the 72 h outage; the second station 13 h later.
    assert injected_outages(["A", "B"], T0, 720) == [
        ("A", T0 + 96 * 3600, 24),
        ("A", T0 + 168 * 3600, 72),
        ("B", T0 + 109 * 3600, 24),
        ("B", T0 + 181 * 3600, 72),
    ]
    # 7 days: context, gap and tail shrink with the slice: margin 33 h, gap 16 h.
    assert injected_outages(["A"], T0, 168) == [("A", T0 + 33 * 3600, 24), ("A", T0 + 73 * 3600, 72)]
    with pytest.raises(DemoError, match=r"at least 146 h \(6.1 days\)"):
        injected_outages(["A"], T0, 100)


def _station(n: int) -> StationSeries:
    """PM2.5 rises 10 per hour (linear: interpolation is exact); the other channels are constant j."""
    values = np.tile(np.arange(len(NAMES), dtype=np.float32), (n, 1))
    values[:, 0] = 10.0 * np.arange(n)
    return StationSeries(
        station="A",
        epoch_s=T0 + 3600 * np.arange(n, dtype=np.int64),
        values=values,
        observed=np.ones_like(values, dtype=bool),
        channels=BEIJING_CHANNELS,
    )


def test_score_run_hand_computed():
    plan = plan_replay({"A": _station(48)}, outages=[Outage("A", T0 + 30 * 3600, 3.0, POLLUTANTS)])
    truth = plan.values["A"]
    filled, revisions = [], []
    for i in range(48):
        vals = {c: float(truth[i, j]) for j, c in enumerate(NAMES)}
        if 30 <= i < 33:
            vals.update({p: float(truth[i, j]) + 5.0 for j, p in enumerate(POLLUTANTS)})  # real time: off by 5
        filled.append((0.0, {"station": "A", "epoch_s": T0 + i * 3600, "values": vals}))
    steps = [
        {"epoch_s": T0 + i * 3600, "values": {p: float(truth[i, j]) - 1.0 for j, p in enumerate(POLLUTANTS)}}
        for i in range(30, 33)
    ]
    revisions.append((1.0, {"station": "A", "steps": steps}))  # after the gap: off by 1
    # One forecast from row 40 (4 steps): the agent is 2 off; seasonal naive repeats rows 17..20 (240 below on
    # PM2.5, exact on the constant channels).
    fc = [{"ts": f"2016-06-02T{17 + h}:00:00Z", "values": {p: float(truth[41 + h, j]) + 2.0 for j, p in enumerate(POLLUTANTS)}}
          for h in range(4)]
    journal = [{"station": "A", "ts": T0 + i * 3600, "sent_mono": 100.0 + i} for i in range(48)]
    forecasts = [(100.0 + 41 + 0.05, {"station": "A", "origin": "2016-06-02T16:00:00Z", "steps": fc, "method": "model"})]
    collector = SimpleNamespace(filled=filled, revisions=revisions, forecasts=forecasts, _lock=threading.Lock())
    std = dict.fromkeys(POLLUTANTS, 1.0) | {"PM2.5": 10.0}
    s = score_run(plan, collector, journal, channel_std=std, horizon=4)

    fill = s["fill"]
    assert fill["coverage"] == {"hidden_values": 18, "realtime": 18, "revision": 18}
    assert fill["agent_realtime"]["PM2.5"] == pytest.approx(5.0) and fill["agent_realtime"]["CO"] == pytest.approx(5.0)
    assert fill["agent_revision"]["O3"] == pytest.approx(1.0)
    assert fill["locf"]["PM2.5"] == pytest.approx((10 + 20 + 30) / 3) and fill["locf"]["SO2"] == pytest.approx(0.0)
    assert fill["linear"]["PM2.5"] == pytest.approx(0.0)
    # Overall: |error| / std pooled over the 18 hidden values (PM2.5 std 10, the rest 1).
    assert fill["agent_realtime"]["overall_norm"] == pytest.approx((3 * 0.5 + 15 * 5.0) / 18)
    assert fill["locf"]["overall_norm"] == pytest.approx((1 + 2 + 3) / 18)
    f = s["forecast"]
    assert f["forecasts_scored"] == 1 and f["by_method"] == {"model": 1}
    assert f["agent"]["NO2"] == pytest.approx(2.0) and f["seasonal_naive"]["PM2.5"] == pytest.approx(240.0)
    assert f["seasonal_naive"]["CO"] == pytest.approx(0.0)
    # Latency: the row-41 reading closed step 40; the forecast arrived 50 ms after it was published.
    assert s["latency_ms"]["n"] == 1 and s["latency_ms"]["p50"] == pytest.approx(50.0)
    # The last output (that forecast, at 141.05 s) came 5.95 s before the last reading went out (147 s).
    assert s["latency_ms"]["agent_done_after_last_reading_s"] == pytest.approx(141.05 - 147.0)


def test_score_run_neighbour_estimate_by_hand():
    """A's PM2.5 is t**2 (linear interpolation is off), B's is 2 t**2: the level ratio before the gap is exactly
    1/2, so the neighbour estimate of A's hidden steps is exact; the constant channels too (ratio 1)."""
    a, b = _station(48), _station(48)
    t = np.arange(48, dtype=np.float32)
    a.values[:, 0], b.values[:, 0] = t**2, 2 * t**2
    b.station = "B"
    plan = plan_replay({"A": a, "B": b}, outages=[Outage("A", T0 + 30 * 3600, 3.0, POLLUTANTS)])
    filled = [(0.0, {"station": s, "epoch_s": T0 + i * 3600, "values": {c: 0.0 for c in NAMES}})
              for s in ("A", "B") for i in range(48)]
    collector = SimpleNamespace(filled=filled, revisions=[], forecasts=[], _lock=threading.Lock())
    std = dict.fromkeys(POLLUTANTS, 1.0)
    fill = score_run(plan, collector, [], channel_std=std, horizon=4)["fill"]
    assert fill["neighbours"]["PM2.5"] == pytest.approx(0.0, abs=1e-3) and fill["neighbours"]["CO"] == pytest.approx(0.0)
    # linear interpolation between 29**2 and 33**2: off by (30-29)(33-30) = 3, 4, 3 at steps 30, 31, 32
    assert fill["linear"]["PM2.5"] == pytest.approx(10 / 3, rel=1e-4)
    from gapcast.tools.demo import format_table

    table = format_table({"stages": [], "ok": True, "wall_s": 1.0, "scores": {"fill": fill}})
    assert "neighbours (real time)" in table


@pytest.mark.slow
@pytest.mark.broker
def test_demo_end_to_end_short(tmp_path, data_root):
    """The whole pipeline with a tiny training budget: every stage passes and the summary holds real numbers."""
    from gapcast.tools.demo import DemoOptions, run_demo

    out = tmp_path / "demo"
    opts = DemoOptions(
        out=out,
        data=str(data_root),
        train_minutes=0.2,
        train_config=str(_tiny_config()),
        stations=1,
        days=7,
        speed=0.0,  # as fast as possible: the agent works through the backlog
        eval_windows=4,
        quick=True,
    )
    assert run_demo(opts) == 0
    s = json.loads((out / "demo-summary.json").read_text())
    assert s["ok"] is True
    assert [st["name"] for st in s["stages"]] == list(STAGES) and all(st["ok"] for st in s["stages"])
    assert not s["backend"].startswith("interpolation")
    # 7 days of one station: 168 readings; every step but the newest is closed and filled exactly once.
    io = s["io"]
    assert io["readings_published"] == io["agent_readings"] == 168 and io["agent_rejected"] == 0
    assert io["messages_out"]["filled"] == 167 and io["messages_out"]["revisions"] >= 2
    fill = s["scores"]["fill"]
    cov = fill["coverage"]
    assert cov["hidden_values"] == cov["realtime"] > 24 * 6  # both injected outages, every hidden value filled
    for key in ("agent_realtime", "agent_revision", "locf", "linear"):
        assert all(math.isfinite(fill[key][p]) and fill[key][p] >= 0 for p in POLLUTANTS), key
    fc = s["scores"]["forecast"]
    assert fc["forecasts_scored"] > 24 and math.isfinite(fc["agent"]["overall_norm"])
    lat = s["scores"]["latency_ms"]
    assert 0 < lat["p50"] <= lat["p99"]
    assert (out / "demo-figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "bundle" / "card.sig").is_file() and (out / "run" / "metrics.json").is_file()


def _tiny_config():
    from pathlib import Path

    import gapcast.train

    return Path(gapcast.train.__file__).parent / "configs" / "tiny.toml"


@pytest.mark.broker
def test_demo_failed_stage_exits_nonzero_and_starts_nothing_after(tmp_path, tiny_bundle, data_root):
    """A bundle signed by another key: verify fails, nothing later runs, the summary says so, exit code 1."""
    from gapcast.export.keys import generate_keypair
    from gapcast.tools.demo import DemoOptions, run_demo

    stranger = generate_keypair(tmp_path / "other-key")
    out = tmp_path / "demo"
    opts = DemoOptions(out=out, data=str(data_root), stations=1, days=7, bundle=str(tiny_bundle),
                       trusted_key=str(stranger.public))  # fmt: skip
    assert run_demo(opts) == 1
    s = json.loads((out / "demo-summary.json").read_text())
    by = {st["name"]: st for st in s["stages"]}
    assert s["ok"] is False and by["verify"]["ok"] is False and "does not verify" in by["verify"]["detail"]
    assert [by[n]["ok"] for n in ("broker", "agent", "replay", "score")] == [None] * 4
    assert not (out / "broker").exists()


def _sigint_ignored() -> None:
    """preexec_fn: start the demo with SIGINT inherited *ignored*, as a background job of a non-interactive shell
    (``make test &``, a CI runner, nohup) starts it. Python then installs no KeyboardInterrupt handler; the demo
    must set its own, or SIGINT never stops it (the cause of these tests' old timeouts in background runs)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _end(proc) -> None:
    """After a failed assertion: SIGTERM the demo (it stops every process group it started), SIGKILL it late."""
    import signal
    import subprocess

    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    proc.stdout.close()


@pytest.mark.broker
def test_demo_ctrl_c_stops_everything_it_started(tmp_path, tiny_bundle, signing_key, data_root):
    """SIGINT during the replay: exit non-zero, and no agent, replay or broker process is left."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    out = tmp_path / "demo"
    argv = [sys.executable, "-m", "gapcast.cli", "demo", "--out", str(out), "--data", str(data_root),
            "--bundle", str(tiny_bundle), "--trusted-key", str(signing_key.public),
            "--stations", "1", "--days", "7", "--speed", "1000"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=_sigint_ignored)
    journal = out / "replay-journal.jsonl"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and not (journal.exists() and journal.stat().st_size > 0):
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.2)
        assert journal.exists(), "the replay never started"
        os.kill(proc.pid, signal.SIGINT)
        text = proc.communicate(timeout=60)[0].decode()
    finally:
        _end(proc)
    assert proc.returncode == 1, text
    assert "interrupted: stopping everything it started" in text
    s = json.loads((out / "demo-summary.json").read_text())
    assert s["ok"] is False and {st["name"]: st["ok"] for st in s["stages"]}["replay"] is False
    left = [p.info for p in psutil.process_iter(["pid", "cmdline"]) if str(out) in " ".join(p.info["cmdline"] or [])]
    assert left == []


@pytest.mark.broker
def test_demo_dashboard_prints_the_url_and_stays_up_until_ctrl_c(tmp_path, tiny_bundle, signing_key, data_root):
    """--dashboard: the URL is printed, the page serves the replayed station after the run, Ctrl-C ends it all."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "demo"
    argv = [sys.executable, "-m", "gapcast.cli", "demo", "--out", str(out), "--data", str(data_root),
            "--bundle", str(tiny_bundle), "--trusted-key", str(signing_key.public),
            "--stations", "1", "--days", "7", "--speed", "0", "--dashboard", f"127.0.0.1:{port}"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, text=True,
                            preexec_fn=_sigint_ignored)
    lines: list[str] = []
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "".join(lines)
            lines.append(line)
            if "Ctrl-C to stop" in line:
                break
        assert f"dashboard: http://127.0.0.1:{port}/" in "".join(lines), "".join(lines)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/state", timeout=5) as r:
            state = json.loads(r.read())
        (station,) = state["stations"].values()
        assert station["filled"] == 167  # 7 days of one station: 168 readings, every step but the newest closed
        assert proc.poll() is None  # still up after the run
        os.kill(proc.pid, signal.SIGINT)
        text = proc.communicate(timeout=60)[0]
        assert proc.returncode == 0, text
    finally:
        _end(proc)
