"""Online skill through the agent core (no broker): hand-computed MAE, drift notices, shadow-hidden fills, restarts.

Card (tests/edge/conftest.py): channels a (mean 10, std 2) and b (mean 0, std 5), cadence 1 h, lookback 6,
horizon 3: buckets "1h-1h" (h = 1) and "2h-3h" (h = 2, 3); no seasonal naive (a day is longer than the lookback),
so persistence is the reference.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import CADENCE, T0
from support.contracts import assert_contracts
from support.edge_replay import beijing_card_dict, readings_stream

from gapcast.edge.agent import AgentCore, CoreSettings
from gapcast.edge.backends import Backend
from gapcast.edge.bundle import Card
from gapcast.edge.messages import Topics


class ConstBackend(Backend):
    """Forecasts 1.0 normalised everywhere (a = 12, b = 5); imputes 0.0 (a = 10, b = 0)."""

    name = "const"

    def describe(self):
        return "const (test)"

    def run(self, values, observed, calendar):
        B, L, C = values.shape
        H = calendar.shape[1] - L
        return np.zeros((B, L, C), np.float32), np.ones((B, H, C), np.float32)


def send(core, t, values):
    core.ingest("gapcast/v1/stations/s1/readings", json.dumps({"ts": t, "values": values}).encode(), t + 60)
    return core.tick(t + 60)


def replay(core, steps=6):
    """a = 10 + k, b = 0 at step k; step k closes when reading k + 1 arrives (steps 0 .. steps-2 close)."""
    out = []
    for k in range(steps):
        out += send(core, T0 + k * CADENCE, {"a": 10.0 + k, "b": 0.0})
    return out


def test_skill_is_scored_by_hand(make_core):
    core = make_core(backend=ConstBackend(), skill_min_count=1000)
    replay(core)
    # Steps 1..4 are scored. h = 1 (origin s-1): model |12 - (10+s)|/2 = .5, 0, .5, 1 on a, 1 on b; persistence
    # (10 + s - 1 vs 10 + s) .5 on a, 0 on b. h = 2, 3: pairs (s, o) = (2,0) (3,1) (3,0) (4,2) (4,1):
    # model a 0 .5 .5 1 1, b 1 each; persistence a = h/2: 1 1 1.5 1 1.5, b 0.
    figs = core.skill.station_mae("s1")
    b1, b2 = figs["buckets"]["1h-1h"], figs["buckets"]["2h-3h"]
    assert b1["n"] == 8 and b1["model"] == pytest.approx(6 / 8) and b1["persistence"] == pytest.approx(2 / 8)
    assert b2["n"] == 10 and b2["model"] == pytest.approx(8 / 10) and b2["persistence"] == pytest.approx(6 / 10)
    assert figs["ratio"] == pytest.approx(14 / 8) and figs["n"] == 18
    body = json.loads(core.status(T0 + 10 * CADENCE).payload)
    assert body["skill"]["span"] == "1w" and body["skill"]["buckets"]["2h-3h"]["n"] == 10
    assert body["skill"]["drift"] == []
    msg = core.skill_message(T0 + 10 * CADENCE)
    assert msg.topic == "gapcast/v1/gateways/gw/skill" and msg.retain
    skill = json.loads(msg.payload)
    assert skill["stations"]["s1"]["ratio"] == pytest.approx(14 / 8) and skill["stations"]["s1"]["drift"] is False
    assert_contracts([(msg.topic, msg.payload), (core.topics.status, core.status(T0).payload)])


def test_drift_is_raised_logged_once_and_cleared(make_core, caplog):
    core = make_core(backend=ConstBackend(), skill_min_count=10, drift_after_s=3600.0)
    with caplog.at_level("WARNING", logger="gapcast.edge.agent"):
        out = replay(core)
    # n reaches 12 >= 10 at step 3 (worse since then); one hour later (step 4) the station is in drift.
    drift = [m for m in out if m.topic.endswith("/drift")]
    assert len(drift) == 1 and drift[0].retain
    d = json.loads(drift[0].payload)
    assert d["drift"] is True and [s["station"] for s in d["stations"]] == ["s1"]
    assert d["stations"][0]["since"] == "2017-01-01T03:00:00Z" and d["stations"][0]["for"] == "1h"
    assert d["stations"][0]["ratio"] == pytest.approx(14 / 8, abs=1e-4)
    assert [r.levelname for r in caplog.records if "model drift" in r.message] == ["WARNING"]
    assert_contracts([(m.topic, m.payload) for m in drift])
    # The model starts forecasting the truth (a = 10 + k + h, b = 0): the ratio falls under 1 and drift clears.
    class Truth(Backend):
        name = "truth"

        def describe(self):
            return "truth (test)"

        def run(self, values, observed, calendar):
            B, L, C = values.shape
            H = calendar.shape[1] - L
            fc = np.zeros((B, H, C), np.float32)
            last = values[:, -1, 0]  # normalised a at the origin
            fc[:, :, 0] = last[:, None] + 0.5 * np.arange(1, H + 1)  # +1 per hour / std 2
            return np.zeros((B, L, C), np.float32), fc

    core.backend = Truth()
    cleared = []
    for k in range(6, 60):
        cleared += [m for m in send(core, T0 + k * CADENCE, {"a": 10.0 + k, "b": 0.0}) if m.topic.endswith("/drift")]
        if cleared:
            break
    assert cleared and json.loads(cleared[0].payload) == {**json.loads(cleared[0].payload), "drift": False, "stations": []}
    assert core.skill.station_mae("s1")["ratio"] <= 1.0


def test_skill_survives_a_restart_with_the_window_snapshot(make_core):
    core = make_core(backend=ConstBackend(), skill_min_count=1000)
    replay(core)
    state = core.export_state()
    assert any(k.startswith("skill.") for k in state["s1"][0])
    again = make_core(backend=ConstBackend(), skill_min_count=1000)
    assert again.restore_state(state) == 1
    assert again.skill.station_mae("s1") == core.skill.station_mae("s1")
    # pending forecasts came along: the next step is scored in both the same way
    send(core, T0 + 6 * CADENCE, {"a": 16.0, "b": 0.0})
    send(again, T0 + 6 * CADENCE, {"a": 16.0, "b": 0.0})
    assert again.skill.station_mae("s1") == core.skill.station_mae("s1")
    assert core.skill.station_mae("s1")["n"] == 18 + 6  # step 5: three origins x two channels


def test_shadow_hidden_values_score_the_fill_and_are_still_published(make_core):
    core = make_core(backend=ConstBackend(), shadow_share=1.0)
    out = replay(core)
    filled = [json.loads(m.payload) for m in out if m.kind == "filled"]
    # every value of the newest step was withheld from the model, yet the published values are the readings
    assert [f["values"]["a"] for f in filled] == [10.0, 11.0, 12.0, 13.0, 14.0] and all(f["imputed"] == [] for f in filled)
    # fill = imputed 0.0 normalised (a = 10, b = 0), LOCF = the previous reading (10 + k - 1); steps 1..4 score
    # (step 0 has no earlier value): a |10 - (10+k)|/2 = .5 1 1.5 2, b 0; LOCF a .5 each, b 0.
    fill = core.skill.fill_mae("s1")
    assert fill["n"] == 8 and fill["model"] == pytest.approx(5 / 8) and fill["locf"] == pytest.approx(2 / 8)
    assert core.counters["shadow_hidden"] == 10


class Recording(Backend):
    """Imputes 1.0 normalised everywhere (a = 12, b = 5) and records the observed mask of each row's newest step."""

    name = "recording"

    def __init__(self):
        self.newest: list[np.ndarray] = []

    def describe(self):
        return "recording (test)"

    def run(self, values, observed, calendar):
        B, L, C = values.shape
        H = calendar.shape[1] - L
        self.newest += [observed[b, -1].copy() for b in range(B)]
        assert not values[observed == 0].any()  # a withheld value never reaches the model, not even as a value
        return np.ones((B, L, C), np.float32), np.zeros((B, H, C), np.float32)


