"""Wan VAE adapter: diffusers' `AutoencoderKLWan` with per-channel latent normalisation, streaming decode and
encode through its causal feature cache, and strict safetensors save/load.

Shape letters: B batch, C latent channels, F latent frames, K latent frames in one chunk, h/w latent size,
T pixel frames, H/W pixel size. The time axis is causal with stride 4: the first latent frame holds one pixel
frame and every later one holds four, so T = 1 + 4(F - 1).

Our folder format: `vae.safetensors` (diffusers' parameter names, so a diffusers folder loads through the
same check) and `vae.json` (the `VAEConfig` fields, latent statistics included). The original Wan2.1 release
file `Wan2.1_VAE.pth` (Wan's own parameter names, no config) loads through `WanVAE.from_original_file`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanRMS_norm
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

# the frame conversions live in diagvid.model.frames (no diffusers there); imported from here too
from diagvid.model.frames import (  # noqa: F401
    TEMPORAL_STRIDE,
    frames_to_tensor,
    pixel_frames,
    tensor_to_frames,
    uint8_frames,
)

WEIGHTS_FILE = "vae.safetensors"
CONFIG_FILE = "vae.json"
DIFFUSERS_WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
ORIGINAL_FILE = "Wan2.1_VAE.pth"

# The per-channel statistics Wan2.1's latents are normalised with (released with the model).
_WAN21_MEAN = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
]  # fmt: skip
_WAN21_STD = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
]  # fmt: skip


@dataclass
class VAEConfig:
    """Architecture of a Wan2.1 VAE and the statistics that normalise its latents."""

    base_dim: int = 96
    """channels at full resolution; level i has base_dim * dim_mult[i]"""
    z_dim: int = 16
    """latent channels C"""
    dim_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    """channel multiplier per level; len - 1 halvings of H and W, so the spatial stride is 2 ** (len - 1)"""
    num_res_blocks: int = 2
    """residual blocks per encoder level (the decoder has one more per level)"""
    attn_scales: list[float] = field(default_factory=list)
    """resolutions with extra attention blocks (none in Wan2.1)"""
    temperal_downsample: list[bool] = field(default_factory=lambda: [False, True, True])
    """which spatial halvings also halve time (diffusers' spelling); exactly two for the 4x stride"""
    dropout: float = 0.0
    """dropout inside the residual blocks"""
    latents_mean: list[float] = field(default_factory=lambda: list(_WAN21_MEAN))
    """per-channel mean of the raw posterior means; z = (mu - mean) / std"""
    latents_std: list[float] = field(default_factory=lambda: list(_WAN21_STD))
    """per-channel standard deviation of the raw posterior means"""
    decoder_base_dim: int | None = None
    """channels at the decoder's full resolution (diffusers' `decoder_base_dim`, as in Wan2.2's VAE); None:
    `base_dim`. A wider decoder than encoder decodes the same latents with more capacity"""
    decoder_norms: bool = True
    """keep the RMS norms inside the decoder's residual, attention and mid blocks (Wan does). The toy codec
    turns them off: at 16-64 channels they stall the learning of object colour (docs/status.md); the output
    head's norm, the encoder and everything else stay as in Wan, and weight files lose only those gammas."""

    def __post_init__(self) -> None:
        if self.base_dim < 1 or self.z_dim < 1 or self.num_res_blocks < 1:
            raise ValueError(
                f"base_dim={self.base_dim}, z_dim={self.z_dim} and num_res_blocks={self.num_res_blocks} "
                "must all be >= 1"
            )
        if self.decoder_base_dim is not None and self.decoder_base_dim < 1:
            raise ValueError(f"decoder_base_dim={self.decoder_base_dim} must be >= 1, or None (= base_dim)")
        if len(self.dim_mult) < 2:
            raise ValueError(f"dim_mult={self.dim_mult} needs at least 2 levels (one 2x downsampling)")
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temperal_downsample={self.temperal_downsample} needs one entry per downsampling, "
                f"len(dim_mult) - 1 = {len(self.dim_mult) - 1}"
            )
        if sum(map(bool, self.temperal_downsample)) != 2:
            # diffusers' encode loop and our streaming code both assume 1 + 4k frames
            raise ValueError(
                f"temperal_downsample={self.temperal_downsample} must hold exactly two True (4x in time)"
            )
        for name in ("latents_mean", "latents_std"):
            if len(getattr(self, name)) != self.z_dim:
                raise ValueError(
                    f"{name} has {len(getattr(self, name))} values; z_dim={self.z_dim} needs one each"
                )
        if any(not s > 0 for s in self.latents_std):
            raise ValueError(f"latents_std={self.latents_std} must be > 0 everywhere")

    @property
    def spatial_stride(self) -> int:
        """Pixels per latent along H and W."""
        return 2 ** (len(self.dim_mult) - 1)

    def to_dict(self) -> dict:
        """Plain JSON-ready dict of every field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> VAEConfig:
        """Inverse of `to_dict`; unknown keys are an error."""
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown VAEConfig keys {unknown}; allowed: {[f.name for f in fields(cls)]}")
        return cls(**d)

    def summary(self) -> str:
        """The architecture fields in one line (for error messages)."""
        return (
            f"VAEConfig(base_dim={self.base_dim}, z_dim={self.z_dim}, dim_mult={self.dim_mult}, "
            f"num_res_blocks={self.num_res_blocks}, attn_scales={self.attn_scales}, "
            f"temperal_downsample={self.temperal_downsample}, decoder_base_dim={self.decoder_base_dim}, "
            f"decoder_norms={self.decoder_norms})"
        )


PRESETS: dict[str, VAEConfig] = {
    # the released Wan2.1 VAE (127 M parameters)
    "wan2.1": VAEConfig(),
    # the toy world: 64x64 RGB at 16 fps -> 8x8 latents, 4x in time, 2.0 M parameters. The deepest level is
    # the widest because at 8x8 it costs almost nothing; statistics are 0/1 until the VAE is trained.
    "toy": VAEConfig(
        base_dim=16,
        z_dim=8,
        dim_mult=[1, 2, 2, 4],
        num_res_blocks=1,
        latents_mean=[0.0] * 8,
        latents_std=[1.0] * 8,
        decoder_norms=False,
    ),
    # unit tests: 4x spatial, 4x temporal, about 160 k parameters
    "tiny": VAEConfig(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[True, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    ),
}


def preset(name: str, **overrides) -> VAEConfig:
    """A named VAE config, with fields replaced by `overrides`. A new `z_dim` without statistics gets the
    placeholders 0 and 1 (what training measures), not the preset's for another channel count."""
    if name not in PRESETS:
        raise ValueError(f"unknown VAE preset {name!r}; allowed: {sorted(PRESETS)}")
    base = PRESETS[name].to_dict()
    z = overrides.get("z_dim", base["z_dim"])
    if z != base["z_dim"] and not {"latents_mean", "latents_std"} & set(overrides):
        base["latents_mean"], base["latents_std"] = [0.0] * z, [1.0] * z
    return VAEConfig.from_dict({**base, **overrides})


