"""The real windows an export checks against: calibration windows from the run's training range, parity, gate and
golden windows from its validation range, and the outage / missing-channel copies (a stage group of
:func:`gapcast.export.pipeline.export_bundle`; pipeline re-exports the public names).

Each window set is a tuple (values [N, L+H, C] float32 normalised with 0 where unobserved, observed [N, L+H, C]
float32 0/1, calendar [N, L+H, F] float32); C counts a context model's G neighbour channels as columns C..C+G-1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from gapcast.export import ExportError

if TYPE_CHECKING:
    from gapcast.export.pipeline import ExportOptions, ModelSpec

__all__ = ["OUTAGE", "OUTAGE_STEPS", "WindowData", "load_run_windows", "special_windows"]

OUTAGE = "72h"  # the outage of the parity and golden windows (a duration: steps of the run's cadence)
OUTAGE_STEPS = 72  # the same at hourly cadence (kept for callers of special_windows)


@dataclass(frozen=True)
class WindowData:
    """Real windows for calibration (training months) and for parity, gate and golden (validation months).

    Each is a tuple (values [N, L+H, C] float32 normalised with 0 where unobserved, observed [N, L+H, C] float32 0/1,
    calendar [N, L+H, F] float32).

    Attributes:
        train: calibration windows.
        val: validation windows.
        source: where they come from (recorded in the card).
    """

    train: tuple[np.ndarray, np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray, np.ndarray]
    source: str


def special_windows(
    values: np.ndarray, observed: np.ndarray, lookback: int, *, outage_steps: int = OUTAGE_STEPS, channel: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Copies of windows with a contiguous all-channel outage and with one channel missing for the whole past.

    Args:
        values: [N, L+H, C] float32 normalised, 0 where unobserved.
        observed: [N, L+H, C] float32 0/1.
        lookback: L.
        outage_steps: outage length, steps (clipped to L - 1 so one step stays observed).
        channel: the channel removed in the second set.

    Returns:
        (values_outage, observed_outage, values_missing_channel, observed_missing_channel), same shapes as the
        inputs; the outage ends ``(L - outage)//2`` steps before the window's present, as a real gap would.
    """
    n = min(outage_steps, lookback - 1)
    start = (lookback - n) // 2
    o1 = observed.copy()
    o1[:, start : start + n, :] = 0.0
    o2 = observed.copy()
    o2[:, :lookback, channel] = 0.0
    return values * o1, o1, values * o2, o2


