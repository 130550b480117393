"""Broker URLs for the command-line tools: ``mqtt://[user[:password]@]host[:port]`` or ``mqtts://...``.

One parser for every tool that dials a broker from a URL (``gapcast replay``, ``gapcast fleet``, ``gapcast sink``, the
benchmarks); the gateway itself reads host and port from ``edge.toml``.

The password need not be in the URL (where ``ps`` and the shell history show it): :func:`resolve_broker_url` takes it
from ``--password-file FILE`` (:func:`add_password_argument`) or the ``GAPCAST_MQTT_PASSWORD`` environment variable,
for the user name in the URL (``mqtts://gapcast-cloud@broker:8883``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import unquote, urlsplit

__all__ = ["PASSWORD_ENV", "BrokerURL", "add_password_argument", "parse_broker_url", "resolve_broker_url"]

#: The environment variable a broker password may come from.
PASSWORD_ENV = "GAPCAST_MQTT_PASSWORD"


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
    password: str | None = field(default=None, repr=False)

    def __str__(self) -> str:
        """The URL without the password (safe to log)."""
        user = f"{self.username}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"


def parse_broker_url(url: str | BrokerURL) -> BrokerURL:
    """Parse a broker URL; a bare ``host[:port]`` means ``mqtt://``.

    Args:
        url: ``mqtt://``, ``mqtts://``, ``tcp://`` or ``ssl://`` URL, or an already parsed :class:`BrokerURL`
            (returned as it is: what :func:`resolve_broker_url` made travels through the tools' ``broker`` arguments).

    Returns:
        The :class:`BrokerURL`.

    Raises:
        ValueError: another scheme, no host, or a bad port (the message names the URL).
    """
    if isinstance(url, BrokerURL):
        return url
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


def resolve_broker_url(
    url: str | BrokerURL, *, password_file: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> BrokerURL:
    """Parse ``url`` and supply its password from a file or the environment when the URL holds none.

    Order: the password in the URL (discouraged: ``ps`` shows it), then ``password_file`` (its first line, stripped),
    then ``$GAPCAST_MQTT_PASSWORD``. A password needs a user name (in the URL); without one the environment variable
    is ignored and a password file is an error.

    Args:
        url: the broker URL (see :func:`parse_broker_url`).
        password_file: a file holding the password (e.g. a systemd credential or a 0600 file).
        environ: the environment (default ``os.environ``).

    Returns:
        The :class:`BrokerURL` with its password.

    Raises:
        ValueError: a bad URL, an unreadable or empty password file, a password file without a user name, or a
            password both in the URL and in a file.
    """
    b = parse_broker_url(url)
    env = os.environ if environ is None else environ
    if password_file is not None:
        if b.password is not None:
            msg = f"broker URL {b}: the password is given both in the URL and in --password-file; give one"
            raise ValueError(msg)
        if not b.username:
            msg = f"--password-file needs a user name in the broker URL (mqtt://USER@host:port), got {b}"
            raise ValueError(msg)
        try:
            text = Path(password_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            msg = f"--password-file {password_file}: cannot read it: {exc}"
            raise ValueError(msg) from exc
        lines = text.splitlines()
        password = lines[0].strip() if lines else ""
        if not password:
            msg = f"--password-file {password_file} is empty"
            raise ValueError(msg)
        return replace(b, password=password)
    if b.password is None and b.username and env.get(PASSWORD_ENV):
        return replace(b, password=env[PASSWORD_ENV])
    return b


def add_password_argument(parser) -> None:
    """Add ``--password-file FILE`` to an argparse parser (the broker password, for the user in ``--broker``)."""
    parser.add_argument(
        "--password-file",
        default=None,
        metavar="FILE",
        help=f"read the broker password for the user in --broker from FILE (else ${PASSWORD_ENV}; "
        "a password inside the URL shows in ps and the shell history)",
    )
