"""The limits of the web demo, one typed dataclass checked at construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from diagvid.sampling import PRESET_SCHEDULES

FRAME_FORMATS = ("jpeg", "png")


@dataclass
class ServeSettings:
    """What `diagvid serve` allows each client and keeps for everyone."""

    max_queue: int = 8
    """streams that may wait behind the running one; one more start is refused"""
    max_seconds: float = 60.0
    """longest video of one stream in seconds (endless streams stop there too)"""
    max_prompt_chars: int = 200
    """longest prompt in characters"""
    schedules: tuple[str, ...] = tuple(PRESET_SCHEDULES)
    """schedule presets a client may choose"""
    max_message_bytes: int = 4096
    """largest client message; larger ones are answered with an error"""
    frame_format: str = "jpeg"
    """how frames travel: "jpeg" (small) or "png" (exact)"""
    jpeg_quality: int = 85
    """JPEG quality, 1-95"""
    messages_per_second: float = 10.0
    """sustained client message rate; messages above it are dropped with an error"""
    message_burst: int = 20
    """messages a client may send at once before the rate applies"""
    max_connections: int = 64
    """open websockets; more are refused"""
    max_videos: int = 16
    """finished videos kept for download; the oldest goes first"""
    chunks_ahead: int = 1
    """chunks the model may generate before the client has taken the previous ones (backpressure)"""
    stall_seconds: float = 30.0
    """a stream whose client takes no frames for this long is stopped (it would hold the model)"""
    lead_seconds: float | None = 2.0
    """pace generation to at most this much video ahead of real time, so a prompt switch shows within about
    this long and an endless stream does not race ahead of its viewer; None: as fast as the model goes"""
    allowed_origins: tuple[str, ...] = field(default_factory=tuple)
    """browser origins allowed besides the page's own (e.g. "https://demo.example.org")"""

    def __post_init__(self) -> None:
        self.schedules = tuple(self.schedules)
        self.allowed_origins = tuple(self.allowed_origins)
        positive_ints = ("max_queue", "max_prompt_chars", "max_message_bytes", "message_burst")
        positive_ints += ("max_connections", "max_videos", "chunks_ahead")
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an int >= 1")
        for name in ("max_seconds", "messages_per_second", "stall_seconds"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}={value!r} must be a finite number > 0")
        if self.lead_seconds is not None and not (math.isfinite(self.lead_seconds) and self.lead_seconds > 0):
            raise ValueError(f"lead_seconds={self.lead_seconds!r} must be > 0, or None for no pacing")
        if not self.schedules or any(s not in PRESET_SCHEDULES for s in self.schedules):
            raise ValueError(
                f"schedules={self.schedules!r}; allowed: a non-empty subset of {list(PRESET_SCHEDULES)}"
            )
        if self.frame_format not in FRAME_FORMATS:
            raise ValueError(f"frame_format={self.frame_format!r}; allowed: {FRAME_FORMATS}")
        if not 1 <= self.jpeg_quality <= 95:
            raise ValueError(f"jpeg_quality={self.jpeg_quality!r} must be in [1, 95]")

    def limits(self) -> dict:
        """What a client may send, as told to it on connect."""
        return {
            "max_seconds": self.max_seconds,
            "max_prompt_chars": self.max_prompt_chars,
            "schedules": list(self.schedules),
            "max_message_bytes": self.max_message_bytes,
            "messages_per_second": self.messages_per_second,
            "seed_range": [0, 2**31 - 1],
        }
