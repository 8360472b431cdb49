"""A noise-aware motion classifier on latents, and the classifier guidance that steers a sampler with it.

The toy teachers learn which line an object moves along but not which way along it (docs/status.md, "The
sign"): a clip played backwards is a clip of the opposite caption, and the DiT, whose patches hold one
latent frame each and whose 3D RoPE scores time and space apart, does not pick the sign up from flow
matching. A few 3D convolutions over the first latent frames do, in a few hundred steps: oriented
space-time filters are motion detectors. So the direction a caption asks for can be added at sampling time
as classifier guidance (Dhariwal & Nichol, 2021): the gradient of the classifier's log-probability of the
asked direction, taken at the noisy latents, is added to the model's score.

A classifier can also read the whole clip in windows (`MotionClassifierConfig.windows`): trained on windows
drawn anywhere in that span, it scores each window and sums their log-probabilities. A direction holds only
until the first bounce, but which axes move and how fast (`target = "axis-speed"`) hold for the whole clip,
so a window classifier of those guides every part of it (docs/status.md, "What the guided samples get
wrong").

A discriminator (`target = "realness"`, classes "real" and "generated") is the same network trained on the
world's clips against a sampler's (`diagvid.train.motion.SamplerConfig`). Guidance toward "real" adds the
gradient of log D(x_t), which estimates where the sampler's distribution at that noise level falls short of
the world's: discriminator guidance (Kim et al., 2023, "Refining Generative Process with Discriminator
Guidance in Score-based Diffusion Models").

Shape letters: B batch, C latent channels, F latent frames, h, w latent height and width, K classes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diagvid.model.dit import sinusoidal_embedding
from diagvid.world.render import DIRECTIONS, SPEEDS

WEIGHTS_FILE = "motion.safetensors"
CONFIG_FILE = "motion.json"

AXES = {"horizontal": (True, False), "vertical": (False, True), "diagonal": (True, True)}
"""the axis names of `axis-speed` classes: whether the motion has an x and a y component"""
TARGETS = {
    "direction": list(DIRECTIONS),
    "axis-speed": [f"{axis} {speed}" for axis in AXES for speed in SPEEDS],
    "realness": ["real", "generated"],
    "realness-direction": [f"{kind} {d}" for kind in ("real", "generated") for d in DIRECTIONS],
}
"""what a classifier's classes name, with every class name that target allows"""


@dataclass
class MotionClassifierConfig:
    """Architecture of the motion classifier and the class names of its output."""

    in_dim: int = 8
    """latent channels"""
    frames: int = 8
    """latent frames of one window (the caption's direction holds until the first bounce)"""
    width: int = 64
    """channels of the three 3x3x3 convolutions"""
    groups: int = 8
    """GroupNorm groups (without affine: the noise level's scale and shift replace it)"""
    freq_dim: int = 32
    """sinusoidal features of the noise level"""
    hidden: int = 256
    """width of the head over the per-frame pooled features"""
    classes: list[str] = field(default_factory=list)
    """class names, in the order of the logits: names of `TARGETS[target]` (empty: all of them)"""
    target: str = "direction"
    """what the classes name: "direction" (the caption's, up ... down-right: it holds until the first
    bounce) or "axis-speed" (which axes the objects move along and how fast, "horizontal slow" ... "diagonal
    fast": they hold over bounces, for the whole clip) or "realness" (a world clip or a sampler's: a
    discriminator, whose guidance toward "real" pulls every prompt's samples toward the world's clips) or
    "realness-direction" (the same per captioned direction: "real up" ... "generated down-right"; a prompt
    asks for "real" and its direction)"""
    windows: list[int] = field(default_factory=lambda: [0])
    """first latent frame of each window read, increasing; their log-probabilities are summed. Training
    draws each window's start uniformly from the first to the last of them"""

    def __post_init__(self) -> None:
        if min(self.in_dim, self.frames, self.width, self.groups, self.hidden) < 1:
            raise ValueError(f"MotionClassifierConfig sizes must be >= 1: {self}")
        if self.width % self.groups:
            raise ValueError(f"width={self.width} must be a multiple of groups={self.groups}")
        if self.freq_dim < 2 or self.freq_dim % 2:
            raise ValueError(f"freq_dim={self.freq_dim} must be even and >= 2")
        if self.target not in TARGETS:
            raise ValueError(f"target={self.target!r}: allowed: {', '.join(TARGETS)}")
        self.classes = list(self.classes) or list(TARGETS[self.target])
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes={self.classes}: at least two distinct names")
        unknown = [c for c in self.classes if c not in TARGETS[self.target]]
        if unknown:
            raise ValueError(
                f"classes {unknown} are not {self.target} classes; allowed: {', '.join(TARGETS[self.target])}"
            )
        paired = self.target.startswith("realness")
        unpaired = [c for c in self.classes if paired and partner_class(c) not in self.classes]
        if unpaired:
            raise ValueError(
                f"classes {unpaired} of a discriminator need their {partner_class(unpaired[0])!r} class"
            )
        if not self.windows or self.windows[0] < 0 or list(self.windows) != sorted(set(self.windows)):
            raise ValueError(f"windows={self.windows}: increasing first latent frames >= 0, at least one")

    @property
    def span(self) -> int:
        """latent frames from the first through the end of the last window"""
        return self.windows[-1] + self.frames

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> MotionClassifierConfig:
        from diagvid.config import from_dict

        return from_dict(cls, data)


