"""The agent core: station windows, step closing, batched gap filling and forecasting. Pure: no I/O, no clock reads.

(Over 600 lines on purpose: the pure core is the agent's one state machine; its settings, status and
interpolation fallback already live in edge/coresettings.py, edge/agent_status.py and edge/interpolation.py.)

The MQTT shell (``gapcast.edge.mqtt``) calls two verbs and publishes what they return:

- :meth:`AgentCore.ingest` ``(topic, payload, now_s)`` for every incoming message: parse, validate, merge into the
  station's window; returns dead-letter messages (and, rarely, the outputs of steps it had to close first);
- :meth:`AgentCore.tick` ``(now_s)`` often: closes every due step of every station (a later reading arrived, or the
  closing clock passed the step's end + ``lateness_s``) and fills and forecasts them ALL in one batched backend call.

For each closed step the agent publishes the step with every channel filled (imputed channels flagged) and a forecast
of the next H steps; when a run of incomplete steps (an outage) ends, the whole gap is re-filled from a window that
now has context on both sides and published as one revision. A closed step updated by a late reading is revised the
same way. Without a backend, or when it fails, imputation falls back to linear interpolation / LOCF
(``gapcast.baselines``) and forecasts to seasonal naive, flagged in ``method``. A window whose missing share exceeds
``max_missing_share`` gets no forecast, and the status says why.

Normalisation is the card's mean/std; the calendar features are ``gapcast.calendar.calendar_features`` over the L
past and H future step starts, in the card's time zone (``calendar.timezone``, else ``utc_offset_s``: what
training used).

Beside it: :mod:`gapcast.edge.coresettings` (the policy from ``edge.toml``), :mod:`gapcast.edge.interpolation` (the
no-model backend) and :mod:`gapcast.edge.agent_status` (status, skill and drift messages, the window snapshot); the
names defined there stay importable from here. (Over 600 lines on purpose: ingest, step closing and the round's
gather / infer / emit stages all read and write the same station windows, due set and counters; cut apart they would
pass that state around or reach into each other.)
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gapcast.calendar import calendar_features
from gapcast.edge.agent_status import StatusAndState
from gapcast.edge.backends import Backend
from gapcast.edge.bundle import Card
from gapcast.edge.config import EdgeConfig
from gapcast.edge.coresettings import CoreSettings, aggregate_rules  # re-exported: edge.agent's names
from gapcast.edge.interpolation import (  # re-exported: edge.agent's names
    InterpolationBackend,
    interpolate_batch,
)
from gapcast.edge.messages import (
    OutMessage,
    Reading,
    ReadingSchema,
    Rejection,
    Topics,
    deadletter_message,
    filled_message,
    forecast_message,
    iso,
    parse_reading,
    revision_message,
)
from gapcast.edge.skill import SkillSettings, SkillTracker
from gapcast.edge.window import StationWindow, WindowSpec
from gapcast.neighbours import context_for_windows, extend_by_coordinates

__all__ = ["AgentCore", "Backend", "CoreSettings", "InterpolationBackend", "aggregate_rules", "interpolate_batch"]

log = logging.getLogger(__name__)
#: Per-station step and revision lines, at DEBUG (``gapcast.edge.logs.STEPS_LOGGER``); each round's summary is one
#: INFO line of the shell (:meth:`AgentCore.take_round`).
steps_log = logging.getLogger("gapcast.edge.steps")

#: Unknown channel names counted one by one in the status; further names are counted under "(other)".
_MAX_IGNORED_NAMES = 100


@dataclass
class _Batch:
    """One round's model input (B rows): ``raw`` [B, L, C] physical (NaN unobserved), ``obs`` [B, L, C] bool,
    ``cal`` [B, L + H, F], ``norm`` / ``obs_f`` [B, L, C(+G)] what the backend gets (normalised, 0 where unobserved;
    with context columns), ``hidden`` [B, C] shadow-hidden cells of the newest step, ``with_ctx`` [B] bool."""

    raw: np.ndarray
    obs: np.ndarray
    cal: np.ndarray
    norm: np.ndarray
    obs_f: np.ndarray
    hidden: np.ndarray
    with_ctx: np.ndarray

@dataclass
class _Row:
    """One window of the batch: the L steps ending at ``end`` of ``station``."""

    station: str
    end: int
    fill: bool
    revisions: list[tuple[int, int, str]] = field(default_factory=list)


class AgentCore(StatusAndState):
    """The pure agent: windows for every station, step closing, batched inference and output messages.

    Args:
        card: the model card (channels, ranges, normalisation, cadence, L, H, calendar).
        topics: the gateway's topic tree.
        settings: :class:`CoreSettings`.
        schema: how readings are validated (sentinels, limits); built from the card when None.
        backend: the inference backend; None = :class:`InterpolationBackend` (flagged as a fallback).

    Raises:
        ValueError: a card whose channel ranges or sizes make no window.
        TypeError: ``backend`` does not implement :class:`gapcast.edge.backends.Backend`.
    """

    def __init__(
        self,
        card: Card,
        topics: Topics,
        settings: CoreSettings,
        *,
        schema: ReadingSchema | None = None,
        backend: Backend | None = None,
    ) -> None:
        self.card = card
        self.topics = topics
        self.settings = settings
        self.channels = card.channel_names
        self.units = {c.name: c.unit for c in card.channels}  # carried in every filled/revision/forecast payload
        self.C = len(self.channels)
        self.L, self.H, self.cadence_s = card.lookback, card.horizon, card.cadence_s
        self.mean = card.mean
        self.std = card.std
        self.vmin = card.valid_min
        self.vmax = card.valid_max
        self.schema = schema or ReadingSchema(self.channels, self.vmin, self.vmax)
        self.spec = WindowSpec(
            cadence_s=self.cadence_s,
            lookback=self.L,
            channels=self.C,
            lateness_s=settings.lateness_s,
            max_pending=settings.max_pending,
            aggregate=settings.aggregate,
        )
        day = 86_400
        season = day // self.cadence_s if day % self.cadence_s == 0 and day // self.cadence_s <= self.L else 0
        self.fallback = InterpolationBackend(self.H, season)
        if backend is not None and not isinstance(backend, Backend):
            msg = f"backend {type(backend).__name__} does not implement gapcast.edge.backends.Backend"
            raise TypeError(msg)
        self.backend: Backend = backend if backend is not None else self.fallback
        self.model_version = int(card.model_version)
        self.windows: dict[str, StationWindow] = {}
        self.watermark_s: float | None = None
        self.counters: Counter = Counter()
        self.rejected: Counter = Counter()
        self.missing: Counter = Counter()
        self.ignored: Counter = Counter()  # unknown channel names ignored, per name (at most _MAX_IGNORED_NAMES)
        self.no_forecast: dict[str, str] = {}
        self._due: set[str] = set()
        self._last_clock_due: int | None = None  # the clock's newest due step at the last full scan
        self._listed = frozenset(settings.stations)
        self._round: Counter = Counter()  # figures since the last take_round(): steps, imputed, fallback, revisions
        self._round_stations: set[str] = set()
        # Online skill (gapcast.edge.skill): every forecast scored against the readings that arrive; drift notices.
        self.skill: SkillTracker | None = None
        if settings.skill:
            self.skill = SkillTracker(
                self.channels, self.std, self.H, self.cadence_s,
                SkillSettings(span_s=settings.skill_span_s, drift_after_s=settings.drift_after_s,
                              min_count=settings.skill_min_count, season_steps=season if season < self.L else 0,
                              fill_steps=self.L),
            )
        self.drift: dict[str, dict[str, Any]] = {}  # station -> evidence, while in drift
        self._shadow_rng = np.random.default_rng(0)  # which observed values are shadow-hidden (deterministic)
        # Neighbour context (issue 20): a context model's card lists each station's neighbours; the context of a
        # row is built from the other stations' windows at the same steps (gapcast.neighbours, as in training).
        self.context_spec = card.context
        self.no_context: dict[str, str] = {}  # station -> why it runs without context

    # -- ingest ----------------------------------------------------------------------------------------------

    def _reject(self, topic: str, payload: bytes, rej: Rejection, now_s: float) -> list[OutMessage]:
        self.rejected[rej.kind] += 1
        log.debug("rejected %s from %s: %s", rej.kind, topic[:120], rej.reason)
        return [deadletter_message(self.topics, topic, payload, rej, now_s)]

    def _admission(self, station: str) -> Rejection | None:
        """Why a station without a window may not get one (None: it may)."""
        s = self.settings
        if station not in self._listed and not s.auto_register:
            return Rejection("unknown_station", f"station {station!r} is not configured (stations.names)")
        # Listed stations always have their slot: an unlisted one (possibly hostile) may not take it first.
        reserved = 0 if station in self._listed else len(self._listed - self.windows.keys())
        if len(self.windows) + reserved >= s.max_stations:
            return Rejection("station_limit", f"station {station!r} exceeds stations.max_stations {s.max_stations}")
        return None

    def _window(self, station: str) -> StationWindow | Rejection:
        w = self.windows.get(station)
        if w is not None:
            return w
        s = self.settings
        if (why := self._admission(station)) is not None:
            return why
        w = StationWindow(self.spec)
        self.windows[station] = w
        if self.context_spec is not None and station not in self.context_spec.stations:
            ext = extend_by_coordinates(self.context_spec, station, self.settings.coordinates)
            if ext is None:
                self.no_context[station] = ("not in the card's neighbour list and no coordinates for it and its "
                                            "neighbours in [stations.coordinates]: runs without context")
                log.warning("station %s: %s", station, self.no_context[station])
            else:
                self.context_spec = ext
                log.info("station %s: neighbours by distance: %s", station,
                         ", ".join(ext.neighbours_of(station)[ext.channels[0]]))
        log.info("station %s registered (%d of at most %d)", station, len(self.windows), s.max_stations)
        return w

    def ingest(self, topic: str, payload: bytes, now_s: float, *, retained: bool = False) -> list[OutMessage]:
        """Take one incoming MQTT message.

        Args:
            topic: the MQTT topic.
            payload: the raw payload bytes.
            now_s: the gateway's clock, seconds since the epoch (monotonic-derived; for the future check and
                dead-letter stamps).
            retained: the broker flagged it as a retained message (readings must not be retained).

        Returns:
            Messages to publish: a dead-letter message when the input is rejected; the outputs of older steps
            when the reading is so far ahead that they had to be closed first; usually nothing (steps are closed
            by :meth:`tick`).
        """
        self.counters["messages"] += 1
        where = self.topics.parse_topic(topic)
        if isinstance(where, Rejection):
            return self._reject(topic, payload, where, now_s)
        station, channel = where
        if retained:
            return self._reject(topic, payload, Rejection("retained", "readings must not be retained messages"), now_s)
        reading = parse_reading(payload, self.schema, channel=channel, arrival_s=now_s)
        if isinstance(reading, Rejection):
            return self._reject(topic, payload, reading, now_s)
        # The station first (issue 18): an unknown station is reported as such, not as too_old or future.
        if station not in self.windows and (why := self._admission(station)) is not None:
            return self._reject(topic, payload, why, now_s)
        if reading.ts_s > now_s + self.settings.max_future_s:
            rej = Rejection(
                "future",
                f"ts {iso(reading.ts_s)} is {reading.ts_s - now_s:.0f} s ahead of the gateway clock "
                f"(max_future_s {self.settings.max_future_s:g})",
            )
            return self._reject(topic, payload, rej, now_s)
        # Far past (issue 6): older than any window can hold, measured on the closing clock. Without this, the
        # first reading of a new station could start its window years back and flood catch-up steps.
        clock = self.closing_clock(now_s)
        if clock is not None and reading.ts_s < clock - self.spec.capacity * self.cadence_s:
            rej = Rejection(
                "too_old",
                f"ts {iso(reading.ts_s)} is older than any window holds ({self.spec.capacity} steps before {iso(clock)})",
            )
            return self._reject(topic, payload, rej, now_s)
        w = self._window(station)
        if isinstance(w, Rejection):
            return self._reject(topic, payload, w, now_s)
        return self._merge(station, w, reading, topic, payload, now_s)

    def _merge(
        self, station: str, w: StationWindow, reading: Reading, topic: str, payload: bytes, now_s: float
    ) -> list[OutMessage]:
        out: list[OutMessage] = []
        through = w.needs_close_before(reading.ts_s)
        if through is not None:
            out += self._close({station: through}, None, now_s)
        res = w.merge(reading.ts_s, reading.values, reading.observed)
        if not res.accepted:
            return out + self._reject(topic, payload, Rejection(res.kind, res.reason), now_s)
        self.counters["readings"] += 1
        self.counters[f"readings_{res.kind}"] += 1
        for k, n in reading.missing.items():
            self.missing[k] += n
        if reading.ignored:
            self.counters["ignored_channels"] += len(reading.ignored)
            for name in reading.ignored:  # per name, bounded: a station may send any number of names
                key = name if name in self.ignored or len(self.ignored) < _MAX_IGNORED_NAMES else "(other)"
                self.ignored[key] += 1
        if self.watermark_s is None or reading.ts_s > self.watermark_s:
            self.watermark_s = reading.ts_s
        if res.kind in ("new", "late"):
            self._due.add(station)
        return out

    # -- closing ---------------------------------------------------------------------------------------------

    @property
    def has_due(self) -> bool:
        """Whether a reading made some station's step due (the shell ticks at once instead of waiting)."""
        return bool(self._due)

    def closing_clock(self, now_s: float | None) -> float | None:
        """The clock that closes silent stations' steps: ``now_s`` (gateway) or the readings' watermark."""
        return now_s if self.settings.clock == "gateway" else self.watermark_s

    def tick(self, now_s: float) -> list[OutMessage]:
        """Close every due step of every station and publish them, with ONE batched inference per round.

        Args:
            now_s: the gateway clock, seconds since the epoch (the shell maps monotonic time to it).

        Returns:
            Filled, revision and forecast messages, in step order per station.
        """
        clock = self.closing_clock(now_s)
        # Only a new clock step can make a silent station due; otherwise only stations a reading touched are.
        clock_due = None if clock is None else math.floor((clock - self.spec.lateness_s) / self.cadence_s) - 1
        if clock_due != self._last_clock_due:
            self._last_clock_due = clock_due
            names = list(self.windows)
        elif self._due:
            names = [n for n in self._due if n in self.windows]
        else:
            return []
        targets: dict[str, int | None] = {}
        for name in names:
            w = self.windows[name]
            d = w.due_through(clock)
            if d is not None or w.has_revision:
                targets[name] = d
        self._due.clear()
        if not targets:
            return []
        # Fleet updates (gapcast.edge.guard.GuardedBackend) switch models here, between two steps.
        self.backend.step_boundary()
        return self._close(targets, clock, now_s)

    def _close(self, targets: dict[str, int | None], clock: float | None, now_s: float) -> list[OutMessage]:
        """Close each station's steps through its target (None: only pending revisions), in rounds of at most
        ``max_pending`` steps per station (so every window is still in the ring), one batch per round."""
        out: list[OutMessage] = []
        P = self.spec.max_pending
        remaining = dict(targets)
        # A backlog longer than max_catchup_steps is skipped (counted and logged), never silently.
        for name, through in remaining.items():
            w = self.windows[name]
            if through is not None and w.closed is not None and through - w.closed > self.settings.max_catchup_steps:
                first = w.closed + 1
                skip = w.skip_to(through - self.settings.max_catchup_steps)
                log.warning(
                    "station %s: %d steps (%s .. %s) are beyond max_catchup_steps; skipped, not published",
                    name, skip, iso(first * self.cadence_s), iso((first + skip - 1) * self.cadence_s),
                )
                self.counters["steps_skipped"] += skip
        while remaining:
            rows: list[_Row] = []
            nxt: dict[str, int | None] = {}
            for name, through in remaining.items():
                w = self.windows[name]
                closing = w.close_due(through, clock, P)
                for st in closing.steps:
                    if not st.touched:
                        self.missing["missing_step"] += 1
                    row = _Row(name, st.step, fill=True)
                    if st.gap is not None:
                        row.revisions.append((st.gap[0], st.gap[1], "gap_end"))
                    rows.append(row)
                if not closing.done:
                    nxt[name] = through
                    continue
                late = closing.revision
                if late is not None:
                    if rows and rows[-1].station == name and rows[-1].end == w.closed:
                        rows[-1].revisions.append((late[0], late[1], "late_reading"))
                    else:
                        rows.append(_Row(name, w.closed, fill=False, revisions=[(late[0], late[1], "late_reading")]))
            if rows:
                out += self._infer_and_publish(rows, now_s)
            remaining = nxt
        return out

    def _infer_and_publish(self, rows: list[_Row], now_s: float) -> list[OutMessage]:
        """One round: gather the rows' windows into one batch, run the backend on it (falling back to interpolation
        per sub-batch), and turn the results into filled / revision / forecast messages and skill updates."""
        batch = self._gather(rows)
        imputed, forecast, used = self._infer(batch)
        out = self._emit(rows, batch, imputed, forecast, used, now_s)
        if self.skill is not None:
            out += self._check_drift(rows, now_s)
        return out

    def _gather(self, rows: list[_Row]) -> _Batch:
        """The model input of a round: each row's window [L, C] (raw and normalised), its observed mask, the
        calendar [L + H, F], shadow-hidden cells withheld from the input, and the neighbour context columns."""
        L, H, C = self.L, self.H, self.C
        B = len(rows)
        raw = np.empty((B, L, C), dtype=np.float32)
        obs = np.empty((B, L, C), dtype=bool)
        cal_cache: dict[int, np.ndarray] = {}
        cal = np.empty((B, L + H, 6), dtype=np.float32)
        for b, r in enumerate(rows):
            v, m = self.windows[r.station].view(r.end)
            raw[b], obs[b] = v, m
            c = cal_cache.get(r.end)
            if c is None:
                steps = np.arange(r.end - L + 1, r.end + H + 1, dtype=np.int64) * self.cadence_s
                c = cal_cache[r.end] = calendar_features(steps, self.card.utc_offset_s, self.card.timezone)
            cal[b] = c
        # Shadow-hidden (skill.shadow_share): some observed values of the newest step are withheld from the model
        # input only, to score the real-time fill against the real reading; the published value stays the reading.
        hidden = np.zeros((B, C), dtype=bool)
        share_sh = self.settings.shadow_share if self.skill is not None else 0.0
        obs_in = obs
        if share_sh > 0:
            fills = np.array([r.fill for r in rows], dtype=bool)
            hidden = obs[:, -1] & fills[:, None] & (self._shadow_rng.random((B, C)) < share_sh)
            if hidden.any():
                obs_in = obs.copy()
                obs_in[:, -1] &= ~hidden
        norm = np.where(obs_in, (np.nan_to_num(raw) - self.mean) / self.std, 0.0).astype(np.float32)
        obs_f = obs_in.astype(np.float32)
        with_ctx = np.zeros(B, dtype=bool)
        if self.context_spec is not None:  # columns C..C+G-1 of the model input (export/context.py)
            ctx, ctx_obs = self._context(rows)
            with_ctx = ctx_obs.reshape(B, -1).any(axis=1)
            norm, obs_f = np.concatenate([norm, ctx], axis=-1), np.concatenate([obs_f, ctx_obs], axis=-1)
        return _Batch(raw=raw, obs=obs, cal=cal, norm=norm, obs_f=obs_f, hidden=hidden, with_ctx=with_ctx)

    def _infer(self, batch: _Batch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Run the backend over the batch in ``max_batch`` slices; a failing slice is served by the interpolation
        fallback (counted, logged). Returns imputed [B, L, C], forecast [B, H, C] (normalised) and the backend name
        that served each row [B]."""
        L, H, C = self.L, self.H, self.C
        norm, obs_f, cal = batch.norm, batch.obs_f, batch.cal
        B, Cin = norm.shape[0], norm.shape[-1]
        imputed = np.empty((B, L, C), dtype=np.float32)
        forecast = np.empty((B, H, C), dtype=np.float32)
        used = np.empty(B, dtype=object)
        mb = self.settings.max_batch
        for s in range(0, B, mb):
            sl = slice(s, min(B, s + mb))
            name = self.backend.name
            try:
                imp, fc = self.backend.run(norm[sl], obs_f[sl], cal[sl])
                imp = np.asarray(imp, dtype=np.float32)
                fc = np.asarray(fc, dtype=np.float32)
                n = sl.stop - sl.start
                if imp.shape != (n, L, Cin) or fc.shape != (n, H, Cin):
                    msg = f"backend {name} returned imputed {imp.shape} / forecast {fc.shape}, expected {(n, L, Cin)} / {(n, H, Cin)}"
                    raise ValueError(msg)
                if not (np.isfinite(imp).all() and np.isfinite(fc).all()):
                    msg = f"backend {name} returned non-finite values"
                    raise ValueError(msg)
            except Exception as exc:  # any backend failure falls back; the agent never dies on inference
                if self.backend is self.fallback:
                    raise
                self.counters["backend_errors"] += 1
                log.error("backend %s failed on a batch of %d: %s; falling back to interpolation", name, sl.stop - sl.start, exc)
                imp, fc = self.fallback.run(norm[sl], obs_f[sl], cal[sl])
                name = self.fallback.name
            imputed[sl], forecast[sl] = imp[..., :C], fc[..., :C]
            used[sl] = name
            self.counters["inference_batches"] += 1
            self.counters["inference_rows"] += sl.stop - sl.start
        return imputed, forecast, used

    def _emit(self, rows: list[_Row], batch: _Batch, imputed: np.ndarray, forecast: np.ndarray, used: np.ndarray,
              now_s: float) -> list[OutMessage]:
        """The round's messages, in row order: revisions, then the newest step's filled values and forecast.

        Args:
            rows: the round's B rows; batch: their :class:`_Batch`.
            imputed: [B, L, C] normalised; forecast: [B, H, C] normalised; used: [B] the backend name per row.
            now_s: the gateway clock, epoch seconds (stamped on the messages).

        Returns:
            The messages; counters, the round figures, ``no_forecast`` and the skill tracker are updated on the way.
        """
        raw, obs = batch.raw, batch.obs
        # Back to physical units, inside each channel's valid range.
        imp_phys = np.clip(imputed * self.std + self.mean, self.vmin, self.vmax)
        fc_phys = np.clip(forecast * self.std + self.mean, self.vmin, self.vmax)
        filled = np.where(obs, raw, imp_phys)
        out: list[OutMessage] = []
        last_obs = before = None
        if self.skill is not None:
            last_obs = _last_observed(raw, obs)  # [B, C] the newest observed value in each window (NaN: none)
            before = _last_observed(raw[:, :-1], obs[:, :-1])  # [B, C] LOCF's fill of the newest step
        # The version that served this batch (a fleet update or rollback may have swapped it).
        if self.backend.model_version is not None:
            self.model_version = int(self.backend.model_version)
        for b, r in enumerate(rows):
            model = used[b] != self.fallback.name
            ctx_kind = "neighbours" if model and batch.with_ctx[b] else "none"
            out += self._emit_revisions(r, filled[b], obs[b], model, ctx_kind, used[b], now_s)
            if not r.fill:
                continue
            if self.skill is not None:
                self._observe_step(r, raw[b], obs[b], filled[b], imp_phys[b], batch.hidden[b], before[b])
            out += self._emit_step(
                r, filled[b], obs[b], fc_phys[b], model, ctx_kind, used[b], now_s,
                last_obs[b] if last_obs is not None else None,
            )
        return out

    def _emit_revisions(self, r: _Row, filled: np.ndarray, obs: np.ndarray, model: bool, ctx_kind: str, used: str,
                        now_s: float) -> list[OutMessage]:
        """One revision message per revised span of row ``r`` that lies inside its window (the rest is clipped).

        Args:
            filled: [L, C] physical, readings where observed; obs: [L, C] bool; model: the model served the row;
            ctx_kind: ``neighbours`` or ``none``; used: the backend name; now_s: epoch seconds.
        """
        L, cad, out = self.L, self.cadence_s, []
        sk = self.skill
        for lo, hi, reason in r.revisions:
            first = max(lo, r.end - L + 1)
            if first > hi:
                continue
            i0, i1 = first - (r.end - L + 1), hi - (r.end - L + 1) + 1
            out.append(
                revision_message(
                    self.topics, r.station, first * cad, cad, self.channels, filled[i0:i1], ~obs[i0:i1],
                    "model" if model else "interpolation", self.model_version, reason, now_s, units=self.units,
                    context=ctx_kind,
                )
            )
            self.counters["revisions"] += 1
            self._round["revisions"] += 1
            if sk is not None and reason == "gap_end":  # the outage's real-time fills vs their revision
                sk.observe_revision(r.station, first, filled[i0:i1])
            steps_log.debug(
                "%s revision %s..%s (%d steps, %s, %s)",
                r.station, iso(first * cad), iso(hi * cad), hi - first + 1, reason, used,
            )
        return out

    def _observe_step(self, r: _Row, raw: np.ndarray, obs: np.ndarray, filled: np.ndarray, imp_phys: np.ndarray,
                      hidden: np.ndarray, before: np.ndarray) -> None:
        """Feed the skill tracker the row's newest step: the readings that score earlier forecasts, the published
        fill, and the shadow-hidden cells (scored against the fill, ``before`` [C] being LOCF's).

        Args:
            raw: [L, C] physical (NaN unobserved); obs: [L, C] bool; filled, imp_phys: [L, C] physical;
            hidden: [C] bool; before: [C] physical.
        """
        sk = self.skill
        assert sk is not None
        season = sk.settings.season_steps
        seas = (raw[-1 - season], obs[-1 - season]) if season else (None, None)
        sk.observe(r.station, r.end, raw[-1], obs[-1], *seas)
        sk.note_fill(r.station, r.end, filled[-1], ~obs[-1])
        if hidden.any():
            sk.observe_fill(r.station, r.end, imp_phys[-1], raw[-1], hidden, before)
            self.counters["shadow_hidden"] += int(hidden.sum())

    def _emit_step(self, r: _Row, filled: np.ndarray, obs: np.ndarray, fc_phys: np.ndarray, model: bool,
                   ctx_kind: str, used: str, now_s: float, last_obs: np.ndarray | None) -> list[OutMessage]:
        """The filled message of row ``r``'s newest step, and its forecast unless the window's missing share is over
        ``max_missing_share`` (then the reason goes to ``no_forecast``).

        Args:
            filled: [L, C] physical; obs: [L, C] bool; fc_phys: [H, C] physical; last_obs: [C] the newest observed
                values (for the skill tracker; None when skill is off); the rest as :meth:`_emit_revisions`.
        """
        cad, mv, names = self.cadence_s, self.model_version, self.channels
        step_s = r.end * cad
        imp_mask = ~obs[-1]
        out = [
            filled_message(
                self.topics, r.station, step_s, cad, names, filled[-1], imp_mask,
                "model" if model else "locf", mv, now_s, units=self.units, context=ctx_kind,
            )
        ]
        self.counters["filled"] += 1
        n_imp = int(imp_mask.sum())
        self.counters["imputed_values"] += n_imp
        if not model:
            self.counters["fallback_steps"] += 1
            self._round["fallback"] += 1
        self._round["steps"] += 1
        self._round["imputed"] += n_imp
        self._round_stations.add(r.station)
        share = 1.0 - float(obs.mean())
        share_max = self.settings.max_missing_share
        if share > share_max:
            reason = f"window {share:.0%} missing > max_missing_share {share_max:.0%} (step {iso(step_s)})"
            self.no_forecast[r.station] = reason
            self.counters["no_forecast"] += 1
            steps_log.debug("%s step %s: %d/%d imputed (%s); no forecast: %s", r.station, iso(step_s), n_imp, self.C, used, reason)
            return out
        self.no_forecast.pop(r.station, None)
        method = "model" if model else ("seasonal_naive" if self.fallback.season else "persistence")
        out.append(
            forecast_message(
                self.topics, r.station, step_s, cad, names, fc_phys, share, method, mv, now_s, units=self.units,
                context=ctx_kind,
            )
        )
        self.counters["forecasts"] += 1
        if self.skill is not None:
            self.skill.issue(r.station, r.end, fc_phys, last_obs)
        steps_log.debug(
            "%s step %s: %d/%d imputed, window %.0f%% missing, forecast %d steps (%s)",
            r.station, iso(step_s), n_imp, self.C, 100 * share, self.H, used,
        )
        return out

    def _context(self, rows: list[_Row]) -> tuple[np.ndarray, np.ndarray]:
        """The neighbour context of every row: the other stations' windows ending at the row's step, this round.

        Returns:
            (context [B, L, G] float32 normalised, context_observed [B, L, G] float32 0/1); all zero for a station
            without neighbours (``no_context``).
        """
        spec = self.context_spec
        assert spec is not None
        B, L, G = len(rows), self.L, len(spec.channels)
        ctx = np.zeros((B, L, G), dtype=np.float32)
        ctx_obs = np.zeros((B, L, G), dtype=np.float32)
        by_end: dict[int, list[int]] = {}
        for b, r in enumerate(rows):
            by_end.setdefault(r.end, []).append(b)
        for end, bs in by_end.items():
            live = {}
            for name in spec.stations:  # every station of the spec with a window, aligned to the same steps
                w = self.windows.get(name)
                if w is not None:
                    v, m = w.view(end)
                    live[name] = (np.where(m, (np.nan_to_num(v) - self.mean) / self.std, 0.0), m)
            got = context_for_windows(spec, live)
            for b in bs:
                c = got.get(rows[b].station)
                if c is not None:
                    ctx[b], ctx_obs[b] = c
        self.counters["context_rows"] += int(ctx_obs.reshape(B, -1).any(axis=1).sum())
        return ctx, ctx_obs

    @classmethod
    def from_config(cls, cfg: EdgeConfig, card: Card, backend: Backend | None = None) -> AgentCore:
        """Build the core from the gateway config and the verified bundle's card.

        Raises:
            ConfigError: ``input.aliases``, ``input.scale`` or ``input.channel_aggregate`` name a channel the card
                does not have (the message names the key).
        """
        from dataclasses import replace

        from gapcast.edge import ConfigError

        inp = cfg.input
        try:
            schema = ReadingSchema(
                card.channel_names,
                card.valid_min,
                card.valid_max,
                sentinels=inp.sentinels,
                max_payload_bytes=inp.max_payload_bytes,
                max_json_depth=inp.max_json_depth,
                unknown_channels=inp.unknown_channels,
                aliases=inp.aliases,
                scale=inp.scale,
                epoch=inp.epoch,
                max_keys=inp.max_keys,
            )
        except ValueError as exc:
            raise ConfigError(f"input.{exc}") from exc
        settings = replace(CoreSettings.from_config(cfg), aggregate=aggregate_rules(card, inp.aggregate, inp.channel_aggregate))
        return cls(
            card,
            Topics(cfg.topic_prefix, cfg.gateway_id, inp.topic),
            settings,
            schema=schema,
            backend=backend,
        )


def _last_observed(raw: np.ndarray, obs: np.ndarray) -> np.ndarray:
    """The newest observed value of each channel in each window: [B, L, C] -> [B, C], NaN where never observed."""
    L = raw.shape[1]
    if L == 0:
        return np.full((raw.shape[0], raw.shape[2]), np.nan)
    idx = np.where(obs, np.arange(L)[None, :, None], -1).max(axis=1)  # [B, C]
    vals = np.take_along_axis(raw, np.clip(idx, 0, L - 1)[:, None, :], axis=1)[:, 0, :].astype(np.float64)
    return np.where(idx >= 0, vals, np.nan)
