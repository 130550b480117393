"""CI checks of the shell scripts and the systemd unit (+ the drop-in setup.sh generates for a board).

- every shell script in the repository: ``bash -n`` and ``shellcheck`` (Debian's shellcheck; ``make test``
  installs it when missing, see the Makefile's ``shellcheck`` target);
- ``deploy/jetson/unit-dropin.sh``: groups only where they exist, MemoryMax from MemTotal (hand-computed);
- ``systemd-analyze verify`` of the unit together with that drop-in.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "deploy" / "systemd" / "gapcast-edge.service"
DROPIN = REPO / "deploy" / "jetson" / "unit-dropin.sh"
SETUP = REPO / "deploy" / "jetson" / "setup.sh"
SKIP_DIRS = {".git", ".venv", "node_modules", "__pycache__", ".pytest_cache", ".ruff_cache"}

needs_shellcheck = pytest.mark.skipif(
    shutil.which("shellcheck") is None,
    reason="shellcheck is not installed (make test installs it: apt-get install shellcheck)",
)
needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed (Debian package systemd)"
)


def shell_scripts() -> list[Path]:
    """Every ``*.sh`` file and every file whose first line is a sh/bash shebang, outside venvs and caches."""
    found = []
    for path in sorted(REPO.rglob("*")):
        if not path.is_file() or SKIP_DIRS & set(path.relative_to(REPO).parts):
            continue
        if path.suffix == ".sh":
            found.append(path)
            continue
        if path.suffix in ("", ".bash"):
            try:
                first = path.open("rb").readline(200)
            except OSError:
                continue
            if first.startswith(b"#!") and (b"bash" in first or first.rstrip().endswith(b"/sh")):
                found.append(path)
    return found


def test_the_scripts_are_found():
    names = {p.relative_to(REPO).as_posix() for p in shell_scripts()}
    expected = {"deploy/jetson/setup.sh", "deploy/jetson/trtexec.sh", "deploy/jetson/unit-dropin.sh",
                "deploy/jetson/gpu-check.sh", ".ci/run"}  # fmt: skip
    assert expected <= names


@pytest.mark.parametrize("script", shell_scripts(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_bash_parses(script):
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr


@needs_shellcheck
def test_shellcheck_is_clean():
    scripts = [str(p) for p in shell_scripts()]
    res = subprocess.run(["shellcheck", "--format=gcc", *scripts], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def _dropin(tmp_path: Path, *args: str, mem_kb: int = 7620184, groups: str = "video:x:44:gapcast\n") -> str:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemTotal:        {mem_kb} kB\nMemFree:          123456 kB\n")
    group_file = tmp_path / "group"
    group_file.write_text("root:x:0:\n" + groups)
    env = {"PATH": "/usr/bin:/bin", "MEMINFO": str(meminfo), "GROUP_FILE": str(group_file)}
    res = subprocess.run(["bash", str(DROPIN), *args], capture_output=True, text=True, timeout=30, env=env)
    assert res.returncode == 0, res.stderr
    return res.stdout


def _keys(text: str) -> dict[str, str]:
    return dict(ln.split("=", 1) for ln in text.splitlines() if "=" in ln and not ln.startswith("#"))


def test_dropin_names_only_existing_groups_and_sizes_memory_from_the_board(tmp_path):
    # An 8 GB Orin Nano reports MemTotal 7620184 kB: 60 % = 4572110 kB = 4464 MiB (rounded down).
    out = _dropin(tmp_path)
    assert _keys(out) == {"SupplementaryGroups": "video", "MemoryMax": "4464M"}
    assert "# groups not on this board, left out: render" in out and out.splitlines()[1] == "[Service]"
    # A board with both groups; a 64 GB AGX Orin (MemTotal 65890060 kB) at 50 %: 32172 MiB.
    out = _dropin(tmp_path, "--memory-percent", "50", mem_kb=65890060, groups="video:x:44:\nrender:x:109:\n")
    assert _keys(out) == {"SupplementaryGroups": "video render", "MemoryMax": "32172M"}
    # No GPU group at all (an x86 test box): no SupplementaryGroups line; MemoryMax given, or none.
    out = _dropin(tmp_path, "--memory-max", "2G", groups="")
    assert _keys(out) == {"MemoryMax": "2G"}
    out = _dropin(tmp_path, "--memory-max", "none", groups="")
    assert _keys(out) == {} and "no cgroup memory cap" in out


def test_dropin_refuses_bad_figures(tmp_path):
    for args in (["--memory-percent", "0"], ["--memory-percent", "60%"], ["--frobnicate"]):
        res = subprocess.run(["bash", str(DROPIN), *args], capture_output=True, text=True, timeout=30)
        assert res.returncode == 2 and "unit-dropin.sh:" in res.stderr, args


def test_unit_names_no_board_specific_groups_or_memory():
    keys = _keys(UNIT.read_text())
    # Both live in the generated drop-in: a group the board lacks fails the unit with 216/GROUP.
    assert "SupplementaryGroups" not in keys and "MemoryMax" not in keys
    setup = SETUP.read_text()
    assert "unit-dropin.sh" in setup and "gapcast-edge.service.d/10-board.conf" in setup
    assert '--trusted-key "$CONF_DIR/release.pub"' in setup
    # No index fallback: pip installs the checkout or a wheel, never the name gapcast[edge].
    assert not re.search(r"pip install[^\n]*[\"' ]gapcast\[edge\]", setup) and 'SOURCE="gapcast' not in setup


def _verify(unit_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["systemd-analyze", "verify", str(unit_dir / UNIT.name)], capture_output=True, text=True, timeout=60,
        cwd=unit_dir,
    )  # fmt: skip


@needs_analyze
def test_unit_with_the_generated_dropin_verifies(tmp_path):
    unit_dir = tmp_path / "units"
    (unit_dir / f"{UNIT.name}.d").mkdir(parents=True)
    # verify checks that ExecStart exists: point it at this venv's gapcast, everything else unchanged.
    gapcast = Path(sys.executable).parent / "gapcast"
    (unit_dir / UNIT.name).write_text(UNIT.read_text().replace("/opt/gapcast/venv/bin/gapcast", str(gapcast)))
    conf = unit_dir / f"{UNIT.name}.d" / "10-board.conf"
    # First show that verify reads the drop-in at all: an unknown key in it is reported.
    conf.write_text("[Service]\nMemoryMaxx=1G\n")
    res = _verify(unit_dir)
    assert "Unknown key 'MemoryMaxx'" in res.stdout + res.stderr, res.stdout + res.stderr
    conf.write_text(_dropin(tmp_path, groups="video:x:44:\nrender:x:109:\n"))
    res = _verify(unit_dir)
    ours = [ln for ln in (res.stdout + res.stderr).splitlines() if UNIT.name in ln or "10-board" in ln]
    assert res.returncode == 0 and not ours, res.stdout + res.stderr
