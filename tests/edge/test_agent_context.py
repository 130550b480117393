"""The agent with a context model's card (issue 20): each row's context comes from the other stations' live
windows at the same steps, in the same batched round; payloads say whether context was used.

Card: the conftest card (channels a: mean 10, std 2; b: mean 0, std 5; lookback 6, horizon 3) plus a context entry
on channel a only (G = 1): s1's neighbour is s2 (weight 1), s2's are s1 and s3 (0.5 each), s3 has none. The
model input is then [B, 6, 3]: a, b, context of a.
"""

from __future__ import annotations

import json

import numpy as np
from conftest import CADENCE, T0, card_dict
from support.contracts import assert_contracts

from gapcast.edge.backends import Backend
from gapcast.edge.bundle import Card
from gapcast.neighbours import ContextSpec


def context_card():
    d = card_dict()
    spec = ContextSpec(stations=("s1", "s2", "s3"), channels=("a",), channel_index=(0,),
                       weights=np.array([[[0], [1], [0]], [[0.5], [0], [0.5]], [[0], [0], [0]]], float),
                       method="correlation", k=2)
    d["inputs"] = [{"name": "values", "shape": ["batch", 6, 3], "dtype": "float32"}]
    d["context"] = {"kind": "neighbours", "station_channels": 2, "columns": [2], "channels": ["a"],
                    "spec": spec.to_dict()}
    return Card.from_dict(d)


class Recording(Backend):
    """imputed = the context column copied into channel a (so a filled a shows the context in physical units),
    0.5 for b; forecast 0. Records every batch it is given."""

    name = "recording"

    def __init__(self):
        self.batches = []

    def describe(self):
        return "recording (test)"

    def run(self, values, observed, calendar):
        self.batches.append((values.copy(), observed.copy()))
        B, L, C = values.shape
        imp = np.full((B, L, C), 0.5, np.float32)
        imp[..., 0] = values[..., 2]
        return imp, np.zeros((B, calendar.shape[1] - L, C), np.float32)


def send(core, station, t, values):
    return core.ingest(f"gapcast/v1/stations/{station}/readings", json.dumps({"ts": t, "values": values}).encode(),
                       t + 60)


def test_context_from_the_neighbours_live_windows_in_one_round(make_core):
    be = Recording()
    core = make_core(backend=be, card_=context_card(), clock="readings", auto_register=True)
    assert core.context_spec is not None and be.name == "recording"
    for j in range(3):
        send(core, "s2", T0 + j * CADENCE, {"a": 14.0 + 2 * j, "b": 0.0})  # normalised a: 2, 3, 4
        send(core, "s3", T0 + j * CADENCE, {"a": 30.0, "b": 0.0})  # normalised a: 10
        send(core, "s1", T0 + j * CADENCE, {"b": 1.0} if j == 1 else {"a": 10.0, "b": 1.0})  # a missing at step 1
    out = core.tick(T0 + 10 * CADENCE)
    assert len(be.batches) == 1  # one batched round for all stations
    v, o = be.batches[0]
    assert v.shape[-1] == 3
    filled = {(b["station"], b["ts"]): b for b in (json.loads(m.payload) for m in out if m.kind == "filled")}
    # s1 at step 1: a was missing; its context is s2's a at that step (normalised 3): the recording backend
    # writes it into a -> 10 + 3 * 2 = 16 in physical units.
    f = filled[("s1", "2017-01-01T01:00:00Z")]
    assert f["imputed"] == ["a"] and f["values"]["a"] == 16.0 and f["context"] == "neighbours"
    # s2's context: at step 0 the mean of s1 (normalised 0) and s3 (10), weights 0.5 each -> 5; at step 1 s1's a
    # is missing, so s3 alone (weights renormalised) -> 10.
    assert filled[("s2", "2017-01-01T01:00:00Z")]["context"] == "neighbours"
    (row,) = [b for b in range(len(v)) if v[b, -1, 0] == 3.0 and o[b, -1, 0] == 1.0]
    assert v[row, -2:, 2].tolist() == [5.0, 10.0] and o[row, -2:, 2].tolist() == [1.0, 1.0]
    assert o[row, :-2, 2].sum() == 0  # before the first readings nobody reported
    s3 = [b for (st, _), b in filled.items() if st == "s3"]
    assert s3 and all(b["context"] == "none" for b in s3)  # s3 has no neighbours in the card
    fc = [json.loads(m.payload) for m in out if m.kind == "forecast"]
    assert {b["station"]: b["context"] for b in fc}["s1"] == "neighbours"
    assert_contracts((m.topic, m.payload) for m in out)
    status = core.status_body()["context"]
    assert status == {"kind": "neighbours", "stations_with": 3, "without": {}}


def test_new_station_gets_neighbours_by_coordinates_or_runs_without(make_core):
    coords = {"s1": (39.90, 116.40), "s2": (39.90, 116.50), "s3": (39.90, 117.50), "new": (39.90, 116.51)}
    be = Recording()
    core = make_core(backend=be, card_=context_card(), clock="readings", auto_register=True, coordinates=coords)
    for j in range(3):
        send(core, "s2", T0 + j * CADENCE, {"a": 12.0, "b": 0.0})  # normalised 1
        send(core, "new", T0 + j * CADENCE, {"b": 0.0})  # a never observed
        send(core, "lonely", T0 + j * CADENCE, {"b": 0.0})
    out = core.tick(T0 + 10 * CADENCE)
    assert core.context_spec.neighbours_of("new")["a"][0] == "s2"  # nearest first
    filled = [json.loads(m.payload) for m in out if m.kind == "filled"]
    new = [b for b in filled if b["station"] == "new"]
    # new's a comes from s2 (and s1, silent): s2's normalised 1 -> 12.0
    assert new and all(b["context"] == "neighbours" and b["values"]["a"] == 12.0 for b in new)
    assert all(b["context"] == "none" for b in filled if b["station"] == "lonely")
    assert "lonely" in core.status_body()["context"]["without"]
    assert_contracts((m.topic, m.payload) for m in out)


def test_temporal_only_card_publishes_context_none(make_core):
    from conftest import FakeBackend

    core = make_core(backend=FakeBackend(), clock="readings")
    send(core, "s1", T0, {"a": 10.0, "b": 1.0})
    send(core, "s1", T0 + CADENCE, {"a": 10.0, "b": 1.0})
    out = core.tick(T0 + 10 * CADENCE)
    assert out and all(json.loads(m.payload)["context"] == "none" for m in out if m.kind in ("filled", "forecast"))
    assert core.status_body()["context"] == {"kind": "none"}


def test_station_coordinates_in_the_gateway_config(tmp_path):
    import pytest

    from gapcast.edge.config import ConfigError, parse_config

    base = {"gateway": {"id": "gw"}, "mqtt": {"host": "localhost"}, "agent": {"state_dir": str(tmp_path)},
            "stations": {"names": ["s1"], "auto_register": True, "coordinates": {"s1": [39.9, 116.4], "new": [39.95, 116.5]}}}
    cfg = parse_config(base, base=tmp_path)
    assert cfg.stations.coordinates == {"s1": (39.9, 116.4), "new": (39.95, 116.5)}
    base["stations"]["coordinates"] = {"s1": [139.9, 116.4]}
    with pytest.raises(ConfigError, match=r"stations\.coordinates\.s1: must be \[lat, lon\]"):
        parse_config(base, base=tmp_path)
