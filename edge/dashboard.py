"""The live gateway dashboard: ``gapcast dashboard --broker URL [--listen 127.0.0.1:8080]``.

One process (on the gateway or a laptop) subscribes to the gateway's output topics with paho, keeps a bounded
in-memory buffer per station (at most ``max_steps`` closed steps, the latest forecast), and serves a page that
plots them with uPlot (vendored in ``gapcast/edge/dashboard_static``, see VENDORED.md: no CDN, works offline).

Live updates reach the page by server-sent events (``GET /events``), not MQTT over WebSockets: SSE works with every
broker (no websockets listener to add to Mosquitto's production config), keeps broker credentials out of the
browser, and needs nothing but the HTTP server of the standard library. With ``--sink sqlite:///path.db`` the
history at page load also comes from the sink's SQLite store (``gapcast sink``), so a dashboard started late still
shows the last days.

Endpoints: ``/`` the page; ``/static/NAME`` its files; ``/api/state`` stations (state: online, outage, fallback,
drift) and gateways (status, skill, drift, model update stage); ``/api/station/NAME`` one station's steps,
revisions and latest forecast; ``/events`` the SSE stream (one ``update`` event per message, naming the station).

State of a station: ``drift`` when a gateway's drift notice names it; ``outage`` when its newest step had no
observed channel; ``fallback`` when its newest step or forecast was made without the model; else ``online``.
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import sqlite3
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from gapcast import GapcastError
from gapcast.timefmt import parse_rfc3339

__all__ = ["DashboardError", "DashboardServer", "DashboardState", "parse_listen", "register", "run_dashboard"]

log = logging.getLogger(__name__)

_STATIC = ("index.html", "dashboard.js", "dashboard.css", "uPlot.iife.min.js", "uPlot.min.css")
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}


class DashboardError(GapcastError):
    """A dashboard that cannot start: a bad ``--listen`` or ``--sink``, or a port in use."""


def parse_listen(listen: str) -> tuple[str, int]:
    """``"127.0.0.1:8080"`` -> ``("127.0.0.1", 8080)``; port 0 picks a free port.

    Raises:
        DashboardError: no port, or a port outside 0..65535.
    """
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        msg = f"--listen {listen!r} must be HOST:PORT (e.g. \"127.0.0.1:8080\"), port 0..65535"
        raise DashboardError(msg)
    return host.strip("[]") or "0.0.0.0", int(port)


def _epoch(ts: Any) -> int | None:
    try:
        return int(parse_rfc3339(ts)) if isinstance(ts, str) else None
    except (ValueError, GapcastError):
        return None


class _Station:
    __slots__ = ("forecast", "gateway_hint", "last_method", "n_filled", "n_revisions", "steps")

    def __init__(self) -> None:
        # epoch_s -> {"values": {ch: v}, "imputed": [ch...], "status": "observed" | "filled" | "revised"}
        self.steps: dict[int, dict[str, Any]] = {}
        self.forecast: dict[str, Any] | None = None
        self.n_filled = 0
        self.n_revisions = 0
        self.last_method = ""
        self.gateway_hint = ""


class DashboardState:
    """What the page shows, fed by MQTT messages (:meth:`on_message`), read by the HTTP handlers. Thread-safe.

    Args:
        prefix: topic prefix (``gapcast/v1``).
        max_steps: closed steps kept per station (oldest dropped first, counted in ``dropped_steps``).
        max_stations: stations kept (further ones are counted in ``ignored_stations``, not shown).
        sink_db: the sink's SQLite file to read history from at page load (None: the in-memory buffer only).
    """

    def __init__(self, prefix: str = "gapcast/v1", *, max_steps: int = 24 * 14, max_stations: int = 1000,
                 sink_db: Path | None = None) -> None:
        self.prefix = prefix.rstrip("/")
        self.max_steps = int(max_steps)
        self.max_stations = int(max_stations)
        self.sink_db = sink_db
        self.stations: dict[str, _Station] = {}
        self.gateways: dict[str, dict[str, Any]] = {}  # gateway -> {"status", "skill", "drift", "model"}
        self.units: dict[str, str] = {}
        self.counters: Counter = Counter()
        self._lock = threading.Lock()
        self._subs: list[queue.Queue] = []

    # -- in --------------------------------------------------------------------------------------------------

    def on_message(self, topic: str, payload: bytes) -> str | None:
        """Take one message; returns the station or gateway it changed (None: not for the dashboard)."""
        parts = topic[len(self.prefix) + 1 :].split("/") if topic.startswith(self.prefix + "/") else []
        if len(parts) != 3 or parts[0] not in ("stations", "gateways"):
            return None
        if not payload:  # a retained message cleared
            return None
        try:
            body = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError):
            self.counters["bad_payloads"] += 1
            log.debug("dashboard: %s: not JSON", topic)
            return None
        if not isinstance(body, dict):
            self.counters["bad_payloads"] += 1
            return None
        with self._lock:
            self.counters["messages"] += 1
            if parts[0] == "gateways":
                self.gateways.setdefault(parts[1], {})[parts[2]] = body
                changed = "gateway:" + parts[1]
            else:
                changed = self._station_message(parts[1], parts[2], body)
        if changed is not None:
            self._notify({"what": changed, "kind": parts[2]})
        return changed

    def _station_message(self, name: str, level: str, body: dict) -> str | None:
        st = self.stations.get(name)
        if st is None:
            if len(self.stations) >= self.max_stations:
                self.counters["ignored_stations"] += 1
                return None
            st = self.stations[name] = _Station()
        self.units.update({k: v for k, v in (body.get("units") or {}).items() if isinstance(v, str)})
        if level == "filled":
            ep = body.get("epoch_s") if isinstance(body.get("epoch_s"), int) else _epoch(body.get("ts"))
            if ep is None or not isinstance(body.get("values"), dict):
                self.counters["bad_payloads"] += 1
                return None
            imputed = list(body.get("imputed") or [])
            st.steps[ep] = {"values": body["values"], "imputed": imputed, "status": "filled" if imputed else "observed"}
            st.n_filled += 1
            st.last_method = str(body.get("method", ""))
            self._trim(st)
        elif level == "revisions":
            for step in body.get("steps") or []:
                ep = step.get("epoch_s") if isinstance(step.get("epoch_s"), int) else _epoch(step.get("ts"))
                if ep is None or not isinstance(step.get("values"), dict):
                    continue
                prev = st.steps.get(ep, {})
                st.steps[ep] = {"values": step["values"], "imputed": list(step.get("imputed") or []), "status": "revised",
                                "fill": prev.get("values") if prev.get("status") == "filled" else prev.get("fill")}
            st.n_revisions += 1
            self._trim(st)
        elif level == "forecast":
            st.forecast = body
        else:
            return None
        return name

    def _trim(self, st: _Station) -> None:
        extra = len(st.steps) - self.max_steps
        if extra > 0:
            for ep in sorted(st.steps)[:extra]:
                del st.steps[ep]
            self.counters["dropped_steps"] += extra

    # -- live ------------------------------------------------------------------------------------------------

    def subscribe(self) -> queue.Queue:
        """A queue of change events for one SSE client (bounded: a slow client loses events, counted)."""
        q: queue.Queue = queue.Queue(maxsize=1000)
        with self._lock:
            self._subs.append(q)
        return q

    def unsubscribe(self, q: queue.Queue) -> None:
        with self._lock:
            if q in self._subs:
                self._subs.remove(q)

    def _notify(self, event: dict) -> None:
        with self._lock:
            subs = list(self._subs)
        for q in subs:
            try:
                q.put_nowait(event)
            except queue.Full:
                self.counters["sse_events_dropped"] += 1

    # -- out -------------------------------------------------------------------------------------------------

    def _drifting(self) -> set[str]:
        out: set[str] = set()
        for g in self.gateways.values():
            d = g.get("drift") or {}
            for s in d.get("stations") or []:
                if isinstance(s, dict) and isinstance(s.get("station"), str):
                    out.add(s["station"])
        return out

    def station_state(self, name: str, drifting: set[str] | None = None) -> str:
        """``drift``, ``outage``, ``fallback`` or ``online`` (see the module docstring)."""
        st = self.stations[name]
        if name in (self._drifting() if drifting is None else drifting):
            return "drift"
        if st.steps:
            newest = st.steps[max(st.steps)]
            if newest["status"] != "revised" and len(newest["imputed"]) >= len(newest["values"]) > 0:
                return "outage"
        fc_method = (st.forecast or {}).get("method", "model")
        if st.last_method == "locf" or fc_method != "model":
            return "fallback"
        return "online"

    def snapshot(self) -> dict[str, Any]:
        """``/api/state``: every station with its state and counts, every gateway's retained messages."""
        with self._lock:
            drifting = self._drifting()
            stations = {
                name: {"state": self.station_state(name, drifting), "filled": st.n_filled, "revisions": st.n_revisions,
                       "steps": len(st.steps), "newest": max(st.steps) if st.steps else None}
                for name, st in sorted(self.stations.items())
            }
            return {"prefix": self.prefix, "stations": stations, "gateways": json.loads(json.dumps(self.gateways)),
                    "units": dict(self.units), "counters": dict(self.counters), "history": bool(self.sink_db)}

    def station(self, name: str) -> dict[str, Any] | None:
        """``/api/station/NAME``: steps (time order), the latest forecast, counts; the sink's history merged in."""
        with self._lock:
            st = self.stations.get(name)
            steps = {} if st is None else {ep: dict(v) for ep, v in st.steps.items()}
            forecast = None if st is None else st.forecast
            counts = {} if st is None else {"filled": st.n_filled, "revisions": st.n_revisions}
            state = None if st is None else self.station_state(name)
            skill = None
            for g in self.gateways.values():
                s = ((g.get("skill") or {}).get("stations") or {}).get(name)
                if s is not None:
                    skill = s
        history = self._sink_history(name) if self.sink_db else {}
        for ep, v in history.items():
            steps.setdefault(ep, v)
        if st is None and not history:
            return None
        return {"station": name, "state": state or "online", "counts": counts,
                "steps": [{"epoch_s": ep, **steps[ep]} for ep in sorted(steps)], "forecast": forecast, "skill": skill,
                "units": dict(self.units), "history_steps": len(history)}

    def _sink_history(self, name: str) -> dict[int, dict[str, Any]]:
        """The newest ``max_steps`` steps of ``name`` from the sink's ``series`` table (empty when unreadable)."""
        try:
            db = sqlite3.connect(f"file:{self.sink_db}?mode=ro", uri=True, timeout=2.0)
        except sqlite3.Error as exc:
            log.warning("dashboard: sink store %s not readable: %s", self.sink_db, exc)
            return {}
        try:
            rows = db.execute(
                "SELECT ts, channel, value, status FROM series WHERE station = ? AND ts >= "
                "(SELECT COALESCE(MAX(ts), 0) FROM series WHERE station = ?) - ? ORDER BY ts",
                (name, name, 3600 * self.max_steps),
            ).fetchall()
        except sqlite3.Error as exc:
            log.warning("dashboard: sink store %s: %s", self.sink_db, exc)
            return {}
        finally:
            db.close()
        out: dict[int, dict[str, Any]] = {}
        for ts, ch, value, status in rows:
            step = out.setdefault(int(ts), {"values": {}, "imputed": [], "status": "observed"})
            step["values"][ch] = value
            if status != "observed":
                step["imputed"].append(ch)
                step["status"] = "revised" if status == "revised" else "filled"
        return out


