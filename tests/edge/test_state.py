"""Window-state snapshots: round trip, atomic write, corruption detection, compatibility, scheduling."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest

from gapcast.edge import state as state_mod
from gapcast.edge.state import (
    SnapshotError,
    SnapshotScheduler,
    StationState,
    atomic_write_bytes,
    load_snapshot,
    read_snapshot,
    save_snapshot,
)


def stations():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(96, 13)).astype(np.float32)
    v[5:9, :6] = np.nan
    return {
        "Dongsi": StationState(
            arrays={"values": v, "observed": ~np.isnan(v), "epoch_s": np.arange(96, dtype=np.int64) * 3600},
            meta={"last_published_step_s": 95 * 3600, "readings": 1234},
        ),
        "站 2/x": StationState(arrays={"values": np.zeros((96, 13), np.float32)}, meta={"last_published_step_s": None}),
    }


META = {"model_version": 3, "channels": ["PM2.5", "PM10"], "cadence_s": 3600, "lookback": 96}


def test_round_trip_exact(tmp_path):
    p = tmp_path / "state.npz"
    save_snapshot(p, stations(), META, saved_s=123.5)
    snap = read_snapshot(p)
    assert snap.saved_s == 123.5
    assert snap.meta == META
    assert list(snap.stations) == ["Dongsi", "站 2/x"]
    a, b = stations()["Dongsi"], snap.stations["Dongsi"]
    np.testing.assert_array_equal(b.arrays["values"], a.arrays["values"])  # NaNs at the same places
    assert b.arrays["observed"].dtype == np.bool_ and b.arrays["observed"].sum() == 96 * 13 - 24
    assert b.arrays["epoch_s"].dtype == np.int64 and b.arrays["epoch_s"][-1] == 95 * 3600
    assert b.meta == {"last_published_step_s": 342000, "readings": 1234}
    assert snap.stations["站 2/x"].meta == {"last_published_step_s": None}


def test_header_is_json_with_version(tmp_path):
    p = tmp_path / "state.npz"
    save_snapshot(p, stations(), META)
    with np.load(p) as z:
        header = json.loads(z["__header__"].tobytes())
    assert header["format"] == "gapcast-window-state" and header["version"] == 1
    assert header["stations"][0]["arrays"]["values"] == {"key": "s0/values", "shape": [96, 13], "dtype": "<f4"}


def test_load_missing_returns_none(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    assert load_snapshot(tmp_path / "nope.npz") is None
    assert "empty windows" in caplog.text


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_corrupt_snapshot_detected_logged_moved_aside(tmp_path, caplog, damage):
    p = tmp_path / "state.npz"
    save_snapshot(p, stations(), META)
    data = bytearray(p.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        # Flip one byte inside the first array's data: the member CRC-32 catches it.
        i = data.index(b"\x93NUMPY", 200) + 200
        data[i] ^= 0xFF
    elif damage == "garbage":
        data = bytearray(os.urandom(4096))
    else:
        data = bytearray()
    p.write_bytes(bytes(data))
    with pytest.raises(SnapshotError):
        read_snapshot(p)
    assert load_snapshot(p) is None
    assert "unusable" in caplog.text
    assert not p.exists() and (tmp_path / "state.npz.corrupt").exists()


def test_header_shape_mismatch_is_corruption(tmp_path):
    p = tmp_path / "state.npz"
    save_snapshot(p, stations(), META)
    with np.load(p) as z:
        members = {k: z[k] for k in z.files}
    header = json.loads(members["__header__"].tobytes())
    header["stations"][0]["arrays"]["values"]["shape"] = [95, 13]
    members["__header__"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    np.savez(p, **members)
    with pytest.raises(SnapshotError, match="header says"):
        read_snapshot(p)


def test_other_version_refused(tmp_path):
    p = tmp_path / "state.npz"
    save_snapshot(p, stations(), META)
    with np.load(p) as z:
        members = {k: z[k] for k in z.files}
    header = json.loads(members["__header__"].tobytes())
    header["version"] = 2
    members["__header__"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    np.savez(p, **members)
    with pytest.raises(SnapshotError, match="version 2"):
        read_snapshot(p)


def test_incompatible_meta_not_restored(tmp_path, caplog):
    p = tmp_path / "state.npz"
    save_snapshot(p, stations(), META)
    assert load_snapshot(p, expect_meta={"cadence_s": 3600, "channels": ("PM2.5", "PM10")}) is not None
    assert load_snapshot(p, expect_meta={"lookback": 48}) is None
    assert "not restored" in caplog.text
    assert p.exists()  # incompatible is not corrupt: left in place


def test_object_arrays_and_nan_meta_refused(tmp_path):
    with pytest.raises(SnapshotError):
        save_snapshot(tmp_path / "a.npz", {"x": StationState(arrays={"v": np.array([{}], dtype=object)})})
    with pytest.raises(SnapshotError):
        save_snapshot(tmp_path / "b.npz", {"x": StationState(arrays={}, meta={"v": float("nan")})})


def test_atomic_write_failure_keeps_previous(tmp_path, monkeypatch):
    p = tmp_path / "state.npz"
    save_snapshot(p, stations(), META, saved_s=1.0)
    before = p.read_bytes()

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(state_mod.os, "replace", boom)
    with pytest.raises(OSError):
        save_snapshot(p, stations(), META, saved_s=2.0)
    assert p.read_bytes() == before
    assert [q.name for q in tmp_path.iterdir()] == ["state.npz"]  # no temp file left behind


def test_atomic_write_fsyncs_file_and_directory(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else fd)
        return real(fd)

    monkeypatch.setattr(state_mod.os, "fsync", spy)
    atomic_write_bytes(tmp_path / "f.bin", b"abc")
    assert (tmp_path / "f.bin").read_bytes() == b"abc"
    assert len(synced) == 2
    if os.path.exists("/proc/self/fd"):
        assert synced[1] == str(tmp_path)  # the directory, after the rename


def test_scheduler_periodic_and_on_demand(tmp_path, caplog):
    calls = []

    def collect():
        calls.append(1)
        return stations(), META

    s = SnapshotScheduler(tmp_path / "state.npz", collect, interval_s=60)
    assert s.maybe_save(1000.0) is True  # first tick saves
    assert s.maybe_save(1030.0) is False
    assert s.maybe_save(1060.0) is True
    assert s.save_now() is True
    assert s.saves == 3 and len(calls) == 3
    # A failing collect is logged and counted, never raised.
    s.collect = lambda: (_ for _ in ()).throw(OSError("read-only file system"))
    assert s.save_now() is False
    assert s.failures == 1 and "read-only" in caplog.text
    assert read_snapshot(tmp_path / "state.npz").meta == META


def test_replay_journal_feeds_the_core_in_order():
    from gapcast.edge.outbox import JournalEntry
    from gapcast.edge.state import replay_journal

    calls = []

    class Core:
        def ingest(self, topic, payload, now_s, *, retained=False):
            calls.append(("ingest", topic, payload, now_s, retained))
            return ["ignored output"]

        def tick(self, now_s):
            calls.append(("tick", now_s))
            return ["ignored output"]

    entries = [
        JournalEntry(1, "ingest", 100.0, "a/readings", b"{}", False),
        JournalEntry(2, "tick", 101.0),
        JournalEntry(3, "bogus", 102.0),
        JournalEntry(4, "ingest", 103.0, "b/readings", b"[]", True),
    ]
    assert replay_journal(Core(), entries) == 3
    assert calls == [
        ("ingest", "a/readings", b"{}", 100.0, False),
        ("tick", 101.0),
        ("ingest", "b/readings", b"[]", 103.0, True),
    ]


def test_scheduler_on_saved_gets_the_meta_and_never_raises(tmp_path, caplog):
    seen = []

    def on_saved(meta):
        seen.append(dict(meta))
        raise RuntimeError("journal truncate failed")

    s = SnapshotScheduler(tmp_path / "s.npz", lambda: (stations(), {**META, "journal_seq": 7}), on_saved=on_saved)
    assert s.save_now() is True
    assert seen == [{**META, "journal_seq": 7}]
    assert "journal truncate failed" in caplog.text


def test_agent_core_state_round_trip_with_journal(tmp_path, card, make_core):
    """A core restored from a snapshot plus the journal of what followed equals the core that never stopped."""
    from gapcast.edge.outbox import JournalEntry
    from gapcast.edge.state import replay_journal

    T0 = 1_483_228_800

    def reading(k, a, b=None):
        vals = {"a": a} if b is None else {"a": a, "b": b}
        return json.dumps({"ts": T0 + 3600 * k + 60, "values": vals}).encode()

    live = make_core()
    inputs = [("gapcast/v1/stations/s1/readings", reading(k, 10.0 + k, float(k))) for k in range(8)]
    inputs.insert(3, ("gapcast/v1/stations/s2/readings", reading(2, 50.0)))
    p = tmp_path / "w.npz"
    journal = []
    for j, (topic, payload) in enumerate(inputs):
        now = T0 + 3600 * 9
        live.ingest(topic, payload, now)
        live.tick(now)
        if j == 4:  # snapshot here; the rest goes to the journal
            save_snapshot(p, {n: StationState(a, m) for n, (a, m) in live.export_state().items()}, live.state_meta())
        elif j > 4:
            journal += [JournalEntry(2 * j, "ingest", now, topic, payload), JournalEntry(2 * j + 1, "tick", now)]
    restored = make_core()
    snap = load_snapshot(p, expect_meta=restored.state_meta())
    assert restored.restore_state({n: (s.arrays, s.meta) for n, s in snap.stations.items()}) == 2
    replay_journal(restored, journal)
    for name, (arrays, meta) in live.export_state().items():
        r_arrays, r_meta = restored.export_state()[name]
        assert r_meta == meta
        for k in arrays:
            np.testing.assert_array_equal(r_arrays[k], arrays[k])


def test_second_agent_on_the_same_state_dir_is_refused(tmp_path):
    from gapcast.edge import ConfigError
    from gapcast.edge.state import lock_state_dir

    state = tmp_path / "state"
    first = lock_state_dir(state)  # creates the folder
    assert (state / "agent.lock").read_text().strip() == str(os.getpid())
    with pytest.raises(ConfigError) as err:
        lock_state_dir(state)  # flock locks are per open file: a second open in the same process conflicts too
    assert str(err.value).startswith(f"another gapcast agent is running with state_dir {state} (pid {os.getpid()})")
    first.release()
    again = lock_state_dir(state)  # free after release (and after the holder exits, whatever the lock file says)
    again.release()
