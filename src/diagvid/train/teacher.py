"""Stage 0: the bidirectional teacher, trained by flow matching on toy-world latents with caption dropout.

Data flow: world clips -> frozen VAE -> latents (encoded once into a sharded cache on disk) -> DiT in full
attention learns v = noise - x0 at shifted uniform noise levels. One caption in `caption_dropout` is
replaced by the empty prompt so that classifier-free guidance works at sampling time.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diagvid.config import to_dict
from diagvid.model.dit import DiTConfig, WanDiT, preset
from diagvid.sampling import FlowMatch, shift_sigma, unshift_sigma, with_first_frame
from diagvid.train.loop import EMA, adamw_with_warmup, run_loop, start_run
from diagvid.world.captions import OPPOSITE

log = logging.getLogger("diagvid.train")

CONTRAST_WITH = ("other", "opposite")
"""What `TeacherConfig.contrast_with` allows."""


@dataclass
class DataConfig:
    """Which world clips the teacher learns from."""

    num_frames: int = 81
    """pixel frames per clip (1 + 4k): 81 -> 21 latent frames, 7 chunks of 3"""
    size: int = 64
    """pixel height and width"""
    p_two: float = 0.25
    """probability of a two-object clip"""
    num_clips: int = 4096
    """clips encoded into the latent cache (training cycles over them)"""
    shard_size: int = 256
    """clips per cache shard (the encode step resumes shard by shard)"""
    cache_dir: str = "data/toy-latents"
    """where the encoded latents are kept (git-ignored)"""


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and an optional linear decay at the end of the run."""

    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.01
    warmup: int = 200
    grad_clip: float = 1.0
    decay_steps: int = 0
    """the last `decay_steps` steps of the run lower the learning rate linearly to `final_lr_ratio * lr`"""
    final_lr_ratio: float = 0.1

    def schedule(self, total_steps: int) -> dict:
        """Keyword arguments of `adamw_with_warmup` for a run of `total_steps` steps."""
        if not 0 <= self.decay_steps <= total_steps:
            raise ValueError(f"optim.decay_steps={self.decay_steps} must be in [0, steps={total_steps}]")
        if not 0 <= self.final_lr_ratio <= 1:
            raise ValueError(f"optim.final_lr_ratio={self.final_lr_ratio} must be in [0, 1]")
        return {
            "total_steps": total_steps,
            "decay_steps": self.decay_steps,
            "final_lr_ratio": self.final_lr_ratio,
        }


