"""DiT checkpoints on disk: our folder, original Wan2.1, diffusers, and distillation generator files.

Layouts read (each detected from the path, see `read_checkpoint`):

- ours:       folder with `model.safetensors` + `config.json` ({"format": "diagvid", "kind": ..., DiTConfig}, and
              for a noise expert "noise_range": [lo, hi], the levels it was trained at).
- original:   Wan2.1 release folder, `config.json` (`_class_name` WanModel) + `diffusion_pytorch_model.safetensors`,
              or shards listed by `diffusion_pytorch_model.safetensors.index.json`.
- diffusers:  `WanTransformer3DModel.save_pretrained` folder (same file names, diffusers key names).
- generator:  a `.pt`/`.pth`/`.safetensors` file of Self-Forcing, CausVid, LongLive or Diagonal Distillation:
              a dict with `generator_ema` / `generator` / `model`, or a bare state dict; wrapper prefixes
              (`model.`, `_fsdp_wrapped_module.`, ...) and peft LoRA pairs are folded away. Such files carry
              no architecture, so it comes from `config=` (default: Wan2.1-T2V-1.3B).

Our parameter names are the original Wan names, so only diffusers needs renaming: one table below, used in
both directions. Pickles are opened only by `torch.load(weights_only=True)`, which rebuilds tensors and plain
containers and refuses everything else; nothing in a checkpoint is ever executed.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from diagvid.fileperm import replace_atomically, write_json
from diagvid.model.dit import PRESETS, DiTConfig, WanDiT, preset

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
ConfigLike = DiTConfig | str | os.PathLike | None

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
WAN_FILE = "diffusion_pytorch_model.safetensors"
WAN_INDEX = "diffusion_pytorch_model.safetensors.index.json"
DEFAULT_PRESET = "wan2.1-t2v-1.3b"
LAYOUTS = ("diagvid", "wan", "diffusers")
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")

# ----- key tables --------------------------------------------------------------------------------------------

# Original Wan name -> diffusers WanTransformer3DModel name. A name ending in "." renames a prefix, any other
# name is a whole key; "*" is a block index. Both directions are compiled from this one table, so they cannot
# drift apart. Keys no row matches (`patch_embedding.*`) are the same in both.
DIFFUSERS_NAMES: list[tuple[str, str]] = [
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    ("head.modulation", "scale_shift_table"),
    ("head.head.", "proj_out."),
    ("blocks.*.modulation", "blocks.*.scale_shift_table"),
    ("blocks.*.self_attn.q.", "blocks.*.attn1.to_q."),
    ("blocks.*.self_attn.k.", "blocks.*.attn1.to_k."),
    ("blocks.*.self_attn.v.", "blocks.*.attn1.to_v."),
    ("blocks.*.self_attn.o.", "blocks.*.attn1.to_out.0."),
    ("blocks.*.self_attn.norm_q.", "blocks.*.attn1.norm_q."),
    ("blocks.*.self_attn.norm_k.", "blocks.*.attn1.norm_k."),
    ("blocks.*.cross_attn.q.", "blocks.*.attn2.to_q."),
    ("blocks.*.cross_attn.k.", "blocks.*.attn2.to_k."),
    ("blocks.*.cross_attn.v.", "blocks.*.attn2.to_v."),
    ("blocks.*.cross_attn.o.", "blocks.*.attn2.to_out.0."),
    ("blocks.*.cross_attn.norm_q.", "blocks.*.attn2.norm_q."),
    ("blocks.*.cross_attn.norm_k.", "blocks.*.attn2.norm_k."),
    # Wan's norm3 is the affine LayerNorm before cross-attention; diffusers calls it norm2 (and its
    # parameter-free FFN norm norm3), so the names swap. Only the affine one has keys.
    ("blocks.*.norm3.", "blocks.*.norm2."),
    ("blocks.*.ffn.0.", "blocks.*.ffn.net.0.proj."),
    ("blocks.*.ffn.2.", "blocks.*.ffn.net.2."),
]

# Segments that training wrappers insert into parameter names: FSDP1, activation checkpointing, torch.compile.
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
# Leading prefixes: the distillation repos' wrapper module (`model.`), DDP (`module.`), peft (`base_model.model.`).
WRAPPER_PREFIXES = ("base_model.model.", "module.", "model.")
# Entries of a generator checkpoint that may hold the generator, in order of preference.
GENERATOR_ENTRIES = ("generator_ema", "generator", "model", "state_dict")


def _compile(table: list[tuple[str, str]], reverse: bool) -> list[tuple[re.Pattern[str], str]]:
    rules = []
    for ours, theirs in table:
        src, dst = (theirs, ours) if reverse else (ours, theirs)
        pattern = "^" + re.escape(src).replace(r"\*", r"(\d+)") + ("" if src.endswith(".") else "$")
        rules.append((re.compile(pattern), dst.replace("*", r"\1")))
    return rules


_TO_DIFFUSERS = _compile(DIFFUSERS_NAMES, reverse=False)
_FROM_DIFFUSERS = _compile(DIFFUSERS_NAMES, reverse=True)


def _rename(sd: StateDict, rules: list[tuple[re.Pattern[str], str]]) -> StateDict:
    out: StateDict = {}
    for key, value in sd.items():
        new = key
        for pattern, repl in rules:
            new, hits = pattern.subn(repl, key, count=1)
            if hits:
                break
        if new in out:
            raise ValueError(f"two keys map to {new!r} (one of them is {key!r}); mixed naming schemes?")
        out[new] = value
    return out


def rename_keys(sd: StateDict, table: list[tuple[str, str]], reverse: bool = False) -> StateDict:
    """Rename keys by a table of (left name, right name) rows written like `DIFFUSERS_NAMES` ("." ends a
    prefix, "*" is a block index); left to right, or right to left with `reverse`. Unmatched keys stay."""
    return _rename(sd, _compile(table, reverse))


def to_diffusers_names(sd: StateDict) -> StateDict:
    """Rename a state dict from original Wan names (ours) to diffusers `WanTransformer3DModel` names."""
    return _rename(sd, _TO_DIFFUSERS)


def from_diffusers_names(sd: StateDict) -> StateDict:
    """Rename a state dict from diffusers `WanTransformer3DModel` names to original Wan names (ours)."""
    return _rename(sd, _FROM_DIFFUSERS)


def _has_diffusers_names(sd: StateDict) -> bool:
    return any(k.startswith(("condition_embedder.", "proj_out.", "scale_shift_table")) for k in sd)


# ----- configs -----------------------------------------------------------------------------------------------


def config_from_wan(raw: dict) -> DiTConfig:
    """DiTConfig of an original Wan `config.json` (`_class_name` WanModel, text-to-video only)."""
    if raw.get("model_type", "t2v") != "t2v":
        raise ValueError(f"Wan model_type={raw['model_type']!r} is not supported; only 't2v' is")
    if not raw.get("qk_norm", True) or tuple(raw.get("window_size", (-1, -1))) != (-1, -1):
        raise ValueError("Wan configs with qk_norm=False or a local window_size are not supported")
    lacking = [k for k in ("dim", "ffn_dim", "num_heads", "num_layers") if k not in raw]
    if lacking:
        raise ValueError(f"Wan config lacks {lacking}")
    return DiTConfig(
        dim=raw["dim"],
        ffn_dim=raw["ffn_dim"],
        num_heads=raw["num_heads"],
        num_layers=raw["num_layers"],
        freq_dim=raw.get("freq_dim", 256),
        text_dim=raw.get("text_dim", 4096),  # umT5-XXL; the released configs do not write it
        text_len=raw.get("text_len", 512),
        in_dim=raw.get("in_dim", 16),
        out_dim=raw.get("out_dim", 16),
        patch_size=tuple(raw.get("patch_size", (1, 2, 2))),
        eps=raw.get("eps", 1e-6),
        cross_attn_norm=raw.get("cross_attn_norm", True),
    )


def config_from_diffusers(raw: dict) -> DiTConfig:
    """DiTConfig of a diffusers `WanTransformer3DModel` config.json (Wan2.1 text-to-video only).

    diffusers configs carry no text length; it is set to 512, the umT5 length Wan pads prompts to (the model
    itself accepts any number of text tokens).
    """
    if raw.get("image_dim") or raw.get("added_kv_proj_dim"):
        raise ValueError(
            "image-to-video Wan transformers (image_dim / added_kv_proj_dim set) are not supported"
        )
    if raw.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
        raise ValueError(f"qk_norm={raw['qk_norm']!r} is not supported; only 'rms_norm_across_heads' is")
    heads = raw.get("num_attention_heads", 40)
    in_dim = raw.get("in_channels", 16)
    return DiTConfig(
        dim=heads * raw.get("attention_head_dim", 128),
        ffn_dim=raw.get("ffn_dim", 13824),
        num_heads=heads,
        num_layers=raw.get("num_layers", 40),
        freq_dim=raw.get("freq_dim", 256),
        text_dim=raw.get("text_dim", 4096),
        text_len=512,
        in_dim=in_dim,
        out_dim=raw.get("out_channels") or in_dim,
        patch_size=tuple(raw.get("patch_size", (1, 2, 2))),
        eps=raw.get("eps", 1e-6),
        cross_attn_norm=raw.get("cross_attn_norm", True),
    )


def wan_config(cfg: DiTConfig) -> dict:
    """An original Wan `config.json` for `cfg`."""
    return {
        "_class_name": "WanModel",
        "model_type": "t2v",
        "dim": cfg.dim,
        "ffn_dim": cfg.ffn_dim,
        "freq_dim": cfg.freq_dim,
        "text_dim": cfg.text_dim,
        "text_len": cfg.text_len,
        "in_dim": cfg.in_dim,
        "out_dim": cfg.out_dim,
        "num_heads": cfg.num_heads,
        "num_layers": cfg.num_layers,
        "patch_size": list(cfg.patch_size),
        "eps": cfg.eps,
        "cross_attn_norm": cfg.cross_attn_norm,
    }


def diffusers_config(cfg: DiTConfig) -> dict:
    """A diffusers `WanTransformer3DModel` config.json for `cfg` (diffusers fixes RoPE theta at 10000)."""
    if cfg.rope_theta != 10000.0:
        raise ValueError(
            f"rope_theta={cfg.rope_theta} cannot be written for diffusers, which fixes it at 10000"
        )
    return {
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
        "image_dim": None,
        "added_kv_proj_dim": None,
        "rope_max_seq_len": 1024,
        "pos_embed_seq_len": None,
    }


def _layout_of(raw: dict, path: Path) -> str:
    if raw.get("format") == "diagvid":
        return "diagvid"
    if raw.get("_class_name") == "WanModel":
        return "wan"
    if raw.get("_class_name") == "WanTransformer3DModel":
        return "diffusers"
    raise ValueError(
        f"{path}: unrecognised config (format={raw.get('format')!r}, _class_name={raw.get('_class_name')!r}); "
        "expected one of ours, an original Wan2.1 config (WanModel) or a diffusers WanTransformer3DModel"
    )


def _config_of(raw: dict, layout: str) -> DiTConfig:
    if layout == "diagvid":
        return DiTConfig.from_dict({k: v for k, v in raw.items() if k not in ("format", "kind", NOISE_RANGE)})
    return config_from_wan(raw) if layout == "wan" else config_from_diffusers(raw)


# The noise levels a model was trained at, when not all of [0, 1] (a noise expert, Wan2.2's split): a record
# in our folders' config.json beside "format" and "kind", not part of the architecture.
NOISE_RANGE = "noise_range"
FULL_RANGE = (0.0, 1.0)


def check_noise_range(value: object, source: str | Path) -> tuple[float, float]:
    """`value` as (lo, hi) with 0 <= lo < hi <= 1, or a ValueError naming `source`."""
    ok = isinstance(value, (list, tuple)) and len(value) == 2
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if not ok or not 0.0 <= value[0] < value[1] <= 1.0:
        raise ValueError(f"{source}: {NOISE_RANGE}={value!r} must be two noise levels lo < hi in [0, 1]")
    return float(value[0]), float(value[1])


def read_noise_range(path: str | Path) -> tuple[float, float]:
    """The noise levels the model at `path` was trained at: its folder's record, else all of [0, 1] (any
    model without one: Wan's, diffusers', a generator file, or ours trained over every level)."""
    folder = _model_folder(Path(path))  # as `read_checkpoint` reads it (never a stray file's neighbour)
    if not (folder / CONFIG_FILE).is_file():
        return FULL_RANGE
    raw = _read_json(folder / CONFIG_FILE)
    if raw.get("format") != "diagvid" or NOISE_RANGE not in raw:
        return FULL_RANGE
    return check_noise_range(raw[NOISE_RANGE], folder / CONFIG_FILE)


def _read_json(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a readable JSON file: {err}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{path} holds a JSON {type(raw).__name__}, not an object")
    return raw


def resolve_config(config: ConfigLike) -> DiTConfig:
    """An architecture from a DiTConfig, a preset name, a config.json (any layout) or a folder holding one."""
    if isinstance(config, DiTConfig):
        return config
    if config is None:
        return preset(DEFAULT_PRESET)
    if str(config) in PRESETS:
        return preset(str(config))
    path = Path(config)
    if path.is_dir():
        path = path / CONFIG_FILE
    if path.is_file():
        raw = _read_json(path)
        return _config_of(raw, _layout_of(raw, path))
    raise ValueError(
        f"config={str(config)!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json or a folder with one"
    )


def describe(cfg: DiTConfig) -> str:
    """A short name for an architecture: its preset (if any) and its main sizes."""
    sizes = (
        f"dim {cfg.dim}, {cfg.num_layers} layers, {cfg.num_heads} heads, ffn {cfg.ffn_dim}, "
        f"in/out {cfg.in_dim}/{cfg.out_dim}, text {cfg.text_dim}"
    )
    # text_len does not change a single weight, so it does not decide the preset
    ours = {k: v for k, v in cfg.to_dict().items() if k != "text_len"}
    for name, p in PRESETS.items():
        if {k: v for k, v in p.to_dict().items() if k != "text_len"} == ours:
            return f"preset '{name}' ({sizes})"
    return f"({sizes})"


# ----- strict check ------------------------------------------------------------------------------------------


def expected_shapes(cfg: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a WanDiT of `cfg` holds (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = WanDiT(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_state_dict(sd: StateDict, cfg: DiTConfig, source: str | Path, hint: str = "") -> None:
    """Raise one ValueError naming a few missing, unexpected and mis-shaped keys, unless `sd` fits `cfg`."""
    want = expected_shapes(cfg)
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    misshaped = [k for k in want if k in sd and tuple(sd[k].shape) != want[k]]
    if not (missing or unexpected or misshaped):
        return

    def few(items: list[str], show: Callable[[str], str]) -> str:
        more = f", ... {len(items) - 5} more" if len(items) > 5 else ""
        return ", ".join(show(k) for k in items[:5]) + more

    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({few(missing, lambda k: f'{k} {list(want[k])}')})")
    if unexpected:
        problems.append(
            f"{len(unexpected)} unexpected ({few(unexpected, lambda k: f'{k} {list(sd[k].shape)}')})"
        )
    if misshaped:
        shapes = few(misshaped, lambda k: f"{k}: expected {list(want[k])}, found {list(sd[k].shape)}")
        problems.append(f"{len(misshaped)} with the wrong shape ({shapes})")
    raise ValueError(f"{source} does not fit the architecture {describe(cfg)}: {'; '.join(problems)}{hint}")


# ----- reading files -----------------------------------------------------------------------------------------


def _sniff(path: Path) -> str:
    """What the bytes of a file look like: 'zip' (torch.save), 'pickle', 'safetensors' or 'unknown'."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == b"\x80":
        return "pickle"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    return "unknown"


