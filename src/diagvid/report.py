"""Plots for docs/benchmarks.md from the JSON files that `diagvid bench` and `diagvid eval` write.

Three figures, each from a function that returns the numbers it plots (plain dicts and lists, so they can
be compared with the JSON) and a `save_*` function that draws them to a PNG:

- `speed_bars(bench)`: end-to-end and DiT-only frames per second of every benchmarked method.
- `quality_vs_nfe(bench, eval)`: an eval metric (mean and bootstrap CI) against the bench's NFE, joined
  on the method name; `real` and `vae` generate nothing, have no NFE and become reference lines.
- `drift_over_time(eval)`: a per-chunk drift signal (saturation, brightness, noise) against time.

`write_report` does all that the given files allow. matplotlib (the `plots` extra) is imported only when
a figure is drawn, and only through its object API with the Agg canvas: no pyplot, no global backend.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_FPS = 16
"""frames per second of the toy world's clips (`diagvid.world.FPS`); eval JSON does not record it"""

REFERENCE_METHODS = ("real", "vae")
"""eval methods that generate nothing (real clips, real clips through the codec): no NFE, a reference line"""

DRIFT_SIGNALS = {
    "saturation": "saturation (0-1)",
    "brightness": "brightness (0-1)",
    "noise": "noise (luma levels)",
}
"""per-chunk signals that `diagvid.world.metrics.drift_metrics` records, with their axis labels"""


class ReportError(ValueError):
    """An input file is missing, is not JSON, or is not what `diagvid bench` / `diagvid eval` writes."""


class PlotsUnavailable(ImportError):
    """matplotlib is not installed."""


# ----- reading and checking the inputs --------------------------------------------------------------------


def load_json(path: str | Path) -> dict:
    """Read one report; every failure is a ReportError that names the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ReportError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ReportError(f"{path}: is a folder, not a JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ReportError(f"{path}: not valid JSON ({err})") from None
    except OSError as err:
        raise ReportError(f"{path}: cannot read ({err.strerror or err})") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def check_bench(bench: Any, source: str = "bench JSON") -> list[dict]:
    """The result rows of a `diagvid bench` report, or a ReportError saying what is wrong with it."""
    results = bench.get("results") if isinstance(bench, dict) else None
    if not isinstance(results, list):
        hint = " (is this a `diagvid eval` file?)" if isinstance(results, dict) else ""
        raise ReportError(f"{source}: 'results' must be a list of per-method rows{hint}")
    for i, row in enumerate(results):
        if not isinstance(row, dict) or not isinstance(row.get("method"), str):
            raise ReportError(f"{source}: results[{i}] has no method name")
        for key in ("nfe", "fps"):
            if not _is_number(row.get(key)):
                raise ReportError(f"{source}: results[{i}] ({row['method']}) has no number '{key}'")
    return results


def check_eval(ev: Any, source: str = "eval JSON") -> dict[str, dict]:
    """The results of a `diagvid eval` report (method -> length -> scores), or a ReportError."""
    results = ev.get("results") if isinstance(ev, dict) else None
    if not isinstance(results, dict):
        hint = " (is this a `diagvid bench` file?)" if isinstance(results, list) else ""
        raise ReportError(f"{source}: 'results' must be an object of method -> length -> scores{hint}")
    for method, by_length in results.items():
        if not isinstance(by_length, dict):
            raise ReportError(f"{source}: results[{method!r}] must be an object of length -> scores")
        for length, scores in by_length.items():
            where = f"{source}: results[{method!r}][{length!r}]"
            if _length_multiple(length) is None:
                raise ReportError(f"{where}: lengths are written like '1x', '4x'")
            if not isinstance(scores, dict):
                raise ReportError(f"{where} must be an object")
            for key in ("summary", "per_chunk"):
                if not isinstance(scores.get(key), dict):
                    raise ReportError(f"{where} has no '{key}' object")
            if not isinstance(scores.get("chunk_frames"), int) or scores["chunk_frames"] < 1:
                raise ReportError(f"{where} has no positive integer 'chunk_frames'")
    return results


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _length_multiple(length: str) -> int | None:
    """'4x' -> 4; None for anything else."""
    if isinstance(length, str) and length.endswith("x") and length[:-1].isdigit():
        return int(length[:-1])
    return None


def _config(ev: dict) -> dict:
    """The eval report's config block ({} when it has none)."""
    config = ev.get("config")
    return config if isinstance(config, dict) else {}


