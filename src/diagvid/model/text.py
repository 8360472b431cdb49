"""Text encoders with Wan's umT5 interface: prompts -> (embeddings [B, L, D], mask [B, L]).

L is the fixed text length (padding included). Embeddings past each prompt's true length (its tokens plus
the end-of-sequence token) are zero, which is how Wan hands text to the DiT. An empty prompt is the
unconditional input of classifier-free guidance: its only token is end-of-sequence, as with umT5 and "".

- `ToyTextEncoder`: a word-level tokenizer over a fixed vocabulary and a tiny umT5 encoder with seeded random
  weights. It is a frozen feature map: the DiT's text projection learns on top of it.
- `UMT5TextEncoder`: the real umT5 (Wan2.1: umT5-XXL, L = 512, D = 4096) from a local transformers folder, or
  from the original Wan release's `models_t5_umt5-xxl-enc-bf16.pth` (Wan's parameter names, see
  `ORIGINAL_NAMES`) with its tokenizer folder `google/umt5-xxl`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

from diagvid.model.vae import load_weights, misfit, read_folder_config, save_folder

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2; vocabulary words follow from id 3
WEIGHTS_FILE = "text.safetensors"
CONFIG_FILE = "text.json"
ORIGINAL_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
ORIGINAL_TOKENIZER = "google/umt5-xxl"

# The original Wan release's umT5 encoder names -> transformers' UMT5EncoderModel names (rows as in
# diagvid.model.weights: "." ends a prefix, "*" is a block index). Wan's gated feed-forward is
# fc2(fc1(x) * gelu(gate(x))), transformers' wo(wi_1(x) * gelu(wi_0(x))); each block has its own
# relative-position table in both.
ORIGINAL_NAMES: list[tuple[str, str]] = [
    ("token_embedding.", "shared."),
    ("norm.", "encoder.final_layer_norm."),
    ("blocks.*.norm1.", "encoder.block.*.layer.0.layer_norm."),
    ("blocks.*.attn.q.", "encoder.block.*.layer.0.SelfAttention.q."),
    ("blocks.*.attn.k.", "encoder.block.*.layer.0.SelfAttention.k."),
    ("blocks.*.attn.v.", "encoder.block.*.layer.0.SelfAttention.v."),
    ("blocks.*.attn.o.", "encoder.block.*.layer.0.SelfAttention.o."),
    ("blocks.*.pos_embedding.embedding.", "encoder.block.*.layer.0.SelfAttention.relative_attention_bias."),
    ("blocks.*.norm2.", "encoder.block.*.layer.1.layer_norm."),
    ("blocks.*.ffn.gate.0.", "encoder.block.*.layer.1.DenseReluDense.wi_0."),
    ("blocks.*.ffn.fc1.", "encoder.block.*.layer.1.DenseReluDense.wi_1."),
    ("blocks.*.ffn.fc2.", "encoder.block.*.layer.1.DenseReluDense.wo."),
]
_TIED = "encoder.embed_tokens.weight"  # transformers' second name of `shared.weight`

# a word: letters/digits, with inner hyphens or apostrophes kept ("up-left", "don't"); the rest is punctuation
_WORD = re.compile(r"\w+(?:['-]\w+)*")


def _pad(batch: list[list[int]], text_len: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> ids [B, L] padded with `pad_id`, and mask [B, L] (True on real tokens)."""
    ids = torch.full((len(batch), text_len), pad_id, dtype=torch.long)
    mask = torch.zeros(len(batch), text_len, dtype=torch.bool)
    for i, row in enumerate(batch):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = True
    return ids, mask


