"""TensorRT engine building: cache key, fallback order and golden tolerances on the CPU (TensorRT faked at its
boundary), and a real engine build on a GPU machine (``gpu`` marker)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging

import numpy as np
import pytest
from support.fake_trt import FakeTensorRT

from gapcast.edge import BackendError
from gapcast.edge import trt as T
from gapcast.edge.backends import select_backend
from gapcast.edge.bundle import verify_bundle

KEY = {
    "trt_version": "8.5.2.2",
    "gpu": "Orin (sm87)",
    "l4t": "R35.4.1",
    "model_sha256": "ab" * 32,
    "precision": "fp16",
    "max_batch": 64,
}


@pytest.mark.parametrize(
    ("field", "other"),
    [
        ("trt_version", "10.3.0"),
        ("gpu", "Xavier (sm72)"),
        ("l4t", "R36.3.0"),
        ("model_sha256", "cd" * 32),
        ("precision", "int8"),
        ("max_batch", 128),
    ],
)
def test_cache_key_changes_with_each_component(field, other):
    base = T.engine_cache_key(**KEY)
    assert base == T.engine_cache_key(**KEY)  # deterministic
    assert T.engine_cache_key(**{**KEY, field: other}) != base
    assert base.startswith("fp16-b64-") and len(base.split("-")[-1]) == 24


def test_fallback_order():
    assert T.fallback_order("int8") == ("int8", "fp16", "fp32")
    assert T.fallback_order("fp16") == ("fp16", "fp32")
    assert T.fallback_order("fp32") == ("fp32",)
    with pytest.raises(BackendError, match="unknown precision 'bf16'"):
        T.fallback_order("bf16")


def test_golden_comparison_tolerances():
    rng = np.random.default_rng(0)
    g = {"imputed": rng.standard_normal((2, 96, 13)).astype(np.float32),
         "forecast": rng.standard_normal((2, 24, 13)).astype(np.float32)}  # fmt: skip
    noise = np.full_like(g["imputed"], 5e-5)
    noise[0, 0, 0] = 8e-4
    near = T.compare_golden(g["imputed"] + noise, g["forecast"] - 5e-5, g, "fp32")
    assert near.ok and near.max_abs == pytest.approx(8e-4, rel=1e-2) and near.mean_abs < 1e-4
    spike = g["imputed"].copy()
    spike[1, 5, 3] += 2e-3
    off = T.compare_golden(spike, g["forecast"], g, "fp32")
    assert not off.ok and "FAILED for fp32" in off.describe()
    assert T.compare_golden(g["imputed"] + 2e-3, g["forecast"], g, "fp16").ok  # mean 2e-3 <= 5e-3
    assert not T.compare_golden(g["imputed"] + 6e-3, g["forecast"] + 6e-3, g, "fp16").ok  # mean 6e-3 > 5e-3
    spike[1, 5, 3] += 0.06
    assert not T.compare_golden(spike, g["forecast"], g, "fp16").ok  # max 0.062 > 0.05
    assert T.compare_golden(g["imputed"] + 0.04, g["forecast"], g, "int8").ok
    bad = g["forecast"].copy()
    bad[0, 0, 0] = np.nan
    assert not T.compare_golden(g["imputed"], bad, g, "int8").ok
    assert not T.compare_golden(g["imputed"][:1], g["forecast"], g, "fp32").ok  # wrong shape
    # int8: at least twice what the export measured with onnxruntime
    raw = {"int8_delta": {"int8_qdq": {"mean_abs_diff_vs_fp32": 0.04, "max_abs_diff_vs_fp32": 0.9}}}
    assert T.golden_tolerance("int8", raw) == T.Tolerance(max_abs=1.8, mean_abs=0.08)
    assert T.golden_tolerance("int8", {}) == T.GOLDEN_TOLERANCES["int8"]


def test_parse_l4t_release():
    line = "# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, DATE: Tue Aug  1 19:57:35 UTC 2023"
    assert T.parse_l4t_release(line) == "R35.4.1"
    assert T.parse_l4t_release("# R36 (release), REVISION: 3.0, GCID: 36191598") == "R36.3.0"
    assert T.parse_l4t_release(None) == "none"
    assert T.parse_l4t_release("garbage") == "unknown"


def _install_fake_tensorrt(monkeypatch, golden, noise, fail_build=(), calls=None):
    """TensorRT and CUDA faked at their boundary (support.fake_trt); ``calls`` collects the builds."""
    fake = FakeTensorRT(noise, fail_build).install(monkeypatch)
    if calls is not None:
        fake.calls = calls
    return fake


def test_int8_failing_golden_falls_back_to_fp16_says_so_and_caches(tiny_bundle, signing_key, tmp_path, monkeypatch, caplog):
    bundle = verify_bundle(tiny_bundle, [signing_key.public])
    golden = bundle.golden()
    calls: list = []
    _install_fake_tensorrt(monkeypatch, golden, {"int8": 3.0, "fp16": 1e-3, "fp32": 0.0}, calls=calls)
    cache = tmp_path / "engines"
    with caplog.at_level(logging.WARNING, logger="gapcast.edge.trt"):
        result = T.build_and_check(bundle, "int8", max_batch=32, cache_dir=cache)
    has_qdq = "int8_qdq" in bundle.card.variants
    assert result.requested == "int8" and result.precision == "fp16" and not result.cached
    assert [p for p, _ in result.attempts] == ["int8", "fp16"]
    assert ("FAILED for int8" if has_qdq else "no int8_qdq variant") in result.attempts[0][1]
    assert "falling back to fp16" in caplog.text and "built fp16 instead of the requested int8" in caplog.text
    if has_qdq:
        assert calls[0] == ("int8", "model.int8.qdq.onnx", 32)
    assert calls[-1] == ("fp16", "model.onnx", 32)
    assert json.loads(result.engine_path.read_bytes())["precision"] == "fp16" and result.build_s > 0
    meta = json.loads(result.engine_path.with_suffix(".json").read_text())
    assert meta["precision"] == "fp16" and meta["requested"] == "int8" and meta["l4t"] == "R36.4.0"
    assert not list(cache.glob("int8-*.engine"))  # a failed engine is never cached
    # A second request is served from the cache without building.
    n_calls = len(calls)
    again = T.build_and_check(bundle, "fp16", max_batch=32, cache_dir=cache)
    assert again.cached and again.precision == "fp16" and len(calls) == n_calls
    # select_backend now prefers the cached TensorRT engine.
    backend = select_backend(bundle, engine_cache_dir=cache)
    assert backend.name == "tensorrt" and backend.precision == "fp16" and backend.selection == []
    imp, fc = backend.run(golden["values"][:2], golden["observed"][:2], golden["calendar"][:2])
    np.testing.assert_allclose(fc, golden["forecast"][:2] + 1e-3, atol=1e-6)


def test_build_failure_falls_back_and_all_failing_is_an_error(tiny_bundle, signing_key, tmp_path, monkeypatch):
    bundle = verify_bundle(tiny_bundle, [signing_key.public])
    golden = bundle.golden()
    _install_fake_tensorrt(monkeypatch, golden, {"int8": 0.0, "fp16": 0.0, "fp32": 0.0}, fail_build=("fp16",))
    result = T.build_and_check(bundle, "fp16", cache_dir=tmp_path / "a")
    assert result.precision == "fp32" and "cannot build fp16" in result.attempts[0][1]
    _install_fake_tensorrt(monkeypatch, golden, {"int8": 1.0, "fp16": 1.0, "fp32": 1.0})
    with pytest.raises(BackendError, match=r"no TensorRT engine passed its checks:\n  fp16: golden check FAILED"):
        T.build_and_check(bundle, "fp16", cache_dir=tmp_path / "b")


def test_int8_without_a_qdq_variant_is_skipped_with_the_cards_reason(tiny_bundle, signing_key, tmp_path, monkeypatch):
    bundle = verify_bundle(tiny_bundle, [signing_key.public])
    card = bundle.card
    raw = {**card.raw, "excluded_variants": {"int8_qdq": "accuracy gate failed: test"}}
    variants = {k: v for k, v in card.variants.items() if k != "int8_qdq"}
    bundle = dataclasses.replace(bundle, card=dataclasses.replace(card, variants=variants, raw=raw))
    _install_fake_tensorrt(monkeypatch, bundle.golden(), {"int8": 0.0, "fp16": 0.0, "fp32": 0.0})
    result = T.build_and_check(bundle, "int8", cache_dir=tmp_path)
    assert result.precision == "fp16"
    assert result.attempts[0] == ("int8", "skipped: the bundle has no int8_qdq variant (accuracy gate failed: test)")


@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here: the gpu test covers the real build"
)
def test_without_tensorrt_the_command_says_what_is_missing(tiny_bundle):
    import argparse

    args = argparse.Namespace(bundle=tiny_bundle, precision="fp16", max_batch=8)
    with pytest.raises(BackendError, match="TensorRT's Python bindings are not installed"):
        T.build_engine_main(args)


@pytest.mark.gpu
def test_real_engine_build_matches_golden(tiny_bundle, signing_key, tmp_path):
    bundle = verify_bundle(tiny_bundle, [signing_key.public])
    result = T.build_and_check(bundle, "fp16", max_batch=16, cache_dir=tmp_path)
    assert result.golden.ok and result.engine_path.is_file()
    backend = select_backend(bundle, engine_cache_dir=tmp_path)
    assert backend.name == "tensorrt"
    g = bundle.golden()
    imp, fc = backend.run(g["values"], g["observed"], g["calendar"])
    assert T.compare_golden(imp, fc, g, result.precision).ok
    # fp32 engine: within fp32 tolerance of onnxruntime's golden outputs
    r32 = T.build_and_check(bundle, "fp32", max_batch=4, cache_dir=tmp_path)
    assert r32.precision == "fp32" and r32.golden.max_abs <= 1e-3
    backend.close()
