"""``gapcast data inspect``: what an operator looks at before training a network (README, "Your own stations").

Per station: the span, the cadence found in the files against the declared one, the missing share per channel, the
longest outage per channel (as a duration), and a PNG of the observed mask (stations x time).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gapcast.duration import format_duration
from gapcast.train.data import StationSeries
from gapcast.train.spec import DatasetSpec

__all__ = ["StationSummary", "inspect_dataset", "longest_run", "mask_plot", "summary_table"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StationSummary:
    """One station's history at a glance.

    Attributes:
        station: the name.
        start, end: first and last step start, RFC 3339 UTC.
        steps: T, steps on the grid.
        cadence_found_s: the most common step between readings in the files, seconds.
        missing_share: channel -> share of steps without a reading (0..1).
        longest_outage_s: channel -> the longest run of missing steps, seconds.
        counts: duplicates, off-grid timestamps, out-of-range values, absent steps inserted.
    """

    station: str
    start: str
    end: str
    steps: int
    cadence_found_s: int
    missing_share: dict[str, float]
    longest_outage_s: dict[str, int]
    counts: dict[str, int] = field(default_factory=dict)


def longest_run(missing: np.ndarray) -> int:
    """Length of the longest run of True in a [T] bool array (0 if none)."""
    m = np.concatenate([[False], np.asarray(missing, dtype=bool), [False]])
    d = np.diff(m.astype(np.int8))
    starts, ends = np.flatnonzero(d == 1), np.flatnonzero(d == -1)
    return int((ends - starts).max()) if len(starts) else 0


def inspect_dataset(spec: DatasetSpec, series: dict[str, StationSeries]) -> list[StationSummary]:
    """Summaries of every station (sorted by name)."""
    from gapcast.timefmt import format_rfc3339

    out = []
    names = spec.channel_names
    for name in sorted(series):
        s = series[name]
        miss = ~s.observed
        out.append(StationSummary(
            station=name,
            start=format_rfc3339(float(s.epoch_s[0])),
            end=format_rfc3339(float(s.epoch_s[-1])),
            steps=len(s.epoch_s),
            cadence_found_s=int(s.native_cadence_s or spec.cadence_s),
            missing_share={c: float(miss[:, j].mean()) for j, c in enumerate(names)},
            longest_outage_s={c: longest_run(miss[:, j]) * spec.cadence_s for j, c in enumerate(names)},
            counts={"duplicates": s.duplicates, "off_grid": s.off_grid, "out_of_range": s.out_of_range,
                    "absent_steps": s.filled_rows},
        ))
    return out


def summary_table(spec: DatasetSpec, rows: list[StationSummary]) -> str:
    """A plain-text table: one line per station, then missing share / longest outage per channel."""
    lines = [f"dataset {spec.name}: {len(rows)} stations, cadence declared {spec.cadence}, time zone {spec.timezone}",
             "", f"{'station':<20} {'start (UTC)':<21} {'end (UTC)':<21} {'steps':>8} {'cadence found':>13}  "
             "dup  off-grid  out-of-range  absent"]
    for r in rows:
        found = format_duration(r.cadence_found_s)
        flag = "" if r.cadence_found_s == spec.cadence_s else (" (finer: aggregated)" if r.cadence_found_s < spec.cadence_s
                                                               else " (COARSER than declared)")
        c = r.counts
        lines.append(f"{r.station:<20} {r.start:<21} {r.end:<21} {r.steps:>8} {found:>13}  {c['duplicates']:>3} "
                     f"{c['off_grid']:>9} {c['out_of_range']:>13} {c['absent_steps']:>7}{flag}")
    lines += ["", "missing share / longest outage per channel:"]
    names = list(rows[0].missing_share) if rows else []
    width = max([len(n) for n in names] + [8])
    lines.append(f"{'station':<20} " + " ".join(f"{n:>{max(width, 14)}}" for n in names))
    for r in rows:
        cells = [f"{100 * r.missing_share[n]:4.1f}% {format_duration(r.longest_outage_s[n]) if r.longest_outage_s[n] else '-':>7}"
                 for n in names]
        lines.append(f"{r.station:<20} " + " ".join(f"{c:>{max(width, 14)}}" for c in cells))
    return "\n".join(lines)


def mask_plot(spec: DatasetSpec, series: dict[str, StationSeries], path: Path) -> Path:
    """A PNG of the observed mask: one row per station, time on x, grey = share of channels observed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(series)
    t0 = min(int(series[n].epoch_s[0]) for n in names)
    t1 = max(int(series[n].epoch_s[-1]) for n in names)
    cad = spec.cadence_s
    T = (t1 - t0) // cad + 1
    width = min(T, 2000)  # columns of the image: a column is a bin of steps
    img = np.full((len(names), width), np.nan)
    for i, n in enumerate(names):
        s = series[n]
        col = ((s.epoch_s - t0) // cad * width // T).astype(np.int64)
        share = s.observed.mean(axis=1)
        sums = np.bincount(col, weights=share, minlength=width)
        cnt = np.bincount(col, minlength=width)
        img[i, cnt > 0] = sums[cnt > 0] / cnt[cnt > 0]
    fig, ax = plt.subplots(figsize=(12, 0.4 * len(names) + 1.5))
    start, end = np.datetime64(t0, "s"), np.datetime64(t1, "s")
    ax.imshow(img, aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest",
              extent=(0, width, len(names) - 0.5, -0.5))
    ax.set_yticks(range(len(names)), names)
    ticks = np.linspace(0, width, 6)
    ax.set_xticks(ticks, [str((start + np.timedelta64(int(x / width * (t1 - t0)), "s")).astype("datetime64[D]"))
                          for x in ticks])
    ax.set(title=f"{spec.name}: share of channels observed (black = all, white = none or no data), {start} .. {end} UTC",
           xlabel="time (UTC)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
