"""Distribution matching distillation on models: the two scores at a noised sample and the two updates.

- real score: the frozen teacher with classifier-free guidance;
- fake score: the critic, a bidirectional DiT that keeps learning the generator's output distribution by
  flow matching on detached generator samples (`critic_update_loss`);
- generator: `generator_loss` = dmd_weight * DMD + flow_weight * flow distribution matching, both built
  from the same (real, fake) x0 pair at one noised copy of the generator's output.

Timesteps follow the DMD law of CausVid / Self-Forcing: uniform, shifted, clamped to [min_t, max_t], one
per sample. Everything random is drawn from the generator passed in. Shapes: latents [B, C, F, h, w].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diagvid.sampling import FlowMatch
from diagvid.train.losses import critic_loss, dmd_loss, flow_matching_motion_loss, sample_dmd_timesteps


@dataclass(frozen=True)
class DMDSettings:
    """The numbers of one DMD update (from the distill recipe)."""

    guidance: float
    """real-score CFG scale w: v = v_uncond + w (v_cond - v_uncond)"""
    shift: float
    """shift of the timestep law"""
    min_t: float
    max_t: float
    dmd_weight: float
    flow_weight: float


def guided_x0(
    model: torch.nn.Module,
    fm: FlowMatch,
    x_t: torch.Tensor,
    t: torch.Tensor,
    ctx: torch.Tensor,
    null_ctx: torch.Tensor | None,
    guidance: float,
) -> torch.Tensor:
    """x0 predicted by a bidirectional model; with `null_ctx` and guidance != 1 the conditional and
    unconditional passes are one batched forward."""
    if null_ctx is None or guidance == 1.0:
        v = model(x_t, t, ctx, attention="full")
    else:
        v_c, v_u = model(
            torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([ctx, null_ctx]), attention="full"
        ).chunk(2)
        v = v_u + guidance * (v_c - v_u)
    return fm.x0_from_v(x_t, v, t)


def noised(
    x: torch.Tensor, fm: FlowMatch, s: DMDSettings, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A noised copy of x at DMD timesteps: (x_t, t [B], noise)."""
    t = sample_dmd_timesteps(x.shape[0], s.shift, min_t=s.min_t, max_t=s.max_t, generator=gen).to(x.device)
    noise = torch.randn(x.shape, generator=gen).to(x.device, x.dtype)
    return fm.add_noise(x.detach(), noise, t), t, noise


def generator_loss(
    x: torch.Tensor,
    teacher: torch.nn.Module,
    critic: torch.nn.Module,
    fm: FlowMatch,
    ctx: torch.Tensor,
    null_ctx: torch.Tensor,
    s: DMDSettings,
    gen: torch.Generator,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The generator's loss on its output x (with graph): DMD and/or the flow (motion) term.

    The scores run without gradient; the loss's gradient w.r.t. x is the weighted sum of the two
    normalised directions (see `losses.py`), so a weight of 0 removes a term exactly.
    """
    x_t, t, _ = noised(x, fm, s, gen)
    with torch.no_grad():
        real = guided_x0(teacher, fm, x_t, t, ctx, null_ctx, s.guidance).float()
        fake = guided_x0(critic, fm, x_t, t, ctx, None, 1.0).float()
    x = x.float()
    loss = x.new_zeros((), dtype=torch.float64)
    metrics: dict[str, float] = {}
    if s.dmd_weight:
        term, info = dmd_loss(x, real, fake)
        loss = loss + s.dmd_weight * term
        metrics |= {"loss_dmd": term.item(), **info}
    if s.flow_weight:
        term, info = flow_matching_motion_loss(x, real, fake)
        loss = loss + s.flow_weight * term
        metrics |= {"loss_flow": term.item(), **info}
    return loss, metrics


def critic_update_loss(
    x: torch.Tensor,
    critic: torch.nn.Module,
    fm: FlowMatch,
    ctx: torch.Tensor,
    s: DMDSettings,
    gen: torch.Generator,
) -> torch.Tensor:
    """The critic's flow-matching loss on a detached generator sample x."""
    x_t, t, noise = noised(x.detach(), fm, s, gen)
    v = critic(x_t, t, ctx, attention="full")
    return critic_loss(v, noise, x.detach())
