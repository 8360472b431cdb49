"""FVD-world: a small video network trained on the world, and the Fréchet distance in its feature space.

The network reads windows of consecutive frames (16 at 16 fps: one second) shrunk to 32x32 and learns the
world's ground truth of the first object: colour, shape, direction (at the window's first frame) and speed.
The features are the globally pooled activations of its first and its last block, standardised by their
spread over world clips: the last block carries what the heads read (colour, shape, motion), the first the
low-level statistics a classifier learns to ignore (noise, saturation, sharpness), and the standardisation
makes each dimension count by its natural variation, not its scale. The Fréchet distance between Gaussians
fitted to the features of two sets of videos is this world's FVD. A video of any length is cut into
consecutive windows, each one a sample, so the network always sees motion at the world's frame rate and
every second of a long video counts, late drift included.

Shape letters: B windows, F frames per window, S input size, D feature width, N samples.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diagvid.world.render import COLOURS, DIRECTIONS, SHAPES, SPEEDS

WEIGHTS_FILE = "features.safetensors"
CONFIG_FILE = "features.json"


def _world_classes() -> dict[str, list[str]]:
    return {
        "colour": list(COLOURS),
        "shape": list(SHAPES),
        "direction": list(DIRECTIONS),
        "speed": list(SPEEDS),
    }


@dataclass
class FeatureNetConfig:
    """Architecture of the feature network and the classes its heads name."""

    frames: int = 16
    """frames per window (consecutive frames of the video)"""
    size: int = 32
    """input height and width; frames of another size are resampled by area"""
    widths: tuple[int, ...] = (16, 32, 32, 32)
    """channels of the 3D convolutions; the first halves H and W, each later one halves F, H and W"""
    groups: int = 4
    """GroupNorm groups after every convolution"""
    classes: dict[str, list[str]] = field(default_factory=_world_classes)
    """one linear head per ground-truth attribute, over these class names"""

    def __post_init__(self) -> None:
        self.widths = tuple(self.widths)
        steps = 2 ** (len(self.widths) - 1)
        if not self.widths or any(w < 1 or w % self.groups for w in self.widths):
            raise ValueError(f"widths={self.widths} must be positive multiples of groups={self.groups}")
        if self.frames < steps or self.frames % steps:
            raise ValueError(
                f"frames={self.frames} must be a positive multiple of {steps} (widths halve time)"
            )
        if self.size < 2 * steps or self.size % (2 * steps):
            raise ValueError(f"size={self.size} must be a positive multiple of {2 * steps}")
        if not self.classes or any(len(v) < 2 for v in self.classes.values()):
            raise ValueError(f"classes={self.classes} needs at least one head of at least 2 classes")

    @property
    def feature_dim(self) -> int:
        """D: width of the feature vector (first and last block pooled)."""
        return self.widths[0] + self.widths[-1]

    def to_dict(self) -> dict:
        """Plain JSON-ready dict of every field."""
        out = asdict(self)
        out["widths"] = list(self.widths)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> FeatureNetConfig:
        """Inverse of `to_dict`; unknown keys and wrong types raise."""
        from diagvid.config import from_dict

        return from_dict(cls, data)


class FeatureNet(nn.Module):
    """3D conv blocks -> globally pooled first and last block (the features); linear heads on the last."""

    def __init__(self, cfg: FeatureNetConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or FeatureNetConfig()
        blocks: list[nn.Module] = []
        channels = 3
        for i, width in enumerate(cfg.widths):
            if i == 0:
                # Every frame kept (motion of 0.5 px/frame must survive it). No normalisation and no bias: a
                # per-clip norm would divide out the energy that noise adds, and without a bias every filter's
                # ReLU opens at the grey background (about 0 in [-1, 1]), where it turns zero-mean noise
                # into a shift of the pooled mean (a smooth activation would pass only its square). A
                # classifier has no use for noise; without this its features were blind to it.
                block = nn.Sequential(
                    nn.Conv3d(channels, width, 3, stride=(1, 2, 2), padding=1, bias=False), nn.ReLU()
                )
            else:
                block = nn.Sequential(
                    nn.Conv3d(channels, width, 3, stride=2, padding=1),
                    nn.GroupNorm(cfg.groups, width),
                    nn.SiLU(),
                )
            blocks.append(block)
            channels = width
        self.blocks = nn.ModuleList(blocks)
        self.heads = nn.ModuleDict({name: nn.Linear(channels, len(c)) for name, c in cfg.classes.items()})
        # set from world clips when training ends (standardise_features); identity until then
        self.register_buffer("feature_mean", torch.zeros(cfg.feature_dim))
        self.register_buffer("feature_std", torch.ones(cfg.feature_dim))

    def pooled(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows [B, 3, F, S, S] in [-1, 1] -> raw features [B, D] and the last block pooled [B, widths[-1]]."""
        first = None
        for block in self.blocks:
            x = block(x)
            first = x.mean(dim=(2, 3, 4)) if first is None else first  # [B, widths[0]]
        last = x.mean(dim=(2, 3, 4))  # [B, widths[-1]]
        return torch.cat([first, last], dim=1), last

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Windows [B, 3, F, S, S] in [-1, 1] -> (standardised features [B, D], {attribute: logits [B, classes]})."""
        raw, last = self.pooled(x)
        features = (raw - self.feature_mean) / self.feature_std
        return features, {name: head(last) for name, head in self.heads.items()}

    @torch.no_grad()
    def standardise_features(self, batches: Iterable[torch.Tensor]) -> None:
        """Set the feature mean and spread from batches of windows [B, 3, F, S, S] of world clips."""
        raw = torch.cat([self.pooled(x)[0] for x in batches])
        self.feature_mean.copy_(raw.mean(0))
        # a channel the ReLU never opens is constant: any positive spread leaves it at zero
        self.feature_std.copy_(raw.std(0).clamp_min(1e-6))

    # ----- files -------------------------------------------------------------------------------------------

    def save(self, folder: str | Path) -> Path:
        """Write `features.safetensors` and `features.json` into `folder` (created if missing)."""
        from diagvid.model.vae import save_folder

        return save_folder(self, self.cfg.to_dict(), folder, CONFIG_FILE, WEIGHTS_FILE)

    @classmethod
    def load(cls, folder: str | Path) -> FeatureNet:
        """A network written by `save` (safetensors only: nothing is executed), in eval mode, CPU, fp32."""
        from diagvid.model.vae import load_weights, read_folder_config

        raw = read_folder_config(folder, CONFIG_FILE, WEIGHTS_FILE, "feature network")
        cfg = FeatureNetConfig.from_dict(raw)
        net = cls(cfg)
        load_weights(net, Path(folder) / WEIGHTS_FILE, repr(cfg))
        return net.float().eval()


# ----- videos -> features ----------------------------------------------------------------------------------


def _check_video(video: np.ndarray, frames: int) -> None:
    ok = isinstance(video, np.ndarray) and video.dtype == np.uint8 and video.ndim == 4
    if not ok or video.shape[-1] != 3:
        shape = getattr(video, "shape", None)
        dtype = getattr(video, "dtype", type(video).__name__)
        raise ValueError(f"expected a uint8 video [T, H, W, 3], got {dtype} of shape {shape}")
    if len(video) < frames:
        raise ValueError(
            f"the video has {len(video)} frames; the feature network needs at least {frames} (one window)"
        )


def windows(video: np.ndarray, frames: int) -> np.ndarray:
    """Consecutive, non-overlapping windows [B, F, H, W, 3] of a uint8 video [T, H, W, 3], from frame 0;
    the last T mod F frames are left out."""
    _check_video(video, frames)
    count = len(video) // frames
    return video[: count * frames].reshape(count, frames, *video.shape[1:])


def to_input(clips: np.ndarray, size: int) -> torch.Tensor:
    """uint8 windows [B, F, H, W, 3] -> network input [B, 3, F, S, S] in [-1, 1] (area resampling)."""
    x = torch.from_numpy(np.ascontiguousarray(clips)).float() / 127.5 - 1.0
    b, f, h, w, _ = x.shape
    x = x.permute(0, 1, 4, 2, 3).reshape(b * f, 3, h, w)
    if (h, w) != (size, size):
        # area averaging is exact 2x2 pooling for the world's 64 px frames
        x = F.interpolate(x, size=(size, size), mode="area")
    return x.reshape(b, f, 3, size, size).transpose(1, 2)


def _batches(clips: Iterable[np.ndarray], batch_size: int) -> Iterable[np.ndarray]:
    """Windows [B, F, H, W, 3] of many videos regrouped into batches of about batch_size (one frame size each)."""
    pending: list[np.ndarray] = []
    for c in clips:
        if pending and pending[0].shape[1:] != c.shape[1:]:
            yield np.concatenate(pending)
            pending = []
        pending.append(c)
        if sum(len(p) for p in pending) >= batch_size:
            yield np.concatenate(pending)
            pending = []
    if pending:
        yield np.concatenate(pending)


@torch.no_grad()
def video_features(net: FeatureNet, videos: Iterable[np.ndarray], batch_size: int = 128) -> np.ndarray:
    """Features [N, D] (float64) of every window of every uint8 video [T, H, W, 3], in order."""
    net.eval()
    device = next(net.parameters()).device
    clips = (windows(v, net.cfg.frames) for v in videos)
    out = [net(to_input(b, net.cfg.size).to(device))[0].double().cpu() for b in _batches(clips, batch_size)]
    if not out:
        raise ValueError("no videos to compute features of")
    return torch.cat(out).numpy()


# ----- the Fréchet distance --------------------------------------------------------------------------------


def _as_samples(feats, name: str) -> np.ndarray:
    x = np.asarray(feats.detach().cpu() if isinstance(feats, torch.Tensor) else feats, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2 or x.shape[1] < 1:
        raise ValueError(f"{name} must be features [N, D] with N >= 2 samples; got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} holds {int((~np.isfinite(x)).sum())} non-finite values")
    return x


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix [D, D] (rounding negatives to 0)."""
    eig, vec = np.linalg.eigh(cov)
    return (vec * np.sqrt(np.clip(eig, 0.0, None))) @ vec.T


