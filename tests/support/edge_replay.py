"""Test helpers for the reliability tests: a Beijing model card and real station readings as MQTT messages.

No onnx, no torch: the card describes the real Beijing channels (names, valid ranges, normalisation from the data)
so the agent validates and fills real readings; inference is the agent's interpolation fallback or a numpy rule.
"""

from __future__ import annotations

import json
import math

import numpy as np

PREFIX = "gapcast/v1"


def beijing_card_dict(series: dict, *, lookback: int = 24, horizon: int = 6, version: int = 1) -> dict:
    """A valid card for the 13 Beijing channels (ranges from the data loader, mean/std from ``series``)."""
    first = next(iter(series.values()))
    stacked = np.concatenate([s.values for s in series.values()])
    mean = np.nanmean(stacked, axis=0)
    std = np.nanstd(stacked, axis=0)
    channels = [
        {
            "name": ch.name,
            "unit": ch.unit,
            "valid_min": ch.valid_min,
            "valid_max": ch.valid_max,
            "mean": float(m),
            "std": float(s) if s > 0 else 1.0,
        }
        for ch, m, s in zip(first.channels, mean, std)
    ]
    C = len(channels)
    return {
        "schema_version": 1,
        "model": {"name": "confill", "version": version},
        "created": "2026-11-29T00:00:00Z",
        "channels": channels,
        "cadence_s": 3600,
        "lookback": lookback,
        "horizon": horizon,
        "calendar": {
            "features": ["hour_sin", "hour_cos", "dow_sin", "dow_cos", "doy_sin", "doy_cos"],
            "utc_offset_s": 8 * 3600,
        },
        "inputs": [{"name": "values", "shape": ["batch", lookback, C], "dtype": "float32"}],
        "outputs": [{"name": "imputed", "shape": ["batch", lookback, C], "dtype": "float32"}],
        "files": {"model.onnx": {"sha256": "0" * 64, "bytes": 1}},
        "variants": {"fp32": {"file": "model.onnx", "precision": "fp32"}},
    }


def reading_payload(epoch_s: int, row: np.ndarray, channels: tuple[str, ...]) -> bytes:
    """``{"ts": epoch seconds, "values": {...}}`` with ``null`` for the real missing values."""
    values = {c: (None if math.isnan(float(v)) else round(float(v), 4)) for c, v in zip(channels, row)}
    return json.dumps({"ts": int(epoch_s), "values": values}, separators=(",", ":")).encode()


def readings_stream(series: dict, stations: tuple[str, ...], start: int, steps: int) -> list[tuple[str, bytes, int]]:
    """Real readings of ``stations`` for rows ``start .. start + steps - 1``, hour by hour, as
    ``(topic, payload, epoch_s)`` in time order (stations interleaved within an hour)."""
    out = []
    for i in range(start, start + steps):
        for name in stations:
            s = series[name]
            names = tuple(ch.name for ch in s.channels)
            out.append((f"{PREFIX}/stations/{name}/readings", reading_payload(int(s.epoch_s[i]), s.values[i], names), int(s.epoch_s[i])))
    return out
