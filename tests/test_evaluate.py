"""The evaluation protocol: real clips score perfectly, a degraded method scores lower, errors are clear."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from diagvid import evaluate as ev
from diagvid.cli import app
from diagvid.world.metrics import READER_VERSION
from tests.conftest import tiny_inputs

SMALL = ev.EvalConfig(prompts="heldout-8", lengths=(1, 2), base_frames=33, n_boot=50)


def greyed(method: ev.Method) -> ev.Method:
    """Real clips with every pixel turned grey: objects keep their shape and motion, lose their colour."""

    def run(prompts, num_frames, seed):
        return [
            np.repeat(v.mean(axis=-1, keepdims=True), 3, axis=-1).astype(np.uint8)
            for v in method(prompts, num_frames, seed)
        ]

    return run


def test_real_clips_are_read_back_perfectly_and_a_degraded_method_is_not():
    report = ev.run_eval({"real": ev.real_method(), "grey": greyed(ev.real_method())}, SMALL)
    real, grey = report["results"]["real"], report["results"]["grey"]
    assert set(real) == set(grey) == {"1x", "2x"}
    assert report["config"]["frames"] == {"1x": 33, "2x": 65}
    assert report["config"]["reader"] == READER_VERSION  # which read-back scored these numbers
    for length in ("1x", "2x"):
        s = real[length]["summary"]
        assert s["colour_accuracy"]["mean"] == s["direction_accuracy"]["mean"] == 1.0
        assert s["colour_accuracy"]["n"] == 8
        assert grey[length]["summary"]["colour_accuracy"]["mean"] < 0.5
        low, high = (
            grey[length]["summary"]["colour_accuracy"]["low"],
            grey[length]["summary"]["colour_accuracy"]["high"],
        )
        assert low <= grey[length]["summary"]["colour_accuracy"]["mean"] <= high
    rel = report["relative_to_real"]["grey"]["1x"]
    assert rel["colour_accuracy"] < 0.5
    assert "per_video" not in real["1x"] and len(real["2x"]["per_chunk"]["saturation"]["mean"]) > len(
        real["1x"]["per_chunk"]["saturation"]["mean"]
    )


def test_fvd_world_against_real_clips_of_the_same_prompts_with_a_floor():
    report = ev.run_eval({"real": ev.real_method(), "grey": greyed(ev.real_method())}, SMALL)
    fvd = report["fvd_world"]
    assert fvd["window_frames"] == 16 and fvd["samples"] == {"1x": 16, "2x": 32}  # 8 prompts, 2 and 4 windows
    assert report["config"]["features"] == "toy/features"
    for length in ("1x", "2x"):
        # the reference is another draw of real clips for the same prompts: real clips score the floor
        assert report["results"]["real"][length]["fvd_world"] == fvd["floor"][length] > 0
        assert report["results"]["grey"][length]["fvd_world"] > 3 * fvd["floor"][length]
    short = ev.run_eval({"real": ev.real_method()}, replace(SMALL, lengths=(1,), base_frames=9))
    assert short["results"]["real"]["1x"]["fvd_world"] is None and short["fvd_world"]["floor"] == {}
    off = ev.run_eval({"real": ev.real_method()}, replace(SMALL, lengths=(1,), features=""))
    assert off["fvd_world"] is None and off["results"]["real"]["1x"]["fvd_world"] is None


def test_codec_psnr_by_region_against_an_independent_computation():
    """Real clips reconstruct perfectly; a known change of the object pixels alone moves the object regions'
    PSNR to the value computed by hand and leaves the background's perfect."""
    from diagvid.train.vae import render_with_mask

    prompts, frames = ev.eval_prompts("heldout-8")[:3], 9
    real = ev.real_method()(prompts, frames, 0)
    perfect = ev.codec_psnr(real, prompts, frames)
    assert set(perfect) == {"all", "background", "outline", "interior"} and min(perfect.values()) > 100
    # every object pixel 10 levels darker (none of them is below 10 in this palette): squared error
    # (20 / 255)^2 on exactly those pixels, in the [-1, 1] scale
    masks = [render_with_mask(s)[1][0].numpy() for s in ev._specs_for(prompts, frames, 64)]
    darker = [
        np.where(m[..., None], v.astype(np.int16) - 10, v).astype(np.uint8)
        for v, m in zip(real, masks, strict=True)
    ]
    assert all(v[m].min() >= 10 for v, m in zip(real, masks, strict=True))
    got = ev.codec_psnr(darker, prompts, frames)
    object_db = 10 * np.log10(4 / (20 / 255) ** 2)
    assert got["interior"] == pytest.approx(object_db, abs=1e-3)
    share = sum(m.sum() for m in masks) / sum(m.size for m in masks)
    assert got["all"] == pytest.approx(object_db - 10 * np.log10(share), abs=1e-3)
    assert got["background"] > 100 and object_db < got["outline"] < got["all"]


