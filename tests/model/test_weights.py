"""Checkpoint formats: numerical parity with diffusers, every generator flavour, clear errors on bad files."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from diagvid.model import weights as W
from diagvid.model.dit import preset
from tests.conftest import randomize, tiny_inputs


@pytest.fixture(scope="module")
def diffusers_model():
    from diffusers import WanTransformer3DModel

    cfg = preset("tiny")
    torch.manual_seed(0)
    ref = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim,
        out_channels=cfg.out_dim,
        text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers,
        cross_attn_norm=True,
        eps=1e-6,
    )
    return randomize(ref, seed=1).eval()


def outputs(model, ref_inputs):
    x, t, ctx = ref_inputs
    with torch.no_grad():
        return model(x, t, ctx)


def test_ours_equals_diffusers_from_every_layout(diffusers_model, tmp_path, tiny_dit):
    diffusers_model.save_pretrained(tmp_path / "diffusers")
    ours = W.load_dit(tmp_path / "diffusers").eval()
    ours.cfg.text_len = preset("tiny").text_len
    x, _, ctx = tiny_inputs(ours)
    t = torch.tensor([937.5, 357.0])  # diffusers' Wan2.1 path takes one timestep per sample
    with torch.no_grad():
        ref = diffusers_model(x, t, ctx, return_dict=False)[0]
        got = ours(x, t, ctx)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    for shards in (1, 2):
        W.save_wan(ours, tmp_path / f"wan{shards}", shards=shards)
        again = W.load_dit(tmp_path / f"wan{shards}").eval()
        assert torch.equal(outputs(again, (x, t, ctx)), got)
    assert (tmp_path / "wan2" / W.WAN_INDEX).exists()


def test_key_tables_round_trip_and_cover_diffusers(diffusers_model, tiny_dit):
    ours = tiny_dit.state_dict()
    theirs = W.rename(ours, W.TO_DIFFUSERS)
    assert set(theirs) == set(diffusers_model.state_dict())
    assert W.rename(theirs, W.FROM_DIFFUSERS).keys() == ours.keys()


def generator_flavours(sd):
    prefixed = {f"model.{k}": v for k, v in sd.items()}
    noisy = {k: v + 1 for k, v in sd.items()}
    fsdp = {f"model._fsdp_wrapped_module.{k}": v for k, v in sd.items()}
    return {
        "self_forcing.pt": (
            {"generator": {f"model.{k}": v for k, v in noisy.items()}, "generator_ema": prefixed},
            sd,
        ),
        "causvid.pt": ({"generator": prefixed, "critic": {"x": torch.zeros(1)}}, sd),
        "dd.pt": ({"generator_ema": fsdp}, sd),
        "raw.safetensors": (sd, sd),
        "model.pth": ({"model": sd}, sd),
    }


@pytest.mark.parametrize("name", ["self_forcing.pt", "causvid.pt", "dd.pt", "raw.safetensors", "model.pth"])
def test_generator_flavours_load_identically(tiny_dit, tmp_path, name):
    sd = tiny_dit.state_dict()
    blob, expect = generator_flavours(sd)[name]
    path = tmp_path / name
    save_file(blob, str(path)) if name.endswith(".safetensors") else torch.save(blob, path)
    loaded = W.load_generator(path, config="tiny")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expect.items())


def test_generator_without_ema_takes_generator(tiny_dit, tmp_path):
    sd = tiny_dit.state_dict()
    blob, _ = generator_flavours(sd)["self_forcing.pt"]
    torch.save(blob, tmp_path / "sf.pt")
    loaded = W.load_generator(tmp_path / "sf.pt", config="tiny", ema=False)
    key = "head.head.weight"
    assert torch.equal(loaded.state_dict()[key], sd[key] + 1)


def test_lora_is_merged(tiny_dit, tmp_path):
    sd = {f"model.{k}": v for k, v in tiny_dit.state_dict().items()}
    base = "model.blocks.0.self_attn.q"
    w0 = sd.pop(f"{base}.weight")
    sd[f"{base}.base_layer.weight"] = w0
    sd[f"{base}.base_layer.bias"] = sd.pop(f"{base}.bias")
    a, b = torch.randn(4, w0.shape[1]), torch.randn(w0.shape[0], 4)
    sd[f"{base}.lora_A.weight"], sd[f"{base}.lora_B.weight"] = a, b
    torch.save({"generator": sd}, tmp_path / "longlive.pt")
    loaded = W.load_generator(tmp_path / "longlive.pt", config="tiny", lora_scale=0.5)
    assert torch.allclose(loaded.state_dict()["blocks.0.self_attn.q.weight"], w0 + 0.5 * b @ a, atol=1e-6)


def test_our_format_round_trip_is_exact_and_atomic(tiny_dit, tmp_path):
    W.save_dit(tiny_dit, tmp_path / "m")
    again = W.load_dit(tmp_path / "m")
    assert all(torch.equal(again.state_dict()[k], v) for k, v in tiny_dit.state_dict().items())
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]


def test_bad_files_give_clear_errors(tiny_dit, tmp_path):
    sd = tiny_dit.state_dict()
    bad = dict(sd)
    bad.pop("head.head.bias")
    bad["blocks.0.extra"] = torch.zeros(1)
    bad["patch_embedding.weight"] = torch.zeros(3, 3)
    torch.save({"generator": bad}, tmp_path / "bad.pt")
    with pytest.raises(ValueError) as err:
        W.load_generator(tmp_path / "bad.pt", config="tiny")
    msg = str(err.value)
    assert "bad.pt" in msg and "'tiny'" in msg and "head.head.bias" in msg and "blocks.0.extra" in msg
    assert "patch_embedding.weight: file (3, 3)" in msg
    with pytest.raises(ValueError, match=r"does not match the expected architecture 'wan2\.1-t2v-1\.3b'"):
        torch.save(sd, tmp_path / "small.pt")
        W.load_generator(tmp_path / "small.pt")

    save_file(sd, str(tmp_path / "w.safetensors"))
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.safetensors is not a readable safetensors file"):
        W.load_generator(tmp_path / "cut.safetensors", config="tiny")
    torch.save(sd, tmp_path / "pickled.safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        W.load_generator(tmp_path / "pickled.safetensors", config="tiny")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        W.load_generator(tmp_path / "missing.pt", config="tiny")
    with pytest.raises(ValueError, match=r"unknown checkpoint type '\.txt'"):
        (tmp_path / "x.txt").write_text("hi")
        W.load_generator(tmp_path / "x.txt", config="tiny")


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"generator": Evil()}, protocol=2))
    with pytest.raises(ValueError, match="cannot be loaded safely"):
        W.load_generator(tmp_path / "evil.pt", config="tiny")
    assert not marker.exists()


def test_convert_cli(diffusers_model, tmp_path, tiny_dit):
    from diagvid.cli import app

    diffusers_model.save_pretrained(tmp_path / "d")
    runner = CliRunner()
    result = runner.invoke(app, ["convert", str(tmp_path / "d"), str(tmp_path / "ours")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["convert", str(tmp_path / "ours"), str(tmp_path / "wan"), "--to", "wan"])
    assert result.exit_code == 0, result.output
    a, b = W.load_dit(tmp_path / "ours"), W.load_dit(tmp_path / "wan")
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    result = runner.invoke(app, ["convert", str(tmp_path / "nope"), str(tmp_path / "x")])
    assert result.exit_code == 2 and "no checkpoint at" in result.output


def test_unknown_preset_and_layout(tmp_path):
    with pytest.raises(ValueError, match="unknown DiT preset 'huge'"):
        W.load_generator(tmp_path / "x.pt", config="huge")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    with pytest.raises(ValueError, match=r"unrecognised config\.json"):
        W.load_dit(tmp_path / "c")
