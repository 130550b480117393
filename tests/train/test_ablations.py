"""ConFill ablation switches (issue 19): each removes exactly its part of the network."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gapcast.train.model import ConFill, ConFillConfig

CFG = ConFillConfig(n_channels=3, lookback=24, horizon=6, d_model=8, n_heads=2, d_ff=16, local_window=5, n_freq=4,
                    smoother_widths=(3, 9), dropout=0.0)


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(2, 24, 3, generator=g)
    o = (torch.rand(2, 24, 3, generator=g) > 0.3).float()
    c = torch.randn(2, 30, 6, generator=g)
    return v, o, c


def _grads(model: ConFill) -> dict[str, torch.Tensor | None]:
    model.zero_grad()
    x_hat, fc, _ = model.compute(*_inputs())
    (x_hat.sum() + fc.sum()).backward()
    return {k: p.grad for k, p in model.named_parameters()}


@pytest.mark.parametrize(("switch", "unused"), [("freq_embedding", "freq_emb."), ("local_branch", ".local_attn.")])
def test_switched_off_parts_get_no_gradient(switch, unused):
    torch.manual_seed(0)
    on = _grads(ConFill(CFG))
    off = _grads(ConFill(dataclasses.replace(CFG, **{switch: False})))
    assert any(unused in k and g is not None and g.abs().sum() > 0 for k, g in on.items())
    assert all(g is None for k, g in off.items() if unused in k)
    # everything else still learns
    assert all(g is not None for k, g in off.items() if unused not in k and "gate" not in k)


def test_local_branch_off_is_global_attention_only():
    torch.manual_seed(0)
    m = ConFill(dataclasses.replace(CFG, local_branch=False)).eval()
    layer = m.encoder[0].attn
    x = torch.randn(2, 24, 8)
    allowed = torch.ones(2, 1, 24)
    y, gate = layer(x, allowed, return_gate=True)
    assert torch.allclose(y, layer.norm(x + layer.out(layer.global_attn(x, x, allowed))), atol=1e-6)
    assert torch.equal(gate, torch.ones_like(gate))


def test_defaults_keep_old_checkpoints_loadable():
    # a checkpoint config written before the switches existed rebuilds the same network
    old = {k: v for k, v in dataclasses.asdict(CFG).items() if k not in ("freq_embedding", "local_branch")}
    rebuilt = ConFillConfig.from_dict(old)
    assert rebuilt.freq_embedding and rebuilt.local_branch
    assert ConFill(rebuilt).state_dict().keys() == ConFill(CFG).state_dict().keys()
