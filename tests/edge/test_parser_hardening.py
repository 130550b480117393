"""Issue 18, items 4, 5 and 9, each reproduced the way the fault campaign found it:

- an integer ``ts`` beyond float range (10**400) was an internal error with a traceback: now ``bad_timestamp``;
  a hypothesis audit (big ints, deep unicode, surrogates, nesting) keeps the shell's ``internal_errors`` at 0;
- under MQTT 3.1.1 the broker re-sends every retained reading on each reconnect and each was dead-lettered again:
  now once per (topic, payload hash) within bounded memory, the rest counted;
- duplicate JSON keys passed with the last one winning: now ``bad_json``; the number of keys is capped; an unknown
  station with an old timestamp was reported as ``too_old``: now ``unknown_station``;
- on a half-open link (TCP accepted, no CONNACK) every reconnect attempt logged a warning: now rate-limited like
  refused attempts, one line per logged attempt.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time

import numpy as np
import pytest
from conftest import T0
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gapcast.edge.config import parse_config
from gapcast.edge.messages import ReadingSchema, Rejection, RetainedFilter, parse_reading
from gapcast.edge.mqtt import MqttAgent, _Inbound
from gapcast.edge.outbox_memory import MemoryOutbox

TOPIC = "gapcast/v1/stations/s1/readings"
SCHEMA = ReadingSchema(("a", "b"), np.array([0.0, -50.0]), np.array([100.0, 50.0]))


def shell(make_core, **mqtt):
    """The real MQTT shell around a core, never connected: messages go straight into its inbound queue."""
    cfg = parse_config({"gateway": {"id": "gw"}, "stations": {"names": ["s1", "s2", "s3"]}, "mqtt": mqtt})
    return MqttAgent(cfg, make_core(), MemoryOutbox(), snapshot_path="", wall=lambda: T0 + 60.0)


def feed(agent, msgs, *, retain=False):
    """Put (topic, payload) messages through the shell's drain as paho would (QoS 0: nothing to acknowledge)."""
    for topic, payload in msgs:
        agent._inbound.put(_Inbound(topic, payload, retain, 0, 0, agent.epoch))
    while agent._drain(0):
        pass
    return [json.loads(p.payload) for _, p in agent.outbox.next_batch(10**6) if p.kind == "deadletter"]


# -- item 4: huge ints and the parser audit ------------------------------------------------------------------


def test_a_ts_beyond_float_range_is_a_bad_timestamp_not_an_internal_error(make_core, caplog):
    agent = shell(make_core)
    payload = b'{"ts": 1' + b"0" * 400 + b', "values": {"a": 1}}'  # 10**400, as found
    with caplog.at_level(logging.ERROR):
        dead = feed(agent, [(TOPIC, payload), (TOPIC, b'{"ts": -1' + b"0" * 400 + b', "values": {}}')])
    assert [d["kind"] for d in dead] == ["bad_timestamp", "bad_timestamp"]
    assert "beyond float range" in dead[0]["reason"]
    assert agent.counters["internal_errors"] == 0 and not caplog.records


_text = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF), max_size=12)  # surrogates too
_leaf = (
    st.none() | st.booleans() | st.integers() | st.integers(min_value=10**300, max_value=10**1000)
    | st.floats(allow_nan=True, allow_infinity=True) | _text
)
_json = st.recursive(_leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(_text, c, max_size=3), max_leaves=12)


def _encode(doc) -> bytes:
    # ensure_ascii escapes lone surrogates as \udxxx, which the parser turns back into lone surrogates.
    return json.dumps(doc).encode()


