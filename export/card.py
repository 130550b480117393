"""The model card (``card.json``) and its Ed25519 signature (``card.sig``): writing side.

The schema is defined once, on the reading side, by :class:`gapcast.edge.bundle.Card`; this module builds a dict
that satisfies it, pins every other bundle file by sha256, validates the result with ``Card.from_dict`` before
writing, and signs the exact bytes written (RFC 8032 Ed25519, raw 64-byte signature).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gapcast.edge.bundle import CARD_NAME, SCHEMA_VERSION, SIG_NAME, Card, sha256_file
from gapcast.export import ExportError
from gapcast.timefmt import now_rfc3339

__all__ = [
    "card_bytes",
    "channel_entries",
    "io_entries",
    "pin_files",
    "rfc3339_now",
    "sign_bundle",
    "write_card",
]

log = logging.getLogger(__name__)


rfc3339_now = now_rfc3339  # current UTC time, RFC 3339 with a Z suffix (gapcast.timefmt)


def _finite(obj: Any) -> Any:
    """Copy of a JSON-like object with NaN/inf floats replaced by None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:  # numpy scalar
        return _finite(obj.item())
    return obj


def card_bytes(card: dict[str, Any]) -> bytes:
    """Canonical bytes of a card: sorted keys, 2-space indent, UTF-8, trailing newline, no NaN.

    Raises:
        ExportError: the card holds something JSON cannot encode.
    """
    try:
        text = json.dumps(_finite(card), indent=2, sort_keys=True, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        msg = f"card.json cannot be encoded: {exc}"
        raise ExportError(msg) from exc
    return (text + "\n").encode("utf-8")


def channel_entries(
    names: Sequence[str],
    units: Sequence[str],
    valid_min: Sequence[float],
    valid_max: Sequence[float],
    mean: Sequence[float],
    std: Sequence[float],
) -> list[dict[str, Any]]:
    """The card's ``channels`` list (model column order), physical units.

    Raises:
        ExportError: the sequences differ in length.
    """
    n = len(names)
    if not all(len(s) == n for s in (units, valid_min, valid_max, mean, std)):
        msg = "channel names, units, ranges and normalisation must have the same length"
        raise ExportError(msg)
    return [
        {
            "name": str(names[i]),
            "unit": str(units[i]),
            "valid_min": float(valid_min[i]),
            "valid_max": float(valid_max[i]),
            "mean": float(mean[i]),
            "std": float(std[i]),
        }
        for i in range(n)
    ]


def io_entries(lookback: int, horizon: int, n_channels: int, n_calendar: int) -> tuple[list, list]:
    """The card's ``inputs`` and ``outputs``: names, shapes (``"batch"`` for B) and dtypes of the ONNX graph."""
    inputs = [
        {"name": "values", "shape": ["batch", lookback, n_channels], "dtype": "float32"},
        {"name": "observed", "shape": ["batch", lookback, n_channels], "dtype": "float32"},
        {"name": "calendar", "shape": ["batch", lookback + horizon, n_calendar], "dtype": "float32"},
    ]
    outputs = [
        {"name": "imputed", "shape": ["batch", lookback, n_channels], "dtype": "float32"},
        {"name": "forecast", "shape": ["batch", horizon, n_channels], "dtype": "float32"},
    ]
    return inputs, outputs


def pin_files(bundle_dir: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every regular file in the bundle folder except the card and its signature.

    Raises:
        ExportError: the folder holds a sub-folder or a link (a bundle is flat, so every byte is pinned).
    """
    files: dict[str, dict[str, Any]] = {}
    for p in sorted(bundle_dir.iterdir()):
        if p.name in (CARD_NAME, SIG_NAME):
            continue
        if p.is_symlink() or not p.is_file():
            msg = f"bundle folder {bundle_dir} holds {p.name!r}, which is not a plain file; bundles are flat"
            raise ExportError(msg)
        files[p.name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return files


def write_card(bundle_dir: str | Path, card: dict[str, Any]) -> Card:
    """Pin the bundle's files into ``card``, validate it against the contract and write ``card.json``.

    Any stale ``card.sig`` is removed: a signature always belongs to the card bytes next to it.

    Args:
        bundle_dir: the bundle folder, already holding every other file.
        card: the card dict without ``files`` (it is filled here); ``schema_version`` defaults to the current one.

    Returns:
        The parsed :class:`Card` of what was written.

    Raises:
        ExportError: the card does not satisfy ``Card.from_dict`` (the message says which field).
    """
    from gapcast.edge import BundleError

    d = Path(bundle_dir)
    full = dict(card)
    full.setdefault("schema_version", SCHEMA_VERSION)
    full["files"] = pin_files(d)
    data = card_bytes(full)
    try:
        parsed = Card.from_dict(json.loads(data))
    except BundleError as exc:
        msg = f"the card does not satisfy the bundle contract: {exc}"
        raise ExportError(msg) from exc
    (d / SIG_NAME).unlink(missing_ok=True)
    (d / CARD_NAME).write_bytes(data)
    return parsed


def sign_bundle(bundle_dir: str | Path, private_key) -> Path:
    """Sign ``card.json``'s exact bytes with Ed25519 and write the raw 64-byte signature to ``card.sig``.

    Args:
        bundle_dir: a bundle folder with ``card.json`` written by :func:`write_card`.
        private_key: ``Ed25519PrivateKey`` or a path to its PEM file.

    Returns:
        Path of ``card.sig``.

    Raises:
        ExportError: no card, or the key cannot be loaded.
    """
    from gapcast.export.keys import load_private_key

    d = Path(bundle_dir)
    card_path = d / CARD_NAME
    if not card_path.is_file():
        msg = f"{d} has no {CARD_NAME} to sign"
        raise ExportError(msg)
    key = private_key if hasattr(private_key, "sign") else load_private_key(private_key)
    sig_path = d / SIG_NAME
    sig_path.write_bytes(key.sign(card_path.read_bytes()))
    return sig_path