def test_fixed_length_methods_run_once_and_seeds_reach_the_method():
    seen = []

    def spy(prompts, num_frames, seed):
        seen.append((num_frames, seed))
        return ev.real_method()(prompts, num_frames, seed)

    report = ev.run_eval(
        {"teacher": spy},
        ev.EvalConfig(prompts="heldout-8", lengths=(1, 3), base_frames=17, seed=5, n_boot=10),
        fixed_length=("teacher",),
    )
    assert seen == [(17, 5)] and list(report["results"]["teacher"]) == ["1x"]


def test_student_method_streams_the_asked_length(tiny_pipeline):
    videos = ev.student_method(tiny_pipeline, "self-forcing")(
        ["a red circle moves left", "a blue square moves up"], 9, 0
    )
    assert [v.shape for v in videos] == [(9, 16, 16, 3)] * 2
    assert not np.array_equal(videos[0], videos[1])  # each prompt has its own seed


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompts": "heldout-3"}, "unknown evaluation set 'heldout-3'"),
        ({"lengths": (1, 0)}, r"lengths=\(1, 0\) must be positive integers"),
        ({"lengths": ()}, "must be positive integers"),
        ({"base_frames": 80}, "base_frames=80 must be 1 \\+ 4k"),
    ],
)
def test_bad_configs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ev.EvalConfig(**kwargs)


def test_real_clips_only_for_held_out_prompts():
    with pytest.raises(ValueError, match="only for the held-out prompt sets"):
        ev.real_method()(["a red circle moves left"], 17, 0)
    with pytest.raises(ValueError, match="no method"):
        ev.run_eval({}, SMALL)


