"""A tiny streaming decoder for Wan latents: the fast alternative to the Wan VAE's decoder.

The Wan VAE decodes with causal 3D convolutions at full resolution, which on the toy CPU costs more than the
distilled DiT that made the latents, and at 480x832 a large share of a real stream's budget. Self-Forcing's
and Diagonal Distillation's demos offer a tiny decoder for that reason (TAEHV; the paper's inference config
turns it on). This one is our own design with the same contract as `StreamingDecoder`: normalised latents in
(the DiT's units), pixels in [-1, 1] out, one latent frame -> one pixel frame for the video's first latent and
four for every later one, chunk by chunk with a small state carried between chunks.

Layout, for one latent frame at h x w:
    stem        3x3 conv, latent channels -> width
    memory      residual blocks that also see the previous latent frame's input (the only state)
    expand      1x1 conv to 4 x width channels: four pixel frames (the first latent keeps the last one)
    stages      per pixel frame, log2(stride) times: 3x3 conv to 4 x c, pixel shuffle (2x), residual block;
                the last stage shuffles straight into RGB

Everything is 2D except the one-frame look-back, so a chunk decodes as one batch of frames and its output is
bit-for-bit the whole-video decode split at chunk borders (tested).
Folder format: `decoder.safetensors` + `decoder.json` (the `TinyDecoderConfig` fields).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from diagvid.model.frames import TEMPORAL_STRIDE

WEIGHTS_FILE = "decoder.safetensors"
CONFIG_FILE = "decoder.json"


@dataclass
class TinyDecoderConfig:
    """Architecture of a tiny decoder."""

    z_dim: int = 16
    """latent channels C (the VAE's)"""
    width: int = 64
    """channels at latent resolution"""
    memory_blocks: int = 2
    """residual blocks at latent resolution that look one latent frame back"""
    stage_widths: list[int] = field(default_factory=lambda: [64, 32, 16])
    """channels after each 2x upsampling but the last (which gives RGB); len + 1 = log2(spatial stride)"""
    frame_memory: bool = False
    """one more look-back block after the first upsampling, at pixel rate: each pixel frame also reads the
    frame before it (smoother motion across the four frames a latent frame becomes)"""

    def __post_init__(self) -> None:
        if min(self.z_dim, self.width) < 1 or self.memory_blocks < 0:
            raise ValueError(
                f"z_dim={self.z_dim} and width={self.width} must be >= 1, memory_blocks={self.memory_blocks} >= 0"
            )
        if any(w < 1 for w in self.stage_widths) or (self.frame_memory and not self.stage_widths):
            raise ValueError(
                f"stage_widths={self.stage_widths} must all be >= 1, and not be empty with frame_memory"
            )

    @property
    def spatial_stride(self) -> int:
        """Pixels per latent along H and W."""
        return 2 ** (len(self.stage_widths) + 1)


PRESETS: dict[str, dict] = {
    # the toy codec's latents (8 channels, 8x8 for 64x64 frames)
    "toy": dict(z_dim=8, width=64, memory_blocks=2, stage_widths=[48, 32]),
    # Wan2.1's latents (16 channels, stride 8): the geometry the GPU benchmark times with random weights
    "wan2.1": dict(z_dim=16, width=128, memory_blocks=3, stage_widths=[64, 32]),
    # the smallest one that runs, for tests
    "tiny": dict(z_dim=4, width=8, memory_blocks=1, stage_widths=[8]),
}


def preset(name: str, **overrides) -> TinyDecoderConfig:
    """A named tiny-decoder configuration, with fields overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown tiny decoder preset {name!r}; allowed: {sorted(PRESETS)}")
    return TinyDecoderConfig(**{**PRESETS[name], **overrides})


class _Residual(nn.Module):
    """x + conv(relu(conv(x))), 3x3, same width."""

    def __init__(self, dim: int, in_dim: int | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_dim or dim, dim, 3, padding=1)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        h = x if extra is None else torch.cat([x, extra], dim=1)
        return x + self.conv2(F.relu(self.conv1(h)))


class _Memory(_Residual):
    """A residual block whose first conv also reads the previous frame's input (latent or pixel frames)."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim, in_dim=2 * dim)

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """x [B, C, K, h, w] (K frames), past [B, C, h, w] (the frame before them) -> same shape as x."""
        k = x.shape[2]
        before = torch.cat([past[:, :, None], x[:, :, :-1]], dim=2)
        out = super().forward(
            rearrange(x, "b c k h w -> (b k) c h w"), rearrange(before, "b c k h w -> (b k) c h w")
        )
        return rearrange(out, "(b k) c h w -> b c k h w", k=k)


class TinyDecoder(nn.Module):
    """Latents [B, C, F, h, w] (normalised, the DiT's units) -> video [B, 3, 1 + 4(F - 1), H, W] in [-1, 1]."""

    def __init__(self, cfg: TinyDecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.stem = nn.Conv2d(cfg.z_dim, cfg.width, 3, padding=1)
        self.memory = nn.ModuleList(_Memory(cfg.width) for _ in range(cfg.memory_blocks))
        self.expand = nn.Conv2d(cfg.width, TEMPORAL_STRIDE * cfg.width, 1)
        widths = [cfg.width, *cfg.stage_widths]
        self.ups = nn.ModuleList(nn.Conv2d(a, 4 * b, 3, padding=1) for a, b in itertools.pairwise(widths))
        self.blocks = nn.ModuleList(_Residual(w) for w in cfg.stage_widths)
        self.frame_memory = _Memory(cfg.stage_widths[0]) if cfg.frame_memory else None
        self.to_rgb = nn.Conv2d(widths[-1], 4 * 3, 3, padding=1)
        # channels-last weights make every convolution run channels-last (on the CPU the shipped toy decoder
        # then decodes 81 frames 1.3x faster, the same pixels to 2e-6); files still hold contiguous tensors
        self.to(memory_format=torch.channels_last)

    @property
    def device(self) -> torch.device:
        return self.stem.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.stem.weight.dtype

    @property
    def spatial_stride(self) -> int:
        return self.cfg.spatial_stride

    @property
    def z_dim(self) -> int:
        return self.cfg.z_dim

    def empty_state(self, batch: int, h: int, w: int) -> list[torch.Tensor]:
        """The look-back state before a video's first latent frame: zeros, one per memory block (latent-rate
        ones at h x w, then the pixel-rate one at 2h x 2w)."""
        state = [torch.zeros(batch, self.cfg.width, h, w, device=self.device, dtype=self.dtype)] * len(
            self.memory
        )
        if self.frame_memory is not None:
            c = self.cfg.stage_widths[0]
            state.append(torch.zeros(batch, c, 2 * h, 2 * w, device=self.device, dtype=self.dtype))
        return state

    def forward(
        self, latents: torch.Tensor, state: list[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Decode latent frames that follow `state` (None: the video's start); returns (pixels, new state).

        Pixels are [B, 3, T, H, W] with T = 1 + 4(K - 1) at the video's start and 4K after it.
        """
        if latents.ndim != 5 or latents.shape[1] != self.cfg.z_dim:
            raise ValueError(
                f"latents must be [B, {self.cfg.z_dim}, F, h, w]; got shape {tuple(latents.shape)}"
            )
        b, _, k, h, w = latents.shape
        start = state is None
        state = self.empty_state(b, h, w) if start else state
        x = latents.to(self.device, self.dtype)
        x = rearrange(self.stem(rearrange(x, "b c k h w -> (b k) c h w")), "(b k) c h w -> b c k h w", k=k)
        new_state = []
        for block, past in zip(self.memory, state[: len(self.memory)], strict=True):
            new_state.append(x[:, :, -1])
            x = F.relu(block(x, past))
        x = F.relu(self.expand(rearrange(x, "b c k h w -> (b k) c h w")))
        x = rearrange(x, "(b k) (s c) h w -> b (k s) c h w", k=k, s=TEMPORAL_STRIDE)
        if start:  # the first latent frame holds one pixel frame: keep the last of its four
            x = x[:, TEMPORAL_STRIDE - 1 :]
        t = x.shape[1]
        x = x.flatten(0, 1)  # [(B T), C, h, w]: every pixel frame alike from here on
        for i, (up, block) in enumerate(zip(self.ups, self.blocks, strict=True)):
            x = F.relu(block(F.pixel_shuffle(up(x), 2)))
            if i == 0 and self.frame_memory is not None:
                frames = rearrange(x, "(b t) c hh ww -> b c t hh ww", t=t)
                new_state.append(frames[:, :, -1])
                x = rearrange(F.relu(self.frame_memory(frames, state[-1])), "b c t hh ww -> (b t) c hh ww")
        x = F.pixel_shuffle(self.to_rgb(x), 2)
        video = rearrange(x, "(b t) c hh ww -> b c t hh ww", t=t)
        return video.clamp(-1.0, 1.0), new_state

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """A whole video's latents -> its pixels (as `WanVAE.decode`)."""
        return self(latents)[0]

    def stream_decoder(self) -> TinyStreamingDecoder:
        """A fresh chunk-by-chunk decoder for one video."""
        return TinyStreamingDecoder(self)

    # ----- files -------------------------------------------------------------------------------------------

    def save(self, folder: str | Path) -> Path:
        """Write `decoder.safetensors` and `decoder.json` into `folder` (created if missing)."""
        from diagvid.config import to_dict
        from diagvid.model.vae import save_folder

        return save_folder(self, to_dict(self.cfg), folder, CONFIG_FILE, WEIGHTS_FILE)

    @classmethod
    def load(cls, folder: str | Path) -> TinyDecoder:
        """Read a folder written by `save` (strict: every weight present with its shape, nothing extra)."""
        from diagvid.config import from_dict
        from diagvid.model.vae import load_weights, read_folder_config

        raw = read_folder_config(folder, CONFIG_FILE, WEIGHTS_FILE, "tiny decoder")
        cfg = from_dict(TinyDecoderConfig, raw, where=str(Path(folder) / CONFIG_FILE))
        model = cls(cfg)
        load_weights(model, Path(folder) / WEIGHTS_FILE, expected=f"a tiny decoder {cfg}")
        return model.float()


class TinyStreamingDecoder:
    """Decodes one latent video chunk by chunk (the `StreamingDecoder` contract, with the tiny decoder)."""

    def __init__(self, decoder: TinyDecoder) -> None:
        self.decoder = decoder
        self.reset()

    def reset(self) -> None:
        """Forget the past: the next chunk starts a new video."""
        self._state: list[torch.Tensor] | None = None
        self._batch: int | None = None
        self.latent_frames = 0
        """latent frames decoded so far"""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Next chunk [B, C, K, h, w] -> its pixel frames [B, 3, T, H, W]; T = 1 + 4(K - 1) first, then 4K."""
        if self._batch is not None and latents.shape[0] != self._batch:
            raise ValueError(
                f"chunk batch {latents.shape[0]} != {self._batch} of the earlier chunks; call reset()"
            )
        self._batch = latents.shape[0]
        video, self._state = self.decoder(latents, self._state)
        self.latent_frames += latents.shape[2]
        return video


class FastDecodeCodec:
    """A Wan VAE that decodes with a tiny decoder: encoding (image/video conditioning) stays the VAE's."""

    def __init__(self, vae, decoder: TinyDecoder) -> None:
        if decoder.z_dim != vae.z_dim or decoder.spatial_stride != vae.spatial_stride:
            raise ValueError(
                f"the tiny decoder reads {decoder.z_dim} channels at stride {decoder.spatial_stride}; the VAE "
                f"has {vae.z_dim} channels at stride {vae.spatial_stride}"
            )
        self.vae, self.decoder = vae, decoder

    device = property(lambda self: self.vae.device)
    dtype = property(lambda self: self.vae.dtype)
    spatial_stride = property(lambda self: self.vae.spatial_stride)
    temporal_stride = property(lambda self: self.vae.temporal_stride)
    z_dim = property(lambda self: self.vae.z_dim)

    def encode(self, video: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.vae.encode(video, **kwargs)

    def stream_encoder(self):
        return self.vae.stream_encoder()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder.decode(latents)

    def stream_decoder(self) -> TinyStreamingDecoder:
        return self.decoder.stream_decoder()

    @property
    def decoding_module(self) -> TinyDecoder:
        """What decodes (`diagvid.decode_worker` sends only this to its process: no VAE, no diffusers)."""
        return self.decoder
