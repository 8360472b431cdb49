"""DiT checkpoint formats: our folder, the original Wan2.1 layout, diffusers' layout, and the generator
checkpoints of Self-Forcing / CausVid / LongLive / Diagonal Distillation. Safe loading only.

Our parameter names are the original Wan names, so "original" needs no renaming; the diffusers names come
from a key table applied in either direction. Pickled files are read only with
`torch.load(weights_only=True)`, which refuses anything but tensors and plain containers.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from diagvid.model.dit import PRESETS, DiTConfig, WanDiT, preset

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
WAN_WEIGHTS = "diffusion_pytorch_model.safetensors"
WAN_INDEX = "diffusion_pytorch_model.safetensors.index.json"

# original (ours) -> diffusers WanTransformer3DModel; applied in order, first match wins per rule
TO_DIFFUSERS: list[tuple[str, str]] = [
    (r"^time_embedding\.0\.", "condition_embedder.time_embedder.linear_1."),
    (r"^time_embedding\.2\.", "condition_embedder.time_embedder.linear_2."),
    (r"^text_embedding\.0\.", "condition_embedder.text_embedder.linear_1."),
    (r"^text_embedding\.2\.", "condition_embedder.text_embedder.linear_2."),
    (r"^time_projection\.1\.", "condition_embedder.time_proj."),
    (r"^head\.modulation$", "scale_shift_table"),
    (r"^head\.head\.", "proj_out."),
    (r"^(blocks\.\d+)\.modulation$", r"\1.scale_shift_table"),
    (r"^(blocks\.\d+)\.ffn\.0\.", r"\1.ffn.net.0.proj."),
    (r"^(blocks\.\d+)\.ffn\.2\.", r"\1.ffn.net.2."),
    (r"^(blocks\.\d+)\.self_attn\.o\.", r"\1.attn1.to_out.0."),
    (r"^(blocks\.\d+)\.cross_attn\.o\.", r"\1.attn2.to_out.0."),
    (r"^(blocks\.\d+)\.self_attn\.([qkv])\.", r"\1.attn1.to_\2."),
    (r"^(blocks\.\d+)\.cross_attn\.([qkv])\.", r"\1.attn2.to_\2."),
    (r"^(blocks\.\d+)\.self_attn\.norm_", r"\1.attn1.norm_"),
    (r"^(blocks\.\d+)\.cross_attn\.norm_", r"\1.attn2.norm_"),
    (r"^(blocks\.\d+)\.norm3\.", r"\1.norm2."),  # diffusers calls the affine cross-attention norm norm2
]
FROM_DIFFUSERS: list[tuple[str, str]] = [
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"^(blocks\.\d+)\.scale_shift_table$", r"\1.modulation"),
    (r"^(blocks\.\d+)\.ffn\.net\.0\.proj\.", r"\1.ffn.0."),
    (r"^(blocks\.\d+)\.ffn\.net\.2\.", r"\1.ffn.2."),
    (r"^(blocks\.\d+)\.attn1\.to_out\.0\.", r"\1.self_attn.o."),
    (r"^(blocks\.\d+)\.attn2\.to_out\.0\.", r"\1.cross_attn.o."),
    (r"^(blocks\.\d+)\.attn1\.to_([qkv])\.", r"\1.self_attn.\2."),
    (r"^(blocks\.\d+)\.attn2\.to_([qkv])\.", r"\1.cross_attn.\2."),
    (r"^(blocks\.\d+)\.attn1\.norm_", r"\1.self_attn.norm_"),
    (r"^(blocks\.\d+)\.attn2\.norm_", r"\1.cross_attn.norm_"),
    (r"^(blocks\.\d+)\.norm2\.", r"\1.norm3."),
]
# wrappers of the distillation repos: FSDP / DDP / compile / wrapper-module prefixes
PREFIXES = ("_fsdp_wrapped_module.", "_orig_mod.", "module.", "model.")


def rename(sd: dict[str, torch.Tensor], table: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Rename keys with the first matching rule of `table` (keys no rule matches are kept)."""
    out = {}
    for key, value in sd.items():
        new = key
        for pattern, repl in table:
            new, n = re.subn(pattern, repl, key)
            if n:
                break
        out[new] = value
    return out


def strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes (`model.`, `_fsdp_wrapped_module.`, ...) wherever they lead a key."""
    out = {}
    for key, value in sd.items():
        changed = True
        while changed:
            changed = False
            for p in PREFIXES:
                if key.startswith(p):
                    key, changed = key[len(p) :], True
            key = key.replace("._fsdp_wrapped_module.", ".").replace("._orig_mod.", ".")
        out[key] = value
    return out


def merge_lora(sd: dict[str, torch.Tensor], scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Fold peft-style LoRA pairs into their base weights: W = W0 + scale * B @ A.

    LongLive / DD-S use rank 256 with alpha 256, so scale = alpha / rank = 1 is the default.
    """
    out: dict[str, torch.Tensor] = {}
    lora_a = {k[: -len(".lora_A.weight")]: v for k, v in sd.items() if k.endswith(".lora_A.weight")}
    lora_b = {k[: -len(".lora_B.weight")]: v for k, v in sd.items() if k.endswith(".lora_B.weight")}
    if set(lora_a) != set(lora_b):
        raise ValueError(f"LoRA A/B weights do not pair up: {sorted(set(lora_a) ^ set(lora_b))[:5]}")
    for key, value in sd.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        out[key.replace(".base_layer.", ".")] = value
    for base, a in lora_a.items():
        target = base.replace(".base_layer", "") + ".weight"
        if target not in out:
            raise ValueError(f"LoRA for {base!r} has no base weight {target!r}")
        w = out[target]
        out[target] = (w.float() + scale * (lora_b[base].float() @ a.float())).to(w.dtype)
    return out


def check_state_dict(sd: dict[str, torch.Tensor], model: WanDiT, source: str, arch: str) -> None:
    """One clear error listing missing, unexpected and mis-shaped keys (a few of each)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in sd and sd[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = []
        for name, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)):
            if items:
                parts.append(f"{len(items)} {name} (e.g. {', '.join(items[:5])})")
        raise ValueError(f"{source} does not match the expected architecture {arch}: " + "; ".join(parts))


def _arch(cfg: DiTConfig) -> str:
    for name, p in PRESETS.items():
        if p == cfg:
            return f"'{name}' (dim {cfg.dim}, {cfg.num_layers} layers, {cfg.num_heads} heads)"
    return (
        f"dim {cfg.dim}, {cfg.num_layers} layers, {cfg.num_heads} heads, in {cfg.in_dim}, text {cfg.text_dim}"
    )


def build(sd: dict[str, torch.Tensor], cfg: DiTConfig, source: str) -> WanDiT:
    """A model of `cfg` with the (already renamed) state dict loaded strictly."""
    model = WanDiT(cfg)
    check_state_dict(sd, model, source, _arch(cfg))
    model.load_state_dict(sd)
    return model


# ----- reading -------------------------------------------------------------------------------------------


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        hint = " (it looks like a pickle; rename it to .pt)" if path.read_bytes()[:2] == b"\x80\x02" else ""
        raise ValueError(f"{path} is not a readable safetensors file{hint}: {err}") from err


def _read_pickle(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # weights_only refuses code; truncated files raise several types
        raise ValueError(
            f"{path} cannot be loaded safely (weights_only=True): {type(err).__name__}: {str(err)[:200]}"
        ) from err


def read_file(path: str | Path) -> dict:
    """A .safetensors or a .pt/.pth/.bin file as a dict, safely."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        return _read_pickle(path)
    raise ValueError(
        f"{path}: unknown checkpoint type {path.suffix!r}; expected .safetensors, .pt, .pth or .bin"
    )


def _read_sharded(folder: Path, single: str, index: str) -> dict[str, torch.Tensor]:
    if (folder / single).exists():
        return _read_safetensors(folder / single)
    if (folder / index).exists():
        weight_map = json.loads((folder / index).read_text())["weight_map"]
        sd: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            sd.update(_read_safetensors(folder / shard))
        return sd
    raise FileNotFoundError(f"{folder} has neither {single} nor {index}")


