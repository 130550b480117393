"""A context bundle served by the real agent core (issue 20): every Beijing station replayed in-process on the test
months, one station's pollutants hidden for 24 h; the real-time (first) fill MAE of the hidden values, normalised
by the card's std, with the neighbours' live windows and with the same station alone.

    python -m gapcast.bench.serve_context BUNDLE_DIR     # unsigned bundles accepted: a local check, not a gateway
"""

from __future__ import annotations

import json
import sys

import numpy as np

from gapcast.edge.agent import AgentCore, CoreSettings
from gapcast.edge.backends import select_backend
from gapcast.edge.bundle import verify_bundle
from gapcast.edge.messages import Topics
from gapcast.train.loader import load_dataset, split_indices
from gapcast.train.spec import load_spec


def run(b, series, spec, stations, target, start_off):
    """Real-time fill MAE (normalised) of ``target``'s pollutants over a 24 h outage, context kinds, status kind."""
    chans = b.card.channel_names
    pol = [chans.index(p) for p in ("PM2.5", "PM10", "SO2", "NO2", "CO", "O3")]
    std = b.card.std[pol]
    core = AgentCore(b.card, Topics("gapcast/v1", "gw"), CoreSettings(stations=tuple(stations), clock="readings",
                     max_missing_share=1.0), backend=select_backend(b, prefer="onnxruntime", variant="fp32"))
    s0 = series[target]
    i0 = split_indices(spec, s0).test.start + start_off
    T = 140
    hide = (96, 120)
    out = []
    for i in range(i0, i0 + T):
        for n in stations:
            s = series[n]
            row = s.values[i]
            vals = {c: (None if np.isnan(v) else float(v)) for c, v in zip(chans, row)}
            if n == target and hide[0] <= i - i0 < hide[1]:
                for j in pol:
                    vals[chans[j]] = None
            core.ingest(f"gapcast/v1/stations/{n}/readings", json.dumps({"ts": int(s.epoch_s[i]), "values": vals}).encode(), float(s.epoch_s[i]) + 60)
        out += core.tick(float(s0.epoch_s[i]) + 60)
    err, kinds = [], set()
    for m in out:
        if m.kind != "filled":
            continue
        body = json.loads(m.payload)
        if body["station"] != target:
            continue
        k = int((body["epoch_s"] - s0.epoch_s[i0]) // 3600)
        kinds.add(body.get("context"))
        if hide[0] <= k < hide[1]:
            truth = s0.values[i0 + k, pol]
            pred = np.array([body["values"][chans[j]] for j in pol])
            ok = ~np.isnan(truth)
            err.append((np.abs(pred - truth) / std)[ok])
    return float(np.concatenate(err).mean()), sorted(kinds), core.status_body()["context"]["kind"]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    b = verify_bundle(args[0], require_signature=False)
    spec = load_spec("beijing")
    series = load_dataset(spec, None)
    names = sorted(series)
    for off in (500, 2500, 4500):  # three outages, hours after the test months start
        net = run(b, series, spec, names, names[0], off)
        alone = run(b, series, spec, [names[0]], names[0], off)
        print(f"outage at test+{off} h: with neighbours {net[0]:.4f} (context {net[1]}), alone {alone[0]:.4f} "
              f"(context {alone[1]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
