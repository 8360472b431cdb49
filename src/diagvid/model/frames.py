"""Pixel frames as numpy arrays and as video tensors, and the temporal stride of Wan's codec.

Kept apart from `diagvid.model.vae` (which imports diffusers) so that what only decodes and converts
frames, such as the decode worker with a tiny decoder, starts without it.
"""

from __future__ import annotations

import numpy as np
import torch

TEMPORAL_STRIDE = 4


def pixel_frames(f: int) -> int:
    """Pixel frames T decoded from F latent frames: 1 + 4(F - 1), and none from none."""
    return 0 if f == 0 else 1 + TEMPORAL_STRIDE * (f - 1)


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 frames [T, H, W, 3] (or [B, T, H, W, 3]) -> float32 video [3, T, H, W] (or [B, 3, ...]) in [-1, 1]."""
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim not in (4, 5):
        got = (getattr(frames, "shape", None), getattr(frames, "dtype", type(frames).__name__))
        raise ValueError(
            f"frames must be a uint8 array [T, H, W, 3] or [B, T, H, W, 3]; got shape/dtype {got}"
        )
    if frames.shape[-1] != 3:
        raise ValueError(f"frames must be RGB (last axis 3); got shape {frames.shape}")
    x = torch.from_numpy(np.ascontiguousarray(frames)).float() / 127.5 - 1.0
    return x.movedim(-1, -4)  # channels before time


def uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """Video [3, T, H, W] (or [B, 3, T, H, W]) in [-1, 1] -> uint8 tensor [T, H, W, 3] (or [B, T, H, W, 3]) on
    the video's device."""
    if video.ndim not in (4, 5) or video.shape[-4] != 3:
        raise ValueError(f"video must be [3, T, H, W] or [B, 3, T, H, W]; got shape {tuple(video.shape)}")
    x = ((video.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.movedim(-4, -1)


def tensor_to_frames(video: torch.Tensor) -> np.ndarray:
    """Video [3, T, H, W] (or [B, 3, T, H, W]) in [-1, 1] -> uint8 frames [T, H, W, 3] (or [B, T, H, W, 3])."""
    return uint8_frames(video).cpu().numpy()
