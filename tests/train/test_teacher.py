"""Teacher training: the loss learns, a resumed run is bit-identical to an uninterrupted one."""

from __future__ import annotations

import json
import math

import pytest
import torch

from diagvid.config import from_dict
from diagvid.train.checkpoint import load_checkpoint
from diagvid.train.teacher import TeacherConfig, export_teacher, flow_matching_loss, train_teacher


@pytest.fixture(scope="module")
def codec_folders(tmp_path_factory):
    """A tiny VAE (16 px -> 4x4 latents) and a toy text encoder over the world's vocabulary, on disk."""
    from diagvid.model.text import ToyTextConfig, ToyTextEncoder
    from diagvid.model.vae import WanVAE, preset
    from diagvid.world import VOCABULARY

    root = tmp_path_factory.mktemp("codecs")
    torch.manual_seed(0)
    WanVAE(preset("tiny")).save(root / "vae")
    ToyTextEncoder(VOCABULARY, ToyTextConfig(d_model=12, num_layers=1, num_heads=2, d_ff=16)).save(
        root / "text"
    )
    return root


def tiny_recipe(codec_folders, out_dir) -> TeacherConfig:
    return from_dict(
        TeacherConfig,
        {
            "model": "tiny",
            "model_overrides": {"text_len": 16},
            "vae": str(codec_folders / "vae"),
            "text": str(codec_folders / "text"),
            "data": {
                "num_frames": 5,
                "size": 16,
                "num_clips": 6,
                "shard_size": 4,
                "cache_dir": str(out_dir / "cache"),
            },
            "optim": {"lr": 1e-3, "warmup": 1, "decay_steps": 2, "final_lr_ratio": 0.5},
            "steps": 4,
            "batch_size": 2,
            "caption_dropout": 0.5,
            "frame_noise": 0.5,
            "out_dir": str(out_dir / "run"),
            "log_every": 1,
            "ckpt_every": 1,
            "val_clips": 2,
            "eval_every": 2,
        },
    )


