"""Where the agent's CPU time goes: explicit per-stage timers behind a flag (``GAPCAST_PROFILE=PATH``).

``gapcast bench agent`` runs the agent with ``GAPCAST_PROFILE`` set; :func:`install` then wraps the functions that
make up each stage of the main thread's work (no edits to the hot code paths; nothing is wrapped without the flag):

- ``parse``: :func:`gapcast.edge.messages.parse_reading` (JSON decode and validation of one reading);
- ``window``: the rest of :meth:`AgentCore.ingest` and :meth:`AgentCore.tick` (topic, admission, window merge,
  closing, batch assembly, normalisation, de-normalisation, skill);
- ``inference``: ``core.backend.run`` (the onnxruntime call);
- ``encode``: the output builders (``filled_message``, ``forecast_message``, ``revision_message``, ...: payload
  dicts and JSON bytes);
- ``outbox``: ``put_many`` / ``put`` / ``next_batch`` / ``ack`` of the outbox (SQLite, fsync included);
- ``publish``: ``client.publish`` (paho: packet build and queueing; the socket writes run on paho's network thread);
- ``other``: the main thread's remaining CPU (the loop, queues, status, acks bookkeeping);
- ``network_thread``: CPU of the other threads outside inference calls (paho's network thread: socket reads and
  writes, PUBACKs; the psutil-free remainder of the process).

``inference`` also counts the CPU other threads spend during the backend call (onnxruntime's intra-op pool).

Times are CPU seconds (``time.thread_time`` on the main thread, ``time.process_time`` for the process), nested
stages counted once (exclusive: ``window`` excludes the ``parse``/``inference``/``encode`` calls inside it). Wrappers
are active on the main thread only; other threads call straight through.

Dumps: ``SIGUSR1`` writes ``PATH.<k>.json`` (k = 1, 2, ...) with the figures since the previous dump and resets
them; :func:`dump_final` writes ``PATH.final.json`` at shutdown, with the last window-state snapshot's write time
and size. Each dump holds ``cpu_s`` per stage, ``calls`` per stage and the counters ``filled``/``forecasts``/
``messages`` over the same span, so a reader can divide by station-steps.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["ENV", "STAGES", "StageProfile", "dump_final", "install"]

log = logging.getLogger(__name__)

ENV = "GAPCAST_PROFILE"
STAGES = ("parse", "window", "inference", "encode", "outbox", "publish", "other", "network_thread")
_COUNTERS = ("messages", "readings", "filled", "forecasts", "revisions", "inference_rows", "inference_batches")


class StageProfile:
    """Exclusive CPU seconds per stage of the agent's main thread (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, counters: Callable[[], dict[str, int]] | None = None) -> None:
        self.path = Path(path)
        self._counters = counters or dict
        self._main = threading.main_thread().ident
        self._stack: list[float] = []
        self.snapshot: dict[str, Any] = {}
        self._dumps = 0
        self.reset()

    def reset(self) -> None:
        self.cpu = dict.fromkeys(STAGES, 0.0)
        self.calls = dict.fromkeys(STAGES, 0)
        self._pool_s = 0.0
        self._t_main = time.thread_time()
        self._t_proc = time.process_time()
        self._t_wall = time.perf_counter()
        self._base = dict(self._counters())

    def wrap(self, stage: str, fn: Callable) -> Callable:
        """``fn`` timed as ``stage`` (exclusive of wrapped calls inside it) on the main thread."""
        stack, main, clock, pclock = self._stack, self._main, time.thread_time, time.process_time
        pool = stage == "inference"  # onnxruntime's intra-op threads work during the call: count them here

        def timed(*args, **kwargs):
            if threading.get_ident() != main:
                return fn(*args, **kwargs)
            t0 = clock()
            p0 = pclock() if pool else 0.0
            stack.append(0.0)
            try:
                return fn(*args, **kwargs)
            finally:
                dt = clock() - t0
                inner = stack.pop()
                self.cpu[stage] += dt - inner
                if pool:  # the other threads' CPU during the call (mostly the pool; paho's share is small)
                    self._pool_s += max(pclock() - p0 - dt, 0.0)
                self.calls[stage] += 1
                if stack:
                    stack[-1] += dt

        timed.__wrapped__ = fn  # type: ignore[attr-defined]
        return timed

    def figures(self) -> dict[str, Any]:
        """The stages since the last reset; ``other`` and ``network_thread`` derived from the thread/process CPU."""
        main = time.thread_time() - self._t_main
        proc = time.process_time() - self._t_proc
        cpu = dict(self.cpu)
        named = sum(v for k, v in cpu.items() if k not in ("other", "network_thread"))
        cpu["other"] = max(main - named, 0.0)
        cpu["inference"] += self._pool_s
        cpu["network_thread"] = max(proc - main - self._pool_s, 0.0)
        now = self._counters()
        return {
            "cpu_s": {k: round(v, 6) for k, v in cpu.items()},
            "calls": dict(self.calls),
            "main_thread_cpu_s": round(main, 6),
            "process_cpu_s": round(proc, 6),
            "wall_s": round(time.perf_counter() - self._t_wall, 6),
            "counters": {k: int(now.get(k, 0)) - int(self._base.get(k, 0)) for k in _COUNTERS},
            **({"snapshot": self.snapshot} if self.snapshot else {}),
        }

    def dump(self, suffix: str | None = None) -> Path:
        """Write :meth:`figures` to ``PATH.<suffix>.json`` (default: the next dump number) and reset."""
        self._dumps += 1
        out = self.path.with_name(f"{self.path.name}.{suffix or self._dumps}.json")
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.figures(), indent=1))
        tmp.replace(out)  # the reader polls for the file: it appears whole
        self.reset()
        return out


