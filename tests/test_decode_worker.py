"""The overlapped decode: a worker process decodes chunk i while chunk i + 1 is denoised.

Each worker is a fresh interpreter that imports torch (a few seconds), so the tests share one pipeline
and its worker where they can.
"""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch

from diagvid.decode_worker import DecodeWorker, DecodeWorkerError
from tests.conftest import make_tiny_pipeline

PROMPT = "a red circle moves left"


@pytest.fixture(scope="module")
def overlapped():
    """A tiny random pipeline decoding in a worker (started once for the module), and its inline twin."""
    pipe = make_tiny_pipeline(overlap_decode=True)
    inline = make_tiny_pipeline()
    yield pipe, inline
    pipe.close()


def test_overlapped_stream_hands_out_what_the_inline_stream_does(overlapped):
    pipe, inline = overlapped
    kwargs = {"num_chunks": 4, "schedule": "diagonal", "seed": 5}
    a, chunks_a = inline.generate(PROMPT, **kwargs)
    b, chunks_b = pipe.generate(PROMPT, **kwargs)
    assert pipe.decode_worker is not None and pipe.decode_worker.alive
    assert a.shape == b.shape == (1 + 4 * (4 * 2 - 1), 16, 16, 3)
    np.testing.assert_array_equal(a, b)  # same weights, same latents, same decoder: the same bytes
    for x, y in zip(chunks_a, chunks_b, strict=True):
        assert (x.index, x.first_frame, x.timesteps, x.nfe) == (y.index, y.first_frame, y.timesteps, y.nfe)
        torch.testing.assert_close(x.latents, y.latents, rtol=0, atol=0)
        assert y.seconds >= y.dit_seconds > 0


def test_each_chunk_after_the_first_is_handed_out_after_the_next_one_is_denoised(overlapped):
    pipe, _ = overlapped
    events = []

    def source(index: int) -> None:
        events.append(f"denoise {index}")  # called as chunk `index` starts

    for chunk in pipe.stream(PROMPT, num_chunks=4, schedule="diagonal", prompt_source=source):
        events.append(f"out {chunk.index}")
    assert events == [
        "denoise 0",
        "out 0",  # the first chunk at once: time to first frame is the inline one
        "denoise 1",
        "denoise 2",
        "out 1",  # decoded while chunk 2 was denoised
        "denoise 3",
        "out 2",
        "out 3",
    ]


def test_chunks_denoised_before_an_error_are_still_handed_out(overlapped):
    def source(index: int) -> str | None:
        if index == 3:
            return "a purple circle moves left"  # not in the vocabulary: ValueError as chunk 3 starts
        return None

    for pipe in overlapped:  # overlapped, then in line: the same chunks reach the caller before the error
        received = []
        with pytest.raises(ValueError, match="purple"):
            for chunk in pipe.stream(PROMPT, num_chunks=5, prompt_source=source):
                received.append((chunk.index, len(chunk.frames)))
        assert received == [(0, 5), (1, 8), (2, 8)]


def test_an_abandoned_stream_does_not_leak_frames_into_the_next(overlapped):
    pipe, inline = overlapped
    kwargs = {"num_chunks": 3, "schedule": "self-forcing", "seed": 9}
    stream = pipe.stream(PROMPT, num_chunks=3, seed=1)
    next(stream)
    next(stream)  # chunk 1 is handed out after chunk 2 is submitted; chunk 2 is never read
    stream.close()
    expected, _ = inline.generate(PROMPT, **kwargs)
    got, _ = pipe.generate(PROMPT, **kwargs)
    np.testing.assert_array_equal(got, expected)


def test_a_decode_error_names_its_cause_and_the_worker_lives_on(overlapped):
    pipe, _ = overlapped
    worker = pipe.start_decode_worker()
    stage = worker.begin()
    stage.submit(torch.zeros(1, 3, 2, 4, 4))  # the VAE reads 4 latent channels
    with pytest.raises(RuntimeError, match="decode worker failed on chunk 0") as err:
        stage.take()
    assert "ValueError" in str(err.value)
    assert worker.alive
    stage = worker.begin()
    stage.submit(torch.zeros(1, 4, 2, 4, 4))
    assert stage.take().shape == (5, 16, 16, 3)
    with pytest.raises(RuntimeError, match="without a submitted chunk"):
        stage.take()


