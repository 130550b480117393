"""ConFill model: mask invariance, locality of the local branch, the gate, the DFT basis, depth weights, shapes,
fully missing windows and checkpoint round trips."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gapcast.train import TrainError
from gapcast.train.checkpoint import build_meta, load_checkpoint, save_checkpoint
from gapcast.train.model import ConFill, ConFillConfig, MultiHeadAttention, dft_basis

CFG = ConFillConfig(n_channels=5, lookback=32, horizon=8, d_model=16, n_heads=2, n_encoder_layers=2,
                    n_decoder_layers=1, d_ff=32, local_window=5, n_freq=6, conv_kernels=(3, 5), dropout=0.0)


@pytest.fixture
def model() -> ConFill:
    torch.manual_seed(0)
    # Non-zero depth logits so the test also covers unequal depth weights.
    m = ConFill(CFG).eval()
    with torch.no_grad():
        m.depth_logits.copy_(torch.tensor([0.3, -0.2]))
    return m


def _inputs(b: int, seed: int = 0, missing: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    observed = (torch.rand(b, CFG.lookback, CFG.n_channels, generator=g) > missing).float()
    values = torch.randn(b, CFG.lookback, CFG.n_channels, generator=g) * observed
    calendar = torch.randn(b, CFG.lookback + CFG.horizon, CFG.n_calendar, generator=g)
    return values, observed, calendar


def test_values_where_unobserved_change_no_output(model):
    v, m, c = _inputs(3)
    imp1, fc1 = model(v, m, c)
    garbage = v + (1 - m) * torch.randn_like(v) * 100.0
    imp2, fc2 = model(garbage, m, c)
    assert (garbage != v).any()
    torch.testing.assert_close(fc1, fc2, rtol=0, atol=0)
    # imputed = m * x + (1 - m) * x_hat: unchanged everywhere.
    torch.testing.assert_close(imp1, imp2, rtol=0, atol=0)
    # Observed cells are passed through.
    torch.testing.assert_close(imp1 * m, v * m)


def test_local_branch_ignores_steps_outside_its_window(model):
    attn = model.encoder[0].attn
    x = torch.randn(2, CFG.lookback, CFG.d_model)
    allowed = torch.ones(2, 1, CFG.lookback)
    i, half = 10, CFG.local_window // 2
    base = attn.local(x, allowed)
    x2 = x.clone()
    outside = [j for j in range(CFG.lookback) if abs(i - j) > half]
    x2[:, outside] += torch.randn(2, len(outside), CFG.d_model) * 5
    torch.testing.assert_close(attn.local(x2, allowed)[:, i], base[:, i], rtol=0, atol=1e-6)
    # A step inside the window does change it.
    x3 = x.clone()
    x3[:, i + half] += 5.0
    assert (attn.local(x3, allowed)[:, i] - base[:, i]).abs().max() > 1e-3
    # ... and the global branch does see far steps.
    g_base = attn.global_attn(x, x, allowed)
    assert (attn.global_attn(x2, x2, allowed)[:, i] - g_base[:, i]).abs().max() > 1e-3


def test_gate_is_in_open_unit_interval_and_depends_on_input(model):
    attn = model.encoder[0].attn
    allowed = torch.ones(1, 1, CFG.lookback)
    with torch.no_grad():
        _, g1 = attn(torch.randn(1, CFG.lookback, CFG.d_model), allowed, return_gate=True)
        _, g2 = attn(torch.randn(1, CFG.lookback, CFG.d_model) * 3, allowed, return_gate=True)
    for g in (g1, g2):
        assert g.shape == (1, CFG.lookback, CFG.d_model)
        assert float(g.min()) > 0.0 and float(g.max()) < 1.0
    assert (g1 - g2).abs().max() > 1e-2
    assert g1.std() > 1e-3  # varies across steps/features within one input too


def test_dft_basis_matches_torch_rfft():
    L, K = 96, 24
    x = torch.randn(4, L, 3, dtype=torch.float64)
    basis = dft_basis(L, K).double()  # [2K, L]
    spec = basis @ x  # [4, 2K, 3]
    ref = torch.fft.rfft(x, dim=1)[:, :K]  # [4, K, 3]
    torch.testing.assert_close(spec[:, :K], ref.real, rtol=0, atol=1e-4)
    torch.testing.assert_close(spec[:, K:], ref.imag, rtol=0, atol=1e-4)
    with pytest.raises(ValueError):
        dft_basis(L, L // 2 + 2)


def test_frequency_embedding_uses_the_fixed_basis(model):
    fe = model.freq_emb
    torch.testing.assert_close(fe.basis * CFG.lookback, dft_basis(CFG.lookback, CFG.n_freq))
    assert "basis" not in model.state_dict() and not fe.basis.requires_grad


def test_fully_missing_window_gives_finite_outputs(model):
    v, m, c = _inputs(2)
    m = torch.zeros_like(m)
    imp, fc = model(v * 0, m, c)
    assert torch.isfinite(imp).all() and torch.isfinite(fc).all()
    # Also when the window holds garbage (NaN-free) values everywhere.
    imp2, fc2 = model(torch.full_like(v, 1e6), m, c)
    torch.testing.assert_close(fc, fc2, rtol=0, atol=0)


def test_query_without_allowed_key_gives_zero():
    torch.manual_seed(0)
    attn = MultiHeadAttention(8, 2)
    q, k = torch.randn(2, 4, 8), torch.randn(2, 6, 8)
    allowed = torch.ones(2, 4, 6)
    allowed[0, 1] = 0  # row 1 of batch 0 may see nothing
    out = attn(q, k, allowed)
    assert torch.all(out[0, 1] == 0)
    assert out[0, 0].abs().sum() > 0 and torch.isfinite(out).all()


def test_depth_weights_sum_to_one(model):
    w = model.depth_weights().detach()
    assert w.shape == (CFG.n_encoder_layers,)
    torch.testing.assert_close(w.sum(), torch.tensor(1.0))
    assert float(w[0]) > float(w[1])  # logits 0.3 > -0.2


@pytest.mark.parametrize("b", [1, 2, 7])
def test_output_shapes(model, b):
    imp, fc = model(*_inputs(b))
    assert imp.shape == (b, CFG.lookback, CFG.n_channels) and imp.dtype == torch.float32
    assert fc.shape == (b, CFG.horizon, CFG.n_channels) and fc.dtype == torch.float32


def test_plain_head_without_smoother():
    plain = ConFill(ConFillConfig.from_dict({**CFG.__dict__, "smoother_widths": []})).eval()
    assert plain.smoother is None
    v, m, c = _inputs(2)
    x_hat, fc, memory = plain.compute(v, m, c)
    torch.testing.assert_close(x_hat, plain.impute_head(memory))


def test_batch_items_are_independent(model):
    v, m, c = _inputs(3)
    imp, fc = model(v, m, c)
    imp1, fc1 = model(v[1:2], m[1:2], c[1:2])
    torch.testing.assert_close(fc[1:2], fc1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(imp[1:2], imp1, rtol=1e-5, atol=1e-5)


def test_checkpoint_reloads_to_identical_outputs(model, tmp_path):
    meta = build_meta(CFG, normalizer={"mean": [0.0] * 5, "std": [1.0] * 5},
                      channels=[{"name": f"c{i}", "unit": "1", "valid_min": 0.0, "valid_max": 1.0} for i in range(5)],
                      cadence_s=3600, utc_offset_s=28800)
    path = save_checkpoint(tmp_path / "best.pt", model, meta, step=7)
    loaded, meta2 = load_checkpoint(path)
    assert loaded.cfg == CFG and meta2["step"] == 7 and meta2["cadence_s"] == 3600
    inputs = _inputs(2)
    for a, b in zip(model(*inputs), loaded(*inputs), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # Loading is weights-only: a file holding a pickled object is refused.
    (tmp_path / "evil.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(TrainError):
        load_checkpoint(tmp_path / "evil.pt")


def test_config_validation():
    with pytest.raises(ValueError):
        ConFillConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError):
        ConFillConfig.from_dict({"d_model": 16, "bogus": 1})
    with pytest.raises(ValueError):
        ConFillConfig(conv_kernels=(3, 4))
    with pytest.raises(ValueError):
        ConFillConfig(lookback=32, n_freq=18)


def test_neighbour_smoother_bridges_gaps_like_interpolation():
    from gapcast.train.model import NeighbourSmoother

    sm = NeighbourSmoother(1, (3, 9))
    t = torch.arange(20, dtype=torch.float32)
    values = (2.0 * t + 1.0).reshape(1, 20, 1)
    observed = torch.ones(1, 20, 1)
    observed[0, 7, 0] = 0  # one missing step: the width-3 estimate is the mean of its neighbours = 15
    observed[0, 12:20, 0] = 0  # a trailing gap longer than width 9 reaches
    est, avail = sm(values * observed, observed)
    assert est.shape == (1, 20, 1, 2)
    assert float(est[0, 7, 0, 0]) == pytest.approx(15.0)
    assert float(est[0, 7, 0, 1]) == pytest.approx(15.0)  # symmetric kernel on a ramp: still exact
    # Step 17 has no observation within +-4 (width 9) nor +-1: not available, estimate 0.
    assert float(avail[0, 17, 0, 0]) == 0 and float(avail[0, 17, 0, 1]) == 0 and float(est[0, 17, 0, 1]) == 0
    assert float(avail[0, 14, 0, 1]) == 1 and float(avail[0, 14, 0, 0]) == 0
    # Step 14 (width 9 sees 10 and 11 only): triangular weights 1/5 on step 10 (value 21), 2/5 on 11 (23).
    assert float(est[0, 14, 0, 1]) == pytest.approx((21 * 0.2 + 23 * 0.4) / 0.6, rel=1e-5)


def test_gap_interpolator_draws_straight_lines_across_gaps():
    from gapcast.train.model import GapInterpolator

    t = torch.arange(12, dtype=torch.float32)
    values = torch.stack([3.0 * t - 2.0, torch.zeros(12), t * t], dim=-1).unsqueeze(0)  # [1, 12, 3]
    observed = torch.ones(1, 12, 3)
    observed[0, 3:6, 0] = 0  # a 3-step gap between 7 (t=2) and 16 (t=6): exactly the ramp
    observed[0, :, 1] = 0  # never observed: nothing available
    observed[0, :4, 2] = 0  # leading gap: the first observation (t=4, 16) is carried back
    observed[0, 7:11, 2] = 0  # t=6 (36) to t=11 (121): 36 + (121 - 36) * k / 5
    est, avail = GapInterpolator(12)(values * observed, observed)
    assert torch.allclose(est[0, :, 0], values[0, :, 0], atol=1e-5)
    assert float(avail[0, :, 1].max()) == 0 and float(est[0, :, 1].abs().max()) == 0
    assert torch.allclose(est[0, :4, 2], torch.full((4,), 16.0))
    assert torch.allclose(est[0, 7:11, 2], torch.tensor([53.0, 70.0, 87.0, 104.0]), atol=1e-4)
    assert float(avail[0, :, 2].min()) == 1 and torch.equal(est[0, 4:7, 2], values[0, 4:7, 2])


def test_gap_interpolator_matches_the_linear_baseline():
    import numpy as np

    from gapcast.baselines import linear_interpolate
    from gapcast.train.model import GapInterpolator

    values, observed, _ = _inputs(4, seed=3, missing=0.6)
    observed[1, :, 2] = 0
    est, _ = GapInterpolator(CFG.lookback)(values, observed)
    ref = linear_interpolate(values.numpy(), observed.numpy())
    assert np.abs(est.numpy() - ref).max() < 1e-5


def test_interp_source_warm_start_keeps_the_forecast_and_isolated_gaps():
    import dataclasses

    torch.manual_seed(0)
    base = ConFill(CFG).eval()
    with_interp = ConFill(dataclasses.replace(CFG, interp_source=True)).eval()
    with_interp.load_without_interp(base.state_dict())
    values, observed, calendar = _inputs(3, seed=4, missing=0.0)
    observed[:, 1::4] = 0  # only isolated missing steps: interpolation = the narrow smoother width there
    values = values * observed
    imp_a, fc_a = base(values, observed, calendar)
    imp_b, fc_b = with_interp(values, observed, calendar)
    assert torch.equal(fc_a, fc_b)
    assert torch.allclose(imp_a, imp_b, atol=1e-5)
    observed[:, 8:11] = 0  # a 3-step gap: the straight line now gets a share, outputs differ
    assert not torch.allclose(base(values * observed, observed, calendar)[0],
                              with_interp(values * observed, observed, calendar)[0], atol=1e-4)
    with pytest.raises(ValueError):
        base.load_without_interp(base.state_dict())
    with pytest.raises(ValueError):
        ConFillConfig(smoother_widths=(), interp_source=True)


def _quadratic_interpolator(masked_values, observed):
    """The [B, C, L, L] selection-matrix form of GapInterpolator of before issue 13, as the reference."""
    L = observed.shape[1]
    t = torch.arange(L, dtype=torch.float32)
    upto = (t[:, None] <= t[None, :]).float()
    before, after, steps = upto.t(), (t[None, :] >= t[:, None]).float(), t
    x = masked_values.transpose(1, 2).unsqueeze(-2)
    m = observed.transpose(1, 2)
    left_count, right_count, m_j = m @ upto, m @ before, m.unsqueeze(-2)

    def nearest(count, side):
        pick = torch.relu(1.0 - torch.abs(count.unsqueeze(-1) - count.unsqueeze(-2))) * side * m_j
        return (pick * x).sum(-1), pick @ steps, pick.sum(-1)

    lv, lp, has_l = nearest(left_count, before)
    rv, rp, has_r = nearest(right_count, after)
    frac = (steps - lp) / torch.clamp(rp - lp, min=1.0)
    est = has_l * has_r * (lv + (rv - lv) * frac) + has_l * (1 - has_r) * lv + has_r * (1 - has_l) * rv
    return est.transpose(1, 2), torch.clamp(has_l + has_r, max=1.0).transpose(1, 2)


@pytest.mark.parametrize("length", [1, 2, 7, 96])
def test_gap_interpolator_linear_memory_form_equals_the_quadratic_one(length):
    from gapcast.train.model import GapInterpolator

    g = torch.Generator().manual_seed(length)
    interp = GapInterpolator(length)
    for p_missing in (0.0, 0.3, 0.8, 1.0):
        v = torch.randn(5, length, 3, generator=g)
        m = (torch.rand(5, length, 3, generator=g) >= p_missing).float()
        m[0, :, 0] = 0.0  # a channel without any observation
        est, avail = interp(v * m, m)
        ref_est, ref_avail = _quadratic_interpolator(v * m, m)
        torch.testing.assert_close(est, ref_est, atol=1e-5, rtol=1e-5)
        assert torch.equal(avail, ref_avail)
    # Hand-checked: observed 0 at t=0 and 3 at t=3 -> 1, 2 in between; LOCF after the last observation.
    m = torch.tensor([[[1.0], [0.0], [0.0], [1.0], [0.0]]])
    v = torch.tensor([[[0.0], [0.0], [0.0], [3.0], [0.0]]])
    est, _ = GapInterpolator(5)(v, m)
    torch.testing.assert_close(est[0, :, 0], torch.tensor([0.0, 1.0, 2.0, 3.0, 3.0]))


def test_level_norm_follows_a_shift_of_the_station_level():
    """With per-window level normalisation a station whose level is k higher gets imputations and forecasts
    exactly k higher (the encoder sees the same centred window); without it, it does not."""
    g = torch.Generator().manual_seed(3)
    v = torch.randn(2, CFG.lookback, CFG.n_channels, generator=g)
    m = (torch.rand(2, CFG.lookback, CFG.n_channels, generator=g) > 0.2).float()
    m[:, 0] = 1.0  # every channel observed at least once
    c = torch.randn(2, CFG.lookback + CFG.horizon, CFG.n_calendar, generator=g)
    shift = torch.zeros(1, 1, CFG.n_channels)
    shift[..., 0] = 2.5
    for level_norm in (True, False):
        torch.manual_seed(0)
        net = ConFill(dataclasses.replace(CFG, level_norm=level_norm, dropout=0.0)).eval()
        with torch.no_grad():
            imp, fc = net(v * m, m, c)
            imp2, fc2 = net((v + shift) * m, m, c)
        same = torch.allclose(fc2, fc + shift, atol=1e-4) and torch.allclose(imp2, imp + shift, atol=1e-4)
        assert same == level_norm
