"""Motion-classifier training: labels come from the captions, the run resumes exactly, and it exports."""

from __future__ import annotations

import json

import pytest
import torch

from diagvid.config import from_dict, to_dict
from diagvid.model.motion import MotionClassifier, prompt_label
from diagvid.train.checkpoint import load_checkpoint
from diagvid.train.motion import MotionTrainConfig, labelled_latents, train_motion


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    from diagvid.model.vae import WanVAE, preset

    root = tmp_path_factory.mktemp("codec")
    torch.manual_seed(0)
    WanVAE(preset("tiny")).save(root / "vae")
    return root / "vae"


def recipe(vae_folder, out_dir, **overrides) -> MotionTrainConfig:
    raw = {
        "model": {"in_dim": 4, "frames": 2, "width": 8, "groups": 2, "freq_dim": 8, "hidden": 16},
        "data": {
            "num_frames": 5,
            "size": 16,
            "num_clips": 8,
            "shard_size": 4,
            "cache_dir": str(out_dir / "cache"),
        },
        "vae": str(vae_folder),
        "heldout": 2,
        "steps": 4,
        "batch_size": 3,
        "warmup": 1,
        "out_dir": str(out_dir / "run"),
        "log_every": 1,
        "ckpt_every": 1,
        "eval_every": 2,
    }
    return from_dict(MotionTrainConfig, {**raw, **overrides})


def test_labels_follow_the_captions_and_mixed_clips_are_left_out(vae_folder, tmp_path):
    from diagvid.pretrained import load_vae
    from diagvid.train.teacher import build_latent_cache

    cfg = recipe(vae_folder, tmp_path)
    latents, captions = build_latent_cache(cfg.data, load_vae(cfg.vae))
    x, y, hx, hy = labelled_latents(cfg)
    want = [prompt_label(c, cfg.model.classes) for c in captions]
    kept = [w for w in want if w >= 0]
    assert torch.equal(torch.cat([y, hy]), torch.tensor(kept))
    assert len(hy) == 2 and x.shape[1:] == (4, 2, 4, 4)
    rows = [i for i, w in enumerate(want) if w >= 0]
    torch.testing.assert_close(torch.cat([x, hx]), latents[rows][:, :, :2])
    with pytest.raises(ValueError, match=r"raise data\.num_clips"):
        labelled_latents(recipe(vae_folder, tmp_path, heldout=len(kept)))


