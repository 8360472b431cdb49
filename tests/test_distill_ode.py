"""`diagvid train ode`: teacher ODE pairs in shards, resumable shard by shard, with a manifest."""

from __future__ import annotations

import json

import pytest
import torch

from diagvid.config import from_dict
from diagvid.train import checkpoint, ode
from diagvid.train.ode import OdeConfig, OdeShards, write_ode_pairs
from tests.distill_setup import codecs, ode_recipe


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return codecs(tmp_path_factory.mktemp("ode"))


def shard_contents(folder):
    """name -> (tensors, metadata) of every shard (the header's key order is not fixed, so no raw bytes)."""
    from safetensors import safe_open

    out = {}
    for path in sorted(folder.glob("shard-*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out[path.name] = ({k: f.get_tensor(k) for k in f.keys()}, f.metadata())  # noqa: SIM118
    return out


def same(a, b):
    return a.keys() == b.keys() and all(
        a[n][1] == b[n][1] and all(torch.equal(a[n][0][k], b[n][0][k]) for k in a[n][0]) for n in a
    )


def test_pairs_are_the_teacher_sampler_of_seeded_prompts_and_noise(root, tmp_path):
    from diagvid.model.weights import load_dit
    from diagvid.pretrained import load_text_encoder
    from diagvid.sampling import sample_euler

    cfg = from_dict(OdeConfig, ode_recipe(root, out_dir=str(tmp_path / "a")))
    data = OdeShards(write_ode_pairs(cfg, progress=False))
    assert len(data) == 5 and data.sample_shape == (3, 4, 4, 4, 4)
    manifest = json.loads((tmp_path / "a/manifest.json").read_text())
    assert manifest["complete"] and [s["samples"] for s in manifest["shards"]] == [2, 2, 1]
    assert data.timesteps == [1000.0, 750.0]
    traj, ctx = data.get([4, 0])
    # sample 4: its own noise, prompt and the teacher's 4-step sampler
    teacher, text = load_dit(root / "teacher"), load_text_encoder(root / "text")
    noise = torch.randn((4, 4, 4, 4), generator=ode.seeded(0, "noise", 4))[None]
    prompt = ode.sample_prompt(0, 4)
    assert torch.equal(ctx[:1], text.encode([prompt])[0])
    final, _ = sample_euler(
        teacher, noise, ctx[:1], text.encode([""])[0], num_steps=4, shift=3.0, guidance=2.0
    )
    assert torch.equal(traj[0, 0], noise[0]) and torch.allclose(traj[0, -1], final[0], atol=1e-5)
    # the batch size does not change the data
    again = from_dict(OdeConfig, ode_recipe(root, out_dir=str(tmp_path / "b"), batch_size=1))
    traj_b, _ = OdeShards(write_ode_pairs(again, progress=False)).get(range(5))
    assert torch.allclose(traj_b, data.get(range(5))[0], atol=1e-5)


def test_killed_run_resumes_and_damaged_shards_are_redone(root, tmp_path, monkeypatch):
    straight = from_dict(OdeConfig, ode_recipe(root, out_dir=str(tmp_path / "straight")))
    expected = shard_contents(write_ode_pairs(straight, progress=False))

    cfg = from_dict(OdeConfig, ode_recipe(root))
    real_save = checkpoint.save_tensors_atomic
    calls = []

    def dies_on_second_shard(tensors, path, metadata=None):
        calls.append(path.name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while writing shard 1
        return real_save(tensors, path, metadata)

    monkeypatch.setattr("diagvid.train.checkpoint.save_tensors_atomic", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        write_ode_pairs(cfg, progress=False)
    monkeypatch.undo()
    out = root / "ode"
    assert sorted(shard_contents(out)) == ["shard-00000.safetensors"]
    with pytest.raises(ValueError, match="incomplete"):
        OdeShards(out)
    first = (out / "shard-00000.safetensors").stat().st_mtime_ns
    write_ode_pairs(cfg, progress=False)
    assert same(shard_contents(out), expected)
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == first  # complete shards are skipped

    # a truncated shard and a stale temp file of a killed writer: the shard is written again
    (out / "shard-00001.safetensors").write_bytes((out / "shard-00001.safetensors").read_bytes()[:100])
    (out / ".shard-00002.safetensors.abc.tmp").write_bytes(b"partial")
    write_ode_pairs(cfg, progress=False)
    assert same(shard_contents(out), expected) and not list(out.glob(".*.tmp"))

    # more samples later: the folder is extended, the full shards stay as they are
    before = OdeShards(out).get(range(5))
    write_ode_pairs(from_dict(OdeConfig, ode_recipe(root, num_samples=6)), progress=False)
    extended = OdeShards(out)
    assert len(extended) == 6 and (out / "shard-00000.safetensors").stat().st_mtime_ns == first
    assert all(torch.equal(a, b) for a, b in zip(before, extended.get(range(5)), strict=True))


def test_bad_recipes_fail_before_compute(root, tmp_path):
    with pytest.raises(ValueError, match=r"student_steps=\[1000.0, 990.0\] map to teacher steps \[0, 0\]"):
        from_dict(OdeConfig, ode_recipe(root, student_steps=[1000.0, 990.0]))
    with pytest.raises(ValueError, match="store_dtype='half'; allowed"):
        from_dict(OdeConfig, ode_recipe(root, store_dtype="half"))
    with pytest.raises(ValueError, match="unknown config keys"):
        from_dict(OdeConfig, ode_recipe(root, guidence=2.0))
    with pytest.raises(ValueError, match=r"latent size \(frames=4, height=5"):
        write_ode_pairs(from_dict(OdeConfig, ode_recipe(root, latent_hw=[5, 4])), progress=False)
    # a folder written by another recipe is never mixed with this one
    write_ode_pairs(
        from_dict(OdeConfig, ode_recipe(root, out_dir=str(tmp_path), num_samples=1)), progress=False
    )
    with pytest.raises(ValueError, match="holds ODE pairs of another recipe"):
        write_ode_pairs(from_dict(OdeConfig, ode_recipe(root, out_dir=str(tmp_path), seed=1)), progress=False)


def test_a_pair_of_noise_experts_writes_the_pairs_of_its_sampler(root, tmp_path):
    from diagvid.model.experts import NoiseExperts
    from diagvid.model.weights import load_dit
    from diagvid.pretrained import load_text_encoder
    from diagvid.sampling import sample_euler
    from tests.distill_setup import tiny_dit_folder

    high = tiny_dit_folder(tmp_path / "high", seed=7)
    recipe = ode_recipe(root, out_dir=str(tmp_path / "pair"), num_samples=2, teacher_high=str(high))
    traj, ctx = OdeShards(write_ode_pairs(from_dict(OdeConfig, recipe), progress=False)).get([1])
    pair = NoiseExperts(load_dit(high), load_dit(root / "teacher"), 0.7)  # the toy expert's boundary
    noise = torch.randn((4, 4, 4, 4), generator=ode.seeded(0, "noise", 1))[None]
    null = load_text_encoder(root / "text").encode([""])[0]
    final, _ = sample_euler(pair, noise, ctx, null, num_steps=4, shift=3.0, guidance=2.0)
    assert torch.allclose(traj[0, -1], final[0], atol=1e-5)
    alone, _ = sample_euler(
        load_dit(root / "teacher"), noise, ctx, null, num_steps=4, shift=3.0, guidance=2.0
    )
    assert not torch.allclose(final, alone, atol=1e-3)  # the expert took the noisy steps


def test_the_expert_fields_keep_old_recipes_and_are_checked(root):
    # the fingerprint of a one-teacher recipe is the one written before the experts existed (folders of
    # ODE pairs made then stay valid); the default boundary and its value are one recipe
    assert OdeConfig().recipe_hash() == "6a84248600d100d1"
    assert OdeConfig(teacher="toy/teacher-deep", guidance=2.0).recipe_hash() == "78eadaeb6e136ecf"
    pair = OdeConfig(teacher_high="toy/teacher-high")
    assert (
        pair.recipe_hash() == OdeConfig(teacher_high="toy/teacher-high", teacher_boundary=0.7).recipe_hash()
    )
    assert pair.recipe_hash() not in (OdeConfig().recipe_hash(), OdeConfig(teacher_high="x").recipe_hash())
    with pytest.raises(ValueError, match=r"teacher_boundary=0\.6 only means something with teacher_high"):
        from_dict(OdeConfig, ode_recipe(root, teacher_boundary=0.6))
    with pytest.raises(ValueError, match=r"teacher_boundary=1.0 must be a noise level in \(0, 1\)"):
        from_dict(OdeConfig, ode_recipe(root, teacher_high="toy/teacher-high", teacher_boundary=1.0))
