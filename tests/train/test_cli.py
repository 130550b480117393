"""``gapcast train`` / ``gapcast evaluate`` argument handling: run-folder protection, help text, argument types.

No training here (tests/train/test_trainer.py trains): these check what happens before any data is read.
"""

from __future__ import annotations

import pytest

from gapcast.cli import main
from gapcast.train import TrainError
from gapcast.train.cli import RUN_FILES, prepare_run_dir


def _old_run(run, *extra):
    run.mkdir(parents=True)
    for name in (*RUN_FILES, "config.toml", "normalization.json", "plot_block72_PM2.5.png", *extra):
        (run / name).write_bytes(name.encode())
    return run


def test_train_refuses_a_folder_that_holds_a_run(tmp_path, capsys):
    run = _old_run(tmp_path / "run")
    msg = f"{run} already holds a run (best.pt/last.pt): pass --resume to continue it or --overwrite to start over"
    with pytest.raises(TrainError) as exc:
        prepare_run_dir(run, resume=False, overwrite=False)
    assert str(exc.value) == msg
    assert main(["train", "--out", str(run), "--max-steps", "1"]) == 1
    assert capsys.readouterr().err.strip() == f"gapcast: error: {msg}"
    assert (run / "best.pt").read_bytes() == b"best.pt" and (run / "history.jsonl").read_bytes() == b"history.jsonl"
    # last.pt alone counts too.
    (run / "best.pt").unlink()
    with pytest.raises(TrainError, match="already holds a run"):
        prepare_run_dir(run, resume=False, overwrite=False)


def test_new_folder_and_resume_are_left_alone(tmp_path):
    assert prepare_run_dir(tmp_path / "new", resume=False, overwrite=False) == []
    assert not (tmp_path / "new").exists()  # train() creates it
    run = _old_run(tmp_path / "run")
    assert prepare_run_dir(run, resume=True, overwrite=False) == []
    assert sorted(p.name for p in run.iterdir()) == sorted(
        [*RUN_FILES, "config.toml", "normalization.json", "plot_block72_PM2.5.png"]
    )
    (tmp_path / "file").write_text("x")
    with pytest.raises(TrainError, match="is a file, not a run folder"):
        prepare_run_dir(tmp_path / "file", resume=False, overwrite=False)


def test_overwrite_clears_the_old_run_only(tmp_path, capsys):
    run = _old_run(tmp_path / "run", "notes.txt")
    # Fine-tuning from this run's own best.pt while clearing it would delete the weights before they are read.
    with pytest.raises(TrainError, match="which --overwrite clears"):
        prepare_run_dir(run, resume=False, overwrite=True, init_from=run / "best.pt")
    # A torchrun worker other than rank 0 leaves the folder to rank 0.
    assert prepare_run_dir(run, resume=False, overwrite=True, rank=1) == []
    assert (run / "best.pt").exists()
    removed = prepare_run_dir(run, resume=False, overwrite=True)
    assert removed == sorted(["best.pt", "history.jsonl", "last.pt", "metrics.json", "metrics.md",
                              "plot_block72_PM2.5.png"])  # fmt: skip
    # config.toml and normalization.json are rewritten by the new run; files that are not the run's stay.
    assert sorted(p.name for p in run.iterdir()) == ["config.toml", "normalization.json", "notes.txt"]

    # Through the CLI: the flag is honoured before the config is read (a missing config then stops the run).
    _old_run(tmp_path / "run2")
    rc = main(["train", "--out", str(tmp_path / "run2"), "--overwrite", "--config", str(tmp_path / "none.toml")])
    cap = capsys.readouterr()
    assert rc == 1 and "cannot read config" in cap.err
    assert cap.out.startswith("--overwrite: deleted best.pt, history.jsonl, last.pt, metrics.json")
    assert not (tmp_path / "run2" / "best.pt").exists()


def test_resume_and_overwrite_exclude_each_other(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--out", str(tmp_path), "--resume", "--overwrite"])
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_evaluate_help_shows_single_percent(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "(point-10%, blocks of 6 h / 24 h / 72 h" in " ".join(out.split()) and "%%" not in out


@pytest.mark.parametrize("bad", ["0", "-3", "x"])
def test_evaluate_max_windows_must_be_positive(tmp_path, capsys, bad):
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", str(tmp_path), "--max-windows", bad])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --max-windows:" in err
    assert ("not an integer" if bad == "x" else f"must be a positive integer, got {bad}") in err
