"""The real-data loaders against figures counted from the real files in ../shared/data."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from gapcast.train import DataError
from gapcast.train.data import (
    BEIJING_CHANNELS,
    Normalizer,
    fetch_beijing,
    fit_beijing_normalizer,
    load_beijing,
    load_ett,
    make_windows,
    resolve_data_dir,
    time_split,
)


def _longest_run(mask: np.ndarray) -> int:
    best = cur = 0
    for x in mask:
        cur = cur + 1 if x else 0
        best = max(best, cur)
    return best


def test_beijing_row_counts(beijing):
    assert len(beijing) == 10
    assert sum(len(s.epoch_s) for s in beijing.values()) == 350_640
    assert {len(s.epoch_s) for s in beijing.values()} == {35_064}
    assert all(s.duplicates == 0 and s.filled_rows == 0 for s in beijing.values())


def test_beijing_missing_counts(beijing):
    pm25 = [c.name for c in BEIJING_CHANNELS].index("PM2.5")
    co = [c.name for c in BEIJING_CHANNELS].index("CO")
    assert sum(int((~s.observed[:, pm25]).sum()) for s in beijing.values()) == 7_036
    assert int((~beijing["Aotizhongxin"].observed[:, pm25]).sum()) == 925
    assert sum(int((~s.observed[:, co]).sum()) for s in beijing.values()) == 16_082
    assert _longest_run(~beijing["Aotizhongxin"].observed[:, pm25]) == 343


def test_beijing_time_is_utc(beijing):
    a = beijing["Aotizhongxin"]
    assert str(a.timestamps[0]) == "2013-02-28T16:00:00"  # 2013-03-01 00:00 China Standard Time
    assert np.all(np.diff(a.epoch_s) == 3600)
    # First CSV row: PM2.5 4, TEMP -0.7, wind NNW (337.5 deg).
    assert a.values[0, 0] == 4.0
    assert a.values[0, 6] == pytest.approx(-0.7)
    assert a.values[0, 11] == pytest.approx(np.sin(np.deg2rad(337.5)), abs=1e-6)
    assert a.values[0, 12] == pytest.approx(np.cos(np.deg2rad(337.5)), abs=1e-6)


def test_split_months_do_not_overlap(beijing):
    a = beijing["Aotizhongxin"]
    sp = time_split(a.epoch_s)
    assert sp.train.stop == sp.val.start and sp.val.stop == sp.test.start and sp.test.stop == 35_064
    # 28 months: 2013-03..2015-06 local; validation starts 2015-07-01 00:00 CST = 2015-06-30T16:00Z.
    assert str(a.timestamps[sp.val.start]) == "2015-06-30T16:00:00"
    assert str(a.timestamps[sp.test.start]) == "2016-04-30T16:00:00"
    assert sp.train.stop == 20_448  # 852 days
    assert sp.test.stop - sp.test.start == 7_296  # 304 days, May 2016 .. Feb 2017


def test_normalisation_uses_training_months_only(beijing):
    base = fit_beijing_normalizer(beijing)
    changed = {k: v for k, v in beijing.items()}
    a = beijing["Aotizhongxin"]
    sp = time_split(a.epoch_s)
    test_changed = a.values.copy()
    test_changed[sp.test] += 100.0
    changed["Aotizhongxin"] = type(a)(a.station, a.epoch_s, test_changed, a.observed, a.channels)
    same = fit_beijing_normalizer(changed)
    np.testing.assert_array_equal(base.mean, same.mean)
    np.testing.assert_array_equal(base.std, same.std)
    train_changed = a.values.copy()
    train_changed[sp.train] += 100.0
    changed["Aotizhongxin"] = type(a)(a.station, a.epoch_s, train_changed, a.observed, a.channels)
    moved = fit_beijing_normalizer(changed)
    assert moved.mean[0] > base.mean[0] + 9.0  # one station of ten moved by 100 -> mean moves by ~10


def test_normalizer_round_trip():
    n = Normalizer.fit([np.array([[1.0, np.nan], [3.0, 5.0]], dtype=np.float32)])
    np.testing.assert_allclose(n.mean, [2.0, 5.0])
    np.testing.assert_allclose(n.std, [1.0, 1.0])  # the constant channel gets std 1, not 0
    x = np.array([[5.0, 7.0]], dtype=np.float32)
    np.testing.assert_allclose(n.transform(x), [[3.0, 2.0]])
    np.testing.assert_allclose(n.inverse(n.transform(x)), x)
    assert Normalizer.from_dict(n.to_dict()).mean.tolist() == n.mean.tolist()


def test_windows_and_calendar(beijing):
    a = beijing["Aotizhongxin"]
    norm = fit_beijing_normalizer(beijing)
    v = norm.transform(a.values)
    ws = make_windows([v], [a.epoch_s], lookback=96, horizon=24, stride=24, utc_offset_s=8 * 3600)
    assert len(ws) == (35_064 - 120) // 24 + 1
    vals, obs, cal = ws.get(0)
    assert vals.shape == (120, 13) and obs.shape == (120, 13) and cal.shape == (120, 6)
    assert np.all(vals[obs == 0] == 0.0)
    # Step 0 is 00:00 local on Friday 2013-03-01: hour sin 0 / cos 1, Friday = 4.
    np.testing.assert_allclose(cal[0, :2], [0.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(cal[0, 2:4], [np.sin(2 * np.pi * 4 / 7), np.cos(2 * np.pi * 4 / 7)], atol=1e-6)
    np.testing.assert_allclose(cal[6, :2], [1.0, 0.0], atol=1e-6)  # 06:00 local
    strict = make_windows([v], [a.epoch_s], lookback=96, horizon=24, stride=24, min_observed=0.999)
    assert 0 < len(strict) < len(ws)


def test_ett_standard_split(data_root):
    e = load_ett("ETTh1", data_root)
    assert e.values.shape == (17_420, 7)
    assert e.columns[-1] == "OT"
    assert (e.train.start, e.train.stop) == (0, 8_640)
    assert (e.val.start, e.val.stop) == (8_640 - 96, 11_520)
    assert (e.test.start, e.test.stop) == (11_520 - 96, 14_400)
    np.testing.assert_allclose(e.normalizer.transform(e.values[e.train]).mean(axis=0), 0.0, atol=1e-4)


def test_data_location_precedence(tmp_path, monkeypatch, data_root):
    monkeypatch.setenv("GAPCAST_DATA", str(data_root))
    assert resolve_data_dir(None) == data_root
    flagged = tmp_path / "root"
    (flagged / "beijing-multisite").mkdir(parents=True)
    (flagged / "beijing-multisite" / "x.csv").write_text("")
    assert resolve_data_dir(flagged) == flagged  # the flag wins over the environment
    monkeypatch.setenv("GAPCAST_DATA", str(tmp_path / "nowhere"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(DataError, match="gapcast data fetch beijing"):
        resolve_data_dir(None)


def test_checksum_mismatch_is_refused(tmp_path, data_root):
    folder = tmp_path / "beijing-multisite"
    folder.mkdir()
    src = data_root / "beijing-multisite" / "PRSA_Data_Aotizhongxin_20130301-20170228.csv"
    lines = src.read_text().splitlines(keepends=True)
    (folder / src.name).write_text("".join(lines[:200]))
    (tmp_path / "SHA256SUMS").write_text((data_root / "SHA256SUMS").read_text())
    with pytest.raises(DataError, match="does not match"):
        load_beijing(tmp_path)
    got = load_beijing(tmp_path, verify=False)["Aotizhongxin"]
    assert len(got.epoch_s) == 199


def test_duplicates_and_gaps_are_counted_not_shifted(tmp_path, data_root):
    folder = tmp_path / "beijing-multisite"
    folder.mkdir()
    src = data_root / "beijing-multisite" / "PRSA_Data_Aotizhongxin_20130301-20170228.csv"
    lines = src.read_text().splitlines(keepends=True)
    # header, rows 0..9, row 5 again (duplicate), rows 12..19 (rows 10, 11 absent)
    body = lines[1:11] + [lines[6]] + lines[13:21]
    (folder / src.name).write_text(lines[0] + "".join(body))
    s = load_beijing(tmp_path)["Aotizhongxin"]
    assert s.duplicates == 1 and s.filled_rows == 2
    assert len(s.epoch_s) == 20
    assert np.all(~s.observed[10:12])
    full = load_beijing(data_root, ["Aotizhongxin"])["Aotizhongxin"]
    np.testing.assert_array_equal(s.values[12:20], full.values[12:20])  # nothing shifted


def test_fetch_from_local_zip(tmp_path, data_root):
    src = data_root / "beijing-multisite" / "PRSA_Data_Aotizhongxin_20130301-20170228.csv"
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as z:
        z.writestr(f"PRSA_Data_20130301-20170228/{src.name}", src.read_bytes())
    outer = tmp_path / "uci.zip"
    with zipfile.ZipFile(outer, "w") as z:  # the UCI layout: a zip inside the zip
        z.writestr("PRSA2017_Data_20130301-20170228.zip", inner.getvalue())
    import hashlib

    digest = hashlib.sha256(outer.read_bytes()).hexdigest()
    out = fetch_beijing(tmp_path / "cache", zip_path=outer, sha256=digest)
    assert (out / src.name).read_bytes() == src.read_bytes()
    with pytest.raises(DataError, match="checksum mismatch"):
        fetch_beijing(tmp_path / "cache2", zip_path=outer, sha256="0" * 64)


def test_fetch_with_a_missing_zip_is_a_clean_error(tmp_path, capsys):
    from gapcast.cli import main

    missing = tmp_path / "nope.zip"
    with pytest.raises(DataError, match=r"^zip not found: .*nope\.zip$"):
        fetch_beijing(tmp_path / "cache", zip_path=missing)
    assert main(["data", "fetch", "beijing", "--zip", str(missing), "--dest", str(tmp_path / "cache")]) == 1
    assert capsys.readouterr().err.strip() == f"gapcast: error: zip not found: {missing}"
    assert not (tmp_path / "cache" / "beijing-multisite").exists()
