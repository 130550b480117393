"""ONNX export per target: opsets, symbolic batch, operator lists (DFT/STFT never), parity against torch."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from gapcast.export import ExportError
from gapcast.export.onnx_export import (
    TARGET_NAMES,
    check_onnx_file,
    check_ops,
    export_onnx,
    graph_ops,
    load_target,
    parity_check,
)
from gapcast.tools.tinybundle import tiny_config
from gapcast.train.model import ConFill

DIMS = {"lookback": 96, "horizon": 24, "n_channels": 13, "n_calendar": 6}


def _model(seed: int) -> ConFill:
    torch.manual_seed(seed)
    return ConFill(tiny_config()).eval()


def _graph(op: str, domain: str = "") -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    node = helper.make_node(op, ["x"], ["y"], name="n0", domain=domain)
    return helper.make_model(helper.make_graph([node], "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])


def test_targets_and_their_opsets():
    opsets = {name: load_target(name).opset for name in TARGET_NAMES}
    assert opsets == {"trt8.6": 17, "trt10": 17, "cpu": 17}
    assert "LayerNormalization" in load_target("trt8.6").supported
    for name in TARGET_NAMES:
        t = load_target(name)
        assert {"DFT", "STFT"} <= t.forbidden and not ({"DFT", "STFT"} & t.supported)
        assert {"MatMul", "Softmax", "QuantizeLinear", "DequantizeLinear"} <= t.supported
    with pytest.raises(ExportError, match="unknown export target"):
        load_target("trt7")
    # JetPack 5 was removed on purpose (Python 3.8 TensorRT bindings); asking for it says why.
    with pytest.raises(ExportError, match=r"'trt8.5' was removed: JetPack 5 .* Python 3.8"):
        load_target("trt8.5")


@pytest.mark.parametrize("op", ["DFT", "STFT"])
def test_op_check_rejects_dft_and_stft_on_every_target(op):
    for name in TARGET_NAMES:
        with pytest.raises(ExportError, match=rf"uses {op}, which gapcast never deploys"):
            check_ops(_graph(op), load_target(name))


def test_op_check_rejects_unsupported_ops_and_looks_into_subgraphs():
    with pytest.raises(ExportError, match="trt10 runtime does not support: Foo"):
        check_ops(_graph("Foo"), load_target("trt10"))
    assert check_ops(_graph("LayerNormalization"), load_target("trt8.6")) == {"LayerNormalization"}
    with pytest.raises(ExportError, match="does not support: com.microsoft.FusedMatMul"):
        check_ops(_graph("FusedMatMul", "com.microsoft"), load_target("trt10"))
    # A DFT hidden in an If branch is found too.
    branch = helper.make_graph(
        [helper.make_node("DFT", ["x"], ["z"])], "b", [], [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)]
    )
    cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    node = helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)
    model = helper.make_model(helper.make_graph([node], "g", [cond], [out]))
    assert graph_ops(model) == {"If", "DFT"}
    with pytest.raises(ExportError, match="DFT"):
        check_ops(model, load_target("trt10"))


def test_opset16_export_has_layernorm_decomposed_and_symbolic_batch(tmp_path):
    model = _model(0)
    path = tmp_path / "m.onnx"
    target = load_target("trt8.6")  # --opset 16: for a runtime without LayerNormalization
    exporter = export_onnx(model, path, opset=16, **DIMS)
    assert exporter == "torchscript"
    check = check_onnx_file(path, target, opset=16, **DIMS)
    assert check.opset == 16
    assert "LayerNormalization" not in check.ops and {"ReduceMean", "Sqrt"} <= set(check.ops)
    proto = onnx.load(str(path))
    for vi in list(proto.graph.input) + list(proto.graph.output):
        dims = vi.type.tensor_type.shape.dim
        assert dims[0].dim_param == "batch" and not dims[0].HasField("dim_value")
    assert [d.dim_value for d in proto.graph.output[1].type.tensor_type.shape.dim[1:]] == [24, 13]
    # Asking for another opset than the file has is an error.
    with pytest.raises(ExportError, match="opset 16, but 17 was asked for"):
        check_onnx_file(path, target, opset=17, **DIMS)
    with pytest.raises(ExportError, match="example_batch must be >= 2"):
        export_onnx(model, tmp_path / "b1.onnx", opset=16, example_batch=1, **DIMS)


def test_parity_passes_for_the_exported_model_and_stops_a_wrong_graph(tmp_path):
    rng = np.random.default_rng(0)
    obs = (rng.random((5, 96, 13)) > 0.3).astype(np.float32)
    obs[1, 12:84] = 0.0  # a 72 h outage
    obs[2, :, 0] = 0.0  # a channel missing for the whole window
    values = rng.standard_normal((5, 96, 13)).astype(np.float32) * obs
    cal = rng.standard_normal((5, 120, 6)).astype(np.float32)
    model = _model(0)
    path = tmp_path / "m.onnx"
    export_onnx(model, path, opset=17, **DIMS)
    result = parity_check(model, path, values, obs, cal)
    assert result["max_abs_err"] <= 1e-4 and result["windows"] == 5
    with pytest.raises(ExportError, match="parity check failed.*stopping the export"):
        parity_check(_model(1), path, values, obs, cal)


def test_decompose_layernorm_matches_onnxruntime_layernorm(tmp_path):
    import onnxruntime as ort

    from gapcast.export.onnx_export import decompose_layernorm

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 8])
    rng = np.random.default_rng(0)
    scale = helper.make_tensor("s", TensorProto.FLOAT, [8], rng.standard_normal(8).astype(np.float32))
    bias = helper.make_tensor("b", TensorProto.FLOAT, [8], rng.standard_normal(8).astype(np.float32))
    node = helper.make_node("LayerNormalization", ["x", "s", "b"], ["y"], name="ln", axis=-1, epsilon=1e-5)
    graph = helper.make_graph([node], "g", [x], [y], initializer=[scale, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    data = {"x": rng.standard_normal((2, 5, 8)).astype(np.float32) * 3 + 1}
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, data)[0]
    assert decompose_layernorm(model) == 1
    assert graph_ops(model) == {"ReduceMean", "Sub", "Mul", "Add", "Sqrt", "Div"}
    onnx.checker.check_model(model, full_check=True)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, data)[0]
    np.testing.assert_allclose(got, ref, atol=1e-5)
