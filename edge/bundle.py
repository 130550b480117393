"""The bundle contract: ``card.json`` schema, Ed25519 signature and file hashes (docs/ARCHITECTURE.md, "Contracts").

A bundle is a directory (or a ``.tar`` of one) holding ``model.onnx`` and its precision variants, golden
inputs/outputs, ``card.json`` and ``card.sig``. The card pins every other file by sha256, so one Ed25519
signature over the card's exact bytes (RFC 8032) covers the whole bundle. :func:`verify_bundle` is the single
check the gateway (and the fleet updater, and ``gapcast export``'s self-check) uses.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
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
    "default_unpack_dir",
    "json_object",
    "load_public_key",
    "private_dir",
    "sha256_file",
    "signature_verifies",
    "verify_bundle",
]

log = logging.getLogger(__name__)

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

    def _per_channel(self, attr: str) -> np.ndarray:
        """[C] float32: the channels' ``attr`` (``mean``, ``std``, ``valid_min``, ``valid_max``), in card order."""
        return np.array([getattr(c, attr) for c in self.channels], dtype=np.float32)

    @property
    def mean(self) -> np.ndarray:
        """[C] float32 normalisation means."""
        return self._per_channel("mean")

    @property
    def std(self) -> np.ndarray:
        """[C] float32 normalisation standard deviations."""
        return self._per_channel("std")

    @property
    def valid_min(self) -> np.ndarray:
        """[C] float32 lowest valid value of each channel, physical units."""
        return self._per_channel("valid_min")

    @property
    def valid_max(self) -> np.ndarray:
        """[C] float32 highest valid value of each channel, physical units."""
        return self._per_channel("valid_max")

    @property
    def utc_offset_s(self) -> int:
        return int(self.calendar.get("utc_offset_s", 0))

    @property
    def timezone(self) -> str | None:
        """The stations' time zone for the calendar features (``calendar.timezone``), None: ``utc_offset_s``."""
        tz = self.calendar.get("timezone")
        return str(tz) if tz else None

    @property
    def n_inputs(self) -> int:
        """Columns of the graph's ``values``/``observed`` input: C, or C + G for a model with neighbour context
        (card ``context``, issue 20: columns C..C+G-1 are the context)."""
        for entry in self.inputs:
            if entry.get("name") == "values" and len(entry.get("shape", ())) == 3:
                return int(entry["shape"][2])
        return len(self.channels)

    @property
    def context(self):
        """The :class:`gapcast.neighbours.ContextSpec` of a context model (card ``context.spec``), else None.

        Raises:
            BundleError: a malformed context entry.
        """
        entry = self.raw.get("context")
        if not entry:
            return None
        from gapcast.neighbours import ContextSpec, NeighbourError

        try:
            return ContextSpec.from_dict(entry["spec"])
        except (NeighbourError, KeyError, TypeError) as exc:
            msg = f"card.json: malformed context entry: {exc}"
            raise BundleError(msg) from exc

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


def default_unpack_dir() -> Path:
    """Where a ``.tar`` bundle is unpacked when the caller names no folder: ``$GAPCAST_UNPACK_DIR``, else the user
    cache folder's ``bundles`` (platformdirs). The gateway passes its own state folder instead
    (``agent.state_dir/bundles``, ``update.state_dir/unpacked``)."""
    env = os.environ.get("GAPCAST_UNPACK_DIR")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("gapcast")) / "bundles"


