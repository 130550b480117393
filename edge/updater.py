"""Fleet model updates on the gateway: signed release manifests, chunked artifacts, A/B slots, rollback.

The cloud (``gapcast fleet ...``, :mod:`gapcast.deploy.fleet`) publishes, retained, under
``{prefix}/fleet/{fleet}/``:

- ``manifest``: the current release, a signed envelope (see :func:`open_envelope`);
- ``releases/{version}``: every release ever published, for ``gapcast fleet rollback --to VERSION``;
- ``artifacts/{artifact_id}/{index}``: the bundle as a ``.tar``, cut in chunks, each pinned by sha256 in the
  manifest.

The gateway (:class:`Updater`) follows the steps of image-based updaters such as RAUC, Mender and SWUpdate, on a
model instead of a root file system:

1. *received*: the envelope's Ed25519 signature verifies under a trusted key; the manifest is for this fleet, newer
   than any manifest already handled (its ``sequence``, so an old signed manifest cannot be replayed), targets this
   gateway (canary list, deterministic percent bucket, or everyone), is compatible with the running card (channels,
   cadence, L, H, calendar) and, unless it is a signed rollback, carries a newer model version.
2. the artifact's chunks are collected, each checked against its sha256, then the whole artifact's sha256;
3. *verified*: unpacked into a new slot beside the current one and checked with
   :func:`gapcast.edge.bundle.verify_bundle` (card signature, every file's sha256); the card must be the one the
   manifest pins;
4. *staged*: the journal records the slot; the backend is built; the golden inputs reproduce the golden outputs
   and a shadow run on the live windows gives finite values within the channels' valid ranges;
5. *active*: between two steps the ``current`` symlink is swapped atomically (``os.replace`` of a temporary
   symlink) and the new backend serves the next step; for ``health_steps`` steps every output is checked
   (exceptions, non-finite values, values out of range) and a failure rolls back to the previous slot at once
   (*rolled_back*), re-running the failed batch on the previous model so no step is lost. After the health window the
   update is committed (Mender's ``ArtifactCommit``, RAUC's ``mark-good``).

Every stage is reported through the ``report`` callback (the agent publishes it retained on
``{prefix}/gateways/{gateway}/model``) and kept for the status message. A journal file, written atomically before
each step, lets :meth:`Updater.start` bring a restarted gateway back on exactly one complete, verified bundle: an
update interrupted before its commit is discarded (the gateway returns to the last committed bundle, as Mender does
after a reboot before commit) and retried when the retained manifest arrives again, at most ``max_attempts`` times.

Threads: :meth:`Updater.on_message` runs on the MQTT client's network thread and only parses, checks hashes and
writes chunks; everything that builds a backend, runs a model or swaps the symlink runs on the agent's step thread
(:meth:`GuardedBackend.step_boundary` and the inference calls).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gapcast.edge import BackendError, BundleError, UpdateRejected
from gapcast.edge.bundle import Bundle, Card, load_public_key, verify_bundle

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_MAX_ARTIFACT_BYTES",
    "MANIFEST_SCHEMA",
    "MAX_CHUNK_BYTES",
    "STAGES",
    "ArtifactAssembler",
    "FleetTopics",
    "GuardedBackend",
    "Manifest",
    "SlotStore",
    "Swap",
    "Targets",
    "UpdateLink",
    "Updater",
    "UpdaterConfig",
    "build_update_link",
    "check_compatible",
    "check_outputs",
    "compat_of",
    "key_id",
    "open_envelope",
    "percent_bucket",
    "start_from_config",
]

log = logging.getLogger(__name__)

MANIFEST_SCHEMA = 1
MANIFEST_TYPE = "gapcast.fleet.release"
#: Default chunk size: fits AWS IoT Core's 128 KiB message limit with room for the MQTT header.
DEFAULT_CHUNK_BYTES = 96 * 1024
#: Largest chunk a gateway accepts (Mosquitto's default message_size_limit is the MQTT maximum, 256 MiB).
MAX_CHUNK_BYTES = 8 * 1024 * 1024
#: Largest artifact a gateway downloads unless its config says otherwise.
DEFAULT_MAX_ARTIFACT_BYTES = 256 * 1024 * 1024
STAGES = ("received", "verified", "rejected", "staged", "active", "rolled_back")
_JOURNAL = "journal.json"
_SLOT_RE = re.compile(r"^v(\d+)-([0-9a-f]{12})$")


# --------------------------------------------------------------------------------------------- topics


@dataclass(frozen=True)
class FleetTopics:
    """The fleet's MQTT topics (docs/ARCHITECTURE.md, "Contracts").

    Attributes:
        prefix: topic prefix, e.g. ``gapcast/v1``.
        fleet: fleet name (one MQTT topic level: no ``/``, ``+`` or ``#``).
    """

    prefix: str
    fleet: str

    def __post_init__(self) -> None:
        if not self.fleet or any(ch in self.fleet for ch in "/+#"):
            msg = f"fleet name {self.fleet!r} must be one non-empty topic level without '/', '+' or '#'"
            raise ValueError(msg)

    @property
    def base(self) -> str:
        return f"{self.prefix}/fleet/{self.fleet}"

    @property
    def manifest(self) -> str:
        """Retained: the current signed release envelope."""
        return f"{self.base}/manifest"

    def release(self, version: int) -> str:
        """Retained: the signed envelope of release ``version`` (kept for rollbacks)."""
        return f"{self.base}/releases/{int(version)}"

    @property
    def releases_filter(self) -> str:
        return f"{self.base}/releases/+"

    def chunk(self, artifact_id: str, index: int) -> str:
        """Retained, QoS 1: chunk ``index`` (0-based) of artifact ``artifact_id``."""
        return f"{self.base}/artifacts/{artifact_id}/{int(index)}"

    def chunks_filter(self, artifact_id: str) -> str:
        return f"{self.base}/artifacts/{artifact_id}/+"

    @staticmethod
    def gateway_model(prefix: str, gateway: str) -> str:
        """Retained: the gateway's update report (stages received ... rolled_back)."""
        return f"{prefix}/gateways/{gateway}/model"

    @staticmethod
    def gateway_status(prefix: str, gateway: str) -> str:
        return f"{prefix}/gateways/{gateway}/status"


# --------------------------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class Targets:
    """Which gateways a release is for.

    A gateway is targeted when ``everyone`` is true, or it is named in ``canary``, or its percent bucket
    (:func:`percent_bucket`) is below ``percent``. The bucket depends on the fleet and gateway id only, so raising the
    percent from 10 to 50 keeps the first 10 % in (a ring rollout, as AWS IoT jobs' rollout rate does by count).

    Attributes:
        canary: gateway ids named explicitly.
        percent: share of the fleet, 0..100, or None.
        everyone: every gateway of the fleet.
    """

    canary: tuple[str, ...] = ()
    percent: float | None = None
    everyone: bool = False

    def __post_init__(self) -> None:
        if self.percent is not None and not 0.0 <= float(self.percent) <= 100.0:
            msg = f"percent must be within 0..100, got {self.percent}"
            raise ValueError(msg)
        if not self.everyone and not self.canary and self.percent is None:
            msg = "a release must target someone: canary gateways, a percent, or everyone"
            raise ValueError(msg)

    def applies_to(self, fleet: str, gateway: str) -> bool:
        if self.everyone or gateway in self.canary:
            return True
        return self.percent is not None and percent_bucket(fleet, gateway) < round(self.percent * 100)

    def to_dict(self) -> dict[str, Any]:
        if self.everyone:
            return {"everyone": True}
        d: dict[str, Any] = {"canary": list(self.canary)}
        if self.percent is not None:
            d["percent"] = float(self.percent)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Targets:
        return cls(
            canary=tuple(str(g) for g in d.get("canary", ())),
            percent=None if d.get("percent") is None else float(d["percent"]),
            everyone=bool(d.get("everyone", False)),
        )

    def describe(self) -> str:
        if self.everyone:
            return "everyone"
        parts = []
        if self.canary:
            parts.append("canary " + ",".join(self.canary))
        if self.percent is not None:
            parts.append(f"{self.percent:g}% of the fleet")
        return " + ".join(parts)


def percent_bucket(fleet: str, gateway: str) -> int:
    """The gateway's rollout bucket, 0..9999: the first 8 bytes of sha256(``fleet/gateway``) modulo 10,000.

    Deterministic and the same on the cloud and every gateway; a release for ``percent`` P reaches the gateways whose
    bucket is below ``P * 100``.
    """
    h = hashlib.sha256(f"{fleet}/{gateway}".encode()).digest()
    return int.from_bytes(h[:8], "big") % 10_000


@dataclass(frozen=True)
class Manifest:
    """A signed release manifest, parsed and validated.

    Attributes:
        fleet: fleet name.
        kind: ``release`` or ``rollback`` (a rollback may carry an older model version).
        sequence: strictly increasing per fleet (milliseconds since the epoch when signed); a gateway ignores a
            manifest whose sequence is not above the last one it finished, so an old manifest cannot be replayed.
        created: RFC 3339 UTC signing time.
        model_name, model_version, card_sha256: the bundle's card, pinned.
        compat: ``{"channels": [...], "cadence_s", "lookback", "horizon", "calendar"}`` of the bundle.
        artifact_id: first 16 hex digits of the artifact's sha256 (its topic level).
        artifact_bytes: size of the ``.tar``, bytes.
        artifact_sha256: sha256 of the whole ``.tar``.
        chunk_bytes: size of every chunk but the last, bytes.
        chunk_sha256: sha256 of each chunk, in order.
        targets: which gateways it is for.
        rollback_from: for a rollback, the version it replaces (informational), else None.
        raw: the manifest dict.
    """

    fleet: str
    kind: str
    sequence: int
    created: str
    model_name: str
    model_version: int
    card_sha256: str
    compat: dict[str, Any]
    artifact_id: str
    artifact_bytes: int
    artifact_sha256: str
    chunk_bytes: int
    chunk_sha256: tuple[str, ...]
    targets: Targets
    rollback_from: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_rollback(self) -> bool:
        return self.kind == "rollback"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        """Validate a manifest dict.

        Raises:
            UpdateRejected: a missing or mistyped field, an unknown schema, or inconsistent chunk figures.
        """
        try:
            if d.get("type") != MANIFEST_TYPE or int(d["schema"]) != MANIFEST_SCHEMA:
                msg = f"not a gapcast release manifest of schema {MANIFEST_SCHEMA} (type {d.get('type')!r})"
                raise UpdateRejected(msg)
            art = d["artifact"]
            m = cls(
                fleet=str(d["fleet"]),
                kind=str(d["kind"]),
                sequence=int(d["sequence"]),
                created=str(d["created"]),
                model_name=str(d["model"]["name"]),
                model_version=int(d["model"]["version"]),
                card_sha256=str(d["model"]["card_sha256"]),
                compat=dict(d["compat"]),
                artifact_id=str(art["id"]),
                artifact_bytes=int(art["bytes"]),
                artifact_sha256=str(art["sha256"]),
                chunk_bytes=int(art["chunk_bytes"]),
                chunk_sha256=tuple(str(h) for h in art["chunks"]),
                targets=Targets.from_dict(dict(d["targets"])),
                rollback_from=None if d.get("rollback_from") is None else int(d["rollback_from"]),
                raw=d,
            )
        except UpdateRejected:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            msg = f"manifest is malformed: {type(exc).__name__}: {exc}"
            raise UpdateRejected(msg) from exc
        if m.kind not in ("release", "rollback"):
            msg = f"manifest kind {m.kind!r} is neither 'release' nor 'rollback'"
            raise UpdateRejected(msg)
        if not re.fullmatch(r"[0-9a-f]{16}", m.artifact_id) or not m.artifact_sha256.startswith(m.artifact_id):
            msg = f"manifest artifact id {m.artifact_id!r} is not the first 16 hex digits of its sha256"
            raise UpdateRejected(msg)
        if m.chunk_bytes <= 0 or m.artifact_bytes <= 0:
            msg = "manifest chunk_bytes and artifact bytes must be positive"
            raise UpdateRejected(msg)
        if len(m.chunk_sha256) != math.ceil(m.artifact_bytes / m.chunk_bytes):
            msg = (
                f"manifest lists {len(m.chunk_sha256)} chunks for {m.artifact_bytes} bytes in chunks of "
                f"{m.chunk_bytes} (expected {math.ceil(m.artifact_bytes / m.chunk_bytes)})"
            )
            raise UpdateRejected(msg)
        return m


def key_id(public_key) -> str:
    """First 16 hex digits of sha256 over the raw 32-byte Ed25519 public key (names the key in envelopes)."""
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def open_envelope(payload: bytes, trusted_keys: Iterable) -> Manifest:
    """Check a signed envelope and return its manifest.

    The envelope is JSON ``{"manifest": base64(manifest JSON bytes), "signature": base64(Ed25519 signature over
    those exact bytes), "key_id": ...}``; signing the exact bytes avoids any JSON canonicalisation question
    (RFC 8032 signatures, as the bundle's ``card.sig``).

    Args:
        payload: the MQTT payload.
        trusted_keys: Ed25519 public keys (objects, PEM paths, or hex strings).

    Returns:
        The verified, validated manifest.

    Raises:
        UpdateRejected: not an envelope, no trusted key, signature valid under none of them, or a bad manifest.
    """
    from cryptography.exceptions import InvalidSignature

    try:
        env = json.loads(payload)
        body = base64.b64decode(env["manifest"], validate=True)
        sig = base64.b64decode(env["signature"], validate=True)
    except (ValueError, KeyError, TypeError) as exc:
        msg = f"release envelope is malformed: {type(exc).__name__}: {exc}"
        raise UpdateRejected(msg) from exc
    keys = [k if hasattr(k, "verify") else load_public_key(k) for k in trusted_keys]
    if not keys:
        msg = "no trusted public key configured: cannot verify the release manifest"
        raise UpdateRejected(msg)
    for k in keys:
        try:
            k.verify(sig, body)
            break
        except InvalidSignature:
            continue
    else:
        msg = (
            f"manifest signature (key id {str(env.get('key_id'))[:16]}) does not verify under any of the "
            f"{len(keys)} trusted key(s)"
        )
        raise UpdateRejected(msg)
    try:
        d = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        msg = f"manifest is not valid JSON: {exc}"
        raise UpdateRejected(msg) from exc
    if not isinstance(d, dict):
        msg = "manifest must be a JSON object"
        raise UpdateRejected(msg)
    return Manifest.from_dict(d)


# --------------------------------------------------------------------------------------------- checks


def compat_of(card: Card) -> dict[str, Any]:
    """What must not change between two models a running gateway swaps: channels, cadence, L, H, calendar."""
    return {
        "channels": list(card.channel_names),
        "cadence_s": card.cadence_s,
        "lookback": card.lookback,
        "horizon": card.horizon,
        "calendar": list(card.calendar.get("features", [])),
    }


def check_compatible(candidate: dict[str, Any], running: Card) -> list[str]:
    """Differences that forbid swapping ``running`` for a model with compat dict ``candidate`` (empty = OK).

    Normalisation statistics may differ: :class:`GuardedBackend` converts between the two cards.
    """
    want = compat_of(running)
    problems = []
    for k, v in want.items():
        got = candidate.get(k)
        if k == "calendar" and got is None:
            continue
        if got != v:
            problems.append(f"{k} {got!r} != running {v!r}")
    return problems


def check_outputs(
    card: Card, imputed: np.ndarray, forecast: np.ndarray, *, range_slack: float = 0.25
) -> str | None:
    """The health check on one batch of outputs: finite, and within the channels' valid ranges.

    Args:
        card: the model's card (normalisation and valid ranges).
        imputed: [B, L, C] float32, normalised.
        forecast: [B, H, C] float32, normalised.
        range_slack: tolerated excursion beyond [valid_min, valid_max], as a share of the range width (a model may
            forecast slightly below zero; 1e6 ug/m3 is a broken model).

    Returns:
        None when healthy, else the reason.
    """
    c = len(card.channels)
    for name, arr, steps in (("imputed", imputed, card.lookback), ("forecast", forecast, card.horizon)):
        a = np.asarray(arr)
        if a.ndim != 3 or a.shape[1:] != (steps, c):
            return f"{name} has shape {a.shape}, expected [B, {steps}, {c}]"
        if not np.isfinite(a).all():
            return f"{name} holds {int((~np.isfinite(a)).sum())} non-finite value(s)"
        phys = a.astype(np.float64) * card.std + card.mean
        width = card.valid_max - card.valid_min
        lo = card.valid_min - range_slack * width
        hi = card.valid_max + range_slack * width
        bad = (phys < lo) | (phys > hi)
        if bad.any():
            ch = int(np.argwhere(bad)[0][2])
            return (
                f"{name} has {int(bad.sum())} value(s) outside the valid range, e.g. {card.channels[ch].name} = "
                f"{float(phys[bad][0]):.4g} {card.channels[ch].unit}"
            )
    return None


# --------------------------------------------------------------------------------------------- artifact


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
            UpdateRejected: index out of range, wrong length, or sha256 not the one the manifest pins.
        """
        m = self.manifest
        if not 0 <= index < self.n_chunks:
            msg = f"chunk index {index} outside 0..{self.n_chunks - 1}"
            raise UpdateRejected(msg)
        want_len = min(m.chunk_bytes, m.artifact_bytes - index * m.chunk_bytes)
        if len(data) != want_len:
            msg = f"chunk {index} has {len(data)} bytes, the manifest says {want_len}"
            raise UpdateRejected(msg)
        got = hashlib.sha256(data).hexdigest()
        if got != m.chunk_sha256[index]:
            msg = f"chunk {index} has sha256 {got[:16]}..., the manifest pins {m.chunk_sha256[index][:16]}..."
            raise UpdateRejected(msg)
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
            UpdateRejected: chunks missing or the whole-file hash differs.
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
        root: the state folder (created).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.slots = self.root / "slots"
        self.incoming = self.root / "incoming"
        self.current_link = self.root / "current"
        self.journal_path = self.root / _JOURNAL
        self.slots.mkdir(parents=True, exist_ok=True)

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
        """Copy a verified bundle folder (or ``.tar``) into a slot (the first bundle a gateway runs)."""
        bundle = verify_bundle(src, trusted_keys)
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


# --------------------------------------------------------------------------------------------- the updater


@dataclass(frozen=True)
class UpdaterConfig:
    """Gateway-side update settings (the ``[update]`` table of the edge config).

    Attributes:
        gateway: this gateway's id.
        fleet: the fleet it belongs to.
        state_dir: folder for slots, the ``current`` symlink and the journal.
        prefix: MQTT topic prefix.
        health_steps: steps after the switch during which a bad output rolls back automatically.
        range_slack: see :func:`check_outputs`.
        max_artifact_bytes: larger artifacts are refused before download, bytes.
        max_attempts: how often an update interrupted by a restart is retried before it is refused.
    """

    gateway: str
    fleet: str
    state_dir: Path
    prefix: str = "gapcast/v1"
    health_steps: int = 3
    range_slack: float = 0.25
    max_artifact_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES
    max_attempts: int = 2

    def __post_init__(self) -> None:
        if self.health_steps < 1:
            msg = f"health_steps must be >= 1, got {self.health_steps}"
            raise ValueError(msg)

    @property
    def topics(self) -> FleetTopics:
        return FleetTopics(self.prefix, self.fleet)


@dataclass(frozen=True)
class Swap:
    """What the agent runs from the next step on.

    Attributes:
        bundle: the verified bundle (its card gives version, channels, normalisation).
        backend: the backend built from it.
        reason: ``update`` or ``rollback``.
    """

    bundle: Bundle
    backend: Any
    reason: str


BackendFactory = Callable[[Bundle], Any]
Runner = Callable[[Any, np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def default_runner(backend: Any, values: np.ndarray, observed: np.ndarray, calendar: np.ndarray):
    """Run one batch: ``backend.run(values, observed, calendar) -> (imputed, forecast)``.

    Raises:
        BackendError: no backend (none could be built for the bundle).
    """
    if backend is None:
        msg = "no inference backend for the running bundle"
        raise BackendError(msg)
    return backend.run(values, observed, calendar)


class Updater:
    """The gateway's update state machine (see the module docstring for the stages).

    Args:
        config: settings.
        trusted_keys: Ed25519 public keys for manifests and bundles (objects, PEM paths or hex).
        backend_factory: builds a backend for a verified bundle (onnxruntime or TensorRT, the agent's choice).
        runner: runs one batch on a backend; default ``backend.run(values, observed, calendar)``.
        report: called with every stage report (a JSON-able dict); the agent publishes it retained on
            ``{prefix}/gateways/{gateway}/model``. Called on the thread that made the transition.
        subscribe, unsubscribe: called with a topic filter when the artifact's chunks must be fetched / are no
            longer needed (the MQTT shell forwards them to its client, QoS 1).
        wall_clock: seconds since the epoch, for report timestamps only.
    """

    def __init__(
        self,
        config: UpdaterConfig,
        *,
        trusted_keys: list,
        backend_factory: BackendFactory,
        runner: Runner = default_runner,
        report: Callable[[dict[str, Any]], None] | None = None,
        subscribe: Callable[[str], None] | None = None,
        unsubscribe: Callable[[str], None] | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = config
        self.trusted_keys = [k if hasattr(k, "verify") else load_public_key(k) for k in trusted_keys]
        self.backend_factory = backend_factory
        self.runner = runner
        self._report_cb = report
        self._subscribe = subscribe or (lambda _t: None)
        self._unsubscribe = unsubscribe or (lambda _t: None)
        self._clock = wall_clock
        self.store = SlotStore(Path(config.state_dir))
        self.topics = config.topics
        self._lock = threading.RLock()
        self._journal: dict[str, Any] = {}
        self.active: Bundle | None = None
        self.active_backend: Any = None
        self._previous: tuple[Bundle, Any] | None = None  # kept warm during the health window
        self._pending: Manifest | None = None  # manifest whose artifact is being collected
        self._assembler: ArtifactAssembler | None = None
        self._ready: Manifest | None = None  # artifact complete, waiting for a step boundary
        self._failed: str | None = None  # chunk failure seen on the network thread
        self._deferred: bytes | None = None  # a manifest that arrived during a health window
        self._health_left = 0
        self._last_seen_sequence = 0
        self.last_report: dict[str, Any] | None = None
        self.history: list[dict[str, Any]] = []

    # ----------------------------------------------------------------------------------- start-up

    @property
    def subscriptions(self) -> list[str]:
        """Topic filters to subscribe to at every connect (QoS 1): the fleet's retained manifest, and the chunks
        of an artifact being collected (re-subscribing makes the broker send the retained chunks again)."""
        with self._lock:
            subs = [self.topics.manifest]
            if self._pending is not None and self._ready is None:
                subs.extend(self._chunk_topics(self._pending))
            return subs

    def _chunk_topics(self, m: Manifest) -> list[str]:
        """Each chunk's own topic, not ``artifacts/{id}/+``: some brokers (RabbitMQ) send retained messages only to
        subscriptions without wildcards, and every broker sends them to exact ones."""
        return [self.topics.chunk(m.artifact_id, i) for i in range(len(m.chunk_sha256))]

    @property
    def last_sequence_seen(self) -> int:
        """Sequence of the newest manifest this gateway has looked at (targeted or not); 0 before any."""
        return self._last_seen_sequence

    @property
    def phase(self) -> str:
        return str(self._journal.get("phase", "idle"))

    def start(self, seed: str | Path | None = None) -> Swap:
        """Recover after a (re)start and return the one bundle to run.

        The gateway comes back on the last committed slot; an update interrupted before its commit (staged, being
        switched, or in its health window) is discarded and reported as rolled back, and will be retried when the
        retained manifest arrives again (at most ``max_attempts`` times). When no committed slot verifies, the
        previous one is used, then ``seed`` (the configured bundle). A seed with a newer model version than the
        committed slot is adopted (an operator installed it by hand).

        Raises:
            BundleError: no slot verifies and no seed is given (or it does not verify).
        """
        with self._lock:
            j = self.store.read_journal()
            j.setdefault("last_sequence", 0)
            j.setdefault("refused", {})
            j.setdefault("attempts", {})
            interrupted = j.get("phase") in ("staged", "switching", "health")
            candidates = [j.get("committed"), j.get("previous")]
            if not j.get("committed"):
                candidates.append(self.store.current_name())
            bundle, name = None, None
            for cand in candidates:
                if not cand or not self.store.slot(cand).is_dir():
                    continue
                try:
                    bundle, name = self.store.verify(cand, self.trusted_keys), cand
                    break
                except BundleError as exc:
                    log.error("slot %s does not verify (%s): trying the next one", cand, exc)
            if seed is not None:
                seed_bundle = verify_bundle(seed, self.trusted_keys)
                if bundle is None or seed_bundle.card.model_version > bundle.card.model_version:
                    if bundle is not None:
                        log.warning(
                            "configured bundle v%d is newer than the committed v%d: adopting it",
                            seed_bundle.card.model_version,
                            bundle.card.model_version,
                        )
                    name, bundle = self.store.install_dir(seed_bundle.path, self.trusted_keys)
            if bundle is None or name is None:
                msg = f"no verified bundle in {self.store.root} and no configured bundle to start from"
                raise BundleError(msg)
            previous = j.get("previous") if j.get("previous") != name else None
            if previous and not self.store.slot(previous).is_dir():
                previous = None
            self.store.point_current(name)
            removed = self.store.remove_except([name, previous])
            if removed:
                log.info("update store: removed %s", ", ".join(removed))
            cand = j.get("candidate")
            j.update(phase="idle", committed=name, previous=previous, candidate=None, candidate_sha=None)
            self._journal = j
            self.store.write_journal(j)
            self.active = bundle
            try:
                self.active_backend = self.backend_factory(bundle)
            except BackendError as exc:  # the agent falls back to interpolation; a later release may run
                log.error("no backend can run bundle %s: %s", name, exc)
                self.active_backend = None
            self._last_seen_sequence = int(j["last_sequence"])
            if interrupted:
                self._emit(
                    "rolled_back",
                    version=bundle.card.model_version,
                    reason=f"restart interrupted the update to {cand}: back on the committed bundle {name}",
                )
            log.info("running bundle %s (model v%d)", name, bundle.card.model_version)
            return Swap(bundle, self.active_backend, "start")

    # ----------------------------------------------------------------------------------- network thread

    def on_message(self, topic: str, payload: bytes) -> None:
        """Handle a fleet message. Runs on the MQTT network thread; never raises (failures are reported)."""
        try:
            with self._lock:
                if topic == self.topics.manifest:
                    self._on_manifest(payload)
                elif topic.startswith(f"{self.topics.base}/artifacts/"):
                    self._on_chunk(topic, payload)
        except Exception:  # the network thread must survive anything a broker sends
            log.exception("fleet message on %s could not be handled", topic)

    def _on_manifest(self, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained message
        try:
            m = open_envelope(payload, self.trusted_keys)
        except UpdateRejected as exc:
            self._emit("rejected", reason=str(exc))
            return
        pending = self._pending
        if pending is not None and m.sequence == pending.sequence and self._ready is None:
            # The same release again while its chunks are still coming: ask for the retained chunks once more.
            for t in self._chunk_topics(pending):
                self._subscribe(t)
            return
        if m.sequence <= self._last_seen_sequence:
            log.debug("manifest sequence %d already handled (last %d)", m.sequence, self._last_seen_sequence)
            return
        self._last_seen_sequence = m.sequence
        if m.fleet != self.cfg.fleet:
            self._reject(m, f"manifest is for fleet {m.fleet!r}, this gateway is in {self.cfg.fleet!r}")
            return
        if not m.targets.applies_to(self.cfg.fleet, self.cfg.gateway):
            log.info("release v%d (%s) does not target %s", m.model_version, m.targets.describe(), self.cfg.gateway)
            return
        active = self.active
        if active is not None and m.card_sha256 == active.card_sha256:
            log.info("release v%d is the running bundle already", m.model_version)
            self._finish_sequence(m)
            return
        if self.phase != "idle":
            # A newer manifest during a health window waits until the window ends (commit or rollback).
            log.warning("manifest %d arrived during the %s phase: deferred", m.sequence, self.phase)
            self._last_seen_sequence = int(self._journal.get("last_sequence", 0))
            self._deferred = payload
            return
        self._emit("received", manifest=m)
        problem = self._precheck(m)
        if problem:
            self._reject(m, problem)
            return
        self._abandon_download()
        self.store.incoming.mkdir(parents=True, exist_ok=True)
        self._pending = m
        self._assembler = ArtifactAssembler(m, self.store.incoming / f"{m.artifact_id}.tar")
        self._ready = None
        for t in self._chunk_topics(m):
            self._subscribe(t)

    def _precheck(self, m: Manifest) -> str | None:
        j = self._journal
        if m.card_sha256 in j.get("refused", {}):
            return f"release {m.card_sha256[:12]} was refused here before: {j['refused'][m.card_sha256]}"
        if m.artifact_bytes > self.cfg.max_artifact_bytes:
            return f"artifact of {m.artifact_bytes} bytes exceeds max_artifact_bytes {self.cfg.max_artifact_bytes}"
        if m.chunk_bytes > MAX_CHUNK_BYTES:
            return f"chunk_bytes {m.chunk_bytes} exceeds {MAX_CHUNK_BYTES}"
        if self.active is not None:
            cur = self.active.card.model_version
            if not m.is_rollback and m.model_version <= cur:
                return f"version {m.model_version} is not newer than the running {cur} (and not a signed rollback)"
            problems = check_compatible(m.compat, self.active.card)
            if problems:
                return "incompatible with the running model: " + "; ".join(problems)
        return None

    def _on_chunk(self, topic: str, payload: bytes) -> None:
        asm, m = self._assembler, self._pending
        if asm is None or m is None:
            return
        parts = topic.rsplit("/", 2)
        if len(parts) != 3 or parts[1] != m.artifact_id:
            return
        try:
            index = int(parts[2])
            asm.add(index, payload)
        except ValueError:
            log.warning("chunk topic %s has no integer index", topic)
            return
        except UpdateRejected as exc:
            self._abandon_download()
            self._reject(m, f"artifact refused: {exc}")
            return
        if asm.complete:
            for t in self._chunk_topics(m):
                self._unsubscribe(t)
            self._ready = m
            log.info("release v%d: artifact complete (%d chunks)", m.model_version, asm.n_chunks)

    def _abandon_download(self) -> None:
        if self._pending is not None:
            for t in self._chunk_topics(self._pending):
                self._unsubscribe(t)
        self._pending = self._assembler = self._ready = None
        shutil.rmtree(self.store.incoming, ignore_errors=True)

    # ----------------------------------------------------------------------------------- step thread

    @property
    def update_ready(self) -> bool:
        """An artifact is complete and waits for a step boundary."""
        return self._ready is not None

    def step_boundary(self, live: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> Swap | None:
        """Call between two steps, on the agent's step thread: verifies, stages, shadow-runs and switches.

        Args:
            live: the last batch of live windows ``(values [B,L,C], observed [B,L,C], calendar [B,L+H,F])`` in the
                *running* model's normalisation, or None before the first step.

        Returns:
            A :class:`Swap` when the agent must run a new bundle from the next step on, else None.
        """
        with self._lock:
            m, asm = self._ready, self._assembler
            if m is None or asm is None or self.phase != "idle":
                return None
            self._ready = None
            attempts = self._journal.setdefault("attempts", {})
            attempts[m.card_sha256] = int(attempts.get(m.card_sha256, 0)) + 1
            if attempts[m.card_sha256] > self.cfg.max_attempts:
                self._abandon_download()
                self._refuse(m, f"{self.cfg.max_attempts} attempts were interrupted by restarts")
                return None
            try:
                return self._install(m, asm, live)
            except (UpdateRejected, BundleError) as exc:
                self._drop_candidate()
                self._reject(m, str(exc))
            except Exception as exc:  # a backend that crashes while building or shadow-running
                log.exception("release v%d failed while staging", m.model_version)
                self._drop_candidate()
                self._reject(m, f"{type(exc).__name__}: {exc}")
            finally:
                self._abandon_download()
            return None

    def _install(self, m: Manifest, asm: ArtifactAssembler, live) -> Swap:
        tar_path = asm.finish()
        name, bundle = self.store.install_tar(tar_path, self.trusted_keys)
        j = self._journal
        j.update(phase="staged", candidate=name, candidate_sha=bundle.card_sha256, candidate_sequence=m.sequence)
        self.store.write_journal(j)
        if bundle.card_sha256 != m.card_sha256:
            msg = f"the artifact's card {bundle.card_sha256[:12]} is not the one the manifest pins {m.card_sha256[:12]}"
            raise UpdateRejected(msg)
        if bundle.card.model_version != m.model_version:
            msg = f"the artifact holds version {bundle.card.model_version}, the manifest says {m.model_version}"
            raise UpdateRejected(msg)
        assert self.active is not None
        problems = check_compatible(compat_of(bundle.card), self.active.card)
        if problems:
            raise UpdateRejected("incompatible with the running model: " + "; ".join(problems))
        self._emit("verified", manifest=m)
        self._emit("staged", manifest=m, slot=name)
        backend = self.backend_factory(bundle)
        if live is not None:
            values, observed, calendar = (np.asarray(a, dtype=np.float32) for a in live)
            v2 = renormalise_inputs(values, observed, self.active.card, bundle.card)
            imputed, forecast = self.runner(backend, v2, observed, calendar)
            problem = check_outputs(bundle.card, imputed, forecast, range_slack=self.cfg.range_slack)
            if problem:
                raise UpdateRejected(f"shadow run on {values.shape[0]} live window(s): {problem}")
        self._check_golden(bundle, backend)
        # Switch: journal first, then the atomic symlink swap, then the journal again.
        j.update(phase="switching")
        self.store.write_journal(j)
        self.store.point_current(name)
        j.update(phase="health", current=name)
        self.store.write_journal(j)
        self._previous = (self.active, self.active_backend)
        self.active, self.active_backend = bundle, backend
        self._health_left = self.cfg.health_steps
        self._emit("active", manifest=m, committed=False, health_steps=self.cfg.health_steps)
        return Swap(bundle, backend, "update")

    def _check_golden(self, bundle: Bundle, backend: Any) -> None:
        """The new backend must reproduce the bundle's golden fp32 outputs within its precision's tolerance
        (:func:`gapcast.edge.trt.compare_golden`; a card may pin ``golden.max_abs`` / ``golden.mean_abs``)."""
        from gapcast.edge.trt import Tolerance, compare_golden, golden_tolerance

        gold = bundle.golden()
        if gold is None:
            msg = "the bundle has no golden inputs/outputs: its backend cannot be checked before the switch"
            raise UpdateRejected(msg)
        imputed, forecast = self.runner(backend, gold["values"], gold["observed"], gold["calendar"])
        precision = str(getattr(backend, "precision", "fp32"))
        if precision not in ("fp32", "fp16", "int8"):
            precision = "int8" if "int8" in precision else "fp32"
        g = bundle.card.raw.get("golden", {})
        tol = (
            Tolerance(max_abs=float(g["max_abs"]), mean_abs=float(g.get("mean_abs", g["max_abs"])))
            if "max_abs" in g
            else golden_tolerance(precision, bundle.card.raw)
        )
        check = compare_golden(np.asarray(imputed), np.asarray(forecast), gold, precision, tol)
        if not check.ok:
            raise UpdateRejected(check.describe())

    def check_step(self, imputed=None, forecast=None, error: BaseException | None = None) -> Swap | None:
        """Health check after one inference of the new model (agent thread). Outside the health window: no-op.

        Args:
            imputed: [B, L, C] float32, normalised in the *active* card.
            forecast: [B, H, C] float32, same.
            error: the exception the backend raised instead, if any.

        Returns:
            A rollback :class:`Swap` when the output is unhealthy, else None.
        """
        with self._lock:
            if self.phase != "health" or self.active is None:
                return None
            problem = f"{type(error).__name__}: {error}" if error is not None else None
            if problem is None:
                problem = check_outputs(self.active.card, imputed, forecast, range_slack=self.cfg.range_slack)
            if problem is None:
                return None
            return self._rollback(problem)

    def step_done(self) -> None:
        """Count one healthy step of the health window (agent thread); commits the update after the last one."""
        with self._lock:
            if self.phase != "health" or self.active is None:
                return
            self._health_left -= 1
            if self._health_left > 0:
                return
            j = self._journal
            old = j.get("committed")
            j.update(
                phase="idle",
                committed=j["current"],
                previous=old,
                candidate=None,
                candidate_sha=None,
                last_sequence=max(int(j.get("last_sequence", 0)), int(j.get("candidate_sequence") or 0)),
            )
            j["attempts"].pop(self.active.card_sha256, None)
            self.store.write_journal(j)
            self.store.remove_except([j["committed"], old])
            self._previous = None
            self._emit("active", version=self.active.card.model_version, committed=True)
            self._replay_deferred()

    def _rollback(self, reason: str) -> Swap:
        assert self._previous is not None and self.active is not None
        bad = self.active
        prev_bundle, prev_backend = self._previous
        j = self._journal
        prev_name = j["committed"]
        self.store.point_current(prev_name)
        j["refused"][bad.card_sha256] = f"rolled back: {reason}"
        j.update(
            phase="idle",
            current=prev_name,
            candidate=None,
            candidate_sha=None,
            last_sequence=max(int(j.get("last_sequence", 0)), int(j.get("candidate_sequence") or 0)),
        )
        j["attempts"].pop(bad.card_sha256, None)
        self.store.write_journal(j)
        self.store.remove_except([prev_name, j.get("previous")])
        self.active, self.active_backend = prev_bundle, prev_backend
        self._previous = None
        self._emit(
            "rolled_back",
            version=prev_bundle.card.model_version,
            failed_version=bad.card.model_version,
            reason=reason,
        )
        self._replay_deferred()
        return Swap(prev_bundle, prev_backend, "rollback")

    def _replay_deferred(self) -> None:
        payload, self._deferred = self._deferred, None
        if payload is not None:
            self._on_manifest(payload)

    def _drop_candidate(self) -> None:
        j = self._journal
        cand = j.get("candidate")
        if cand and cand != j.get("committed") and cand != j.get("previous"):
            shutil.rmtree(self.store.slot(cand), ignore_errors=True)
        if j.get("phase") in ("staged", "switching"):
            self.store.point_current(j["committed"])
        j.update(phase="idle", candidate=None, candidate_sha=None)
        self.store.write_journal(j)

    # ----------------------------------------------------------------------------------- reports

    def _finish_sequence(self, m: Manifest) -> None:
        j = self._journal
        j["last_sequence"] = max(int(j.get("last_sequence", 0)), m.sequence)
        self.store.write_journal(j)

    def _reject(self, m: Manifest, reason: str) -> None:
        self._finish_sequence(m)
        self._emit("rejected", manifest=m, reason=reason)

    def _refuse(self, m: Manifest, reason: str) -> None:
        self._journal.setdefault("refused", {})[m.card_sha256] = reason
        self._reject(m, reason)

    def _emit(self, stage: str, *, manifest: Manifest | None = None, **extra: Any) -> None:
        rep: dict[str, Any] = {
            "gateway": self.cfg.gateway,
            "fleet": self.cfg.fleet,
            "stage": stage,
            "ts": round(self._clock(), 3),
        }
        if manifest is not None:
            rep.update(
                version=manifest.model_version,
                kind=manifest.kind,
                sequence=manifest.sequence,
                card_sha256=manifest.card_sha256,
            )
        rep.update(extra)
        if self.active is not None:
            rep["running_version"] = self.active.card.model_version
            rep["running_card_sha256"] = self.active.card_sha256
        level = logging.WARNING if stage in ("rejected", "rolled_back") else logging.INFO
        log.log(level, "update %s: %s", stage, {k: v for k, v in rep.items() if k not in ("gateway", "fleet", "ts")})
        self.last_report = rep
        self.history = (self.history + [rep])[-20:]
        if self._report_cb is not None:
            try:
                self._report_cb(rep)
            except Exception:
                log.exception("could not hand the update report over")

    def status(self) -> dict[str, Any]:
        """For the gateway's status message: running version, phase, the last update report."""
        with self._lock:
            return {
                "model_version": None if self.active is None else self.active.card.model_version,
                "card_sha256": None if self.active is None else self.active.card_sha256,
                "fleet": self.cfg.fleet,
                "update_phase": self.phase,
                "last_update": self.last_report,
            }


# --------------------------------------------------------------------------------------------- MQTT glue


class UpdateLink:
    """Glue between an :class:`Updater` and the agent's paho client (``gapcast.edge.mqtt.MqttAgent``).

    The shell calls :meth:`attach` once with its client, :meth:`on_connect` from its CONNACK callback,
    :meth:`handles` / :meth:`on_message` from its message callback (all on paho's network thread). Reports are
    published retained, QoS 1, on ``{prefix}/gateways/{gateway}/model`` straight through paho (thread-safe; paho
    queues them while disconnected): the topic holds a state, the last report, so a report lost in a crash is
    re-published at the next connect. Reports made before the client exists are kept and sent at connect.

    Args:
        updater: the updater; build it with ``report=link.report``, ``subscribe=link.subscribe`` and
            ``unsubscribe=link.unsubscribe`` (see :func:`build_update_link`).
    """

    def __init__(self, updater: Updater | None = None) -> None:
        self.updater = updater
        self.client: Any = None
        self._lock = threading.Lock()
        self._last: bytes | None = None

    @property
    def _topic(self) -> str:
        assert self.updater is not None
        return FleetTopics.gateway_model(self.updater.cfg.prefix, self.updater.cfg.gateway)

    def attach(self, client: Any) -> None:
        with self._lock:
            self.client = client

    def report(self, rep: dict[str, Any]) -> None:
        payload = json.dumps({"schema": "gapcast/model/1", **rep}, sort_keys=True).encode()  # gapcast.edge.schemas
        with self._lock:
            self._last = payload
            client = self.client
        if client is not None and self.updater is not None:
            client.publish(self._topic, payload, qos=1, retain=True)

    def subscribe(self, topic_filter: str) -> None:
        if self.client is not None:
            self.client.subscribe(topic_filter, qos=1)

    def unsubscribe(self, topic_filter: str) -> None:
        if self.client is not None:
            self.client.unsubscribe(topic_filter)

    def on_connect(self, client: Any) -> None:
        """Subscribe to the fleet topics (the broker sends the retained manifest) and re-publish the last report."""
        assert self.updater is not None
        for f in self.updater.subscriptions:
            client.subscribe(f, qos=1)
        with self._lock:
            last = self._last
        if last is not None:
            client.publish(self._topic, last, qos=1, retain=True)

    def handles(self, topic: str) -> bool:
        return self.updater is not None and topic.startswith(f"{self.updater.topics.base}/")

    def on_message(self, client: Any, msg: Any, *, manual_ack: bool = False) -> None:
        """Hand a fleet message to the updater; acknowledge it when the client uses manual acks.

        Acknowledging at once is safe: fleet messages are retained, so whatever a crash loses is sent again at the
        next subscribe.
        """
        assert self.updater is not None
        self.updater.on_message(msg.topic, bytes(msg.payload))
        if manual_ack and msg.qos > 0:
            client.ack(msg.mid, msg.qos)


def build_update_link(
    config: UpdaterConfig,
    *,
    trusted_keys: list,
    backend_factory: BackendFactory,
    seed: str | Path | None,
    runner: Runner = default_runner,
) -> tuple[UpdateLink, GuardedBackend]:
    """Build and start an updater wired to an :class:`UpdateLink`, and the guarded backend the agent runs.

    Returns:
        (link for the MQTT shell, guarded backend for the agent core; ``.bundle`` is the bundle to run).

    Raises:
        BundleError: no verified bundle to start from.
    """
    link = UpdateLink()
    updater = Updater(
        config,
        trusted_keys=trusted_keys,
        backend_factory=backend_factory,
        runner=runner,
        report=link.report,
        subscribe=link.subscribe,
        unsubscribe=link.unsubscribe,
    )
    link.updater = updater
    updater.start(seed)
    return link, GuardedBackend(updater)


def start_from_config(cfg: Any) -> tuple[UpdateLink, GuardedBackend, str]:
    """``gapcast edge run`` with ``[update] enabled = true``: recover the update store and start on its bundle.

    Args:
        cfg: the :class:`gapcast.edge.config.EdgeConfig`.

    Returns:
        (link for :class:`gapcast.edge.mqtt.MqttAgent`, guarded backend for the agent core, a note saying which
        backend runs).

    Raises:
        ConfigError: ``model.backend = "interpolation"`` (nothing to update) or no trusted key.
        BundleError: no verified bundle in the store and ``model.bundle`` missing or not verifying.
    """
    from gapcast.edge import ConfigError

    if cfg.model.backend == "interpolation":
        msg = 'update.enabled: model.backend = "interpolation" runs no model, so there is nothing to update'
        raise ConfigError(msg)
    if not cfg.model.trusted_keys:
        msg = "update.enabled: needs model.trusted_keys"
        raise ConfigError(msg)

    def factory(bundle: Bundle) -> Any:
        try:
            from gapcast.edge.backends import select_backend
        except ImportError as exc:
            raise BackendError(f"no backend module: {exc}") from exc
        prefer = None if cfg.model.backend == "auto" else cfg.model.backend  # select_backend: None = TensorRT first
        m = cfg.model  # the variant is chosen again for the new bundle (timed on this gateway, or pinned)
        return select_backend(
            bundle, prefer=prefer, threads=m.threads or None, variant=m.variant,
            variant_batch=min(max(len(cfg.stations.names), 1), m.max_batch), variant_budget_s=m.variant_budget_s,
        )  # fmt: skip

    u = cfg.update
    ucfg = UpdaterConfig(
        gateway=cfg.gateway_id,
        fleet=cfg.fleet,
        state_dir=Path(u.state_dir),
        prefix=cfg.topic_prefix,
        health_steps=u.health_steps,
        range_slack=u.range_slack,
        max_artifact_bytes=u.max_artifact_bytes,
        max_attempts=u.max_attempts,
    )
    link, guard = build_update_link(
        ucfg, trusted_keys=list(cfg.model.trusted_keys), backend_factory=factory, seed=cfg.model.bundle
    )
    inner = guard.updater.active_backend
    note = (
        f"{guard.name} (preferred: {cfg.model.backend}), fleet updates on {ucfg.topics.manifest}"
        if inner is not None
        else f"interpolation fallback (no backend could run the bundle), fleet updates on {ucfg.topics.manifest}"
    )
    return link, guard, note


# --------------------------------------------------------------------------------------------- the guard


def _same_norm(a: Card, b: Card) -> bool:
    return bool(np.array_equal(a.mean, b.mean) and np.array_equal(a.std, b.std))


def renormalise_inputs(values: np.ndarray, observed: np.ndarray, src: Card, dst: Card) -> np.ndarray:
    """Values normalised with ``src``'s statistics, re-expressed in ``dst``'s; 0 stays 0 where unobserved.

    Args:
        values: [B, L, C] float32, normalised with ``src``.
        observed: [B, L, C] float32, 1 = observed.
    """
    if _same_norm(src, dst):
        return values
    phys = values * src.std + src.mean
    return (((phys - dst.mean) / dst.std) * observed).astype(np.float32)


def renormalise_outputs(arr: np.ndarray, src: Card, dst: Card) -> np.ndarray:
    """Outputs normalised with ``src`` re-expressed in ``dst``'s normalisation ([..., C] float32)."""
    if _same_norm(src, dst):
        return arr
    return (((arr * src.std + src.mean) - dst.mean) / dst.std).astype(np.float32)


class GuardedBackend:
    """The backend the agent runs when fleet updates are on: forwards to the active model and guards it.

    The agent keeps using one object; the updater swaps the model behind it at a step boundary. Inputs and outputs
    stay in the normalisation of ``reference`` (the card the agent was started with) — a new model with other
    normalisation statistics is converted on the way in and out, so the agent's own normalisation never changes
    mid-run (channels, cadence, L, H and calendar cannot change: :func:`check_compatible`).

    During the health window each inference is checked; an exception or an unhealthy output rolls back at once and
    the same batch is re-run on the previous model, so the agent still gets a good result for that step.

    Args:
        updater: the started :class:`Updater`.
        reference: the card the agent normalises with (default: the updater's active card at construction).
    """

    def __init__(self, updater: Updater, reference: Card | None = None) -> None:
        if updater.active is None:
            msg = "start the updater before wrapping its backend"
            raise BundleError(msg)
        self.updater = updater
        self.reference = reference or updater.active.card
        self._last_inputs: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._stepped = False

    @property
    def bundle(self) -> Bundle:
        assert self.updater.active is not None
        return self.updater.active

    @property
    def model_version(self) -> int:
        """Version of the model that serves the next (or the last) inference."""
        return self.bundle.card.model_version

    @property
    def name(self) -> str:
        inner = self.updater.active_backend
        return "none" if inner is None else str(getattr(inner, "name", type(inner).__name__))

    def step_boundary(self) -> Swap | None:
        """Call between two steps (agent thread): counts the health window, then lets a ready update switch in."""
        if self._stepped:
            self.updater.step_done()
            self._stepped = False
        live = None
        if self._last_inputs is not None:
            v, o, c = self._last_inputs
            live = (renormalise_inputs(v, o, self.reference, self.bundle.card), o, c)
            # step_boundary expects the running model's normalisation: it converts to the candidate's itself.
        return self.updater.step_boundary(live)

    def run(self, values: np.ndarray, observed: np.ndarray, calendar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One batched inference.

        Args:
            values: [B, L, C] float32, normalised with ``reference``, 0 where unobserved.
            observed: [B, L, C] float32, 1 = observed.
            calendar: [B, L+H, F] float32.

        Returns:
            (imputed [B, L, C], forecast [B, H, C]) float32, normalised with ``reference``.

        Raises:
            Whatever the backend raises outside the health window (the agent falls back to interpolation).
        """
        self._last_inputs = (values, observed, calendar)
        self._stepped = True
        for _ in range(2):  # at most one rollback per call
            card = self.bundle.card
            backend = self.updater.active_backend
            v = renormalise_inputs(values, observed, self.reference, card)
            try:
                imputed, forecast = self.updater.runner(backend, v, observed, calendar)
            except Exception as exc:
                if self.updater.check_step(error=exc) is not None:
                    continue
                raise
            if self.updater.check_step(imputed, forecast) is not None:
                continue
            return (
                renormalise_outputs(np.asarray(imputed), card, self.reference),
                renormalise_outputs(np.asarray(forecast), card, self.reference),
            )
        msg = "inference failed after a rollback"
        raise BundleError(msg)

    __call__ = run
