"""The signed bundle: keys, card contents, round trip, and every way tampering must fail verification."""

from __future__ import annotations

import json
import shutil
import stat
import tarfile

import numpy as np
import pytest

from gapcast.calendar import CALENDAR_FEATURES
from gapcast.edge import BundleError
from gapcast.edge.bundle import CARD_NAME, SIG_NAME, load_public_key, sha256_file, verify_bundle
from gapcast.export import ExportError
from gapcast.export.card import card_bytes, sign_bundle, write_card
from gapcast.export.keys import generate_keypair


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dst)
    return dst


def test_keys_generate_pem_pair_private_0600_and_no_silent_overwrite(tmp_path):
    kp = generate_keypair(tmp_path / "k")
    assert stat.S_IMODE(kp.private.stat().st_mode) == 0o600
    assert kp.private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    pub = load_public_key(kp.public)
    assert load_public_key(kp.public_hex).public_bytes_raw() == pub.public_bytes_raw()
    assert len(kp.public_hex) == 64
    with pytest.raises(ExportError, match="refusing to overwrite"):
        generate_keypair(tmp_path / "k")
    kp2 = generate_keypair(tmp_path / "k", overwrite=True)
    assert kp2.public_hex != kp.public_hex


def test_bundle_round_trips_and_card_states_the_contract(tiny_bundle, signing_key):
    b = verify_bundle(tiny_bundle, [signing_key.public])
    card = b.card
    raw = json.loads((tiny_bundle / CARD_NAME).read_bytes())
    # Every file in the folder but the card and signature is pinned, with the right hash.
    on_disk = sorted(p.name for p in tiny_bundle.iterdir() if p.name not in (CARD_NAME, SIG_NAME))
    assert sorted(card.files) == on_disk
    for name, meta in card.files.items():
        assert meta["sha256"] == sha256_file(tiny_bundle / name)
        assert meta["bytes"] == (tiny_bundle / name).stat().st_size
    assert card.schema_version == 1 and card.model_name == "confill" and card.model_version == 1
    assert card.created.endswith("Z")
    assert card.channel_names[:2] == ("PM2.5", "PM10") and len(card.channels) == 13
    assert card.channels[0].unit == "ug/m3" and all(c.std > 0 for c in card.channels)
    assert (card.lookback, card.horizon, card.cadence_s) == (96, 24, 3600)
    assert card.calendar == {"features": list(CALENDAR_FEATURES), "utc_offset_s": 8 * 3600, "timezone": "+08:00"}
    assert card.inputs[0] == {"name": "values", "shape": ["batch", 96, 13], "dtype": "float32"}
    assert card.outputs[1]["shape"] == ["batch", 24, 13]
    assert raw["opset"] == 17 and raw["target"]["name"] == "trt10"
    assert raw["parity"]["max_abs_err"] <= 1e-4 and raw["parity"]["includes"]["outage_72h_windows"] >= 1
    assert raw["signature"]["public_key_hex"] == signing_key.public_hex
    assert "DFT" not in raw["operators"] and "MatMul" in raw["operators"]
    # Every INT8 variant is either in the bundle with its gate figures or left out with a reason.
    for name in ("int8_qdq", "int8_cpu"):
        assert (name in card.variants) != (name in raw["excluded_variants"])
        if name in raw["excluded_variants"]:
            assert len(raw["excluded_variants"][name]) > 20
        else:
            assert raw["int8_delta"][name]["imputation_rel_delta"] <= 0.03
    golden = b.golden()
    assert golden["values"].shape == (6, 96, 13) and golden["calendar"].shape == (6, 120, 6)
    assert golden["forecast"].shape == (6, 24, 13)
    # The 72 h outage and the missing-channel windows are among the golden windows.
    assert raw["golden"]["kinds"][-2:] == ["outage_72h", "missing_channel"]
    assert golden["observed"][-2, 12:84].sum() == 0
    assert golden["observed"][-1, :, 0].sum() == 0
    # Observed values pass through the imputed output unchanged.
    m = golden["observed"] > 0
    np.testing.assert_allclose(golden["imputed"][m], golden["values"][m], atol=1e-6)


