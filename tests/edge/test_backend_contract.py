"""One contract suite over every :class:`gapcast.edge.backends.Backend`: onnxruntime, TensorRT (fake runtime),
the interpolation fallback and the fleet updater's guarded backend. What the agent relies on, and nothing more."""

from __future__ import annotations

import numpy as np
import pytest
from support.fake_trt import FakeTensorRT

from gapcast.edge.agent import InterpolationBackend
from gapcast.edge.backends import Backend, select_backend
from gapcast.edge.bundle import verify_bundle

KINDS = ["onnxruntime", "tensorrt", "interpolation", "guarded"]


@pytest.fixture(scope="module")
def bundle(tiny_bundle, signing_key):
    return verify_bundle(tiny_bundle, [signing_key.public])


@pytest.fixture(params=KINDS)
def any_backend(request, bundle, signing_key, tmp_path, monkeypatch):
    kind = request.param
    if kind == "onnxruntime":
        b = select_backend(bundle, prefer="onnxruntime", variant="fp32", threads=1)
    elif kind == "tensorrt":
        FakeTensorRT().install(monkeypatch)
        b = select_backend(bundle, engine_cache_dir=tmp_path / "engines", build_engine=True, engine_precision="fp16")
    elif kind == "interpolation":
        b = InterpolationBackend(bundle.card.horizon, season=24)
    else:
        from gapcast.edge.guard import GuardedBackend
        from gapcast.edge.updater import Updater, UpdaterConfig

        cfg = UpdaterConfig(gateway="gw-c", fleet="city", state_dir=tmp_path / "state")
        u = Updater(cfg, trusted_keys=[signing_key.public],
                    backend_factory=lambda bu: select_backend(bu, prefer="onnxruntime", threads=1))  # fmt: skip
        u.start(bundle.path)
        b = GuardedBackend(u)
    yield kind, b
    b.close()


def test_declares_the_interface(any_backend, bundle):
    kind, b = any_backend
    assert isinstance(b, Backend)
    assert b.name == {"guarded": "onnxruntime"}.get(kind, kind)
    assert b.precision in ("fp32", "fp16", "int8")
    assert isinstance(b.describe(), str) and b.describe()
    info = b.info()
    assert (info["name"], info["precision"]) == (b.name, b.precision) and info["describe"]
    assert b.model_version in (None, bundle.card.model_version)
    assert b.step_boundary() is None  # nothing staged: a boundary changes nothing


def test_run_shapes_dtypes_and_finite_outputs(any_backend, bundle):
    kind, b = any_backend
    g = bundle.golden()
    L, H, C = bundle.card.lookback, bundle.card.horizon, len(bundle.card.channels)
    for n in (1, 3):
        imp, fc = b.run(g["values"][:n], g["observed"][:n], g["calendar"][:n])
        assert imp.dtype == np.float32 and fc.dtype == np.float32
        assert imp.shape == (n, L, C) and fc.shape == (n, H, C)
        assert np.isfinite(imp).all() and np.isfinite(fc).all()


def test_rows_are_independent_and_unobserved_values_are_ignored(any_backend, bundle):
    kind, b = any_backend
    g = bundle.golden()
    v, o, c = g["values"][:3], g["observed"][:3], g["calendar"][:3]
    imp, fc = b.run(v, o, c)
    if kind != "tensorrt":  # the fake engine answers by position, not by content
        i1, f1 = b.run(v[1:2], o[1:2], c[1:2])
        np.testing.assert_allclose(f1[0], fc[1], atol=1e-5)
        np.testing.assert_allclose(i1[0], imp[1], atol=1e-5)
    noisy = np.where(o > 0.5, v, np.float32(123.0)).astype(np.float32)
    imp2, fc2 = b.run(noisy, o, c)
    np.testing.assert_allclose(fc2, fc, atol=1e-5)
    np.testing.assert_allclose(np.where(o > 0.5, imp2, 0), np.where(o > 0.5, imp, 0), atol=1e-5)
