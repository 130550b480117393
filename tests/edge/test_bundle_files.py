"""Bundle files (issue 18, items 7 and 8): where a ``.tar`` is unpacked and what a bundle folder may hold."""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
import tempfile

import pytest

from gapcast.edge import BundleError
from gapcast.edge.bundle import sha256_file, verify_bundle


@pytest.fixture
def tar(tiny_bundle, tmp_path):
    out = tmp_path / "bundle.tar"
    with tarfile.open(out, "w") as tf:
        tf.add(tiny_bundle, arcname="bundle")
    return out


def test_a_folder_pre_created_in_the_shared_temp_dir_is_never_loaded(tar, tiny_bundle, signing_key, tmp_path,
                                                                    monkeypatch):  # fmt: skip
    """As found: ``<tmp>/gapcast-bundle-<sha16>`` was predictable and reused without an ownership check, so a
    folder another user created there was verified and would be loaded. Now the unpack goes under the caller's
    private folder; the shared temp folder is not looked at."""
    shared_tmp = tmp_path / "tmp"
    shared_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(shared_tmp))
    planted = shared_tmp / f"gapcast-bundle-{sha256_file(tar)[:16]}" / "bundle"
    shutil.copytree(tiny_bundle, planted)
    os.chmod(planted.parent, 0o777)
    state = tmp_path / "agent-state" / "bundles"
    b = verify_bundle(tar, [signing_key.public], unpack_dir=state)
    assert b.path == state / planted.parent.name / "bundle" and not str(b.path).startswith(str(shared_tmp))
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(b.path.parent).st_mode) == 0o700  # the per-archive folder (mkdtemp) too
    assert sorted(p.name for p in state.iterdir()) == [planted.parent.name]  # no temporary folder left
    # Reused while private: same folder, no second copy.
    assert verify_bundle(tar, [signing_key.public], unpack_dir=state).path == b.path


def test_an_unpack_folder_with_the_wrong_mode_or_owner_is_unpacked_afresh(tar, signing_key, tmp_path, monkeypatch):
    state = tmp_path / "bundles"
    first = verify_bundle(tar, [signing_key.public], unpack_dir=state)
    folder = first.path.parent
    marker = folder / "bundle" / "planted.txt"
    os.chmod(folder, 0o777)  # anyone could have written into it
    marker.write_text("x")
    again = verify_bundle(tar, [signing_key.public], unpack_dir=state)
    assert again.path == first.path and not marker.exists()  # discarded and unpacked into a fresh folder
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    real_uid = os.geteuid()
    monkeypatch.setattr(os, "geteuid", lambda: real_uid + 1)  # the whole unpack root now belongs to "another user"
    with pytest.raises(BundleError, match="refusing to use .* for bundles: .* belongs to uid"):
        verify_bundle(tar, [signing_key.public], unpack_dir=state)


def test_a_reused_folder_that_was_altered_is_unpacked_afresh(tar, signing_key, tmp_path):
    state = tmp_path / "bundles"
    first = verify_bundle(tar, [signing_key.public], unpack_dir=state)
    (first.path / "card.json").write_bytes(b"{}")
    assert verify_bundle(tar, [signing_key.public], unpack_dir=state).path == first.path
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar archive\n" * 40)
    with pytest.raises(BundleError, match=r"junk\.tar is not a valid tar archive"):
        verify_bundle(junk, [signing_key.public], unpack_dir=state)


@pytest.mark.parametrize("extra", ["notes.txt", "sub/evil.onnx", ".hidden", "link"])
def test_files_the_card_does_not_list_are_refused(tiny_bundle, signing_key, tmp_path, extra):
    """As found: ``verify_bundle`` accepted files the card does not list, against its own docstring."""
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    assert verify_bundle(b, [signing_key.public]).card.model_version == 1
    target = b / extra
    target.parent.mkdir(parents=True, exist_ok=True)
    if extra == "link":
        target.symlink_to(b / "card.json")
    else:
        target.write_bytes(b"not pinned")
    with pytest.raises(BundleError, match=rf"holds 1 file\(s\) the card does not list: {extra}$"):
        verify_bundle(b, [signing_key.public])
