"""Artificial outages for masked-imputation training, and the contrastive sampler (anchor / positive / negative).

Outages imitate what stations really do (docs/ARCHITECTURE.md, "The model"): scattered lost readings, and contiguous blocks
where one sensor, several sensors, one group of sensors (the dataset spec's groups, e.g. every pollutant
analyser), or the whole station goes silent for an hour up to
several days. Blocks are drawn with a bias toward long ones, because long gaps are where interpolation fails and
what the evaluation measures.

Contrastive views follow the seed paper (Information 2026, 17(2), 121): positives are an adjacent sub-sequence of
the anchor and an augmented view (noise, sub-sequence masking, time warping); negatives are a distant window of the
same station and the anchor with its segments shuffled (its values out of step with its calendar).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gapcast.train.data import WindowSet

__all__ = [
    "ContrastConfig",
    "ContrastSample",
    "ContrastiveSampler",
    "MaskConfig",
    "augment",
    "outage_mask",
    "segment_shuffle",
    "time_warp",
]


@dataclass(frozen=True)
class MaskConfig:
    """How artificial outages are drawn for one training window.

    Attributes:
        point_rate: the share of observed cells hidden at random is drawn per window from U(0, point_rate).
        block_prob: probability that a window gets contiguous outage blocks.
        max_blocks: a window with blocks gets 1..max_blocks of them.
        min_block: shortest block, steps (1 h for hourly data).
        max_block: longest block, steps (clipped to the window).
        long_share: share of blocks drawn uniformly from [long_from, max_block]; the rest are log-uniform in
            [min_block, long_from).
        long_from: where "long" blocks start, steps.
        kind_weights: relative weights of the block kinds (one channel, several channels, one outage group of the
            dataset spec, whole station).

    Block lengths are steps here; a training config writes them as durations (``max_block = "80h"``), converted
    with the dataset's cadence (``gapcast.train.config.TrainConfig.from_dict``).
    """

    point_rate: float = 0.15
    block_prob: float = 0.85
    max_blocks: int = 2
    min_block: int = 1
    max_block: int = 80
    long_share: float = 0.6
    long_from: int = 12
    kind_weights: tuple[float, float, float, float] = (0.15, 0.15, 0.5, 0.2)

    def __post_init__(self) -> None:
        if not (0.0 <= self.point_rate < 1.0 and 0.0 <= self.block_prob <= 1.0 and 0.0 <= self.long_share <= 1.0):
            msg = "point_rate must be in [0, 1), block_prob and long_share in [0, 1]"
            raise ValueError(msg)
        if not 1 <= self.min_block <= self.long_from <= self.max_block or self.max_blocks < 1:
            msg = "need 1 <= min_block <= long_from <= max_block and max_blocks >= 1"
            raise ValueError(msg)
        weights = tuple(float(w) for w in self.kind_weights)
        if len(weights) != 4 or min(weights) < 0 or sum(weights) <= 0:
            msg = f"kind_weights needs 4 non-negative weights with a positive sum, got {self.kind_weights}"
            raise ValueError(msg)
        object.__setattr__(self, "kind_weights", weights)


def _block_length(rng: np.random.Generator, cfg: MaskConfig, length: int) -> int:
    hi = min(cfg.max_block, length)
    lo_long = min(cfg.long_from, hi)
    if rng.random() < cfg.long_share:
        n = int(rng.integers(lo_long, hi + 1))
    else:
        n = int(np.exp(rng.uniform(np.log(cfg.min_block), np.log(max(lo_long, cfg.min_block + 1)))))
    return int(np.clip(n, 1, hi))


def outage_mask(
    observed: np.ndarray,
    rng: np.random.Generator,
    cfg: MaskConfig,
    groups: Sequence[int] | Sequence[Sequence[int]],
) -> np.ndarray:
    """Draw artificial outages for a batch of windows.

    Args:
        observed: [B, L, C] bool or 0/1, the real observed mask.
        rng: the random generator (the caller owns the seed).
        cfg: the outage distribution.
        groups: the dataset spec's outage groups as channel-index tuples (a "one group" block hides one of them,
            drawn uniformly); a flat tuple of indices is one group. Empty: "one group" blocks hide the station.

    Returns:
        hide: [B, L, C] bool, True where an observed value is artificially hidden (always a subset of observed).
    """
    obs = np.asarray(observed).astype(bool)
    B, L, C = obs.shape
    rates = rng.uniform(0.0, cfg.point_rate, size=(B, 1, 1))
    hide = rng.random((B, L, C)) < rates
    kind_p = np.asarray(cfg.kind_weights) / sum(cfg.kind_weights)
    if len(groups) and np.ndim(groups[0]) == 0:
        groups = [groups]  # type: ignore[list-item]
    group_idx = [np.asarray(g, dtype=np.int64) for g in groups if len(g)] or [np.arange(C)]
    for b in range(B):
        if rng.random() >= cfg.block_prob:
            continue
        for _ in range(int(rng.integers(1, cfg.max_blocks + 1))):
            n = _block_length(rng, cfg, L)
            t0 = int(rng.integers(0, L - n + 1))
            kind = int(rng.choice(4, p=kind_p))
            if kind == 0:
                chans = rng.integers(0, C, size=1)
            elif kind == 1:
                chans = rng.choice(C, size=int(rng.integers(2, max(3, C))), replace=False)
            elif kind == 2:
                chans = group_idx[int(rng.integers(0, len(group_idx)))] if len(group_idx) > 1 else group_idx[0]
            else:
                chans = np.arange(C)
            hide[b, t0 : t0 + n, chans] = True
    return hide & obs


@dataclass(frozen=True)
class ContrastConfig:
    """The contrastive views.

    Attributes:
        fraction: share of each batch used as anchors (their positives and negatives are encoded in the same step).
        temperature: InfoNCE temperature.
        adjacent_min: smallest shift of the adjacent positive, steps.
        adjacent_max: largest shift of the adjacent positive, steps.
        distant_min: smallest distance of the distant negative from the anchor, steps (720 = 30 days hourly).
        segments: number of segments the shuffled negative is cut into.
        noise_std: Gaussian noise of the augmented positive, normalised units.
        mask_min: shortest sub-sequence hidden in the augmented positive, share of L.
        mask_max: longest sub-sequence hidden in the augmented positive, share of L.
        warp_strength: time warping: local speed varies within 1 +- warp_strength.
        view_grad: back-propagate through the positive and negative encodings too (False: only through the
            anchor; the views are encoded in the same step as fixed targets, which costs a third as much).
    """

    fraction: float = 0.25
    temperature: float = 0.2
    adjacent_min: int = 6
    adjacent_max: int = 24
    distant_min: int = 720
    segments: int = 4
    noise_std: float = 0.1
    mask_min: float = 0.05
    mask_max: float = 0.2
    warp_strength: float = 0.2
    view_grad: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction <= 1.0 or self.temperature <= 0:
            msg = "fraction must be in [0, 1] and temperature > 0"
            raise ValueError(msg)
        if not 1 <= self.adjacent_min <= self.adjacent_max < self.distant_min:
            msg = "need 1 <= adjacent_min <= adjacent_max < distant_min"
            raise ValueError(msg)
        if self.segments < 2 or not 0.0 <= self.mask_min <= self.mask_max < 1.0 or not 0 <= self.warp_strength < 1:
            msg = "need segments >= 2, 0 <= mask_min <= mask_max < 1 and 0 <= warp_strength < 1"
            raise ValueError(msg)


def time_warp(
    values: np.ndarray, observed: np.ndarray, rng: np.random.Generator, strength: float
) -> tuple[np.ndarray, np.ndarray]:
    """Resample a window on a smoothly distorted, monotone time axis that keeps both ends.

    Args:
        values: [L, C] float32 (0 where unobserved).
        observed: [L, C] float32 0/1.
        rng: random generator.
        strength: local speed varies within 1 +- strength.

    Returns:
        (values [L, C], observed [L, C]): linear interpolation between the two neighbouring source steps where both
        are observed, the nearer one where only it is; unobserved (0, 0) where neither is.
    """
    L = values.shape[0]
    knots = rng.uniform(1.0 - strength, 1.0 + strength, size=4)
    speed = np.interp(np.linspace(0, 3, L - 1), np.arange(4), knots)
    src = np.concatenate([[0.0], np.cumsum(speed)])
    src = src / src[-1] * (L - 1)  # [L] monotone source positions, src[0] = 0, src[-1] = L - 1
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, L - 1)
    frac = (src - lo)[:, None].astype(np.float32)
    m_lo, m_hi = observed[lo], observed[hi]
    both = m_lo * m_hi
    near = np.where(frac < 0.5, m_lo, m_hi)
    near_v = np.where(frac < 0.5, values[lo], values[hi])
    interp = (1 - frac) * values[lo] + frac * values[hi]
    out_v = np.where(both > 0, interp, np.where(near > 0, near_v, 0.0)).astype(np.float32)
    out_m = np.maximum(both, near).astype(np.float32)
    return out_v * out_m, out_m


def augment(
    values: np.ndarray, observed: np.ndarray, rng: np.random.Generator, cfg: ContrastConfig
) -> tuple[np.ndarray, np.ndarray]:
    """The augmented positive: time warping, then noise on observed cells, then a hidden sub-sequence.

    Args:
        values: [L, C] float32, normalised, 0 where unobserved.
        observed: [L, C] float32 0/1.
        rng: random generator.
        cfg: augmentation strengths.

    Returns:
        (values [L, C], observed [L, C]) float32.
    """
    L = values.shape[0]
    v, m = time_warp(values, observed, rng, cfg.warp_strength)
    v = (v + rng.normal(0.0, cfg.noise_std, size=v.shape).astype(np.float32)) * m
    n = int(round(rng.uniform(cfg.mask_min, cfg.mask_max) * L))
    if n > 0:
        t0 = int(rng.integers(0, L - n + 1))
        m = m.copy()
        m[t0 : t0 + n] = 0.0
        v = v * m
    return v.astype(np.float32), m.astype(np.float32)


def segment_shuffle(
    values: np.ndarray, observed: np.ndarray, rng: np.random.Generator, segments: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut the window into equal segments (the last takes the remainder) and reorder them (never the identity).

    Returns:
        (values [L, C], observed [L, C], permutation [segments] int64: output segment i is input segment perm[i]).
    """
    L = values.shape[0]
    bounds = np.linspace(0, L, segments + 1).astype(np.int64)
    perm = rng.permutation(segments)
    while np.all(perm == np.arange(segments)):
        perm = rng.permutation(segments)
    order = np.concatenate([np.arange(bounds[p], bounds[p + 1]) for p in perm])
    return values[order], observed[order], perm


