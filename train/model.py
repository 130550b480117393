"""The ConFill network: gap filling and forecasting for multi-channel station series.

(Over 600 lines on purpose: the network is one export graph whose parts are shaped by the same TensorRT/onnxruntime
constraints, and it reads top to bottom as the paper's section 2.3; splitting it would scatter one architecture.)

Source: "Long-Term Air Quality Data Filling Based on Contrastive Learning", Information (MDPI) 2026, 17(2), 121
(DOI 10.3390/info17020121), section 2.3 (data embedding, encoder, decoder). The file reads top to bottom: the
attention primitive, the embedding, the encoder blocks, the decoder block, then the config and the model.

Export constraints shape the code (the bundle runs on TensorRT and onnxruntime, see docs/ARCHITECTURE.md):

* attention is written with explicit MatMul/Softmax and an additive ``-1e4`` mask (``-inf`` turns a fully masked
  row into NaN and fp16 engines disagree on it); the softmax weights are then multiplied by the 0/1 mask, so a query
  with no allowed key gets exactly 0 instead of the mean of V;
* the real DFT is a MatMul with a fixed cos/sin basis buffer (``torch.fft`` does not export to TensorRT);
* reshapes use ``-1`` for the batch axis so the exported graph keeps a dynamic batch.

The model never reads a value where the observed mask is 0: every path starts from ``values * observed``.

One addition to the paper: the imputation head mixes its output with masked-convolution estimates of the observed
neighbours (:class:`NeighbourSmoother`), with per-step, per-channel softmax weights chosen from the encoder memory.
Without it the network, trained for an hour on CPU, fills short gaps worse than linear interpolation; with it short
gaps start from interpolation-like values and long gaps come from the encoder. ``smoother_widths = []`` in the
config gives the paper's plain head. ``interp_source = true`` adds a further estimate, linear interpolation across
the whole gap (:class:`GapInterpolator`), which the narrow smoother equals only for a single missing step.

Neighbour context (issue 20, ``context = "neighbours"``): G extra input channels, one weighted value of the other
stations per step and context channel with its own observed mask (built by ``gapcast.neighbours.build_context``,
the same function on the gateway). They enter the value embedding and the key mask, and give the imputation mix two
more sources per context channel: the neighbour value itself and the neighbour value plus the window's mean offset
of the station to it (over the steps where both are observed). An all-zero context mask (network-wide outage, a
station without neighbours) leaves those sources unavailable: the model is then the temporal-only one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "NEG_MASK",
    "AdaptiveHierarchicalAttention",
    "ConFill",
    "ConFillConfig",
    "DecoderLayer",
    "EncoderLayer",
    "FrequencyEmbedding",
    "GapInterpolator",
    "MultiHeadAttention",
    "MultiScaleConv",
    "NeighbourSmoother",
    "dft_basis",
]

#: Additive bias for disallowed keys. Large enough to zero the softmax weight, finite so every backend agrees.
NEG_MASK = -1e4


def _row_has_key(allowed: torch.Tensor) -> torch.Tensor:
    """1 where a query row has at least one allowed key, else 0; [..., Lq, 1] from allowed [..., Lq, Lk]."""
    return torch.clamp(allowed.sum(dim=-1, keepdim=True), max=1.0)


class MultiHeadAttention(nn.Module):
    """Multi-head scaled dot-product attention with an explicit 0/1 key mask.

    Written with MatMul/Softmax (no fused kernels) so ONNX export gives plain MatMul, Softmax, Add and Mul nodes.
    No dropout on the attention weights: on CPU, drawing a [B, h, Lq, Lk] mask costs more than the attention
    itself; the blocks apply dropout on their residual branches instead.
    """

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        if d_model % n_heads:
            msg = f"d_model {d_model} is not divisible by n_heads {n_heads}"
            raise ValueError(msg)
        self.n_heads = n_heads
        self.d_head = d_model // n_heads
        self.d_model = d_model
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.scale = 1.0 / math.sqrt(self.d_head)

    def forward(self, query: torch.Tensor, key: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """Attend from ``query`` to ``key``.

        Args:
            query: [B, Lq, d] float32.
            key: [B, Lk, d] float32 (keys and values come from the same sequence).
            allowed: 0/1 float32 broadcastable to [B, Lq, Lk]; 1 = the query may attend to the key.

        Returns:
            [B, Lq, d] float32; exactly 0 for a query row with no allowed key.
        """
        lq, lk = query.shape[1], key.shape[1]
        h, dh = self.n_heads, self.d_head
        q = self.q_proj(query).reshape(-1, lq, h, dh).transpose(1, 2)  # [B, h, Lq, dh]
        k = self.k_proj(key).reshape(-1, lk, h, dh).transpose(1, 2)  # [B, h, Lk, dh]
        v = self.v_proj(key).reshape(-1, lk, h, dh).transpose(1, 2)  # [B, h, Lk, dh]
        allowed4 = allowed.unsqueeze(1)  # [B|1, 1, Lq|1, Lk]
        scores = torch.matmul(q, k.transpose(-2, -1)) * self.scale  # [B, h, Lq, Lk]
        scores = scores + (1.0 - allowed4) * NEG_MASK
        # Multiplying by the mask after the softmax makes a row without any allowed key all-zero (not uniform).
        weights = torch.softmax(scores, dim=-1) * allowed4
        out = torch.matmul(weights, v).transpose(1, 2).reshape(-1, lq, self.d_model)  # [B, Lq, d]
        return self.out_proj(out) * _row_has_key(allowed)


def dft_basis(length: int, n_freq: int) -> torch.Tensor:
    """Fixed real-DFT analysis basis.

    Row ``k`` (k < n_freq) is cos(2 pi k t / L); row ``n_freq + k`` is -sin(2 pi k t / L), so ``basis @ x`` gives
    the real and imaginary parts of ``torch.fft.rfft(x)[:n_freq]`` without any FFT operator.

    Args:
        length: L, time steps.
        n_freq: K, the lowest frequencies kept, 1 <= K <= L // 2 + 1.

    Returns:
        [2K, L] float32.

    Raises:
        ValueError: if K is out of range.
    """
    if not 1 <= n_freq <= length // 2 + 1:
        msg = f"n_freq must be in 1..{length // 2 + 1} for length {length}, got {n_freq}"
        raise ValueError(msg)
    t = torch.arange(length, dtype=torch.float64)
    k = torch.arange(n_freq, dtype=torch.float64)
    angle = 2.0 * math.pi * k[:, None] * t[None, :] / length  # [K, L]
    return torch.cat([torch.cos(angle), -torch.sin(angle)], dim=0).to(torch.float32)


class FrequencyEmbedding(nn.Module):
    """Frequency-domain feature of the masked window, mapped back onto the time axis.

    The K lowest real-DFT coefficients of each channel (MatMul with :func:`dft_basis`) are mixed across channels
    into d features and across frequencies by a learned matrix, synthesised back to the L steps with the transposed
    basis and projected: a learned, global linear filter that gives every step a view of the window's periodicities.
    """

    def __init__(self, length: int, n_channels: int, n_freq: int, d_model: int) -> None:
        super().__init__()
        basis = dft_basis(length, n_freq)
        self.register_buffer("basis", basis / length, persistent=False)  # [2K, L], analysis, scaled by 1/L
        self.register_buffer("synthesis", basis.t().contiguous(), persistent=False)  # [L, 2K]
        self.channel_mix = nn.Linear(n_channels, d_model)
        self.freq_mix = nn.Parameter(torch.eye(2 * n_freq))
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, masked_values: torch.Tensor) -> torch.Tensor:
        """Args: masked_values: [B, L, C] float32, already multiplied by the observed mask.

        Returns:
            [B, L, d] float32.
        """
        spec = torch.matmul(self.basis, masked_values)  # [B, 2K, C]
        mixed = torch.matmul(self.freq_mix, self.channel_mix(spec))  # [B, 2K, d]
        return self.proj(torch.matmul(self.synthesis, mixed))  # [B, L, d]


class NeighbourSmoother(nn.Module):
    """Masked (normalised) convolution over time: per channel, the triangular-kernel weighted mean of the observed
    values around each step, at several widths (Knutsson and Westin, "Normalized and differential convolution",
    CVPR 1993).

    It gives the imputation head ready-made local estimates: for a single missing step between two observations
    the narrowest width equals linear interpolation; wider ones bridge longer gaps. A fixed depthwise Conv, a Clip
    and a Div in ONNX.
    """

    def __init__(self, n_channels: int, widths: tuple[int, ...]) -> None:
        super().__init__()
        wmax = max(widths)
        kernels = torch.zeros(len(widths), wmax)
        for i, w in enumerate(widths):
            half = w // 2
            j = torch.arange(-half, half + 1, dtype=torch.float32)
            k = 1.0 - j.abs() / (half + 1)
            start = (wmax - w) // 2
            kernels[i, start : start + w] = k
        # Output channel c * n_widths + i is channel c smoothed at width i (groups = C).
        weight = kernels.repeat(n_channels, 1).unsqueeze(1)  # [C * n_widths, 1, wmax]
        self.register_buffer("weight", weight, persistent=False)
        self.n_channels = n_channels
        self.n_widths = len(widths)
        self.pad = wmax // 2

    def forward(self, masked_values: torch.Tensor, observed: torch.Tensor):
        """Args:
            masked_values: [B, L, C] float32, values * observed.
            observed: [B, L, C] float32 0/1.

        Returns:
            (estimate [B, L, C, W], available [B, L, C, W]): the weighted mean of the observed neighbours (0 where
            none is in reach) and 1 where at least one observed neighbour is in reach.
        """
        L, C, W = masked_values.shape[1], self.n_channels, self.n_widths
        num = F.conv1d(masked_values.transpose(1, 2), self.weight, padding=self.pad, groups=C)  # [B, C*W, L]
        den = F.conv1d(observed.transpose(1, 2), self.weight, padding=self.pad, groups=C)
        est = num / torch.clamp(den, min=1e-3)
        avail = torch.clamp(den * 1e3, max=1.0)
        est = est.reshape(-1, C, W, L).permute(0, 3, 1, 2)  # [B, L, C, W]
        avail = avail.reshape(-1, C, W, L).permute(0, 3, 1, 2)
        return est, avail


class GapInterpolator(nn.Module):
    """Linear interpolation in time between the nearest observed values on each side of every step, per channel;
    the nearest observed value where only one side has one (the same rule as ``gapcast.baselines.linear_interpolate``
    applied to the window).

    :class:`NeighbourSmoother` equals linear interpolation only for a single missing step; across a gap of two or
    more steps its narrow width is one-sided and its wider ones average a neighbourhood, which on smooth channels
    (TEMP, PRES) is worse than a straight line. This module gives the imputation head the straight line itself.

    Memory grows linearly in L: with c_t = CumSum of the observed mask (observed steps up to t), the k-th observed
    step's position and value are scattered into slot k of a [B, C, 2L + 1] table (ScatterElements), and the nearest
    observed step on the left of t is slot c_t, on the right slot n - r_t + 1 (r_t: observed steps from t on; n: all),
    read back with GatherElements. The outputs equal the earlier [B, C, L, L] selection-matrix form (tested against
    it); at a 10-minute cadence and a 4-day lookback (L = 576) that form needed L * L = 331,776 floats per channel
    and window. ONNX: CumSum, ScatterElements, GatherElements, Sub, Mul, Div, Clip, Where, Cast.
    """

    def __init__(self, length: int) -> None:
        super().__init__()
        self.register_buffer("steps", torch.arange(length, dtype=torch.float32), persistent=False)  # [L]

    def forward(self, masked_values: torch.Tensor, observed: torch.Tensor):
        """Args:
            masked_values: [B, L, C] float32, values * observed.
            observed: [B, L, C] float32 0/1.

        Returns:
            (estimate [B, L, C], available [B, L, C]) float32: the interpolated value (the value itself at an
            observed step, 0 for a channel without any observation in the window) and 1 where the channel has at
            least one observation in the window.
        """
        x = masked_values.transpose(1, 2)  # [B, C, L]
        m = observed.transpose(1, 2)  # [B, C, L]
        L = m.shape[-1]
        left_count = torch.cumsum(m, dim=-1)  # [B, C, L]: observed steps j <= t
        total = left_count[..., -1:]  # [B, C, 1]
        right_count = total - left_count + m  # observed steps j >= t
        # The k-th observed step (k = 1..n) goes to slot k of [B, C, 2L + 1]; an unobserved step j to its own slot
        # L + 1 + j (never read), so every slot is written once. Slot 0 stays 0: "no observation on that side".
        steps = self.steps.expand_as(m)  # [B, C, L]
        slot = torch.where(m > 0, left_count, self.steps + (L + 1)).to(torch.int64)
        pos = torch.zeros(m.shape[:-1] + (2 * L + 1,), dtype=m.dtype, device=m.device)
        val = torch.zeros_like(pos)
        pos = pos.scatter(-1, slot, steps)
        val = val.scatter(-1, slot, x)
        has_l = torch.clamp(left_count, max=1.0)
        has_r = torch.clamp(right_count, max=1.0)
        k_l = left_count.to(torch.int64)  # nearest observed step at or before t: the left_count-th
        k_r = ((total - right_count + 1.0) * has_r).to(torch.int64)  # nearest at or after t (0 when none)
        lv, lp = val.gather(-1, k_l), pos.gather(-1, k_l)
        rv, rp = val.gather(-1, k_r), pos.gather(-1, k_r)
        frac = (self.steps - lp) / torch.clamp(rp - lp, min=1.0)
        both = has_l * has_r
        est = both * (lv + (rv - lv) * frac) + has_l * (1.0 - has_r) * lv + has_r * (1.0 - has_l) * rv
        avail = torch.clamp(has_l + has_r, max=1.0)
        return est.transpose(1, 2), avail.transpose(1, 2)


class AdaptiveHierarchicalAttention(nn.Module):
    """Global and windowed-local multi-head self-attention fused by a sigmoid gate.

    g = sigmoid(W [G; Lc] + b), fused = g * G + (1 - g) * Lc, then a linear layer, dropout, residual and LayerNorm.
    The local branch only sees keys with |i - j| <= window // 2 (a constant band mask).
    """

    def __init__(self, length: int, d_model: int, n_heads: int, window: int, dropout: float,
                 local_branch: bool = True) -> None:
        super().__init__()
        self.local_branch = local_branch  # False (ablation): global attention only, no gate
        self.global_attn = MultiHeadAttention(d_model, n_heads)
        self.local_attn = MultiHeadAttention(d_model, n_heads)
        idx = torch.arange(length)
        band = ((idx[:, None] - idx[None, :]).abs() <= window // 2).to(torch.float32)
        self.register_buffer("band", band, persistent=False)  # [L, L] 0/1
        self.gate = nn.Linear(2 * d_model, d_model)
        self.out = nn.Linear(d_model, d_model)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)

    def local(self, x: torch.Tensor, key_allowed: torch.Tensor) -> torch.Tensor:
        """The local branch alone: [B, L, d] -> [B, L, d]; key_allowed: [B, 1, L] 0/1."""
        return self.local_attn(x, x, self.band * key_allowed)

    def forward(self, x: torch.Tensor, key_allowed: torch.Tensor, *, return_gate: bool = False):
        """Args:
            x: [B, L, d] float32.
            key_allowed: [B, 1, L] float32 0/1; 0 marks a step with no observed channel (carries no value).
            return_gate: also return the gate g [B, L, d] (for tests and inspection).

        Returns:
            [B, L, d] float32, or (that, gate) when ``return_gate``.
        """
        g_out = self.global_attn(x, x, key_allowed)
        if not self.local_branch:
            y = self.norm(x + self.drop(self.out(g_out)))
            return (y, torch.ones_like(g_out)) if return_gate else y
        l_out = self.local(x, key_allowed)
        gate = torch.sigmoid(self.gate(torch.cat([g_out, l_out], dim=-1)))
        fused = gate * g_out + (1.0 - gate) * l_out
        y = self.norm(x + self.drop(self.out(fused)))
        return (y, gate) if return_gate else y


class MultiScaleConv(nn.Module):
    """Conv1d branches over time with several kernel sizes ('same' padding), concatenated and fused linearly."""

    def __init__(self, d_model: int, kernels: tuple[int, ...], dropout: float) -> None:
        super().__init__()
        for k in kernels:
            if k % 2 == 0:
                msg = f"conv kernel sizes must be odd for 'same' padding, got {k}"
                raise ValueError(msg)
        self.convs = nn.ModuleList(nn.Conv1d(d_model, d_model, k, padding=k // 2) for k in kernels)
        self.fuse = nn.Linear(len(kernels) * d_model, d_model)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, d] -> [B, L, d]."""
        xt = x.transpose(1, 2)  # [B, d, L]
        multi = torch.cat([F.relu(conv(xt)) for conv in self.convs], dim=1)  # [B, S*d, L]
        return self.norm(x + self.drop(self.fuse(multi.transpose(1, 2))))


