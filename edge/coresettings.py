"""The agent core's policy (:class:`CoreSettings`) and how it is taken from ``edge.toml`` and the model card.

Re-exported by :mod:`gapcast.edge.agent`, where both names were defined first. Pure.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gapcast.edge.bundle import Card
from gapcast.edge.config import EdgeConfig
from gapcast.edge.messages import AGGREGATES

__all__ = ["CoreSettings", "aggregate_rules"]


@dataclass(frozen=True)
class CoreSettings:
    """The core's policy, taken from :class:`~gapcast.edge.config.EdgeConfig`.

    Attributes:
        stations: configured station names.
        auto_register: serve stations that are not listed, up to ``max_stations``.
        max_stations: cap on station windows.
        clock: ``gateway`` or ``readings`` (what closes a silent station's steps).
        lateness_s, max_future_s: time rules, seconds.
        max_missing_share: no forecast above this share of missing window values.
        max_batch: rows per backend call.
        max_pending: open steps per station beyond the lookback (ring slack).
        max_catchup_steps: at most this many steps of one station are closed in one go; an older backlog (a
            gateway that was off for weeks) is skipped, counted and logged.
        fleet: the gateway's fleet (``gateway.fleet``), named in its status so ``gapcast fleet status`` finds it.
        aggregate: [C] rule per channel for several readings inside one step (``mean``, ``last``, ``sum``;
            empty: ``last``); :meth:`AgentCore.from_config` resolves it from ``edge.toml`` and the card.
    """

    stations: tuple[str, ...] = ()
    auto_register: bool = False
    max_stations: int = 1000
    clock: str = "gateway"
    lateness_s: float = 300.0
    max_future_s: float = 300.0
    max_missing_share: float = 0.5
    max_batch: int = 64
    max_pending: int = 48
    max_catchup_steps: int = 24 * 31
    fleet: str = "default"
    aggregate: tuple[str, ...] = ()
    skill: bool = True
    skill_span_s: float = 7 * 86400.0
    drift_after_s: float = 86400.0
    skill_min_count: int = 200
    shadow_share: float = 0.0
    coordinates: dict[str, tuple[float, float]] = field(default_factory=dict)  # station -> (lat, lon), issue 20

    @classmethod
    def from_config(cls, cfg: EdgeConfig) -> CoreSettings:
        return cls(
            stations=cfg.stations.names,
            auto_register=cfg.stations.auto_register,
            max_stations=cfg.stations.max_stations,
            clock=cfg.agent.clock,
            lateness_s=cfg.input.lateness_s,
            max_future_s=cfg.input.max_future_s,
            max_missing_share=cfg.agent.max_missing_share,
            max_batch=cfg.model.max_batch,
            fleet=cfg.fleet,
            skill=cfg.skill.enabled,
            skill_span_s=cfg.skill.span_s,
            drift_after_s=cfg.skill.drift_after_s,
            skill_min_count=cfg.skill.min_count,
            shadow_share=cfg.skill.shadow_share,
            coordinates=dict(cfg.stations.coordinates),
        )


def aggregate_rules(card: Card, default: str | None = None, per_channel: dict[str, str] | None = None) -> tuple[str, ...]:
    """The rule (``mean``, ``last``, ``sum``) for several readings of each card channel inside one step.

    Precedence per channel: ``per_channel`` (``input.channel_aggregate``), then ``default`` (``input.aggregate``),
    then the card's own rule for the channel (``channels[i].aggregate``), then the card's dataset rule
    (``aggregate``, ``dataset.aggregate`` or ``dataset.source.aggregate``: the dataset spec's), then ``mean``.

    Raises:
        ConfigError: ``per_channel`` names a channel the card does not have.
    """
    from gapcast.edge import ConfigError

    names = card.channel_names
    for name in per_channel or {}:
        if name not in names:
            raise ConfigError(f"input.channel_aggregate.{name}: not a channel of the model ({', '.join(names)})")
    raw = card.raw if isinstance(card.raw, dict) else {}
    ds = raw.get("dataset") if isinstance(raw.get("dataset"), dict) else {}
    src = ds.get("source") if isinstance(ds.get("source"), dict) else {}
    card_default = next((r for r in (raw.get("aggregate"), ds.get("aggregate"), src.get("aggregate")) if r in AGGREGATES), None)
    card_channels: dict[str, str] = {}
    for spec in list(raw.get("channels") or []) + list(ds.get("channels") or []):
        if isinstance(spec, dict) and spec.get("aggregate") in AGGREGATES and isinstance(spec.get("name"), str):
            card_channels.setdefault(spec["name"], spec["aggregate"])
    return tuple(
        (per_channel or {}).get(n) or default or card_channels.get(n) or card_default or "mean" for n in names
    )
