"""A Prometheus endpoint on the gateway (``[metrics] listen = "127.0.0.1:9108"``, off by default).

What a scrape of ``http://LISTEN/metrics`` returns (all names start with ``gapcast_``):

=====================================  =========  ==========================================================
metric                                 type       labels / meaning
=====================================  =========  ==========================================================
``readings_total``                     counter    ``kind``: ``new``, ``late``, ``duplicate``... (accepted)
``rejected_total``                     counter    ``kind``: the dead-letter reason (``parse``, ``future``...)
``missing_values_total``               counter    ``kind``: why a value was missing (``null``, ``sentinel``...)
``outputs_total``                      counter    ``kind``: ``filled``, ``forecast``, ``revision``
``station_outputs_total``              counter    ``station``, ``kind``: per station (registered stations only,
                                                  so bounded by ``stations.max_stations``)
``agent_events_total``                 counter    ``kind``: every other status counter of the core
                                                  (``imputed_values``, ``fallback_steps``, ``backend_errors``...)
``shell_events_total``                 counter    ``kind``: the MQTT shell's counters (``connects``,
                                                  ``published``, ``publish_refused``...)
``outbox_dropped_total``               counter    ``kind``, ``reason`` (``cap`` or ``age``)
``connected``                          gauge      1 while connected to the broker
``stations``                           gauge      station windows held
``no_forecast_stations``               gauge      stations whose window is too empty for a forecast
``outbox_depth_messages``              gauge      messages waiting for a PUBACK (in flight included)
``outbox_bytes``                       gauge      their size, bytes
``outbox_oldest_age_seconds``          gauge      age of the oldest waiting message, seconds
``uptime_seconds``                     gauge      since the agent started, seconds
``inference_seconds``                  histogram  ``backend``: one backend call (one batch), seconds
``inference_batch_size``               histogram  ``backend``: windows per backend call
``model``                              info       ``gateway``, ``fleet``, ``name``, ``version``, ``backend``
``skill_mae``                          gauge      ``bucket``, ``method``: rolling forecast MAE, normalised units
``drift_stations``                     gauge      stations in drift (worse than the better naive method)
``shadow_fill_mae``                    gauge      ``method`` (``model``, ``locf``): shadow-hidden fills vs
                                                  the readings, normalised units
``revision_fill_mae``                  gauge      ``channel``: real-time fills vs the revision after an
                                                  outage, the channel's units
=====================================  =========  ==========================================================

Counters come from the same figures as the retained status message: the step loop hands a copy to
:meth:`Metrics.update` (about once per ``agent.tick_interval_s``) and the scrape, on prometheus_client's HTTP thread,
reads only that copy, never the live core. ``prometheus_client`` is optional (the ``edge`` extra installs it): without
it the agent runs, logs a warning, and its status says ``metrics.error``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

__all__ = ["BATCH_BUCKETS", "LATENCY_BUCKETS", "Metrics", "TimedBackend", "parse_listen"]

log = logging.getLogger(__name__)

#: Inference latency buckets, seconds: 1 ms (a tiny CPU batch) to 10 s (a cold TensorRT engine).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Batch size buckets, windows: powers of two up to 4096 (``model.max_batch`` is 64 by default).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)

#: Output kinds counted per station.
STATION_KINDS = ("filled", "forecast", "revision")


def parse_listen(listen: str) -> tuple[str, int]:
    """``"127.0.0.1:9108"`` -> ``("127.0.0.1", 9108)``; ``":9108"`` listens on every address; ``[::1]:9108`` too.

    Raises:
        ValueError: no port, or a port outside 1..65535 (the message quotes the value).
    """
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        msg = f"{listen!r} must be HOST:PORT (e.g. \"127.0.0.1:9108\"), port 1..65535"
        raise ValueError(msg)
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


class TimedBackend:
    """Wraps an inference backend and records each call's latency and batch size; everything else is forwarded.

    Args:
        backend: the real backend (``run(values, observed, calendar)``, see ``gapcast.edge.agent.Backend``).
        observe: called as ``observe(backend_name, rows, seconds)`` after each call (also after one that raised).
        clock: monotonic clock, seconds.
    """

    def __init__(self, backend: Any, observe: Callable[[str, int, float], None], clock: Callable[[], float] = time.perf_counter) -> None:
        self._backend = backend
        self._observe = observe
        self._clock = clock

    def run(self, values, observed, calendar):
        """See ``gapcast.edge.agent.Backend.run``: values, observed [B, L, C] float32; calendar [B, L+H, F]."""
        t0 = self._clock()
        try:
            return self._backend.run(values, observed, calendar)
        finally:
            self._observe(str(getattr(self._backend, "name", "?")), int(values.shape[0]), self._clock() - t0)

    def __getattr__(self, name: str) -> Any:  # name, step_boundary, model_version, updater... of the real backend
        return getattr(self._backend, name)


class Metrics:
    """The gateway's Prometheus exporter.

    Args:
        listen: ``HOST:PORT`` to serve ``/metrics`` on.
        gateway, fleet: the info labels.
        station_labels: export :data:`station_outputs_total` per station.

    Attributes:
        error: why the endpoint is not served (prometheus_client missing, the port taken), or None.
        url: ``http://HOST:PORT/metrics`` once started.
    """

    def __init__(self, listen: str, *, gateway: str, fleet: str, station_labels: bool = True) -> None:
        self.host, self.port = parse_listen(listen)
        self.listen = listen
        self.gateway = gateway
        self.fleet = fleet
        self.station_labels = station_labels
        self.error: str | None = None
        self.url: str | None = None
        self._lock = threading.Lock()
        self._snap: dict[str, Any] = {}
        self._stations: Counter = Counter()  # (station, kind) -> outputs; step thread only, copied into _snap
        self._server = None
        self._thread = None
        self.registry = None
        self._latency = None
        self._batch = None

    # -- set-up (main thread) -------------------------------------------------------------------------------

    def start(self) -> bool:
        """Serve ``/metrics``. Never raises: a missing ``prometheus_client`` or a taken port is logged and kept in
        :attr:`error` (the agent's status reports it), and the agent runs without metrics.

        Returns:
            Whether the endpoint is up.
        """
        try:
            import prometheus_client
            from prometheus_client import CollectorRegistry, Histogram
        except ImportError:
            self.error = "prometheus_client is not installed (pip install 'gapcast[edge]'); metrics are off"
            log.warning("metrics.listen = %r: %s", self.listen, self.error)
            return False
        self.registry = CollectorRegistry()
        self._latency = Histogram(
            "gapcast_inference_seconds", "One backend call (one batch of windows), seconds.", ["backend"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self._batch = Histogram(
            "gapcast_inference_batch_size", "Windows per backend call.", ["backend"],
            buckets=BATCH_BUCKETS, registry=self.registry,
        )
        self.registry.register(_SnapshotCollector(self))
        try:
            self._server, self._thread = prometheus_client.start_http_server(self.port, addr=self.host, registry=self.registry)
        except OSError as exc:
            self.error = f"cannot listen on {self.listen}: {exc}; metrics are off"
            log.error("metrics: %s", self.error)
            return False
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{host}:{self.port}/metrics"
        log.info("metrics served on %s", self.url)
        return True

    def close(self) -> None:
        """Stop the HTTP server."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def status(self) -> dict[str, Any]:
        """The ``metrics`` entry of the status message: ``listen`` and ``url``, or ``error``."""
        out: dict[str, Any] = {"listen": self.listen}
        if self.error:
            out["error"] = self.error
        elif self.url:
            out["url"] = self.url
        return out

    # -- feeding (step thread) ------------------------------------------------------------------------------

    def observe_inference(self, backend: str, rows: int, seconds: float) -> None:
        """One backend call: ``rows`` windows in ``seconds``."""
        if self._latency is not None:
            self._latency.labels(backend).observe(seconds)
            self._batch.labels(backend).observe(rows)

    def wrap_backend(self, core: Any) -> None:
        """Time the core's backend calls (:class:`TimedBackend`); the fallback keeps its identity as the fallback."""
        if self._latency is None or isinstance(core.backend, TimedBackend):
            return
        timed = TimedBackend(core.backend, self.observe_inference)
        if core.backend is core.fallback:
            core.fallback = timed
        core.backend = timed

    def count_outputs(self, messages: list) -> None:
        """Count filled / forecast / revision messages per station (from ``{prefix}/stations/{station}/{kind}``)."""
        if not self.station_labels:
            return
        for m in messages:
            if m.kind in STATION_KINDS:
                parts = m.topic.rsplit("/", 3)
                if len(parts) == 4 and parts[1] == "stations":
                    self._stations[(parts[2], m.kind)] += 1

    def update(self, snapshot: dict[str, Any]) -> None:
        """Replace the figures a scrape returns.

        Args:
            snapshot: the status body (``gapcast.edge.agent.AgentCore.status_body`` plus the shell's ``connected``,
                ``uptime_s``, ``shell`` and ``outbox`` entries); copied, so the caller may keep changing its own.
        """
        snap = dict(snapshot)
        snap["_stations"] = dict(self._stations)
        with self._lock:
            self._snap = snap

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return self._snap


class _SnapshotCollector:
    """Turns the latest snapshot into metric families at scrape time (prometheus_client's HTTP thread)."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def describe(self):  # no fixed description: the kinds come with the data
        return []

    def collect(self):
        """The metric families of the latest snapshot (none before the first): counters, gauges, the model info and
        the online skill. Called by prometheus_client on its HTTP thread; raises nothing of its own."""
        s = self.m.snapshot()
        if not s:
            return
        yield from self._counters(s)
        yield from self._gauges(s)
        yield self._model_info(s)
        yield from self._skill(s)

    def _counters(self, s: dict[str, Any]):
        """The counter families: readings, rejections, missing values and outputs by kind, the core's and the shell's
        other counters, per-station outputs (when ``station_labels``) and the outbox's drops by kind and reason."""
        from prometheus_client.core import CounterMetricFamily

        counters = dict(s.get("counters", {}))

        def by_kind(name: str, doc: str, items: dict[str, Any]) -> CounterMetricFamily:
            fam = CounterMetricFamily(name, doc, labels=["kind"])
            for k, v in sorted(items.items()):
                if isinstance(v, int | float):
                    fam.add_metric([str(k)], float(v))
            return fam

        readings = {k[len("readings_"):]: counters.pop(k) for k in list(counters) if k.startswith("readings_")}
        counters.pop("readings", None)  # the sum of readings_total over its kinds
        outputs = {k: counters.pop(k, 0) for k in ("filled", "forecasts", "revisions")}
        yield by_kind("gapcast_readings", "Readings accepted into a window, by kind.", readings)
        yield by_kind("gapcast_rejected", "Inputs rejected (dead-lettered), by reason.", s.get("rejected", {}))
        yield by_kind("gapcast_missing_values", "Values that were missing in accepted readings, by why.", s.get("missing", {}))
        yield by_kind(
            "gapcast_outputs", "Output messages made, by kind.",
            {"filled": outputs["filled"], "forecast": outputs["forecasts"], "revision": outputs["revisions"]},
        )
        yield by_kind("gapcast_agent_events", "The agent core's other status counters, by kind.", counters)
        yield by_kind("gapcast_shell_events", "The MQTT shell's counters, by kind.", s.get("shell", {}))
        if self.m.station_labels:
            fam = CounterMetricFamily(
                "gapcast_station_outputs", "Output messages per station and kind.", labels=["station", "kind"]
            )
            for (station, kind), v in sorted(s.get("_stations", {}).items()):
                fam.add_metric([station, kind], float(v))
            yield fam
        outbox = s.get("outbox", {})
        fam = CounterMetricFamily("gapcast_outbox_dropped", "Messages the outbox dropped, by kind and reason.", labels=["kind", "reason"])
        for reason, key in (("cap", "dropped"), ("age", "expired")):
            for k, v in sorted((outbox.get(key) or {}).items()):
                fam.add_metric([str(k), reason], float(v))
        yield fam

    def _gauges(self, s: dict[str, Any]):
        """The gauges: connection, stations, outbox depth/bytes/oldest age and uptime (a value that is not a number
        is left out)."""
        from prometheus_client.core import GaugeMetricFamily

        outbox = s.get("outbox", {})

        def gauge(name: str, doc: str, value: Any) -> GaugeMetricFamily | None:
            return GaugeMetricFamily(name, doc, value=float(value)) if isinstance(value, int | float) else None

        for g in (
            gauge("gapcast_connected", "1 while connected to the broker.", int(bool(s.get("connected")))),
            gauge("gapcast_stations", "Station windows held.", s.get("stations")),
            gauge("gapcast_no_forecast_stations", "Stations whose window is too empty to forecast.", s.get("no_forecast_stations")),
            gauge("gapcast_outbox_depth_messages", "Messages waiting for the broker's PUBACK.", outbox.get("depth")),
            gauge("gapcast_outbox_bytes", "Bytes of the messages waiting in the outbox.", outbox.get("bytes")),
            gauge("gapcast_outbox_oldest_age_seconds", "Age of the oldest waiting message, seconds.", outbox.get("oldest_age_s", 0)),
            gauge("gapcast_uptime_seconds", "Seconds since the agent started.", s.get("uptime_s")),
        ):
            if g is not None:
                yield g

    def _model_info(self, s: dict[str, Any]):
        """``gapcast_model``: the gateway, fleet, model name and version and the serving backend."""
        from prometheus_client.core import InfoMetricFamily

        model = s.get("model", {})
        info = InfoMetricFamily("gapcast_model", "The model and backend that serve.")
        info.add_metric(
            [],
            {
                "gateway": self.m.gateway,
                "fleet": self.m.fleet,
                "name": str(model.get("name", "")),
                "version": str(model.get("version", "")),
                "backend": str(s.get("backend", "")),
            },
        )
        return info

    def _skill(self, s: dict[str, Any]):
        """The online skill gauges (``gapcast.edge.skill``): MAE by horizon bucket and method, stations in drift, the
        shadow fill MAE and the revision fill MAE; nothing while no bucket has figures."""
        from prometheus_client.core import GaugeMetricFamily

        skill = s.get("skill") if isinstance(s.get("skill"), dict) else {}
        if skill.get("buckets"):  # online forecast skill (gapcast.edge.skill), the gateway's rolling figures
            fam = GaugeMetricFamily("gapcast_skill_mae", "Rolling forecast MAE (normalised units) by horizon bucket and "
                                    "method (model, persistence, seasonal_naive).", labels=["bucket", "method"])
            for label, b in sorted(skill["buckets"].items()):
                for method, v in sorted(b.items()):
                    if method != "n" and isinstance(v, int | float):
                        fam.add_metric([label, method], float(v))
            yield fam
            yield GaugeMetricFamily("gapcast_drift_stations", "Stations whose model is worse than the better naive "
                                    "method for longer than skill.drift_after.", value=float(len(skill.get("drift") or [])))
            fill = skill.get("fill") if isinstance(skill.get("fill"), dict) else {}
            fam = GaugeMetricFamily("gapcast_shadow_fill_mae", "Rolling MAE (normalised units) of real-time fills of "
                                    "shadow-hidden values against the readings, model and LOCF.", labels=["method"])
            for method in ("model", "locf"):
                if isinstance(fill.get(method), int | float):
                    fam.add_metric([method], float(fill[method]))
            yield fam
            rev = skill.get("revision") if isinstance(skill.get("revision"), dict) else {}
            fam = GaugeMetricFamily("gapcast_revision_fill_mae", "Rolling MAE (the channel's units) of real-time fills "
                                    "against the revision published when the outage ended.", labels=["channel"])
            for channel, c in sorted((rev.get("channels") or {}).items()):
                if isinstance(c, dict) and isinstance(c.get("mae"), int | float):
                    fam.add_metric([channel], float(c["mae"]))
            yield fam