def test_shadow_hidden_fill_is_scored_against_the_actual_reading(make_core):
    be = Recording()
    core = make_core(backend=be, shadow_share=1.0)
    out = replay(core)
    # the model saw every newest step as missing, yet the filled messages carry the readings (never the fill)
    assert all(not m.any() for m in be.newest) and len(be.newest) == 5
    assert [json.loads(m.payload)["values"] for m in out if m.kind == "filled"] == [
        {"a": 10.0 + k, "b": 0.0} for k in range(5)
    ]
    # fill a = 12 vs the readings 11, 12, 13, 14 (steps 1..4): |1|, 0, 1, 2 over std 2; b = 5 vs 0: 1 each.
    # Against the published fill (12) the error would be 0: it is the reading that scores.
    fill = core.skill.fill_mae("s1")
    assert fill["n"] == 8 and fill["model"] == pytest.approx((0.5 + 0 + 0.5 + 1 + 4 * 1) / 8)
    assert fill["locf"] == pytest.approx(4 * 0.5 / 8)  # LOCF a is 1 behind (0.5), b exact


class Context(Backend):
    """Imputes channel c as (c + 1) normalised where the row's newest step observed c, else 0: the real-time fill of
    a gap step (newest step missing) is the mean (a = 10, b = 0); the revision after the gap is a = 12, b = 10."""

    name = "context"

    def describe(self):
        return "context (test)"

    def run(self, values, observed, calendar):
        B, L, C = values.shape
        H = calendar.shape[1] - L
        imp = np.broadcast_to((observed[:, -1:, :] * np.arange(1, C + 1)), (B, L, C)).astype(np.float32)
        return imp, np.zeros((B, H, C), np.float32)