def allowed_frame_counts(t: int) -> str:
    """The valid pixel frame counts next to `t`, for error messages."""
    lower = 1 + TEMPORAL_STRIDE * max(0, (t - 1) // TEMPORAL_STRIDE)
    return f"T = 1 + 4k (1, 5, 9, 13, ...; nearest: {lower} or {lower + TEMPORAL_STRIDE})"


def latent_frames(t: int) -> int:
    """Latent frames F of a clip of T = 1 + 4k pixel frames."""
    return 1 + (t - 1) // TEMPORAL_STRIDE


class WanVAE(nn.Module):
    """The Wan VAE: video in [-1, 1] <-> normalised latents, whole clips or chunk by chunk."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = AutoencoderKLWan(
            base_dim=cfg.base_dim,
            decoder_base_dim=cfg.decoder_base_dim,
            z_dim=cfg.z_dim,
            dim_mult=list(cfg.dim_mult),
            num_res_blocks=cfg.num_res_blocks,
            attn_scales=list(cfg.attn_scales),
            temperal_downsample=list(cfg.temperal_downsample),
            dropout=cfg.dropout,
            latents_mean=list(cfg.latents_mean),
            latents_std=list(cfg.latents_std),
            scale_factor_temporal=TEMPORAL_STRIDE,
            scale_factor_spatial=cfg.spatial_stride,
        )
        if not cfg.decoder_norms:
            _drop_decoder_body_norms(self.model.decoder)
        _run_causal_convs_on_onednn(self.model)
        # not persistent: the statistics live in the JSON config, the weight file holds only diffusers' keys
        shape = (1, cfg.z_dim, 1, 1, 1)
        self.register_buffer("latents_mean", torch.tensor(cfg.latents_mean).view(shape), persistent=False)
        self.register_buffer("latents_std", torch.tensor(cfg.latents_std).view(shape), persistent=False)

    # ----- properties --------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """Where the weights are."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Precision of the weights."""
        return next(self.model.parameters()).dtype

    @property
    def spatial_stride(self) -> int:
        """Pixels per latent along H and W."""
        return self.cfg.spatial_stride

    @property
    def temporal_stride(self) -> int:
        """Pixel frames per latent frame (after the first)."""
        return TEMPORAL_STRIDE

    @property
    def z_dim(self) -> int:
        """Latent channels C."""
        return self.cfg.z_dim

    # ----- whole clips -------------------------------------------------------------------------------------

    def normalize(self, mu: torch.Tensor) -> torch.Tensor:
        """Raw posterior means [B, C, F, h, w] -> normalised latents (what the DiT sees)."""
        return (mu - self.latents_mean) / self.latents_std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, C, F, h, w] -> raw latents the decoder takes."""
        return z * self.latents_std + self.latents_mean

    def encode(
        self, video: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Video [B, 3, T, H, W] in [-1, 1], T = 1 + 4k -> normalised latents [B, C, 1 + k, H/s, W/s].

        The posterior mean by default; `sample=True` draws from the posterior (VAE training, augmentation).
        """
        self._check_video(video)
        posterior = self.model.encode(video.to(self.device, self.dtype)).latent_dist
        mu = posterior.sample(generator) if sample else posterior.mode()
        return self.normalize(mu)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, C, F, h, w] -> video [B, 3, 1 + 4(F - 1), h*s, w*s] clamped to [-1, 1]."""
        self._check_latents(latents)
        return self.model.decode(self.denormalize(latents.to(self.device, self.dtype))).sample

    # ----- streaming ---------------------------------------------------------------------------------------

    def stream_decoder(self) -> StreamingDecoder:
        """A fresh chunk-by-chunk decoder for one video."""
        return StreamingDecoder(self)

    def stream_encoder(self) -> StreamingEncoder:
        """A fresh incremental encoder for one video."""
        return StreamingEncoder(self)

    # ----- files -------------------------------------------------------------------------------------------

    def save(self, folder: str | Path) -> Path:
        """Write `vae.safetensors` and `vae.json` into `folder` (created if missing)."""
        return save_folder(self.model, self.cfg.to_dict(), folder, CONFIG_FILE, WEIGHTS_FILE)

    @classmethod
    def load(cls, folder: str | Path) -> WanVAE:
        """A VAE written by `save`, in eval mode, on the CPU in fp32."""
        cfg = VAEConfig.from_dict(read_folder_config(folder, CONFIG_FILE, WEIGHTS_FILE, "diagvid VAE"))
        vae = cls(cfg)
        load_weights(vae.model, Path(folder) / WEIGHTS_FILE, cfg.summary())
        return vae.eval()

    @classmethod
    def from_diffusers_folder(cls, folder: str | Path) -> WanVAE:
        """A diffusers `AutoencoderKLWan` folder (config.json + diffusion_pytorch_model.safetensors), offline."""
        folder = Path(folder)
        cfg_path = folder / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{cfg_path} not found; a diffusers VAE folder holds config.json")
        cfg = config_from_diffusers(json.loads(cfg_path.read_text()))
        vae = cls(cfg)
        load_weights(vae.model, folder / DIFFUSERS_WEIGHTS_FILE, cfg.summary())
        return vae.eval()

    @classmethod
    def from_original_file(cls, path: str | Path, cfg: VAEConfig | None = None) -> WanVAE:
        """The original Wan release's `Wan2.1_VAE.pth` (Wan's parameter names), on the CPU in fp32.

        The file holds no config: the architecture is read from the tensor shapes and the latent statistics
        are Wan2.1's (16 channels), unless `cfg` gives both. Opened with weights_only=True, memory-mapped.
        """
        from diagvid.model.weights import read_tensor_pickle

        path = Path(path)
        sd = read_tensor_pickle(path)
        cfg = cfg or config_from_original(sd, path)
        vae = cls(cfg)
        want = {k: tuple(v.shape) for k, v in _unique_state_dict(vae.model).items()}
        problems = misfit(sd, to_original_names(want, cfg))
        if problems:
            raise ValueError(f"{path} does not fit an original Wan VAE of {cfg.summary()}: {problems}")
        vae.model.load_state_dict(from_original_names(sd, cfg))
        return vae.eval()

    # ----- checks ------------------------------------------------------------------------------------------

    def _check_video(self, video: torch.Tensor) -> None:
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be [B, 3, T, H, W]; got shape {tuple(video.shape)}")
        t, h, w = video.shape[2:]
        if t < 1 or (t - 1) % TEMPORAL_STRIDE:
            raise ValueError(f"video has T={t} frames; the Wan VAE takes {allowed_frame_counts(t)}")
        s = self.spatial_stride
        if h % s or w % s:
            raise ValueError(f"video size {h}x{w} must be a multiple of the spatial stride {s}")

    def _check_latents(self, latents: torch.Tensor) -> None:
        if latents.ndim != 5 or latents.shape[1] != self.z_dim or latents.shape[2] < 1:
            raise ValueError(
                f"latents must be [B, {self.z_dim}, F >= 1, h, w] for this VAE; got shape {tuple(latents.shape)}"
            )


def config_from_diffusers(raw: dict) -> VAEConfig:
    """`VAEConfig` from an `AutoencoderKLWan` config.json; Wan2.2-style options are refused."""
    ours = {f.name for f in fields(VAEConfig)}
    # options we do not drive (Wan2.2's residual/patchified VAE, other channel counts) must keep Wan2.1's value
    fixed = {
        "in_channels": 3,
        "out_channels": 3,
        "is_residual": False,
        "patch_size": None,
    }
    for key, value in raw.items():
        if key.startswith("_") or key in ours or key.startswith("scale_factor_"):
            continue
        if key not in fixed:
            raise ValueError(
                f"unknown AutoencoderKLWan config key {key!r}={value!r}; this adapter reads {sorted(ours)}"
            )
        if value != fixed[key]:
            raise ValueError(
                f"AutoencoderKLWan config {key}={value!r} is not supported (Wan2.1 VAE needs {fixed[key]!r})"
            )
    cfg = VAEConfig.from_dict({k: v for k, v in raw.items() if k in ours})
    if raw.get("scale_factor_spatial", cfg.spatial_stride) != cfg.spatial_stride:
        raise ValueError(
            f"config.json says scale_factor_spatial={raw['scale_factor_spatial']} but dim_mult={cfg.dim_mult} "
            f"downsamples by {cfg.spatial_stride}"
        )
    return cfg


# ----- the original Wan release's names ----------------------------------------------------------------------

# Inside a residual block: Wan's nn.Sequential indices -> diffusers' names (1, 4, 5 are SiLU / dropout)
_RESIDUAL_NAMES = {
    "residual.0.": "norm1.",
    "residual.2.": "conv1.",
    "residual.3.": "norm2.",
    "residual.6.": "conv2.",
    "shortcut.": "conv_shortcut.",
}


def original_names(cfg: VAEConfig) -> list[tuple[str, str]]:
    """(Wan name prefix, diffusers `AutoencoderKLWan` prefix) of every module of a VAE of `cfg`.

    Wan keeps each side's blocks in one flat nn.Sequential (`encoder.downsamples.N`, `decoder.upsamples.N`);
    diffusers keeps the encoder's flat (same indices) and groups the decoder's per level (`up_blocks.i.
    resnets.j`, `up_blocks.i.upsamplers.0`). `conv1` / `conv2` at the top are the quant convs.
    """
    if cfg.attn_scales:
        raise ValueError(f"attn_scales={cfg.attn_scales}: the original-name mapping covers Wan2.1 (none)")
    rows = [("conv1.", "quant_conv."), ("conv2.", "post_quant_conv.")]

    def residual(wan: str, ours: str) -> None:
        rows.extend((wan + a, ours + b) for a, b in _RESIDUAL_NAMES.items())

    for side in ("encoder", "decoder"):
        rows.append((f"{side}.conv1.", f"{side}.conv_in."))
        residual(f"{side}.middle.0.", f"{side}.mid_block.resnets.0.")
        rows.append((f"{side}.middle.1.", f"{side}.mid_block.attentions.0."))
        residual(f"{side}.middle.2.", f"{side}.mid_block.resnets.1.")
        rows += [(f"{side}.head.0.", f"{side}.norm_out."), (f"{side}.head.2.", f"{side}.conv_out.")]
    levels = len(cfg.dim_mult)
    n = 0
    for level in range(levels):
        for _ in range(cfg.num_res_blocks):
            residual(f"encoder.downsamples.{n}.", f"encoder.down_blocks.{n}.")
            n += 1
        if level < levels - 1:
            rows.append((f"encoder.downsamples.{n}.", f"encoder.down_blocks.{n}."))
            n += 1
    n = 0
    for level in range(levels):
        for j in range(cfg.num_res_blocks + 1):  # the decoder has one more residual block per level
            residual(f"decoder.upsamples.{n}.", f"decoder.up_blocks.{level}.resnets.{j}.")
            n += 1
        if level < levels - 1:
            rows.append((f"decoder.upsamples.{n}.", f"decoder.up_blocks.{level}.upsamplers.0."))
            n += 1
    return rows


def from_original_names(sd: dict, cfg: VAEConfig) -> dict:
    """Rename a state dict from Wan's VAE names to diffusers `AutoencoderKLWan` names (unknown keys stay)."""
    from diagvid.model.weights import rename_keys

    return rename_keys(sd, original_names(cfg))


