"""Issue 18: the gateway unit starts on a synchronised clock."""

from __future__ import annotations

import configparser
from pathlib import Path

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "systemd" / "gapcast-edge.service"


def test_unit_orders_itself_after_time_sync_target():
    unit_lines = UNIT.read_text().split("[Service]")[0].splitlines()
    assert sum(ln.startswith("After=") for ln in unit_lines) == 1  # a second After= would hide the first from parsers
    u = configparser.ConfigParser(interpolation=None, strict=False)
    u.optionxform = str
    u.read_string(UNIT.read_text())
    assert "time-sync.target" in u["Unit"]["After"].split()
    assert "time-sync.target" in u["Unit"]["Wants"].split()
    assert "network-online.target" in u["Unit"]["After"].split()
