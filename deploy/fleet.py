"""Fleet rollout, cloud side: signed release manifests and chunked bundle artifacts over MQTT.

``gapcast fleet publish|status|promote|rollback`` (:mod:`gapcast.deploy.cli`) are thin wrappers around the
functions here. Everything goes under ``{prefix}/fleet/{fleet}/`` (topic names in
:class:`gapcast.edge.release.FleetTopics`), retained and QoS 1, so a gateway that is offline during a release gets it
when it reconnects:

- ``manifest``: the current release, an envelope ``{"manifest": base64(JSON), "signature": base64(Ed25519),
  "key_id"}`` — the gateway checks it with :func:`gapcast.edge.release.open_envelope`;
- ``releases/{version}``: every release published, so ``rollback --to VERSION`` can re-issue it;
- ``artifacts/{artifact_id}/{index}``: the bundle folder as a deterministic ``.tar`` (sorted names, mtime 0,
  uid/gid 0), cut into ``chunk_bytes`` pieces, each pinned by sha256 in the manifest.

Size limits: a chunk is 96 KiB by default (AWS IoT Core caps a message at 128 KiB; Mosquitto's
``message_size_limit`` defaults to the MQTT maximum of 256 MiB; EMQX and HiveMQ default to 1 MiB and 256 MiB) and
at most 8 MiB (:data:`gapcast.edge.release.MAX_CHUNK_BYTES`); an artifact is at most 256 MiB
(:data:`gapcast.edge.release.DEFAULT_MAX_ARTIFACT_BYTES`, and each gateway may set a lower ``max_artifact_bytes``).
The broker keeps every retained chunk until it is cleared (an empty retained message), so old releases stay
available for rollbacks and cost broker storage: clear ``artifacts/{id}/+`` of releases you will never roll back to.

Design notes borrowed from field updaters: the manifest pins one artifact by hash and is signed as exact bytes
(RAUC's signed manifest, SWUpdate's signed ``sw-description``); targeting is a canary list and/or a deterministic
percent ring (AWS IoT jobs' staged rollouts); a rollback is an explicit, signed release of an older version, never
an unsigned downgrade; the gateway commits only after a health window (Mender's commit, RAUC's mark-good).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import logging
import tarfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gapcast import GapcastError
from gapcast.brokerurl import BrokerURL
from gapcast.brokerurl import parse_broker_url as _parse_broker_url
from gapcast.deploy.fleetstatus import GatewayState, fleet_status, format_status  # re-exported: fleet's names
from gapcast.edge import BundleError, UpdateRejected
from gapcast.edge.bundle import CARD_NAME, SIG_NAME, Bundle, verify_bundle
from gapcast.edge.release import (
    DEFAULT_CHUNK_BYTES,
    MANIFEST_SCHEMA,
    MANIFEST_TYPE,
    FleetTopics,
    Manifest,
    Targets,
    compat_of,
    key_id,
    n_chunks,
    open_envelope,
    split_artifact,
)
from gapcast.timefmt import format_rfc3339

__all__ = [
    "BrokerURL",
    "FleetClient",
    "FleetError",
    "GatewayState",
    "Release",
    "build_manifest",
    "chunk_artifact",
    "fleet_status",
    "format_status",
    "load_private_key",
    "n_chunks",
    "pack_bundle",
    "parse_broker_url",
    "promote",
    "publish_release",
    "rollback",
    "sign_manifest",
]

log = logging.getLogger(__name__)


class FleetError(GapcastError):
    """A fleet command cannot do what was asked (the message says why)."""


# --------------------------------------------------------------------------------------------- keys, artifact


def load_private_key(path: str | Path):
    """Load an Ed25519 private key from an unencrypted PEM file (``gapcast keys generate`` writes one).

    The same loader as ``gapcast export`` (:func:`gapcast.export.keys.load_private_key`), with its error converted.

    Returns:
        ``cryptography`` ``Ed25519PrivateKey``.

    Raises:
        FleetError: unreadable, encrypted, or not Ed25519.
    """
    from gapcast.export import ExportError
    from gapcast.export.keys import load_private_key as _load

    try:
        return _load(path)
    except ExportError as exc:
        raise FleetError(str(exc)) from exc


def pack_bundle(bundle_dir: str | Path) -> tuple[Bundle, bytes]:
    """Check a bundle folder and pack it as a deterministic ``.tar`` (same folder, same bytes).

    The signature is checked on the gateway against its trusted keys; here we check the bundle is signed at all and
    every pinned file matches its hash, so a broken bundle never reaches the fleet.

    Returns:
        (the bundle, the ``.tar`` bytes; one top-level folder ``bundle-v{version}``).

    Raises:
        FleetError: not a bundle folder, unsigned, or a file that does not match the card.
    """
    p = Path(bundle_dir)
    if not p.is_dir():
        msg = f"{p} is not a bundle folder"
        raise FleetError(msg)
    if not (p / SIG_NAME).is_file():
        msg = f"{p} has no {SIG_NAME}: gateways refuse unsigned bundles (export with --sign-key)"
        raise FleetError(msg)
    try:
        bundle = verify_bundle(p, require_signature=False)
    except BundleError as exc:
        raise FleetError(f"bundle {p} does not verify: {exc}") from exc
    names = sorted([*bundle.card.files, CARD_NAME, SIG_NAME])
    top = f"bundle-v{bundle.card.model_version}"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        dirs = sorted({str(Path(n).parent) for n in names if str(Path(n).parent) != "."})
        for d in [""] + dirs:
            info = tarfile.TarInfo(f"{top}/{d}".rstrip("/"))
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
            tf.addfile(info)
        for n in names:
            data = (p / n).read_bytes()
            info = tarfile.TarInfo(f"{top}/{n}")
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tf.addfile(info, io.BytesIO(data))
    return bundle, buf.getvalue()


def chunk_artifact(data: bytes, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[bytes]:
    """Cut an artifact into chunks of ``chunk_bytes`` (the last one shorter).

    Raises:
        FleetError: chunk size outside 1 .. MAX_CHUNK_BYTES, or the artifact above DEFAULT_MAX_ARTIFACT_BYTES.
    """
    try:
        return split_artifact(data, chunk_bytes)  # the protocol's one chunking rule (gapcast.edge.release)
    except ValueError as exc:
        raise FleetError(str(exc)) from exc


_rfc3339 = format_rfc3339


def build_manifest(
    bundle: Bundle,
    artifact: bytes,
    *,
    fleet: str,
    targets: Targets,
    sequence: int,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    kind: str = "release",
    rollback_from: int | None = None,
    created_s: float | None = None,
) -> dict[str, Any]:
    """The release manifest dict for a packed bundle (fields documented in :class:`~gapcast.edge.release.Manifest`)."""
    chunks = chunk_artifact(artifact, chunk_bytes)
    sha = hashlib.sha256(artifact).hexdigest()
    d: dict[str, Any] = {
        "type": MANIFEST_TYPE,
        "schema": MANIFEST_SCHEMA,
        "fleet": fleet,
        "kind": kind,
        "sequence": int(sequence),
        "created": _rfc3339(time.time() if created_s is None else created_s),
        "model": {
            "name": bundle.card.model_name,
            "version": bundle.card.model_version,
            "card_sha256": bundle.card_sha256,
        },
        "compat": compat_of(bundle.card),
        "artifact": {
            "id": sha[:16],
            "format": "tar",
            "bytes": len(artifact),
            "sha256": sha,
            "chunk_bytes": chunk_bytes,
            "chunks": [hashlib.sha256(c).hexdigest() for c in chunks],
        },
        "targets": targets.to_dict(),
    }
    if rollback_from is not None:
        d["rollback_from"] = int(rollback_from)
    Manifest.from_dict(d)  # the gateway's own validation, before anything is signed
    return d


def sign_manifest(manifest: dict[str, Any], private_key) -> bytes:
    """The signed envelope (MQTT payload) for a manifest dict: Ed25519 over the manifest's exact JSON bytes."""
    body = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    sig = private_key.sign(body)
    env = {
        "schema": "gapcast/manifest/1",  # the envelope's contract (gapcast.edge.schemas); the manifest is signed as is
        "manifest": base64.b64encode(body).decode(),
        "signature": base64.b64encode(sig).decode(),
        "key_id": key_id(private_key.public_key()),
    }
    return json.dumps(env).encode()


