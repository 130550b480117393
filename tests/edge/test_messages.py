"""Reading validation (every rejection kind, every missing kind) and the output payloads."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from gapcast.edge.messages import (
    Reading,
    ReadingSchema,
    Rejection,
    Topics,
    deadletter_message,
    filled_message,
    forecast_message,
    mark_replayed,
    message_id,
    offline_payload,
    parse_reading,
    parse_timestamp,
    revision_message,
    status_message,
)

T0 = 1_483_228_800  # 2017-01-01T00:00:00Z
SCHEMA = ReadingSchema(
    ("PM2.5", "TEMP", "wd_sin"),
    np.array([0.0, -50.0, -1.0]),
    np.array([2000.0, 55.0, 1.0]),
    sentinels=(-200.0, -9999.0),
    max_payload_bytes=512,
    max_json_depth=4,
)
TOPICS = Topics("gapcast/v1", "gw-01")


def parse(obj_or_text) -> Reading | Rejection:
    text = obj_or_text if isinstance(obj_or_text, str) else json.dumps(obj_or_text)
    return parse_reading(text.encode(), SCHEMA)


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        ("2017-01-01T00:00:00Z", T0),
        ("2017-01-01T08:00:00+08:00", T0),  # Beijing local time
        ("2016-12-31T19:30:00-04:30", T0),
        ("2017-01-01T00:00:00.250Z", T0 + 0.25),
        ("2017-01-01 00:00:00z", T0),
        (T0, T0),
        (T0 + 0.5, T0 + 0.5),
    ],
)
def test_timestamps(ts, expected):
    assert parse_timestamp(ts) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("ts", "kind", "why"),
    [
        ("2017-01-01T00:00:00", "bad_timestamp", "UTC offset"),  # naive local time
        ("2017-02-30T00:00:00Z", "bad_timestamp", "does not exist"),
        ("2017-13-01T00:00:00Z", "bad_timestamp", "out-of-range"),
        ("yesterday", "bad_timestamp", "RFC 3339"),
        (T0 * 1000, "bad_timestamp", "milliseconds"),
        (0, "bad_timestamp", "2000..2100"),
        (True, "bad_timestamp", "boolean"),
        ([T0], "bad_timestamp", "list"),
        (None, "bad_timestamp", "NoneType"),
    ],
)
def test_bad_timestamps(ts, kind, why):
    r = parse_timestamp(ts)
    assert isinstance(r, Rejection) and r.kind == kind and why in r.reason


def test_valid_reading_with_every_missing_kind():
    r = parse('{"ts": "2017-01-01T00:00:00Z", "values": {"PM2.5": 12.5, "TEMP": -200, "wd_sin": NaN}}')
    assert isinstance(r, Reading)
    assert r.ts_s == T0
    np.testing.assert_array_equal(r.observed, [True, False, False])
    assert r.values[0] == np.float32(12.5) and np.isnan(r.values[1:]).all()
    assert r.missing == {"sentinel": 1, "nan": 1}
    r = parse({"ts": T0, "values": {"PM2.5": None, "TEMP": 60.0, "wd_sin": -9999}})
    assert r.missing == {"null": 1, "out_of_range": 1, "sentinel": 1} and not r.observed.any()
    # Range bounds are inclusive; ints are numbers; a partial reading leaves absent channels unobserved, uncounted.
    r = parse({"ts": T0, "values": {"PM2.5": 0, "wd_sin": 1}})
    np.testing.assert_array_equal(r.observed, [True, False, True])
    assert r.missing == {}
    r = parse('{"ts": 1483228800, "values": {"PM2.5": 1e999}}')  # overflows to inf in Python's parser
    assert r.missing == {"out_of_range": 1}


@pytest.mark.parametrize(
    ("payload", "kind", "why"),
    [
        ("x" * 600, "payload_too_large", "600 bytes"),
        ("not json", "bad_json", "not JSON"),
        ("[1, 2]", "bad_schema", "object"),
        ('{"values": {}}', "bad_schema", "'ts' and 'values'"),
        ('{"ts": 1483228800, "values": [1]}', "bad_schema", "'values' must be an object"),
        ('{"ts": 1483228800, "values": {"PM2.5": "12.0"}}', "bad_type", "str"),
        ('{"ts": 1483228800, "values": {"PM2.5": true}}', "bad_type", "bool"),
        ('{"ts": 1483228800, "values": {"PM2.5": [1]}}', "bad_type", "list"),
        ('{"ts": 1483228800, "values": {"PM2.5": [[[1]]]}}', "too_deep", "max_json_depth 4"),
        ('{"ts": 1483228800, "extra": [[[[[1]]]]], "values": {}}', "too_deep", "'extra'"),
        ("[" * 100_000, "payload_too_large", "bytes"),
        ('{"ts": 1483228800, "values": {"PM2.5": Infinity}}', "non_finite", "Infinity"),
        ('{"ts": 1483228800, "values": {"PM2.5": -Infinity}}', "non_finite", "Infinity"),
        ('{"ts": NaN, "values": {}}', "non_finite", "NaN"),
        ('{"ts": 1e400, "values": {}}', "non_finite", "ts is not finite"),
        ('{"ts": 1483228800, "values": {"PM25": 1}}', "unknown_channel", "'PM25'"),
        ('{"ts": "2017-01-01T00:00:00", "values": {}}', "bad_timestamp", "offset"),
    ],
)
def test_rejections(payload, kind, why):
    r = parse(payload)
    assert isinstance(r, Rejection), r
    assert r.kind == kind and why in r.reason, r


def test_deep_nesting_within_the_size_limit_is_rejected_not_crashing():
    deep = ReadingSchema(SCHEMA.channels, np.zeros(3), np.ones(3), max_payload_bytes=1 << 20, max_json_depth=8)
    r = parse_reading(b"[" * 200_000 + b"]" * 200_000, deep)
    assert isinstance(r, Rejection) and r.kind in ("too_deep", "bad_schema")
    r = parse_reading(b"\xff\xfe{}", deep)
    assert isinstance(r, Rejection) and r.kind == "bad_encoding"


def test_unknown_channels_can_be_ignored():
    lax = ReadingSchema(SCHEMA.channels, np.zeros(3), np.full(3, 100.0), unknown_channels="ignore")
    r = parse_reading(b'{"ts": 1483228800, "values": {"PM2.5": 3, "humidity": 40}}', lax)
    assert isinstance(r, Reading) and r.ignored == ("humidity",) and r.observed.tolist() == [True, False, False]


def test_topics():
    assert TOPICS.station_of("gapcast/v1/stations/Aotizhongxin/readings") == "Aotizhongxin"
    for bad in ("gapcast/v2/stations/A/readings", "gapcast/v1/stations/A/filled", "gapcast/v1/stations//readings",
                "gapcast/v1/stations/a b/readings", "gapcast/v1/stations/x/y/readings"):
        r = TOPICS.station_of(bad)
        assert isinstance(r, Rejection) and r.kind == "bad_topic", bad
    assert TOPICS.readings_filter == "gapcast/v1/stations/+/readings"
    assert TOPICS.status == "gapcast/v1/gateways/gw-01/status"
    assert TOPICS.deadletter == "gapcast/v1/deadletter/gw-01"


def test_filled_and_revision_payloads():
    names = ("PM2.5", "TEMP", "wd_sin")
    units = {"PM2.5": "ug/m3", "TEMP": "degC", "wd_sin": "1"}
    m = filled_message(TOPICS, "A", T0, 3600, names, np.array([12.0, -3.25, 0.5]), np.array([False, True, False]),
                       "model", 3, units=units)
    body = json.loads(m.payload)
    assert m.topic == "gapcast/v1/stations/A/filled" and m.kind == "filled" and m.qos == 1 and not m.retain
    assert body == {
        "schema": "gapcast/filled/1",
        "id": "A:2017-01-01T00:00:00Z:filled:v3", "station": "A", "ts": "2017-01-01T00:00:00Z", "epoch_s": T0,
        "cadence_s": 3600, "revision": False, "values": {"PM2.5": 12.0, "TEMP": -3.25, "wd_sin": 0.5},
        "imputed": ["TEMP"], "method": "model", "model_version": 3, "units": units,
    }
    assert m.msg_id == body["id"]
    # Nothing imputed: the method says so.
    m2 = filled_message(TOPICS, "A", T0, 3600, names, np.zeros(3), np.zeros(3, bool), "locf", 3)
    assert json.loads(m2.payload)["method"] == "observed"
    r = revision_message(TOPICS, "A", T0, 3600, names, np.ones((2, 3)), np.array([[1, 1, 1], [0, 1, 0]], bool),
                         "model", 3, "gap_end", units=units)
    rb = json.loads(r.payload)
    assert r.topic == "gapcast/v1/stations/A/revisions" and rb["schema"] == "gapcast/revision/1"
    assert rb["units"] == units
    assert rb["revision"] is True and rb["start"] == "2017-01-01T00:00:00Z" and rb["end"] == "2017-01-01T01:00:00Z"
    assert [s["imputed"] for s in rb["steps"]] == [["PM2.5", "TEMP", "wd_sin"], ["TEMP"]]
    pattern = hashlib.sha256(b"gap_end" + np.packbits(np.array([[1, 1, 1], [0, 1, 0]], bool)).tobytes()).hexdigest()
    assert rb["id"] == f"A:2017-01-01T00:00:00Z:revision:2017-01-01T01:00:00Z:gap_end:{pattern[:8]}:v3"
    assert r.kind == "revision"
    # The same range revised again for another reason (or with another imputed pattern) gets another id.
    late = revision_message(TOPICS, "A", T0, 3600, names, np.ones((2, 3)), np.array([[1, 1, 1], [0, 1, 0]], bool),
                            "model", 3, "late_reading")
    again = revision_message(TOPICS, "A", T0, 3600, names, np.ones((2, 3)), np.array([[1, 1, 1], [0, 1, 0]], bool),
                             "model", 3, "gap_end")
    assert late.msg_id != r.msg_id and again.msg_id == r.msg_id


def test_forecast_status_deadletter_payloads_and_ids():
    names = ("PM2.5", "TEMP")
    fc = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.123456]])
    m = forecast_message(TOPICS, "A", T0, 3600, names, fc, 0.25, "model", 3, issued_s=T0 + 3700,
                         units={"PM2.5": "ug/m3", "TEMP": "degC"})
    b = json.loads(m.payload)
    assert b["schema"] == "gapcast/forecast/1" and b["units"] == {"PM2.5": "ug/m3", "TEMP": "degC"}
    assert b["origin"] == "2017-01-01T00:00:00Z" and b["start"] == "2017-01-01T01:00:00Z"
    assert b["issued"] == "2017-01-01T01:01:40Z" and b["horizon"] == 3 and b["imputed_share"] == 0.25
    # One object per step, its own time: step h starts at origin + h * cadence.
    assert b["steps"] == [
        {"ts": "2017-01-01T01:00:00Z", "values": {"PM2.5": 1.0, "TEMP": 2.0}},
        {"ts": "2017-01-01T02:00:00Z", "values": {"PM2.5": 3.0, "TEMP": 4.0}},
        {"ts": "2017-01-01T03:00:00Z", "values": {"PM2.5": 5.0, "TEMP": 6.1235}},
    ]
    # Ids: stable for the same (station, step, kind, version); distinct across each of them.
    ids = {message_id("A", T0, "filled", 3), message_id("A", T0, "forecast", 3), message_id("B", T0, "filled", 3),
           message_id("A", T0 + 3600, "filled", 3), message_id("A", T0, "filled", 4)}
    assert len(ids) == 5 and message_id("A", T0, "filled", 3) == message_id("A", T0, "filled", 3)
    s = status_message(TOPICS, {"backend": "fake"}, T0, 3)
    assert s.retain and json.loads(s.payload)["state"] == "online"
    assert json.loads(offline_payload("gw-01")) == {
        "schema": "gapcast/status/1", "gateway": "gw-01", "state": "offline", "reason": "connection lost"}
    assert json.loads(offline_payload("gw-01", "shutdown", fleet="city")) == {
        "schema": "gapcast/status/1", "gateway": "gw-01", "state": "offline", "reason": "shutdown", "fleet": "city"}
    bad = b"\x00" * 1000
    d = deadletter_message(TOPICS, "x/y", bad, Rejection("bad_topic", "why"), T0)
    db = json.loads(d.payload)
    assert d.topic == "gapcast/v1/deadletter/gw-01" and db["kind"] == "bad_topic" and db["reason"] == "why"
    assert db["payload_bytes"] == 1000 and len(db["payload_excerpt"]) == 256
    assert d.msg_id == deadletter_message(TOPICS, "x/y", bad, Rejection("bad_topic", "other"), T0 + 5).msg_id


def test_replayed_marker_and_output_topics():
    names = ("PM2.5",)
    m = filled_message(TOPICS, "A", T0, 3600, names, np.array([1.0]), np.array([False]), "model", 3)
    marked = mark_replayed(m.payload)
    assert json.loads(marked) == {**json.loads(m.payload), "replayed": True}
    assert mark_replayed(marked) == marked and mark_replayed(b"{}") == b"{}"
    assert TOPICS.output_filter("revision") == "gapcast/v1/stations/+/revisions"
    assert TOPICS.output_of("gapcast/v1/stations/A/revisions") == ("revision", "A")
    assert TOPICS.output_of("gapcast/v1/stations/A/forecast") == ("forecast", "A")
    assert TOPICS.output_of("gapcast/v1/stations/A/readings") is None
    assert TOPICS.output_of("gapcast/v1/stations/a b/filled") is None
    assert Topics("p").status == "p/gateways/+/status"  # no gateway: the filter over every gateway
