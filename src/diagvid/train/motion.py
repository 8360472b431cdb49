"""Train the motion classifier (`diagvid.model.motion`) on the teacher's cached world latents.

Each step draws cached clips, noises them to uniform levels in [0, 1] (the classifier must read every level
a sampler asks it about) and classifies what their objects do (the model's `target`: their direction, or the
axes they move along and their speed); clips whose objects do different things are left out. A classifier
of several windows learns on one window per clip, its start drawn uniformly from the first window's to the
last's. The last `heldout` usable clips of the cache are held out; accuracy (of the windows' summed
log-probabilities, as guidance reads them) is reported on them per noise level, with fixed noise, so runs
compare.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from diagvid.config import to_dict
from diagvid.model.motion import MotionClassifier, MotionClassifierConfig, prompt_label
from diagvid.train.loop import EMA, adamw_with_warmup, run_loop, seeded, start_run
from diagvid.train.teacher import DataConfig, build_latent_cache

EVAL_SIGMAS = (0.3, 0.5, 0.7, 0.8, 0.9)


@dataclass
class MotionTrainConfig:
    """A motion-classifier training run."""

    model: MotionClassifierConfig = field(default_factory=MotionClassifierConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(num_clips=3072, shard_size=64))
    vae: str = "toy/vae"
    """the codec whose latents the classifier reads (the teacher's)"""
    heldout: int = 128
    """usable clips kept out of training, from the end of the cache"""
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.01
    ema_decay: float = 0.995
    seed: int = 0
    out_dir: str = "runs/toy-motion"
    log_every: int = 10
    ckpt_every: int = 250
    eval_every: int = 500

    def __post_init__(self) -> None:
        if min(self.steps, self.batch_size, self.heldout) < 1:
            raise ValueError(
                f"steps={self.steps}, batch_size={self.batch_size} and heldout={self.heldout} must be >= 1"
            )


def labelled_latents(
    cfg: MotionTrainConfig, vae=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train latents, train labels, held-out latents, held-out labels), latents cut to the frames the
    windows span."""
    from diagvid.pretrained import load_vae

    latents, captions = build_latent_cache(cfg.data, vae if vae is not None else load_vae(cfg.vae))
    labels = torch.tensor([prompt_label(c, cfg.model.classes, cfg.model.target) for c in captions])
    keep = labels >= 0
    if int(keep.sum()) <= cfg.heldout:
        raise ValueError(
            f"{int(keep.sum())} of {len(captions)} cached clips have one {cfg.model.target}; need more than "
            f"heldout={cfg.heldout} (raise data.num_clips)"
        )
    span = cfg.model.span
    if latents.shape[2] < span:
        raise ValueError(
            f"clips of {latents.shape[2]} latent frames; the classifier's windows {cfg.model.windows} of "
            f"{cfg.model.frames} frames read {span}"
        )
    x, y = latents[keep][:, :, :span].contiguous(), labels[keep]
    return x[: -cfg.heldout], y[: -cfg.heldout], x[-cfg.heldout :], y[-cfg.heldout :]


def noised(x0: torch.Tensor, sigma: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """x_t = (1 - sigma) x0 + sigma eps, one level per sample."""
    s = sigma.view(-1, *([1] * (x0.ndim - 1)))
    return (1 - s) * x0 + s * torch.randn(x0.shape, generator=gen)


@torch.no_grad()
def accuracy(
    net: MotionClassifier, x0: torch.Tensor, labels: torch.Tensor, sigmas=EVAL_SIGMAS, draws: int = 2
) -> dict[str, float]:
    """Held-out accuracy at each noise level (`draws` fixed noise draws per clip; chance is 1/classes)."""
    gen = torch.Generator().manual_seed(0)
    was_training = net.training
    net.eval()
    out = {}
    for sigma in sigmas:
        right = 0
        for _ in range(draws):
            level = torch.full((len(x0),), sigma)
            right += int((net.class_log_probs(noised(x0, level, gen), level).argmax(1) == labels).sum())
        out[f"acc_{sigma:g}"] = right / (draws * len(x0))
    net.train(was_training)
    return out


def train_motion(
    cfg: MotionTrainConfig,
    *,
    resume: bool = True,
    max_steps: int | None = None,
    progress: bool = True,
    vae=None,
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> MotionClassifier:
    """Train (or continue) the motion classifier; returns the EMA model in eval mode. `data`: what
    `labelled_latents(cfg)` returns, when the caller has it already (else it is read here)."""
    x, y, hx, hy = data if data is not None else labelled_latents(cfg, vae)
    windows, k = cfg.model.windows, cfg.model.frames
    out = start_run(cfg.out_dir, to_dict(cfg), cfg.seed)
    net = MotionClassifier(cfg.model)
    ema = EMA(net, cfg.ema_decay)
    opt, sched = adamw_with_warmup(net.parameters(), cfg.lr, (0.9, 0.99), cfg.weight_decay, cfg.warmup)

    def train_step(step: int) -> dict[str, float]:
        gen = seeded(cfg.seed, "motion", step)
        pick = torch.randint(len(x), (cfg.batch_size,), generator=gen)
        starts = windows * cfg.batch_size  # one window per clip, from the first window's start to the last's
        if len(windows) > 1:
            starts = torch.randint(windows[0], windows[-1] + 1, (cfg.batch_size,), generator=gen).tolist()
        clips = torch.stack([x[i, :, s : s + k] for i, s in zip(pick.tolist(), starts, strict=True)])
        sigma = torch.rand(cfg.batch_size, generator=gen)
        logits = net(noised(clips, sigma, gen), sigma)
        loss = F.cross_entropy(logits, y[pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.update(net)
        return {"loss": loss.item(), "acc": float((logits.argmax(1) == y[pick]).float().mean())}

    run_loop(
        out_dir=out,
        max_steps=min(cfg.steps, max_steps) if max_steps else cfg.steps,
        state={"net": net, "ema": ema, "opt": opt, "sched": sched},
        train_step=train_step,
        ckpt_every=cfg.ckpt_every,
        log_every=cfg.log_every,
        evaluate=lambda step: accuracy(ema.model, hx, hy),
        eval_every=cfg.eval_every,
        config=to_dict(cfg),
        resume=resume,
        progress=progress,
    )
    return ema.model.eval()
