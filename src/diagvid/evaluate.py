"""The one evaluation protocol: every method on the same held-out prompts and seeds, scored by the world.

A *method* turns (prompts, num_frames, seed) into uint8 videos. The world metrics (`diagvid.world.metrics`)
read each video back with the world's knowledge only (colour, shape, direction, speed, motion, identity,
drift per chunk) and `score_videos` gives means with bootstrap confidence intervals. Lengths are multiples
of the training length (81 frames = 21 latent frames = 7 chunks of 3): 1x, 4x and 10x show drift.

Methods available without any trained generator: `real` (the world's own clips for the prompts) and `vae`
(the same clips through the codec, which bounds what any generator can score). `teacher` samples the
bidirectional teacher (50 Euler steps, CFG; its length is fixed to what it was trained on). Students are
pipelines of ours with a schedule (diagonal, self-forcing, causvid, ...).

Besides the per-video read-back, every method and length gets `fvd_world`: the Fréchet distance between its
videos and real clips of the same prompts and length, in the feature space of the world's video network
(`diagvid.world.features`). The reference clips are a second draw of the held-out prompts (draw 1), which
no method starts from; the floor is what the real clips the methods do start from (draw 0) score against it.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from diagvid.world import eval_prompts, eval_specs, render
from diagvid.world.metrics import READER_VERSION, score_videos
from diagvid.world.render import FPS

if TYPE_CHECKING:
    from diagvid.model.motion import MotionClassifier
    from diagvid.verify import DirectionVerifier

Method = Callable[[Sequence[str], int, int], list[np.ndarray]]
"""(prompts, num_frames, seed) -> one uint8 [T, H, W, 3] video per prompt"""

TRAIN_FRAMES = 81
"""pixel frames of the training clips (21 latent frames, 7 chunks of 3)"""


@dataclass(frozen=True)
class EvalConfig:
    """What is evaluated: the prompt set, the lengths and the seed."""

    prompts: str = "heldout-48"
    lengths: tuple[int, ...] = (1, 4, 10)
    """multiples of the training length"""
    base_frames: int = TRAIN_FRAMES
    seed: int = 0
    n_boot: int = 1000
    features: str = "toy/features"
    """FVD-world network: bundled name or folder; empty turns fvd_world off"""

    def __post_init__(self) -> None:
        eval_prompts(self.prompts)  # unknown set: a clear error
        if not self.lengths or any(not isinstance(n, int) or n < 1 for n in self.lengths):
            raise ValueError(
                f"lengths={self.lengths!r} must be positive integers (multiples of the training length)"
            )
        if self.base_frames < 1 or (self.base_frames - 1) % 4:
            raise ValueError(f"base_frames={self.base_frames} must be 1 + 4k")

    def frames(self, length: int) -> int:
        """Pixel frames of a clip `length` times the training length (1 + 4k, like everything Wan)."""
        return 1 + length * (self.base_frames - 1)


# the smoke run (`diagvid eval --quick`): short clips (17 and 33 frames: two and three chunks, the least that
# still holds one FVD-world window), so its numbers are not those of the 81-frame protocol the reports use
QUICK = EvalConfig(prompts="heldout-8", lengths=(1, 2), base_frames=17, n_boot=200)


# ----- methods --------------------------------------------------------------------------------------------


def real_method(size: int = 64, draw: int = 0) -> Method:
    """The world's own clips for the held-out prompts (the ceiling every method is compared with); draw k > 0
    gives an independent clip per prompt."""

    def run(prompts: Sequence[str], num_frames: int, seed: int) -> list[np.ndarray]:
        specs = _specs_for(prompts, num_frames, size, draw)
        return [render(s).frames for s in specs]

    return run


def vae_method(vae, size: int = 64) -> Method:
    """Real clips encoded and decoded by the codec: what a perfect generator of latents would score."""
    from diagvid.model.vae import frames_to_tensor, tensor_to_frames

    real = real_method(size)

    @torch.no_grad()
    def run(prompts: Sequence[str], num_frames: int, seed: int) -> list[np.ndarray]:
        out = []
        for video in real(prompts, num_frames, seed):
            x = frames_to_tensor(video)[None].to(vae.device, vae.dtype)
            out.append(tensor_to_frames(vae.decode(vae.encode(x))[0]))
        return out

    return run


def codec_psnr(videos: Sequence[np.ndarray], prompts: Sequence[str], num_frames: int, size: int = 64) -> dict:
    """PSNR (dB) of reconstructions of draw 0's real clips (the `vae` method's videos) against those clips,
    pooled over every clip: over the whole frame, and by region from the renderer's object masks: `outline`
    (every pixel within 2 of an object's outline, where a codec blurs), `interior` (the rest of the objects)
    and `background` (the rest of the frame)."""
    from diagvid.train.vae import outline_band, psnr_from_mse, render_with_mask
    from diagvid.world import frames_to_tensor

    specs = _specs_for(prompts, num_frames, size)
    sums = {"all": 0.0, "background": 0.0, "outline": 0.0, "interior": 0.0}
    counts = dict.fromkeys(sums, 0)
    for video, spec in zip(videos, specs, strict=True):
        real, mask = render_with_mask(spec)
        err = (frames_to_tensor(video) - real).square().sum(0)  # [T, H, W], summed over RGB
        band = outline_band(mask[None], 2)[0, 0].bool()
        mask = mask[0]
        regions = {"all": torch.ones_like(band), "outline": band, "interior": mask & ~band}
        regions["background"] = ~mask & ~band
        for name, where in regions.items():
            sums[name] += err[where].sum().item()
            counts[name] += 3 * int(where.sum())
    return {name: round(psnr_from_mse(sums[name] / counts[name]), 3) for name in sums if counts[name]}


def student_method(pipe, schedule: str | None = None, context: str | None = None) -> Method:
    """A streaming pipeline with a schedule; every prompt gets its own seed (seed + index)."""

    from diagvid.model.vae import latent_frames

    def run(prompts: Sequence[str], num_frames: int, seed: int) -> list[np.ndarray]:
        k = pipe.config.frames_per_chunk
        num_chunks = -(-latent_frames(num_frames) // k)  # enough chunks to cover, then trimmed
        return [
            pipe.generate(p, num_chunks=num_chunks, schedule=schedule, context=context, seed=seed + i)[0][
                :num_frames
            ]
            for i, p in enumerate(prompts)
        ]

    return run


def teacher_method(
    teacher,
    vae,
    text_encoder,
    *,
    size: int = 64,
    num_steps: int = 50,
    shift: float = 5.0,
    guidance: float = 5.0,
    start_sigma: float = 1.0,
    guidance_above: tuple[float, float] | None = None,
    eta: float = 0.0,
    motion: MotionClassifier | Sequence[MotionClassifier] | None = None,
    motion_scale: float | Sequence[float] = 0.0,
    motion_sigma_min: float = 0.5,
    motion_candidates: int = 1,
    motion_choose: Sequence[int] | None = None,
    image_to_video: torch.nn.Module | None = None,
    verifier: DirectionVerifier | None = None,
) -> Method:
    """The undistilled teacher: full attention over the whole clip, Euler + CFG, then one decode to
    `size` x `size` pixels.

    `start_sigma` < 1 (a probe, not a generator): start each prompt from its held-out real clip, encoded and
    noised to the first step of the schedule at or below that level with the prompt's seeded noise, and run
    the remaining steps (SDEdit). It tells how much of a real clip's layout and motion the teacher keeps
    from a given noise level on; at 1 the start is the noise alone, the plain sampler.
    `guidance_above=(sigma, w)`: the CFG scale w at noise levels >= sigma (a high-noise expert's own scale).
    `eta` > 0: stochastic steps (`sample_euler`'s eta), their fresh noise drawn after the prompt's start noise
    from the same seeded generator.
    `motion` (a `diagvid.model.motion.MotionClassifier`, or a list of them) with `motion_scale` > 0 (one
    scale per classifier): classifier guidance toward what each prompt asks of each classifier (its
    direction; its axes and speed) at the levels >= `motion_sigma_min` (`MotionGuidance`, summed over the
    classifiers); a prompt whose objects move different ways is sampled without it.
    `motion_candidates` N > 1 (with `motion`): best of N starts for each prompt that asks the choosing
    classifiers for a class (the direction classifier: one direction; `sample_euler_best_of`): N seeded
    noises, the prompt's own first, run together down to `motion_sigma_min`, where the classifiers pick the
    one most likely to move the asked way (the sum of their log-probabilities); its high-noise steps cost N
    times. `motion_choose` (indices into `motion`): only these classifiers'
    log-probabilities make the choice (default: all), e.g. the direction classifier's alone while a
    discriminator guides beside it, whose term would otherwise outweigh the direction's.
    `verifier` (`diagvid.verify.DirectionVerifier`, with `motion_candidates` N > 1) makes the choice instead:
    for each prompt that asks for a direction, all N starts are sampled to the end (N times every step) and
    it keeps the finished sample that an image-to-video expert, given its first frame, finds the prompt
    explains better than the prompt's reverse. No motion classifier is needed for it; any still guide.
    `image_to_video` (a model trained with `clean_first_frame`, alone or in a `NoiseExperts` pair): a second
    pass. The frames after the first are sampled again by this model, from fresh noise drawn from the same
    generator, given the first pass's latent frame 0 (`FirstFrameGiven`), with the same steps and guidance:
    twice the teacher's forwards. The text-to-video teacher does not learn the sign of a caption's direction;
    an image-to-video one, given where the clip starts, does (docs/status.md, "Where the sign is learned").
    """
    from diagvid.model.motion import MotionGuidance, prompt_label
    from diagvid.model.vae import frames_to_tensor, latent_frames, tensor_to_frames
    from diagvid.sampling import (
        NUM_TRAIN_TIMESTEPS,
        FirstFrameGiven,
        partial_timesteps,
        sample_euler,
        sample_euler_best_of,
    )

    for role, model in (("teacher", teacher), ("image_to_video", image_to_video)):
        if model is not None and not model.cfg.in_dim == model.cfg.out_dim == vae.z_dim:
            raise ValueError(
                f"the {role} reads {model.cfg.in_dim} and writes {model.cfg.out_dim} latent channels; the VAE "
                f"makes {vae.z_dim} (a teacher is sampled with the codec whose latents it was trained on)"
            )
    start = partial_timesteps(num_steps, shift, start_sigma)[0] / NUM_TRAIN_TIMESTEPS  # fails early if empty
    classifiers = [] if motion is None else list(motion) if isinstance(motion, Sequence) else [motion]
    readers = [(f"motion classifier {i}", c.cfg.in_dim) for i, c in enumerate(classifiers)]
    if verifier is not None:
        readers.append(("verifier", verifier.model.cfg.in_dim))
    for role, channels in readers:  # fewer is fine: the leading channels of a codec grown from theirs
        if channels > vae.z_dim:
            raise ValueError(f"the {role} reads {channels} latent channels; the VAE makes {vae.z_dim}")
    scales = [float(x) for x in motion_scale] if isinstance(motion_scale, Sequence) else [float(motion_scale)]
    if any(scales) and not classifiers:
        raise ValueError(f"motion_scale={motion_scale}: classifier guidance needs a motion classifier")
    if classifiers and len(scales) != len(classifiers):
        if len(scales) != 1:
            raise ValueError(f"motion_scale={motion_scale}: one scale per classifier ({len(classifiers)})")
        scales *= len(classifiers)
    guided = [(i, s) for i, s in enumerate(scales) if s]  # (classifier index, scale)
    if image_to_video is not None and start_sigma < 1:
        raise ValueError(
            f"image_to_video: its second pass starts from noise; start_sigma={start_sigma} must be 1"
        )
    if motion_candidates < 1:
        raise ValueError(f"motion_candidates={motion_candidates}: must be >= 1")
    if verifier is not None:
        if motion_candidates < 2:
            raise ValueError(
                f"verifier: picks among finished samples; needs motion_candidates >= 2 (got {motion_candidates})"
            )
        if motion_choose is not None:
            raise ValueError(
                f"motion_choose={motion_choose}: the verifier makes the choice; give one of them"
            )
        if start_sigma < 1:
            raise ValueError(
                f"verifier: the candidates start from pure noise; start_sigma={start_sigma} must be 1"
            )
    elif motion_candidates > 1:
        if motion is None:
            raise ValueError(f"motion_candidates={motion_candidates}: the choice needs a motion classifier")
        if start_sigma < 1:
            raise ValueError(f"motion_candidates={motion_candidates}: start from pure noise (start_sigma 1)")
        if not 0 < motion_sigma_min < 1:
            raise ValueError(
                f"motion_candidates={motion_candidates}: the choice is made at motion_sigma_min="
                f"{motion_sigma_min}, which must be in (0, 1)"
            )
    choosers = list(range(len(classifiers))) if motion_choose is None else list(motion_choose)
    if motion_choose is not None:
        if motion_candidates < 2:
            raise ValueError(
                f"motion_choose={motion_choose}: picks among starts; needs motion_candidates >= 2 "
                f"(got {motion_candidates})"
            )
        if not choosers or len(set(choosers)) != len(choosers):
            raise ValueError(
                f"motion_choose={motion_choose}: name each choosing classifier once, at least one"
            )
        if any(not 0 <= i < len(classifiers) for i in choosers):
            raise ValueError(
                f"motion_choose={motion_choose}: indices into the {len(classifiers)} motion classifiers "
                f"(0 to {len(classifiers) - 1})"
            )

    def labels(prompt: str) -> list[int]:
        return [prompt_label(prompt, c.cfg.classes, c.cfg.target) for c in classifiers]

    def guide(labels: list[int]) -> list[MotionGuidance]:
        return [
            MotionGuidance(classifiers[i], torch.tensor([labels[i]]), s, motion_sigma_min) for i, s in guided
        ]

    def log_p(labels: list[int]):
        def score(x: torch.Tensor, sigma: float) -> torch.Tensor:
            return sum(classifiers[i].log_prob(x, sigma, torch.full((len(x),), labels[i])) for i in choosers)

        return score

    def judged(prompt: str):
        def score(x: torch.Tensor, sigma: float) -> torch.Tensor:  # sigma 0: finished samples
            return verifier.score(x, prompt)

        return score

    @torch.no_grad()
    def run(prompts: Sequence[str], num_frames: int, seed: int) -> list[np.ndarray]:
        dev = next(teacher.parameters()).device
        null = text_encoder.encode([""])[0].to(dev)
        hw = (size // vae.spatial_stride,) * 2
        by_classifier = motion_candidates > 1 and verifier is None
        read = {i for i, _ in guided} | (set(choosers) if by_classifier else set())
        for c in (classifiers[i] for i in sorted(read)):
            if latent_frames(num_frames) < c.cfg.span:
                raise ValueError(
                    f"motion guidance reads {c.cfg.span} latent frames; clips of {num_frames} frames have "
                    f"{latent_frames(num_frames)} (use at least {4 * c.cfg.span - 3} frames, or no --quick)"
                )
        real = real_method(size)(prompts, num_frames, seed) if start_sigma < 1 else None
        out = []
        for i, p in enumerate(prompts):
            ctx = text_encoder.encode([p])[0].to(dev)
            gen = torch.Generator().manual_seed(seed + i)
            noise = torch.randn(1, teacher.cfg.in_dim, latent_frames(num_frames), *hw, generator=gen).to(dev)
            if real is not None:
                clean = vae.encode(frames_to_tensor(real[i])[None].to(vae.device, vae.dtype)).to(
                    dev, noise.dtype
                )
                noise = (1 - start) * clean + start * noise
            asked = labels(p)
            steps = dict(num_steps=num_steps, shift=shift, guidance=guidance, guidance_above=guidance_above)
            steps.update(eta=eta, generator=gen, motion_guidance=guide(asked))
            if verifier is not None and verifier.judges(p):
                more = torch.randn(motion_candidates - 1, *noise.shape[1:], generator=gen).to(dev)
                x0, _ = sample_euler_best_of(
                    teacher, torch.cat([noise, more]), ctx, null, judged(p), 0.0, **steps
                )
            elif by_classifier and max(asked[i] for i in choosers) >= 0:
                more = torch.randn(motion_candidates - 1, *noise.shape[1:], generator=gen).to(dev)
                x0, _ = sample_euler_best_of(
                    teacher, torch.cat([noise, more]), ctx, null, log_p(asked), motion_sigma_min, **steps
                )
            else:
                x0, _ = sample_euler(teacher, noise, ctx, null, start_sigma=start_sigma, **steps)
            if image_to_video is not None:
                again = torch.randn(noise.shape, generator=gen).to(dev)
                given = FirstFrameGiven(image_to_video, x0[:, :, :1])
                x1, _ = sample_euler(given, again, ctx, null, **steps)
                x0 = torch.cat([x0[:, :, :1], x1[:, :, 1:]], dim=2)
            out.append(tensor_to_frames(vae.decode(x0)[0]))
        return out

    return run


def _specs_for(prompts: Sequence[str], num_frames: int, size: int, draw: int = 0):
    """The held-out clip of each prompt (prompts must come from one held-out set, in order)."""
    for name in ("heldout-48", "heldout-8"):
        if list(prompts) == eval_prompts(name)[: len(prompts)]:
            return eval_specs(name, num_frames=num_frames, size=size, draw=draw)[: len(prompts)]
    raise ValueError("real clips exist only for the held-out prompt sets ('heldout-48', 'heldout-8')")


# ----- FVD-world ------------------------------------------------------------------------------------------


class FvdWorld:
    """fvd_world of a method's videos against real clips of the same prompts and length.

    The reference is draw 1 of the held-out clips: the `real` and `vae` methods start from draw 0, and a
    codec's reconstructions of the very reference clips would score below any independent sample. Its
    features are computed once per length, with the floor: the distance of draw 0's real clips from it.
    """

    def __init__(self, net, prompts: Sequence[str], size: int = 64) -> None:
        self.net, self.prompts, self.size = net, list(prompts), size
        self.reference: dict[int, np.ndarray] = {}
        self.floor: dict[int, float] = {}

    def _reference(self, num_frames: int) -> np.ndarray:
        from diagvid.world.features import frechet_distance, video_features

        if num_frames not in self.reference:
            real, reference = (
                video_features(self.net, real_method(self.size, draw)(self.prompts, num_frames, 0))
                for draw in (0, 1)
            )
            self.reference[num_frames] = reference
            self.floor[num_frames] = round(frechet_distance(real, reference), 4)
        return self.reference[num_frames]

    def score(self, videos: Sequence[np.ndarray], num_frames: int) -> float | None:
        """The distance, or None for clips shorter than one window of the network."""
        from diagvid.world.features import frechet_distance, video_features

        if num_frames < self.net.cfg.frames:
            return None
        return round(frechet_distance(video_features(self.net, videos), self._reference(num_frames)), 4)


# ----- the protocol ---------------------------------------------------------------------------------------


def run_eval(
    methods: dict[str, Method],
    cfg: EvalConfig = EvalConfig(),
    *,
    fixed_length: Sequence[str] = (),
    reconstructions: Sequence[str] = (),
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Score every method at every length on the same prompts and seeds; one JSON-ready dict.

    `fixed_length` names methods that only run at 1x (the teacher: full attention over a fixed clip).
    `reconstructions` names methods whose videos reconstruct draw 0's real clips (the `vae` method): their
    scores gain `psnr` (`codec_psnr`, by region).
    Results: results[method][f"{n}x"] = score_videos(...) without the per-video detail, plus seconds and
    fvd_world (None when FVD-world is off or the clips are shorter than one window).
    """
    if not methods:
        raise ValueError("no method to evaluate")
    prompts = eval_prompts(cfg.prompts)
    fvd = None
    if cfg.features:
        from diagvid.pretrained import load_features

        fvd = FvdWorld(load_features(cfg.features), prompts)
    results: dict[str, dict] = {}
    for name, method in methods.items():
        results[name] = {}
        for n in cfg.lengths:
            if n != 1 and name in fixed_length:
                continue
            if progress:
                progress(f"{name} at {n}x ({cfg.frames(n)} frames, {len(prompts)} prompts)")
            t0 = time.perf_counter()
            videos = method(prompts, cfg.frames(n), cfg.seed)
            scores = score_videos(videos, prompts, n_boot=cfg.n_boot, seed=cfg.seed)
            scores.pop("per_video")
            scores["fvd_world"] = fvd.score(videos, cfg.frames(n)) if fvd else None
            if name in reconstructions:
                scores["psnr"] = codec_psnr(videos, prompts, cfg.frames(n))
            scores["seconds"] = round(time.perf_counter() - t0, 2)
            results[name][f"{n}x"] = scores
    return {
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "config": {
            "prompts": cfg.prompts,
            "num_prompts": len(prompts),
            "lengths": list(cfg.lengths),
            "frames": {f"{n}x": cfg.frames(n) for n in cfg.lengths},
            "fps": FPS,
            "seed": cfg.seed,
            "n_boot": cfg.n_boot,
            "features": cfg.features,
            "reader": READER_VERSION,
        },
        "fvd_world": _fvd_summary(fvd, cfg) if fvd else None,
        "results": results,
        "relative_to_real": relative_to(results, "real"),
    }


def _fvd_summary(fvd: FvdWorld, cfg: EvalConfig) -> dict:
    """What the fvd_world numbers are measured against: windows, samples and the floor (real clips' score)."""
    by_length = {f"{n}x": cfg.frames(n) for n in cfg.lengths}
    return {
        "window_frames": fvd.net.cfg.frames,
        "reference": "real clips of the same prompts and length, draw 1 of the held-out set",
        "floor_clips": "real clips of draw 0 (what the real method renders and the vae method encodes)",
        "samples": {k: len(fvd.reference[f]) for k, f in by_length.items() if f in fvd.reference},
        "floor": {k: fvd.floor[f] for k, f in by_length.items() if f in fvd.floor},
    }


HEADLINE = ("colour_accuracy", "shape_accuracy", "direction_accuracy", "speed_accuracy", "all_accuracy")


def relative_to(results: dict, reference: str) -> dict:
    """Each method's headline metrics divided by the reference's, per length (1.0 = as good as real clips)."""
    if reference not in results:
        return {}
    out: dict = {}
    for name, by_length in results.items():
        if name == reference:
            continue
        for length, scores in by_length.items():
            ref = results[reference].get(length, {}).get("summary", {})
            for key in HEADLINE:
                a = scores["summary"].get(key, {}).get("mean")
                b = ref.get(key, {}).get("mean")
                if a is not None and b:
                    out.setdefault(name, {}).setdefault(length, {})[key] = round(a / b, 4)
    return out
