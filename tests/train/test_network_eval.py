"""Network scenarios: the masks (invariants), hand-checked scores on a constructed network, the causal methods'
independence of everything after the gap start, the real-data figures of issue 20, and the evaluate hook."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from gapcast.calendar import calendar_features
from gapcast.train.data import (
    BEIJING_CHANNELS,
    BEIJING_POLLUTANTS,
    Normalizer,
    StationSeries,
    fit_beijing_normalizer,
)
from gapcast.train.network_eval import (
    AlignedNetwork,
    Trials,
    align_network,
    build_network_scenarios,
    evaluate_network,
    model_method,
    network_markdown,
    network_methods,
    score_network,
)

HOUR = 3600


def _constructed(S: int = 3, T: int = 400, C: int = 2) -> AlignedNetwork:
    """Station s = (s + 1) x a common positive signal, channel 1 = 100 + 10 * channel 0; fully observed."""
    t = np.arange(T)
    base = 50 + 20 * np.sin(2 * np.pi * t / 24) + 10 * np.sin(2 * np.pi * t / 97)
    v = np.stack([np.stack([(s + 1) * base, 100 + 10 * (s + 1) * base], axis=1) for s in range(S)])
    return AlignedNetwork(stations=[f"s{s}" for s in range(S)], epoch_s=t.astype(np.int64) * HOUR,
                          values=v.astype(np.float32)[:, :, :C], cadence_s=float(HOUR))


def test_scenario_masks_invariants():
    net = _constructed()
    net.values[1, 100:150, 0] = np.nan  # a real outage: never hidden, never scored
    kw = {"group": [0], "lookback": 48, "ratio_lookback": "24h", "blocks": ("6h", "24h"), "trials": 40}
    scs = build_network_scenarios(net, seed=5, **kw)
    again = build_network_scenarios(net, seed=5, **kw)
    assert [s.name for s in scs] == ["station-local block-6h", "station-local block-24h",
                                     "network-wide block-6h", "network-wide block-24h"]
    for sc, sc2 in zip(scs, again, strict=True):
        assert np.array_equal(sc.hidden, sc2.hidden) and np.array_equal(sc.start, sc2.start)
        N, S, W, C = sc.hidden.shape
        assert (N, S, W, C) == (40, 3, 24 + 48, 2)
        assert not sc.hidden[..., 1].any()  # the group only
        obs = ~np.isnan(net.values[:, sc.start[:, None] + np.arange(W)]).transpose(1, 0, 2, 3)
        assert not (sc.hidden & ~obs).any()  # only observed values
        steps = sc.hidden.any(axis=(1, 3))  # [N, W]
        n = int(sc.block[:-1])
        for i in range(N):
            idx = np.flatnonzero(steps[i])
            # Inside the model window (the last 48 steps), >= 1 step either side, at most n steps long.
            assert idx.min() >= 24 + 1 and idx.max() <= W - 2 and idx.max() - idx.min() < n
            assert idx.min() >= sc.gap_start[i]
        who = sc.hidden.any(axis=(2, 3))  # [N, S]
        if sc.kind == "station-local":
            assert (who.sum(axis=1) == 1).all() and (np.argmax(who, axis=1) == sc.target).all()
        else:
            assert (sc.target == -1).all() and who.sum() > N  # several stations per trial


def test_scores_on_a_constructed_network():
    net = _constructed()
    norm = Normalizer(mean=np.array([100.0, 1000.0], np.float32), std=np.array([50.0, 500.0], np.float32))
    scs = build_network_scenarios(net, group=[0, 1], lookback=48, ratio_lookback="24h", blocks=("24h",),
                                  trials=30, seed=1)
    methods = network_methods(normalizer=norm, cadence_s=HOUR, scale=["ratio", "offset"], ratio_lookback="24h")
    res = score_network(net, norm, scs, methods, channels=["a", "b"])
    local, wide = res["station-local block-24h"], res["network-wide block-24h"]
    assert local["trials"] == 30 and local["hidden"] == 30 * 24 * 2 and local["stations_scored"] == 30
    # Channel 0 is an exact multiple of the network mean: the level ratio recovers it. Channel 1 is not (an offset
    # of 100 on a multiple), so the offset form is not exact either: only channel 0 is exact.
    assert local["methods"]["neighbour estimate"]["per_channel"]["a"]["mae"] == pytest.approx(0.0, abs=1e-3)
    assert local["methods"]["neighbour estimate"]["mae"] < 0.5 * local["methods"]["linear interpolation"]["mae"]
    assert local["methods"]["neighbour estimate"]["fallback_share"] == 0.0
    # Network-wide: no neighbour reports, every hidden value falls back to linear interpolation.
    nb, lin = wide["methods"]["neighbour estimate"], wide["methods"]["linear interpolation"]
    assert nb["fallback_share"] == 1.0 and nb["mae"] == pytest.approx(lin["mae"])
    assert wide["hidden"] == 30 * 3 * 24 * 2
    md = network_markdown({"protocol": {"stations": net.stations, "trials_per_scenario": 30, "seed": 1,
                                        "group": "g", "group_channels": ["a", "b"], "idw": "none",
                                        "kinds": {"station-local": "x", "network-wide": "y"}}, "scenarios": res})
    assert "| neighbour estimate | yes |" in md and "(100 % fb)" in md


def test_model_method_gets_the_model_window_and_its_calendar():
    net = _constructed()
    scs = build_network_scenarios(net, group=[0], lookback=48, ratio_lookback="24h", blocks=("6h",),
                                  kinds=("station-local",), trials=5, seed=2)
    sc = scs[0]
    seen = {}

    def fake(x, m, cal):
        seen.update(x=x, m=m, cal=cal)
        return x + 1.0, None

    fn = model_method(fake, lambda e: calendar_features(e, 8 * HOUR), lookback=48, horizon=6)
    W = sc.hidden.shape[2]
    vals = np.arange(5 * 3 * W * 2, dtype=np.float32).reshape(5, 3, W, 2)
    rows = sc.rows()
    tr = Trials(values=vals, observed=np.ones(vals.shape, bool), gap_start=sc.gap_start, rows=rows,
                epoch_s=net.epoch_s[sc.start], cadence_s=float(HOUR))
    out = fn(tr)
    np.testing.assert_array_equal(seen["x"], vals[rows[:, 0], rows[:, 1], 24:])
    first = net.epoch_s[sc.start[rows[0, 0]]] + 24 * HOUR
    np.testing.assert_allclose(seen["cal"][0], calendar_features(first + np.arange(54) * HOUR, 8 * HOUR))
    np.testing.assert_array_equal(out[:, 24:], vals[rows[:, 0], rows[:, 1], 24:] + 1)
    np.testing.assert_array_equal(out[:, :24], vals[rows[:, 0], rows[:, 1], :24])  # the level window as given


def test_align_network_on_a_union_grid():
    def st(name, t0, n, val):
        e = (np.arange(n) * HOUR + t0).astype(np.int64)
        v = np.full((n, 1), val, np.float32)
        return StationSeries(station=name, epoch_s=e, values=v, observed=~np.isnan(v), channels=BEIJING_CHANNELS[:1])

    class Whole:
        def __init__(self, series):
            self.test = slice(0, len(series.epoch_s))

    net = align_network({"b": st("b", 2 * HOUR, 3, 2.0), "a": st("a", 0, 3, 1.0)}, "test", split=Whole)
    assert net.stations == ["a", "b"] and net.cadence_s == HOUR
    np.testing.assert_array_equal(net.epoch_s, np.arange(5) * HOUR)
    np.testing.assert_array_equal(net.values[0, :, 0], [1, 1, 1, np.nan, np.nan])
    np.testing.assert_array_equal(net.values[1, :, 0], [np.nan, np.nan, 2, 2, 2])


@pytest.fixture(scope="module")
def beijing_net(beijing):
    return beijing, fit_beijing_normalizer(beijing)


def test_issue_figures_on_the_beijing_test_months(beijing_net):
    """Issue 20 measured linear 0.574 and the neighbour estimate 0.235 on 540 station-local 72 h pollutant
    outages; 540 trials here give 0.5659 and 0.2327 (README); 120 trials keep the test fast."""
    series, norm = beijing_net
    res = evaluate_network(series, norm, channels=[c.name for c in BEIJING_CHANNELS], group=BEIJING_POLLUTANTS,
                           lookback=96, blocks=("72h",), kinds=("station-local",), trials=120, seed=0)
    r = res["scenarios"]["station-local block-72h"]["methods"]
    assert r["linear interpolation"]["mae"] == pytest.approx(0.57, abs=0.07)
    assert r["neighbour estimate"]["mae"] == pytest.approx(0.235, abs=0.04)
    assert r["neighbour estimate"]["mae"] < 0.5 * r["linear interpolation"]["mae"]
    assert r["k-correlated regression"]["mae"] < r["linear interpolation"]["mae"]
    assert r["neighbour estimate"]["fallback_share"] < 0.02  # the other stations report
    assert res["protocol"]["level_scale"]["PM2.5"] == "ratio" and res["protocol"]["level_scale"]["TEMP"] == "offset"
    assert "IDW" not in r  # no coordinates for the Beijing preset


def test_causal_methods_never_read_after_the_gap_start_on_real_data(beijing_net):
    series, norm = beijing_net
    net = align_network(series, "test")
    scs = build_network_scenarios(net, group=BEIJING_POLLUTANTS, lookback=96, blocks=("24h",),
                                  kinds=("station-local",), trials=20, seed=3)
    sc = scs[0]
    from gapcast.neighbours import CorrelatedRegression

    train = norm.transform(align_network(series, "train").values)
    reg = CorrelatedRegression.fit(np.nan_to_num(train), ~np.isnan(train), k=3)
    scale = ["ratio"] * 11 + ["offset"] * 2
    methods = network_methods(normalizer=norm, cadence_s=HOUR, scale=scale, regression=reg)
    W = sc.hidden.shape[2]
    raw = net.values[:, sc.start[:, None] + np.arange(W)].transpose(1, 0, 2, 3)
    v, m = norm.transform(raw), ~np.isnan(raw)
    m_in = m & ~sc.hidden
    rows = sc.rows()
    tr = Trials(values=np.where(m_in, v, 0.0), observed=m_in, gap_start=sc.gap_start, rows=rows,
                epoch_s=net.epoch_s[sc.start], cadence_s=float(HOUR))
    # The target's whole record from the gap start on (the block AND the observed steps after it) changed.
    after = np.arange(W)[None, :] >= sc.gap_start[:, None]  # [N, W]
    tgt = np.zeros(sc.hidden.shape[:2], bool)
    tgt[rows[:, 0], rows[:, 1]] = True
    sel = tgt[:, :, None, None] & after[:, None, :, None]
    rng = np.random.default_rng(0)
    v2 = np.where(sel & m_in, tr.values + rng.normal(0, 3, tr.values.shape), tr.values)
    tr2 = dataclasses.replace(tr, values=v2.astype(np.float32))
    hid = sc.hidden[rows[:, 0], rows[:, 1]]
    for name in ("neighbour estimate", "k-correlated regression"):
        fn = methods[name][0]
        a, b = fn(tr), fn(tr2)
        np.testing.assert_array_equal(a[hid], b[hid])
        assert np.isfinite(a[hid]).mean() > 0.98
    # Linear interpolation reads the far side of the gap: it does change (the check above has teeth).
    lin = methods["linear interpolation"][0]
    assert not np.array_equal(lin(tr)[hid], lin(tr2)[hid])


def test_evaluate_run_adds_the_network_section(beijing, tmp_path):
    from gapcast.train.config import default_config_path, load_config
    from gapcast.train.evaluate import evaluate_run
    from gapcast.train.trainer import train

    cfg = load_config(default_config_path().parent / "tiny.toml")
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, max_steps=2, steps_per_epoch=2))
    two = {k: beijing[k] for k in ("Aotizhongxin", "Dingling")}
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(cfg, out_dir=tmp_path, series=two, progress=False)
        rep = evaluate_run(tmp_path, series=two, max_windows=4, stride=48, plots=False, progress=False,
                           network_trials=8)
    finally:
        torch.set_num_threads(before)
    m = json.loads(rep.json_path.read_text())
    net = m["network"]
    assert net["protocol"]["stations"] == ["Aotizhongxin", "Dingling"]
    assert len(net["scenarios"]) == 6
    for sc in net["scenarios"].values():
        ns = {r["n"] for r in sc["methods"].values()}
        assert len(ns) == 1 and ns.pop() == sc["hidden"] > 0  # every method on the same hidden values
        assert set(sc["methods"]) == {"linear interpolation", "LOCF", "neighbour estimate",
                                      "k-correlated regression", "ConFill"}
    assert "## Network: outages by what the neighbours see" in rep.markdown
