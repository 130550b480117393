"""INT8 variants of the fp32 graph: a QDQ model for TensorRT and a CPU model for onnxruntime, and their gates.

- ``int8_qdq`` (TensorRT, explicit quantization): ``onnxruntime.quantization.quantize_static`` in QDQ format,
  symmetric int8 activations and weights (TensorRT wants zero points of 0), per-channel weights, calibrated by
  MinMax on real training windows with their real observed masks. Only MatMul/Gemm/Conv with a constant weight are
  quantized; LayerNorm, Softmax, Sigmoid, residual Adds stay float because their op types are not in the list, and
  the nodes that read the raw inputs (the mask path: the value embedding of [x*m, m], the calendar embedding and the
  DFT basis MatMul on the masked window) are excluded by name, found by walking the graph from its inputs.
- ``int8_cpu`` (onnxruntime on CPU): dynamic quantization (MatMulInteger, weights int8 per tensor, activations
  quantized per batch at run time) or static QOperator (QLinearMatMul/QLinearConv, uint8 activations). Which one,
  if either, is decided by measuring throughput at batch 64 against fp32 on the export machine.

Gate (both variants): imputation and forecast MAE on validation windows within ``tolerance`` (3 %) of fp32's,
else the variant is left out of the bundle with the reason recorded in the card.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from gapcast.export import ExportError
from gapcast.export.onnx_export import make_session, run_session

__all__ = [
    "QUANTIZED_OP_TYPES",
    "ArrayCalibrationReader",
    "GateWindows",
    "accuracy_gate",
    "check_qdq_for_tensorrt",
    "float_path_nodes",
    "make_gate_windows",
    "measure_throughput",
    "quantize_cpu_dynamic",
    "quantize_cpu_static",
    "quantize_qdq",
    "variant_metrics",
]

log = logging.getLogger(__name__)

QUANTIZED_OP_TYPES = ("MatMul", "Gemm", "Conv")
# Names that mark fixed, parameter-free matrices whatever path leads to them: the DFT basis, and the triangular
# count / selection matrices of ConFill's gap interpolator (exported as Constant nodes under ``/interp/``). They
# select and count exactly; int8 would break that (a fine-tuned model's imputation MAE went +373 % when they were
# quantized), and they carry no learned weight to compress.
_BASIS_HINTS = ("basis", "dft", "fourier", "rfft", "/interp/", "interp.")
_FIXED_REASON = "fixed parameter-free matrix (DFT basis or gap interpolation)"


class ArrayCalibrationReader(CalibrationDataReader):
    """Feeds calibration batches from in-memory windows to ``quantize_static``.

    Args:
        values: [N, L, C] float32 normalised, 0 where unobserved (the real masks of real windows).
        observed: [N, L, C] float32 0/1.
        calendar: [N, L+H, F] float32.
        batch: windows per calibration batch.
    """

    def __init__(self, values: np.ndarray, observed: np.ndarray, calendar: np.ndarray, *, batch: int = 16):
        self._arrays = (values, observed, calendar)
        self._batch = batch
        self._pos = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        values, observed, calendar = self._arrays
        if self._pos >= len(values):
            return None
        s = slice(self._pos, self._pos + self._batch)
        self._pos += self._batch
        return {
            "values": np.ascontiguousarray(values[s], dtype=np.float32),
            "observed": np.ascontiguousarray(observed[s], dtype=np.float32),
            "calendar": np.ascontiguousarray(calendar[s], dtype=np.float32),
        }

    def rewind(self) -> None:
        self._pos = 0


def float_path_nodes(model) -> dict[str, str]:
    """Quantizable nodes that must stay float, with the reason.

    A MatMul/Gemm/Conv stays float when its activation input is computed from the graph inputs by parameter-free
    operations only (it reads the raw values, the observed mask or the calendar: the mask path, the DFT of the
    masked window), when its constant input is named like the DFT basis, or when it has no constant weight at all
    (attention score products: both operands are activations).

    Args:
        model: ``onnx.ModelProto`` (fp32).

    Returns:
        Node name -> reason.
    """
    const_out: set[str] = {i.name for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            const_out.update(node.output)
    # "raw" tensors: graph inputs and whatever parameter-free operations compute from them (and constants).
    raw: set[str] = {i.name for i in model.graph.input}
    reasons: dict[str, str] = {}
    for node in model.graph.node:  # ONNX graphs are topologically sorted
        ins = [t for t in node.input if t]
        act_ins = [t for t in ins if t not in const_out]
        const_ins = [t for t in ins if t in const_out]
        reads_raw = bool(act_ins) and all(t in raw for t in act_ins)
        weight_op = node.op_type in QUANTIZED_OP_TYPES
        if weight_op:
            if any(h in t.lower() for t in const_ins for h in _BASIS_HINTS):
                reasons[node.name] = _FIXED_REASON
            elif node.op_type == "MatMul" and ins and ins[0] in const_out:
                reasons[node.name] = "constant left operand (fixed DFT basis or frequency mixing)"
            elif reads_raw:
                reasons[node.name] = "reads the raw inputs (mask path)"
            elif not const_ins:
                reasons[node.name] = "activation x activation product"
        # A fixed matrix is parameter-free too: what it computes from raw inputs is still raw.
        if reads_raw and (not weight_op or reasons.get(node.name) == _FIXED_REASON):
            raw.update(node.output)
    return reasons


def _ensure_node_names(path: Path) -> None:
    """Give every node a unique name (the quantizer excludes nodes by name)."""
    import onnx

    model = onnx.load(str(path))
    seen: set[str] = set()
    changed = False
    for k, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{k}"
            changed = True
        seen.add(node.name)
    if changed:
        onnx.save_model(model, str(path), save_as_external_data=False)


def _quant_summary(model, excluded: dict[str, str]) -> dict[str, Any]:
    ops = [n.op_type for n in model.graph.node]
    return {
        "quantize_linear": ops.count("QuantizeLinear"),
        "dequantize_linear": ops.count("DequantizeLinear"),
        "float_nodes": dict(sorted(excluded.items())),
    }


def quantize_qdq(
    fp32_path: str | Path,
    out_path: str | Path,
    calibration: ArrayCalibrationReader,
    *,
    extra_exclude: Iterable[str] = (),
) -> dict[str, Any]:
    """Write the TensorRT INT8 variant: QDQ, symmetric int8, per-channel weights, MatMul/Gemm/Conv only.

    Args:
        fp32_path: the fp32 ONNX file (node names are made unique in place if needed).
        out_path: the QDQ ONNX file to write.
        calibration: real training windows with real masks.
        extra_exclude: more node names to keep float.

    Returns:
        A summary for the card: calibration method, counts of Q/DQ nodes, the float nodes and why.

    Raises:
        ExportError: quantization failed.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    fp32_path, out_path = Path(fp32_path), Path(out_path)
    _ensure_node_names(fp32_path)
    model = onnx.load(str(fp32_path))
    excluded = float_path_nodes(model)
    excluded.update({n: "excluded by request" for n in extra_exclude})
    try:
        quantize_static(
            str(fp32_path),
            str(out_path),
            calibration,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OP_TYPES),
            per_channel=True,
            reduce_range=False,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=sorted(excluded),
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={
                "ActivationSymmetric": True,  # TensorRT requires zero points of 0
                "WeightSymmetric": True,
                "MatMulConstBOnly": True,  # only weight layers; activation x activation products stay float
                "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},  # [K, N] weights: one scale per output column
                "QuantizeBias": False,  # TensorRT's DequantizeLinear takes int8 only; biases stay float
                # A tensor feeding a weight layer and also a residual Add/LayerNorm gets its own Q/DQ pair for the
                # weight layer, so the other consumers keep reading the float tensor.
                "DedicatedQDQPair": True,
                # Quantize the inputs of the weight layers only; their outputs (bias Add, residual) stay float.
                "OpTypesToExcludeOutputQuantization": list(QUANTIZED_OP_TYPES),
            },
        )
    except Exception as exc:  # onnxruntime raises bare RuntimeError/ValueError/onnx errors here
        msg = f"INT8 QDQ quantization failed: {type(exc).__name__}: {exc}"
        raise ExportError(msg) from exc
    out = onnx.load(str(out_path))
    rewired = _keep_float_consumers(out)
    if rewired:
        onnx.save_model(out, str(out_path), save_as_external_data=False)
    check_qdq_for_tensorrt(out)
    summary = _quant_summary(out, excluded)
    summary.update(
        {
            "method": "onnxruntime quantize_static, QDQ, MinMax calibration",
            "activations": "int8 symmetric, per tensor",
            "weights": "int8 symmetric, per channel",
            "op_types": list(QUANTIZED_OP_TYPES),
        }
    )
    return summary