def _frames(ev: dict, length: str) -> int | None:
    """Pixel frames of one eval length as the report's config records them (None if it does not)."""
    frames = _config(ev).get("frames")
    value = frames.get(length) if isinstance(frames, dict) else None
    return value if isinstance(value, int) else None


def _number_or_none(value: Any) -> float | None:
    return float(value) if _is_number(value) and math.isfinite(value) else None


# ----- the numbers of each figure -------------------------------------------------------------------------


def machine_label(bench: dict) -> str:
    """'cpu, float32, 2 CPU threads' from a bench report's machine block (what it has of it)."""
    machine = bench.get("machine") if isinstance(bench.get("machine"), dict) else {}
    parts = [str(machine.get("device") or "unknown device")]
    if machine.get("dtype"):
        parts.append(str(machine["dtype"]))
    if machine.get("cpu_threads"):
        parts.append(f"{machine['cpu_threads']} CPU threads")
    return ", ".join(parts)


def speed_bars(bench: dict) -> dict:
    """End-to-end and DiT-only FPS per method, in the bench's order, with NFE in each tick label.

    `dit_fps` is None where the report has none (a method without DiT time).
    """
    rows = check_bench(bench)
    labels = []
    for r in rows:
        label = f"{r['method']}\nNFE {r['nfe']}"
        if r.get("extrapolated_from_steps"):
            label += f"\n(timed {r['extrapolated_from_steps']} steps)"
        labels.append(label)
    decoder = f", {bench['decoder']} decoder" if bench.get("decoder") else ""
    return {
        "title": f"suite {bench.get('suite', '?')} on {machine_label(bench)}{decoder}",
        "methods": [r["method"] for r in rows],
        "nfe": [r["nfe"] for r in rows],
        "labels": labels,
        "fps": [float(r["fps"]) for r in rows],
        "dit_fps": [_number_or_none(r.get("dit_fps")) for r in rows],
    }


def quality_vs_nfe(bench: dict, ev: dict, metric: str = "all_accuracy", length: str = "1x") -> dict:
    """One point per method in both reports: x = bench NFE, y = the eval metric's mean with its CI.

    `real` and `vae` become `references` (horizontal lines). Every other method that cannot be placed is
    listed in `skipped` with the reason: only in one file, no result at `length`, or no value of `metric`.
    """
    rows = check_bench(bench)
    results = check_eval(ev)
    _check_metric(results, metric, length)
    nfe = {r["method"]: r["nfe"] for r in rows}
    points, references, skipped = [], [], []
    for method, by_length in results.items():
        if method not in nfe and method not in REFERENCE_METHODS:
            skipped.append({"method": method, "reason": "not in the bench file (no NFE)"})
            continue
        value = _metric_value(by_length.get(length), metric)
        if value is None:
            reason = f"no {length} result" if length not in by_length else f"no value of {metric} at {length}"
            skipped.append({"method": method, "reason": reason})
            continue
        if method in nfe:
            points.append({"method": method, "nfe": nfe[method], **value})
        else:
            references.append({"method": method, **value})
    skipped += [{"method": m, "reason": "not in the eval file"} for m in nfe if m not in results]
    frames = _frames(ev, length)
    return {
        "metric": metric,
        "length": length,
        "frames": frames,
        "points": sorted(points, key=lambda p: p["nfe"]),
        "references": references,
        "skipped": skipped,
    }


def _check_metric(results: dict[str, dict], metric: str, length: str) -> None:
    """A ReportError naming what exists when no method has `length` or `metric` at all."""
    lengths = sorted({n for by_length in results.values() for n in by_length}, key=_length_multiple)
    if length not in lengths:
        raise ReportError(f"no {length!r} results in the eval file; it has {lengths}")
    metrics = sorted(
        {k for by_length in results.values() if length in by_length for k in by_length[length]["summary"]}
    )
    if metric not in metrics:
        raise ReportError(f"no metric {metric!r} at {length} in the eval file; it has {metrics}")


