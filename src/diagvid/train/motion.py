"""Train the motion classifier (`diagvid.model.motion`) on the teacher's cached world latents.

Each step draws cached clips, noises them to uniform levels in [0, 1] (the classifier must read every level
a sampler asks it about) and classifies what their objects do (the model's `target`: their direction, or the
axes they move along and their speed); clips whose objects do different things are left out. A classifier
of several windows learns on one window per clip, its start drawn uniformly from the first window's to the
last's. The last `heldout` usable clips of the cache are held out; accuracy (of the windows' summed
log-probabilities, as guidance reads them) is reported on them per noise level, with fixed noise, so runs
compare.

A realness discriminator (`target = "realness"`, or per captioned direction "realness-direction") learns the
world's cached clips against clips of a sampler (`SamplerConfig`): `sampler_latents` samples them once, in
files written atomically and kept, so an interrupted run goes on where it stopped. Guided toward "real", it
pulls that sampler's clips toward the world's (discriminator guidance, Kim et al., 2023).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from diagvid.config import to_dict
from diagvid.model.motion import MotionClassifier, MotionClassifierConfig, partner_class, prompt_label
from diagvid.train.loop import EMA, adamw_with_warmup, progress_bar, run_loop, seeded, start_run
from diagvid.train.teacher import DataConfig, build_latent_cache

EVAL_SIGMAS = (0.3, 0.5, 0.7, 0.8, 0.9)
log = logging.getLogger("diagvid.train")


@dataclass
class SamplerConfig:
    """The sampler whose clips a realness discriminator learns to tell from the world's: clip i is sampled
    for the caption of cached world clip i, i < `count` (`evaluate.teacher_method`'s settings)."""

    count: int = 0
    """clips to sample (a realness discriminator needs some; other targets none)"""
    out_dir: str = "data/toy-sampled"
    """where the sampled latents are kept (git-ignored), one file a batch"""
    batch_size: int = 8
    teacher: str = "toy/teacher-low"
    teacher_high: str | None = "toy/teacher-high"
    """the high-noise expert of the pair (None: `teacher` alone)"""
    text: str = "toy/text"
    num_steps: int = 50
    shift: float = 5.0
    guidance: float = 2.0
    eta: float = 1.0
    motion: str | None = "toy/motion"
    """a classifier guiding the sampler toward each caption's direction (None: unguided)"""
    motion_scale: float = 100.0
    motion_sigma_min: float = 0.5
    seed: int = 10_000_000
    """the noise of the batch whose first clip is i comes from the generator seeded seed + i"""

    def __post_init__(self) -> None:
        if self.count < 0 or self.batch_size < 1:
            raise ValueError(f"sampler count={self.count} must be >= 0 and batch_size={self.batch_size} >= 1")


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
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    """the clips a realness discriminator learns as "generated" (used by the "realness" targets only)"""
    out_dir: str = "runs/toy-motion"
    log_every: int = 10
    ckpt_every: int = 250
    eval_every: int = 500

    def __post_init__(self) -> None:
        if min(self.steps, self.batch_size, self.heldout) < 1:
            raise ValueError(
                f"steps={self.steps}, batch_size={self.batch_size} and heldout={self.heldout} must be >= 1"
            )
        if self.model.target.startswith("realness") and self.sampler.count <= self.heldout // 2:
            raise ValueError(
                f"sampler.count={self.sampler.count}: a realness discriminator learns sampled clips against the "
                f"world's; sample more than heldout / 2 = {self.heldout // 2} of them"
            )


def labelled_latents(
    cfg: MotionTrainConfig, vae=None, progress: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train latents, train labels, held-out latents, held-out labels), latents cut to the frames the
    windows span. A realness discriminator's sampled clips are sampled first if missing (`progress`: a bar)."""
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
    if cfg.model.target.startswith("realness"):
        fake = sampler_latents(cfg, captions, latents.shape[-2:], progress)
        return _realness_split(cfg, latents[:, :, :span], fake[:, :, :span], labels)
    x, y = latents[keep][:, :, :span].contiguous(), labels[keep]
    return x[: -cfg.heldout], y[: -cfg.heldout], x[-cfg.heldout :], y[-cfg.heldout :]


def _realness_split(cfg: MotionTrainConfig, real: torch.Tensor, fake: torch.Tensor, labels: torch.Tensor):
    """World clip i labelled as its caption asks (`labels`, the `prompt_label` of each cached caption: "real",
    or "real <direction>"), sampled clip i (sampled for caption i) as the same class's "generated" side; clips
    whose caption has no class (-1) are left out. Half of `heldout` from the end of each side is held out, and
    the sampled training clips are repeated to about as many as the real ones (balanced sides)."""
    classes, target = cfg.model.classes, cfg.model.target
    # the sampled clips are those of the first captions
    fake_labels = torch.tensor(
        [classes.index(partner_class(classes[i])) if i >= 0 else -1 for i in labels[: len(fake)]]
    )
    real, real_y = real[labels >= 0], labels[labels >= 0]
    fake, fake_y = fake[fake_labels >= 0], fake_labels[fake_labels >= 0]
    h = cfg.heldout // 2
    if min(len(real), len(fake)) <= h or h < 1:
        raise ValueError(
            f"{len(real)} world and {len(fake)} sampled clips with one {target} class for heldout="
            f"{cfg.heldout} (half from each): need heldout >= 2 and more than heldout / 2 of each (raise "
            "sampler.count)"
        )
    rep = max(1, (len(real) - h) // (len(fake) - h))
    x = torch.cat([real[:-h], fake[:-h].repeat(rep, 1, 1, 1, 1)]).contiguous()
    y = torch.cat([real_y[:-h], fake_y[:-h].repeat(rep)])
    return x, y, torch.cat([real[-h:], fake[-h:]]), torch.cat([real_y[-h:], fake_y[-h:]])


@torch.no_grad()
def sampler_latents(
    cfg: MotionTrainConfig, captions: list[str], latent_hw: tuple[int, int], progress: bool = True
) -> torch.Tensor:
    """[count, C, F, h, w]: the clips `cfg.sampler` samples at `latent_hw` for the first `count` captions,
    sampled once (one file a batch, written atomically; files already there are read back, if made by these
    settings)."""
    from diagvid.model.motion import MotionGuidance
    from diagvid.model.vae import latent_frames
    from diagvid.pretrained import load_motion_classifier, load_teacher, load_text_encoder
    from diagvid.sampling import sample_euler
    from diagvid.train.checkpoint import save_atomic, write_text_atomic

    sc = cfg.sampler
    if sc.count > len(captions):
        raise ValueError(f"sampler.count={sc.count} is more than the {len(captions)} cached captions")
    out = Path(sc.out_dir)
    # what decides the clips, through JSON so that it compares with the file (not how many, nor where)
    recipe = json.loads(json.dumps({**to_dict(sc), "data": to_dict(cfg.data)}))
    recipe = {k: v for k, v in recipe.items() if k not in ("count", "out_dir")}
    if (out / "sampler.json").exists() and json.loads((out / "sampler.json").read_text()) != recipe:
        raise ValueError(f"{out} holds clips of other sampler settings; choose another sampler.out_dir")
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(json.dumps(recipe, indent=2) + "\n", out / "sampler.json")
    starts = range(0, sc.count, sc.batch_size)

    def size(a: int) -> int:  # clips in the batch that starts at clip a
        return min(sc.batch_size, sc.count - a)

    def path(a: int) -> Path:
        return out / f"sampled-{a:06d}.pt"

    kept = {}  # batch start -> its latents, read once; a last batch of a smaller count is sampled again whole
    for a in starts:
        if path(a).exists():
            z = torch.load(path(a), weights_only=True)["latents"]
            if len(z) == size(a):
                kept[a] = z
    todo = [a for a in starts if a not in kept]
    bar = None
    if todo:
        teacher = load_teacher(sc.teacher, sc.teacher_high).eval().requires_grad_(False)
        text = load_text_encoder(sc.text)
        clf = load_motion_classifier(sc.motion) if sc.motion else None
        null = text.encode([""])[0]
        log.info("sampling %d clips into %s", sum(map(size, todo)), out)
        bar = progress_bar(progress, "sampled clips", sum(map(size, todo)))
    for k, a in enumerate(todo):
        caps = captions[a : a + size(a)]
        gen = torch.Generator().manual_seed(sc.seed + a)
        shape = (len(caps), teacher.cfg.in_dim, latent_frames(cfg.data.num_frames), *latent_hw)
        guide = []
        if clf is not None and sc.motion_scale > 0:
            labels = torch.tensor([prompt_label(c, clf.cfg.classes, clf.cfg.target) for c in caps])
            guide = [MotionGuidance(clf, labels, sc.motion_scale, sc.motion_sigma_min)]
        x0, _ = sample_euler(
            teacher,
            torch.randn(shape, generator=gen),
            text.encode(caps)[0],
            null.expand(len(caps), -1, -1),
            num_steps=sc.num_steps,
            shift=sc.shift,
            guidance=sc.guidance,
            eta=sc.eta,
            generator=gen,
            motion_guidance=guide,
        )
        kept[a] = x0.half()
        save_atomic({"latents": kept[a], "captions": json.dumps(caps)}, path(a))
        log.info("sampled batch %d of %d", k + 1, len(todo))
        if bar is not None:
            bar[0].update(bar[1], advance=len(caps))
    if bar is not None:
        bar[0].stop()
    return torch.cat([kept[a] for a in starts]).float() if kept else torch.empty(0)


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
