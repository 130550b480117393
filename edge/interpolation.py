"""The no-model backend: vectorised linear interpolation in the window and a seasonal-naive / persistence forecast.

The agent (:mod:`gapcast.edge.agent`, which re-exports both names) serves every row with it when no model is loaded
and falls back to it per sub-batch when the model backend fails. Pure numpy; results equal
:func:`gapcast.baselines.linear_interpolate` and :func:`gapcast.baselines.locf` per series.
"""

from __future__ import annotations

import numpy as np

from gapcast.baselines import locf
from gapcast.edge.backends import Backend

__all__ = ["InterpolationBackend", "interpolate_batch"]


def interpolate_batch(values: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """Vectorised :func:`gapcast.baselines.linear_interpolate` for a batch of windows (same results, no per-series
    Python loop): linear in time between the nearest observations on each side, the nearest observation beyond the
    first/last one, 0 (the normalised mean) for a channel never observed.

    Args:
        values: [B, L, C] float32, anything where unobserved.
        observed: [B, L, C] bool.

    Returns:
        [B, L, C] float32, equal to ``values`` where observed.
    """
    B, L, C = values.shape
    t = np.arange(L)[None, :, None]
    prev = np.maximum.accumulate(np.where(observed, t, -1), axis=1)  # [B, L, C] index of the last observation <= t
    nxt = np.flip(np.minimum.accumulate(np.flip(np.where(observed, t, L), axis=1), axis=1), axis=1)  # first >= t
    has_prev, has_next = prev >= 0, nxt < L
    v_prev = np.take_along_axis(values, np.clip(prev, 0, L - 1), axis=1)
    v_next = np.take_along_axis(values, np.clip(nxt, 0, L - 1), axis=1)
    span = np.maximum(nxt - prev, 1)
    w = (t - prev) / span
    inner = v_prev + w * (v_next - v_prev)
    out = np.where(has_prev & has_next, inner, np.where(has_prev, v_prev, np.where(has_next, v_next, 0.0)))
    return np.where(observed, values, out).astype(np.float32)


class InterpolationBackend(Backend):
    """The no-model backend: linear interpolation inside the window (LOCF at its newest edge) and a seasonal-naive
    forecast (one day back when the cadence divides a day and the lookback holds a day; persistence otherwise).

    Args:
        horizon: H, steps.
        season: season length, steps (0: persistence).
    """

    name = "interpolation"

    def __init__(self, horizon: int, season: int = 0) -> None:
        self.horizon = horizon
        self.season = season

    def describe(self) -> str:
        fc = f"seasonal naive ({self.season} steps)" if self.season else "persistence"
        return f"interpolation (linear in the window, LOCF at its edge; forecast {fc}, {self.horizon} steps)"

    def run(self, values: np.ndarray, observed: np.ndarray, calendar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """See :meth:`gapcast.edge.backends.Backend.run`."""
        m = observed > 0.5
        imputed = interpolate_batch(values, m)
        if self.season and values.shape[-2] >= self.season:
            T = values.shape[-2]
            filled = locf(values, m)
            idx = T - self.season + (np.arange(self.horizon) % self.season)
            forecast = np.take(filled, idx, axis=-2)
        else:
            forecast = np.repeat(locf(values, m)[..., -1:, :], self.horizon, axis=-2)
        return imputed.astype(np.float32), forecast.astype(np.float32)
