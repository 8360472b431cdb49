"""Train the FVD-world feature network: classify the ground truth of fresh world clips, one batch per step.

Every step renders new clips (seeds and window starts are functions of the step, so a resumed run sees the
same data) and cuts one window from each at a random start. The loss is the sum of the heads'
cross-entropies; held-out accuracy is measured on windows of the evaluation sets' clips, which no training
clip shares.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from diagvid.config import to_dict
from diagvid.train.loop import EMA, adamw_with_warmup, run_loop, seeded, start_run
from diagvid.world.features import FeatureNet, FeatureNetConfig, to_input
from diagvid.world.render import DIRECTIONS, Clip, render


@dataclass
class FeaturesTrainConfig:
    """A feature-network training run."""

    model: FeatureNetConfig = field(default_factory=FeatureNetConfig)
    steps: int = 3000
    batch_size: int = 32
    clip_frames: int = 24
    """frames rendered per clip; one window of model.frames is cut from it at a random start"""
    size: int = 64
    """rendered frame size (the network resamples to model.size, as it does for evaluated videos)"""
    p_two: float = 0.25
    """share of two-object clips (the heads learn the first object)"""
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.01
    ema_decay: float = 0.99
    seed: int = 0
    out_dir: str = "runs/toy-features"
    log_every: int = 10
    ckpt_every: int = 200
    eval_every: int = 500
    eval_draws: int = 4
    """held-out clips: this many draws of the 48 held-out prompts, one window each"""
    stats_batches: int = 32
    """batches of unseen training-distribution windows (the seeds after the last step's) that set the
    features' mean and spread"""

    def __post_init__(self) -> None:
        if self.clip_frames < self.model.frames:
            raise ValueError(
                f"clip_frames={self.clip_frames} must be at least model.frames={self.model.frames} (one window)"
            )
        if min(self.batch_size, self.steps, self.eval_draws, self.stats_batches) < 1:
            raise ValueError(
                f"batch_size={self.batch_size}, steps={self.steps}, eval_draws={self.eval_draws} and "
                f"stats_batches={self.stats_batches} must be >= 1"
            )
        if not 0.0 <= self.p_two <= 1.0:
            raise ValueError(f"p_two={self.p_two} must be a probability in [0, 1]")


_UNITS = np.array(list(DIRECTIONS.values()))


def direction_of(velocity: np.ndarray) -> str:
    """The direction name whose unit vector is closest to a velocity [2] (image coordinates)."""
    return list(DIRECTIONS)[int(np.argmax(_UNITS @ velocity))]


def window_labels(clip: Clip, start: int, classes: dict[str, list[str]]) -> dict[str, int]:
    """Class index per head for the window of `clip` starting at frame `start`: the first object's colour,
    shape, speed, and its direction at that frame (bounces before it have turned it)."""
    obj = clip.truth[0]
    names = {
        "colour": obj.colour,
        "shape": obj.shape,
        "direction": direction_of(obj.velocities[start]),
        "speed": obj.speed,
    }
    return {head: classes[head].index(names[head]) for head in classes}


def _stack(clips: list[np.ndarray], labels: list[dict[str, int]], size: int):
    x = to_input(np.stack(clips), size)
    y = {head: torch.tensor([lab[head] for lab in labels]) for head in labels[0]}
    return x, y


def _batch(cfg: FeaturesTrainConfig, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Windows [B, 3, F, S, S] and labels {head: [B]} of `step` (a function of the step alone)."""
    from diagvid.world.dataset import sample_spec

    frames = cfg.model.frames
    starts = torch.randint(
        0, cfg.clip_frames - frames + 1, (cfg.batch_size,), generator=seeded(cfg.seed, step)
    )
    clips, labels = [], []
    for i, start in enumerate(starts.tolist()):
        clip = render(sample_spec(step * cfg.batch_size + i, cfg.clip_frames, cfg.size, cfg.p_two))
        clips.append(clip.frames[start : start + frames])
        labels.append(window_labels(clip, start, cfg.model.classes))
    return _stack(clips, labels, cfg.model.size)


def heldout_windows(cfg: FeaturesTrainConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One window of each held-out clip (eval_draws draws of the 48 held-out prompts), at seeded starts."""
    from diagvid.world.dataset import eval_specs

    frames = cfg.model.frames
    clips, labels = [], []
    for draw in range(cfg.eval_draws):
        specs = eval_specs("heldout-48", cfg.clip_frames, cfg.size, draw=draw)
        starts = np.random.default_rng(draw).integers(0, cfg.clip_frames - frames + 1, len(specs))
        for spec, start in zip(specs, starts.tolist(), strict=True):
            clip = render(spec)
            clips.append(clip.frames[start : start + frames])
            labels.append(window_labels(clip, start, cfg.model.classes))
    return _stack(clips, labels, cfg.model.size)


@torch.no_grad()
def accuracy(net: FeatureNet, x: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-head accuracy, and the share of windows with every head right ("all")."""
    net.eval()
    outs = [net(b)[1] for b in x.split(128)]
    logits = {head: torch.cat([o[head] for o in outs]) for head in labels}
    hits = {head: logits[head].argmax(1) == labels[head] for head in labels}
    out = {head: round(float(h.float().mean()), 4) for head, h in hits.items()}
    out["all"] = round(float(torch.stack(list(hits.values())).all(0).float().mean()), 4)
    return out


def classification_loss(
    logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum of the heads' cross-entropies, and each head's batch accuracy."""
    loss = sum(F.cross_entropy(logits[h], labels[h]) for h in labels)
    metrics = {f"acc_{h}": float((logits[h].argmax(1) == labels[h]).float().mean()) for h in labels}
    return loss, metrics


def train_features(
    cfg: FeaturesTrainConfig, *, resume: bool = True, max_steps: int | None = None, progress: bool = True
) -> FeatureNet:
    """Train (or continue) the feature network; returns the EMA model in eval mode, its features standardised."""
    out = start_run(cfg.out_dir, to_dict(cfg), cfg.seed)
    net = FeatureNet(cfg.model)
    ema = EMA(net, cfg.ema_decay)
    opt, sched = adamw_with_warmup(net.parameters(), cfg.lr, (0.9, 0.99), cfg.weight_decay, cfg.warmup)
    held = heldout_windows(cfg)

    def train_step(step: int) -> dict[str, float]:
        x, labels = _batch(cfg, step)
        net.train()
        loss, metrics = classification_loss(net(x)[1], labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.update(net)
        return {"loss": loss.item(), **metrics}

    run_loop(
        out_dir=out,
        max_steps=min(cfg.steps, max_steps) if max_steps else cfg.steps,
        state={"net": net, "ema": ema, "opt": opt, "sched": sched},
        train_step=train_step,
        ckpt_every=cfg.ckpt_every,
        log_every=cfg.log_every,
        evaluate=lambda step: accuracy(ema.model, *held),
        eval_every=cfg.eval_every,
        config=to_dict(cfg),
        resume=resume,
        progress=progress,
    )
    final = ema.model.eval()
    # windows of clips no step trained on: the batches of the steps after the last one
    final.standardise_features(_batch(cfg, cfg.steps + k)[0] for k in range(cfg.stats_batches))
    return final
