"""CausVid's initialisation: teacher ODE trajectories, then regression of a block-causal student onto them.

Stage 1 (`ode_pairs`) runs the teacher's sampler (Euler, shift, CFG) and keeps the states at the teacher
steps closest to the student's denoising timesteps, plus the final sample. Stage 2 (`ode_regression_loss`)
picks one of those states per chunk (so chunks sit at different noise levels, as at inference), runs the
student once in block-causal parallel mode and regresses its x0 onto the teacher's final sample. Chunks
given the clean state act as clean context and are left out of the loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from diagvid.model.dit import WanDiT
from diagvid.sampling import FlowMatch, sample_euler, teacher_timesteps


def trajectory_indices(student_steps: Sequence[float], num_steps: int, shift: float) -> list[int]:
    """Teacher step index whose timestep is nearest each student timestep (CausVid: [0, 36, 44] of 50)."""
    ts = torch.tensor(teacher_timesteps(num_steps, shift))
    return [int((ts - float(t)).abs().argmin()) for t in student_steps]


@torch.no_grad()
def ode_pairs(
    teacher: WanDiT,
    noise: torch.Tensor,
    context: torch.Tensor,
    null_context: torch.Tensor,
    student_steps: Sequence[float],
    *,
    num_steps: int = 50,
    shift: float = 5.0,
    guidance: float = 5.0,
) -> tuple[torch.Tensor, list[float]]:
    """Teacher trajectories [B, S + 1, C, F, h, w] at the student's S steps plus the clean end, and the
    teacher timesteps actually kept (they differ slightly from the requested ones)."""
    idx = trajectory_indices(student_steps, num_steps, shift)
    if sorted(set(idx)) != idx:
        raise ValueError(
            f"student steps {list(student_steps)} map to teacher steps {idx}; need distinct, increasing"
        )
    _, saved = sample_euler(
        teacher,
        noise,
        context,
        null_context,
        num_steps=num_steps,
        shift=shift,
        guidance=guidance,
        trajectory_at=(*idx, num_steps),
    )
    traj = torch.stack([saved[i] for i in (*idx, num_steps)], dim=1)
    kept = [teacher_timesteps(num_steps, shift)[i] for i in idx]
    return traj, kept


def ode_regression_loss(
    student: WanDiT,
    traj: torch.Tensor,
    timesteps: Sequence[float],
    context: torch.Tensor,
    frames_per_chunk: int,
    gen: torch.Generator,
    fm: FlowMatch | None = None,
) -> tuple[torch.Tensor, dict]:
    """MSE between the student's x0 and the teacher's final sample, one trajectory state per chunk.

    traj [B, S + 1, C, F, h, w] from `ode_pairs`; index S is the clean sample (timestep 0).
    """
    fm = fm or FlowMatch(sigma_mode="exact")
    b, s1, _, f = traj.shape[:4]
    if f % frames_per_chunk:
        raise ValueError(f"{f} latent frames do not split into chunks of {frames_per_chunk}")
    chunks = f // frames_per_chunk
    pick = torch.randint(0, s1, (b, chunks), generator=gen)  # same state for every frame of a chunk
    pick_f = pick.repeat_interleave(frames_per_chunk, dim=1)  # [B, F]
    t_all = torch.tensor([*map(float, timesteps), 0.0])
    t = t_all[pick_f].to(traj.device)  # [B, F]
    frame = torch.arange(f)
    x_in = traj[torch.arange(b)[:, None], pick_f, :, frame[None, :]]  # [B, F, C, h, w]
    x_in = x_in.permute(0, 2, 1, 3, 4)  # [B, C, F, h, w]
    clean = traj[:, -1]
    v = student(x_in, t, context, attention="causal", frames_per_chunk=frames_per_chunk)
    x0 = fm.x0_from_v(x_in, v, t)
    noisy = (pick_f < s1 - 1).to(x0.dtype)[:, None, :, None, None]  # clean-context frames carry no loss
    err = (x0.float() - clean.float()).square() * noisy
    denom = noisy.expand_as(err).sum().clamp_min(1)
    return err.sum() / denom, {"noisy_chunks": int((pick < s1 - 1).sum())}
