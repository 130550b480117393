"""Export of a ConFill with neighbour context (issue 20): context as columns C..C+G-1 of values/observed, every
parity check of the pipeline (onnxruntime fp32, INT8 QDQ gate, golden), the card's context entry, onnxruntime and
(faked) TensorRT backends sized from the card."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gapcast.calendar import CALENDAR_FEATURES
from gapcast.edge.bundle import verify_bundle
from gapcast.export.context import ContextInputs
from gapcast.export.pipeline import ModelSpec, WindowData, export_bundle
from gapcast.neighbours import ContextSpec
from gapcast.tools.tinybundle import tiny_options
from gapcast.train.model import ConFill, ConFillConfig

C, G, L, H = 3, 2, 24, 6


def _model():
    torch.manual_seed(0)
    cfg = ConFillConfig(n_channels=C, lookback=L, horizon=H, d_model=16, n_heads=2, d_ff=32, n_freq=4,
                        local_window=7, conv_kernels=(3,), smoother_widths=(3, 9), dropout=0.0,
                        context="neighbours", n_context=G, context_index=(0, 2))
    return ConFill(cfg).eval()


def _windows(rng, n):
    o = (rng.random((n, L + H, C + G)) > 0.2).astype(np.float32)
    o[:, L:, C:] = 0.0  # no future context
    o[: n // 4, :, C:] = 0.0  # some windows without any neighbour
    v = (rng.standard_normal((n, L + H, C + G)) * o).astype(np.float32)
    cal = rng.standard_normal((n, L + H, 6)).astype(np.float32)
    return v, o, cal


def _spec():
    cs = ContextSpec(stations=("s1", "s2"), channels=("a", "c"), channel_index=(0, 2),
                     weights=np.array([[[0, 0], [1, 1]], [[1, 1], [0, 0]]], float), method="correlation", k=1)
    chans = [{"name": n, "unit": "u", "valid_min": -1e3, "valid_max": 1e3, "mean": 0.0, "std": 1.0} for n in "abc"]
    return ModelSpec(lookback=L, horizon=H, n_calendar=6, cadence_s=3600, utc_offset_s=0, channels=chans,
                     calendar_features=CALENDAR_FEATURES, config={}, context=cs.to_dict())


def test_wrapper_equals_the_model_with_context_arguments():
    model = _model()
    rng = np.random.default_rng(0)
    v, o, cal = (torch.from_numpy(a) for a in _windows(rng, 4))
    with torch.no_grad():
        imp, fc = ContextInputs(model)(v[:, :L], o[:, :L], cal)
        ref_i, ref_f = model(v[:, :L, :C], o[:, :L, :C], cal, v[:, :L, C:], o[:, :L, C:])
    torch.testing.assert_close(imp[..., :C], ref_i)
    torch.testing.assert_close(fc[..., :C], ref_f)
    torch.testing.assert_close(imp[..., C:], v[:, :L, C:] * o[:, :L, C:])  # context passed through
    assert float(fc[..., C:].abs().max()) == 0.0


@pytest.mark.slow
def test_context_bundle_passes_every_parity_check_and_runs_on_each_backend(tmp_path, monkeypatch):
    from support.fake_trt import FakeTensorRT

    from gapcast.edge import trt as T
    from gapcast.edge.backends import select_backend

    rng = np.random.default_rng(1)
    data = WindowData(train=_windows(rng, 32), val=_windows(rng, 48), source="synthetic (test)")
    res = export_bundle(_model(), _spec(), data, tmp_path / "b", tiny_options(gate_windows=32, parity_windows=8))
    card = res.card
    assert card["parity"]["max_abs_err"] <= 1e-4
    assert [i["shape"] for i in card["inputs"][:2]] == [["batch", L, C + G]] * 2
    assert card["context"]["columns"] == [3, 4] and card["context"]["channels"] == ["a", "c"]
    bundle = verify_bundle(tmp_path / "b", require_signature=False)
    assert bundle.card.n_inputs == C + G and len(bundle.card.channels) == C
    assert bundle.card.context.neighbours_of("s1") == {"a": ["s2"], "c": ["s2"]}
    assert "int8_qdq" in card["variants"] or "int8_qdq" in card["excluded_variants"]
    g = bundle.golden()
    ort = select_backend(bundle, prefer="onnxruntime", variant="fp32")
    imp, fc = ort.run(g["values"], g["observed"], g["calendar"])
    np.testing.assert_allclose(imp, g["imputed"], atol=1e-5)
    np.testing.assert_allclose(fc, g["forecast"], atol=1e-5)
    FakeTensorRT({"fp32": 0.0, "fp16": 0.0, "int8": 0.0}).install(monkeypatch)
    built = T.build_and_check(bundle, "fp32", max_batch=8, cache_dir=tmp_path / "engines")
    assert built.precision == "fp32"
    trt = select_backend(bundle, engine_cache_dir=tmp_path / "engines")
    assert trt.name == "tensorrt"
    ti, tf = trt.run(g["values"], g["observed"], g["calendar"])
    assert ti.shape == (len(g["values"]), L, C + G) and tf.shape == (len(g["values"]), H, C + G)


def test_a_temporal_only_card_keeps_its_width():
    from gapcast.edge.bundle import Card

    d = {"schema_version": 1, "model": {"name": "confill", "version": 1}, "created": "2026-11-29T00:00:00Z",
         "channels": [{"name": n, "unit": "u", "valid_min": 0, "valid_max": 1, "mean": 0, "std": 1} for n in "ab"],
         "cadence_s": 3600, "lookback": 4, "horizon": 2, "calendar": {"features": []},
         "inputs": [], "outputs": [], "files": {"m": {"sha256": "0" * 64, "bytes": 1}},
         "variants": {"fp32": {"file": "m"}}}
    card = Card.from_dict(d)
    assert card.n_inputs == 2 and card.context is None  # old cards: no inputs listed, no context
    d["inputs"] = [{"name": "values", "shape": ["batch", 4, 2], "dtype": "float32"}]
    assert Card.from_dict(d).n_inputs == 2