def test_cli_eval_writes_the_report(tmp_path):
    out = tmp_path / "r" / "eval.json"
    result = CliRunner().invoke(
        app, ["eval", "--quick", "--methods", "real,vae", "--lengths", "1", "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["config"]["prompts"] == "heldout-8" and report["config"]["lengths"] == [1]
    assert report["vae"] == "toy/vae"  # which codec the vae method and the teacher used
    assert "psnr" not in report["results"]["real"]["1x"]  # only reconstructions get a PSNR
    codec = report["results"]["vae"]["1x"]["psnr"]
    assert 12 < codec["outline"] < codec["all"] < codec["background"] < 45, codec
    assert report["results"]["real"]["1x"]["summary"]["all_accuracy"]["mean"] == 1.0
    assert report["results"]["real"]["1x"]["fvd_world"] == report["fvd_world"]["floor"]["1x"] > 0
    assert "fvd_world" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "fake"], "unknown method 'fake'"),
        (["--student", "nofolder"], "write NAME=PIPELINE_FOLDER"),
        (["--suite", "wan"], "unknown eval suite 'wan'"),
        (["--lengths", "1,x"], "'x' is not an integer"),
        (["--methods", ""], "nothing to evaluate"),
        (["--prompts", "heldout-5"], "unknown evaluation set 'heldout-5'"),
        (["--features", "no-such-net"], "'no-such-net' is neither an existing path nor a bundled model"),
        (["--teacher-guidance", "nan"], "--teacher-guidance nan: the CFG scale must be a finite number >= 0"),
        (["--teacher-guidance", "-1"], "--teacher-guidance -1.0: the CFG scale must be a finite number >= 0"),
        (["--teacher-start-sigma", "0"], "--teacher-start-sigma 0.0: must be in (0, 1]"),
        (["--teacher-start-sigma", "1.5"], "--teacher-start-sigma 1.5: must be in (0, 1]"),
        (["--teacher-eta", "1.5"], "--teacher-eta 1.5: must be in [0, 1]"),
        (["--teacher-eta", "nan"], "--teacher-eta nan: must be in [0, 1]"),
        (["--teacher-motion-candidates", "0"], "--teacher-motion-candidates 0: must be >= 1"),
        (
            ["--teacher-verifier", "toy/teacher-i2v-high"],
            "--teacher-verifier toy/teacher-i2v-high: picks among finished samples; give "
            "--teacher-motion-candidates N >= 2",
        ),
        (
            [
                "--teacher-verifier",
                "x",
                "--teacher-motion-candidates",
                "2",
                "--teacher-motion-choose-by",
                "x",
            ],
            "--teacher-motion-choose-by x: --teacher-verifier x makes the choice; give one of them",
        ),
        (
            ["--teacher-motion-candidates", "2", "--teacher-start-sigma", "0.5"],
            "--teacher-motion-candidates 2: the starts are noise",
        ),
        (["--teacher-motion-guidance", "-1"], "--teacher-motion-guidance -1.0: the scale must be a finite"),
        (["--teacher-motion-sigma", "1.5"], "--teacher-motion-sigma 1.5: must be a noise level in [0, 1]"),
        (
            ["--motion-classifier", "x"],
            "--motion-classifier x: only means something with --teacher-motion-guid",
        ),
        (
            ["--teacher-motion-guidance", "100", "--teacher-motion-guidance", "50"],
            "--teacher-motion-guidance given 2 times: name one --motion-classifier for each, in the same order",
        ),
        (
            [
                "--motion-classifier",
                "toy/motion",
                "--motion-classifier",
                "toy/motion-axes",
                "--teacher-motion-guidance",
                "100",
            ],
            "--motion-classifier given 2 times: give one --teacher-motion-guidance scale for each",
        ),
        (
            [
                "--teacher",
                "toy/teacher-deep",
                "--teacher-high",
                "toy/teacher-high",
                "--teacher-boundary",
                "1",
            ],
            "--teacher-boundary 1.0: must be a noise level in (0, 1)",
        ),
        (["--teacher-boundary", "0.6"], "--teacher-boundary 0.6: only means something with --teacher-high"),
        (
            ["--teacher-high-guidance", "3"],
            "--teacher-high-guidance 3.0: only means something with --teacher-high",
        ),
        (
            [
                "--teacher",
                "toy/teacher-deep",
                "--teacher-high",
                "toy/teacher-high",
                "--teacher-high-guidance",
                "inf",
            ],
            "--teacher-high-guidance inf: the CFG scale must be a finite number >= 0",
        ),
        (
            ["--teacher-high", "toy/teacher-high"],
            "--teacher-high toy/teacher-high: name the teacher below the boundary with --teacher",
        ),
        (
            ["--teacher-i2v-high", "x"],
            "--teacher-i2v-high x: name the teacher below the boundary with --teacher",
        ),
        (
            ["--teacher", "toy/teacher-low", "--teacher-i2v-high", "x", "--teacher-start-sigma", "0.5"],
            "--teacher-i2v-high x: its second pass starts from noise; no --teacher-start-sigma",
        ),
    ],
)
def test_cli_eval_errors(args, message):
    result = CliRunner().invoke(app, ["eval", "--quick", *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


def test_teacher_method_samples_the_asked_length(tiny_pipeline):
    run = ev.teacher_method(
        tiny_pipeline.generator, tiny_pipeline.vae, tiny_pipeline.text_encoder, size=16, num_steps=2
    )
    videos = run(["a red circle moves left", "a blue square moves up"], 9, 0)
    assert [v.shape for v in videos] == [(9, 16, 16, 3)] * 2 and not np.array_equal(videos[0], videos[1])
    assert tiny_pipeline.generator.stats.forwards == 2 * 2  # 2 Euler steps per prompt, CFG in one batch
    guided = ev.teacher_method(
        tiny_pipeline.generator,
        tiny_pipeline.vae,
        tiny_pipeline.text_encoder,
        size=16,
        num_steps=2,
        guidance=2.0,
    )(["a red circle moves left"], 9, 0)
    assert not np.array_equal(guided[0], videos[0])  # same noise, another CFG scale


def test_teacher_method_refuses_models_for_another_codec(tiny_pipeline):
    from diagvid.model.motion import MotionClassifier, MotionClassifierConfig
    from diagvid.model.widen import widen_dit_latent
    from diagvid.verify import DirectionVerifier

    wide = widen_dit_latent(tiny_pipeline.generator, 2 * tiny_pipeline.vae.z_dim)
    models = (tiny_pipeline.generator, tiny_pipeline.vae, tiny_pipeline.text_encoder)
    with pytest.raises(
        ValueError, match=r"the teacher reads 8 and writes 8 latent channels; the VAE makes 4"
    ):
        ev.teacher_method(wide, *models[1:])
    with pytest.raises(ValueError, match=r"the image_to_video reads 8 and writes 8 latent channels"):
        ev.teacher_method(*models, image_to_video=wide)
    with pytest.raises(ValueError, match=r"the verifier reads 8 latent channels; the VAE makes 4"):
        ev.teacher_method(*models, motion_candidates=2, verifier=DirectionVerifier(wide, models[2]))
    clf = MotionClassifier(
        MotionClassifierConfig(in_dim=8, frames=2, width=8, groups=2, freq_dim=8, hidden=8)
    )
    with pytest.raises(ValueError, match=r"the motion classifier 0 reads 8 latent channels; the VAE makes 4"):
        ev.teacher_method(*models, motion=clf, motion_scale=1.0)


def test_teacher_method_resamples_the_frames_after_the_first_with_an_image_to_video_model(tiny_pipeline):
    """The second pass keeps the first pass's latent frame 0 (the causal VAE decodes it alone into pixel frame
    0, so that frame is the same bit for bit) and samples the frames after it again: twice the forwards."""
    models = (tiny_pipeline.generator, tiny_pipeline.vae, tiny_pipeline.text_encoder)
    prompts = ["a red circle moves left"]
    plain = ev.teacher_method(*models, size=16, num_steps=2)(prompts, 9, 0)
    forwards = tiny_pipeline.generator.stats.forwards
    again = ev.teacher_method(*models, size=16, num_steps=2, image_to_video=tiny_pipeline.generator)(
        prompts, 9, 0
    )
    assert tiny_pipeline.generator.stats.forwards - forwards == 2 * 2
    assert again[0].shape == plain[0].shape == (9, 16, 16, 3)
    assert np.array_equal(again[0][0], plain[0][0]) and not np.array_equal(again[0][1:], plain[0][1:])
    with pytest.raises(ValueError, match=r"its second pass starts from noise; start_sigma=0\.5 must be 1"):
        ev.teacher_method(*models, start_sigma=0.5, image_to_video=tiny_pipeline.generator)


def test_cli_motion_guidance_on_clips_too_short_is_a_clean_error():
    """--quick's 17-frame clips hold 5 latent frames; the bundled classifier reads 8: an error, no traceback."""
    from typer.testing import CliRunner

    from diagvid.cli import app

    result = CliRunner().invoke(
        app,
        ["eval", "--quick", "--methods", "teacher", "--teacher-motion-guidance", "100", "--features", "none"],
    )
    assert result.exit_code == 2, result.output
    assert "motion guidance reads 8 latent frames; clips of 17 frames have 5" in " ".join(
        result.output.split()
    )
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_teacher_method_with_motion_guidance(tiny_pipeline):
    from diagvid.model.motion import MotionClassifier, MotionClassifierConfig

    torch.manual_seed(0)
    clf = MotionClassifier(
        MotionClassifierConfig(in_dim=4, frames=2, width=8, groups=2, freq_dim=8, hidden=8)
    )
    models = (tiny_pipeline.generator, tiny_pipeline.vae, tiny_pipeline.text_encoder)
    prompts = ["a red circle moves left", "a red circle"]
    plain = ev.teacher_method(*models, size=16, num_steps=2)(prompts, 9, 0)
    steered = ev.teacher_method(*models, size=16, num_steps=2, motion=clf, motion_scale=50.0)(prompts, 9, 0)
    assert not np.array_equal(steered[0], plain[0])  # one direction asked: guided
    assert np.array_equal(steered[1], plain[1])  # no direction asked: sampled without guidance
    # best of 3 starts: a prompt without one direction is sampled as by the plain sampler
    # (4 steps of shift 5 are at sigma 1, 0.94, 0.83 and 0.62: the choice at 0.7 leaves one step to finish)
    choose = dict(motion=clf, motion_candidates=3, motion_sigma_min=0.7)
    best_of = ev.teacher_method(*models, size=16, num_steps=4, **choose)(prompts, 9, 0)
    plain4 = ev.teacher_method(*models, size=16, num_steps=4)(prompts, 9, 0)
    assert np.array_equal(best_of[1], plain4[1])
    assert best_of[0].shape == plain4[0].shape
    for kwargs, message in [
        (dict(motion_candidates=0), "motion_candidates=0: must be >= 1"),
        (dict(motion_candidates=2), "the choice needs a motion classifier"),
        (dict(motion=clf, motion_candidates=2, start_sigma=0.5), "start from pure noise"),
        (
            dict(motion=clf, motion_candidates=2, motion_sigma_min=0.0),
            r"motion_sigma_min=0\.0, which must be",
        ),
    ]:
        with pytest.raises(ValueError, match=message):
            ev.teacher_method(*models, **kwargs)
    with pytest.raises(ValueError, match="motion guidance reads 2 latent frames; clips of 1 frames have 1"):
        ev.teacher_method(*models, size=16, num_steps=2, motion=clf, motion_scale=1.0)(prompts, 1, 0)
    with pytest.raises(ValueError, match="needs a motion classifier"):
        ev.teacher_method(*models, motion_scale=1.0)
    # a second classifier, of axes and speed over two windows: guides only at a scale of its own
    cfg = MotionClassifierConfig(
        in_dim=4, frames=2, width=8, groups=2, freq_dim=8, hidden=8, target="axis-speed", windows=[0, 1]
    )
    axes = MotionClassifier(cfg)
    prompts = ["a circle moves left slowly", "a red circle"]
    one = ev.teacher_method(*models, size=16, num_steps=2, motion=clf, motion_scale=50.0)(prompts, 9, 0)
    both = dict(size=16, num_steps=2, motion=[clf, axes])
    same = ev.teacher_method(*models, **both, motion_scale=[50.0, 0.0])(prompts, 9, 0)
    assert all(np.array_equal(a, b) for a, b in zip(one, same, strict=True))
    more = ev.teacher_method(*models, **both, motion_scale=[50.0, 50.0])(prompts, 9, 0)
    assert not np.array_equal(more[0], one[0]) and np.array_equal(more[1], one[1])
    with pytest.raises(ValueError, match=r"motion guidance reads 3 latent frames; clips of 5 frames have 2"):
        ev.teacher_method(*models, **both, motion_scale=[0.0, 1.0])(prompts, 5, 0)
    with pytest.raises(ValueError, match=r"one scale per classifier \(2\)"):
        ev.teacher_method(*models, **both, motion_scale=[1.0, 2.0, 3.0])


def _record_best_of_scores(monkeypatch) -> list:
    """Spy on `sample_euler_best_of`: the list it returns fills with (candidates, sigma, their scores) of
    every choice the sampler makes."""
    from diagvid import sampling

    calls = []
    real = sampling.sample_euler_best_of

    def spy(model, noise, context, null_context, score, select_sigma, **steps):
        def recorded(x, sigma):
            calls.append((x, sigma, score(x, sigma)))
            return calls[-1][2]

        return real(model, noise, context, null_context, recorded, select_sigma, **steps)

    monkeypatch.setattr(sampling, "sample_euler_best_of", spy)
    return calls


def test_best_of_starts_chosen_by_some_classifiers_only(tiny_pipeline, monkeypatch):
    """motion_choose: the start is picked by the named classifiers' log-probabilities alone, while every
    classifier with a scale still guides; a prompt that asks the choosers nothing is sampled once."""
    from diagvid.model.motion import MotionClassifier, MotionClassifierConfig, prompt_label

    torch.manual_seed(0)
    small = dict(in_dim=4, frames=2, width=8, groups=2, freq_dim=8, hidden=8)
    direction = MotionClassifier(MotionClassifierConfig(**small))
    axes = MotionClassifier(MotionClassifierConfig(**small, target="axis-speed", windows=[0, 1]))
    models = (tiny_pipeline.generator, tiny_pipeline.vae, tiny_pipeline.text_encoder)
    prompts = ["a circle moves left slowly", "a red circle"]
    run = dict(size=16, num_steps=4, motion_candidates=3, motion_sigma_min=0.7)
    # the direction classifier chooses and guides; the other, at scale 0 and not choosing, changes nothing
    alone = ev.teacher_method(*models, **run, motion=direction, motion_scale=50.0)(prompts, 9, 0)
    both = dict(run, motion=[direction, axes], motion_scale=[50.0, 0.0])
    chosen = ev.teacher_method(*models, **both, motion_choose=[0])(prompts, 9, 0)
    assert all(np.array_equal(a, b) for a, b in zip(alone, chosen, strict=True))

    scores = _record_best_of_scores(monkeypatch)
    ev.teacher_method(*models, **both, motion_choose=[1])(prompts, 9, 0)
    ((x, sigma, got),) = scores  # one prompt asks for axes and a speed; "a red circle" asks nothing
    label = prompt_label(prompts[0], axes.cfg.classes, axes.cfg.target)
    want = axes.log_prob(x, sigma, torch.full((3,), label))
    torch.testing.assert_close(got, want)  # the axes classifier's alone, not the sum with the direction's
    asked = prompt_label(prompts[0], direction.cfg.classes, direction.cfg.target)
    assert not torch.allclose(got, want + direction.log_prob(x, sigma, torch.full((3,), asked)))
    for choose, kwargs, message in [
        ([1], dict(run, motion_candidates=1), "needs motion_candidates >= 2"),
        ([2], both, r"indices into the 2 motion classifiers \(0 to 1\)"),
        ([0, 0], both, "name each choosing classifier once"),
        ([], both, "name each choosing classifier once"),
    ]:
        with pytest.raises(ValueError, match=message):
            ev.teacher_method(*models, **{**kwargs, "motion": [direction, axes]}, motion_choose=choose)


def test_best_of_finished_samples_chosen_by_a_verifier(tiny_pipeline, monkeypatch):
    """verifier: every start of a prompt that asks a direction is sampled to the end and the verifier's score
    of the finished samples picks one; no motion classifier is needed, and a prompt that asks no direction
    is sampled once, as by the plain sampler."""
    from diagvid.model.vae import tensor_to_frames
    from diagvid.verify import DirectionVerifier

    models = (tiny_pipeline.generator, tiny_pipeline.vae, tiny_pipeline.text_encoder)
    verifier = DirectionVerifier(
        tiny_pipeline.generator.eval(), tiny_pipeline.text_encoder, draws=1, frames=2
    )
    prompts = ["a circle moves left slowly", "a red circle"]
    run = dict(size=16, num_steps=3, motion_candidates=3)
    calls = _record_best_of_scores(monkeypatch)
    videos = ev.teacher_method(*models, **run, verifier=verifier)(prompts, 9, 0)
    ((x, sigma, got),) = calls  # only the prompt that asks for a direction
    assert sigma == 0.0 and x.shape[0] == 3
    torch.testing.assert_close(got, verifier.score(x, prompts[0]))
    plain = ev.teacher_method(*models, size=16, num_steps=3)(prompts, 9, 0)
    assert np.array_equal(videos[1], plain[1])
    best = int(got.argmax())  # the video is the decode of the finished sample the verifier rated highest
    assert np.array_equal(videos[0], tensor_to_frames(tiny_pipeline.vae.decode(x[best : best + 1])[0]))
    assert not all(
        np.array_equal(videos[0], tensor_to_frames(tiny_pipeline.vae.decode(x[j : j + 1])[0]))
        for j in range(3)
    )  # the candidates differ
    for kwargs, message in [
        (dict(motion_candidates=1), "needs motion_candidates >= 2"),
        (dict(motion_candidates=2, start_sigma=0.5), "start from pure noise; start_sigma=0.5 must be 1"),
        (dict(motion_candidates=2, motion_choose=[0]), "the verifier makes the choice; give one of them"),
    ]:
        with pytest.raises(ValueError, match=message):
            ev.teacher_method(*models, verifier=verifier, **kwargs)


def test_sampling_from_a_midpoint_of_the_schedule_finishes_the_same_trajectory(tiny_dit):
    from diagvid.sampling import partial_timesteps, sample_euler, teacher_timesteps

    x, _, ctx = tiny_inputs(tiny_dit, batch=1, frames=3)
    null = torch.zeros_like(ctx)
    full, saved = sample_euler(
        tiny_dit, x, ctx, null, num_steps=8, shift=3.0, guidance=2.0, trajectory_at=(5,)
    )
    t5 = teacher_timesteps(8, 3.0)[5]
    assert partial_timesteps(8, 3.0, t5 / 1000) == teacher_timesteps(8, 3.0)[5:]
    rest, _ = sample_euler(
        tiny_dit, saved[5], ctx, null, num_steps=8, shift=3.0, guidance=2.0, start_sigma=t5 / 1000
    )
    torch.testing.assert_close(rest, full, rtol=0, atol=0)
    with pytest.raises(ValueError, match="below the schedule's last step"):
        partial_timesteps(8, 3.0, 0.01)
    for bad in (0.0, -0.5, 1.01):
        with pytest.raises(ValueError, match="must be in"):
            partial_timesteps(8, 3.0, bad)


def test_teacher_from_a_renoised_real_clip_is_sdedit_written_out():
    """The probe against a loop written here: encode the held-out clip, noise it to the first step at or
    below start_sigma with the prompt's seeded noise, Euler + CFG over the remaining steps, decode."""
    from diagvid.model.vae import frames_to_tensor, tensor_to_frames
    from diagvid.pretrained import load_dit_model, load_text_encoder, load_vae
    from diagvid.sampling import teacher_timesteps

    teacher, vae, text = load_dit_model("toy/teacher"), load_vae("toy/vae"), load_text_encoder("toy/text")
    prompts, frames, seed = ev.eval_prompts("heldout-8")[:1], 9, 3
    got = ev.teacher_method(teacher, vae, text, num_steps=10, guidance=2.0, start_sigma=0.6)(
        prompts, frames, seed
    )
    with torch.no_grad():
        ts = [t for t in teacher_timesteps(10, 5.0) if t <= 600] + [0.0]
        clean = vae.encode(frames_to_tensor(ev.real_method()(prompts, frames, seed)[0])[None])
        noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed))
        x = (1 - ts[0] / 1000) * clean + ts[0] / 1000 * noise
        ctx, null = text.encode(prompts)[0], text.encode([""])[0]
        for a, b in itertools.pairwise(ts):
            t = torch.full((2,), a)
            v_c, v_u = teacher(torch.cat([x, x]), t, torch.cat([ctx, null])).chunk(2)
            x = x + (b - a) / 1000 * (v_u + 2.0 * (v_c - v_u))
        want = tensor_to_frames(vae.decode(x)[0])
    assert len(ts) - 1 < 10  # the schedule was cut
    np.testing.assert_array_equal(got[0], want)
    plain = ev.teacher_method(teacher, vae, text, num_steps=10, guidance=2.0)(prompts, frames, seed)
    assert not np.array_equal(plain[0], got[0])  # from noise alone: another video
    with pytest.raises(ValueError, match="real clips exist only for the held-out prompt sets"):
        ev.teacher_method(teacher, vae, text, num_steps=10, start_sigma=0.6)(
            ["a red circle moves left"], 9, 0
        )


