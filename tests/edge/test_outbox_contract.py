"""One contract suite for every :class:`gapcast.edge.outbox.Outbox`: the SQLite outbox and the in-memory one."""

from __future__ import annotations

import pytest

from gapcast.edge.outbox import Outbox, OutboxConfig, OutboxMessage, SQLiteOutbox
from gapcast.edge.outbox_memory import MemoryOutbox


class Tick:
    """A settable age clock, seconds."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def msg(i: int, kind: str = "filled") -> OutboxMessage:
    return OutboxMessage(topic=f"t/{i}", payload=b"%08d" % i, kind=kind, msg_id=f"id-{i}")  # 11 or 12 bytes


@pytest.fixture(params=["sqlite", "memory"])
def make(request, tmp_path):
    made = []

    def factory(max_bytes: int = 1 << 20, max_age_s: float = 0.0, clock=None) -> Outbox:
        clock = clock or Tick()
        if request.param == "sqlite":
            box = SQLiteOutbox(OutboxConfig(path=tmp_path / "o.db", max_bytes=max_bytes, max_age_s=max_age_s), clock=clock)
        else:
            box = MemoryOutbox(max_bytes=max_bytes, clock=clock, max_age_s=max_age_s)
        made.append(box)
        return box

    factory.kind = request.param
    yield factory
    for b in made:
        b.close()


def test_declares_the_protocol_attributes(make):
    box = make()
    assert box.ready is True
    assert box.durable is (make.kind == "sqlite")
    assert (box.bucket is not None) is (make.kind == "sqlite")


def test_order_in_flight_ack_release(make):
    box = make()
    ids = box.put_many([msg(i) for i in range(5)])
    assert len(set(ids)) == 5 and all(i > 0 for i in ids)
    first = box.next_batch(2)
    assert [m.msg_id for _, m in first] == ["id-0", "id-1"]
    assert [m.msg_id for _, m in box.next_batch(10)] == ["id-2", "id-3", "id-4"]  # in-flight ones not handed twice
    assert box.next_batch(10) == []
    box.ack(first[0][0])
    assert len(box) == 4 and box.stats()["depth"] == 4
    assert box.release() == 4
    assert [m.msg_id for _, m in box.next_batch(10)] == ["id-1", "id-2", "id-3", "id-4"]
    assert box.stats()["acked"] == {"filled": 1}


def test_cap_drops_droppable_kinds_first_and_counts(make):
    size = len(msg(0).payload) + len("t/0")  # 11 bytes
    box = make(max_bytes=3 * size)
    box.put(msg(0, "forecast"))
    box.put(msg(1, "filled"))
    box.put(msg(2, "filled"))
    box.put(msg(3, "filled"))  # no room: the forecast goes, not a filled value
    assert [m.msg_id for _, m in box.next_batch(10)] == ["id-1", "id-2", "id-3"]
    st = box.stats()
    assert st["dropped"] == {"forecast": 1} and st["dropped_total"] == 1


def test_ages_run_on_the_age_clock(make):
    clock = Tick()
    box = make(max_age_s=3600, clock=clock)
    box.put(msg(0, "forecast"))
    clock.t += 1800
    box.put(msg(1))
    assert box.stats()["oldest_age_s"] == 1800.0
    clock.t += 1801
    assert [m.msg_id for _, m in box.next_batch(10)] == ["id-1"]
    assert box.stats()["expired"] == {"forecast": 1}


def test_journal_written_with_outputs_and_truncated(make):
    box = make()
    box.put_many([msg(0)], journal=[("ingest", 10.0, "a/readings", b"{}", False), ("tick", 11.0, "", b"", False)])
    box.put_many([], journal=[("tick", 12.0, "", b"", False)])
    seq = box.journal_seq()
    assert seq == 3
    assert [(e.op, e.now_s) for e in box.journal_entries(0)] == [("ingest", 10.0), ("tick", 11.0), ("tick", 12.0)]
    assert [e.seq for e in box.journal_entries(1)] == [2, 3]
    assert box.journal_truncate(2) == 2
    assert [e.seq for e in box.journal_entries(0)] == [3]


def test_stats_carry_every_contract_key(make):
    st = make().stats()
    for key in ("depth", "bytes", "inflight", "oldest_age_s", "max_bytes", "put", "acked", "dropped", "expired",
                "dropped_total", "reserve_dropped", "disk_full", "free_bytes", "min_free_bytes", "ready"):
        assert key in st, key
    assert st["disk_full"] is False and st["depth"] == 0
