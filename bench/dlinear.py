"""DLinear, the decomposition-linear forecaster, as the forecasting baseline of the benchmarks.

Source: Zeng, Chen, Zhang and Xu, "Are Transformers Effective for Time Series Forecasting?", AAAI 2023
(https://github.com/cure-lab/LTSF-Linear). The input window is split by a moving average (kernel 25, the ends padded by
repeating the first and last value) into a trend and a seasonal remainder; one linear layer maps each part from L
past steps to H future steps, and the forecast is their sum. Weights are shared across channels (the paper's default,
``individual=False``).

The model has no notion of missing values: :func:`fill_for_dlinear` gives it a window filled by linear interpolation,
which is how such baselines are usually fed incomplete station data.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from gapcast.baselines import linear_interpolate

__all__ = [
    "DLinear",
    "DLinearConfig",
    "DLinearFit",
    "SeriesDecomposition",
    "evaluate_mse",
    "fill_for_dlinear",
    "moving_average",
    "train_dlinear",
]

log = logging.getLogger(__name__)


def moving_average(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Moving average along time with the ends padded by repetition (DLinear's ``moving_avg``).

    Args:
        x: [B, L, C] float32.
        kernel_size: odd window length, steps (25 in the paper).

    Returns:
        [B, L, C] float32: at step t the mean of x[t - k//2 .. t + k//2], where steps before 0 repeat x[0] and steps
        after L-1 repeat x[L-1].

    Raises:
        ValueError: if ``kernel_size`` is not a positive odd number.
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        msg = f"kernel_size must be a positive odd number, got {kernel_size}"
        raise ValueError(msg)
    half = (kernel_size - 1) // 2
    front = x[:, :1, :].expand(-1, half, -1)
    back = x[:, -1:, :].expand(-1, half, -1)
    padded = torch.cat([front, x, back], dim=1)  # [B, L + k - 1, C]
    return nn.functional.avg_pool1d(padded.transpose(1, 2), kernel_size, stride=1).transpose(1, 2)


class SeriesDecomposition(nn.Module):
    """Split a window into trend (moving average) and seasonal remainder.

    Args:
        kernel_size: moving-average window, steps (odd).
    """

    def __init__(self, kernel_size: int = 25) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            msg = f"kernel_size must be a positive odd number, got {kernel_size}"
            raise ValueError(msg)
        self.kernel_size = kernel_size

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decompose.

        Args:
            x: [B, L, C] float32.

        Returns:
            (seasonal, trend), each [B, L, C] float32, with seasonal + trend == x.
        """
        trend = moving_average(x, self.kernel_size)
        return x - trend, trend


@dataclass(frozen=True)
class DLinearConfig:
    """DLinear hyper-parameters (defaults: the paper's ETT settings, except the learning rate which is per dataset).

    Attributes:
        lookback: L, input steps.
        horizon: H, output steps.
        channels: C (only used to check inputs; weights are shared across channels).
        kernel_size: moving-average window, steps.
        lr: Adam learning rate.
        batch_size: windows per step.
        max_epochs: upper bound on epochs; training stops earlier on patience or the time budget.
        patience: epochs without a better validation MSE before stopping.
        seed: torch seed for the initial weights and the shuffling.
    """

    lookback: int = 96
    horizon: int = 96
    channels: int = 7
    kernel_size: int = 25
    lr: float = 0.005
    batch_size: int = 32
    max_epochs: int = 10
    patience: int = 3
    seed: int = 0


