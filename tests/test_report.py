"""Report plots: the plotted numbers are the JSON's, the PNGs are real images, bad input fails clearly."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from diagvid import report as rp
from diagvid.cli import app

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
BENCH_FILE = RESULTS / "bench-toy-cpu.json"
EVAL_FILE = RESULTS / "eval-toy.json"


def _scores(mean: float, low: float, high: float, chunks: list[float | None], chunk_frames: int = 12) -> dict:
    """One eval result entry with a headline metric and a saturation curve."""
    return {
        "num_videos": 4,
        "chunk_frames": chunk_frames,
        "seconds": 1.0,
        "summary": {"all_accuracy": {"mean": mean, "low": low, "high": high, "n": 4}},
        "per_chunk": {"saturation": {"mean": chunks, "n": [4] * len(chunks)}},
    }


@pytest.fixture
def pair() -> tuple[dict, dict]:
    """A bench and an eval report that share one student (dd) and the teacher, plus one-sided methods."""
    bench = {
        "suite": "tiny",
        "machine": {"device": "cpu", "dtype": "float32", "cpu_threads": 2},
        "results": [
            {"method": "teacher", "nfe": 8, "fps": 2.0, "dit_fps": 4.0, "extrapolated_from_steps": 2},
            {"method": "dd", "nfe": 12, "fps": 10.0, "dit_fps": 40.0},
            {"method": "causvid", "nfe": 16, "fps": 9.0, "dit_fps": None},
        ],
        "ratios": {},
    }
    ev = {
        "config": {"frames": {"1x": 33, "2x": 65}},
        "results": {
            "real": {"1x": _scores(1.0, 1.0, 1.0, [0.5, 0.5]), "2x": _scores(1.0, 1.0, 1.0, [0.5] * 4)},
            "teacher": {"1x": _scores(0.75, 0.5, 1.0, [0.4, 0.3])},
            "dd": {
                "1x": _scores(0.5, 0.25, 0.75, [0.5, 0.4]),
                "2x": _scores(0.25, 0.0, 0.5, [0.5, None, 0.3, 0.2]),
            },
            "other": {"1x": _scores(0.1, 0.0, 0.2, [0.1, 0.1])},
        },
    }
    return bench, ev


def _is_png(path: Path) -> bool:
    with Image.open(path) as im:
        return im.format == "PNG" and im.width > 0 and im.height > 0


# ----- the numbers ----------------------------------------------------------------------------------------


def test_speed_bars_are_the_bench_numbers():
    bench = json.loads(BENCH_FILE.read_text())
    data = rp.speed_bars(bench)
    rows = bench["results"]
    assert data["methods"] == [r["method"] for r in rows]
    assert data["nfe"] == [r["nfe"] for r in rows]
    assert data["fps"] == [r["fps"] for r in rows]
    assert data["dit_fps"] == [r["dit_fps"] for r in rows]
    assert data["labels"][0] == "teacher\nNFE 100"
    assert "cpu" in data["title"] and "2 CPU threads" in data["title"]
    assert data["title"].endswith(f", {bench['decoder']} decoder")


def test_drift_is_the_eval_per_chunk_means_against_seconds():
    ev = json.loads(EVAL_FILE.read_text())
    data = rp.drift_over_time(ev)
    longest = f"{max(ev['config']['lengths'])}x"  # the default is the longest length in the file
    assert data["length"] == longest and data["fps"] == 16
    assert data["frames"] == ev["config"]["frames"][longest]
    # every method with a run at that length, in the file's order (the bidirectional teacher runs at 1x only)
    assert [s["method"] for s in data["series"]] == [m for m, r in ev["results"].items() if longest in r]
    assert len(data["series"]) >= 3
    for s in data["series"]:
        chunks = ev["results"][s["method"]][longest]["per_chunk"]["saturation"]
        assert s["mean"] == chunks["mean"] and s["n"] == chunks["n"]
        assert s["seconds"] == [k * 12 / 16 for k in range(len(chunks["mean"]))]
    noise = rp.drift_over_time(ev, "noise", "1x")
    assert noise["series"][1]["mean"] == ev["results"]["vae"]["1x"]["per_chunk"]["noise"]["mean"]


def test_default_fps_is_the_worlds():
    # render.py alone: the diagvid.world package pulls in the VAE and diffusers (seconds of imports)
    spec = importlib.util.spec_from_file_location("_render", Path(rp.__file__).parent / "world" / "render.py")
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    assert rp.DEFAULT_FPS == render.FPS


def test_real_files_join_the_teacher_and_keep_references_and_skips():
    bench, ev = json.loads(BENCH_FILE.read_text()), json.loads(EVAL_FILE.read_text())
    data = rp.quality_vs_nfe(bench, ev)
    nfe = {r["method"]: r["nfe"] for r in bench["results"]}
    joined = sorted(set(nfe) & set(ev["results"]))
    assert sorted(p["method"] for p in data["points"]) == joined and "teacher" in joined
    assert [p["nfe"] for p in data["points"]] == sorted(p["nfe"] for p in data["points"])
    for p in data["points"]:
        s = ev["results"][p["method"]]["1x"]["summary"]["all_accuracy"]
        assert (p["nfe"], p["mean"], p["low"], p["high"]) == (
            nfe[p["method"]],
            s["mean"],
            s["low"],
            s["high"],
        )
    assert [(r["method"], r["mean"]) for r in data["references"]] == [
        ("real", ev["results"]["real"]["1x"]["summary"]["all_accuracy"]["mean"]),
        ("vae", ev["results"]["vae"]["1x"]["summary"]["all_accuracy"]["mean"]),
    ]
    students_not_benched = set(ev["results"]) - set(nfe) - {"real", "vae"}  # e.g. the ODE-init student
    assert {s["method"] for s in data["skipped"]} == (set(nfe) - set(joined)) | students_not_benched


def test_quality_joins_on_method_name(pair):
    bench, ev = pair
    data = rp.quality_vs_nfe(bench, ev)
    assert data["points"] == [
        {"method": "teacher", "nfe": 8, "mean": 0.75, "low": 0.5, "high": 1.0, "n": 4},
        {"method": "dd", "nfe": 12, "mean": 0.5, "low": 0.25, "high": 0.75, "n": 4},
    ]
    assert data["references"] == [{"method": "real", "mean": 1.0, "low": 1.0, "high": 1.0, "n": 4}]
    assert data["skipped"] == [
        {"method": "other", "reason": "not in the bench file (no NFE)"},
        {"method": "causvid", "reason": "not in the eval file"},
    ]
    longer = rp.quality_vs_nfe(bench, ev, length="2x")  # the teacher is fixed-length: no 2x result
    assert [p["method"] for p in longer["points"]] == ["dd"] and longer["frames"] == 65
    assert {"method": "teacher", "reason": "no 2x result"} in longer["skipped"]


def test_drift_skips_methods_without_the_length_and_keeps_gaps(pair):
    _, ev = pair
    data = rp.drift_over_time(ev)
    assert data["length"] == "2x"
    assert [s["method"] for s in data["series"]] == ["real", "dd"]
    assert data["series"][1]["mean"] == [0.5, None, 0.3, 0.2]
    assert {s["method"] for s in data["skipped"]} == {"teacher", "other"}
    ev["config"]["fps"] = 24
    assert rp.drift_over_time(ev)["series"][0]["seconds"] == [0.0, 0.5, 1.0, 1.5]


def test_bad_options_and_shapes_are_report_errors(pair):
    bench, ev = pair
    with pytest.raises(rp.ReportError, match="no metric 'nope' at 1x"):
        rp.quality_vs_nfe(bench, ev, metric="nope")
    with pytest.raises(rp.ReportError, match=r"no '10x' results.*\['1x', '2x'\]"):
        rp.quality_vs_nfe(bench, ev, length="10x")
    with pytest.raises(rp.ReportError, match="unknown drift signal"):
        rp.drift_over_time(ev, "hue")
    with pytest.raises(rp.ReportError, match="is this a `diagvid eval` file"):
        rp.speed_bars(ev)
    with pytest.raises(rp.ReportError, match="is this a `diagvid bench` file"):
        rp.drift_over_time(bench)
    broken = copy.deepcopy(bench)
    del broken["results"][1]["nfe"]
    with pytest.raises(rp.ReportError, match=r"results\[1\] \(dd\) has no number 'nfe'"):
        rp.speed_bars(broken)


# ----- the files ------------------------------------------------------------------------------------------


def test_write_report_writes_all_three_pngs(pair, tmp_path):
    bench, ev = pair
    (tmp_path / "bench-a.json").write_text(json.dumps(bench))
    (tmp_path / "eval-b.json").write_text(json.dumps(ev))
    notes: list[str] = []
    written = rp.write_report(
        tmp_path / "bench-a.json", tmp_path / "eval-b.json", tmp_path / "out", note=notes.append
    )
    assert [p.name for p in written] == ["speed-a.png", "drift-b.png", "quality-vs-nfe-b.png"]
    assert all(p.stat().st_size > 0 and _is_png(p) for p in written)
    assert any("causvid skipped (not in the eval file)" in n for n in notes)
    only_eval = rp.write_report(None, tmp_path / "eval-b.json", tmp_path / "out2")
    assert [p.name for p in only_eval] == ["drift-b.png"]


def test_missing_matplotlib_says_which_extra(pair, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(rp.PlotsUnavailable, match=r'pip install "diagvid\[plots\]"'):
        rp.save_speed_bars(rp.speed_bars(pair[0]), tmp_path / "s.png")


def test_report_cli(tmp_path):
    runner = CliRunner()
    out = tmp_path / "plots"
    ok = runner.invoke(
        app, ["report", "--bench", str(BENCH_FILE), "--eval", str(EVAL_FILE), "--out", str(out)]
    )
    assert ok.exit_code == 0, ok.output
    assert "ode-init skipped" in ok.output  # an eval method the bench file lacks is named, not fatal
    for name in ("speed-toy-cpu.png", "drift-toy.png", "quality-vs-nfe-toy.png"):
        assert f"wrote {out / name}" in ok.output and _is_png(out / name)


def test_report_cli_bad_input(tmp_path):
    runner = CliRunner()
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    missing = tmp_path / "missing.json"
    cases = [
        (["--bench", str(missing)], f"{missing}: no such file"),
        (["--eval", str(bad)], f"{bad}: not valid JSON"),
        (["--eval", str(BENCH_FILE)], "is this a `diagvid bench` file"),
        (["--bench", str(BENCH_FILE), "--eval", str(EVAL_FILE), "--metric", "nope"], "no metric 'nope'"),
        (["--eval", str(EVAL_FILE), "--signal", "hue"], "unknown drift signal"),
        ([], "nothing to plot"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["report", *args, "--out", str(tmp_path / "out")])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
