"""Loss terms of ConFill training (docs/ARCHITECTURE.md, "The model"); each is weighted in the config.

All regression terms are masked mean absolute errors on normalised values (MAE is also the headline metric); the
contrastive term is InfoNCE (van den Oord et al., 2018, "Representation Learning with Contrastive Predictive
Coding") over pooled encoder memories.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["LossWeights", "ProjectionHead", "info_nce", "masked_mae"]


@dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms.

    Attributes:
        impute: masked imputation, on observed values that were artificially hidden.
        recon: reconstruction of the values the model was shown.
        forecast: forecast of the observed future values.
        contrast: InfoNCE over anchor / positive / negative windows.
    """

    impute: float = 1.0
    recon: float = 0.2
    forecast: float = 0.5
    contrast: float = 0.1

    def __post_init__(self) -> None:
        for name in ("impute", "recon", "forecast", "contrast"):
            if getattr(self, name) < 0:
                msg = f"loss weight {name} must be >= 0"
                raise ValueError(msg)


def masked_mae(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over the cells where ``weight`` is 1.

    Args:
        pred, target: [..., C] float32, the same shape.
        weight: same shape, 0/1 float32.

    Returns:
        Scalar tensor; 0 when no cell is selected (never NaN).
    """
    return (torch.abs(pred - target) * weight).sum() / torch.clamp(weight.sum(), min=1.0)


class ProjectionHead(nn.Module):
    """Pools an encoder memory over time and projects it onto the unit sphere for the contrastive loss."""

    def __init__(self, d_model: int, d_proj: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model, d_model), nn.ReLU(), nn.Linear(d_model, d_proj))

    def forward(self, memory: torch.Tensor) -> torch.Tensor:
        """memory: [B, L, d] -> [B, d_proj] unit-norm float32."""
        return F.normalize(self.net(memory.mean(dim=1)), dim=-1)


def info_nce(
    anchor: torch.Tensor, positives: list[torch.Tensor], negatives: torch.Tensor, temperature: float
) -> torch.Tensor:
    """InfoNCE: each anchor must pick its own positive out of that positive and every negative in the batch.

    Args:
        anchor: [n, p] unit-norm embeddings.
        positives: list of [n, p]; row i is anchor i's positive (the loss averages over the list).
        negatives: [m, p] unit-norm embeddings shared by every anchor (distant and shuffled windows).
        temperature: softmax temperature (> 0).

    Returns:
        Scalar tensor.
    """
    neg = anchor @ negatives.t() / temperature  # [n, m]
    losses = []
    for pos in positives:
        p = (anchor * pos).sum(dim=-1, keepdim=True) / temperature  # [n, 1]
        logits = torch.cat([p, neg], dim=1)
        target = torch.zeros(anchor.shape[0], dtype=torch.long, device=anchor.device)
        losses.append(F.cross_entropy(logits, target))
    return torch.stack(losses).mean()
