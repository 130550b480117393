"""Readings the way stations send them (issue 13): topic templates, per-channel payloads, aliases and unit scales,
epoch seconds or milliseconds, several readings of a channel inside one step aggregated, unknown channels ignored
and counted per channel. Hand-computed values throughout."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
from conftest import T0, card_dict

from gapcast.edge import ConfigError
from gapcast.edge.agent import AgentCore, aggregate_rules
from gapcast.edge.bundle import Card
from gapcast.edge.config import parse_config
from gapcast.edge.messages import Reading, ReadingSchema, Rejection, Topics, parse_reading, parse_timestamp
from gapcast.edge.window import StationWindow, WindowSpec

CAD = 3600
K0 = T0 // CAD
MIN = {"gateway": {"id": "gw"}, "stations": {"names": ["s1", "s2"]}}
# Two channels: "a" in ug/m3 (0..100), "b" (-50..50); see conftest.card_dict.
CARD = Card.from_dict(card_dict())


def cfg(**input_):
    return parse_config({**MIN, "input": input_})


def core_for(card=CARD, **input_) -> AgentCore:
    return AgentCore.from_config(cfg(**input_), card)


# -- config -------------------------------------------------------------------------------------------------------


def test_input_defaults_documented():
    inp = cfg().input
    assert inp.topic == "{prefix}/stations/{station}/readings"
    assert (inp.unknown_channels, inp.epoch, inp.max_keys, inp.aggregate) == ("ignore", "auto", 1024, None)
    assert inp.aliases == {} and inp.scale == {} and inp.channel_aggregate == {}


@pytest.mark.parametrize(
    ("input_", "message"),
    [
        ({"topic": "sensors/{channel}"}, "input.topic: 'sensors/{channel}' needs {station} exactly once"),
        ({"topic": "sensors/+/{station}"}, "input.topic: 'sensors/+/{station}' must not hold + # or NUL"),
        ({"topic": "sensors/{station}/{channel}/{channel}"}, "holds {channel} more than once"),
        ({"topic": "sensors/st-{station}"}, "placeholders are {prefix}, {station}, {channel}, each a whole level"),
        ({"topic": "sensors//{station}"}, "has an empty level"),
        ({"topic": "{prefix}/stations/{station}/{channel}"}, "matches the gateway's own output topic 'gapcast/v1/stations/X/filled'"),
        ({"topic": "{prefix}/gateways/{station}/status"}, "own output topic 'gapcast/v1/gateways/gw/status'"),
        ({"aliases": {"pm25": 3}}, "input.aliases.pm25: must be a string"),
        ({"aliases": {"pm/25": "a"}}, "input.aliases.pm/25: the name 'pm/25' must be 1-64 characters"),
        ({"scale": {"pm25": "1000"}}, "input.scale.pm25: must be a finite number"),
        ({"scale": {"pm25": 0}}, "input.scale.pm25: must not be 0"),
        ({"epoch": "us"}, "input.epoch: must be one of auto, s, ms"),
        ({"aggregate": "median"}, "input.aggregate: must be one of mean, last, sum"),
        ({"channel_aggregate": {"a": "max"}}, "input.channel_aggregate.a: must be one of mean, last, sum"),
        ({"max_keys": 1}, "input.max_keys: must be in 2..1000000"),
        ({"unknown_channels": "drop"}, "input.unknown_channels: must be one of ignore, reject"),
    ],
)
def test_input_errors_name_the_key(input_, message):
    with pytest.raises(ConfigError) as err:
        cfg(**input_)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("input_", "message"),
    [
        ({"aliases": {"pm25": "PM2.5"}}, "input.aliases.pm25: 'PM2.5' is not a channel of the model (a, b)"),
        ({"aliases": {"a": "b"}}, "input.aliases.a: 'a' is a model channel itself"),
        ({"scale": {"pm25": 1000.0}}, "input.scale.pm25: 'pm25' is neither a channel of the model nor an alias"),
        ({"channel_aggregate": {"PM2.5": "sum"}}, "input.channel_aggregate.PM2.5: not a channel of the model (a, b)"),
    ],
)
def test_names_are_checked_against_the_card(input_, message):
    with pytest.raises(ConfigError) as err:
        core_for(**input_)
    assert message in str(err.value)


# -- topics and per-channel payloads --------------------------------------------------------------------------------


def test_topic_template_gives_the_filter_and_the_station_and_channel():
    t = Topics("gapcast/v1", "gw", "sensors/{station}/{channel}")
    assert t.readings_filter == "sensors/+/+" and t.per_channel
    assert t.parse_topic("sensors/s1/pm25") == ("s1", "pm25")
    for bad in ("sensors/s1", "sensors/s1/pm25/x", "other/s1/pm25", "sensors/a b/pm25", "sensors/s1\n/pm25"):
        r = t.parse_topic(bad)
        assert isinstance(r, Rejection) and r.kind == "bad_topic", bad
    t2 = Topics("site/gapcast", "gw", "{prefix}/in/{station}")
    assert t2.readings_filter == "site/gapcast/in/+" and t2.parse_topic("site/gapcast/in/s2") == ("s2", None)
    assert Topics("gapcast/v1", "gw").readings_filter == "gapcast/v1/stations/+/readings"


SCHEMA = ReadingSchema(("PM2.5", "TEMP"), np.array([0.0, -50.0]), np.array([1000.0, 55.0]), epoch="auto",
                       unknown_channels="ignore", aliases={"pm25": "PM2.5"}, scale={"pm25": 1000.0})


@pytest.mark.parametrize(
    ("payload", "ts", "value"),
    [
        (b"12.5", 1000.0 + T0, 12.5),  # bare number: the arrival time
        (b'{"value": 12.5}', 1000.0 + T0, 12.5),  # no ts: the arrival time
        (b'{"value": 12.5, "ts": 1483228860}', T0 + 60.0, 12.5),  # epoch seconds
        (b'{"value": 12.5, "ts": 1483228860500}', T0 + 60.5, 12.5),  # epoch milliseconds, by magnitude
        (b'{"value": 12.5, "ts": "2017-01-01T08:01:00+08:00"}', T0 + 60.0, 12.5),
        (b"null", 1000.0 + T0, None),
        (b"NaN", 1000.0 + T0, None),
    ],
)
def test_per_channel_payloads(payload, ts, value):
    r = parse_reading(payload, SCHEMA, channel="TEMP", arrival_s=T0 + 1000.0)
    assert isinstance(r, Reading) and r.ts_s == pytest.approx(ts)
    if value is None:
        assert not r.observed.any() and sum(r.missing.values()) == 1
    else:
        assert r.observed.tolist() == [False, True] and r.values[1] == np.float32(value)


@pytest.mark.parametrize(
    ("payload", "kind", "why"),
    [
        (b'"12.5"', "bad_type", "str '12.5'"),
        (b"[12.5]", "bad_schema", "got a list"),
        (b'{"v": 12.5}', "bad_schema", "unknown key(s) 'v'"),
        (b'{"value": 1, "value": 2}', "bad_json", "'value' appears more than once"),
        (b'{"value": 1, "ts": "yesterday"}', "bad_timestamp", "RFC 3339"),
        (b"Infinity", "non_finite", "Infinity"),
        (b"true", "bad_type", "bool"),
    ],
)
def test_per_channel_rejections(payload, kind, why):
    r = parse_reading(payload, SCHEMA, channel="TEMP", arrival_s=T0)
    assert isinstance(r, Rejection) and r.kind == kind and why in r.reason, r


def test_an_alias_with_a_unit_scale_feeds_the_model_channel():
    # A station sends pm25 in mg/m3: 0.035 mg/m3 = 35 ug/m3 into PM2.5; the sentinel is compared as sent.
    r = parse_reading(b'{"ts": 1483228800, "values": {"pm25": 0.035, "TEMP": 3}}', SCHEMA)
    assert r.values[0] == np.float32(35.0) and r.observed.tolist() == [True, True]
    r = parse_reading(b"-9999", SCHEMA, channel="pm25", arrival_s=T0)
    assert r.missing == {"sentinel": 1}
    r = parse_reading(b"1.5", SCHEMA, channel="pm25", arrival_s=T0)  # 1500 ug/m3 > valid_max 1000 after scaling
    assert r.missing == {"out_of_range": 1}
    r = parse_reading(b'{"ts": 1483228800, "values": {"pm25": 0.035, "PM2.5": 35}}', SCHEMA)
    assert isinstance(r, Rejection) and r.kind == "bad_schema" and "'pm25' and 'PM2.5' both feed 'PM2.5'" in r.reason


@pytest.mark.parametrize(
    ("ts", "epoch", "expected"),
    [
        (T0, "auto", T0),
        (T0 * 1000 + 250, "auto", T0 + 0.25),
        (T0 * 1000, "ms", T0),
        (T0 * 1000, "s", "outside 2000..2100 (epoch milliseconds?)"),
        (T0, "ms", "outside 2000..2100"),
        (T0 * 1_000_000, "auto", "outside 2000..2100 as epoch seconds or milliseconds"),  # microseconds
        (631_152_000_000, "auto", "outside 2000..2100"),  # 1990 in milliseconds
    ],
)
def test_epoch_seconds_or_milliseconds_by_magnitude(ts, epoch, expected):
    r = parse_timestamp(ts, epoch=epoch)
    if isinstance(expected, str):
        assert isinstance(r, Rejection) and r.kind == "bad_timestamp" and expected in r.reason, r
    else:
        assert r == pytest.approx(expected)


# -- several readings in one step ----------------------------------------------------------------------------------


def rd(a=np.nan, b=np.nan):
    v = np.array([a, b], dtype=np.float32)
    return v, ~np.isnan(v)


def test_mean_sum_and_last_inside_one_step_hand_computed():
    w = StationWindow(WindowSpec(cadence_s=CAD, lookback=3, channels=2, aggregate=("mean", "sum")))
    for off, (a, b) in ((0, (10.0, 1.0)), (600, (20.0, 2.0)), (1200, (60.0, 0.5))):
        assert w.merge(T0 + off, *rd(a, b)).accepted
    v, m = w.view(K0)
    assert v[-1].tolist() == [30.0, 3.5] and m[-1].all()  # mean (10 + 20 + 60) / 3; sum 1 + 2 + 0.5
    # A QoS 1 redelivery (same timestamp, same value) changes nothing, in any order.
    assert w.merge(T0 + 600, *rd(20.0, 2.0)).kind == "duplicate"
    assert w.view(K0)[0][-1].tolist() == [30.0, 3.5]
    # The same timestamp with another value replaces that reading: (10 + 50 + 60) / 3 = 40; 1 + 5 + 0.5.
    w.merge(T0 + 600, *rd(50.0, 5.0))
    assert w.view(K0)[0][-1].tolist() == [40.0, 6.5]
    last = StationWindow(WindowSpec(cadence_s=CAD, lookback=3, channels=2, aggregate=("last", "last")))
    last.merge(T0 + 1200, *rd(60.0))
    last.merge(T0 + 600, *rd(20.0))  # older: the newer one stays
    assert last.view(K0)[0][-1, 0] == 60.0


def test_aggregation_survives_a_snapshot_and_forgets_closed_steps():
    spec = WindowSpec(cadence_s=CAD, lookback=3, channels=2, lateness_s=600.0, aggregate=("mean", "mean"))
    w = StationWindow(spec)
    w.merge(T0, *rd(10.0))
    w.merge(T0 + 60, *rd(20.0))
    arrays, meta = w.export_state()
    assert meta["parts"] == [[K0, 0, [[0.0, 10.0], [60.0, 20.0]]]]
    w2 = StationWindow.from_state(spec, arrays, meta)
    w2.merge(T0 + 120, *rd(60.0))
    assert w2.view(K0)[0][-1, 0] == 30.0  # (10 + 20 + 60) / 3 across the restart
    w2.merge(T0 + CAD + 700, *rd(1.0))  # step 1 opens 700 s after step 0's end (> lateness)
    w2.mark_closed(K0)
    assert "parts" not in w2.export_state()[1]  # step 0 can no longer change: its reading times are gone


def test_too_many_readings_in_a_step_is_rejected_and_changes_nothing():
    w = StationWindow(WindowSpec(cadence_s=CAD, lookback=3, channels=2, aggregate=("mean", "last"), max_readings_per_step=2))
    w.merge(T0, *rd(10.0))
    w.merge(T0 + 1, *rd(20.0))
    r = w.merge(T0 + 2, *rd(90.0, 1.0))
    assert (r.accepted, r.kind) == (False, "too_many_readings") and "max_readings_per_step" in r.reason
    v, m = w.view(K0)
    assert v[-1, 0] == 15.0 and not m[-1, 1]
    assert w.merge(T0 + 1, *rd(30.0)).accepted  # a known time still replaces: (10 + 30) / 2
    assert w.view(K0)[0][-1, 0] == 20.0


def test_aggregate_rules_from_the_card_and_the_config():
    d = card_dict()
    assert aggregate_rules(Card.from_dict(d)) == ("mean", "mean")
    d["dataset"] = {"source": {"aggregate": "last"}, "channels": [{"name": "b", "aggregate": "sum"}]}
    card = Card.from_dict(d)
    assert aggregate_rules(card) == ("last", "sum")  # the spec's rule, and its per-channel override
    assert aggregate_rules(card, "mean") == ("mean", "mean")  # the config overrides the card
    assert aggregate_rules(card, None, {"a": "sum"}) == ("sum", "sum")
    assert core_for(card, channel_aggregate={"a": "mean"}).spec.aggregate == ("mean", "sum")


def test_per_channel_topics_with_aliases_end_to_end_through_the_core():
    """A station publishing pm25 in mg/m3 and b on its own topics, three times per hourly step: one filled step
    with the means, in the card's units."""
    core = core_for(topic="sensors/{station}/{channel}", aliases={"pm25": "a"}, scale={"pm25": 1000.0})
    now = T0 + 1300.0  # the newest reading (T0 + 1200) is not in the future
    for k, (pm, b) in enumerate(((0.010, 1.0), (0.020, 2.0), (0.060, 6.0))):
        assert core.ingest("sensors/s1/pm25", json.dumps({"value": pm, "ts": T0 + 600 * k}).encode(), now) == []
        assert core.ingest("sensors/s1/b", json.dumps({"value": b, "ts": (T0 + 600 * k) * 1000}).encode(), now) == []
    assert core.ingest("sensors/s1/humidity", b"40", now)[0].kind == "deadletter"  # nothing known in it
    out = core.ingest("sensors/s1/b", b"0", T0 + CAD + 5.0) + core.tick(T0 + CAD + 5.0)  # arrival time: step 1
    filled = [json.loads(m.payload) for m in out if m.kind == "filled"]
    assert len(filled) == 1 and filled[0]["epoch_s"] == T0
    assert filled[0]["values"] == {"a": 30.0, "b": 3.0} and filled[0]["imputed"] == []
    assert core.rejected == {"unknown_channel": 1} and core.counters["readings"] == 7