def _sample(arrays: tuple[np.ndarray, ...], n: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    count = len(arrays[0])
    idx = np.sort(rng.choice(count, size=min(n, count), replace=False))
    return tuple(a[idx] for a in arrays)


def _past(values: np.ndarray, observed: np.ndarray, lookback: int) -> tuple[np.ndarray, np.ndarray]:
    """Model inputs from full windows: the past L steps, values zeroed where unobserved."""
    o = observed[:, :lookback].astype(np.float32)
    return (values[:, :lookback] * o).astype(np.float32), o


@dataclass(frozen=True)
class _ParityWindows:
    """The parity and golden windows: real validation windows and k of them with a 72 h outage / channel 0 missing.

    Attributes:
        real: (values [N, L+H, C] float32 normalised, 0 where unobserved; observed [N, L+H, C] 0/1; calendar
            [N, L+H, F]).
        outage: (values, observed) [k, L+H, C] of the first k real windows with the outage.
        missing: (values, observed) [k, L+H, C] of the first k real windows without channel 0 in the past.
    """

    real: tuple[np.ndarray, np.ndarray, np.ndarray]
    outage: tuple[np.ndarray, np.ndarray]
    missing: tuple[np.ndarray, np.ndarray]

    @property
    def k(self) -> int:
        return len(self.outage[0])


def _parity_windows(
    data: WindowData, spec: ModelSpec, opts: ExportOptions, rng: np.random.Generator
) -> _ParityWindows:
    """``opts.parity_windows`` real validation windows drawn with ``rng``, and k = max(1, min(8, N)) copies each with a
    72 h outage (half the lookback when the cadence does not divide 72 h) and with channel 0 missing. Raises nothing."""
    from gapcast.duration import DurationError, steps_of

    pv, po, pc = _sample(data.val, opts.parity_windows, rng)
    k = max(1, min(8, len(pv)))
    try:
        outage_steps = steps_of(OUTAGE, spec.cadence_s, key="parity outage")
    except DurationError:  # a cadence that does not divide 72 h: half the window instead
        outage_steps = spec.lookback // 2
    v72, o72, vmc, omc = special_windows(pv[:k], po[:k], spec.lookback, outage_steps=outage_steps)
    return _ParityWindows(real=(pv, po, pc), outage=(v72, o72), missing=(vmc, omc))


def _load_run_series(meta: dict[str, Any], dataset, data_root, wanted: list[str] | None) -> tuple[Any, dict]:
    """The run's dataset spec (the checkpoint's, or ``dataset``) and the wanted stations' series (None: all).

    Returns:
        (:class:`~gapcast.train.spec.DatasetSpec`, ``{station: series}`` in the loader's order).

    Raises:
        ExportError: the spec or the data cannot be loaded (the loader's GapcastError, chained).
    """
    from gapcast import GapcastError
    from gapcast.train.evaluate import spec_of_run
    from gapcast.train.loader import load_dataset

    try:
        spec = spec_of_run(meta, dataset)
        series = load_dataset(spec, data_root, wanted)
    except GapcastError as exc:
        msg = f"cannot load the real windows for calibration and parity: {exc}"
        raise ExportError(msg) from exc
    return spec, series


def _split_series(spec, series: dict, norm) -> dict[str, tuple[list, list]]:
    """Per split (``train``, ``val``, the spec's split): each station's normalised values [T, C] float32 and its
    epochs [T] (seconds), in station order. Raises nothing."""
    from gapcast.train.loader import split_indices

    parts: dict[str, tuple[list, list]] = {"train": ([], []), "val": ([], [])}
    for s in series.values():
        sp = split_indices(spec, s)
        for name, sl in (("train", sp.train), ("val", sp.val)):
            parts[name][0].append(norm.transform(s.values[sl]))
            parts[name][1].append(s.epoch_s[sl])
    return parts


def _context_spec(meta: dict[str, Any], series: dict):
    """The :class:`~gapcast.neighbours.ContextSpec` of a model with neighbour context, or None without one.

    Raises:
        ExportError: a neighbour the context needs is not among the loaded stations.
    """
    if not meta.get("context"):
        return None
    from gapcast.neighbours import ContextSpec

    cspec = ContextSpec.from_dict(meta["context"])
    absent = sorted(set(cspec.stations) - set(series))
    if absent:
        msg = f"the context model's neighbours {absent} are not in the loaded data: cannot build its context"
        raise ExportError(msg)
    return cspec


def _with_context(batch: tuple, ws, cspec, names: list[str], vals: list, epochs: list, lookback: int,
                  horizon: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Append the context columns C..C+G-1 to one split's windows: the other stations at the same steps, none in
    the future (zeroed from step L on).

    Args:
        batch: (values, observed [N, L+H, C], calendar [N, L+H, F]) of the windows ``ws``.
        ws: the windows (their ``starts``), made from ``vals``/``epochs`` of the stations ``names``.

    Returns:
        (values [N, L+H, C+G], observed [N, L+H, C+G], calendar unchanged).

    Raises:
        ExportError: a loaded station has no context in the model's spec.
    """
    from gapcast.train.context import series_context

    unknown = sorted(set(names) - set(cspec.stations))
    if unknown:
        msg = f"stations {unknown} have no context in the model's spec"
        raise ExportError(msg)
    ctx = series_context(cspec, [vals[names.index(n)] for n in cspec.stations],
                         [epochs[names.index(n)] for n in cspec.stations])
    series_ctx = type(ctx)([ctx.values[cspec.stations.index(n)] for n in names])
    cv, co = series_ctx.batch(ws.starts, lookback + horizon)
    cv[:, lookback:], co[:, lookback:] = 0.0, 0.0
    v, o, c = batch
    return np.concatenate([v, cv], axis=-1), np.concatenate([o, co], axis=-1), c


def load_run_windows(
    meta: dict[str, Any],
    run_config: dict[str, Any],
    *,
    data_root: str | os.PathLike | None = None,
    stations: list[str] | None = None,
    stride: int | None = None,
    dataset=None,
) -> WindowData:
    """Real windows of the run's own dataset: training range (calibration) and validation range (parity, gate,
    golden).

    Uses the dataset spec the checkpoint carries (or ``dataset``), the run's stations (``[data] stations`` in its
    config, empty = all), the checkpoint's normaliser, the spec's split, windows every ``stride`` steps (default:
    one day) whose past is at least half observed.

    Raises:
        ExportError: the data cannot be loaded or yields no windows.
    """
    from gapcast.duration import steps_of
    from gapcast.train.data import Normalizer, make_windows

    cfg = meta["config"]
    L, H = int(cfg["lookback"]), int(cfg["horizon"])
    data_cfg = run_config.get("data", {}) if isinstance(run_config, dict) else {}
    wanted = stations or list(data_cfg.get("stations") or []) or None
    spec, series = _load_run_series(meta, dataset, data_root, wanted)
    stride = stride or steps_of("1d", spec.cadence_s, key="stride")
    norm = Normalizer.from_dict(meta["normalizer"])
    utc = int(meta.get("utc_offset_s", 0))
    parts = _split_series(spec, series, norm)
    out = {}
    cspec = _context_spec(meta, series)
    for name, (vals, epochs) in parts.items():
        ws = make_windows(
            vals, epochs, lookback=L, horizon=H, stride=stride, min_observed=0.5, utc_offset_s=utc,
            station_names=list(series), timezone=spec.timezone,
        )
        if len(ws) == 0:
            msg = f"no {name} windows with at least half the past observed"
            raise ExportError(msg)
        out[name] = ws.batch(range(len(ws)))
        if cspec is not None:  # context columns C..C+G-1: the other stations at the same steps, none in the future
            out[name] = _with_context(out[name], ws, cspec, list(series), vals, epochs, L, H)
    source = (
        f"{spec.name}, stations {sorted(series)}, the spec's split; calibration from the training range, "
        f"parity/gate/golden from the validation range; windows every {stride} steps with >= 50 % of the past "
        "observed"
    )
    return WindowData(train=out["train"], val=out["val"], source=source)
