"""Log output (gapcast.edge.logs): text / json, journald detection and priority prefixes, and the agent's one INFO
line per round with the per-station lines at DEBUG."""

from __future__ import annotations

import io
import json
import logging
import os

import pytest
from support.small_agent import CADENCE, HoldableBackend, small_config

from gapcast.edge.logs import STEPS_LOGGER, configure_logging, priority, under_journald


@pytest.fixture
def restore_root():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)
    logging.getLogger(STEPS_LOGGER).setLevel(logging.NOTSET)


def _journal_env(f) -> dict[str, str]:
    st = os.fstat(f.fileno())
    return {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


def test_priorities_follow_syslog():
    assert [priority(x) for x in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL)] == [
        7, 6, 4, 3, 2,
    ]


def test_journald_is_detected_only_on_the_journal_stream(tmp_path):
    with open(tmp_path / "a", "w") as a, open(tmp_path / "b", "w") as b:
        env = _journal_env(a)
        assert under_journald(a, env) and not under_journald(b, env)  # inherited JOURNAL_STREAM, other stream
        assert not under_journald(a, {})


def test_text_under_journald_has_priority_prefixes_and_no_timestamp(tmp_path, restore_root):
    with open(tmp_path / "journal", "w+") as f:
        configure_logging("text", stream=f, environ=_journal_env(f))
        lg = logging.getLogger("gapcast.edge.mqtt")
        lg.info("connected to 127.0.0.1:1883")
        lg.warning("cannot connect")
        try:
            raise ValueError("boom")
        except ValueError:
            lg.exception("ingest failed")
        f.flush()
        f.seek(0)
        lines = f.read().splitlines()
    assert lines[:3] == [
        "<6>gapcast.edge.mqtt: connected to 127.0.0.1:1883",
        "<4>gapcast.edge.mqtt: cannot connect",
        "<3>gapcast.edge.mqtt: ingest failed",
    ]
    assert all(ln.startswith("<3>") for ln in lines[3:]) and lines[-1] == "<3>ValueError: boom"


def test_text_elsewhere_and_json(tmp_path, restore_root):
    buf = io.StringIO()
    configure_logging("text", stream=buf, environ={})
    logging.getLogger("gapcast.x").warning("w %d", 1)
    line = buf.getvalue().strip()
    assert line.endswith("Z WARNING gapcast.x: w 1") and line[4] == "-" and line[10] == "T"

    buf = io.StringIO()
    configure_logging("json", stream=buf, environ={})
    logging.getLogger("gapcast.x").error("e")
    obj = json.loads(buf.getvalue())
    assert set(obj) == {"ts", "level", "logger", "message"} and obj["level"] == "ERROR" and obj["message"] == "e"

    with open(tmp_path / "journal", "w+") as f:
        configure_logging("json", stream=f, environ=_journal_env(f))
        logging.getLogger("gapcast.x").info("i")
        f.flush()
        f.seek(0)
        line = f.read().strip()
    assert line.startswith("<6>{") and json.loads(line[3:]) == {"level": "INFO", "logger": "gapcast.x", "message": "i"}
    with pytest.raises(ValueError, match="text, json"):
        configure_logging("xml")


def test_config_log_section():
    cfg = small_config("127.0.0.1", 1883, __import__("pathlib").Path("/tmp"), log={"format": "json", "steps": True})
    assert (cfg.log.format, cfg.log.level, cfg.log.steps) == ("json", "info", True)
    from gapcast.edge import ConfigError

    with pytest.raises(ConfigError, match="log.format: must be one of text, json"):
        small_config("127.0.0.1", 1883, __import__("pathlib").Path("/tmp"), log={"format": "xml"})
    with pytest.raises(ConfigError, match="metrics.listen"):
        small_config("127.0.0.1", 1883, __import__("pathlib").Path("/tmp"), metrics={"listen": "9108"})


def _round(tmp_path, steps: bool, restore_root):
    """Two stations, two steps each closed in one round, through the real shell's round line."""
    from support.small_agent import small_card

    from gapcast.edge.agent import AgentCore
    from gapcast.edge.mqtt import MqttAgent
    from gapcast.edge.outbox_memory import MemoryOutbox

    cfg = small_config("127.0.0.1", 1, tmp_path, stations={"names": ["s1", "s2"]})
    core = AgentCore.from_config(cfg, small_card(), HoldableBackend())
    agent = MqttAgent(cfg, core, MemoryOutbox(), snapshot_path="")
    buf = io.StringIO()
    configure_logging("text", stream=buf, environ={}, steps=steps)
    k = 490_000
    for st in ("s1", "s2"):
        for j, v in ((0, 50), (1, None), (2, 40)):
            core.ingest(f"gapcast/v1/stations/{st}/readings", json.dumps({"ts": (k + j) * CADENCE, "values": {"PM2.5": v}}).encode(),
                        (k + 3) * CADENCE)  # fmt: skip
    core.tick((k + 3) * CADENCE)
    agent._round_s = 1.314
    agent._log_round()
    agent.client.loop_stop()
    return buf.getvalue().splitlines()


def test_one_info_line_per_round_and_step_lines_at_debug(tmp_path, restore_root):
    lines = _round(tmp_path, False, restore_root)
    assert [ln.split(" ", 1)[1] for ln in lines] == [
        "INFO gapcast.edge.agent: station s1 registered (1 of at most 1000)",
        "INFO gapcast.edge.agent: station s2 registered (2 of at most 1000)",
        "INFO gapcast.edge.mqtt: closed 4 steps for 2 stations in 1.31 s, 2 imputed, 0 fallback",
    ]
    lines = _round(tmp_path, True, restore_root)  # [log] steps = true: the per-station lines too, at DEBUG
    debug = [ln for ln in lines if " DEBUG gapcast.edge.steps: " in ln]
    assert len(debug) == 4 and all("forecast 2 steps (fake)" in ln for ln in debug)