def read_safetensors(path: str | Path) -> StateDict:
    """All tensors of a safetensors file, with a clear error for a missing, truncated or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        kind = _sniff(path)
        if kind in ("zip", "pickle"):
            why = "it is a pickle (torch.save) file; name it .pt to have it read with weights_only=True"
        else:
            why = f"truncated or corrupt ({err})"
        raise ValueError(f"{path} is not a valid safetensors file: {why}") from err


def read_pickle(path: str | Path, *, mmap: bool = False) -> object:
    """A torch.save file opened with weights_only=True: tensors and plain containers only, no code runs.

    `mmap`: map the tensors from the file instead of reading them into memory (zip-format files; older
    pickles are read whole).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    kind = _sniff(path)
    if kind == "safetensors":
        raise ValueError(f"{path} is a safetensors file; name it .safetensors")
    if kind == "unknown":
        raise ValueError(f"{path} is not a readable torch checkpoint: neither a torch.save zip nor a pickle")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and kind == "zip")
    except Exception as err:  # weights_only refusals and damaged archives raise several types
        text = str(err)
        refused = [line.strip() for line in text.splitlines() if "GLOBAL" in line or "Unsupported" in line]
        if isinstance(err, pickle.UnpicklingError) and refused:
            raise ValueError(
                f"{path} was refused: it needs arbitrary objects unpickled ({refused[0]}), and diagvid reads "
                "pickles with weights_only=True only. Re-save its tensors as safetensors from a trusted copy."
            ) from err
        raise ValueError(
            f"{path} is not a readable torch checkpoint (truncated or corrupt?): {text[:300]}"
        ) from err


