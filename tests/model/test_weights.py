"""Checkpoint layouts: parity with diffusers' Wan transformer, every generator flavour, clear errors."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from diagvid.model import weights as W
from diagvid.model.dit import WanDiT, preset
from tests.conftest import randomize, tiny_inputs


def _diffusers_tiny():
    from diffusers import WanTransformer3DModel

    cfg = preset("tiny")
    model = WanTransformer3DModel(
        patch_size=cfg.patch_size,
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim,
        out_channels=cfg.out_dim,
        text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers,
        eps=cfg.eps,
        rope_max_seq_len=64,
    )
    return randomize(model, seed=3).eval()  # diffusers zero-inits its output layer too


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory):
    """A tiny random WanTransformer3DModel, saved with save_pretrained, and its output on seeded inputs."""
    ref = _diffusers_tiny()
    folder = tmp_path_factory.mktemp("diffusers")
    ref.save_pretrained(folder)
    x, t, ctx = tiny_inputs(WanDiT(preset("tiny")), frames=3)
    t = t[:, 0]  # diffusers' Wan2.1 path takes one timestep per sample
    with torch.no_grad():
        out = ref(x, t, ctx, return_dict=False)[0]
    return folder, ref, (x, t, ctx), out


def _run(model: torch.nn.Module, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs)


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----- a. numerical parity with diffusers and the original layout -------------------------------------------


def test_diffusers_folder_gives_diffusers_outputs(diffusers_folder):
    folder, _, inputs, ref = diffusers_folder
    ours = W.load_dit(folder)
    got = _run(ours, inputs)
    err = (got - ref).abs().max().item()
    assert got.shape == ref.shape
    assert err <= 1e-5 * ref.abs().max().item(), f"max abs diff {err:.3g} vs max|out| {ref.abs().max():.3g}"


@pytest.mark.parametrize("shards", [1, 2])
def test_original_layout_gives_identical_outputs(diffusers_folder, tmp_path, shards):
    folder, _, inputs, _ = diffusers_folder
    sd, cfg = W.read_checkpoint(folder)
    W.write_weights(sd, cfg, tmp_path, layout="wan", shards=shards)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["_class_name"] == "WanModel" and "blocks.0.self_attn.q.weight" in _stored_keys(tmp_path)
    assert (tmp_path / W.WAN_INDEX).exists() == (shards > 1)
    assert torch.equal(_run(W.load_dit(tmp_path), inputs), _run(W.load_dit(folder), inputs))
    if shards > 1:
        next(tmp_path.glob("*-00002-of-00002.safetensors")).unlink()
        with pytest.raises(FileNotFoundError, match="00002-of-00002"):
            W.load_dit(tmp_path)


def _stored_keys(folder) -> set[str]:
    from safetensors import safe_open

    keys: set[str] = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            keys |= set(st.keys())
    return keys


def test_sharded_diffusers_folder_and_diffusers_writer(diffusers_folder, tmp_path):
    from diffusers import WanTransformer3DModel

    _, ref, inputs, out = diffusers_folder
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / W.WAN_INDEX).exists()
    ours = W.load_dit(tmp_path / "sharded")
    # ours -> diffusers layout, read back by diffusers itself
    W.save_dit(ours, tmp_path / "ours")
    W.convert(tmp_path / "ours", tmp_path / "back", to="diffusers")
    # from_pretrained needs `accelerate` for this class; rebuild from the written config and weights instead
    again = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(tmp_path / "back")).eval()
    again.load_state_dict(load_file(tmp_path / "back" / W.WAN_FILE), strict=True)
    assert torch.equal(again(*inputs, return_dict=False)[0].detach(), out)


def test_key_table_matches_a_real_diffusers_model(tiny_dit):
    theirs = _diffusers_tiny().state_dict()
    ours = tiny_dit.state_dict()
    renamed = W.to_diffusers_names(ours)
    assert {k: v.shape for k, v in renamed.items()} == {k: v.shape for k, v in theirs.items()}
    assert list(W.from_diffusers_names(renamed)) == list(ours)
    assert "blocks.1.norm2.weight" in renamed and "blocks.1.norm3.weight" in ours  # the swap


def test_configs_of_the_released_1_3b_model():
    wan = {  # Wan-AI/Wan2.1-T2V-1.3B config.json
        "_class_name": "WanModel",
        "_diffusers_version": "0.30.0",
        "dim": 1536,
        "eps": 1e-06,
        "ffn_dim": 8960,
        "freq_dim": 256,
        "in_dim": 16,
        "model_type": "t2v",
        "num_heads": 12,
        "num_layers": 30,
        "out_dim": 16,
        "text_len": 512,
    }
    diffusers = {
        "_class_name": "WanTransformer3DModel",
        "num_attention_heads": 12,
        "attention_head_dim": 128,
        "ffn_dim": 8960,
        "num_layers": 30,
        "in_channels": 16,
        "out_channels": 16,
        "text_dim": 4096,
        "freq_dim": 256,
        "patch_size": [1, 2, 2],
    }
    assert W.config_from_wan(wan) == preset("wan2.1-t2v-1.3b")
    assert W.config_from_diffusers(diffusers) == preset("wan2.1-t2v-1.3b")
    assert W.config_from_diffusers(W.diffusers_config(preset("wan2.1-t2v-14b"))) == preset("wan2.1-t2v-14b")
    assert W.config_from_wan(W.wan_config(preset("tiny"))) == preset("tiny")
    with pytest.raises(ValueError, match="model_type='i2v'"):
        W.config_from_wan({**wan, "model_type": "i2v"})


# ----- b. generator checkpoints of the distillation repos ---------------------------------------------------


def _prefixed(sd: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in sd.items()}


def _fsdp(sd: dict) -> dict:
    # FSDP1 with per-block wrapping, as in the EMA names Diagonal Distillation saves
    return {
        "model._fsdp_wrapped_module." + k.replace("blocks.0.", "blocks.0._fsdp_wrapped_module."): v
        for k, v in sd.items()
    }


def _flavours(sd: dict, other: dict) -> dict[str, tuple[str, dict, dict]]:
    """name -> (file, contents, load kwargs) of checkpoints whose wanted generator is `sd`."""
    wrapped = {"sd": _prefixed(sd, "model."), "other": _prefixed(other, "model.")}  # the repos' wrapper
    return {
        "self_forcing_ema": ("sf.pt", {"generator": wrapped["other"], "generator_ema": wrapped["sd"]}, {}),
        "self_forcing_no_ema": (
            "sf.pt",
            {"generator": wrapped["sd"], "generator_ema": wrapped["other"]},
            {"ema": False},
        ),
        "causvid": ("model.pt", {"generator": wrapped["sd"], "critic": wrapped["other"]}, {}),
        "dd_fsdp": ("dd.pth", {"generator_ema": _fsdp(sd), "step": torch.tensor(600)}, {}),
        "longlive_model": ("longlive_base.pt", {"model": _prefixed(sd, "_orig_mod.")}, {}),
        "ddp_raw": ("raw.pt", _prefixed(sd, "module."), {}),
        "raw_safetensors": ("raw.safetensors", sd, {}),
        "flat_safetensors": (
            "sf.safetensors",
            {**_prefixed(wrapped["sd"], "generator_ema."), **_prefixed(wrapped["other"], "generator.")},
            {},
        ),
    }


FLAVOURS = list(_flavours({}, {}))


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_generator_flavours_load_identically(tiny_dit, tmp_path, flavour):
    sd = tiny_dit.state_dict()
    name, blob, kwargs = _flavours(sd, {k: v + 1 for k, v in sd.items()})[flavour]
    path = tmp_path / name
    save_file(blob, str(path)) if name.endswith(".safetensors") else torch.save(blob, path)
    model = W.load_generator(path, config="tiny", **kwargs)
    assert _same_tensors(model.state_dict(), sd)
    if flavour == "self_forcing_ema":
        x, t, ctx = tiny_inputs(tiny_dit)
        assert torch.equal(_run(model, (x, t, ctx)), _run(tiny_dit, (x, t, ctx)))


def _with_lora(sd: dict, targets: list[str], rank: int = 3) -> tuple[dict, dict]:
    """peft's full-model layout: base_layer-wrapped targets plus lora_A/lora_B of adapter 'default'."""
    gen = torch.Generator().manual_seed(5)
    out, deltas = {}, {}
    for key, value in sd.items():
        module = key.rsplit(".", 1)[0]
        if module in targets:
            out[key.replace(module, module + ".base_layer")] = value
        else:
            out[key] = value
    for module in targets:
        w = sd[module + ".weight"]
        a, b = torch.randn(rank, w.shape[1], generator=gen), torch.randn(w.shape[0], rank, generator=gen)
        out[f"{module}.lora_A.default.weight"], out[f"{module}.lora_B.default.weight"] = a, b
        deltas[module + ".weight"] = b @ a
    return _prefixed(out, "model.base_model.model."), deltas


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_longlive_lora_is_merged(tiny_dit, tmp_path, scale):
    sd = tiny_dit.state_dict()
    blob, deltas = _with_lora(sd, ["blocks.0.self_attn.q", "blocks.1.ffn.2"])
    torch.save({"generator": blob}, tmp_path / "longlive.pt")
    kwargs = {} if scale == 1.0 else {"lora_scale": scale}
    got = W.load_generator(tmp_path / "longlive.pt", config="tiny", **kwargs).state_dict()
    for key, value in sd.items():
        want = value + scale * deltas[key] if key in deltas else value
        assert torch.allclose(got[key], want, atol=1e-6), key
    assert not torch.equal(got["blocks.0.self_attn.q.weight"], sd["blocks.0.self_attn.q.weight"])


