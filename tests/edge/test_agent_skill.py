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
