"""One RFC 3339 formatter and parser for every part (edge payloads, fleet, replay, cards, benchmarks).

Timestamps on the wire are RFC 3339 in UTC with a ``Z`` suffix and whole seconds (``2016-05-01T00:00:00Z``);
the parser also takes an explicit offset (``+08:00``) and fractional seconds. Pure stdlib, so the gateway may import it.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

__all__ = ["format_rfc3339", "now_rfc3339", "parse_rfc3339"]


def format_rfc3339(epoch_s: float) -> str:
    """Epoch seconds -> RFC 3339 UTC with a ``Z`` suffix, truncated to whole seconds.

    Args:
        epoch_s: seconds since 1970-01-01T00:00:00Z (int or float).

    Returns:
        e.g. ``"2016-05-01T00:00:00Z"``.

    Raises:
        OverflowError, ValueError, OSError: if ``epoch_s`` is outside what the platform's ``gmtime`` handles.
    """
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(epoch_s)))


def now_rfc3339() -> str:
    """The current wall-clock time as RFC 3339 UTC (``format_rfc3339(time.time())``)."""
    return format_rfc3339(time.time())


def parse_rfc3339(text: str) -> float:
    """RFC 3339 text -> epoch seconds (float).

    Args:
        text: ``YYYY-MM-DDTHH:MM:SS[.fff](Z|±HH:MM)``; a lowercase ``t``/``z`` and a space separator are accepted
            (RFC 3339 section 5.6 allows them). A time without an offset is refused: RFC 3339 requires one.

    Returns:
        Epoch seconds.

    Raises:
        ValueError: if the text is not RFC 3339 or has no offset.
    """
    s = text.strip()
    if len(s) < 20 or s[10] not in "Tt ":
        raise ValueError(f"not an RFC 3339 timestamp: {text!r}")
    if s[-1] in "Zz":
        s = s[:-1] + "+00:00"
    dt = datetime.fromisoformat(s[:10] + "T" + s[11:])
    if dt.tzinfo is None:
        raise ValueError(f"RFC 3339 timestamp without an offset: {text!r}")
    return dt.astimezone(timezone.utc).timestamp()
