"""Install slots and the incoming artifact (gapcast.edge.slots): chunk collection, private state folder."""

from __future__ import annotations

import hashlib
import os
import stat

import pytest
from support.fleet_fakes import make_bundle, new_key
from support.fleet_release import release

from gapcast.edge import BundleError, UpdateRejected
from gapcast.edge.release import ChunkFault
from gapcast.edge.slots import ArtifactAssembler, SlotStore


@pytest.fixture
def keys(tmp_path):
    return new_key(tmp_path / "keys", "release")


def test_assembler_checks_every_chunk_and_the_whole(tmp_path, keys):
    _, _, key = keys
    env, chunks, m = release(make_bundle(tmp_path / "b", key), key, sequence=1, chunk_bytes=500)
    asm = ArtifactAssembler(m, tmp_path / "a.tar")
    assert asm.n_chunks == len(chunks) >= 3
    flipped = bytearray(chunks[1][1])
    flipped[17] ^= 0x01
    with pytest.raises(ChunkFault, match="chunk 1 has sha256"):
        asm.add(1, bytes(flipped))
    with pytest.raises(ChunkFault, match="bytes, the manifest says"):
        asm.add(0, chunks[0][1][:-1])
    with pytest.raises(UpdateRejected, match="outside"):
        asm.add(len(chunks), b"x")
    for i, (_, data) in reversed(list(enumerate(chunks))):  # any order
        assert asm.add(i, data)
    assert not asm.add(0, chunks[0][1])  # a duplicate (QoS 1 redelivery) is harmless
    assert hashlib.sha256(asm.finish().read_bytes()).hexdigest() == m.artifact_sha256


def test_the_state_folder_is_private(tmp_path, keys, monkeypatch):
    root = tmp_path / "state"
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    store = SlotStore(root)  # an own folder with a wide mode is tightened
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700 and store.slots.is_dir()
    monkeypatch.setattr(os, "geteuid", lambda: os.stat(root).st_uid + 1)  # as if another user owned it
    with pytest.raises(BundleError, match="belongs to uid .* not to this user"):
        SlotStore(root)