def to_original_names(sd: dict, cfg: VAEConfig) -> dict:
    """Rename a state dict from diffusers `AutoencoderKLWan` names to Wan's VAE names (unknown keys stay)."""
    from diagvid.model.weights import rename_keys

    return rename_keys(sd, original_names(cfg), reverse=True)


def config_from_original(sd: dict, source: str | Path = "the state dict") -> VAEConfig:
    """The architecture of an original Wan VAE state dict, read from its shapes, with Wan2.1's statistics.

    base_dim from `encoder.conv1`, z_dim from `conv2`, and the levels from the flat encoder: residual blocks
    (their output width gives dim_mult) until a resample (a `time_conv` makes it temporal).
    """
    needed = ["encoder.conv1.weight", "conv2.weight", "encoder.downsamples.0.residual.2.weight"]
    lacking = [k for k in needed if k not in sd]
    if lacking:
        raise ValueError(
            f"{source} is not an original Wan VAE checkpoint: it lacks {', '.join(lacking)} "
            f"(its {len(sd)} keys start {_few(sorted(sd))})"
        )
    base_dim, z_dim = sd["encoder.conv1.weight"].shape[0], sd["conv2.weight"].shape[0]
    widths: list[list[int]] = [[]]  # output width of each residual block, per level
    temporal: list[bool] = []
    n = 0
    while any(k.startswith(f"encoder.downsamples.{n}.") for k in sd):
        prefix = f"encoder.downsamples.{n}."
        if prefix + "residual.2.weight" in sd:
            widths[-1].append(sd[prefix + "residual.2.weight"].shape[0])
        elif prefix + "resample.1.weight" in sd:
            temporal.append(prefix + "time_conv.weight" in sd)
            widths.append([])
        else:
            raise ValueError(
                f"{source}: {prefix}* is neither a residual block nor a resample (attention blocks inside the "
                "levels are not part of Wan2.1's VAE)"
            )
        n += 1
    blocks = {len(w) for w in widths}
    if len(blocks) != 1 or any(len(set(w)) != 1 or w[0] % base_dim for w in widths):
        raise ValueError(f"{source}: encoder levels with residual block widths {widths} are not a Wan VAE")
    if z_dim != len(_WAN21_MEAN):
        raise ValueError(
            f"{source} has z_dim={z_dim}; Wan2.1's latent statistics are for {len(_WAN21_MEAN)} channels: pass "
            "a VAEConfig with latents_mean / latents_std"
        )
    return VAEConfig(
        base_dim=base_dim,
        z_dim=z_dim,
        dim_mult=[w[0] // base_dim for w in widths],
        num_res_blocks=blocks.pop(),
        temperal_downsample=temporal,
    )


def _drop_decoder_body_norms(decoder: nn.Module) -> None:
    """Replace every RMS norm of the decoder but its output head's by the identity (in place)."""
    for parent in decoder.modules():
        for name, child in parent.named_children():
            if isinstance(child, WanRMS_norm) and child is not getattr(decoder, "norm_out", None):
                setattr(parent, name, nn.Identity())


class _OneDNNCausalConv3d(WanCausalConv3d):
    """diffusers' causal conv, run by oneDNN for CPU fp32 inference.

    PyTorch sends a CPU fp32 conv3d whose batch is 1 and whose input is small (N * C * T * H <= 20480) to its
    unblocked `slow_conv3d` kernel. The Wan VAE decodes one latent frame at a time, so at the toy size every
    decoder conv lands there; oneDNN measured 2.5-8x faster on those layers (same results to float rounding).
    With gradients on (codec training) the call is PyTorch's own, unchanged.
    """

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if (
            x.device.type == "cpu"
            and x.dtype == weight.dtype == torch.float32
            and not torch.is_grad_enabled()
        ):
            return torch.mkldnn_convolution(
                x, weight, bias, self.padding, self.stride, self.dilation, self.groups
            )
        return super()._conv_forward(x, weight, bias)


def _run_causal_convs_on_onednn(module: nn.Module) -> None:
    """Make every causal conv of `module` an `_OneDNNCausalConv3d` (same weights, same module tree)."""
    if not torch.backends.mkldnn.is_available():
        return
    for m in module.modules():
        if type(m) is WanCausalConv3d:
            m.__class__ = _OneDNNCausalConv3d


def _count_causal_convs(module: nn.Module) -> int:
    return sum(isinstance(m, WanCausalConv3d) for m in module.modules())


class StreamingDecoder:
    """Decodes one latent video chunk by chunk, keeping the decoder's causal feature cache between chunks.

    diffusers' whole-clip decode already runs the decoder one latent frame at a time over such a cache, so the
    concatenated chunk outputs are the same computation as `WanVAE.decode` of the whole video, only split.
    """

    def __init__(self, vae: WanVAE) -> None:
        self.vae = vae
        self.reset()

    def reset(self) -> None:
        """Forget the past: the next chunk starts a new video."""
        # one slot per causal conv, filled in module order on every decoder call; our own list (not the
        # model's `_feat_map`) so a whole-clip decode or another stream in between cannot disturb it
        self._feat_cache: list = [None] * _count_causal_convs(self.vae.model.decoder)
        self._batch: int | None = None
        self.latent_frames = 0
        """latent frames decoded so far"""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Next chunk [B, C, K, h, w] -> its pixel frames [B, 3, T, H, W] in [-1, 1].

        T = 1 + 4(K - 1) for the video's first chunk, 4K for every later one.
        """
        vae = self.vae
        vae._check_latents(latents)
        if self._batch is not None and latents.shape[0] != self._batch:
            raise ValueError(
                f"chunk batch {latents.shape[0]} != {self._batch} of the earlier chunks; call reset()"
            )
        self._batch = latents.shape[0]
        # post_quant_conv has a 1x1x1 kernel, so it needs no cache across chunks
        x = vae.model.post_quant_conv(vae.denormalize(latents.to(vae.device, vae.dtype)))
        out = []
        for i in range(x.shape[2]):
            frame = x[:, :, i : i + 1]
            # as in diffusers' decode; the flag only matters for Wan2.2's residual upsampler, Wan2.1 keeps the
            # first frame unstretched through the empty cache slots instead
            first = self.latent_frames == 0
            out.append(vae.model.decoder(frame, feat_cache=self._feat_cache, feat_idx=[0], first_chunk=first))
            self.latent_frames += 1
        return torch.cat(out, dim=2).clamp(-1.0, 1.0)


class StreamingEncoder:
    """Encodes pixel frames pushed in pieces of any size, keeping the encoder's causal cache between pieces.

    Latent frame 0 is made from pixel frame 0 alone and every later one from the next 4 frames, as in
    diffusers' whole-clip encode, so the outputs concatenate to `WanVAE.encode` of the whole clip. Frames
    that do not yet complete a latent frame wait in `pending_frames`.
    """

    def __init__(self, vae: WanVAE) -> None:
        self.vae = vae
        self.reset()

    def reset(self) -> None:
        """Forget the past: the next frames start a new video."""
        self._feat_cache: list = [None] * _count_causal_convs(self.vae.model.encoder)
        self._pending: torch.Tensor | None = None
        self.latent_frames = 0
        """latent frames produced so far"""

    @property
    def pending_frames(self) -> int:
        """Pixel frames received that do not complete a latent frame yet."""
        return 0 if self._pending is None else self._pending.shape[2]

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Next frames [B, 3, n, H, W] in [-1, 1] -> the latent frames they complete [B, C, m, h, w] (m may be 0)."""
        vae = self.vae
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"frames must be [B, 3, n, H, W]; got shape {tuple(video.shape)}")
        s = vae.spatial_stride
        b, _, _, h, w = video.shape
        if h % s or w % s:
            raise ValueError(f"frame size {h}x{w} must be a multiple of the spatial stride {s}")
        video = video.to(vae.device, vae.dtype)
        if self._pending is not None:
            before = self._pending.shape
            if (before[0], before[3], before[4]) != (b, h, w):
                raise ValueError(
                    f"frames {tuple(video.shape)} do not match the earlier ones {tuple(before)}; call reset()"
                )
            video = torch.cat([self._pending, video], dim=2)
        out = []
        while True:
            need = 1 if self.latent_frames == 0 else TEMPORAL_STRIDE
            if video.shape[2] < need:
                break
            piece, video = video[:, :, :need], video[:, :, need:]
            out.append(vae.model.encoder(piece, feat_cache=self._feat_cache, feat_idx=[0]))
            self.latent_frames += 1
        self._pending = video
        if not out:
            return torch.zeros(b, vae.z_dim, 0, h // s, w // s, device=vae.device, dtype=vae.dtype)
        # quant_conv is 1x1x1 (no cache needed); its channels are [posterior mean, log-variance]
        moments = vae.model.quant_conv(torch.cat(out, dim=2))
        return vae.normalize(moments.chunk(2, dim=1)[0])


# ----- strict safetensors I/O (shared with diagvid.model.text) ----------------------------------------------


def _unique_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """`state_dict` with each tied tensor under its first name only (safetensors refuses shared storage)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    for name, t in module.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if key in seen:
            continue
        seen.add(key)
        out[name] = t
    return out


def save_weights(module: nn.Module, path: str | Path) -> None:
    """Write a module's tensors to a safetensors file (atomically: a crash leaves the old file or the new)."""
    from diagvid.fileperm import replace_atomically

    tensors = {k: v.detach().contiguous().cpu() for k, v in _unique_state_dict(module).items()}
    replace_atomically(Path(path), lambda tmp: save_file(tensors, tmp))


def save_folder(
    module: nn.Module, config: dict, folder: str | Path, config_file: str, weights_file: str
) -> Path:
    """Write a model folder of ours: `weights_file` (safetensors) and `config_file` (JSON), both atomic."""
    from diagvid.fileperm import write_json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(module, folder / weights_file)
    write_json(config, folder / config_file)
    return folder


def read_folder_config(folder: str | Path, config_file: str, weights_file: str, kind: str) -> dict:
    """The JSON of a model folder written by `save_folder`; a missing one names what a `kind` folder holds."""
    path = Path(folder) / config_file
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; a {kind} folder holds {config_file} + {weights_file}")
    return json.loads(path.read_text())


def _few(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def misfit(state: dict[str, torch.Tensor], want: dict[str, tuple[int, ...]]) -> str:
    """A few missing, unexpected and mis-shaped keys of `state` against the names and shapes `want`, as one
    line; empty when it fits."""
    missing = sorted(want.keys() - state.keys())
    unexpected = sorted(state.keys() - want.keys())
    misshaped = sorted(k for k in want.keys() & state.keys() if tuple(state[k].shape) != tuple(want[k]))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({_few(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({_few(unexpected)})")
    if misshaped:
        shapes = [f"{k}: file {list(state[k].shape)} vs model {list(want[k])}" for k in misshaped[:3]]
        problems.append(
            f"{len(misshaped)} with the wrong shape ({'; '.join(shapes)}{', ...' * (len(misshaped) > 3)})"
        )
    return ", ".join(problems)


def load_weights(module: nn.Module, path: str | Path, expected: str) -> None:
    """Load a safetensors file into `module` after checking every name and shape against it.

    A file that does not fit raises one ValueError naming a few missing, unexpected and mis-shaped keys and
    `expected` (the config the module was built from).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file {path} not found")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
    problems = misfit(state, {k: tuple(v.shape) for k, v in _unique_state_dict(module).items()})
    if problems:
        raise ValueError(f"{path} does not fit {expected}: {problems}")
    # strict=False only forgives the second names of tied tensors, which load through their first name
    module.load_state_dict(state, strict=False)
