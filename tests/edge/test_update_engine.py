"""Issue 14, "Build": staging an update builds the TensorRT engine for the new bundle (fake TensorRT runtime).

The gateway's real wiring (:func:`gapcast.edge.guard.make_backend_factories` -> ``select_backend(build_engine=
True)`` -> ``trt.build_and_check``) runs against TensorRT and CUDA faked at their boundary (support.fake_trt).
The fake bundles of support.fleet_fakes have no ``int8_qdq`` variant, so every build asks for int8 and falls back,
logged, to fp16.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from support.fake_trt import FakeTensorRT
from support.fleet_fakes import golden_inputs, make_bundle, new_key
from support.fleet_release import release

from gapcast.edge.backends import TrtBackend, select_backend
from gapcast.edge.guard import GuardedBackend, make_backend_factories
from gapcast.edge.updater import Updater, UpdaterConfig

CFG = SimpleNamespace(
    model=SimpleNamespace(backend="auto", threads=1, variant="auto", max_batch=64, variant_budget_s=0.5),
    stations=SimpleNamespace(names=("s1",)),
)


@pytest.fixture
def keys(tmp_path):
    return new_key(tmp_path / "keys", "release")


def _gateway(tmp_path, pub, seed, cache, health_steps=2):
    staging, start = make_backend_factories(CFG, engine_cache_dir=cache)
    reports: list[dict] = []
    cfg = UpdaterConfig(gateway="gw-jetson", fleet="city", state_dir=tmp_path / "state", health_steps=health_steps)
    updater = Updater(cfg, trusted_keys=[pub], backend_factory=staging, start_backend_factory=start,
                      report=reports.append)  # fmt: skip
    updater.start(seed)
    guard = GuardedBackend(updater)
    values, observed, _ = golden_inputs(seed=3, batch=4)
    calendar = golden_inputs(seed=3, batch=4)[2] * 0

    def step():
        guard.step_boundary()
        guard.run(values, observed, calendar)
        return guard.model_version

    return updater, guard, reports, step


def _deliver(updater, env, chunks):
    updater.on_message(updater.topics.manifest, env)
    for topic, data in chunks:
        updater.on_message(topic, data)
    assert updater.wait_idle(10)


def test_an_update_builds_its_engine_off_the_step_thread_and_reports_it(tmp_path, keys, monkeypatch, caplog):
    _, pub, key = keys
    fake = FakeTensorRT().install(monkeypatch)
    cache = tmp_path / "engines"
    updater, guard, reports, step = _gateway(tmp_path, pub, make_bundle(tmp_path / "v1", key, version=1), cache)
    assert guard.name == "tensorrt" and guard.precision == "fp16"  # v1's engine was built at start
    step()
    env, chunks, _ = release(make_bundle(tmp_path / "v2", key, version=2), key, sequence=10)
    with caplog.at_level(logging.WARNING, logger="gapcast.edge.trt"):
        _deliver(updater, env, chunks)
    assert [c[0] for c in fake.calls] == ["fp16", "fp16"]  # v1 at start, v2 while staging; int8 skipped (no QDQ)
    assert "skipped: the bundle has no int8_qdq variant" in caplog.text and "falling back to fp16" in caplog.text
    assert [step() for _ in range(3)] == [2, 2, 2]
    active = next(r for r in reports if r["stage"] == "active")
    assert active["version"] == 2 and active["backend"]["name"] == "tensorrt"
    assert active["backend"]["precision"] == "fp16" and active["backend"]["requested_precision"] == "int8"
    assert active["backend"]["engine_build_s"] >= 0.0
    status = updater.status()["backend"]
    assert (status["name"], status["precision"]) == ("tensorrt", "fp16") and "engine_build_s" in status
    assert reports[-1]["committed"] is True
    assert len(list(cache.glob("fp16-*.engine"))) == 2  # both engines cached, each golden-checked


def test_an_engine_that_fails_at_every_precision_rejects_the_update_instead_of_moving_to_the_cpu(
    tmp_path, keys, monkeypatch
):
    _, pub, key = keys
    fake = FakeTensorRT().install(monkeypatch)
    updater, guard, reports, step = _gateway(tmp_path, pub, make_bundle(tmp_path / "v1", key, version=1),
                                             tmp_path / "engines")  # fmt: skip
    v1_backend = updater.active_backend
    step()
    fake.fail_build = {"int8", "fp16", "fp32"}
    env, chunks, _ = release(make_bundle(tmp_path / "v2", key, version=2), key, sequence=11)
    _deliver(updater, env, chunks)
    assert [r["stage"] for r in reports] == ["received", "verified", "staged", "rejected"]
    reason = reports[-1]["reason"]
    assert reason.startswith("TensorRT is present but no engine could be used: no TensorRT engine passed its checks")
    assert "fp16: build/run failed: cannot build fp16" in reason and "fp32: build/run failed: cannot build fp32" in reason
    assert [step() for _ in range(3)] == [1, 1, 1] and updater.active_backend is v1_backend
    assert guard.name == "tensorrt" and updater.store.current_name().startswith("v1-")


def test_a_rollback_keeps_the_previous_engine(tmp_path, keys, monkeypatch):
    _, pub, key = keys
    fake = FakeTensorRT(break_after={2: 2}).install(monkeypatch)  # v2: shadow run + golden check pass, then NaN
    cache = tmp_path / "engines"
    v1 = make_bundle(tmp_path / "v1", key, version=1)
    updater, guard, reports, step = _gateway(tmp_path, pub, v1, cache, health_steps=3)
    v1_backend = updater.active_backend
    assert isinstance(v1_backend, TrtBackend)
    step()
    env, chunks, _ = release(make_bundle(tmp_path / "v2", key, version=2), key, sequence=12)
    _deliver(updater, env, chunks)
    assert [step() for _ in range(3)] == [1, 1, 1]  # the first v2 step breaks: rolled back, served by v1
    assert [r["stage"] for r in reports][-2:] == ["active", "rolled_back"]
    assert updater.active_backend is v1_backend and not v1_backend._runner.closed  # the same warm engine
    v2_runner = fake.runners[-1]
    assert v2_runner.version == 2 and v2_runner.closed  # the failed engine's buffers were freed
    assert reports[-1]["backend"]["name"] == "tensorrt" and reports[-1]["version"] == 1
    # The v1 engine stays in the cache: a restart loads it without building.
    n_builds = len(fake.calls)
    again = select_backend(updater.active, engine_cache_dir=cache)
    assert again.name == "tensorrt" and again.meta["model_version"] == 1 and len(fake.calls) == n_builds