class FeedForward(nn.Module):
    """Position-wise Linear -> ReLU -> Linear, residual, LayerNorm."""

    def __init__(self, d_model: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, d] -> [B, L, d]."""
        return self.norm(x + self.drop(self.fc2(self.drop(F.relu(self.fc1(x))))))


class EncoderLayer(nn.Module):
    """Adaptive hierarchical attention, then multi-scale temporal convolution, then the FFN."""

    def __init__(self, cfg: ConFillConfig) -> None:
        super().__init__()
        self.attn = AdaptiveHierarchicalAttention(
            cfg.lookback, cfg.d_model, cfg.n_heads, cfg.local_window, cfg.dropout, cfg.local_branch
        )
        self.conv = MultiScaleConv(cfg.d_model, cfg.conv_kernels, cfg.dropout)
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.dropout)

    def forward(self, x: torch.Tensor, key_allowed: torch.Tensor) -> torch.Tensor:
        """x: [B, L, d]; key_allowed: [B, 1, L] 0/1. Returns [B, L, d]."""
        return self.ffn(self.conv(self.attn(x, key_allowed)))


class DecoderLayer(nn.Module):
    """Non-autoregressive transformer decoder layer: self-attention over the H queries (no causal mask: all
    horizons are decoded in one pass), cross-attention to the encoder memory, FFN; post-norm residuals."""

    def __init__(self, cfg: ConFillConfig) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads)
        self.cross_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads)
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.dropout)
        self.register_buffer("all_keys", torch.ones(1, 1, cfg.horizon), persistent=False)  # [1, 1, H]

    def forward(self, q: torch.Tensor, memory: torch.Tensor, key_allowed: torch.Tensor) -> torch.Tensor:
        """q: [B, H, d] queries; memory: [B, L, d]; key_allowed: [B, 1, L] 0/1. Returns [B, H, d]."""
        q = self.norm1(q + self.drop(self.self_attn(q, q, self.all_keys)))
        q = self.norm2(q + self.drop(self.cross_attn(q, memory, key_allowed)))
        return self.ffn(q)


@dataclass(frozen=True)
class ConFillConfig:
    """Shape and size of a ConFill model (everything a checkpoint needs to rebuild it).

    Attributes:
        n_channels: C, channels per station.
        lookback: L, past steps in the window.
        horizon: H, future steps forecast.
        n_calendar: F, calendar features per step (``gapcast.calendar``: 6).
        d_model: embedding width d.
        n_heads: attention heads (divides d_model).
        n_encoder_layers: N encoder layers (their outputs are mixed by learned softmax weights).
        n_decoder_layers: decoder layers.
        d_ff: FFN hidden width.
        local_window: w, the local attention window; step i sees |i - j| <= w // 2.
        n_freq: K, lowest DFT frequencies kept by the frequency embedding (<= L // 2 + 1).
        conv_kernels: odd kernel sizes of the multi-scale convolution.
        smoother_widths: odd widths of the :class:`NeighbourSmoother` estimates the imputation head mixes with
            its own output (empty: the head alone, as in the paper).
        interp_source: also mix in the :class:`GapInterpolator` estimate (linear interpolation across the gap);
            needs ``smoother_widths``. False keeps the layout of models trained without it.
        dropout: dropout rate in training.
        level_norm: per-window level normalisation (RevIN-style, Kim et al., ICLR 2022): the encoder and the heads
            see each window's channels centred and scaled by their own observed mean and spread; the head outputs
            are restored to the global normalisation. For stations whose levels differ from the training ones.
        context: ``"none"`` (temporal only, as before) or ``"neighbours"`` (neighbour context channels, issue 20).
        context_group: the dataset group whose channels get context (``""``: every channel).
        context_k: neighbours per station and channel, chosen on the training range.
        context_dropout: training only: share of windows whose context is dropped (half of them entirely, half
            over the hidden block's span, as in a network-wide outage), so empty context keeps working.
        n_context: G, context channels (set from the dataset spec when ``context = "neighbours"``; 0 otherwise).
        context_index: the G station-channel columns the context channels estimate.
        freq_embedding: add the frequency-domain embedding (False: ablation without it).
        local_branch: the encoder's local attention branch and gate (False: ablation, global attention only).
    """

    n_channels: int = 1  # C: set from the dataset spec (TrainConfig.from_dict); 1 only so the dataclass has a default
    lookback: int = 96
    horizon: int = 24
    n_calendar: int = 6
    d_model: int = 64
    n_heads: int = 4
    n_encoder_layers: int = 2
    n_decoder_layers: int = 1
    d_ff: int = 128
    local_window: int = 13
    n_freq: int = 16
    conv_kernels: tuple[int, ...] = (3, 5, 7)
    smoother_widths: tuple[int, ...] = (3, 9, 25, 73)
    interp_source: bool = False
    dropout: float = 0.1
    level_norm: bool = False
    context: str = "none"
    context_group: str = ""
    context_k: int = 3
    context_dropout: float = 0.3
    n_context: int = 0
    context_index: tuple[int, ...] = ()
    freq_embedding: bool = True
    local_branch: bool = True

    def __post_init__(self) -> None:
        positive = ("n_channels", "lookback", "horizon", "n_calendar", "d_model", "n_heads", "n_encoder_layers",
                    "n_decoder_layers", "d_ff", "local_window", "n_freq")
        for name in positive:
            if int(getattr(self, name)) < 1:
                msg = f"ConFillConfig.{name} must be >= 1, got {getattr(self, name)}"
                raise ValueError(msg)
        if self.d_model % self.n_heads:
            msg = f"d_model {self.d_model} must be divisible by n_heads {self.n_heads}"
            raise ValueError(msg)
        if not 0.0 <= self.dropout < 1.0:
            msg = f"dropout must be in [0, 1), got {self.dropout}"
            raise ValueError(msg)
        # TOML/JSON give lists; keep the dataclass hashable and comparable.
        object.__setattr__(self, "conv_kernels", tuple(int(k) for k in self.conv_kernels))
        object.__setattr__(self, "smoother_widths", tuple(int(k) for k in self.smoother_widths))
        if any(k < 1 or k % 2 == 0 for k in self.smoother_widths):
            msg = f"smoother_widths must be odd, got {self.smoother_widths}"
            raise ValueError(msg)
        if self.interp_source and not self.smoother_widths:
            msg = "interp_source needs smoother_widths (the mixing head)"
            raise ValueError(msg)
        if not self.conv_kernels or any(k < 1 or k % 2 == 0 for k in self.conv_kernels):
            msg = f"conv_kernels must be odd sizes ('same' padding), got {self.conv_kernels}"
            raise ValueError(msg)
        object.__setattr__(self, "context_index", tuple(int(i) for i in self.context_index))
        if self.context not in ("none", "neighbours"):
            msg = f"context must be 'none' or 'neighbours', got {self.context!r}"
            raise ValueError(msg)
        if len(self.context_index) != self.n_context or any(not 0 <= i < self.n_channels for i in self.context_index):
            msg = f"context_index {self.context_index} must name n_context = {self.n_context} channels of {self.n_channels}"
            raise ValueError(msg)
        if not 0.0 <= self.context_dropout <= 1.0 or self.context_k < 1:
            msg = f"context_dropout must be in [0, 1] and context_k >= 1, got {self.context_dropout}, {self.context_k}"
            raise ValueError(msg)
        if self.n_freq > self.lookback // 2 + 1:
            msg = f"n_freq {self.n_freq} exceeds lookback // 2 + 1 = {self.lookback // 2 + 1}"
            raise ValueError(msg)

    @classmethod
    def from_dict(cls, d: dict) -> ConFillConfig:
        """Build from a dict (checkpoint or TOML table); unknown keys raise ValueError."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            msg = f"unknown model config keys {unknown}; known: {sorted(known)}"
            raise ValueError(msg)
        return cls(**d)


class ConFill(nn.Module):
    """ConFill: frequency-aware embedding, adaptive hierarchical encoder, non-autoregressive decoder, two heads.

    ``forward(values, observed, calendar) -> (imputed, forecast)`` is the exported contract (docs/ARCHITECTURE.md,
    "Contracts"); :meth:`compute` also returns the raw reconstruction and the encoder memory for training.
    """

    def __init__(self, cfg: ConFillConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, L, C = cfg.d_model, cfg.lookback, cfg.n_channels
        # Data embedding: value + mask, position, calendar, frequency-domain feature.
        self.value_emb = nn.Linear(2 * C, d)
        self.pos_emb = nn.Parameter(torch.randn(1, L, d) * 0.02)
        self.cal_emb = nn.Linear(cfg.n_calendar, d)
        self.freq_emb = FrequencyEmbedding(L, C, cfg.n_freq, d)
        self.emb_drop = nn.Dropout(cfg.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_encoder_layers))
        # Zero logits: every depth starts with the same weight 1/N.
        self.depth_logits = nn.Parameter(torch.zeros(cfg.n_encoder_layers))
        # Decoder queries: future calendar features + one learned embedding per horizon step.
        self.query_emb = nn.Parameter(torch.randn(1, cfg.horizon, d) * 0.02)
        self.dec_cal_emb = nn.Linear(cfg.n_calendar, d)
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_decoder_layers))
        self.impute_head = nn.Linear(d, C)
        self.forecast_head = nn.Linear(d, C)
        # Per step and channel, softmax weights over [smoother estimates..., head output(, interpolation)], chosen
        # from the memory.
        n_src = len(cfg.smoother_widths) + 1 + int(cfg.interp_source) + 2 * int(cfg.n_context > 0)
        if cfg.n_context:
            G = cfg.n_context
            self.context_emb = nn.Linear(2 * G, d)
            # [G, C] 0/1: context channel g estimates station channel context_index[g].
            pick = torch.zeros(G, C)
            pick[torch.arange(G), torch.tensor(cfg.context_index, dtype=torch.long)] = 1.0
            self.register_buffer("context_pick", pick, persistent=False)
        self.smoother = NeighbourSmoother(C, cfg.smoother_widths) if cfg.smoother_widths else None
        self.interp = GapInterpolator(L) if cfg.interp_source else None
        self.source_mix = nn.Linear(d, C * n_src) if cfg.smoother_widths else None

    def load_without_interp(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Warm-start an ``interp_source`` model from the weights of the same model trained without it.

        Every weight is copied. The narrowest smoother width's share of the mix is split in two equal halves between
        it and the interpolation source (both logits: the old one minus ln 2): for an isolated missing step the two
        estimates are the same linear interpolation, so there the model starts exactly as it was trained, and
        fine-tuning learns where the straight line is better (longer gaps).

        Args:
            state_dict: a ``state_dict`` of ``ConFill(replace(self.cfg, interp_source=False))``.

        Raises:
            ValueError: if this model has no interpolation source.
            RuntimeError: if the weights do not fit.
        """
        if self.interp is None:
            msg = "load_without_interp needs a model with interp_source = True"
            raise ValueError(msg)
        C, n_new = self.cfg.n_channels, len(self.cfg.smoother_widths) + 2
        sd = dict(state_dict)
        w_old = sd["source_mix.weight"].reshape(C, n_new - 1, -1)
        b_old = sd["source_mix.bias"].reshape(C, n_new - 1)
        b_half = b_old[:, :1] - math.log(2.0)
        sd["source_mix.weight"] = torch.cat([w_old, w_old[:, :1]], dim=1).reshape(C * n_new, -1)
        sd["source_mix.bias"] = torch.cat([b_half, b_old[:, 1:], b_half], dim=1).reshape(C * n_new)
        self.load_state_dict(sd)

    def depth_weights(self) -> torch.Tensor:
        """[N] softmax weights of the encoder depths (sum to 1)."""
        return torch.softmax(self.depth_logits, dim=0)

    @staticmethod
    def window_level(values: torch.Tensor, observed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-window, per-channel level of the observed past: (mean [B, 1, C], spread [B, 1, C]), normalised units.

        The spread is sqrt(variance + 0.01) (a floor for flat or single-reading windows); a channel with no
        observation in the window gets mean 0 and spread 1 (the global normalisation). ONNX: ReduceSum, Div, Sqrt,
        Where.
        """
        count = observed.sum(dim=1, keepdim=True)  # [B, 1, C]
        n = torch.clamp(count, min=1.0)
        mean = (values * observed).sum(dim=1, keepdim=True) / n
        var = (((values - mean) * observed) ** 2).sum(dim=1, keepdim=True) / n
        seen = count > 0
        return torch.where(seen, mean, torch.zeros_like(mean)), torch.where(seen, torch.sqrt(var + 0.01),
                                                                             torch.ones_like(var))

    def encode(self, values: torch.Tensor, observed: torch.Tensor, calendar: torch.Tensor, context=None,
               context_observed=None):
        """Embed and encode the past window (level-normalised first with ``level_norm``).

        Args: as :meth:`_encode`.
        """
        if self.cfg.level_norm:
            mean, spread = self.window_level(values, observed)
            values = (values - mean) / spread
        return self._encode(values, observed, calendar, context, context_observed)

    def _context(self, values: torch.Tensor, context, context_observed):
        """(context [B, L, G], mask [B, L, G]), zeros when not given (no neighbour reported)."""
        if context is None or context_observed is None:
            z = values.new_zeros(values.shape[:-1] + (self.cfg.n_context,))
            return z, z
        return context * context_observed, context_observed

    def _encode(self, values: torch.Tensor, observed: torch.Tensor, calendar: torch.Tensor, context=None,
                context_observed=None):
        """Embed and encode the past window.

        Args:
            values: [B, L, C] float32, normalised; anything where unobserved (it is multiplied by ``observed``).
            observed: [B, L, C] float32, 1 = observed.
            calendar: [B, L + H, F] float32 (only the first L rows are read here).
            context, context_observed: [B, L, G] float32 neighbour context and its 0/1 mask (models with
                ``n_context``; None = no neighbour reported).

        Returns:
            (memory [B, L, d] float32, key_allowed [B, 1, L] float32 0/1: steps with at least one observed channel
            or, with context, one reported neighbour value).
        """
        L = self.cfg.lookback
        xm = values * observed  # the only place values enter: unobserved cells become 0
        emb = self.value_emb(torch.cat([xm, observed], dim=-1))
        emb = emb + self.pos_emb + self.cal_emb(calendar[:, :L])
        if self.cfg.freq_embedding:
            emb = emb + self.freq_emb(xm)
        seen = observed.sum(dim=-1)  # [B, L]
        if self.cfg.n_context:
            cm, co = self._context(values, context, context_observed)
            emb = emb + self.context_emb(torch.cat([cm, co], dim=-1))
            seen = seen + co.sum(dim=-1)
        h = self.emb_drop(emb)
        key_allowed = torch.clamp(seen, max=1.0).unsqueeze(1)  # [B, 1, L]
        w = self.depth_weights()
        memory = None
        for i, layer in enumerate(self.encoder):
            h = layer(h, key_allowed)
            memory = h * w[i] if memory is None else memory + h * w[i]
        return memory, key_allowed

    def compute(self, values: torch.Tensor, observed: torch.Tensor, calendar: torch.Tensor, context=None,
                context_observed=None):
        """Run the whole network.

        Args: as :meth:`forward`.

        Returns:
            (x_hat [B, L, C] raw reconstruction, forecast [B, H, C], memory [B, L, d]), float32, normalised.
            With smoother widths configured, x_hat mixes the head's output with the :class:`NeighbourSmoother`
            estimates by per-step, per-channel softmax weights computed from the memory (unavailable estimates get
            weight 0), so short gaps start from interpolation-like values and long ones from the encoder. With
            ``interp_source`` the :class:`GapInterpolator` estimate is one more source, after the head's.
        """
        L, C = self.cfg.lookback, self.cfg.n_channels
        if self.cfg.level_norm:
            mean, spread = self.window_level(values, observed)  # [B, 1, C] each
            memory, key_allowed = self._encode((values - mean) / spread, observed, calendar, context, context_observed)
        else:
            memory, key_allowed = self._encode(values, observed, calendar, context, context_observed)
        x_hat = self.impute_head(memory)
        if self.cfg.level_norm:
            x_hat = x_hat * spread + mean  # back to the global normalisation before mixing with the estimates
        if self.smoother is not None:
            est, avail = self.smoother(values * observed, observed)  # [B, L, C, W] each
            sources = torch.cat([est, x_hat.unsqueeze(-1)], dim=-1)  # [B, L, C, W+1]
            avail = torch.cat([avail, torch.ones_like(x_hat).unsqueeze(-1)], dim=-1)
            if self.interp is not None:
                i_est, i_avail = self.interp(values * observed, observed)  # [B, L, C] each
                sources = torch.cat([sources, i_est.unsqueeze(-1)], dim=-1)  # [B, L, C, W+2]
                avail = torch.cat([avail, i_avail.unsqueeze(-1)], dim=-1)
            if self.cfg.n_context:
                c_est, c_avail = self.context_sources(values, observed, context, context_observed)
                sources = torch.cat([sources, c_est], dim=-1)  # [B, L, C, n_src]
                avail = torch.cat([avail, c_avail], dim=-1)
            n_src = sources.shape[-1]
            logits = self.source_mix(memory).reshape(-1, L, C, n_src) + (1.0 - avail) * NEG_MASK
            x_hat = (torch.softmax(logits, dim=-1) * sources).sum(dim=-1)  # [B, L, C]
        q = self.query_emb + self.dec_cal_emb(calendar[:, L:])  # [B, H, d]
        for layer in self.decoder:
            q = layer(q, memory, key_allowed)
        forecast = self.forecast_head(q)
        if self.cfg.level_norm:
            forecast = forecast * spread + mean
        return x_hat, forecast, memory

    def context_sources(self, values: torch.Tensor, observed: torch.Tensor, context, context_observed):
        """The two neighbour estimates of the imputation mix, on the station channels.

        Args:
            values, observed: [B, L, C] float32 (global normalisation).
            context, context_observed: [B, L, G] float32 or None.

        Returns:
            (estimate [B, L, C, 2], available [B, L, C, 2]): the neighbour value and the neighbour value plus the
            window's mean offset ``mean(x - context)`` over the steps where both are observed; unavailable for
            channels without context and at steps where no neighbour reported.
        """
        cm, co = self._context(values, context, context_observed)
        ctx = torch.matmul(cm, self.context_pick)  # [B, L, C]
        cav = torch.matmul(co, self.context_pick)
        both = observed * cav
        n = both.sum(dim=1, keepdim=True)  # [B, 1, C]
        offset = ((values - ctx) * both).sum(dim=1, keepdim=True) / torch.clamp(n, min=1.0)
        est = torch.stack([ctx, ctx + offset], dim=-1)
        avail = torch.stack([cav, cav * torch.clamp(n, max=1.0)], dim=-1)
        return est, avail

    def forward(self, values: torch.Tensor, observed: torch.Tensor, calendar: torch.Tensor, context=None,
                context_observed=None):
        """Fill the window's gaps and forecast the horizon.

        Args:
            values: [B, L, C] float32, normalised, 0 where unobserved (any value there is ignored).
            observed: [B, L, C] float32, 1 = observed, 0 = missing.
            calendar: [B, L + H, F] float32, calendar features of the past and future steps.
            context, context_observed: [B, L, G] float32 neighbour context and its 0/1 mask
                (``gapcast.neighbours.build_context``), for models with ``n_context``; None = no neighbour.

        Returns:
            imputed: [B, L, C] float32, normalised: the observed values where observed, the model's estimate
                elsewhere (m * x + (1 - m) * x_hat).
            forecast: [B, H, C] float32, normalised.
        """
        x_hat, forecast, _ = self.compute(values, observed, calendar, context, context_observed)
        imputed = observed * values + (1.0 - observed) * x_hat
        return imputed, forecast