def _owner_problem(path: Path) -> str | None:
    """Why ``path`` is not a folder only this user controls (None when it is): a symlink, not a folder, another
    owner, or writable/readable by group or others."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"cannot stat {path}: {exc}"
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a folder (a symlink or a file)"
    if st.st_uid != os.geteuid():
        return f"{path} belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()})"
    if st.st_mode & 0o077:
        return f"{path} has mode {stat.S_IMODE(st.st_mode):04o}, group or others may read or write it"
    return None


def private_dir(path: str | Path) -> Path:
    """Create ``path`` with mode 0700, or check that an existing one is a folder of this user's.

    An existing folder of this user's with a wider mode is tightened to 0700 (logged). Another user's folder, a
    symlink or a file is refused: whatever is unpacked or installed there would be loaded and run.

    Raises:
        BundleError: ``path`` belongs to another user, is a symlink or a file, or cannot be created.
    """
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        msg = f"cannot create the private folder {p}: {exc}"
        raise BundleError(msg) from exc
    problem = _owner_problem(p)
    if problem and "mode" in problem:
        log.warning("%s: setting it to 0700", problem)
        os.chmod(p, 0o700)
        problem = _owner_problem(p)
    if problem:
        msg = f"refusing to use {p} for bundles: {problem}"
        raise BundleError(msg)
    return p


def _unpack_tar(path: Path, unpack_dir: Path, *, fresh: bool = False) -> tuple[Path, bool]:
    """Unpack a bundle archive into ``<unpack_dir>/gapcast-bundle-<sha256[:16]>`` (one folder per archive content).

    ``unpack_dir`` is a private folder (:func:`private_dir`: this user's, mode 0700). The per-archive folder is
    reused by later calls on the same archive only when it is this user's with mode 0700 (its files are re-verified
    by hash anyway), so repeated ``edge check`` / ``edge run`` do not leak a copy each; any other folder under that
    name is discarded and the archive unpacked afresh (issue 18, item 7: a folder pre-created by another user was
    verified and would have been loaded). Unpacking goes to a fresh private temporary folder (``mkdtemp``, 0700)
    that is then renamed into place, so a concurrent call never sees a half-written folder.

    Args:
        path: the ``.tar`` (any compression ``tarfile`` reads).
        unpack_dir: the private parent folder.
        fresh: discard an existing folder for this archive and unpack again.

    Returns:
        ``(folder, reused)``: the bundle folder (the archive's single top-level folder, or the unpack folder
        itself), and whether it was already there from an earlier call.

    Raises:
        BundleError: the unpack folder is not private, or the archive cannot be read or unpacked.
    """
    root = private_dir(unpack_dir)
    digest = sha256_file(path)[:16]
    dest = root / f"gapcast-bundle-{digest}"
    if not fresh and os.path.lexists(dest):
        problem = _owner_problem(dest)
        if problem is None:
            return _bundle_root(dest), True
        log.warning("not reusing the unpacked bundle: %s; unpacking %s afresh", problem, path.name)
        fresh = True
    if fresh and os.path.lexists(dest):
        try:
            if dest.is_symlink() or not dest.is_dir():
                dest.unlink()
            else:
                shutil.rmtree(dest)
        except OSError as exc:
            msg = f"cannot remove the stale unpack folder {dest}: {exc}"
            raise BundleError(msg) from exc
    tmp = Path(tempfile.mkdtemp(prefix=f".gapcast-bundle-{digest}-", dir=root))
    try:
        with tarfile.open(path) as tf:
            tf.extractall(tmp, filter="data")
        try:
            os.rename(tmp, dest)
        except OSError:
            if _owner_problem(dest) is not None:  # lost a race to a concurrent unpack: use theirs if it is private
                raise
    except (tarfile.TarError, OSError) as exc:
        msg = f"cannot unpack bundle archive {path}: {exc}"
        raise BundleError(msg) from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return _bundle_root(dest), False


def verify_bundle(
    path: str | Path,
    trusted_keys: list | None = None,
    *,
    require_signature: bool = True,
    unpack_dir: str | Path | None = None,
) -> Bundle:
    """Verify a bundle: the card signature against the trusted keys, every pinned file's sha256, the schema, and
    that the folder holds nothing the card does not list.

    Args:
        path: bundle directory or ``.tar`` (unpacked once into ``<unpack_dir>/gapcast-bundle-<sha256[:16]>``,
            reused by later calls on the same archive while that folder is this user's with mode 0700).
        trusted_keys: Ed25519 public keys (objects, PEM paths or hex strings); the signature must verify under one.
        require_signature: False only for local development bundles (``gapcast export`` without ``--sign-key``);
            the gateway always requires it.
        unpack_dir: private folder for unpacking a ``.tar`` (created 0700; default :func:`default_unpack_dir`).

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
        where = Path(unpack_dir) if unpack_dir is not None else default_unpack_dir()
        folder, reused = _unpack_tar(p, where)
        try:
            return _verify_dir(folder, path, trusted_keys, require_signature)
        except BundleError:
            if not reused:
                raise
        # The reused unpack folder may have been altered since: unpack afresh once and verify that.
        return _verify_dir(_unpack_tar(p, where, fresh=True)[0], path, trusted_keys, require_signature)
    return _verify_dir(p, path, trusted_keys, require_signature)


def signature_verifies(signature: bytes, data: bytes, trusted_keys: list) -> bool:
    """Whether the Ed25519 ``signature`` over the exact bytes ``data`` verifies under one of ``trusted_keys``
    (key objects, PEM paths or hex; RFC 8032). Used for ``card.sig`` and for release manifests.

    Raises:
        BundleError: a key that cannot be loaded.
    """
    from cryptography.exceptions import InvalidSignature

    for key in trusted_keys:
        k = key if hasattr(key, "verify") else load_public_key(key)
        try:
            k.verify(signature, data)
            return True
        except InvalidSignature:
            continue
    return False


def json_object(data: bytes, name: str, error: type[Exception]) -> dict[str, Any]:
    """``data`` parsed as a JSON object.

    Raises:
        error: not JSON, or JSON but not an object (the message names ``name``).
    """
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        msg = f"{name} is not valid JSON: {exc}"
        raise error(msg) from exc
    if not isinstance(obj, dict):
        msg = f"{name} must hold a JSON object"
        raise error(msg)
    return obj


def _verify_dir(p: Path, path: str | Path, trusted_keys: list | None, require_signature: bool) -> Bundle:
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
        if not signature_verifies(sig_path.read_bytes(), card_bytes, trusted_keys):
            msg = f"{SIG_NAME} does not verify card.json under any of the {len(trusted_keys)} trusted key(s)"
            raise BundleError(msg)
    raw = json_object(card_bytes, CARD_NAME, BundleError)
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
    extra = _unlisted_files(p, card)
    if extra:
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        msg = f"bundle {p} holds {len(extra)} file(s) the card does not list: {shown}"
        raise BundleError(msg)
    return Bundle(path=p, card=card, card_sha256=hashlib.sha256(card_bytes).hexdigest())


def _unlisted_files(folder: Path, card: Card) -> list[str]:
    """Paths (relative, POSIX) of files and links under ``folder`` that are neither pinned by the card nor the card
    and its signature; folders that only lead to pinned files are fine."""
    allowed = {*card.files, CARD_NAME, SIG_NAME}
    extra = []
    for dirpath, dirnames, filenames in os.walk(folder):
        rel_dir = Path(dirpath).relative_to(folder)
        for name in filenames + [d for d in dirnames if (Path(dirpath) / d).is_symlink()]:
            rel = (rel_dir / name).as_posix()
            if rel not in allowed:
                extra.append(rel)
    return sorted(extra)
