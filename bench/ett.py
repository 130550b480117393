"""``gapcast bench ett``: ConFill and DLinear on ETTh1/ETTh2 with the standard long-horizon protocol, next to
published figures.

Protocol (Zhou et al., Informer, AAAI 2021; used unchanged by DLinear, PatchTST, TimesNet and iTransformer):
train = first 12 months (8,640 rows), validation = next 4 months, test = next 4 months, each later split starting
96 rows early; z-score with the training statistics; input L = 96; horizons H = 96, 192, 336, 720; MSE and MAE on
normalised values, averaged over all 7 channels, steps and test windows (every window, stride 1: 2,785 test windows
for H = 96; the reference code's ``drop_last`` is not applied).

ConFill is the same network as for Beijing with C = 7 and H = horizon, trained here on the forecast loss only (MSE on
the normalised future; ETT has no gaps to fill), each input window centred on its own per-channel mean and the mean
added back to the forecast (the level part of RevIN, as PatchTST and iTransformer normalise inputs), with AdamW and a cosine learning rate over a fixed wall-clock budget
per horizon on this machine's CPU, keeping the weights with the best validation MSE. DLinear (Zeng et al., AAAI 2023)
is trained in the same run with the paper's settings (Adam, lr 0.005, batch 32, up to 10 epochs, patience 3, the
learning rate halved every epoch).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ETT_HORIZONS",
    "PUBLISHED",
    "PUBLISHED_SOURCES",
    "EttWindows",
    "ett_windows",
    "run_ett",
]

log = logging.getLogger(__name__)

ETT_HORIZONS: tuple[int, ...] = (96, 192, 336, 720)
LOOKBACK = 96

#: Where each published figure comes from. Every number below was checked against a copy of the table named here.
PUBLISHED_SOURCES: dict[str, str] = {
    "iTransformer": "Liu et al., 'iTransformer: Inverted Transformers Are Effective for Time Series Forecasting', "
    "ICLR 2024, full long-term forecasting results (lookback 96).",
    "PatchTST": "Nie et al., 'A Time Series is Worth 64 Words', ICLR 2023; lookback-96 figures as re-run in "
    "the iTransformer paper's full results table (ICLR 2024).",
    "TimesNet": "Wu et al., 'TimesNet: Temporal 2D-Variation Modeling for General Time Series Analysis', ICLR 2023 "
    "(lookback 96); the same figures appear in the iTransformer paper's full results table.",
    "DLinear": "Zeng et al., 'Are Transformers Effective for Time Series Forecasting?', AAAI 2023; lookback-96 "
    "figures as reported in the TimesNet and iTransformer papers' full results tables.",
    "DLinear (paper, L=336)": "Zeng et al., AAAI 2023, Table 2 (LTSF-Linear with lookback 336).",
    "PatchTST/42 (paper, L=336)": "Nie et al., ICLR 2023, Table 3 (PatchTST/42, lookback 336).",
    "PatchTST/64 (paper, L=512)": "Nie et al., ICLR 2023, Table 3 (PatchTST/64, lookback 512).",
}

# (dataset, horizon) -> model -> (MSE, MAE), normalised. The first four rows use our protocol's input length (96);
# the last three are each paper's own best setting with a LONGER input, listed for reference only.
_L96 = {
    "iTransformer": {
        "ETTh1": [(0.386, 0.405), (0.441, 0.436), (0.487, 0.458), (0.503, 0.491)],
        "ETTh2": [(0.297, 0.349), (0.380, 0.400), (0.428, 0.432), (0.427, 0.445)],
    },
    "PatchTST": {
        "ETTh1": [(0.414, 0.419), (0.460, 0.445), (0.501, 0.466), (0.500, 0.488)],
        "ETTh2": [(0.302, 0.348), (0.388, 0.400), (0.426, 0.433), (0.431, 0.446)],
    },
    "TimesNet": {
        "ETTh1": [(0.384, 0.402), (0.436, 0.429), (0.491, 0.469), (0.521, 0.500)],
        "ETTh2": [(0.340, 0.374), (0.402, 0.414), (0.452, 0.452), (0.462, 0.468)],
    },
    "DLinear": {
        "ETTh1": [(0.386, 0.400), (0.437, 0.432), (0.481, 0.459), (0.519, 0.516)],
        "ETTh2": [(0.333, 0.387), (0.477, 0.476), (0.594, 0.541), (0.831, 0.657)],
    },
    "DLinear (paper, L=336)": {
        "ETTh1": [(0.375, 0.399), (0.405, 0.416), (0.439, 0.443), (0.472, 0.490)],
        "ETTh2": [(0.289, 0.353), (0.383, 0.418), (0.448, 0.465), (0.605, 0.551)],
    },
    "PatchTST/42 (paper, L=336)": {
        "ETTh1": [(0.375, 0.399), (0.414, 0.421), (0.431, 0.436), (0.449, 0.466)],
        "ETTh2": [(0.274, 0.336), (0.339, 0.379), (0.331, 0.380), (0.379, 0.422)],
    },
    "PatchTST/64 (paper, L=512)": {
        "ETTh1": [(0.370, 0.400), (0.413, 0.429), (0.422, 0.440), (0.447, 0.468)],
        "ETTh2": [(0.274, 0.337), (0.341, 0.382), (0.329, 0.384), (0.379, 0.422)],
    },
}
PUBLISHED: dict[tuple[str, int], dict[str, tuple[float, float]]] = {
    (ds, h): {model: rows[ds][i] for model, rows in _L96.items()}
    for ds in ("ETTh1", "ETTh2")
    for i, h in enumerate(ETT_HORIZONS)
}
#: Input length behind each published column.
PUBLISHED_LOOKBACK = {"iTransformer": 96, "PatchTST": 96, "TimesNet": 96, "DLinear": 96,
                      "DLinear (paper, L=336)": 336, "PatchTST/42 (paper, L=336)": 336,
                      "PatchTST/64 (paper, L=512)": 512}


@dataclass
class EttWindows:
    """All windows of one split, as strided views (no copy).

    Attributes:
        x: [N, L, C] float32 normalised inputs.
        y: [N, H, C] float32 normalised targets.
        calendar: [N, L + H, F] float32 calendar features (local time of the file, offset 0).
    """

    x: np.ndarray
    y: np.ndarray
    calendar: np.ndarray

    def __len__(self) -> int:
        return len(self.x)


def ett_windows(values: np.ndarray, epoch_s: np.ndarray, *, lookback: int, horizon: int) -> EttWindows:
    """Every window (stride 1) of a split.

    Args:
        values: [T, C] float32, normalised, no gaps.
        epoch_s: [T] int64 step start times.
        lookback: L, input steps.
        horizon: H, target steps.

    Returns:
        :class:`EttWindows` with N = T - L - H + 1 windows.

    Raises:
        ValueError: if the split is shorter than one window.
    """
    from numpy.lib.stride_tricks import sliding_window_view

    from gapcast.calendar import calendar_features

    n = len(values) - lookback - horizon + 1
    if n < 1:
        msg = f"a split of {len(values)} rows holds no window of {lookback} + {horizon} steps"
        raise ValueError(msg)
    full = sliding_window_view(values, lookback + horizon, axis=0).transpose(0, 2, 1)  # [T-L-H+1, L+H, C]
    cal = calendar_features(epoch_s, 0)
    cal_w = sliding_window_view(cal, lookback + horizon, axis=0).transpose(0, 2, 1)
    return EttWindows(x=full[:n, :lookback], y=full[:n, lookback:], calendar=cal_w[:n])


@dataclass(frozen=True)
class ConFillEttBudget:
    """How ConFill is trained on ETT (stated in the output).

    Attributes:
        budget_s: wall-clock training budget per (dataset, horizon), seconds.
        batch_size: windows per step.
        lr: peak AdamW learning rate (the Beijing config's; cosine to 5% over the budget, 50 warm-up steps).
        weight_decay: AdamW weight decay.
        val_every: steps between validations (and at the end of the budget).
        val_windows: validation windows scored (evenly spaced).
        seed: seed of the initial weights and the batches.
    """

    budget_s: float = 180.0
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    val_every: int = 100
    val_windows: int = 512
    seed: int = 0


def _confill_ett_config(base, horizon: int):
    """The Beijing model sizes with C = 7 and H = horizon."""
    return dataclasses.replace(base, n_channels=7, lookback=LOOKBACK, horizon=horizon)


def train_confill_ett(model_cfg, budget: ConFillEttBudget, train: EttWindows, val: EttWindows):
    """Train ConFill's forecast head path on ETT within a wall-clock budget.

    Args:
        model_cfg: a ``ConFillConfig`` with ``n_channels = 7`` and ``horizon = H``.
        budget: the training budget.
        train: training windows.
        val: validation windows.

    Returns:
        (model in eval mode with the best validation weights, info dict: steps, seconds, best validation MSE).
    """
    import torch

    from gapcast.train.model import ConFill

    torch.manual_seed(budget.seed)
    rng = np.random.default_rng(budget.seed)
    model = ConFill(model_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=budget.lr, weight_decay=budget.weight_decay)
    vidx = np.linspace(0, len(val) - 1, min(len(val), budget.val_windows)).round().astype(np.int64)
    ones = None
    best, best_state, step = math.inf, copy.deepcopy(model.state_dict()), 0
    t0 = time.perf_counter()
    warmup = 50
    while True:
        elapsed = time.perf_counter() - t0
        progress = min(1.0, elapsed / budget.budget_s)
        lr = budget.lr * (step + 1) / warmup if step < warmup else budget.lr * (
            0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = rng.integers(0, len(train), size=budget.batch_size)
        x = torch.from_numpy(np.ascontiguousarray(train.x[idx]))
        level = x.mean(dim=1, keepdim=True)  # [B, 1, C]: the window's own level (see _confill_predict)
        x = x - level
        y = torch.from_numpy(np.ascontiguousarray(train.y[idx])) - level
        c = torch.from_numpy(np.ascontiguousarray(train.calendar[idx]))
        if ones is None or ones.shape != x.shape:
            ones = torch.ones_like(x)
        model.train()
        _, fc, _ = model.compute(x, ones, c)
        loss = torch.mean((fc - y) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        done = time.perf_counter() - t0 >= budget.budget_s
        if step % budget.val_every == 0 or done:
            mse = _confill_mse(model, val, vidx)
            log.info("ConFill ETT H=%d step %d: validation MSE %.4f", model_cfg.horizon, step, mse)
            if mse < best:
                best, best_state = mse, copy.deepcopy(model.state_dict())
        if done:
            break
    model.load_state_dict(best_state)
    model.eval()
    return model, {"steps": step, "train_s": round(time.perf_counter() - t0, 1), "best_val_mse": best}


def _confill_predict(model, w: EttWindows, idx: np.ndarray, batch: int = 128) -> np.ndarray:
    import torch

    out = []
    with torch.no_grad():
        for a in range(0, len(idx), batch):
            sl = idx[a : a + batch]
            x = torch.from_numpy(np.ascontiguousarray(w.x[sl]))
            # Instance centring (the level of RevIN, Kim et al., ICLR 2022, as PatchTST and iTransformer normalise
            # their inputs): ETT drifts between its train and test months; the network itself is unchanged.
            level = x.mean(dim=1, keepdim=True)
            c = torch.from_numpy(np.ascontiguousarray(w.calendar[sl]))
            out.append((model(x - level, torch.ones_like(x), c)[1] + level).numpy())
    return np.concatenate(out)


def _confill_mse(model, w: EttWindows, idx: np.ndarray) -> float:
    pred = _confill_predict(model, w, idx)
    return float(np.mean((pred - w.y[idx]) ** 2))


def _dlinear_predict(model, w: EttWindows, batch: int = 512) -> np.ndarray:
    import torch

    out = []
    with torch.no_grad():
        for a in range(0, len(w), batch):
            out.append(model(torch.from_numpy(np.ascontiguousarray(w.x[a : a + batch]))).numpy())
    return np.concatenate(out)


def _scores(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    err = pred.astype(np.float64) - target
    return {"mse": float(np.mean(err**2)), "mae": float(np.mean(np.abs(err)))}


def _ett_splits(ds: str, h: int, data) -> dict[str, EttWindows]:
    """The standard protocol's train / val / test windows of one ETT dataset at horizon ``h`` (normalised with the
    training statistics). Raises DataError when the ETT files are missing."""
    from gapcast.train.data import load_ett

    ett = load_ett(ds, data, lookback=LOOKBACK)
    norm = ett.normalizer.transform(ett.values)
    return {
        name: ett_windows(norm[sl], ett.epoch_s[sl], lookback=LOOKBACK, horizon=h)
        for name, sl in (("train", ett.train), ("val", ett.val), ("test", ett.test))
    }


def _dlinear_row(splits: dict[str, EttWindows], h: int, epochs: int, seed: int, budget_s: float) -> dict:
    """Train DLinear (the paper's settings) and score it on the test windows: MSE / MAE, training time, epochs, why
    it stopped. Raises what its training raises."""
    from gapcast.bench.dlinear import DLinearConfig, train_dlinear

    dcfg = DLinearConfig(lookback=LOOKBACK, horizon=h, channels=7, max_epochs=epochs, seed=seed)
    tr = splits["train"]

    def epoch_batches(rng, tr=tr, bs=dcfg.batch_size):
        order = rng.permutation(len(tr))
        return [
            (np.ascontiguousarray(tr.x[order[a : a + bs]]), np.ascontiguousarray(tr.y[order[a : a + bs]]),
             np.ones((len(order[a : a + bs]), tr.y.shape[1], tr.y.shape[2]), np.float32))
            for a in range(0, len(order), bs)
        ]

    va = splits["val"]
    val_batches = [(np.ascontiguousarray(va.x[a : a + 512]), np.ascontiguousarray(va.y[a : a + 512]),
                    np.ones_like(va.y[a : a + 512])) for a in range(0, len(va), 512)]
    # The same wall-clock budget as ConFill (issue 19); DLinear's own schedule (epoch cap, patience, the learning
    # rate halved every epoch) usually ends it first, which is recorded as its stop reason.
    fit = train_dlinear(dcfg, epoch_batches, val_batches, budget_s=budget_s)
    return {**_scores(_dlinear_predict(fit.model, splits["test"]), splits["test"].y),
            "train_s": round(fit.train_s, 1), "epochs": fit.epochs, "stopped": fit.stopped}


def _confill_row(confill_model, budget: ConFillEttBudget, splits: dict[str, EttWindows], h: int) -> dict:
    """Train ConFill at horizon ``h`` under the budget and score it on the test windows: MSE / MAE, the training
    record and the parameter count. Raises what its training raises."""
    import torch

    mcfg = _confill_ett_config(confill_model, h)
    model, info = train_confill_ett(mcfg, budget, splits["train"], splits["val"])
    te = splits["test"]
    pred = _confill_predict(model, te, np.arange(len(te)))
    out = {**_scores(pred, te.y), **info, "params": int(sum(p.numel() for p in model.parameters()))}
    del model
    torch.set_grad_enabled(True)
    return out


def run_ett(
    *,
    data=None,
    datasets: Sequence[str] = ("ETTh1", "ETTh2"),
    horizons: Sequence[int] = ETT_HORIZONS,
    confill_budget_s: float = 180.0,
    confill_model=None,
    dlinear_epochs: int = 10,
    run_confill: bool = True,
    seed: int = 0,
    threads: int | None = None,
    progress: bool = True,
) -> dict:
    """Run the ETT benchmark.

    Args:
        data: data root holding ``ett/`` (None: ``$GAPCAST_DATA`` / cache).
        datasets: ``ETTh1`` and/or ``ETTh2``.
        horizons: forecast horizons H.
        confill_budget_s: the wall-clock training budget per (dataset, horizon), seconds, of ConFill and of DLinear
            alike (DLinear may stop earlier on its own schedule).
        confill_model: the ``ConFillConfig`` whose sizes are used (None: the packaged ``beijing.toml``).
        dlinear_epochs: DLinear's epoch cap.
        run_confill: False skips ConFill (DLinear and the published figures only).
        seed: training seed.
        threads: torch CPU threads for ConFill (None: torch's default); DLinear always uses one.
        progress: tqdm over the (dataset, horizon) runs.

    Returns:
        A JSON-ready dict: protocol, rows (one per dataset and horizon: ours and published), sources.
    """
    import torch
    from tqdm import tqdm

    if threads:
        torch.set_num_threads(threads)
    if confill_model is None and run_confill:
        from gapcast.train.config import load_config

        confill_model = load_config().model
    budget = ConFillEttBudget(budget_s=confill_budget_s, seed=seed)
    rows = []
    runs = [(ds, h) for ds in datasets for h in horizons]
    bar = tqdm(runs, desc="ETT", disable=not progress)
    for ds, h in bar:
        bar.set_postfix(dataset=ds, horizon=h)
        splits = _ett_splits(ds, h, data)
        row: dict = {"dataset": ds, "horizon": h, "windows": {k: len(v) for k, v in splits.items()}}
        dlinear = _dlinear_row(splits, h, dlinear_epochs, seed, confill_budget_s)
        row["budget_s"] = confill_budget_s
        row["DLinear (ours)"] = dlinear
        if run_confill:
            row["ConFill (ours)"] = _confill_row(confill_model, budget, splits, h)
        row["published"] = {m: {"mse": v[0], "mae": v[1], "lookback": PUBLISHED_LOOKBACK[m]}
                            for m, v in PUBLISHED[(ds, h)].items()}
        rows.append(row)
    return {
        "benchmark": "ett",
        "protocol": __doc__.split("\n\n", 2)[1].replace("\n", " "),
        "training": {
            "ConFill": {"budget_s_per_horizon": confill_budget_s, **dataclasses.asdict(budget),
                        "threads": torch.get_num_threads(),
                        "model": dataclasses.asdict(confill_model) if confill_model is not None else None,
                        "loss": "MSE on the normalised forecast (no gaps in ETT); input centred on its window mean", "ran": run_confill},
            "DLinear": {"lr": 0.005, "batch_size": 32, "max_epochs": dlinear_epochs, "patience": 3,
                        "kernel_size": 25, "lradj": "halve every epoch"},
        },
        "rows": rows,
        "published_sources": PUBLISHED_SOURCES,
    }