@settings(max_examples=400, deadline=None,  # make_core is a factory: a fresh core per example
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(
    doc=st.one_of(
        _json,
        st.fixed_dictionaries({"ts": _json, "values": _json}),
        st.fixed_dictionaries({"ts": _leaf, "values": st.dictionaries(st.sampled_from(["a", "b"]) | _text, _json, max_size=4)}),
    ),
    raw=st.binary(max_size=40),
    depth=st.integers(0, 40),
    topic=st.sampled_from([TOPIC, "gapcast/v1/stations/s1\n/readings", "gapcast/v1/stations/\ud800/readings"]) | _text,
)
def test_hypothesis_audit_no_exception_reaches_the_generic_catch(make_core, doc, raw, depth, topic):
    core = make_core()
    for payload in (_encode(doc), raw, b"[" * depth + _encode(doc) + b"]" * depth):
        for t in (TOPIC, topic):
            out = core.ingest(t, payload, T0 + 60.0)  # raises on a parser bug
            assert len(out) <= 1
    for payload in (_encode(doc), raw):  # per-channel payloads too
        r = parse_reading(payload, SCHEMA, channel="a", arrival_s=T0)
        assert isinstance(r, Rejection) or r.observed.sum() <= 1


def test_the_fuzz_families_through_the_shell_keep_internal_errors_at_zero(make_core):
    agent = shell(make_core)
    lone = b'{"ts": 1483228800, "values": {"a": "\\udfff", "\\ud800": 1}}'
    payloads = [
        lone,
        b'{"ts": "\\ud83d\\ude00", "values": {}}',
        '{"ts": "2017-01-01T00:00:00Z", "values": {"a": 1}, "ü\u0301": "\U0010ffff"}'.encode(),
        '{"ts": "٢٠١٧-01-01T00:00:00Z", "values": {}}'.encode(),  # Arabic-Indic digits are not RFC 3339
        b'{"ts": "2017-01-01T00:00:00Z\\n", "values": {}}',
        b'{"ts": 1' + b"0" * 5000 + b', "values": {}}',  # beyond Python's int digit limit
        b'{"ts": 1483228800, "values": {"a": 1' + b"0" * 400 + b"}}",
        b'{"ts": 1483228800, "values": {"a": ' + b"[" * 30 + b"]" * 30 + b"}}",
    ]
    dead = feed(agent, [(TOPIC, p) for p in payloads])
    assert agent.counters["internal_errors"] == 0
    assert [d["kind"] for d in dead] == [
        "bad_type", "bad_timestamp", "bad_timestamp", "bad_timestamp", "bad_json", "too_deep"
    ]
    assert agent.core.missing["out_of_range"] == 1  # 10**400 as a channel value: a value, out of range


# -- item 9: duplicate keys, key floods, unknown station before too_old ------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        b'{"ts": "garbage", "ts": 1483228800, "values": {"a": 1}}',  # as found: the last ts won
        b'{"ts": 1483228800, "values": {"a": 1, "a": 2}}',
        b'{"ts": 1483228800, "values": {"a": 1}, "values": {"a": 2}}',
    ],
)
def test_duplicate_keys_are_bad_json(payload):
    r = parse_reading(payload, SCHEMA)
    assert isinstance(r, Rejection) and r.kind == "bad_json" and "appears more than once" in r.reason


def test_the_number_of_keys_is_capped():
    big = ReadingSchema(("a",), np.zeros(1), np.ones(1), max_payload_bytes=4 << 20, unknown_channels="ignore")
    payload = json.dumps({"ts": T0, "values": {f"k{i}": 1 for i in range(100_000)}}).encode()  # as found
    r = parse_reading(payload, big)
    assert isinstance(r, Rejection) and r.kind == "bad_schema" and "100000 keys > max_keys 1024" in r.reason
    ok = json.dumps({"ts": T0, "values": {"a": 0.5, **{f"k{i}": 1 for i in range(1000)}}}).encode()
    assert len(parse_reading(ok, big).ignored) == 1000


def test_an_unknown_station_is_reported_before_too_old(make_core):
    core = make_core()
    core.ingest(TOPIC, json.dumps({"ts": T0, "values": {"a": 1}}).encode(), T0 + 60)
    old = json.dumps({"ts": T0 - 90 * 86400, "values": {"a": 1}}).encode()
    [d] = core.ingest("gapcast/v1/stations/Nowhere/readings", old, T0 + 60)
    assert json.loads(d.payload)["kind"] == "unknown_station"  # was too_old
    [d] = core.ingest(TOPIC, old, T0 + 60)
    assert json.loads(d.payload)["kind"] == "too_old"  # a known station's old reading still is
    future = json.dumps({"ts": T0 + 86400, "values": {"a": 1}}).encode()
    [d] = core.ingest("gapcast/v1/stations/Nowhere/readings", future, T0 + 60)
    assert json.loads(d.payload)["kind"] == "unknown_station"
    assert "Nowhere" not in core.windows


