"""Distillation losses: their gradients are the intended directions, and the motion term moves the generator."""

from __future__ import annotations

import torch

from diagvid.model.dit import WanDiT, preset
from diagvid.train.losses import (
    critic_loss,
    dmd_direction,
    dmd_loss,
    flow_matching_motion_loss,
    motion_frame_weights,
    sample_dmd_timesteps,
    temporal_difference,
)
from tests.conftest import randomize, tiny_inputs


def latents(seed: int, shape=(2, 4, 5, 4, 4)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_dmd_gradient_is_the_normalised_direction():
    x = latents(0).requires_grad_(True)
    real, fake = latents(1), latents(2)
    loss, _ = dmd_loss(x, real, fake)
    loss.backward()
    expect = dmd_direction(x.detach(), real, fake) / x.numel()
    assert torch.allclose(x.grad, expect.to(x.grad.dtype), atol=1e-7)
    # the normaliser is per sample: scaling one sample's distance to the teacher scales only its direction
    x2 = x.detach().clone()
    x2[1] = real[1] + 3 * (x2[1] - real[1])
    d1, d2 = dmd_direction(x.detach(), real, fake), dmd_direction(x2, real, fake)
    assert torch.allclose(d2[0], d1[0]) and torch.allclose(d2[1], d1[1] / 3, atol=1e-6)


def test_dmd_moves_x_towards_the_real_score():
    x = latents(0).requires_grad_(True)
    real, fake = latents(1), x.detach() + 0.0  # the critic thinks samples are where they are
    loss, _ = dmd_loss(x, real, fake)
    loss.backward()
    stepped = x.detach() - 100.0 * x.grad
    assert (stepped - real).norm() < (x.detach() - real).norm()


def test_motion_term_alone_gives_the_generator_a_gradient():
    torch.manual_seed(0)
    gen = randomize(WanDiT(preset("tiny")), seed=3, std=0.2)
    noise, t, ctx = tiny_inputs(gen, frames=4)
    x = gen(noise, t, ctx, attention="causal", frames_per_chunk=2)  # the generator's output, with graph
    real, fake = latents(1, x.shape), latents(2, x.shape)
    loss, _ = flow_matching_motion_loss(x, real, fake)
    loss.backward()
    grads = [p.grad.abs().sum() for p in gen.parameters() if p.grad is not None]
    assert grads and sum(grads) > 0
    # a critic that agrees with the teacher on motion gives no motion gradient at all
    gen.zero_grad()
    x = gen(noise, t, ctx, attention="causal", frames_per_chunk=2)
    loss, _ = flow_matching_motion_loss(x, real, real.clone())
    loss.backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in gen.parameters())


def test_motion_gradient_is_the_adjoint_of_the_frame_difference():
    x = latents(0).requires_grad_(True)
    real, fake = latents(1), latents(2)
    loss, _ = flow_matching_motion_loss(x, real, fake)
    loss.backward()
    m = temporal_difference(x.detach())
    rm, fm = temporal_difference(real), temporal_difference(fake)
    g = (fm - rm) / (m - rm).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    wg = motion_frame_weights(g) * g / m.numel()
    expect = torch.zeros_like(x)
    expect[:, :, 1:] += wg
    expect[:, :, :-1] -= wg
    assert torch.allclose(x.grad, expect, atol=1e-6)


def test_frame_weights_are_per_sample_and_grow_with_time():
    g = latents(3, (3, 4, 6, 2, 2))
    g[1] *= 0
    w = motion_frame_weights(g)
    assert w.shape == (3, 1, 6, 1, 1)
    assert (w[0, 0, 1:, 0, 0] >= w[0, 0, :-1, 0, 0]).all()
    assert torch.isfinite(w).all()


def test_critic_loss_is_flow_matching_and_timesteps_are_clamped():
    x, noise = latents(0), latents(1)
    assert critic_loss(noise - x, noise, x) == 0
    assert critic_loss(noise, noise, x) > 0
    t = sample_dmd_timesteps(4096, 5.0, generator=torch.Generator().manual_seed(0))
    assert t.min() >= 20 and t.max() <= 980 and t.median() > 600  # the shift favours high noise
