"""The original Wan2.1 release layout (Wan-AI/Wan2.1-T2V-1.3B): Wan2.1_VAE.pth, the umT5 .pth with its
tokenizer folder and the DiT in Wan names, written from tiny random models by inverting the key maps."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from diagvid.model import text as umt5
from diagvid.model import vae as wan_vae
from diagvid.model.dit import WanDiT
from diagvid.model.dit import preset as dit_preset
from diagvid.model.weights import save_wan
from diagvid.pretrained import load_pipeline, load_text_encoder, load_vae
from diagvid.stream import Pipeline, StreamConfig
from tests.conftest import randomize
from tests.model.test_text import build_umt5_folders

WORDS = ["a", "red", "circle", "moves", "left"]
PROMPT = "a red circle moves left"


def tiny_vae_config() -> wan_vae.VAEConfig:
    """The `tiny` VAE at Wan2.1's 16 latent channels, with Wan2.1's statistics (what the .pth implies)."""
    wan = wan_vae.PRESETS["wan2.1"]
    return wan_vae.preset("tiny", z_dim=16, latents_mean=wan.latents_mean, latents_std=wan.latents_std)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(folder in the original layout, the source models it was written from, their transformers folders)."""
    root = tmp_path_factory.mktemp("Wan2.1-T2V-tiny")
    sources = tmp_path_factory.mktemp("sources")
    dit = randomize(WanDiT(dit_preset("tiny", in_dim=16, out_dim=16, text_dim=16)), seed=2, std=0.2).eval()
    save_wan(dit, root)  # config.json (WanModel) + diffusion_pytorch_model.safetensors
    cfg = tiny_vae_config()
    vae = randomize(wan_vae.WanVAE(cfg), seed=3, std=0.05).eval()  # no zero tensors: a swap would show
    torch.save(wan_vae.to_original_names(vae.model.state_dict(), cfg), root / wan_vae.ORIGINAL_FILE)
    text_model, enc_dir, tok_dir = build_umt5_folders(sources, WORDS)
    torch.save(umt5.to_original_names(text_model.state_dict()), root / umt5.ORIGINAL_FILE)
    shutil.copytree(tok_dir, root / umt5.ORIGINAL_TOKENIZER)
    return root, {"dit": dit, "vae": vae, "text": text_model}, (enc_dir, tok_dir)


def test_the_vae_key_map_agrees_with_diffusers_converter_on_the_released_geometry():
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    cfg = wan_vae.preset("wan2.1")
    with torch.device("meta"):
        ours = wan_vae.WanVAE(cfg).model.state_dict()
    original = wan_vae.to_original_names(ours, cfg)
    assert "decoder.upsamples.4.shortcut.weight" in original and "conv1.weight" in original
    assert not set(original) & set(ours)  # every key is renamed (the two naming schemes share none)
    converted = convert_wan_vae_to_diffusers(original)
    assert set(converted) == set(ours)
    assert all(converted[ours_name] is original[name] for name, ours_name in zip(original, ours, strict=True))
    assert wan_vae.from_original_names(original, cfg).keys() == ours.keys()
    assert wan_vae.config_from_original(original) == cfg


