"""Nothing outside the dataset presets knows about Beijing (issue 13): no station names, no UTC+8, no hourly
cadence constant, no 13-channel constant, no "pollutants" constant in the code of train/, export/, edge/, deploy/,
bench/, tools/ and sink/. The Beijing specifics live in train/presets/beijing.toml (``make demo`` runs on that preset).

Allowed, and why: ``train/data.py`` keeps the names ``BEIJING_CHANNELS`` / ``BEIJING_POLLUTANTS`` /
``BEIJING_UTC_OFFSET_S`` for the code that imported them before dataset specs, computed from the preset (the test
checks they are not literals). 3600 as "seconds per hour" (converting a duration) is not a cadence.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("train", "export", "edge", "deploy", "bench", "tools", "sink")
STATIONS = ("Aotizhongxin", "Changping", "Dingling", "Dongsi", "Guanyuan", "Gucheng", "Huairou", "Nongzhanguan",
            "Shunyi", "Tiantan", "Wanliu", "Wanshouxigong")
RULES = {
    "a Beijing station name": re.compile("|".join(STATIONS)),
    "UTC+8": re.compile(r"UTC\s*\+\s*8\b|\b8\s*\*\s*3600\b|\b28_?800\b"),
    "an hourly cadence constant": re.compile(r"cadence\w*[\"']?\s*[,:=]\s*[^#\n]{0,20}\b3600\b|CADENCE_S\s*="),
    "a 13-channel constant": re.compile(r"n_channels\s*[:=]?\s*(int\s*=\s*)?13\b|[!=]=\s*13\b|range\(13\)"),
    "a 'pollutants' constant": re.compile(r"[\"']pollutants[\"']|pollutants_norm|_POLLUTANTS\s*=|POLLUTANTS_KEYWORD"),
}


def _code_files() -> list[Path]:
    return sorted(p for f in FOLDERS for p in (ROOT / f).rglob("*.py") if "presets" not in p.parts)


def test_the_folders_hold_code():
    assert len(_code_files()) > 30


@pytest.mark.parametrize("rule", sorted(RULES))
def test_no_beijing_constants_outside_the_presets(rule):
    pattern = RULES[rule]
    hits = []
    for path in _code_files():
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not hits, f"{rule} outside the presets:\n" + "\n".join(hits)


def test_the_compatibility_names_come_from_the_preset():
    text = (ROOT / "train" / "data.py").read_text()
    for name in ("BEIJING_CHANNELS", "BEIJING_POLLUTANTS", "BEIJING_UTC_OFFSET_S"):
        m = re.search(rf"^{name}\b[^=]*=\s*(.+)$", text, re.M)
        assert m and "_PRESET" in m.group(1) or "_PRESET" in text[m.end(): m.end() + 120], name
