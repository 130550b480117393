"""A private InfluxDB 1.x (``influxd``, Debian's ``influxdb``) on free loopback ports with a temporary config."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from gapcast.tools.localbroker import free_port


class LocalInflux:
    """``influxd`` with its meta, data and WAL folders under ``workdir``; HTTP on a free port; nothing else on.

    Args:
        workdir: an empty folder (the test's tmp_path child).
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.http_port = free_port()
        self.rpc_port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout_s: float = 30.0) -> LocalInflux:
        binary = shutil.which("influxd") or "/usr/bin/influxd"
        w = self.workdir
        w.mkdir(parents=True, exist_ok=True)
        conf = w / "influxdb.conf"
        conf.write_text(
            f"""reporting-disabled = true
bind-address = "127.0.0.1:{self.rpc_port}"
[meta]
  dir = "{w}/meta"
[data]
  dir = "{w}/data"
  wal-dir = "{w}/wal"
  query-log-enabled = false
[http]
  enabled = true
  bind-address = "127.0.0.1:{self.http_port}"
  log-enabled = false
[monitor]
  store-enabled = false
[continuous_queries]
  enabled = false
"""
        )
        self.log = open(w / "influxd.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([binary, "-config", str(conf)], stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"influxd exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/ping", timeout=0.5) as r:
                    if r.status == 204:
                        return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"influxd did not answer /ping within {timeout_s} s: {self.log_tail()}")

    def query(self, db: str, q: str) -> dict:
        """An InfluxQL query, epoch seconds; the parsed JSON answer."""
        params = urllib.parse.urlencode({"db": db, "q": q, "epoch": "s"})
        with urllib.request.urlopen(f"{self.url}/query?{params}", timeout=10) as r:
            return json.loads(r.read())

    def log_tail(self, n: int = 20) -> str:
        p = self.workdir / "influxd.log"
        return "\n".join(p.read_text(errors="replace").splitlines()[-n:]) if p.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        if getattr(self, "log", None):
            self.log.close()
