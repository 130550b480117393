"""Neighbour-station estimators and the context builder: hand-computed values, causality, JSON round trips and the
same context from training arrays and from live windows."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gapcast.neighbours import (
    ContextSpec,
    CorrelatedRegression,
    NeighbourError,
    build_context,
    context_for_windows,
    correlations,
    fit_context,
    haversine_km,
    idw_estimate,
    idw_weights,
    neighbour_estimate,
    weighted_neighbours,
)

HOUR = 3600.0


def _three() -> tuple[np.ndarray, np.ndarray]:
    """Station 0 (the target): 40, 50, 60 before the gap at t = 3; station 1: 10 then 20; station 2: 30 then 40."""
    v = np.array([[40, 50, 60, 0, 0, 0],
                  [10, 10, 10, 20, 20, 20],
                  [30, 30, 30, 40, 40, 40]], dtype=np.float64)[:, :, None]  # [S=3, T=6, C=1]
    m = np.ones_like(v, dtype=bool)
    m[0, 3:] = False
    return v, m


def test_neighbour_estimate_hand_computed():
    v, m = _three()
    est = neighbour_estimate(v, m, 3, cadence_s=HOUR, lookback="3h")
    # Network mean of stations 1, 2: 20 before the gap, 30 in it; ratio = (40 + 50 + 60) / (3 * 20) = 2.5.
    np.testing.assert_allclose(est[0, 3:, 0], [75.0, 75.0, 75.0])
    off = neighbour_estimate(v, m, 3, cadence_s=HOUR, lookback="3h", scale="offset")
    np.testing.assert_allclose(off[0, 3:, 0], [60.0, 60.0, 60.0])  # 30 + mean(40-20, 50-20, 60-20) = 30 + 30
    # A 2 h level window sees only t = 1, 2: ratio = (50 + 60) / 40 = 2.75.
    np.testing.assert_allclose(neighbour_estimate(v, m, 3, cadence_s=HOUR, lookback="2h")[0, 3:, 0], 82.5)
    # A target value missing in the level window drops that step from both sums: (50 + 60) / 40.
    m2 = m.copy()
    m2[0, 0] = False
    np.testing.assert_allclose(neighbour_estimate(v, m2, 3, cadence_s=HOUR, lookback="3h")[0, 3, 0], 82.5)
    # One neighbour silent at t = 4: the mean is station 1 alone (20) -> 50; both silent at t = 5 -> NaN.
    m3 = m.copy()
    m3[2, 4] = False
    m3[1:, 5] = False
    est3 = neighbour_estimate(v, m3, 3, cadence_s=HOUR, lookback="3h")
    assert est3[0, 4, 0] == pytest.approx(50.0)
    assert np.isnan(est3[0, 5, 0])


def test_neighbour_estimate_reads_nothing_after_the_gap_start():
    rng = np.random.default_rng(0)
    v = rng.gamma(2.0, 20.0, size=(4, 5, 40, 3))  # [N, S, T, C]
    m = rng.random(v.shape) > 0.1
    gs = rng.integers(10, 30, size=4)
    est = neighbour_estimate(v, m, gs, cadence_s=HOUR, lookback="8h")
    for n in range(4):
        # The target's own values from the gap start on: changed, or hidden -> the same fill.
        w = v.copy()
        w[n, :, gs[n]:] *= rng.uniform(0.1, 10.0, size=w[n, :, gs[n]:].shape)
        mm = m.copy()
        mm[n, 0, gs[n]:] = rng.random(mm[n, 0, gs[n]:].shape) > 0.5
        e2 = neighbour_estimate(np.where(np.arange(5)[None, :, None, None] == 0, w, v), mm, gs, cadence_s=HOUR,
                                lookback="8h")
        np.testing.assert_array_equal(e2[n, 0, gs[n]:], est[n, 0, gs[n]:])
        # Any station's values after step t never change the estimate at t.
        t = int(gs[n]) + 3
        w = v.copy()
        w[n, :, t + 1:] += 100.0
        e3 = neighbour_estimate(w, m, gs, cadence_s=HOUR, lookback="8h")
        np.testing.assert_array_equal(e3[n, :, : t + 1], est[n, :, : t + 1])


def test_neighbour_estimate_clips_the_ratio_and_rejects_bad_arguments():
    v, m = _three()
    v = v.copy()
    v[1:, :3] = 0.001  # a near-zero network mean in the level window
    est = neighbour_estimate(v, m, 3, cadence_s=HOUR, lookback="3h", max_ratio=10.0)
    np.testing.assert_allclose(est[0, 3:, 0], 10.0 * 30.0)
    with pytest.raises(NeighbourError, match="scale"):
        neighbour_estimate(v, m, 3, cadence_s=HOUR, scale="log")
    with pytest.raises(NeighbourError, match="gap_start"):
        neighbour_estimate(v, m, 7, cadence_s=HOUR, lookback="3h")
    with pytest.raises(NeighbourError, match="same shape"):
        neighbour_estimate(v, m[:, :5], 3, cadence_s=HOUR)


def test_haversine_and_idw_hand_computed():
    # One degree of longitude on the equator: 2 pi R / 360.
    assert float(haversine_km(0, 0, 0, 1)) == pytest.approx(2 * np.pi * 6371.0088 / 360, rel=1e-9)
    assert float(haversine_km(0, 0, 90, 0)) == pytest.approx(np.pi * 6371.0088 / 2, rel=1e-9)
    coords = [(0.0, 0.0), (0.0, 1.0), (0.0, 2.0)]
    w = idw_weights(coords)
    assert w[0, 0] == 0.0
    assert w[0, 1] / w[0, 2] == pytest.approx(4.0)  # 1/d^2 against 1/(2d)^2
    v = np.array([[0.0], [10.0], [20.0]])[:, :, None]  # [S=3, T=1, C=1]
    m = np.array([[False], [True], [True]])[:, :, None]
    est = idw_estimate(v, m, coords)
    assert est[0, 0, 0] == pytest.approx((4 * 10 + 20) / 5)  # 12
    assert est[1, 0, 0] == pytest.approx(20.0)  # station 0 unobserved: only station 2 (equal distance)
    with pytest.raises(NeighbourError, match="coordinates"):
        idw_estimate(v, m, coords[:2])
    with pytest.raises(NeighbourError, match="lat"):
        idw_weights([(95.0, 0.0), (0.0, 0.0)])


def test_weighted_neighbours_never_uses_the_station_itself():
    v = np.array([[5.0], [1.0], [3.0]])[:, :, None]
    m = np.ones_like(v, dtype=bool)
    w = np.array([[9.0, 1.0, 3.0], [1.0, 9.0, 0.0], [1.0, 1.0, 9.0]])
    mean, den = weighted_neighbours(v, m, w)
    assert mean[0, 0, 0] == pytest.approx((1 * 1 + 3 * 3) / 4)  # 2.5; the diagonal 9 is ignored
    assert mean[1, 0, 0] == pytest.approx(5.0)  # weight 0 for station 2
    assert mean[2, 0, 0] == pytest.approx(3.0)
    np.testing.assert_allclose(den[:, 0, 0], [4.0, 1.0, 2.0])


def _regression_data(T: int = 400) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=T), rng.normal(size=T)
    noise = rng.normal(size=T)
    s0 = 1.0 + 2.0 * a + 0.5 * b  # exactly linear in stations 1 and 2
    v = np.stack([s0, a, b, noise])[:, :, None]  # [S=4, T, 1]
    return v, np.ones_like(v, dtype=bool)


def test_correlated_regression_recovers_an_exact_linear_relation():
    v, m = _regression_data()
    reg = CorrelatedRegression.fit(v, m, k=2)
    assert reg.neighbours[0][0] == [1, 2]  # a (r ~ 0.97) before b, the noise station not chosen
    np.testing.assert_allclose(reg.coefficients[0][0][0b11], [1.0, 2.0, 0.5], atol=1e-4)
    # Station 1 alone: the least-squares fit on the same rows, as np.linalg.lstsq computes it.
    X = np.column_stack([np.ones(v.shape[1]), v[1, :, 0]])
    ref = np.linalg.lstsq(X, v[0, :, 0], rcond=None)[0]
    np.testing.assert_allclose(reg.coefficients[0][0][0b01], ref, atol=1e-4)
    # Prediction: exact with both neighbours; the one-neighbour fit where station 2 is silent; NaN with neither.
    mm = m.copy()
    mm[2, 10] = False
    mm[1:3, 11] = False
    pred = reg.predict(v, mm)
    np.testing.assert_allclose(pred[0, :10, 0], v[0, :10, 0], atol=1e-3)
    assert pred[0, 10, 0] == pytest.approx(ref[0] + ref[1] * v[1, 10, 0])
    assert np.isnan(pred[0, 11, 0])
    # The target's own values never enter its prediction.
    w = v.copy()
    w[0] = 1e6
    np.testing.assert_array_equal(reg.predict(w, mm)[0], pred[0])
    # JSON round trip.
    back = CorrelatedRegression.from_dict(json.loads(json.dumps(reg.to_dict())))
    np.testing.assert_array_equal(back.predict(v, mm), pred)
    with pytest.raises(NeighbourError, match="k must"):
        CorrelatedRegression.fit(v, m, k=0)


def test_correlations_hand_computed():
    v = np.array([[1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 8.0], [4.0, 3.0, 2.0, 1.0]])[:, :, None]
    m = np.ones_like(v, dtype=bool)
    r = correlations(v, m, min_overlap=3)
    assert r[0, 1, 0] == pytest.approx(1.0)
    assert r[0, 2, 0] == pytest.approx(-1.0)
    assert np.isnan(r[0, 0, 0])
    m[1, :2] = False  # 2 co-observed steps < min_overlap
    assert np.isnan(correlations(v, m, min_overlap=3)[0, 1, 0])


def _network(T: int = 300, S: int = 4, C: int = 3, seed: int = 2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    common = np.cumsum(rng.normal(size=(T, C)), axis=0)
    v = common[None] * rng.uniform(0.5, 1.5, size=(S, 1, C)) + rng.normal(scale=0.3, size=(S, T, C))
    m = rng.random(v.shape) > 0.15
    return v.astype(np.float32), m


def test_build_context_hand_computed_and_json_round_trip():
    w = np.zeros((3, 3, 1))
    w[0, 1, 0], w[0, 2, 0] = 0.75, 0.25
    w[1, 0, 0] = 1.0
    spec = ContextSpec(stations=("a", "b", "c"), channels=("x",), channel_index=(1,), weights=w, method="test", k=2)
    v = np.zeros((3, 2, 2), np.float32)
    v[:, :, 1] = [[1.0, 1.0], [2.0, 2.0], [6.0, 6.0]]
    m = np.ones_like(v)
    m[1, 1] = 0  # b silent at step 1
    ctx, cobs = build_context(spec, v, m)
    np.testing.assert_allclose(ctx[0, :, 0], [0.75 * 2 + 0.25 * 6, 6.0])  # 3.0, then c alone
    np.testing.assert_allclose(ctx[1, :, 0], [1.0, 1.0])
    np.testing.assert_array_equal(cobs[2, :, 0], [0.0, 0.0])  # c has no neighbour
    back = ContextSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    np.testing.assert_allclose(back.weights, spec.weights)
    assert back.neighbours_of("a") == {"x": ["b", "c"]}
    with pytest.raises(NeighbourError, match="schema"):
        ContextSpec.from_dict({**spec.to_dict(), "schema": "other"})
    with pytest.raises(NeighbourError, match="malformed"):
        ContextSpec.from_dict({**spec.to_dict(), "neighbours": {"a": {"x": {"zz": 1.0}}}})


def test_context_is_the_same_from_training_arrays_and_from_live_windows():
    v, m = _network()
    names = ["s0", "s1", "s2", "s3"]
    spec = fit_context(v[:, :200], m[:, :200], stations=names, channels=["c0", "c2"], channel_index=[0, 2], k=2)
    assert spec.method == "correlation"
    np.testing.assert_allclose(spec.weights.sum(axis=1), 1.0)  # normalised per station and channel
    assert all(spec.weights[s, s].max() == 0 for s in range(4))
    spec = ContextSpec.from_dict(json.loads(json.dumps(spec.to_dict())))  # as the card carries it
    L = 24
    starts = np.array([200, 230, 260])
    # Training side: windows cut from the aligned arrays, batched [N, S, L, C].
    vw = np.stack([v[:, s:s + L] for s in starts])
    mw = np.stack([m[:, s:s + L] for s in starts]).astype(np.float32)
    ctx, cobs = build_context(spec, np.where(mw > 0, vw, 0.0), mw)
    assert ctx.shape == (3, 4, L, 2)
    for n, s in enumerate(starts):
        # Gateway side: one round of live windows by name, shuffled, with a station the spec never saw.
        live = {name: (np.where(m[k, s:s + L], v[k, s:s + L], np.nan), m[k, s:s + L].astype(np.float32))
                for k, name in reversed(list(enumerate(names)))}
        live["new"] = (np.zeros((L, 3), np.float32), np.ones((L, 3), np.float32))
        out = context_for_windows(spec, live)
        assert out["new"] is None
        for k, name in enumerate(names):
            np.testing.assert_array_equal(out[name][0], ctx[n, k])
            np.testing.assert_array_equal(out[name][1], cobs[n, k])
    # A silent spec station: the live round without s1 equals the arrays with s1 unobserved.
    live = {name: (v[k, 200:224], m[k, 200:224].astype(np.float32)) for k, name in enumerate(names) if name != "s1"}
    mw2 = mw[0].copy()
    mw2[1] = 0
    ref, _ = build_context(spec, np.where(mw2 > 0, vw[0], 0.0), mw2)
    np.testing.assert_array_equal(context_for_windows(spec, live)["s0"][0], ref[0])
    with pytest.raises(NeighbourError, match="one shape"):
        context_for_windows(spec, {"s0": (np.zeros((L, 3)), np.ones((L, 3))), "s1": (np.zeros((L, 2)),
                                                                                   np.ones((L, 2)))})


def test_fit_context_by_distance_takes_the_k_nearest():
    v, m = _network(S=4)
    coords = [(0.0, 0.0), (0.0, 0.1), (0.0, 0.3), (0.0, 1.0)]
    spec = fit_context(v, m, stations=["a", "b", "c", "d"], channels=["c0"], channel_index=[0], k=2,
                       coordinates=coords)
    assert spec.method == "distance"
    assert spec.neighbours_of("a") == {"c0": ["b", "c"]}
    # 1/d^2 normalised: d(a, b) = 0.1 deg, d(a, c) = 0.3 deg -> 9 : 1.
    assert spec.weights[0, 1, 0] == pytest.approx(0.9, rel=1e-6)
    assert spec.weights[0, 2, 0] == pytest.approx(0.1, rel=1e-6)