def _keep_float_consumers(model) -> int:
    """Make only weight layers read dequantized tensors; every other consumer reads the float original.

    onnxruntime's QDQ quantizer, when an activation has one quantized consumer, routes *all* its consumers through
    the Q/DQ pair, so a residual Add, a LayerNorm or a Shape next to the MatMul would read quantized values. This
    reconnects those consumers to the tensor before the QuantizeLinear.

    Returns:
        The number of node inputs reconnected.
    """
    producer = {out: node for node in model.graph.node for out in node.output}
    rewired = 0
    for node in model.graph.node:
        if node.op_type in QUANTIZED_OP_TYPES or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is None or q.op_type != "QuantizeLinear":
                continue  # a dequantized weight initializer: not an activation
            node.input[i] = q.input[0]
            rewired += 1
    if rewired:
        # Drop Q/DQ pairs nobody reads any more.
        used = {t for n in model.graph.node for t in n.input} | {o.name for o in model.graph.output}
        changed = True
        while changed:
            changed = False
            for n in list(model.graph.node):
                if n.op_type in ("QuantizeLinear", "DequantizeLinear") and not (set(n.output) & used):
                    model.graph.node.remove(n)
                    used = {t for m in model.graph.node for t in m.input} | {o.name for o in model.graph.output}
                    changed = True
    return rewired