def gaussian_frechet(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray) -> float:
    """Fréchet (2-Wasserstein squared) distance between N(mu_a, cov_a) and N(mu_b, cov_b).

    |mu_a - mu_b|^2 + tr(cov_a) + tr(cov_b) - 2 tr((cov_a cov_b)^1/2). cov_a cov_b is similar to the symmetric
    PSD matrix cov_a^1/2 cov_b cov_a^1/2, so the trace of its root is the sum of the square roots of that
    matrix's eigenvalues: real, no complex round-off, and defined for singular (N < D) covariances.
    """
    root = _psd_sqrt(cov_a)
    cross = root @ cov_b @ root
    eig = np.linalg.eigvalsh((cross + cross.T) / 2.0)
    trace_root = np.sqrt(np.clip(eig, 0.0, None)).sum()
    d = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_root
    return float(max(d, 0.0))  # exact zero can round to -1e-15


def frechet_distance(feats_a, feats_b) -> float:
    """Fréchet distance between Gaussians fitted (mean, unbiased covariance) to two feature sets [N, D], [M, D]."""
    a, b = _as_samples(feats_a, "feats_a"), _as_samples(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature widths differ: feats_a has D={a.shape[1]}, feats_b D={b.shape[1]}")
    cov_a = np.atleast_2d(np.cov(a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(b, rowvar=False))
    return gaussian_frechet(a.mean(0), cov_a, b.mean(0), cov_b)
