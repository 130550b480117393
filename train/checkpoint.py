"""Checkpoints that carry what rebuilds the model: config, normalisation, channels, cadence and local time.

A checkpoint is a plain dict saved with ``torch.save`` and read back with ``torch.load(weights_only=True)`` (no
pickled classes: only tensors, numbers, strings, lists and dicts), so loading a file from elsewhere runs no code.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import torch

from gapcast.train import TrainError
from gapcast.train.model import ConFill, ConFillConfig

__all__ = ["CHECKPOINT_FORMAT", "build_meta", "load_checkpoint", "read_checkpoint", "save_checkpoint"]

log = logging.getLogger(__name__)

#: Marker and version written into every checkpoint.
CHECKPOINT_FORMAT = "gapcast-confill/1"


def build_meta(
    cfg: ConFillConfig,
    *,
    normalizer: dict[str, list[float]],
    channels: list[dict[str, Any]],
    cadence_s: int,
    utc_offset_s: int,
) -> dict[str, Any]:
    """The metadata every checkpoint carries.

    Args:
        cfg: the model config.
        normalizer: ``Normalizer.to_dict()`` (per-channel mean/std, physical units).
        channels: one dict per channel: name, unit, valid_min, valid_max.
        cadence_s: step length, seconds (the dataset spec's cadence).
        utc_offset_s: the stations' local time offset, seconds (calendar features use it).

    Returns:
        A dict with keys config, normalizer, channels, cadence_s, utc_offset_s.
    """
    return {
        "config": dataclasses.asdict(cfg),
        "normalizer": {"mean": list(normalizer["mean"]), "std": list(normalizer["std"])},
        "channels": [dict(c) for c in channels],
        "cadence_s": int(cadence_s),
        "utc_offset_s": int(utc_offset_s),
    }


def save_checkpoint(path: str | os.PathLike, model: ConFill, meta: dict[str, Any], **extra: Any) -> Path:
    """Write a checkpoint atomically (temporary file, then rename).

    Args:
        path: destination file (``best.pt`` / ``last.pt``).
        model: the model whose ``state_dict`` is saved (unwrap DDP first).
        meta: :func:`build_meta` output.
        **extra: training state (step, optimizer state, RNG state, ...): plain types and tensors only.

    Returns:
        The path written.
    """
    path = Path(path)
    payload = {"format": CHECKPOINT_FORMAT, **meta, "state_dict": model.state_dict(), **extra}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint dict safely (``weights_only=True``).

    Raises:
        TrainError: missing file, unreadable file, or not a gapcast checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"checkpoint {path} not found"
        raise TrainError(msg)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types (pickle, runtime, unsupported global)
        msg = f"cannot read checkpoint {path}: {exc}"
        raise TrainError(msg) from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        msg = f"{path} is not a {CHECKPOINT_FORMAT} checkpoint"
        raise TrainError(msg)
    return payload


def load_checkpoint(path: str | os.PathLike) -> tuple[ConFill, dict[str, Any]]:
    """Rebuild the model from a checkpoint, in eval mode.

    Args:
        path: a ``best.pt`` / ``last.pt`` file, or a run folder (its ``best.pt`` is taken).

    Returns:
        (model, meta): meta holds config (dict), normalizer (mean/std lists), channels, cadence_s, utc_offset_s,
        and the training fields saved with it (step, best_val, ...), without the state_dict.

    Raises:
        TrainError: unreadable file, unknown config keys, or weights that do not fit the config.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt"
    payload = read_checkpoint(path)
    try:
        cfg = ConFillConfig.from_dict(payload["config"])
    except (KeyError, TypeError, ValueError) as exc:
        msg = f"{path}: bad model config: {exc}"
        raise TrainError(msg) from exc
    model = ConFill(cfg)
    try:
        model.load_state_dict(payload["state_dict"])
    except (KeyError, RuntimeError) as exc:
        msg = f"{path}: weights do not match the config: {exc}"
        raise TrainError(msg) from exc
    model.eval()
    skip = {"state_dict", "optimizer", "rng", "format"}
    meta = {k: v for k, v in payload.items() if k not in skip}
    log.info("loaded %s (step %s)", path, meta.get("step"))
    return model, meta