class _Handler(BaseHTTPRequestHandler):
    state: DashboardState
    server_version = "gapcast-dashboard"

    def log_message(self, fmt: str, *args: Any) -> None:  # through logging, not stderr
        log.debug("dashboard http: " + fmt, *args)

    def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        path = unquote(urlparse(self.path).path)
        if path in ("/", "/index.html"):
            return self._static("index.html")
        if path.startswith("/static/"):
            return self._static(path[len("/static/") :])
        if path == "/api/state":
            return self._send(200, json.dumps(self.state.snapshot()).encode())
        if path.startswith("/api/station/"):
            data = self.state.station(path[len("/api/station/") :])
            if data is None:
                return self._send(404, b'{"error": "no such station"}')
            return self._send(200, json.dumps(data).encode())
        if path == "/events":
            return self._events()
        return self._send(404, b'{"error": "not found"}')

    def _static(self, name: str) -> None:
        if name not in _STATIC:
            return self._send(404, b'{"error": "not found"}')
        data = resources.files("gapcast.edge").joinpath("dashboard_static", name).read_bytes()
        return self._send(200, data, _TYPES.get(Path(name).suffix, "application/octet-stream"))

    def _events(self) -> None:
        q = self.state.subscribe()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(b"retry: 2000\n\n")
            self.wfile.flush()
            while not getattr(self.server, "closing", False):
                try:
                    ev = q.get(timeout=1.0)
                except queue.Empty:
                    self.wfile.write(b": keep-alive\n\n")  # also notices a closed page
                    self.wfile.flush()
                    continue
                self.wfile.write(b"event: update\ndata: " + json.dumps(ev).encode() + b"\n\n")
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            self.state.unsubscribe(q)


