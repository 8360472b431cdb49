"""Stage 3, DMD distillation of the causal student (`diagvid train distill`).

Models: the generator (the causal student, from the init stage or the teacher), the real score (the frozen
teacher, with CFG) and the fake score (the critic, initialised from the teacher and trained on detached
generator samples). One training step is `critic_steps` critic updates followed by one generator update
(Self-Forcing's 5 : 1), each on a fresh global batch of prompts.

How the generator produces its training sample is the rollout mode:
- "causvid": teacher forcing on ground truth (the clean ends of ODE pairs): each chunk noised to one of its
  schedule steps and denoised once against the clean earlier chunks (`rollout.teacher_forced`);
- "self-forcing": the generator's own rollout through the KV cache, clean context after every chunk;
- "diagonal": Diagonal Forcing, the per-chunk lists of the schedule and the noisy context inference keeps.

Every random number comes from a generator keyed by what it is for: the noise and prompt of a sample by its
position in the stream of global batches, the rollout's exit step by the step alone (so every rank and
micro-batch runs the same graph), the DMD timesteps by the micro-batch. With the same global batch and
per-rank batch, 1 rank x N micro-batches and N ranks x 1 micro-batch compute the same update.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from diagvid.config import to_dict
from diagvid.model.dit import WanDiT
from diagvid.model.experts import NoiseExperts, check_experts
from diagvid.sampling import NUM_TRAIN_TIMESTEPS, SIGMA_MODES, FlowMatch, Schedule, get_schedule
from diagvid.train.distributed import (
    ModelState,
    OptimizerState,
    ParallelConfig,
    Runtime,
    clip_grad_norm,
    setup,
    unwrap,
)
from diagvid.train.dmd import DMDSettings, critic_update_loss, generator_loss
from diagvid.train.loop import EMA, adamw_with_warmup, run_loop, seeded, start_run, write_model_config
from diagvid.train.ode import OdeShards, Shuffle, read_prompts, sample_prompt
from diagvid.train.rollout import ROLLOUTS, rollout, teacher_forced
from diagvid.train.teacher import OptimConfig

if TYPE_CHECKING:  # the text module imports transformers; only its type is needed here
    from diagvid.model.text import TextEncoder

log = logging.getLogger("diagvid.train")

ROLLOUT_MODES = ("causvid", *ROLLOUTS)


def _generator_optim() -> OptimConfig:
    # Self-Forcing / DD: AdamW lr 2e-6, betas (0, 0.999), weight decay 0.01, clip 10
    return OptimConfig(lr=2e-6, betas=(0.0, 0.999), weight_decay=0.01, warmup=0, grad_clip=10.0)


def _critic_optim() -> OptimConfig:
    # Self-Forcing / DD: the critic learns 5x slower than the generator, same betas and clip
    return OptimConfig(lr=4e-7, betas=(0.0, 0.999), weight_decay=0.01, warmup=0, grad_clip=10.0)


@dataclass
class DistillConfig:
    """A DMD distillation run."""

    generator: str = "runs/toy-init/export"
    """bundled name or folder of the generator's starting weights (the init stage's export, or the teacher)"""
    teacher: str = "toy/teacher"
    """the real score: a bidirectional DiT, frozen"""
    teacher_high: str | None = None
    """a high-noise expert that is the real score at levels >= teacher_boundary, the teacher below
    (`NoiseExperts`): toy/teacher-high with teacher = "toy/teacher-deep" (or "toy/teacher-low"); None: one teacher"""
    teacher_boundary: float | None = None
    """the noise level in (0, 1) where teacher_high hands over (None: the toy expert's 0.7)"""
    critic: str | None = None
    """the fake score's starting weights (None: the teacher's)"""
    text: str = "toy/text"
    """bundled name or folder of the text encoder"""
    rollout: str = "diagonal"
    """how the generator makes its training samples: "causvid", "self-forcing" or "diagonal\""""
    schedule: str = "diagonal"
    """per-chunk steps: a preset (diagonal, diagonal-5to2, self-forcing, causvid) or "1000,933,357;1000,357\""""
    frames_per_chunk: int = 3
    """latent frames per chunk K"""
    num_chunks: int = 7
    """chunks per training clip (7 x 3 = 21 latent frames, 81 pixel frames)"""
    latent_hw: tuple[int, int] = (8, 8)
    """latent height and width"""
    ode_dir: str | None = None
    """rollout "causvid": ODE pairs whose clean samples and text are the ground truth"""
    prompts: str | None = None
    """text file of prompts, one a line; None: toy-world captions drawn from each sample's seed"""
    negative_prompt: str = ""
    """the unconditional prompt of the real score's CFG"""
    p_two: float = 0.25
    """toy-world captions: probability of a two-object prompt"""
    guidance: float = 4.0
    """real-score CFG scale w: v = v_u + w (v_c - v_u); Self-Forcing's guidance_scale 3 is w = 4"""
    shift: float = 5.0
    """flow shift of the sigma table (sigma_mode "nearest")"""
    sigma_mode: str = "exact"
    """"exact" (sigma = t / 1000) or "nearest" (reference table lookup)"""
    dmd_shift: float = 5.0
    """shift of the DMD / critic timestep law"""
    min_t: float = 20.0
    """DMD timesteps are clamped to [min_t, max_t] (2 % and 98 % of 1000)"""
    max_t: float = 980.0
    dmd_weight: float = 1.0
    """weight of the DMD term of the generator loss"""
    flow_weight: float = 0.0
    """weight of flow distribution matching (the motion term, with gradient); 0 turns it off"""
    critic_steps: int = 5
    """critic updates before each generator update"""
    steps: int = 600
    """generator updates"""
    batch_size: int = 1
    """samples per rank per micro-batch"""
    global_batch: int | None = None
    """samples per update over ranks and micro-batches (None: batch_size x world size)"""
    generator_optim: OptimConfig = field(default_factory=_generator_optim)
    critic_optim: OptimConfig = field(default_factory=_critic_optim)
    ema_decay: float = 0.99
    """generator EMA decay"""
    ema_start: int = 200
    """the EMA copies the generator until this step, then averages"""
    seed: int = 0
    out_dir: str = "runs/toy-distill-diagonal"
    log_every: int = 1
    ckpt_every: int = 50
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        if self.rollout not in ROLLOUT_MODES:
            raise ValueError(f"rollout={self.rollout!r}; allowed: {ROLLOUT_MODES}")
        check_experts(self.teacher_high, self.teacher_boundary)
        for name in ("frames_per_chunk", "num_chunks", "steps", "batch_size", "log_every", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if len(self.latent_hw) != 2 or min(self.latent_hw) < 1:
            raise ValueError(f"latent_hw={self.latent_hw} must be two positive sizes")
        self.schedule_object().check_fits(self.num_chunks)  # a user list longer than the clip is an error
        if self.rollout == "causvid" and self.ode_dir is None:
            raise ValueError('rollout="causvid" trains on ground truth: set ode_dir to a folder of ODE pairs')
        if self.dmd_weight < 0 or self.flow_weight < 0 or not (self.dmd_weight or self.flow_weight):
            raise ValueError(
                f"dmd_weight={self.dmd_weight} and flow_weight={self.flow_weight} must be >= 0, not both 0"
            )
        if self.flow_weight and self.num_chunks * self.frames_per_chunk < 2:
            raise ValueError(
                "flow_weight > 0 matches frame-to-frame motion: the clip needs >= 2 latent frames"
            )
        if not 0 <= self.min_t < self.max_t <= NUM_TRAIN_TIMESTEPS:
            raise ValueError(
                f"min_t={self.min_t}, max_t={self.max_t}: need 0 <= min_t < max_t <= {NUM_TRAIN_TIMESTEPS}"
            )
        if self.guidance < 0 or self.dmd_shift <= 0 or self.shift <= 0:
            raise ValueError(
                f"guidance={self.guidance} must be >= 0, dmd_shift={self.dmd_shift} and shift={self.shift} > 0"
            )
        if self.sigma_mode not in SIGMA_MODES:
            raise ValueError(f"sigma_mode={self.sigma_mode!r}; allowed: {SIGMA_MODES}")
        if self.critic_steps < 0:
            raise ValueError(f"critic_steps={self.critic_steps} must be >= 0")
        self.generator_optim.schedule(self.steps)
        # the critic's scheduler steps once per critic update, `critic_steps` times a training step
        self.critic_optim.schedule(self.steps * self.critic_steps)
        if self.global_batch is not None and (self.global_batch < 1 or self.global_batch % self.batch_size):
            raise ValueError(
                f"global_batch={self.global_batch} must be a positive multiple of batch_size={self.batch_size}"
            )
        if not 0 <= self.ema_decay < 1 or self.ema_start < 0:
            raise ValueError(f"ema_decay={self.ema_decay} must be in [0, 1), ema_start={self.ema_start} >= 0")

    def schedule_object(self) -> Schedule:
        """The per-chunk step lists of the rollout."""
        return get_schedule(self.schedule)

    def dmd_settings(self) -> DMDSettings:
        return DMDSettings(
            self.guidance, self.dmd_shift, self.min_t, self.max_t, self.dmd_weight, self.flow_weight
        )


class Conditioning:
    """What a sample position is trained on: its prompt's text embedding, plus ground truth for "causvid"."""

    def __init__(
        self, cfg: DistillConfig, text: TextEncoder, data: OdeShards | None, device: torch.device
    ) -> None:
        self.cfg, self.text, self.data, self.device = cfg, text, data, device
        self.lines = read_prompts(cfg.prompts)
        self.order = Shuffle(len(data), cfg.seed) if data is not None else None
        self.null = text.encode([cfg.negative_prompt])[0].to(device)
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(context [B, T, D], null context [B, T, D], clean latents [B, C, F, h, w] or None)."""
        null = self.null.expand(len(positions), -1, -1)
        if self.data is not None and self.order is not None:
            traj, ctx = self.data.get([self.order(p) for p in positions])
            return ctx.to(self.device), null, traj[:, -1].to(self.device)
        prompts = [sample_prompt(self.cfg.seed, p, self.cfg.p_two, self.lines) for p in positions]
        for p in set(prompts) - set(self._cache):
            self._cache[p] = self.text.encode([p])[0].to(self.device)
        return torch.cat([self._cache[p] for p in prompts]), null, None


def check_models(
    cfg: DistillConfig,
    generator: WanDiT,
    teacher: WanDiT | NoiseExperts,
    critic: WanDiT,
    text: TextEncoder,
    data: OdeShards | None,
) -> None:
    """The three DiTs, the text encoder, the clip shape and the ground truth fit together."""
    for name, model in (("teacher", teacher), ("critic", critic)):
        for key in ("in_dim", "out_dim", "text_dim", "patch_size"):
            if getattr(model.cfg, key) != getattr(generator.cfg, key):
                raise ValueError(
                    f"{name} {key}={getattr(model.cfg, key)} but the generator has {getattr(generator.cfg, key)}"
                )
    if text.dim != generator.cfg.text_dim:
        raise ValueError(
            f"text encoder width {text.dim} != the generator's text_dim {generator.cfg.text_dim}"
        )
    frames = cfg.num_chunks * cfg.frames_per_chunk
    generator.token_grid(frames, *cfg.latent_hw)
    if data is not None:
        want = (generator.cfg.in_dim, frames, *cfg.latent_hw)
        if tuple(data.sample_shape[1:]) != want:
            raise ValueError(
                f"ODE pairs in {data.folder} are [C, F, h, w] = {list(data.sample_shape[1:])}; num_chunks x "
                f"frames_per_chunk and latent_hw ask for {list(want)}"
            )


def train_distill(
    cfg: DistillConfig, *, resume: bool = True, max_steps: int | None = None, progress: bool = True
) -> Path:
    """Run (or continue) DMD distillation; returns the run folder (`checkpoint.pt`, `log.jsonl`, `model.json`)."""
    from diagvid.pretrained import load_dit_model, load_teacher, load_text_encoder

    rt = setup(cfg.parallel)
    try:
        # 1. load and check everything before the first forward
        generator = load_dit_model(cfg.generator).float().train()
        teacher = load_teacher(cfg.teacher, cfg.teacher_high, cfg.teacher_boundary, device=rt.device)
        teacher.float().eval().requires_grad_(False)
        critic = load_dit_model(cfg.critic or cfg.teacher).float().train()
        text = load_text_encoder(cfg.text, rt.device)
        data = OdeShards(cfg.ode_dir) if cfg.rollout == "causvid" and cfg.ode_dir else None
        check_models(cfg, generator, teacher, critic, text, data)
        accum = rt.accumulation(cfg.global_batch or cfg.batch_size * rt.world_size, cfg.batch_size)
        out = Path(cfg.out_dir)
        if rt.main:
            start_run(out, to_dict(cfg), cfg.seed)
            write_model_config(out, generator)
        torch.manual_seed(cfg.seed)

        # 2. trainable models spread over the ranks, each with its own AdamW
        ema = EMA(generator, cfg.ema_decay)
        gen_w, critic_w = rt.wrap(generator), rt.wrap(critic)
        g, c = cfg.generator_optim, cfg.critic_optim
        gen_opt, gen_sched = adamw_with_warmup(
            generator.parameters(), g.lr, g.betas, g.weight_decay, g.warmup, **g.schedule(cfg.steps)
        )
        critic_opt, critic_sched = adamw_with_warmup(
            critic.parameters(),
            c.lr,
            c.betas,
            c.weight_decay,
            c.warmup,
            **c.schedule(cfg.steps * cfg.critic_steps),
        )
        step = DistillStep(
            cfg,
            rt,
            accum,
            models=(gen_w, critic_w, teacher),
            ema=ema,
            optimizers=(gen_opt, gen_sched, critic_opt, critic_sched),
            condition=Conditioning(cfg, text, data, rt.device),
        )

        # 3. the loop (checkpoints, resume, log, SIGINT/SIGTERM)
        run_loop(
            out_dir=out,
            max_steps=min(cfg.steps, max_steps) if max_steps else cfg.steps,
            state={
                "generator": ModelState(generator),
                "critic": ModelState(critic),
                "ema": ema,
                "generator_opt": OptimizerState(generator, gen_opt),
                "generator_sched": gen_sched,
                "critic_opt": OptimizerState(critic, critic_opt),
                "critic_sched": critic_sched,
            },
            train_step=step,
            ckpt_every=cfg.ckpt_every,
            log_every=cfg.log_every,
            config=to_dict(cfg),
            resume=resume,
            progress=progress,
            writer=rt.main,
            agree=rt.any,
        )
        rt.barrier()  # every rank is done before any leaves the group
        return out
    finally:
        rt.close()


class DistillStep:
    """One training step: `critic_steps` critic updates, then one generator update (+ EMA)."""

    def __init__(
        self,
        cfg: DistillConfig,
        rt: Runtime,
        accum: int,
        *,
        models: tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module],
        ema: EMA,
        optimizers: tuple,
        condition: Conditioning,
    ) -> None:
        """models: the generator and critic as `Runtime.wrap` returned them, and the frozen teacher;
        optimizers: generator AdamW, its scheduler, critic AdamW, its scheduler."""
        self.cfg, self.rt, self.accum, self.ema, self.condition = cfg, rt, accum, ema, condition
        self.gen_w, self.critic_w, self.teacher = models
        self.gen_opt, self.gen_sched, self.critic_opt, self.critic_sched = optimizers
        self.fm = FlowMatch(cfg.shift, cfg.sigma_mode)
        self.schedule = cfg.schedule_object()
        self.settings = cfg.dmd_settings()
        self.shape = (unwrap(self.gen_w).cfg.in_dim, cfg.num_chunks * cfg.frames_per_chunk, *cfg.latent_hw)

    def __call__(self, step: int) -> dict[str, float]:
        phases = self.cfg.critic_steps + 1
        local: dict[str, float] = {}
        for q in range(self.cfg.critic_steps):
            loss, norm = self.critic_update(step * phases + q)
            local["loss_critic"] = local.get("loss_critic", 0.0) + loss / self.cfg.critic_steps
            local["grad_norm_critic"] = norm
        local |= self.generator_update(step * phases + phases - 1, step)
        metrics = self.rt.mean({k: v for k, v in local.items() if not k.startswith("grad_norm")})
        norms = {k: v for k, v in local.items() if k.startswith("grad_norm")}  # already global
        return {**metrics, **norms, "lr": float(self.gen_sched.get_last_lr()[0])}

    def sample(
        self, positions: list[int], stream_step: int, model: torch.nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The generator's training sample x [B, C, F, h, w] for these positions, and its (context, null)."""
        cfg, dev = self.cfg, self.rt.device
        ctx, null, clean = self.condition(positions)
        gen = seeded(cfg.seed, "rollout", positions[0])
        if clean is not None:
            x = teacher_forced(model, self.fm, clean, ctx, self.schedule, cfg.frames_per_chunk, gen=gen)
            return x, ctx, null
        noise = torch.stack(
            [torch.randn(self.shape, generator=seeded(cfg.seed, "noise", p)) for p in positions]
        )
        # one exit draw per stream step: every rank and micro-batch runs the same graph
        exit_u = float(torch.rand((), generator=seeded(cfg.seed, "exit", stream_step)))
        x = rollout(
            model,
            self.fm,
            noise.to(dev),
            ctx,
            self.schedule,
            cfg.frames_per_chunk,
            mode=cfg.rollout,
            exit_u=exit_u,
            gen=gen,
        )
        return x, ctx, null

    def critic_update(self, stream_step: int) -> tuple[float, float]:
        cfg, rt = self.cfg, self.rt
        self.critic_opt.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(self.accum):
            positions = rt.positions(stream_step, micro, cfg.batch_size, self.accum)
            with torch.no_grad(), rt.autocast():
                x, ctx, _ = self.sample(positions, stream_step, unwrap(self.gen_w))
            with rt.grad_sync(self.critic_w, sync=micro == self.accum - 1):
                with rt.autocast():
                    gen = seeded(cfg.seed, "critic", positions[0])
                    loss = critic_update_loss(x, self.critic_w, self.fm, ctx, self.settings, gen)
                (loss / self.accum).backward()
            total += loss.item() / self.accum
        norm = clip_grad_norm(self.critic_w, cfg.critic_optim.grad_clip)
        self.critic_opt.step()
        self.critic_sched.step()
        return total, norm

    def generator_update(self, stream_step: int, step: int) -> dict[str, float]:
        cfg, rt = self.cfg, self.rt
        self.gen_opt.zero_grad(set_to_none=True)
        metrics: dict[str, float] = {}
        for micro in range(self.accum):
            positions = rt.positions(stream_step, micro, cfg.batch_size, self.accum)
            with rt.grad_sync(self.gen_w, sync=micro == self.accum - 1):
                with rt.autocast():
                    x, ctx, null = self.sample(positions, stream_step, self.gen_w)
                    gen = seeded(cfg.seed, "dmd", positions[0])
                    critic = unwrap(self.critic_w)
                    loss, info = generator_loss(
                        x, self.teacher, critic, self.fm, ctx, null, self.settings, gen
                    )
                (loss / self.accum).backward()
            for k, v in info.items():
                metrics[k] = metrics.get(k, 0.0) + v / self.accum
        metrics["grad_norm_generator"] = clip_grad_norm(self.gen_w, cfg.generator_optim.grad_clip)
        self.gen_opt.step()
        self.gen_sched.step()
        self.ema.update(unwrap(self.gen_w), decay=0.0 if step < cfg.ema_start else None)
        return metrics