def test_lora_from_a_separate_file(tiny_dit, tmp_path):
    sd = tiny_dit.state_dict()
    torch.save({"generator": _prefixed(sd, "model.")}, tmp_path / "base.pt")
    a, b = torch.randn(4, 32), torch.randn(32, 4)
    lora = {
        "base_model.model.blocks.1.cross_attn.k.lora_A.weight": a,
        "base_model.model.blocks.1.cross_attn.k.lora_B.weight": b,
    }
    torch.save({"generator_lora": lora}, tmp_path / "lora.pt")
    got = W.load_generator(tmp_path / "base.pt", config="tiny", lora=tmp_path / "lora.pt").state_dict()
    assert torch.allclose(
        got["blocks.1.cross_attn.k.weight"], sd["blocks.1.cross_attn.k.weight"] + b @ a, atol=1e-6
    )
    with pytest.raises(ValueError, match="lora_A but not its partner"):
        torch.save({"generator_lora": {next(iter(lora)): a}}, tmp_path / "half.pt")
        W.load_generator(tmp_path / "base.pt", config="tiny", lora=tmp_path / "half.pt")


# ----- c. bad files ------------------------------------------------------------------------------------------


def test_key_mismatches_are_one_clear_error(tiny_dit, tmp_path):
    sd = dict(tiny_dit.state_dict())
    del sd["head.head.bias"]
    sd["blocks.0.self_attn.extra"] = torch.zeros(2)
    sd["patch_embedding.weight"] = torch.zeros(32, 4, 1, 3, 3)
    torch.save({"generator": sd}, tmp_path / "broken.pt")
    with pytest.raises(ValueError) as info:
        W.load_generator(tmp_path / "broken.pt", config="tiny")
    msg = str(info.value)
    assert "broken.pt" in msg and "preset 'tiny'" in msg
    assert "1 missing (head.head.bias [16])" in msg
    assert "1 unexpected (blocks.0.self_attn.extra [2])" in msg
    assert "patch_embedding.weight: expected [32, 4, 1, 2, 2], found [32, 4, 1, 3, 3]" in msg
    # no config given: the default architecture is named, with the way to choose another
    torch.save(tiny_dit.state_dict(), tmp_path / "tiny.pt")
    with pytest.raises(ValueError, match=r"preset 'wan2\.1-t2v-1\.3b'.*--config"):
        W.load_generator(tmp_path / "tiny.pt")