# --------------------------------------------------------------------------------------------- MQTT


def parse_broker_url(url: str) -> BrokerURL:
    """Parse a broker URL (:func:`gapcast.brokerurl.parse_broker_url`).

    Raises:
        FleetError: another scheme, no host, or a bad port.
    """
    try:
        return _parse_broker_url(url)
    except ValueError as exc:
        raise FleetError(str(exc)) from exc


class FleetClient:
    """A short-lived MQTT client for the fleet commands (paho-mqtt 2.x, VERSION2 callbacks, MQTT 5, QoS 1).

    Args:
        url: broker URL (:func:`parse_broker_url`).
        client_id: MQTT client id (default: ``gapcast-fleet-`` + random).
        ca_file: CA bundle for ``mqtts://`` (default: the system's).
        timeout_s: connect / acknowledgement timeout, seconds.

    Use as a context manager. Callbacks run on paho's network thread and only fill thread-safe structures.
    """

    def __init__(
        self,
        url: str,
        *,
        client_id: str | None = None,
        ca_file: str | None = None,
        timeout_s: float = 15.0,
        mqtt_version: str = "5",
    ) -> None:
        import paho.mqtt.client as mqtt

        self.url = parse_broker_url(url)
        self.timeout_s = timeout_s
        self.v5 = mqtt_version == "5"  # "3.1.1" for brokers without MQTT 5 (RabbitMQ before 3.13)
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id or f"gapcast-fleet-{uuid.uuid4().hex[:10]}",
            protocol=mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311,
        )
        if self.url.username:
            self._client.username_pw_set(self.url.username, self.url.password)
        if self.url.tls:
            self._client.tls_set(ca_certs=ca_file)
        self._client.max_inflight_messages_set(32)
        self._connected = threading.Event()
        self._connect_rc: Any = None
        self._lock = threading.Lock()
        self._sink: dict[str, bytes] | None = None
        self._probe: str | None = None
        self._probe_seen = threading.Event()
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # network thread
        self._connect_rc = reason_code
        self._connected.set()

    def _on_message(self, client, userdata, msg) -> None:  # network thread
        with self._lock:
            if msg.topic == self._probe:
                self._probe_seen.set()
            elif self._sink is not None and msg.retain:
                self._sink[msg.topic] = bytes(msg.payload)

    def __enter__(self) -> FleetClient:
        try:
            self._client.connect(self.url.host, self.url.port, keepalive=30)
        except OSError as exc:
            msg = f"cannot reach the broker at {self.url.host}:{self.url.port}: {exc}"
            raise FleetError(msg) from exc
        self._client.loop_start()
        if not self._connected.wait(self.timeout_s) or getattr(self._connect_rc, "is_failure", False):
            self._client.loop_stop()
            msg = f"MQTT connect to {self.url.host}:{self.url.port} failed: {self._connect_rc}"
            raise FleetError(msg)
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self._client.disconnect()
        self._client.loop_stop()

    def publish(self, items: list[tuple[str, bytes]], *, retain: bool = True) -> None:
        """Publish QoS 1 and wait for every PUBACK.

        Raises:
            FleetError: a publish is refused or not acknowledged within the timeout.
        """
        infos = []
        for topic, payload in items:
            info = self._client.publish(topic, payload, qos=1, retain=retain)
            if info.rc != 0:
                msg = f"publish to {topic} refused by the client (rc {info.rc})"
                raise FleetError(msg)
            infos.append((topic, info))
        deadline = time.monotonic() + self.timeout_s + 0.01 * len(items)
        for topic, info in infos:
            try:
                info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            except (ValueError, RuntimeError) as exc:
                raise FleetError(f"publish to {topic} failed: {exc}") from exc
            if not info.is_published():
                msg = f"publish to {topic} was not acknowledged within {self.timeout_s:.0f} s"
                raise FleetError(msg)

    def retained(self, filters: list[str], *, probe_base: str) -> dict[str, bytes]:
        """Every retained message under ``filters`` (topic -> payload).

        The broker sends retained messages when we subscribe; a probe message we publish on a unique topic after
        the subscriptions marks the end (the broker forwards one client's messages in order).
        """
        import paho.mqtt.client as mqtt

        probe = f"{probe_base}/_probe/{uuid.uuid4().hex}"
        with self._lock:
            self._sink, self._probe = {}, probe
            self._probe_seen.clear()
        opts = mqtt.SubscribeOptions(qos=1) if self.v5 else 1
        rc, _ = self._client.subscribe([(f, opts) for f in [*filters, probe]])
        if rc != 0:
            msg = f"subscribe failed (rc {rc})"
            raise FleetError(msg)
        # The SUBACK arrives asynchronously; publish the probe only after the broker has the subscriptions.
        time.sleep(0.2)
        self._client.publish(probe, b"", qos=1, retain=False)
        if not self._probe_seen.wait(self.timeout_s):
            msg = "the broker did not echo the probe message: cannot read retained messages"
            raise FleetError(msg)
        self._client.unsubscribe([*filters, probe])
        with self._lock:
            out, self._sink, self._probe = self._sink or {}, None, None
        return out


