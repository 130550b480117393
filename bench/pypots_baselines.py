"""SAITS and BRITS (from PyPOTS) as the learned imputation baselines of ``gapcast bench accuracy``.

Sources: Du, Côté and Liu, "SAITS: Self-Attention-based Imputation for Time Series", Expert Systems with Applications
219 (2023); Cao et al., "BRITS: Bidirectional Recurrent Imputation for Time Series", NeurIPS 2018; the implementations
are PyPOTS's (Du, "PyPOTS: a Python toolbox for data mining on partially-observed time series", 2023).

Budget rule (the same for both, stated in every results file): each model trains on windows of the Beijing training
months (L steps, all channels, normalised with the training statistics, NaN where the sensor was out), epoch by epoch,
until a wall-clock budget on this machine's CPU is spent (the epoch in progress finishes) or ``max_epochs`` is reached;
the weights with the best validation MSE (PyPOTS's own metric: 10% of the observed validation values hidden) are kept.
PyPOTS has no time budget of its own, so :func:`train_pypots` calls ``fit`` one epoch at a time; the optimiser (built
once in the model's constructor) keeps its state across calls.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "PypotsConfig",
    "PypotsFit",
    "beijing_pypots_sets",
    "build_pypots_model",
    "load_fit",
    "pypots_impute",
    "save_fit",
    "train_pypots",
]

log = logging.getLogger(__name__)

METHODS = ("SAITS", "BRITS")


@dataclass(frozen=True)
class PypotsConfig:
    """Hyper-parameters and the training budget of one PyPOTS baseline.

    The sizes are CPU-sized versions of the papers' settings (SAITS on Air-Quality used d_model 256-512; BRITS used
    a 108-unit RNN): the benchmark runs on 2 CPU cores, and a smaller model that finishes more epochs in the same
    budget is the fairer comparison.

    Attributes:
        method: ``SAITS`` or ``BRITS``.
        lookback: L, window length, steps (the same L as ConFill).
        channels: C.
        budget_s: wall-clock training budget, seconds.
        max_epochs: upper bound on epochs.
        batch_size: windows per step.
        seed: numpy/torch seed.
        saits_layers, saits_d_model, saits_heads, saits_d_k, saits_d_ffn, saits_dropout: SAITS sizes.
        brits_hidden: BRITS RNN hidden size.
    """

    method: str = "SAITS"
    lookback: int = 96
    channels: int = 13
    budget_s: float = 600.0
    max_epochs: int = 100
    batch_size: int = 64
    seed: int = 0
    saits_layers: int = 2
    saits_d_model: int = 128
    saits_heads: int = 4
    saits_d_k: int = 32
    saits_d_ffn: int = 256
    saits_dropout: float = 0.1
    brits_hidden: int = 64

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            msg = f"method must be one of {METHODS}, got {self.method!r}"
            raise ValueError(msg)
        if self.budget_s <= 0 or self.max_epochs < 1:
            msg = f"budget_s must be > 0 and max_epochs >= 1 (got {self.budget_s}, {self.max_epochs})"
            raise ValueError(msg)


@dataclass
class PypotsFit:
    """A trained PyPOTS model and how it was trained.

    Attributes:
        config: the :class:`PypotsConfig`.
        model: the PyPOTS model holding the best-validation weights.
        train_s: wall-clock training time, seconds (validation included).
        epochs: epochs run.
        best_epoch: the epoch whose weights are kept.
        best_val_mse: PyPOTS validation MSE of the kept weights (normalised units).
        stopped: ``budget`` or ``max_epochs``.
        n_train_windows: training windows.
    """

    config: PypotsConfig
    model: object
    train_s: float
    epochs: int
    best_epoch: int
    best_val_mse: float
    stopped: str
    n_train_windows: int

    def summary(self) -> dict:
        """JSON-ready description (no weights)."""
        return {
            "config": asdict(self.config),
            "train_s": round(self.train_s, 1),
            "epochs": self.epochs,
            "best_epoch": self.best_epoch,
            "best_val_mse": self.best_val_mse,
            "stopped": self.stopped,
            "n_train_windows": self.n_train_windows,
        }


def beijing_pypots_sets(
    train_values: list[np.ndarray],
    val_values: list[np.ndarray],
    *,
    lookback: int,
    stride: int,
    val_hide_rate: float = 0.1,
    max_train_windows: int | None = None,
    seed: int = 0,
) -> tuple[dict, dict]:
    """Cut normalised series into PyPOTS training and validation sets.

    Args:
        train_values: per station [T_k, C] float32, normalised, NaN where missing (training months).
        val_values: the same for the validation months.
        lookback: window length L, steps.
        stride: steps between window starts.
        val_hide_rate: share of observed validation values hidden for PyPOTS's validation metric.
        max_train_windows: keep at most this many training windows (a random subset), None = all.
        seed: for the subset and the hidden validation values.

    Returns:
        (train_set ``{"X": [N, L, C]}``, val_set ``{"X": [M, L, C], "X_ori": [M, L, C]}``), float32 with NaN.

    Raises:
        ValueError: if a part yields no window.
    """
    rng = np.random.default_rng(seed)

    def cut(series: list[np.ndarray]) -> np.ndarray:
        out = [
            v[s : s + lookback] for v in series for s in range(0, len(v) - lookback + 1, stride)
        ]
        # A window with no observation at all teaches nothing and PyPOTS's loss would divide by zero.
        out = [w for w in out if np.isfinite(w).any()]
        if not out:
            msg = f"no window of {lookback} steps in the given series"
            raise ValueError(msg)
        return np.stack(out).astype(np.float32)

    x_train = cut(train_values)
    if max_train_windows is not None and len(x_train) > max_train_windows:
        x_train = x_train[np.sort(rng.choice(len(x_train), max_train_windows, replace=False))]
    x_ori = cut(val_values)
    x_val = x_ori.copy()
    obs = np.isfinite(x_val)
    hide = obs & (rng.random(x_val.shape) < val_hide_rate)
    x_val[hide] = np.nan
    return {"X": x_train}, {"X": x_val, "X_ori": x_ori}


def build_pypots_model(cfg: PypotsConfig):
    """A fresh PyPOTS SAITS or BRITS on the CPU, one epoch per ``fit`` call, quiet, not saving.

    Raises:
        ModuleNotFoundError: when pypots is not installed (the ``bench`` extra).
    """
    import torch
    from pypots.imputation import BRITS, SAITS

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)  # PyPOTS draws its artificial training masks from numpy's global generator
    common = {"batch_size": cfg.batch_size, "epochs": 1, "patience": None, "device": "cpu", "saving_path": None,
              "model_saving_strategy": None, "verbose": False}
    if cfg.method == "SAITS":
        return SAITS(
            n_steps=cfg.lookback,
            n_features=cfg.channels,
            n_layers=cfg.saits_layers,
            d_model=cfg.saits_d_model,
            n_heads=cfg.saits_heads,
            d_k=cfg.saits_d_k,
            d_v=cfg.saits_d_k,
            d_ffn=cfg.saits_d_ffn,
            dropout=cfg.saits_dropout,
            **common,
        )
    return BRITS(n_steps=cfg.lookback, n_features=cfg.channels, rnn_hidden_size=cfg.brits_hidden, **common)


def train_pypots(cfg: PypotsConfig, train_set: dict, val_set: dict, *, progress: bool = True) -> PypotsFit:
    """Train one PyPOTS baseline under the wall-clock budget rule of this module.

    Args:
        cfg: model sizes and budget.
        train_set: ``{"X": [N, L, C]}`` float32 with NaN (see :func:`beijing_pypots_sets`).
        val_set: ``{"X": ..., "X_ori": ...}``.
        progress: show a tqdm bar over the budget.

    Returns:
        A :class:`PypotsFit` with the best-validation weights loaded.
    """
    from tqdm import tqdm

    model = build_pypots_model(cfg)
    best_state = None
    best = float("inf")
    best_epoch = 0
    stopped = "max_epochs"
    t0 = time.perf_counter()
    bar = tqdm(total=int(cfg.budget_s), desc=f"{cfg.method} (s of budget)", unit="s", disable=not progress)
    epoch = 0
    for epoch in range(1, cfg.max_epochs + 1):  # noqa: B007 (reported after the loop)
        model.fit(train_set, val_set)  # one epoch; the optimiser state carries over
        val = float(model.best_loss)
        if val < best:
            best, best_epoch = val, epoch
            best_state = copy.deepcopy(model.model.state_dict())
        elapsed = time.perf_counter() - t0
        bar.n = min(int(elapsed), int(cfg.budget_s))
        bar.set_postfix(epoch=epoch, val_mse=f"{val:.4f}")
        bar.refresh()
        log.info("%s epoch %d: validation MSE %.4f (%.0f s)", cfg.method, epoch, val, elapsed)
        if elapsed >= cfg.budget_s:
            stopped = "budget"
            break
    bar.close()
    if best_state is not None:
        model.model.load_state_dict(best_state)
    return PypotsFit(
        config=cfg,
        model=model,
        train_s=time.perf_counter() - t0,
        epochs=epoch,
        best_epoch=best_epoch,
        best_val_mse=best,
        stopped=stopped,
        n_train_windows=len(train_set["X"]),
    )


def pypots_impute(model, values: np.ndarray, observed: np.ndarray, *, batch: int = 256) -> np.ndarray:
    """Impute windows with a trained PyPOTS model.

    Args:
        model: a trained PyPOTS imputer (``PypotsFit.model``).
        values: [N, L, C] float32 normalised (any value where unobserved).
        observed: [N, L, C] 0/1 or bool.
        batch: windows per ``predict`` call (bounds memory).

    Returns:
        [N, L, C] float32: the observed values kept, the rest imputed.
    """
    x = np.where(np.asarray(observed).astype(bool), values, np.nan).astype(np.float32)
    out = np.empty_like(x)
    for i in range(0, len(x), batch):
        chunk = x[i : i + batch]
        # PyPOTS rejects a window with no observation at all; give such a window 0 (the training mean).
        empty = ~np.isfinite(chunk).reshape(len(chunk), -1).any(axis=1)
        if empty.any():
            chunk = chunk.copy()
            chunk[empty, 0, :] = 0.0
        out[i : i + batch] = model.predict({"X": chunk})["imputation"]
    return np.where(np.asarray(observed).astype(bool), values, out).astype(np.float32)


def save_fit(fit: PypotsFit, folder: Path) -> Path:
    """Save a fit's weights (PyPOTS format) and its summary (JSON) under ``folder``; returns the weights path."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{fit.config.method.lower()}.pypots"
    fit.model.save(str(path), overwrite=True)
    (folder / f"{fit.config.method.lower()}.json").write_text(json.dumps(fit.summary(), indent=2))
    return path


def load_fit(cfg: PypotsConfig, folder: Path) -> PypotsFit | None:
    """A fit saved by :func:`save_fit` with exactly this config, or None when there is none or it differs."""
    import json

    path = folder / f"{cfg.method.lower()}.pypots"
    meta_path = folder / f"{cfg.method.lower()}.json"
    if not (path.is_file() and meta_path.is_file()):
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("config") != asdict(cfg):
        log.info("saved %s was trained with another config; training again", cfg.method)
        return None
    model = build_pypots_model(cfg)
    model.load(str(path))
    return PypotsFit(
        config=cfg,
        model=model,
        train_s=float(meta["train_s"]),
        epochs=int(meta["epochs"]),
        best_epoch=int(meta["best_epoch"]),
        best_val_mse=float(meta["best_val_mse"]),
        stopped=str(meta["stopped"]),
        n_train_windows=int(meta["n_train_windows"]),
    )