def test_damaged_and_mislabelled_files(tiny_dit, tmp_path):
    sd = tiny_dit.state_dict()
    save_file(sd, str(tmp_path / "good.safetensors"))
    data = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.safetensors is not a valid safetensors file: truncated"):
        W.load_generator(tmp_path / "cut.safetensors", config="tiny")
    torch.save(sd, tmp_path / "renamed.safetensors")
    with pytest.raises(
        ValueError, match=r"renamed\.safetensors is not a valid safetensors file: it is a pickle"
    ):
        W.load_generator(tmp_path / "renamed.safetensors", config="tiny")
    torch.save(sd, tmp_path / "w.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "w.pt").read_bytes()[:500])
    with pytest.raises(ValueError, match=r"cut\.pt is not a readable torch checkpoint"):
        W.load_generator(tmp_path / "cut.pt", config="tiny")
    os.replace(tmp_path / "good.safetensors", tmp_path / "st.pt")
    with pytest.raises(ValueError, match=r"st\.pt is a safetensors file"):
        W.load_generator(tmp_path / "st.pt", config="tiny")
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at .*nowhere\.pt"):
        W.load_generator(tmp_path / "nowhere.pt", config="tiny")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"unknown checkpoint suffix '\.txt'"):
        W.load_generator(tmp_path / "notes.txt", config="tiny")
    with pytest.raises(ValueError, match="neither a preset"):
        W.load_generator(tmp_path / "w.pt", config="tinyy")


