"""Training rollouts through the KV cache: Self-Forcing and Diagonal Forcing, on the engine's chunk step.

Both generate a whole clip chunk by chunk the way inference does, with exactly one forward per chunk
keeping its graph (the exit step); every other forward, and every context pass, runs without gradient, so
gradients never cross chunks through the cache.

- "self-forcing": every chunk uses its schedule list, exits at a shared random step, and writes a clean
  (t = 0) context after itself.
- "diagonal" (Diagonal Forcing): the per-chunk lists are the inference schedule's; chunk 0 exits at its last
  step and writes a clean context; chunks >= 1 exit at the shared random step and write their output
  re-noised to their last timestep, i.e. the partially denoised context inference keeps.

The exit draw `exit_u` in [0, 1) maps to step floor(exit_u * len(steps)) of each chunk. Draw it from a
generator seeded the same on every rank (or broadcast it) so that all ranks run the same graph.

`teacher_forced` is CausVid's generator pass instead: no self-rollout; each chunk is a ground-truth chunk
noised to one step of its list and denoised in one forward, against a cache that holds the clean ground
truth of the earlier chunks.
"""

from __future__ import annotations

import torch

from diagvid.model.dit import WanDiT
from diagvid.sampling import FlowMatch, Schedule
from diagvid.stream import denoise_chunk

ROLLOUTS = ("self-forcing", "diagonal")


def _model(generator: torch.nn.Module) -> WanDiT:
    # a DDP wrapper forwards calls but not methods; the cache is sized from the model itself
    return getattr(generator, "module", generator)


def exit_steps(schedule: Schedule, num_chunks: int, mode: str, exit_u: float) -> list[int]:
    """The step index that keeps its gradient, per chunk."""
    if mode not in ROLLOUTS:
        raise ValueError(f"rollout mode={mode!r}; allowed: {ROLLOUTS}")
    if not 0 <= exit_u < 1:
        raise ValueError(f"exit_u={exit_u} must be in [0, 1)")
    out = []
    for k in range(num_chunks):
        n = len(schedule.chunk_steps(k))
        out.append(n - 1 if (mode == "diagonal" and k == 0) else min(int(exit_u * n), n - 1))
    return out


def context_timesteps(schedule: Schedule, num_chunks: int, mode: str) -> list[float]:
    """The timestep each chunk's context pass uses: 0 (clean) or the chunk's last step (noisy)."""
    if mode == "self-forcing":
        return [schedule.context_t] * num_chunks
    return [schedule.context_t if k == 0 else float(schedule.chunk_steps(k)[-1]) for k in range(num_chunks)]


def rollout(
    generator: WanDiT,
    fm: FlowMatch,
    noise: torch.Tensor,
    ctx: torch.Tensor,
    schedule: Schedule,
    frames_per_chunk: int,
    *,
    mode: str,
    exit_u: float,
    gen: torch.Generator,
) -> torch.Tensor:
    """Generate x0 [B, C, F, h, w] from noise chunk by chunk; the graph runs through each chunk's exit forward."""
    b, _, f, h, w = noise.shape
    if f % frames_per_chunk:
        raise ValueError(f"{f} latent frames do not split into chunks of {frames_per_chunk}")
    num_chunks = f // frames_per_chunk
    schedule.check_fits(num_chunks)
    exits = exit_steps(schedule, num_chunks, mode, exit_u)
    contexts = context_timesteps(schedule, num_chunks, mode)
    cache = _model(generator).new_cache(batch_size=b, latent_hw=(h, w), capacity_frames=f)
    outs = []
    for k in range(num_chunks):
        a = k * frames_per_chunk
        x0 = denoise_chunk(
            generator,
            fm,
            noise[:, :, a : a + frames_per_chunk],
            schedule.chunk_steps(k),
            ctx,
            cache,
            a,
            gen,
            context_t=contexts[k],
            exit_step=exits[k],
        )
        outs.append(x0)
    return torch.cat(outs, dim=2)


def teacher_forced(
    generator: torch.nn.Module,
    fm: FlowMatch,
    clean: torch.Tensor,
    ctx: torch.Tensor,
    schedule: Schedule,
    frames_per_chunk: int,
    *,
    gen: torch.Generator,
) -> torch.Tensor:
    """x0 [B, C, F, h, w] of ground truth `clean` noised chunk by chunk, each chunk seeing clean context.

    Chunk k is noised to a step of its list drawn from `gen` (one draw per chunk, as CausVid draws per
    block), denoised in one forward that keeps its graph, then the clean chunk is written over its cache
    slots at `schedule.context_t` without gradient, so later chunks condition on the ground truth.
    """
    b, _, f, h, w = clean.shape
    if f % frames_per_chunk:
        raise ValueError(f"{f} latent frames do not split into chunks of {frames_per_chunk}")
    num_chunks = f // frames_per_chunk
    schedule.check_fits(num_chunks)
    cache = _model(generator).new_cache(batch_size=b, latent_hw=(h, w), capacity_frames=f)
    outs = []
    for k in range(num_chunks):
        a = k * frames_per_chunk
        steps = schedule.chunk_steps(k)
        t = float(steps[int(torch.randint(len(steps), (), generator=gen))])
        x_k = clean[:, :, a : a + frames_per_chunk]
        noise = torch.randn(x_k.shape, generator=gen).to(x_k.device, x_k.dtype)
        outs.append(denoise_chunk(generator, fm, fm.add_noise(x_k, noise, t), [t], ctx, cache, a, gen))
        with torch.no_grad():
            t_ctx = torch.full((b, frames_per_chunk), float(schedule.context_t), device=clean.device)
            generator(x_k, t_ctx, ctx, cache=cache, start_frame=a)
    return torch.cat(outs, dim=2)
