"""The accuracy protocol: its masks are PyGrinder's, edge blocks are hand-checkable, ``--quick`` runs and resumes."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from gapcast.bench.protocol import ABLATIONS, FORECASTERS, PYPOTS_SIZES, UNTRAINED, edge_scenarios, slug

pygrinder = pytest.importorskip("pygrinder", reason="the bench extra (pip install 'gapcast[bench]')")


def test_edge_blocks_end_at_the_newest_step():
    obs = np.ones((2, 100, 3), dtype=bool)
    obs[1, 95, 0] = False  # a real gap inside the block stays unscored
    sc = {s.name: s for s in edge_scenarios(obs, 3600)}
    assert list(sc) == ["edge-6h:station", "edge-24h:station", "edge-72h:station"]
    h = sc["edge-6h:station"].hidden
    assert h[0, 94:].all() and not h[0, :94].any()
    assert h.sum() == 2 * 6 * 3 - 1 and not h[1, 95, 0]
    assert sc["edge-72h:station"].hidden[0, 28:].all() and not sc["edge-72h:station"].hidden[0, :28].any()
    # 72 steps of a 50-step window: clipped to L - 1, one step left to start from
    short = edge_scenarios(np.ones((1, 50, 2), dtype=bool), 3600)[2].hidden
    assert short[0, 1:].all() and not short[0, 0].any()


@pytest.fixture(scope="module")
def scenario_set(beijing):
    from gapcast.bench.protocol import ProtocolOptions, _scenario_set
    from gapcast.train.data import Normalizer
    from gapcast.train.loader import split_indices
    from gapcast.train.spec import load_spec

    spec = load_spec("beijing")
    series = {k: beijing[k] for k in ("Aotizhongxin", "Dingling")}
    norm = Normalizer.fit([s.values[split_indices(spec, s).train] for s in series.values()])
    return _scenario_set(series, norm, spec, 96, 24, ProtocolOptions(max_windows=20)), spec


def test_block_and_edge_masks_are_pygrinder_seq_missing(scenario_set):
    """Every block of ours is PyGrinder's ``seq_missing`` with that block's start (hit rate 1 per channel)."""
    ss, spec = scenario_set
    L = ss.windows.lookback
    obs = ss.windows.observed[:, :L].astype(bool)
    x = np.where(obs, ss.windows.values[:, :L], np.nan)
    pollutants = list(spec.groups["pollutants"])
    checked = 0
    for sc in ss.scenarios:
        if not sc.name.startswith(("block-", "edge-")):
            continue
        n = {"6h": 6, "24h": 24, "72h": 72}[sc.name.split("-")[1].split(":")[0]]
        feats = list(range(x.shape[-1])) if sc.name.endswith(":station") else pollutants
        starts = [L - n] if sc.name.startswith("edge-") else range(1, L - n)
        for i in range(len(x)):
            ours = sc.hidden[i]
            theirs = [np.isnan(pygrinder.seq_missing(x[i : i + 1], p=n / L, seq_len=n, feature_idx=feats,
                                                     step_idx=[t0]))[0] & obs[i] for t0 in starts]
            assert any(np.array_equal(ours, t) for t in theirs), f"{sc.name} window {i}"
            checked += 1
    assert checked == 9 * len(x)


def test_point_scenario_matches_pygrinder_mcar_rate(scenario_set):
    ss, _ = scenario_set
    L = ss.windows.lookback
    obs = ss.windows.observed[:, :L].astype(bool)
    ours = next(s for s in ss.scenarios if s.name == "point-10%").hidden
    np.random.seed(0)  # PyGrinder draws from numpy's global generator
    x = np.where(obs, ss.windows.values[:, :L], np.nan)
    theirs = np.isnan(pygrinder.mcar(x, p=0.1)) & obs
    share_ours, share_theirs = ours.sum() / obs.sum(), theirs.sum() / obs.sum()
    # ~48,000 observed cells: the binomial standard deviation of the share is ~0.0014
    assert abs(share_ours - 0.1) < 0.006 and abs(share_theirs - 0.1) < 0.006
    assert not (ours & ~obs).any()


@pytest.mark.slow
def test_quick_protocol_runs_every_method_and_resumes(tmp_path, data_root):
    pytest.importorskip("pypots", reason="the bench extra (pip install 'gapcast[bench]')")
    from gapcast.bench.protocol import ProtocolOptions, bar_chart, protocol_markdown, run_protocol

    opts = ProtocolOptions(budget_min=0.02, seeds=(0,), max_windows=2, stations=("Aotizhongxin", "Dingling"),
                           quick=True, pypots_chunk=32)
    out = tmp_path / "acc"
    res = run_protocol(dataset="beijing", data=data_root, out=out, options=opts, progress=False)
    names = [*UNTRAINED, *ABLATIONS, *PYPOTS_SIZES, *FORECASTERS]
    assert sorted(res["results"]) == sorted(names)
    for m in names:
        f = out / "results" / slug(m) / ("untrained.json" if m in UNTRAINED else "seed0.json")
        assert f.is_file(), m
    agg = res["aggregate"]
    # the same masks for everyone: at the window's newest edge linear interpolation can only carry the last
    # observation forward, so it equals LOCF there exactly
    for b in ("6h", "24h", "72h"):
        assert agg["linear interpolation"][f"edge-{b}:station"]["mean"] == agg["LOCF"][f"edge-{b}:station"]["mean"]
    assert set(agg["SAITS"]) >= {"point-10%", "block-72h:station", "edge-24h:station"}
    assert "forecast" not in agg["SAITS"] and "forecast" in agg["DLinear"] and "forecast" in agg["ConFill"]
    assert res["results"]["SAITS"][0]["windows_seen"] >= 32
    md = protocol_markdown(res)
    assert "## ConFill ablations" in md and "block-72h:station" in md
    assert bar_chart(res, tmp_path / "c.png").stat().st_size > 1000

    # resume: nothing is retrained, the saved results come back as they were
    before = {p: p.stat().st_mtime_ns for p in (out / "results").rglob("*.json")}
    again = run_protocol(dataset="beijing", data=data_root, out=out, options=opts, resume=True, progress=False)
    assert {p: p.stat().st_mtime_ns for p in (out / "results").rglob("*.json")} == before
    assert json.dumps(again["aggregate"], sort_keys=True) == json.dumps(agg, sort_keys=True)
    # other options and --resume: refused, nothing mixed
    from gapcast import GapcastError

    with pytest.raises(GapcastError, match="other options"):
        run_protocol(dataset="beijing", data=data_root, out=out, resume=True, progress=False,
                     options=ProtocolOptions(budget_min=0.5, seeds=(0,), max_windows=2, quick=True,
                                             stations=("Aotizhongxin", "Dingling")))


def test_holdout_scores_only_the_held_out_station(tmp_path, data_root):
    from gapcast import GapcastError
    from gapcast.bench.protocol import ProtocolOptions, run_protocol

    opts = ProtocolOptions(seeds=(0,), max_windows=3, stations=("Aotizhongxin", "Dingling"), quick=True,
                           methods=("linear",), holdout=("Dingling",))
    res = run_protocol(dataset="beijing", data=data_root, out=tmp_path / "h", options=opts, progress=False)
    p = res["protocol"]
    assert p["stations"] == ["Dingling"] and p["training_stations"] == ["Aotizhongxin"]
    assert p["eval_windows"] == 3 and list(res["results"]) == ["linear interpolation"]
    with pytest.raises(GapcastError, match="not in the data"):
        run_protocol(dataset="beijing", data=data_root, out=tmp_path / "x", progress=False,
                     options=dataclasses.replace(opts, holdout=("Nowhere",)))


def test_budget_clock_is_wall_or_the_process_cpu_time():
    import time

    from gapcast.bench.protocol import ProtocolOptions

    assert ProtocolOptions().clock() is time.perf_counter
    assert ProtocolOptions(budget_clock="cpu").clock() is time.process_time
    with pytest.raises(ValueError, match="budget_clock"):
        ProtocolOptions(budget_clock="gpu")


def test_methods_match_by_prefix_or_exactly_with_a_dollar():
    from gapcast.bench.protocol import ProtocolOptions, _wanted

    prefix = ProtocolOptions(methods=("confill", "SAITS"))
    assert [m for m in ABLATIONS if _wanted(prefix, m)] == list(ABLATIONS)
    assert _wanted(prefix, "SAITS") and not _wanted(prefix, "BRITS")
    exact = ProtocolOptions(methods=("ConFill$", "linear"))
    assert [m for m in ABLATIONS if _wanted(exact, m)] == ["ConFill"]
    assert _wanted(exact, "linear interpolation") and not _wanted(exact, "LOCF")
    assert _wanted(ProtocolOptions(), "TimesNet")
