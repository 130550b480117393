"""The agent core's reports: the status, skill and drift messages, and the snapshot of its windows.

:class:`StatusAndState` is a base of :class:`gapcast.edge.agent.AgentCore` that assembles what the core exposes
(its counters, windows, skill tracker and drift set) into the retained status / skill / drift messages and into the
state snapshot (``export_state`` / ``restore_state``, written by :mod:`gapcast.edge.state`). It owns no state: it
reads the core's attributes (``card``, ``settings``, ``topics``, ``backend``, ``model_version``, ``windows``,
``counters``, ``missing``, ``rejected``, ``ignored``, ``no_forecast``, ``context_spec``, ``no_context``, ``skill``,
``drift``, ``spec``, ``channels``, ``cadence_s``, ``L``, ``H``, ``watermark_s``). Pure: no I/O, no clock reads.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from gapcast.duration import format_duration
from gapcast.edge.messages import OutMessage, drift_message, iso, skill_message, status_message
from gapcast.edge.variant import variant_status
from gapcast.edge.window import StationWindow

if TYPE_CHECKING:  # only for the annotation; agent imports this module
    from gapcast.edge.agent import _Row

__all__ = ["StatusAndState"]

log = logging.getLogger("gapcast.edge.agent")  # the core's logger: its lines read as the agent's


class StatusAndState:
    """Status, skill and drift messages and the window snapshot of :class:`gapcast.edge.agent.AgentCore`."""

    def drift_message(self, now_s: float) -> OutMessage:
        """The retained drift notice with every station in drift (empty: none)."""
        return drift_message(self.topics, [self.drift[k] for k in sorted(self.drift)], now_s, self.model_version)

    def skill_body(self) -> dict[str, Any]:
        """The gateway's rolling skill (:meth:`SkillTracker.summary`), the shadow fill skill, and per station."""
        sk = self.skill
        if sk is None:
            return {"enabled": False}
        body = sk.summary()
        body["fill"] = sk.fill_mae()
        body["revision"] = sk.revision_mae()
        body["drift"] = sorted(self.drift)
        body["stations"] = {
            name: {**sk.station_mae(name), "drift": name in self.drift, "fill": sk.fill_mae(name),
                   "revision": sk.revision_mae(name)}
            for name in sorted(sk.stations)
        }
        return body

    def skill_message(self, now_s: float) -> OutMessage | None:
        """The retained ``{prefix}/gateways/{gateway}/skill`` message (None when skill is off)."""
        if self.skill is None:
            return None
        body = self.skill_body()
        body.pop("drift", None)
        return skill_message(self.topics, body, now_s, self.model_version)

    def _check_drift(self, rows: list[_Row], now_s: float) -> list[OutMessage]:
        """Drift of every station of the batch at its newest closed step; a drift message when the set changed."""
        assert self.skill is not None
        newest: dict[str, int] = {}
        for r in rows:
            if r.fill:
                newest[r.station] = max(r.end, newest.get(r.station, r.end))
        changed = False
        for name, end in newest.items():
            ev = self.skill.check_drift(name, end * self.cadence_s)
            if ev is None:
                if self.drift.pop(name, None) is not None:
                    log.info("station %s: forecast skill back within the naive methods; drift cleared", name)
                    changed = True
                continue
            evidence = {
                "station": name, "ratio": round(ev["ratio"], 4), "n": ev["n"], "since": iso(ev["since_s"]),
                "for": format_duration(ev["for_s"]) if ev["for_s"] > 0 else "0s", "buckets": ev["buckets"],
            }
            if name not in self.drift:
                log.warning(
                    "station %s: model drift: forecast MAE is %.2fx the better naive method's over %s (%d values), "
                    "worse since %s", name, ev["ratio"], format_duration(self.skill.settings.span_s), ev["n"],
                    evidence["since"],
                )
                self.counters["drift_raised"] += 1
                changed = True
            self.drift[name] = evidence
        return [self.drift_message(now_s)] if changed else []

    def take_round(self) -> dict[str, int]:
        """What was closed since the last call, and reset: ``steps`` (filled steps), ``stations`` (distinct),
        ``imputed`` (channel values imputed), ``fallback`` (steps filled without the model), ``revisions``.
        The shell logs it as the round's one INFO line."""
        out = {k: int(self._round[k]) for k in ("steps", "imputed", "fallback", "revisions")}
        out["stations"] = len(self._round_stations)
        self._round.clear()
        self._round_stations.clear()
        return out

    # -- status and state ----------------------------------------------------------------------------

    def status_body(self) -> dict[str, Any]:
        """Counters and state for the status message (the shell adds connection and outbox figures)."""
        reasons = dict(sorted(self.no_forecast.items())[:50])
        return {
            "fleet": self.settings.fleet,
            "model": {
                "name": self.card.model_name,
                "version": self.model_version,
                "cadence_s": self.cadence_s,
                "lookback": self.L,
                "horizon": self.H,
            },
            "backend": self.backend.name,
            "variant": variant_status(self.backend),  # the onnxruntime variant chosen on this gateway, and why
            "clock": self.settings.clock,
            "stations": len(self.windows),
            "counters": dict(sorted(self.counters.items())),
            "missing": dict(sorted(self.missing.items())),
            "rejected": dict(sorted(self.rejected.items())),
            "ignored_channels": dict(sorted(self.ignored.items())),
            "no_forecast": reasons,
            "no_forecast_stations": len(self.no_forecast),
            "context": self._status_context(),
            "skill": self._status_skill(),
        }

    def _status_context(self) -> dict[str, Any]:
        """Neighbour context: ``none`` for a temporal-only model; else the stations served with and without it."""
        if self.context_spec is None:
            return {"kind": "none"}
        return {"kind": "neighbours", "stations_with": sum(1 for n in self.windows if n not in self.no_context),
                "without": dict(sorted(self.no_context.items())[:50])}

    def _status_skill(self) -> dict[str, Any]:
        """The status's skill section: the gateway summary, the fill skill and the stations in drift."""
        if self.skill is None:
            return {"enabled": False}
        return {**self.skill.summary(), "fill": self.skill.fill_mae(), "revision": self.skill.revision_mae(),
                "drift": sorted(self.drift)}

    def status(self, now_s: float, extra: dict[str, Any] | None = None) -> OutMessage:
        """The retained status message (``state: online``) with counters; ``extra`` is merged in."""
        body = self.status_body()
        if extra:
            body.update(extra)
        return status_message(self.topics, body, now_s, self.model_version)

    def state_meta(self) -> dict[str, Any]:
        """Compatibility keys a snapshot must match to be restored into this core.

        The model version is deliberately absent: windows hold raw physical values, so a snapshot taken under one
        model restores under another with the same channels, cadence and lookback (after a fleet update or an
        automatic rollback).
        """
        return {
            "channels": list(self.channels),
            "cadence_s": self.cadence_s,
            "lookback": self.L,
            "capacity": self.spec.capacity,
        }

    def export_state(self) -> dict[str, tuple[dict[str, np.ndarray], dict[str, Any]]]:
        """Every station's window as ``name -> (arrays, meta)`` (see :meth:`StationWindow.export_state`)."""
        out = {name: w.export_state() for name, w in self.windows.items()}
        if self.skill is not None:  # additive: the skill arrays ride along as "skill.*" arrays of the station
            for name, arrays in self.skill.export_state().items():
                if name in out:
                    win, meta = out[name]
                    out[name] = ({**win, **{f"skill.{k}": v for k, v in arrays.items()}}, meta)
        return out

    def restore_state(self, stations: dict[str, tuple[dict[str, np.ndarray], dict[str, Any]]]) -> int:
        """Restore windows exported by :meth:`export_state` (skipping ones that do not fit, logged).

        Returns:
            How many stations were restored.
        """
        n = 0
        skill_state: dict[str, dict[str, np.ndarray]] = {}
        for name, (arrays, meta) in stations.items():
            sk_arrays = {k[6:]: v for k, v in arrays.items() if k.startswith("skill.")}
            if sk_arrays:
                skill_state[name] = sk_arrays
                arrays = {k: v for k, v in arrays.items() if not k.startswith("skill.")}
            try:
                self.windows[name] = StationWindow.from_state(self.spec, arrays, meta)
                n += 1
            except (KeyError, ValueError, TypeError) as exc:
                log.warning("window of %s not restored: %s", name, exc)
        if self.skill is not None and skill_state:
            try:
                self.skill.restore_state({k: v for k, v in skill_state.items() if k in self.windows})
            except (KeyError, ValueError, TypeError, IndexError) as exc:
                log.warning("skill state not restored: %s", exc)
        wm = [w.ref_s for w in self.windows.values() if math.isfinite(w.ref_s)]
        if wm:
            self.watermark_s = max(wm)
        return n