def test_cli_teacher_guidance_reaches_the_teacher_sampler(monkeypatch, tmp_path):
    from diagvid import evaluate as ev_module
    from diagvid.cli import MotionOptions, _eval_methods
    from diagvid.model.experts import TOY_BOUNDARY, NoiseExperts
    from diagvid.model.motion import MotionClassifier, MotionClassifierConfig
    from diagvid.pretrained import DEFAULT_MOTION_CLASSIFIER, load_motion_classifier

    seen = {}

    def spy(teacher, vae, text_encoder, **kwargs):
        seen.update(kwargs, teacher=teacher)
        return lambda prompts, num_frames, seed: []

    monkeypatch.setattr(ev_module, "teacher_method", spy)
    _eval_methods(
        "teacher",
        "toy/vae",
        None,
        "toy/text",
        [],
        "cpu",
        teacher_guidance=2.0,
        teacher_start_sigma=0.5,
        teacher_eta=0.5,
    )
    assert seen.pop("teacher") is not None
    assert seen == {
        "guidance": 2.0,
        "start_sigma": 0.5,
        "guidance_above": None,
        "eta": 0.5,
        "motion": None,
        "motion_scale": 0.0,
        "motion_sigma_min": 0.5,
        "motion_candidates": 1,
        "motion_choose": None,
        "image_to_video": None,
        "verifier": None,
    }
    # a second, image-to-video pass: its expert above the boundary, --teacher below
    _eval_methods(
        "teacher",
        "toy/vae",
        "toy/teacher-low",
        "toy/text",
        [],
        "cpu",
        teacher_high="toy/teacher-high",
        teacher_i2v_high="toy/teacher-high",
    )
    second = seen["image_to_video"]
    assert isinstance(second, NoiseExperts) and second.boundary == TOY_BOUNDARY
    assert second.high.cfg.num_layers == second.low.cfg.num_layers == 12
    assert second.low is seen["teacher"].low  # the teacher's own low-noise expert, not a second copy
    assert second.high is not seen["teacher"].high
    # best of 4 finished samples judged by an image-to-video expert: no motion classifier is loaded for it
    bundled_teacher = ("teacher", "toy/vae", None, "toy/text", [], "cpu")
    _eval_methods(
        *bundled_teacher, teacher_verifier="toy/teacher-i2v-high", motion=MotionOptions(candidates=4)
    )
    assert seen["motion"] is None and seen["motion_candidates"] == 4
    assert seen["verifier"].model.cfg.num_layers == 12 and not seen["verifier"].model.training
    MotionClassifier().save(tmp_path / "motion")
    options = MotionOptions((str(tmp_path / "motion"),), (150.0,), 0.7, 4)
    _eval_methods("teacher", "toy/vae", None, "toy/text", [], "cpu", motion=options)
    assert isinstance(seen["motion"], MotionClassifier)
    picked = [seen[k] for k in ("motion_scale", "motion_sigma_min", "motion_candidates")]
    assert picked == [150.0, 0.7, 4]
    # several classifiers: each with its own scale, in the order given
    MotionClassifier(MotionClassifierConfig(target="axis-speed", windows=[0, 6])).save(tmp_path / "axes")
    options = MotionOptions((DEFAULT_MOTION_CLASSIFIER, str(tmp_path / "axes")), (100.0, 50.0))
    _eval_methods("teacher", "toy/vae", None, "toy/text", [], "cpu", motion=options)
    assert [c.cfg.target for c in seen["motion"]] == ["direction", "axis-speed"]
    assert seen["motion_scale"] == [100.0, 50.0]
    # best of 4 starts picked by the second classifier alone, named as it was given
    axes = str(tmp_path / "axes")
    options = MotionOptions((DEFAULT_MOTION_CLASSIFIER, axes), (100.0, 50.0), 0.5, 4, (axes,))
    _eval_methods("teacher", "toy/vae", None, "toy/text", [], "cpu", motion=options)
    assert seen["motion_choose"] == [1] and seen["motion_candidates"] == 4
    for options, message in [
        (MotionOptions((), (100.0, 50.0)), "given 2 times: name one --motion-classifier for each"),
        (
            MotionOptions(("toy/motion", str(tmp_path / "axes")), (100.0,)),
            "give one --teacher-motion-guidance",
        ),
        (MotionOptions((), (float("nan"),)), "--teacher-motion-guidance nan: the scale must be"),
        (MotionOptions(("toy/motion",), (0.0,)), "--motion-classifier toy/motion: only means something"),
        (
            MotionOptions(("toy/motion",), (100.0,), choose_by=("toy/motion",)),
            "--teacher-motion-choose-by toy/motion: picks among starts; only means something with",
        ),
        (
            MotionOptions(("toy/motion",), (100.0,), 0.5, 4, ("toy/realness",)),
            r"--teacher-motion-choose-by toy/realness: name each chooser once, as given to --motion-classifier "
            r"\(toy/motion\)",
        ),
    ]:
        with pytest.raises(ValueError, match=message):
            _eval_methods("teacher", "toy/vae", None, "toy/text", [], "cpu", motion=options)
    # without a folder the bundled classifier guides, and chooses among starts without a guidance scale
    _eval_methods("teacher", "toy/vae", None, "toy/text", [], "cpu", motion=MotionOptions(candidates=2))
    bundled = load_motion_classifier(DEFAULT_MOTION_CLASSIFIER)
    assert torch.equal(seen["motion"].head[0].weight, bundled.head[0].weight)


