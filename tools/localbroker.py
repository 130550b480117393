"""A private Mosquitto broker on a free loopback port, for tests, the demo and the benchmarks.

Never a public broker: gapcast's tests and demo start their own and stop it afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from gapcast import GapcastError

__all__ = ["BrokerError", "LocalBroker", "find_mosquitto", "free_port"]

log = logging.getLogger(__name__)


class BrokerError(GapcastError):
    """The private broker could not be started."""


def find_mosquitto() -> str:
    """Path of the ``mosquitto`` binary.

    Raises:
        BrokerError: when it is not installed (the message says how to install it).
    """
    for cand in (shutil.which("mosquitto"), "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if cand and Path(cand).is_file():
            return cand
    msg = "mosquitto is not installed: `sudo apt-get install mosquitto` (make test and make demo do it for you)"
    raise BrokerError(msg)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalBroker:
    """A Mosquitto process on 127.0.0.1 with a temporary config and persistence folder.

    The port and the persistence folder survive :meth:`kill` / :meth:`start`, so a restarted broker keeps its
    persistent sessions and retained messages (Mosquitto saves them on a clean stop and every ``autosave_interval``).

    Args:
        port: TCP port (default: a free one).
        workdir: folder for the config, log and persistence (default: a new temporary folder).
        extra_config: lines appended to the generated config (listeners, TLS, ACLs...). When it holds its own
            ``listener`` line, no default listener is written.
    """

    def __init__(self, port: int | None = None, workdir: Path | None = None, extra_config: str = "") -> None:
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="gapcast-mosquitto-")
        self.workdir = Path(workdir or self._tmp.name)  # type: ignore[union-attr]
        self.extra_config = extra_config
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """``mqtt://127.0.0.1:PORT``."""
        return f"mqtt://{self.host}:{self.port}"

    def _write_config(self) -> Path:
        conf = self.workdir / "mosquitto.conf"
        lines = [
            "persistence true",
            f"persistence_location {self.workdir}/",
            "autosave_interval 1",
            f"log_dest file {self.workdir / 'mosquitto.log'}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "max_queued_messages 0",
            "max_inflight_messages 0",
            "message_size_limit 0",
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            # Started as root, Mosquitto drops to the 'mosquitto' user, which cannot write a root-owned 0700 temp
            # folder: no log and no persistence (sessions would not survive a restart). Stay as the caller.
            lines.append("user root")
        if "listener" not in self.extra_config:
            lines += [f"listener {self.port} 127.0.0.1", "allow_anonymous true"]
        conf.write_text("\n".join(lines) + "\n" + self.extra_config + "\n")
        return conf

    def start(self, timeout_s: float = 10.0) -> LocalBroker:
        """Start the broker and wait until it accepts TCP connections.

        Raises:
            BrokerError: if it exits or does not listen within ``timeout_s``.
        """
        binary = find_mosquitto()
        conf = self._write_config()
        self.proc = subprocess.Popen(
            [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                msg = f"mosquitto exited with code {self.proc.returncode}: {err.strip()} {self.log_tail()}"
                raise BrokerError(msg)
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), timeout=0.2):
                return self
            time.sleep(0.05)
        self.stop()
        msg = f"mosquitto did not listen on {self.host}:{self.port} within {timeout_s} s"
        raise BrokerError(msg)

    def log_tail(self, n: int = 20) -> str:
        path = self.workdir / "mosquitto.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""

    def kill(self) -> None:
        """SIGKILL the broker (a crash: no clean save of state beyond the last autosave)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        """Stop the broker cleanly (SIGTERM, then SIGKILL after 5 s)."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self.proc and self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def close(self) -> None:
        """Stop and remove the temporary folder."""
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