class DashboardServer:
    """The HTTP server of a :class:`DashboardState` in a thread.

    Args:
        state: what to serve.
        listen: ``HOST:PORT`` (port 0: a free one; :attr:`port` says which).

    Raises:
        DashboardError: a bad ``listen`` or an address that cannot be bound.
    """

    def __init__(self, state: DashboardState, listen: str = "127.0.0.1:8080") -> None:
        host, port = parse_listen(listen)
        handler = type("Handler", (_Handler,), {"state": state})
        try:
            self.httpd = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            msg = f"dashboard cannot listen on {listen}: {exc}"
            raise DashboardError(msg) from exc
        self.httpd.daemon_threads = True
        self.state = state
        self.host, self.port = host, self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="gapcast-dashboard", daemon=True)

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> DashboardServer:
        self._thread.start()
        log.info("dashboard on %s", self.url)
        return self

    def stop(self) -> None:
        self.httpd.closing = True
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)


def mqtt_feed(state: DashboardState, broker: Any, *, client_id: str | None = None, ca_file: str | None = None):
    """A started paho client that feeds ``state`` with every gateway output (stop it with ``loop_stop``).

    Raises:
        DashboardError: a bad broker URL.
    """
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from gapcast.brokerurl import parse_broker_url

    try:
        url = parse_broker_url(broker)
    except ValueError as exc:
        raise DashboardError(str(exc)) from exc
    p = state.prefix
    filters = [f"{p}/stations/+/filled", f"{p}/stations/+/revisions", f"{p}/stations/+/forecast",
               f"{p}/gateways/+/status", f"{p}/gateways/+/skill", f"{p}/gateways/+/drift", f"{p}/gateways/+/model"]
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"gapcast-dashboard-{int(time.time() * 1000) % 10**9}")
    if url.username:
        c.username_pw_set(url.username, url.password)
    if url.tls:
        c.tls_set(ca_certs=ca_file)

    def on_connect(client, userdata, flags, reason_code, properties):
        if not reason_code.is_failure:
            client.subscribe([(f, 1) for f in filters])
            log.info("dashboard subscribed to %s on %s:%d", p, url.host, url.port)
        else:
            log.error("dashboard: broker refused the connection: %s", reason_code)

    c.on_connect = on_connect
    c.on_message = lambda client, userdata, msg: state.on_message(msg.topic, msg.payload)
    c.reconnect_delay_set(1, 30)
    c.connect_async(url.host, url.port, keepalive=30)
    c.loop_start()
    return c


