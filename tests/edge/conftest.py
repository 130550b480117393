"""Fixtures for the edge tests: a small model card, a deterministic fake backend, a core factory."""

from __future__ import annotations

import numpy as np
import pytest

from gapcast.edge.agent import AgentCore, CoreSettings
from gapcast.edge.backends import Backend
from gapcast.edge.bundle import Card
from gapcast.edge.messages import ReadingSchema, Topics

CADENCE = 3600
T0 = 1_483_228_800  # 2017-01-01T00:00:00Z, a step start for hourly cadence


def card_dict(channels=(("a", 0.0, 100.0, 10.0, 2.0), ("b", -50.0, 50.0, 0.0, 5.0)), lookback=6, horizon=3,
              cadence_s=CADENCE, version=7, utc_offset_s=0):
    """A valid card dict: channels as (name, valid_min, valid_max, mean, std)."""
    C = len(channels)
    return {
        "schema_version": 1,
        "model": {"name": "confill", "version": version},
        "created": "2026-11-29T00:00:00Z",
        "channels": [
            {"name": n, "unit": "u", "valid_min": lo, "valid_max": hi, "mean": m, "std": s}
            for n, lo, hi, m, s in channels
        ],
        "cadence_s": cadence_s,
        "lookback": lookback,
        "horizon": horizon,
        "calendar": {"features": ["hour_sin", "hour_cos", "dow_sin", "dow_cos", "doy_sin", "doy_cos"],
                     "utc_offset_s": utc_offset_s},
        "inputs": [{"name": "values", "shape": ["batch", lookback, C], "dtype": "float32"}],
        "outputs": [{"name": "imputed", "shape": ["batch", lookback, C], "dtype": "float32"}],
        "files": {"model.onnx": {"sha256": "0" * 64, "bytes": 1}},
        "variants": {"fp32": {"file": "model.onnx", "precision": "fp32"}},
    }


class FakeBackend(Backend):
    """Deterministic and row-independent: imputed = 0.5 everywhere (normalised); forecast step h of channel c =
    mean of the observed normalised values of channel c in the row + 0.1 * (h + 1) + 0.01 * calendar[L + h, 0]."""

    name = "fake"

    def __init__(self, fail: bool = False):
        self.calls: list[int] = []
        self.fail = fail

    def describe(self):
        return "fake (test)"

    def run(self, values, observed, calendar):
        self.calls.append(values.shape[0])
        if self.fail:
            raise RuntimeError("fake backend failure")
        B, L, C = values.shape
        H = calendar.shape[1] - L
        imputed = np.full((B, L, C), 0.5, dtype=np.float32)
        cnt = np.maximum(observed.sum(axis=1), 1.0)  # [B, C]
        mean = (values * observed).sum(axis=1) / cnt
        h = np.arange(1, H + 1, dtype=np.float32)[None, :, None] * 0.1
        fc = mean[:, None, :] + h + 0.01 * calendar[:, L:, 0:1]
        return imputed, fc.astype(np.float32)


@pytest.fixture
def card():
    return Card.from_dict(card_dict())


@pytest.fixture
def make_core(card):
    """Factory: make_core(backend=..., **CoreSettings overrides) -> AgentCore for stations s1, s2 (gateway gw)."""

    def make(backend=None, card_=None, sentinels=(-200.0, -9999.0), **kw):
        c = card_ or card
        kw.setdefault("stations", ("s1", "s2", "s3"))
        kw.setdefault("lateness_s", 600.0)
        kw.setdefault("max_future_s", 300.0)
        kw.setdefault("max_missing_share", 1.0)
        kw.setdefault("max_pending", 4)
        schema = ReadingSchema(c.channel_names, c.valid_min, c.valid_max, sentinels=sentinels)
        return AgentCore(c, Topics("gapcast/v1", "gw"), CoreSettings(**kw), schema=schema, backend=backend)

    return make
