"""The training config: one TOML table per section ([model], [data], [masking], [contrast], [loss], [optim]).

Durations in a config (``lookback = "4d"``, ``max_block = "72h"``) become steps of the dataset spec's cadence, and
``model.n_channels`` comes from the spec's channels, so one config serves any network. ``load_config`` reads a file,
``dump_toml`` writes one back (the run folder's ``config.toml``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import tomllib

from gapcast import GapcastError
from gapcast.duration import DurationError, steps_of
from gapcast.train import TrainError
from gapcast.train.losses import LossWeights
from gapcast.train.masking import ContrastConfig, MaskConfig
from gapcast.train.model import ConFillConfig
from gapcast.train.spec import DatasetSpec, load_spec

__all__ = [
    "DEFAULT_HORIZON",
    "DEFAULT_LOOKBACK",
    "DURATION_KEYS",
    "DataConfig",
    "OptimConfig",
    "TrainConfig",
    "default_config_path",
    "dump_toml",
    "load_config",
]

#: Lookback and horizon when the training config does not set them (durations, converted with the cadence).
DEFAULT_LOOKBACK = "4d"
DEFAULT_HORIZON = "1d"
#: Keys written as durations in a training config, converted to steps of the dataset's cadence.
DURATION_KEYS = {
    "model": ("lookback", "horizon"),
    "masking": ("min_block", "max_block", "long_from"),
    "contrast": ("adjacent_min", "adjacent_max", "distant_min"),
}


@dataclass(frozen=True)
class DataConfig:
    """Which windows training sees.

    Attributes:
        stations: station names (empty = every station in the data folder).
        min_observed: a training window is kept only if this share of its past cells is observed.
        val_stride: steps between validation window starts.
        val_windows: at most this many validation windows (evenly spaced), scored after every epoch.
    """

    stations: tuple[str, ...] = ()
    min_observed: float = 0.5
    val_stride: int = 24
    val_windows: int = 512

    def __post_init__(self) -> None:
        object.__setattr__(self, "stations", tuple(self.stations))


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser and loop.

    Attributes:
        batch_size: windows per step (per rank under DDP).
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps.
        max_steps: training steps; the learning rate follows a cosine to ``min_lr_ratio * lr`` over them (or over
            the time budget, whichever ends first).
        min_lr_ratio: final learning rate as a share of ``lr``.
        steps_per_epoch: steps between validations.
        patience: epochs without a better validation score before early stopping.
        grad_clip: global gradient-norm clip.
        seed: the run's seed (batches, masks, views, initial weights, dropout).
    """

    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 200
    max_steps: int = 20000
    min_lr_ratio: float = 0.05
    steps_per_epoch: int = 250
    patience: int = 8
    grad_clip: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run reads, one TOML table per field ([model], [data], [masking], [contrast], [loss],
    [optim])."""

    model: ConFillConfig = field(default_factory=ConFillConfig)
    data: DataConfig = field(default_factory=DataConfig)
    masking: MaskConfig = field(default_factory=MaskConfig)
    contrast: ContrastConfig = field(default_factory=ContrastConfig)
    loss: LossWeights = field(default_factory=LossWeights)
    optim: OptimConfig = field(default_factory=OptimConfig)

    @classmethod
    def from_dict(cls, d: dict[str, Any], spec: DatasetSpec | None = None) -> TrainConfig:
        """Build from nested dicts (a parsed TOML file).

        With a dataset spec, durations (``lookback = "4d"``, ``max_block = "72h"``, ``distant_min = "30d"``) are
        converted to steps of its cadence, lookback / horizon default to 4 days / 1 day, and ``model.n_channels``
        comes from the spec's channels (a config that states another number is refused). Plain integers are
        steps, as before.

        Raises:
            TrainError: unknown table or key, a duration that is not a multiple of the cadence (naming the key),
                or a value the section rejects.
        """
        d = _with_steps(d, spec if spec is not None else load_spec("beijing"))
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        types = {"model": ConFillConfig, "data": DataConfig, "masking": MaskConfig, "contrast": ContrastConfig,
                 "loss": LossWeights, "optim": OptimConfig}
        unknown = sorted(set(d) - set(sections))
        if unknown:
            msg = f"unknown config table(s) {unknown}; known: {sorted(sections)}"
            raise TrainError(msg)
        built = {}
        for name, typ in types.items():
            table = d.get(name, {})
            bad = sorted(set(table) - {f.name for f in dataclasses.fields(typ)})
            if bad:
                msg = f"unknown key(s) {bad} in [{name}]"
                raise TrainError(msg)
            try:
                built[name] = typ(**table)
            except (TypeError, ValueError) as exc:
                msg = f"bad [{name}] config: {exc}"
                raise TrainError(msg) from exc
        return cls(**built)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Nested plain dicts (tuples become lists), the inverse of :meth:`from_dict`."""
        out = {}
        for f in dataclasses.fields(self):
            table = dataclasses.asdict(getattr(self, f.name))
            out[f.name] = {k: list(v) if isinstance(v, tuple) else v for k, v in table.items()}
        return out