def read_tensor_pickle(path: str | Path) -> StateDict:
    """A .pth file holding one flat name -> tensor dict (Wan's released VAE and umT5 files), memory-mapped
    and opened with weights_only=True; anything else is a ValueError naming the file."""
    obj = read_pickle(path, mmap=True)
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a dict of tensors")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(
            f"{path} is not a flat state dict: {len(bad)} entries are not name -> tensor "
            f"(e.g. {', '.join(map(repr, bad[:3]))})"
        )
    return obj


def _read_file(path: Path) -> tuple[object, dict[str, str]]:
    """(contents, safetensors metadata) of one checkpoint file, chosen by its suffix."""
    if path.suffix == ".safetensors":
        sd = read_safetensors(path)
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return sd, meta
    if path.suffix in PICKLE_SUFFIXES:
        return read_pickle(path), {}
    raise ValueError(
        f"{path}: unknown checkpoint suffix {path.suffix!r}; expected .safetensors or one of {PICKLE_SUFFIXES}"
    )


def _read_weights_folder(folder: Path) -> tuple[StateDict, str]:
    """The tensors of an original-Wan or diffusers folder: one file, or shards listed by an index."""
    single, index = folder / WAN_FILE, folder / WAN_INDEX
    if single.is_file() and index.is_file():
        raise ValueError(f"{folder} holds both {WAN_FILE} and {WAN_INDEX}; remove the stale one")
    if single.is_file():
        return read_safetensors(single), WAN_FILE
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no weight_map")
        sd: StateDict = {}
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if Path(shard).name != shard:
                raise ValueError(f"{index} names shard {shard!r} outside its folder")
            sd.update(read_safetensors(folder / shard))
        lost = [k for k in weight_map if k not in sd]
        if lost:
            raise ValueError(
                f"{index} lists {len(lost)} tensors its shards lack (e.g. {', '.join(lost[:5])})"
            )
        return sd, f"{len(shards)} shards"
    raise FileNotFoundError(f"{folder} has a config.json but neither {WAN_FILE} nor {WAN_INDEX}")


