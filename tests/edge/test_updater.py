"""The gateway's update state machine without a broker: messages are handed to the updater directly."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
from support.fleet_fakes import fake_factory, golden_inputs, make_bundle, new_key
from support.fleet_release import release as _release

from gapcast.edge.bundle import verify_bundle
from gapcast.edge.guard import GuardedBackend
from gapcast.edge.updater import Updater, UpdaterConfig

FLEET = "city"


@pytest.fixture
def keys(tmp_path):
    return new_key(tmp_path / "keys", "release")


class Gateway:
    """An updater plus a guarded backend, driven by hand: deliver() messages, step() the model."""

    def __init__(self, tmp_path, pub, seed, *, name="gw-1", fail_after=None, health_steps=2, gate=None,
                 mono=None, **cfg):  # fmt: skip
        self.reports, self.subs, self.unsubs = [], [], []
        self.cfg = UpdaterConfig(gateway=name, fleet=FLEET, state_dir=tmp_path / f"state-{name}",
                                 health_steps=health_steps, **cfg)  # fmt: skip
        self.updater = Updater(
            self.cfg, trusted_keys=[pub], backend_factory=fake_factory(fail_after, gate=gate),
            report=self.reports.append, subscribe=self.subs.append, unsubscribe=self.unsubs.append,
            **({"mono": mono} if mono else {}),
        )  # fmt: skip
        self.updater.start(seed)
        self.guard = GuardedBackend(self.updater)
        self.values, self.observed, self.calendar = golden_inputs(seed=3, batch=4)
        self.calendar = np.zeros((4, 8 + 4, 6), dtype=np.float32)

    def deliver(self, envelope, chunks, *, wait=True):
        """Hand a manifest and chunks over (as paho's network thread does); by default wait for the staging worker."""
        self.updater.on_message(self.updater.topics.manifest, envelope)
        for topic, data in chunks:
            self.updater.on_message(topic, data)
        if wait:
            assert self.updater.wait_idle(10)

    def step(self):
        """One agent step: boundary, then one batched inference. Returns (version used, forecast)."""
        self.guard.step_boundary()
        _, forecast = self.guard.run(self.values, self.observed, self.calendar)
        return self.guard.model_version, forecast

    @property
    def stages(self):
        return [r["stage"] for r in self.reports]


# ------------------------------------------------------------------------------------------------ the flow


def test_update_switches_at_one_step_and_commits_after_the_health_window(tmp_path, keys):
    _, pub, key = keys
    v1 = make_bundle(tmp_path / "v1", key, version=1)
    v2 = make_bundle(tmp_path / "v2", key, version=2, fake={"scale": 1.0, "bias": 0.5}, mean=12.0)
    gw = Gateway(tmp_path, pub, v1, health_steps=2)
    env, chunks, m = _release(v2, key, sequence=10)
    versions = [gw.step()[0] for _ in range(3)]
    gw.deliver(env, chunks)
    # One exact topic per chunk (RabbitMQ sends retained messages only to wildcard-free subscriptions).
    assert gw.subs == [f"gapcast/v1/fleet/{FLEET}/artifacts/{m.artifact_id}/{i}" for i in range(len(m.chunk_sha256))]
    assert len(gw.subs) == len(chunks) > 1
    assert gw.updater.update_ready
    outs = []
    for _ in range(5):
        v, f = gw.step()
        versions.append(v)
        outs.append(f)
    assert versions == [1, 1, 1, 2, 2, 2, 2, 2]  # one switch, at a step boundary, no step without a forecast
    assert all(np.isfinite(f).all() for f in outs)
    assert gw.stages == ["received", "verified", "staged", "active", "active"]
    assert gw.reports[-1]["committed"] is True and gw.reports[-1]["version"] == 2
    store = gw.updater.store
    j = store.read_journal()
    assert j["phase"] == "idle" and j["committed"].startswith("v2-") and j["previous"].startswith("v1-")
    assert (store.root / "current").is_symlink() and store.current_name() == j["committed"]
    assert sorted(p.name for p in store.slots.iterdir()) == sorted([j["committed"], j["previous"]])
    assert j["last_sequence"] == 10
    # v2's normalisation (mean 12) is converted back to the agent's (mean 10): bias 0.5 normalised in v2 units.
    _, f_new = gw.guard.run(gw.values, gw.observed, gw.calendar)
    mean = (gw.values * gw.observed).sum(1) / np.maximum(gw.observed.sum(1), 1)
    expect = (((mean * 5 + 10 - 12) / 5 + 0.5) * 5 + 12 - 10) / 5
    np.testing.assert_allclose(f_new[:, 0, :], expect, rtol=1e-5, atol=1e-5)
    # The same retained manifest again (reconnect) is ignored; status tells the version.
    gw.deliver(env, chunks)
    assert gw.stages[-1] == "active" and gw.updater.status()["model_version"] == 2


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("unknown_key", "does not verify under any of the 1 trusted key"),
        ("older", "version 1 is not newer than the running 2"),
        ("incompatible", "incompatible with the running model: lookback 6 != running 8"),
        ("nan_model", "shadow run on 4 live window(s): imputed holds 96 non-finite value(s)"),
        ("golden_mismatch", "golden check FAILED for fp32: max abs diff 1 (limit 1e-05)"),
    ],
)
def test_bad_releases_are_refused_and_the_gateway_stays_put(tmp_path, keys, case, reason):
    _, pub, key = keys
    gw = Gateway(tmp_path, pub, make_bundle(tmp_path / "v2", key, version=2))
    gw.step()
    sign_key = key
    if case == "unknown_key":
        sign_key = new_key(tmp_path / "rogue", "rogue")[2]
        cand = make_bundle(tmp_path / "c", sign_key, version=3)
    elif case == "older":
        cand = make_bundle(tmp_path / "c", key, version=1)
    elif case == "incompatible":
        cand = make_bundle(tmp_path / "c", key, version=3, lookback=6)
    elif case == "nan_model":
        cand = make_bundle(tmp_path / "c", key, version=3, fake={"nan": True}, golden_fake={})
    else:
        cand = make_bundle(tmp_path / "c", key, version=3, fake={"bias": 1.0}, golden_fake={"bias": 0.0})
    env, chunks, _ = _release(cand, sign_key, sequence=20)
    gw.deliver(env, chunks)
    versions = [gw.step()[0] for _ in range(3)]
    assert versions == [2, 2, 2]
    assert gw.stages[-1] == "rejected"
    assert reason in gw.reports[-1]["reason"]
    store = gw.updater.store
    assert store.current_name().startswith("v2-")
    assert [p.name for p in store.slots.iterdir()] == [store.current_name()]  # no half-installed slot left
    assert not store.incoming.exists()


