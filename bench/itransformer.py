"""iTransformer, the inverted transformer forecaster, as the recent-transformer baseline of ``gapcast bench accuracy``.

Source: Liu, Hu, Zhang, Wu, Wang, Ma and Long, "iTransformer: Inverted Transformers Are Effective for Time Series
Forecasting", ICLR 2024 (https://github.com/thuml/iTransformer). Each channel's whole input window is one token:
a linear layer embeds the L past values of a channel into d, a standard transformer encoder (post-norm, GELU FFN)
attends across the channels, and a linear projector maps each token to the H future values. The input is
normalised per window and channel (the paper's ``use_norm``: subtract the mean, divide by the standard deviation,
restored at the output). The paper's optional time-feature tokens are left out (``gapcast``'s calendar is not part of
the baselines' input). Like DLinear it has no notion of missing values: the benchmark feeds it a window filled by
linear interpolation (:func:`gapcast.bench.dlinear.fill_for_dlinear`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ITransformer", "ITransformerConfig"]


@dataclass(frozen=True)
class ITransformerConfig:
    """Sizes of an iTransformer (defaults: the paper's ETT / weather scripts, ``d_model = d_ff = 256``, 2 layers).

    Attributes:
        lookback: L, input steps.
        horizon: H, forecast steps.
        d_model: token width.
        n_heads: attention heads.
        n_layers: encoder layers.
        d_ff: FFN width.
        dropout: dropout rate.
    """

    lookback: int = 96
    horizon: int = 24
    d_model: int = 256
    n_heads: int = 8
    n_layers: int = 2
    d_ff: int = 256
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if min(self.lookback, self.horizon, self.d_model, self.n_heads, self.n_layers, self.d_ff) < 1:
            msg = f"every iTransformer size must be >= 1: {self}"
            raise ValueError(msg)
        if self.d_model % self.n_heads:
            msg = f"d_model {self.d_model} must be divisible by n_heads {self.n_heads}"
            raise ValueError(msg)


class ITransformer(nn.Module):
    """``forward(x [B, L, C] float32) -> forecast [B, H, C] float32`` (the same normalised units as ``x``)."""

    def __init__(self, cfg: ITransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Linear(cfg.lookback, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        layer = nn.TransformerEncoderLayer(cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.dropout, activation="gelu",
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.n_layers, norm=nn.LayerNorm(cfg.d_model),
                                             enable_nested_tensor=False)
        self.project = nn.Linear(cfg.d_model, cfg.horizon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args:
            x: [B, L, C] float32, no missing values (fill them first).

        Returns:
            [B, H, C] float32.
        """
        mean = x.mean(dim=1, keepdim=True)  # [B, 1, C]
        std = torch.sqrt(x.var(dim=1, keepdim=True, unbiased=False) + 1e-5)
        z = (x - mean) / std
        tokens = self.drop(self.embed(z.transpose(1, 2)))  # [B, C, d]: one token per channel
        out = self.project(self.encoder(tokens)).transpose(1, 2)  # [B, H, C]
        return out * std + mean
