"""Shared fixtures: tiny random models and seeded inputs, so every test builds them the same way."""

from __future__ import annotations

import os

import pytest
import torch

from diagvid.model.dit import WanDiT, preset

# two pytest-xdist workers share two cores: one thread each avoids oversubscription
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """Overwrite every parameter with seeded noise: an untrained Wan has a zero head and would hide bugs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


@pytest.fixture
def tiny_dit() -> WanDiT:
    """The `tiny` preset with random (non-zero) weights, in eval mode."""
    torch.manual_seed(0)
    return randomize(WanDiT(preset("tiny"))).eval()


def tiny_inputs(model: WanDiT, batch: int = 2, frames: int = 6, hw: tuple[int, int] = (4, 6), seed: int = 1):
    """Seeded latents [B, C, F, H, W], per-frame timesteps [B, F] and text context [B, T, text_dim]."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    x = torch.randn(batch, cfg.in_dim, frames, *hw, generator=gen)
    t = torch.rand(batch, frames, generator=gen) * 1000
    ctx = torch.randn(batch, cfg.text_len, cfg.text_dim, generator=gen)
    return x, t, ctx
