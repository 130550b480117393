"""The INT8 variants of a bundle: QDQ for TensorRT and a CPU form for onnxruntime, each gated on accuracy.

Step 4 of :func:`gapcast.export.pipeline.export_bundle`: each variant is calibrated on real training windows
(onnxruntime.quantization through :mod:`gapcast.export.quantize`) and kept only if its error against fp32 on the
same real windows stays within ``ExportOptions.int8_tolerance``; what was left out, and why, goes on the card.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gapcast.export.pipeline import FP32_FILE, INT8_CPU_FILE, INT8_QDQ_FILE
from gapcast.export.windows import _past, _sample

if TYPE_CHECKING:
    from gapcast.export.pipeline import ExportOptions
    from gapcast.export.windows import WindowData

__all__ = ["Int8Builder"]

log = logging.getLogger("gapcast.export.pipeline")  # the export's one log stream


class Int8Builder:
    """Step 4 of :func:`gapcast.export.pipeline.export_bundle`: the INT8 variants (QDQ for TensorRT, a CPU form for onnxruntime), each kept
    only if it passes the accuracy gate against fp32 on the same real windows; what was built, left out and why,
    and the CPU form's speed choice, for the card."""

    def __init__(self, work: Path, fp32: Path, sess32, opts: ExportOptions, target, opset: int,
                 dims: dict[str, int]) -> None:
        self.work, self.fp32, self.sess32, self.opts = work, fp32, sess32, opts
        self.target, self.opset, self.dims = target, opset, dims
        self.variants: dict[str, dict[str, Any]] = {
            "fp32": {"file": FP32_FILE, "precision": "fp32", "format": "float", "runtime": "tensorrt, onnxruntime"}
        }
        self.excluded: dict[str, str] = {}
        self.delta: dict[str, Any] = {"tolerance": opts.int8_tolerance}
        self.cpu_choice: dict[str, Any] = {}

    def build(self, data: WindowData, rng: np.random.Generator, L: int) -> None:
        from gapcast.export import quantize as q
        from gapcast.export.onnx_export import check_onnx_file

        opts = self.opts
        gv_all, go_all, gc_all = _sample(data.val, opts.gate_windows, rng)
        self.gate = q.make_gate_windows(gv_all, go_all, gc_all, L, seed=opts.seed)
        self.base = q.variant_metrics(self.fp32, self.gate, threads=opts.threads)
        self.variants["fp32"]["metrics"] = self.base
        self.delta["fp32"] = self.base
        self.delta["gate"] = {
            "windows": len(gv_all),
            "scored_on": "normalised units; imputation on observed values hidden by a 24 h all-channel block "
            "plus 10 % random points; forecast on observed targets",
        }
        cv, co, cc = _sample(data.train, opts.calib_windows, rng)
        self.calib = _past(cv, co, L) + (cc,)
        if self.target.tensorrt is not None:
            qdq = self.work / INT8_QDQ_FILE
            summary = q.quantize_qdq(self.fp32, qdq, self.reader())
            check_onnx_file(qdq, self.target, opset=self.opset, **self.dims)
            if self.gate_variant("int8_qdq", qdq):
                self.variants["int8_qdq"] = {
                    "file": INT8_QDQ_FILE, "precision": "int8", "format": "qdq", "runtime": "tensorrt",
                    "calibration_windows": len(self.calib[0]), "quantization": summary,
                }  # fmt: skip
        else:
            self.excluded["int8_qdq"] = f"not built: target {self.target.name} has no TensorRT"
        if opts.cpu_variant == "none":
            self.excluded["int8_cpu"] = "not built: CPU variant disabled for this export (--cpu-variant none)"
        else:
            self.cpu()

    def reader(self):
        from gapcast.export import quantize as q

        cxv, cxo, cc = self.calib
        return q.ArrayCalibrationReader(cxv, cxo, cc, batch=16)

    def gate_variant(self, name: str, path: Path) -> bool:
        """Score ``path`` on the gate windows; record the delta; delete it and say why when it fails."""
        from gapcast.export import quantize as q
        from gapcast.export.onnx_export import make_session, run_session

        opts, gate, base = self.opts, self.gate, self.base
        metrics = q.variant_metrics(path, gate, threads=opts.threads)
        ok, delta = q.accuracy_gate(base, metrics, tolerance=opts.int8_tolerance)
        sess = make_session(path)
        vi, vf = run_session(sess, gate.values, gate.observed, gate.calendar)
        fi, ff = run_session(self.sess32, gate.values, gate.observed, gate.calendar)
        delta["mean_abs_diff_vs_fp32"] = float(np.mean(np.abs(np.concatenate([(vi - fi).ravel(), (vf - ff).ravel()]))))
        delta["max_abs_diff_vs_fp32"] = float(max(np.max(np.abs(vi - fi)), np.max(np.abs(vf - ff))))
        self.delta[name] = delta
        if not ok:
            reason = (
                f"accuracy gate failed: imputation MAE {delta['imputation_mae']:.4f} "
                f"({delta['imputation_rel_delta']:+.1%}), forecast MAE {delta['forecast_mae']:.4f} "
                f"({delta['forecast_rel_delta']:+.1%}) vs fp32 {base['imputation_mae']:.4f} / "
                f"{base['forecast_mae']:.4f}; limit +{opts.int8_tolerance:.0%}"
            )
            self.excluded[name] = reason
            log.warning("INT8 variant %s left out of the bundle: %s", name, reason)
            path.unlink(missing_ok=True)
        return ok

    def cpu(self) -> None:
        """The CPU INT8 form: dynamic and/or static quantization, the fastest kept if it beats fp32 by
        ``cpu_min_speedup`` at ``bench_batch`` on this machine, then gated."""
        from gapcast.export import quantize as q
        from gapcast.export.onnx_export import check_onnx_file, load_target

        opts, gate, fp32 = self.opts, self.gate, self.fp32
        cpu_target = load_target("cpu")
        b = opts.bench_batch
        bv, bo, bc = gate.values[:b], gate.observed[:b], gate.calendar[:b]
        if len(bv) < b:  # repeat windows to reach the measured batch size
            reps = -(-b // len(bv))
            bv, bo, bc = (np.concatenate([a] * reps)[:b] for a in (bv, bo, bc))
        kinds = ["dynamic", "static"] if opts.cpu_variant == "auto" else [opts.cpu_variant]
        candidates: dict[str, tuple[Path, dict[str, Any]]] = {}
        for kind in kinds:
            path = self.work / f"cand.{kind}.onnx"
            if kind == "dynamic":
                summary = q.quantize_cpu_dynamic(fp32, path)
            else:
                summary = q.quantize_cpu_static(fp32, path, self.reader())
            check_onnx_file(path, cpu_target, opset=self.opset, **self.dims, what=f"int8_cpu ({kind})")
            candidates[kind] = (path, summary)
        speed = q.measure_throughput(
            {"fp32": fp32, **{k: v[0] for k, v in candidates.items()}},
            bv, bo, bc, threads=opts.threads, min_time_s=opts.bench_min_time_s,
        )  # fmt: skip
        self.cpu_choice = choice = {
            "batch": b,
            "min_speedup": opts.cpu_min_speedup,
            "measured": "onnxruntime CPU, interleaved runs, median batch time",
            "threads": opts.threads,
            "windows_per_s": {k: round(v["windows_per_s"], 1) for k, v in speed.items()},
            "speedup_vs_fp32": {
                k: round(v["windows_per_s"] / speed["fp32"]["windows_per_s"], 3) for k, v in speed.items()
            },
        }
        fastest = max(candidates, key=lambda k: speed[k]["windows_per_s"])
        for kind in candidates:
            if kind != fastest:
                candidates[kind][0].unlink()
        ratio = speed[fastest]["windows_per_s"] / speed["fp32"]["windows_per_s"]
        path, summary = candidates[fastest]
        if ratio < opts.cpu_min_speedup:
            why = (
                f"not faster on the export machine: {fastest} INT8 runs {ratio:.3f}x fp32's "
                f"throughput at batch {b} (needs >= {opts.cpu_min_speedup:.2f}x to be worth a variant)"
            )
            self.excluded["int8_cpu"] = why
            choice["chosen"], choice["why"] = None, why
            log.warning("no CPU INT8 variant: %s", why)
            path.unlink()
            return
        final = self.work / INT8_CPU_FILE
        path.rename(final)
        choice["chosen"] = fastest
        choice["why"] = (
            f"{fastest} quantization was the fastest INT8 form measured ({ratio:.2f}x fp32 throughput "
            f"at batch {b} on the export machine)"
        )
        if self.gate_variant("int8_cpu", final):
            self.variants["int8_cpu"] = {
                "file": INT8_CPU_FILE,
                "precision": "int8",
                "format": "dynamic" if fastest == "dynamic" else "qoperator",
                "runtime": "onnxruntime (CPU)",
                "speedup_vs_fp32": round(ratio, 3),
                "quantization": summary,
            }
