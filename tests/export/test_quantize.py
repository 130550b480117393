"""INT8: what stays float, the QDQ form TensorRT needs, the gate windows and the accuracy gate arithmetic."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from gapcast.edge.bundle import CARD_NAME
from gapcast.export.quantize import accuracy_gate, float_path_nodes, make_gate_windows

QUANT_CONSUMERS = {"MatMul", "Gemm", "Conv"}


def test_accuracy_gate_hand_computed():
    base = {"imputation_mae": 1.0, "forecast_mae": 2.0}
    ok, d = accuracy_gate(base, {"imputation_mae": 1.02, "forecast_mae": 2.05})
    assert ok and d["imputation_rel_delta"] == pytest.approx(0.02) and d["forecast_rel_delta"] == pytest.approx(0.025)
    ok, d = accuracy_gate(base, {"imputation_mae": 1.04, "forecast_mae": 2.0})
    assert not ok and d["imputation_rel_delta"] == pytest.approx(0.04)
    ok, _ = accuracy_gate(base, {"imputation_mae": 0.5, "forecast_mae": 1.0})  # better than fp32 passes
    assert ok
    ok, _ = accuracy_gate(base, {"imputation_mae": float("nan"), "forecast_mae": 2.0})
    assert not ok


def test_gate_windows_hide_only_observed_values_in_a_24h_block():
    rng = np.random.default_rng(1)
    obs = (rng.random((20, 120, 13)) > 0.2).astype(np.float32)
    values = rng.standard_normal((20, 120, 13)).astype(np.float32) * obs
    cal = np.zeros((20, 120, 6), dtype=np.float32)
    g = make_gate_windows(values, obs, cal, 96, seed=3)
    assert g.values.shape == (20, 96, 13) and g.future_observed.shape == (20, 24, 13)
    assert not np.any(g.hidden & (obs[:, :96] == 0))  # only observed values are hidden
    assert np.all(g.observed[g.hidden] == 0) and np.all(g.values[g.hidden] == 0)
    # each window has a 24-step run where every channel is unavailable to the model
    unavailable = (g.observed == 0).all(axis=2)
    for k in range(20):
        runs = np.convolve(unavailable[k].astype(int), np.ones(24, dtype=int), mode="valid")
        assert runs.max() == 24
    np.testing.assert_array_equal(g.truth, values)


def test_qdq_variant_is_symmetric_per_channel_and_only_feeds_weight_layers(tiny_bundle):
    card = json.loads((tiny_bundle / CARD_NAME).read_bytes())
    if "int8_qdq" not in card["variants"]:
        pytest.fail(f"the tiny bundle's QDQ variant was excluded: {card['excluded_variants'].get('int8_qdq')}")
    model = onnx.load(str(tiny_bundle / card["variants"]["int8_qdq"]["file"]))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for t in node.input:
            consumers.setdefault(t, []).append(node)
    per_channel = 0
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zp = inits.get(node.input[2]) if len(node.input) > 2 else None
            assert zp is not None and np.all(zp == 0) and zp.dtype == np.int8  # symmetric int8 for TensorRT
            if inits[node.input[1]].size > 1:
                per_channel += 1
        if node.op_type == "DequantizeLinear":
            users = {n.op_type for n in consumers.get(node.output[0], [])}
            assert users <= QUANT_CONSUMERS, f"{node.name} feeds {users}"
    assert per_channel >= 5  # weights carry one scale per output channel
    # LayerNorm, Softmax, Sigmoid and the raw-input (mask) path read float tensors only.
    dq_out = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    float_nodes = card["variants"]["int8_qdq"]["quantization"]["float_nodes"]
    assert "/value_emb/MatMul" in float_nodes and "/cal_emb/MatMul" in float_nodes
    for node in model.graph.node:
        if node.op_type in ("LayerNormalization", "Softmax", "Sigmoid") or node.name in float_nodes:
            assert not (set(node.input) & dq_out), node.name


def test_float_path_nodes_on_the_fp32_graph(tiny_bundle):
    reasons = float_path_nodes(onnx.load(str(tiny_bundle / "model.onnx")))
    assert reasons["/value_emb/MatMul"] == "reads the raw inputs (mask path)"
    assert reasons["/freq_emb/MatMul"].startswith("constant left operand")  # the DFT basis
    assert reasons["/encoder.0/attn/global_attn/MatMul"] == "activation x activation product"
    assert not any("q_proj" in name or "ffn" in name for name in reasons)


def test_gap_interpolator_has_nothing_to_quantize(tmp_path):
    """The interpolator selects exactly: it must never be quantized. Its linear-memory form (issue 13) has no MatMul
    left (CumSum, ScatterElements, GatherElements), so no quantizer can touch it; onnxruntime matches torch."""
    import dataclasses

    import torch

    from gapcast.export.onnx_export import export_onnx
    from gapcast.tools.tinybundle import tiny_config
    from gapcast.train.model import ConFill

    cfg = dataclasses.replace(tiny_config(), interp_source=True)
    torch.manual_seed(0)
    path = tmp_path / "interp.onnx"
    export_onnx(ConFill(cfg).eval(), path, lookback=cfg.lookback, horizon=cfg.horizon, n_channels=cfg.n_channels,
                n_calendar=cfg.n_calendar, opset=17)
    model = onnx.load(str(path))
    interp_ops = {n.op_type for n in model.graph.node if n.name.startswith("/interp/")}
    assert {"CumSum", "ScatterElements", "GatherElements"} <= interp_ops
    assert not interp_ops & {"MatMul", "Gemm", "Conv"}
    from gapcast.export.onnx_export import make_session, run_session

    g = torch.Generator().manual_seed(1)
    v = torch.randn(3, cfg.lookback, cfg.n_channels, generator=g)
    m = (torch.rand(3, cfg.lookback, cfg.n_channels, generator=g) > 0.4).float()
    c = torch.randn(3, cfg.lookback + cfg.horizon, cfg.n_calendar, generator=g)
    torch.manual_seed(0)  # the same weights as the exported model
    net = ConFill(cfg).eval()
    with torch.no_grad():
        imp, fc = net(v * m, m, c)
    o_imp, o_fc = run_session(make_session(path), (v * m).numpy(), m.numpy(), c.numpy())
    np.testing.assert_allclose(o_imp, imp.numpy(), atol=1e-4)


def test_cpu_variants_quantize_weight_layers_and_stay_close_to_fp32(tiny_bundle, tmp_path):
    from gapcast.edge.bundle import verify_bundle
    from gapcast.export.onnx_export import graph_ops, make_session, run_session
    from gapcast.export.quantize import (
        ArrayCalibrationReader,
        measure_throughput,
        quantize_cpu_dynamic,
        quantize_cpu_static,
    )

    fp32 = tmp_path / "model.onnx"
    fp32.write_bytes((tiny_bundle / "model.onnx").read_bytes())
    g = verify_bundle(tiny_bundle, require_signature=False).golden()
    dyn, stat_ = tmp_path / "dyn.onnx", tmp_path / "static.onnx"
    s_dyn = quantize_cpu_dynamic(fp32, dyn)
    s_stat = quantize_cpu_static(fp32, stat_, ArrayCalibrationReader(g["values"], g["observed"], g["calendar"]))
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= graph_ops(onnx.load(str(dyn)))
    assert {"QLinearMatMul", "QLinearConv"} <= graph_ops(onnx.load(str(stat_)))
    assert "/value_emb/MatMul" in s_dyn["float_nodes"] and "/value_emb/MatMul" in s_stat["float_nodes"]
    for path in (dyn, stat_):
        imp, fc = run_session(make_session(path), g["values"], g["observed"], g["calendar"])
        assert np.abs(fc - g["forecast"]).mean() < 0.1
        m = g["observed"] > 0  # observed values still pass through exactly
        np.testing.assert_allclose(imp[m], g["values"][m], atol=1e-6)
    speed = measure_throughput({"fp32": fp32, "dynamic": dyn}, g["values"], g["observed"], g["calendar"],
                               threads=1, min_time_s=0.0, max_rounds=2)  # fmt: skip
    assert set(speed) == {"fp32", "dynamic"} and all(v["runs"] == 1 and v["batch"] == 6 for v in speed.values())