# --------------------------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class Release:
    """What a fleet command published.

    Attributes:
        manifest: the signed manifest, as a gateway parses it.
        topics: the fleet's topics.
        chunks: how many artifact chunks were published (0 when reused).
    """

    manifest: Manifest
    topics: FleetTopics
    chunks: int


def _current(client: FleetClient, topics: FleetTopics, public_key) -> Manifest | None:
    got = client.retained([topics.manifest], probe_base=topics.base)
    payload = got.get(topics.manifest)
    if not payload:
        return None
    try:
        return open_envelope(payload, [public_key])
    except UpdateRejected as exc:
        msg = f"the fleet's current manifest does not verify under this signing key: {exc}"
        raise FleetError(msg) from exc


def _next_sequence(previous: Manifest | None) -> int:
    now_ms = int(time.time() * 1000)
    return max(now_ms, (previous.sequence + 1) if previous else 0)


def publish_release(
    client: FleetClient,
    topics: FleetTopics,
    bundle_dir: str | Path,
    private_key,
    targets: Targets,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Release:
    """Publish a bundle: its chunks (retained, QoS 1), then the signed manifest as the fleet's current release.

    Chunks go first so that a gateway that sees the manifest can fetch the whole artifact at once.

    Raises:
        FleetError: a bad bundle, a version not above the fleet's current release, or a broker failure.
    """
    bundle, artifact = pack_bundle(bundle_dir)
    previous = _current(client, topics, private_key.public_key())
    if previous is not None and bundle.card.model_version <= previous.model_version:
        msg = (
            f"bundle v{bundle.card.model_version} is not newer than the fleet's current release "
            f"v{previous.model_version}: gateways would refuse it (use `gapcast fleet rollback --to` to go back)"
        )
        raise FleetError(msg)
    manifest = build_manifest(
        bundle, artifact, fleet=topics.fleet, targets=targets, sequence=_next_sequence(previous),
        chunk_bytes=chunk_bytes,
    )  # fmt: skip
    chunks = chunk_artifact(artifact, chunk_bytes)
    art_id = manifest["artifact"]["id"]
    client.publish([(topics.chunk(art_id, i), c) for i, c in enumerate(chunks)])
    envelope = sign_manifest(manifest, private_key)
    client.publish([(topics.release(bundle.card.model_version), envelope), (topics.manifest, envelope)])
    parsed = Manifest.from_dict(manifest)
    log.info(
        "published v%d to fleet %s (%s): %d bytes in %d chunk(s), sequence %d",
        parsed.model_version, topics.fleet, targets.describe(), len(artifact), len(chunks), parsed.sequence,
    )  # fmt: skip
    return Release(parsed, topics, len(chunks))


def _reissue(
    client: FleetClient, topics: FleetTopics, private_key, base: Manifest, *, kind: str, rollback_from: int | None
) -> Release:
    current = _current(client, topics, private_key.public_key())
    d = dict(base.raw)
    d.update(
        kind=kind,
        sequence=_next_sequence(current),
        created=_rfc3339(time.time()),
        targets=Targets(everyone=True).to_dict(),
    )
    d.pop("rollback_from", None)
    if rollback_from is not None:
        d["rollback_from"] = rollback_from
    envelope = sign_manifest(d, private_key)
    items = [(topics.manifest, envelope)]
    if kind == "release":
        items.append((topics.release(base.model_version), envelope))
    client.publish(items)
    return Release(Manifest.from_dict(d), topics, 0)


def promote(client: FleetClient, topics: FleetTopics, private_key) -> Release:
    """Re-issue the fleet's current release for everyone (canary -> fleet), signed, with a new sequence.

    Raises:
        FleetError: no current release, or it does not verify under this key.
    """
    current = _current(client, topics, private_key.public_key())
    if current is None:
        msg = f"fleet {topics.fleet} has no release to promote"
        raise FleetError(msg)
    if current.targets.everyone:
        log.info("release v%d already targets everyone: re-issuing it", current.model_version)
    return _reissue(
        client, topics, private_key, current, kind=current.kind, rollback_from=current.rollback_from
    )


def rollback(client: FleetClient, topics: FleetTopics, private_key, to_version: int) -> Release:
    """Issue a signed rollback to an earlier release of the fleet, for everyone.

    The release's manifest comes from ``releases/{to_version}`` (retained) and its artifact chunks must still be
    retained on the broker; they are all fetched and checked before the rollback is signed.

    Raises:
        FleetError: no such release, its artifact is no longer complete on the broker, or it is the current one.
    """
    pub = private_key.public_key()
    got = client.retained([topics.release(to_version)], probe_base=topics.base)
    payload = got.get(topics.release(to_version))
    if not payload:
        msg = f"fleet {topics.fleet} has no retained release v{to_version} to roll back to"
        raise FleetError(msg)
    try:
        target = open_envelope(payload, [pub])
    except UpdateRejected as exc:
        raise FleetError(f"release v{to_version} does not verify under this signing key: {exc}") from exc
    current = _current(client, topics, pub)
    if current is not None and current.card_sha256 == target.card_sha256:
        msg = f"v{to_version} is already the fleet's current release"
        raise FleetError(msg)
    chunks = client.retained([topics.chunks_filter(target.artifact_id)], probe_base=topics.base)
    for i, want in enumerate(target.chunk_sha256):
        data = chunks.get(topics.chunk(target.artifact_id, i))
        if data is None or hashlib.sha256(data).hexdigest() != want:
            msg = (
                f"artifact of v{to_version} is no longer intact on the broker (chunk {i} "
                f"{'missing' if data is None else 'altered'}): publish the bundle again"
            )
            raise FleetError(msg)
    return _reissue(
        client, topics, private_key, target, kind="rollback",
        rollback_from=None if current is None else current.model_version,
    )  # fmt: skip
