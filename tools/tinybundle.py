"""A tiny signed bundle in a few seconds, for tests (the gateway's, the fleet updater's, the export's own).

The model is an untrained, seeded tiny ConFill with the shapes of a dataset spec (default: the ``beijing`` preset, so
L = 96, H = 24 at its cadence, C from the spec, F = 6), so a test can feed it real windows; calibration, parity, gate
and golden windows come from one real station of that dataset (default: its first). The bundle
goes through the same :func:`gapcast.export.pipeline.export_bundle` as a release, with smaller window counts.
"""

from __future__ import annotations

import os
from pathlib import Path

from gapcast.export.pipeline import ExportOptions, ExportResult

__all__ = ["TINY_DATASET", "build_tiny_bundle", "tiny_config", "tiny_options", "tiny_station"]

#: The dataset the tiny bundle is built from by default (a preset name or a spec path).
TINY_DATASET = "beijing"


def tiny_station(dataset: str = TINY_DATASET, data_root: str | os.PathLike | None = None) -> str:
    """The station whose windows the tiny bundle uses by default: the first one the dataset's files hold.

    Raises:
        SpecError: bad spec. DataError: no station data under the data root.
    """
    from gapcast.train.loader import station_names
    from gapcast.train.spec import load_spec

    names = station_names(load_spec(dataset), _data_root(data_root))
    if not names:
        from gapcast.train.spec import SpecError

        msg = f"the files of dataset {dataset!r} hold no station"
        raise SpecError(msg)
    return names[0]


def _data_root(data_root):
    if data_root is None and not os.environ.get("GAPCAST_DATA"):
        sibling = Path(__file__).resolve().parents[2] / "shared" / "data"  # the checkout's ../shared/data
        if sibling.is_dir():
            return sibling
    return data_root


def tiny_config(n_channels: int | None = None):
    """The tiny ConFill config: L = 96, H = 24, d_model 16, 2 encoder layers, 1 decoder layer.

    Args:
        n_channels: C (default: the model channels of :data:`TINY_DATASET`'s spec).
    """
    from gapcast.train.model import ConFillConfig
    from gapcast.train.spec import load_spec

    return ConFillConfig(
        n_channels=n_channels or len(load_spec(TINY_DATASET).model_channels),
        lookback=96,
        horizon=24,
        n_calendar=6,
        d_model=16,
        n_heads=2,
        n_encoder_layers=2,
        n_decoder_layers=1,
        d_ff=32,
        local_window=7,
        n_freq=8,
        conv_kernels=(3, 5),
        dropout=0.0,
    )


def tiny_options(**overrides) -> ExportOptions:
    """Export options sized for tests: few windows, the QDQ variant, no CPU variant.

    The CPU variant is kept or dropped by a speed measurement, which depends on the machine's load; a test fixture
    must not, so it is not built here (the card says so). Its quantizers are tested on their own.
    """
    kw = {
        "target": "trt10",
        "calib_windows": 16,
        "parity_windows": 16,
        "gate_windows": 64,
        "golden_windows": 6,
        "cpu_variant": "none",
        "bench_batch": 16,
        "bench_min_time_s": 0.05,
        "threads": 1,
        "model_version": 1,
    }
    kw.update(overrides)
    return ExportOptions(**kw)


def _tiny_inputs(dspec, cfg, data_root: Path, station: str, seed: int):
    """The export inputs of a tiny bundle: the model spec (card) and the calibration / validation windows.

    One station's training and validation ranges, normalised with its own training statistics, windows a little
    over one and a half windows apart (few, spread over the whole range).

    Returns:
        ``(ModelSpec, WindowData)`` for :func:`gapcast.export.pipeline.export_bundle`.

    Raises:
        DataError: the station's data is missing or too short for one window.
    """
    from gapcast.calendar import CALENDAR_FEATURES
    from gapcast.export.pipeline import ModelSpec, WindowData
    from gapcast.train.data import Normalizer, make_windows
    from gapcast.train.loader import load_dataset, split_indices

    series = load_dataset(dspec, data_root, [station])[station]
    sp = split_indices(dspec, series)
    norm = Normalizer.fit([series.values[sp.train]])
    arrays = {}
    # Strides a little over one and a half windows apart: few windows, spread over the whole range.
    for name, sl, stride in (("train", sp.train, 97), ("val", sp.val, 49)):
        ws = make_windows(
            [norm.transform(series.values[sl])],
            [series.epoch_s[sl]],
            lookback=cfg.lookback,
            horizon=cfg.horizon,
            stride=stride,
            min_observed=0.5,
            utc_offset_s=dspec.utc_offset_s,
            timezone=dspec.timezone,
        )
        arrays[name] = ws.batch(range(len(ws)))
    channels = [
        {
            "name": c.name,
            "unit": c.unit,
            "valid_min": c.valid_min,
            "valid_max": c.valid_max,
            "mean": float(norm.mean[i]),
            "std": float(norm.std[i]),
        }
        for i, c in enumerate(series.channels)
    ]
    spec = ModelSpec(
        lookback=cfg.lookback,
        horizon=cfg.horizon,
        n_calendar=cfg.n_calendar,
        cadence_s=dspec.cadence_s,
        utc_offset_s=dspec.utc_offset_s,
        channels=channels,
        calendar_features=CALENDAR_FEATURES,
        config={k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()},
        timezone=dspec.timezone,
        dataset=dspec.to_dict(),
    )
    data = WindowData(
        train=arrays["train"],
        val=arrays["val"],
        source=f"{dspec.name} station {station} (tiny test bundle, untrained model, seed {seed})",
    )
    return spec, data


def build_tiny_bundle(
    out: str | Path,
    *,
    sign_key=None,
    data_root: str | os.PathLike | None = None,
    station: str | None = None,
    dataset: str = TINY_DATASET,
    seed: int = 0,
    options: ExportOptions | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Build a tiny bundle from an untrained, seeded ConFill and one real station of a dataset.

    Args:
        out: bundle folder to create.
        sign_key: Ed25519 private key (object or PEM path); None writes an unsigned bundle (with a warning).
        data_root: the data root; when None: ``$GAPCAST_DATA``, else the checkout's ``../shared/data``, else the
            user cache (``resolve_data_dir``).
        station: the station whose windows are used (default: :func:`tiny_station`).
        dataset: a dataset spec path or preset name (default :data:`TINY_DATASET`); the card records it.
        seed: torch seed for the weights (same seed, same weights, same golden outputs).
        options: export options (default :func:`tiny_options`).
        overwrite: replace an existing bundle folder.

    Returns:
        The :class:`ExportResult` (``.path`` is the bundle folder).

    Raises:
        ExportError: a failed export check. SpecError / DataError: the spec or the station's data is missing.
    """
    import torch

    from gapcast.export.pipeline import export_bundle
    from gapcast.train.model import ConFill
    from gapcast.train.spec import load_spec

    data_root = _data_root(data_root)
    dspec = load_spec(dataset)
    station = station or tiny_station(dataset, data_root)
    cfg = tiny_config(len(dspec.model_channels))
    torch.manual_seed(seed)
    model = ConFill(cfg).eval()
    spec, data = _tiny_inputs(dspec, cfg, data_root, station, seed)
    return export_bundle(
        model,
        spec,
        data,
        out,
        options or tiny_options(),
        sign_key=sign_key,
        run={"kind": "tiny test bundle", "seed": seed},
        overwrite=overwrite,
    )
