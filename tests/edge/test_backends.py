"""Runtime backends: golden outputs, batching, selection order, input validation."""

from __future__ import annotations

import numpy as np
import pytest

from gapcast.edge import BackendError
from gapcast.edge.backends import BACKEND_ORDER, OrtBackend, select_backend
from gapcast.edge.bundle import verify_bundle


@pytest.fixture(scope="module")
def bundle(tiny_bundle, signing_key):
    return verify_bundle(tiny_bundle, [signing_key.public])


@pytest.fixture(scope="module")
def ort_fp32(bundle):
    return select_backend(bundle, prefer="onnxruntime", variant="fp32", threads=1)


def test_onnxruntime_reproduces_the_golden_outputs(bundle, ort_fp32):
    g = bundle.golden()
    imp, fc = ort_fp32.run(g["values"], g["observed"], g["calendar"])
    assert imp.dtype == np.float32 and imp.shape == (6, 96, 13) and fc.shape == (6, 24, 13)
    np.testing.assert_allclose(imp, g["imputed"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(fc, g["forecast"], atol=1e-5, rtol=0)
    assert ort_fp32.name == "onnxruntime" and ort_fp32.precision == "fp32"
    assert "CPUExecutionProvider" in ort_fp32.describe() and "threads 1" in ort_fp32.describe()


def test_batching_equals_one_window_at_a_time(bundle, ort_fp32):
    g = bundle.golden()
    imp, fc = ort_fp32.run(g["values"], g["observed"], g["calendar"])
    for k in range(len(g["values"])):
        i1, f1 = ort_fp32.run(g["values"][k : k + 1], g["observed"][k : k + 1], g["calendar"][k : k + 1])
        np.testing.assert_allclose(i1[0], imp[k], atol=1e-5, rtol=0)
        np.testing.assert_allclose(f1[0], fc[k], atol=1e-5, rtol=0)


def test_values_where_unobserved_are_ignored_even_nan(bundle, ort_fp32):
    g = bundle.golden()
    v = g["values"].copy()
    v[g["observed"] == 0] = np.nan
    imp, fc = ort_fp32.run(v, g["observed"], g["calendar"])
    np.testing.assert_allclose(imp, g["imputed"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(fc, g["forecast"], atol=1e-5, rtol=0)
    bad = g["values"].copy()
    bad[0, 0, 0] = np.nan
    obs = g["observed"].copy()
    obs[0, 0, 0] = 1.0
    with pytest.raises(BackendError, match="non-finite observed values"):
        ort_fp32.run(bad, obs, g["calendar"])


def test_shape_validation(bundle, ort_fp32):
    g = bundle.golden()
    with pytest.raises(BackendError, match=r"do not match the model \(\[B, 96, 13\]"):
        ort_fp32.run(g["values"][:, :48], g["observed"][:, :48], g["calendar"])
    with pytest.raises(BackendError, match="do not match"):
        ort_fp32.run(g["values"], g["observed"], g["calendar"][:, :96])


def test_selection_order_reports_why_tensorrt_was_passed_over(bundle, tmp_path):
    assert BACKEND_ORDER == ("tensorrt", "onnxruntime")
    backend = select_backend(bundle, engine_cache_dir=tmp_path / "engines", threads=1)
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert backend.name == "onnxruntime"
        assert backend.selection[0][0] == "tensorrt" and "TensorRT" in backend.selection[0][1]
    else:  # a machine with TensorRT but an empty engine cache still falls back, and says why
        assert backend.name == "onnxruntime"
        assert "build-engine" in backend.selection[0][1] or "GPU" in backend.selection[0][1]
    # auto variant: the gated onnxruntime variants timed here (gapcast.edge.variant); the tiny bundle has only fp32.
    assert "int8_cpu" not in bundle.card.variants
    assert backend.precision == "fp32" and backend.variant_choice.chosen == "fp32"
    assert backend.variant_choice.how == "only"
    with pytest.raises(BackendError, match="unknown backend"):
        select_backend(bundle, prefer="openvino")
    with pytest.raises(BackendError, match="no 'int8_foo' variant"):
        select_backend(bundle, prefer="onnxruntime", variant="int8_foo")


def test_qdq_variant_runs_on_onnxruntime_close_to_fp32(bundle):
    if "int8_qdq" not in bundle.card.variants:
        pytest.fail("the tiny bundle has no int8_qdq variant")
    g = bundle.golden()
    card = bundle.card
    b = OrtBackend(
        bundle.variant_path("int8_qdq"), lookback=96, horizon=24, n_channels=13, n_calendar=6, precision="int8",
        threads=1,
    )  # fmt: skip
    imp, fc = b.run(g["values"], g["observed"], g["calendar"])
    diff = np.abs(fc - g["forecast"]).mean()
    assert 0 < diff < 0.1, diff
    recorded = card.raw["int8_delta"]["int8_qdq"]["mean_abs_diff_vs_fp32"]
    assert recorded < 0.1


def test_a_tar_bundle_is_unpacked_once_into_a_private_folder_keyed_by_its_sha256(tiny_bundle, signing_key, tmp_path):
    import tarfile

    from gapcast.edge.bundle import sha256_file

    unpack = tmp_path / "unpack"
    tar = tmp_path / "bundle.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(tiny_bundle, arcname="bundle")
    first = verify_bundle(tar, [signing_key.public], unpack_dir=unpack)
    folder = unpack / f"gapcast-bundle-{sha256_file(tar)[:16]}"
    assert first.path == folder / "bundle"
    assert sorted(p.name for p in unpack.iterdir()) == [folder.name]  # no half-written temporary folder left
    second = verify_bundle(tar, [signing_key.public], unpack_dir=unpack)
    assert second.path == first.path and second.card.model_version == first.card.model_version
    assert sorted(p.name for p in unpack.iterdir()) == [folder.name]  # reused: no second copy