def install(agent: Any, path: str | os.PathLike) -> StageProfile:
    """Wrap the agent's stages for profiling and make ``SIGUSR1`` dump them (main thread only).

    Args:
        agent: a :class:`gapcast.edge.mqtt.MqttAgent` (its ``core``, ``outbox``, ``client``, ``snapshots``).
        path: the dump path prefix.

    Returns:
        The :class:`StageProfile` (``dump_final`` takes it).
    """
    import gapcast.edge.agent as agent_mod
    import gapcast.edge.agent_status as status_mod

    core = agent.core
    prof = StageProfile(path, counters=lambda: dict(core.counters))
    agent_mod.parse_reading = prof.wrap("parse", agent_mod.parse_reading)
    for name in ("filled_message", "forecast_message", "revision_message", "deadletter_message"):
        setattr(agent_mod, name, prof.wrap("encode", getattr(agent_mod, name)))
    status_mod.drift_message = prof.wrap("encode", status_mod.drift_message)
    core.ingest = prof.wrap("window", core.ingest)
    core.tick = prof.wrap("window", core.tick)
    backend = core.backend
    backend.run = prof.wrap("inference", backend.run)
    for name in ("put_many", "put", "next_batch", "ack"):
        setattr(agent.outbox, name, prof.wrap("outbox", getattr(agent.outbox, name)))
    agent.client.publish = prof.wrap("publish", agent.client.publish)
    snaps = getattr(agent, "snapshots", None)
    if snaps is not None:
        save = snaps.save_now

        def timed_save() -> bool:
            t0 = time.perf_counter()
            ok = save()
            p = Path(snaps.path)
            prof.snapshot = {"write_s": round(time.perf_counter() - t0, 6), "bytes": p.stat().st_size if p.exists() else None,
                             "stations": len(core.windows)}
            return ok

        snaps.save_now = timed_save
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGUSR1, lambda signum, frame: prof.dump())
    log.info("profiling the agent's stages to %s.<k>.json (SIGUSR1 dumps)", path)
    return prof


def dump_final(prof: StageProfile | None) -> None:
    """Write ``PATH.final.json`` (the figures since the last dump, and the shutdown snapshot's time and size)."""
    if prof is not None:
        prof.dump("final")
