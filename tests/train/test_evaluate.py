"""The evaluation protocol: hand-checked baseline scores on constructed windows, the scenario masks on real data,
and a full `evaluate_run` of a tiny trained run."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from gapcast.train.config import default_config_path, load_config
from gapcast.train.data import Normalizer
from gapcast.train.evaluate import (
    EvalWindows,
    Scenario,
    ScenarioSet,
    baseline_imputers,
    build_scenarios,
    evaluate_run,
    score_imputer,
)
from gapcast.train.trainer import train

L, H, C = 12, 4, 2


def _constructed() -> ScenarioSet:
    """Two windows: channel 0 is the ramp t (normalised), channel 1 is constant 1; std 2, mean 10."""
    t = np.arange(L + H, dtype=np.float32)
    values = np.stack([np.stack([t, np.ones_like(t)], axis=1)] * 2)  # [2, L+H, 2]
    observed = np.ones_like(values)
    hidden = np.zeros((2, L, C), dtype=bool)
    hidden[0, 3:7, 0] = True  # 4-step block on the ramp
    hidden[1, 5, :] = True  # one step, both channels
    tw = EvalWindows(values=values, observed=observed, calendar=np.zeros((2, L + H, 6), np.float32),
                     station=np.array([0, 0]), start_epoch_s=np.array([0, 3600 * 24]), stations=["s"],
                     lookback=L, horizon=H)
    norm = Normalizer(mean=np.array([10.0, 10.0], np.float32), std=np.array([2.0, 2.0], np.float32))
    return ScenarioSet(windows=tw, scenarios=[Scenario("block", hidden, "hand-made")], normalizer=norm,
                       channels=("ramp", "flat"), group=(0,))


def test_baselines_score_hand_checked_values():
    ss = _constructed()
    base = baseline_imputers(H, season=4)
    lin = score_imputer(base["linear"], ss, name="linear")
    # Linear interpolation of a ramp and of a constant is exact.
    assert lin["block"]["all_norm"] == {"n": 6, "mae": 0.0, "rmse": 0.0, "mre": 0.0}
    assert "forecast" not in lin
    lo = score_imputer(base["locf"], ss, name="locf")
    # LOCF on the ramp: window 0 hides t = 3..6 -> fills 2, errors 1, 2, 3, 4; window 1 hides t = 5 -> 4 (error 1)
    # on the ramp and 1 -> 1 (error 0) on the flat channel. MAE = (1 + 2 + 3 + 4 + 1 + 0) / 6.
    errs = np.array([1, 2, 3, 4, 1, 0], dtype=np.float64)
    r = lo["block"]
    assert r["all_norm"]["n"] == 6
    assert r["all_norm"]["mae"] == pytest.approx(errs.mean())
    assert r["all_norm"]["rmse"] == pytest.approx(np.sqrt((errs**2).mean()))
    # MRE on normalised truth: sum |err| / sum |truth| = 11 / (3 + 4 + 5 + 6 + 5 + 1).
    assert r["all_norm"]["mre"] == pytest.approx(11 / 24)
    # Pollutants = channel 0 only.
    assert r["group_norm"]["mae"] == pytest.approx(11 / 5)
    # Original units: errors x std 2; MRE against truth 2 t + 10: (2 * 11) / sum(2 * [3, 4, 5, 6, 5] + 10).
    ramp = r["per_channel"]["ramp"]
    assert ramp["mae"] == pytest.approx(2 * 11 / 5) and ramp["mae_norm"] == pytest.approx(11 / 5)
    assert ramp["mre"] == pytest.approx(22 / (2 * 23 + 50))
    assert r["per_channel"]["flat"]["mae"] == 0.0
    # Forecasts: persistence repeats the last value 11; seasonal naive (season 4) repeats t = 8..11.
    # Truth is 12..15: persistence errors 1..4 (ramp), 0 (flat); seasonal errors 4 everywhere on the ramp.
    f_lo = lo["forecast"]["group_norm"]
    assert f_lo["n"] == 8 and f_lo["mae"] == pytest.approx(2.5)
    sn = score_imputer(base["seasonal_naive"], ss)
    assert sn["forecast"]["group_norm"]["mae"] == pytest.approx(4.0)
    assert sn["forecast"]["all_norm"]["mae"] == pytest.approx(2.0)
    assert "block" not in sn


def test_imputer_that_reads_hidden_values_is_caught():
    ss = _constructed()
    seen = {}

    def peek(v, m, c):
        seen.setdefault("v", v.copy())  # the first call is the scenario, the second the forecast
        seen.setdefault("m", m.copy())
        return v, None

    score_imputer(peek, ss)
    # The imputer is handed the window with the hidden cells zeroed and marked unobserved.
    hid = ss.scenarios[0].hidden
    assert np.all(seen["v"][hid] == 0) and np.all(seen["m"][hid] == 0)


@pytest.fixture(scope="module")
def one_station(beijing):
    return {"Dingling": beijing["Dingling"]}


def test_real_scenarios_follow_the_protocol(one_station):
    from gapcast.train.data import fit_beijing_normalizer

    norm = fit_beijing_normalizer(one_station)
    kw = {"channels": [f"c{i}" for i in range(13)], "stride": 48, "max_windows": 40}
    ss = build_scenarios(one_station, norm, seed=3, **kw)
    again = build_scenarios(one_station, norm, seed=3, **kw)
    tw = ss.windows
    assert len(tw) == 40 and tw.values.shape == (40, 120, 13)
    # Test months only: Dingling's test part starts 2016-05-01 local time.
    assert tw.start_epoch_s.min() >= np.datetime64("2016-04-30T16:00", "s").astype(np.int64)
    names = [s.name for s in ss.scenarios]
    # The first group's blocks and the real pattern first (the masks of before dataset specs), then the other group
    # of the preset and the whole station.
    assert names == ["point-10%", "block-6h", "block-24h", "block-72h", "real-pattern",
                     "block-6h:weather", "block-24h:weather", "block-72h:weather",
                     "block-6h:station", "block-24h:station", "block-72h:station"]
    obs = tw.observed[:, :96].astype(bool)
    for sc, sc2 in zip(ss.scenarios, again.scenarios, strict=True):
        assert np.array_equal(sc.hidden, sc2.hidden)  # same seed, same masks
        assert not (sc.hidden & ~obs).any()  # only observed values are hidden
    pt = ss.scenarios[0].hidden
    assert abs(pt.sum() / obs.sum() - 0.1) < 0.01
    for sc, hours in zip(ss.scenarios[1:4], (6, 24, 72), strict=True):
        assert not sc.hidden[:, :, 6:].any()  # pollutants only
        steps = sc.hidden[:, :, :6].any(axis=2)
        for row in steps:
            idx = np.flatnonzero(row)
            assert len(idx) <= hours and idx.min() >= 1 and idx.max() <= 94
        assert steps.sum(axis=1).max() == hours
    assert ss.scenarios[4].hidden.sum() > 0
    for sc in ss.scenarios[5:8]:
        assert not sc.hidden[:, :, :6].any() and sc.hidden[:, :, 6:].any()  # the weather group only
    for sc, hours in zip(ss.scenarios[8:], (6, 24, 72), strict=True):
        steps = sc.hidden.any(axis=2)
        assert steps.sum(axis=1).max() == hours and sc.hidden[:, :, :6].any() and sc.hidden[:, :, 6:].any()


@pytest.fixture(scope="module")
def tiny_run(beijing, tmp_path_factory):
    cfg = load_config(default_config_path().parent / "tiny.toml")
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, max_steps=2, steps_per_epoch=2))
    out = tmp_path_factory.mktemp("run")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(cfg, out_dir=out, series={k: beijing[k] for k in ("Aotizhongxin", "Dingling")}, progress=False)
    finally:
        torch.set_num_threads(before)
    return out


def test_evaluate_run_writes_metrics_and_plots(tiny_run, one_station):
    rep = evaluate_run(tiny_run, series=one_station, max_windows=12, stride=48, progress=False)
    m = json.loads(rep.json_path.read_text())
    assert m["protocol"]["eval_windows"] == 12 and m["protocol"]["seed"] == 0
    assert set(m["results"]) == {"confill", "locf", "linear", "seasonal_naive"}
    for name in ("point-10%", "block-6h", "block-24h", "block-72h", "real-pattern", "forecast"):
        assert m["results"]["confill"][name]["all_norm"]["n"] > 0
    # Baselines are scored on the same hidden values as the model.
    for name in ("point-10%", "block-72h"):
        assert m["results"]["confill"][name]["all_norm"]["n"] == m["results"]["linear"][name]["all_norm"]["n"]
    # Re-scoring the linear baseline directly on the same scenarios gives the same figure.
    from gapcast.train.data import Normalizer as N

    ss = build_scenarios(one_station, N.from_dict(json.loads((tiny_run / "normalization.json").read_text())),
                         channels=[f"c{i}" for i in range(13)], stride=48, max_windows=12, seed=0)
    lin = score_imputer(baseline_imputers(24)["linear"], ss)
    assert lin["block-24h"]["all_norm"]["mae"] == pytest.approx(m["results"]["linear"]["block-24h"]["all_norm"]["mae"])
    assert "| block-72h |" in rep.markdown and rep.markdown_path.read_text() == rep.markdown
    assert len(m["targets"]) == 4
    for p in rep.plots:
        assert p.stat().st_size > 5000 and p.read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in rep.plots) == ["plot_block72h_PM2.5.png", "plot_block72h_TEMP.png",
                                                 "plot_forecast1d_PM2.5.png", "plot_forecast1d_TEMP.png"]
