"""The fleet release protocol (pure): rollout buckets, envelopes, chunk rules, verdicts on outputs and cards."""

from __future__ import annotations

import base64
import hashlib
import json

import numpy as np
import pytest
from support.fleet_fakes import make_bundle, new_key
from support.fleet_release import release

from gapcast.edge import UpdateRejected
from gapcast.edge.bundle import verify_bundle
from gapcast.edge.release import (
    ChunkFault,
    Manifest,
    Targets,
    check_chunk,
    check_compatible,
    check_outputs,
    chunk_length,
    compat_of,
    n_chunks,
    open_envelope,
    percent_bucket,
    split_artifact,
)


@pytest.fixture
def keys(tmp_path):
    return new_key(tmp_path / "keys", "release")


def test_percent_bucket_is_sha256_of_fleet_and_gateway_and_rings_are_nested():
    want = int.from_bytes(hashlib.sha256(b"city/gw-7").digest()[:8], "big") % 10_000
    assert percent_bucket("city", "gw-7") == want
    gws = [f"gw-{i}" for i in range(2000)]
    p10 = {g for g in gws if Targets(percent=10).applies_to("city", g)}
    p50 = {g for g in gws if Targets(percent=50).applies_to("city", g)}
    assert p10 <= p50  # raising the percent keeps the first ring in
    assert 0.08 < len(p10) / 2000 < 0.12 and 0.46 < len(p50) / 2000 < 0.54
    assert not Targets(percent=0).applies_to("city", "gw-7")
    assert Targets(canary=("gw-7",)).applies_to("city", "gw-7")
    assert not Targets(canary=("gw-8",)).applies_to("city", "gw-7")
    with pytest.raises(ValueError, match="target someone"):
        Targets()


def test_envelope_signature_checked_against_trusted_keys(tmp_path, keys):
    _, pub, key = keys
    _, other_pub, other = new_key(tmp_path / "other", "attacker")
    bundle_dir = make_bundle(tmp_path / "b1", key, version=1)
    env, _, m = release(bundle_dir, key, sequence=5)
    assert open_envelope(env, [pub]).sequence == 5
    assert open_envelope(env, [other_pub, pub]).card_sha256 == m.card_sha256
    with pytest.raises(UpdateRejected, match="does not verify under any of the 1 trusted"):
        open_envelope(env, [other_pub])
    forged = json.loads(env)
    body = json.loads(base64.b64decode(forged["manifest"]))
    body["targets"] = {"everyone": True, "canary": []}
    body["model"]["version"] = 99
    forged["manifest"] = base64.b64encode(json.dumps(body).encode()).decode()
    with pytest.raises(UpdateRejected, match="does not verify"):
        open_envelope(json.dumps(forged).encode(), [pub])
    with pytest.raises(UpdateRejected, match="malformed"):
        open_envelope(b"not json", [pub])


def test_check_outputs_hand_computed_bounds(tmp_path, keys):
    # mean 10, std 5, valid 0..100, slack 0.25 -> accepted physical range [-25, 125] -> normalised [-7, 23].
    card = verify_bundle(make_bundle(tmp_path / "b", keys[2]), [keys[1]]).card
    imputed = np.zeros((1, 8, 3), np.float32)
    forecast = np.full((1, 4, 3), 23.0, np.float32)
    assert check_outputs(card, imputed, forecast) is None
    forecast[0, 2, 1] = 23.2  # 126 u
    assert check_outputs(card, imputed, forecast) == (
        "forecast has 1 value(s) outside the valid range, e.g. TEMP = 126 u"
    )
    forecast[0, 2, 1] = np.nan
    assert check_outputs(card, imputed, forecast) == "forecast holds 1 non-finite value(s)"
    assert "shape" in check_outputs(card, imputed[:, :4], forecast)


def test_compatibility_names_what_differs(tmp_path, keys):
    a = verify_bundle(make_bundle(tmp_path / "a", keys[2]), [keys[1]]).card
    b = verify_bundle(make_bundle(tmp_path / "b", keys[2], lookback=6, cadence_s=600), [keys[1]]).card
    assert check_compatible(compat_of(a), a) == []
    assert check_compatible(compat_of(b), a) == ["cadence_s 600 != running 3600", "lookback 6 != running 8"]


def test_chunk_rules_hand_computed(tmp_path, keys):
    # 2,500 bytes in chunks of 1,000: 3 chunks of 1,000 / 1,000 / 500 bytes.
    data = bytes(range(250)) * 10
    assert n_chunks(2500, 1000) == 3 and n_chunks(3000, 1000) == 3 and n_chunks(1, 1000) == 1
    parts = split_artifact(data, 1000)
    assert [len(p) for p in parts] == [1000, 1000, 500] and b"".join(parts) == data
    with pytest.raises(ValueError, match="chunk_bytes must be within"):
        split_artifact(data, 0)
    _, chunks, m = release(make_bundle(tmp_path / "b", keys[2]), keys[2], sequence=1, chunk_bytes=500)
    assert [chunk_length(m, i) for i in range(len(chunks))] == [len(c) for _, c in chunks]
    assert chunk_length(m, len(chunks) - 1) == m.artifact_bytes - 500 * (len(chunks) - 1)
    check_chunk(m, 0, chunks[0][1])  # a good chunk passes
    with pytest.raises(ChunkFault, match="chunk 1 has sha256") as bad:
        check_chunk(m, 1, chunks[1][1][::-1])
    assert bad.value.index == 1 and isinstance(bad.value, UpdateRejected)
    with pytest.raises(ChunkFault, match="chunk 0 has 499 bytes, the manifest says 500"):
        check_chunk(m, 0, chunks[0][1][:-1])
    with pytest.raises(UpdateRejected, match="outside") as outside:
        check_chunk(m, len(chunks), b"x")
    assert not isinstance(outside.value, ChunkFault)  # not a chunk of this artifact at all


def test_manifest_validation_names_the_field(tmp_path, keys):
    _, _, m = release(make_bundle(tmp_path / "b", keys[2]), keys[2], sequence=3)
    d = json.loads(json.dumps(m.raw))
    assert Manifest.from_dict(d).sequence == 3
    d["artifact"]["chunks"] = d["artifact"]["chunks"][:-1]
    with pytest.raises(UpdateRejected, match=r"manifest lists \d+ chunks for \d+ bytes"):
        Manifest.from_dict(d)
    with pytest.raises(UpdateRejected, match="malformed: KeyError: 'fleet'"):
        Manifest.from_dict({k: v for k, v in m.raw.items() if k != "fleet"})
