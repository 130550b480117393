"""The fleet release protocol, pure: topics, targets, signed manifests, chunking rules, verification verdicts.

Both sides speak it: the cloud (``gapcast fleet ...``, :mod:`gapcast.deploy.fleet`) builds and signs manifests and
cuts artifacts into chunks with these rules; the gateway (:mod:`gapcast.edge.updater`) opens envelopes, checks chunks
and judges candidates with them. Everything here is a value type or a function of its arguments: no MQTT, no files,
no clock (docs/ARCHITECTURE.md, "Contracts").

Under ``{prefix}/fleet/{fleet}/`` (:class:`FleetTopics`), retained:

- ``manifest``: the current release, a signed envelope (see :func:`open_envelope`);
- ``releases/{version}``: every release ever published, for ``gapcast fleet rollback --to VERSION``;
- ``artifacts/{artifact_id}/{index}``: the bundle as a ``.tar``, cut in chunks (:func:`split_artifact`), each
  pinned by sha256 in the manifest (:func:`check_chunk`).

Verdicts come in two kinds, and only one of them burns a release (issue 18, item 6):

- a :class:`ChunkFault` says a chunk as it arrived does not match its pin (a transport fault, a truncated or
  altered retained message). It is *not* a verdict about the release: the gateway asks for the chunks again for a
  bounded time and keeps the manifest's sequence unconsumed, so the same signed release with correct chunks still
  installs;
- every other :class:`~gapcast.edge.UpdateRejected` (a bad signature, an incompatible card, a whole artifact whose
  hash differs although every chunk matched, a bundle that does not verify, a failed golden check or shadow run) is
  a verdict about the artifact itself: the sequence is consumed and the release is not tried again.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gapcast.edge import UpdateRejected
from gapcast.edge.bundle import Card, json_object, load_public_key, signature_verifies

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_MAX_ARTIFACT_BYTES",
    "MANIFEST_SCHEMA",
    "MANIFEST_TYPE",
    "MAX_CHUNK_BYTES",
    "STAGES",
    "ChunkFault",
    "FleetTopics",
    "Manifest",
    "Targets",
    "check_chunk",
    "check_compatible",
    "check_outputs",
    "chunk_length",
    "compat_of",
    "key_id",
    "n_chunks",
    "open_envelope",
    "percent_bucket",
    "renormalise_inputs",
    "renormalise_outputs",
    "split_artifact",
]

MANIFEST_SCHEMA = 1
MANIFEST_TYPE = "gapcast.fleet.release"
#: Default chunk size: fits AWS IoT Core's 128 KiB message limit with room for the MQTT header.
DEFAULT_CHUNK_BYTES = 96 * 1024
#: Largest chunk a gateway accepts (Mosquitto's default message_size_limit is the MQTT maximum, 256 MiB).
MAX_CHUNK_BYTES = 8 * 1024 * 1024
#: Largest artifact a gateway downloads unless its config says otherwise.
DEFAULT_MAX_ARTIFACT_BYTES = 256 * 1024 * 1024
STAGES = ("received", "verified", "rejected", "staged", "active", "rolled_back")



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
    if not signature_verifies(sig, body, keys):
        msg = (
            f"manifest signature (key id {str(env.get('key_id'))[:16]}) does not verify under any of the "
            f"{len(keys)} trusted key(s)"
        )
        raise UpdateRejected(msg)
    d = json_object(body, "manifest", UpdateRejected)
    return Manifest.from_dict(d)


# --------------------------------------------------------------------------------------------- verdicts


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

    Normalisation statistics may differ: :class:`gapcast.edge.guard.GuardedBackend` converts between the two cards.
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



# --------------------------------------------------------------------------------------------- chunking rules


class ChunkFault(UpdateRejected):
    """A chunk does not match the manifest's pin (length or sha256): a transport fault, not a verdict about the
    release. The gateway asks for the chunks again instead of refusing the release.

    Attributes:
        index: the chunk's index.
    """

    def __init__(self, msg: str, index: int) -> None:
        super().__init__(msg)
        self.index = index


def n_chunks(artifact_bytes: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """How many chunks an artifact of ``artifact_bytes`` takes in chunks of ``chunk_bytes`` (the last one shorter)."""
    return math.ceil(artifact_bytes / chunk_bytes)


def split_artifact(data: bytes, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[bytes]:
    """Cut an artifact into chunks of ``chunk_bytes`` bytes (the last one shorter).

    Raises:
        ValueError: ``chunk_bytes`` outside 1 .. :data:`MAX_CHUNK_BYTES`, or the artifact above
            :data:`DEFAULT_MAX_ARTIFACT_BYTES`.
    """
    if not 1 <= chunk_bytes <= MAX_CHUNK_BYTES:
        msg = f"chunk_bytes must be within 1..{MAX_CHUNK_BYTES}, got {chunk_bytes}"
        raise ValueError(msg)
    if len(data) > DEFAULT_MAX_ARTIFACT_BYTES:
        msg = f"artifact of {len(data)} bytes exceeds the {DEFAULT_MAX_ARTIFACT_BYTES}-byte limit"
        raise ValueError(msg)
    return [data[i : i + chunk_bytes] for i in range(0, len(data), chunk_bytes)]


def chunk_length(m: Manifest, index: int) -> int:
    """Bytes chunk ``index`` of ``m``'s artifact holds: ``chunk_bytes``, the last one the remainder.

    Raises:
        UpdateRejected: ``index`` outside the artifact (a message on the chunk topic that is not a chunk of it).
    """
    count = len(m.chunk_sha256)
    if not 0 <= index < count:
        msg = f"chunk index {index} outside 0..{count - 1}"
        raise UpdateRejected(msg)
    return min(m.chunk_bytes, m.artifact_bytes - index * m.chunk_bytes)


def check_chunk(m: Manifest, index: int, data: bytes) -> None:
    """Check one chunk against the manifest's pin.

    Raises:
        UpdateRejected: ``index`` outside the artifact.
        ChunkFault: wrong length or sha256 (a transport fault: ask again, do not burn the release).
    """
    want_len = chunk_length(m, index)
    if len(data) != want_len:
        msg = f"chunk {index} has {len(data)} bytes, the manifest says {want_len}"
        raise ChunkFault(msg, index)
    got = hashlib.sha256(data).hexdigest()
    if got != m.chunk_sha256[index]:
        msg = f"chunk {index} has sha256 {got[:16]}..., the manifest pins {m.chunk_sha256[index][:16]}..."
        raise ChunkFault(msg, index)



# --------------------------------------------------------------------------------------------- normalisation


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