def outage(core, silent=(3, 4, 5), through=8):
    """Readings a = 10 + k, b = 0 at steps 0 .. through-1, none at the silent steps (an outage)."""
    out = []
    for k in range(through):
        if k not in silent:
            t = T0 + k * CADENCE
            body = json.dumps({"ts": t, "values": {"a": 10.0 + k, "b": 0.0}}).encode()
            out += core.ingest("gapcast/v1/stations/s1/readings", body, t + 60)  # a jump ahead closes steps here
            out += core.tick(t + 60)
    return out


def test_real_time_fills_are_scored_against_the_revision_when_an_outage_ends(make_core):
    core = make_core(backend=Context())
    out = outage(core)
    filled = {json.loads(m.payload)["ts"]: json.loads(m.payload)["values"] for m in out if m.kind == "filled"}
    (rev,) = [json.loads(m.payload) for m in out if m.kind == "revision"]
    assert rev["reason"] == "gap_end" and [s["ts"] for s in rev["steps"]] == [
        "2017-01-01T03:00:00Z", "2017-01-01T04:00:00Z", "2017-01-01T05:00:00Z"]  # fmt: skip
    # what was published in real time for the gap steps, and what replaced it
    assert [filled[s["ts"]] for s in rev["steps"]] == [{"a": 10.0, "b": 0.0}] * 3
    assert [s["values"] for s in rev["steps"]] == [{"a": 12.0, "b": 10.0}] * 3
    # a: |10 - 12| = 2, b: |0 - 10| = 10, three steps each; pooled normalised (2/2 + 10/5) / 2 = 1.5
    want = {"channels": {"a": {"mae": 2.0, "n": 3}, "b": {"mae": 10.0, "n": 3}}, "mae_norm": 1.5, "n": 6}
    assert core.skill.revision_mae("s1") == want and core.skill.revision_mae() == want
    status = json.loads(core.status(T0 + 9 * CADENCE).payload)
    assert status["skill"]["revision"] == want
    msg = core.skill_message(T0 + 9 * CADENCE)
    body = json.loads(msg.payload)
    assert body["revision"] == want and body["stations"]["s1"]["revision"] == want
    assert_contracts([(msg.topic, msg.payload), (core.topics.status, core.status(T0).payload)])
    # each real-time fill is scored once: the gap is over, later steps add nothing
    send(core, T0 + 8 * CADENCE, {"a": 18.0, "b": 0.0})
    assert core.skill.revision_mae("s1")["n"] == 6