def config_from_json(raw: dict) -> DiTConfig:
    """A DiTConfig from our config.json, an original Wan config.json or a diffusers one."""
    cls = raw.get("_class_name")
    if raw.get("format") == "diagvid":
        return DiTConfig.from_dict({k: v for k, v in raw.items() if k not in ("format", "kind")})
    if cls == "WanModel" or raw.get("model_type") in ("t2v",):
        return DiTConfig(
            dim=raw["dim"],
            ffn_dim=raw["ffn_dim"],
            num_heads=raw["num_heads"],
            num_layers=raw["num_layers"],
            freq_dim=raw.get("freq_dim", 256),
            text_dim=raw.get("text_dim", 4096),
            text_len=raw.get("text_len", 512),
            in_dim=raw.get("in_dim", 16),
            out_dim=raw.get("out_dim", 16),
            patch_size=tuple(raw.get("patch_size", (1, 2, 2))),
            eps=raw.get("eps", 1e-6),
            cross_attn_norm=raw.get("cross_attn_norm", True),
        )
    if cls == "WanTransformer3DModel":
        if raw.get("image_dim") or raw.get("added_kv_proj_dim"):
            raise ValueError(
                "image-to-video Wan transformers (image_dim / added_kv_proj_dim) are not supported"
            )
        heads = raw.get("num_attention_heads", 40)
        return DiTConfig(
            dim=heads * raw.get("attention_head_dim", 128),
            ffn_dim=raw.get("ffn_dim", 13824),
            num_heads=heads,
            num_layers=raw.get("num_layers", 40),
            freq_dim=raw.get("freq_dim", 256),
            text_dim=raw.get("text_dim", 4096),
            in_dim=raw.get("in_channels", 16),
            out_dim=raw.get("out_channels", 16),
            patch_size=tuple(raw.get("patch_size", (1, 2, 2))),
            eps=raw.get("eps", 1e-6),
            cross_attn_norm=raw.get("cross_attn_norm", True),
        )
    raise ValueError(
        f"unrecognised config.json (_class_name={cls!r}); expected ours, WanModel or WanTransformer3DModel"
    )


def _resolve_config(config: str | Path | DiTConfig | None) -> DiTConfig:
    if isinstance(config, DiTConfig):
        return config
    if config is None:
        return preset("wan2.1-t2v-1.3b")
    path = Path(config)
    if path.is_dir():
        path = path / CONFIG
    if path.is_file():
        return config_from_json(json.loads(path.read_text()))
    return preset(str(config))


def load_dit(path: str | Path, device=None, dtype=None) -> WanDiT:
    """Any DiT folder (ours, original Wan, diffusers) as a WanDiT."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no model at {path}")
    if path.is_file():
        return load_generator(path).to(device=device, dtype=dtype)
    if not (path / CONFIG).exists():
        raise FileNotFoundError(f"{path} has no {CONFIG}")
    raw = json.loads((path / CONFIG).read_text())
    cfg = config_from_json(raw)
    if raw.get("format") == "diagvid":
        sd = _read_safetensors(path / WEIGHTS)
    elif raw.get("_class_name") == "WanTransformer3DModel":
        sd = rename(_read_sharded(path, WAN_WEIGHTS, WAN_INDEX), FROM_DIFFUSERS)
    else:
        sd = _read_sharded(path, WAN_WEIGHTS, WAN_INDEX)
    return build(sd, cfg, str(path)).to(device=device, dtype=dtype)


def load_generator(
    path: str | Path, config: str | Path | DiTConfig | None = None, ema: bool = True, lora_scale: float = 1.0
) -> WanDiT:
    """A distilled causal generator checkpoint (Self-Forcing, CausVid, LongLive, DD, or a raw state dict).

    Picks `generator_ema` when `ema` and present, else `generator`, else `model`, else the dict itself;
    strips wrapper prefixes and merges LoRA. These files carry no architecture: `config` names a preset,
    a config.json / model folder, or a DiTConfig (default: Wan2.1-T2V-1.3B).
    """
    path = Path(path)
    if path.is_dir():
        return load_dit(path)
    cfg = _resolve_config(config)  # a bad preset name fails before the (possibly large) file is read
    blob = read_file(path)
    sd = blob
    for key in (("generator_ema", "generator") if ema else ("generator", "generator_ema")) + (
        "model",
        "state_dict",
    ):
        if isinstance(blob, dict) and key in blob and isinstance(blob[key], dict):
            sd = blob[key]
            break
    if not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} holds no tensor state dict (top-level keys: {sorted(blob)[:8]})")
    sd = merge_lora(strip_prefixes(sd), lora_scale)
    if any(k.startswith("condition_embedder.") for k in sd):
        sd = rename(sd, FROM_DIFFUSERS)
    return build(sd, cfg, str(path))


# ----- writing -------------------------------------------------------------------------------------------


def _atomic_save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _atomic_write_text(text: str, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def save_dit(model: WanDiT, folder: str | Path, kind: str = "dit") -> Path:
    """Our format: `model.safetensors` + `config.json`, each written atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_save_file(model.state_dict(), folder / WEIGHTS, {"format": "diagvid"})
    _atomic_write_text(
        json.dumps({"format": "diagvid", "kind": kind, **model.cfg.to_dict()}, indent=2), folder / CONFIG
    )
    return folder


