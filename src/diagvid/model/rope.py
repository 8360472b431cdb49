"""3D rotary position embedding as in Wan2.1: head channels split over (frame, height, width).

Shapes: L tokens, N heads, Dh head dim. Rotation pairs are adjacent channels (2i, 2i+1), the layout of
Wan's complex-number implementation and of diffusers' `apply_rotary_emb`. Positions are an input, so the
full, block-causal and cached attention paths all rotate through the same two functions.
"""

from __future__ import annotations

import torch


def axis_pairs(head_dim: int) -> tuple[int, int, int]:
    """Number of rotation pairs given to the (frame, height, width) axes; Wan gives the remainder to frames."""
    if head_dim % 2:
        raise ValueError(f"head_dim={head_dim} must be even for rotary embedding")
    pairs = head_dim // 2
    hw = pairs // 3
    return pairs - 2 * hw, hw, hw


def grid_positions(frames: int, height: int, width: int, start_frame: int = 0) -> torch.Tensor:
    """Integer (frame, h, w) position of every token in row-major (f, h, w) order: [L, 3]."""
    f = torch.arange(start_frame, start_frame + frames)
    h = torch.arange(height)
    w = torch.arange(width)
    grid = torch.stack(torch.meshgrid(f, h, w, indexing="ij"), dim=-1)  # [F, H, W, 3]
    return grid.reshape(-1, 3)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angle of every (token, pair): two [L, Dh/2] float32 tensors.

    Angles are computed in float64 (as Wan does) so that large frame positions stay exact before the cast.
    """
    angles = []
    for axis, n in enumerate(axis_pairs(head_dim)):
        dim = 2 * n
        inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # [n]
        angles.append(positions[:, axis : axis + 1].to(torch.float64) * inv_freq)  # [L, n]
    angle = torch.cat(angles, dim=1)  # [L, Dh/2]
    return angle.cos().float(), angle.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of x [B, L, N, Dh] by the angles behind cos/sin [L, Dh/2]."""
    x_pairs = x.float().unflatten(-1, (-1, 2))  # [B, L, N, Dh/2, 2]
    x1, x2 = x_pairs.unbind(-1)
    c, s = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    out = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    return out.type_as(x)


def frame_shift_cos_sin(shift_frames: int, head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, ...]:
    """cos/sin [1, Dh/2] of a pure frame-axis rotation by `shift_frames` (height and width pairs unrotated).

    Rotations compose additively, so applying this to keys already rotated at frame p moves them to p + shift.
    The rolling cache uses it to re-base keys after eviction without keeping un-rotated copies.
    """
    pos = torch.tensor([[shift_frames, 0, 0]])
    return rope_cos_sin(pos, head_dim, theta)