def check_qdq_for_tensorrt(model) -> None:
    """TensorRT's explicit quantization: every Q/DQ node int8 with zero points of 0.

    Raises:
        ExportError: a Q/DQ node with another type (e.g. an int32 bias) or a non-zero zero point.
    """
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        zp_name = node.input[2] if len(node.input) > 2 else ""
        if zp_name not in inits:
            msg = f"{node.name}: no constant int8 zero point; TensorRT needs an explicit zero point of 0"
            raise ExportError(msg)
        zp = numpy_helper.to_array(inits[zp_name])
        if zp.dtype != np.int8 or np.any(zp != 0):
            msg = f"{node.name}: zero point {zp.dtype} {zp.ravel()[:4]}...; TensorRT needs int8 zero points of 0"
            raise ExportError(msg)


def _prepare_for_quantization(fp32_path: Path) -> dict[str, str]:
    """Name every node (the quantizer excludes by name) and return the nodes that stay float, with the reason."""
    import onnx

    _ensure_node_names(fp32_path)
    return float_path_nodes(onnx.load(str(fp32_path)))


def quantize_cpu_dynamic(fp32_path: str | Path, out_path: str | Path) -> dict[str, Any]:
    """Write a dynamically quantized CPU variant (MatMulInteger; weights int8 per tensor).

    Raises:
        ExportError: quantization failed.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32_path = Path(fp32_path)
    excluded = _prepare_for_quantization(fp32_path)
    try:
        quantize_dynamic(
            str(fp32_path),
            str(out_path),
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gemm"],
            per_channel=False,
            nodes_to_exclude=sorted(excluded),
            extra_options={"MatMulConstBOnly": True},
        )
    except Exception as exc:  # see quantize_qdq
        msg = f"dynamic INT8 quantization failed: {type(exc).__name__}: {exc}"
        raise ExportError(msg) from exc
    return {
        "method": "onnxruntime quantize_dynamic",
        "activations": "uint8, quantized per batch at run time",
        "weights": "int8 symmetric, per tensor",
        "op_types": ["MatMul", "Gemm"],
        "float_nodes": dict(sorted(excluded.items())),
    }


def quantize_cpu_static(
    fp32_path: str | Path, out_path: str | Path, calibration: ArrayCalibrationReader
) -> dict[str, Any]:
    """Write a static QOperator CPU variant (QLinearMatMul/QLinearConv; uint8 activations, int8 weights).

    Raises:
        ExportError: quantization failed.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    fp32_path = Path(fp32_path)
    excluded = _prepare_for_quantization(fp32_path)
    try:
        quantize_static(
            str(fp32_path),
            str(out_path),
            calibration,
            quant_format=QuantFormat.QOperator,
            op_types_to_quantize=list(QUANTIZED_OP_TYPES),
            per_channel=False,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=sorted(excluded),
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"MatMulConstBOnly": True},
        )
    except Exception as exc:  # see quantize_qdq
        msg = f"static QOperator INT8 quantization failed: {type(exc).__name__}: {exc}"
        raise ExportError(msg) from exc
    return {
        "method": "onnxruntime quantize_static, QOperator, MinMax calibration",
        "activations": "uint8 asymmetric, per tensor",
        "weights": "int8 symmetric, per tensor",
        "op_types": list(QUANTIZED_OP_TYPES),
        "float_nodes": dict(sorted(excluded.items())),
    }