def start_in_agent(cfg: Any):
    """``[dashboard] listen = "HOST:PORT"`` in edge.toml: the dashboard inside the agent process, fed by its own
    subscription to the gateway's broker (same host, port, TLS and credentials). Returns a ``stop()`` callable.

    Raises:
        DashboardError: a bad listen address or a port in use.
    """
    from gapcast.brokerurl import BrokerURL

    b = cfg.broker
    state = DashboardState(cfg.topic_prefix)
    server = DashboardServer(state, cfg.skill.dashboard_listen).start()
    url = BrokerURL(host=b.host, port=b.port, tls=b.tls.enabled, username=b.username, password=b.password)
    client = mqtt_feed(state, url, client_id=f"{cfg.client_id}-dashboard",
                       ca_file=str(b.tls.ca_file) if b.tls.ca_file else None)

    def stop() -> None:
        client.loop_stop()
        client.disconnect()
        server.stop()

    return server, stop


def _sink_path(spec: str | None) -> Path | None:
    if not spec:
        return None
    if not spec.startswith("sqlite:///"):
        msg = f"--sink {spec!r}: give the sink's SQLite store as sqlite:///path.db"
        raise DashboardError(msg)
    path = Path(spec[len("sqlite:///") :])
    if not path.is_file():
        msg = f"--sink {spec!r}: no such file {path} (run gapcast sink --to {spec} first)"
        raise DashboardError(msg)
    return path


