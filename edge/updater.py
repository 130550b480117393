"""Fleet model updates on the gateway: the update state machine (received ... active, rolled_back).

(Over 600 lines on purpose: one state machine whose transitions on three threads share one lock and one journal;
the protocol, the files and the agent-facing wiring are already apart in release, slots and guard.)

The protocol (topics, manifests, chunk rules, verdicts) is :mod:`gapcast.edge.release`; the files (incoming
artifact, slots, ``current`` symlink, journal) are :mod:`gapcast.edge.slots`; the backend the agent runs and the
MQTT / config wiring are :mod:`gapcast.edge.guard`. The steps follow image-based updaters such as RAUC, Mender and
SWUpdate, on a model instead of a root file system:

1. *received*: the envelope's Ed25519 signature verifies under a trusted key; the manifest is for this fleet, newer
   than any manifest already handled (its ``sequence``, so an old signed manifest cannot be replayed), targets this
   gateway (canary list, deterministic percent bucket, or everyone), is compatible with the running card (channels,
   cadence, L, H, calendar) and, unless it is a signed rollback, carries a newer model version.
2. the artifact's chunks are collected, each checked against its sha256. A chunk that does not match is a transport
   fault (:class:`~gapcast.edge.release.ChunkFault`): the chunks are asked for again (re-subscribing makes the
   broker re-send the retained chunks) with a doubling delay for at most ``chunk_retry_s``; giving up reports
   *rejected* but leaves the sequence unconsumed, so the same signed release installs when it arrives again;
3. *verified* (worker thread): the whole artifact's sha256, then unpacked into a new slot and checked with
   :func:`gapcast.edge.bundle.verify_bundle`; the card must be the one the manifest pins;
4. *staged* (worker thread): the journal records the slot; the backend is built (on a Jetson: the TensorRT engine,
   :func:`gapcast.edge.backends.select_backend` with ``build_engine``); a shadow run on the latest live windows gives
   finite values within the channels' valid ranges and the golden inputs reproduce the golden outputs;
5. *active* (step thread): at the next step boundary the ``current`` symlink is swapped atomically and the new
   backend serves the next step; for ``health_steps`` steps every output is checked and a failure rolls back at once
   (*rolled_back*), re-running the failed batch on the previous model (kept warm, its TensorRT engine included) so no
   step is lost. After the health window the update is committed (Mender's ``ArtifactCommit``, RAUC's
   ``mark-good``).

Every stage is reported through the ``report`` callback (the agent publishes it retained on
``{prefix}/gateways/{gateway}/model``) and kept for the status message. The journal lets :meth:`Updater.start` bring
a restarted gateway back on exactly one complete, verified bundle: an update interrupted before its commit is
discarded and retried when the retained manifest arrives again, at most ``max_attempts`` times.

Threads: :meth:`Updater.on_message` runs on the MQTT network thread and only parses, checks chunk hashes and writes
chunks; staging (hash, unpack, verify, build the backend, shadow run, golden check) runs on a worker thread of its
own, so the agent keeps ingesting, acknowledging and publishing while an engine builds; only the swap
(:meth:`Updater.step_boundary`) and the health checks run on the agent's step thread. Chunk re-requests run on a
timer thread. One lock guards the state; no thread holds it during long work.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gapcast.edge import BackendError, BundleError, UpdateRejected
from gapcast.edge.backends import Backend
from gapcast.edge.bundle import Bundle, Card, load_public_key, verify_bundle
from gapcast.edge.release import (
    DEFAULT_MAX_ARTIFACT_BYTES,
    MAX_CHUNK_BYTES,
    ChunkFault,
    FleetTopics,
    Manifest,
    check_compatible,
    check_outputs,
    compat_of,
    open_envelope,
    renormalise_inputs,
)
from gapcast.edge.slots import ArtifactAssembler, SlotStore

__all__ = ["BackendFactory", "Runner", "Swap", "Updater", "UpdaterConfig", "backend_info", "default_runner"]

log = logging.getLogger(__name__)

#: The longest delay between two requests for the chunks of a faulty download, seconds.
MAX_RETRY_DELAY_S = 60.0


@dataclass(frozen=True)
class UpdaterConfig:
    """Gateway-side update settings (the ``[update]`` table of the edge config).

    Attributes:
        gateway: this gateway's id.
        fleet: the fleet it belongs to.
        state_dir: folder for slots, the ``current`` symlink and the journal (mode 0700).
        prefix: MQTT topic prefix.
        health_steps: steps after the switch during which a bad output rolls back automatically.
        range_slack: see :func:`gapcast.edge.release.check_outputs`.
        max_artifact_bytes: larger artifacts are refused before download, bytes.
        max_attempts: how often an update interrupted by a restart is retried before it is refused.
        chunk_retry_s: how long a download with faulty chunks keeps asking for them again before it gives up
            (without burning the release), seconds from the first fault.
        chunk_retry_delay_s: the first delay before asking again, seconds; doubled after each request, at most
            :data:`MAX_RETRY_DELAY_S`.
    """

    gateway: str
    fleet: str
    state_dir: Path
    prefix: str = "gapcast/v1"
    health_steps: int = 3
    range_slack: float = 0.25
    max_artifact_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES
    max_attempts: int = 2
    chunk_retry_s: float = 600.0
    chunk_retry_delay_s: float = 5.0

    def __post_init__(self) -> None:
        if self.health_steps < 1:
            msg = f"health_steps must be >= 1, got {self.health_steps}"
            raise ValueError(msg)
        if self.chunk_retry_s < 0 or self.chunk_retry_delay_s <= 0:
            msg = f"chunk_retry_s must be >= 0 and chunk_retry_delay_s > 0 (got {self.chunk_retry_s}, {self.chunk_retry_delay_s})"
            raise ValueError(msg)

    @property
    def topics(self) -> FleetTopics:
        return FleetTopics(self.prefix, self.fleet)


@dataclass(frozen=True)
class Swap:
    """What the agent runs from the next step on.

    Attributes:
        bundle: the verified bundle (its card gives version, channels, normalisation).
        backend: the backend built from it (None: none could be built; the agent interpolates).
        reason: ``start``, ``update`` or ``rollback``.
    """

    bundle: Bundle
    backend: Backend | None
    reason: str


BackendFactory = Callable[[Bundle], Backend]
Runner = Callable[[Any, np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
Live = tuple[np.ndarray, np.ndarray, np.ndarray]


def default_runner(backend: Backend | None, values: np.ndarray, observed: np.ndarray, calendar: np.ndarray):
    """Run one batch: ``backend.run(values, observed, calendar) -> (imputed, forecast)``.

    Raises:
        BackendError: no backend (none could be built for the bundle).
    """
    if backend is None:
        msg = "no inference backend for the running bundle"
        raise BackendError(msg)
    return backend.run(values, observed, calendar)


def backend_info(backend: Backend | None) -> dict[str, Any]:
    """The status / report entry for a backend (:meth:`gapcast.edge.backends.Backend.info`): name, precision,
    description and, for TensorRT, the engine's build time. ``{"name": "none"}`` when there is none."""
    if backend is None:
        return {"name": "none"}
    try:
        return backend.info()
    except Exception as exc:  # a report must not fail because a backend cannot describe itself
        return {"name": backend.name, "error": f"{type(exc).__name__}: {exc}"}