@dataclass
class TeacherConfig:
    """A teacher training run."""

    model: str = "toy"
    """DiT preset"""
    model_overrides: dict = field(default_factory=dict)
    """DiTConfig fields changed from the preset"""
    vae: str = "toy/vae"
    """bundled name or folder of the VAE"""
    text: str = "toy/text"
    """bundled name or folder of the text encoder"""
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    steps: int = 6000
    batch_size: int = 8
    caption_dropout: float = 0.1
    train_shift: float = 3.0
    """noise levels are shift(u), u ~ U(0, 1): more weight on high noise"""
    sigma_min: float = 0.0
    sigma_max: float = 1.0
    """train (and validate) only at noise levels in [sigma_min, sigma_max], with the shifted density of the
    full range restricted to it: an expert for one part of the trajectory (`diagvid.model.experts`), e.g.
    a high-noise expert with sigma_min = 0.7 that lays out the clip, as Wan2.2 splits its denoiser"""
    frame_noise: float = 0.0
    """fraction of training clips noised with an independent level per latent frame (Diffusion Forcing);
    the others get one level for the whole clip, the state the sampler sees"""
    clean_first_frame: float = 0.0
    """fraction of training clips learned as image-to-video: latent frame 0 given clean (timestep 0, as
    Wan2.2's TI2V model conditions on its first frame) and left out of the loss. On short clips, where a
    caption's direction holds for most of the clip, this teaches the toy teacher the sign of its direction
    words, which text-to-video training did not (docs/status.md, "Where the sign is learned")"""
    direction_contrast: float = 0.0
    """weight of the direction contrast (`direction_contrast_loss`): each captioned clip is also denoised
    under its caption with every direction word replaced by another direction, and the model is trained to
    denoise it worse under the wrong direction; 0: off (plain flow matching, one forward a clip)"""
    contrast_temperature: float = 0.05
    """scale of the relative loss gap in the contrast: a gap of a few temperatures saturates it"""
    contrast_with: str = "other"
    """the wrong direction of the contrast: "other" (any different direction, drawn at random) or "opposite"
    (the same line the other way: the sign, which a teacher that reads only the axis has not learned)"""
    ema_decay: float = 0.999
    seed: int = 0
    out_dir: str = "runs/toy-teacher"
    log_every: int = 10
    ckpt_every: int = 100
    eval_every: int = 500
    """steps between validation losses (held-out latents at fixed noise levels and noise; 0: off)"""
    val_clips: int = 32
    """latents held out of training for the validation loss (the last ones of the cache)"""
    init_from: str = ""
    """a DiT folder or bundled name (e.g. "toy/teacher") to start from when the run has no checkpoint yet; a
    model of half (a third ...) the run's depth is grown to it (`grown`)"""
    anchor_init: float = 0.0
    """RMS of the seeded random weights of ours (`first_frame_embedding`, `position_grid`, `motion_stem`) given
    to a run whose init_from has none (a run from scratch starts them at zero, like every fresh WanDiT); 0 keeps
    the start's function exactly, but a zero embedding gets almost no gradient (nothing uses it yet), so a run
    that is to learn one needs it near the tokens' scale (the toy patch embedding's RMS is about 0.8). A zero
    motion stem does get a gradient (its input is the clip), so 0 suits it"""

    def __post_init__(self) -> None:
        if self.data.num_frames < 1 or (self.data.num_frames - 1) % 4:
            raise ValueError(f"data.num_frames={self.data.num_frames} must be 1 + 4k (Wan VAE)")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout={self.caption_dropout} must be in [0, 1)")
        if not 0 <= self.sigma_min < self.sigma_max <= 1:
            raise ValueError(
                f"sigma_min={self.sigma_min}, sigma_max={self.sigma_max}: need 0 <= sigma_min < sigma_max <= 1"
            )
        if not 0 <= self.frame_noise <= 1:
            raise ValueError(f"frame_noise={self.frame_noise} must be in [0, 1]")
        if not 0 <= self.clean_first_frame <= 1:
            raise ValueError(f"clean_first_frame={self.clean_first_frame} must be in [0, 1]")
        if self.clean_first_frame > 0 and self.direction_contrast > 0:
            raise ValueError(
                "clean_first_frame and direction_contrast cannot be combined: set one of them to 0"
            )
        if self.direction_contrast < 0:
            raise ValueError(f"direction_contrast={self.direction_contrast} must be >= 0 (0: off)")
        if not (math.isfinite(self.anchor_init) and self.anchor_init >= 0):
            raise ValueError(f"anchor_init={self.anchor_init} must be a finite number >= 0")
        if not self.contrast_temperature > 0:
            raise ValueError(f"contrast_temperature={self.contrast_temperature} must be > 0")
        if self.contrast_with not in CONTRAST_WITH:
            raise ValueError(f"contrast_with={self.contrast_with!r}; allowed: {CONTRAST_WITH}")
        if self.batch_size < 1 or self.steps < 1:
            raise ValueError(f"batch_size={self.batch_size} and steps={self.steps} must be >= 1")
        self.optim.schedule(self.steps)  # a decay longer than the run fails here, before any compute
        if not 0 <= self.val_clips < self.data.num_clips:
            raise ValueError(
                f"val_clips={self.val_clips} must be in [0, {self.data.num_clips}) (data.num_clips, the cached clips)"
            )


