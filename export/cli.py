"""``gapcast export`` and ``gapcast keys``: turn a run into a signed bundle; make a signing key pair.

Nothing heavy is imported at module level: torch, onnx and onnxruntime load inside the handlers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["register"]


def _export(args: argparse.Namespace) -> int:
    from gapcast.export import ExportError

    if args.interpolation_only:
        return _export_interpolation(args)
    if args.run_dir is None:
        msg = "give a RUN_DIR to export (or --interpolation-only --dataset SPEC for a bundle without a model)"
        raise ExportError(msg)
    run = Path(args.run_dir)
    if not run.is_dir():
        why = "is a file, not a run folder" if run.exists() else "does not exist"
        msg = f"run folder {run} {why} (train one with `gapcast train --out {run}`)"
        raise ExportError(msg)

    from gapcast.export.pipeline import ExportOptions, export_run

    opts = ExportOptions(
        target=args.target,
        opset=args.opset,
        model_name=args.model_name,
        model_version=args.version,
        calib_windows=args.calib_windows,
        parity_windows=args.parity_windows,
        gate_windows=args.gate_windows,
        int8=not args.no_int8,
        cpu_variant=args.cpu_variant,
        threads=args.threads,
        exporter=args.exporter,
    )
    if args.sign_key is None:
        print(
            "gapcast: WARNING: no --sign-key: the bundle will be UNSIGNED and gateways will refuse it "
            "(make a key with `gapcast keys generate --out DIR`)",
            file=sys.stderr,
        )
    result = export_run(
        args.run_dir, args.out, opts, sign_key=args.sign_key, data_root=args.data, overwrite=args.overwrite,
        dataset=args.dataset,
    )
    card = result.card
    print(f"bundle: {result.path} ({'signed' if result.signed else 'UNSIGNED'})")
    print(f"model: {card['model']['name']} v{card['model']['version']}, target {card['target']['name']}, opset {card['opset']}")
    print(f"parity (onnxruntime fp32 vs torch): max abs err {card['parity']['max_abs_err']:.3g} on {card['parity']['windows']} windows")
    for name, v in card["variants"].items():
        print(f"variant {name}: {v['file']} ({v['precision']})")
    delta = card.get("int8_delta") or {}
    for name in ("int8_qdq", "int8_cpu"):
        if name in delta:
            d = delta[name]
            print(
                f"  {name} vs fp32: imputation MAE {d['imputation_rel_delta']:+.2%}, forecast MAE "
                f"{d['forecast_rel_delta']:+.2%}"
            )
    for name, why in (card.get("excluded_variants") or {}).items():
        print(f"excluded {name}: {why}", file=sys.stderr)
    return 0


def _export_interpolation(args: argparse.Namespace) -> int:
    from gapcast.export import ExportError
    from gapcast.export.pipeline import export_interpolation_only

    if args.run_dir is not None:
        msg = "--interpolation-only builds a bundle without a model: give --dataset SPEC, not a RUN_DIR"
        raise ExportError(msg)
    if args.dataset is None:
        msg = "--interpolation-only needs --dataset SPEC (channels, cadence, time zone, normalisation)"
        raise ExportError(msg)
    if args.sign_key is None:
        print("gapcast: WARNING: no --sign-key: the bundle will be UNSIGNED and gateways will refuse it",
              file=sys.stderr)
    result = export_interpolation_only(args.dataset, args.out, sign_key=args.sign_key, data_root=args.data,
                                       lookback=args.lookback, horizon=args.horizon, model_name=args.model_name,
                                       model_version=0 if args.version == 1 else args.version,
                                       overwrite=args.overwrite)
    card = result.card
    print(f"bundle: {result.path} ({'signed' if result.signed else 'UNSIGNED'}), interpolation only (no model)")
    print(f"channels: {', '.join(c['name'] for c in card['channels'])}; cadence {card['cadence_s']} s; "
          f"time zone {card['calendar']['timezone']}; lookback {card['lookback']} / horizon {card['horizon']} steps")
    return 0


def _keys_generate(args: argparse.Namespace) -> int:
    from gapcast.export.keys import generate_keypair

    kp = generate_keypair(args.out, overwrite=args.force)
    print(f"private key: {kp.private} (keep it secret; sign with `gapcast export --sign-key {kp.private}`)")
    print(f"public key:  {kp.public} (install on gateways as a trusted key)")
    print(f"public key (hex): {kp.public_hex}")
    return 0


def register(subparsers) -> None:
    """Add the ``export`` and ``keys`` sub-commands to gapcast's parser."""
    p = subparsers.add_parser(
        "export",
        help="export a trained run as a signed ONNX bundle (fp32 + INT8 variants, card, signature)",
        description=(
            "Export RUN_DIR/best.pt to ONNX for a target, check it (onnx.checker, opset, operator list, parity "
            "against torch on real validation windows), build INT8 variants behind an accuracy gate, write "
            "card.json and sign it."
        ),
    )
    p.add_argument("run_dir", type=Path, nargs="?", help="training run folder (best.pt, config.toml, metrics.json)")
    p.add_argument("--dataset", help="dataset spec or preset: calibration/parity data of a run (default: the spec "
                   "the run carries); with --interpolation-only the network the bundle is for")
    p.add_argument("--interpolation-only", action="store_true",
                   help="day one without a model: a signed bundle with the card and no network (the gateway "
                   "interpolates); needs --dataset")
    p.add_argument("--lookback", default="4d", help="with --interpolation-only: the window, a duration (4d)")
    p.add_argument("--horizon", default="1d", help="with --interpolation-only: the forecast length (1d)")
    p.add_argument("--out", type=Path, required=True, help="bundle folder to create")
    p.add_argument(
        "--target",
        choices=["trt8.6", "trt10", "cpu"],
        default="trt10",
        help="runtime the bundle is for: TensorRT 8.6 (JetPack 6.0, opset 17), 10.x (JetPack 6.1+/7, opset 17) "
        "or onnxruntime CPU (default: trt10). JetPack 5 is not supported (README: Supported JetPack releases)",
    )
    p.add_argument("--opset", type=int, default=None, help="override the target's opset")
    p.add_argument("--sign-key", type=Path, default=None, help="Ed25519 private key PEM (gapcast keys generate)")
    p.add_argument("--version", type=int, default=1, help="model version number in the card (integer, default 1)")
    p.add_argument("--model-name", default="confill", help="model name in the card (default confill)")
    p.add_argument("--calib-windows", type=int, default=128, help="training windows for INT8 calibration (128)")
    p.add_argument("--parity-windows", type=int, default=64, help="validation windows for the parity check (64)")
    p.add_argument("--gate-windows", type=int, default=256, help="validation windows for the INT8 accuracy gate (256)")
    p.add_argument("--no-int8", action="store_true", help="build the fp32 variant only")
    p.add_argument(
        "--cpu-variant",
        choices=["auto", "dynamic", "static", "none"],
        default="auto",
        help="CPU INT8 variant: measure both and keep the faster if faster than fp32 (auto), or force one",
    )
    p.add_argument("--threads", type=int, default=None, help="onnxruntime threads for the speed measurement")
    p.add_argument("--exporter", choices=["auto", "torchscript", "dynamo"], default="auto", help="torch ONNX exporter")
    p.add_argument("--data", default=None, help="data root (default: $GAPCAST_DATA or the user cache)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")
    p.set_defaults(func=_export)

    k = subparsers.add_parser("keys", help="Ed25519 signing keys for bundles")
    ksub = k.add_subparsers(dest="keys_command", metavar="KEYS_COMMAND", required=True)
    g = ksub.add_parser("generate", help="write a new Ed25519 key pair (PEM) to a folder")
    g.add_argument("--out", type=Path, required=True, help="folder for gapcast-signing.key / gapcast-signing.pub")
    g.add_argument("--force", action="store_true", help="replace existing key files")
    g.set_defaults(func=_keys_generate)