def _close(backend: Backend | None) -> None:
    if backend is not None:
        try:
            backend.close()
        except Exception:  # freeing an engine must never take the gateway down
            log.exception("closing backend %s failed", backend.name)


@dataclass
class _Fault:
    """Chunk faults of the download in progress (monotonic seconds)."""

    first_s: float
    reason: str
    requests: int = 0
    timer: threading.Timer | None = None


@dataclass(frozen=True)
class _Candidate:
    """A release staged on the worker: verified, backend built, shadow run and golden check passed."""

    manifest: Manifest
    slot: str
    bundle: Bundle
    backend: Backend


class Updater:
    """The gateway's update state machine (see the module docstring for the stages and threads).

    Args:
        config: settings.
        trusted_keys: Ed25519 public keys for manifests and bundles (objects, PEM paths or hex).
        backend_factory: builds a backend for a verified bundle while staging (worker thread); may take minutes
            (a TensorRT engine build); whatever it raises rejects the update with the reason.
        start_backend_factory: builds the backend of the bundle the gateway starts on (default:
            ``backend_factory``); a BackendError there leaves the agent on interpolation, logged.
        runner: runs one batch on a backend; default ``backend.run(values, observed, calendar)``.
        report: called with every stage report (a JSON-able dict), on the thread that made the transition.
        subscribe, unsubscribe: called with a topic filter when the artifact's chunks must be fetched / are no
            longer needed (the MQTT shell forwards them to its client, QoS 1).
        wall_clock: seconds since the epoch, for report timestamps only.
        mono: monotonic seconds, for the chunk retry window.
    """

    def __init__(
        self,
        config: UpdaterConfig,
        *,
        trusted_keys: list,
        backend_factory: BackendFactory,
        start_backend_factory: BackendFactory | None = None,
        runner: Runner = default_runner,
        report: Callable[[dict[str, Any]], None] | None = None,
        subscribe: Callable[[str], None] | None = None,
        unsubscribe: Callable[[str], None] | None = None,
        wall_clock: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = config
        self.trusted_keys = [k if hasattr(k, "verify") else load_public_key(k) for k in trusted_keys]
        self.backend_factory = backend_factory
        self.start_backend_factory = start_backend_factory or backend_factory
        self.runner = runner
        self._report_cb = report
        self._subscribe = subscribe or (lambda _t: None)
        self._unsubscribe = unsubscribe or (lambda _t: None)
        self._clock = wall_clock
        self._mono = mono
        self.store = SlotStore(Path(config.state_dir))
        self.topics = config.topics
        self._lock = threading.RLock()
        self._journal: dict[str, Any] = {}
        self.active: Bundle | None = None
        self.active_backend: Backend | None = None
        self._previous: tuple[Bundle, Backend | None] | None = None  # kept warm during the health window
        self._pending: Manifest | None = None  # manifest whose artifact is being collected
        self._assembler: ArtifactAssembler | None = None
        self._fault: _Fault | None = None  # chunk faults of the pending download
        self._staging: threading.Thread | None = None  # the worker staging a complete artifact
        self._candidate: _Candidate | None = None  # staged, waiting for a step boundary
        self._deferred: bytes | None = None  # a manifest that arrived while another update was under way
        self._live: tuple[Live, Card] | None = None  # the latest live batch and the card it is normalised with
        self._health_left = 0
        self._last_seen_sequence = 0
        self.counters: dict[str, int] = {"chunk_faults": 0, "chunk_requests": 0}
        self.last_report: dict[str, Any] | None = None
        self.history: list[dict[str, Any]] = []

    # ----------------------------------------------------------------------------------- start-up

    @property
    def subscriptions(self) -> list[str]:
        """Topic filters to subscribe to at every connect (QoS 1): the fleet's retained manifest, and the chunks
        of an artifact being collected (re-subscribing makes the broker send the retained chunks again)."""
        with self._lock:
            subs = [self.topics.manifest]
            if self._pending is not None:
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
        """The journal's phase: ``idle``, ``staged`` (a candidate slot is on disk), ``switching`` or ``health``."""
        return str(self._journal.get("phase", "idle"))

    @property
    def busy(self) -> bool:
        """An update is being staged, waits for its switch, or is in its health window."""
        return self._staging is not None or self._candidate is not None or self.phase != "idle"

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
            name, bundle = self._recover_slot(j, seed)
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
                self.active_backend = self.start_backend_factory(bundle)
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

    def _recover_slot(self, j: dict[str, Any], seed: str | Path | None) -> tuple[str, Bundle]:
        """The slot to start on: committed, previous, ``current``, then the seed (installed into a slot)."""
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
            seed_bundle = verify_bundle(seed, self.trusted_keys, unpack_dir=self.store.unpacked)
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
        return name, bundle

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the retry timer and wait up to ``timeout_s`` for a staging job to end (shutdown, tests)."""
        with self._lock:
            if self._fault is not None and self._fault.timer is not None:
                self._fault.timer.cancel()
        self.wait_idle(timeout_s)

    def wait_idle(self, timeout_s: float = 10.0) -> bool:
        """Wait until no staging job runs (tools and tests; the agent never waits). Returns False on timeout."""
        worker = self._staging
        if worker is not None:
            worker.join(timeout_s)
            return not worker.is_alive()
        return True

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
        if pending is not None and m.sequence == pending.sequence:
            # The same release again while its chunks are still coming: ask for the retained chunks once more.
            self._request_chunks(pending)
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
        if self.busy:
            # A newer manifest while an update is staged or in its health window waits until that one ends.
            log.warning("manifest %d arrived while an update is under way (%s): deferred", m.sequence, self.phase)
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
        except ChunkFault as exc:
            self._chunk_fault(m, exc)
            return
        except UpdateRejected as exc:  # not a chunk of this artifact (index out of range): ignored, counted
            self.counters["chunk_faults"] += 1
            log.warning("release v%d: ignoring %s: %s", m.model_version, topic, exc)
            return
        if asm.complete:
            for t in self._chunk_topics(m):
                self._unsubscribe(t)
            log.info("release v%d: artifact complete (%d chunks)", m.model_version, asm.n_chunks)
            self._begin_staging(m, asm)

    # ----------------------------------------------------------------------------------- chunk faults

    def _chunk_fault(self, m: Manifest, exc: ChunkFault) -> None:
        """A chunk did not match its pin: ask again later, give up after ``chunk_retry_s`` (lock held)."""
        self.counters["chunk_faults"] += 1
        now = self._mono()
        f = self._fault
        if f is None:
            f = self._fault = _Fault(first_s=now, reason=str(exc))
            log.warning("release v%d: %s; asking for the chunks again (for at most %g s)",
                        m.model_version, exc, self.cfg.chunk_retry_s)  # fmt: skip
        f.reason = str(exc)
        if now - f.first_s >= self.cfg.chunk_retry_s:
            self._give_up_download(m, f, now)
        elif f.timer is None:
            delay = min(self.cfg.chunk_retry_delay_s * 2**f.requests, MAX_RETRY_DELAY_S)
            delay = max(0.0, min(delay, f.first_s + self.cfg.chunk_retry_s - now))
            f.timer = threading.Timer(delay, self.poll)
            f.timer.daemon = True
            f.timer.start()

    def poll(self) -> None:
        """Ask for the chunks of a faulty download again, or give up after ``chunk_retry_s`` (timer thread; tests
        call it with a fake monotonic clock). Never raises."""
        try:
            with self._lock:
                f, m = self._fault, self._pending
                if f is None or m is None:
                    return
                f.timer = None
                now = self._mono()
                if now - f.first_s >= self.cfg.chunk_retry_s:
                    self._give_up_download(m, f, now)
                    return
                self._request_chunks(m)
        except Exception:
            log.exception("chunk re-request failed")

    def _request_chunks(self, m: Manifest) -> None:
        """Re-subscribe to the artifact's chunks: the broker sends every retained chunk again (lock held)."""
        self.counters["chunk_requests"] += 1
        if self._fault is not None:
            self._fault.requests += 1
        for t in self._chunk_topics(m):
            self._unsubscribe(t)
            self._subscribe(t)

    def _give_up_download(self, m: Manifest, f: _Fault, now: float) -> None:
        """The chunks stayed faulty for ``chunk_retry_s``: report it, keep the sequence unconsumed (lock held)."""
        reason = (
            f"artifact refused: {f.reason} (chunks asked for {f.requests} more time(s) over {now - f.first_s:.0f} s; "
            "a transport fault does not burn the release: it is tried again when its manifest arrives again)"
        )
        self._abandon_download()
        self._last_seen_sequence = int(self._journal.get("last_sequence", 0))
        self._emit("rejected", manifest=m, reason=reason, transport=True)

    def _abandon_download(self) -> None:
        if self._pending is not None:
            for t in self._chunk_topics(self._pending):
                self._unsubscribe(t)
        if self._fault is not None and self._fault.timer is not None:
            self._fault.timer.cancel()
        self._pending = self._assembler = self._fault = None
        if self._staging is None:
            shutil.rmtree(self.store.incoming, ignore_errors=True)

    # ----------------------------------------------------------------------------------- worker thread

    def _begin_staging(self, m: Manifest, asm: ArtifactAssembler) -> None:
        """Hand a complete artifact to a staging worker (lock held, network thread)."""
        if self._fault is not None and self._fault.timer is not None:
            self._fault.timer.cancel()
        self._pending = self._assembler = self._fault = None  # the artifact in incoming/ now belongs to the worker
        attempts = self._journal.setdefault("attempts", {})
        attempts[m.card_sha256] = int(attempts.get(m.card_sha256, 0)) + 1
        if attempts[m.card_sha256] > self.cfg.max_attempts:
            shutil.rmtree(self.store.incoming, ignore_errors=True)
            self._refuse(m, f"{self.cfg.max_attempts} attempts were interrupted by restarts")
            return
        worker = threading.Thread(target=self._stage, args=(m, asm), name="gapcast-update-staging", daemon=True)
        self._staging = worker
        worker.start()

    def _stage(self, m: Manifest, asm: ArtifactAssembler) -> None:
        """The staging job (worker thread): verify, build the backend, shadow run, golden check. Never raises."""
        try:
            cand = self._build_candidate(m, asm)
        except (UpdateRejected, BundleError, BackendError) as exc:  # BackendError: e.g. no engine at any precision
            self._staging_failed(m, str(exc))
        except Exception as exc:  # a backend that crashes while building or shadow-running
            log.exception("release v%d failed while staging", m.model_version)
            self._staging_failed(m, f"{type(exc).__name__}: {exc}")
        else:
            with self._lock:
                self._candidate = cand
                self._staging = None
                log.info("release v%d staged: switching at the next step boundary", m.model_version)
        finally:
            shutil.rmtree(self.store.incoming, ignore_errors=True)
            with self._lock:
                self._staging = None

    def _staging_failed(self, m: Manifest, reason: str) -> None:
        with self._lock:
            self._staging = None
            self._drop_candidate()
            self._reject(m, reason)
            self._replay_deferred()

    def _build_candidate(self, m: Manifest, asm: ArtifactAssembler) -> _Candidate:
        """Verify the artifact and build and check its backend (worker thread; the lock only around the journal).

        Raises:
            UpdateRejected, BundleError: a verdict about the artifact (the sequence is consumed).
        """
        name, bundle = self.store.install_tar(asm.finish(), self.trusted_keys)
        with self._lock:
            j = self._journal
            j.update(phase="staged", candidate=name, candidate_sha=bundle.card_sha256, candidate_sequence=m.sequence)
            self.store.write_journal(j)
            running = self.active
        if bundle.card_sha256 != m.card_sha256:
            msg = f"the artifact's card {bundle.card_sha256[:12]} is not the one the manifest pins {m.card_sha256[:12]}"
            raise UpdateRejected(msg)
        if bundle.card.model_version != m.model_version:
            msg = f"the artifact holds version {bundle.card.model_version}, the manifest says {m.model_version}"
            raise UpdateRejected(msg)
        assert running is not None
        problems = check_compatible(compat_of(bundle.card), running.card)
        if problems:
            raise UpdateRejected("incompatible with the running model: " + "; ".join(problems))
        self._emit("verified", manifest=m)
        self._emit("staged", manifest=m, slot=name)
        backend = self.backend_factory(bundle)
        try:
            with self._lock:
                live = self._live
            if live is not None:
                values, observed, calendar = (np.asarray(a, dtype=np.float32) for a in live[0])
                v2 = renormalise_inputs(values, observed, live[1], bundle.card)
                imputed, forecast = self.runner(backend, v2, observed, calendar)
                problem = check_outputs(bundle.card, imputed, forecast, range_slack=self.cfg.range_slack)
                if problem:
                    raise UpdateRejected(f"shadow run on {values.shape[0]} live window(s): {problem}")
            self._check_golden(bundle, backend)
        except BaseException:
            _close(backend)
            raise
        return _Candidate(m, name, bundle, backend)

    def _check_golden(self, bundle: Bundle, backend: Backend) -> None:
        """The new backend must reproduce the bundle's golden fp32 outputs within its precision's tolerance
        (:func:`gapcast.edge.trt.compare_golden`; a card may pin ``golden.max_abs`` / ``golden.mean_abs``).

        Raises:
            UpdateRejected: no golden data, or the check failed.
        """
        from gapcast.edge.trt import Tolerance, compare_golden, golden_tolerance

        gold = bundle.golden()
        if gold is None:
            msg = "the bundle has no golden inputs/outputs: its backend cannot be checked before the switch"
            raise UpdateRejected(msg)
        imputed, forecast = self.runner(backend, gold["values"], gold["observed"], gold["calendar"])
        precision = backend.precision
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

    # ----------------------------------------------------------------------------------- step thread

    def observe_live(self, live: Live, card: Card) -> None:
        """Keep the latest live batch for the next shadow run (step thread; a reference, no copy: the agent builds
        new arrays every round).

        Args:
            live: ``(values [B,L,C], observed [B,L,C], calendar [B,L+H,F])`` float32.
            card: the card whose normalisation ``values`` are in.
        """
        with self._lock:
            self._live = (live, card)

    @property
    def update_ready(self) -> bool:
        """A staged release waits for the next step boundary."""
        return self._candidate is not None

    def step_boundary(self, live: Live | None = None) -> Swap | None:
        """Call between two steps, on the agent's step thread: switches a staged release in (quick: the journal
        and a symlink swap; staging itself ran on the worker).

        Args:
            live: the last batch of live windows ``(values [B,L,C], observed [B,L,C], calendar [B,L+H,F])`` in the
                *running* model's normalisation, or None before the first step; kept for the next shadow run.

        Returns:
            A :class:`Swap` when the agent must run a new bundle from the next step on, else None.
        """
        with self._lock:
            if live is not None and self.active is not None:
                self._live = (live, self.active.card)
            cand = self._candidate
            if cand is None or self.phase != "staged" or self.active is None:
                return None
            self._candidate = None
            return self._switch(cand)

    def _switch(self, cand: _Candidate) -> Swap:
        """Journal first, then the atomic symlink swap, then the journal again (lock held)."""
        j = self._journal
        j.update(phase="switching")
        self.store.write_journal(j)
        self.store.point_current(cand.slot)
        j.update(phase="health", current=cand.slot)
        self.store.write_journal(j)
        self._previous = (self.active, self.active_backend)  # type: ignore[assignment]
        self.active, self.active_backend = cand.bundle, cand.backend
        self._health_left = self.cfg.health_steps
        self._emit("active", manifest=cand.manifest, committed=False, health_steps=self.cfg.health_steps)
        return Swap(cand.bundle, cand.backend, "update")

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
            if self._previous is not None:
                _close(self._previous[1])
            self._previous = None
            self._emit("active", version=self.active.card.model_version, committed=True)
            self._replay_deferred()

    def _rollback(self, reason: str) -> Swap:
        assert self._previous is not None and self.active is not None
        bad, bad_backend = self.active, self.active_backend
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
        _close(bad_backend)
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
        """A verdict about the release itself: report it and consume its sequence."""
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
        with self._lock:
            if self.active is not None:
                rep["running_version"] = self.active.card.model_version
                rep["running_card_sha256"] = self.active.card_sha256
                rep["backend"] = backend_info(self.active_backend)
        level = logging.WARNING if stage in ("rejected", "rolled_back") else logging.INFO
        log.log(level, "update %s: %s", stage, {k: v for k, v in rep.items() if k not in ("gateway", "fleet", "ts")})
        with self._lock:
            self.last_report = rep
            self.history = (self.history + [rep])[-20:]
        if self._report_cb is not None:
            try:
                self._report_cb(rep)
            except Exception:
                log.exception("could not hand the update report over")

    def status(self) -> dict[str, Any]:
        """For the gateway's status message: running version and backend, phase, the last update report."""
        with self._lock:
            return {
                "model_version": None if self.active is None else self.active.card.model_version,
                "card_sha256": None if self.active is None else self.active.card_sha256,
                "fleet": self.cfg.fleet,
                "update_phase": "staging" if self._staging is not None else self.phase,
                "backend": backend_info(self.active_backend),
                "counters": dict(self.counters),
                "last_update": self.last_report,
            }


def __getattr__(name: str) -> Any:
    """The names that lived here before the split (issue 12), for existing imports: the protocol is
    :mod:`gapcast.edge.release`, the agent-facing side :mod:`gapcast.edge.guard`, the files
    :mod:`gapcast.edge.slots`."""
    from gapcast.edge import guard, release, slots

    for mod in (release, slots, guard):
        if name in getattr(mod, "__all__", ()):
            return getattr(mod, name)
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)

