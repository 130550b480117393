"""README "Your own stations", end to end with no Python written by the operator: a generated network (5 stations,
10-minute cadence, 6 weeks, a wind direction in degrees, one long CSV, Europe/Berlin across the autumn clock
change) through spec -> data inspect -> train -> evaluate -> export (and a day-one interpolation bundle) ->
edge run -> replay, over a private Mosquitto."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from gapcast.cli import main
from gapcast.tools.synthnet import TRAIN_TEXT, make_network

pytestmark = [pytest.mark.slow, pytest.mark.broker]

# synthnet's own train.toml, halved for a test that runs in seconds.
TRAIN_TOML = (TRAIN_TEXT.replace("d_model = 32", "d_model = 16").replace("n_heads = 4", "n_heads = 2")
              .replace("d_ff = 64", "d_ff = 32").replace("batch_size = 16", "batch_size = 8"))
assert "d_model = 16" in TRAIN_TOML and "n_heads = 2" in TRAIN_TOML and "batch_size = 8" in TRAIN_TOML

EDGE_TOML = """\
[gateway]
id = "gw-own"

[mqtt]
host = "127.0.0.1"
port = {port}
topic_prefix = "gapcast/v1"

[stations]
names = ["site-A", "site-B", "site-C", "site-D", "site-E"]

[model]
bundle = {bundle}
trusted_keys = [{pub}]

[input]
lateness_s = 1200

[agent]
clock = "readings"
tick_interval_s = 0.2
status_interval_s = 2.0
state_dir = {state}