def measure_throughput(
    paths: dict[str, str | Path],
    values: np.ndarray,
    observed: np.ndarray,
    calendar: np.ndarray,
    *,
    threads: int | None = None,
    min_time_s: float = 1.0,
    max_rounds: int = 50,
) -> dict[str, dict[str, float]]:
    """Windows per second of several ONNX files on one batch, measured interleaved.

    One session per file; after a warm-up run each, the files take turns (one batch each per round) until every
    file ran ``min_time_s`` in total or ``max_rounds`` rounds passed, so load from other processes hits all of them
    alike. The median batch time is reported.

    Args:
        paths: name -> ONNX file.
        values, observed, calendar: one batch (e.g. B = 64), shapes as in :func:`run_session`.
        threads: intra-op threads (None: onnxruntime's default).
        min_time_s: measured time per file, at least.
        max_rounds: upper bound on rounds.

    Returns:
        name -> ``{"windows_per_s", "ms_per_batch", "batch", "runs"}`` (median over the runs).
    """
    feed = {
        "values": np.ascontiguousarray(values, dtype=np.float32),
        "observed": np.ascontiguousarray(observed, dtype=np.float32),
        "calendar": np.ascontiguousarray(calendar, dtype=np.float32),
    }
    sessions = {name: make_session(p, threads=threads) for name, p in paths.items()}
    for sess in sessions.values():
        sess.run(None, feed)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(max_rounds):
        for name, sess in sessions.items():
            t0 = time.perf_counter()
            sess.run(None, feed)
            times[name].append(time.perf_counter() - t0)
        if min(sum(t) for t in times.values()) >= min_time_s:
            break
    out = {}
    for name, ts in times.items():
        dt = float(np.median(ts))
        out[name] = {"windows_per_s": len(values) / dt, "ms_per_batch": dt * 1e3, "batch": len(values), "runs": len(ts)}
    return out