def test_resume_is_bit_identical_and_the_export_loads(vae_folder, tmp_path):
    straight = train_motion(recipe(vae_folder, tmp_path / "a"), progress=False)
    train_motion(recipe(vae_folder, tmp_path / "b"), max_steps=1, progress=False)
    resumed = train_motion(recipe(vae_folder, tmp_path / "b"), progress=False)
    a = load_checkpoint(tmp_path / "a/run/checkpoint.pt")["state"]
    b = load_checkpoint(tmp_path / "b/run/checkpoint.pt")["state"]
    for part in ("net", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    x = torch.randn(2, 4, 2, 4, 4)
    sigma = torch.tensor([0.3, 0.9])
    torch.testing.assert_close(straight(x, sigma), resumed(x, sigma), rtol=0, atol=0)
    # latents the caller already read (the CLI reuses them for its held-out accuracy) train the same model
    cfg = recipe(vae_folder, tmp_path / "c")
    given = train_motion(cfg, progress=False, data=labelled_latents(cfg))
    torch.testing.assert_close(given(x, sigma), straight(x, sigma), rtol=0, atol=0)
    lines = [json.loads(line) for line in (tmp_path / "b/run/log.jsonl").read_text().splitlines()]
    assert any("acc_0.5" in line.get("eval", {}) for line in lines) and lines[-1]["step"] == 4
    straight.save(tmp_path / "export")
    back = MotionClassifier.load(tmp_path / "export")
    torch.testing.assert_close(back(x, sigma), straight(x, sigma), rtol=0, atol=0)


def test_a_window_classifier_learns_on_windows_across_its_span(vae_folder, tmp_path):
    """9-frame clips have 3 latent frames. Windows [1] read frames 1-2 only, so frame 0 cannot change the
    training; windows [0, 1] also read frame 0 at the draws that start there."""
    axes = {
        "target": "axis-speed",
        "classes": [
            "horizontal slow",
            "horizontal fast",
            "vertical slow",
            "vertical fast",
            "diagonal slow",
            "diagonal fast",
        ],
    }

    def run(windows: list[int], name: str, edit=None) -> MotionClassifier:
        base = recipe(vae_folder, tmp_path, heldout=1)
        raw = to_dict(base)
        raw["model"].update(axes, windows=windows)
        raw["data"]["num_frames"] = 9
        raw["out_dir"] = str(tmp_path / name)
        cfg = from_dict(MotionTrainConfig, raw)
        x, y, hx, hy = labelled_latents(cfg)
        assert x.shape[2] == cfg.model.span == windows[-1] + 2
        if edit is not None:
            x = x.clone()
            x[:, :, edit] = 5.0
        return train_motion(cfg, progress=False, data=(x, y, hx, hy))

    probe = torch.randn(2, 4, 3, 4, 4)
    sigma = torch.tensor([0.3, 0.9])
    later = run([1], "later")
    torch.testing.assert_close(
        run([1], "later-edited", edit=0)(probe, sigma), later(probe, sigma), rtol=0, atol=0
    )
    both = run([0, 1], "both")
    assert not torch.allclose(run([0, 1], "both-edited", edit=0)(probe, sigma), both(probe, sigma))
    assert not torch.allclose(run([0, 1], "both-edited-last", edit=2)(probe, sigma), both(probe, sigma))


def test_a_realness_discriminator_learns_world_clips_against_the_sampler_s(vae_folder, tmp_path, monkeypatch):
    """8 cached clips labelled real, 5 sampled ones generated; 2 of each held out, the 3 sampled training
    clips repeated twice to balance the 6 real ones. The sampled clips are the sampler's, sampled once."""
    from diagvid import pretrained
    from diagvid.model.weights import load_dit
    from diagvid.pretrained import load_text_encoder
    from diagvid.sampling import sample_euler
    from diagvid.train.motion import _realness_split
    from tests.distill_setup import codecs

    models = codecs(tmp_path / "models")
    sampler = {
        "count": 5,
        "batch_size": 2,
        "teacher": str(models / "teacher"),
        "teacher_high": None,
        "text": str(models / "text"),
        "num_steps": 3,
        "motion": None,
        "out_dir": str(tmp_path / "sampled"),
    }
    model = {"in_dim": 4, "frames": 2, "width": 8, "groups": 2, "freq_dim": 8, "hidden": 16}
    cfg = recipe(vae_folder, tmp_path, model={**model, "target": "realness"}, sampler=sampler, heldout=4)
    x, y, hx, hy = labelled_latents(cfg, progress=False)
    real, gen = cfg.model.classes.index("real"), cfg.model.classes.index("generated")
    assert y.tolist() == [real] * 6 + [gen] * 6 and hy.tolist() == [real] * 2 + [gen] * 2
    assert torch.equal(x[6:9], x[9:12])

    # clip 4 (the third batch, alone): the sampler from the noise seeded 10_000_000 + 4
    blob = torch.load(tmp_path / "sampled/sampled-000004.pt", weights_only=True)
    caption = json.loads(blob["captions"])
    text, teacher = load_text_encoder(models / "text"), load_dit(models / "teacher")
    draws = torch.Generator().manual_seed(10_000_004)  # the start noise, then the ancestral steps' noise
    noise = torch.randn((1, 4, 2, 4, 4), generator=draws)
    want, _ = sample_euler(
        teacher,
        noise,
        text.encode(caption)[0],
        text.encode([""])[0],
        num_steps=3,
        guidance=2.0,
        eta=1.0,
        generator=draws,
    )
    torch.testing.assert_close(blob["latents"].float(), want, atol=2e-3, rtol=0)
    torch.testing.assert_close(hx[-1], want[0].half().float())

    # read back, not sampled again; other settings in the same folder are refused
    monkeypatch.setattr(pretrained, "load_teacher", lambda *a, **k: pytest.fail("sampled again"))
    again = labelled_latents(cfg)
    assert all(torch.equal(a, b) for a, b in zip(again, (x, y, hx, hy), strict=True))
    other = recipe(
        vae_folder, tmp_path, model={**model, "target": "realness"}, sampler={**sampler, "eta": 0.0}
    )
    with pytest.raises(ValueError, match="other sampler settings"):
        labelled_latents(other)
    # a larger count samples the clips it adds, the last batch of the smaller count whole again
    monkeypatch.undo()
    more = recipe(
        vae_folder, tmp_path, model={**model, "target": "realness"}, sampler={**sampler, "count": 6}
    )
    labelled_latents(more, progress=False)
    grown = torch.load(tmp_path / "sampled/sampled-000004.pt", weights_only=True)
    assert len(grown["latents"]) == 2 and json.loads(grown["captions"])[:1] == caption
    with pytest.raises(ValueError, match=r"raise sampler\.count"):
        _realness_split(cfg, x[:8], x[:2], torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"sampler\.count=2: a realness discriminator"):
        recipe(
            vae_folder,
            tmp_path,
            model={**model, "target": "realness"},
            sampler={**sampler, "count": 2},
            heldout=4,
        )
    net = train_motion(cfg, progress=False, data=(x, y, hx, hy))
    assert net(hx, torch.full((4,), 0.5)).shape == (4, 2)


def test_a_caption_aware_discriminator_labels_each_side_by_its_caption_s_direction():
    """World clip i is "real <its direction>", sampled clip i (sampled for caption i) "generated <the same>";
    captions without one direction are left out on both sides; half of heldout from the end of each side."""
    from diagvid.train.motion import _realness_split

    captions = [
        "a red circle moves left",
        "a red circle moves up and a blue square moves down",  # two directions: no class
        "a green square moves up fast",
        "a blue circle moves left slow",
        "a red circle moves down-right",
        "a green circle moves up",
    ]
    cfg = from_dict(
        MotionTrainConfig, {"model": {"target": "realness-direction"}, "heldout": 2, "sampler": {"count": 4}}
    )
    real = torch.arange(6.0).view(6, 1, 1, 1, 1)
    fake = 10 + torch.arange(4.0).view(4, 1, 1, 1, 1)  # sampled for captions 0-3
    labels = torch.tensor([prompt_label(c, cfg.model.classes, cfg.model.target) for c in captions])
    x, y, hx, hy = _realness_split(cfg, real, fake, labels)
    name = [cfg.model.classes[i] for i in y.tolist()]
    # real: clips 0, 2, 3, 4 train, 5 held out; sampled: 10, 12 train (repeated to 4 // 2 = 2x), 13 held out
    assert x.flatten().tolist() == [0, 2, 3, 4, 10, 12, 10, 12]
    assert (
        name
        == ["real left", "real up", "real left", "real down-right"] + ["generated left", "generated up"] * 2
    )
    assert hx.flatten().tolist() == [5, 13]
    assert [cfg.model.classes[i] for i in hy.tolist()] == ["real up", "generated left"]
