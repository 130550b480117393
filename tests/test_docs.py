"""The docs match the code: the layer map in docs/ARCHITECTURE.md names every module, and names nothing that is gone.

Checked on the source tree, so a module added, moved or removed without its line in the map fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gapcast", "train", "export", "edge", "deploy", "tools", "bench", "sink")


def _layer_map() -> dict[str, set[str]]:
    """{folder: the words of its entry} from the code block under "## Layers"."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    block = text.split("## Layers", 1)[1].split("```", 2)[1]
    entries: dict[str, set[str]] = {}
    current = None
    for line in block.splitlines():
        head = re.match(r"^(\w+)/\s", line)
        if head:
            current = head.group(1)
            entries[current] = set()
        if current:
            entries[current] |= set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", line))
    return entries


def _modules(folder: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / folder).glob("*.py") if p.name != "__init__.py")


@pytest.mark.parametrize("folder", PACKAGES)
def test_layer_map_names_every_module(folder):
    entries = _layer_map()
    assert folder in entries, f"docs/ARCHITECTURE.md has no {folder}/ entry in its layer map"
    missing = [m for m in _modules(folder) if m not in entries[folder]]
    assert not missing, f"docs/ARCHITECTURE.md's {folder}/ entry does not name: {missing}"


def test_paths_the_docs_name_exist():
    folders = "|".join((*PACKAGES, "tests", "docs"))
    pattern = re.compile(rf"(?<![\w/.-])((?:{folders})/[\w./-]+\.(?:py|toml|md|json|service|conf))\b")
    for doc in ("README.md", "docs/ARCHITECTURE.md"):
        named = set(pattern.findall((ROOT / doc).read_text()))
        gone = sorted(p for p in named if not (ROOT / p).exists())
        assert not gone, f"{doc} names files that do not exist: {gone}"