@pytest.mark.parametrize(("contrast", "contrast_with"), [(0.0, "other"), (0.5, "other"), (0.5, "opposite")])
def test_resume_is_bit_identical(codec_folders, tmp_path, contrast, contrast_with):
    straight = tiny_recipe(codec_folders, tmp_path / "a")
    straight.direction_contrast, straight.contrast_with = contrast, contrast_with
    train_teacher(straight, progress=False)
    resumed = tiny_recipe(codec_folders, tmp_path / "b")
    resumed.direction_contrast, resumed.contrast_with = contrast, contrast_with
    train_teacher(resumed, max_steps=2, progress=False)
    assert load_checkpoint(tmp_path / "b/run/checkpoint.pt")["step"] == 2
    train_teacher(resumed, progress=False)
    a = load_checkpoint(tmp_path / "a/run/checkpoint.pt")
    b = load_checkpoint(tmp_path / "b/run/checkpoint.pt")
    assert a["step"] == b["step"] == 4
    for part in ("model", "ema"):
        for key, value in a["state"][part].items():
            assert torch.equal(value, b["state"][part][key]), f"{part}.{key} differs after resume"
    # the log holds every step exactly once, losses equal
    log_a = [json.loads(x) for x in (tmp_path / "a/run/log.jsonl").read_text().splitlines()]
    log_b = [json.loads(x) for x in (tmp_path / "b/run/log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log_b if "loss" in r] == [1, 2, 3, 4]
    assert [r["loss"] for r in log_a if "loss" in r] == [r["loss"] for r in log_b if "loss" in r]
    # the learning rate decays linearly over the last 2 of 4 steps to half, across the restart too
    assert [r["lr"] for r in log_b if "lr" in r] == pytest.approx([1e-3, 1e-3, 7.5e-4, 5e-4])
    assert [r for r in log_a if "eval" in r] == [r for r in log_b if "eval" in r]  # evaluation draws no RNG
    gaps = [r.get("direction_gap") for r in log_b if "loss" in r]
    assert all(g is not None for g in gaps) if contrast else all(g is None for g in gaps)


def test_export_writes_a_loadable_model(codec_folders, tmp_path):
    from diagvid.model.weights import load_dit, read_noise_range

    cfg = tiny_recipe(codec_folders, tmp_path)
    run = train_teacher(cfg, max_steps=1, progress=False)
    folder = export_teacher(run, tmp_path / "teacher")
    model = load_dit(folder)
    ema = load_checkpoint(run / "checkpoint.pt")["state"]["ema"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ema.items())
    assert read_noise_range(folder) == (0.0, 1.0)  # trained at every level: nothing to record


def test_a_noise_expert_run_exports_its_noise_range(codec_folders, tmp_path):
    from diagvid.model.weights import read_noise_range

    cfg = tiny_recipe(codec_folders, tmp_path)
    cfg.sigma_min = 0.7
    run = train_teacher(cfg, max_steps=1, progress=False)
    assert read_noise_range(export_teacher(run, tmp_path / "high")) == (0.7, 1.0)


class _Spy(torch.nn.Module):
    """Stands in for the DiT: records what the loss feeds it and predicts zero velocity."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x_t, t, ctx, attention):
        assert attention == "full"
        self.seen = (x_t, t)
        return torch.zeros_like(x_t)


@pytest.mark.parametrize("frame_noise", [0.0, 1.0])
def test_frame_noise_noises_each_latent_frame_at_its_own_level(frame_noise):
    b, f = 3, 5
    x0 = torch.full((b, 4, f, 16, 16), 5.0)
    spy = _Spy()
    flow_matching_loss(
        spy,
        x0,
        torch.zeros(b, 2, 3),
        shift=3.0,
        gen=torch.Generator().manual_seed(0),
        frame_noise=frame_noise,
    )
    x_t, t = spy.seen
    sigma = (t / 1000).reshape(b, -1)
    if frame_noise == 0:
        assert t.shape == (b,)  # one level a clip, as the sampler sees
        sigma = sigma.expand(b, f)
    else:
        assert t.shape == (b, f) and (sigma.std(dim=1) > 0.01).all()  # every frame its own level
    assert ((sigma > 0) & (sigma < 1)).all()
    # x_t = (1 - sigma) x0 + sigma noise, frame by frame: mean (1 - sigma) 5, spread sigma
    mean, std = x_t.mean(dim=(1, 3, 4)), x_t.std(dim=(1, 3, 4))
    torch.testing.assert_close(mean, 5 * (1 - sigma), atol=0.15, rtol=0)
    torch.testing.assert_close(std, sigma, atol=0.0, rtol=0.15)


class _Fixed(torch.nn.Module):
    """Stands in for the DiT: records its input and predicts a fixed velocity that can take a gradient."""

    def __init__(self, pred: torch.Tensor) -> None:
        super().__init__()
        self.pred = torch.nn.Parameter(pred)
        self.seen: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x_t, t, ctx, attention):
        self.seen = (x_t, t)
        return self.pred


@pytest.mark.parametrize("frame_noise", [0.0, 1.0])
def test_clean_first_frame_trains_image_to_video_on_the_frames_after_it(frame_noise):
    """The clips drawn for image-to-video get latent frame 0 clean at timestep 0 and no loss (nor gradient) on
    it; every other frame and clip is noised and scored exactly as without the option."""
    from diagvid.train.teacher import noised_latents

    b, f = 6, 3
    x0 = torch.randn(b, 2, f, 4, 4, generator=torch.Generator().manual_seed(1))
    model = _Fixed(torch.randn(b, 2, f, 4, 4, generator=torch.Generator().manual_seed(2)))
    loss = flow_matching_loss(
        model,
        x0,
        torch.zeros(b, 2, 3),
        shift=3.0,
        gen=torch.Generator().manual_seed(5),
        frame_noise=frame_noise,
        clean_first_frame=0.5,
    )
    # the same draws, made here in the order the loss makes them: levels and noise, then who is clean
    gen = torch.Generator().manual_seed(5)
    x_ref, t_ref, target = noised_latents(x0, 3.0, gen, frame_noise)
    clean = torch.rand(b, generator=gen) < 0.5
    assert clean.any() and (~clean).any()
    t_ref = t_ref[:, None].expand(b, f) if t_ref.dim() == 1 else t_ref
    x_t, t = model.seen
    assert t.shape == (b, f) and (t[clean, 0] == 0).all() and torch.equal(t[~clean], t_ref[~clean])
    assert torch.equal(t[:, 1:], t_ref[:, 1:])
    assert torch.equal(x_t[clean, :, 0], x0[clean, :, 0]) and torch.equal(x_t[~clean], x_ref[~clean])
    assert torch.equal(x_t[:, :, 1:], x_ref[:, :, 1:])

    err = (model.pred.detach() - target).pow(2)
    kept = [err[i, :, j].mean() for i in range(b) for j in range(f) if not (clean[i] and j == 0)]
    torch.testing.assert_close(loss, torch.stack(kept).mean())
    loss.backward()
    assert not model.pred.grad[clean, :, 0].any() and model.pred.grad[~clean, :, 0].abs().min() > 0


@torch.no_grad()
def test_caption_sensitivity_as_image_to_video_scores_the_frames_after_the_first(codec_folders):
    """A model that reads its caption on frame 0 alone is caption-sensitive as text-to-video and blind as
    image-to-video, where frame 0 is given clean and left out of the loss."""
    from diagvid.pretrained import load_text_encoder
    from diagvid.train.teacher import caption_sensitivity

    class FirstFrameReader(torch.nn.Module):
        def forward(self, x_t, t, ctx, attention):
            self.seen = (x_t, t)
            out = torch.zeros_like(x_t)
            out[:, :, 0] = ctx.float().mean(dim=(1, 2)).view(-1, 1, 1, 1) * 100
            return out

    text = load_text_encoder(str(codec_folders / "text"))
    x0 = torch.randn(2, 4, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    captions = ["a red circle moves left fast", "a blue square moves up slowly"]
    reader = FirstFrameReader()
    t2v = caption_sensitivity(reader, x0, captions, text, sigmas=(0.9,))
    assert abs(t2v["direction"]) > 1e-4 and abs(t2v["colour"]) > 1e-4
    i2v = caption_sensitivity(reader, x0, captions, text, sigmas=(0.9,), clean_first_frame=True)
    assert all(v == 0.0 for v in i2v.values())
    x_t, t = reader.seen
    assert torch.equal(x_t[:, :, 0], x0[:, :, 0]) and (t[:, 0] == 0).all() and (t[:, 1:] == 900).all()


@pytest.mark.parametrize("frame_noise", [0.0, 1.0])
def test_a_sigma_range_restricts_the_shifted_levels_to_it(frame_noise):
    from diagvid.sampling import shift_sigma, unshift_sigma
    from diagvid.train.teacher import noised_latents

    u = torch.rand(100, dtype=torch.float64)
    torch.testing.assert_close(unshift_sigma(shift_sigma(u, 3.0), 3.0), u)
    x0 = torch.zeros(4000, 1, 2, 1, 1)
    _, t, _ = noised_latents(x0, 3.0, torch.Generator().manual_seed(0), frame_noise, sigmas=(0.7, 0.9))
    sigma = t / 1000
    assert sigma.min() >= 0.7 - 1e-6 and sigma.max() <= 0.9 + 1e-6
    # the shifted density restricted to the range: P(sigma <= 0.8 | 0.7 <= sigma <= 0.9) under shift 3
    u = [unshift_sigma(s, 3.0) for s in (0.7, 0.8, 0.9)]
    expected = (u[1] - u[0]) / (u[2] - u[0])
    assert abs((sigma <= 0.8).float().mean().item() - expected) < 0.03
    # the full range draws the very levels the default does (runs recorded before the option resume alike)
    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    full = noised_latents(x0[:8], 3.0, gen_a, frame_noise, sigmas=(0.0, 1.0))
    default = noised_latents(x0[:8], 3.0, gen_b, frame_noise)
    for a, b in zip(full, default, strict=True):
        assert torch.equal(a, b)


def test_bad_recipes_fail_before_compute(codec_folders, tmp_path):
    with pytest.raises(ValueError, match="num_frames=6 must be 1 \\+ 4k"):
        from_dict(TeacherConfig, {"data": {"num_frames": 6}})
    with pytest.raises(ValueError, match="unknown config keys"):
        from_dict(TeacherConfig, {"stepz": 3})
    cfg = tiny_recipe(codec_folders, tmp_path)
    cfg.model_overrides = {"text_len": 16, "in_dim": 8}
    with pytest.raises(ValueError, match="in_dim=8 but the VAE makes 4 latent channels"):
        train_teacher(cfg, progress=False)
    assert not (tmp_path / "cache").exists()  # refused before any clip was encoded
    with pytest.raises(ValueError, match=r"optim.decay_steps=7 must be in \[0, steps=6\]"):
        from_dict(TeacherConfig, {"steps": 6, "optim": {"decay_steps": 7}})
    with pytest.raises(ValueError, match=r"frame_noise=1.5 must be in \[0, 1\]"):
        from_dict(TeacherConfig, {"frame_noise": 1.5})
    with pytest.raises(ValueError, match=r"direction_contrast=-1.0 must be >= 0"):
        from_dict(TeacherConfig, {"direction_contrast": -1.0})
    with pytest.raises(ValueError, match=r"anchor_init=-1.0 must be a finite number >= 0"):
        from_dict(TeacherConfig, {"anchor_init": -1.0})
    with pytest.raises(ValueError, match=r"clean_first_frame=2.0 must be in \[0, 1\]"):
        from_dict(TeacherConfig, {"clean_first_frame": 2.0})
    with pytest.raises(ValueError, match="clean_first_frame and direction_contrast cannot be combined"):
        from_dict(TeacherConfig, {"clean_first_frame": 0.5, "direction_contrast": 0.1})
    with pytest.raises(ValueError, match=r"contrast_temperature=0.0 must be > 0"):
        from_dict(TeacherConfig, {"contrast_temperature": 0.0})
    with pytest.raises(ValueError, match=r"contrast_with='reverse'; allowed: \('other', 'opposite'\)"):
        from_dict(TeacherConfig, {"contrast_with": "reverse"})
    with pytest.raises(
        ValueError, match=r"sigma_min=0.8, sigma_max=0.5: need 0 <= sigma_min < sigma_max <= 1"
    ):
        from_dict(TeacherConfig, {"sigma_min": 0.8, "sigma_max": 0.5})
    with pytest.raises(ValueError, match=r"val_clips=6 must be in \[0, 6\)"):
        from_dict(TeacherConfig, {"val_clips": 6, "data": {"num_clips": 6}})


def test_validation_loss_is_logged_and_init_from_starts_from_given_weights(codec_folders, tmp_path):
    from diagvid.model.weights import load_dit

    train_teacher(tiny_recipe(codec_folders, tmp_path / "a"), progress=False)
    evals = [
        r["eval"]
        for r in map(json.loads, (tmp_path / "a/run/log.jsonl").read_text().splitlines())
        if "eval" in r
    ]
    assert len(evals) == 2 and all(e["val_loss"] > 0 for e in evals)
    assert "i2v_direction_gap" not in evals[0]
    i2v = tiny_recipe(codec_folders, tmp_path / "i2v")
    i2v.clean_first_frame, i2v.steps, i2v.optim.decay_steps = 0.5, 2, 0
    train_teacher(i2v, progress=False)
    logged = (tmp_path / "i2v/run/log.jsonl").read_text().splitlines()
    (last,) = [r["eval"] for r in map(json.loads, logged) if "eval" in r]
    assert math.isfinite(last["i2v_direction_gap"]) and last["val_loss"] > 0
    folder = export_teacher(tmp_path / "a/run", tmp_path / "teacher")

    cfg = tiny_recipe(codec_folders, tmp_path / "b")
    cfg.init_from, cfg.optim.lr, cfg.optim.decay_steps, cfg.steps = str(folder), 0.0, 0, 1
    run = train_teacher(cfg, progress=False)
    started = load_checkpoint(run / "checkpoint.pt")["state"]["model"]
    for name, tensor in load_dit(folder).state_dict().items():
        assert torch.equal(started[name], tensor), name

    cfg.model_overrides = {"text_len": 16, "num_layers": 4}  # twice as deep: grown from the folder's model
    cfg.out_dir = str(tmp_path / "d")
    started = load_checkpoint(train_teacher(cfg, progress=False) / "checkpoint.pt")["state"]["model"]
    assert torch.equal(
        started["blocks.2.ffn.0.weight"], load_dit(folder).state_dict()["blocks.1.ffn.0.weight"]
    )
    assert not started["blocks.3.ffn.2.weight"].any()

    cfg.model_overrides = {"text_len": 16, "num_layers": 3}
    cfg.out_dir = str(tmp_path / "c")
    with pytest.raises(ValueError, match=r"init_from=.* is a .* model; this run trains"):
        train_teacher(cfg, progress=False)


@torch.no_grad()
def test_a_grown_model_computes_what_the_shallow_one_did():
    from dataclasses import replace

    from diagvid.model.dit import WanDiT, preset
    from diagvid.train.teacher import grown
    from tests.conftest import randomize, tiny_inputs

    torch.manual_seed(0)
    shallow = randomize(WanDiT(preset("tiny"))).eval()
    deep = grown(shallow, replace(shallow.cfg, num_layers=3 * shallow.cfg.num_layers)).eval()
    assert deep.cfg.num_layers == 6 and not deep.blocks[4].cross_attn.o.weight.any()
    x, t, ctx = tiny_inputs(shallow)
    for mode in ("full", "causal"):
        torch.testing.assert_close(
            deep(x, t, ctx, attention=mode, frames_per_chunk=2),
            shallow(x, t, ctx, attention=mode, frames_per_chunk=2),
            rtol=0,
            atol=1e-6,
        )
    for bad in (replace(shallow.cfg, num_layers=3), replace(shallow.cfg, num_layers=4, dim=64)):
        with pytest.raises(ValueError, match="only a depth that is a multiple of its own"):
            grown(shallow, bad)


def test_a_run_with_a_time_anchor_starts_from_a_model_without_one():
    """`starting_state`: a zero first_frame_embedding (and growth) keep the start's function; a start that has
    the anchor cannot go into a run that would drop it."""
    from dataclasses import replace

    from diagvid.model.dit import WanDiT, preset
    from diagvid.train.teacher import starting_state
    from tests.conftest import randomize, tiny_inputs

    torch.manual_seed(0)
    start = randomize(WanDiT(preset("tiny"))).eval()
    x, t, ctx = tiny_inputs(start)
    for layers in (start.cfg.num_layers, 2 * start.cfg.num_layers):
        cfg = replace(start.cfg, num_layers=layers, first_frame_embedding=True)
        run = WanDiT(cfg).eval()
        run.load_state_dict(starting_state(start, cfg))
        assert not run.first_frame.any()
        torch.testing.assert_close(run(x, t, ctx), start(x, t, ctx), rtol=0, atol=1e-6)
    with pytest.raises(
        ValueError, match="init_from='x' has a first_frame_embedding; this run's model has none"
    ):
        starting_state(run, replace(start.cfg, num_layers=run.cfg.num_layers), where="init_from='x'")


def test_a_run_with_a_position_table_starts_from_a_model_without_one():
    """`starting_state` gives a run's position table zeros (the start's function) or seeded noise, and refuses
    to drop one or to change its grid."""
    from dataclasses import replace

    from diagvid.model.dit import WanDiT, preset
    from diagvid.train.teacher import starting_state
    from tests.conftest import randomize, tiny_inputs

    torch.manual_seed(0)
    start = randomize(WanDiT(preset("tiny"))).eval()
    x, t, ctx = tiny_inputs(start)  # a token grid of 2 x 3
    cfg = replace(start.cfg, position_grid=(2, 3), first_frame_embedding=True)
    run = WanDiT(cfg).eval()
    run.load_state_dict(starting_state(start, cfg))
    assert not run.position.any()
    torch.testing.assert_close(run(x, t, ctx), start(x, t, ctx), rtol=0, atol=0)
    noisy = starting_state(start, cfg, anchor_rms=0.5, seed=4)
    assert noisy["position"].shape == (6, cfg.dim) and 0.4 < noisy["position"].pow(2).mean().sqrt() < 0.6
    assert torch.equal(noisy["position"], starting_state(start, cfg, anchor_rms=0.5, seed=4)["position"])
    assert not torch.equal(noisy["position"], starting_state(start, cfg, anchor_rms=0.5, seed=5)["position"])
    with pytest.raises(ValueError, match="'x' has a position_grid; this run's model has none"):
        starting_state(run, replace(cfg, position_grid=None), where="'x'")
    with pytest.raises(ValueError, match=r"'x' has position_grid=\(2, 3\); this run's model has \(3, 2\)"):
        starting_state(run, replace(cfg, position_grid=(3, 2)), where="'x'")


def test_a_run_with_a_motion_stem_starts_from_a_model_without_one():
    """`starting_state` gives a run's motion stem zeros (the start's function, grown or not) and refuses to drop
    one or to change its extent."""
    from dataclasses import replace

    from diagvid.model.dit import WanDiT, preset
    from diagvid.train.teacher import starting_state
    from tests.conftest import randomize, tiny_inputs

    torch.manual_seed(0)
    start = randomize(WanDiT(preset("tiny"))).eval()
    x, t, ctx = tiny_inputs(start)
    cfg = replace(start.cfg, num_layers=2 * start.cfg.num_layers, motion_stem=(2, 1))
    run = WanDiT(cfg).eval()
    run.load_state_dict(starting_state(start, cfg))
    assert run.motion_stem.weight.shape[2:] == (3, 4, 4) and not run.motion_stem.weight.any()
    torch.testing.assert_close(run(x, t, ctx), start(x, t, ctx), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="'x' has a motion_stem; this run's model has none"):
        starting_state(run, replace(cfg, motion_stem=None), where="'x'")
    with pytest.raises(ValueError, match=r"'x' has motion_stem=\(2, 1\); this run's model has \(1, 1\)"):
        starting_state(run, replace(cfg, motion_stem=(1, 1)), where="'x'")


def test_a_run_for_more_latent_channels_starts_from_the_narrower_model_widened():
    """A run whose model reads twice the start's latent channels (a codec widened by `widen_latent`), grown as
    well: the old channels' velocity is the start's whatever the new channels hold, the new ones' is zero;
    fewer channels than the start's are refused."""
    from dataclasses import replace

    from diagvid.model.dit import WanDiT, preset
    from diagvid.train.teacher import starting_state
    from tests.conftest import randomize, tiny_inputs

    torch.manual_seed(0)
    start = randomize(WanDiT(preset("tiny"))).eval()
    x, t, ctx = tiny_inputs(start)
    c = start.cfg.in_dim
    cfg = replace(start.cfg, in_dim=2 * c, out_dim=2 * c, num_layers=2 * start.cfg.num_layers)
    run = WanDiT(cfg).eval()
    run.load_state_dict(starting_state(start, cfg))
    wide_x = torch.cat([x, torch.randn_like(x)], dim=1)
    v = run(wide_x, t, ctx)
    torch.testing.assert_close(v[:, :c], start(x, t, ctx), rtol=0, atol=1e-6)
    assert not v[:, c:].any()
    with pytest.raises(ValueError, match=r"this run trains .*in_dim=" + str(c)):
        starting_state(run, start.cfg, where="'x'")