class DLinear(nn.Module):
    """DLinear: decomposition + one linear map per component, shared across channels.

    Args:
        cfg: the hyper-parameters.
    """

    def __init__(self, cfg: DLinearConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.decomp = SeriesDecomposition(cfg.kernel_size)
        self.linear_seasonal = nn.Linear(cfg.lookback, cfg.horizon)
        self.linear_trend = nn.Linear(cfg.lookback, cfg.horizon)
        # The paper initialises both maps to the mean over the window (weights 1/L); it makes the first epoch sane.
        with torch.no_grad():
            self.linear_seasonal.weight.fill_(1.0 / cfg.lookback)
            self.linear_trend.weight.fill_(1.0 / cfg.lookback)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Forecast.

        Args:
            x: [B, L, C] float32, normalised, complete (no NaN).

        Returns:
            [B, H, C] float32, normalised forecast.

        Raises:
            ValueError: if the window length is not ``cfg.lookback``.
        """
        if x.shape[1] != self.cfg.lookback:
            msg = f"expected {self.cfg.lookback} input steps, got {x.shape[1]}"
            raise ValueError(msg)
        seasonal, trend = self.decomp(x)
        # Linear over time, per channel: [B, L, C] -> [B, C, L] -> [B, C, H] -> [B, H, C].
        out = self.linear_seasonal(seasonal.transpose(1, 2)) + self.linear_trend(trend.transpose(1, 2))
        return out.transpose(1, 2)


def fill_for_dlinear(values: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """Fill a window's unobserved cells by linear interpolation in time (0 = the mean for a channel never seen).

    Args:
        values: [..., L, C] float32 normalised (any value where unobserved).
        observed: [..., L, C] 0/1 or bool.

    Returns:
        [..., L, C] float32 with no missing value.
    """
    return linear_interpolate(values, observed, fill_value=0.0)


@dataclass
class DLinearFit:
    """Result of :func:`train_dlinear`.

    Attributes:
        model: the trained model (best validation weights), in eval mode.
        train_s: wall-clock training time, seconds.
        epochs: epochs run.
        best_val_mse: validation MSE of the kept weights (normalised units).
        stopped: why training stopped (``patience``, ``max_epochs`` or ``budget``).
    """

    model: DLinear
    train_s: float
    epochs: int
    best_val_mse: float
    stopped: str


def train_dlinear(
    cfg: DLinearConfig,
    train_batches: Callable[[np.random.Generator], list[tuple[np.ndarray, np.ndarray, np.ndarray]]],
    val_batches: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    *,
    budget_s: float | None = None,
) -> DLinearFit:
    """Train DLinear with Adam on MSE over observed targets, early stopping on validation MSE.

    Args:
        cfg: hyper-parameters.
        train_batches: called once per epoch with the run's random generator; returns that epoch's shuffled batches
            ``(x [B, L, C] float32 complete, y [B, H, C] float32, y_observed [B, H, C] 0/1)``.
        val_batches: fixed validation batches in the same layout.
        budget_s: wall-clock limit, seconds (the epoch in progress is finished); None = no limit.

    Returns:
        A :class:`DLinearFit` holding the best-validation model.
    """
    # DLinear's matrix products are tiny: one thread avoids the synchronisation cost that dominates with two or
    # more on a busy CPU (10x slower steps measured on the 2-core benchmark machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(cfg, train_batches, val_batches, budget_s)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: DLinearConfig, train_batches, val_batches, budget_s: float | None) -> DLinearFit:
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = DLinear(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    best_state = copy.deepcopy(model.state_dict())
    best = float("inf")
    bad = 0
    t0 = time.perf_counter()
    stopped = "max_epochs"
    epoch = 0
    for epoch in range(1, cfg.max_epochs + 1):  # noqa: B007 (epoch is reported after the loop)
        model.train()
        for x, y, m in train_batches(rng):
            pred = model(torch.from_numpy(x))
            mask = torch.from_numpy(m)
            loss = (((pred - torch.from_numpy(y)) ** 2) * mask).sum() / mask.sum().clamp_min(1.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
        val = evaluate_mse(model, val_batches)
        log.info("DLinear epoch %d: validation MSE %.4f", epoch, val)
        if val < best:
            best, bad = val, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad += 1
        # The paper halves the learning rate every epoch (``lradj type1``).
        for group in opt.param_groups:
            group["lr"] *= 0.5
        if bad >= cfg.patience:
            stopped = "patience"
            break
        if budget_s is not None and time.perf_counter() - t0 > budget_s:
            stopped = "budget"
            break
    model.load_state_dict(best_state)
    model.eval()
    return DLinearFit(model=model, train_s=time.perf_counter() - t0, epochs=epoch, best_val_mse=best, stopped=stopped)


@torch.no_grad()
def evaluate_mse(model: nn.Module, batches: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> float:
    """MSE over observed targets, pooled over all batches (normalised units)."""
    model.eval()
    num = 0.0
    den = 0.0
    for x, y, m in batches:
        pred = model(torch.from_numpy(x)).numpy()
        num += float((((pred - y) ** 2) * m).sum())
        den += float(m.sum())
    return num / max(den, 1.0)
