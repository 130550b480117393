"""``gapcast export``: a trained run -> a verified, signed bundle (docs/ARCHITECTURE.md, "Contracts").

(Over 600 lines on purpose: the export stages share one context (run, spec, windows, golden
outputs) and run in one order; splitting them would pass that state through modules. The INT8 variants and
their accuracy gate live in export/int8.py, the real windows (loading, outage copies) in export/windows.py.)

Steps, each one a check that stops the export with a clear :class:`ExportError` when it fails:

1. export the fp32 graph for the target (``model.onnx``) and check it (:func:`check_onnx_file`);
2. parity: onnxruntime fp32 against torch on real validation windows, including windows with a 72 h outage and a
   fully missing channel, max abs error <= 1e-4;
3. golden inputs/outputs (``golden.npz``): a few real windows and their fp32 outputs, for the gateway's checks;
4. INT8: the QDQ variant for TensorRT (``model.int8.qdq.onnx``) calibrated on real training windows, and a CPU
   variant for onnxruntime (``model.int8.cpu.onnx``) where one is faster at batch 64 on this machine; each passes
   the accuracy gate (imputation and forecast MAE within 3 % of fp32) or is left out with the reason in the card;
5. ``card.json`` pinning every file, signed into ``card.sig``; then the bundle is verified as a gateway would.

The bundle is assembled in a temporary folder beside ``out`` and renamed into place only when every check passed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tomllib
from tqdm import tqdm

from gapcast.export import ExportError
from gapcast.export.windows import (  # re-exported: callers import the window types from here
    OUTAGE,  # noqa: F401  (kept importable from here)
    OUTAGE_STEPS,  # noqa: F401  (kept importable from here)
    WindowData,
    _parity_windows,
    _ParityWindows,
    _past,
    load_run_windows,
    special_windows,
)

__all__ = [
    "FP32_FILE",
    "GOLDEN_FILE",
    "INT8_CPU_FILE",
    "INT8_QDQ_FILE",
    "ExportOptions",
    "ExportResult",
    "ModelSpec",
    "WindowData",
    "export_bundle",
    "export_interpolation_only",
    "export_run",
    "load_run_windows",
    "special_windows",
]

log = logging.getLogger(__name__)

FP32_FILE = "model.onnx"
INT8_QDQ_FILE = "model.int8.qdq.onnx"
INT8_CPU_FILE = "model.int8.cpu.onnx"
GOLDEN_FILE = "golden.npz"


@dataclass(frozen=True)
class ExportOptions:
    """What ``gapcast export`` does (CLI flags map onto these).

    Attributes:
        target: ``trt8.6``, ``trt10`` or ``cpu`` (opset and operator list follow from it).
        opset: override the target's opset (must not exceed what the target reads).
        model_name: card ``model.name``.
        model_version: card ``model.version`` (integer, increases with every release).
        calib_windows: real training windows used for INT8 calibration.
        parity_windows: real validation windows for the parity check (plus the outage/missing-channel windows).
        gate_windows: validation windows for the INT8 accuracy gate.
        golden_windows: windows stored in ``golden.npz`` (at least 3: plain, 72 h outage, missing channel).
        int8: build INT8 variants at all.
        cpu_variant: ``auto`` (measure dynamic and static QOperator against fp32, keep the fastest if faster),
            ``dynamic`` or ``static`` (build that one, still measured and gated), or ``none``.
        bench_batch: batch size of the CPU speed measurement.
        bench_min_time_s: seconds each speed measurement runs at least.
        cpu_min_speedup: throughput ratio over fp32 a CPU INT8 variant needs to be kept (measurement noise margin).
        threads: onnxruntime intra-op threads for measurements (None: its default).
        int8_tolerance: relative MAE increase allowed for an INT8 variant (0.03 = 3 %).
        parity_tolerance: max abs difference allowed between onnxruntime fp32 and torch.
        exporter: ``auto``, ``torchscript`` or ``dynamo``.
        seed: window sampling and artificial outage seed.
    """

    target: str = "trt10"
    opset: int | None = None
    model_name: str = "confill"
    model_version: int = 1
    calib_windows: int = 128
    parity_windows: int = 64
    gate_windows: int = 256
    golden_windows: int = 6
    int8: bool = True
    cpu_variant: str = "auto"
    bench_batch: int = 64
    bench_min_time_s: float = 1.0
    cpu_min_speedup: float = 1.05
    threads: int | None = None
    int8_tolerance: float = 0.03
    parity_tolerance: float = 1e-4
    exporter: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.cpu_variant not in ("auto", "dynamic", "static", "none"):
            msg = f"cpu_variant must be auto, dynamic, static or none, got {self.cpu_variant!r}"
            raise ExportError(msg)
        if self.model_version < 0:
            msg = f"model_version must be a non-negative integer, got {self.model_version}"
            raise ExportError(msg)
        if min(self.calib_windows, self.parity_windows, self.gate_windows) < 1 or self.golden_windows < 3:
            msg = "calib/parity/gate windows must be >= 1 and golden_windows >= 3"
            raise ExportError(msg)


@dataclass(frozen=True)
class ModelSpec:
    """What the card says about the model, from the checkpoint's metadata.

    Attributes:
        lookback, horizon: L and H, steps.
        n_calendar: F.
        cadence_s: step length, seconds.
        utc_offset_s: local time of the calendar features, seconds.
        channels: per channel ``{name, unit, valid_min, valid_max, mean, std}`` (physical units).
        calendar_features: names of the F calendar features, in column order.
        config: the model config dict (recorded in the card).
        timezone: the stations' time zone (calendar features follow its clock changes), or None (fixed offset).
        dataset: the whole dataset spec (``DatasetSpec.to_dict()``), recorded in the card.
    """

    lookback: int
    horizon: int
    n_calendar: int
    cadence_s: int
    utc_offset_s: int
    channels: list[dict[str, Any]]
    calendar_features: tuple[str, ...]
    config: dict[str, Any] = field(default_factory=dict)
    timezone: str | None = None
    dataset: dict[str, Any] | None = None
    context: dict[str, Any] | None = None  # ContextSpec.to_dict() of a model with neighbour context (issue 20)

    @property
    def n_channels(self) -> int:
        return len(self.channels)

    @property
    def n_inputs(self) -> int:
        """Columns of the graph's values/observed: C, plus G context channels for a context model."""
        return self.n_channels + (len(self.context["channels"]) if self.context else 0)


