"""iTransformer: the paper's architecture properties (channel tokens without order, per-window normalisation)."""

from __future__ import annotations

import pytest
import torch

from gapcast.bench.itransformer import ITransformer, ITransformerConfig


@pytest.fixture
def net():
    torch.manual_seed(0)
    m = ITransformer(ITransformerConfig(lookback=32, horizon=8, d_model=16, n_heads=2, n_layers=2, d_ff=16,
                                        dropout=0.0))
    return m.eval()


def test_shapes_and_channel_permutation_equivariance(net):
    x = torch.randn(3, 32, 5)
    y = net(x)
    assert y.shape == (3, 8, 5)
    perm = torch.tensor([4, 2, 0, 1, 3])
    # channels are tokens with no positional encoding: permuting them permutes the forecast
    assert torch.allclose(net(x[..., perm]), y[..., perm], atol=1e-5)


def test_affine_equivariance_from_the_window_normalisation(net):
    x = torch.randn(2, 32, 3) * 3.0 + 1.0
    # y(a x + b) = a y(x) + b for a > 0 (up to the 1e-5 variance floor)
    assert torch.allclose(net(2.5 * x + 7.0), 2.5 * net(x) + 7.0, atol=1e-3)


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="divisible"):
        ITransformerConfig(d_model=10, n_heads=3)
