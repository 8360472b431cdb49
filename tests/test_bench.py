"""The benchmark protocol on the tiny suite: structure, engine-counted NFE, ratios from the same run."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from diagvid.bench import run_bench
from diagvid.cli import app


def test_tiny_suite_report():
    report = run_bench("tiny", device="cpu", warmup=False)
    by = {r["method"]: r for r in report["results"]}
    assert list(by) == ["teacher", "causvid", "self-forcing", "diagonal", "diagonal-clean"]
    # 4 chunks: diagonal 5 + 3 + 2 + 2, self-forcing 5 each, causvid 4 each, teacher 4 CFG steps x 2
    assert [by[m]["nfe"] for m in by] == [8, 16, 20, 12, 15]
    assert all(r["frames"] == 1 + 4 * (4 * 2 - 1) for r in report["results"])
    assert all(r["ttff_s"] <= r["wall_s"] and r["peak_mem_mb"] > 0 for r in report["results"])
    assert report["ratios"]["diagonal_vs_self_forcing"] == pytest.approx(
        by["self-forcing"]["wall_s"] / by["diagonal"]["wall_s"], rel=1e-2
    )
    assert report["machine"]["torch"] and report["weights"].startswith("random")
    for r in report["results"][1:]:  # the students' per-chunk latency: the first is the time to first frame
        assert len(r["chunk_s"]) == len(r["chunk_dit_s"]) == 4
        assert r["chunk_s"][0] == pytest.approx(r["ttff_s"], abs=1e-4)
        assert sum(r["chunk_s"]) <= r["wall_s"] + 1e-3 and sum(r["chunk_dit_s"]) == pytest.approx(
            r["dit_s"], abs=1e-3
        )
        assert all(c >= d > 0 for c, d in zip(r["chunk_s"], r["chunk_dit_s"], strict=True))
    assert "chunk_s" not in report["results"][0]  # the teacher makes the clip at once
    assert report["machine"]["cpu"] and report["machine"]["cpu_capability"]  # named, for the record
    assert set(report["machine"]["cpu_flags"]) <= {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}


def test_bf16_weights_run_every_method():
    # the GPU benchmark's default precision; on the CPU it is slower, but the same code must run
    report = run_bench("tiny", device="cpu", dtype="bf16", warmup=False)
    assert report["machine"]["dtype"] == "bfloat16"
    assert [r["nfe"] for r in report["results"]] == [8, 16, 20, 12, 15]
    assert all(r["frames"] == 1 + 4 * (4 * 2 - 1) for r in report["results"])


def test_repeated_rounds_report_medians_and_each_rounds_ratio():
    import statistics

    report = run_bench("tiny", device="cpu", warmup=False, methods=("self-forcing", "diagonal"), repeats=3)
    by = {r["method"]: r for r in report["results"]}
    assert report["repeats"] == 3
    for r in by.values():
        assert len(r["wall_s_rounds"]) == 3
        assert r["wall_s"] == pytest.approx(statistics.median(r["wall_s_rounds"]), abs=1e-4)
        assert r["fps"] == pytest.approx(r["frames"] / r["wall_s"], rel=1e-3)
    per_round = report["ratios_per_round"]["diagonal_vs_self_forcing"]
    rounds = zip(by["self-forcing"]["wall_s_rounds"], by["diagonal"]["wall_s_rounds"], strict=True)
    assert per_round == pytest.approx([a / b for a, b in rounds], rel=1e-2)
    assert len(report["ratios_per_round"]["diagonal_vs_self_forcing_dit"]) == 3
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="repeats="):
            run_bench("tiny", device="cpu", repeats=bad)


def test_bench_cli(tmp_path):
    runner = CliRunner()
    out = tmp_path / "b.json"
    result = runner.invoke(
        app,
        [
            "bench",
            "--suite",
            "tiny",
            "--random-weights",
            "--methods",
            "diagonal,self-forcing",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert [r["method"] for r in data["results"]] == ["self-forcing", "diagonal"]
    assert "diagonal_vs_self_forcing" in data["ratios"]
    untrained = runner.invoke(app, ["bench", "--suite", "tiny"])
    assert untrained.exit_code == 2 and "suite 'tiny' ships no trained weights" in untrained.output
    bad = runner.invoke(app, ["bench", "--suite", "huge", "--random-weights"])
    assert bad.exit_code == 2 and "unknown suite 'huge'" in bad.output


def test_teacher_time_is_extrapolated_and_says_so():
    report = run_bench("tiny", device="cpu", warmup=False, methods=("teacher",), teacher_timed_steps=2)
    (teacher,) = report["results"]
    assert teacher["extrapolated_from_steps"] == 2 and teacher["nfe"] == 8  # 4 CFG steps x 2, as if all ran
    assert teacher["wall_s"] >= teacher["dit_s"] > 0
    full = run_bench("tiny", device="cpu", warmup=False, methods=("teacher",), teacher_timed_steps=10)
    assert "extrapolated_from_steps" not in full["results"][0] and full["results"][0]["nfe"] == 8


def test_bench_cli_quick(tmp_path):
    out = tmp_path / "q.json"
    args = ["bench", "--suite", "tiny", "--random-weights", "--quick", "--methods", "teacher,diagonal"]
    result = CliRunner().invoke(app, [*args, "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert [r["method"] for r in json.loads(out.read_text())["results"]] == ["teacher", "diagonal"]
    bad = CliRunner().invoke(
        app, ["bench", "--suite", "tiny", "--random-weights", "--teacher-timed-steps", "0"]
    )
    assert bad.exit_code == 2 and "--teacher-timed-steps=0 must be >= 1" in bad.output


def test_endless_stream_holds_no_more_tensors_after_many_window_wraps():
    """Memory over a long stream: the live tensors (count and bytes) after chunk 20 are those after chunk 1,
    though the 2-chunk rolling window has wrapped many times; what peak RSS adds is allocator slack."""
    from diagvid.bench import stream_memory

    report = stream_memory("tiny", 10, window_frames=6)
    assert report["chunks"] >= 20 and report["probed_chunks_first_last"][1] >= 20
    first, last = report["live_tensors_first_last"]
    assert first == last, report
    mb_first, mb_last = report["live_tensor_mb_first_last"]
    assert abs(mb_last - mb_first) < 0.05, report


def test_cli_stream_seconds_reports_memory_inside_one_rolling_stream(tmp_path):
    """diagvid bench --stream-seconds: one diagonal stream through a rolling window, its report in JSON (the
    GPU run's "memory flat over a 60 s stream"); flags that belong to the method suite are refused."""
    from diagvid.cli import app

    out = tmp_path / "stream.json"
    args = ["bench", "--suite", "tiny", "--device", "cpu", "--stream-seconds", "5", "--window-frames", "6"]
    result = CliRunner().invoke(app, [*args, "--sink-frames", "2", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["window_frames"] == 6 and report["sink_frames"] == 2 and report["dtype"] == "float32"
    assert report["frames"] >= 5 * 16 and report["chunks"] >= 10  # 16 fps, every frame of 5 s
    assert report["probed_chunks_first_last"] == [1, 10 * (report["chunks"] // 10)]
    assert report["live_tensors_first_last"][0] == report["live_tensors_first_last"][1]
    mixed = CliRunner().invoke(app, [*args, "--methods", "diagonal", "--repeats", "3", "--fp8"])
    assert mixed.exit_code == 2 and "drop --methods, --repeats, --fp8" in " ".join(mixed.output.split())
    sink = CliRunner().invoke(app, [*args, "--sink-frames", "6"])
    assert sink.exit_code == 2 and "sink_frames=6" in " ".join(sink.output.split())


def test_bench_names_an_unknown_dtype_and_a_missing_gpu():
    from diagvid.bench import stream_memory

    with pytest.raises(ValueError, match="dtype 'int8'; allowed: bf16, fp16, fp32"):
        run_bench("tiny", device="cpu", dtype="int8", random_weights=True)
    with pytest.raises(ValueError, match="seconds=0 must be > 0"):
        stream_memory("tiny", 0, window_frames=6)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="this torch sees no CUDA device"):
            stream_memory("tiny", 1, window_frames=6, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_stream_memory_on_gpu_holds_the_same_allocation_after_the_window_wraps():
    from diagvid.bench import stream_memory

    report = stream_memory("tiny", 10, window_frames=6, device="cuda")
    per_probe = list(report["gpu_allocated_mb_per_probe"].values())
    assert len(per_probe) >= 3 and max(per_probe[1:]) - min(per_probe[1:]) < 1.0, report


def test_fp8_bench_runs_the_blocks_in_float8_with_the_same_forwards():
    from diagvid.model.fp8 import FP8Linear

    plain = run_bench(
        "tiny", device="cpu", warmup=False, methods=("diagonal", "teacher"), teacher_timed_steps=2
    )
    fp8 = run_bench(
        "tiny", device="cpu", warmup=False, methods=("diagonal", "teacher"), teacher_timed_steps=2, fp8=True
    )
    assert plain["fp8"] is None and fp8["fp8"].startswith("e4m3")
    assert [r["nfe"] for r in fp8["results"]] == [r["nfe"] for r in plain["results"]]
    assert [r["frames"] for r in fp8["results"]] == [r["frames"] for r in plain["results"]]
    from diagvid.bench import SUITES, build

    pipe = build(SUITES["tiny"], torch.device("cpu"), torch.float32)
    assert not any(isinstance(m, FP8Linear) for m in pipe.generator.modules())  # only when asked


def test_unknown_compile_mode_is_refused_before_any_model_is_built():
    with pytest.raises(ValueError, match="compile mode 'fast'; allowed: default, reduce-overhead"):
        run_bench("tiny", device="cpu", warmup=False, compile_mode="fast")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (inductor on a CPU takes minutes)")
def test_compiled_bench_on_gpu_counts_the_same_forwards():
    # the CPU-side guarantee (one graph per chunk forward, bounded recompiles) is tests/model/test_compile.py
    torch._dynamo.reset()
    plain = run_bench("tiny", device="cuda", warmup=False, methods=("diagonal",))
    compiled = run_bench(
        "tiny", device="cuda", methods=("diagonal",), compile_mode="max-autotune-no-cudagraphs"
    )
    torch._dynamo.reset()
    assert compiled["compile"] == "max-autotune-no-cudagraphs" and plain["compile"] is None
    assert compiled["results"][0]["nfe"] == plain["results"][0]["nfe"]
    assert compiled["results"][0]["frames"] == plain["results"][0]["frames"]


def test_bench_decodes_with_a_tiny_decoder_folder(tmp_path):
    """--decoder FOLDER: that decoder is the one built into the pipeline; its geometry is checked against
    the suite's latents, and a name that is neither a decoder kind nor a folder fails before any model."""
    from diagvid.model.tiny_decoder import TinyDecoder, preset

    fits = TinyDecoder(preset("tiny")).save(tmp_path / "fits")
    report = run_bench("tiny", device="cpu", warmup=False, methods=("diagonal",), decoder=str(fits))
    assert report["decoder"] == str(fits) and report["results"][0]["frames"] == 1 + 4 * (4 * 2 - 1)
    wrong = TinyDecoder(preset("tiny", z_dim=5)).save(tmp_path / "wrong")
    with pytest.raises(ValueError, match="reads 5 channels"):
        run_bench("tiny", device="cpu", warmup=False, methods=("diagonal",), decoder=str(wrong))
    with pytest.raises(ValueError, match="allowed: vae, tiny or a tiny decoder folder"):
        run_bench("tiny", device="cpu", warmup=False, decoder=str(tmp_path / "missing"))


def test_toy_suite_times_each_method_on_its_shipped_model():
    """Without random weights the toy suite loads the shipped students; NFE is what their schedules cost."""
    report = run_bench(
        "toy", device="cpu", warmup=False, methods=("self-forcing", "diagonal"), random_weights=False
    )
    by = {r["method"]: r for r in report["results"]}
    # 7 chunks: diagonal 5 + 3 + 2 x 5, Self-Forcing 5 each (4 steps + a clean context pass)
    assert by["diagonal"]["nfe"] == 18 and by["self-forcing"]["nfe"] == 35
    assert all(r["frames"] == 81 for r in by.values())
    assert report["weights"] == "shipped toy models" and report["ratios"]["diagonal_vs_self_forcing"] > 0


def test_the_gpu_check_script_parses_and_uses_only_existing_bench_options():
    """scripts/gpu_check.sh runs once per GPU session, where a typo costs device time: it must parse, and
    every option it gives `diagvid bench` must exist."""
    import re
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for script in ("gpu_check.sh", "gpu_wheels.sh"):
        subprocess.run(["bash", "-n", str(root / "scripts" / script)], check=True)
    text = (root / "scripts" / "gpu_check.sh").read_text()
    used = set(re.findall(r"(--[a-z][a-z0-9-]+)", text)) - {"--no-index", "--no-deps", "--no-compile"}
    used -= {"--no-cache-dir", "--upgrade", "--target", "--query-gpu", "--format"}  # pip's and nvidia-smi's
    help_text = " ".join(CliRunner().invoke(app, ["bench", "--help"], terminal_width=200).output.split())
    missing = sorted(flag for flag in used if flag not in help_text)
    assert not missing, missing