def _with_steps(d: dict[str, Any], spec: DatasetSpec | None) -> dict[str, Any]:
    """Convert the duration keys of a raw config to steps of the spec's cadence (a copy; ints pass through)."""
    d = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
    model = d.setdefault("model", {}) if spec is not None else d.get("model", {})
    if spec is not None:
        model.setdefault("lookback", DEFAULT_LOOKBACK)
        model.setdefault("horizon", DEFAULT_HORIZON)
        n = len(spec.model_channels)
        if "n_channels" in model and int(model["n_channels"]) != n:
            msg = (f"[model] n_channels = {model['n_channels']}, but the dataset {spec.name} has {n} channels "
                   f"({', '.join(spec.channel_names)}): leave n_channels out, the spec sets it")
            raise TrainError(msg)
        model["n_channels"] = n
        if model.get("context", "none") == "neighbours":  # issue 20: G context channels from the spec's groups
            from gapcast.train.context import context_channels

            idx = context_channels(spec.groups, n, str(model.get("context_group", "")))
            model["n_context"], model["context_index"] = len(idx), list(idx)
    for table, keys in DURATION_KEYS.items():
        tab = d.get(table)
        if not isinstance(tab, dict):
            continue
        for key in keys:
            v = tab.get(key)
            if isinstance(v, str):
                if spec is None:
                    msg = f"[{table}] {key} = {v!r} is a duration: it needs the dataset's cadence (--dataset)"
                    raise TrainError(msg)
                try:
                    tab[key] = steps_of(v, spec.cadence_s, key=f"[{table}] {key}")
                except DurationError as exc:
                    raise TrainError(str(exc)) from exc
    return d


def default_config_path() -> Path:
    """The packaged default config (``gapcast/train/configs/beijing.toml``: model and optimisation; any network)."""
    return Path(str(resources.files("gapcast.train") / "configs" / "beijing.toml"))


def load_config(path: str | os.PathLike | None = None, spec: DatasetSpec | None = None) -> TrainConfig:
    """Read a TOML training config (the packaged ``beijing.toml`` when ``path`` is None).

    Args:
        path: the config file.
        spec: the dataset spec (cadence for durations, channel count); the ``beijing`` preset when None.

    Raises:
        TrainError: missing or malformed file, unknown keys, invalid values.
    """
    path = Path(path) if path else default_config_path()
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        msg = f"cannot read config {path}: {exc}"
        raise TrainError(msg) from exc
    try:
        return TrainConfig.from_dict(raw, spec if spec is not None else load_spec("beijing"))
    except GapcastError as exc:  # the key is named; the file too, so a user with several configs finds it
        msg = f"{path}: {exc}"
        raise TrainError(msg) from exc


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    msg = f"cannot write {type(v).__name__} to TOML"
    raise TypeError(msg)


def dump_toml(tables: dict[str, dict[str, Any]]) -> str:
    """Write one level of tables of scalars and lists as TOML (enough for :class:`TrainConfig`)."""
    lines = []
    for name, table in tables.items():
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items())
        lines.append("")
    return "\n".join(lines)
