"""Distribution-matching losses as pure functions of tensors: DMD, the flow (motion) term, the critic.

Each generator loss is written as 0.5 * ||y - stopgrad(y - g)||^2, whose gradient with respect to y is
exactly g / numel: the loss value itself is meaningless, its gradient is the update direction. Shapes:
latents [B, C, F, H, W].

The flow distribution matching term applies the same construction to temporal differences of the
generator's output (the motion). In the published Diagonal Distillation code this term is computed under
`no_grad` and never reaches the generator (reference spec §4.4); here the motion operator is applied to
the generator output WITH gradient, so the term moves the generator (tested).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diagvid.sampling import shift_sigma


def _per_sample_mean_abs(x: torch.Tensor) -> torch.Tensor:
    """mean |x| over every axis but the batch, shaped to broadcast against x."""
    return x.abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True)


def dmd_direction(x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor) -> torch.Tensor:
    """DMD's normalised update direction (fake - real) / mean|x - real| per sample (DMD eq. 8), NaN-safe."""
    grad = (fake_x0 - real_x0) / _per_sample_mean_abs(x - real_x0).clamp_min(1e-8)
    return torch.nan_to_num(grad)


def dmd_loss(x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Generator loss whose gradient w.r.t. x is the DMD direction; real/fake x0 must carry no gradient."""
    grad = dmd_direction(x.detach(), real_x0.detach(), fake_x0.detach())
    target = (x.detach() - grad).double()
    loss = 0.5 * F.mse_loss(x.double(), target)
    return loss, {"dmd_grad_norm": grad.norm().item()}


def temporal_difference(x: torch.Tensor) -> torch.Tensor:
    """Frame-to-frame change along the latent frame axis: [B, C, F, H, W] -> [B, C, F-1, H, W]."""
    return x[:, :, 1:] - x[:, :, :-1]


def motion_frame_weights(g_motion: torch.Tensor, growth: float = 1.2, mix: float = 0.7) -> torch.Tensor:
    """Per-sample, per-frame weights [B, 1, F-1, 1, 1]: later frames count more (drift builds up there).

    Dynamic part: 1 + cumulative share of the motion discrepancy up to each frame (1 .. 2); exponential
    part: growth**f normalised to mean 1; mixed `mix` : (1 - mix), as the DD code intended, but per sample.
    """
    b, _, f = g_motion.shape[:3]
    e = g_motion.detach().square().mean(dim=(1, 3, 4))  # [B, F-1]
    w_dyn = 1 + e.cumsum(dim=1) / e.sum(dim=1, keepdim=True).clamp_min(1e-12)
    w_exp = growth ** torch.arange(f, dtype=e.dtype, device=e.device)
    w_exp = (w_exp / w_exp.mean()).expand(b, f)
    return (mix * w_dyn + (1 - mix) * w_exp).view(b, 1, f, 1, 1)


def flow_matching_motion_loss(
    x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor
) -> tuple[torch.Tensor, dict]:
    """Match the generator's motion distribution to the teacher's, with gradient to the generator.

    g = (dT(fake) - dT(real)) / mean|dT(x) - dT(real)|; loss = mean_f w_f * 0.5 * (dT(x) - sg(dT(x) - g))^2,
    so the gradient w.r.t. dT(x) is w * g / numel and flows back through dT into x and the generator.
    """
    motion = temporal_difference(x)  # keeps the graph
    real_m = temporal_difference(real_x0.detach())
    fake_m = temporal_difference(fake_x0.detach())
    g = torch.nan_to_num((fake_m - real_m) / _per_sample_mean_abs(motion.detach() - real_m).clamp_min(1e-8))
    w = motion_frame_weights(g)
    target = (motion.detach() - g).double()
    loss = 0.5 * (w * (motion.double() - target).square()).mean()
    return loss, {"motion_grad_norm": g.norm().item()}


def critic_loss(v_pred: torch.Tensor, noise: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The fake score's flow-matching loss on generator samples x (no gradient into the generator)."""
    return F.mse_loss(v_pred.float(), (noise - x.detach()).float())


def sample_dmd_timesteps(
    batch: int,
    shift: float,
    *,
    min_t: float = 20.0,
    max_t: float = 980.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One timestep per sample: uniform, shifted, clamped to [min_t, max_t] (CausVid / Self-Forcing)."""
    u = torch.randint(0, 1000, (batch,), generator=generator).double() / 1000
    return (1000 * shift_sigma(u, shift)).clamp(min_t, max_t).float()
