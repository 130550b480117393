"""A few training steps on real Beijing data: run folder, checkpoints, resume, determinism, config handling."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from gapcast.train import TrainError
from gapcast.train.checkpoint import load_checkpoint, read_checkpoint
from gapcast.train.config import TrainConfig, default_config_path, dump_toml, load_config
from gapcast.train.data import BEIJING_CHANNELS
from gapcast.train.trainer import train

TINY = default_config_path().parent / "tiny.toml"


@pytest.fixture(scope="module")
def two_stations(beijing):
    return {k: beijing[k] for k in ("Aotizhongxin", "Dingling")}


@pytest.fixture(autouse=True)
def one_thread():
    # The test machine is shared; one thread is faster and steadier than two contending ones.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny(**optim) -> TrainConfig:
    cfg = load_config(TINY)
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, **optim))


def test_tiny_run_writes_checkpoints_that_reload(two_stations, tmp_path):
    out = tmp_path / "run"
    res = train(_tiny(max_steps=4, steps_per_epoch=2), out_dir=out, series=two_stations, progress=False)
    assert res.steps == 4 and res.stop_reason == "max_steps"
    for name in ("best.pt", "last.pt", "config.toml", "normalization.json", "history.jsonl"):
        assert (out / name).is_file(), name
    hist = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in hist] == [2, 4]
    assert all(h["val_impute_mae"] > 0 and h["val_forecast_mae"] > 0 for h in hist)
    assert {"train_impute", "train_recon", "train_forecast", "train_contrast"} <= set(hist[0])

    model, meta = load_checkpoint(out / "best.pt")
    assert meta["cadence_s"] == 3600 and meta["utc_offset_s"] == 8 * 3600
    assert [c["name"] for c in meta["channels"]] == [c.name for c in BEIJING_CHANNELS]
    norm = json.loads((out / "normalization.json").read_text())
    assert norm["mean"] == meta["normalizer"]["mean"] and len(norm["std"]) == 13
    # PM2.5 training mean of these two stations is tens of ug/m3, TEMP mean a mild temperature.
    assert 40 < norm["mean"][0] < 120 and 5 < norm["mean"][6] < 20
    assert load_config(out / "config.toml") == _tiny(max_steps=4, steps_per_epoch=2)
    best_step = meta["step"]
    assert best_step in (2, 4) and meta["best_val"] == min(h["val_score"] for h in hist)

    L, H = model.cfg.lookback, model.cfg.horizon
    imp, fc = model(torch.zeros(3, L, 13), torch.zeros(3, L, 13), torch.zeros(3, L + H, 6))
    assert imp.shape == (3, L, 13) and fc.shape == (3, H, 13) and torch.isfinite(fc).all()

    # Resume continues from last.pt to the new step count.
    res2 = train(_tiny(max_steps=6, steps_per_epoch=2), out_dir=out, series=two_stations, resume=True,
                 progress=False)
    assert res2.steps == 6
    last = read_checkpoint(out / "last.pt")
    assert last["step"] == 6 and len(last["history"]) == 3


def test_same_seed_same_weights(two_stations, tmp_path):
    cfg = _tiny(max_steps=2, steps_per_epoch=2)
    for name in ("a", "b"):
        train(cfg, out_dir=tmp_path / name, series=two_stations, progress=False)
    sa = read_checkpoint(tmp_path / "a" / "last.pt")["state_dict"]
    sb = read_checkpoint(tmp_path / "b" / "last.pt")["state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    train(_tiny(max_steps=2, steps_per_epoch=2, seed=1), out_dir=tmp_path / "c", series=two_stations,
          progress=False)
    sc = read_checkpoint(tmp_path / "c" / "last.pt")["state_dict"]
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_init_from_starts_from_the_checkpoint_weights(two_stations, tmp_path):
    train(_tiny(max_steps=2, steps_per_epoch=2), out_dir=tmp_path / "base", series=two_stations, progress=False)
    base = read_checkpoint(tmp_path / "base" / "last.pt")
    # lr = 0: the fine-tuning step cannot move the weights, so they must be exactly the base run's.
    train(_tiny(max_steps=1, steps_per_epoch=1, lr=0.0, seed=5), out_dir=tmp_path / "ft", series=two_stations,
          init_from=tmp_path / "base" / "last.pt", progress=False)
    ft = read_checkpoint(tmp_path / "ft" / "last.pt")
    assert ft["step"] == 1 and ft["init_from"]["step"] == 2
    assert all(torch.equal(base["state_dict"][k], ft["state_dict"][k]) for k in base["state_dict"])
    assert all(torch.equal(base["proj_state_dict"][k], ft["proj_state_dict"][k]) for k in base["proj_state_dict"])
    # A fresh run with the same seed starts elsewhere (the test above would pass for no reason otherwise).
    train(_tiny(max_steps=1, steps_per_epoch=1, lr=0.0, seed=5), out_dir=tmp_path / "fresh", series=two_stations,
          progress=False)
    fresh = read_checkpoint(tmp_path / "fresh" / "last.pt")["state_dict"]
    assert not all(torch.equal(base["state_dict"][k], fresh[k]) for k in fresh)

    # Switching the interpolation source on is the one model change a fine-tune accepts (warm start).
    cfg = _tiny(max_steps=1, steps_per_epoch=1, lr=0.0)
    interp = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, interp_source=True))
    train(interp, out_dir=tmp_path / "interp", series=two_stations, init_from=tmp_path / "base" / "last.pt",
          progress=False)
    warm = read_checkpoint(tmp_path / "interp" / "last.pt")
    assert warm["config"]["interp_source"] is True
    mix = warm["state_dict"]["source_mix.weight"].reshape(13, 6, -1)  # [C, 4 widths + head + interpolation, d]
    assert torch.equal(mix[:, :5], base["state_dict"]["source_mix.weight"].reshape(13, 5, -1))
    assert torch.equal(mix[:, 5], mix[:, 0])
    assert all(torch.equal(base["state_dict"][k], warm["state_dict"][k]) for k in base["state_dict"]
               if not k.startswith("source_mix"))

    cfg = _tiny(max_steps=1)
    wider = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, d_model=32))
    with pytest.raises(TrainError, match="different model config"):
        train(wider, out_dir=tmp_path / "bad", series=two_stations, init_from=tmp_path / "base" / "best.pt",
              progress=False)


def test_fine_tune_config_fits_the_default_model():
    ft = load_config(default_config_path().parent / "beijing-ft.toml")
    # The default model plus the interpolation source: --init-from a default run warm-starts it.
    assert ft.model == dataclasses.replace(load_config().model, interp_source=True)
    assert ft.masking.block_prob < load_config().masking.block_prob and ft.loss.contrast == 0.0


def test_resume_without_checkpoint_fails(two_stations, tmp_path):
    with pytest.raises(TrainError, match="not found"):
        train(_tiny(max_steps=1), out_dir=tmp_path, series=two_stations, resume=True, progress=False)


def test_config_round_trip_and_errors(tmp_path):
    cfg = load_config()
    assert cfg.model.d_model == 64 and cfg.model.lookback == 96 and cfg.model.horizon == 24
    path = tmp_path / "c.toml"
    path.write_text(dump_toml(cfg.to_dict()))
    assert load_config(path) == cfg
    path.write_text("[model]\nd_model = 64\nbogus = 1\n")
    with pytest.raises(TrainError, match="bogus"):
        load_config(path)
    path.write_text("[loss]\nimpute = -1.0\n")
    with pytest.raises(TrainError, match="loss"):
        load_config(path)
    with pytest.raises(TrainError):
        load_config(tmp_path / "missing.toml")


def test_time_budget_runs_on_the_given_clock(two_stations, tmp_path):
    # A clock that jumps 40 s at every reading spends a 1-minute budget within the first two steps, however fast the
    # machine: the budget counts the clock it is given (bench accuracy --budget-clock cpu passes time.process_time).
    ticks = iter(range(0, 10**6, 40))
    res = train(_tiny(max_steps=500, steps_per_epoch=500), out_dir=tmp_path / "fake", series=two_stations,
                time_budget_min=1.0, clock=lambda: float(next(ticks)), progress=False)
    assert res.stop_reason == "time_budget"
    assert 1 <= res.steps <= 2
    last = [json.loads(x) for x in (tmp_path / "fake" / "history.jsonl").read_text().splitlines()][-1]
    assert last["step"] == res.steps and last["seconds"] >= 60.0


def test_epoch_seconds_and_resume_elapsed_count_the_validation(two_stations, tmp_path):
    # A clock that ticks 1 s at each reading. Without a budget the loop reads it once per step (the learning-rate
    # schedule) and twice at an epoch end, both after the validation: once for history "seconds", once for the
    # checkpoint's elapsed_s. Run 1 (t_start = 0): steps read 1, 2; epoch 1 reads 3 and 4; steps 5, 6; epoch 2 reads
    # 7 and 8. The resumed run starts a fresh clock at elapsed_before = 8: step reads 1, 2; epoch reads 3 and 4.
    def ticking():
        ticks = iter(range(10**6))
        return lambda: float(next(ticks))

    out = tmp_path / "run"
    train(_tiny(max_steps=4, steps_per_epoch=2), out_dir=out, series=two_stations, clock=ticking(), progress=False)
    hist = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    assert [h["seconds"] for h in hist] == [3.0, 7.0]
    assert read_checkpoint(out / "last.pt")["elapsed_s"] == 8.0
    train(_tiny(max_steps=6, steps_per_epoch=2), out_dir=out, series=two_stations, clock=ticking(), progress=False,
          resume=True)
    hist = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    assert [h["seconds"] for h in hist] == [3.0, 7.0, 11.0]
    assert read_checkpoint(out / "last.pt")["elapsed_s"] == 12.0