def test_revision_skill_survives_a_restart_in_the_middle_of_the_outage(make_core):
    core = make_core(backend=Context())
    outage(core, through=5)  # readings 0, 1, 2; steps 3 and 4 silent ...
    core.tick(T0 + 5 * CADENCE + 3600)  # ... and closed by the gateway clock: their real-time fills are published
    state = core.export_state()
    s0 = T0 // CADENCE  # step indices are epoch / cadence; the ring has lookback = 6 slots
    assert sorted(state["s1"][0]["skill.rt_step"].tolist()) == [-1, -1, -1, -1, s0 + 3, s0 + 4]
    again = make_core(backend=Context())
    assert again.restore_state(state) == 1
    for c in (core, again):
        for k in (5, 6, 7):  # the outage ends at step 5 (6 and 7 close it)
            send(c, T0 + k * CADENCE, {"a": 10.0 + k, "b": 0.0})
    # steps 3 and 4, filled in real time before the restart, scored after it: a 2 off, b 10 off (as above)
    want = {"channels": {"a": {"mae": 2.0, "n": 2}, "b": {"mae": 10.0, "n": 2}}, "mae_norm": 1.5, "n": 4}
    assert again.skill.revision_mae("s1") == core.skill.revision_mae("s1") == want


def test_skill_off(make_core):
    core = make_core(backend=ConstBackend(), skill=False)
    out = replay(core)
    assert core.skill is None and core.skill_message(T0) is None and not [m for m in out if "drift" in m.topic]
    assert json.loads(core.status(T0).payload)["skill"] == {"enabled": False}


# -- Beijing: a garbage model drifts within the span, a good one never does ------------------------------------


class Garbage(Backend):
    """Forecasts noise: 3 std off, random sign."""

    name = "garbage"

    def describe(self):
        return "garbage (test)"

    def __init__(self):
        self.rng = np.random.default_rng(1)

    def run(self, values, observed, calendar):
        B, L, C = values.shape
        H = calendar.shape[1] - L
        return np.zeros((B, L, C), np.float32), (3 * self.rng.choice([-1, 1], (B, H, C))).astype(np.float32)


class Nudged(Backend):
    """A good, persistence-like forecaster: persistence moved 10 % of the way to seasonal naive (one day back).
    On this replay its rolling ratio ends at 0.978 (Aotizhongxin) and 0.983 (Changping); pure persistence is 1.0."""

    name = "nudged"

    def describe(self):
        return "nudged persistence (test)"

    def run(self, values, observed, calendar):
        from gapcast.baselines import locf

        B, L, C = values.shape
        H = calendar.shape[1] - L
        f = locf(values, observed > 0.5)
        last, seas = f[:, -1:, :], f[:, L - 24 + np.arange(H), :]
        return f.astype(np.float32), (last + 0.1 * (seas - last)).astype(np.float32)


STATIONS = ("Aotizhongxin", "Changping")
DAYS = 9


def beijing_run(beijing, backend):
    series = {n: beijing[n] for n in STATIONS}
    card = Card.from_dict(beijing_card_dict(series, lookback=48, horizon=6))
    core = AgentCore(card, Topics("gapcast/v1", "gw"), CoreSettings(stations=STATIONS, clock="readings",
                                                                     max_missing_share=1.0), backend=backend)
    first_drift, t0 = None, None
    for topic, payload, ts in readings_stream(series, STATIONS, 24 * 40, 24 * DAYS):
        t0 = ts if t0 is None else t0
        core.ingest(topic, payload, ts + 60)
        out = core.tick(ts + 60)
        if first_drift is None and any(m.topic.endswith("/drift") and json.loads(m.payload)["drift"] for m in out):
            first_drift = ts - t0
    return core, first_drift


