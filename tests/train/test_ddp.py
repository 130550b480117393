"""DistributedDataParallel training: 2 CPU processes over gloo end with identical parameters and both exit.

One pair of real processes (``torch.multiprocessing`` spawn, env:// rendezvous on a free port, the way torchrun
launches them) trains the tiny config on two Beijing stations three times in one process group: a fixed number of
steps, under a time budget (rank 0's clock decides), and into early stopping (one decision for both ranks). Each
rank reports its final parameters, its step count, its stop reason and its validation history.
"""

from __future__ import annotations

import dataclasses
import os
import socket

import numpy as np
import torch
import torch.multiprocessing as mp

from gapcast.train.config import default_config_path, load_config
from gapcast.train.trainer import train

TINY = default_config_path().parent / "tiny.toml"
WAIT_S = 240  # deadline for both ranks to report (the shared 2-core machine is slow to spawn torch twice)

RUNS = {
    "max_steps": ({}, {"max_steps": 4, "steps_per_epoch": 2}),
    # 0.002 min = 0.12 s: a few steps, how many depends on the machine; the stop comes from rank 0's clock.
    "time_budget": ({"time_budget_min": 0.002}, {"max_steps": 10_000, "steps_per_epoch": 1_000}),
    # lr 0: the validation score cannot improve after epoch 1, so patience 1 stops both ranks at step 4.
    "early_stopping": ({}, {"max_steps": 50, "steps_per_epoch": 2, "patience": 1, "lr": 0.0}),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_entry(rank: int, world: int, port: int, out: str, series, results) -> None:
    import torch.distributed as dist

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # the trainer joins an existing group and leaves it open
    for name, (kwargs, optim) in RUNS.items():
        cfg = load_config(TINY)
        cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, **optim))
        res = train(cfg, out_dir=os.path.join(out, name), series=series, progress=False, **kwargs)
        # numpy copies: tensors sent through a queue live in shared memory that dies with this process
        state = {k: v.detach().cpu().numpy().copy() for k, v in res.model.state_dict().items()}
        results.put((name, rank, res.steps, res.stop_reason, state, [h["val_score"] for h in res.history]))
    dist.destroy_process_group()


def test_two_gloo_ranks_stay_identical_and_exit(tmp_path, beijing):
    series = {k: beijing[k] for k in ("Aotizhongxin", "Dingling")}
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_ddp_entry, args=(r, 2, port, str(tmp_path), series, results)) for r in range(2)]
    for p in procs:
        p.start()
    got: dict[str, dict[int, tuple]] = {}
    for _ in range(2 * len(RUNS)):
        name, rank, *rest = results.get(timeout=WAIT_S)
        got.setdefault(name, {})[rank] = tuple(rest)
    for p in procs:
        p.join(timeout=WAIT_S)
    assert [p.exitcode for p in procs] == [0, 0], "both ranks must exit cleanly"

    for name, by_rank in got.items():
        (steps0, stop0, p0, val0), (steps1, stop1, p1, val1) = by_rank[0], by_rank[1]
        assert (steps0, stop0) == (steps1, stop1), name
        assert val0 == val1, name  # the all-reduced validation score is the same on both ranks
        assert p0.keys() == p1.keys()
        for k in p0:
            assert np.array_equal(p0[k], p1[k]), f"{name}: rank parameters differ at {k}"
        assert (tmp_path / name / "last.pt").is_file()  # rank 0 wrote the run folder
    assert got["max_steps"][0][:2] == (4, "max_steps")
    steps, stop = got["time_budget"][0][:2]
    assert stop == "time_budget" and 1 <= steps < 10_000
    assert got["early_stopping"][0][:2] == (4, "early_stopping")
    # the trained runs moved away from the lr-0 run's weights (the same initial weights: same seed)
    moved = got["max_steps"][0][2]["impute_head.weight"]
    still = got["early_stopping"][0][2]["impute_head.weight"]
    assert not np.array_equal(moved, still)
