"""Neighbour context in training (issue 20): the train-side builder equals the gateway's on the same windows,
context dropout, and a ConFill with context that still works without it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gapcast.neighbours import context_for_windows, fit_context
from gapcast.train.context import (
    ContextSeries,
    align_rows,
    drop_context,
    fit_training_context,
    series_context,
)
from gapcast.train.model import ConFill, ConFillConfig


def _stations(rng, T=60, C=3):
    """Three stations on one hourly grid, s2 starting 5 steps later, gaps everywhere (NaN)."""
    base = np.cumsum(rng.standard_normal((T, C)), axis=0).astype(np.float32)
    vals, eps = [], []
    for k, start in enumerate((0, 0, 5)):
        v = base[start:] * (1.0 + 0.1 * k) + rng.standard_normal((T - start, C)).astype(np.float32) * 0.1
        v[rng.random(v.shape) < 0.2] = np.nan
        vals.append(v.astype(np.float32))
        eps.append(3600 * np.arange(start, T, dtype=np.int64))
    return vals, eps


def test_train_side_context_equals_the_gateway_side_on_every_window():
    rng = np.random.default_rng(0)
    vals, eps = _stations(rng)
    names = ["s0", "s1", "s2"]
    spec = fit_training_context(names, vals, eps, channel_names=["a", "b", "c"], channel_index=[0, 2], k=2)
    ctx = series_context(spec, vals, eps)
    grid, pos = align_rows(eps)
    assert np.array_equal(grid[pos[2]], eps[2])
    L = 8
    for end in (20, 40, 59):  # the gateway's live windows: every station's L steps ending at the same grid step
        windows = {}
        for k, n in enumerate(names):
            rows = np.searchsorted(eps[k], grid[end - L + 1 : end + 1])
            v = np.full((L, 3), np.nan, np.float32)
            ok = (rows < len(eps[k])) & (eps[k][np.minimum(rows, len(eps[k]) - 1)] == grid[end - L + 1 : end + 1])
            v[ok] = vals[k][rows[ok]]
            m = ~np.isnan(v)
            windows[n] = (np.where(m, v, 0.0), m)
        live = context_for_windows(spec, windows)
        for k, n in enumerate(names):
            r = np.searchsorted(eps[k], grid[end - L + 1])
            if grid[end - L + 1] < eps[k][0]:
                continue
            train_c, train_o = ctx.batch(np.array([[k, r]]), L)
            np.testing.assert_allclose(train_c[0], live[n][0], rtol=0, atol=1e-6)
            np.testing.assert_array_equal(train_o[0], live[n][1])


def test_context_by_hand_two_neighbours():
    """s0's context = weighted mean of s1 and s2 where they report; weights from the fit, renormalised."""
    vals = [np.array([[1.0], [2.0], [3.0]], np.float32), np.array([[10.0], [np.nan], [30.0]], np.float32),
            np.array([[20.0], [40.0], [np.nan]], np.float32)]
    eps = [np.arange(3, dtype=np.int64) * 3600] * 3
    spec = fit_context(np.zeros((3, 3, 1)), np.zeros((3, 3, 1), bool), stations=["s0", "s1", "s2"], channels=["a"],
                       channel_index=[0], coordinates=[(39.9, 116.4), (39.9, 116.5), (39.9, 116.6)], k=2)
    w1, w2 = spec.weights[0, 1, 0], spec.weights[0, 2, 0]
    assert w1 == pytest.approx(0.8, abs=1e-3)  # 1/d^2 with d2 = 2 d1: weights 4:1
    ctx = series_context(spec, vals, eps)
    np.testing.assert_allclose(ctx.values[0][:, 0], [(w1 * 10 + w2 * 20) / (w1 + w2), 40.0, 30.0], rtol=1e-5)
    c, o = ContextSeries(ctx.values).batch(np.array([[0, 0]]), 3)
    assert o.tolist() == [[[1.0], [1.0], [1.0]]]


def test_context_dropout_drops_whole_windows_and_spans():
    rng = np.random.default_rng(1)
    B, L = 4000, 10
    co = np.ones((B, L, 2), np.float32)
    hide = np.zeros((B, L, 3), np.float32)
    hide[:, 3:6, 1] = 1.0  # the outage hides channel 1, which context channel 1 estimates
    out = drop_context(co, hide, [0, 1], 0.4, rng)
    whole = (out.sum(axis=(1, 2)) == 0).mean()
    span = ((out[:, 3:6].sum(axis=(1, 2)) == 0) & (out[:, :3].sum(axis=(1, 2)) > 0)).mean()
    assert whole == pytest.approx(0.2, abs=0.03) and span == pytest.approx(0.2, abs=0.03)
    assert co.sum() == B * L * 2  # the input is not modified
    assert np.array_equal(drop_context(co, hide, [0, 1], 0.0, rng), co)


def test_confill_with_empty_context_ignores_the_context_values():
    torch.manual_seed(0)
    cfg = ConFillConfig(n_channels=3, lookback=24, horizon=6, d_model=16, n_heads=2, d_ff=32, n_freq=4,
                        smoother_widths=(3, 9), context="neighbours", n_context=2, context_index=(0, 2))
    m = ConFill(cfg).eval()
    v = torch.randn(2, 24, 3)
    o = (torch.rand(2, 24, 3) > 0.3).float()
    cal = torch.randn(2, 30, 6)
    none = m(v * o, o, cal)
    empty = m(v * o, o, cal, torch.randn(2, 24, 2), torch.zeros(2, 24, 2))
    torch.testing.assert_close(none, empty)
    withc = m(v * o, o, cal, torch.randn(2, 24, 2), torch.ones(2, 24, 2))
    assert (withc[0] - none[0]).abs().max() > 1e-3
    # Observed values pass through whatever the context says.
    torch.testing.assert_close(withc[0] * o, v * o)


def test_context_sources_offset_by_hand():
    cfg = ConFillConfig(n_channels=2, lookback=4, horizon=1, d_model=8, n_heads=2, d_ff=8, n_freq=2,
                        smoother_widths=(3,), context="neighbours", n_context=1, context_index=(1,))
    m = ConFill(cfg)
    v = torch.tensor([[[0.0, 1.0], [0.0, 2.0], [0.0, 0.0], [0.0, 0.0]]])
    o = torch.tensor([[[1.0, 1.0], [1.0, 1.0], [1.0, 0.0], [1.0, 0.0]]])
    c = torch.tensor([[[0.5], [1.0], [2.0], [3.0]]])
    est, avail = m.context_sources(v, o, c, torch.ones(1, 4, 1))
    # channel 1: offset = mean(1 - 0.5, 2 - 1) = 0.75 over the two co-observed steps; channel 0 has no context.
    np.testing.assert_allclose(est[0, :, 1, 1].numpy(), [1.25, 1.75, 2.75, 3.75])
    np.testing.assert_allclose(est[0, :, 1, 0].numpy(), [0.5, 1.0, 2.0, 3.0])
    assert avail[0, :, 0].sum() == 0 and avail[0, :, 1].sum() == 8


def test_config_key_sets_the_context_channels_from_the_spec():
    from gapcast.train.config import TrainConfig
    from gapcast.train.spec import load_spec

    spec = load_spec("beijing")
    cfg = TrainConfig.from_dict({"model": {"context": "neighbours", "context_group": next(iter(spec.groups))}}, spec)
    assert cfg.model.n_context == len(next(iter(spec.groups.values())))
    assert cfg.model.context_index == tuple(next(iter(spec.groups.values())))
    assert TrainConfig.from_dict({}, spec).model.n_context == 0  # default: temporal only, as before