@dataclass(frozen=True)
class GateWindows:
    """Validation windows with an artificial outage, to score a variant against the truth.

    Attributes:
        values: [N, L, C] float32 model input (normalised, 0 where unobserved or hidden).
        observed: [N, L, C] float32 model mask (0 where hidden).
        calendar: [N, L+H, F] float32.
        truth: [N, L+H, C] float32 normalised true values (0 where unobserved).
        hidden: [N, L, C] bool, observed values hidden from the model (imputation is scored here).
        future_observed: [N, H, C] bool, observed targets of the forecast.
    """

    values: np.ndarray
    observed: np.ndarray
    calendar: np.ndarray
    truth: np.ndarray
    hidden: np.ndarray
    future_observed: np.ndarray


def make_gate_windows(
    values: np.ndarray,
    observed: np.ndarray,
    calendar: np.ndarray,
    lookback: int,
    *,
    block_h: int = 24,
    point_share: float = 0.1,
    seed: int = 0,
) -> GateWindows:
    """Hide, in every window, one contiguous block of ``block_h`` steps on all channels plus ``point_share`` of the
    remaining observed points, so imputation can be scored on values the model did not see.

    Args:
        values: [N, L+H, C] float32 normalised, 0 where unobserved.
        observed: [N, L+H, C] float32 0/1.
        calendar: [N, L+H, F] float32.
        lookback: L.
        block_h: outage length, steps (< L).
        point_share: share of other observed points hidden at random.
        seed: RNG seed (the same masks for every variant).

    Returns:
        :class:`GateWindows`.
    """
    rng = np.random.default_rng(seed)
    n = len(values)
    past_obs = observed[:, :lookback] > 0.5
    hide = np.zeros_like(past_obs)
    block_h = min(block_h, lookback - 1)
    starts = rng.integers(0, lookback - block_h + 1, size=n)
    for k in range(n):
        hide[k, starts[k] : starts[k] + block_h, :] = True
    hide |= rng.random(past_obs.shape) < point_share
    hide &= past_obs
    model_obs = (past_obs & ~hide).astype(np.float32)
    return GateWindows(
        values=(values[:, :lookback] * model_obs).astype(np.float32),
        observed=model_obs,
        calendar=calendar.astype(np.float32),
        truth=values.astype(np.float32),
        hidden=hide,
        future_observed=observed[:, lookback:] > 0.5,
    )


def variant_metrics(path: str | Path, gate: GateWindows, *, threads: int | None = None) -> dict[str, float]:
    """Imputation MAE (hidden values) and forecast MAE (observed targets) of one ONNX file, normalised units."""
    sess = make_session(path, threads=threads)
    imp, fc = run_session(sess, gate.values, gate.observed, gate.calendar)
    L = gate.values.shape[1]
    imp_err = np.abs(imp - gate.truth[:, :L])[gate.hidden]
    fc_err = np.abs(fc - gate.truth[:, L:])[gate.future_observed]
    return {
        "imputation_mae": float(imp_err.mean()) if imp_err.size else float("nan"),
        "forecast_mae": float(fc_err.mean()) if fc_err.size else float("nan"),
        "imputation_points": int(imp_err.size),
        "forecast_points": int(fc_err.size),
    }


def accuracy_gate(
    fp32: dict[str, float], variant: dict[str, float], *, tolerance: float = 0.03
) -> tuple[bool, dict[str, Any]]:
    """Is a variant's imputation and forecast MAE within ``tolerance`` (relative) of fp32's?

    A variant that is more accurate than fp32 passes; one that is worse by more than ``tolerance`` fails.

    Returns:
        (passed, ``{"imputation_mae", "forecast_mae", "imputation_rel_delta", "forecast_rel_delta", "tolerance"}``).
    """
    out: dict[str, Any] = {"tolerance": tolerance}
    ok = True
    for key in ("imputation_mae", "forecast_mae"):
        base, got = fp32[key], variant[key]
        rel = (got - base) / base if base > 0 else (0.0 if got == base else float("inf"))
        out[key] = got
        out[key.replace("_mae", "_rel_delta")] = rel
        if not np.isfinite(got) or rel > tolerance:
            ok = False
    return ok, out
