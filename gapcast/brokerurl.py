"""Broker URLs for the command-line tools: ``mqtt://[user[:password]@]host[:port]`` or ``mqtts://...``.

One parser for every tool that dials a broker from a URL (``gapcast replay``, ``gapcast fleet``, the benchmarks); the
gateway itself reads host and port from ``edge.toml``.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

__all__ = ["BrokerURL", "parse_broker_url"]


@dataclass(frozen=True)
class BrokerURL:
    """Where the broker is.

    Attributes:
        host: host name or address.
        port: TCP port (default 1883, 8883 with TLS).
        tls: connect with TLS (``mqtts://`` or ``ssl://``).
        username, password: credentials from the URL's user info (percent-decoded), if any.
    """

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None


def parse_broker_url(url: str) -> BrokerURL:
    """Parse a broker URL; a bare ``host[:port]`` means ``mqtt://``.

    Args:
        url: ``mqtt://``, ``mqtts://``, ``tcp://`` or ``ssl://`` URL.

    Returns:
        The :class:`BrokerURL`.

    Raises:
        ValueError: another scheme, no host, or a bad port (the message names the URL).
    """
    parts = urlsplit(url if "://" in url else f"mqtt://{url}")
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        msg = f"broker URL {url!r}: the scheme must be mqtt:// or mqtts://"
        raise ValueError(msg)
    tls = parts.scheme in ("mqtts", "ssl")
    if not parts.hostname:
        msg = f"broker URL {url!r} has no host"
        raise ValueError(msg)
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError as exc:
        msg = f"broker URL {url!r}: bad port"
        raise ValueError(msg) from exc
    return BrokerURL(
        host=parts.hostname,
        port=port,
        tls=tls,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
    )