def test_latent_cache_is_keyed_by_the_vae(codec_folders, tmp_path):
    from diagvid.model.vae import WanVAE, preset
    from diagvid.train.teacher import build_latent_cache

    data = tiny_recipe(codec_folders, tmp_path).data
    vae = WanVAE.load(codec_folders / "vae")
    first, _ = build_latent_cache(data, vae)
    torch.manual_seed(1)
    other = WanVAE(preset("tiny"))
    second, _ = build_latent_cache(data, other)
    assert len(list((tmp_path / "cache").iterdir())) == 2  # one folder per VAE, never a stale reuse
    assert not torch.equal(first, second)
    again, _ = build_latent_cache(data, vae)
    assert torch.equal(first, again)


def test_caption_sensitivity_measures_what_the_model_reads(codec_folders):
    """A model that ignores its prompt scores 0 for every swap; a random DiT that reads the text scores > 0 for
    the words present and exactly 0 for a word class the captions do not contain."""
    from diagvid.model.dit import WanDiT, preset
    from diagvid.pretrained import load_text_encoder
    from diagvid.train.teacher import caption_sensitivity

    text = load_text_encoder(str(codec_folders / "text"))
    x0 = torch.randn(2, 4, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    captions = ["a red circle moves left fast", "a blue square moves up slowly"]
    blind = caption_sensitivity(_Spy(), x0, captions, text)  # predicts zero whatever the caption
    assert set(blind) == {"null", "direction", "speed", "colour"} and all(v == 0.0 for v in blind.values())

    torch.manual_seed(0)
    reader = WanDiT(preset("tiny", text_len=16))
    with torch.no_grad():
        for p in reader.parameters():  # Wan zero-inits the output head; give it something to say
            p.add_(0.2 * torch.randn_like(p))
    seen = caption_sensitivity(reader, x0, captions, text)
    assert all(abs(v) > 1e-4 for v in seen.values())
    no_motion = caption_sensitivity(reader, x0, ["a red circle", "a blue square"], text)
    assert no_motion["direction"] == no_motion["speed"] == 0.0 and abs(no_motion["colour"]) > 1e-4


def test_wrong_direction_changes_every_direction_word_and_nothing_else():
    from diagvid.train.teacher import wrong_direction
    from diagvid.world import DIRECTIONS

    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(60):
        cap = "a red circle moves up-left fast and a blue square moves down slowly"
        out = wrong_direction(cap, gen).split()
        old = cap.split()
        assert len(out) == len(old)
        for a, b in zip(old, out, strict=True):
            assert (a != b) if a in DIRECTIONS else (a == b)
            assert (b in DIRECTIONS) == (a in DIRECTIONS)
        seen.add(out[4])
    assert len(seen) == len(DIRECTIONS) - 1  # every other direction is drawn
    assert wrong_direction("a red circle", gen) is None


def test_the_opposite_direction_reverses_every_motion():
    from diagvid.train.teacher import wrong_direction
    from diagvid.world import DIRECTIONS

    for first in DIRECTIONS:
        for second in DIRECTIONS:
            cap = f"a red circle moves {first} fast and a blue square moves {second} slowly"
            out = wrong_direction(cap, opposite=True).split()
            words = cap.split()
            assert out[:4] == words[:4] and out[5:11] == words[5:11] and out[12:] == words[12:]
            for old, new in ((first, out[4]), (second, out[11])):
                assert DIRECTIONS[new] == tuple(-c for c in DIRECTIONS[old])
    assert wrong_direction("a red circle", opposite=True) is None


class _DirectionReader(torch.nn.Module):
    """Predicts the true velocity when its caption embedding is `right`, zero otherwise."""

    def __init__(self, right: torch.Tensor, target: torch.Tensor) -> None:
        super().__init__()
        self.right, self.target = right, target
        self.scale = torch.nn.Parameter(torch.tensor(1.0))

    def forward(self, x_t, t, ctx, attention):
        knows = (ctx == self.right[:1]).flatten(1).all(1).float().view(-1, 1, 1, 1, 1)
        return self.scale * knows * self.target[: len(x_t)]


def test_direction_contrast_rewards_a_model_that_reads_the_direction():
    from diagvid.train.teacher import direction_contrast_loss, noised_latents

    torch.manual_seed(0)
    x0 = torch.randn(2, 4, 3, 4, 4)
    right, wrong = torch.zeros(2, 3, 5), torch.ones(2, 3, 5)
    state = torch.random.get_rng_state()
    _, _, target = noised_latents(x0, 3.0)
    torch.random.set_rng_state(state)  # the loss draws the same noise
    reader = _DirectionReader(right, torch.cat([target, target]))
    fm, contrast, gap = direction_contrast_loss(
        reader, x0, right, wrong, torch.tensor([True, True]), 3.0, temperature=0.05
    )
    assert fm.item() == pytest.approx(0.0, abs=1e-10)  # right caption: exact velocity
    assert gap.item() > 1e3 and contrast.item() < 1e-6  # wrong caption: far worse, so nothing to learn
    # a model that ignores the caption scores gap 0 and contrast log 2
    torch.random.set_rng_state(state)
    fm, contrast, gap = direction_contrast_loss(
        _Spy(), x0, right, wrong, torch.tensor([True, False]), 3.0, temperature=0.05
    )
    assert gap.item() == 0.0 and contrast.item() == pytest.approx(math.log(2))
    torch.random.set_rng_state(state)
    reader.right = wrong  # now it reads the captions backwards, half-heartedly: the contrast pushes back
    reader.scale.data.fill_(0.5)
    fm, contrast, gap = direction_contrast_loss(
        reader, x0, right, wrong, torch.tensor([True, True]), 3.0, temperature=0.05
    )
    assert gap.item() == pytest.approx(-0.75) and contrast.item() > 10
    contrast.backward()
    assert reader.scale.grad > 0  # descent weakens the backwards reading
    # no clip to contrast: the plain flow-matching loss and a zero contrast
    torch.random.set_rng_state(state)
    fm, contrast, gap = direction_contrast_loss(
        _Spy(), x0, right, wrong, torch.tensor([False, False]), 3.0, temperature=0.05
    )
    assert contrast.item() == 0.0 and fm.item() == pytest.approx(target.pow(2).mean().item(), rel=1e-5)