def test_cli_fp8_puts_every_generator_in_float8(monkeypatch):
    from diagvid import evaluate as ev_module
    from diagvid.cli import _eval_methods
    from diagvid.model.fp8 import FP8Linear

    def fp8_layers(model) -> int:
        return sum(isinstance(m, FP8Linear) for m in model.modules())

    seen = {}
    monkeypatch.setattr(ev_module, "teacher_method", lambda teacher, *a, **k: seen.update(teacher=teacher))
    monkeypatch.setattr(ev_module, "student_method", lambda pipe, *a: seen.update(student=pipe.generator))
    _eval_methods("teacher,diagonal", "toy/vae", None, "toy/text", [], "cpu", fp8=True)
    assert fp8_layers(seen["teacher"]) == 6 * 10  # 6 blocks: q, k, v, o twice and the FFN's two
    assert fp8_layers(seen["student"]) > 0
    _eval_methods("teacher", "toy/vae", None, "toy/text", [], "cpu")
    assert fp8_layers(seen["teacher"]) == 0
    _eval_methods(
        None, "toy/vae", "toy/teacher", "toy/text", [], "cpu", teacher_high="toy/teacher-high", fp8=True
    )
    assert fp8_layers(seen["teacher"].high) == 12 * 10 and fp8_layers(seen["teacher"].low) == 6 * 10


