"""One station's rolling window, aligned to the model's cadence by event time. Pure: no I/O, no clock reads.

Step ``k`` covers ``[k * cadence_s, (k + 1) * cadence_s)`` seconds since the epoch (UTC) and is labelled by its start.
A reading belongs to the step its own timestamp falls in. The window keeps the last ``lookback + max_pending`` steps
in preallocated numpy ring buffers, so merging a reading is O(C) and allocation-free.

Rules (docs/ARCHITECTURE.md, "Contracts", time):

- partial readings (any subset of channels) merge into their step; several readings of one channel inside one
  step are combined by the channel's rule (``WindowSpec.aggregate``): ``last`` (the newest timestamp wins; the
  default of a bare spec), ``mean`` or ``sum`` over the readings' distinct timestamps. In every rule a reading
  with the same timestamp as one already merged replaces it, so a QoS 1 redelivery is idempotent;
- a reading for a newer step opens it; every step before it becomes due for closing;
- a reading for a step that is already closed is accepted while ``step end + lateness_s`` is still ahead of the
  station's reference time (its newest reading, or the clock that closed a silent step): the step is updated and
  queued for a revision; later than that it is rejected as ``too_late``; a step no longer in the ring is ``too_old``;
- a step closes because a later step's reading arrived, or because the clock passed its end + ``lateness_s``.

The window does not fill anything: it hands the agent the raw values and the observed mask of the L steps that end
at a closing step (:meth:`StationWindow.view`); the agent batches those across stations for one inference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gapcast.timefmt import format_rfc3339

__all__ = ["ClosedStep", "Closing", "MergeResult", "StationWindow", "WindowSpec"]


@dataclass(frozen=True)
class WindowSpec:
    """Shape and time rules shared by every station window of one agent.

    Attributes:
        cadence_s: step length, seconds (the card's ``cadence_s``).
        lookback: L, steps the model sees.
        channels: C.
        lateness_s: grace for late readings and for closing a silent station's step, seconds.
        max_pending: steps that may be open (not yet closed) at once beyond the lookback; a reading further ahead
            makes the agent close the older steps first. The ring holds ``lookback + max_pending`` steps.
        aggregate: [C] rule per channel for several readings inside one step: ``last``, ``mean`` or ``sum``
            (empty: ``last`` for every channel).
        max_readings_per_step: most distinct reading times of one channel inside one step under ``mean`` /
            ``sum`` (each is remembered while the step can still change, to make redeliveries idempotent); a
            reading beyond it is rejected as ``too_many_readings``.
    """

    cadence_s: int
    lookback: int
    channels: int
    lateness_s: float = 300.0
    max_pending: int = 48
    aggregate: tuple[str, ...] = ()
    max_readings_per_step: int = 1440

    def __post_init__(self) -> None:
        if self.cadence_s <= 0 or self.lookback <= 0 or self.channels <= 0 or self.max_pending <= 0:
            msg = f"window spec needs positive cadence, lookback, channels and max_pending, got {self}"
            raise ValueError(msg)
        if self.lateness_s < 0:
            msg = f"lateness_s must be >= 0, got {self.lateness_s}"
            raise ValueError(msg)
        if self.aggregate and (
            len(self.aggregate) != self.channels or any(a not in ("last", "mean", "sum") for a in self.aggregate)
        ):
            msg = f"aggregate needs one of last|mean|sum per channel ({self.channels}), got {self.aggregate}"
            raise ValueError(msg)
        if self.max_readings_per_step < 1:
            msg = f"max_readings_per_step must be >= 1, got {self.max_readings_per_step}"
            raise ValueError(msg)

    @property
    def capacity(self) -> int:
        """Ring length R = lookback + max_pending, steps."""
        return self.lookback + self.max_pending

    def step_of(self, ts_s: float) -> int:
        """Index of the step that holds the event time ``ts_s`` (seconds since the epoch)."""
        return int(math.floor(ts_s / self.cadence_s))


@dataclass(frozen=True)
class MergeResult:
    """What :meth:`StationWindow.merge` did.

    Attributes:
        accepted: the reading was merged (False: rejected, see ``reason``).
        kind: ``new`` (opened a newer step), ``current`` (an open step), ``late`` (a closed step, revision queued),
            ``duplicate`` (changed nothing), or the rejection kind ``too_old`` / ``too_late`` /
            ``too_many_readings``.
        reason: human-readable rejection reason ("" when accepted).
        step: the reading's step index.
    """

    accepted: bool
    kind: str
    reason: str
    step: int


@dataclass(frozen=True)
class ClosedStep:
    """One step :meth:`StationWindow.close_due` closed.

    Attributes:
        step: its index.
        touched: a reading (even an all-missing one) arrived for it (False: a missing step).
        gap: ``(first, last)`` of the run of incomplete steps this complete step ended, or None.
    """

    step: int
    touched: bool
    gap: tuple[int, int] | None


@dataclass(frozen=True)
class Closing:
    """What :meth:`StationWindow.close_due` did.

    Attributes:
        steps: the steps closed, oldest first.
        revision: ``(first, last)`` closed steps updated by late readings, to be revised (None: none, or not
            caught up yet).
        done: caught up with ``through`` (False: call again for the rest).
    """

    steps: tuple[ClosedStep, ...]
    revision: tuple[int, int] | None
    done: bool


class StationWindow:
    """A station's ring of the most recent ``lookback + max_pending`` steps.

    Args:
        spec: the shared :class:`WindowSpec`.

    The agent uses four verbs: :meth:`merge` (a reading), :meth:`close_due` (close steps, with the gaps they end and
    the late-reading revision), :meth:`skip_to` (drop a backlog unpublished) and :meth:`view` (the L steps a model
    reads). The cursors below are read-only: only the window moves them.

    Attributes:
        head: newest opened step index (None before the first reading).
        closed: newest closed step index (None before the first reading).
        ref_s: lateness reference, seconds: the newest reading time or clock time that closed a step.
        gap_start: first step of the current run of closed steps with an unobserved channel (None: no gap open).
        has_revision: closed steps were updated by late readings and wait for a revision.
    """

    def __init__(self, spec: WindowSpec) -> None:
        self.spec = spec
        R, C = spec.capacity, spec.channels
        self.values = np.full((R, C), np.nan, dtype=np.float32)  # physical units, NaN = unobserved
        self.observed = np.zeros((R, C), dtype=bool)
        self.offset = np.full((R, C), -1.0, dtype=np.float32)  # reading time within the step, s; -1 = none
        self.touched = np.zeros(R, dtype=bool)  # any reading (even all-missing) arrived for the step
        self.step_at = np.full(R, np.iinfo(np.int64).min, dtype=np.int64)  # which step a slot holds
        self._head: int | None = None
        self._closed: int | None = None
        self._ref_s: float = -math.inf
        self._gap_start: int | None = None
        self._revise_lo: int | None = None
        self._revise_hi: int | None = None
        # mean/sum channels: step -> channel -> {offset s: value} for every (step, channel) that got two or more
        # distinct reading times, kept while the step can still change (open, or closed within lateness).
        self._parts: dict[int, dict[int, dict[float, float]]] = {}
        agg = spec.aggregate or ("last",) * C
        self._combine = np.array([a != "last" for a in agg], dtype=bool)  # [C] True: mean or sum
        self._sum = np.array([a == "sum" for a in agg], dtype=bool)

    @property
    def head(self) -> int | None:
        return self._head

    @property
    def closed(self) -> int | None:
        return self._closed

    @property
    def ref_s(self) -> float:
        return self._ref_s

    @property
    def gap_start(self) -> int | None:
        return self._gap_start

    @property
    def has_revision(self) -> bool:
        return self._revise_lo is not None

    # -- ring bookkeeping ------------------------------------------------------------------------------------

    def _open_through(self, k: int) -> None:
        """Open steps head+1..k as empty (clearing their slots)."""
        R = self.spec.capacity
        assert self._head is not None
        first = max(self._head + 1, k - R + 1)
        for j in range(first, k + 1):
            s = j % R
            if self._parts:
                self._parts.pop(int(self.step_at[s]), None)
            self.values[s] = np.nan
            self.observed[s] = False
            self.offset[s] = -1.0
            self.touched[s] = False
            self.step_at[s] = j
        self._head = max(self._head, k)

    def start(self, k: int) -> None:
        """Initialise an empty window whose first open step is ``k`` (steps before it are closed and empty)."""
        self._head = k - 1
        self._closed = k - 1
        self._open_through(k)

    def holds(self, k: int) -> bool:
        """Whether step ``k`` is in the ring."""
        return self.step_at[k % self.spec.capacity] == k

    @property
    def pending(self) -> int:
        """Open steps not yet closed (head - closed)."""
        if self._head is None or self._closed is None:
            return 0
        return self._head - self._closed

    # -- readings --------------------------------------------------------------------------------------------

    def merge(self, ts_s: float, values: np.ndarray, observed: np.ndarray) -> MergeResult:
        """Merge one reading into its step.

        The caller (the agent) must first close steps so that the reading does not push an unclosed step out of the
        ring: when ``step_of(ts_s) - closed > max_pending`` it closes through ``step_of(ts_s) - 1`` (see
        :meth:`needs_close_before`).

        Args:
            ts_s: the reading's event time, seconds since the epoch.
            values: [C] float32, physical units; only positions where ``observed`` is True are used.
            observed: [C] bool, True for a valid value (missing kinds already removed by the parser).

        Returns:
            A :class:`MergeResult`.
        """
        k = self.spec.step_of(ts_s)
        placed = self._place(k)
        if isinstance(placed, MergeResult):
            return placed
        written = self._write(k, ts_s, values, observed)
        if isinstance(written, MergeResult):
            return written
        changed, was_touched = written
        if placed == "late":
            if not changed:
                return MergeResult(True, "duplicate", "", k)
            self._revise_lo = k if self._revise_lo is None else min(self._revise_lo, k)
            self._revise_hi = k if self._revise_hi is None else max(self._revise_hi, k)
        elif not changed and was_touched:
            return MergeResult(True, "duplicate", "", k)
        return MergeResult(True, placed, "", k)

    def _place(self, k: int) -> str | MergeResult:
        """Where step ``k`` falls: opens the ring through it when it is newer than the head (the first reading starts
        the window).

        Returns:
            ``"new"``, ``"late"`` (a closed step inside lateness) or ``"current"`` (an open step); or the rejecting
            :class:`MergeResult` (``too_old``, ``too_late``).

        Raises:
            ValueError: ``k`` is more than ``max_pending`` steps past the last closed step (close older steps first).
        """
        spec = self.spec
        first = self._head is None
        if first:
            self.start(k)
        assert self._head is not None and self._closed is not None
        if k > self._head:
            if k - self._closed > spec.max_pending:
                msg = f"step {k} is {k - self._closed} steps past the last closed one; close older steps first"
                raise ValueError(msg)
            self._open_through(k)
            return "new"
        if first:
            return "new"
        if not self.holds(k) or k <= self._head - spec.capacity:
            return MergeResult(
                False,
                "too_old",
                f"step {_iso(k * spec.cadence_s)} is older than the window (oldest held "
                f"{_iso((self._head - spec.capacity + 1) * spec.cadence_s)})",
                k,
            )
        if k <= self._closed:
            end = (k + 1) * spec.cadence_s
            if end + spec.lateness_s <= self._ref_s:
                return MergeResult(
                    False,
                    "too_late",
                    f"step {_iso(k * spec.cadence_s)} closed; its end + lateness {spec.lateness_s:g} s "
                    f"passed {self._ref_s - end - spec.lateness_s:g} s ago",
                    k,
                )
            return "late"
        return "current"

    def _write(self, k: int, ts_s: float, values: np.ndarray, observed: np.ndarray) -> tuple[bool, bool] | MergeResult:
        """Write a reading into step ``k``'s ring slot: mean/sum channels combine (:meth:`_combine_into`), "last"
        channels take the newest reading within the step (an equal time replaces: idempotent). Marks the slot
        touched and advances the reference time.

        Returns:
            ``(changed, was_touched)``: whether any held value changed, and whether the slot had been written before;
            or the ``too_many_readings`` :class:`MergeResult` (nothing written).
        """
        spec = self.spec
        s = k % spec.capacity
        off = np.float32(ts_s - k * spec.cadence_s)
        row_off, row_val, row_obs = self.offset[s], self.values[s], self.observed[s]  # views into the ring
        combine = observed & self._combine
        if combine.any():
            changed = self._combine_into(k, s, float(off), values, combine)
            if changed is None:
                return MergeResult(
                    False,
                    "too_many_readings",
                    f"step {_iso(k * spec.cadence_s)} already holds {spec.max_readings_per_step} readings of a "
                    "mean/sum channel (max_readings_per_step)",
                    k,
                )
            observed = observed & ~self._combine
        else:
            changed = False
        # "last": the newest reading within the step wins per channel; an equal time replaces (idempotent).
        take = observed & (row_off <= off)
        changed = bool((take & ((row_val != values) | ~row_obs | (row_off != off))).any()) or changed
        np.copyto(row_val, values, where=take)
        row_obs |= take
        np.copyto(row_off, off, where=take)
        was_touched = bool(self.touched[s])
        self.touched[s] = True
        self._ref_s = max(self._ref_s, float(ts_s))
        return changed, was_touched

    def _combine_into(self, k: int, s: int, off: float, values: np.ndarray, which: np.ndarray) -> bool | None:
        """Merge the ``which`` channels (mean/sum rules) of a reading at offset ``off`` into step ``k`` (slot ``s``).

        Returns:
            Whether the step changed; None when a channel is full (nothing merged, see ``max_readings_per_step``).
        """
        cap = self.spec.max_readings_per_step
        step_parts = self._parts.get(k, {})
        idx = np.flatnonzero(which)
        for i in idx:  # check first: a rejected reading changes nothing
            p = step_parts.get(int(i))
            n = len(p) if p is not None else int(self.observed[s, i])
            if n >= cap and (p is None or off not in p) and not (p is None and float(self.offset[s, i]) == off):
                return None
        changed = False
        for i in idx:
            i = int(i)
            x = float(values[i])
            p = step_parts.get(i)
            if p is None:
                if not self.observed[s, i] or float(self.offset[s, i]) == off:
                    # The first reading time of this channel in the step (or the same one again): a plain value.
                    changed |= not (self.observed[s, i] and self.values[s, i] == np.float32(x))
                    self.values[s, i] = x
                    self.observed[s, i] = True
                    self.offset[s, i] = off
                    continue
                p = {float(self.offset[s, i]): float(self.values[s, i])}
                step_parts = self._parts.setdefault(k, step_parts)
                step_parts[i] = p
            new_time = off not in p
            p[off] = float(np.float32(x))
            total = math.fsum(p.values())
            agg = np.float32(total if self._sum[i] else total / len(p))
            changed |= new_time or bool(agg != self.values[s, i])
            self.values[s, i] = agg
            self.offset[s, i] = max(float(self.offset[s, i]), off)
        return changed

    def _prune_parts(self) -> None:
        """Forget the reading times of steps that can no longer change (closed, and end + lateness passed)."""
        cad, late = self.spec.cadence_s, self.spec.lateness_s
        for k in [k for k in self._parts if self._closed is not None and k <= self._closed and (k + 1) * cad + late <= self._ref_s]:
            del self._parts[k]

    def needs_close_before(self, ts_s: float) -> int | None:
        """The step the agent must close through before merging a reading at ``ts_s`` (None: nothing to do)."""
        if self._closed is None:
            return None
        k = self.spec.step_of(ts_s)
        if k - self._closed > self.spec.max_pending:
            return k - 1
        return None

    # -- closing ---------------------------------------------------------------------------------------------

    def due_through(self, clock_s: float | None) -> int | None:
        """Newest step that is due to close: every step before the newest open one, and every step whose end +
        ``lateness_s`` is at or before ``clock_s``.

        Args:
            clock_s: the closing clock, seconds since the epoch (None: only readings close steps).

        Returns:
            The step index to close through, or None when nothing is due.
        """
        if self._head is None or self._closed is None:
            return None
        due = self._head - 1
        if clock_s is not None:
            due = max(due, int(math.floor((clock_s - self.spec.lateness_s) / self.spec.cadence_s)) - 1)
        return due if due > self._closed else None

    def advance_to(self, k: int) -> None:
        """Make sure step ``k`` is open (a silent station's steps are opened empty as the clock passes them)."""
        assert self._head is not None
        if k > self._head:
            self._open_through(k)

    def view(self, end: int) -> tuple[np.ndarray, np.ndarray]:
        """The L steps ending at step ``end`` (inclusive), oldest first.

        Args:
            end: the last step; must be in the ring, and so must the L - 1 steps before it (steps before the
                station's first reading count as unobserved).

        Returns:
            ``values [L, C] float32`` (physical units, NaN where unobserved) and ``observed [L, C] bool``.
        """
        L, R = self.spec.lookback, self.spec.capacity
        steps = np.arange(end - L + 1, end + 1)
        slots = steps % R
        held = self.step_at[slots] == steps  # [L] False before the first reading or outside the ring
        v = np.where(held[:, None], self.values[slots], np.nan).astype(np.float32, copy=False)
        m = self.observed[slots] & held[:, None]
        return v, m

    def step_touched(self, k: int) -> bool:
        """Whether any reading (even all-missing) arrived for step ``k``."""
        return self.holds(k) and bool(self.touched[k % self.spec.capacity])

    def step_observed(self, k: int) -> np.ndarray:
        """[C] bool observed mask of step ``k`` (all False when not held)."""
        if not self.holds(k):
            return np.zeros(self.spec.channels, dtype=bool)
        return self.observed[k % self.spec.capacity].copy()

    def mark_closed(self, k: int, clock_s: float | None = None) -> tuple[int, int] | None:
        """Record that step ``k`` (= closed + 1) has been closed and published.

        Args:
            k: the step just closed.
            clock_s: the clock that closed it, if the clock did (it becomes the lateness reference).

        Returns:
            ``(first, last)`` of a gap that this complete step ended (the run of incomplete steps just before it),
            or None.
        """
        assert self._closed is not None and k == self._closed + 1, (k, self._closed)
        self._closed = k
        if clock_s is not None:
            self._ref_s = max(self._ref_s, float(clock_s))
        if self._parts:
            self._prune_parts()
        complete = bool(self.observed[k % self.spec.capacity].all()) and self.holds(k)
        if not complete:
            if self._gap_start is None:
                self._gap_start = k
            return None
        if self._gap_start is not None:
            gap = (self._gap_start, k - 1)
            self._gap_start = None
            return gap
        return None

    def close_due(self, through: int | None, clock_s: float | None, max_steps: int) -> Closing:
        """Close the steps after :attr:`closed` through ``through``, at most ``max_steps`` of them (so every window
        a model reads is still in the ring); silent steps are opened empty. Once caught up, the range of closed
        steps that late readings updated is taken too.

        Args:
            through: the last step to close (None: none, only a pending revision).
            clock_s: the clock that made the steps due, seconds (it becomes the lateness reference for the steps
                no reading had opened); None when readings closed them.
            max_steps: most steps closed in this call.

        Returns:
            A :class:`Closing`.
        """
        assert self._closed is not None and self._head is not None
        steps: list[ClosedStep] = []
        if through is not None and through > self._closed:
            head_before = self._head
            last = min(through, self._closed + max_steps)
            self.advance_to(last)
            for j in range(self._closed + 1, last + 1):
                touched = self.step_touched(j)
                gap = self.mark_closed(j, clock_s if j >= head_before else None)
                steps.append(ClosedStep(j, touched, gap))
            if last < through:
                return Closing(tuple(steps), None, False)
        return Closing(tuple(steps), self.take_revision(), True)

    def skip_to(self, k: int) -> int:
        """Mark every step through ``k`` closed without publishing it (a backlog too old to catch up on); an open
        gap is forgotten (its revision would need the skipped steps).

        Returns:
            How many steps were skipped (0 when ``k`` is not after :attr:`closed`).
        """
        assert self._closed is not None
        skip = k - self._closed
        if skip <= 0:
            return 0
        if k >= (self._head if self._head is not None else k):
            self.start(k + 1)
        else:  # pragma: no cover - the agent skips only beyond head (head - closed <= max_pending < skip)
            self._closed = k
        self._gap_start = None
        return skip

    def take_revision(self) -> tuple[int, int] | None:
        """Pop the range of closed steps updated by late readings (None: none)."""
        if self._revise_lo is None or self._revise_hi is None:
            return None
        r = (self._revise_lo, self._revise_hi)
        self._revise_lo = self._revise_hi = None
        return r

    # -- state -----------------------------------------------------------------------------------------------

    def export_state(self) -> tuple[dict[str, np.ndarray], dict[str, object]]:
        """The window as arrays + JSON-able scalars (for snapshots; see ``gapcast.edge.state``)."""
        arrays = {
            "values": self.values.copy(),
            "observed": self.observed.copy(),
            "offset": self.offset.copy(),
            "touched": self.touched.copy(),
            "step_at": self.step_at.copy(),
        }
        cad = self.spec.cadence_s
        meta: dict[str, object] = {
            "head": self._head,
            "closed": self._closed,
            "ref_s": self._ref_s if math.isfinite(self._ref_s) else None,
            "gap_start": self._gap_start,
            "revise_lo": self._revise_lo,
            "revise_hi": self._revise_hi,
            "last_published_step_s": None if self._closed is None else self._closed * cad,
        }
        if self._parts:  # mean/sum reading times of steps that can still change: [[step, channel, [[off, v]...]]]
            meta["parts"] = [
                [k, i, [[o, v] for o, v in sorted(p.items())]] for k, ch in sorted(self._parts.items()) for i, p in sorted(ch.items())
            ]
        return arrays, meta

    @classmethod
    def from_state(cls, spec: WindowSpec, arrays: dict[str, np.ndarray], meta: dict[str, object]) -> StationWindow:
        """Rebuild a window from :meth:`export_state` output.

        Raises:
            ValueError: the arrays do not match ``spec`` (another model's lookback or channels).
        """
        w = cls(spec)
        for name in ("values", "observed", "offset", "touched", "step_at"):
            a = np.asarray(arrays[name])
            cur = getattr(w, name)
            if a.shape != cur.shape:
                msg = f"snapshot array {name} has shape {a.shape}, this window needs {cur.shape}"
                raise ValueError(msg)
            cur[...] = a
        w._head = None if meta.get("head") is None else int(meta["head"])  # type: ignore[arg-type]
        w._closed = None if meta.get("closed") is None else int(meta["closed"])  # type: ignore[arg-type]
        w._ref_s = -math.inf if meta.get("ref_s") is None else float(meta["ref_s"])  # type: ignore[arg-type]
        for k in ("gap_start", "revise_lo", "revise_hi"):
            v = meta.get(k)
            setattr(w, "_" + k, None if v is None else int(v))  # type: ignore[arg-type]
        for k, i, parts in meta.get("parts") or ():  # type: ignore[union-attr]
            w._parts.setdefault(int(k), {})[int(i)] = {float(o): float(v) for o, v in parts}
        return w


_iso = format_rfc3339