@dataclass
class ContrastSample:
    """Positives and negatives for n anchors; every array is [n, L, .] over the past L steps.

    Attributes:
        adjacent: (values, observed, calendar) of the window shifted by ``adjacent_shift`` steps.
        augmented: (values, observed, calendar) of the augmented anchor.
        distant: (values, observed, calendar) of a window ``>= distant_min`` steps away, same station.
        shuffled: (values, observed, calendar) of the anchor with its segments reordered (calendar kept).
        adjacent_shift: [n] int64, signed shift of the adjacent window, steps.
        distant_start: [n] int64, start row of the distant window.
        permutation: [n, segments] int64, the segment order of the shuffled negative.
    """

    adjacent: tuple[np.ndarray, np.ndarray, np.ndarray]
    augmented: tuple[np.ndarray, np.ndarray, np.ndarray]
    distant: tuple[np.ndarray, np.ndarray, np.ndarray]
    shuffled: tuple[np.ndarray, np.ndarray, np.ndarray]
    adjacent_shift: np.ndarray
    distant_start: np.ndarray
    permutation: np.ndarray

    def stacked(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All views in one batch, order adjacent, augmented, distant, shuffled: each [4n, L, .]."""
        parts = (self.adjacent, self.augmented, self.distant, self.shuffled)
        return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))  # type: ignore[return-value]


class ContrastiveSampler:
    """Draws the positives and negatives of anchor windows from a :class:`WindowSet`.

    Args:
        windows: the training windows (anchors are identified by (series, start row)).
        cfg: view parameters.

    Raises:
        ValueError: if a series is too short to hold a distant window.
    """

    def __init__(self, windows: WindowSet, cfg: ContrastConfig) -> None:
        self.windows = windows
        self.cfg = cfg
        span = windows.lookback + windows.horizon
        self.last_start = [len(v) - span for v in windows.values]  # inclusive, per series
        for k, last in enumerate(self.last_start):
            if last < cfg.distant_min:
                msg = f"series {k} is too short ({last + span} steps) for distant negatives ({cfg.distant_min} apart)"
                raise ValueError(msg)

    def _past(self, k: int, s: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        v, m, c = self.windows.window_at(k, s)
        L = self.windows.lookback
        return v[:L], m[:L], c[:L]

    def _adjacent_start(self, k: int, s: int, rng: np.random.Generator) -> int:
        shift = int(rng.integers(self.cfg.adjacent_min, self.cfg.adjacent_max + 1))
        sign = 1 if rng.random() < 0.5 else -1
        for cand in (s + sign * shift, s - sign * shift):
            if 0 <= cand <= self.last_start[k]:
                return cand
        msg = f"series {k} too short for an adjacent window at start {s}"
        raise ValueError(msg)

    def _distant_start(self, k: int, s: int, rng: np.random.Generator) -> int:
        d = self.cfg.distant_min
        n_before = max(0, s - d + 1)  # starts in [0, s - d]
        hi_from = s + d  # starts in [s + d, last]
        n_after = max(0, self.last_start[k] - hi_from + 1)
        if n_before + n_after == 0:
            msg = f"no start {d} steps from {s} in series {k}"
            raise ValueError(msg)
        j = int(rng.integers(0, n_before + n_after))
        return j if j < n_before else hi_from + (j - n_before)

    def sample(self, refs: np.ndarray, rng: np.random.Generator) -> ContrastSample:
        """Views for anchors ``refs``.

        Args:
            refs: [n, 2] int64 (series index, start row) of the anchor windows.
            rng: random generator.

        Returns:
            A :class:`ContrastSample`.
        """
        adj, aug, dist, shuf = [], [], [], []
        shifts, dstarts, perms = [], [], []
        for k, s in np.asarray(refs, dtype=np.int64):
            k, s = int(k), int(s)
            v, m, c = self._past(k, s)
            sa = self._adjacent_start(k, s, rng)
            adj.append(self._past(k, sa))
            shifts.append(sa - s)
            av, am = augment(v, m, rng, self.cfg)
            aug.append((av, am, c))
            sd = self._distant_start(k, s, rng)
            dist.append(self._past(k, sd))
            dstarts.append(sd)
            sv, sm, perm = segment_shuffle(v, m, rng, self.cfg.segments)
            shuf.append((sv, sm, c))
            perms.append(perm)

        def stack(items):
            return tuple(np.stack(p).astype(np.float32) for p in zip(*items, strict=True))

        return ContrastSample(
            adjacent=stack(adj),
            augmented=stack(aug),
            distant=stack(dist),
            shuffled=stack(shuf),
            adjacent_shift=np.asarray(shifts, dtype=np.int64),
            distant_start=np.asarray(dstarts, dtype=np.int64),
            permutation=np.asarray(perms, dtype=np.int64),
        )
