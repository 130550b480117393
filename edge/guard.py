"""The agent-facing side of fleet updates: the guarded backend the agent runs, the MQTT glue, the config wiring.

- :class:`GuardedBackend` is a :class:`~gapcast.edge.backends.Backend`: the agent runs one object while the
  :class:`~gapcast.edge.updater.Updater` swaps the model behind it at a step boundary and checks each output during
  the health window;
- :class:`UpdateLink` hands fleet messages from the agent's paho client to the updater and publishes its reports,
  retained, on ``{prefix}/gateways/{gateway}/model``;
- :func:`start_from_config` builds both from the ``[update]`` table: staging builds the backend with
  :func:`gapcast.edge.backends.select_backend` and ``build_engine=True``, so on a Jetson an update compiles, golden-
  checks and caches its TensorRT engine (int8 -> fp16 -> fp32, each fallback logged) on the staging worker, and a
  build that fails at every precision rejects the update instead of moving it to the CPU (issue 14).
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from gapcast.edge import BundleError
from gapcast.edge.backends import Backend
from gapcast.edge.bundle import Bundle, Card
from gapcast.edge.release import FleetTopics, renormalise_inputs, renormalise_outputs
from gapcast.edge.updater import BackendFactory, Runner, Swap, Updater, UpdaterConfig, default_runner

__all__ = ["GuardedBackend", "UpdateLink", "build_update_link", "make_backend_factories", "start_from_config"]

log = logging.getLogger(__name__)


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
    start_backend_factory: BackendFactory | None = None,
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
        start_backend_factory=start_backend_factory,
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

    factory, start_factory = make_backend_factories(cfg)
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
        ucfg, trusted_keys=list(cfg.model.trusted_keys), backend_factory=factory, seed=cfg.model.bundle,
        start_backend_factory=start_factory,
    )  # fmt: skip
    inner = guard.updater.active_backend
    note = (
        f"{guard.name} (preferred: {cfg.model.backend}), fleet updates on {ucfg.topics.manifest}"
        if inner is not None
        else f"interpolation fallback (no backend could run the bundle), fleet updates on {ucfg.topics.manifest}"
    )
    return link, guard, note


# --------------------------------------------------------------------------------------------- the guard


def make_backend_factories(
    cfg: Any, *, engine_cache_dir: str | Path | None = None
) -> tuple[BackendFactory, BackendFactory]:
    """The two backend factories of a gateway with fleet updates, from the edge config.

    Both follow ``model.backend`` (``auto``: TensorRT first, then onnxruntime) and build a TensorRT engine when none
    is cached, with ``gapcast edge build-engine``'s policy (int8 first, then fp16, fp32; every fallback logged;
    only an engine that passed the golden check is cached and used). Where TensorRT is absent (no bindings, CUDA
    runtime or GPU) onnxruntime runs, as without updates.

    - staging (worker thread): a TensorRT build that fails at every precision raises
      :class:`~gapcast.edge.backends.EngineBuildFailed` and so rejects the update with the reason;
    - start-up: the same failure is logged as an ERROR and the bundle runs on onnxruntime (there is nothing to
      reject; the status names the backend and ``selection`` says why TensorRT was passed over).

    Args:
        cfg: the :class:`gapcast.edge.config.EdgeConfig`.
        engine_cache_dir: TensorRT engine cache (default :func:`gapcast.edge.trt.default_cache_dir`).

    Returns:
        ``(staging factory, start-up factory)``.
    """
    from gapcast.edge.backends import EngineBuildFailed, select_backend

    prefer = None if cfg.model.backend == "auto" else cfg.model.backend  # select_backend: None = TensorRT first
    threads = cfg.model.threads or None
    m = cfg.model  # the variant is chosen again for each new bundle (timed on this gateway, off the step thread)
    variant_kw = {
        "variant": m.variant, "variant_batch": min(max(len(cfg.stations.names), 1), m.max_batch),
        "variant_budget_s": m.variant_budget_s,
    }

    def interpolation(bundle: Bundle) -> Backend:
        """A day-one bundle (``gapcast export --interpolation-only``) holds no model: the agent interpolates."""
        from gapcast.edge.agent import InterpolationBackend

        card = bundle.card
        day = 86_400
        season = day // card.cadence_s if day % card.cadence_s == 0 and day // card.cadence_s <= card.lookback else 0
        return InterpolationBackend(card.horizon, season)

    def staging(bundle: Bundle) -> Backend:
        if bundle.card.interpolation_only:
            return interpolation(bundle)
        return select_backend(
            bundle, prefer=prefer, threads=threads, engine_cache_dir=engine_cache_dir, build_engine=True,
            **variant_kw,
        )

    def start(bundle: Bundle) -> Backend:
        if bundle.card.interpolation_only:
            return interpolation(bundle)
        try:
            return staging(bundle)
        except EngineBuildFailed as exc:
            log.error("%s; running bundle v%d on onnxruntime instead", exc, bundle.card.model_version)
            backend = select_backend(bundle, prefer="onnxruntime", threads=threads, **variant_kw)
            backend.selection.insert(0, ("tensorrt", str(exc)))
            return backend

    return staging, start


# --------------------------------------------------------------------------------------------- the guard


class GuardedBackend(Backend):
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
    def model_version(self) -> int:  # type: ignore[override]
        """Version of the model that serves the next (or the last) inference."""
        return self.bundle.card.model_version

    @property
    def name(self) -> str:  # type: ignore[override]
        inner = self.updater.active_backend
        return "none" if inner is None else inner.name

    @property
    def precision(self) -> str:  # type: ignore[override]
        inner = self.updater.active_backend
        return "fp32" if inner is None else inner.precision

    def describe(self) -> str:
        inner = self.updater.active_backend
        what = "no backend" if inner is None else inner.describe()
        return f"{what}; model v{self.model_version} under fleet updates ({self.updater.topics.manifest})"

    def info(self) -> dict[str, Any]:
        """The running backend's :meth:`~gapcast.edge.backends.Backend.info`."""
        from gapcast.edge.updater import backend_info

        return backend_info(self.updater.active_backend)

    def step_boundary(self) -> Swap | None:
        """Call between two steps (agent thread): counts the health window, then lets a ready update switch in."""
        if self._stepped:
            self.updater.step_done()
            self._stepped = False
        return self.updater.step_boundary()  # the live batch for shadow runs was handed over by run()

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
        self.updater.observe_live(self._last_inputs, self.reference)  # for the staging worker's shadow run
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