def test_cli_teacher_high_splits_the_teacher_at_the_boundary(monkeypatch):
    from diagvid import evaluate as ev_module
    from diagvid.cli import _eval_methods
    from diagvid.model.experts import NoiseExperts

    seen = []
    monkeypatch.setattr(ev_module, "teacher_method", lambda teacher, *a, **k: seen.append((teacher, k)))
    # below 0.7 the expert never trained: the run goes on, with a warning that names its range
    with pytest.warns(UserWarning, match=r"toy/teacher-high was trained at noise levels \[0\.7, 1\] only"):
        runs = _eval_methods(
            None,
            "toy/vae",
            "toy/teacher",
            "toy/text",
            [],
            "cpu",
            teacher_high="toy/teacher-high",
            teacher_boundary=0.6,
        )
    assert list(runs) == ["real", "teacher"]  # the teacher pair alone asks for the teacher method
    ((model, kwargs),) = seen
    assert isinstance(model, NoiseExperts) and model.boundary == 0.6
    assert model.high.cfg.num_layers == 12 and model.low.cfg.num_layers == 6  # --teacher below
    assert kwargs["guidance_above"] is None  # one scale for both experts unless asked
    seen.clear()
    _eval_methods(
        None,
        "toy/vae",
        "toy/teacher",
        "toy/text",
        [],
        "cpu",
        teacher_guidance=2.0,
        teacher_high="toy/teacher-high",
        teacher_high_guidance=4.0,
    )
    ((model, kwargs),) = seen  # the expert's own scale from the experts' boundary (the default, 0.7) up
    assert model.boundary == 0.7 and kwargs["guidance_above"] == (0.7, 4.0) and kwargs["guidance"] == 2.0


def test_cli_methods_name_the_teacher_and_every_shipped_student(tmp_path):
    from diagvid.cli import _eval_methods
    from diagvid.pretrained import TOY_STUDENT_METHODS

    everything = _eval_methods("all", "toy/vae", None, "toy/text", [], "cpu")
    assert list(everything) == ["real", "vae", "teacher", *TOY_STUDENT_METHODS]
    # beside your own model the default is the real clips alone, not every shipped method
    mine = _eval_methods(None, "toy/vae", None, "toy/text", ["mine=toy:self-forcing"], "cpu")
    assert list(mine) == ["real", "mine"]
    videos = everything["diagonal-clean"](["a red circle moves left"], 9, 0)
    assert len(videos) == 1 and videos[0].shape == (9, 64, 64, 3)
    help_text = " ".join(CliRunner().invoke(app, ["eval", "--help"], env={"COLUMNS": "200"}).output.split())
    assert all(name in help_text for name in TOY_STUDENT_METHODS)