def test_a_garbage_model_drifts_within_the_span_on_beijing(beijing):
    core, first = beijing_run(beijing, Garbage())
    assert first is not None and first < 7 * 86400  # inside the default 7-day span
    assert first >= 86400  # not before drift_after (24 h) has passed
    assert sorted(core.drift) == list(STATIONS) and core.skill.station_mae(STATIONS[0])["ratio"] > 2


def test_a_good_model_never_drifts_on_beijing(beijing):
    core, first = beijing_run(beijing, Nudged())
    assert first is None and core.drift == {}
    for name in STATIONS:
        figs = core.skill.station_mae(name)
        assert figs["n"] > 1000 and figs["ratio"] < 1.0, figs


def test_skill_section_of_edge_toml(tmp_path):
    from gapcast.edge import ConfigError
    from gapcast.edge.config import parse_config

    base = {"gateway": {"id": "gw"}, "stations": {"names": ["s1"]}, "agent": {"state_dir": str(tmp_path)}}
    cfg = parse_config({**base, "skill": {"span": "3d", "drift_after": "12h", "min_count": 50, "shadow_share": 0.05}})
    assert (cfg.skill.span_s, cfg.skill.drift_after_s, cfg.skill.min_count, cfg.skill.shadow_share) == (259200.0, 43200.0, 50, 0.05)
    settings = CoreSettings.from_config(cfg)
    assert (settings.skill_span_s, settings.drift_after_s, settings.shadow_share) == (259200.0, 43200.0, 0.05)
    assert parse_config(base).skill.span_s == 7 * 86400 and parse_config(base).skill.shadow_share == 0.0
    with pytest.raises(ConfigError, match="skill.span"):
        parse_config({**base, "skill": {"span": 7}})  # a duration carries its unit
    with pytest.raises(ConfigError, match="skill.colour"):
        parse_config({**base, "skill": {"colour": "red"}})


def test_skill_on_the_metrics_endpoint(make_core):
    pytest.importorskip("prometheus_client")
    from prometheus_client import generate_latest

    from gapcast.edge.metrics import Metrics
    from gapcast.tools.localbroker import free_port

    core = make_core(backend=ConstBackend(), skill_min_count=1000)
    replay(core)
    m = Metrics(f"127.0.0.1:{free_port()}", gateway="gw", fleet="default")
    assert m.start()
    try:
        m.update(core.status_body())
        lines = set(generate_latest(m.registry).decode().splitlines())
    finally:
        m.close()
    assert 'gapcast_skill_mae{bucket="2h-3h",method="model"} 0.8' in lines
    assert 'gapcast_skill_mae{bucket="2h-3h",method="persistence"} 0.6' in lines
    assert "gapcast_drift_stations 0.0" in lines


def test_fill_skill_on_the_metrics_endpoint(make_core):
    pytest.importorskip("prometheus_client")
    from prometheus_client import generate_latest

    from gapcast.edge.metrics import Metrics
    from gapcast.tools.localbroker import free_port

    shadow = make_core(backend=ConstBackend(), shadow_share=1.0)
    replay(shadow)  # as in the shadow test above: model 5/8, LOCF 2/8
    gap = make_core(backend=Context())
    outage(gap)  # as in the revision test above: a 2.0, b 10.0
    m = Metrics(f"127.0.0.1:{free_port()}", gateway="gw", fleet="default")
    assert m.start()
    try:
        m.update(shadow.status_body())
        lines = set(generate_latest(m.registry).decode().splitlines())
        assert 'gapcast_shadow_fill_mae{method="model"} 0.625' in lines
        assert 'gapcast_shadow_fill_mae{method="locf"} 0.25' in lines
        assert not [x for x in lines if x.startswith("gapcast_revision_fill_mae{")]  # no outage: no figure
        m.update(gap.status_body())
        lines = set(generate_latest(m.registry).decode().splitlines())
    finally:
        m.close()
    assert 'gapcast_revision_fill_mae{channel="a"} 2.0' in lines
    assert 'gapcast_revision_fill_mae{channel="b"} 10.0' in lines
    assert not [x for x in lines if x.startswith("gapcast_shadow_fill_mae{")]  # shadow hiding is off by default
