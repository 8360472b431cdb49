"""The Wan2.1 video DiT, in one module with three attention modes.

- full:    every token sees every token (the bidirectional teacher and the critic);
- causal:  block-causal in one parallel pass, a chunk of K latent frames sees itself and earlier chunks
           (training the causal student); optional sink + window to mirror a rolling cache;
- cached:  one chunk at a time against a `KVCache` (inference and self-rollouts).

Parameter names are those of the original Wan checkpoints (`blocks.0.self_attn.q.weight`, ...), so the
published weights load without renaming. The model predicts the flow velocity v = noise - x0; it knows
nothing about noise schedules, which live in `diagvid.sampling`.

Shape letters: B batch, C latent channels, F latent frames, K frames per chunk, H/W token grid (latent
size / patch), S = H*W tokens per frame, L tokens, D width, N heads, Dh head dim, T text tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from diagvid.model.cache import KVCache
from diagvid.model.rope import apply_rope, grid_positions, rope_cos_sin

ATTENTION_MODES = ("full", "causal")


@dataclass
class DiTConfig:
    """Architecture of a Wan DiT."""

    dim: int = 1536
    """hidden width D"""
    ffn_dim: int = 8960
    """feed-forward inner width"""
    num_heads: int = 12
    """attention heads N (head dim = dim / num_heads)"""
    num_layers: int = 30
    """transformer blocks"""
    freq_dim: int = 256
    """width of the sinusoidal timestep features"""
    text_dim: int = 4096
    """width of the text encoder output"""
    text_len: int = 512
    """text tokens the encoder output is padded to"""
    in_dim: int = 16
    """latent channels in"""
    out_dim: int = 16
    """latent channels out"""
    patch_size: tuple[int, int, int] = (1, 2, 2)
    """(frames, height, width) patch"""
    eps: float = 1e-6
    """epsilon of every norm"""
    cross_attn_norm: bool = True
    """affine LayerNorm before cross-attention (Wan: True)"""
    rope_theta: float = 10000.0
    """RoPE base"""
    first_frame_embedding: bool = False
    """add a learned vector (initialised to zero) to the tokens of absolute latent frame 0: an anchor in time.
    Ours, not Wan's, and an experiment: RoPE gives only relative positions and at high noise nothing in the
    noisy clip marks which end is the start, a guess at why the toy expert reads a caption's motion axis but
    not its sign; with the anchor it did not learn the sign either (docs/status.md, "Which end is the
    start")"""
    position_grid: tuple[int, int] | None = None
    """(height, width) in tokens of a learned vector per position in the frame, added to every frame's tokens:
    absolute position in space, which RoPE does not give. Ours, not Wan's, and an experiment: with it, the toy
    expert still did not learn where a caption's motion starts (docs/status.md, "Which way, once more");
    inputs must have exactly this token grid"""
    motion_stem: tuple[int, int] | None = None
    """(frames, margin): a second patch embedding, added to the first, whose kernel also covers the `frames`
    latent frames before each patch (causal in time) and `margin` latent pixels on every side of it, so that
    each token starts from local motion, read by oriented space-time filters (the bias that lets the small
    motion classifier read a motion's sign). Zero at initialisation: a model given one computes what it did
    without it. Ours, not Wan's, and an experiment on why the toy teacher reads a caption's motion axis but
    not its sign; it did not help (docs/status.md, "Where the sign is learned"). Full and block-causal
    attention only: a chunk run against a KV cache lacks the frames before it"""

    def __post_init__(self) -> None:
        self.patch_size = tuple(self.patch_size)  # JSON round trips give lists
        if self.motion_stem is not None:
            stem = self.motion_stem
            if (
                not isinstance(stem, tuple | list)
                or len(stem) != 2
                or any(not isinstance(v, int) or v < 0 for v in stem)
                or not any(stem)
            ):
                raise ValueError(
                    f"DiTConfig.motion_stem={stem!r} must be (frames, margin): two ints >= 0, not both 0, or None"
                )
            self.motion_stem = tuple(stem)
        if self.position_grid is not None:
            grid = self.position_grid
            if (
                not isinstance(grid, tuple | list)
                or len(grid) != 2
                or any(not isinstance(g, int) or g < 1 for g in grid)
            ):
                raise ValueError(f"DiTConfig.position_grid={grid!r} must be two positive ints or None")
            self.position_grid = tuple(grid)
        for name in (
            "dim",
            "ffn_dim",
            "num_heads",
            "num_layers",
            "freq_dim",
            "text_dim",
            "in_dim",
            "out_dim",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DiTConfig.{name}={value!r} must be a positive int")
        if self.dim % self.num_heads:
            raise ValueError(f"DiTConfig.dim={self.dim} is not divisible by num_heads={self.num_heads}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"head dim {self.head_dim} (dim/num_heads) must be even and >= 6 for 3D RoPE")
        if self.freq_dim % 2:
            raise ValueError(f"DiTConfig.freq_dim={self.freq_dim} must be even")
        if len(self.patch_size) != 3 or any(p < 1 for p in self.patch_size):
            raise ValueError(f"DiTConfig.patch_size={self.patch_size} must be three positive ints")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def to_dict(self) -> dict:
        d = asdict(self)
        d["patch_size"] = list(self.patch_size)
        if self.position_grid is not None:
            d["position_grid"] = list(self.position_grid)
        if self.motion_stem is not None:
            d["motion_stem"] = list(self.motion_stem)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DiTConfig:
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown DiTConfig keys {unknown}; allowed: {sorted(cls.__dataclass_fields__)}")
        return cls(**d)


PRESETS: dict[str, DiTConfig] = {
    "wan2.1-t2v-1.3b": DiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "wan2.1-t2v-14b": DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    # the toy world: 8x8 latents of a 64x64 video, 16 tokens a frame
    "toy": DiTConfig(
        dim=128,
        ffn_dim=512,
        num_heads=4,
        num_layers=6,
        freq_dim=64,
        text_dim=64,
        text_len=16,
        in_dim=8,
        out_dim=8,
    ),
    # unit tests: a few thousand parameters
    "tiny": DiTConfig(
        dim=32,
        ffn_dim=64,
        num_heads=2,
        num_layers=2,
        freq_dim=16,
        text_dim=12,
        text_len=6,
        in_dim=4,
        out_dim=4,
    ),
}


def preset(name: str, **overrides) -> DiTConfig:
    """A named architecture, optionally with some fields changed."""
    if name not in PRESETS:
        raise ValueError(f"unknown DiT preset {name!r}; allowed: {sorted(PRESETS)}")
    return DiTConfig.from_dict({**PRESETS[name].to_dict(), **overrides})


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Wan's timestep features: [cos | sin] of t * 10000^(-i/half), computed in float64. t [M] -> [M, dim]."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angle = t.to(torch.float64)[:, None] * freqs[None]
    return torch.cat([angle.cos(), angle.sin()], dim=1).float()


def per_frame(x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-frame vector vec [B, F, D] over the S tokens of each frame of x [B, F*S, D]."""
    _b, f = vec.shape[:2]
    return (x.unflatten(1, (f, -1)) * vec[:, :, None]).flatten(1, 2)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift with per-frame shift/scale [B, F, D]; x [B, F*S, D]."""
    f = shift.shape[1]
    x = x.unflatten(1, (f, -1))
    return (x * (1 + scale[:, :, None]) + shift[:, :, None]).flatten(1, 2)


# An attention function receives one layer's index and its un-rotated q, k, v [B, L, N, Dh]; it applies
# RoPE for its mode and returns the attended values [B, L, N, Dh].
AttnFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Attention(nn.Module):
    """The projections Wan's two attentions share: q, k, v, o, and RMSNorm on q and k over the full width."""

    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)


class SelfAttention(Attention):
    """Self-attention among video tokens; who sees whom is decided by the attention function."""

    def forward(self, x: torch.Tensor, layer: int, attend: AttnFn) -> torch.Tensor:
        n = self.num_heads
        q = self.norm_q(self.q(x)).unflatten(-1, (n, -1))  # [B, L, N, Dh]
        k = self.norm_k(self.k(x)).unflatten(-1, (n, -1))  # [B, L, N, Dh]
        v = self.v(x).unflatten(-1, (n, -1))  # [B, L, N, Dh]
        return self.o(attend(layer, q, k, v).flatten(2))  # [B, L, D]


class CrossAttention(Attention):
    """Attention from video tokens to the text tokens; the text K/V can be cached per prompt."""

    def text_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [B, T, N, Dh] of the embedded text context [B, T, D]."""
        n = self.num_heads
        return self.norm_k(self.k(context)).unflatten(-1, (n, -1)), self.v(context).unflatten(-1, (n, -1))

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))  # [B, L, N, Dh]
        out = sdpa(q, *kv)  # [B, L, N, Dh]
        return self.o(out.flatten(2))


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention on [B, L, N, Dh] tensors (SDPA wants heads first)."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    )
    return out.transpose(1, 2)


class FP32LayerNorm(nn.LayerNorm):
    """A LayerNorm computed in fp32 whatever the dtype of its input and weights (bf16 models, as Wan's own
    layer norm); returns the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


class Block(nn.Module):
    """Wan block: modulated self-attention, cross-attention to text, modulated FFN, each residual."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.norm1 = nn.LayerNorm(d, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(d, cfg.num_heads, cfg.eps)
        self.norm3 = (
            FP32LayerNorm(d, eps=cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        )
        self.cross_attn = CrossAttention(d, cfg.num_heads, cfg.eps)
        self.norm2 = nn.LayerNorm(d, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(
            nn.Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, d)
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / d**0.5)

    def forward(
        self,
        x: torch.Tensor,
        e0: torch.Tensor,
        text_kv: tuple[torch.Tensor, torch.Tensor],
        layer: int,
        attend: AttnFn,
    ) -> torch.Tensor:
        # x [B, L, D]; e0 [B, F, 6, D] per-frame modulation from the timestep
        mod = (self.modulation[:, None] + e0.float()).unbind(2)  # 6 x [B, F, D], kept in fp32 as in Wan
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = mod
        h = modulate(self.norm1(x.float()), shift_sa, scale_sa).type_as(x)
        x = x + per_frame(self.self_attn(h, layer, attend).float(), gate_sa).type_as(x)
        x = x + self.cross_attn(self.norm3(x), text_kv)
        h = modulate(self.norm2(x.float()), shift_ff, scale_ff).type_as(x)
        x = x + per_frame(self.ffn(h).float(), gate_ff).type_as(x)
        return x


class Head(nn.Module):
    """Final modulated LayerNorm and projection to patch pixels."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        # e [B, F, D] is the timestep embedding before the 6-way projection
        shift, scale = (self.modulation[:, None] + e.float()[:, :, None]).unbind(2)  # 2 x [B, F, D]
        return self.head(modulate(self.norm(x.float()), shift, scale).type_as(x))


@dataclass
class ForwardStats:
    """Counts of transformer forwards, by the model itself (the engine reads NFE from here)."""

    forwards: int = 0


class WanDiT(nn.Module):
    """Wan2.1 text-to-video DiT predicting the flow velocity, with full, block-causal and cached attention."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d)
        )
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.head = Head(cfg)
        if cfg.first_frame_embedding:
            self.first_frame = nn.Parameter(torch.zeros(d))
        if cfg.position_grid is not None:
            self.position = nn.Parameter(torch.zeros(cfg.position_grid[0] * cfg.position_grid[1], d))
        if cfg.motion_stem is not None:
            back, margin = cfg.motion_stem
            pt, ph, pw = cfg.patch_size
            kernel = (pt * (back + 1), ph + 2 * margin, pw + 2 * margin)
            self.motion_stem = nn.Conv3d(cfg.in_dim, d, kernel_size=kernel, stride=cfg.patch_size, bias=False)
        self.stats = ForwardStats()
        self.gradient_checkpointing = False
        self.init_weights()

    def init_weights(self) -> None:
        """Wan's initialisation: Xavier linears, normal(0.02) embedding MLPs, zero output projection.

        The zero head makes an untrained model predict v = 0; tests that need a non-trivial function
        re-randomise it (see tests/conftest.py).
        """
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        nn.init.zeros_(self.patch_embedding.bias)
        if self.cfg.motion_stem is not None:
            nn.init.zeros_(self.motion_stem.weight)
        for seq in (self.text_embedding, self.time_embedding):
            for m in seq:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)

    # ----- geometry ----------------------------------------------------------------------------------------

    def token_grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Token grid (F, H, W) of a latent video, with an error naming the size that does not fit."""
        pt, ph, pw = self.cfg.patch_size
        if frames % pt or height % ph or width % pw:
            raise ValueError(
                f"latent size (frames={frames}, height={height}, width={width}) must be divisible by "
                f"patch_size={self.cfg.patch_size}"
            )
        return frames // pt, height // ph, width // pw

    def new_cache(
        self,
        *,
        batch_size: int,
        latent_hw: tuple[int, int],
        capacity_frames: int,
        sink_frames: int = 0,
        rope: str = "absolute",
        static_shapes: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """An empty KV cache sized for this model and a latent frame size (capacity in latent frames)."""
        _, h, w = self.token_grid(self.cfg.patch_size[0], *latent_hw)
        p = next(self.parameters())
        return KVCache(
            num_layers=self.cfg.num_layers,
            batch_size=batch_size,
            num_heads=self.cfg.num_heads,
            head_dim=self.cfg.head_dim,
            tokens_per_frame=h * w,
            capacity_frames=capacity_frames,
            sink_frames=sink_frames,
            rope=rope,
            rope_theta=self.cfg.rope_theta,
            static_shapes=static_shapes,
            dtype=dtype or p.dtype,
            device=device or p.device,
        )

    # ----- forward -----------------------------------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        *,
        attention: str = "full",
        frames_per_chunk: int | None = None,
        window_frames: int | None = None,
        sink_frames: int = 0,
        cache: KVCache | None = None,
        start_frame: int = 0,
    ) -> torch.Tensor:
        """Predict the flow velocity.

        Args:
            x: noisy latents [B, C, F, H*ph, W*pw] (with `cache`: only the current chunk's frames).
            t: timesteps in [0, 1000], [B] or per latent frame [B, F].
            context: text encoder output [B, T, text_dim] (ignored when `cache` already holds the prompt).
            attention: "full" or "causal" (block-causal, needs `frames_per_chunk`); ignored with `cache`.
            window_frames, sink_frames: with "causal", limit each chunk to the sink and the last
                `window_frames - sink_frames` frames, the view a rolling cache of that capacity gives.
            cache: run one chunk against this KV cache, starting at absolute latent frame `start_frame`.
        Returns: velocity [B, C_out, F, H*ph, W*pw].
        """
        # 1. host side, outside what `compile_forward` compiles: the forward count, the cache's slot decision
        # and the RoPE tables (absolute frame positions grow along a stream; as tensors they never recompile)
        self.stats.forwards += 1
        cfg = self.cfg
        f, h, w = self.token_grid(*x.shape[2:])
        if cache is not None:
            if cfg.motion_stem is not None:
                raise ValueError(
                    f"this model's motion_stem={cfg.motion_stem} reads the latent frames before each chunk, "
                    "which a chunk run against a KV cache does not have: use attention='full' or 'causal'"
                )
            rope_frame = cache.prepare(start_frame, f).rope_frame
        elif attention in ATTENTION_MODES:
            rope_frame = start_frame
        else:
            raise ValueError(f"attention={attention!r}; allowed: {ATTENTION_MODES} (or pass cache=)")
        cos, sin = rope_cos_sin(grid_positions(f, h, w, rope_frame), cfg.head_dim, cfg.rope_theta)
        return self._forward(
            x,
            t,
            context,
            cos.to(x.device),
            sin.to(x.device),
            attention=attention,
            frames_per_chunk=frames_per_chunk,
            window_frames=window_frames,
            sink_frames=sink_frames,
            cache=cache,
            has_first_frame=start_frame == 0,
        )

    def compile_forward(self, **options) -> WanDiT:
        """Compile the forward's body with `torch.compile(**options)` (e.g. `mode="max-autotune"` on a GPU);
        returns self. With a `static_shapes` KV cache a chunk forward is one graph; the cache's slot
        positions are compile-time constants, so a stream compiles one variant per slot layout it meets
        (a handful while the window fills, then none). Unlike `nn.Module.compile`, the forward count the
        engine reads (`stats.forwards`), the cache's bookkeeping and the RoPE tables stay outside the graph."""
        self._forward = torch.compile(self._forward, **options)
        return self

    def _forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        *,
        attention: str,
        frames_per_chunk: int | None,
        window_frames: int | None,
        sink_frames: int,
        cache: KVCache | None,
        has_first_frame: bool = True,
    ) -> torch.Tensor:
        """The forward's tensor work, after `forward` prepared the cache slots and the RoPE tables."""
        cfg = self.cfg
        b, _, f_lat, h_lat, w_lat = x.shape
        f, h, w = self.token_grid(f_lat, h_lat, w_lat)
        t = self._frame_timesteps(t, b, f)  # [B, F]
        if cache is not None:
            attend = self._cached_attention(cache, cos, sin)
        elif attention == "full":
            attend = self._full_attention(cos, sin)
        else:
            attend = self._block_causal_attention(
                cos, sin, h * w, f, frames_per_chunk, window_frames, sink_frames
            )

        # 2. embed patches, timesteps and text
        tokens = self.patch_embedding(x).flatten(2).transpose(1, 2)  # [B, L, D]
        if cfg.motion_stem is not None:
            back, margin = cfg.motion_stem
            # zeros before frame 0 and around the frame
            before = F.pad(x, (margin, margin, margin, margin, back * cfg.patch_size[0], 0))
            tokens = tokens + self.motion_stem(before).flatten(2).transpose(1, 2)
        if cfg.position_grid is not None:
            if (h, w) != cfg.position_grid:
                raise ValueError(
                    f"token grid (height={h}, width={w}) differs from position_grid={cfg.position_grid}, "
                    "the grid this model's position embedding covers"
                )
            tokens = (tokens.unflatten(1, (f, h * w)) + self.position.to(tokens.dtype)).flatten(1, 2)
        if cfg.first_frame_embedding and has_first_frame:
            anchored = tokens[:, : h * w] + self.first_frame.to(tokens.dtype)
            tokens = torch.cat([anchored, tokens[:, h * w :]], dim=1)
        freqs = sinusoidal_embedding(t.flatten(), cfg.freq_dim)  # fp32; the weights may be bf16 (GPU)
        e = self.time_embedding(freqs.to(self.time_embedding[0].weight.dtype)).unflatten(
            0, (b, f)
        )  # [B, F, D]
        e0 = self.time_projection(e).unflatten(-1, (6, cfg.dim))  # [B, F, 6, D]
        text_kv = self._text_kv(context, cache)  # per layer: 2 x [B, T, N, Dh]

        # 3. blocks
        for i, block in enumerate(self.blocks):
            # checkpointing would re-run cache writes during backward, after the cache moved on: not with a cache
            if self.gradient_checkpointing and torch.is_grad_enabled() and cache is None:
                tokens = torch.utils.checkpoint.checkpoint(
                    block, tokens, e0, text_kv[i], i, attend, use_reentrant=False
                )
            else:
                tokens = block(tokens, e0, text_kv[i], i, attend)  # [B, L, D]

        # 4. head and unpatchify
        out = self.head(tokens, e)  # [B, L, C_out*pt*ph*pw]
        return self.unpatchify(out, f, h, w)  # [B, C_out, F*pt, H*ph, W*pw]

    def unpatchify(self, out: torch.Tensor, f: int, h: int, w: int) -> torch.Tensor:
        """[B, L, C*pt*ph*pw] tokens back to a latent video [B, C, F*pt, H*ph, W*pw]."""
        pt, ph, pw = self.cfg.patch_size
        out = out.reshape(out.shape[0], f, h, w, pt, ph, pw, -1)
        out = out.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C, F, pt, H, ph, W, pw]
        return out.reshape(out.shape[0], out.shape[1], f * pt, h * ph, w * pw)

    def _frame_timesteps(self, t: torch.Tensor, b: int, f: int) -> torch.Tensor:
        t = torch.as_tensor(t, device=self.patch_embedding.weight.device)
        if t.ndim == 0:
            t = t.expand(b)
        if t.ndim == 1:
            t = t[:, None].expand(b, f)
        if t.shape != (b, f):
            raise ValueError(f"timesteps of shape {tuple(t.shape)}; expected [B]={b} or [B, F]=[{b}, {f}]")
        return t

    def _text_kv(
        self, context: torch.Tensor, cache: KVCache | None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # reuse the prompt's K/V only when no gradient is wanted: the text MLP may be training
        reuse = cache is not None and not torch.is_grad_enabled()
        if reuse and all(kv is not None for kv in cache.text_kv):
            return cache.text_kv  # type: ignore[return-value]  # all entries checked above
        if context.shape[-1] != self.cfg.text_dim:
            raise ValueError(f"context width {context.shape[-1]} != text_dim {self.cfg.text_dim}")
        ctx = self.text_embedding(context)  # [B, T, D]
        kvs = [blk.cross_attn.text_kv(ctx) for blk in self.blocks]
        if reuse:
            cache.text_kv = kvs
        return kvs

    # ----- the three attention modes ----------------------------------------------------------------------

    @staticmethod
    def _full_attention(cos: torch.Tensor, sin: torch.Tensor) -> AttnFn:
        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return sdpa(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)

        return attend

    @staticmethod
    def _block_causal_attention(
        cos: torch.Tensor,
        sin: torch.Tensor,
        s: int,
        f: int,
        k_frames: int | None,
        window: int | None,
        sink: int,
    ) -> AttnFn:
        if k_frames is None or k_frames < 1 or f % k_frames:
            raise ValueError(f"frames_per_chunk={k_frames} must be a positive divisor of {f} latent frames")
        if window is not None and not (sink + k_frames <= window):
            raise ValueError(
                f"window_frames={window} must hold sink_frames={sink} plus a chunk of {k_frames}"
            )

        def visible_frames(end: int) -> list[range]:
            # frames a chunk ending at `end` can see: all earlier ones, or sink + the most recent window
            if window is None or end <= window:
                return [range(0, end)]
            return [range(0, sink), range(end - (window - sink), end)]

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            outs = []
            # a loop of unmasked attention calls: exact, and no L x L mask in memory
            for start in range(0, f, k_frames):
                end = start + k_frames
                idx = [r for r in visible_frames(end) if len(r)]
                kc = torch.cat([k[:, r.start * s : r.stop * s] for r in idx], dim=1)
                vc = torch.cat([v[:, r.start * s : r.stop * s] for r in idx], dim=1)
                outs.append(sdpa(q[:, start * s : end * s], kc, vc))
            return torch.cat(outs, dim=1)

        return attend

    @staticmethod
    def _cached_attention(cache: KVCache, cos: torch.Tensor, sin: torch.Tensor) -> AttnFn:
        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            k_all, v_all, mask = cache.write_and_read(layer, apply_rope(k, cos, sin), v)
            return sdpa(apply_rope(q, cos, sin), k_all, v_all, mask)

        return attend

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
