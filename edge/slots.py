"""Install slots on the gateway: the incoming artifact, one folder per bundle, the ``current`` symlink, the journal.

``{state_dir}/`` (mode 0700) holds:

- ``incoming/{artifact_id}.tar``: the artifact being collected chunk by chunk (:class:`ArtifactAssembler`);
- ``slots/v{version}-{card sha[:12]}/``: one verified bundle per slot (:class:`SlotStore`), unpacked into a fresh
  private temporary folder and renamed into place, so a slot is either complete or absent;
- ``current``: a symlink to the running slot, swapped atomically (a temporary symlink renamed over it);
- ``journal.json``: the update state machine's journal, written atomically before each step
  (:mod:`gapcast.edge.updater`).

Shell code (files, no clock, no MQTT); the protocol rules it applies come from :mod:`gapcast.edge.release`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from gapcast.edge import BundleError, UpdateRejected
from gapcast.edge.bundle import Bundle, Card, private_dir, verify_bundle
from gapcast.edge.release import Manifest, check_chunk

__all__ = ["ArtifactAssembler", "SlotStore"]

log = logging.getLogger(__name__)

_JOURNAL = "journal.json"


class ArtifactAssembler:
    """Collects an artifact's chunks into a file, checking each chunk's sha256 as it arrives.

    Args:
        manifest: the release.
        path: where the artifact is assembled (created, pre-sized).

    Not thread-safe: :class:`Updater` holds its lock around it.
    """

    def __init__(self, manifest: Manifest, path: Path) -> None:
        self.manifest = manifest
        self.path = path
        self.received: set[int] = set()
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.truncate(manifest.artifact_bytes)

    @property
    def n_chunks(self) -> int:
        return len(self.manifest.chunk_sha256)

    @property
    def complete(self) -> bool:
        return len(self.received) == self.n_chunks

    def add(self, index: int, data: bytes) -> bool:
        """Write chunk ``index``; returns True when it was new.

        Raises:
            UpdateRejected: index out of range.
            ChunkFault: wrong length, or sha256 not the one the manifest pins (a transport fault).
        """
        m = self.manifest
        check_chunk(m, index, data)
        if index in self.received:
            return False
        with open(self.path, "r+b") as f:
            f.seek(index * m.chunk_bytes)
            f.write(data)
        self.received.add(index)
        return True

    def finish(self) -> Path:
        """Check the whole artifact's sha256 and return its path.

        Raises:
            UpdateRejected: chunks missing, or the whole-file hash differs although every chunk matched its pin (a
                verdict about the artifact: the manifest's chunk pins and whole-artifact pin disagree).
        """
        if not self.complete:
            msg = f"artifact incomplete: {len(self.received)}/{self.n_chunks} chunks"
            raise UpdateRejected(msg)
        h = hashlib.sha256()
        with open(self.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if h.hexdigest() != self.manifest.artifact_sha256:
            msg = f"artifact sha256 {h.hexdigest()[:16]}... is not the pinned {self.manifest.artifact_sha256[:16]}..."
            raise UpdateRejected(msg)
        return self.path


# --------------------------------------------------------------------------------------------- slots


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class SlotStore:
    """Bundle slots in a state folder: ``slots/v{version}-{card sha[:12]}/``, the ``current`` symlink, a journal.

    Args:
        root: the state folder (created with mode 0700; an existing one must belong to this user).

    Raises:
        BundleError: ``root`` belongs to another user or is not a folder.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.slots = self.root / "slots"
        self.incoming = self.root / "incoming"
        self.current_link = self.root / "current"
        self.journal_path = self.root / _JOURNAL
        private_dir(self.root)  # slots are loaded and run: nobody else may write there (issue 18, item 7)
        self.slots.mkdir(mode=0o700, exist_ok=True)
        self.unpacked = self.root / "unpacked"  # where a configured ``.tar`` seed is unpacked to be verified

    @staticmethod
    def slot_name(card: Card, card_sha256: str) -> str:
        return f"v{card.model_version}-{card_sha256[:12]}"

    def slot(self, name: str) -> Path:
        return self.slots / name

    def read_journal(self) -> dict[str, Any]:
        if not self.journal_path.is_file():
            return {}
        try:
            d = json.loads(self.journal_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("update journal %s unreadable (%s): starting from the slots on disk", self.journal_path, exc)
            return {}
        return d if isinstance(d, dict) else {}

    def write_journal(self, journal: dict[str, Any]) -> None:
        _atomic_write_json(self.journal_path, journal)

    def current_name(self) -> str | None:
        """Name of the slot ``current`` points to, or None."""
        try:
            target = os.readlink(self.current_link)
        except OSError:
            return None
        return Path(target).name

    def point_current(self, name: str) -> None:
        """Swap ``current`` to slot ``name`` atomically: a temporary symlink renamed over it (rename(2) is atomic)."""
        if not self.slot(name).is_dir():
            msg = f"slot {name} does not exist"
            raise BundleError(msg)
        tmp = self.root / f".current.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(Path("slots") / name, tmp)
        os.replace(tmp, self.current_link)
        _fsync_dir(self.root)

    def verify(self, name: str, trusted_keys: list) -> Bundle:
        return verify_bundle(self.slot(name), trusted_keys)

    def install_tar(self, tar_path: Path, trusted_keys: list) -> tuple[str, Bundle]:
        """Unpack a bundle ``.tar`` into a new slot and verify it there.

        Returns:
            (slot name, verified bundle at its final path).

        Raises:
            BundleError: the archive does not unpack (unsafe members are refused by tarfile's ``data`` filter) or
                the bundle does not verify.
        """
        tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=self.slots))
        try:
            try:
                with tarfile.open(tar_path) as tf:
                    tf.extractall(tmp, filter="data")
            except (tarfile.TarError, OSError) as exc:
                msg = f"cannot unpack the artifact: {exc}"
                raise BundleError(msg) from exc
            entries = list(tmp.iterdir())
            src = entries[0] if len(entries) == 1 and entries[0].is_dir() else tmp
            bundle = verify_bundle(src, trusted_keys)
            name = self.slot_name(bundle.card, bundle.card_sha256)
            dest = self.slot(name)
            if dest.exists():
                # Never delete a slot that may be running: keep it when it verifies, replace it only when broken.
                try:
                    return name, verify_bundle(dest, trusted_keys)
                except BundleError:
                    shutil.rmtree(dest)
            os.rename(src, dest)
            _fsync_dir(self.slots)
            return name, verify_bundle(dest, trusted_keys)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def install_dir(self, src: Path, trusted_keys: list) -> tuple[str, Bundle]:
        """Copy a verified bundle folder (or ``.tar``, unpacked under ``unpacked/``) into a slot (the first bundle
        a gateway runs)."""
        bundle = verify_bundle(src, trusted_keys, unpack_dir=self.unpacked)
        name = self.slot_name(bundle.card, bundle.card_sha256)
        dest = self.slot(name)
        if not dest.exists():
            tmp = Path(tempfile.mkdtemp(prefix=".seed-", dir=self.slots))
            shutil.copytree(bundle.path, tmp, dirs_exist_ok=True)
            os.rename(tmp, dest)
            _fsync_dir(self.slots)
        return name, verify_bundle(dest, trusted_keys)

    def remove_except(self, keep: Iterable[str | None]) -> list[str]:
        """Delete every slot (and leftover temporary folder) not in ``keep``; returns the names removed."""
        keep_set = {k for k in keep if k}
        removed = []
        for p in self.slots.iterdir():
            if p.name not in keep_set:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p.name)
        shutil.rmtree(self.incoming, ignore_errors=True)
        return removed

