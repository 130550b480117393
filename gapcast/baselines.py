"""Simple gap fillers and forecasters, numpy only (shared by evaluation in the cloud and the gateway's fallback).

These are the baselines every imputation paper reports (e.g. Cao et al., BRITS, NeurIPS 2018; Du et al., SAITS,
ESWA 2023): last observation carried forward (LOCF), linear interpolation in time, and the seasonal-naive
forecast (the value one season ago, 24 h for hourly air quality).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

__all__ = ["linear_interpolate", "locf", "seasonal_naive"]


def _check(values: np.ndarray, observed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    v = np.asarray(values, dtype=np.float32)
    m = np.asarray(observed).astype(bool)
    if v.shape != m.shape or v.ndim < 1:
        msg = f"values {v.shape} and observed {m.shape} must have the same shape, time on axis -2 (or only axis)"
        raise ValueError(msg)
    return v, m


def _per_series(fill: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    """Wrap a gap filler of ``[..., T, C]`` arrays: check the shapes (:func:`_check`, so a mismatch raises
    ValueError) and serve a single series ``[T]`` as ``[T, 1]``, returning ``[T]``."""

    @functools.wraps(fill)
    def wrapper(values: np.ndarray, observed: np.ndarray, *, fill_value: float = 0.0) -> np.ndarray:
        v, m = _check(values, observed)
        if v.ndim == 1:
            return fill(v[:, None], m[:, None], fill_value=fill_value)[:, 0]
        return fill(v, m, fill_value=fill_value)

    return wrapper


@_per_series
def locf(values: np.ndarray, observed: np.ndarray, *, fill_value: float = 0.0) -> np.ndarray:
    """Last observation carried forward along time; before the first observation, the first observation is
    carried backward (next observation carried backward); a channel never observed gets ``fill_value``.

    Args:
        values: [..., T, C] float, any value where unobserved.
        observed: [..., T, C] bool or 0/1, True = observed.
        fill_value: value for channels with no observation at all (0 = the mean in normalised units).

    Returns:
        [..., T, C] float32, equal to ``values`` where observed.

    Raises:
        ValueError: on mismatched shapes.
    """
    v, m = values, observed  # checked, at least [T, C] (_per_series)
    T = v.shape[-2]
    idx = np.where(m, np.arange(T)[:, None], -1)
    idx = np.maximum.accumulate(idx, axis=-2)
    # Leading gap: take the first observation (backward fill).
    first = np.argmax(m, axis=-2)  # [..., C]
    any_obs = m.any(axis=-2)
    idx = np.where(idx < 0, first[..., None, :], idx)
    out = np.take_along_axis(v, idx, axis=-2)
    out = np.where(any_obs[..., None, :], out, np.float32(fill_value))
    return np.where(m, v, out).astype(np.float32)


@_per_series
def linear_interpolate(values: np.ndarray, observed: np.ndarray, *, fill_value: float = 0.0) -> np.ndarray:
    """Linear interpolation in time between the nearest observations on each side; constant extrapolation at the
    edges (the nearest observation); ``fill_value`` for a channel never observed.

    Args:
        values: [..., T, C] float.
        observed: [..., T, C] bool or 0/1.
        fill_value: value for a channel with no observation.

    Returns:
        [..., T, C] float32, equal to ``values`` where observed.

    Raises:
        ValueError: on mismatched shapes.
    """
    v, m = values, observed  # checked, at least [T, C] (_per_series)
    T = v.shape[-2]
    t = np.arange(T)
    shape = v.shape
    v2 = np.moveaxis(v, -2, -1).reshape(-1, T)  # [N, T]
    m2 = np.moveaxis(m, -2, -1).reshape(-1, T)
    out = np.full_like(v2, np.float32(fill_value))
    for i in range(v2.shape[0]):
        mi = m2[i]
        if mi.any():
            out[i] = np.interp(t, t[mi], v2[i, mi])
    out = np.moveaxis(out.reshape(*shape[:-2], shape[-1], T), -1, -2)
    return np.where(m, v, out).astype(np.float32)


def seasonal_naive(history: np.ndarray, observed: np.ndarray, horizon: int, *, season: int = 24) -> np.ndarray:
    """Forecast each future step with the value one season earlier (LOCF-filled history where unobserved).

    Args:
        history: [..., T, C] float, T >= season.
        observed: [..., T, C] bool or 0/1.
        horizon: H, steps to forecast.
        season: season length, steps (24 for hourly data with a daily cycle).

    Returns:
        [..., H, C] float32: step h is history[T - season + (h mod season)].

    Raises:
        ValueError: if T < season or shapes mismatch.
    """
    v, m = _check(history, observed)
    T = v.shape[-2]
    if T < season:
        msg = f"seasonal naive needs at least one season of history ({season} steps), got {T}"
        raise ValueError(msg)
    filled = locf(v, m)
    idx = T - season + (np.arange(horizon) % season)
    return np.take(filled, idx, axis=-2).astype(np.float32)