def test_a_dead_worker_is_an_error_not_a_hang_and_the_pipeline_restarts_it(overlapped):
    pipe, inline = overlapped
    worker = pipe.start_decode_worker()
    stage = worker.begin()
    os.kill(worker.pid, signal.SIGKILL)
    worker._process.wait(timeout=30)
    with pytest.raises(RuntimeError, match=r"exited with code -9|is gone|closed its end"):
        stage.submit(torch.zeros(1, 4, 2, 4, 4))  # the socket may still take it: then `take` finds the end
        stage.take()
    expected, _ = inline.generate(PROMPT, num_chunks=2, seed=2)
    got, _ = pipe.generate(PROMPT, num_chunks=2, seed=2)  # a new worker starts
    np.testing.assert_array_equal(got, expected)
    assert pipe.decode_worker is not worker and not worker.alive


def test_a_worker_killed_mid_stream_ends_the_stream_without_a_gap(overlapped):
    pipe, _ = overlapped
    received = []
    with pytest.raises(DecodeWorkerError):
        for chunk in pipe.stream(PROMPT, num_chunks=4, seed=4):
            received.append(chunk.index)
            if chunk.index == 0:
                os.kill(pipe.decode_worker.pid, signal.SIGKILL)
                pipe.decode_worker._process.wait(timeout=30)
    assert received == [0]  # chunk 1 was lost with the worker, so nothing after it is handed out


def test_close_stops_the_worker():
    worker = DecodeWorker(make_tiny_pipeline().vae)
    assert worker.alive
    worker.close()
    assert not worker.alive
    worker.close()  # idempotent
    with pytest.raises(RuntimeError, match="not running"):
        worker.begin()


@pytest.mark.parametrize("threads", [0, -1, 1.5, True])
def test_bad_thread_counts_are_refused(threads):
    with pytest.raises(ValueError, match="threads="):
        DecodeWorker(object(), threads)


def test_the_bench_refuses_a_bad_overlapped_decode_before_building_anything():
    from diagvid.bench import run_bench

    with pytest.raises(ValueError, match="CPU or a CUDA device; device is meta"):
        run_bench("tiny", device="meta", overlap_decode=True)
    with pytest.raises(ValueError, match="decode_threads=0"):
        run_bench("tiny", device="cpu", overlap_decode=True, decode_threads=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_stream_decode_hands_out_what_the_inline_decode_does():
    inline, pipe = make_tiny_pipeline(), make_tiny_pipeline(overlap_decode=True)
    for p in (inline, pipe):
        p.generator.cuda()
        p.vae.cuda()
    a, _ = inline.generate(PROMPT, num_chunks=4, seed=5)
    b, chunks = pipe.generate(PROMPT, num_chunks=4, seed=5)
    assert pipe.decode_worker is None  # a second stream, no process
    np.testing.assert_array_equal(a, b)
    assert [c.index for c in chunks] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="for CPU pipelines"):
        pipe.start_decode_worker()


def test_overlapped_bench_reports_the_worker_and_gives_back_the_threads():
    from diagvid.bench import run_bench

    before = torch.get_num_threads()
    report = run_bench("tiny", device="cpu", methods=("diagonal",), warmup=False, overlap_decode=True)
    assert torch.get_num_threads() == before
    assert report["overlap_decode"] == {"decode_threads": 1}
    (result,) = report["results"]
    assert result["frames"] == 1 + 4 * (4 * 2 - 1)
    assert result["wall_s"] >= result["dit_s"] > 0
    assert result["decode_worker_peak_mem_mb"] > 0


def test_generate_overlap_decode_writes_the_same_video(tmp_path):
    from typer.testing import CliRunner

    from diagvid.cli import app
    from diagvid.pretrained import save_pipeline
    from diagvid.video_io import read_video

    folder = save_pipeline(make_tiny_pipeline(), tmp_path / "tiny")
    runner = CliRunner()
    base = ["generate", "--model", str(folder), "-p", PROMPT, "--seconds", "1", "--device", "cpu"]
    videos = []
    for extra in ([], ["--overlap-decode"]):
        out = tmp_path / f"clip{len(extra)}"  # a folder of PNG frames: lossless
        result = runner.invoke(app, [*base, "--out", str(out), *extra])
        assert result.exit_code == 0, result.output
        videos.append(read_video(out))
    assert len(videos[0]) == 21
    np.testing.assert_array_equal(videos[0], videos[1])
    result = runner.invoke(
        app, [*base, "--out", str(tmp_path / "x"), "--overlap-decode", "--decode-threads", "0"]
    )
    assert result.exit_code == 2 and "--decode-threads=0 must be >= 1" in result.output
