"""The real-Wan loading path, exercised with tiny random weights written in each supported layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diagvid.model.weights import save_wan
from diagvid.pretrained import load_pipeline
from tests.conftest import randomize
from tests.model.test_text import build_umt5_folders

WORDS = ["a", "red", "circle", "moves", "left"]


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    """transformer/ + vae/ + text_encoder/ + tokenizer/ like a diffusers Wan2.1-T2V download, tiny."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    root = tmp_path_factory.mktemp("wan")
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=16,
        ffn_dim=64,
        num_layers=2,
    )
    randomize(transformer, seed=2, std=0.2).save_pretrained(root / "transformer")
    AutoencoderKLWan(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[True, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
        scale_factor_spatial=4,
    ).save_pretrained(root / "vae")
    build_umt5_folders(root, WORDS)  # text_encoder/ (d_model 16) + tokenizer/
    return root


@pytest.mark.parametrize("layout", ["diffusers-folder", "self-forcing-pt", "wan-original"])
def test_wan_folder_with_each_generator_layout(wan_folder, tmp_path, layout):
    from diagvid.model.weights import load_dit

    base = load_dit(wan_folder / "transformer")
    if layout == "diffusers-folder":
        generator = wan_folder / "transformer"
    elif layout == "self-forcing-pt":
        generator = tmp_path / "self_forcing_dmd.pt"
        torch.save({"generator_ema": {f"model.{k}": v for k, v in base.state_dict().items()}}, generator)
    else:
        generator = save_wan(base, tmp_path / "wan_layout", shards=2)
    pipe = load_pipeline(wan_folder, generator=generator, device="cpu", latent_hw=(4, 4), frames_per_chunk=2)
    frames, chunks = pipe.generate("a red circle moves left", num_chunks=2, seed=0)
    assert frames.shape == (13, 16, 16, 3) and frames.dtype == np.uint8
    assert sum(c.nfe for c in chunks) == 5 + 3
    reference, _ = load_pipeline(
        wan_folder, generator=wan_folder / "transformer", device="cpu", latent_hw=(4, 4), frames_per_chunk=2
    ).generate("a red circle moves left", num_chunks=2, seed=0)
    assert np.array_equal(frames, reference)


def test_wan_folder_without_generator_is_refused(wan_folder):
    with pytest.raises(ValueError, match="pass generator="):
        load_pipeline(wan_folder, device="cpu")
