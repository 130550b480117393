"""Fuzzing the agent with malformed and hostile input (issue 6, fault test 5).

10,000 hostile payloads (hypothesis) are interleaved with real readings of two Beijing stations and fed to the pure
agent core (:class:`gapcast.edge.agent.AgentCore`) exactly as the MQTT shell feeds it: ``ingest`` then ``tick`` for
every message. Checked for every example:

- the core never raises;
- every hostile payload produces exactly one dead-letter message, whose kind is one of the kinds expected for it,
  and the core's ``rejected`` counters add up to the number of hostile payloads, kind by kind;
- the outputs (filled values, revisions, forecasts) are byte-for-byte those of a clean run of the valid readings
  alone, and the windows end up identical: no rejected payload ever put a value into a window.

A smaller broker-level version (through Mosquitto and the real shell) lives in test_faults.py.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from support.edge_replay import PREFIX, beijing_card_dict, readings_stream

from gapcast.edge.agent import AgentCore, CoreSettings
from gapcast.edge.bundle import Card
from gapcast.edge.messages import ReadingSchema, Topics

STATIONS = ("Aotizhongxin", "Changping")
START, STEPS = 24 * 200, 48  # 2 days from 2013-09-17, two stations: 96 real readings
PER_EXAMPLE = 100
EXAMPLES = 50  # x 100 payloads x 2 modes = 10,000 hostile payloads
MAX_PAYLOAD = 16384
MAX_DEPTH = 8
MAX_FUTURE_S = 300.0
LEAD_S = 600.0  # the gateway clock runs this far ahead of the newest real reading
MODES = [(False, "readings"), (True, "gateway")]


# -- hostile payloads -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hostile:
    """A hostile input recipe; ``make(ctx)`` turns it into (topic, payload, retained, expected kinds)."""

    tag: str
    params: tuple

    def make(self, ctx: dict) -> tuple[str, bytes, bool, frozenset[str]]:
        return _MAKERS[self.tag](ctx, *self.params)


def _doc(ts, values) -> bytes:
    return json.dumps({"ts": ts, "values": values}, separators=(",", ":")).encode()


def _topic(station: str) -> str:
    return f"{PREFIX}/stations/{station}/readings"


def _valid_values(ctx) -> dict:
    return {"PM2.5": 35.0, "TEMP": 12.5}


_MAKERS = {
    "oversize": lambda ctx, pad, st_: (
        _topic(st_),
        _doc(ctx["now"] - 60, {"PM2.5": 1.0, "pad": None})[:-2] + b',"x":"' + b"A" * (MAX_PAYLOAD + pad) + b'"}}',
        False,
        frozenset({"payload_too_large"}),
    ),
    "bad_utf8": lambda ctx, tail, st_: (_topic(st_), b'{"ts":\xff' + tail, False, frozenset({"bad_encoding"})),
    # Unclosed, so never valid JSON; a NaN/Infinity literal met before the syntax error makes it non_finite.
    "bad_json": lambda ctx, text, st_: (
        _topic(st_), ('{"ts": ' + text).encode(), False, frozenset({"bad_json", "non_finite"}),
    ),
    "deep_extra": lambda ctx, d, st_: (
        _topic(st_),
        f'{{"ts":{ctx["now"] - 60},"values":{{}},"x":{"[" * d}{"]" * d}}}'.encode(),
        False,
        frozenset({"too_deep"}),
    ),
    "deep_value": lambda ctx, d, st_: (
        _topic(st_),
        f'{{"ts":{ctx["now"] - 60},"values":{{"PM2.5":{"[" * d}1{"]" * d}}}}}'.encode(),
        False,
        frozenset({"too_deep"}),
    ),
    "not_object": lambda ctx, doc, st_: (_topic(st_), json.dumps(doc).encode(), False, frozenset({"bad_schema"})),
    "missing_key": lambda ctx, which, st_: (
        _topic(st_),
        json.dumps({"ts": ctx["now"] - 60} if which else {"values": _valid_values(ctx)}).encode(),
        False,
        frozenset({"bad_schema"}),
    ),
    "values_not_object": lambda ctx, v, st_: (_topic(st_), _doc(ctx["now"] - 60, v), False, frozenset({"bad_schema"})),
    "string_number": lambda ctx, ch, text, st_: (
        _topic(st_), _doc(ctx["now"] - 60, {ch: text}), False, frozenset({"bad_type"}),
    ),
    "wrong_type": lambda ctx, ch, v, st_: (_topic(st_), _doc(ctx["now"] - 60, {ch: v}), False, frozenset({"bad_type"})),
    "infinity": lambda ctx, ch, lit, st_: (
        _topic(st_),
        f'{{"ts":{ctx["now"] - 60},"values":{{"{ch}":{lit}}}}}'.encode(),
        False,
        frozenset({"non_finite"}),
    ),
    "nan_ts": lambda ctx, lit, st_: (
        _topic(st_), f'{{"ts":{lit},"values":{{"PM2.5":1}}}}'.encode(), False, frozenset({"non_finite"}),
    ),
    "unknown_channel": lambda ctx, name, st_: (
        _topic(st_), _doc(ctx["now"] - 60, {name: 1.0}), False, frozenset({"unknown_channel"}),
    ),
    "bad_timestamp": lambda ctx, ts, st_: (_topic(st_), _doc(ts, {"PM2.5": 1.0}), False, frozenset({"bad_timestamp"})),
    "bad_topic": lambda ctx, topic: (topic, _doc(ctx["now"] - 60, {"PM2.5": 1.0}), False, frozenset({"bad_topic"})),
    "unknown_station": lambda ctx, name: (
        _topic(name), _doc(ctx["now"] - 60, {"PM2.5": 1.0}), False, frozenset({"unknown_station", "station_limit"}),
    ),
    "retained": lambda ctx, st_: (_topic(st_), _doc(ctx["now"] - 60, {"PM2.5": 1.0}), True, frozenset({"retained"})),
    "future": lambda ctx, ahead, st_: (
        _topic(st_), _doc(ctx["now"] + MAX_FUTURE_S + 1 + ahead, {"PM2.5": 1.0}), False, frozenset({"future"}),
    ),
    "far_past": lambda ctx, back, st_: (
        _topic(st_), _doc(ctx["first"] - 30 * 86400 - back, {"PM2.5": 1.0}), False, frozenset({"too_old"}),
    ),
}

_station = st.sampled_from(STATIONS)
_channel = st.sampled_from(("PM2.5", "PM10", "CO", "TEMP", "wd_sin"))
_small_json = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=5), lambda c: st.lists(c, max_size=3), max_leaves=4
)

hostile = st.one_of(
    st.builds(lambda p, s: Hostile("oversize", (p, s)), st.integers(1, 20000), _station),
    st.builds(lambda b, s: Hostile("bad_utf8", (b, s)), st.binary(max_size=32), _station),
    st.builds(
        lambda t, s: Hostile("bad_json", (t, s)),
        st.text(alphabet=st.characters(blacklist_characters="}", blacklist_categories=("Cs",)), max_size=40),
        _station,
    ),
    st.builds(lambda d, s: Hostile("deep_extra", (d, s)), st.integers(MAX_DEPTH, 3000) | st.just(8000), _station),
    st.builds(lambda d, s: Hostile("deep_value", (d, s)), st.integers(MAX_DEPTH - 1, 3000), _station),
    st.builds(lambda v, s: Hostile("not_object", (v, s)), _small_json, _station),
    st.builds(lambda w, s: Hostile("missing_key", (w, s)), st.booleans(), _station),
    st.builds(
        lambda v, s: Hostile("values_not_object", (v, s)),
        st.lists(st.integers(), max_size=3) | st.text(max_size=8) | st.integers() | st.none(),
        _station,
    ),
    st.builds(
        lambda c, t, s: Hostile("string_number", (c, t, s)),
        _channel,
        st.sampled_from(["12.0", "NaN", "Infinity", "", "1e3", "-200", "null"]) | st.text(max_size=6),
        _station,
    ),
    st.builds(
        lambda c, v, s: Hostile("wrong_type", (c, v, s)),
        _channel,
        st.booleans() | st.lists(st.integers(0, 9), max_size=3) | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
        _station,
    ),
    st.builds(lambda c, lit, s: Hostile("infinity", (c, lit, s)), _channel, st.sampled_from(["Infinity", "-Infinity"]), _station),
    st.builds(lambda lit, s: Hostile("nan_ts", (lit, s)), st.sampled_from(["NaN", "Infinity", "-Infinity"]), _station),
    st.builds(
        lambda n, s: Hostile("unknown_channel", (n, s)),
        st.sampled_from(["pm2.5", "PM25", "PM2.5 ", "", "temp", "__proto__"]) | st.text(min_size=1, max_size=12).filter(
            lambda n: n not in {"PM2.5", "PM10", "SO2", "NO2", "CO", "O3", "TEMP", "PRES", "DEWP", "RAIN", "WSPM", "wd_sin", "wd_cos"}
        ),
        _station,
    ),
    st.builds(
        lambda t, s: Hostile("bad_timestamp", (t, s)),
        st.sampled_from(
            [
                "2013-09-17T00:00:00",  # naive local time
                "2013-02-30T00:00:00Z",  # no such day
                "2013-09-17 25:00:00Z",
                "yesterday",
                "",
                True,
                None,
                [2013, 9, 17],
                {"s": 1},
                1_379_376_000_000,  # epoch milliseconds
                631_152_000,  # 1990
                5_000_000_000,  # 2128
                -1,
            ]
        ),
        _station,
    ),
    st.builds(
        lambda t: Hostile("bad_topic", (t,)),
        st.sampled_from(
            [
                f"{PREFIX}/stations//readings",
                f"{PREFIX}/stations/a b/readings",
                f"{PREFIX}/stations/Aotizhongxin/extra/readings",
                f"{PREFIX}/stations/{'x' * 65}/readings",
                f"{PREFIX}/stations/Aotizhongxin/reading",
                "gapcast/v2/stations/Aotizhongxin/readings",
                f"{PREFIX}/stations/Änderung/readings",
                "",
                "/",
            ]
        ),
    ),
    st.builds(
        lambda n: Hostile("unknown_station", (n,)),
        st.from_regex(r"\A[A-Za-z0-9_.\-]{1,64}\Z").filter(lambda n: n not in STATIONS),
    ),
    st.builds(lambda s: Hostile("retained", (s,)), _station),
    st.builds(lambda a, s: Hostile("future", (a, s)), st.integers(0, 10**9), _station),
    st.builds(lambda b, s: Hostile("far_past", (b, s)), st.integers(0, 10**8), _station),
)


# -- running the core -------------------------------------------------------------------------------------------


def make_core(card: Card, *, auto_register: bool, clock: str) -> AgentCore:
    schema = ReadingSchema(
        card.channel_names, card.valid_min, card.valid_max, max_payload_bytes=MAX_PAYLOAD, max_json_depth=MAX_DEPTH
    )
    settings_ = CoreSettings(
        stations=STATIONS,
        auto_register=auto_register,
        max_stations=len(STATIONS),
        clock=clock,
        lateness_s=600.0,
        max_future_s=MAX_FUTURE_S,
        max_missing_share=0.5,
        max_pending=6,
    )
    return AgentCore(card, Topics(PREFIX, "gw-fuzz"), settings_, schema=schema)


def run(core: AgentCore, valid: list, hostile_at: dict[int, list[Hostile]] | None = None):
    """Feed ``valid`` (with hostile recipes inserted before position i) through ingest + tick.

    Returns:
        (outputs [(topic, payload)] without dead letters, dead letters [payload dict], expected [(sha16, kinds)]).
    """
    outputs, dead, expected = [], [], []
    first = valid[0][2]
    for i in range(len(valid) + 1):
        now = (valid[i - 1][2] if i else first) + LEAD_S
        for h in (hostile_at or {}).get(i, []):
            topic, payload, retained, kinds = h.make({"now": int(now), "first": first})
            expected.append((hashlib.sha256(topic.encode(errors="replace") + b"\0" + payload).hexdigest()[:16], kinds, h.tag))
            for m in core.ingest(topic, payload, now, retained=retained) + core.tick(now):
                (dead.append(json.loads(m.payload)) if m.kind == "deadletter" else outputs.append((m.topic, m.payload)))
        if i == len(valid):
            break
        topic, payload, _ = valid[i]
        now = valid[i][2] + LEAD_S
        for m in core.ingest(topic, payload, now) + core.tick(now):
            (dead.append(json.loads(m.payload)) if m.kind == "deadletter" else outputs.append((m.topic, m.payload)))
    return outputs, dead, expected


def windows_of(core: AgentCore) -> dict:
    return {n: (a, m) for n, (a, m) in core.export_state().items()}


@pytest.fixture(scope="module")
def setup(beijing):
    series = {n: beijing[n] for n in STATIONS}
    card = Card.from_dict(beijing_card_dict(series, lookback=24, horizon=6))
    valid = readings_stream(series, STATIONS, START, STEPS)
    clean = {}
    for auto, clock in MODES:
        core = make_core(card, auto_register=auto, clock=clock)
        outputs, dead, _ = run(core, valid)
        assert dead == []  # the real data holds no input the agent rejects
        clean[auto, clock] = (outputs, windows_of(core), dict(core.counters))
    return card, valid, clean


def test_clean_run_publishes_every_step(setup):
    """Sanity of the reference: 47 closed steps per station (the newest stays open), each filled + forecast."""
    card, valid, clean = setup
    outputs, windows, counters = clean[False, "readings"]
    filled = [json.loads(p) for t, p in outputs if t.endswith("/filled") and not json.loads(p)["revision"]]
    for name in STATIONS:
        steps = [f["epoch_s"] for f in filled if f["station"] == name]
        assert steps == [valid[0][2] + 3600 * k for k in range(STEPS - 1)]
    assert counters["readings"] == 2 * STEPS


@pytest.mark.parametrize(("auto_register", "clock"), MODES, ids=["listed-only-readings-clock", "auto-register-full-gateway-clock"])
def test_hostile_payloads_are_dead_lettered_and_change_nothing(setup, auto_register, clock):
    card, valid, clean = setup
    clean_outputs, clean_windows, _ = clean[auto_register, clock]
    seen: Counter = Counter()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        phases=(Phase.explicit, Phase.reuse, Phase.generate),  # no shrinking: a failure reports its recipe tag
    )
    @given(data=st.data())
    def one_example(data):
        recipes = [data.draw(hostile) for _ in range(PER_EXAMPLE)]
        positions = data.draw(st.lists(st.integers(0, len(valid)), min_size=PER_EXAMPLE, max_size=PER_EXAMPLE))
        at: dict[int, list[Hostile]] = {}
        for pos, h in zip(positions, recipes):
            if h.tag == "far_past" and clock == "readings":
                # On the readings clock the first reading defines time: "far past" exists only after it.
                pos = max(pos, 1)
            at.setdefault(pos, []).append(h)
        core = make_core(card, auto_register=auto_register, clock=clock)
        outputs, dead, expected = run(core, valid, at)
        # Every hostile payload: exactly one dead letter, of an expected kind, in order.
        assert len(dead) == len(expected) == PER_EXAMPLE
        for d, (sha16, kinds, tag) in zip(dead, expected):
            assert d["payload_sha256_16"] == sha16, tag
            assert d["kind"] in kinds, (tag, d["kind"], d["reason"])
            seen[d["kind"]] += 1
        assert Counter(d["kind"] for d in dead) == Counter(core.rejected)
        assert sum(core.rejected.values()) == PER_EXAMPLE
        # The valid readings' outputs and the windows are exactly those of the clean run.
        assert outputs == clean_outputs
        got = windows_of(core)
        assert got.keys() == clean_windows.keys()
        for name, (arrays, meta) in got.items():
            ref_arrays, ref_meta = clean_windows[name]
            assert meta == ref_meta, name
            for k, a in arrays.items():
                np.testing.assert_array_equal(a, ref_arrays[k], err_msg=f"{name}.{k}")

    one_example()
    assert sum(seen.values()) >= EXAMPLES * PER_EXAMPLE
    # The generator reaches every family of bad input the issue lists.
    for kind in ("payload_too_large", "bad_encoding", "bad_json", "too_deep", "bad_schema", "bad_type", "non_finite",
                 "unknown_channel", "bad_timestamp", "bad_topic", "retained", "future", "too_old"):
        assert seen[kind] > 0, kind
    assert seen["station_limit" if auto_register else "unknown_station"] > 0
