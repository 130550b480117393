"""Shared fixtures: the real data folder and a private Mosquitto broker on a free port."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from gapcast.tools.localbroker import LocalBroker

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def _has_gpu() -> str | None:
    """Why a gpu test cannot run here, or None when it can."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed (it comes with JetPack / NVIDIA's wheels)"
    if shutil.which("nvidia-smi") is None and not Path("/dev/nvhost-ctrl").exists():
        return "no NVIDIA GPU visible"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _has_gpu()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"gpu test: {reason}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The real data root (``$GAPCAST_DATA`` or ../shared/data)."""
    root = Path(os.environ.get("GAPCAST_DATA", SHARED_DATA))
    if not (root / "beijing-multisite").is_dir():
        pytest.fail(f"real data not found at {root}: set GAPCAST_DATA or put it at ../shared/data")
    return root


@pytest.fixture(scope="session")
def beijing(data_root):
    """All 10 Beijing stations, loaded once per session."""
    from gapcast.train.data import load_beijing

    return load_beijing(data_root)


@pytest.fixture
def broker(tmp_path):
    """A private Mosquitto on a free 127.0.0.1 port, stopped after the test. Yields a :class:`LocalBroker`."""
    b = LocalBroker(workdir=tmp_path / "mosquitto")
    b.workdir.mkdir()
    b.start()
    try:
        yield b
    finally:
        b.close()


@pytest.fixture(scope="session")
def signing_key(tmp_path_factory):
    """A throwaway Ed25519 key pair for the session: ``.private`` and ``.public`` PEM paths, ``.public_hex``."""
    from gapcast.export.keys import generate_keypair

    return generate_keypair(tmp_path_factory.mktemp("signing-key"))


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, signing_key, data_root) -> Path:
    """A signed tiny bundle folder (untrained seeded tiny ConFill, real Beijing windows), built once per session.

    Verify it with ``verify_bundle(tiny_bundle, [signing_key.public])``. Do not modify it: copy it first.
    """
    from gapcast.tools.tinybundle import build_tiny_bundle

    out = tmp_path_factory.mktemp("tiny-bundle") / "bundle"
    return build_tiny_bundle(out, sign_key=signing_key.private, data_root=data_root).path
