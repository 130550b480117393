"""The station window: hand-computed merges, late/duplicate/out-of-order/too-late/too-old readings, closing."""

from __future__ import annotations

import numpy as np
import pytest

from gapcast.edge.window import Closing, StationWindow, WindowSpec

CAD = 3600
T0 = 1_483_228_800  # 2017-01-01T00:00:00Z; step index T0 // 3600 = 412_008
K0 = T0 // CAD
NAN = np.nan


def spec(**kw):
    kw.setdefault("cadence_s", CAD)
    kw.setdefault("lookback", 4)
    kw.setdefault("channels", 3)
    kw.setdefault("lateness_s", 600.0)
    kw.setdefault("max_pending", 3)
    return WindowSpec(**kw)


def rd(a=NAN, b=NAN, c=NAN):
    v = np.array([a, b, c], dtype=np.float32)
    return v, ~np.isnan(v)


def test_partial_readings_merge_into_their_step():
    w = StationWindow(spec())
    assert w.merge(T0 + 60, *rd(a=1.0)).kind == "new"
    assert w.merge(T0 + 1800, *rd(b=2.0)).kind == "current"
    assert w.merge(T0 + 3599, *rd(c=3.0)).kind == "current"
    v, m = w.view(K0)
    np.testing.assert_array_equal(v[-1], [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(m[-1], [True, True, True])
    # The three steps before the first reading are unobserved (NaN, mask False).
    assert np.isnan(v[:3]).all() and not m[:3].any()
    assert w.head == K0 and w.closed == K0 - 1


def test_newest_reading_in_a_step_wins_and_duplicates_are_idempotent():
    w = StationWindow(spec())
    w.merge(T0 + 1200, *rd(a=5.0, b=1.0))
    # An older reading of the same step arriving later does not overwrite the newer value.
    r = w.merge(T0 + 600, *rd(a=3.0, c=7.0))
    assert r.accepted
    v, m = w.view(K0)
    np.testing.assert_array_equal(v[-1], [5.0, 1.0, 7.0])
    before = (w.values.copy(), w.observed.copy(), w.offset.copy())
    dup = w.merge(T0 + 1200, *rd(a=5.0, b=1.0))
    assert (dup.accepted, dup.kind) == (True, "duplicate")
    np.testing.assert_array_equal(w.values, before[0])
    np.testing.assert_array_equal(w.observed, before[1])
    np.testing.assert_array_equal(w.offset, before[2])
    # Same timestamp, new value: replaces (last writer wins on a tie).
    w.merge(T0 + 1200, *rd(a=6.0))
    assert w.view(K0)[0][-1, 0] == 6.0


def test_out_of_order_steps_before_closing():
    w = StationWindow(spec())
    w.merge(T0, *rd(a=1.0, b=1.0, c=1.0))
    w.merge(T0 + 2 * CAD, *rd(a=3.0))  # step 2 first
    r = w.merge(T0 + CAD, *rd(a=2.0))  # then step 1: still open
    assert r.kind == "current"
    v, m = w.view(K0 + 2)
    np.testing.assert_array_equal(v[1:, 0], [1.0, 2.0, 3.0])
    assert w.due_through(None) == K0 + 1  # steps 0 and 1 are due: a later step's reading arrived


def test_late_reading_updates_a_closed_step_and_queues_a_revision():
    w = StationWindow(spec(lateness_s=600.0))
    w.merge(T0, *rd(a=1.0, b=1.0, c=1.0))
    w.merge(T0 + CAD + 10, *rd(a=2.0, b=2.0))  # step 1 opens, step 0 due
    assert w.mark_closed(K0) is None
    # Step 0 ended at T0 + 3600; the station's newest time is T0 + 3610 < end + 600: still accepted.
    r = w.merge(T0 + 5, *rd(c=9.0))
    assert (r.accepted, r.kind) == (True, "late")
    assert w.view(K0)[0][-1, 2] == 9.0
    assert w.take_revision() == (K0, K0)
    assert w.take_revision() is None
    # A late duplicate changes nothing and queues nothing.
    assert w.merge(T0 + 5, *rd(c=9.0)).kind == "duplicate"
    assert w.take_revision() is None


def test_too_late_and_too_old_are_rejected_with_reasons():
    w = StationWindow(spec(lateness_s=600.0))
    w.merge(T0, *rd(a=1.0))
    w.merge(T0 + CAD + 700, *rd(a=2.0))  # newest time is 700 s past step 0's end
    w.mark_closed(K0)
    r = w.merge(T0 + 10, *rd(b=1.0))
    assert (r.accepted, r.kind) == (False, "too_late")
    assert "2017-01-01T00:00:00Z" in r.reason and "100 s ago" in r.reason
    # Walk forward past the ring (lookback 4 + pending 3 = 7 steps).
    for j in range(2, 9):
        w.merge(T0 + j * CAD, *rd(a=float(j)))
        w.mark_closed(w.closed + 1)
    assert w.head == K0 + 8
    old = w.merge(T0 + CAD, *rd(a=1.0))  # step 1 is no longer held (oldest held: step 2)
    assert (old.accepted, old.kind) == (False, "too_old")
    assert "older than the window" in old.reason


def test_clock_closes_a_silent_station_and_gaps_are_tracked():
    w = StationWindow(spec(lateness_s=600.0))
    w.merge(T0, *rd(a=1.0, b=1.0, c=1.0))
    w.merge(T0 + CAD, *rd(a=1.0, b=1.0, c=1.0))
    # Readings alone: step 0 is due. Clock at T0 + 4 h + 600 s: steps through 2 (ends T0 + 3 h) are due... and 3
    # (ends T0 + 4 h, + 600 s lateness = the clock).
    assert w.due_through(None) == K0
    assert w.due_through(T0 + 4 * CAD + 599) == K0 + 2
    assert w.due_through(T0 + 4 * CAD + 600) == K0 + 3
    w.mark_closed(K0)
    w.mark_closed(K0 + 1)
    w.advance_to(K0 + 3)
    assert w.mark_closed(K0 + 2, clock_s=T0 + 4 * CAD + 600) is None  # silent: gap opens
    assert w.mark_closed(K0 + 3, clock_s=T0 + 4 * CAD + 600) is None
    assert w.gap_start == K0 + 2
    # The clock became the lateness reference: a reading for step 2 now is too late.
    assert w.merge(T0 + 2 * CAD, *rd(a=1.0)).kind == "too_late"
    w.merge(T0 + 4 * CAD, *rd(a=4.0, b=4.0, c=4.0))
    w.merge(T0 + 5 * CAD, *rd(a=5.0))
    assert w.mark_closed(K0 + 4) == (K0 + 2, K0 + 3)  # a complete step ends the gap: exactly steps 2..3
    assert w.gap_start is None


def test_a_reading_too_far_ahead_requires_closing_first():
    w = StationWindow(spec(max_pending=3))
    w.merge(T0, *rd(a=1.0))
    # Open steps 0..2 (3 = max_pending) are fine; step 3 would be a 4th open step: close through step 2 first.
    assert w.needs_close_before(T0 + 2 * CAD) is None
    assert w.needs_close_before(T0 + 3 * CAD) == K0 + 2
    with pytest.raises(ValueError, match="close older steps first"):
        w.merge(T0 + 3 * CAD, *rd(a=1.0))


def test_state_round_trip():
    s = spec()
    w = StationWindow(s)
    w.merge(T0, *rd(a=1.0, b=2.0))
    w.merge(T0 + CAD, *rd(c=3.0))
    w.mark_closed(K0)
    arrays, meta = w.export_state()
    assert meta["last_published_step_s"] == T0
    w2 = StationWindow.from_state(s, arrays, meta)
    for name in ("values", "observed", "offset", "touched", "step_at"):
        np.testing.assert_array_equal(getattr(w2, name), getattr(w, name))
    assert (w2.head, w2.closed, w2.ref_s) == (w.head, w.closed, w.ref_s)
    with pytest.raises(ValueError, match="shape"):
        StationWindow.from_state(spec(lookback=5), arrays, meta)


def test_close_due_closes_reports_gaps_and_takes_the_revision_once_caught_up():
    w = StationWindow(spec(lateness_s=600.0, max_pending=3))
    w.merge(T0, *rd(a=1.0, b=1.0, c=1.0))
    w.merge(T0 + CAD, *rd(a=1.0))  # step 1 incomplete
    # The clock makes steps 1..4 due (step 2..4 silent); at most 2 per call.
    first = w.close_due(K0 + 4, T0 + 6 * CAD, 2)
    assert [(s.step, s.touched, s.gap) for s in first.steps] == [(K0, True, None), (K0 + 1, True, None)]
    assert (first.done, first.revision, w.closed) == (False, None, K0 + 1)
    rest = w.close_due(K0 + 4, T0 + 6 * CAD, 2)
    assert [(s.step, s.touched) for s in rest.steps] == [(K0 + 2, False), (K0 + 3, False)] and not rest.done
    last = w.close_due(K0 + 4, T0 + 6 * CAD, 2)
    assert [s.step for s in last.steps] == [K0 + 4] and last.done and w.gap_start == K0 + 1
    assert w.ref_s == T0 + 6 * CAD  # the clock closed silent steps: it is the lateness reference
    w.merge(T0 + 5 * CAD, *rd(a=5.0, b=5.0, c=5.0))
    w.merge(T0 + 6 * CAD + 1, *rd(a=6.0))
    end = w.close_due(K0 + 5, None, 2)
    assert [(s.step, s.gap) for s in end.steps] == [(K0 + 5, (K0 + 1, K0 + 4))]  # a complete step ends the gap
    # A late reading for a closed step within lateness: only a revision, taken once.
    assert w.merge(T0 + 5 * CAD + 10, *rd(b=7.0)).kind == "late"
    assert w.close_due(None, None, 2) == Closing((), (K0 + 5, K0 + 5), True)
    assert w.close_due(None, None, 2) == Closing((), None, True)


def test_skip_to_drops_a_backlog_and_the_cursors_are_read_only():
    w = StationWindow(spec())
    w.merge(T0, *rd(a=1.0))
    w.close_due(K0, None, 3)
    assert w.gap_start == K0
    assert w.skip_to(K0 + 50) == 50 and (w.closed, w.head, w.gap_start) == (K0 + 50, K0 + 51, None)
    assert w.skip_to(K0 + 10) == 0
    v, m = w.view(K0 + 51)
    assert not m.any()  # the skipped steps are empty, never published
    for cursor in ("head", "closed", "ref_s", "gap_start", "has_revision"):
        with pytest.raises(AttributeError):
            setattr(w, cursor, 0)


def test_the_agent_moves_windows_only_through_their_verbs():
    import re
    from pathlib import Path

    src = (Path(__file__).resolve().parents[2] / "edge" / "agent.py").read_text()
    assert not re.findall(r"\bw\.(_\w+|start|mark_closed|advance_to|step_touched|take_revision)\b", src)
    assert not re.findall(r"\bw\.\w+\s*=[^=]", src)
