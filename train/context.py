"""Neighbour context for training and evaluation (issue 20): aligned station arrays -> per-station context series.

The context itself is built by ONE function, :func:`gapcast.neighbours.build_context` (numpy, core), which the
gateway calls too (:func:`gapcast.neighbours.context_for_windows`). A context value at step t reads only the other
stations at step t, so the context of a whole aligned range, sliced at a window, equals the context of that window
(tested): training precomputes it once per split instead of once per batch.

Layout: per station k, ``context[k]`` [T_k, G] float32 (NaN where no neighbour reported), on the station's own rows
(the rows of :class:`gapcast.train.data.WindowSet`), so a window ``(k, s)`` reads ``context[k][s : s + L]``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from gapcast.neighbours import ContextSpec, build_context, fit_context
from gapcast.train import TrainError

__all__ = ["ContextSeries", "align_rows", "context_channels", "drop_context", "fit_training_context"]

log = logging.getLogger(__name__)


def context_channels(groups: Mapping[str, Sequence[int]], n_channels: int, group: str) -> tuple[int, ...]:
    """The station columns that get context: the named group's, or every column for ``""``.

    Raises:
        TrainError: an unknown group name.
    """
    if not group:
        return tuple(range(n_channels))
    if group not in groups:
        msg = f"[model] context_group = {group!r} is not a group of the dataset (groups: {sorted(groups)})"
        raise TrainError(msg)
    return tuple(int(i) for i in groups[group])


def align_rows(epochs: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """The union grid of several stations' step times and each station's row positions in it.

    Args:
        epochs: per station [T_k] int64 step start times, seconds, increasing.

    Returns:
        ``(grid [T] int64, positions)``: ``grid[positions[k]] == epochs[k]``.
    """
    grid = np.unique(np.concatenate([np.asarray(e, dtype=np.int64) for e in epochs]))
    return grid, [np.searchsorted(grid, np.asarray(e, dtype=np.int64)) for e in epochs]


def _aligned(values: Sequence[np.ndarray], epochs: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """[S, T, C] float32 NaN-filled aligned array of per-station [T_k, C] arrays, and the row positions."""
    grid, pos = align_rows(epochs)
    C = values[0].shape[1]
    out = np.full((len(values), len(grid), C), np.nan, dtype=np.float32)
    for k, (v, p) in enumerate(zip(values, pos, strict=True)):
        out[k, p] = v
    return out, pos


@dataclass
class ContextSeries:
    """Per-station context series on the stations' own rows.

    Attributes:
        values: per station [T_k, G] float32, NaN where no neighbour reported.
    """

    values: list[np.ndarray]

    def batch(self, starts: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Context of windows ``(k, s)``: (context [B, length, G] float32, 0 where unobserved; mask [B, length, G]).

        Args:
            starts: [B, 2] int (station index, start row), as ``WindowSet.starts``.
            length: steps per window (the lookback L).
        """
        raw = np.stack([self.values[int(k)][int(s) : int(s) + length] for k, s in starts])
        obs = ~np.isnan(raw)
        return np.where(obs, raw, 0.0).astype(np.float32), obs.astype(np.float32)


def series_context(spec: ContextSpec, values: Sequence[np.ndarray], epochs: Sequence[np.ndarray]) -> ContextSeries:
    """The context of every step of every station (normalised values in, normalised context out).

    Args:
        spec: the fitted :class:`ContextSpec` (its station order = the order of ``values``).
        values: per station [T_k, C] float32 normalised, NaN where missing.
        epochs: per station [T_k] int64.

    Returns:
        :class:`ContextSeries`.
    """
    arr, pos = _aligned(values, epochs)
    obs = ~np.isnan(arr)
    ctx, cobs = build_context(spec, np.where(obs, arr, 0.0), obs)
    ctx = np.where(cobs > 0, ctx, np.nan).astype(np.float32)
    return ContextSeries([ctx[k, p] for k, p in enumerate(pos)])


def fit_training_context(
    names: Sequence[str],
    train_values: Sequence[np.ndarray],
    train_epochs: Sequence[np.ndarray],
    *,
    channel_names: Sequence[str],
    channel_index: Sequence[int],
    k: int,
) -> ContextSpec:
    """Choose each station's neighbours and weights on the (normalised) training range.

    Args:
        names: the S station names, in the order of the arrays.
        train_values: per station [T_k, C] float32 normalised training rows, NaN where missing.
        train_epochs: per station [T_k] int64.
        channel_names: all C channel names.
        channel_index: the G context columns.
        k: neighbours per station and channel.

    Returns:
        :class:`ContextSpec` (correlation weights: the specs carry no coordinates yet).

    Raises:
        TrainError: fewer than two stations.
    """
    if len(names) < 2:
        msg = f"[model] context = \"neighbours\" needs more than one station, got {len(names)}"
        raise TrainError(msg)
    arr, _ = _aligned(train_values, train_epochs)
    obs = ~np.isnan(arr)
    idx = list(channel_index)
    spec = fit_context(np.where(obs, arr, 0.0), obs, stations=list(names), channels=[channel_names[i] for i in idx],
                       channel_index=idx, k=k)
    log.info("neighbour context: %d stations, %d channels, k = %d (%s)", len(names), len(idx), k, spec.method)
    return spec


def drop_context(context_observed: np.ndarray, hide: np.ndarray, channel_index: Sequence[int], share: float,
                 rng: np.random.Generator) -> np.ndarray:
    """Context dropout for training: half of ``share`` of the windows lose all context, the other half lose it
    over the steps where their outage mask hides a context channel (the neighbours silent over the same span, as in
    a network-wide outage).

    Args:
        context_observed: [B, L, G] float32 0/1.
        hide: [B, L, C] 0/1, the outage mask of the station's own channels.
        channel_index: the G station columns of the context channels.
        share: the dropout share in [0, 1].
        rng: the run's generator.

    Returns:
        [B, L, G] float32 0/1, the mask to use (a copy).
    """
    u = rng.random(len(context_observed))
    keep = np.ones_like(context_observed)
    keep[u < share / 2] = 0.0
    span = (u >= share / 2) & (u < share)
    hid = np.asarray(hide)[..., list(channel_index)].max(axis=-1, keepdims=True)  # [B, L, 1]
    keep[span] = keep[span] * (1.0 - hid[span])
    return (context_observed * keep).astype(np.float32)
