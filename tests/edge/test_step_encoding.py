"""The step outputs' fast encoder (issue 17): the same bytes as ``json.dumps`` on every path."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gapcast.edge import messages as M

CH = ("PM2.5", "PM10", "TEMP", "WSPM")
T = M.Topics("gapcast/v1", "gw-1")


def _ref(payload: bytes) -> bytes:
    return json.dumps(json.loads(payload), separators=(",", ":"), allow_nan=False).encode()


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3, 1e7])
def test_forecast_and_filled_bytes_equal_json_dumps(scale):
    rng = np.random.default_rng(0)
    fc = (rng.standard_normal((24, 4)) * scale).astype(np.float32)
    fc[0, 0], fc[0, 1] = -0.0, 1e-5  # -0.0 and a value that rounds to 0.0 (json: "5e-05" only before rounding)
    m = M.forecast_message(T, "s1", 1462060800, 3600, CH, fc, 0.125, "model", 3, 1462064400.0,
                           units={"PM2.5": "ug/m3"})
    assert m.payload == _ref(m.payload)
    body = json.loads(m.payload)
    assert body["steps"][23]["ts"] == "2016-05-02T00:00:00Z"  # origin + 24 h (the cached RFC 3339 text)
    f = M.filled_message(T, "s1", 1462060800, 3600, CH, fc[1] * 1.0, np.array([1, 0, 0, 1], bool), "model", 3)
    assert f.payload == _ref(f.payload)
    assert json.loads(f.payload)["imputed"] == ["PM2.5", "WSPM"]


def test_non_ascii_units_are_escaped_as_json_does():
    m = M.forecast_message(T, "s1", 1462060800, 3600, CH, np.ones((2, 4), np.float32), 0.0, "model", 1, 0.0,
                           units={"PM2.5": "\u00b5g/m\u00b3"})
    assert b"\\u00b5g/m\\u00b3" in m.payload and m.payload == _ref(m.payload)


def test_non_finite_values_still_raise():
    fc = np.ones((2, 4), np.float32)
    fc[1, 2] = np.nan
    with pytest.raises(ValueError):
        M.forecast_message(T, "s1", 1462060800, 3600, CH, fc, 0.0, "model", 1, 0.0)