class MotionClassifier(nn.Module):
    """x_t [B, C, F >= frames, h, w] and its noise level sigma [B] -> logits [B, K] over `cfg.classes`.

    Three 3x3x3 convolutions, each normalised and then scaled and shifted by the noise level (FiLM), pooled
    over space only: the head sees each latent frame's features in order, so it knows which frames come first.
    """

    def __init__(self, cfg: MotionClassifierConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or MotionClassifierConfig()
        w = cfg.width
        self.convs = nn.ModuleList(
            [
                nn.Conv3d(cfg.in_dim, w, 3, padding=1),
                nn.Conv3d(w, w, 3, padding=1),
                nn.Conv3d(w, w, 3, padding=1),
            ]
        )
        self.norms = nn.ModuleList([nn.GroupNorm(cfg.groups, w, affine=False) for _ in self.convs])
        self.noise_mlp = nn.Sequential(
            nn.Linear(cfg.freq_dim, w), nn.SiLU(), nn.Linear(w, 2 * w * len(self.convs))
        )
        self.head = nn.Sequential(
            nn.Linear(w * cfg.frames, cfg.hidden), nn.SiLU(), nn.Linear(cfg.hidden, len(cfg.classes))
        )

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Logits [B, K] of x [B, C >= in_dim, F >= frames, h, w] at noise level `sigma` [1] or [B].

        Latents with more channels than `in_dim` are read by their first `in_dim`: a codec grown from the
        one the classifier learned (`toy/vae-z16` from `toy/vae`, its first 8 channels anchored to the old
        latents) keeps those channels' meaning; the others get no gradient.
        """
        cfg = self.cfg
        if x.ndim != 5 or x.shape[1] < cfg.in_dim or x.shape[2] < cfg.frames:
            raise ValueError(
                f"latents of shape {tuple(x.shape)}: expected [B, C >= {cfg.in_dim}, F >= {cfg.frames}, h, w]"
            )
        x = x[:, : cfg.in_dim]
        dtype = self.head[0].weight.dtype  # computes in the weights' precision
        levels = 1000.0 * sigma.expand(x.shape[0])  # read as Wan's timesteps, as the DiT reads them
        film = self.noise_mlp(sinusoidal_embedding(levels, cfg.freq_dim).to(dtype)).chunk(
            2 * len(self.convs), 1
        )
        h = x[:, :, : cfg.frames].to(dtype)
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            scale, shift = (f[:, :, None, None, None] for f in film[2 * i : 2 * i + 2])
            h = F.silu(norm(conv(h)) * (1 + scale) + shift)
        return self.head(h.mean(dim=(3, 4)).flatten(1))  # [B, w, frames] -> [B, w * frames] -> [B, K]

    def class_log_probs(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """[B, K]: each class's log-probability summed over the windows (one window: log-softmax of the
        logits) of x [B, C, F >= span, h, w] at noise level `sigma` (a number, or one per sample)."""
        cfg = self.cfg
        if x.ndim == 5 and x.shape[2] < cfg.span:
            raise ValueError(
                f"latents of {x.shape[2]} frames; windows {cfg.windows} of {cfg.frames} frames read {cfg.span}"
            )
        sigma = torch.as_tensor(sigma, device=x.device)
        return sum(F.log_softmax(self(x[:, :, w:], sigma), dim=1) for w in cfg.windows)

    def log_prob(self, x: torch.Tensor, sigma: float, labels: torch.Tensor) -> torch.Tensor:
        """log p(label | x_t) [B] of each sample's class at noise level `sigma` (summed over the windows);
        0 where its label is -1."""
        labels = labels.to(x.device)
        logp = self.class_log_probs(x, sigma)
        return logp.gather(1, labels.clamp(min=0)[:, None])[:, 0] * (labels >= 0)

    def save(self, folder: str | Path) -> Path:
        """Write `motion.safetensors` and `motion.json` into `folder` (created if missing)."""
        from diagvid.model.vae import save_folder

        return save_folder(self, self.cfg.to_dict(), folder, CONFIG_FILE, WEIGHTS_FILE)

    @classmethod
    def load(cls, folder: str | Path) -> MotionClassifier:
        """A classifier written by `save` (safetensors only: nothing is executed), in eval mode, CPU, fp32."""
        from diagvid.model.vae import load_weights, read_folder_config

        raw = read_folder_config(folder, CONFIG_FILE, WEIGHTS_FILE, "motion classifier")
        net = cls(MotionClassifierConfig.from_dict(raw))
        load_weights(net, Path(folder) / WEIGHTS_FILE, repr(net.cfg))
        return net.float().eval()


@dataclass
class MotionGuidance:
    """Classifier guidance toward one class per sample, at the steps whose noise level is >= `sigma_min`.

    With x_t = (1 - sigma) x0 + sigma eps, the model's score is -eps / sigma, and the velocity
    v = (eps - x_t) / (1 - sigma). Adding `scale` * grad log p(y | x_t) to the score (Dhariwal & Nichol's
    classifier guidance) takes eps to eps - sigma * scale * grad, so v to v - scale * sigma / (1 - sigma) *
    grad; 1 - sigma is floored at `min_one_minus_sigma` so the first step, at sigma 1, stays finite.
    The gradient touches only the latent frames the classifier's windows read. Several guidances (one per
    classifier) are summed by the samplers (`sample_euler`'s `motion_guidance` takes a list).
    """

    classifier: MotionClassifier
    labels: torch.Tensor
    """[B] class index per sample; -1 leaves that sample unguided"""
    scale: float = 1.0
    sigma_min: float = 0.5
    min_one_minus_sigma: float = 0.05

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale >= 0):
            raise ValueError(f"motion guidance scale {self.scale}: must be a finite number >= 0")
        if not 0 <= self.sigma_min <= 1:
            raise ValueError(f"motion guidance sigma_min {self.sigma_min}: must be a noise level in [0, 1]")
        if not 0 < self.min_one_minus_sigma <= 1:
            raise ValueError(f"min_one_minus_sigma {self.min_one_minus_sigma}: must be in (0, 1]")

    def applies(self, sigma: float) -> bool:
        return self.scale > 0 and sigma >= self.sigma_min and bool((self.labels >= 0).any())

    def velocity_shift(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """The term to add to the velocity at x [B, C, F, h, w] and noise level sigma: zero where unguided."""
        clf = self.classifier
        k = clf.cfg.span
        labels = self.labels.to(x.device)
        if labels.shape != (x.shape[0],):
            raise ValueError(
                f"motion guidance labels of shape {tuple(labels.shape)} for a batch of {x.shape[0]}"
            )
        with torch.enable_grad():
            xk = x[:, :, :k].detach().to(clf.head[0].weight.dtype).requires_grad_(True)
            (grad,) = torch.autograd.grad(clf.log_prob(xk, sigma, labels).sum(), xk)
        out = torch.zeros_like(x)
        out[:, :, :k] = -self.scale * sigma / max(1.0 - sigma, self.min_one_minus_sigma) * grad.to(x.dtype)
        return out


def prompt_label(prompt: str, classes: Sequence[str], target: str = "direction") -> int:
    """The index in `classes` of what a prompt asks for under `target` ("direction": its objects' direction;
    "axis-speed": the axes they move along and their speed, e.g. "diagonal fast"; "realness": "real", for
    every prompt; "realness-direction": "real" and the direction, e.g. "real up-left") when all its objects
    share it, else -1 (unguided). Unknown words raise, as `parse_caption` does."""
    from diagvid.world.captions import parse_caption

    if target not in TARGETS:
        raise ValueError(f"target={target!r}: allowed: {', '.join(TARGETS)}")
    names = {_class_of(obj.direction, obj.speed, target) for obj in parse_caption(prompt)}
    if len(names) != 1 or None in names:
        return -1
    name = names.pop()
    if name not in classes:
        raise ValueError(
            f"{target} {name!r} of {prompt!r} is not a motion class; allowed: {', '.join(classes)}"
        )
    return list(classes).index(name)


def partner_class(name: str) -> str:
    """A discriminator's class of the other side: "real up" <-> "generated up", "real" <-> "generated"."""
    kind, _, rest = name.partition(" ")
    return " ".join(filter(None, ["generated" if kind == "real" else "real", rest]))


def _class_of(direction: str | None, speed: str | None, target: str) -> str | None:
    """One object's class name under `target`; None where the caption leaves out what it needs."""
    if target == "realness":
        return "real"  # every prompt asks for a clip like the world's
    if target == "direction":
        return direction
    if target == "realness-direction":
        return None if direction is None else f"real {direction}"
    if direction is None or speed is None:
        return None
    ux, uy = DIRECTIONS[direction]
    axis = next(a for a, moves in AXES.items() if moves == (abs(ux) > 0, abs(uy) > 0))
    return f"{axis} {speed}"