def run_dashboard(args: argparse.Namespace, stop: threading.Event | None = None) -> int:
    """``gapcast dashboard``: serve until Ctrl-C (or ``stop``)."""
    state = DashboardState(args.prefix, max_steps=args.max_steps, sink_db=_sink_path(args.sink))
    server = DashboardServer(state, args.listen).start()
    client = mqtt_feed(state, args.broker)
    print(f"dashboard: {server.url}  (broker {args.broker}, prefix {args.prefix}; Ctrl-C to stop)", flush=True)
    stop = stop or threading.Event()
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        client.loop_stop()
        client.disconnect()
        server.stop()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``gapcast dashboard`` to the top-level sub-commands."""
    p = sub.add_parser(
        "dashboard",
        help="a live web page of a gateway: stations, fills, revisions, forecasts, skill and drift",
        description=(
            "Subscribes to the gateway's outputs and serves a page (uPlot, vendored: works offline) with the station "
            "list and state (online, outage, fallback, drift), each channel's last days (observed points, real-time "
            "fills, revisions replacing them, the latest forecast, gaps shaded), the skill table and the gateway panel. "
            "Live updates by server-sent events; history at page load from --sink's SQLite store, else from the "
            "bounded in-memory buffer."
        ),
        epilog=(
            "examples:\n"
            "  gapcast dashboard --broker mqtt://localhost:1883\n"
            "  gapcast dashboard --broker mqtts://viewer:secret@broker.lan:8883 --listen 0.0.0.0:8080\n"
            "  gapcast dashboard --broker mqtt://localhost --sink sqlite:///var/lib/gapcast/sink.db"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--broker", required=True, help="broker URL: mqtt://host:port, mqtts://user:pass@host:8883")
    p.add_argument("--listen", default="127.0.0.1:8080", help="HOST:PORT of the page (default 127.0.0.1:8080)")
    p.add_argument("--prefix", default="gapcast/v1", help="topic prefix (default gapcast/v1)")
    p.add_argument("--sink", help="sqlite:///path.db: the sink's store, for the history at page load")
    p.add_argument("--max-steps", type=int, default=24 * 14, help="closed steps kept per station (default 336)")
    p.set_defaults(func=run_dashboard)
