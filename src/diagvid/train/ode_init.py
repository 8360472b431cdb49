"""Stage 2, ODE initialisation: the causal student starts from the teacher's weights and learns to map
each chunk of the teacher's ODE trajectories to the teacher's final sample, block-causally (CausVid §4.2).

Data flow: ODE-pair shards (`diagvid train ode`) -> per chunk one trajectory state -> student in
block-causal parallel mode -> x0 regressed onto the clean end state. The data a step sees is a function of
the step and of the sample positions of the global batch, so a resumed or re-sharded run sees the same.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diagvid.config import to_dict
from diagvid.sampling import SIGMA_MODES, FlowMatch
from diagvid.train.distributed import (
    ModelState,
    OptimizerState,
    ParallelConfig,
    Runtime,
    clip_grad_norm,
    setup,
)
from diagvid.train.loop import EMA, adamw_with_warmup, run_loop, seeded, start_run, write_model_config
from diagvid.train.ode import OdeShards, Shuffle, ode_regression_loss
from diagvid.train.teacher import OptimConfig

log = logging.getLogger("diagvid.train")


def _init_optim() -> OptimConfig:
    # CausVid's ODE regression: AdamW lr 2e-6, betas (0.9, 0.999), weight decay 0.01, clip 10
    return OptimConfig(lr=2e-6, betas=(0.9, 0.999), weight_decay=0.01, warmup=0, grad_clip=10.0)


@dataclass
class InitConfig:
    """An ODE-regression run of the causal student."""

    generator: str = "toy/teacher"
    """bundled name or folder of the weights the student starts from (the teacher's)"""
    data_dir: str = "data/toy-ode"
    """ODE pairs written by `diagvid train ode`"""
    frames_per_chunk: int = 3
    """latent frames per chunk K of the block-causal student"""
    sigma_mode: str = "exact"
    """sigma lookup of x0 = x_t - sigma v: "exact" or "nearest" (reference table)"""
    shift: float = 5.0
    """flow shift of the sigma table ("nearest" only)"""
    steps: int = 3000
    """optimiser steps"""
    batch_size: int = 8
    """samples per rank per micro-batch"""
    global_batch: int | None = None
    """samples per optimiser step over all ranks and micro-batches (None: batch_size x world size)"""
    optim: OptimConfig = field(default_factory=_init_optim)
    ema_decay: float = 0.99
    seed: int = 0
    out_dir: str = "runs/toy-init"
    log_every: int = 10
    ckpt_every: int = 100
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        self.optim.schedule(self.steps)
        for name in ("frames_per_chunk", "steps", "batch_size", "log_every", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.global_batch is not None and (self.global_batch < 1 or self.global_batch % self.batch_size):
            raise ValueError(
                f"global_batch={self.global_batch} must be a positive multiple of batch_size={self.batch_size}"
            )
        if self.sigma_mode not in SIGMA_MODES:
            raise ValueError(f"sigma_mode={self.sigma_mode!r}; allowed: {SIGMA_MODES}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay={self.ema_decay} must be in [0, 1)")


def check_ode_data(data: OdeShards, model: torch.nn.Module, frames_per_chunk: int) -> None:
    """The ODE pairs fit the model and the chunking (raises naming what does not)."""
    _, c, f, h, w = data.sample_shape
    if c != model.cfg.in_dim:
        raise ValueError(
            f"ODE pairs in {data.folder} have {c} latent channels; the model takes {model.cfg.in_dim}"
        )
    if data.context_shape[-1] != model.cfg.text_dim:
        raise ValueError(
            f"ODE pairs in {data.folder} carry text of width {data.context_shape[-1]}; the model's "
            f"text_dim is {model.cfg.text_dim}"
        )
    if f % frames_per_chunk:
        raise ValueError(
            f"frames_per_chunk={frames_per_chunk} does not divide the {f} latent frames of the ODE pairs; "
            f"use one of {[k for k in range(1, f + 1) if f % k == 0]}"
        )
    model.token_grid(f, h, w)


def train_init(
    cfg: InitConfig, *, resume: bool = True, max_steps: int | None = None, progress: bool = True
) -> Path:
    """Run (or continue) ODE regression; returns the run folder (`checkpoint.pt`, `log.jsonl`, `model.json`)."""
    from diagvid.pretrained import load_dit_model

    rt = setup(cfg.parallel)
    try:
        # 1. everything is checked before the first forward
        student = load_dit_model(cfg.generator).float().train()
        data = OdeShards(cfg.data_dir)
        check_ode_data(data, student, cfg.frames_per_chunk)
        accum = rt.accumulation(cfg.global_batch or cfg.batch_size * rt.world_size, cfg.batch_size)
        out = Path(cfg.out_dir)
        if rt.main:
            start_run(out, to_dict(cfg), cfg.seed)
            write_model_config(out, student)
        torch.manual_seed(cfg.seed)

        # 2. models and optimiser
        ema = EMA(student, cfg.ema_decay)
        wrapped = rt.wrap(student)
        o = cfg.optim
        opt, sched = adamw_with_warmup(
            student.parameters(), o.lr, o.betas, o.weight_decay, o.warmup, **o.schedule(cfg.steps)
        )
        fm = FlowMatch(cfg.shift, cfg.sigma_mode)
        order = Shuffle(len(data), cfg.seed)
        step_fn = _init_step(cfg, rt, wrapped, student, ema, opt, sched, fm, data, order, accum)

        # 3. the loop (checkpoints, resume, log, SIGINT/SIGTERM)
        run_loop(
            out_dir=out,
            max_steps=min(cfg.steps, max_steps) if max_steps else cfg.steps,
            state={
                "generator": ModelState(student),
                "ema": ema,
                "opt": OptimizerState(student, opt),
                "sched": sched,
            },
            train_step=step_fn,
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


def _init_step(
    cfg: InitConfig,
    rt: Runtime,
    wrapped: torch.nn.Module,
    student: torch.nn.Module,
    ema: EMA,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    fm: FlowMatch,
    data: OdeShards,
    order: Shuffle,
    accum: int,
) -> Callable[[int], dict[str, float]]:
    """The step function run_loop calls: `accum` micro-batches of regression, one optimiser step, EMA."""

    def train_step(step: int) -> dict[str, float]:
        opt.zero_grad(set_to_none=True)
        loss_sum, noisy = 0.0, 0
        for micro in range(accum):
            positions = rt.positions(step, micro, cfg.batch_size, accum)
            traj, ctx = data.get([order(p) for p in positions])
            # which trajectory state each chunk gets: keyed by the micro-batch's first sample position
            gen = seeded(cfg.seed, "init", positions[0])
            with rt.grad_sync(wrapped, sync=micro == accum - 1):
                with rt.autocast():
                    loss, info = ode_regression_loss(
                        wrapped,
                        traj.to(rt.device),
                        data.timesteps,
                        ctx.to(rt.device),
                        cfg.frames_per_chunk,
                        gen,
                        fm,
                    )
                (loss / accum).backward()
            loss_sum += loss.item() / accum
            noisy += info["noisy_chunks"]
        grad_norm = clip_grad_norm(wrapped, cfg.optim.grad_clip)
        opt.step()
        sched.step()
        ema.update(student)
        metrics = rt.mean({"loss": loss_sum, "noisy_chunks": float(noisy)})
        return {**metrics, "grad_norm": grad_norm, "lr": float(sched.get_last_lr()[0])}

    return train_step