def test_unknown_channels_are_ignored_by_default_and_counted_per_channel():
    core = core_for()
    topic = "gapcast/v1/stations/s1/readings"
    for k in range(3):
        assert core.ingest(topic, json.dumps({"ts": T0 + k, "values": {"a": 1.0, "humidity": 40, "battery": 3.7}}).encode(), T0) == []
    assert core.ingest(topic, json.dumps({"ts": T0 + 5, "values": {"humidity": 40}}).encode(), T0)[0].kind == "deadletter"
    body = core.status_body()
    assert body["ignored_channels"] == {"battery": 3, "humidity": 3} and body["counters"]["ignored_channels"] == 6
    assert body["rejected"] == {"unknown_channel": 1} and body["counters"]["readings"] == 3
    # "reject" stays available.
    strict = core_for(unknown_channels="reject")
    [dl] = strict.ingest(topic, json.dumps({"ts": T0, "values": {"a": 1.0, "humidity": 40}}).encode(), T0)
    assert json.loads(dl.payload)["kind"] == "unknown_channel"
    # Names are counted one by one up to 100, the rest together.
    for k in range(150):
        core.ingest(topic, json.dumps({"ts": T0, "values": {"a": 1.0, f"x{k}": 1}}).encode(), T0)
    ign = core.status_body()["ignored_channels"]
    assert len(ign) == 101 and ign["(other)"] == 52 and sum(ign.values()) == 156


