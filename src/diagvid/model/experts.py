"""Two denoisers split by noise level, as Wan2.2 splits its DiT into a high-noise and a low-noise expert.

The high-noise part of a trajectory decides the clip's layout and motion, the low-noise part its detail
(docs/status.md, "Where the teacher loses the motion"). An expert trained only on the levels above a
boundary (`TeacherConfig.sigma_min`) spends all its capacity on the first; `NoiseExperts` routes each
sample to the expert of its noise level and is called like one `WanDiT`, so every sampler takes it.
"""

from __future__ import annotations

import torch
from torch import nn

from diagvid.model.dit import WanDiT
from diagvid.sampling import NUM_TRAIN_TIMESTEPS

TOY_BOUNDARY = 0.7
"""the noise level the bundled high-noise expert `toy/teacher-high` was trained from (its sigma_min)"""


def check_experts(high: str | None, boundary: float | None) -> None:
    """A recipe's teacher_high / teacher_boundary pair makes sense (errors name the field)."""
    if boundary is not None and high is None:
        raise ValueError(f"teacher_boundary={boundary} only means something with teacher_high")
    if boundary is not None and not 0 < boundary < 1:
        raise ValueError(f"teacher_boundary={boundary} must be a noise level in (0, 1)")


class NoiseExperts(nn.Module):
    """`high` denoises samples whose noise level is >= `boundary` (a sigma in (0, 1)), `low` the rest."""

    def __init__(self, high: WanDiT, low: WanDiT, boundary: float) -> None:
        super().__init__()
        if not 0 < boundary < 1:
            raise ValueError(f"boundary={boundary} must be a noise level in (0, 1)")
        for field in ("in_dim", "out_dim", "patch_size", "text_dim"):
            a, b = getattr(high.cfg, field), getattr(low.cfg, field)
            if a != b:
                raise ValueError(f"the experts disagree on {field}: high-noise {a}, low-noise {b}")
        self.high, self.low, self.boundary = high, low, boundary
        self.cfg = low.cfg  # what callers read (latent channels, patching) is the same for both

    def token_grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """`WanDiT.token_grid`, checked against both experts."""
        self.high.token_grid(frames, height, width)
        return self.low.token_grid(frames, height, width)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, **kwargs) -> torch.Tensor:
        """`WanDiT.forward`; a sample with per-frame timesteps [B, F] goes by its noisiest frame."""
        level = t.reshape(len(t), -1).amax(1) if t.ndim > 1 else t.expand(len(x))
        use_high = level >= self.boundary * NUM_TRAIN_TIMESTEPS
        if bool(use_high.all()):
            return self.high(x, t, context, **kwargs)
        if not bool(use_high.any()):
            return self.low(x, t, context, **kwargs)
        out = self.low(x, t, context, **kwargs)
        hi = use_high.nonzero().flatten()
        out[hi] = self.high(x[hi], t[hi], context[hi], **kwargs)
        return out
