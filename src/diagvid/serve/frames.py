"""Frames as the bytes of one image each, the binary messages of the websocket protocol."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

MEDIA_TYPES = {"jpeg": "image/jpeg", "png": "image/png"}


def encode_frame(frame: np.ndarray, fmt: str, quality: int = 85) -> bytes:
    """uint8 [H, W, 3] -> the bytes of a JPEG or PNG file."""
    if fmt not in MEDIA_TYPES:
        raise ValueError(f"frame format {fmt!r}; allowed: {sorted(MEDIA_TYPES)}")
    buf = io.BytesIO()
    image = Image.fromarray(frame)
    if fmt == "jpeg":
        image.save(buf, format="JPEG", quality=quality)
    else:
        image.save(buf, format="PNG", compress_level=1)  # speed over size: frames are sent at once
    return buf.getvalue()