class _Payload:
    """Unpickling this creates a directory: the side effect a safe reader must never trigger."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_malicious_pickle_is_refused_without_running(tmp_path, writer):
    marker = tmp_path / "payload_ran"
    blob = {"generator": {"blocks.0.modulation": _Payload(str(marker))}}
    path = tmp_path / "evil.pt"
    if writer == "torch.save":
        torch.save(blob, path)
    else:
        path.write_bytes(pickle.dumps(blob, protocol=2))
    with pytest.raises(ValueError, match=r"evil\.pt was refused: it needs arbitrary objects unpickled"):
        W.load_generator(path, config="tiny")
    assert not marker.exists()


# ----- d. our format and the command line --------------------------------------------------------------------


def test_our_format_round_trip_is_exact_and_atomic(tiny_dit, tmp_path):
    folder = tmp_path / "gen"
    W.save_dit(tiny_dit, folder, kind="generator")
    W.save_dit(tiny_dit, folder, kind="generator")  # overwriting leaves nothing behind either
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    raw = json.loads((folder / "config.json").read_text())
    assert raw["format"] == "diagvid" and raw["kind"] == "generator" and raw["dim"] == 32
    again = W.load_dit(folder)
    assert again.cfg == tiny_dit.cfg and _same_tensors(again.state_dict(), tiny_dit.state_dict())
    with pytest.raises(ValueError, match=r"is preset 'tiny' .* but config='toy' asks for preset 'toy'"):
        W.load_dit(folder, config="toy")
    # the weights file alone still knows its architecture, and the stored precision is kept
    W.save_dit(tiny_dit.to(torch.bfloat16), tmp_path / "half")
    alone = tmp_path / "half.safetensors"
    os.replace(tmp_path / "half" / "model.safetensors", alone)
    assert W.load_dit(alone).patch_embedding.weight.dtype == torch.bfloat16


def test_failed_write_leaves_no_temp_file(tiny_dit, tmp_path, monkeypatch):
    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(W, "save_file", explode)
    with pytest.raises(OSError, match="disk full"):
        W.save_dit(tiny_dit, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_convert_command(diffusers_folder, tmp_path):
    from diagvid.cli import app

    folder = diffusers_folder[0]
    runner = CliRunner()
    res = runner.invoke(app, ["convert", str(folder), str(tmp_path / "ours")])
    assert res.exit_code == 0, res.output
    assert "diffusers folder" in res.output and "wrote" in res.output
    res = runner.invoke(app, ["convert", str(tmp_path / "ours"), str(tmp_path / "wan"), "--to", "wan"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "wan" / "config.json").read_text())["_class_name"] == "WanModel"
    assert _same_tensors(W.load_dit(tmp_path / "wan").state_dict(), W.load_dit(folder).state_dict())
    res = runner.invoke(app, ["convert", str(tmp_path / "missing"), str(tmp_path / "x")])
    assert res.exit_code == 2 and "no checkpoint at" in res.output


def test_convert_dtype_casts_floating_tensors_only(tiny_dit, tmp_path):
    from diagvid.cli import app

    W.save_dit(tiny_dit, tmp_path / "fp32")
    res = CliRunner().invoke(
        app, ["convert", str(tmp_path / "fp32"), str(tmp_path / "half"), "--dtype", "fp16"]
    )
    assert res.exit_code == 0 and "as fp16" in res.output, res.output
    half = load_file(tmp_path / "half" / W.WEIGHTS_FILE)
    full = tiny_dit.state_dict()
    assert {k: v.dtype for k, v in half.items()} == {
        k: torch.float16 if v.is_floating_point() else v.dtype for k, v in full.items()
    }
    assert all(torch.equal(half[k], v.half()) for k, v in full.items() if v.is_floating_point())
    res = CliRunner().invoke(app, ["convert", str(tmp_path / "fp32"), str(tmp_path / "x"), "--dtype", "fp8"])
    assert res.exit_code == 2 and "dtype='fp8'" in res.output
    assert not (tmp_path / "x").exists()


def test_our_embeddings_round_trip_in_our_layout_only(tiny_dit, tmp_path):
    from dataclasses import replace

    from diagvid.model.weights import load_dit, save_diffusers, save_dit, save_wan

    model = WanDiT(replace(tiny_dit.cfg, first_frame_embedding=True))
    with torch.no_grad():
        model.first_frame.copy_(torch.linspace(-1, 1, model.cfg.dim))
    back = load_dit(save_dit(model, tmp_path / "ours"))
    assert back.cfg.first_frame_embedding and torch.equal(back.first_frame, model.first_frame)
    for save in (save_wan, save_diffusers):
        with pytest.raises(ValueError, match="has no place for first_frame_embedding"):
            save(model, tmp_path / save.__name__)

    placed = WanDiT(replace(tiny_dit.cfg, position_grid=(2, 3)))
    with torch.no_grad():
        placed.position.copy_(torch.linspace(-1, 1, 6 * model.cfg.dim).view(6, -1))
    back = load_dit(save_dit(placed, tmp_path / "placed"))
    assert back.cfg.position_grid == (2, 3) and torch.equal(back.position, placed.position)
    for save in (save_wan, save_diffusers):
        with pytest.raises(ValueError, match="has no place for position_grid"):
            save(placed, tmp_path / f"placed-{save.__name__}")

    stemmed = WanDiT(replace(tiny_dit.cfg, motion_stem=(1, 1)))
    with torch.no_grad():
        stemmed.motion_stem.weight.copy_(
            torch.linspace(-1, 1, stemmed.motion_stem.weight.numel()).view_as(stemmed.motion_stem.weight)
        )
    back = load_dit(save_dit(stemmed, tmp_path / "stemmed"))
    assert back.cfg.motion_stem == (1, 1)
    assert torch.equal(back.motion_stem.weight, stemmed.motion_stem.weight)
    for save in (save_wan, save_diffusers):
        with pytest.raises(ValueError, match="has no place for motion_stem"):
            save(stemmed, tmp_path / f"stemmed-{save.__name__}")
