"""A private RabbitMQ with its MQTT plugin, on free loopback ports with a temporary config, for the "any broker" test.

Everything lives in one temporary folder: the node's database (RABBITMQ_MNESIA_BASE), logs (RABBITMQ_LOG_BASE), the
config (RABBITMQ_CONFIG_FILE: the AMQP listener and ``mqtt.listeners.tcp.default``), the enabled-plugins file and the
Erlang cookie (HOME). The node's own epmd runs on a private port (ERL_EPMD_PORT), started here and stopped after, so
nothing outlives the test. The real ``rabbitmq-server`` script is used, not Debian's wrapper (which would switch to the
``rabbitmq`` user, who cannot read a root-owned temporary folder).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from gapcast.tools.localbroker import free_port

__all__ = ["LocalRabbitMQ", "find_rabbitmq_server"]


def find_rabbitmq_server() -> str | None:
    """The real ``rabbitmq-server`` script (``/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin``), or None."""
    cands = sorted(glob.glob("/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin/rabbitmq-server"))
    return cands[-1] if cands else None


def _epmd() -> str | None:
    return shutil.which("epmd") or next(iter(sorted(glob.glob("/usr/lib/erlang/erts-*/bin/epmd"))), None)


class LocalRabbitMQ:
    """RabbitMQ + rabbitmq_mqtt on 127.0.0.1; ``host``/``port`` are the MQTT listener (anonymous access allowed).

    Args:
        workdir: an empty folder for everything the node writes.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.host = "127.0.0.1"
        self.port = free_port()
        self.amqp_port = free_port()
        self.dist_port = free_port()
        self.epmd_port = free_port()
        self.proc: subprocess.Popen | None = None
        self.epmd: subprocess.Popen | None = None
        self.startup_s: float | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def _env(self) -> dict[str, str]:
        w = self.workdir
        (w / "home").mkdir(exist_ok=True)
        (w / "rabbitmq.conf").write_text(
            "\n".join(
                [
                    f"listeners.tcp.default = 127.0.0.1:{self.amqp_port}",
                    f"mqtt.listeners.tcp.default = 127.0.0.1:{self.port}",
                    "mqtt.allow_anonymous = true",
                    "loopback_users = none",
                    "log.console = false",
                    "log.file.level = warning",
                ]
            )
            + "\n"
        )
        (w / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        env = dict(os.environ)
        env.update(
            HOME=str(w / "home"),
            RABBITMQ_NODENAME=f"gapcast{self.port}@localhost",
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.amqp_port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            ERL_EPMD_PORT=str(self.epmd_port),
            ERL_EPMD_ADDRESS="127.0.0.1",
            RABBITMQ_MNESIA_BASE=str(w / "mnesia"),
            RABBITMQ_LOG_BASE=str(w / "log"),
            RABBITMQ_CONFIG_FILE=str(w / "rabbitmq.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(w / "enabled_plugins"),
        )
        return env

    def start(self, timeout_s: float = 90.0) -> LocalRabbitMQ:
        """Start epmd and the node; return once the MQTT listener answers a CONNECT.

        Raises:
            RuntimeError: the node exits or does not listen within ``timeout_s`` (with the log's tail).
        """
        server, epmd = find_rabbitmq_server(), _epmd()
        if server is None or epmd is None:
            msg = "rabbitmq-server is not installed (make test installs Debian's rabbitmq-server)"
            raise RuntimeError(msg)
        env = self._env()
        t0 = time.monotonic()
        self.epmd = subprocess.Popen(
            [epmd, "-port", str(self.epmd_port), "-address", "127.0.0.1"], env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        out = open(self.workdir / "server.out", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([server], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                msg = f"rabbitmq-server exited with code {self.proc.returncode}: {self.log_tail()}"
                raise RuntimeError(msg)
            if self._mqtt_answers():
                self.startup_s = time.monotonic() - t0
                return self
            time.sleep(0.2)
        tail = self.log_tail()
        self.stop()
        msg = f"RabbitMQ's MQTT listener did not answer on {self.host}:{self.port} within {timeout_s:g} s: {tail}"
        raise RuntimeError(msg)

    def _mqtt_answers(self) -> bool:
        # A bare MQTT 3.1.1 CONNECT; CONNACK 0x20 0x02 .. 0x00 means the plugin is up (the port opens a bit earlier).
        connect = bytes([0x10, 14, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 30, 0, 2]) + b"hc"
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0) as s:
                s.sendall(connect)
                s.settimeout(2.0)
                return s.recv(4)[:1] == b"\x20"
        except OSError:
            return False

    def log_tail(self, n: int = 15) -> str:
        lines: list[str] = []
        for p in [self.workdir / "server.out", *sorted((self.workdir / "log").glob("*.log"))]:
            if p.exists():
                lines += p.read_text(errors="replace").splitlines()[-n:]
        return "\n".join(lines[-2 * n :])

    def stop(self) -> None:
        """SIGTERM the node (a clean stop), SIGKILL after 20 s; then its epmd."""
        for attr, grace in (("proc", 20), ("epmd", 5)):
            p = getattr(self, attr)
            if p is None:
                continue
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(grace)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, signal.SIGKILL)
                    p.wait(5)
            setattr(self, attr, None)
