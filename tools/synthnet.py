"""A small generated station network with its dataset spec: what the "Your own stations" walkthrough and its test
run on (README, "Your own stations").

Five stations, 10-minute readings, six weeks, four channels (temperature, PM2.5, wind speed, wind direction in
degrees), one long CSV with naive local times in Europe/Berlin across the end of summer time (last Sunday of
October: the 02:00-03:00 hour happens twice). The stations' levels differ (a new station is not a copy of another),
and the file holds what real files hold: "NA" and -999 for missing readings, a duplicated row, a value outside its
valid range, and outages of a channel and of a whole station. The spec gives each station a position
(``[[stations]]``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["SPEC_TEXT", "TRAIN_TEXT", "NetworkOptions", "make_network"]

#: A training config sized for this network (README, "A 10-minute network"): six weeks are too short for the default
#: config's 30-day contrastive negatives, and a 1-day lookback suits 10-minute steps on one CPU thread.
TRAIN_TEXT = """\
[model]
lookback = "1d"
horizon = "6h"
d_model = 32
n_heads = 4
n_encoder_layers = 1
n_decoder_layers = 1
d_ff = 64
local_window = 7
n_freq = 8
conv_kernels = [3, 5]
smoother_widths = [3, 9]
dropout = 0.0

[data]
val_stride = 36
val_windows = 32

[masking]
max_block = "12h"
long_from = "2h"

[contrast]
adjacent_min = "1h"
adjacent_max = "4h"
distant_min = "3d"

[optim]
batch_size = 16
warmup_steps = 2
steps_per_epoch = 10
"""

SPEC_TEXT = """\
[dataset]
name = "riverside"
cadence = "10min"
timezone = "Europe/Berlin"

[source]
format = "csv"
layout = "long"
files = ["history/*.csv"]
time = "time"
station = "site"
channel = "variable"
value = "value"
missing = ["", "NA", -999]
aggregate = "mean"

[[channels]]
name = "temp"
column = "air_temp"
unit = "degC"
valid_range = [-40, 50]
group = "weather"

[[channels]]
name = "pm25"
column = "pm2_5"
unit = "ug/m3"
valid_range = [0, 1000]
group = "air"

[[channels]]
name = "ws"
column = "wind_speed"
unit = "m/s"
valid_range = [0, 60]
group = "weather"

[[channels]]
name = "wd"
column = "wind_dir_deg"
kind = "angle_deg"
valid_range = [0, 360]
group = "weather"

[split]
shares = [0.6, 0.2, 0.2]
"""


@dataclass(frozen=True)
class NetworkOptions:
    """Size of the generated network.

    Attributes:
        stations: number of stations.
        days: length of the history, days.
        start: first local day (ISO date); the default puts the autumn clock change in the history.
        seed: random seed.
    """

    stations: int = 5
    days: int = 42
    start: str = "2024-10-01"
    seed: int = 0


def make_network(folder: str | Path, options: NetworkOptions | None = None) -> Path:
    """Write ``folder/history/riverside.csv``, ``folder/riverside.toml`` and a training config ``folder/train.toml``.

    Returns:
        The spec path.
    """
    import pandas as pd

    o = options or NetworkOptions()
    folder = Path(folder)
    (folder / "history").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(o.seed)
    # UTC instants every 10 minutes; written as naive Europe/Berlin wall-clock times (the repeated hour twice).
    utc = pd.date_range(pd.Timestamp(o.start, tz="Europe/Berlin").tz_convert("UTC"), periods=o.days * 144,
                        freq="10min")
    local = utc.tz_convert("Europe/Berlin").tz_localize(None)
    t = np.arange(len(utc))
    hour = local.hour.to_numpy() + local.minute.to_numpy() / 60.0
    rows = []
    for k in range(o.stations):
        name = f"site-{chr(ord('A') + k)}"
        level = 1.0 + 0.4 * k  # levels differ between stations
        temp = 8 + 2 * k + 5 * np.sin(2 * np.pi * (hour - 9) / 24) - 0.05 * t / 144 + rng.normal(0, 0.3, len(t))
        pm = np.clip(level * (20 + 10 * np.sin(2 * np.pi * (hour - 20) / 24) + 5 * np.sin(2 * np.pi * t / (144 * 5)))
                     + rng.normal(0, 2, len(t)), 0, None)
        ws = np.clip(3 + k * 0.3 + 1.5 * np.sin(2 * np.pi * t / (144 * 3)) + rng.normal(0, 0.5, len(t)), 0, None)
        wd = np.mod(200 + 60 * np.sin(2 * np.pi * t / (144 * 4)) + rng.normal(0, 15, len(t)), 360)
        values = {"air_temp": temp, "pm2_5": pm, "wind_speed": ws, "wind_dir_deg": wd}
        text = {c: np.char.mod("%.2f", v).astype(object) for c, v in values.items()}
        # What real files hold: missing tokens, a sentinel, a channel outage, a whole-station outage.
        text["pm2_5"][rng.random(len(t)) < 0.02] = "NA"
        text["air_temp"][rng.random(len(t)) < 0.005] = "-999"
        a = 144 * (7 + 3 * k)
        text["pm2_5"][a : a + 36] = ""  # 6 h without PM2.5
        if k == 1:
            for c in text:
                text[c][144 * 20 : 144 * 21] = "NA"  # a day without the station
        if k == 2:
            text["wind_speed"][100] = "75.0"  # outside the valid range
        stamp = local.strftime("%Y-%m-%d %H:%M").to_numpy()
        for c in ("air_temp", "pm2_5", "wind_speed", "wind_dir_deg"):
            rows.append(pd.DataFrame({"time": stamp, "site": name, "variable": c, "value": text[c]}))
    df = pd.concat(rows, ignore_index=True)
    df = pd.concat([df, df.iloc[[5]]], ignore_index=True)  # a duplicated row (site-A, the 6th air_temp reading)
    df.to_csv(folder / "history" / "riverside.csv", index=False)
    spec = folder / "riverside.toml"
    # Positions along a made-up river (WGS 84 degrees), so the evaluation adds inverse-distance weighting.
    stations = "".join(f'\n[[stations]]\nname = "site-{chr(ord("A") + k)}"\nlat = {52.50 + 0.02 * k:.2f}\n'
                       f"lon = {13.40 + 0.03 * k:.2f}\n" for k in range(o.stations))
    spec.write_text(SPEC_TEXT + stations)
    (folder / "train.toml").write_text(TRAIN_TEXT)
    return spec


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gapcast.tools.synthnet",
                                description="write a small generated station network (long CSV) and its spec")
    p.add_argument("folder")
    p.add_argument("--days", type=int, default=42)
    p.add_argument("--stations", type=int, default=5)
    a = p.parse_args(argv)
    print(make_network(a.folder, NetworkOptions(stations=a.stations, days=a.days)))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