def strip_wrappers(sd: StateDict) -> StateDict:
    """Drop training-wrapper parts of keys (leading `model.`/`module.`/`base_model.model.`, inner FSDP ones)."""
    out: StateDict = {}
    for key, value in sd.items():
        new = key
        for seg in WRAPPER_SEGMENTS:
            new = new.replace(seg, "")
        stripped = True
        while stripped:
            stripped = False
            for prefix in WRAPPER_PREFIXES:
                if new.startswith(prefix):
                    new, stripped = new[len(prefix) :], True
        if new in out:
            raise ValueError(
                f"keys {key!r} and another both become {new!r} once wrapper prefixes are removed"
            )
        out[new] = value
    return out


_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def merge_lora(sd: StateDict, scale: float = 1.0) -> tuple[StateDict, int]:
    """Fold peft-style LoRA pairs into their base linears: W = W0 + scale * B @ A. Returns (sd, pairs merged).

    Accepts `X.lora_A.weight` / `X.lora_A.<adapter>.weight` and bases stored as `X.weight` or wrapped as
    `X.base_layer.{weight,bias}`. peft does not store alpha, so `scale` (= alpha / rank) is an argument; the
    LongLive and DD-S configs use rank 256 with alpha 256, hence the default 1.0.
    """
    out: StateDict = {}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        m = _LORA.match(key)
        if m:
            ab = pairs.setdefault(m["module"].replace(".base_layer", ""), {})
            if m["ab"] in ab:
                raise ValueError(f"more than one LoRA adapter for {m['module']!r}; merge them first")
            ab[m["ab"]] = value
        else:
            out[key.replace(".base_layer.", ".")] = value
    for module, ab in pairs.items():
        target = f"{module}.weight"
        if set(ab) != {"A", "B"}:
            raise ValueError(f"LoRA of {module!r} has lora_{next(iter(ab))} but not its partner")
        if target not in out:
            raise ValueError(f"LoRA of {module!r} has no base weight {target!r} to merge into")
        w, a, b = out[target], ab["A"], ab["B"]
        if w.ndim != 2 or a.shape[0] != b.shape[1] or (b.shape[0], a.shape[1]) != tuple(w.shape):
            raise ValueError(
                f"LoRA of {module!r} does not fit: A {list(a.shape)}, B {list(b.shape)}, base {list(w.shape)}"
            )
        # merge in fp32: bf16 products of rank-256 factors lose more than the LoRA delta is worth
        out[target] = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
    return out, len(pairs)