@dataclass(frozen=True)
class ExportResult:
    """A finished export.

    Attributes:
        path: the bundle folder.
        card: the card dict as written.
        signed: whether ``card.sig`` was written.
    """

    path: Path
    card: dict[str, Any]
    signed: bool


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    import gapcast

    return {
        "gapcast": gapcast.__version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def _check_out(out: str | Path, overwrite: bool) -> Path:
    """``out`` as a Path, refused when it exists and is not empty unless ``overwrite``.

    Raises:
        ExportError: ``out`` exists, is not empty and ``overwrite`` is False.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        msg = f"{out} exists and is not empty; pass --overwrite to replace it"
        raise ExportError(msg)
    return out


@contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A fresh hidden folder beside ``out`` (``.NAME.*``) to assemble the bundle in, removed when the block raises
    anything (KeyboardInterrupt included) so nothing half-built stays; a successful block has renamed it to ``out``.

    Raises:
        OSError: the parent of ``out`` cannot be created or written; else whatever the block raises.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _signing(sign_key) -> tuple[Any, dict[str, Any]]:
    """The signing key (loaded when ``sign_key`` is a PEM path) and the card's ``signature`` entry.

    Returns:
        (the Ed25519 private key or None, ``{"algorithm", "public_key_hex" (None when unsigned), "signed"}``).

    Raises:
        ExportError: the key file is unreadable, encrypted, or not an Ed25519 private key (export/keys.py).
    """
    public_hex = None
    if sign_key is not None:
        from gapcast.export.keys import load_private_key, public_key_hex

        sign_key = sign_key if hasattr(sign_key, "sign") else load_private_key(sign_key)
        public_hex = public_key_hex(sign_key)
    return sign_key, {"algorithm": "Ed25519", "public_key_hex": public_hex, "signed": sign_key is not None}


def _target_opset(opts: ExportOptions) -> tuple[Any, int]:
    """The deployment target of ``opts`` and the ai.onnx opset to write (``opts.opset`` or the target's own).

    Returns:
        (:class:`~gapcast.export.onnx_export.ExportTarget`, opset).

    Raises:
        ExportError: an unknown or removed target, or an opset outside 13..the target's maximum.
    """
    from gapcast.export.onnx_export import load_target

    target = load_target(opts.target)
    opset = opts.opset or target.opset
    if opset > target.max_opset or opset < 13:
        msg = f"opset {opset} is outside what target {target.name} reads (13..{target.max_opset})"
        raise ExportError(msg)
    return target, opset


def _graph_model(model, spec: ModelSpec):
    """The module to export: ``model`` itself, or for a model with G neighbour-context channels (issue 20) a
    wrapper that takes the context as columns C..C+G-1 of values/observed (export/context.py).

    Raises:
        ExportError: the model has context channels but ``spec.context`` does not carry as many.
    """
    from gapcast.export.context import ContextInputs, n_context

    if n_context(model):
        if not spec.context or len(spec.context["channels"]) != n_context(model):
            msg = f"the model has {n_context(model)} context channels but the model spec carries no matching context"
            raise ExportError(msg)
        model = ContextInputs(model).eval()
    return model


def _check_windows(spec: ModelSpec, data: WindowData) -> None:
    """Raises ExportError unless the train and val windows are values/observed [N, L+H, C] (C counts context
    channels) and calendar [N, L+H, F], N >= 1."""
    L, H, C, F = spec.lookback, spec.horizon, spec.n_inputs, spec.n_calendar
    for name, arrs in (("train", data.train), ("val", data.val)):
        v, o, c = arrs
        if v.shape[1:] != (L + H, C) or o.shape != v.shape or c.shape[1:] != (L + H, F) or len(v) == 0:
            msg = f"{name} windows have shapes {v.shape}/{o.shape}/{c.shape}, expected [N, {L + H}, {C}] and [N, {L + H}, {F}]"
            raise ExportError(msg)


def _stage_fp32(model, work: Path, target, opset: int, opts: ExportOptions, dims: dict[str, int]) -> tuple[str, Any]:
    """Step 1: export the fp32 graph to ``work/model.onnx`` and check it (:func:`check_onnx_file`).

    Returns:
        (the exporter that wrote it, the :class:`~gapcast.export.onnx_export.OnnxCheck`).

    Raises:
        ExportError: every exporter failed, or the file fails a check.
    """
    from gapcast.export.onnx_export import check_onnx_file, export_onnx

    fp32 = work / FP32_FILE
    exporter = export_onnx(model, fp32, opset=opset, exporter=opts.exporter, **dims)
    check = check_onnx_file(fp32, target, opset=opset, **dims)
    log.info("exported %s (%s exporter, opset %d, %d bytes)", FP32_FILE, exporter, opset, check.bytes)
    return exporter, check


def _stage_parity(model, fp32: Path, win: _ParityWindows, spec: ModelSpec, opts: ExportOptions) -> dict[str, Any]:
    """Step 2: onnxruntime fp32 against torch on every window of ``win``.

    Returns:
        The card's ``parity`` entry (:func:`~gapcast.export.onnx_export.parity_check` plus what it includes).

    Raises:
        ExportError: the max abs difference exceeds ``opts.parity_tolerance``.
    """
    from gapcast.export.onnx_export import parity_check

    (pv, po, pc), k = win.real, win.k
    par_v = np.concatenate([pv, win.outage[0], win.missing[0]])
    par_o = np.concatenate([po, win.outage[1], win.missing[1]])
    par_c = np.concatenate([pc, pc[:k], pc[:k]])
    xv, xo = _past(par_v, par_o, spec.lookback)
    parity = parity_check(model, fp32, xv, xo, par_c, tolerance=opts.parity_tolerance)
    parity["includes"] = {
        "real_windows": len(pv),
        "outage_72h_windows": k,
        "missing_channel_windows": k,
        "missing_channel": spec.channels[0]["name"],
    }
    log.info("parity onnxruntime fp32 vs torch: max abs err %.3g", parity["max_abs_err"])
    return parity


def _stage_golden(work: Path, win: _ParityWindows, n: int, lookback: int, source: str) -> tuple[Any, dict[str, Any]]:
    """Step 3: ``golden.npz`` in ``work``: n - 2 real windows, one with the outage, one with channel 0 missing
    (past values/observed [n, L, C], calendar [n, L+H, F]) and their fp32 onnxruntime outputs.

    Returns:
        (the fp32 onnxruntime session, the card's ``golden`` entry).

    Raises:
        OSError: the file cannot be written.
    """
    from gapcast.export.onnx_export import make_session, run_session

    pv, po, pc = win.real
    gv = np.concatenate([pv[: n - 2], win.outage[0][:1], win.missing[0][:1]])
    go = np.concatenate([po[: n - 2], win.outage[1][:1], win.missing[1][:1]])
    gc = np.concatenate([pc[: n - 2], pc[:1], pc[:1]])
    gxv, gxo = _past(gv, go, lookback)
    sess32 = make_session(work / FP32_FILE)
    g_imp, g_fc = run_session(sess32, gxv, gxo, gc)
    np.savez(work / GOLDEN_FILE, values=gxv, observed=gxo, calendar=gc.astype(np.float32), imputed=g_imp, forecast=g_fc)
    kinds = ["real"] * (len(gv) - 2) + ["outage_72h", "missing_channel"]
    golden = {
        "file": GOLDEN_FILE,
        "windows": len(gv),
        "kinds": kinds,
        "outputs_from": "onnxruntime fp32 (model.onnx)",
        "source": source,
    }
    return sess32, golden


def _stage_int8(work: Path, sess32, opts: ExportOptions, target, opset: int, dims: dict[str, int],
                data: WindowData, rng: np.random.Generator):
    """Step 4: the INT8 variants and their accuracy gate (export/int8.py), or both excluded when INT8 is off.

    Returns:
        The :class:`~gapcast.export.int8.Int8Builder` (``variants``, ``excluded``, ``delta``, ``cpu_choice``).

    Raises:
        ExportError: a variant cannot be quantized or fails its file checks.
    """
    from gapcast.export.int8 import Int8Builder  # here: int8 imports this module's file names

    int8 = Int8Builder(work, work / FP32_FILE, sess32, opts, target, opset, dims)
    if opts.int8:
        int8.build(data, rng, dims["lookback"])
    else:
        int8.excluded["int8_qdq"] = "not built: INT8 disabled for this export"
        int8.excluded["int8_cpu"] = "not built: INT8 disabled for this export"
    return int8


def _bundle_card(spec: ModelSpec, opts: ExportOptions, data: WindowData, *, target, opset: int, exporter: str,
                 check, parity: dict[str, Any], golden: dict[str, Any], int8, evaluation: dict[str, Any] | None,
                 run: dict[str, Any] | None, signature: dict[str, Any]) -> dict[str, Any]:
    """Step 5: the card dict of a model bundle from what the steps before found (key order as written).

    Raises:
        ImportError: torch, onnx or onnxruntime are missing (their versions are recorded).
    """
    from gapcast.export.card import channel_entries, io_entries, rfc3339_now

    inputs, outputs = io_entries(spec.lookback, spec.horizon, spec.n_inputs, spec.n_calendar)
    ch = spec.channels
    return {
        "model": {"name": opts.model_name, "version": int(opts.model_version), "config": spec.config},
        "created": rfc3339_now(),
        "channels": channel_entries(
            [c["name"] for c in ch],
            [c["unit"] for c in ch],
            [c["valid_min"] for c in ch],
            [c["valid_max"] for c in ch],
            [c["mean"] for c in ch],
            [c["std"] for c in ch],
        ),
        "cadence_s": int(spec.cadence_s),
        "lookback": spec.lookback,
        "horizon": spec.horizon,
        "calendar": _calendar_entry(spec),
        "inputs": inputs,
        "outputs": outputs,
        "variants": int8.variants,
        "excluded_variants": int8.excluded,
        "golden": golden,
        "opset": opset,
        "target": {"name": target.name, "tensorrt": target.tensorrt, "operator_list": target.source},
        "operators": list(check.ops),
        "parity": parity,
        "int8_delta": int8.delta,
        "cpu_variant_choice": int8.cpu_choice,
        "evaluation": evaluation,
        "dataset": spec.dataset,
        **({"context": _context_entry(spec)} if spec.context else {}),
        "export": {**_versions(), "exporter": exporter, "data": data.source, "run": run or {}},
        "signature": signature,
    }


def export_bundle(
    model,
    spec: ModelSpec,
    data: WindowData,
    out: str | Path,
    options: ExportOptions | None = None,
    *,
    sign_key=None,
    evaluation: dict[str, Any] | None = None,
    run: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Build, check, sign and verify a bundle from a torch model and real windows.

    Args:
        model: the trained (or, in tests, untrained) ConFill in eval mode.
        spec: the card's model description.
        data: real calibration and validation windows.
        out: the bundle folder to create.
        options: :class:`ExportOptions` (defaults if None).
        sign_key: Ed25519 private key (object or PEM path); None writes an unsigned bundle and warns.
        evaluation: evaluation figures for the card (``RUN_DIR/metrics.json``), if any.
        run: where the model came from (run folder, checkpoint step), recorded in the card.
        overwrite: replace an existing, non-empty ``out``.

    Returns:
        :class:`ExportResult`.

    Raises:
        ExportError: any failed check (export, opset/operator/shape checks, parity, card contract, verification).
    """
    opts = options or ExportOptions()
    target, opset = _target_opset(opts)
    out = _check_out(out, overwrite)
    model = _graph_model(model, spec)
    _check_windows(spec, data)
    dims = {"lookback": spec.lookback, "horizon": spec.horizon, "n_channels": spec.n_inputs, "n_calendar": spec.n_calendar}
    rng = np.random.default_rng(opts.seed)
    with _staging(out) as work, tqdm(total=5, unit="step", disable=None) as progress:  # shown on a terminal only
        progress.set_description("export: fp32 graph")
        exporter, check = _stage_fp32(model, work, target, opset, opts, dims)
        progress.update()
        progress.set_description("export: parity")
        win = _parity_windows(data, spec, opts, rng)
        parity = _stage_parity(model, work / FP32_FILE, win, spec, opts)
        progress.update()
        progress.set_description("export: golden")
        sess32, golden = _stage_golden(work, win, opts.golden_windows, spec.lookback, data.source)
        progress.update()
        progress.set_description("export: INT8 variants")
        int8 = _stage_int8(work, sess32, opts, target, opset, dims, data, rng)
        progress.update()
        progress.set_description("export: card, signature")
        sign_key, signature = _signing(sign_key)
        card = _bundle_card(spec, opts, data, target=target, opset=opset, exporter=exporter, check=check,
                            parity=parity, golden=golden, int8=int8, evaluation=evaluation, run=run,
                            signature=signature)
        written = _sign_verify_publish(work, out, card, sign_key, signature["public_key_hex"])
        progress.update()
    return ExportResult(path=out, card=written, signed=sign_key is not None)


def _sign_verify_publish(work: Path, out: Path, card: dict[str, Any], sign_key, public_hex: str | None) -> dict:
    """Write the card into ``work``, sign it (or warn that the bundle is unsigned), verify the whole folder as a
    gateway would, then move it to ``out`` in one rename (replacing an old bundle). Returns the card as written.

    Raises:
        BundleError: the folder does not verify (a bug in the exporter: nothing reaches ``out``).
    """
    from gapcast.edge.bundle import verify_bundle
    from gapcast.export.card import sign_bundle, write_card

    write_card(work, card)
    if sign_key is not None:
        sign_bundle(work, sign_key)
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        verify_bundle(work, [Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex))])
    else:
        log.warning(
            "NO SIGNING KEY: the bundle at %s is UNSIGNED; gateways refuse it. Pass --sign-key "
            "(make one with `gapcast keys generate`)",
            out,
        )
        verify_bundle(work, require_signature=False)
    written = json.loads((work / "card.json").read_text())
    if out.exists():
        shutil.rmtree(out)
    os.replace(work, out)
    os.chmod(out, 0o755)
    return written


def _context_entry(spec: ModelSpec) -> dict[str, Any]:
    from gapcast.export.context import context_card_entry

    return context_card_entry(spec.context, spec.n_channels)


def _calendar_entry(spec: ModelSpec) -> dict[str, Any]:
    """The card's calendar: feature names, the fixed offset (what older gateways read) and the time zone."""
    entry: dict[str, Any] = {"features": list(spec.calendar_features), "utc_offset_s": int(spec.utc_offset_s)}
    if spec.timezone:
        entry["timezone"] = spec.timezone
    return entry


def _channels_from_meta(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """Channel specs (name, unit, valid range, group, mean, std) from checkpoint metadata (checkpoints from before
    dataset specs: units and ranges from the ``beijing`` preset, which they were trained on)."""
    known: dict[str, Any] = {}
    if not meta.get("dataset"):
        from gapcast.train.spec import load_spec

        known = {c.name: c for c in load_spec("beijing").model_channels}
    norm = meta.get("normalizer") or {}
    mean, std = list(norm.get("mean", [])), list(norm.get("std", []))
    raw = list(meta.get("channels") or [])
    if not raw or len(mean) != len(raw) or len(std) != len(raw):
        msg = "the checkpoint lacks channels or a normaliser of matching length; cannot write the card"
        raise ExportError(msg)
    out = []
    for i, c in enumerate(raw):
        if isinstance(c, str):
            c = {"name": c}
        elif not isinstance(c, dict):
            c = {k: getattr(c, k) for k in ("name", "unit", "valid_min", "valid_max") if hasattr(c, k)}
        ref = known.get(c.get("name"))
        try:
            out.append(
                {
                    "name": str(c["name"]),
                    "unit": str(c.get("unit", ref.unit if ref else "")),
                    "valid_min": float(c.get("valid_min", ref.valid_min if ref else -np.inf)),
                    "valid_max": float(c.get("valid_max", ref.valid_max if ref else np.inf)),
                    "mean": float(mean[i]),
                    "std": float(std[i]),
                    **({"group": str(c["group"])} if c.get("group") else {}),
                }
            )
        except (KeyError, TypeError, ValueError) as exc:
            msg = f"channel {i} in the checkpoint is incomplete: {exc}"
            raise ExportError(msg) from exc
    return out


def export_run(
    run_dir: str | Path,
    out: str | Path,
    options: ExportOptions | None = None,
    *,
    sign_key=None,
    data_root: str | os.PathLike | None = None,
    overwrite: bool = False,
    dataset=None,
) -> ExportResult:
    """``gapcast export RUN_DIR``: load ``best.pt``, real windows of the run's own dataset and ``metrics.json``, then
    :func:`export_bundle`.

    Raises:
        ExportError: no checkpoint, unreadable metadata, no data, or any failed export check.
    """
    from gapcast import GapcastError
    from gapcast.calendar import CALENDAR_FEATURES
    from gapcast.train.checkpoint import load_checkpoint

    run_dir = Path(run_dir)
    ckpt = run_dir / "best.pt" if run_dir.is_dir() else run_dir
    folder = ckpt.parent
    try:
        model, meta = load_checkpoint(ckpt)
    except GapcastError as exc:
        msg = f"cannot load the model from {ckpt}: {exc}"
        raise ExportError(msg) from exc
    run_config: dict[str, Any] = {}
    if (folder / "config.toml").is_file():
        with open(folder / "config.toml", "rb") as f:
            run_config = tomllib.load(f)
    evaluation = None
    if (folder / "metrics.json").is_file():
        try:
            evaluation = json.loads((folder / "metrics.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("ignoring unreadable %s: %s", folder / "metrics.json", exc)
    from gapcast.train.evaluate import spec_of_run

    cfg = meta["config"]
    try:
        dspec = spec_of_run(meta, dataset)
    except GapcastError as exc:
        raise ExportError(str(exc)) from exc
    spec = ModelSpec(
        lookback=int(cfg["lookback"]),
        horizon=int(cfg["horizon"]),
        n_calendar=int(cfg.get("n_calendar", len(CALENDAR_FEATURES))),
        cadence_s=int(meta.get("cadence_s", dspec.cadence_s)),
        utc_offset_s=int(meta.get("utc_offset_s", 0)),
        channels=_channels_from_meta(meta),
        calendar_features=CALENDAR_FEATURES,
        config=dict(cfg),
        timezone=meta.get("timezone") or dspec.timezone,
        dataset=dspec.to_dict(),
        context=meta.get("context") if cfg.get("n_context") else None,
    )
    data = load_run_windows(meta, run_config, data_root=data_root, dataset=dspec)
    run = {"dir": str(folder.resolve()), "checkpoint": ckpt.name, "step": meta.get("step"), "best_val": meta.get("best_val")}
    return export_bundle(
        model, spec, data, out, options, sign_key=sign_key, evaluation=evaluation, run=run, overwrite=overwrite
    )


def _interpolation_history(dataset, data_root, lookback: str, horizon: str) -> tuple[Any, int, int, dict, Any]:
    """The dataset spec, L and H in steps, the stations' history and the normaliser fitted on its training range.

    Returns:
        (:class:`~gapcast.train.spec.DatasetSpec`, L, H, ``{station: series}``, :class:`~gapcast.train.data.Normalizer`
        with per-channel mean/std [C] in physical units).

    Raises:
        ExportError: the spec or data cannot be loaded, or a duration is not a multiple of the cadence.
    """
    from gapcast import GapcastError
    from gapcast.duration import steps_of
    from gapcast.train.data import Normalizer
    from gapcast.train.loader import load_dataset, split_indices
    from gapcast.train.spec import DatasetSpec, load_spec

    try:
        spec = dataset if isinstance(dataset, DatasetSpec) else load_spec(dataset)
        L = steps_of(lookback, spec.cadence_s, key="--lookback")
        H = steps_of(horizon, spec.cadence_s, key="--horizon")
        series = load_dataset(spec, data_root)
        norm = Normalizer.fit([s.values[split_indices(spec, s).train] for s in series.values()])
    except GapcastError as exc:
        msg = f"cannot build the interpolation bundle: {exc}"
        raise ExportError(msg) from exc
    return spec, L, H, series, norm


def _interpolation_card(spec, L: int, H: int, series: dict, norm, *, model_name: str, model_version: int,
                        signature: dict[str, Any]) -> dict[str, Any]:
    """The card of an interpolation-only bundle: no variants (``fp32`` excluded with the reason), the spec's
    channels with ``norm``'s mean/std, L and H in steps (key order as written). Raises nothing."""
    from gapcast.calendar import CALENDAR_FEATURES
    from gapcast.export.card import channel_entries, io_entries, rfc3339_now

    mcs = spec.model_channels
    inputs, outputs = io_entries(L, H, len(mcs), len(CALENDAR_FEATURES))
    calendar: dict[str, Any] = {"features": list(CALENDAR_FEATURES), "utc_offset_s": spec.utc_offset_s,
                                "timezone": spec.timezone}
    return {
        "model": {"name": model_name, "version": int(model_version), "kind": "interpolation", "config": {}},
        "created": rfc3339_now(),
        "channels": channel_entries([c.name for c in mcs], [c.unit for c in mcs], [c.valid_min for c in mcs],
                                    [c.valid_max for c in mcs], norm.mean.tolist(), norm.std.tolist()),
        "cadence_s": spec.cadence_s,
        "lookback": L,
        "horizon": H,
        "calendar": calendar,
        "inputs": inputs,
        "outputs": outputs,
        "variants": {},
        "excluded_variants": {"fp32": "interpolation-only bundle: no trained model yet"},
        "dataset": spec.to_dict(),
        "export": {"data": f"{spec.name}: normalisation fitted on the training range of {sorted(series)}"},
        "signature": signature,
    }


def export_interpolation_only(
    dataset,
    out: str | Path,
    *,
    sign_key=None,
    data_root: str | os.PathLike | None = None,
    lookback: str = "4d",
    horizon: str = "1d",
    model_name: str = "interpolation",
    model_version: int = 0,
    overwrite: bool = False,
) -> ExportResult:
    """A day-one bundle without a network: the card (channels, cadence, time zone, valid ranges, normalisation
    fitted on the history's training range) and no ONNX file. The gateway runs it with its interpolation backend
    (linear interpolation inside the window, seasonal-naive forecast); a trained model with the same channels is
    rolled out later with ``gapcast fleet publish``.

    Args:
        dataset: a :class:`~gapcast.train.spec.DatasetSpec`, a preset name or a spec path.
        out: the bundle folder to create.
        sign_key: Ed25519 private key (object or PEM path); None writes an unsigned bundle and warns.
        data_root: data root for ``{data}`` in the spec.
        lookback, horizon: the window the gateway keeps and the forecast length (durations).
        model_name, model_version: the card's ``model`` entry (version 0: a later trained model, version >= 1,
            is an update).
        overwrite: replace an existing, non-empty ``out``.

    Returns:
        :class:`ExportResult`.

    Raises:
        ExportError: the data cannot be loaded, a duration is not a multiple of the cadence, ``out`` exists.
    """
    out = _check_out(out, overwrite)
    spec, L, H, series, norm = _interpolation_history(dataset, data_root, lookback, horizon)
    sign_key, signature = _signing(sign_key)
    card = _interpolation_card(spec, L, H, series, norm, model_name=model_name, model_version=model_version,
                               signature=signature)
    with _staging(out) as work:
        written = _sign_verify_publish(work, out, card, sign_key, signature["public_key_hex"])
    return ExportResult(path=out, card=written, signed=sign_key is not None)