[outbox]
kind = "memory"
"""


def _run(argv: list[str], capsys) -> str:
    rc = main(argv)
    out = capsys.readouterr().out
    assert rc == 0, out
    return out


def test_own_network_from_csv_to_forecasts_on_mqtt(tmp_path, broker, capsys, monkeypatch):
    from gapcast.tools.demo import Collector

    monkeypatch.chdir(tmp_path)
    spec = make_network(tmp_path)
    assert spec.name == "riverside.toml"
    (tmp_path / "train.toml").write_text(TRAIN_TOML)

    # 1. data inspect: span, cadence found, missing shares, the mask PNG.
    out = _run(["data", "inspect", "--dataset", "riverside.toml", "--out", "inspect"], capsys)
    summary = json.loads((tmp_path / "inspect" / "summary.json").read_text())
    assert [s["station"] for s in summary["stations"]] == ["site-A", "site-B", "site-C", "site-D", "site-E"]
    assert all(s["steps"] == 42 * 144 and s["cadence_found_s"] == 600 for s in summary["stations"])
    assert summary["load"]["duplicates"] == 1 and summary["load"]["out_of_range"] == 1
    assert summary["stations"][1]["longest_outage_s"]["temp"] == 86_400  # site-B's silent day
    assert (tmp_path / "inspect" / "observed_mask.png").read_bytes()[:4] == b"\x89PNG"
    assert "cadence declared 10min" in out

    # 2. train (tiny, a few steps) and 3. evaluate.
    _run(["train", "--dataset", "riverside.toml", "--config", "train.toml", "--out", "run", "--max-steps", "10",
          "--threads", "1", "--no-progress"], capsys)
    _run(["evaluate", "run", "--max-windows", "6", "--stride", "6h", "--threads", "1"], capsys)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["protocol"]["cadence_s"] == 600
    assert metrics["protocol"]["groups"] == {"weather": ["temp", "ws", "wd_sin", "wd_cos"], "air": ["pm25"]}
    for name in ("block-6h", "block-6h:air", "block-6h:station", "point-10%", "real-pattern", "forecast"):
        assert metrics["results"]["confill"][name]["all_norm"]["n"] > 0

    # 4. export: the trained bundle, and the day-one bundle without a model.
    _run(["keys", "generate", "--out", "keys"], capsys)
    key, pub = tmp_path / "keys" / "gapcast-signing.key", tmp_path / "keys" / "gapcast-signing.pub"
    _run(["export", "run", "--out", "bundle", "--target", "cpu", "--no-int8", "--sign-key", str(key)], capsys)
    card = json.loads((tmp_path / "bundle" / "card.json").read_text())
    assert card["calendar"]["timezone"] == "Europe/Berlin" and card["cadence_s"] == 600
    assert [c["name"] for c in card["channels"]] == ["temp", "pm25", "ws", "wd_sin", "wd_cos"]
    assert card["dataset"]["dataset"]["name"] == "riverside"
    _run(["export", "--interpolation-only", "--dataset", "riverside.toml", "--out", "day1", "--sign-key", str(key)],
         capsys)
    day1 = json.loads((tmp_path / "day1" / "card.json").read_text())
    assert day1["model"]["kind"] == "interpolation" and day1["variants"] == {}
    assert [c["name"] for c in day1["channels"]] == [c["name"] for c in card["channels"]]  # publishable later
    # With fleet updates on, the updater's backend factories serve a day-one bundle by interpolation (no error).
    from types import SimpleNamespace

    from gapcast.edge.bundle import verify_bundle
    from gapcast.edge.guard import make_backend_factories

    ucfg = SimpleNamespace(model=SimpleNamespace(backend="auto", threads=1, variant="auto", max_batch=8,
                                                 variant_budget_s=0.5), stations=SimpleNamespace(names=()))
    staging, start = make_backend_factories(ucfg, engine_cache_dir=tmp_path / "engines")
    day1_bundle = verify_bundle(tmp_path / "day1", [str(pub)])
    assert staging(day1_bundle).name == start(day1_bundle).name == "interpolation"

    # 5. edge run (the trained bundle) and 6. replay the test range onto the broker.
    cfg = tmp_path / "edge.toml"
    cfg.write_text(EDGE_TOML.format(port=broker.port, bundle=json.dumps(str(tmp_path / "bundle")),
                                    pub=json.dumps(str(pub)), state=json.dumps(str(tmp_path / "state"))))
    collector = Collector("127.0.0.1", broker.port, "gapcast/v1")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log_path = tmp_path / "agent.log"
    log = log_path.open("w")
    agent = subprocess.Popen([sys.executable, "-m", "gapcast.cli", "edge", "run", "--config", str(cfg)],
                             stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 30
        while not collector.status and time.monotonic() < deadline:  # the agent is up when its status is out
            assert agent.poll() is None, log_path.read_text()[-3000:]
            time.sleep(0.1)
        assert collector.status, "the agent published no status"
        _run(["replay", "--dataset", "riverside.toml", "--broker", broker.url, "--days", "1.5", "--speed", "0",
              "--no-progress"], capsys)
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            stations = {m["station"] for _, m in collector.forecasts}
            if len(stations) == 5:
                break
            assert agent.poll() is None, log_path.read_text()[-3000:]
            time.sleep(0.2)
        forecasts = [m for _, m in collector.forecasts]
        assert {m["station"] for m in forecasts} == {"site-A", "site-B", "site-C", "site-D", "site-E"}
        f = forecasts[-1]
        assert f.get("cadence_s", 600) == 600
        if "steps" in f:  # the gapcast/forecast/1 payload: [{"ts", "values": {channel: number}}, ...]
            assert len(f["steps"]) == 36 and set(f["steps"][0]["values"]) >= {"temp", "pm25", "ws"}
        else:  # the payload of before the output contract: channel -> H values
            assert {k: len(v) for k, v in f["values"].items() if k in ("temp", "pm25")} == {"temp": 36, "pm25": 36}
    finally:
        agent.terminate()
        try:
            agent.wait(15)
        except subprocess.TimeoutExpired:
            agent.kill()
        log.close()
        collector.close()


def test_a_history_too_short_for_the_default_contrast_is_a_clear_error(tmp_path, capsys, monkeypatch):
    """Six weeks at 10 minutes with the default training config: 60 % of a station's span (3,629 steps) cannot hold
    negatives 30 days (4,320 steps) apart. The user gets one line naming the key, not a traceback."""
    monkeypatch.chdir(tmp_path)
    make_network(tmp_path)
    rc = main(["train", "--dataset", "riverside.toml", "--out", "run", "--max-steps", "1", "--threads", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err, err[-2000:]
    assert "too short (3629 steps) for distant negatives (4320 apart)" in err and "contrast.distant_min" in err