def vae_fingerprint(vae) -> str:
    """A short hash of what the latents depend on: the encoder's weights and the latent statistics.

    Cached latents are valid for exactly one encoder; the decoder is left out on purpose, so a decoder
    fine-tuned with a frozen encoder (`freeze_encoder`) keeps the cache and every model trained on it.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        if not name.startswith(("model.encoder.", "model.quant_conv.")):
            continue
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    h.update(vae.latents_mean.cpu().numpy().tobytes() + vae.latents_std.cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def build_latent_cache(cfg: DataConfig, vae, encode_batch: int = 8) -> tuple[torch.Tensor, list[str]]:
    """Encode `num_clips` world clips once (resumable by shard); returns latents [N, C, F, h, w] and captions.

    The cache folder is keyed by the clip geometry and the VAE's fingerprint, so a retrained VAE never
    reuses latents of the old one.
    """
    from diagvid.world import WorldDataset

    root = Path(cfg.cache_dir) / f"f{cfg.num_frames}-s{cfg.size}-p{cfg.p_two}-vae{vae_fingerprint(vae)}"
    root.mkdir(parents=True, exist_ok=True)
    data = WorldDataset(num_frames=cfg.num_frames, size=cfg.size, p_two=cfg.p_two)
    shards = (cfg.num_clips + cfg.shard_size - 1) // cfg.shard_size
    latents, captions = [], []
    for s in range(shards):
        path = root / f"shard-{s:04d}-{cfg.shard_size}.pt"
        if not path.exists():
            lo, hi = s * cfg.shard_size, min((s + 1) * cfg.shard_size, cfg.num_clips)
            log.info("encoding clips %d..%d into %s", lo, hi, path)
            zs, caps = [], []
            with torch.no_grad():
                for a in range(lo, hi, encode_batch):
                    items = [data[i] for i in range(a, min(a + encode_batch, hi))]
                    zs.append(vae.encode(torch.stack([v for v, _ in items])).half())
                    caps.extend(c for _, c in items)
            from diagvid.train.checkpoint import save_atomic

            save_atomic({"latents": torch.cat(zs), "captions": json.dumps(caps)}, path)
        blob = torch.load(path, map_location="cpu", weights_only=True)
        latents.append(blob["latents"])
        captions.extend(json.loads(blob["captions"]))
    return torch.cat(latents)[: cfg.num_clips].float(), captions[: cfg.num_clips]


def flow_matching_loss(
    model: WanDiT,
    x0: torch.Tensor,
    ctx: torch.Tensor,
    shift: float,
    gen: torch.Generator | None = None,
    frame_noise: float = 0.0,
    sigmas: tuple[float, float] = (0.0, 1.0),
    clean_first_frame: float = 0.0,
) -> torch.Tensor:
    """MSE between predicted and true velocity at shifted-uniform noise levels in the range `sigmas`: one
    per sample, or, for a `frame_noise` fraction of the samples, one per latent frame. A `clean_first_frame`
    fraction of the samples is image-to-video: latent frame 0 clean, at timestep 0, and out of the loss."""
    x_t, t, target = noised_latents(x0, shift, gen, frame_noise, sigmas)
    if clean_first_frame <= 0:
        v = model(x_t, t, ctx, attention="full")
        return torch.nn.functional.mse_loss(v.float(), target.float())
    b, f = x0.shape[0], x0.shape[2]
    clean = torch.rand(b, generator=gen) < clean_first_frame
    x_t, t = with_first_frame(x_t, t, x0[:, :, :1], clean)
    v = model(x_t, t, ctx, attention="full")
    weight = torch.ones(b, f)
    weight[clean, 0] = 0.0
    per_frame = (v.float() - target.float()).pow(2).mean(dim=(1, 3, 4))  # [B, F]
    return (per_frame * weight.to(per_frame.device)).sum() / weight.sum().to(per_frame.device)


def noised_latents(
    x0: torch.Tensor,
    shift: float,
    gen: torch.Generator | None = None,
    frame_noise: float = 0.0,
    sigmas: tuple[float, float] = (0.0, 1.0),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The flow-matching training input: (x_t, timesteps [B] or [B, F], velocity target) for latents x0.

    Noise levels are shift(u), u uniform over the u whose shifted level lies in `sigmas` (all of [0, 1] by
    default): a narrower range keeps the shifted density, restricted to it.
    """
    b, f = x0.shape[0], x0.shape[2]
    lo, hi = (unshift_sigma(s, shift) for s in sigmas)

    def uniform(*shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=gen)

    u = uniform(b)
    if frame_noise > 0:
        per_frame = torch.rand(b, generator=gen) < frame_noise
        u = torch.where(per_frame[:, None], uniform(b, f), u[:, None])
    sigma = shift_sigma(u, shift).to(x0.device)
    noise = torch.randn(x0.shape, generator=gen).to(x0.device)
    fm = FlowMatch(shift=1.0, sigma_mode="exact")  # sigma is already shifted; t = 1000 sigma exactly
    t = sigma * 1000
    return fm.add_noise(x0, noise, t), t, fm.velocity_target(x0, noise)