@dataclass
class _Checkpoint:
    """What a reader found: tensors in our names, the architecture, and how they were obtained."""

    state_dict: StateDict
    config: DiTConfig
    source: Path
    notes: list[str] = field(default_factory=list)
    kind: str = "dit"
    has_own_config: bool = False


def _pick_generator(obj: object, ema: bool, path: Path, notes: list[str]) -> dict:
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a dict of tensors")
    order = GENERATOR_ENTRIES if ema else ("generator", "generator_ema", "model", "state_dict")
    for entry in order:
        if isinstance(obj.get(entry), dict):
            if entry == "generator_ema" and not ema:
                notes.append("no 'generator' entry, so 'generator_ema' was used despite ema=False")
            others = sorted(k for k in obj if k != entry)
            notes.append(f"entry '{entry}'" + (f" (left aside: {', '.join(others)})" if others else ""))
            return obj[entry]
    return obj


def _flat_entries(sd: StateDict) -> dict:
    """A flat safetensors file that stores `generator_ema.<key>` / `generator.<key>` groups, as nested dicts."""
    groups: dict = {}
    for key, value in sd.items():
        head, _, rest = key.partition(".")
        if head in ("generator", "generator_ema", "critic", "generator_lora") and rest:
            groups.setdefault(head, {})[rest] = value
        else:
            return sd
    return groups


