"""Event time for the gateway: monotonic time mapped to the wall clock, and when to believe the wall clock.

Pure apart from :func:`timesyncd_synced` (it reads one file): the shell passes the clock readings.

- :class:`EventClock` maps monotonic time to event time, ``now(mono) = mono + offset``. Between corrections a wall
  clock that slews or jumps changes nothing: ticks, step closing and the outbox's ages run on monotonic time.
- :class:`ClockWatch` compares the wall clock with the event clock on every loop of the shell. A difference beyond
  ``step_s`` is a wall-clock correction (an NTP step, a manual change, the first sync of a board without an RTC):
  the event clock is re-anchored to the wall clock once, logged and counted. A wall clock that is not believable --
  a sync probe says "not synchronised yet", or it reads earlier than the newest reading the agent already holds
  (the windows restored from disk included) -- puts the agent in ``unsynced``: the shell holds readings (not
  ingested, not acknowledged: the broker keeps them) and closes no step on the clock until the clock is believable,
  then re-anchors and goes on. Nothing is rejected as ``future`` because of a wrong gateway clock.

Steps inside a corrected span (README "Reliability"): after a FORWARD correction by D seconds the gateway clock
closes every step whose end + lateness falls inside the span at once, each exactly once and in order, as after a
downtime of D (silent stations' steps are filled as gaps; at most ``max_catchup_steps`` per station, older ones are
skipped, counted and logged). After a BACKWARD correction the steps already closed stay closed: none is re-opened or
published again; a reading for one of them is merged as a late reading (a revision) or dead-lettered as
``too_late``/``too_old`` by the usual rules.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ClockVerdict", "ClockWatch", "EventClock", "timesyncd_synced"]

log = logging.getLogger(__name__)

#: A wall clock further than this from the event clock is a correction, seconds. NTP daemons step at 0.128 s
#: (ntpd) or 1 s (chrony ``makestep``) and slew below; a slew of at most 500 ppm takes hours to reach 5 s, after which
#: the event clock is re-anchored by those 5 s (harmless: no step is skipped or repeated).
DEFAULT_STEP_S = 5.0

#: The file systemd-timesyncd creates once it has synchronised the clock (systemd >= 239).
TIMESYNCD_FLAG = Path("/run/systemd/timesync/synchronized")


class EventClock:
    """Event time from monotonic time: ``now(mono) = wall_at_anchor + (mono - mono_at_anchor)``.

    Anchored at start-up and re-anchored only by :meth:`reanchor` (which :class:`ClockWatch` calls on a detected
    correction), so slews and jumps of the wall clock between corrections neither skip nor repeat steps.

    Args:
        wall_s: wall-clock time at the anchor, seconds since the epoch.
        mono_s: monotonic time at the anchor, seconds.
    """

    def __init__(self, wall_s: float, mono_s: float) -> None:
        self.offset_s = float(wall_s) - float(mono_s)

    def now(self, mono_s: float) -> float:
        """Event time, seconds since the epoch, for monotonic time ``mono_s``."""
        return float(mono_s) + self.offset_s

    def reanchor(self, wall_s: float, mono_s: float) -> float:
        """Anchor to the wall clock again; returns the shift of event time, seconds (positive: forward)."""
        shift = float(wall_s) - self.now(mono_s)
        self.offset_s += shift
        return shift


@dataclass(frozen=True)
class ClockVerdict:
    """What :meth:`ClockWatch.observe` decided.

    Attributes:
        synced: the wall clock is believable; when False the shell holds readings and closes no step on the clock.
        shift_s: the event clock was re-anchored by this much now, seconds (0.0: no correction).
        reason: why the clock is not believable ("" when it is).
    """

    synced: bool
    shift_s: float = 0.0
    reason: str = ""


class ClockWatch:
    """Detects wall-clock corrections and decides whether the wall clock is believable. Pure.

    Args:
        clock: the event clock to re-anchor.
        step_s: a wall/event difference beyond this is a correction, seconds.

    Attributes:
        corrections: corrections applied so far; ``last_shift_s``: the latest one, seconds.
        unsynced_episodes: how often the clock turned not believable.
    """

    def __init__(self, clock: EventClock, step_s: float = DEFAULT_STEP_S) -> None:
        if step_s <= 0:
            msg = f"clock step threshold must be positive, got {step_s}"
            raise ValueError(msg)
        self.clock = clock
        self.step_s = float(step_s)
        self.synced = True
        self.reason = ""
        self.corrections = 0
        self.last_shift_s = 0.0
        self.unsynced_episodes = 0

    def observe(
        self, wall_s: float, mono_s: float, *, probe: bool | None = None, floor_s: float | None = None
    ) -> ClockVerdict:
        """Compare the wall clock with the event clock.

        Args:
            wall_s: the wall clock now, seconds since the epoch.
            mono_s: the monotonic clock now, seconds.
            probe: a sync probe's answer (False: not synchronised yet; None: unknown).
            floor_s: the wall clock cannot be earlier than this (the newest reading held minus the allowed lead),
                seconds since the epoch; None when nothing is known.

        Returns:
            The verdict; a correction or a change of believability is logged here, once.
        """
        reason = ""
        if probe is False:
            reason = "the clock is not synchronised yet (sync probe)"
        elif floor_s is not None and wall_s < floor_s:
            reason = f"the wall clock reads {floor_s - wall_s:.0f} s earlier than the newest reading already held"
        if reason:
            if self.synced:
                self.synced = False
                self.unsynced_episodes += 1
                log.warning("clock: unsynced, %s: holding readings (not acknowledged) until it is believable", reason)
            self.reason = reason
            return ClockVerdict(False, 0.0, reason)
        if not self.synced:
            self.synced = True
            self.reason = ""
            log.warning("clock: believable again")
        shift = 0.0
        if abs(wall_s - self.clock.now(mono_s)) > self.step_s:
            shift = self.clock.reanchor(wall_s, mono_s)
            self.corrections += 1
            self.last_shift_s = shift
            log.warning(
                "clock: the wall clock was corrected by %+.1f s; event time re-anchored (%s)",
                shift,
                "the steps inside the span close now, once each" if shift > 0 else "closed steps stay closed",
            )
        return ClockVerdict(True, shift, "")

    def status(self) -> dict:
        """``state`` (``synced``/``unsynced``), ``reason``, ``corrections``, ``last_shift_s``."""
        return {
            "state": "synced" if self.synced else "unsynced",
            "reason": self.reason,
            "corrections": self.corrections,
            "last_shift_s": round(self.last_shift_s, 3),
            "unsynced_episodes": self.unsynced_episodes,
        }


def timesyncd_synced(flag: Path = TIMESYNCD_FLAG) -> bool | None:
    """The default sync probe: systemd-timesyncd's flag file. True once it synchronised, False while its runtime
    folder exists without the flag, None (unknown) where timesyncd does not run (chrony, containers, other OSes).

    The kernel's own ``adjtimex`` state is not used: many containers and VMs report "unsynchronised" forever.
    """
    try:
        if flag.exists():
            return True
        return False if flag.parent.is_dir() else None
    except OSError:
        return None
