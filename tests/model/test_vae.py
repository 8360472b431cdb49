"""The Wan VAE adapter: shapes, normalisation, streaming == whole-clip, file formats."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import load_file, save_file

from diagvid.model.vae import (
    VAEConfig,
    WanVAE,
    frames_to_tensor,
    preset,
    tensor_to_frames,
)

# non-trivial statistics, so a missing or swapped normalisation shows up in every comparison
MEAN = [0.3, -0.2, 0.1, 0.5]
STD = [1.5, 0.7, 2.0, 1.1]


@pytest.fixture(scope="module")
def vae() -> WanVAE:
    """The `tiny` preset (4x spatial, 4x temporal) with seeded weights and non-trivial latent statistics."""
    torch.manual_seed(0)
    return WanVAE(preset("tiny", latents_mean=MEAN, latents_std=STD)).eval()


def video(t: int, hw: int = 16, batch: int = 1, seed: int = 1) -> torch.Tensor:
    """Seeded video [B, 3, T, H, W] in [-1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, t, hw, hw, generator=gen) * 2 - 1


@torch.no_grad()
def test_encode_decode_shapes(vae):
    z = vae.encode(video(9, batch=2))
    assert z.shape == (2, 4, 3, 4, 4)
    x = vae.decode(z)
    assert x.shape == (2, 3, 9, 16, 16)
    assert x.min() >= -1 and x.max() <= 1


@pytest.mark.parametrize("t", [0, 2, 8])
def test_bad_frame_count_raises(vae, t):
    with pytest.raises(ValueError, match=rf"T={t} frames.*1 \+ 4k"):
        vae.encode(video(t))


def test_bad_size_and_latents_raise(vae):
    with pytest.raises(ValueError, match="multiple of the spatial stride 4"):
        vae.encode(video(5, hw=18))
    with pytest.raises(ValueError, match=r"latents must be \[B, 4, F >= 1"):
        vae.decode(torch.zeros(1, 3, 2, 4, 4))


@torch.no_grad()
def test_latent_normalisation_matches_diffusers(vae):
    x = video(5)
    mu = vae.model.encode(x).latent_dist.mean
    mean = torch.tensor(MEAN).view(1, 4, 1, 1, 1)
    std = torch.tensor(STD).view(1, 4, 1, 1, 1)
    z = vae.encode(x)
    torch.testing.assert_close(z, (mu - mean) / std)
    torch.testing.assert_close(vae.denormalize(z), mu)
    torch.testing.assert_close(vae.decode(z), vae.model.decode(mu).sample)


@torch.no_grad()
def test_posterior_sample_is_seeded_and_differs_from_mean(vae):
    x = video(5)
    a = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
    b = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    assert (a - vae.encode(x)).abs().max() > 1e-3


@torch.no_grad()
@pytest.mark.parametrize("chunks", [(3, 3, 1), (1, 2, 4)])
def test_streaming_decode_equals_whole_decode(vae, chunks):
    z = torch.randn(2, 4, sum(chunks), 4, 4, generator=torch.Generator().manual_seed(4))
    whole = vae.decode(z)
    decoder = vae.stream_decoder()
    parts, start = [], 0
    for k in chunks:
        parts.append(decoder.decode(z[:, :, start : start + k]))
        start += k
    # the first latent frame decodes to 1 pixel frame, every later one to 4
    assert [p.shape[2] for p in parts] == [1 + 4 * (chunks[0] - 1)] + [4 * k for k in chunks[1:]]
    torch.testing.assert_close(torch.cat(parts, dim=2), whole, atol=1e-5, rtol=0)


