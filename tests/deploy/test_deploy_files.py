"""The files a user puts on real machines: the example edge.toml, the systemd unit, the Jetson script, the container."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "systemd" / "gapcast-edge.service"
SETUP = DEPLOY / "jetson" / "setup.sh"
DOCKERFILE = DEPLOY / "container" / "Dockerfile"
EXAMPLE = DEPLOY / "edge.example.toml"


def _unit() -> configparser.ConfigParser:
    # systemd allows repeated keys (Environment=); configparser keeps the last with strict=False.
    cp = configparser.ConfigParser(strict=False, interpolation=None, empty_lines_in_values=False)
    cp.optionxform = str  # systemd keys are case-sensitive
    cp.read_string(UNIT.read_text())
    return cp


def test_example_config_loads_with_the_agents_loader():
    from gapcast.edge.config import load_config

    cfg = load_config(EXAMPLE)
    assert cfg.gateway_id and cfg.topic_prefix == "gapcast/v1"
    assert cfg.stations.names or cfg.stations.auto_register
    # The Jetson script and the systemd unit put things where the example looks for them.
    assert cfg.model.bundle == Path("/var/lib/gapcast/bundles/current")
    assert cfg.model.trusted_keys == ("/etc/gapcast/release.pub",)
    assert cfg.agent.state_dir.is_relative_to("/var/lib/gapcast")  # the unit's StateDirectory=gapcast
    setup = SETUP.read_text()
    assert '"$STATE_DIR/bundles/current"' in setup and '"$CONF_DIR/release.pub"' in setup
    assert "STATE_DIR=/var/lib/gapcast" in setup and "CONF_DIR=/etc/gapcast" in setup


def test_systemd_unit_has_the_required_keys():
    u = _unit()
    assert set(u.sections()) == {"Unit", "Service", "Install"}
    svc = u["Service"]
    exec_start = svc["ExecStart"].split()
    assert exec_start[1:] == ["edge", "run", "--config", "/etc/gapcast/edge.toml"]
    assert exec_start[0] == svc["ExecStartPre"].split()[0] == "/opt/gapcast/venv/bin/gapcast"
    assert svc["ExecStartPre"].split()[1:3] == ["edge", "check"]
    # Restart policy, a dedicated user, the state directory the config points at.
    assert svc["Restart"] in ("always", "on-failure") and int(svc["RestartSec"]) > 0
    assert svc["User"] == svc["Group"] == "gapcast"
    assert svc["StateDirectory"] == "gapcast" and svc["WorkingDirectory"] == "/var/lib/gapcast"
    assert svc["CacheDirectory"] == "gapcast"
    # Board-specific (a missing group fails with 216/GROUP): in the drop-in setup.sh generates (test_shell_and_units).
    assert "SupplementaryGroups" not in svc and "MemoryMax" not in svc
    # Hardening that must not be lost in an edit.
    for key, want in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "no",  # yes would hide the GPU
    }.items():
        assert svc[key] == want, key
    assert int(u["Unit"]["StartLimitBurst"]) >= 1
    assert "network-online.target" in u["Unit"]["After"]
    assert u["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed; test_systemd_unit_has_the_required_keys parses the unit",
)
def test_systemd_unit_verifies(tmp_path):
    analyze = shutil.which("systemd-analyze")
    # verify checks that ExecStart exists: point it at this venv's gapcast, everything else unchanged.
    gapcast = Path(sys.executable).parent / "gapcast"
    unit = tmp_path / "gapcast-edge.service"
    unit.write_text(UNIT.read_text().replace("/opt/gapcast/venv/bin/gapcast", str(gapcast)))
    res = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # Unknown keys and bad values are warnings on stderr (exit 0): any line about our unit fails the test.
    ours = [line for line in (res.stdout + res.stderr).splitlines() if unit.name in line]
    assert res.returncode == 0 and not ours, res.stdout + res.stderr


def test_jetson_setup_script_parses_and_documents_itself():
    bash = shutil.which("bash")
    assert bash is not None
    assert subprocess.run([bash, "-n", str(SETUP)], capture_output=True, timeout=30).returncode == 0
    res = subprocess.run([bash, str(SETUP), "--help"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0
    for word in ("python3-libnvinfer", "--system-site-packages", "gapcast edge build-engine", "--bundle", "--key"):
        assert word in res.stdout, word
    bad = subprocess.run([bash, str(SETUP), "--frobnicate"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "unknown option --frobnicate" in bad.stderr
    text = SETUP.read_text()
    assert "deploy/systemd/gapcast-edge.service" in text and "systemctl enable --now gapcast-edge" in text


def test_container_file_builds_on_l4t_and_runs_the_agent_unprivileged():
    lines = [ln.strip() for ln in DOCKERFILE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    base = next(ln for ln in lines if ln.startswith("ARG BASE_IMAGE="))
    assert base.split("=", 1)[1].startswith("nvcr.io/nvidia/l4t-")
    assert lines[lines.index(base) + 1] == "FROM ${BASE_IMAGE}"
    assert any(ln.startswith("USER ") and ln.split()[1] not in ("root", "0") for ln in lines)
    entry = next(ln for ln in lines if ln.startswith("ENTRYPOINT"))
    cmd = next(ln for ln in lines if ln.startswith("CMD"))
    assert entry == 'ENTRYPOINT ["gapcast", "edge"]' and '"run", "--config"' in cmd
    assert any('pip install ".[edge]"' in ln for ln in lines)  # edge extra only: no torch in the image
    ignore = (DEPLOY / "container" / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".git", "tests"} <= set(ignore)
