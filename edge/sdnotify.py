"""systemd's readiness and watchdog protocol (``sd_notify(3)``) in a few lines of socket code.

Under ``Type=notify`` systemd passes ``NOTIFY_SOCKET`` (a unix datagram socket path, or ``@name`` for an abstract
socket); the service sends newline-separated ``KEY=VALUE`` datagrams:

- ``READY=1`` once it serves (systemd marks the unit started only then, so ``After=gapcast-edge`` means "running");
- ``WATCHDOG=1`` at least every ``WatchdogSec`` (systemd passes it as ``WATCHDOG_USEC``); when the pings stop,
  systemd kills the service with SIGABRT and ``Restart=`` brings it back. The agent pings from its step loop, so a
  hung step loop (a stuck backend call, a deadlock) stops the pings, while paho's network thread alone cannot keep
  a dead agent "alive";
- ``STATUS=...`` a one-line state shown by ``systemctl status``;
- ``STOPPING=1`` when it begins to shut down.

Without ``NOTIFY_SOCKET`` (run by hand, in a container, in tests) every call is a no-op. Source: sd_notify(3) and
sd_watchdog_enabled(3) of systemd.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

__all__ = ["Notifier", "watchdog_interval_s"]

log = logging.getLogger(__name__)


def watchdog_interval_s(environ: Mapping[str, str] | None = None) -> float | None:
    """How often to ping the watchdog: half of ``WATCHDOG_USEC`` (what sd_watchdog_enabled(3) advises), seconds.

    Args:
        environ: the environment (default ``os.environ``).

    Returns:
        The ping interval in seconds, or None when systemd set no watchdog for this process (no ``WATCHDOG_USEC``,
        or ``WATCHDOG_PID`` names another process).
    """
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 1e6 / 2


class Notifier:
    """Sends sd_notify datagrams to ``NOTIFY_SOCKET``; every method is a no-op when it is unset.

    Args:
        environ: the environment (default ``os.environ``); ``NOTIFY_SOCKET`` is a path or ``@abstract-name``.

    Attributes:
        enabled: a notify socket is configured.
        watchdog_s: the ping interval (:func:`watchdog_interval_s`), or None without a watchdog.
        sent: datagrams sent; failures are logged once and counted in ``errors``, never raised (the agent keeps
            serving when systemd is gone).
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = None
        if path.startswith("@"):
            self.address = b"\0" + path[1:].encode()  # Linux abstract namespace
        elif path.startswith("/"):
            self.address = path
        self.enabled = self.address is not None
        self.watchdog_s = watchdog_interval_s(env) if self.enabled else None
        self.sent = 0
        self.errors = 0
        self._sock: socket.socket | None = None
        self._next_ping = 0.0

    def notify(self, **fields: str | int) -> bool:
        """Send one datagram ``KEY=VALUE\\n...``; ``notify(READY=1, STATUS="serving")``.

        Returns:
            Whether it was sent (False without a socket or on an error, which is logged the first time).
        """
        if self.address is None:
            return False
        msg = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(msg, self.address)
        except OSError as exc:
            self.errors += 1
            if self.errors == 1:
                log.warning("sd_notify to NOTIFY_SOCKET failed: %s (further failures are counted, not logged)", exc)
            return False
        self.sent += 1
        return True

    def ready(self, status: str = "") -> bool:
        """``READY=1`` (with a ``STATUS=`` line when given)."""
        return self.notify(READY=1, **({"STATUS": status} if status else {}))

    def status(self, text: str) -> bool:
        """``STATUS=text`` (one line: newlines become spaces)."""
        return self.notify(STATUS=text.replace("\n", " "))

    def stopping(self, status: str = "") -> bool:
        """``STOPPING=1``."""
        return self.notify(STOPPING=1, **({"STATUS": status} if status else {}))

    def watchdog(self, mono_s: float) -> bool:
        """Ping the watchdog when the interval has passed since the last ping; call it from the step loop.

        Args:
            mono_s: the monotonic clock, seconds.

        Returns:
            Whether a ping was sent now.
        """
        if self.watchdog_s is None or mono_s < self._next_ping:
            return False
        self._next_ping = mono_s + self.watchdog_s
        return self.notify(WATCHDOG=1)

    def close(self) -> None:
        """Close the socket."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
