"""``gapcast edge``: run the gateway agent, check its configuration, build a TensorRT engine.

Nothing heavy is imported at module level (the gateway has no torch or pandas; onnxruntime and paho are imported
inside the handlers).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from pathlib import Path

__all__ = ["load_runtime", "preferred_backend_warning", "register"]

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``edge run | check | build-engine`` to the ``gapcast`` parser."""
    edge = sub.add_parser("edge", help="the gateway agent: run, check, build-engine")
    esub = edge.add_subparsers(dest="edge_command", metavar="EDGE_COMMAND")

    run = esub.add_parser("run", help="run the MQTT agent (gap filling and forecasts in real time)")
    run.add_argument("--config", required=True, type=Path, help="edge.toml (see deploy/edge.example.toml)")
    run.set_defaults(func=_run, log_info=True)

    check = esub.add_parser(
        "check",
        help="validate the config and the bundle; print what the agent would do",
        description="Validate edge.toml and the signed bundle; with --connect also try the broker: TCP, TLS, "
        "CONNECT with the configured credentials, SUBSCRIBE to the readings filter, PUBLISH a (non-retained) status.",
        epilog="examples:\n  gapcast edge check --config /etc/gapcast/edge.toml\n"
        "  gapcast edge check --config /etc/gapcast/edge.toml --connect   # exit 1 and the reason when the broker says no",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("--config", required=True, type=Path, help="edge.toml")
    check.add_argument(
        "--connect", action="store_true",
        help="also connect to the broker; each failure is named: dns, refused, unreachable, tls, auth, protocol, acl",
    )
    check.add_argument("--timeout", type=float, default=10.0, help="--connect: seconds to wait per step (default 10)")
    check.set_defaults(func=_check)

    be = esub.add_parser("build-engine", help="compile a bundle to a TensorRT engine on this device")
    be.add_argument("bundle", type=Path, help="bundle directory or .tar")
    be.add_argument("--precision", choices=("fp16", "int8", "fp32"), default="fp16", help="engine precision")
    be.add_argument("--max-batch", type=int, default=None, help="largest batch the engine accepts (default 64)")
    be.add_argument(
        "--trusted-key",
        dest="trusted_keys",
        action="append",
        default=None,
        help="Ed25519 public key (PEM path or hex) the bundle signature must verify under; repeatable "
        "(without one only the file hashes are checked, with a warning)",
    )
    be.add_argument("--cache-dir", type=Path, default=None, help="engine cache folder")
    be.add_argument("--workspace-mb", type=int, default=None, help="TensorRT builder workspace, MiB (default 1024)")
    be.add_argument("--rebuild", action="store_true", help="build even if a cached engine matches")
    be.set_defaults(func=_build_engine, log_info=True)  # trt.build_engine_main logs what it built

    edge.set_defaults(func=lambda args: (edge.print_help(), 2)[1])


def load_runtime(cfg):
    """Verify the bundle and pick the backend the config prefers.

    Args:
        cfg: :class:`~gapcast.edge.config.EdgeConfig`.

    Returns:
        ``(bundle, backend, note)``: the verified bundle, the backend (None = interpolation fallback) and a
        sentence saying which backend runs and why.

    Raises:
        ConfigError: ``model.bundle`` is not set or does not exist.
        BundleError: the bundle fails verification (signature, hashes, card).
    """
    from gapcast.edge import BackendError, ConfigError
    from gapcast.edge.bundle import verify_bundle

    m = cfg.model
    if m.bundle is None:
        raise ConfigError("model.bundle: required (the signed model bundle: a directory or .tar)")
    if not m.bundle.exists():
        raise ConfigError(
            f"model.bundle: {m.bundle} does not exist (export one with `gapcast export`, or fix the path"
            + (f" in {cfg.source}" if cfg.source else "")
            + ")"
        )
    bundle = verify_bundle(m.bundle, list(m.trusted_keys), unpack_dir=cfg.agent.state_dir / "bundles")
    if m.backend == "interpolation":
        return bundle, None, "interpolation (model.backend = \"interpolation\")"
    if bundle.card.interpolation_only:
        return bundle, None, "interpolation (the bundle holds no model: gapcast export --interpolation-only)"
    try:
        from gapcast.edge.backends import select_backend

        prefer = None if m.backend == "auto" else m.backend  # None: TensorRT first, then onnxruntime
        backend = select_backend(
            bundle, prefer=prefer, threads=m.threads or None, variant=m.variant,
            variant_batch=min(max(len(cfg.stations.names), 1), m.max_batch), variant_budget_s=m.variant_budget_s,
        )  # fmt: skip
    except (ImportError, BackendError) as exc:
        note = f"interpolation fallback: no model backend could run ({exc})"
        log.error("%s", note)
        return bundle, None, note
    note = f"{backend.name} (preferred: {m.backend})"
    warning = preferred_backend_warning(m.backend, backend)
    if warning:
        log.warning("%s", warning)
    return bundle, backend, note


def preferred_backend_warning(preferred: str, backend) -> str | None:
    """A sentence saying why the preferred backend is not the one that runs, or None when it is (or for ``auto``).

    Args:
        preferred: ``model.backend`` (``auto``, ``tensorrt``, ``onnxruntime``, ``interpolation``).
        backend: the backend :func:`gapcast.edge.backends.select_backend` chose; its ``selection`` lists the
            backends passed over and why.
    """
    if preferred in ("auto", "interpolation") or backend is None or backend.name == preferred:
        return None
    why = "; ".join(r for n, r in (getattr(backend, "selection", None) or []) if n == preferred) or "not available"
    return f"preferred backend {preferred} is unavailable ({why}); running on {backend.name} instead"


def _check(args) -> int:
    from gapcast.edge.agent import CoreSettings
    from gapcast.edge.config import load_config
    from gapcast.edge.messages import Topics

    cfg = load_config(args.config)
    print(f"config {args.config}: OK")
    bundle, backend, note = load_runtime(cfg)
    card = bundle.card
    t = Topics(cfg.topic_prefix, cfg.gateway_id, cfg.input.topic)
    b = cfg.broker
    s = CoreSettings.from_config(cfg)
    print(f"bundle {bundle.path}: signature and {len(card.files)} file hash(es) OK")
    print(
        f"  model {card.model_name} v{card.model_version}: {len(card.channels)} channels "
        f"({', '.join(card.channel_names)}), cadence {card.cadence_s} s, lookback {card.lookback}, horizon {card.horizon}"
    )
    print(f"backend: {note}")
    warning = preferred_backend_warning(cfg.model.backend, backend)
    if warning:
        print(f"WARNING: {warning}")
    tls = "off"
    if b.tls.enabled:
        tls = "on, certificate NOT verified (tls_insecure)" if b.tls.insecure else "on, certificate verified"
    print(
        f"broker: {b.host}:{b.port}, MQTT {b.mqtt_version}, client id {cfg.client_id!r}, TLS {tls}, "
        f"auth {'user ' + repr(b.username) if b.username else 'none'}, session expiry {b.session_expiry_s} s"
    )
    stations = ", ".join(cfg.stations.names) or "(none listed)"
    auto = f"; auto-register up to {cfg.stations.max_stations}" if cfg.stations.auto_register else ""
    print(f"stations: {stations}{auto}")
    print(f"subscribe: {t.readings_filter} (QoS 1)")
    print(f"publish:   {cfg.topic_prefix}/stations/<station>/filled, .../revisions and .../forecast (QoS 1)")
    print(f"           {t.status} (retained; Last Will \"offline\"), dead letters to {t.deadletter}")
    print(
        f"policy: steps close on the {s.clock} clock after lateness {s.lateness_s:g} s; readings more than "
        f"{s.max_future_s:g} s in the future rejected; sentinels {list(cfg.input.sentinels)}; no forecast above "
        f"{s.max_missing_share:.0%} missing"
    )
    print(f"state: {cfg.agent.state_dir} (outbox: {cfg.outbox.kind}, {cfg.outbox.max_bytes} bytes max)")
    if cfg.metrics.listen:
        try:
            import prometheus_client  # noqa: F401

            print(f"metrics: http://{cfg.metrics.listen}/metrics")
        except ImportError:
            print(f"WARNING: metrics.listen = {cfg.metrics.listen!r} but prometheus_client is not installed: metrics are off")
    print(f"log: {cfg.log.format}, level {cfg.log.level}{', per-station step lines' if cfg.log.steps else ''}")
    if getattr(args, "connect", False):
        return _check_connect(cfg, args.timeout)
    return 0


def _check_connect(cfg, timeout_s: float) -> int:
    from gapcast.edge.brokercheck import check_broker

    res = check_broker(cfg, timeout_s=timeout_s)
    for st in res.steps:
        mark = "OK" if st.ok and st.kind != "warning" else ("WARNING" if st.ok else f"FAILED ({st.kind})")
        print(f"connect {st.name}: {mark}: {st.detail}")
    if not res.ok:
        f = res.failure
        print(f"broker check failed ({f.kind}): {f.detail}")
        return 1
    print("broker: OK")
    return 0


def _run(args) -> int:
    from gapcast.edge.agent import AgentCore
    from gapcast.edge.config import load_config
    from gapcast.edge.mqtt import MqttAgent, make_outbox
    from gapcast.edge.state import lock_state_dir

    cfg = load_config(args.config)
    from gapcast.edge.logs import configure_logging

    # [log]: text or json, journald-friendly; -v/-vv on the command line can only lower the level.
    level = getattr(logging, cfg.log.level.upper())
    verbose = getattr(args, "verbose", 0)
    level = logging.DEBUG if verbose >= 2 else min(level, logging.INFO) if verbose == 1 else level
    configure_logging(cfg.log.format, level=level, steps=cfg.log.steps)
    # One agent per state folder: a second one would share the outbox and fight for the broker session.
    state_lock = lock_state_dir(cfg.agent.state_dir)
    update_link = None
    if cfg.update.enabled:  # fleet updates: the bundle runs from the update store (gapcast.edge.updater)
        from gapcast.edge.guard import start_from_config

        update_link, backend, note = start_from_config(cfg)
        bundle = backend.bundle
        warning = preferred_backend_warning(cfg.model.backend, getattr(backend.updater, "active_backend", None))
        if warning:
            log.warning("%s", warning)
    else:
        bundle, backend, note = load_runtime(cfg)
    log.info("bundle %s v%d verified; backend: %s", bundle.card.model_name, bundle.card.model_version, note)
    core = AgentCore.from_config(cfg, bundle.card, backend)
    cfg.agent.state_dir.mkdir(parents=True, exist_ok=True)
    agent = MqttAgent(cfg, core, make_outbox(cfg), update_link=update_link)
    prof = None
    if os.environ.get("GAPCAST_PROFILE"):  # per-stage CPU timers for `gapcast bench agent` (gapcast.edge.profile)
        from gapcast.edge.profile import install

        prof = install(agent, os.environ["GAPCAST_PROFILE"])
    stop = threading.Event()

    def _stop(signum, frame) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    stop_dashboard = None
    if cfg.skill.dashboard_listen:  # [dashboard] listen: the page inside the agent process (gapcast.edge.dashboard)
        from gapcast.edge.dashboard import start_in_agent

        server, stop_dashboard = start_in_agent(cfg)
        log.info("dashboard: %s", server.url)
    try:
        return agent.run(stop)
    finally:
        if prof is not None:
            from gapcast.edge.profile import dump_final

            dump_final(prof)
        if stop_dashboard is not None:
            stop_dashboard()
        state_lock.release()


def _build_engine(args) -> int:
    from gapcast.edge.trt import build_engine_main

    return int(build_engine_main(args) or 0)
