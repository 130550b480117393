"""The layer rule, enforced on the source: every import, inside functions included, goes in an allowed direction.

The rule (docs/ARCHITECTURE.md, "Layers"):

    core (gapcast/*.py) <- train <- export -> edge;  deploy -> export, edge;  tools and bench -> anything;
    edge imports nothing but core and edge;  nothing imports tools but gapcast.cli and bench.

``gapcast.cli`` is the one place that wires every part together, so it may import anything.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> the package it installs as (pyproject's package-dir).
PARTS = {"gapcast": "core", "train": "train", "export": "export", "edge": "edge", "deploy": "deploy",
         "bench": "bench", "tools": "tools", "sink": "sink"}
# Which parts each part may import (itself and core always).
ALLOWED = {
    "core": {"core"},
    "train": {"core", "train"},
    "export": {"core", "train", "edge", "export"},
    "edge": {"core", "edge"},
    "deploy": {"core", "export", "edge", "deploy"},
    "tools": {"core", "train", "export", "edge", "deploy", "tools"},
    "bench": {"core", "train", "export", "edge", "deploy", "tools", "bench", "sink"},
    "sink": {"core", "edge", "sink"},
}
HEAVY = ("torch", "pandas", "onnx", "onnxscript", "matplotlib")


def _part_of(module: str) -> str | None:
    """``gapcast.edge.agent`` -> ``edge``; ``gapcast.timefmt`` / ``gapcast`` -> ``core``; others -> None."""
    parts = module.split(".")
    if parts[0] != "gapcast":
        return None
    if len(parts) > 1 and parts[1] in PARTS and parts[1] != "gapcast":
        return parts[1]
    return "core"


def _imports(path: Path, package: str) -> list[tuple[int, str]]:
    """Every module ``path`` imports (module level and inside functions), as absolute names, with line numbers."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((node.lineno, mod))
            if mod == "gapcast":  # `from gapcast import edge` imports a part
                out.extend((node.lineno, f"gapcast.{a.name}") for a in node.names if a.name in PARTS)
    return out


def _modules():
    for folder, part in PARTS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            package = "gapcast" if folder == "gapcast" else f"gapcast.{folder}"
            yield part, path, package


def test_every_import_goes_an_allowed_way():
    bad = []
    for part, path, package in _modules():
        is_cli = path == ROOT / "gapcast" / "cli.py"
        for line, mod in _imports(path, package):
            target = _part_of(mod)
            if target is None or is_cli:
                continue
            if target not in ALLOWED[part]:
                bad.append(f"{path.relative_to(ROOT)}:{line} ({part}) imports {mod} ({target})")
    assert not bad, "layer rule broken:\n" + "\n".join(bad)


def test_nothing_but_cli_and_bench_imports_tools():
    users = {
        str(path.relative_to(ROOT))
        for part, path, package in _modules()
        if part not in ("tools", "bench") and path != ROOT / "gapcast" / "cli.py"
        for _, mod in _imports(path, package)
        if _part_of(mod) == "tools"
    }
    assert users == set()


def test_the_walk_sees_imports_inside_functions(tmp_path):
    # The checker itself: an import hidden in a function body is found and classified.
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from gapcast.train.data import x\n    from . import sibling\n")
    found = _imports(src, "gapcast.edge")
    assert (2, "gapcast.train.data") in found and (3, "gapcast.edge") in found
    assert _part_of("gapcast.train.data") == "train" and _part_of("gapcast.timefmt") == "core"


_BLOCK = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {HEAVY!r}:
            raise ImportError(f'blocked on the gateway: {{name}}')
        return None
sys.meta_path.insert(0, Block())
"""


@pytest.mark.parametrize("folder", ["edge", "gapcast"])
def test_gateway_modules_import_without_heavy_packages(folder):
    package = "gapcast" if folder == "gapcast" else f"gapcast.{folder}"
    mods = sorted(p.stem for p in (ROOT / folder).glob("*.py") if p.stem not in ("__init__", "cli"))
    assert len(mods) >= 3
    code = _BLOCK + f"import {package}\n" + "".join(f"import {package}.{m}\n" for m in mods) + "print('ok')\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
