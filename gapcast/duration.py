"""Durations with units (``"96h"``, ``"4d"``, ``"30min"``, ``"10s"``) and their conversion to steps of a cadence.

Every duration in a dataset spec, a training config, an evaluation or an agent config is written with a unit and
converted here, so that "72 h" means 72 hours at any cadence. Pure stdlib: the gateway imports it too.
"""

from __future__ import annotations

import re

from gapcast import GapcastError

__all__ = ["DurationError", "format_duration", "parse_duration", "steps_of"]

_UNITS_S = {
    "ms": 0.001,
    "s": 1, "sec": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
    "w": 604800, "week": 604800, "weeks": 604800,
}
_PART = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]+)\s*")


class DurationError(GapcastError, ValueError):
    """A duration that does not parse, or that is not a whole number of steps of the cadence."""


def parse_duration(text: str | int | float, *, key: str = "duration") -> float:
    """``"96h"`` -> 345600.0 seconds.

    Args:
        text: a number with a unit: ms, s, min (or m), h, d, w (long forms like ``"hours"`` too), e.g. ``"10min"``,
            ``"1.5h"``, or several such parts added up, largest unit first (``"1h30min"``, ``"2d 12h"``, as Go's
            and systemd's time spans). A bare number is refused: a duration carries its unit.
        key: the config key, named in the error.

    Returns:
        The duration in seconds (float; > 0).

    Raises:
        DurationError: unknown unit, no unit, negative or zero.
    """
    if isinstance(text, bool) or not isinstance(text, str):
        msg = f"{key} = {text!r}: write a duration with its unit, e.g. \"96h\", \"30min\", \"4d\""
        raise DurationError(msg)
    parts, pos, low = [], 0, text.lower()
    while pos < len(low) and (m := _PART.match(low, pos)) and m.end() > pos:
        parts.append(m)
        pos = m.end()
    sizes = [_UNITS_S.get(m.group(2)) for m in parts]
    if not parts or pos != len(low) or None in sizes or sizes != sorted(set(sizes), reverse=True):
        msg = (f"{key} = {text!r} is not a duration (a number and a unit: ms, s, min, h, d, w; e.g. \"96h\", "
               "or parts largest first: \"1h30min\")")
        raise DurationError(msg)
    seconds = sum(float(m.group(1)) * size for m, size in zip(parts, sizes, strict=True))
    if seconds <= 0:
        msg = f"{key} = {text!r}: a duration must be > 0"
        raise DurationError(msg)
    return seconds


def steps_of(text: str, cadence_s: float, *, key: str = "duration") -> int:
    """A duration as a whole number of cadence steps: ``steps_of("72h", 600)`` -> 432.

    Args:
        text: a duration (see :func:`parse_duration`).
        cadence_s: the step length in seconds (> 0).
        key: the config key, named in the error.

    Returns:
        The number of steps (>= 1).

    Raises:
        DurationError: the text is not a duration, or it is not a multiple of the cadence.
    """
    seconds = parse_duration(text, key=key)
    steps = seconds / cadence_s
    if abs(steps - round(steps)) > 1e-9 * max(1.0, steps) or round(steps) < 1:
        msg = f"{key} = {text!r} is not a multiple of the cadence ({format_duration(cadence_s)})"
        raise DurationError(msg)
    return int(round(steps))


def format_duration(seconds: float) -> str:
    """Seconds -> the shortest exact form: 86400 -> ``"1d"``, 5400 -> ``"90min"``, 0.5 -> ``"500ms"``."""
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if seconds >= size and abs(seconds / size - round(seconds / size)) < 1e-9:
            return f"{round(seconds / size)}{unit}"
    return f"{round(seconds * 1000)}ms"
