"""Calendar features shared by training and the gateway (numpy only, so the edge can import it).

The model receives, for each of the L past and H future steps, the hour of day, the day of week and the day of year
as sin/cos pairs (6 features). They are computed in the stations' local civil time (the dataset spec's
``timezone``, daylight saving time included; or a fixed ``utc_offset_s``), because the
diurnal cycle of traffic and heating follows local time, not UTC. The definition is recorded in the bundle's card
(``CALENDAR_FEATURES``) so the gateway computes exactly what training saw.
"""

from __future__ import annotations

import numpy as np

__all__ = ["CALENDAR_FEATURES", "calendar_features", "utc_offsets"]

#: Names of the calendar features, in column order.
CALENDAR_FEATURES: tuple[str, ...] = (
    "hour_sin",
    "hour_cos",
    "dow_sin",
    "dow_cos",
    "doy_sin",
    "doy_cos",
)

_DAY_S = 86_400


def utc_offsets(epoch_s: np.ndarray, timezone: str) -> np.ndarray:
    """The offset of local civil time from UTC at each instant, seconds (daylight saving time included).

    Args:
        epoch_s: [N] seconds since the epoch (UTC).
        timezone: ``UTC``, a fixed offset (``+08:00``, ``-05:30``) or an IANA name (``Europe/Berlin``; stdlib
            ``zoneinfo``, so the gateway needs no extra package).

    Returns:
        [N] float64 offsets, seconds.

    Raises:
        ValueError: an unknown time zone.
    """
    import datetime as dt
    import re
    import zoneinfo

    t = np.asarray(epoch_s, dtype=np.float64)
    text = str(timezone).strip()
    if text.upper() in ("UTC", "Z", "GMT", ""):
        return np.zeros(t.shape)
    m = re.fullmatch(r"(?:UTC)?([+-])(\d{2}):?(\d{2})", text)
    if m:
        sign = 1 if m.group(1) == "+" else -1
        return np.full(t.shape, sign * (int(m.group(2)) * 3600 + int(m.group(3)) * 60), dtype=np.float64)
    try:
        tz = zoneinfo.ZoneInfo(text)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        msg = f"unknown time zone {timezone!r}"
        raise ValueError(msg) from exc
    # Offsets change at most every few months and at quarter-hour instants: look each quarter hour up once.
    quarter = np.floor(t / 900.0)
    uniq, inv = np.unique(quarter, return_inverse=True)
    offs = np.array([dt.datetime.fromtimestamp(q * 900.0, tz).utcoffset().total_seconds() for q in uniq])
    return offs[inv].reshape(t.shape)


def calendar_features(epoch_s: np.ndarray, utc_offset_s: int = 0, timezone: str | None = None) -> np.ndarray:
    """Calendar features for a run of time steps.

    Args:
        epoch_s: [N] int64 or float, seconds since 1970-01-01T00:00:00Z (step start times).
        utc_offset_s: offset of the stations' local time from UTC, seconds; used when ``timezone`` is None.
        timezone: the stations' time zone (the dataset spec's ``timezone``, in the bundle card); with daylight
            saving time the local hour follows the clock change. Takes precedence over ``utc_offset_s``.

    Returns:
        [N, 6] float32: sin/cos of hour of day (period 24 h), day of week (period 7 d, Monday = 0) and day of year
        (period 365.25 d), in local time. Column order is ``CALENDAR_FEATURES``.

    Raises:
        ValueError: if ``epoch_s`` is not one-dimensional.
    """
    t = np.asarray(epoch_s, dtype=np.float64)
    if t.ndim != 1:
        msg = f"epoch_s must be 1-D, got shape {t.shape}"
        raise ValueError(msg)
    local = t + (utc_offsets(t, timezone) if timezone else float(utc_offset_s))
    days = np.floor(local / _DAY_S)
    hour = (local - days * _DAY_S) / 3600.0  # fractional hour of day, [0, 24)
    dow = np.mod(days + 3.0, 7.0)  # 1970-01-01 was a Thursday (Monday = 0 -> Thursday = 3)
    # Day of year without calendar arithmetic: the mean tropical year is enough for a smooth seasonal phase.
    doy = np.mod(local / _DAY_S, 365.2425)
    two_pi = 2.0 * np.pi
    out = np.stack(
        [
            np.sin(two_pi * hour / 24.0),
            np.cos(two_pi * hour / 24.0),
            np.sin(two_pi * dow / 7.0),
            np.cos(two_pi * dow / 7.0),
            np.sin(two_pi * doy / 365.2425),
            np.cos(two_pi * doy / 365.2425),
        ],
        axis=-1,
    )
    return out.astype(np.float32)
