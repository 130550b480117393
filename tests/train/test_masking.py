"""Artificial outages and the contrastive sampler: positives are adjacent or augmented views of the anchor,
negatives are distant or segment-shuffled."""

from __future__ import annotations

import numpy as np
import pytest

from gapcast.train.data import make_windows
from gapcast.train.masking import (
    ContrastConfig,
    ContrastiveSampler,
    MaskConfig,
    augment,
    outage_mask,
    segment_shuffle,
    time_warp,
)

L, H, C = 24, 6, 4


def _series(T: int = 2000, seed: int = 0):
    """A smooth multi-channel series with a few real gaps; row t of channel c is sin(t / 10 + c) + t / T."""
    t = np.arange(T)
    v = np.stack([np.sin(t / 10.0 + c) + t / T for c in range(C)], axis=1).astype(np.float32)
    v[100:110, 1] = np.nan
    return v, (1_400_000_000 + 3600 * t).astype(np.int64)


@pytest.fixture
def windows():
    v, e = _series()
    return make_windows([v], [e], lookback=L, horizon=H)


def test_outage_mask_hides_only_observed_and_draws_blocks():
    rng = np.random.default_rng(0)
    obs = np.random.default_rng(1).random((200, 96, 13)) > 0.2
    obs[:, :, :6] = True  # pollutants fully observed, so the block shows whole
    cfg = MaskConfig(point_rate=0.0, block_prob=1.0, max_blocks=1, kind_weights=(0, 0, 1, 0))
    hide = outage_mask(obs, rng, cfg, (0, 1, 2, 3, 4, 5))
    assert not (hide & ~obs).any()
    # Pollutant blocks only: nothing hidden on channels 6..12, and every window has one contiguous block.
    assert not hide[:, :, 6:].any()
    any_pol = hide[:, :, :6].all(axis=2)
    assert np.array_equal(any_pol, hide[:, :, :6].any(axis=2))  # all six together
    lengths = []
    for b in range(200):
        steps = np.flatnonzero(any_pol[b])
        assert len(steps) > 0 and steps[-1] - steps[0] + 1 == len(steps)  # contiguous
        lengths.append(len(steps))
    # Long blocks dominate (long_share 0.6 of blocks are >= 12 steps).
    assert np.mean(np.asarray(lengths) >= 12) > 0.45
    assert max(lengths) > 48


def test_outage_mask_points_rate():
    rng = np.random.default_rng(0)
    obs = np.ones((400, 96, 13), dtype=bool)
    hide = outage_mask(obs, rng, MaskConfig(point_rate=0.2, block_prob=0.0), (0,))
    # Per-window rate ~ U(0, 0.2): mean 0.1.
    assert abs(hide.mean() - 0.1) < 0.01


def test_adjacent_positive_is_the_window_a_few_steps_away(windows):
    cfg = ContrastConfig(adjacent_min=3, adjacent_max=8, distant_min=500, segments=4)
    sampler = ContrastiveSampler(windows, cfg)
    rng = np.random.default_rng(0)
    refs = windows.starts[[0, 50, 900, len(windows) - 1]]
    cs = sampler.sample(refs, rng)
    for i, (k, s) in enumerate(refs):
        shift = int(cs.adjacent_shift[i])
        assert 3 <= abs(shift) <= 8
        v, m, c = windows.window_at(int(k), int(s) + shift)
        np.testing.assert_array_equal(cs.adjacent[0][i], v[:L])
        np.testing.assert_array_equal(cs.adjacent[2][i], c[:L])
    # At the series edges the shift points inward.
    assert cs.adjacent_shift[0] > 0 and cs.adjacent_shift[3] < 0


def test_distant_negative_is_far_away(windows):
    cfg = ContrastConfig(distant_min=500)
    sampler = ContrastiveSampler(windows, cfg)
    rng = np.random.default_rng(1)
    refs = windows.starts[rng.integers(0, len(windows), 64)]
    cs = sampler.sample(refs, rng)
    assert np.all(np.abs(cs.distant_start - refs[:, 1]) >= 500)
    i = 5
    v, _, _ = windows.window_at(int(refs[i, 0]), int(cs.distant_start[i]))
    np.testing.assert_array_equal(cs.distant[0][i], v[:L])


def test_shuffled_negative_is_a_nontrivial_segment_permutation(windows):
    cfg = ContrastConfig(segments=4, distant_min=500)
    sampler = ContrastiveSampler(windows, cfg)
    rng = np.random.default_rng(2)
    refs = windows.starts[[10, 20, 30]]
    cs = sampler.sample(refs, rng)
    seg = L // 4
    for i, (k, s) in enumerate(refs):
        v, m, c = windows.window_at(int(k), int(s))
        perm = cs.permutation[i]
        assert sorted(perm) == [0, 1, 2, 3] and not np.all(perm == np.arange(4))
        for out_pos, src in enumerate(perm):
            np.testing.assert_array_equal(cs.shuffled[0][i, out_pos * seg : (out_pos + 1) * seg],
                                          v[src * seg : (src + 1) * seg])
        # The calendar is kept in order: the values are out of step with time.
        np.testing.assert_array_equal(cs.shuffled[2][i], c[:L])


def test_augmented_positive_is_a_close_view_of_the_anchor(windows):
    cfg = ContrastConfig(noise_std=0.05, mask_min=0.1, mask_max=0.2, warp_strength=0.1, distant_min=500)
    sampler = ContrastiveSampler(windows, cfg)
    rng = np.random.default_rng(3)
    refs = windows.starts[[200, 400]]
    cs = sampler.sample(refs, rng)
    for i, (k, s) in enumerate(refs):
        v, m, _ = windows.window_at(int(k), int(s))
        av, am = cs.augmented[0][i], cs.augmented[1][i]
        hidden_steps = np.flatnonzero(am.sum(axis=1) == 0)
        assert 2 <= len(hidden_steps) <= 5  # 10-20% of 24 steps masked
        both = (am > 0) & (m[:L] > 0)
        # Close to the anchor (noise 0.05 and a mild warp of a smooth series) but not equal.
        assert np.abs(av[both] - v[:L][both]).mean() < 0.15
        assert not np.array_equal(av, v[:L])
        assert np.all(av[am == 0] == 0)


def test_time_warp_keeps_ends_and_identity_at_zero_strength():
    rng = np.random.default_rng(0)
    v = np.arange(20, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
    m = np.ones_like(v)
    w0, m0 = time_warp(v, m, rng, 0.0)
    np.testing.assert_allclose(w0, v, atol=1e-5)
    w, mw = time_warp(v, m, rng, 0.3)
    assert w[0, 0] == 0 and abs(w[-1, 0] - 19) < 1e-4 and np.all(np.diff(w[:, 0]) > 0)
    assert not np.allclose(w, v)


def test_segment_shuffle_and_augment_shapes():
    rng = np.random.default_rng(0)
    v = np.random.default_rng(1).normal(size=(30, 3)).astype(np.float32)
    m = np.ones_like(v)
    sv, sm, perm = segment_shuffle(v, m, rng, 3)
    assert sv.shape == v.shape and sorted(perm) == [0, 1, 2]
    np.testing.assert_allclose(np.sort(sv, axis=0), np.sort(v, axis=0))
    av, am = augment(v, m, rng, ContrastConfig())
    assert av.shape == v.shape and am.shape == m.shape


def test_sampler_rejects_short_series():
    v, e = _series(T=300)
    ws = make_windows([v], [e], lookback=L, horizon=H)
    with pytest.raises(ValueError):
        ContrastiveSampler(ws, ContrastConfig(distant_min=720))
