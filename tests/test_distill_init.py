"""`diagvid train init`: the causal student regressed onto the teacher's ODE pairs."""

from __future__ import annotations

import json

import pytest
import torch

from diagvid.config import from_dict
from diagvid.train.checkpoint import load_checkpoint
from diagvid.train.loop import export_model
from diagvid.train.ode_init import InitConfig, train_init
from tests.distill_setup import codecs_and_pairs, init_recipe


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return codecs_and_pairs(tmp_path_factory.mktemp("init"), num_samples=4)


def losses(run):
    return [json.loads(x)["loss"] for x in (run / "log.jsonl").read_text().splitlines()]


def test_loss_decreases_on_a_fixed_set(root, tmp_path):
    cfg = from_dict(InitConfig, init_recipe(root, tmp_path / "run", steps=30, batch_size=4, ckpt_every=30))
    run = train_init(cfg, progress=False)
    got = losses(run)
    assert len(got) == 30
    assert sum(got[-5:]) / 5 < 0.5 * sum(got[:5]) / 5, got


def test_resume_and_export(root, tmp_path):
    from diagvid.model.weights import load_dit

    straight = train_init(from_dict(InitConfig, init_recipe(root, tmp_path / "a")), progress=False)
    resumed = from_dict(InitConfig, init_recipe(root, tmp_path / "b"))
    train_init(resumed, max_steps=2, progress=False)
    train_init(resumed, progress=False)
    a, b = load_checkpoint(straight / "checkpoint.pt"), load_checkpoint(tmp_path / "b/checkpoint.pt")
    assert a["step"] == b["step"] == 4 and losses(straight) == losses(tmp_path / "b")
    for part in ("generator", "ema"):
        assert all(torch.equal(v, b["state"][part][k]) for k, v in a["state"][part].items()), part
    model = load_dit(export_model(straight, tmp_path / "student"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in a["state"]["ema"].items())


def test_bad_recipes_fail_before_compute(root, tmp_path):
    with pytest.raises(
        ValueError, match=r"frames_per_chunk=3 does not divide the 4 latent frames.*\[1, 2, 4\]"
    ):
        train_init(from_dict(InitConfig, init_recipe(root, tmp_path, frames_per_chunk=3)), progress=False)
    with pytest.raises(ValueError, match="global_batch=3 must be a positive multiple of batch_size=2"):
        from_dict(InitConfig, init_recipe(root, tmp_path, global_batch=3))
    with pytest.raises(ValueError, match=r"parallel\.parallel='zero'; allowed"):
        from_dict(InitConfig, init_recipe(root, tmp_path, parallel={"parallel": "zero"}))
    with pytest.raises(FileNotFoundError, match=r"no manifest\.json"):
        train_init(from_dict(InitConfig, init_recipe(root, tmp_path, data_dir=str(tmp_path))), progress=False)
    assert not (tmp_path / "checkpoint.pt").exists()


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # CPU rms_norm under autocast
def test_activation_checkpointing_changes_nothing_and_bf16_runs(root, tmp_path):
    plain = train_init(from_dict(InitConfig, init_recipe(root, tmp_path / "a", steps=2)), progress=False)
    recomputed = init_recipe(root, tmp_path / "b", steps=2)
    recomputed["parallel"] = {"device": "cpu", "activation_checkpointing": True}
    train_init(from_dict(InitConfig, recomputed), progress=False)
    assert losses(plain) == losses(tmp_path / "b")
    a, b = load_checkpoint(plain / "checkpoint.pt"), load_checkpoint(tmp_path / "b/checkpoint.pt")
    assert all(torch.equal(v, b["state"]["generator"][k]) for k, v in a["state"]["generator"].items())
    bf16 = init_recipe(root, tmp_path / "c", steps=2)
    bf16["parallel"] = {"device": "cpu", "precision": "bf16"}
    got = losses(train_init(from_dict(InitConfig, bf16), progress=False))
    assert got == pytest.approx(losses(plain), rel=0.1)