def direction_contrast_loss(
    model: WanDiT,
    x0: torch.Tensor,
    ctx: torch.Tensor,
    wrong_ctx: torch.Tensor,
    contrasted: torch.Tensor,
    shift: float,
    temperature: float,
    frame_noise: float = 0.0,
    sigmas: tuple[float, float] = (0.0, 1.0),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flow matching plus a contrast that makes the model read the direction words.

    A plain flow-matching teacher can ignore a caption's direction (the noisy clip itself shows where its
    object goes once the object is visible, and a wrong direction costs the loss almost nothing), and ours
    did. Here the clips where `contrasted` [B] is set are denoised a second time, same x_t, under
    `wrong_ctx`: their caption with another direction. With per-clip losses l (right caption) and l' (wrong
    one) and the relative gap g = (l' - l) / l, the contrast is softplus(-g / temperature): the denoiser
    used as a classifier of its own caption's direction, trained to pick the right one.

    Returns (flow-matching loss over the batch, contrast loss over the contrasted clips, their mean gap g).
    """
    x_t, t, target = noised_latents(x0, shift, frame_noise=frame_noise, sigmas=sigmas)
    sel = contrasted.nonzero().flatten()
    both_ctx = torch.cat([ctx, wrong_ctx[sel]])
    v = model(torch.cat([x_t, x_t[sel]]), torch.cat([t, t[sel]]), both_ctx, attention="full")
    per_clip = (v.float() - torch.cat([target, target[sel]]).float()).pow(2).flatten(1).mean(1)
    right, wrong = per_clip[: len(x0)], per_clip[len(x0) :]
    if not len(sel):
        zero = per_clip.new_zeros(())
        return right.mean(), zero, zero
    gap = (wrong - right[sel]) / right[sel].detach().clamp_min(1e-8)
    return right.mean(), torch.nn.functional.softplus(-gap / temperature).mean(), gap.detach().mean()


def wrong_direction(caption: str, gen: torch.Generator | None = None, opposite: bool = False) -> str | None:
    """The caption with every direction word replaced by a different direction, drawn at random (or, with
    `opposite`, the opposite one); None when it names no direction."""
    from diagvid.world import DIRECTIONS

    names = list(DIRECTIONS)
    words = caption.split()
    if not any(w in DIRECTIONS for w in words):
        return None
    out = []
    for w in words:
        if w in DIRECTIONS and opposite:
            w = CAPTION_SWAPS["direction"][w]
        elif w in DIRECTIONS:
            others = [d for d in names if d != w]
            w = others[int(torch.randint(len(others), (), generator=gen))]
        out.append(w)
    return " ".join(out)


def grown(model: WanDiT, cfg: DiTConfig, where: str = "the model") -> WanDiT:
    """`model` deepened to `cfg.num_layers` (a multiple of its own) without changing what it computes: each
    block is followed by copies whose residual outputs (self-attention, cross-attention and FFN output
    projections) are zero, so they add nothing until training moves them. The eleventh session grew the
    6-layer toy teacher to 12 this way (docs/status.md). Any other difference of configuration is an error."""
    from dataclasses import replace

    n = model.cfg.num_layers
    if replace(model.cfg, num_layers=cfg.num_layers) != cfg or cfg.num_layers % n:
        raise ValueError(
            f"{where} is a {model.cfg} model; this run trains {cfg} (only a depth that is a multiple of its own "
            "can grow from it)"
        )
    deep = WanDiT(cfg)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("blocks.")}
    for i, block in enumerate(model.blocks):
        for j in range(cfg.num_layers // n):
            twin = copy.deepcopy(block)
            if j:
                with torch.no_grad():
                    for out in (twin.self_attn.o, twin.cross_attn.o, twin.ffn[2]):
                        out.weight.zero_()
                        out.bias.zero_()
            index = i * (cfg.num_layers // n) + j
            state.update({f"blocks.{index}.{k}": v for k, v in twin.state_dict().items()})
    deep.load_state_dict(state)
    return deep


def starting_state(
    start: WanDiT, cfg: DiTConfig, where: str = "the model", anchor_rms: float = 0.0, seed: int = 0
) -> dict[str, torch.Tensor]:
    """The weights of a run of `cfg` that starts from `start`: widened to the run's latent channels when it
    reads more (`widen_dit_latent`: the old channels' velocity unchanged, the new ones' zero), grown to the
    run's depth (`grown`, the same function), and given the embeddings of ours the run has and `start` not
    (`first_frame_embedding`, `position_grid`, `motion_stem`): zero (the same function again) or, with
    `anchor_rms` > 0, seeded noise of that RMS."""
    from dataclasses import replace

    from diagvid.model.weights import expected_shapes
    from diagvid.model.widen import widen_dit_latent

    ours = {
        "first_frame_embedding": "first_frame",
        "position_grid": "position",
        "motion_stem": "motion_stem.weight",
    }
    for option in ours:
        theirs, mine = getattr(start.cfg, option), getattr(cfg, option)
        if theirs and not mine:
            raise ValueError(f"{where} has a {option}; this run's model has none, so it would be lost")
        if theirs and theirs != mine:
            raise ValueError(f"{where} has {option}={theirs}; this run's model has {mine}")
    if start.cfg.in_dim < cfg.in_dim:  # a codec with more latent channels (widen_latent): the old ones first
        start = widen_dit_latent(start, cfg.in_dim)
    same = replace(cfg, **{option: getattr(start.cfg, option) for option in ours})
    if start.cfg != same:
        start = grown(start, same, where=where)
    state = start.state_dict()
    gen = torch.Generator().manual_seed(seed)
    shapes = expected_shapes(cfg)
    for option, name in ours.items():
        if getattr(cfg, option) and not getattr(start.cfg, option):
            state[name] = torch.randn(shapes[name], generator=gen) * anchor_rms
    return state


@torch.no_grad()
def validation_loss(
    model: WanDiT,
    x0: torch.Tensor,
    ctx: torch.Tensor,
    shift: float,
    batch: int = 8,
    sigmas: tuple[float, float] = (0.0, 1.0),
) -> float:
    """Flow-matching loss on fixed latents at fixed noise levels and noise: comparable across steps and runs.

    The RNG is local (seed 0), so evaluating does not move the training run's random stream.
    """
    gen = torch.Generator().manual_seed(0)
    was_training = model.training
    model.eval()
    total = 0.0
    for a in range(0, len(x0), batch):
        part = x0[a : a + batch]
        loss = flow_matching_loss(model, part, ctx[a : a + batch], shift, gen, sigmas=sigmas)
        total += loss.item() * len(part)
    model.train(was_training)
    return total / len(x0)


# word swaps that change one attribute of a caption and keep it grammatical
CAPTION_SWAPS: dict[str, dict[str, str]] = {
    "direction": dict(OPPOSITE),
    "speed": {"fast": "slowly", "slowly": "fast", "slow": "fast", "quickly": "slowly"},
    "colour": {
        "red": "blue",
        "blue": "red",
        "green": "magenta",
        "magenta": "green",
        "yellow": "cyan",
        "cyan": "yellow",
    },
}


@torch.no_grad()
def caption_sensitivity(
    model: WanDiT,
    x0: torch.Tensor,
    captions: list[str],
    text,
    sigmas: tuple[float, ...] = (0.9, 0.8, 0.7, 0.6, 0.5),
    seed: int = 0,
    clean_first_frame: bool = False,
) -> dict[str, float]:
    """How much a model relies on each part of the caption: the relative change of its flow-matching loss on
    latents x0 [B, C, F, h, w] when every caption has one word class swapped (`CAPTION_SWAPS`: "direction"
    -> the opposite direction, ...) or is dropped ("null"). Same noise and levels for every variant, so 0.0
    means the model ignores that part; a teacher that follows its prompts scores clearly above 0. With
    `clean_first_frame`, as image-to-video: frame 0 given clean and left out of the loss."""
    fm = FlowMatch(shift=1.0, sigma_mode="exact")
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    variants = {"caption": captions, "null": [""] * len(captions)}
    for name, table in CAPTION_SWAPS.items():
        variants[name] = [" ".join(table.get(w, w) for w in c.split()) for c in captions]
    contexts = {name: text.encode(caps)[0] for name, caps in variants.items()}  # once, for every level
    was_training = model.training
    model.eval()
    loss = dict.fromkeys(variants, 0.0)
    for sigma in sigmas:
        t = torch.full((len(x0),), 1000.0 * sigma)
        x_t = fm.add_noise(x0, noise, t)
        first = 0
        if clean_first_frame:
            x_t, t = with_first_frame(x_t, t, x0[:, :, :1])
            first = 1
        for name, ctx in contexts.items():
            err = model(x_t, t, ctx, attention="full") - fm.velocity_target(x0, noise)
            loss[name] += err[:, :, first:].float().pow(2).mean().item() / len(sigmas)
    model.train(was_training)
    return {name: loss[name] / loss["caption"] - 1.0 for name in variants if name != "caption"}


def train_teacher(
    cfg: TeacherConfig, *, resume: bool = True, max_steps: int | None = None, progress: bool = True
) -> Path:
    """Train (or continue) a teacher run; returns the run folder. Weights: `<out_dir>/checkpoint.pt`."""
    from diagvid.pretrained import load_text_encoder, load_vae

    out = start_run(cfg.out_dir, to_dict(cfg), cfg.seed)
    vae = load_vae(cfg.vae)
    text = load_text_encoder(cfg.text)
    dit_cfg = preset(cfg.model, **cfg.model_overrides)
    if dit_cfg.in_dim != vae.z_dim:
        raise ValueError(f"model in_dim={dit_cfg.in_dim} but the VAE makes {vae.z_dim} latent channels")
    model = WanDiT(dit_cfg)
    if cfg.init_from and not (out / "checkpoint.pt").exists():
        from diagvid.pretrained import load_dit_model  # a folder or a bundled name ("toy/teacher")

        start = load_dit_model(cfg.init_from)
        where = f"init_from={cfg.init_from!r}"
        model.load_state_dict(
            starting_state(start, dit_cfg, where, anchor_rms=cfg.anchor_init, seed=cfg.seed)
        )
        log.info("starting from the weights in %s (%d layers)", cfg.init_from, start.cfg.num_layers)
    # encoding is the slow part of starting a run: every check above comes before it
    latents, captions = build_latent_cache(cfg.data, vae)
    ema = EMA(model, cfg.ema_decay)
    o = cfg.optim
    opt, sched = adamw_with_warmup(
        model.parameters(), o.lr, o.betas, o.weight_decay, o.warmup, **o.schedule(cfg.steps)
    )
    null_ctx = text.encode([""])[0]
    text_cache: dict[str, torch.Tensor] = {}

    def embed(caption: str) -> torch.Tensor:
        if caption not in text_cache:
            text_cache[caption] = text.encode([caption])[0]
        return text_cache[caption]

    n = latents.shape[0] - cfg.val_clips
    sigmas = (cfg.sigma_min, cfg.sigma_max)
    val_latents, val_captions = latents[n:], captions[n:]

    perms: dict[int, torch.Tensor] = {}

    def permutation(epoch: int) -> torch.Tensor:
        # seeded by (seed, epoch) alone, so any step's batch can be recomputed after a restart
        if epoch not in perms:
            perms.clear()
            perms[epoch] = torch.randperm(
                n, generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
            )
        return perms[epoch]

    def train_step(step: int) -> dict[str, float]:
        # data position is a function of the step
        first = step * cfg.batch_size
        idx = [int(permutation(j // n)[j % n]) for j in range(first, first + cfg.batch_size)]
        x0 = latents[idx]
        drop = torch.rand(cfg.batch_size) < cfg.caption_dropout
        ctx = torch.cat(
            [null_ctx if d else embed(captions[i]) for i, d in zip(idx, drop.tolist(), strict=True)]
        )
        model.train()
        logged = {}
        if cfg.direction_contrast > 0:
            opposite = cfg.contrast_with == "opposite"
            wrong = [
                None if d else wrong_direction(captions[i], opposite=opposite)
                for i, d in zip(idx, drop.tolist(), strict=True)
            ]
            contrasted = torch.tensor([w is not None for w in wrong])
            wrong_ctx = torch.cat([null_ctx if w is None else embed(w) for w in wrong])
            fm_loss, contrast, gap = direction_contrast_loss(
                model,
                x0,
                ctx,
                wrong_ctx,
                contrasted,
                cfg.train_shift,
                cfg.contrast_temperature,
                cfg.frame_noise,
                sigmas,
            )
            loss = fm_loss + cfg.direction_contrast * contrast
            logged = {"fm_loss": fm_loss.item(), "contrast": contrast.item(), "direction_gap": gap.item()}
        else:
            loss = flow_matching_loss(
                model,
                x0,
                ctx,
                cfg.train_shift,
                frame_noise=cfg.frame_noise,
                sigmas=sigmas,
                clean_first_frame=cfg.clean_first_frame,
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        sched.step()
        ema.update(model)
        return {
            "loss": loss.item(),
            "grad_norm": grad_norm.item(),
            "lr": float(sched.get_last_lr()[0]),
            **logged,
        }

    def evaluate(step: int) -> dict[str, float]:
        if not cfg.val_clips:
            return {}
        ctx = torch.cat([embed(c) for c in val_captions])
        loss = validation_loss(ema.model, val_latents, ctx, cfg.train_shift, sigmas=sigmas)
        out = {"val_loss": round(loss, 5)}
        if cfg.clean_first_frame > 0:  # does the image-to-video model read the sign of its direction words?
            gaps = caption_sensitivity(
                ema.model, val_latents, val_captions, text, sigmas=(0.9,), clean_first_frame=True
            )
            out["i2v_direction_gap"] = round(gaps["direction"], 5)
        return out

    run_loop(
        out_dir=out,
        max_steps=min(cfg.steps, max_steps) if max_steps else cfg.steps,
        state={"model": model, "ema": ema, "opt": opt, "sched": sched},
        train_step=train_step,
        ckpt_every=cfg.ckpt_every,
        log_every=cfg.log_every,
        evaluate=evaluate,
        eval_every=cfg.eval_every,
        config=to_dict(cfg),
        resume=resume,
        progress=progress,
    )
    return out


def export_teacher(run_dir: str | Path, folder: str | Path) -> Path:
    """Write the EMA weights of a teacher run as a model folder of ours (safetensors + config; the run's
    `sigma_min` / `sigma_max` recorded as its `noise_range` when they are not 0 and 1)."""
    from diagvid.model.weights import save_dit
    from diagvid.train.checkpoint import load_checkpoint

    run_dir = Path(run_dir)
    cfg = json.loads((run_dir / "config.json").read_text())
    model = WanDiT(preset(cfg["model"], **cfg.get("model_overrides", {})))
    model.load_state_dict(load_checkpoint(run_dir / "checkpoint.pt")["state"]["ema"])
    # a run at part of the noise levels (a noise expert) says so in the folder
    return save_dit(model, folder, noise_range=(cfg.get("sigma_min", 0.0), cfg.get("sigma_max", 1.0)))