def test_signed_rollback_to_an_older_version_is_accepted(tmp_path, keys):
    _, pub, key = keys
    v1 = make_bundle(tmp_path / "v1", key, version=1)
    gw = Gateway(tmp_path, pub, make_bundle(tmp_path / "v2", key, version=2), health_steps=1)
    env, chunks, _ = _release(v1, key, sequence=30, kind="rollback", rollback_from=2)
    gw.deliver(env, chunks)
    assert [gw.step()[0] for _ in range(3)] == [1, 1, 1]
    assert gw.reports[-1]["committed"] is True and gw.reports[-1]["version"] == 1
    # The same rollback manifest replayed later with an old sequence is ignored.
    env_old, chunks_old, _ = _release(v1, key, sequence=29, kind="rollback")
    gw.deliver(env_old, chunks_old)
    assert gw.stages[-1] == "active"


def test_model_that_breaks_after_activation_is_rolled_back_and_refused_later(tmp_path, keys):
    _, pub, key = keys
    v1 = make_bundle(tmp_path / "v1", key, version=1)
    v2 = make_bundle(tmp_path / "v2", key, version=2)
    # v2's backend: 1 golden call + 1 shadow call pass, the 4th call (2nd live step) returns NaN.
    gw = Gateway(tmp_path, pub, v1, fail_after={2: 3}, health_steps=5)
    gw.step()
    env, chunks, m = _release(v2, key, sequence=40)
    gw.deliver(env, chunks)
    results = [gw.step() for _ in range(4)]
    assert [v for v, _ in results] == [2, 1, 1, 1]  # the failing step itself is served by v1
    assert all(np.isfinite(f).all() for _, f in results)
    assert gw.stages == ["received", "verified", "staged", "active", "rolled_back"]
    rb = gw.reports[-1]
    assert rb["failed_version"] == 2 and rb["version"] == 1 and "non-finite" in rb["reason"]
    store = gw.updater.store
    assert store.current_name().startswith("v1-") and len(list(store.slots.iterdir())) == 1
    # Promoting the same release again (new sequence) is refused: it failed here.
    env2, chunks2, _ = _release(v2, key, sequence=41)
    gw.deliver(env2, chunks2)
    assert gw.stages[-1] == "rejected" and "was refused here before: rolled back" in gw.reports[-1]["reason"]


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, the files stay as they are."""


@pytest.mark.parametrize("where", ["staged", "health"])
def test_restart_mid_update_comes_back_on_one_verified_bundle(tmp_path, keys, monkeypatch, where):
    _, pub, key = keys
    v1 = make_bundle(tmp_path / "v1", key, version=1)
    v2 = make_bundle(tmp_path / "v2", key, version=2)
    gw = Gateway(tmp_path, pub, v1, health_steps=3)
    gw.step()
    env, chunks, _ = _release(v2, key, sequence=50)
    if where == "health":
        gw.deliver(env, chunks)
    if where == "staged":  # killed on the staging worker, after the journal said "staged"
        killed = []
        monkeypatch.setattr(threading, "excepthook", lambda args: killed.append(args.exc_type))
        monkeypatch.setattr(Updater, "_check_golden", lambda *a: (_ for _ in ()).throw(_Killed()))
        gw.deliver(env, chunks)
        monkeypatch.undo()
        assert killed == [_Killed] and gw.step()[0] == 1
        assert gw.updater.store.read_journal()["phase"] == "staged"
    else:
        assert gw.step()[0] == 2  # switched, inside the health window
        assert gw.updater.store.read_journal()["phase"] == "health"
    assert len(list(gw.updater.store.slots.iterdir())) == 2  # both bundles on disk at the kill

    # A new process on the same state folder.
    again = Gateway(tmp_path, pub, v1, health_steps=3)
    store = again.updater.store
    assert again.guard.model_version == 1
    assert store.current_name().startswith("v1-")
    assert [p.name for p in store.slots.iterdir()] == [store.current_name()]
    verify_bundle(os.path.realpath(store.root / "current"), [pub])
    assert again.stages == ["rolled_back"] and "restart interrupted the update" in again.reports[0]["reason"]
    # The retained manifest comes again at reconnect: the update is retried and completes.
    again.deliver(env, chunks)
    assert [again.step()[0] for _ in range(5)] == [2, 2, 2, 2, 2]
    assert again.reports[-1]["committed"] is True


def test_real_onnx_bundles_switch_through_onnxruntime(tmp_path, tiny_bundle, signing_key):
    """Two tiny ConFill bundles from the export pipeline (real Beijing windows), run by the real onnxruntime
    backend: the golden check, the shadow run and the switch work on real models, not only on fakes."""
    from gapcast.edge.backends import select_backend
    from gapcast.edge.trt import compare_golden, golden_tolerance
    from gapcast.tools.tinybundle import build_tiny_bundle, tiny_options

    v2 = build_tiny_bundle(
        tmp_path / "v2", sign_key=signing_key.private, seed=1, options=tiny_options(model_version=2)
    ).path
    reports = []
    cfg = UpdaterConfig(gateway="gw-onnx", fleet=FLEET, state_dir=tmp_path / "state", health_steps=2)
    updater = Updater(
        cfg, trusted_keys=[signing_key.public], report=reports.append,
        backend_factory=lambda b: select_backend(b, prefer="onnxruntime", threads=1),
    )  # fmt: skip
    updater.start(tiny_bundle)
    guard = GuardedBackend(updater)
    gold1 = guard.bundle.golden()
    live = (gold1["values"], gold1["observed"], gold1["calendar"])  # real windows, incl. a 72 h outage
    guard.step_boundary()
    guard.run(*live)
    env, chunks, _ = _release(v2, _private(signing_key), sequence=100, chunk_bytes=64 * 1024)
    updater.on_message(updater.topics.manifest, env)
    for topic, data in chunks:
        updater.on_message(topic, data)
    assert updater.wait_idle(30)  # staging (unpack, verify, onnxruntime session, shadow run, golden) on the worker
    swap = guard.step_boundary()
    assert swap is not None and swap.reason == "update" and guard.model_version == 2
    assert [r["stage"] for r in reports] == ["received", "verified", "staged", "active"]
    imputed, forecast = guard.run(*live)
    gold2 = guard.bundle.golden()
    np.testing.assert_array_equal(gold2["values"], gold1["values"])  # same station, same golden windows
    precision = updater.active_backend.precision
    check = compare_golden(imputed, forecast, gold2, precision, golden_tolerance(precision, guard.bundle.card.raw))
    assert check.ok, check.describe()
    assert not np.allclose(forecast, gold1["forecast"], atol=1e-3)  # another model (seed 1) really serves now
    for _ in range(2):
        guard.step_boundary()
        guard.run(*live)
    guard.step_boundary()
    assert reports[-1]["stage"] == "active" and reports[-1]["committed"] is True


def _private(kp):
    from gapcast.deploy.fleet import load_private_key

    return load_private_key(kp.private)


def test_edge_config_update_section_starts_from_the_store(tmp_path, tiny_bundle, signing_key):
    from gapcast.edge import ConfigError
    from gapcast.edge.config import parse_config
    from gapcast.edge.guard import start_from_config

    doc = {
        "gateway": {"id": "gw-cfg", "fleet": FLEET},
        "stations": {"names": ["Aotizhongxin"]},
        "model": {"bundle": str(tiny_bundle), "trusted_keys": [str(signing_key.public)], "backend": "onnxruntime"},
        "agent": {"state_dir": str(tmp_path / "state")},
        "update": {"enabled": True, "health_steps": 4},
    }
    cfg = parse_config(doc, base=tmp_path)
    assert cfg.update.state_dir == tmp_path / "state" / "models" and cfg.update.health_steps == 4
    link, guard, note = start_from_config(cfg)
    assert note.startswith("onnxruntime") and f"gapcast/v1/fleet/{FLEET}/manifest" in note
    slot = guard.updater.store.current_name()
    assert slot.startswith("v1-") and (tmp_path / "state" / "models" / "slots" / slot / "card.json").is_file()
    assert link.handles(f"gapcast/v1/fleet/{FLEET}/artifacts/x/0") and not link.handles("gapcast/v1/stations/a/readings")
    # A restart runs the store's bundle (verified again), not a copy of model.bundle.
    link2, guard2, _ = start_from_config(cfg)
    assert guard2.updater.store.current_name() == slot and guard2.bundle.path.name == slot
    with pytest.raises(ConfigError, match="nothing to update"):
        start_from_config(parse_config({**doc, "model": {**doc["model"], "backend": "interpolation"}}, base=tmp_path))
    with pytest.raises(ConfigError, match="unknown key"):
        parse_config({**doc, "update": {"enabled": True, "health_step": 4}}, base=tmp_path)


# ------------------------------------------------------------------------------------------------ issue 18, item 6


def _flip(chunks, index, at=100):
    data = bytearray(chunks[index][1])
    data[at] ^= 0x20
    out = list(chunks)
    out[index] = (chunks[index][0], bytes(data))
    return out


def test_a_bad_chunk_does_not_burn_the_signed_release(tmp_path, keys):
    """As found: one flipped byte in chunk 1 consumed the manifest's sequence, and the same manifest with correct
    chunks was then ignored. Now the chunk is asked for again and the correct one completes the release."""
    _, pub, key = keys
    gw = Gateway(tmp_path, pub, make_bundle(tmp_path / "v1", key, version=1), health_steps=1,
                 chunk_retry_s=600.0, chunk_retry_delay_s=0.05)  # fmt: skip
    gw.step()
    env, chunks, m = _release(make_bundle(tmp_path / "v2", key, version=2), key, sequence=60)
    gw.deliver(env, _flip(chunks, 1))
    assert gw.stages == ["received"] and not gw.updater.update_ready
    assert gw.updater.counters["chunk_faults"] == 1 and gw.updater.last_sequence_seen == 60
    assert gw.updater.store.read_journal()["last_sequence"] == 0  # not consumed
    # each chunk's own topic (exact subscriptions: RabbitMQ sends retained messages only to those)
    filt = [f"gapcast/v1/fleet/{FLEET}/artifacts/{m.artifact_id}/{i}" for i in range(len(chunks))]
    deadline = time.monotonic() + 10
    while gw.updater.counters["chunk_requests"] < 1 and time.monotonic() < deadline:
        threading.Event().wait(0.01)  # the re-request timer (50 ms) re-subscribes to the chunks
    assert gw.updater.counters["chunk_requests"] >= 1
    assert gw.unsubs[: len(filt)] == filt and gw.subs[-1] == filt[-1]
    gw.deliver(env, chunks)  # the same manifest again, now with correct chunks (a retained resend)
    assert [gw.step()[0] for _ in range(3)] == [2, 2, 2]
    assert gw.stages == ["received", "verified", "staged", "active", "active"]
    assert gw.updater.store.read_journal()["last_sequence"] == 60


def test_chunks_that_stay_bad_are_given_up_after_the_retry_window_without_consuming_the_sequence(tmp_path, keys):
    _, pub, key = keys
    now = [1000.0]
    gw = Gateway(tmp_path, pub, make_bundle(tmp_path / "v1", key, version=1), health_steps=1, mono=lambda: now[0],
                 chunk_retry_s=300.0, chunk_retry_delay_s=3600.0)  # fmt: skip  (the timer never fires here)
    env, chunks, _ = _release(make_bundle(tmp_path / "v2", key, version=2), key, sequence=70, chunk_bytes=500)
    bad = _flip(chunks, 2, at=3)
    gw.deliver(env, bad)
    now[0] += 120.0
    gw.updater.poll()  # asks again: the broker re-sends the retained chunks, chunk 2 still bad
    gw.deliver(env, bad)
    assert gw.stages == ["received"] and gw.updater.counters["chunk_requests"] == 2  # poll + the manifest again
    now[0] += 181.0  # 301 s after the first fault
    gw.updater.poll()
    assert gw.stages == ["received", "rejected"]
    rep = gw.reports[-1]
    assert rep["transport"] is True and rep["reason"].startswith("artifact refused: chunk 2 has sha256")
    assert "over 301 s" in rep["reason"] and "does not burn the release" in rep["reason"]
    assert not gw.updater.store.incoming.exists()
    assert gw.updater.store.read_journal()["last_sequence"] == 0 and gw.updater.last_sequence_seen == 0
    gw.deliver(env, chunks)  # the same signed release, later, with its chunks repaired: installs
    assert [gw.step()[0] for _ in range(2)] == [2, 2] and gw.reports[-1]["committed"] is True


def test_a_whole_artifact_hash_mismatch_is_a_verdict_and_consumes_the_sequence(tmp_path, keys, monkeypatch):
    """Every chunk matched its pin but the whole artifact does not match its own: about the artifact, burnt."""
    from gapcast.edge.slots import ArtifactAssembler

    _, pub, key = keys
    gw = Gateway(tmp_path, pub, make_bundle(tmp_path / "v1", key, version=1))
    env, chunks, _ = _release(make_bundle(tmp_path / "v2", key, version=2), key, sequence=80)
    real = ArtifactAssembler.finish

    def finish(self):
        data = bytearray(self.path.read_bytes())
        data[0] ^= 0x01  # the disk, not the transport: every chunk arrived as pinned
        self.path.write_bytes(bytes(data))
        return real(self)

    monkeypatch.setattr(ArtifactAssembler, "finish", finish)
    gw.deliver(env, chunks)
    assert gw.stages == ["received", "rejected"] and "is not the pinned" in gw.reports[-1]["reason"]
    assert gw.updater.store.read_journal()["last_sequence"] == 80


# ------------------------------------------------------------------------------------------------ the worker


def test_staging_runs_on_a_worker_and_only_the_swap_waits_for_a_step(tmp_path, keys):
    """A backend build that takes as long as the test says: steps keep running on v1 meanwhile, and the switch
    happens at the first step boundary after the staging finished."""
    _, pub, key = keys
    build = threading.Event()
    gw = Gateway(tmp_path, pub, make_bundle(tmp_path / "v1", key, version=1), gate={2: build})
    gw.step()
    env, chunks, _ = _release(make_bundle(tmp_path / "v2", key, version=2), key, sequence=90)
    gw.deliver(env, chunks, wait=False)
    assert gw.updater.status()["update_phase"] == "staging" and gw.updater.busy
    deadline = time.monotonic() + 10
    while len(gw.stages) < 3 and time.monotonic() < deadline:  # the worker verifies, then builds the backend
        time.sleep(0.01)
    assert [gw.step()[0] for _ in range(4)] == [1, 1, 1, 1]  # the step thread is never blocked by the build
    assert gw.stages == ["received", "verified", "staged"] and not gw.updater.update_ready
    build.set()
    assert gw.updater.wait_idle(10) and gw.updater.update_ready
    assert [gw.step()[0] for _ in range(3)] == [2, 2, 2]
    assert gw.stages[-2:] == ["active", "active"] and gw.reports[-2]["backend"]["describe"] == "fake numpy rule of v2"