@torch.no_grad()
def test_stream_decoder_reset_and_batch_check(vae):
    z = torch.randn(1, 4, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    decoder = vae.stream_decoder()
    first = decoder.decode(z)
    decoder.decode(z)
    with pytest.raises(ValueError, match="batch 2"):
        decoder.decode(torch.cat([z, z]))
    decoder.reset()
    torch.testing.assert_close(decoder.decode(z), first, atol=0, rtol=0)


@torch.no_grad()
def test_streaming_encode_equals_whole_encode(vae):
    x = video(13, seed=6)
    whole = vae.encode(x)
    encoder = vae.stream_encoder()
    parts, start, counts = [], 0, []
    for n in (1, 3, 6, 3):
        out = encoder.encode(x[:, :, start : start + n])
        counts.append(out.shape[2])
        parts.append(out)
        start += n
    assert counts == [1, 0, 2, 1]  # latent 0 needs frame 0 alone, each later latent 4 more frames
    assert encoder.pending_frames == 0
    torch.testing.assert_close(torch.cat(parts, dim=2), whole, atol=1e-5, rtol=0)


def test_toy_preset_geometry():
    cfg = preset("toy")
    assert cfg.spatial_stride == 8 and cfg.z_dim == 8
    torch.manual_seed(0)
    toy = WanVAE(cfg).eval()
    assert sum(p.numel() for p in toy.parameters()) < 3_000_000
    with torch.no_grad():
        assert toy.encode(video(5, hw=64)).shape == (1, 8, 2, 8, 8)


@torch.no_grad()
def test_decoder_without_body_norms(tmp_path):
    """decoder_norms=False drops exactly the decoder's inner RMS norms, survives save/load, streams the same."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm

    torch.manual_seed(0)
    with_norms = WanVAE(preset("tiny"))
    torch.manual_seed(0)
    plain = WanVAE(preset("tiny", decoder_norms=False)).eval()

    def norms(m):
        return [n for n, x in m.named_modules() if isinstance(x, WanRMS_norm)]

    kept = norms(plain.model)
    assert "decoder.norm_out" in kept and not any(
        n.startswith("decoder.") and n != "decoder.norm_out" for n in kept
    )
    assert [n for n in norms(with_norms.model) if not n.startswith("decoder.")] == [
        n for n in kept if not n.startswith("decoder.")
    ]
    dropped = set(with_norms.state_dict()) - set(plain.state_dict())
    assert dropped and all(k.startswith("model.decoder.") and k.endswith("gamma") for k in dropped)

    plain.save(tmp_path / "v")
    loaded = WanVAE.load(tmp_path / "v")
    assert loaded.cfg.decoder_norms is False
    z = torch.randn(1, 4, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    whole = loaded.decode(z)
    torch.testing.assert_close(whole, plain.decode(z), atol=0, rtol=0)
    dec = loaded.stream_decoder()
    parts = torch.cat([dec.decode(z[:, :, :1]), dec.decode(z[:, :, 1:])], dim=2)
    torch.testing.assert_close(parts, whole, atol=1e-5, rtol=1e-4)
    # the decoder output changes when its norms are removed, so the flag really is wired
    assert not torch.allclose(with_norms.eval().decode(z), whole)


def test_wan21_preset_is_the_released_geometry():
    cfg = preset("wan2.1")
    assert (cfg.base_dim, cfg.z_dim, cfg.dim_mult, cfg.spatial_stride) == (96, 16, [1, 2, 4, 4], 8)
    assert len(cfg.latents_mean) == len(cfg.latents_std) == 16
    assert cfg.latents_mean[0] == -0.7571 and cfg.latents_std[-1] == 1.9160


def test_config_validation():
    with pytest.raises(ValueError, match="exactly two True"):
        VAEConfig(temperal_downsample=[True, True, True])
    with pytest.raises(ValueError, match="latents_mean has 3 values"):
        VAEConfig(z_dim=4, latents_mean=[0.0] * 3, latents_std=[1.0] * 4)
    with pytest.raises(ValueError, match="unknown VAE preset"):
        preset("nope")
    # another channel count without statistics gets the placeholders; with them, they are kept
    assert preset("wan2.1", z_dim=4).latents_std == [1.0] * 4
    assert preset("tiny", z_dim=2, latents_mean=[1.0, 2.0], latents_std=[3.0, 4.0]).latents_mean == [1.0, 2.0]


@torch.no_grad()
def test_save_load_round_trip(vae, tmp_path):
    vae.save(tmp_path / "v")
    assert sorted(p.name for p in (tmp_path / "v").iterdir()) == ["vae.json", "vae.safetensors"]
    loaded = WanVAE.load(tmp_path / "v")
    assert loaded.cfg == vae.cfg
    z = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(loaded.decode(z), vae.decode(z), atol=0, rtol=0)


def test_load_rejects_bad_weight_files(vae, tmp_path):
    folder = vae.save(tmp_path / "v")
    path = folder / "vae.safetensors"
    good = load_file(path)
    bad = dict(good)
    del bad["decoder.conv_out.weight"]
    bad["decoder.extra.weight"] = torch.zeros(2)
    bad["encoder.conv_in.bias"] = torch.zeros(5)
    save_file(bad, path)
    with pytest.raises(ValueError) as err:
        WanVAE.load(folder)
    msg = str(err.value)
    assert "VAEConfig(base_dim=8" in msg
    assert "1 missing (decoder.conv_out.weight)" in msg
    assert "1 unexpected (decoder.extra.weight)" in msg
    assert "encoder.conv_in.bias: file [5] vs model [8]" in msg

    # right file, wrong config beside it
    save_file(good, path)
    cfg = json.loads((folder / "vae.json").read_text())
    (folder / "vae.json").write_text(json.dumps({**cfg, "base_dim": 12}))
    with pytest.raises(ValueError, match=r"VAEConfig\(base_dim=12.*wrong shape"):
        WanVAE.load(folder)

    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        WanVAE.load(folder)


@pytest.mark.parametrize("decoder_base_dim", [None, 12])  # 12: Wan2.2's wider decoder, diffusers' option
@torch.no_grad()
def test_from_diffusers_folder(vae, tmp_path, decoder_base_dim):
    cfg = replace(vae.cfg, decoder_base_dim=decoder_base_dim)
    torch.manual_seed(8)
    theirs = AutoencoderKLWan(
        base_dim=cfg.base_dim,
        decoder_base_dim=decoder_base_dim,
        z_dim=cfg.z_dim,
        dim_mult=cfg.dim_mult,
        num_res_blocks=cfg.num_res_blocks,
        temperal_downsample=cfg.temperal_downsample,
        latents_mean=MEAN,
        latents_std=STD,
        scale_factor_spatial=4,
    ).eval()
    theirs.save_pretrained(tmp_path / "d")
    ours = WanVAE.from_diffusers_folder(tmp_path / "d")
    assert ours.cfg == cfg
    x = video(5, seed=9)
    mu = theirs.encode(x).latent_dist.mean
    torch.testing.assert_close(ours.encode(x), (mu - ours.latents_mean) / ours.latents_std)
    torch.testing.assert_close(ours.decode(ours.encode(x)), theirs.decode(mu).sample)

    raw = json.loads((tmp_path / "d" / "config.json").read_text())
    (tmp_path / "d" / "config.json").write_text(json.dumps({**raw, "is_residual": True}))
    with pytest.raises(ValueError, match="is_residual=True is not supported"):
        WanVAE.from_diffusers_folder(tmp_path / "d")


def test_frames_tensor_round_trip():
    frames = np.random.default_rng(0).integers(0, 256, (2, 5, 8, 8, 3), dtype=np.uint8)
    x = frames_to_tensor(frames[0])
    assert x.shape == (3, 5, 8, 8) and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(tensor_to_frames(x), frames[0])
    assert np.array_equal(tensor_to_frames(frames_to_tensor(frames)), frames)
    with pytest.raises(ValueError, match="uint8"):
        frames_to_tensor(frames.astype(np.float32))


def test_cpu_inference_convs_run_on_onednn_with_pytorchs_numbers(vae):
    """The causal convs skip PyTorch's slow batch-1 conv3d kernel in CPU inference: oneDNN runs them, the decoded
    video matches diffusers' own module to float rounding, and training (grad on) still takes PyTorch's path."""
    from torch.profiler import ProfilerActivity, profile

    reference = AutoencoderKLWan(**vae.model.config).eval()
    reference.load_state_dict(vae.model.state_dict())
    z = torch.randn(1, vae.z_dim, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        ours = vae.model.decode(z).sample
    ops = {e.key for e in prof.key_averages()}
    assert "aten::mkldnn_convolution" in ops and "aten::slow_conv3d_forward" not in ops
    with torch.no_grad():
        torch.testing.assert_close(ours, reference.decode(z).sample, atol=1e-5, rtol=1e-4)
    x = torch.randn(1, 3, 5, 16, 16, requires_grad=True)
    vae.model.encode(x).latent_dist.mean.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