@pytest.mark.broker
@pytest.mark.timeout(60)
def test_the_shell_subscribes_to_the_template_filter(broker):
    """Per-channel topics through Mosquitto and the real MQTT shell: the filled step is the mean."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from gapcast.edge.mqtt import MqttAgent
    from gapcast.edge.outbox_memory import MemoryOutbox

    config = parse_config({**MIN, "mqtt": {"host": broker.host, "port": broker.port},
                           "input": {"topic": "sensors/{station}/{channel}"},
                           "agent": {"clock": "readings", "tick_interval_s": 0.1}})
    agent = MqttAgent(config, AgentCore.from_config(config, CARD), MemoryOutbox(), snapshot_path="")
    got, subscribed = [], threading.Event()
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    sub.on_message = lambda c, u, m: got.append(json.loads(m.payload))
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.on_connect = lambda c, u, f, rc, p: c.subscribe("gapcast/v1/stations/+/filled", qos=1)
    sub.connect(broker.host, broker.port)
    sub.loop_start()
    stop = threading.Event()
    th = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    th.start()
    try:
        assert subscribed.wait(10) and agent.connected.wait(10)
        deadline = time.monotonic() + 10
        while agent.core.counters["messages"] == 0 and time.monotonic() < deadline:  # until the SUBACK is through
            sub.publish("sensors/s1/a", json.dumps({"value": 1.0, "ts": T0 - 2 * CAD}).encode(), qos=1).wait_for_publish(5)
            time.sleep(0.2)
        for k, a in enumerate((10.0, 20.0, 60.0)):
            sub.publish("sensors/s1/a", json.dumps({"value": a, "ts": T0 + 600 * k}).encode(), qos=1).wait_for_publish(5)
        sub.publish("sensors/s1/a", json.dumps({"value": 1.0, "ts": T0 + CAD}).encode(), qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 15
        while not any(b.get("epoch_s") == T0 for b in got) and time.monotonic() < deadline:
            time.sleep(0.05)
        [step] = [b for b in got if b.get("epoch_s") == T0 and not b["revision"]]
        assert step["values"]["a"] == 30.0 and step["imputed"] == ["b"]
    finally:
        stop.set()
        th.join(15)
        sub.loop_stop()
        sub.disconnect()