def save_wan(model: WanDiT, folder: str | Path, shards: int = 1) -> Path:
    """The original Wan2.1 layout (optionally sharded with an index)."""
    cfg = model.cfg
    raw = {
        "_class_name": "WanModel",
        "model_type": "t2v",
        "dim": cfg.dim,
        "ffn_dim": cfg.ffn_dim,
        "freq_dim": cfg.freq_dim,
        "in_dim": cfg.in_dim,
        "out_dim": cfg.out_dim,
        "num_heads": cfg.num_heads,
        "num_layers": cfg.num_layers,
        "text_len": cfg.text_len,
        "text_dim": cfg.text_dim,
        "eps": cfg.eps,
        "patch_size": list(cfg.patch_size),
    }
    return _save_layout(model.state_dict(), raw, Path(folder), shards)


def save_diffusers(model: WanDiT, folder: str | Path, shards: int = 1) -> Path:
    """The diffusers `WanTransformer3DModel` save_pretrained layout."""
    cfg = model.cfg
    raw = {
        "_class_name": "WanTransformer3DModel",
        "patch_size": list(cfg.patch_size),
        "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.head_dim,
        "in_channels": cfg.in_dim,
        "out_channels": cfg.out_dim,
        "text_dim": cfg.text_dim,
        "freq_dim": cfg.freq_dim,
        "ffn_dim": cfg.ffn_dim,
        "num_layers": cfg.num_layers,
        "cross_attn_norm": cfg.cross_attn_norm,
        "qk_norm": "rms_norm_across_heads",
        "eps": cfg.eps,
        "rope_max_seq_len": 1024,
    }
    return _save_layout(rename(model.state_dict(), TO_DIFFUSERS), raw, Path(folder), shards)


def _save_layout(sd: dict[str, torch.Tensor], raw: dict, folder: Path, shards: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(json.dumps(raw, indent=2), folder / CONFIG)
    if shards == 1:
        _atomic_save_file(sd, folder / WAN_WEIGHTS)
        return folder
    keys = sorted(sd)
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        _atomic_save_file({k: sd[k] for k in part}, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    _atomic_write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2), folder / WAN_INDEX)
    return folder


def convert(
    src: str | Path, dst: str | Path, *, to: str = "diagvid", config: str | None = None, ema: bool = True
) -> Path:
    """Read any supported checkpoint and write it as `to` ("diagvid", "wan" or "diffusers")."""
    writers = {"diagvid": save_dit, "wan": save_wan, "diffusers": save_diffusers}
    if to not in writers:
        raise ValueError(f"to={to!r}; allowed: {sorted(writers)}")
    src = Path(src)
    model = load_dit(src) if src.is_dir() else load_generator(src, config=config, ema=ema)
    return writers[to](model, dst)