def _read_generator_file(
    path: Path, config: ConfigLike, ema: bool, lora: str | Path | None, lora_scale: float
) -> _Checkpoint:
    obj, meta = _read_file(path)
    notes: list[str] = []
    if isinstance(obj, dict) and path.suffix == ".safetensors":
        obj = _flat_entries(obj)
    lora_sd = obj.get("generator_lora") if isinstance(obj, dict) else None
    sd = _pick_generator(obj, ema, path, notes)
    bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        top = sorted(str(k) for k in obj)[:8] if isinstance(obj, dict) else []
        raise ValueError(
            f"{path}: entry {bad[0]!r} is not a tensor; expected a state dict or a dict with "
            f"{' / '.join(GENERATOR_ENTRIES)} (top-level keys: {top})"
        )
    if lora is not None:
        extra = _read_file(Path(lora))[0]
        lora_sd = extra.get("generator_lora", extra) if isinstance(extra, dict) else None
        notes.append(f"LoRA file {lora}")
    sd = strip_wrappers(sd)
    if lora_sd is not None:
        if not isinstance(lora_sd, dict) or not all(isinstance(k, str) and _LORA.match(k) for k in lora_sd):
            raise ValueError(f"{lora or path}: the LoRA entry must hold only lora_A / lora_B weights")
        sd = {**sd, **strip_wrappers(lora_sd)}  # no clash: every LoRA key names lora_A or lora_B
    sd, merged = merge_lora(sd, lora_scale)
    if merged:
        notes.append(f"{merged} LoRA pairs merged at scale {lora_scale}")
    if _has_diffusers_names(sd):
        sd = from_diffusers_names(sd)
        notes.append("diffusers names mapped to Wan names")

    own = meta.get("format") == "diagvid" and "config" in meta
    if own:
        cfg = DiTConfig.from_dict(json.loads(meta["config"]))
        _agree(cfg, config, path)
        notes.append("architecture from the file's metadata")
    else:
        cfg = resolve_config(config)
        notes.append(f"architecture from config={config!r}" if config is not None else "default architecture")
    return _Checkpoint(sd, cfg, path, notes, meta.get("kind", "generator"), own)


def _agree(cfg: DiTConfig, config: ConfigLike, path: Path) -> None:
    """A checkpoint that states its own architecture must not contradict an explicit `config`."""
    if config is None:
        return
    asked = resolve_config(config)
    if {**asked.to_dict(), "text_len": 0} != {**cfg.to_dict(), "text_len": 0}:
        raise ValueError(f"{path} is {describe(cfg)}, but config={config!r} asks for {describe(asked)}")


def _read_folder(folder: Path, config: ConfigLike) -> _Checkpoint:
    if not (folder / CONFIG_FILE).is_file() and (folder / "transformer" / CONFIG_FILE).is_file():
        folder = folder / "transformer"  # a whole diffusers pipeline: its DiT
    if not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(
            f"{folder} has no {CONFIG_FILE}; expected a folder of ours, an original Wan2.1 or a diffusers one"
        )
    raw = _read_json(folder / CONFIG_FILE)
    layout = _layout_of(raw, folder / CONFIG_FILE)
    cfg = _config_of(raw, layout)
    _agree(cfg, config, folder)
    if layout == "diagvid":
        sd = read_safetensors(folder / WEIGHTS_FILE)
        return _Checkpoint(sd, cfg, folder, ["our folder"], raw.get("kind", "dit"), True)
    sd, files = _read_weights_folder(folder)
    if layout == "diffusers":
        return _Checkpoint(
            from_diffusers_names(sd), cfg, folder, [f"diffusers folder ({files})"], "dit", True
        )
    return _Checkpoint(sd, cfg, folder, [f"original Wan2.1 folder ({files})"], "dit", True)


def _model_folder(path: Path) -> Path:
    """The folder whose weights file `path` is, when that folder describes itself (has a config.json): such a
    file is read with its folder's config; any other path is itself."""
    if path.is_file() and path.name in (WEIGHTS_FILE, WAN_FILE) and (path.parent / CONFIG_FILE).is_file():
        return path.parent
    return path


