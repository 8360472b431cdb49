"""Training the tiny decoder (`diagvid.model.tiny_decoder`) on world clips, behind a frozen Wan VAE encoder.

The latents are the encoder's, exactly the ones every DiT was trained on, so the tiny decoder replaces the
VAE's decoder without touching any other model. Targets are the real frames (not the VAE decoder's output):
the loss is the VAE recipe's weighted L1 + MSE, and the latents get the same noise augmentation as the
stage-4 VAE decoder (`latent_noise`), since a generator's latents are never exactly on the encoder's manifold.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from diagvid.config import to_dict
from diagvid.model.tiny_decoder import TinyDecoder, preset
from diagvid.model.vae import WanVAE
from diagvid.train.loop import EMA, adamw_with_warmup, run_loop, start_run
from diagvid.train.vae import (
    add_latent_noise,
    check_loss_weights,
    decoder_loss,
    heldout_clips,
    psnr,
    reconstruction_scores,
    world_batch,
)

log = logging.getLogger("diagvid.train")


@dataclass
class TinyDecoderTrainConfig:
    """A tiny-decoder training run."""

    preset: str = "toy"
    overrides: dict = field(default_factory=dict)
    vae: str = "toy/vae"
    """the codec (bundled name or folder) whose frozen encoder makes the latents"""
    steps: int = 2000
    batch_size: int = 4
    clip_frames: int = 25
    """pixel frames per training clip (1 + 4k); the decoder looks one latent frame back, so a short clip
    already shows it every state it meets deep into a video"""
    size: int = 64
    lr: float = 2e-3
    warmup: int = 50
    decay_steps: int = 1000
    """the learning rate falls linearly to a tenth over the last `decay_steps`"""
    fg_weight: float = 10.0
    """extra loss weight on object pixels at step 0 (as in the VAE recipe), decaying to 0 by `fg_decay_steps`"""
    fg_decay_steps: int = 1000
    edge_weight: float = 0.0
    """extra loss weight on the band `edge_px` either side of every object outline (as `VAETrainConfig`'s)"""
    edge_px: int = 2
    init_from: str = ""
    """a tiny decoder (bundled name or folder, e.g. the shipped `toy/tiny-decoder`) whose weights, in fp32,
    start the run when it has no checkpoint yet: a fine-tune instead of a run from scratch"""
    latent_noise: float = 0.5
    """Gaussian noise (std drawn from U(0, latent_noise) per clip, the DiT's units) added to the latents"""
    ema_decay: float = 0.99
    seed: int = 0
    out_dir: str = "runs/toy-tiny-decoder"
    log_every: int = 10
    ckpt_every: int = 100
    eval_every: int = 200
    eval_clips: int = 6
    eval_frames: int = 33

    def __post_init__(self) -> None:
        if (self.clip_frames - 1) % 4 or self.clip_frames < 1 or (self.eval_frames - 1) % 4:
            raise ValueError(
                f"clip_frames={self.clip_frames} and eval_frames={self.eval_frames} must be 1 + 4k"
            )
        check_loss_weights(self.edge_weight, self.edge_px)
        if self.latent_noise < 0:
            raise ValueError(f"latent_noise={self.latent_noise} must be >= 0")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps={self.steps} and batch_size={self.batch_size} must be >= 1")
        if not 0 <= self.decay_steps <= self.steps:
            raise ValueError(f"decay_steps={self.decay_steps} must be in [0, steps={self.steps}]")


@torch.no_grad()
def evaluate_decoder(
    decoder: TinyDecoder, vae: WanVAE, clips: torch.Tensor, masks: torch.Tensor | None = None
) -> dict[str, float]:
    """PSNR of held-out clips encoded by `vae` and decoded by `decoder` (and on object pixels alone)."""
    decoder.eval()
    return reconstruction_scores(
        torch.cat([decoder.decode(vae.encode(c[None])) for c in clips]), clips, masks
    )


def train_tiny_decoder(
    cfg: TinyDecoderTrainConfig, *, resume: bool = True, max_steps: int | None = None, progress: bool = True
) -> TinyDecoder:
    """Train (or continue) the tiny decoder; returns its EMA."""
    from diagvid.pretrained import load_tiny_decoder, load_vae

    out = start_run(cfg.out_dir, to_dict(cfg), cfg.seed)
    vae = load_vae(cfg.vae).requires_grad_(False)
    decoder = TinyDecoder(preset(cfg.preset, **cfg.overrides))
    if decoder.z_dim != vae.z_dim or decoder.spatial_stride != vae.spatial_stride:
        raise ValueError(
            f"preset {cfg.preset!r} decodes {decoder.z_dim} channels at stride {decoder.spatial_stride}; the VAE "
            f"{cfg.vae} has {vae.z_dim} at stride {vae.spatial_stride}"
        )
    if cfg.init_from and not (out / "checkpoint.pt").exists():
        start = load_tiny_decoder(cfg.init_from)
        if start.cfg != decoder.cfg:
            raise ValueError(f"init_from={cfg.init_from!r} is a {start.cfg}; this run trains {decoder.cfg}")
        decoder.load_state_dict(start.state_dict())  # load_tiny_decoder computes in fp32 by default
        log.info("starting from the weights in %s", cfg.init_from)
    ema = EMA(decoder, cfg.ema_decay)
    opt, sched = adamw_with_warmup(
        decoder.parameters(),
        cfg.lr,
        (0.9, 0.99),
        0.0,
        cfg.warmup,
        total_steps=cfg.steps,
        decay_steps=cfg.decay_steps,
    )
    held, held_masks = heldout_clips(cfg.eval_clips, cfg.size, cfg.eval_frames)

    def train_step(step: int) -> dict[str, float]:
        x, mask = world_batch(cfg.seed, step, cfg.batch_size, cfg.clip_frames, cfg.size)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step + 7)  # a function of the step
        with torch.no_grad():
            z = vae.encode(x)
            if cfg.latent_noise:
                stds = cfg.latent_noise * torch.rand(cfg.batch_size, generator=gen)
                z = add_latent_noise(z, stds, torch.ones(()), gen)
        decoder.train()
        rec = decoder.decode(z)
        fg = cfg.fg_weight * max(0.0, 1.0 - step / max(1, cfg.fg_decay_steps))
        loss = decoder_loss(rec, x, mask, fg, cfg.edge_weight, cfg.edge_px)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.update(decoder)
        return {"loss": loss.item(), "psnr": psnr(rec.detach(), x)}

    run_loop(
        out_dir=out,
        max_steps=min(cfg.steps, max_steps) if max_steps else cfg.steps,
        state={"decoder": decoder, "ema": ema, "opt": opt, "sched": sched},
        train_step=train_step,
        ckpt_every=cfg.ckpt_every,
        log_every=cfg.log_every,
        evaluate=lambda step: evaluate_decoder(ema.model, vae, held, held_masks),
        eval_every=cfg.eval_every,
        config=to_dict(cfg),
        resume=resume,
        progress=progress,
    )
    return ema.model
