"""``gapcast bench agent``: the pure summary (hand-computed figures) and one ``--quick`` run on a tiny bundle."""

from __future__ import annotations

import json

import pytest

from gapcast.bench.agent import STAGES, summarize


def _result(n: int, steps_per_s: float, rss: float, **extra) -> dict:
    return {"stations": n, "throughput": {"steps_per_s": steps_per_s, **extra.pop("throughput", {})},
            "rss_peak_mib": rss, **extra}


def test_summarize_ratios_slope_and_cpu_split():
    ceiling = {"windows_per_s": 1000.0, "batch": 256, "batch_1000_ms": 900.0}
    profile = {"counters": {"filled": 2000}, "process_cpu_s": 3.0,
               "cpu_s": {"parse": 0.1, "window": 0.2, "inference": 2.0, "encode": 0.3, "outbox": 0.1,
                         "publish": 0.1, "other": 0.1, "network_thread": 0.1}}
    results = [
        _result(100, 500.0, 110.0),
        _result(1000, 800.0, 140.0, throughput={"profile": profile}, ingest={"ratio": 0.9, "agent_per_s": 9000.0,
                                                                            "raw_per_s": 10000.0},
                latency_ms={"p50": 950.0, "p99": 1000.0}),
        _result(10000, 850.0, 410.0, snapshot={"write_s": 0.5, "bytes": 10_000_000, "stations": 10001}),
        {"stations": 20000, "error": "RuntimeError: no"},
    ]
    f = summarize(ceiling, results)
    assert f["step_throughput_ratio"] == {"100": 0.5, "1000": 0.8, "10000": 0.85}
    assert f["ingest_ratio"] == 0.9 and f["ingest_stations"] == 1000
    assert f["latency_p99_ms"] == 1000.0 and f["latency_stations"] == 1000
    # least squares through (100, 110), (1000, 140), (10000, 410): mean x 3700, mean y 220,
    # Sxy = 3600*110 + 2700*80 + 6300*190 = 1,809,000; Sxx = 59,940,000: 0.030180 MiB per station
    assert f["rss_mib_per_1000_stations"] == pytest.approx(30.18, abs=0.01)
    assert f["snapshot_write_s"] == 0.5 and f["snapshot_stations"] == 10001
    cpu = f["cpu_s_per_1000_steps"]
    assert cpu["inference"] == pytest.approx(1.0) and cpu["parse"] == pytest.approx(0.05)
    assert cpu["total"] == pytest.approx(1.5)
    assert set(cpu) == {*STAGES, "total"}


@pytest.mark.broker
@pytest.mark.slow
def test_bench_agent_quick_reports_every_figure(tmp_path, data_root, tiny_bundle, signing_key):
    from gapcast.cli import main

    out = tmp_path / "out"
    rc = main(["bench", "agent", "--quick", "--bundle", str(tiny_bundle), "--pubkey", signing_key.public_hex,
               "--out", str(out), "--threads", "1", "--data", str(data_root)])
    assert rc == 0
    res = json.loads((out / "agent.json").read_text())
    assert all("error" not in r for r in res["results"]), res["results"]
    assert res["backend_ceiling_windows_per_s"] > 0
    assert set(res["step_throughput_ratio"]) == {"50", "100"}
    assert all(0 < v < 5 for v in res["step_throughput_ratio"].values())
    assert 0 < res["ingest_ratio"] < 5
    assert 0 < res["latency_p50_ms"] <= res["latency_p99_ms"]
    assert all(v > 20 for v in res["rss_peak_mib"].values())
    assert "rss_mib_per_1000_stations" in res
    assert res["snapshot_bytes"] > 0 and res["snapshot_write_s"] > 0 and res["snapshot_stations"] == 101
    cpu = res["cpu_s_per_1000_steps"]
    assert cpu["inference"] > 0 and cpu["parse"] > 0 and cpu["outbox"] > 0
    # the stages are a split of the process' CPU: they add up to the total
    assert sum(cpu[k] for k in STAGES) == pytest.approx(cpu["total"], rel=0.05)
    assert {t["target"].split(" (")[0] for t in res["targets"]} >= {"ingest without inference >= 0.8 of raw paho"}
    assert "## 6. CPU seconds per 1,000 station-steps" in (out / "agent.md").read_text()