def _read(
    path: str | Path,
    config: ConfigLike = None,
    *,
    ema: bool = True,
    lora: str | Path | None = None,
    lora_scale: float = 1.0,
) -> _Checkpoint:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    path = _model_folder(path)
    if path.is_dir():
        if lora is not None:
            raise ValueError(f"lora= applies to generator checkpoint files, not to the folder {path}")
        ckpt = _read_folder(path, config)
    else:
        ckpt = _read_generator_file(path, config, ema, lora, lora_scale)
    hint = "" if ckpt.has_own_config else "; pass the right architecture with config= (CLI: --config)"
    check_state_dict(ckpt.state_dict, ckpt.config, path, hint)
    for note in ckpt.notes:
        log.info("%s: %s", path, note)
    return ckpt


def read_checkpoint(
    path: str | Path,
    config: ConfigLike = None,
    *,
    ema: bool = True,
    lora: str | Path | None = None,
    lora_scale: float = 1.0,
) -> tuple[StateDict, DiTConfig]:
    """(state dict in our names, architecture) of any supported checkpoint, checked strictly.

    Args:
        path: a folder (ours, original Wan2.1, diffusers, or a diffusers pipeline with `transformer/`) or a
            generator file (.pt/.pth/.bin/.ckpt read with weights_only=True, or .safetensors).
        config: architecture of files that carry none: preset name, config.json / folder, or DiTConfig
            (default: the Wan2.1-T2V-1.3B preset). A self-describing checkpoint must agree with it.
        ema: take `generator_ema` over `generator` when both are present.
        lora / lora_scale: a separate LoRA file (a peft state dict, or one under `generator_lora`), and the
            alpha / rank factor LoRA pairs are merged with.
    """
    ckpt = _read(path, config, ema=ema, lora=lora, lora_scale=lora_scale)
    return ckpt.state_dict, ckpt.config


def _build(
    sd: StateDict, cfg: DiTConfig, device: torch.device | str | None, dtype: torch.dtype | None
) -> WanDiT:
    # built on meta and handed the loaded tensors: no random init of a model about to be overwritten
    with torch.device("meta"):
        model = WanDiT(cfg)
    model.load_state_dict(sd, assign=True)
    if dtype is None:
        dtypes = {v.dtype for v in sd.values() if v.is_floating_point()}
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    return model.to(device=device or "cpu", dtype=dtype).eval()


def load_dit(
    path: str | Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    *,
    config: ConfigLike = None,
) -> WanDiT:
    """A WanDiT (eval mode) from any supported folder or file; see `read_checkpoint`.

    `dtype` defaults to the stored precision when all floating tensors share one, float32 otherwise.
    """
    sd, cfg = read_checkpoint(path, config)
    return _build(sd, cfg, device, dtype)


