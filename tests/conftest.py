"""Shared fixtures: tiny random models and seeded inputs, so every test builds them the same way."""

from __future__ import annotations

import pytest
import torch

from diagvid.model.dit import WanDiT, preset

# tests run tiny tensors, where threading costs more than it gains (and xdist workers share two cores)
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


VOCAB = [
    "a",
    "red",
    "blue",
    "green",
    "circle",
    "square",
    "moves",
    "left",
    "right",
    "up",
    "down",
    "fast",
    "slowly",
]


def make_tiny_pipeline(seed: int = 0, **stream_overrides):
    """A complete pipeline of tiny random models: DiT (4 latent channels), VAE (4x spatial), toy text encoder."""
    from diagvid.model.text import ToyTextConfig, ToyTextEncoder
    from diagvid.model.vae import WanVAE
    from diagvid.model.vae import preset as vae_preset
    from diagvid.stream import Pipeline, StreamConfig

    torch.manual_seed(seed)
    text = ToyTextEncoder(VOCAB, ToyTextConfig(d_model=12, num_layers=1, num_heads=2, d_ff=16, text_len=6))
    dit = randomize(WanDiT(preset("tiny")), seed=seed, std=0.2).eval()
    vae = WanVAE(vae_preset("tiny")).eval()
    cfg = StreamConfig(frames_per_chunk=2, latent_hw=(4, 4), fps=16, **stream_overrides)
    return Pipeline(dit, vae, text, cfg)


@pytest.fixture(scope="session")
def _tiny_pipeline_models():
    return make_tiny_pipeline()


@pytest.fixture
def tiny_pipeline(_tiny_pipeline_models):
    """A tiny random pipeline (16x16 pixels, 4x4 latents, 2 latent frames a chunk) with fresh counters.

    The models are built once per session (the text encoder is slow to construct); tests must not change
    their weights.
    """
    from diagvid.model.dit import ForwardStats
    from diagvid.stream import Pipeline, StreamConfig

    m = _tiny_pipeline_models
    m.generator.stats = ForwardStats()
    return Pipeline(
        m.generator, m.vae, m.text_encoder, StreamConfig(frames_per_chunk=2, latent_hw=(4, 4), fps=16)
    )
