"""The bundle contract: ``card.json`` schema, Ed25519 signature and file hashes (docs/ARCHITECTURE.md, "Contracts").

A bundle is a directory (or a ``.tar`` of one) holding ``model.onnx`` and its precision variants, golden
inputs/outputs, ``card.json`` and ``card.sig``. The card pins every other file by sha256, so one Ed25519
signature over the card's exact bytes (RFC 8032) covers the whole bundle. :func:`verify_bundle` is the single
check the gateway (and the fleet updater, and ``gapcast export``'s self-check) uses.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gapcast.edge import BundleError

__all__ = [
    "CARD_NAME",
    "SCHEMA_VERSION",
    "SIG_NAME",
    "Bundle",
    "Card",
    "ChannelSpec",
    "load_public_key",
    "sha256_file",
    "verify_bundle",
]

SCHEMA_VERSION = 1
CARD_NAME = "card.json"
SIG_NAME = "card.sig"


@dataclass(frozen=True)
class ChannelSpec:
    """One model channel as the card states it.

    Attributes:
        name: channel name in MQTT payloads.
        unit: physical unit.
        valid_min, valid_max: physical range, ``unit``; values outside count as missing.
        mean, std: normalisation, ``unit``: normalised = (x - mean) / std.
    """

    name: str
    unit: str
    valid_min: float
    valid_max: float
    mean: float
    std: float


@dataclass(frozen=True)
class Card:
    """``card.json``, parsed and validated.

    Attributes:
        schema_version: card schema version (``SCHEMA_VERSION``).
        model_name: e.g. ``confill``.
        model_version: integer, increases with every release.
        created: RFC 3339 UTC creation time.
        channels: the C channels in model column order.
        cadence_s: step length, seconds.
        lookback: L, steps.
        horizon: H, steps.
        calendar: ``{"features": [...], "utc_offset_s": int}`` (see ``gapcast.calendar``).
        inputs, outputs: ``[{"name", "shape", "dtype"}]`` of the ONNX graph (shape uses ``"batch"`` for B).
        files: file name -> ``{"sha256", "bytes"}`` for every file in the bundle except the card and signature.
        variants: variant name (``fp32``, ``int8_qdq``, ``int8_cpu``) -> ``{"file", "precision", ...}``.
        raw: the whole card dict (evaluation figures, int8 delta, parity, opset, target, excluded variants...).
    """

    schema_version: int
    model_name: str
    model_version: int
    created: str
    channels: tuple[ChannelSpec, ...]
    cadence_s: int
    lookback: int
    horizon: int
    calendar: dict[str, Any]
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    files: dict[str, dict[str, Any]]
    variants: dict[str, dict[str, Any]]
    raw: dict[str, Any] = field(repr=False, compare=False)

    @property
    def channel_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.channels)

    @property
    def mean(self) -> np.ndarray:
        """[C] float32 normalisation means."""
        return np.array([c.mean for c in self.channels], dtype=np.float32)

    @property
    def std(self) -> np.ndarray:
        """[C] float32 normalisation standard deviations."""
        return np.array([c.std for c in self.channels], dtype=np.float32)

    @property
    def valid_min(self) -> np.ndarray:
        return np.array([c.valid_min for c in self.channels], dtype=np.float32)

    @property
    def valid_max(self) -> np.ndarray:
        return np.array([c.valid_max for c in self.channels], dtype=np.float32)

    @property
    def utc_offset_s(self) -> int:
        return int(self.calendar.get("utc_offset_s", 0))

    @property
    def timezone(self) -> str | None:
        """The stations' time zone for the calendar features (``calendar.timezone``), None: ``utc_offset_s``."""
        tz = self.calendar.get("timezone")
        return str(tz) if tz else None

    @property
    def interpolation_only(self) -> bool:
        """A day-one bundle without a network (``model.kind = "interpolation"``): the agent interpolates."""
        return self.raw.get("model", {}).get("kind") == "interpolation"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Card:
        """Validate and parse a card dict.

        Raises:
            BundleError: a missing or mistyped field, an unknown schema version, or inconsistent shapes.
        """
        try:
            if int(d["schema_version"]) != SCHEMA_VERSION:
                msg = f"card schema_version {d['schema_version']} is not supported (this gateway reads {SCHEMA_VERSION})"
                raise BundleError(msg)
            channels = tuple(
                ChannelSpec(
                    name=str(c["name"]),
                    unit=str(c["unit"]),
                    valid_min=float(c["valid_min"]),
                    valid_max=float(c["valid_max"]),
                    mean=float(c["mean"]),
                    std=float(c["std"]),
                )
                for c in d["channels"]
            )
            card = cls(
                schema_version=int(d["schema_version"]),
                model_name=str(d["model"]["name"]),
                model_version=int(d["model"]["version"]),
                created=str(d["created"]),
                channels=channels,
                cadence_s=int(d["cadence_s"]),
                lookback=int(d["lookback"]),
                horizon=int(d["horizon"]),
                calendar=dict(d["calendar"]),
                inputs=list(d["inputs"]),
                outputs=list(d["outputs"]),
                files={str(k): dict(v) for k, v in d["files"].items()},
                variants={str(k): dict(v) for k, v in d["variants"].items()},
                raw=d,
            )
        except BundleError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            msg = f"card.json is malformed: {type(exc).__name__}: {exc}"
            raise BundleError(msg) from exc
        if not card.channels or any(c.std <= 0 for c in card.channels):
            msg = "card.json: channels must be non-empty with std > 0"
            raise BundleError(msg)
        if card.cadence_s <= 0 or card.lookback <= 0 or card.horizon <= 0:
            msg = "card.json: cadence_s, lookback and horizon must be positive"
            raise BundleError(msg)
        if "fp32" not in card.variants and not card.interpolation_only:
            msg = "card.json: the fp32 variant is required"
            raise BundleError(msg)
        for name, v in card.variants.items():
            if v.get("file") not in card.files:
                msg = f"card.json: variant {name!r} names file {v.get('file')!r} that is not pinned in 'files'"
                raise BundleError(msg)
        return card


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk.

    Attributes:
        path: the bundle directory.
        card: the parsed card.
        card_sha256: sha256 of card.json's bytes (identifies the release).
    """

    path: Path
    card: Card
    card_sha256: str

    def file(self, name: str) -> Path:
        """Path of a pinned file. Raises BundleError if the card does not pin it."""
        if name not in self.card.files:
            msg = f"{name!r} is not part of this bundle"
            raise BundleError(msg)
        return self.path / name

    def variant_path(self, variant: str = "fp32") -> Path:
        """Path of a precision variant's ONNX file. Raises BundleError if the variant is absent."""
        if variant not in self.card.variants:
            msg = f"variant {variant!r} is not in this bundle (has {sorted(self.card.variants)})"
            raise BundleError(msg)
        return self.path / self.card.variants[variant]["file"]

    def golden(self) -> dict[str, np.ndarray] | None:
        """The golden inputs/outputs (``values``, ``observed``, ``calendar``, ``imputed``, ``forecast``), if any."""
        name = self.card.raw.get("golden", {}).get("file")
        if not name:
            return None
        with np.load(self.file(name)) as z:
            return {k: z[k] for k in z.files}


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_public_key(source: str | Path | bytes):
    """Load an Ed25519 public key from a PEM file, PEM bytes, or 64 hex characters (raw 32-byte key).

    Returns:
        ``cryptography`` ``Ed25519PublicKey``.

    Raises:
        BundleError: unreadable or not an Ed25519 public key.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        if isinstance(source, str) and len(source) == 64 and all(ch in "0123456789abcdefABCDEF" for ch in source):
            return Ed25519PublicKey.from_public_bytes(bytes.fromhex(source))
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        key = serialization.load_pem_public_key(data)
    except (OSError, ValueError, TypeError) as exc:
        msg = f"cannot load Ed25519 public key from {source!r:.80}: {exc}"
        raise BundleError(msg) from exc
    if not isinstance(key, Ed25519PublicKey):
        msg = f"{source!r:.80} is not an Ed25519 public key"
        raise BundleError(msg)
    return key


def _bundle_root(dest: Path) -> Path:
    entries = list(dest.iterdir())
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return dest


def _unpack_tar(path: Path, *, fresh: bool = False) -> tuple[Path, bool]:
    """Unpack a bundle archive into ``<tempdir>/gapcast-bundle-<sha256[:16]>`` (one folder per archive content).

    The folder is reused by later calls on the same archive (its files are re-verified by hash anyway), so repeated
    ``edge check`` / ``edge run`` do not leak a copy each. Unpacking goes to a private temporary folder that is
    then renamed into place, so a concurrent call never sees a half-written folder.

    Args:
        path: the ``.tar`` (any compression ``tarfile`` reads).
        fresh: discard an existing folder for this archive and unpack again.

    Returns:
        ``(folder, reused)``: the bundle folder (the archive's single top-level folder, or the unpack folder
        itself), and whether it was already there from an earlier call.

    Raises:
        BundleError: the archive cannot be read or unpacked.
    """
    import os
    import shutil

    digest = sha256_file(path)[:16]
    dest = Path(tempfile.gettempdir()) / f"gapcast-bundle-{digest}"
    if fresh:
        shutil.rmtree(dest, ignore_errors=True)
    if dest.is_dir():
        return _bundle_root(dest), True
    tmp = Path(tempfile.mkdtemp(prefix=f".gapcast-bundle-{digest}-", dir=dest.parent))
    try:
        with tarfile.open(path) as tf:
            tf.extractall(tmp, filter="data")
        try:
            os.rename(tmp, dest)
        except OSError:
            if not dest.is_dir():  # lost a race to a concurrent unpack: use theirs; anything else is an error
                raise
    except (tarfile.TarError, OSError) as exc:
        msg = f"cannot unpack bundle archive {path}: {exc}"
        raise BundleError(msg) from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return _bundle_root(dest), False


def verify_bundle(path: str | Path, trusted_keys: list | None = None, *, require_signature: bool = True) -> Bundle:
    """Verify a bundle: the card signature against the trusted keys, every pinned file's sha256, the schema.

    Args:
        path: bundle directory or ``.tar`` (unpacked once into ``<tempdir>/gapcast-bundle-<sha256[:16]>``, reused
            by later calls on the same archive).
        trusted_keys: Ed25519 public keys (objects, PEM paths or hex strings); the signature must verify under one.
        require_signature: False only for local development bundles (``gapcast export`` without ``--sign-key``);
            the gateway always requires it.

    Returns:
        The verified :class:`Bundle`.

    Raises:
        BundleError: missing card or signature, signature not valid under any trusted key, a file missing, extra
            or with a wrong hash, a malformed card, or a file that is not a tar archive. The message names the file
            or the field.
    """
    p = Path(path)
    if p.is_file():
        try:
            is_tar = tarfile.is_tarfile(p)
        except OSError as exc:
            msg = f"cannot read bundle archive {path}: {exc}"
            raise BundleError(msg) from exc
        if not is_tar:
            msg = f"bundle {path} is not a valid tar archive (a bundle is a directory or a .tar of one)"
            raise BundleError(msg)
        folder, reused = _unpack_tar(p)
        try:
            return _verify_dir(folder, path, trusted_keys, require_signature)
        except BundleError:
            if not reused:
                raise
        # The reused unpack folder may have been altered since: unpack afresh once and verify that.
        return _verify_dir(_unpack_tar(p, fresh=True)[0], path, trusted_keys, require_signature)
    return _verify_dir(p, path, trusted_keys, require_signature)


def _verify_dir(p: Path, path: str | Path, trusted_keys: list | None, require_signature: bool) -> Bundle:
    from cryptography.exceptions import InvalidSignature

    if not p.is_dir():
        msg = f"bundle {path} does not exist or is not a directory/.tar"
        raise BundleError(msg)
    card_path = p / CARD_NAME
    if not card_path.is_file():
        msg = f"bundle {p} has no {CARD_NAME}"
        raise BundleError(msg)
    card_bytes = card_path.read_bytes()
    sig_path = p / SIG_NAME
    if require_signature:
        if not trusted_keys:
            msg = "no trusted public key configured: cannot verify the bundle signature"
            raise BundleError(msg)
        if not sig_path.is_file():
            msg = f"bundle {p} has no {SIG_NAME}: unsigned bundles are refused"
            raise BundleError(msg)
        sig = sig_path.read_bytes()
        for key in trusted_keys:
            k = key if hasattr(key, "verify") else load_public_key(key)
            try:
                k.verify(sig, card_bytes)
                break
            except InvalidSignature:
                continue
        else:
            msg = f"{SIG_NAME} does not verify card.json under any of the {len(trusted_keys)} trusted key(s)"
            raise BundleError(msg)
    try:
        raw = json.loads(card_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        msg = f"card.json is not valid JSON: {exc}"
        raise BundleError(msg) from exc
    if not isinstance(raw, dict):
        msg = "card.json must hold a JSON object"
        raise BundleError(msg)
    card = Card.from_dict(raw)
    for name, meta in card.files.items():
        f = p / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            msg = f"card.json pins an unsafe path {name!r}"
            raise BundleError(msg)
        if not f.is_file():
            msg = f"bundle file {name} is missing"
            raise BundleError(msg)
        got = sha256_file(f)
        if got != meta.get("sha256"):
            msg = f"bundle file {name} has sha256 {got[:16]}..., the card pins {str(meta.get('sha256'))[:16]}..."
            raise BundleError(msg)
    return Bundle(path=p, card=card, card_sha256=hashlib.sha256(card_bytes).hexdigest())
