"""ONNX export of ConFill for a deployment target, and the checks every exported file must pass.

Targets (``export/trt_ops/<target>.json`` holds each one's operator list as data, from onnx-tensorrt's
``docs/operators.md`` for that release):

- ``trt8.6`` (JetPack 6.0): opset 17 (native LayerNormalization).
- ``trt10`` (JetPack 6.1/6.2, TensorRT 10.3): opset 17 (18 allowed).
- ``cpu`` (onnxruntime): opset 17.

There is no JetPack 5 (TensorRT 8.5) target: its TensorRT bindings are built for Python 3.8 and the gateway side
needs Python >= 3.10 (README, "Deploying to a Jetson", "Supported JetPack releases"). ``--opset 16`` still writes
LayerNorm as ReduceMean/Sub/Pow/Sqrt/Div/Mul/Add for a runtime without LayerNormalization.

The graph has a symbolic batch axis and fixed lookback L and horizon H. Export uses the TorchScript-based exporter
(``dynamo=False``) first: it writes any opset from 16 directly and takes well under a second; the torch.export-based
exporter (``dynamo=True``) is the fallback: it writes opset 18, converted down here for lower opsets (for 16 after
:func:`decompose_layernorm`, since LayerNormalization has no earlier version). Either way the result is checked: ``onnx.checker`` full check, the opset asked for, a symbolic batch
axis, no external data, onnxruntime loads it, and every operator is in the target's list (DFT/STFT never).

(Over 600 lines on purpose: the targets, the two exporters and the checks every exported file passes are one
contract; its stage functions stay short and beside the checks that judge their output.)
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gapcast.export import ExportError

__all__ = [
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "REMOVED_TARGETS",
    "TARGET_NAMES",
    "ExportTarget",
    "OnnxCheck",
    "check_onnx_file",
    "check_ops",
    "decompose_layernorm",
    "export_onnx",
    "graph_ops",
    "load_target",
    "make_session",
    "parity_check",
    "run_session",
]

log = logging.getLogger(__name__)

INPUT_NAMES = ("values", "observed", "calendar")
OUTPUT_NAMES = ("imputed", "forecast")
TARGET_NAMES = ("trt8.6", "trt10", "cpu")
#: Targets that were removed, with the reason given when one is asked for.
REMOVED_TARGETS = {
    "trt8.5": "JetPack 5 (TensorRT 8.5) is not supported: its TensorRT bindings are for Python 3.8 and the gateway "
    "needs Python >= 3.10; use trt8.6 (JetPack 6.0) or trt10 (JetPack 6.1+/7)",
}
_OPS_DIR = Path(__file__).resolve().parent / "trt_ops"


@dataclass(frozen=True)
class ExportTarget:
    """A deployment target: which opset to write and which operators its runtime accepts.

    Attributes:
        name: ``trt8.6``, ``trt10`` or ``cpu``.
        opset: default ONNX opset (ai.onnx domain) for this target.
        max_opset: highest opset the target's parser reads.
        tensorrt: the TensorRT release (and JetPack) the list is for; None for ``cpu``.
        supported: operator types accepted (``op_type``, or ``domain.op_type`` outside the default domain).
        forbidden: operators refused whatever the list says (DFT, STFT).
        source: where the list comes from.
    """

    name: str
    opset: int
    max_opset: int
    tensorrt: str | None
    supported: frozenset[str]
    forbidden: frozenset[str]
    source: str


def load_target(name: str) -> ExportTarget:
    """Load a target's operator list from ``export/trt_ops/<name>.json``.

    Raises:
        ExportError: unknown target or unreadable list.
    """
    if name in REMOVED_TARGETS:
        msg = f"export target {name!r} was removed: {REMOVED_TARGETS[name]}"
        raise ExportError(msg)
    if name not in TARGET_NAMES:
        msg = f"unknown export target {name!r}; choose one of {', '.join(TARGET_NAMES)}"
        raise ExportError(msg)
    path = _OPS_DIR / f"{name}.json"
    try:
        d = json.loads(path.read_text())
        return ExportTarget(
            name=name,
            opset=int(d["opset"]),
            max_opset=int(d["max_opset"]),
            tensorrt=d.get("tensorrt"),
            supported=frozenset(d["supported"]),
            forbidden=frozenset(d["forbidden"]),
            source=str(d["source"]),
        )
    except (OSError, KeyError, TypeError, ValueError) as exc:
        msg = f"cannot read the operator list {path}: {exc}"
        raise ExportError(msg) from exc


def graph_ops(model) -> set[str]:
    """Every operator type in an ONNX model, including sub-graphs (If/Loop/Scan bodies) and local functions.

    Args:
        model: ``onnx.ModelProto``.

    Returns:
        Set of ``op_type`` (default domain) or ``domain.op_type`` strings.
    """
    import onnx

    ops: set[str] = set()

    def visit(graph) -> None:
        for node in graph.node:
            ops.add(node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}")
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        visit(g)

    visit(model.graph)
    for fn in model.functions:
        for node in fn.node:
            ops.add(node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}")
    return ops


def check_ops(model, target: ExportTarget, *, what: str = "model") -> set[str]:
    """Check every operator of ``model`` against the target's supported list.

    Returns:
        The set of operators used.

    Raises:
        ExportError: a forbidden operator (DFT/STFT) or one outside the list; the message names them.
    """
    ops = graph_ops(model)
    bad = sorted(ops & target.forbidden)
    if bad:
        msg = (
            f"{what} uses {', '.join(bad)}, which gapcast never deploys (the DFT must be a MatMul with a fixed "
            "cos/sin basis)"
        )
        raise ExportError(msg)
    missing = sorted(ops - target.supported)
    if missing:
        msg = f"{what} uses operators the {target.name} runtime does not support: {', '.join(missing)}"
        raise ExportError(msg)
    return ops


def _opset_of(model) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    msg = "the ONNX model imports no ai.onnx opset"
    raise ExportError(msg)


def _example_inputs(batch: int, lookback: int, horizon: int, n_channels: int, n_calendar: int) -> tuple:
    """Seeded example inputs for tracing: (values [B,L,C], observed [B,L,C] 0/1, calendar [B,L+H,F]), all float32
    torch tensors, values zeroed where unobserved (about 20 % of entries). Raises nothing."""
    import torch

    g = torch.Generator().manual_seed(0)
    values = torch.randn(batch, lookback, n_channels, generator=g)
    observed = (torch.rand(batch, lookback, n_channels, generator=g) > 0.2).float()
    values = values * observed
    calendar = torch.randn(batch, lookback + horizon, n_calendar, generator=g)
    return (values, observed, calendar)


def _export_torchscript(model, args: tuple, opset: int):
    """The TorchScript-based exporter (``dynamo=False``): writes ``opset`` directly, batch axis symbolic.

    Returns:
        The ``onnx.ModelProto``.

    Raises:
        Whatever torch raises (many unrelated types); :func:`export_onnx` reports it and tries the next exporter.
    """
    import onnx
    import torch

    buf = io.BytesIO()
    torch.onnx.export(
        model,
        args,
        buf,
        input_names=list(INPUT_NAMES),
        output_names=list(OUTPUT_NAMES),
        opset_version=opset,
        dynamo=False,
        do_constant_folding=True,
        dynamic_axes={n: {0: "batch"} for n in (*INPUT_NAMES, *OUTPUT_NAMES)},
    )
    return onnx.load_from_string(buf.getvalue())


def _export_dynamo(model, args: tuple, opset: int):
    """The torch.export-based exporter (``dynamo=True``): writes opset 18, converted down here for a lower
    ``opset`` (LayerNorm first decomposed below 17) instead of by torch's fallback converter.

    Returns:
        The ``onnx.ModelProto`` at ``opset`` (or 18 and above as written).

    Raises:
        Whatever torch or onnx's version converter raises; :func:`export_onnx` reports it and tries the next one.
    """
    import torch

    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.onnx.export(
        model,
        args,
        input_names=list(INPUT_NAMES),
        output_names=list(OUTPUT_NAMES),
        opset_version=max(opset, 18),
        dynamo=True,
        external_data=False,
        dynamic_shapes=({0: batch}, {0: batch}, {0: batch}),
    )
    proto = program.model_proto
    if opset < 18:
        from onnx import version_converter

        if opset < 17:
            decompose_layernorm(proto)
        proto = version_converter.convert_version(proto, opset)
    return proto


def _run_exporter(name: str, model, args: tuple, opset: int):
    """Run one exporter (``torchscript`` or ``dynamo``) under ``torch.no_grad``, its warnings logged at debug.

    Returns:
        The ``onnx.ModelProto``.

    Raises:
        Whatever the exporter raises (see :func:`_export_torchscript`, :func:`_export_dynamo`).
    """
    import torch

    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        proto = _export_torchscript(model, args, opset) if name == "torchscript" else _export_dynamo(model, args, opset)
    for w in caught:
        log.debug("%s exporter: %s", name, w.message)
    return proto


def _name_io_dims(proto, *, lookback: int, horizon: int, n_channels: int) -> None:
    """In place: name the batch axis ``batch`` on every input and output whatever the exporter called it, and
    state the fixed output dims (imputed [batch, L, C], forecast [batch, H, C]). Raises nothing."""
    # The TorchScript exporter can leave output dims symbolic after a reshape with -1; check_onnx_file then runs
    # the graph at another batch size to prove the declared shapes hold.
    fixed = {"imputed": (lookback, n_channels), "forecast": (horizon, n_channels)}
    for vi in list(proto.graph.input) + list(proto.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if not dims[0].HasField("dim_value"):
            dims[0].dim_param = "batch"
        if vi.name in fixed and len(dims) == 3:
            for d, size in zip(dims[1:], fixed[vi.name], strict=True):
                d.dim_value = size


def export_onnx(
    model,
    path: str | Path,
    *,
    lookback: int,
    horizon: int,
    n_channels: int,
    n_calendar: int,
    opset: int,
    example_batch: int = 2,
    exporter: str = "auto",
) -> str:
    """Export a ConFill-like module to one self-contained ONNX file with a symbolic batch axis.

    The module is called as ``model(values [B,L,C], observed [B,L,C], calendar [B,L+H,F]) -> (imputed [B,L,C],
    forecast [B,H,C])``, all float32. The example batch must be at least 2 so a tracer cannot bake B = 1 in.

    Args:
        model: the torch module (put in eval mode here).
        path: output ``.onnx`` file.
        lookback, horizon, n_channels, n_calendar: L, H, C, F.
        opset: ai.onnx opset to write.
        example_batch: B of the example inputs (>= 2).
        exporter: ``auto`` (TorchScript exporter, then torch.export-based), ``torchscript`` or ``dynamo``.

    Returns:
        The exporter that produced the file (``torchscript`` or ``dynamo``).

    Raises:
        ExportError: every exporter failed, or the result has another opset than asked (the message says why).
    """
    import onnx

    if example_batch < 2:
        msg = f"example_batch must be >= 2 to prove the batch axis is symbolic, got {example_batch}"
        raise ExportError(msg)
    if exporter not in ("auto", "torchscript", "dynamo"):
        msg = f"unknown exporter {exporter!r}"
        raise ExportError(msg)
    path = Path(path)
    model = model.eval()
    args = _example_inputs(example_batch, lookback, horizon, n_channels, n_calendar)
    order = ["torchscript", "dynamo"] if exporter == "auto" else [exporter]
    errors: list[str] = []
    for name in order:
        try:
            proto = _run_exporter(name, model, args, opset)
        except Exception as exc:  # torch raises many unrelated types here; each is reported, then the next tried
            errors.append(f"{name}: {type(exc).__name__}: {str(exc)[:400]}")
            log.warning("the %s ONNX exporter failed: %s", name, errors[-1])
            continue
        got = _opset_of(proto)
        if got != opset:
            errors.append(f"{name}: wrote opset {got}, not the {opset} asked for")
            log.warning("the %s ONNX exporter wrote opset %d instead of %d", name, got, opset)
            continue
        _name_io_dims(proto, lookback=lookback, horizon=horizon, n_channels=n_channels)
        proto.producer_name = "gapcast"
        onnx.save_model(proto, str(path), save_as_external_data=False)
        return name
    msg = "ONNX export failed with every exporter:\n  " + "\n  ".join(errors)
    raise ExportError(msg)


def decompose_layernorm(model) -> int:
    """Rewrite every LayerNormalization (opset >= 17) as ReduceMean/Sub/Mul/Add/Sqrt/Div in place.

    The model must be at opset 18 (ReduceMean takes its axes as an input); convert the version afterwards. Only
    normalisation over the last axis is handled, which is what ``torch.nn.LayerNorm`` with one normalised dim
    exports.

    Returns:
        The number of nodes rewritten.

    Raises:
        ExportError: a LayerNormalization over another axis, or a model below opset 18.
    """
    from onnx import TensorProto, helper

    if _opset_of(model) < 18:
        msg = "decompose_layernorm needs an opset-18 graph (ReduceMean with an axes input)"
        raise ExportError(msg)
    nodes = []
    count = 0
    for node in model.graph.node:
        if node.op_type != "LayerNormalization" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if int(attrs.get("axis", -1)) != -1:
            msg = f"{node.name}: LayerNormalization over axis {attrs['axis']} cannot be decomposed here"
            raise ExportError(msg)
        if len(node.output) > 1 and any(node.output[1:]):
            msg = f"{node.name}: LayerNormalization's mean/inv-std outputs are used; cannot decompose"
            raise ExportError(msg)
        eps = float(attrs.get("epsilon", 1e-5))
        p = f"{node.name or 'ln'}_{count}/"
        x, scale = node.input[0], node.input[1]
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        model.graph.initializer.extend(
            [
                helper.make_tensor(p + "axes", TensorProto.INT64, [1], [-1]),
                helper.make_tensor(p + "eps", TensorProto.FLOAT, [], [eps]),
            ]
        )
        out = node.output[0]
        nodes += [
            helper.make_node("ReduceMean", [x, p + "axes"], [p + "mean"], name=p + "mean", keepdims=1),
            helper.make_node("Sub", [x, p + "mean"], [p + "d"], name=p + "sub"),
            helper.make_node("Mul", [p + "d", p + "d"], [p + "d2"], name=p + "sq"),
            helper.make_node("ReduceMean", [p + "d2", p + "axes"], [p + "var"], name=p + "var", keepdims=1),
            helper.make_node("Add", [p + "var", p + "eps"], [p + "var_eps"], name=p + "add_eps"),
            helper.make_node("Sqrt", [p + "var_eps"], [p + "std"], name=p + "sqrt"),
            helper.make_node("Div", [p + "d", p + "std"], [p + "norm"], name=p + "div"),
            helper.make_node("Mul", [p + "norm", scale], [p + "scaled" if bias else out], name=p + "scale"),
        ]
        if bias:
            nodes.append(helper.make_node("Add", [p + "scaled", bias], [out], name=p + "bias"))
        count += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return count


@dataclass(frozen=True)
class OnnxCheck:
    """What :func:`check_onnx_file` verified.

    Attributes:
        opset: the ai.onnx opset of the file.
        ops: operator types used, sorted.
        bytes: file size.
    """

    opset: int
    ops: tuple[str, ...]
    bytes: int


def _load_checked(path: Path, what: str, opset: int):
    """``onnx.checker`` full check (with shape inference), then the file's opset and self-containedness.

    Returns:
        (the ``onnx.ModelProto`` loaded without external data, its ai.onnx opset).

    Raises:
        ExportError: the checker fails, the opset is not ``opset``, or an initializer is stored as external data.
    """
    import onnx
    import onnx.checker

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        msg = f"{what}: onnx.checker failed: {exc}"
        raise ExportError(msg) from exc
    model = onnx.load(str(path), load_external_data=False)
    got = _opset_of(model)
    if got != opset:
        msg = f"{what}: opset {got}, but {opset} was asked for"
        raise ExportError(msg)
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            msg = f"{what}: initializer {init.name!r} is stored as external data; bundles hold one self-contained file"
            raise ExportError(msg)
    return model, got


def _check_io(model, what: str, *, lookback: int, horizon: int, n_channels: int, n_calendar: int) -> None:
    """The bundle contract on the graph's inputs and outputs: values/observed [batch, L, C], calendar
    [batch, L+H, F], imputed [batch, L, C], forecast [batch, H, C], all float32, batch symbolic, the rest fixed.

    Raises:
        ExportError: a name missing or extra, another element type, a fixed batch axis, or other trailing dims.
    """
    import onnx

    want_in = {
        "values": [lookback, n_channels],
        "observed": [lookback, n_channels],
        "calendar": [lookback + horizon, n_calendar],
    }
    want_out = {"imputed": [lookback, n_channels], "forecast": [horizon, n_channels]}
    for vis, want, kind in ((model.graph.input, want_in, "input"), (model.graph.output, want_out, "output")):
        names = [vi.name for vi in vis]
        if sorted(names) != sorted(want):
            msg = f"{what}: {kind}s are {names}, the bundle contract wants {sorted(want)}"
            raise ExportError(msg)
        for vi in vis:
            dims = vi.type.tensor_type.shape.dim
            if vi.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
                msg = f"{what}: {kind} {vi.name} is not float32"
                raise ExportError(msg)
            if len(dims) != 3 or dims[0].HasField("dim_value") or not dims[0].dim_param:
                msg = f"{what}: {kind} {vi.name} must have a symbolic batch axis, got {dims}"
                raise ExportError(msg)
            fixed = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims[1:]]
            if fixed != want[vi.name]:
                msg = f"{what}: {kind} {vi.name} has trailing dims {fixed}, expected fixed {want[vi.name]}"
                raise ExportError(msg)


def _check_runs(path: Path, what: str, *, lookback: int, horizon: int, n_channels: int, n_calendar: int) -> None:
    """onnxruntime loads the file and runs it on zeros at batch 3, a size the exporter never saw (a batch baked
    into a Reshape fails here); the outputs must be imputed [3, L, C] and forecast [3, H, C].

    Raises:
        ExportError: onnxruntime cannot load or run it, or the outputs have other shapes.
    """
    try:
        sess = make_session(path, threads=1)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/RuntimeException types
        msg = f"{what}: onnxruntime cannot load it: {exc}"
        raise ExportError(msg) from exc
    b = 3
    zeros = np.zeros((b, lookback, n_channels), dtype=np.float32)
    cal = np.zeros((b, lookback + horizon, n_calendar), dtype=np.float32)
    try:
        imp, fc = run_session(sess, zeros, np.ones_like(zeros), cal)
    except Exception as exc:  # onnxruntime's own exception types
        msg = f"{what}: onnxruntime cannot run it at batch {b}: {exc}"
        raise ExportError(msg) from exc
    if imp.shape != (b, lookback, n_channels) or fc.shape != (b, horizon, n_channels):
        msg = f"{what}: at batch {b} the outputs have shapes {imp.shape} and {fc.shape}"
        raise ExportError(msg)


def check_onnx_file(
    path: str | Path,
    target: ExportTarget,
    *,
    opset: int,
    lookback: int,
    horizon: int,
    n_channels: int,
    n_calendar: int,
    what: str | None = None,
) -> OnnxCheck:
    """Every check an exported file must pass before it enters a bundle.

    ``onnx.checker`` full check (with shape inference), the opset asked for, inputs/outputs named and shaped per
    the bundle contract with a symbolic batch axis and fixed L/H/C/F, all weights inside the file (no external data),
    onnxruntime loads it and runs a batch of 3 windows to outputs of the contract shapes, and every operator in the
    target's list.

    Raises:
        ExportError: the first failing check, naming the file.
    """
    path = Path(path)
    what = what or path.name
    dims = {"lookback": lookback, "horizon": horizon, "n_channels": n_channels, "n_calendar": n_calendar}
    model, got = _load_checked(path, what, opset)
    _check_io(model, what, **dims)
    ops = check_ops(model, target, what=what)
    _check_runs(path, what, **dims)
    return OnnxCheck(opset=got, ops=tuple(sorted(ops)), bytes=path.stat().st_size)


def make_session(path: str | Path, *, threads: int | None = None):
    """An onnxruntime CPU session for ``path`` (all graph optimisations, ``threads`` intra-op threads)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def run_session(
    session, values: np.ndarray, observed: np.ndarray, calendar: np.ndarray, *, chunk: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Run an onnxruntime session over a batch in chunks of ``chunk`` windows.

    Args:
        values: [B, L, C] float32 normalised, 0 where unobserved.
        observed: [B, L, C] float32 0/1.
        calendar: [B, L+H, F] float32.

    Returns:
        (imputed [B, L, C], forecast [B, H, C]) float32.
    """
    outs_i, outs_f = [], []
    for s in range(0, len(values), chunk):
        feed = {
            "values": np.ascontiguousarray(values[s : s + chunk], dtype=np.float32),
            "observed": np.ascontiguousarray(observed[s : s + chunk], dtype=np.float32),
            "calendar": np.ascontiguousarray(calendar[s : s + chunk], dtype=np.float32),
        }
        imp, fc = session.run(list(OUTPUT_NAMES), feed)
        outs_i.append(imp)
        outs_f.append(fc)
    return np.concatenate(outs_i).astype(np.float32), np.concatenate(outs_f).astype(np.float32)


def parity_check(
    model,
    onnx_path: str | Path,
    values: np.ndarray,
    observed: np.ndarray,
    calendar: np.ndarray,
    *,
    tolerance: float = 1e-4,
    chunk: int = 64,
) -> dict[str, Any]:
    """onnxruntime fp32 against torch on the same windows: the largest absolute difference of either output.

    Args:
        model: the torch module that was exported.
        onnx_path: its fp32 ONNX file.
        values, observed, calendar: a batch of real windows, shapes as in :func:`run_session`.
        tolerance: the largest allowed absolute difference, normalised units.
        chunk: windows per forward pass.

    Returns:
        ``{"max_abs_err", "imputed_max_abs_err", "forecast_max_abs_err", "windows", "tolerance"}``.

    Raises:
        ExportError: the difference exceeds ``tolerance`` (the export must stop), or outputs are not finite.
    """
    import torch

    sess = make_session(onnx_path)
    ort_i, ort_f = run_session(sess, values, observed, calendar, chunk=chunk)
    ti, tf = [], []
    model = model.eval()
    with torch.no_grad():
        for s in range(0, len(values), chunk):
            i, f = model(
                torch.from_numpy(np.ascontiguousarray(values[s : s + chunk], dtype=np.float32)),
                torch.from_numpy(np.ascontiguousarray(observed[s : s + chunk], dtype=np.float32)),
                torch.from_numpy(np.ascontiguousarray(calendar[s : s + chunk], dtype=np.float32)),
            )
            ti.append(i.numpy())
            tf.append(f.numpy())
    t_i, t_f = np.concatenate(ti), np.concatenate(tf)
    if not (np.isfinite(ort_i).all() and np.isfinite(ort_f).all() and np.isfinite(t_i).all()):
        msg = "parity check: non-finite outputs (NaN/inf) from torch or onnxruntime"
        raise ExportError(msg)
    err_i = float(np.max(np.abs(ort_i - t_i)))
    err_f = float(np.max(np.abs(ort_f - t_f)))
    result = {
        "max_abs_err": max(err_i, err_f),
        "imputed_max_abs_err": err_i,
        "forecast_max_abs_err": err_f,
        "windows": len(values),
        "tolerance": tolerance,
    }
    if result["max_abs_err"] > tolerance:
        msg = (
            f"parity check failed: onnxruntime fp32 differs from torch by up to {result['max_abs_err']:.3g} "
            f"(imputed {err_i:.3g}, forecast {err_f:.3g}) on {len(values)} windows; the limit is {tolerance:g}. "
            "The exported graph does not compute what the model computes: stopping the export."
        )
        raise ExportError(msg)
    return result