def load_generator(
    path: str | Path,
    config: ConfigLike = None,
    *,
    ema: bool = True,
    lora: str | Path | None = None,
    lora_scale: float = 1.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> WanDiT:
    """A distilled generator (Self-Forcing, CausVid, LongLive, DD, or any layout of ours) as a WanDiT."""
    sd, cfg = read_checkpoint(path, config, ema=ema, lora=lora, lora_scale=lora_scale)
    return _build(sd, cfg, device, dtype)


# ----- writing -----------------------------------------------------------------------------------------------


def _write_tensors(sd: StateDict, path: Path, metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    replace_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _write_sharded(sd: StateDict, folder: Path, shards: int) -> None:
    if shards == 1:
        _write_tensors(sd, folder / WAN_FILE)
        (folder / WAN_INDEX).unlink(missing_ok=True)
        return
    # contiguous runs of keys in state-dict order, so a shard holds whole blocks as the releases do
    keys = list(sd)
    size = -(-len(keys) // shards)
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i * size : (i + 1) * size]
        _write_tensors({k: sd[k] for k in part}, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    total = sum(v.numel() * v.element_size() for v in sd.values())
    write_json({"metadata": {"total_size": total}, "weight_map": weight_map}, folder / WAN_INDEX)
    (folder / WAN_FILE).unlink(missing_ok=True)


def write_weights(
    sd: StateDict,
    cfg: DiTConfig,
    folder: str | Path,
    *,
    layout: str = "diagvid",
    kind: str = "dit",
    shards: int = 1,
    noise_range: tuple[float, float] = FULL_RANGE,
) -> Path:
    """Write a state dict in our names as `layout` ("diagvid", "wan" or "diffusers"); files are atomic.

    `noise_range`: the levels the model was trained at, recorded in our layout when not all of [0, 1], so
    that `pretrained.load_teacher` can warn when a noise expert is asked to denoise outside them.

    Weights are written before config.json, so a folder with a config.json never has stale weights beside a
    new config after a crash mid-write. `shards` > 1 splits wan/diffusers weights over files with an index.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}; allowed: {', '.join(LAYOUTS)}")
    if not 1 <= shards <= len(sd) or (shards > 1 and layout == "diagvid"):
        raise ValueError(
            f"shards={shards}: must be between 1 and the {len(sd)} tensors, and 1 for our layout"
        )
    check_state_dict(sd, cfg, "the state dict to write")
    for ours in ("first_frame_embedding", "position_grid", "motion_stem"):
        if getattr(cfg, ours) and layout != "diagvid":
            raise ValueError(
                f"layout={layout!r} has no place for {ours} (ours, not Wan's): write layout='diagvid'"
            )
    noise_range = check_noise_range(noise_range, "write_weights")
    if noise_range != FULL_RANGE and layout != "diagvid":
        raise ValueError(
            f"layout={layout!r} has no place for noise_range={noise_range} (a noise expert's record, ours): "
            "write layout='diagvid'"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "diagvid":
        config = {"format": "diagvid", "kind": kind, **cfg.to_dict()}
        if noise_range != FULL_RANGE:
            config[NOISE_RANGE] = list(noise_range)
        meta = {"format": "diagvid", "kind": kind, "config": json.dumps(cfg.to_dict())}
        _write_tensors(sd, folder / WEIGHTS_FILE, meta)
    elif layout == "wan":
        config = wan_config(cfg)
        _write_sharded(sd, folder, shards)
    else:
        config = diffusers_config(cfg)
        _write_sharded(to_diffusers_names(sd), folder, shards)
    write_json(config, folder / CONFIG_FILE)
    return folder


def save_dit(
    model: WanDiT, folder: str | Path, *, kind: str = "dit", noise_range: tuple[float, float] = FULL_RANGE
) -> Path:
    """Write a model in our layout: `model.safetensors` + `config.json`, each replaced atomically;
    `noise_range` as in `write_weights`."""
    return write_weights(
        model.state_dict(), model.cfg, folder, layout="diagvid", kind=kind, noise_range=noise_range
    )


def save_wan(model: WanDiT, folder: str | Path, *, shards: int = 1) -> Path:
    """Write a model in the original Wan2.1 layout (WanModel config.json, optionally sharded)."""
    return write_weights(model.state_dict(), model.cfg, folder, layout="wan", shards=shards)


def save_diffusers(model: WanDiT, folder: str | Path, *, shards: int = 1) -> Path:
    """Write a model as a diffusers `WanTransformer3DModel` folder (optionally sharded)."""
    return write_weights(model.state_dict(), model.cfg, folder, layout="diffusers", shards=shards)


STORAGE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
"""precisions a weight file can be written in, by the names the CLI takes"""


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    to: str = "diagvid",
    config: ConfigLike = None,
    ema: bool = True,
    lora: str | Path | None = None,
    lora_scale: float = 1.0,
    shards: int = 1,
    dtype: str | None = None,
) -> list[str]:
    """Read any supported checkpoint and write it as `to` ("diagvid", "wan" or "diffusers").

    Tensors keep their stored precision unless `dtype` ("fp32", "fp16", "bf16") casts the floating ones.
    Returns human-readable lines saying what was read and written.
    """
    if to not in LAYOUTS or (dtype is not None and dtype not in STORAGE_DTYPES):
        raise ValueError(
            f"to={to!r}, dtype={dtype!r}; allowed: to in {', '.join(LAYOUTS)}, dtype in {', '.join(STORAGE_DTYPES)}"
        )
    ckpt = _read(src, config, ema=ema, lora=lora, lora_scale=lora_scale)
    sd = ckpt.state_dict
    if dtype is not None:
        sd = {k: v.to(STORAGE_DTYPES[dtype]) if v.is_floating_point() else v for k, v in sd.items()}
    noise_range, dropped = read_noise_range(ckpt.source), []
    if to != "diagvid" and noise_range != FULL_RANGE:  # only our layout can hold the record
        dropped = [
            f"  its {NOISE_RANGE} {list(noise_range)} is not kept: the {to} layout has no place for it"
        ]
        noise_range = FULL_RANGE
    out = write_weights(
        sd, ckpt.config, dst, layout=to, kind=ckpt.kind, shards=shards, noise_range=noise_range
    )
    params = sum(v.numel() for v in ckpt.state_dict.values())
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in ckpt.state_dict.values()})
    return [
        *dropped,
        f"read {ckpt.source}: {'; '.join(ckpt.notes)}",
        f"  {len(ckpt.state_dict)} tensors, {params / 1e6:.2f} M parameters ({', '.join(dtypes)}), "
        f"{describe(ckpt.config)}",
        f"wrote {out} ({to} layout{f', {shards} shards' if shards > 1 else ''}"
        f"{f', as {dtype}' if dtype else ''})",
    ]
