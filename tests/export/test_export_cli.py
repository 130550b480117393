"""``gapcast export RUN_DIR`` end to end on a tiny checkpoint (target trt8.6 at opset 16, unsigned then signed)."""

from __future__ import annotations

import json

import pytest
import torch

from gapcast.cli import main
from gapcast.edge import BundleError
from gapcast.edge.bundle import CARD_NAME, SIG_NAME, verify_bundle
from gapcast.export.card import sign_bundle
from gapcast.tools.tinybundle import tiny_config, tiny_station
from gapcast.train.checkpoint import build_meta, save_checkpoint
from gapcast.train.data import BEIJING_CHANNELS, BEIJING_UTC_OFFSET_S, Normalizer, load_beijing, time_split
from gapcast.train.model import ConFill


@pytest.fixture
def run_dir(tmp_path, data_root):
    run = tmp_path / "run"
    run.mkdir()
    cfg = tiny_config()
    torch.manual_seed(3)
    model = ConFill(cfg).eval()
    channels = [
        {"name": c.name, "unit": c.unit, "valid_min": c.valid_min, "valid_max": c.valid_max} for c in BEIJING_CHANNELS
    ]
    station = tiny_station(data_root=data_root)
    series = load_beijing(data_root, [station])[station]
    norm = Normalizer.fit([series.values[time_split(series.epoch_s).train]]).to_dict()
    meta = build_meta(cfg, normalizer=norm, channels=channels, cadence_s=3600, utc_offset_s=BEIJING_UTC_OFFSET_S)
    save_checkpoint(run / "best.pt", model, meta, step=42)
    (run / "normalization.json").write_text(json.dumps(norm))
    (run / "config.toml").write_text(f'[data]\nstations = ["{station}"]\n')
    (run / "metrics.json").write_text(json.dumps({"imputation": {"block_72h": {"mae": 31.5}}}))
    return run


def test_export_cli_unsigned_warns_then_signs(run_dir, tmp_path, data_root, signing_key, capsys):
    out = tmp_path / "bundle"
    argv = [
        "export", str(run_dir), "--out", str(out), "--target", "trt8.6", "--opset", "16", "--version", "3",
        "--calib-windows", "8", "--parity-windows", "8", "--gate-windows", "32", "--cpu-variant", "none", "--data", str(data_root),
    ]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "UNSIGNED" in err
    assert not (out / SIG_NAME).exists()
    with pytest.raises(BundleError, match="unsigned bundles are refused"):
        verify_bundle(out, [signing_key.public])
    b = verify_bundle(out, require_signature=False)
    raw = b.card.raw
    assert b.card.model_version == 3 and raw["opset"] == 16 and raw["target"]["name"] == "trt8.6"
    assert "LayerNormalization" not in raw["operators"]
    assert raw["evaluation"] == {"imputation": {"block_72h": {"mae": 31.5}}}
    assert raw["export"]["run"]["step"] == 42
    # The card carries the checkpoint's normaliser (PM2.5 mean at Aotizhongxin's training months: ~80 ug/m3).
    norm = json.loads((run_dir / "normalization.json").read_text())
    assert [c.mean for c in b.card.channels] == pytest.approx(norm["mean"])
    assert [c.std for c in b.card.channels] == pytest.approx(norm["std"])
    assert 50 < b.card.channels[0].mean < 110 and b.card.channels[7].unit == "hPa"
    assert raw["excluded_variants"]["int8_cpu"].startswith("not built")
    assert raw["signature"]["signed"] is False
    # Refuses to overwrite, then signs in place and verifies.
    assert main(argv) == 1
    assert "not empty" in capsys.readouterr().err
    sign_bundle(out, signing_key.private)
    assert verify_bundle(out, [signing_key.public]).card.model_version == 3
    assert json.loads((out / CARD_NAME).read_bytes())["parity"]["max_abs_err"] <= 1e-4


def test_keys_cli(tmp_path, capsys):
    assert main(["keys", "generate", "--out", str(tmp_path / "k")]) == 0
    out = capsys.readouterr().out
    assert "public key (hex):" in out and (tmp_path / "k" / "gapcast-signing.pub").is_file()
    assert main(["keys", "generate", "--out", str(tmp_path / "k")]) == 1


def test_export_of_a_missing_run_folder_says_so_first(tmp_path, capsys):
    missing = tmp_path / "norun"
    assert main(["export", str(missing), "--out", str(tmp_path / "bundle")]) == 1
    err = capsys.readouterr().err
    # One line, no unsigned-bundle warning before it: nothing was going to be exported.
    assert err == f"gapcast: error: run folder {missing} does not exist (train one with `gapcast train --out {missing}`)\n"
    assert not (tmp_path / "bundle").exists()
