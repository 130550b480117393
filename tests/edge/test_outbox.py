"""The durable SQLite outbox: acknowledgement, order, restart, caps, drop policy, age, token bucket."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from gapcast.edge.outbox import OutboxConfig, OutboxError, OutboxMessage, SQLiteOutbox, TokenBucket


class FakeClock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def msg(i: int, kind: str = "filled", size: int = 10) -> OutboxMessage:
    payload = f"{i:0{size}d}".encode()[:size].ljust(size, b"x")
    return OutboxMessage(topic=f"t/{i}", payload=payload, kind=kind, msg_id=f"id-{i}")


def ids_of(batch):
    return [m.msg_id for _, m in batch]


def test_wal_mode_and_schema(tmp_path):
    box = SQLiteOutbox(OutboxConfig(path=tmp_path / "o.db"))
    box.put(msg(0))
    mode = box._db.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    box.close()


def test_message_leaves_only_when_acked(tmp_path):
    box = SQLiteOutbox(OutboxConfig(path=tmp_path / "o.db"))
    oid = [box.put(msg(i)) for i in range(5)]
    batch = box.next_batch(3)
    assert ids_of(batch) == ["id-0", "id-1", "id-2"]
    assert [i for i, _ in batch] == oid[:3]
    # In flight: not handed out twice.
    assert ids_of(box.next_batch(10)) == ["id-3", "id-4"]
    assert box.next_batch(10) == []
    assert box.stats()["depth"] == 5
    box.ack(oid[1])
    assert box.stats()["depth"] == 4
    assert box.stats()["acked"] == {"filled": 1}
    box.close()
    # After a restart: everything not acked is still there, in order (in-flight state is not persisted).
    box = SQLiteOutbox(OutboxConfig(path=tmp_path / "o.db"))
    assert ids_of(box.next_batch(10)) == ["id-0", "id-2", "id-3", "id-4"]
    box.close()


def test_unflushed_ack_survives_as_duplicate_only(tmp_path):
    """A crash after the PUBACK but before the batched delete re-sends the message: at-least-once, never lost."""
    path = tmp_path / "o.db"
    box = SQLiteOutbox(OutboxConfig(path=path))
    a = box.put(msg(0))
    box.put(msg(1))
    box.next_batch(2)
    box.ack(a)
    # Simulated crash: open a second connection without closing (no flush) the first.
    other = SQLiteOutbox(OutboxConfig(path=path))
    assert ids_of(other.next_batch(10)) == ["id-0", "id-1"]
    other.close()
    box._db.close()


def test_release_requeues_in_original_order(tmp_path):
    box = SQLiteOutbox(OutboxConfig(path=tmp_path / "o.db"))
    for i in range(4):
        box.put(msg(i))
    first = box.next_batch(2)
    box.ack(first[0][0])
    assert box.release() == 1  # id-1 was still in flight
    assert ids_of(box.next_batch(10)) == ["id-1", "id-2", "id-3"]
    box.close()


def test_put_many_is_one_transaction_and_ordered(tmp_path):
    box = SQLiteOutbox(OutboxConfig(path=tmp_path / "o.db"))
    out = box.put_many(msg(i) for i in range(100))
    assert out == sorted(out) and len(set(out)) == 100
    assert ids_of(box.next_batch(1000)) == [f"id-{i}" for i in range(100)]
    box.close()


def test_accepts_duck_typed_messages_and_str_payloads(tmp_path):
    class Plain:
        topic = "a/b"
        payload = '{"x": 1}'
        qos = 1
        retain = True
        kind = "status"

    box = SQLiteOutbox(OutboxConfig(path=tmp_path / "o.db"))
    box.put(Plain())
    [(_, m)] = box.next_batch(1)
    assert (m.topic, m.payload, m.retain, m.kind) == ("a/b", b'{"x": 1}', True, "status")
    with pytest.raises(TypeError):

        class Bad:
            topic = "x"
            payload = 3

        box.put(Bad())
    box.close()


def test_cap_drops_oldest_forecasts_first_then_others(tmp_path):
    # Each message is 10 payload bytes + 3 or 4 topic bytes; cap 10 messages' worth.
    size = msg(0).size_bytes  # "t/0" + 10 = 13 bytes
    assert size == 13
    box = SQLiteOutbox(OutboxConfig(path=tmp_path / "o.db", max_bytes=13 * 10))
    kinds = ["filled", "forecast"] * 5  # ids 0..9: even filled, odd forecast
    for i, k in enumerate(kinds):
        box.put(msg(i, kind=k))
    assert box.stats()["bytes"] == 130 and box.stats()["dropped_total"] == 0
    # Three more filled messages: the three OLDEST forecasts (1, 3, 5) go.
    for i in (10, 11, 12):
        box.put(OutboxMessage(topic="t/x", payload=b"0123456789", kind="filled", msg_id=f"id-{i}"))
    left = ids_of(box.next_batch(100))
    assert left == ["id-0", "id-2", "id-4", "id-6", "id-7", "id-8", "id-9", "id-10", "id-11", "id-12"]
    st = box.stats()
    assert st["dropped"] == {"forecast": 3}
    assert st["bytes"] <= 130
    box.release()
    # Two forecasts left (7, 9); four more filled: both forecasts go, then the two oldest filled (0, 2).
    for i in (13, 14, 15, 16):
        box.put(OutboxMessage(topic="t/x", payload=b"0123456789", kind="filled", msg_id=f"id-{i}"))
    left = ids_of(box.next_batch(100))
    assert left == ["id-4", "id-6", "id-8"] + [f"id-{i}" for i in range(10, 17)]
    assert box.stats()["dropped"] == {"forecast": 5, "filled": 2}
    assert box.stats()["dropped_total"] == 7
    box.close()


def test_drop_order_prefers_deadletter_before_filled(tmp_path):
    box = SQLiteOutbox(OutboxConfig(path=tmp_path / "o.db", max_bytes=13 * 3))
    box.put(msg(0, "filled"))
    box.put(msg(1, "deadletter"))
    box.put(msg(2, "filled"))
    box.put(msg(3, "filled"))
    assert ids_of(box.next_batch(10)) == ["id-0", "id-2", "id-3"]
    assert box.stats()["dropped"] == {"deadletter": 1}
    box.close()


def test_message_larger_than_cap_is_refused_and_counted(tmp_path, caplog):
    box = SQLiteOutbox(OutboxConfig(path=tmp_path / "o.db", max_bytes=20))
    assert box.put(msg(0, size=100)) == -1
    assert box.stats()["dropped"] == {"filled": 1}
    assert "dropped" in caplog.text
    assert box.next_batch(10) == []
    box.close()


def test_in_flight_messages_are_dropped_last(tmp_path):
    box = SQLiteOutbox(OutboxConfig(path=tmp_path / "o.db", max_bytes=13 * 3))
    for i in range(3):
        box.put(msg(i, "forecast"))
    box.next_batch(1)  # id-0 in flight
    box.put(msg(3, "forecast"))
    box.release()
    assert ids_of(box.next_batch(10)) == ["id-0", "id-2", "id-3"]
    box.close()


def test_age_bound_expires_and_counts(tmp_path):
    clock = FakeClock()
    box = SQLiteOutbox(OutboxConfig(path=tmp_path / "o.db", max_age_s=3600), clock=clock)
    box.put(msg(0, "forecast"))
    clock.t += 1800
    box.put(msg(1, "filled"))
    assert box.stats()["oldest_age_s"] == 1800.0
    clock.t += 1801  # id-0 is now 3601 s old, id-1 1801 s
    assert ids_of(box.next_batch(10)) == ["id-1"]
    st = box.stats()
    assert st["expired"] == {"forecast": 1} and st["dropped_total"] == 1
    box.close()


def test_restart_keeps_totals_and_cap(tmp_path):
    cfg = OutboxConfig(path=tmp_path / "o.db", max_bytes=13 * 4)
    box = SQLiteOutbox(cfg)
    for i in range(4):
        box.put(msg(i))
    box.close()
    box = SQLiteOutbox(cfg)
    assert box.stats()["bytes"] == 52 and box.stats()["depth"] == 4
    box.put(msg(4))  # must evict the oldest (no forecasts present)
    assert ids_of(box.next_batch(10)) == ["id-1", "id-2", "id-3", "id-4"]
    box.close()


def test_disk_stays_bounded_under_churn(tmp_path):
    """30x the cap pushed through: the file stays within a constant of the cap (freed pages are reused)."""
    cap = 256 * 1024
    box = SQLiteOutbox(OutboxConfig(path=tmp_path / "o.db", max_bytes=cap, synchronous="NORMAL"))
    payload = b"p" * 1000
    for k in range(30):
        box.put_many(OutboxMessage(topic=f"s/{k}/{i}", payload=payload, kind="forecast") for i in range(262))
    st = box.stats()
    assert st["bytes"] <= cap
    assert st["dropped"]["forecast"] + st["depth"] == 30 * 262  # every message is either kept or counted
    assert st["depth"] == cap // 1008  # the newest ones, ~1008 bytes each, fill the cap
    box.flush()
    # SQLite keeps at most the cap in live pages (x2 for page slack and the indexes), plus a WAL of about 1 MiB;
    # 30x the cap went through it.
    assert box.disk_bytes() < 2 * cap + 2 * 1024 * 1024
    box.close()


def test_schema_version_mismatch_raises(tmp_path):
    path = tmp_path / "o.db"
    SQLiteOutbox(OutboxConfig(path=path)).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with pytest.raises(OutboxError, match="schema version 99"):
        SQLiteOutbox(OutboxConfig(path=path))


def test_unopenable_database_raises_outbox_error(tmp_path):
    bad = tmp_path / "o.db"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(OutboxError):
        SQLiteOutbox(OutboxConfig(path=bad))


def test_acks_from_another_thread(tmp_path):
    box = SQLiteOutbox(OutboxConfig(path=tmp_path / "o.db", synchronous="NORMAL"))
    box.put_many(msg(i) for i in range(500))
    batch = box.next_batch(500)

    def acker():
        for oid, _ in batch:
            box.ack(oid)

    th = threading.Thread(target=acker)
    th.start()
    for i in range(500, 600):
        box.put(msg(i))
    th.join()
    assert box.stats()["depth"] == 100
    assert ids_of(box.next_batch(1000)) == [f"id-{i}" for i in range(500, 600)]
    box.close()


def test_config_validation():
    with pytest.raises(ValueError):
        OutboxConfig(path="x", max_bytes=0)
    with pytest.raises(ValueError):
        OutboxConfig(path="x", synchronous="OFF")
    with pytest.raises(ValueError):
        OutboxConfig(path="x", max_age_s=-1)


def test_token_bucket():
    b = TokenBucket(rate_per_s=10, burst=5)
    assert b.take(8, now_s=100.0) == 5  # the initial burst
    assert b.take(1, now_s=100.0) == 0
    assert b.wait_s(100.0) == pytest.approx(0.1)
    assert b.take(10, now_s=100.35) == 3  # 3.5 tokens refilled -> 3 whole
    assert b.take(10, now_s=110.0) == 5  # capped at the burst
    # Time going backwards (it cannot with monotonic time, but be safe) mints nothing.
    assert b.take(10, now_s=50.0) == 0
    with pytest.raises(ValueError):
        TokenBucket(0, 1)


def test_journal_is_written_with_the_outputs_and_truncated(tmp_path):
    path = tmp_path / "o.db"
    box = SQLiteOutbox(OutboxConfig(path=path))
    assert box.journal_seq() == 0 and box.journal_entries() == []
    box.put_many([msg(0)], journal=[("ingest", 10.0, "t/a", b'{"ts":1}', False), ("tick", 11.0, "", b"", False)])
    box.put_many([], journal=[("ingest", 12.0, "t/b", b"x", True)])  # a reading that closed nothing
    entries = box.journal_entries()
    assert [(e.seq, e.op, e.now_s, e.topic, e.payload, e.retained) for e in entries] == [
        (1, "ingest", 10.0, "t/a", b'{"ts":1}', False),
        (2, "tick", 11.0, "", b"", False),
        (3, "ingest", 12.0, "t/b", b"x", True),
    ]
    assert box.journal_seq() == 3
    assert box.journal_truncate(2) == 2
    assert [e.seq for e in box.journal_entries()] == [3]
    assert [e.seq for e in box.journal_entries(after_seq=3)] == []
    box._db.close()  # a crash: no clean close
    box = SQLiteOutbox(OutboxConfig(path=path))
    assert [e.seq for e in box.journal_entries()] == [3] and box.journal_seq() == 3
    box.put_many([], journal=[("tick", 13.0, "", b"", False)])
    assert box.journal_seq() == 4  # sequence numbers are never reused after a truncate
    assert ids_of(box.next_batch(10)) == ["id-0"]
    box.close()


def test_journal_and_outputs_commit_together(tmp_path, monkeypatch):
    """A failed write stores neither the outputs nor the journal entries (one transaction)."""
    box = SQLiteOutbox(OutboxConfig(path=tmp_path / "o.db"))

    class Exploding(OutboxMessage):
        @property
        def size_bytes(self) -> int:
            raise sqlite3.OperationalError("disk I/O error")

    with pytest.raises(OutboxError):
        box.put_many(
            [msg(0), Exploding(topic="t", payload=b"p", created_s=1.0)], journal=[("tick", 1.0, "", b"", False)]
        )
    assert box.journal_entries() == [] and box.next_batch(10) == []
    assert box.stats()["depth"] == 0 and box.stats()["bytes"] == 0 and box.stats()["put"] == {}
    box.close()


def test_late_ack_of_a_message_dropped_in_flight_keeps_the_depth_right(tmp_path):
    # Room is made from in-flight rows when nothing else is left; their PUBACK arrives after the row is gone.
    # Counting that ack again drove len() to -1 and crashed the shutdown drain ("__len__() should return >= 0").
    box = SQLiteOutbox(OutboxConfig(path=tmp_path / "o.db", max_bytes=13 * 2, max_age_s=0))
    a, b = box.put(msg(0, "forecast")), box.put(msg(1, "forecast"))
    assert [i for i, _ in box.next_batch(2)] == [a, b]  # both in flight
    c = box.put(msg(2, "forecast"))  # no room: the oldest in-flight row (a) is dropped
    assert box.stats()["dropped"] == {"forecast": 1}
    assert len(box) == 2
    box.ack(a)  # late PUBACK of the dropped row: must not count
    box.ack(b)
    assert len(box) == 1
    assert [i for i, _ in box.next_batch(5)] == [c]
    box.ack(c)
    assert len(box) == 0 and box.stats()["depth"] == 0
    box.close()