def test_tar_of_a_bundle_verifies(tiny_bundle, signing_key, tmp_path):
    tar = tmp_path / "bundle.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(tiny_bundle, arcname="bundle")
    assert verify_bundle(tar, [signing_key.public]).card.model_version == 1


@pytest.mark.parametrize("name", ["model.onnx", "golden.npz", CARD_NAME, SIG_NAME, "model.int8.qdq.onnx"])
def test_one_flipped_byte_in_any_file_fails(bundle_copy, signing_key, name):
    path = bundle_copy / name
    if not path.exists():
        pytest.fail(f"{name} is expected in the tiny bundle")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    if name in (CARD_NAME, SIG_NAME):
        with pytest.raises(BundleError, match="does not verify card.json"):
            verify_bundle(bundle_copy, [signing_key.public])
    else:
        with pytest.raises(BundleError, match=rf"bundle file {name} has sha256"):
            verify_bundle(bundle_copy, [signing_key.public])


def test_changed_card_field_fails(bundle_copy, signing_key):
    raw = json.loads((bundle_copy / CARD_NAME).read_bytes())
    raw["model"]["version"] = 2
    (bundle_copy / CARD_NAME).write_bytes(card_bytes(raw))
    with pytest.raises(BundleError, match="does not verify card.json under any of the 1 trusted key"):
        verify_bundle(bundle_copy, [signing_key.public])


def test_wrong_key_fails_and_resigning_needs_the_new_key(bundle_copy, signing_key, tmp_path):
    other = generate_keypair(tmp_path / "other")
    with pytest.raises(BundleError, match="does not verify"):
        verify_bundle(bundle_copy, [other.public])
    # Either trusted key is enough.
    assert verify_bundle(bundle_copy, [other.public, signing_key.public_hex]).card.model_version == 1
    sign_bundle(bundle_copy, other.private)
    assert verify_bundle(bundle_copy, [other.public]).card.model_version == 1
    with pytest.raises(BundleError, match="does not verify"):
        verify_bundle(bundle_copy, [signing_key.public])


def test_unsigned_and_extra_or_missing_files(bundle_copy, signing_key):
    (bundle_copy / SIG_NAME).unlink()
    with pytest.raises(BundleError, match="unsigned bundles are refused"):
        verify_bundle(bundle_copy, [signing_key.public])
    assert verify_bundle(bundle_copy, require_signature=False).card.lookback == 96
    with pytest.raises(BundleError, match="no trusted public key"):
        verify_bundle(bundle_copy, [])
    (bundle_copy / "golden.npz").unlink()
    with pytest.raises(BundleError, match="golden.npz is missing"):
        verify_bundle(bundle_copy, require_signature=False)


def test_write_card_enforces_the_contract_and_drops_a_stale_signature(bundle_copy):
    raw = json.loads((bundle_copy / CARD_NAME).read_bytes())
    bad = {k: v for k, v in raw.items() if k != "files"}
    bad["variants"] = {k: v for k, v in raw["variants"].items() if k != "fp32"}
    with pytest.raises(ExportError, match="fp32 variant is required"):
        write_card(bundle_copy, bad)
    good = {k: v for k, v in raw.items() if k != "files"}
    good["model"] = {**raw["model"], "version": 7}
    card = write_card(bundle_copy, good)
    assert card.model_version == 7
    assert not (bundle_copy / SIG_NAME).exists()
    (bundle_copy / "sub").mkdir()
    with pytest.raises(ExportError, match="bundles are flat"):
        write_card(bundle_copy, good)


def test_card_bytes_are_canonical_and_nan_free():
    a = card_bytes({"b": 1, "a": float("nan"), "c": [float("inf"), 1.5]})
    assert a == b'{\n  "a": null,\n  "b": 1,\n  "c": [\n    null,\n    1.5\n  ]\n}\n'
