"""Fleet status, cloud side: which gateway of a fleet runs which model, from their retained messages.

``gapcast fleet status`` (:mod:`gapcast.deploy.cli`) prints :func:`format_status` of :func:`fleet_status`; the names
are re-exported by :mod:`gapcast.deploy.fleet`, where releases are published, promoted and rolled back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gapcast.edge.messages import Topics
from gapcast.edge.release import FleetTopics

if TYPE_CHECKING:
    from gapcast.deploy.fleet import FleetClient

__all__ = ["GatewayState", "fleet_status", "format_status"]


@dataclass(frozen=True)
class GatewayState:
    """One gateway as its retained messages describe it.

    Attributes:
        gateway: gateway id.
        online: from the retained status (the Last Will says offline), None when unknown.
        model_version: the version it runs.
        backend: the inference backend it reports.
        stage: its last update stage (received ... rolled_back).
        update_version: the version that stage is about.
        reason: why, for rejected / rolled_back.
        status: the raw status message (counters...).
        drift: stations whose model is in drift (its retained ``drift`` notice, else its status's ``skill``).
    """

    gateway: str
    online: bool | None
    model_version: int | None
    backend: str | None
    stage: str | None
    update_version: int | None
    reason: str | None
    status: dict[str, Any]
    drift: tuple[str, ...] = ()


def _json(payload: bytes) -> dict[str, Any]:
    try:
        d = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return d if isinstance(d, dict) else {}


def _online(status: dict[str, Any]) -> bool | None:
    for k in ("online", "state", "status"):
        v = status.get(k)
        if isinstance(v, bool):
            return v
        if isinstance(v, str) and v.lower() in ("online", "offline"):
            return v.lower() == "online"
    return None


def fleet_status(client: FleetClient, prefix: str, fleet: str) -> list[GatewayState]:
    """Which gateway of the fleet runs which model, from their retained ``status`` and ``model`` messages.

    A gateway belongs to the fleet when its retained status names it (``"fleet"``: the agent's online status, its
    Last Will and its clean-shutdown ``offline`` status all carry ``gateway.fleet``), so a stopped or lost gateway
    stays listed, with ``online`` False. A status without a fleet (an older agent) falls back to the gateway's
    model report or its status's ``update`` section.

    Raises:
        FleetError: a fleet name that is not one topic level, or a broker failure.
    """
    from gapcast.deploy.fleet import FleetError  # imported here: fleet re-exports this module's names

    try:
        topics = FleetTopics(prefix, fleet)
    except ValueError as exc:
        raise FleetError(str(exc)) from exc
    base = f"{prefix}/gateways"
    filters = [Topics(prefix).status, FleetTopics.gateway_model(prefix, "+"), Topics(prefix).drift]  # every gateway's
    got = client.retained(filters, probe_base=topics.base)
    per: dict[str, dict[str, dict[str, Any]]] = {}
    for topic, payload in got.items():
        parts = topic[len(base) + 1 :].split("/")
        if len(parts) == 2 and payload:
            per.setdefault(parts[0], {})[parts[1]] = _json(payload)
    rows = []
    for gw in sorted(per):
        st, md = per[gw].get("status", {}), per[gw].get("model", {})
        upd = st.get("update") if isinstance(st.get("update"), dict) else {}
        named = st.get("fleet")
        if isinstance(named, str):  # the status names the gateway's current fleet: it decides
            if named != fleet:
                continue
        elif fleet not in (md.get("fleet"), upd.get("fleet")):
            continue
        model = st.get("model") if isinstance(st.get("model"), dict) else {}
        version = model.get("version", st.get("model_version", upd.get("model_version", md.get("running_version"))))
        dn = per[gw].get("drift", {})
        skill = st.get("skill") if isinstance(st.get("skill"), dict) else {}
        if isinstance(dn.get("stations"), list):
            drift = tuple(str(d.get("station")) for d in dn["stations"] if isinstance(d, dict))
        else:
            drift = tuple(str(x) for x in skill.get("drift") or () if isinstance(x, str))
        rows.append(
            GatewayState(
                gateway=gw,
                online=_online(st),
                model_version=None if version is None else int(version),
                backend=st.get("backend"),
                stage=md.get("stage"),
                update_version=md.get("version"),
                reason=md.get("reason"),
                status=st,
                drift=drift,
            )
        )
    return rows


def format_status(rows: list[GatewayState]) -> str:
    """A plain-text table of :func:`fleet_status`'s rows."""
    head = ("gateway", "online", "model", "backend", "last update")
    lines = [head]
    for r in rows:
        last = "-" if r.stage is None else f"{r.stage} v{r.update_version}" if r.update_version else r.stage
        if r.reason:
            last += f" ({r.reason})"
        if r.drift:  # the gateway's model is worse than a naive forecast on these stations
            last += f"  DRIFT: {', '.join(r.drift[:5])}" + (f" (+{len(r.drift) - 5})" if len(r.drift) > 5 else "")
        online = "?" if r.online is None else "yes" if r.online else "no"
        lines.append((r.gateway, online, "-" if r.model_version is None else f"v{r.model_version}",
                      r.backend or "-", last))  # fmt: skip
    widths = [max(len(str(line[i])) for line in lines) for i in range(4)]
    return "\n".join(
        "  ".join(str(c).ljust(widths[i]) for i, c in enumerate(line[:4])) + "  " + str(line[4]) for line in lines
    )
