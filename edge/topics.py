"""MQTT topics of the gapcast contract: the layout (:class:`Topics`), filter matching and the checks of a topic
prefix and of an ``input.topic`` template. Pure: no I/O.

Layout (docs/ARCHITECTURE.md, "Contracts"; ``prefix`` defaults to ``gapcast/v1``)::

    {prefix}/stations/{station}/readings    in   readings (or any ``input.topic`` template)
    {prefix}/stations/{station}/filled      out  one closed step, every channel filled
    {prefix}/stations/{station}/revisions   out  a run of closed steps re-filled
    {prefix}/stations/{station}/forecast    out  H steps from a closed step
    {prefix}/gateways/{gateway}/status      out  retained; "offline" by Last Will
    {prefix}/deadletter/{gateway}           out  every rejected input with its kind and reason
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gapcast.edge.readings import Rejection

__all__ = ["DEFAULT_READINGS_TOPIC", "Topics", "topic_matches", "topic_prefix_problem", "topic_template_problem"]

#: The default readings topic template (``input.topic``).
DEFAULT_READINGS_TOPIC = "{prefix}/stations/{station}/readings"

# fullmatch, ASCII digits only: "$" would let a trailing newline through, "\d" every Unicode digit.
_STATION_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


def topic_prefix_problem(prefix: str) -> str | None:
    """Why ``prefix`` cannot be gapcast's MQTT topic prefix, or None when it can.

    A prefix is published under, so it must be non-empty, hold no wildcard (``+``, ``#``; MQTT 3.1.1 section 4.7.1)
    and no NUL, and neither start nor end with ``/`` (topics are ``{prefix}/stations/...``). The one rule for the
    gateway's ``mqtt.topic_prefix``, ``gapcast replay --prefix`` and ``gapcast fleet --prefix``.
    """
    if not prefix:
        return "must not be empty"
    if prefix.startswith("/") or prefix.endswith("/") or any(c in prefix for c in "+#\0"):
        return f"{prefix!r} must not start/end with '/' nor hold + # or NUL"
    return None


def topic_matches(filter_: str, topic: str) -> bool:
    """Whether MQTT topic filter ``filter_`` (``+`` one level, ``#`` the rest) matches ``topic``.

    Source: MQTT 3.1.1 section 4.7 (topic names and filters).
    """
    f, t = filter_.split("/"), topic.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t) or (level != "+" and level != t[i]):
            return False
    return len(f) == len(t)


def _template_levels(template: str, prefix: str) -> list[str]:
    return template.replace("{prefix}", prefix).split("/")


def topic_template_problem(template: str, prefix: str, gateway: str = "gw") -> str | None:
    """Why ``template`` cannot be the readings topic template (``input.topic``), or None when it can.

    A template is a topic whose levels are literals or exactly ``{station}`` (required, once), ``{channel}``
    (optional, once: per-channel topics whose payload is one value) or ``{prefix}`` (the ``mqtt.topic_prefix``
    levels). It must hold no wildcard or NUL, no empty level, and must not match a topic the gateway publishes
    (its own outputs would come back in as readings).
    """
    if not template:
        return "must not be empty"
    if any(c in template for c in "+#\0"):
        return f"{template!r} must not hold + # or NUL (the subscription filter is derived from it)"
    levels = _template_levels(template, prefix)
    if any(not lv for lv in levels):
        return f"{template!r} has an empty level (leading, trailing or double '/')"
    for lv in levels:
        if ("{" in lv or "}" in lv) and lv not in ("{station}", "{channel}"):
            return f"level {lv!r} of {template!r}: placeholders are {{prefix}}, {{station}}, {{channel}}, each a whole level"
    if levels.count("{station}") != 1:
        return f"{template!r} needs {{station}} exactly once"
    if levels.count("{channel}") > 1:
        return f"{template!r} holds {{channel}} more than once"
    flt = "/".join("+" if lv in ("{station}", "{channel}") else lv for lv in levels)
    t = Topics(prefix, gateway)
    for own in (t.filled("X"), t.forecast("X"), f"{prefix}/stations/X/revisions", t.status,
                f"{prefix}/gateways/{gateway}/model", t.deadletter, f"{prefix}/fleet/X/manifest"):
        if topic_matches(flt, own):
            return f"{template!r} also matches the gateway's own output topic {own!r}"
    return None


@dataclass(frozen=True)
class Topics:
    """The topic tree of one gateway: the one place topic strings are built and parsed.

    Args:
        prefix: topic prefix, e.g. ``gapcast/v1``.
        gateway: gateway id; the default ``+`` (a subscriber that serves every gateway) makes ``status`` and
            ``deadletter`` subscription filters.
        readings_template: where readings come in (``input.topic``; checked by :func:`topic_template_problem`):
            ``{prefix}/stations/{station}/readings`` (default, one JSON reading per message) or a template with
            ``{channel}`` (one channel's value per message).
    """

    prefix: str
    gateway: str = "+"
    readings_template: str = DEFAULT_READINGS_TOPIC

    #: Station output kinds and their topic level (``{prefix}/stations/{station}/{level}``).
    OUTPUT_LEVELS = {"filled": "filled", "revision": "revisions", "forecast": "forecast"}

    @property
    def per_channel(self) -> bool:
        """Whether readings come one channel per message (the template holds ``{channel}``)."""
        return "{channel}" in self.readings_template

    @property
    def readings_filter(self) -> str:
        """The subscription filter for every station's readings (``+`` for ``{station}`` and ``{channel}``)."""
        if self.readings_template == DEFAULT_READINGS_TOPIC:
            return f"{self.prefix}/stations/+/readings"
        levels = _template_levels(self.readings_template, self.prefix)
        return "/".join("+" if lv in ("{station}", "{channel}") else lv for lv in levels)

    def station_of(self, topic: str) -> str | Rejection:
        """The station name of a readings topic, or a ``bad_topic`` :class:`Rejection`."""
        parsed = self.parse_topic(topic)
        return parsed if isinstance(parsed, Rejection) else parsed[0]

    def parse_topic(self, topic: str) -> tuple[str, str | None] | Rejection:
        """``(station, channel)`` of a readings topic (channel None unless the template has ``{channel}``), or a
        ``bad_topic`` :class:`Rejection`."""
        if self.readings_template == DEFAULT_READINGS_TOPIC:
            head = self.prefix + "/stations/"
            if not topic.startswith(head) or not topic.endswith("/readings"):
                return Rejection("bad_topic", f"topic {topic[:200]!r} is not {head}<station>/readings")
            station, channel = topic[len(head) : -len("/readings")], None
        else:
            levels = _template_levels(self.readings_template, self.prefix)
            got = topic.split("/")
            if len(got) != len(levels) or any(
                lv != g for lv, g in zip(levels, got) if lv not in ("{station}", "{channel}")
            ):
                return Rejection("bad_topic", f"topic {topic[:200]!r} does not match {self.readings_template!r}")
            station = got[levels.index("{station}")]
            channel = got[levels.index("{channel}")] if "{channel}" in levels else None
            if channel is not None and not 1 <= len(channel) <= 64:
                return Rejection("bad_topic", f"channel level {channel[:80]!r} must be 1-64 characters")
        if not _STATION_RE.fullmatch(station):
            return Rejection("bad_topic", f"station name {station[:80]!r} must be 1-64 of A-Z a-z 0-9 _ . -")
        return station, channel

    def filled(self, station: str) -> str:
        return f"{self.prefix}/stations/{station}/filled"

    def revisions(self, station: str) -> str:
        return f"{self.prefix}/stations/{station}/revisions"

    def forecast(self, station: str) -> str:
        return f"{self.prefix}/stations/{station}/forecast"

    def output_filter(self, kind: str) -> str:
        """The subscription filter for one output kind (``filled``, ``revision``, ``forecast``) of every station."""
        return f"{self.prefix}/stations/+/{self.OUTPUT_LEVELS[kind]}"

    def output_of(self, topic: str) -> tuple[str, str] | None:
        """``(kind, station)`` of a station output topic (``filled``, ``revision``, ``forecast``), else None."""
        head = self.prefix + "/stations/"
        if not topic.startswith(head):
            return None
        station, _, level = topic[len(head) :].partition("/")
        for kind, lvl in self.OUTPUT_LEVELS.items():
            if level == lvl and _STATION_RE.fullmatch(station):
                return kind, station
        return None

    def readings(self, station: str) -> str:
        return f"{self.prefix}/stations/{station}/readings"

    @property
    def status(self) -> str:
        return f"{self.prefix}/gateways/{self.gateway}/status"

    @property
    def deadletter(self) -> str:
        return f"{self.prefix}/deadletter/{self.gateway}"

    @property
    def skill(self) -> str:
        """Retained rolling forecast skill of the gateway (``gapcast/skill/1``)."""
        return f"{self.prefix}/gateways/{self.gateway}/skill"

    @property
    def drift(self) -> str:
        """Retained drift notice: the stations whose model is worse than the better naive method (``gapcast/drift/1``)."""
        return f"{self.prefix}/gateways/{self.gateway}/drift"
