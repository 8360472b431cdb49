"""The toy latent codec: diffusers' AutoencoderKLWan at a small config, trained on world clips.

The VAE is convolutional and causal, so it trains on short clips and random spatial crops (cheap) and runs
on whole clips afterwards. Loss: L1 + MSE reconstruction of the posterior mean, plus a small KL term that
keeps the latents bounded. When training ends, per-channel latent statistics over held-out clips are written
into the config so that the DiT sees roughly unit-variance latents.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from diagvid.config import to_dict
from diagvid.model.vae import WanVAE, preset
from diagvid.model.widen import widen_decoder, widen_latent
from diagvid.train.loop import EMA, adamw_with_warmup, run_loop, start_run

log = logging.getLogger("diagvid.train")


@dataclass
class VAETrainConfig:
    """A VAE training run."""

    preset: str = "toy"
    overrides: dict = field(default_factory=dict)
    steps: int = 3000
    batch_size: int = 4
    clip_frames: int = 9
    """pixel frames per training clip (1 + 4k)"""
    crop: int = 32
    """spatial crop (pixels); the full frame is 64"""
    size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    decay_steps: int = 0
    """the last `decay_steps` steps of the run lower the learning rate linearly to `final_lr_ratio * lr`. The
    fine-tuning recipes' batches are small (two clips), and at a constant rate their held-out PSNR wanders by
    0.1-0.2 dB between evaluations; 0 keeps the rate constant after the warm-up"""
    final_lr_ratio: float = 0.1
    kl_weight: float = 1e-6
    fg_weight: float = 10.0
    """extra loss weight on object pixels at step 0 (objects cover a few % of a frame, and without it the
    codec spends hundreds of steps on the background first); decays linearly to 0 by `fg_decay_steps`"""
    fg_decay_steps: int = 1500
    edge_weight: float = 0.0
    """extra loss weight, constant over the run, on a band of `edge_px` pixels either side of every object's
    outline (from the renderer's masks). The outline band is where the codec loses most: 2-3 pixels around
    each object hold about two thirds of the shipped codec's squared error (docs/status.md). Use it to
    fine-tune a codec that already draws its objects (`init_from`, or resume with it set): from step 0 it
    kept fresh codecs on the background-only plateau for 2500 steps, where plain training leaves by ~750"""
    edge_px: int = 2
    warm_chunks_max: int = 0
    """before each step's trained frames, stream up to this many latent frames (drawn uniformly per step)
    through encoder and decoder without gradient. The causal caches then reach the states they have deep
    into a long video: the decoder sees ~20 latent frames back, far more than a short training clip, and
    a codec trained on short clips alone decodes later chunks with wrong colours. 0: whole short clips."""
    first_chunk_share: float = 0.0
    """with `warm_chunks_max`: the share of steps that train from the clip's first frame (no warm-up), the
    rest drawing the warm-up uniformly from 1..N; 0 draws it from 0..N (1 step in N + 1 from the start).
    The first frame is decoded by its own path (no cached history), and a video's first frame is the one
    every viewer sees first"""
    freeze_encoder: bool = False
    """train the decoder alone: the encoder (and so every latent a teacher was trained on) stays exactly as
    loaded from `init_from`, so a better decoder can replace the shipped one without retraining the DiT"""
    init_from: str = ""
    """a VAE folder (e.g. the shipped toy VAE) whose weights start the run when it has no checkpoint yet. If
    the run's `overrides` set a wider `decoder_base_dim` or a larger `z_dim` than init_from's, init_from is
    widened first (`diagvid.model.widen`: the same function at step 0, more channels to learn with)"""
    latent_anchor: float = 0.0
    """with `init_from` and a trained encoder: weight of an extra loss, the mean squared distance between the
    encoder's latents and `init_from`'s on the same frames, in the DiT's units (init_from's statistics,
    which the exported codec keeps). It lets the encoder sharpen what it writes while staying in the
    latent space the shipped DiTs were trained on; 0 leaves the encoder free (a new latent space)"""
    latent_noise: float = 0.0
    """with `freeze_encoder` or `latent_anchor`: Gaussian noise added to the latents before decoding, its std (in the DiT's
    normalised units, init_from's statistics) drawn from U(0, latent_noise) per clip. A generator's latents
    are never exactly on the encoder's manifold, and the first frame's decoder path (the encoder barely
    separates colours there) turns an error of 0.2 into coloured speckle; this teaches it to stay clean"""
    eval_frames: int = 33
    """pixel frames of the held-out clips used for PSNR (longer than training clips on purpose)"""
    ema_decay: float = 0.995
    seed: int = 0
    out_dir: str = "runs/toy-vae"
    log_every: int = 10
    ckpt_every: int = 100
    eval_every: int = 250
    eval_clips: int = 16
    """held-out clips (full size, 17 frames) for PSNR and latent statistics"""

    def __post_init__(self) -> None:
        if (self.clip_frames - 1) % 4 or self.clip_frames < 1:
            raise ValueError(f"clip_frames={self.clip_frames} must be 1 + 4k")
        if self.warm_chunks_max < 0 or (self.eval_frames - 1) % 4:
            raise ValueError(
                f"warm_chunks_max={self.warm_chunks_max} must be >= 0 and eval_frames={self.eval_frames} 1 + 4k"
            )
        if not 0.0 <= self.first_chunk_share <= 1.0:
            raise ValueError(f"first_chunk_share={self.first_chunk_share} must be in [0, 1]")
        if self.freeze_encoder and not self.init_from:
            raise ValueError("freeze_encoder=true needs init_from: a trained encoder to keep")
        if self.latent_anchor < 0 or (self.latent_anchor and (self.freeze_encoder or not self.init_from)):
            raise ValueError(
                f"latent_anchor={self.latent_anchor} must be >= 0, and > 0 only with init_from (the latents to "
                "stay near) and a trained encoder (freeze_encoder=false)"
            )
        if self.latent_noise < 0 or (self.latent_noise and not (self.freeze_encoder or self.latent_anchor)):
            raise ValueError(
                f"latent_noise={self.latent_noise} must be >= 0, and > 0 only with freeze_encoder=true or "
                "latent_anchor > 0 (its scale is init_from's latent statistics)"
            )
        if not 0 <= self.decay_steps <= self.steps:
            raise ValueError(f"decay_steps={self.decay_steps} must be in [0, steps={self.steps}]")
        if not 0 <= self.final_lr_ratio <= 1:
            raise ValueError(f"final_lr_ratio={self.final_lr_ratio} must be in [0, 1]")
        if not 8 <= self.crop <= self.size:
            raise ValueError(f"crop={self.crop} must be in [8, size={self.size}]")
        check_loss_weights(self.edge_weight, self.edge_px)


def check_loss_weights(edge_weight: float, edge_px: int) -> None:
    """Refuse, by name, outline settings that `decoder_loss` cannot use."""
    if edge_weight < 0 or not 1 <= edge_px <= 8:
        raise ValueError(f"edge_weight={edge_weight} must be >= 0 and edge_px={edge_px} in [1, 8]")


EVAL_CLIPS = 6
"""held-out clips scored at each periodic evaluation: one per colour"""


def psnr_from_mse(mse: float) -> float:
    """PSNR in dB of a mean squared error between videos in [-1, 1] (a peak-to-peak range of 2)."""
    return 10 * math.log10(4.0 / max(mse, 1e-12))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of videos in [-1, 1]."""
    return psnr_from_mse(F.mse_loss(a.float(), b.float()).item())


def render_with_mask(spec) -> tuple[torch.Tensor, torch.Tensor]:
    """A world clip [3, T, H, W] in [-1, 1] and its object mask [1, T, H, W] (pixels that differ from the
    clip's background, which the renderer knows)."""
    from diagvid.world import background_frame, frames_to_tensor, render

    frames = render(spec).frames
    mask = (frames != background_frame(spec.background_seed, spec.size)).any(axis=-1)
    return frames_to_tensor(frames), torch.from_numpy(mask)[None]


def outline_band(mask: torch.Tensor, px: int) -> torch.Tensor:
    """The pixels within `px` of an object's outline, inside or out: the mask [B, 1, T, H, W] dilated minus
    the mask eroded, frame by frame (a square neighbourhood: across a straight edge the band is 2 px wide)."""
    frames = mask.transpose(1, 2).flatten(0, 1).float()  # [B*T, 1, H, W]
    k = 2 * px + 1
    dilated = F.max_pool2d(frames, k, stride=1, padding=px)
    eroded = -F.max_pool2d(-frames, k, stride=1, padding=px)
    band = (dilated - eroded).unflatten(0, (mask.shape[0], mask.shape[2])).transpose(1, 2)
    return band.to(mask.dtype)


def world_batch(
    seed: int, step: int, batch_size: int, num_frames: int, size: int, crop: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """World clips [B, 3, T, c, c] and their object masks [B, 1, T, c, c] for `step` (c = crop or size).

    Seeds and crops are functions of (seed, step), so a resumed run sees the same data.
    """
    from diagvid.world import sample_spec

    crop = crop or size
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    clips, masks = [], []
    for i in range(batch_size):
        spec = sample_spec(step * batch_size + i, num_frames=num_frames, size=size)
        video, mask = render_with_mask(spec)
        y, x = (int(v) for v in torch.randint(0, size - crop + 1, (2,), generator=gen))
        clips.append(video[:, :, y : y + crop, x : x + crop])
        masks.append(mask[:, :, y : y + crop, x : x + crop].float())
    return torch.stack(clips), torch.stack(masks)


def _batch(cfg: VAETrainConfig, step: int, extra_frames: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A VAE run's clips and masks for `step` (`extra_frames` more than its clips, for the warm-up)."""
    return world_batch(cfg.seed, step, cfg.batch_size, cfg.clip_frames + extra_frames, cfg.size, cfg.crop)


def reconstruction_loss(rec: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-pixel L1 + MSE, weighted by `weight` (broadcast over channels) and normalised by its mean."""
    err = rec - x
    w = weight.expand_as(err)
    return (w * (err.abs() + err.square())).mean() / w.mean()


def decoder_loss(
    rec: torch.Tensor,
    x: torch.Tensor,
    mask: torch.Tensor,
    fg_weight: float,
    edge_weight: float = 0.0,
    edge_px: int = 2,
) -> torch.Tensor:
    """The codec recipes' reconstruction loss (the VAE's and the tiny decoder's): weighted L1 + MSE with
    `fg_weight` extra on object pixels and `edge_weight` extra on the band `edge_px` either side of their
    outlines."""
    weight = 1.0 + fg_weight * mask
    if edge_weight:
        weight = weight + edge_weight * outline_band(mask, edge_px)
    return reconstruction_loss(rec, x, weight)


def heldout_clips(n: int, size: int, num_frames: int = 17) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out full-size clips [n, 3, T, H, W] from the evaluation seeds and their object masks [n, 1, T, H, W].

    The set is ordered colour by colour; the clips are taken strided (every 8th first) so that the first 6
    cover all six colours: a short evaluation then cannot miss a colour the codec confuses.
    """
    from diagvid.world import eval_specs

    specs = eval_specs("heldout-48", num_frames=num_frames, size=size)
    specs = [specs[i] for i in sorted(range(len(specs)), key=lambda i: (i % 8, i // 8))]
    specs = (specs * 2)[:n]
    clips, masks = zip(*(render_with_mask(spec) for spec in specs), strict=True)
    return torch.stack(clips), torch.stack(masks)


@torch.no_grad()
def evaluate_vae(vae: WanVAE, clips: torch.Tensor, masks: torch.Tensor | None = None) -> dict[str, float]:
    """Reconstruction PSNR on held-out clips (latents computed as the DiT will see them), and the PSNR on
    object pixels alone when masks are given (a codec that paints objects background-coloured scores
    ~20 dB overall but under 10 dB there)."""
    vae.eval()
    return reconstruction_scores(torch.cat([vae.decode(vae.encode(c[None])) for c in clips]), clips, masks)


def reconstruction_scores(
    rec: torch.Tensor, clips: torch.Tensor, masks: torch.Tensor | None = None
) -> dict[str, float]:
    """PSNR of reconstructed clips, and when masks are given on object pixels alone (`object_psnr`) and on
    the 2-pixel band either side of their outlines (`outline_psnr`, where a blurry codec loses most)."""
    out = {"psnr": round(psnr(rec, clips), 3)}
    if masks is not None and masks.any():
        sel = masks.bool().expand_as(clips)
        out["object_psnr"] = round(psnr(rec[sel], clips[sel]), 3)
        band = outline_band(masks, 2).bool().expand_as(clips)
        out["outline_psnr"] = round(psnr(rec[band], clips[band]), 3)
    return out


@torch.no_grad()
def latent_statistics(vae: WanVAE, clips: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the raw posterior means over clips."""
    mus = torch.cat([vae.model.encode(c[None]).latent_dist.mode() for c in clips])  # [N, C, F, h, w]
    return mus.mean(dim=(0, 2, 3, 4)).tolist(), mus.std(dim=(0, 2, 3, 4)).clamp_min(1e-4).tolist()


def warm_chunks(cfg: VAETrainConfig, step: int) -> int:
    """Latent frames streamed before the trained ones at `step` (a function of the step: resumes exactly)."""
    gen = torch.Generator().manual_seed(step)
    if cfg.first_chunk_share == 0.0:
        return int(torch.randint(0, cfg.warm_chunks_max + 1, (1,), generator=gen))
    if float(torch.rand((), generator=gen)) < cfg.first_chunk_share:
        return 0
    return int(torch.randint(1, cfg.warm_chunks_max + 1, (1,), generator=gen))


def add_latent_noise(
    latents: torch.Tensor, std: torch.Tensor, scale: torch.Tensor, gen: torch.Generator
) -> torch.Tensor:
    """latents [B, C, F, h, w] + Gaussian noise of std `std` [B] (one per clip) in the DiT's units: `scale`
    [1, C, 1, 1, 1] converts one DiT unit to the units of `latents` (the latent std, for raw latents)."""
    noise = torch.randn(latents.shape, generator=gen).to(latents)
    return latents + std.view(-1, 1, 1, 1, 1).to(latents) * scale.to(latents) * noise


def _warm_cut(warm: int) -> int:
    """Pixel frames that make the first `warm` latent frames."""
    return 0 if warm == 0 else 1 + 4 * (warm - 1)


def _reconstruct_after_warmup(
    vae: WanVAE, x: torch.Tensor, mask: torch.Tensor, warm: int, corrupt=lambda z: z
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stream the first `warm` latent frames of x through encoder and decoder without gradient, then the rest
    with gradient; returns (reconstruction, target frames, their masks, their latents) of the trained part
    only. `corrupt` is applied to the latents of each part before they are decoded (the returned latents are
    the encoder's, before it)."""
    from diagvid.model.vae import StreamingDecoder, StreamingEncoder

    enc, dec = StreamingEncoder(vae), StreamingDecoder(vae)
    cut = _warm_cut(warm)
    if cut:
        with torch.no_grad():
            dec.decode(corrupt(enc.encode(x[:, :, :cut])))
    z = enc.encode(x[:, :, cut:])
    rec = dec.decode(corrupt(z))
    return rec, x[:, :, cut:], mask[:, :, cut:], z


@torch.no_grad()
def _anchor_latents(frozen: WanVAE, x: torch.Tensor, warm: int) -> torch.Tensor:
    """The frozen codec's latents (its DiT units) of the frames after the first `warm` latent frames of x."""
    from diagvid.model.vae import StreamingEncoder

    enc, cut = StreamingEncoder(frozen), _warm_cut(warm)
    if cut:
        enc.encode(x[:, :, :cut])
    return enc.encode(x[:, :, cut:])


def latent_drift(z: torch.Tensor, vae: WanVAE, anchor: torch.Tensor, frozen: WanVAE) -> torch.Tensor:
    """Mean squared distance between latents `z` of `vae` and `anchor` of `frozen` on the same frames, both
    expressed in the frozen codec's normalised units (the DiT's). A widened latent is anchored on its first
    channels, the frozen codec's; the rest are free."""
    return F.mse_loss(frozen.normalize(vae.denormalize(z)[:, : frozen.z_dim]), anchor)


def train_vae(
    cfg: VAETrainConfig, *, resume: bool = True, max_steps: int | None = None, progress: bool = True
) -> WanVAE:
    """Train (or continue) the VAE; returns the EMA model with latent statistics filled in."""
    out = start_run(cfg.out_dir, to_dict(cfg), cfg.seed)
    vae = WanVAE(preset(cfg.preset, **cfg.overrides))
    # with the encoder frozen or anchored, init_from's latent statistics stay the codec's: they scale
    # `latent_noise` and the exported model keeps them bit for bit
    frozen = WanVAE.load(cfg.init_from) if cfg.freeze_encoder or cfg.latent_anchor else None
    if frozen is not None and frozen.z_dim != vae.z_dim and (cfg.freeze_encoder or cfg.latent_noise):
        raise ValueError(
            f"z_dim={vae.z_dim} differs from init_from's {frozen.z_dim}: the new channels need a trained "
            "encoder (freeze_encoder=false) and have no statistics to scale latent_noise by (use 0)"
        )
    if cfg.init_from and not (out / "checkpoint.pt").exists():
        start = frozen or WanVAE.load(cfg.init_from)
        # a wider decoder or more latent channels than init_from's: start from init_from widened, the same
        # function at step 0 (diagvid.model.widen)
        if start.cfg.decoder_base_dim != vae.cfg.decoder_base_dim and vae.cfg.decoder_base_dim:
            start = widen_decoder(start, vae.cfg.decoder_base_dim, seed=cfg.seed)
            log.info("widened init_from's decoder to decoder_base_dim=%d", vae.cfg.decoder_base_dim)
        if start.cfg.z_dim < vae.cfg.z_dim:
            start = widen_latent(start, vae.cfg.z_dim, seed=cfg.seed)
            log.info("widened init_from's latent to z_dim=%d", vae.cfg.z_dim)
        if start.cfg.summary() != vae.cfg.summary():
            raise ValueError(
                f"init_from={cfg.init_from!r} is a {start.cfg.summary()}; this run trains {vae.cfg.summary()}"
            )
        vae.model.load_state_dict(start.model.state_dict())  # weights only: training works on raw latents
        log.info("starting from the weights in %s", cfg.init_from)
    if cfg.freeze_encoder:
        for module in (vae.model.encoder, vae.model.quant_conv):
            module.requires_grad_(False)
    trainable = [p for p in vae.parameters() if p.requires_grad]
    ema = EMA(vae, cfg.ema_decay)
    opt, sched = adamw_with_warmup(
        trainable,
        cfg.lr,
        (0.9, 0.99),
        0.0,
        cfg.warmup,
        total_steps=cfg.steps,
        decay_steps=cfg.decay_steps,
        final_lr_ratio=cfg.final_lr_ratio,
    )
    held, held_masks = heldout_clips(cfg.eval_clips, cfg.size, cfg.eval_frames)
    # noise is drawn in the DiT's units (the frozen codec's statistics) and converted to the units each path
    # decodes: raw posterior means, or latents normalised by the statistics of the model in training (the
    # toy preset's are 0 and 1, so raw again)
    raw_scale = frozen.latents_std if cfg.latent_noise else None

    def train_step(step: int) -> dict[str, float]:
        fg = cfg.fg_weight * max(0.0, 1.0 - step / max(1, cfg.fg_decay_steps))
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step + 7)  # a function of the step
        stds = cfg.latent_noise * torch.rand(cfg.batch_size, generator=gen)  # one level a clip

        def corrupt(z: torch.Tensor, normalised: bool) -> torch.Tensor:
            if not cfg.latent_noise:
                return z
            scale = raw_scale / vae.latents_std if normalised else raw_scale
            return add_latent_noise(z, stds, scale, gen)

        vae.train()
        if cfg.warm_chunks_max:
            warm = warm_chunks(cfg, step)
            x_all, mask = _batch(cfg, step, extra_frames=4 * warm)
            rec, x, mask, z = _reconstruct_after_warmup(vae, x_all, mask, warm, lambda z: corrupt(z, True))
            kl = torch.zeros(())
        else:
            warm = 0
            x, mask = _batch(cfg, step)
            x_all = x
            posterior = vae.model.encode(x).latent_dist
            # the posterior mean, not a sample: at init the posterior std is ~1 and buries the ~0.15-scale
            # signal, which stalls training at a constant grey; the DiT only ever sees the mean anyway
            mu = posterior.mode()
            z = vae.normalize(mu)
            rec = vae.model.decode(corrupt(mu, False)).sample
            kl = posterior.kl().mean() / x[0].numel()
        rec_loss = decoder_loss(rec, x, mask, fg, cfg.edge_weight, cfg.edge_px)
        l1 = (rec - x).abs().mean()
        drift = torch.zeros(())
        if cfg.latent_anchor:
            drift = latent_drift(z, vae, _anchor_latents(frozen, x_all, warm), frozen)
        loss = rec_loss + cfg.kl_weight * kl + cfg.latent_anchor * drift
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        ema.update(vae)
        stats = {
            "loss": loss.item(),
            "l1": l1.item(),
            "psnr": psnr(rec.detach(), x),
            "kl": kl.item(),
            "lr": float(sched.get_last_lr()[0]),
        }
        if cfg.latent_anchor:
            stats["drift"] = drift.item()
        return stats

    run_loop(
        out_dir=out,
        max_steps=min(cfg.steps, max_steps) if max_steps else cfg.steps,
        state={"vae": vae, "ema": ema, "opt": opt, "sched": sched},
        train_step=train_step,
        ckpt_every=cfg.ckpt_every,
        log_every=cfg.log_every,
        evaluate=lambda step: evaluate_vae(ema.model, held[:EVAL_CLIPS], held_masks[:EVAL_CLIPS]),
        eval_every=cfg.eval_every,
        config=to_dict(cfg),
        resume=resume,
        progress=progress,
    )
    final = ema.model
    if frozen is None:
        mean, std = latent_statistics(final, held)
    else:  # the latents are (near) the init encoder's: keep its statistics bit for bit
        mean, std = list(frozen.cfg.latents_mean), list(frozen.cfg.latents_std)
        if final.z_dim > frozen.z_dim:  # a widened latent: its new channels' are measured
            new_mean, new_std = latent_statistics(final, held)
            mean, std = mean + new_mean[frozen.z_dim :], std + new_std[frozen.z_dim :]
    final.cfg.latents_mean, final.cfg.latents_std = mean, std
    shape = final.latents_mean.shape
    final.latents_mean.copy_(torch.tensor(mean).view(shape))
    final.latents_std.copy_(torch.tensor(std).view(shape))
    return final