# -- item 5: retained readings re-sent on every reconnect ------------------------------------------------------


def test_retained_readings_are_dead_lettered_once_per_topic_and_payload(make_core):
    agent = shell(make_core, version="3.1.1")
    flood = [(f"gapcast/v1/stations/s{1 + k % 3}/readings", json.dumps({"ts": T0, "values": {"a": k}}).encode())
             for k in range(10_000)]
    first = feed(agent, flood, retain=True)
    assert len(first) == 10_000 and {d["kind"] for d in first} == {"retained"}
    for reconnect in (1, 2):  # as found: the broker re-sends all 10,000 after each reconnect
        agent.epoch += 1
        assert feed(agent, flood, retain=True) == []
        assert agent.counters["retained_repeats"] == 10_000 * reconnect
    assert agent.core.rejected["retained"] == 10_000 and agent.counters["internal_errors"] == 0
    # A new retained payload on a known topic is a new message: dead-lettered.
    assert [d["kind"] for d in feed(agent, [(flood[0][0], b'{"ts": 1, "values": {}}')], retain=True)] == ["retained"]


def test_the_retained_memory_is_bounded():
    f = RetainedFilter(capacity=100)
    assert all(f.first_time("t", str(k).encode()) for k in range(250))
    assert len(f) == 100
    assert not f.first_time("t", b"249") and f.repeats == 1  # the newest are remembered
    assert f.first_time("t", b"0")  # the oldest were forgotten: dead-lettered again, never silently lost


# -- item 9: the reconnect warning on a half-open link ---------------------------------------------------------


class HalfOpen:
    """A TCP server that accepts connections and never answers (a half-open link, as through the stalled proxy)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.conns: list[socket.socket] = []
        self.stop = threading.Event()
        self.th = threading.Thread(target=self._run, daemon=True)
        self.th.start()

    def _run(self) -> None:
        self.sock.settimeout(0.1)
        while not self.stop.is_set():
            try:
                c, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            self.conns.append(c)

    def close(self) -> None:
        self.stop.set()
        self.th.join(2)
        for c in self.conns:
            c.close()
        self.sock.close()


@pytest.mark.timeout(60)
def test_half_open_reconnect_warnings_are_rate_limited(make_core, caplog):
    from dataclasses import replace

    server = HalfOpen()
    agent = shell(make_core, host="127.0.0.1", port=server.port, reconnect_min_s=1, reconnect_max_s=1)
    # keepalive 1 s (the config's minimum is 5 s) so that five attempts take seconds, not half a minute.
    agent.cfg = replace(agent.cfg, broker=replace(agent.cfg.broker, keepalive_s=1))
    with caplog.at_level(logging.WARNING, logger="gapcast.edge.mqtt"):
        agent.client.connect_async("127.0.0.1", server.port, keepalive=1)
        agent.client.loop_start()
        try:
            deadline = time.monotonic() + 40
            while agent._connect_failures.failures < 5 and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            agent.client.loop_stop()
            server.close()
    n = agent._connect_failures.failures
    assert n >= 5 and server.accepted >= 5
    lines = [r.getMessage() for r in caplog.records if r.name == "gapcast.edge.mqtt"]
    assert not [m for m in lines if m.startswith("disconnected from the broker")]  # never connected: no such line
    logged = [m for m in lines if m.startswith(f"cannot connect to the broker 127.0.0.1:{server.port}: ")]
    assert len(logged) == len([k for k in range(1, n + 1) if k & (k - 1) == 0])  # attempts 1, 2, 4 (8...)
    assert all("closed before an accepted CONNACK" in m for m in logged)