def _metric_value(scores: dict | None, metric: str) -> dict | None:
    """{mean, low, high, n} of one metric, or None when it is missing or has no finite mean."""
    entry = (scores or {}).get("summary", {}).get(metric)
    if not isinstance(entry, dict) or _number_or_none(entry.get("mean")) is None:
        return None
    mean = float(entry["mean"])
    low, high = _number_or_none(entry.get("low")), _number_or_none(entry.get("high"))
    return {
        "mean": mean,
        "low": mean if low is None else low,
        "high": mean if high is None else high,
        "n": entry.get("n"),
    }


def longest_length(ev: dict) -> str:
    """The longest length ('10x' before '4x') that any method of an eval report has."""
    lengths = {n for by_length in check_eval(ev).values() for n in by_length}
    if not lengths:
        raise ReportError("the eval file has no results")
    return max(lengths, key=_length_multiple)


def drift_over_time(ev: dict, signal: str = "saturation", length: str | None = None) -> dict:
    """Per method, the per-chunk mean of a drift signal against time: chunk k starts at
    k * chunk_frames / fps seconds. `length` defaults to the longest one; methods without it (the
    fixed-length teacher) are listed in `skipped`. Chunks without a value stay None.
    """
    results = check_eval(ev)
    if signal not in DRIFT_SIGNALS:
        raise ReportError(f"unknown drift signal {signal!r}; allowed: {sorted(DRIFT_SIGNALS)}")
    length = length or longest_length(ev)
    fps = _config(ev).get("fps", DEFAULT_FPS)
    if not _is_number(fps) or fps <= 0:
        raise ReportError(f"config.fps={fps!r} in the eval file must be a positive number")
    series, skipped = [], []
    for method, by_length in results.items():
        scores = by_length.get(length)
        chunks = (scores or {}).get("per_chunk", {}).get(signal)
        if not isinstance(chunks, dict) or not isinstance(chunks.get("mean"), list):
            skipped.append({"method": method, "reason": f"no per-chunk {signal} at {length}"})
            continue
        step = scores["chunk_frames"] / fps
        series.append(
            {
                "method": method,
                "chunk_frames": scores["chunk_frames"],
                "seconds": [k * step for k in range(len(chunks["mean"]))],
                "mean": [_number_or_none(v) for v in chunks["mean"]],
                "n": list(chunks.get("n") or []),
            }
        )
    if not series:
        raise ReportError(f"no per-chunk {signal} at {length} in the eval file")
    frames = _frames(ev, length)
    return {
        "signal": signal,
        "length": length,
        "frames": frames,
        "fps": fps,
        "series": series,
        "skipped": skipped,
    }


# ----- drawing --------------------------------------------------------------------------------------------


