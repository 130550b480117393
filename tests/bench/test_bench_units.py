"""Unit tests of the benchmark pieces (real values; no timing assertions: speed lives in the benchmarks)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gapcast.bench.accuracy import accuracy_targets
from gapcast.bench.agent import agent_targets, synthetic_network
from gapcast.bench.cli import format_table
from gapcast.bench.dlinear import DLinear, DLinearConfig, SeriesDecomposition, moving_average
from gapcast.bench.ett import ETT_HORIZONS, PUBLISHED, PUBLISHED_SOURCES, ett_windows
from gapcast.bench.pypots_baselines import beijing_pypots_sets


def test_moving_average_pads_with_edge_values_kernel_3():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]).reshape(1, 5, 1)
    # Padded: [1, 1, 2, 3, 4, 5, 5] -> means of 3: [4/3, 2, 3, 4, 14/3].
    trend = moving_average(x, 3).flatten()
    assert torch.allclose(trend, torch.tensor([4 / 3, 2.0, 3.0, 4.0, 14 / 3]))
    seasonal, trend2 = SeriesDecomposition(3)(x)
    assert torch.allclose(seasonal.flatten(), torch.tensor([-1 / 3, 0.0, 0.0, 0.0, 1 / 3]), atol=1e-6)
    assert torch.allclose(seasonal + trend2, x)


def test_decomposition_kernel_25_keeps_a_ramp_inside_and_splits_a_square_wave():
    t = torch.arange(96, dtype=torch.float32)
    ramp = (0.5 * t).reshape(1, 96, 1)
    seasonal, trend = SeriesDecomposition(25)(ramp)
    # A symmetric mean of a straight line is the line itself wherever the window does not touch the padding.
    assert torch.allclose(trend[0, 12:84, 0], ramp[0, 12:84, 0], atol=1e-4)
    assert torch.allclose(seasonal[0, 12:84, 0], torch.zeros(72), atol=1e-4)
    # At step 0 the window holds 13 copies of x[0] = 0 and x[1..12] = 0.5..6: mean = 0.5 * 78 / 25.
    assert trend[0, 0, 0].item() == pytest.approx(0.5 * 78 / 25, abs=1e-5)
    # A +-1 square wave of period 2 averages to +-1/25 over an odd window: almost all of it is seasonal.
    wave = torch.where(t % 2 == 0, 1.0, -1.0).reshape(1, 96, 1)
    s2, tr2 = SeriesDecomposition(25)(wave)
    assert torch.allclose(tr2[0, 12:84, 0].abs(), torch.full((72,), 1 / 25), atol=1e-6)


def test_even_kernel_is_refused():
    with pytest.raises(ValueError, match="odd"):
        SeriesDecomposition(24)


def test_dlinear_mean_initialisation_forecasts_a_constant_as_itself():
    cfg = DLinearConfig(lookback=96, horizon=24, channels=3)
    model = DLinear(cfg)
    with torch.no_grad():
        model.linear_seasonal.bias.zero_()
        model.linear_trend.bias.zero_()
    x = torch.tensor([2.0, -1.0, 0.5]).repeat(4, 96, 1)  # [4, 96, 3], each channel constant
    out = model(x)
    assert out.shape == (4, 24, 3)
    assert torch.allclose(out, torch.tensor([2.0, -1.0, 0.5]).expand(4, 24, 3), atol=1e-5)
    with pytest.raises(ValueError, match="96 input steps"):
        model(torch.zeros(1, 95, 3))


def test_ett_standard_protocol_window_counts(data_root):
    from gapcast.train.data import load_ett

    ett = load_ett("ETTh1", data_root)
    norm = ett.normalizer.transform(ett.values)
    counts = {}
    for h in ETT_HORIZONS:
        te = ett_windows(norm[ett.test], ett.epoch_s[ett.test], lookback=96, horizon=h)
        counts[h] = len(te)
    # Test split: 2,880 rows + 96 early rows; windows = 2,976 - 96 - H + 1 (the reference code's count).
    assert counts == {96: 2785, 192: 2689, 336: 2545, 720: 2161}
    tr = ett_windows(norm[ett.train], ett.epoch_s[ett.train], lookback=96, horizon=96)
    assert len(tr) == 8640 - 192 + 1 == 8449
    # The windows are views of the normalised series: window 5's target starts 96 + 5 rows into the split.
    first_test_row = 8640 + 2880 - 96
    np.testing.assert_array_equal(te.y[5, 0], norm[first_test_row + 96 + 5])
    assert te.calendar.shape == (2161, 96 + 720, 6)
    # z-scored with training statistics: the training part has mean 0 and std 1 per channel.
    np.testing.assert_allclose(norm[ett.train].mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(norm[ett.train].std(axis=0), 1.0, atol=1e-3)


def test_published_table_is_complete_and_matches_the_papers():
    models = set(PUBLISHED_SOURCES)
    for ds in ("ETTh1", "ETTh2"):
        for h in ETT_HORIZONS:
            assert set(PUBLISHED[(ds, h)]) == models
    # Spot checks against the papers' tables (lookback 96 unless named).
    assert PUBLISHED[("ETTh1", 96)]["iTransformer"] == (0.386, 0.405)
    assert PUBLISHED[("ETTh2", 720)]["DLinear"] == (0.831, 0.657)
    assert PUBLISHED[("ETTh1", 336)]["TimesNet"] == (0.491, 0.469)
    assert PUBLISHED[("ETTh2", 192)]["PatchTST"] == (0.388, 0.400)
    assert PUBLISHED[("ETTh1", 96)]["DLinear (paper, L=336)"] == (0.375, 0.399)
    # The iTransformer paper's averages over the four horizons (ETTh1 0.454 / 0.447, ETTh2 0.383 / 0.407; the
    # paper averages unrounded figures, so the mean of the rounded ones may differ in the last digit).
    for ds, avg in (("ETTh1", (0.454, 0.447)), ("ETTh2", (0.383, 0.407))):
        mse = np.mean([PUBLISHED[(ds, h)]["iTransformer"][0] for h in ETT_HORIZONS])
        mae = np.mean([PUBLISHED[(ds, h)]["iTransformer"][1] for h in ETT_HORIZONS])
        assert (mse, mae) == pytest.approx(avg, abs=1e-3)


def test_pypots_sets_cut_windows_and_hide_a_share_of_validation_values():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(100, 3)).astype(np.float32)
    a[10:20, 1] = np.nan
    b = rng.normal(size=(50, 3)).astype(np.float32)
    val = rng.normal(size=(400, 3)).astype(np.float32)
    train_set, val_set = beijing_pypots_sets([a, b], [val], lookback=24, stride=12, val_hide_rate=0.1, seed=1)
    # Starts 0, 12, ..., 72 in a (7 windows) and 0, 12, 24 in b (3 windows).
    assert train_set["X"].shape == (10, 24, 3)
    np.testing.assert_array_equal(train_set["X"][0, 10:20, 1], np.full(10, np.nan, dtype=np.float32))
    np.testing.assert_array_equal(train_set["X"][7], b[0:24])
    x, x_ori = val_set["X"], val_set["X_ori"]
    assert x.shape == x_ori.shape == (32, 24, 3)
    hidden = np.isnan(x) & ~np.isnan(x_ori)
    assert 0.07 < hidden.mean() < 0.13
    np.testing.assert_array_equal(x[~hidden], x_ori[~hidden])


def test_synthetic_network_renames_and_shifts_real_stations(beijing):
    net = synthetic_network(beijing, 25, 6)
    assert len(net) == 25
    names = sorted(beijing)
    s0, s10 = net[f"{names[0]}-00000"], net[f"{names[0]}-00010"]
    np.testing.assert_array_equal(s0.epoch_s, s10.epoch_s)
    assert np.all(np.diff(s0.epoch_s) == 3600)
    from gapcast.train.data import time_split

    src = beijing[names[0]]
    t0 = time_split(src.epoch_s).test.start
    np.testing.assert_array_equal(s0.values, src.values[t0 : t0 + 6])
    np.testing.assert_array_equal(s10.values, src.values[t0 + 25 : t0 + 31])  # the second copy: 25 h later


def test_targets_report_margins():
    def sc(mae):
        return {"block-72h": {"all_norm": {"mae": mae}}, "forecast": {"all_norm": {"mae": mae}}}

    methods = {
        "ConFill fp32 (torch)": {"scores": sc(0.50)},
        "ConFill fp32 (onnxruntime)": {"scores": sc(0.50)},
        "ConFill int8_cpu (onnxruntime)": {"scores": sc(0.52)},
        "SAITS": {"scores": sc(0.40)},
        "BRITS": {"scores": sc(0.80)},
    }
    t = {x["target"]: x for x in accuracy_targets(methods)}
    saits = t["ConFill fp32 (torch) block-72h MAE below SAITS"]
    assert not saits["met"] and saits["margin"] == pytest.approx(-0.25)
    brits = t["ConFill fp32 (torch) block-72h MAE below BRITS"]
    assert brits["met"] and brits["margin"] == pytest.approx(0.375)
    int8 = next(v for k, v in t.items() if k.startswith("ConFill int8_cpu"))
    assert not int8["met"] and int8["measured"] == pytest.approx(0.04)
    agent = agent_targets({"step_throughput_ratio": {"1000": 0.9}, "ingest_ratio": 0.7, "ingest_stations": 1000,
                           "latency_p99_ms": 300.0, "latency_stations": 1000, "backend_batch_1000_ms": 100.0,
                           "rss_peak_mib": {"1000": 150.0}})
    by = {x["target"]: x for x in agent}
    assert by["step throughput >= 0.85 of the backend ceiling (1000 stations)"]["margin"] == pytest.approx(0.05)
    assert by["ingest without inference >= 0.8 of raw paho (1000 stations)"]["margin"] == pytest.approx(-0.1)
    # 300 ms against 100 ms + 150 ms of slack: missed by 50 ms
    assert by["p99 step-to-forecast <= backend batch of 1,000 + 150 ms (1000 stations)"]["margin"] == pytest.approx(-50.0)
    rss = by["peak RSS <= 200 MB (1000 stations)"]
    assert rss["met"] and rss["measured"] == pytest.approx(150.0 * 1.048576)


def test_format_table():
    text = format_table(["a", "b"], [["x", 0.123456], ["y", None], ["z", 12345.678]])
    assert text.splitlines() == ["| a | b |", "|---|---|", "| x | 0.1235 |", "| y | n/a |", "| z | 12,345.7 |"]


def test_bench_runtime_smoke_writes_positive_figures(tmp_path, data_root):
    from gapcast.cli import main
    from gapcast.tools.tinybundle import build_tiny_bundle, tiny_options

    bundle = tmp_path / "bundle"
    build_tiny_bundle(bundle, data_root=data_root, options=tiny_options(int8=False, cpu_variant="none"))
    out = tmp_path / "out"
    rc = main(["bench", "runtime", "--bundle", str(bundle), "--out", str(out), "--batches", "1,4",
               "--min-time-s", "0.05", "--threads", "1", "--data", str(data_root)])
    assert rc == 0
    res = json.loads((out / "runtime.json").read_text())
    engine = res["engines"]["onnxruntime fp32"]
    assert "error" not in engine, engine
    for b in ("1", "4"):
        assert engine["per_batch"][b]["windows_per_s"] > 0
        assert engine["per_batch"][b]["window_ms"] > 0
        assert engine["per_batch"][b]["calls"] >= 5
    assert engine["file_bytes"] == (bundle / "model.onnx").stat().st_size > 0
    assert engine["peak_rss_mb"] >= engine["rss_before_mb"] > 0
    assert "real beijing-multisite test-range windows" in res["inputs"]
    assert (out / "runtime.md").read_text().count("onnxruntime fp32") >= 1