class TextEncoder(nn.Module):
    """Shared interface: tokenize prompts, run a frozen umT5 encoder, zero everything past each prompt."""

    model: UMT5EncoderModel
    text_len: int

    @property
    def dim(self) -> int:
        """Embedding width D."""
        return self.model.config.d_model

    @property
    def device(self) -> torch.device:
        """Where the weights are."""
        return next(self.model.parameters()).device

    def token_ids(self, prompt: str) -> list[int]:
        """Token ids of one prompt, end-of-sequence included, at most `text_len` of them."""
        raise NotImplementedError

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> ids [B, L] and mask [B, L] bool."""
        if isinstance(prompts, str) or not prompts:
            raise ValueError(f"prompts must be a non-empty list of strings; got {prompts!r}")
        return _pad([self.token_ids(p) for p in prompts], self.text_len, PAD_ID)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (embeddings [B, L, D] float32, zero past each prompt's length; mask [B, L] bool)."""
        ids, mask = self.tokenize(prompts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # [B, L, D]
        return hidden.float().masked_fill(~mask[..., None], 0.0), mask

    def encode_null(self, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The unconditional embedding (the empty prompt) for classifier-free guidance, `batch` times."""
        return self.encode([""] * batch)


@dataclass
class ToyTextConfig:
    """The toy encoder: a tiny umT5 and how its word-level tokenizer treats text."""

    d_model: int = 64
    """embedding width D (the DiT's text_dim)"""
    num_layers: int = 2
    """transformer layers"""
    num_heads: int = 2
    """attention heads (d_model must divide evenly)"""
    d_ff: int = 128
    """hidden width of the gated-GELU feed-forward"""
    text_len: int = 16
    """tokens L per prompt, end-of-sequence included (the DiT's text_len)"""
    relative_attention_num_buckets: int = 8
    """relative-position buckets (umT5-XXL uses 32 for 512 tokens; a few suffice for 16)"""
    relative_attention_max_distance: int = 16
    """distance beyond which positions share a bucket"""
    seed: int = 0
    """seed of the random weights"""
    unknown: str = "error"
    """a word outside the vocabulary: "error" raises, "unk" maps it to the <unk> id"""

    def __post_init__(self) -> None:
        if min(self.d_model, self.num_layers, self.num_heads, self.d_ff) < 1 or self.d_model % self.num_heads:
            raise ValueError(
                f"d_model={self.d_model}, num_layers={self.num_layers}, num_heads={self.num_heads}, "
                f"d_ff={self.d_ff} must be >= 1 with d_model divisible by num_heads"
            )
        if self.text_len < 2:
            raise ValueError(f"text_len={self.text_len} must be >= 2 (one word plus end-of-sequence)")
        if self.unknown not in ("error", "unk"):
            raise ValueError(f"unknown={self.unknown!r}; allowed: 'error', 'unk'")

    @classmethod
    def from_dict(cls, d: dict) -> ToyTextConfig:
        """Fields from a dict; unknown keys are an error."""
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(
                f"unknown ToyTextConfig keys {unknown}; allowed: {[f.name for f in fields(cls)]}"
            )
        return cls(**d)


class ToyTextEncoder(TextEncoder):
    """Word-level tokenizer over a fixed vocabulary + a tiny umT5 encoder with seeded random weights."""

    def __init__(self, vocabulary: Sequence[str], cfg: ToyTextConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or ToyTextConfig()
        words = list(vocabulary)
        if not words:
            raise ValueError("the vocabulary is empty; pass the words prompts may use")
        bad = [w for w in words if not isinstance(w, str) or w != w.lower() or not _WORD.fullmatch(w)]
        if bad:
            raise ValueError(
                f"vocabulary words must be single lower-case words like 'up-left'; bad: {bad[:5]}"
            )
        if len(set(words)) != len(words):
            raise ValueError(f"the vocabulary repeats {sorted({w for w in words if words.count(w) > 1})}")
        self.cfg = cfg
        self.words = words
        self.text_len = cfg.text_len
        self._ids = {w: i + len(SPECIAL_TOKENS) for i, w in enumerate(words)}
        umt5 = UMT5Config(
            vocab_size=len(words) + len(SPECIAL_TOKENS),
            d_model=cfg.d_model,
            d_kv=cfg.d_model // cfg.num_heads,
            d_ff=cfg.d_ff,
            num_layers=cfg.num_layers,
            num_heads=cfg.num_heads,
            relative_attention_num_buckets=cfg.relative_attention_num_buckets,
            relative_attention_max_distance=cfg.relative_attention_max_distance,
            dropout_rate=0.0,
            feed_forward_proj="gated-gelu",
            pad_token_id=PAD_ID,
            eos_token_id=EOS_ID,
            decoder_start_token_id=PAD_ID,
        )
        # the weights are a function of the seed alone, and building them leaves the caller's RNG untouched
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.model = UMT5EncoderModel(umt5)
        self.model.eval().requires_grad_(False)

    def token_ids(self, prompt: str) -> list[int]:
        """Lower-cased words of `prompt` (punctuation dropped) as ids, then end-of-sequence."""
        ids: list[int] = []
        for word in _WORD.findall(prompt.lower()):
            if word in self._ids:
                ids.append(self._ids[word])
            elif "-" in word and all(part in self._ids for part in word.split("-")):
                # "up-left" in a vocabulary that has only "up" and "left"
                ids.extend(self._ids[part] for part in word.split("-"))
            elif self.cfg.unknown == "unk":
                ids.append(UNK_ID)
            else:
                shown = ", ".join(self.words[:20]) + (", ..." if len(self.words) > 20 else "")
                raise ValueError(
                    f"unknown word {word!r} in prompt {prompt!r}; the toy text encoder knows {len(self.words)} "
                    f"words ({shown}); rephrase, or build it with unknown='unk' to map such words to <unk>"
                )
        ids.append(EOS_ID)
        if len(ids) > self.text_len:
            raise ValueError(
                f"prompt {prompt!r} has {len(ids) - 1} words; text_len={self.text_len} fits {self.text_len - 1} "
                "(plus end-of-sequence)"
            )
        return ids

    def save(self, folder: str | Path) -> Path:
        """Write `text.safetensors` and `text.json` (config + vocabulary) into `folder`."""
        meta = {"config": asdict(self.cfg), "vocabulary": self.words}
        return save_folder(self.model, meta, folder, CONFIG_FILE, WEIGHTS_FILE)

    @classmethod
    def load(cls, folder: str | Path) -> ToyTextEncoder:
        """An encoder written by `save`, on the CPU."""
        folder = Path(folder)
        meta_path = folder / CONFIG_FILE
        meta = read_folder_config(folder, CONFIG_FILE, WEIGHTS_FILE, "toy text encoder")
        if set(meta) != {"config", "vocabulary"}:
            raise ValueError(f"{meta_path} must hold exactly 'config' and 'vocabulary'; has {sorted(meta)}")
        enc = cls(meta["vocabulary"], ToyTextConfig.from_dict(meta["config"]))
        expected = f"{enc.cfg} with {len(enc.words)} vocabulary words"
        load_weights(enc.model, folder / WEIGHTS_FILE, expected)
        return enc


class UMT5TextEncoder(TextEncoder):
    """umT5 (Wan2.1: umT5-XXL) from local files, no network: `encoder_path` is a transformers encoder folder,
    or the original Wan release's `models_t5_umt5-xxl-enc-bf16.pth` (then `tokenizer_path` is required:
    the release's `google/umt5-xxl` folder).

    `dtype` defaults to bf16 on CUDA and fp32 elsewhere; embeddings come back as float32 either way.
    """

    def __init__(
        self,
        encoder_path: str | Path,
        tokenizer_path: str | Path | None = None,
        text_len: int = 512,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        encoder_path = Path(encoder_path)
        if encoder_path.is_file() and tokenizer_path is None:
            raise ValueError(
                f"{encoder_path} is an encoder weights file; pass tokenizer_path= its tokenizer folder"
            )
        tokenizer_path = Path(tokenizer_path) if tokenizer_path is not None else encoder_path
        if not (encoder_path.is_dir() or encoder_path.is_file()):
            raise FileNotFoundError(f"umT5 encoder folder or {ORIGINAL_FILE} file {encoder_path} not found")
        if not tokenizer_path.is_dir():
            raise FileNotFoundError(f"umT5 tokenizer folder {tokenizer_path} not found")
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path), local_files_only=True)
        if self.tokenizer.pad_token_id not in (None, PAD_ID):
            # padding is built here with PAD_ID; another id would silently change what the encoder sees
            raise ValueError(
                f"tokenizer in {tokenizer_path} pads with id {self.tokenizer.pad_token_id}; umT5 uses 0"
            )
        if dtype is None:
            # umT5-XXL is 5.7 B parameters: bf16 where it runs on a GPU, fp32 on the CPU
            dtype = torch.bfloat16 if torch.device(device or "cpu").type == "cuda" else torch.float32
        if encoder_path.is_file():
            self.model = load_original_umt5(encoder_path).to(dtype)
        else:
            self.model = UMT5EncoderModel.from_pretrained(
                str(encoder_path), dtype=dtype, local_files_only=True
            )
        self.model.eval().requires_grad_(False)
        if device is not None:
            self.model.to(device)
        self.text_len = text_len

    def token_ids(self, prompt: str) -> list[int]:
        """umT5 token ids of `prompt` after Wan's whitespace cleaning, end-of-sequence included."""
        ids = self.tokenizer(" ".join(prompt.split()), add_special_tokens=True)["input_ids"]
        if len(ids) > self.text_len:
            raise ValueError(
                f"prompt {prompt[:60]!r}... is {len(ids)} tokens; text_len={self.text_len} (shorten the prompt)"
            )
        return ids


# ----- the original Wan release's umT5 file ------------------------------------------------------------------


def from_original_names(sd: dict) -> dict:
    """Rename a state dict from Wan's umT5 names to transformers' `UMT5EncoderModel` names."""
    from diagvid.model.weights import rename_keys

    return rename_keys(sd, ORIGINAL_NAMES)


def to_original_names(sd: dict) -> dict:
    """Rename a `UMT5EncoderModel` state dict to Wan's umT5 names (the tied `encoder.embed_tokens` dropped)."""
    from diagvid.model.weights import rename_keys

    return rename_keys({k: v for k, v in sd.items() if k != _TIED}, ORIGINAL_NAMES, reverse=True)


def config_from_original(sd: dict, source: str | Path = "the state dict") -> UMT5Config:
    """The `UMT5Config` of an original Wan umT5 state dict, read from its shapes (Wan fixes the rest: gated
    GELU (tanh), relative positions bucketed up to 128, no dropout, pad 0, end-of-sequence 1)."""
    needed = [
        "token_embedding.weight",
        "blocks.0.attn.q.weight",
        "blocks.0.pos_embedding.embedding.weight",
        "blocks.0.ffn.fc1.weight",
    ]
    lacking = [k for k in needed if k not in sd]
    if lacking:
        keys = sorted(sd)
        raise ValueError(
            f"{source} is not an original Wan umT5 encoder checkpoint: it lacks {', '.join(lacking)} "
            f"(its {len(keys)} keys start {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
        )
    vocab, d_model = sd["token_embedding.weight"].shape
    buckets, heads = sd["blocks.0.pos_embedding.embedding.weight"].shape
    layers = 0
    while f"blocks.{layers}.attn.q.weight" in sd:
        layers += 1
    return UMT5Config(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=sd["blocks.0.attn.q.weight"].shape[0] // heads,
        d_ff=sd["blocks.0.ffn.fc1.weight"].shape[0],
        num_layers=layers,
        num_heads=heads,
        relative_attention_num_buckets=buckets,
        relative_attention_max_distance=128,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        decoder_start_token_id=PAD_ID,
    )


def load_original_umt5(path: str | Path) -> UMT5EncoderModel:
    """The umT5 encoder of an original Wan release file (`models_t5_umt5-xxl-enc-bf16.pth`) in its stored
    precision, on the CPU: opened with weights_only=True and memory-mapped, built on the meta device and
    handed the file's tensors, so the 5.7 B parameters are never held twice."""
    from diagvid.model.weights import read_tensor_pickle

    path = Path(path)
    sd = read_tensor_pickle(path)
    cfg = config_from_original(sd, path)
    with torch.device("meta"):
        model = UMT5EncoderModel(cfg)
    want = {k: tuple(v.shape) for k, v in to_original_names(model.state_dict()).items()}
    problems = misfit(sd, want)
    if problems:
        raise ValueError(f"{path} does not fit a umT5 encoder of {cfg.num_layers} layers: {problems}")
    model.load_state_dict(from_original_names(sd), strict=False, assign=True)
    model.encoder.embed_tokens = model.shared  # the tied second name, left on meta by strict=False
    meta = [name for name, p in model.named_parameters(remove_duplicate=False) if p.is_meta]
    assert not meta, f"parameters left unloaded: {meta[:3]}"
    return model.eval()