def _figure(width: float = 7.0, height: float = 4.2):
    """A matplotlib Figure on an Agg canvas (no pyplot, no global backend switch)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise PlotsUnavailable(
            f'plots need matplotlib ({err}); install the plots extra: pip install "diagvid[plots]"'
        ) from err
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def save_speed_bars(data: dict, path: str | Path) -> Path:
    """Grouped bars: end-to-end and DiT-only FPS per method."""
    fig = _figure(max(6.0, 1.3 * len(data["methods"]) + 2.0))
    ax = fig.add_subplot()
    xs = range(len(data["methods"]))
    width = 0.38
    for offset, key, label in ((-width / 2, "fps", "end to end"), (width / 2, "dit_fps", "DiT only")):
        heights = [math.nan if v is None else v for v in data[key]]
        bars = ax.bar([x + offset for x in xs], heights, width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
    ax.set_xticks(list(xs), data["labels"], fontsize=8)
    ax.set_ylabel("frames per second")
    ax.set_title(data["title"], fontsize=10)
    ax.margins(y=0.12)
    ax.legend(frameon=False)
    return _save(fig, path)


def save_quality_vs_nfe(data: dict, path: str | Path) -> Path:
    """Points with CI error bars against NFE, reference methods as horizontal lines."""
    fig = _figure()
    ax = fig.add_subplot()
    for p in data["points"]:
        yerr = [[p["mean"] - p["low"]], [p["high"] - p["mean"]]]
        ax.errorbar([p["nfe"]], [p["mean"]], yerr=yerr, fmt="o", capsize=4)
        ax.annotate(p["method"], (p["nfe"], p["mean"]), xytext=(5, 5), textcoords="offset points", fontsize=8)
    for ref, style in zip(data["references"], ("--", ":", "-.", (0, (5, 1))), strict=False):
        ax.axhline(ref["mean"], color="grey", linestyle=style, label=f"{ref['method']} ({ref['mean']:.2f})")
    ax.set_xlim(0, 1.15 * max((p["nfe"] for p in data["points"]), default=1))
    ax.set_xlabel("NFE (forward passes per clip, from the bench file)")
    ax.set_ylabel(f"{data['metric']} (mean, 95% CI)")
    frames = f" ({data['frames']} frames)" if data.get("frames") else ""
    ax.set_title(f"{data['metric']} at {data['length']}{frames} against NFE", fontsize=10)
    if data["references"]:
        ax.legend(frameon=False, fontsize=8)
    return _save(fig, path)


def save_drift_over_time(data: dict, path: str | Path) -> Path:
    """One line per method: the per-chunk mean of the signal against time."""
    fig = _figure()
    ax = fig.add_subplot()
    for s in data["series"]:
        ys = [math.nan if v is None else v for v in s["mean"]]
        ax.plot(s["seconds"], ys, marker="o", markersize=3, label=s["method"])
    ax.set_xlabel("time (s, chunk start)")
    ax.set_ylabel(DRIFT_SIGNALS[data["signal"]])
    frames = f"{data['frames']} frames, " if data.get("frames") else ""
    ax.set_title(f"{data['signal']} per chunk at {data['length']} ({frames}{data['fps']} fps)", fontsize=10)
    ax.legend(frameon=False, fontsize=8)
    return _save(fig, path)


# ----- everything the given files allow -------------------------------------------------------------------


def _tag(path: Path, prefix: str) -> str:
    """'bench-toy-cpu.json' -> 'toy-cpu': names the PNGs after their input."""
    stem = path.stem
    return stem.removeprefix(prefix) if stem != prefix and stem.startswith(prefix) else stem


def write_report(
    bench_path: str | Path | None,
    eval_path: str | Path | None,
    out_dir: str | Path,
    *,
    metric: str = "all_accuracy",
    length: str = "1x",
    signal: str = "saturation",
    note: Callable[[str], None] | None = None,
) -> list[Path]:
    """Write the PNGs the given files allow into `out_dir`; returns their paths.

    speed-TAG.png needs the bench file, drift-TAG.png the eval file, quality-vs-nfe-TAG.png both and at
    least one method in both (TAG: the eval file's name without 'eval-'). `note` receives what was
    skipped and why.
    """
    if bench_path is None and eval_path is None:
        raise ReportError("nothing to plot: give a bench file, an eval file or both")
    if signal not in DRIFT_SIGNALS:
        raise ReportError(f"unknown drift signal {signal!r}; allowed: {sorted(DRIFT_SIGNALS)}")
    bench = ev = None
    if bench_path is not None:
        bench_path = Path(bench_path)
        bench = load_json(bench_path)
        check_bench(bench, str(bench_path))
    if eval_path is not None:
        eval_path = Path(eval_path)
        ev = load_json(eval_path)
        check_eval(ev, str(eval_path))
    note = note or (lambda _msg: None)
    plots = []  # every figure's numbers first, so a bad option fails before any file is written
    if bench is not None:
        plots.append((save_speed_bars, speed_bars(bench), f"speed-{_tag(bench_path, 'bench-')}.png"))
    if ev is not None:
        try:
            drift = drift_over_time(ev, signal)
            quality = quality_vs_nfe(bench, ev, metric, length) if bench is not None else None
        except ReportError as err:
            raise ReportError(f"{eval_path}: {err}") from None
        for s in drift["skipped"]:
            note(f"drift: {s['method']} skipped ({s['reason']})")
        plots.append((save_drift_over_time, drift, f"drift-{_tag(eval_path, 'eval-')}.png"))
        if quality is not None:
            for s in quality["skipped"]:
                note(f"quality vs NFE: {s['method']} skipped ({s['reason']})")
            if quality["points"]:
                plots.append((save_quality_vs_nfe, quality, f"quality-vs-nfe-{_tag(eval_path, 'eval-')}.png"))
            else:
                note("quality vs NFE: no method is in both files, so no plot was written")
    out = Path(out_dir)
    return [save(data, out / name) for save, data, name in plots]
