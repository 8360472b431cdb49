"""The `diagvid` command as a user runs it: generate on a pipeline folder, errors, info."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from diagvid.cli import app
from diagvid.pretrained import load_pipeline, save_pipeline
from diagvid.video_io import read_video
from tests.conftest import make_tiny_pipeline

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipe") / "tiny"
    save_pipeline(make_tiny_pipeline(), folder)
    return folder


def test_saved_pipeline_reloads_to_the_same_video(tiny_folder):
    a, _ = make_tiny_pipeline().generate("a red circle moves left", num_chunks=2, seed=3)
    b, _ = load_pipeline(tiny_folder, device="cpu").generate("a red circle moves left", num_chunks=2, seed=3)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("name", ["clip.mp4", "clip.gif", "frames"])
def test_generate_writes_every_format(tiny_folder, tmp_path, name):
    out = tmp_path / name
    result = runner.invoke(
        app,
        [
            "generate",
            "--model",
            str(tiny_folder),
            "-p",
            "a red circle moves left",
            "--seconds",
            "1",
            "--out",
            str(out),
            "--json",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)
    frames = read_video(out)
    assert figures["frames"] == len(frames) == 21 and frames.shape[1:] == (16, 16, 3)
    assert figures["nfe"] == sum(c["nfe"] for c in figures["per_chunk"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_generate_prompt_timeline_and_steps(tiny_folder, tmp_path):
    result = runner.invoke(
        app,
        [
            "generate",
            "--model",
            str(tiny_folder),
            "-p",
            "a red circle moves left",
            "-p",
            "@0.5s a blue square moves up",
            "--steps",
            "1000,500;1000,300",
            "--seconds",
            "1",
            "--out",
            str(tmp_path / "x.gif"),
            "--json",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    per_chunk = json.loads(result.stdout)["per_chunk"]
    assert [c["timesteps"] for c in per_chunk[:3]] == [[1000, 500], [1000, 300], [1000, 300]]
    assert (
        per_chunk[0]["prompt"] == "a red circle moves left"
        and per_chunk[-1]["prompt"] == "a blue square moves up"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seconds", "0"], "seconds=0.0 must be"),
        (["--schedule", "warp"], "unknown schedule 'warp'"),
        (["--steps", "1000,1000"], "not strictly decreasing"),
        (["--out", "clip.avi"], "unknown format '.avi'"),
        (["--image", "missing.png"], "no image at missing.png"),
        (["--model", "no-such-model"], "neither an existing path nor a bundled model"),
        (["-p", ""], "prompt 0 is empty"),
        (["-p", "a purple circle moves left"], "unknown word 'purple'"),
    ],
)
def test_generate_errors_exit_nonzero_with_a_clear_message(tiny_folder, tmp_path, args, message):
    base = {"--model": str(tiny_folder), "-p": "a red circle moves left", "--out": str(tmp_path / "c.mp4")}
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1]
    argv = ["generate", "--device", "cpu"] + [x for kv in base.items() for x in kv]
    result = runner.invoke(app, argv)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not list(tmp_path.iterdir())  # nothing written


def test_info_json():
    result = runner.invoke(app, ["info", "--json"])
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["torch"] and "bundled" in data
    # the bundled noise experts, with the levels their folders record
    assert data["noise_experts"] == {
        "toy/teacher-high": [0.7, 1.0],
        "toy/teacher-high-tuned": [0.7, 1.0],
        "toy/teacher-high-z16": [0.7, 1.0],
        "toy/teacher-i2v-high": [0.5, 1.0],
        "toy/teacher-low": [0.0, 0.7],
        "toy/teacher-low-z16": [0.0, 0.7],
    }
    text = " ".join(runner.invoke(app, ["info"]).output.split())
    assert "toy/teacher-low (noise expert: levels 0-0.7):" in text
    assert "toy/teacher-deep:" in text and "toy/teacher-deep (" not in text


def test_generate_continue_and_video_to_video(tiny_folder, tmp_path):
    first = tmp_path / "first.gif"
    base = [
        "generate",
        "--model",
        str(tiny_folder),
        "-p",
        "a red circle moves left",
        "--device",
        "cpu",
        "--json",
    ]
    assert runner.invoke(app, [*base, "--seconds", "1", "--out", str(first)]).exit_code == 0
    result = runner.invoke(
        app, [*base, "--seconds", "1", "--continue", str(first), "--out", str(tmp_path / "c.gif")]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["per_chunk"][0]["index"] == -1
    result = runner.invoke(
        app, [*base, "--video", str(first), "--strength", "0.5", "--out", str(tmp_path / "v.gif")]
    )
    assert result.exit_code == 0, result.output
    per_chunk = json.loads(result.stdout)["per_chunk"]
    assert len(per_chunk) == 3 and all(c["timesteps"][0] == 500.0 for c in per_chunk)  # 21 frames: 6 latents


def test_generate_prompt_file(tiny_folder, tmp_path):
    timeline = tmp_path / "t.jsonl"
    timeline.write_text(
        '{"at": 0, "prompt": "a red circle moves left"}\n\n{"at": 0.5, "prompt": "a blue square moves up"}\n'
    )
    base = ["generate", "--model", str(tiny_folder), "--device", "cpu", "--json", "--seconds", "1"]
    result = runner.invoke(app, [*base, "--prompt-file", str(timeline), "--out", str(tmp_path / "a.gif")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["per_chunk"][-1]["prompt"] == "a blue square moves up"
    (tmp_path / "bad.jsonl").write_text('{"at": 0, "text": "x"}\n')
    result = runner.invoke(
        app, [*base, "--prompt-file", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "b.gif")]
    )
    assert result.exit_code == 2 and "bad.jsonl:1" in result.output
    (tmp_path / "latin.jsonl").write_bytes(b'{"at": 0, "prompt": "caf\xe9"}\n')
    result = runner.invoke(
        app, [*base, "--prompt-file", str(tmp_path / "latin.jsonl"), "--out", str(tmp_path / "c.gif")]
    )
    assert result.exit_code == 2
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "d.gif")])
    assert result.exit_code == 2 and "exactly one" in result.output


def test_disk_full_while_writing_leaves_nothing(tiny_folder, tmp_path, monkeypatch):
    from diagvid.video_io import VideoWriter

    def full(self, frames):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(VideoWriter, "append", full)
    out = tmp_path / "out"
    out.mkdir()
    argv = ["generate", "--model", str(tiny_folder), "-p", "a red circle", "--out", str(out / "c.mp4")]
    result = runner.invoke(app, [*argv, "--device", "cpu", "--seconds", "2"])
    assert result.exit_code == 1, result.output
    assert "No space left on device" in result.output and "nothing written" in result.output
    assert not list(out.iterdir())


def test_sigterm_mid_stream_leaves_no_half_file(tiny_folder, tmp_path):
    """A real `diagvid generate` process terminated while it writes: exit 130, no output, no temp file.

    (Ctrl-C takes the same path: SIGTERM is turned into KeyboardInterrupt while generating.)"""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "diagvid.cli", "generate", "--model", str(tiny_folder), "--device", "cpu"]
    cmd += ["-p", "a red circle moves left", "--seconds", "600", "--window", "4", "--out", str(out / "c.mp4")]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    deadline = time.monotonic() + 120
    while not list(out.iterdir()):  # the writer's temp file appears as it starts (ffmpeg: at chunk 1)
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline, "no chunk was written in time"
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 130, output
    assert "interrupted" in output
    assert not list(out.iterdir())


def test_prompt_file_that_is_not_utf8_is_refused(tiny_folder, tmp_path):
    bad = tmp_path / "timeline.jsonl"
    bad.write_bytes(b'{"at": 0, "prompt": "a red \xff\xfe circle"}\n')
    out = tmp_path / "c.mp4"
    argv = [
        "generate",
        "--model",
        str(tiny_folder),
        "--device",
        "cpu",
        "--prompt-file",
        str(bad),
        "--out",
        str(out),
    ]
    result = runner.invoke(app, argv)
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.split())
    # rich may wrap the long temporary path anywhere, so match the message after it
    assert "is not UTF-8 text: byte 27 (invalid start byte)" in said and not out.exists()


def test_assemble_builds_a_pipeline_that_generates_the_same_video(tiny_folder, tmp_path):
    """`diagvid assemble` from a generator + VAE + text folder gives the pipeline they came from; --dtype
    fp16 halves the stored weights, and mismatched parts or settings fail before anything is written."""
    from safetensors import safe_open

    def argv(out, vae=str(tiny_folder / "vae"), text=str(tiny_folder / "text"), schedule="self-forcing"):
        gen = str(tiny_folder / "generator")
        return ["assemble", gen, str(out), "--vae", vae, "--text", text, "--schedule", schedule]

    result = runner.invoke(app, argv(tmp_path / "p"))
    assert result.exit_code == 0, result.output
    built = load_pipeline(tmp_path / "p", device="cpu", latent_hw=(4, 4), frames_per_chunk=2)
    assert built.config.schedule == "self-forcing"
    a, _ = load_pipeline(tiny_folder, device="cpu").generate("a red circle moves left", num_chunks=2, seed=3)
    b, _ = built.generate("a red circle moves left", num_chunks=2, seed=3, schedule="diagonal")
    assert np.array_equal(a, b)

    result = runner.invoke(app, [*argv(tmp_path / "h"), "--dtype", "fp16"])
    assert result.exit_code == 0, result.output
    for part, name in (("generator", "model.safetensors"), ("vae", "vae.safetensors")):
        with safe_open(tmp_path / "h" / part / name, "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}, part  # noqa: SIM118
    half = load_pipeline(tmp_path / "h", device="cpu", latent_hw=(4, 4), frames_per_chunk=2)
    assert next(half.generator.parameters()).dtype == torch.float32  # loading casts back

    out = tmp_path / "never"
    bad = [
        (argv(out, vae="toy/vae"), "latent channels"),  # the toy VAE has 8 channels, the tiny DiT 4
        (argv(out, text="toy/text"), "text_dim"),
        (argv(out, schedule="sideways"), "unknown schedule"),
        ([*argv(out), "--dtype", "fp8"], "dtype='fp8'"),
    ]
    for args, message in bad:
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and message in result.output, (args, result.output)
        assert not (out / "pipeline.json").exists()


def test_a_bundled_folder_without_a_generator_names_what_is_missing(tmp_path, monkeypatch):
    import diagvid.pretrained as pretrained

    (tmp_path / "toy" / "vae").mkdir(parents=True)  # a codec but no pipeline.json + generator
    monkeypatch.setattr(pretrained, "ASSETS", tmp_path)
    with pytest.raises(FileNotFoundError, match="the bundled 'toy' pipeline has no trained generator yet"):
        load_pipeline(device="cpu")
    result = runner.invoke(
        app, ["generate", "-p", "a red circle moves left", "--out", str(tmp_path / "c.mp4")]
    )
    assert result.exit_code == 2
    assert "no trained generator yet" in " ".join(result.output.split())
    assert not (tmp_path / "c.mp4").exists()


def test_generate_fp8_writes_a_close_but_different_video(tiny_folder, tmp_path):
    """--fp8: the same frame count, frames near the full-precision ones (the rounding shows, a little)."""
    base = ["generate", "--model", str(tiny_folder), "--device", "cpu", "-p", "a red circle moves left"]
    videos = []
    for extra, name in (([], "full"), (["--fp8"], "fp8")):
        out = tmp_path / name
        result = runner.invoke(app, [*base, *extra, "--seconds", "1", "--seed", "4", "--out", str(out)])
        assert result.exit_code == 0, result.output
        videos.append(np.stack([np.asarray(read_image_frame(p)) for p in sorted(out.glob("*.png"))]))
    full, fp8 = videos
    assert full.shape == fp8.shape and len(full) > 0
    diff = np.abs(full.astype(int) - fp8.astype(int))
    assert 0 < diff.mean() < 10, diff.mean()


def read_image_frame(path):
    from PIL import Image

    return Image.open(path).convert("RGB")