def test_original_vae_loads_to_the_same_model(release):
    root, src, _ = release
    loaded = load_vae(root / wan_vae.ORIGINAL_FILE)
    assert loaded.cfg == src["vae"].cfg  # architecture from the shapes, Wan2.1's statistics
    for (name, a), (_, b) in zip(loaded.state_dict().items(), src["vae"].state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    video = torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        z = src["vae"].encode(video)
        assert torch.equal(loaded.encode(video), z)
        decoded = src["vae"].decode(z)
        assert torch.equal(loaded.decode(z), decoded)
    assert (decoded.abs() < 1).float().mean() > 0.05  # not all clamped: the comparison sees the decoder
    # the release folder itself is accepted too
    assert load_vae(root).cfg == loaded.cfg


def test_original_umt5_gives_the_same_embeddings(release, tmp_path):
    root, src, (enc_dir, tok_dir) = release
    loaded = load_text_encoder(root)
    reference = umt5.UMT5TextEncoder(enc_dir, tok_dir)
    assert isinstance(loaded, umt5.UMT5TextEncoder) and loaded.text_len == 512
    for key in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"):
        assert getattr(loaded.model.config, key) == getattr(src["text"].config, key), key
    prompts = [PROMPT, "a circle", ""]
    emb, mask = loaded.encode(prompts)
    ref_emb, ref_mask = reference.encode(prompts)
    assert torch.equal(mask, ref_mask) and torch.equal(emb, ref_emb) and emb.abs().sum() > 0
    assert loaded.model.encoder.embed_tokens.weight is loaded.model.shared.weight
    # the released file is bf16: it loads and runs in fp32 on the CPU (the values are bf16's)
    bf16 = {k: v.to(torch.bfloat16) for k, v in umt5.to_original_names(src["text"].state_dict()).items()}
    torch.save(bf16, tmp_path / umt5.ORIGINAL_FILE)
    enc = umt5.UMT5TextEncoder(tmp_path / umt5.ORIGINAL_FILE, root / umt5.ORIGINAL_TOKENIZER)
    assert enc.model.dtype == torch.float32
    assert torch.equal(enc.model.shared.weight, src["text"].shared.weight.to(torch.bfloat16).float())
    with pytest.raises(ValueError, match="pass tokenizer_path="):
        umt5.UMT5TextEncoder(root / umt5.ORIGINAL_FILE)


def wan_t5_encoder(sd: dict, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Wan's own umT5 encoder (wan/modules/t5.py, T5Encoder with shared_pos=False) written out on its state
    dict: the independent reference for what each original name means."""
    import math

    import torch.nn.functional as F

    def norm(x, w):  # T5LayerNorm: RMS, no mean, eps 1e-6
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

    def bucket(rel, num_buckets, max_dist=128):  # bidirectional T5 buckets, as T5RelativeEmbedding
        half = num_buckets // 2
        out = (rel > 0).long() * half
        rel = rel.abs()
        exact = half // 2
        large = exact + (torch.log(rel.float() / exact) / math.log(max_dist / exact) * (half - exact)).long()
        return out + torch.where(rel < exact, rel, large.clamp(max=half - 1))

    x = F.embedding(ids, sd["token_embedding.weight"])
    length = ids.shape[1]
    rel = torch.arange(length)[None] - torch.arange(length)[:, None]
    layer = 0
    while f"blocks.{layer}.norm1.weight" in sd:
        p = f"blocks.{layer}."
        table = sd[p + "pos_embedding.embedding.weight"]  # [buckets, heads]
        bias = table[bucket(rel, table.shape[0])].permute(2, 0, 1)[None]  # [1, N, L, L]
        bias = bias.masked_fill(~mask[:, None, None, :], torch.finfo(x.dtype).min)
        h = norm(x, sd[p + "norm1.weight"])
        b, n = h.shape[0], table.shape[1]
        q, k, v = (F.linear(h, sd[p + f"attn.{w}.weight"]).view(b, length, n, -1) for w in "qkv")
        attn = (torch.einsum("binc,bjnc->bnij", q, k) + bias).softmax(-1)  # T5: no 1/sqrt(d) scaling
        x = x + F.linear(
            torch.einsum("bnij,bjnc->binc", attn, v).reshape(b, length, -1), sd[p + "attn.o.weight"]
        )
        h = norm(x, sd[p + "norm2.weight"])
        gate = F.gelu(F.linear(h, sd[p + "ffn.gate.0.weight"]), approximate="tanh")
        x = x + F.linear(F.linear(h, sd[p + "ffn.fc1.weight"]) * gate, sd[p + "ffn.fc2.weight"])
        layer += 1
    return norm(x, sd["norm.weight"])


def test_the_umt5_key_map_means_what_wans_encoder_computes(release):
    root, _, _ = release
    sd = torch.load(root / umt5.ORIGINAL_FILE, weights_only=True)
    enc = load_text_encoder(root)
    ids, mask = enc.tokenize([PROMPT, "a circle"])
    with torch.no_grad():
        ours = enc.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        wan = wan_t5_encoder(sd, ids, mask)
    # 512 positions reach the far buckets (relative distances up to 511, bucketed up to 128)
    torch.testing.assert_close(ours, wan, rtol=1e-5, atol=1e-5)


def test_load_pipeline_reads_the_original_layout(release):
    root, src, (enc_dir, tok_dir) = release
    pipe = load_pipeline(root, generator=root, device="cpu", latent_hw=(4, 4), frames_per_chunk=2)
    frames, chunks = pipe.generate(PROMPT, num_chunks=2, seed=0)
    assert frames.shape == (13, 16, 16, 3) and sum(c.nfe for c in chunks) == 5 + 3
    reference = Pipeline(
        src["dit"],
        src["vae"],
        umt5.UMT5TextEncoder(enc_dir, tok_dir),
        StreamConfig(frames_per_chunk=2, latent_hw=(4, 4), fps=16, shift=5.0),
    )
    ref_frames, ref_chunks = reference.generate(PROMPT, num_chunks=2, seed=0)
    for a, b in zip(chunks, ref_chunks, strict=True):
        assert torch.equal(a.latents, b.latents)
    assert np.array_equal(frames, ref_frames)
    with pytest.raises(ValueError, match="pass generator="):
        load_pipeline(root, device="cpu")


def test_an_incomplete_release_folder_names_what_it_lacks(release, tmp_path):
    root, _, _ = release
    partial = tmp_path / "partial"
    shutil.copytree(root, partial)
    (partial / umt5.ORIGINAL_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=f"lacks {umt5.ORIGINAL_FILE}"):
        load_pipeline(partial, generator=partial, device="cpu")


def save(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


def test_foreign_or_damaged_files_give_a_clear_error(release, tmp_path):
    root, src, _ = release
    vae_sd = torch.load(root / wan_vae.ORIGINAL_FILE, weights_only=True)
    text_sd = torch.load(root / umt5.ORIGINAL_FILE, weights_only=True)
    # a file of the other kind
    with pytest.raises(
        ValueError, match=r"text\.pth is not an original Wan VAE checkpoint: it lacks encoder\.conv1"
    ):
        wan_vae.WanVAE.from_original_file(save(text_sd, tmp_path / "text.pth"))
    with pytest.raises(
        ValueError, match=r"vae\.pth is not an original Wan umT5 encoder checkpoint: it lacks"
    ):
        umt5.load_original_umt5(save(vae_sd, tmp_path / "vae.pth"))
    dit_sd = src["dit"].state_dict()
    with pytest.raises(ValueError, match=r"dit\.pth is not an original Wan VAE checkpoint"):
        load_vae(save(dit_sd, tmp_path / "dit.pth"))
    # one tensor missing, one too many, one of the wrong shape: each named, with the file
    broken = dict(vae_sd)
    del broken["decoder.head.2.bias"]
    broken["decoder.extra.weight"] = torch.zeros(1)
    broken["decoder.middle.1.proj.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"broken\.pth does not fit an original Wan VAE") as err:
        wan_vae.WanVAE.from_original_file(save(broken, tmp_path / "broken.pth"))
    message = str(err.value)
    assert "1 missing (decoder.head.2.bias)" in message and "1 unexpected (decoder.extra.weight)" in message
    assert "decoder.middle.1.proj.weight: file [3]" in message
    text_broken = {k: v for k, v in text_sd.items() if k != "blocks.1.ffn.fc2.weight"}
    with pytest.raises(
        ValueError, match=r"does not fit a umT5 encoder of 2 layers: 1 missing \(blocks\.1\.ffn\.fc2"
    ):
        umt5.load_original_umt5(save(text_broken, tmp_path / "text_broken.pth"))
    # not a flat state dict, not a checkpoint at all
    with pytest.raises(ValueError, match=r"nested\.pth is not a flat state dict"):
        load_vae(save({"state_dict": vae_sd}, tmp_path / "nested.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"junk\.pth is not a readable torch checkpoint: neither"):
        load_vae(tmp_path / "junk.pth")


class _Payload:
    """Unpickling this runs Path.touch(marker): what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    evil = save({"encoder.conv1.weight": torch.zeros(1), "x": _Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match=r"evil\.pth was refused: it needs arbitrary objects unpickled"):
        load_vae(evil)
    with pytest.raises(ValueError, match="was refused"):
        umt5.load_original_umt5(evil)
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the payload is live: an unsafe load runs it
    assert marker.exists()
