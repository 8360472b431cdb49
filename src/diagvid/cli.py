"""The `diagvid` command line: parse, load, call the library. No logic of its own."""

from __future__ import annotations

import contextlib
import json
import math
import platform
from typing import NamedTuple

import typer
from rich.console import Console

import diagvid

app = typer.Typer(
    help="Real-time streaming video generation with Diagonal Distillation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)

# `--generator` of the commands that load a pipeline (generate, serve)
GENERATOR_HELP = (
    "Causal checkpoint instead of the pipeline's own: a folder, or a shipped toy student such as "
    "toy/students/self-forcing (needed with a Wan folder)."
)


@app.callback()
def _root() -> None:
    """Real-time streaming video generation with Diagonal Distillation."""


@app.command()
def info(as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON.")) -> None:
    """Version, torch, device and where the bundled weights are (and the noise levels of the noise experts)."""
    import torch

    from diagvid.assets import bundled_models
    from diagvid.model.weights import FULL_RANGE, read_noise_range

    cuda = torch.cuda.is_available()
    bundled = bundled_models()
    ranges = {name: read_noise_range(where) for name, where in bundled.items()}
    data = {
        "diagvid": diagvid.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "bundled": bundled,
        "noise_experts": {name: list(r) for name, r in ranges.items() if r != FULL_RANGE},
    }
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    for key, value in data.items():
        if key == "noise_experts":
            continue  # shown beside their paths
        if key == "bundled":
            console.print("[bold]bundled weights[/bold]:")
            for name, where in value.items():
                lo, hi = ranges[name]
                trained = "" if ranges[name] == FULL_RANGE else f" (noise expert: levels {lo:g}-{hi:g})"
                console.print(f"  {name}{trained}: {where}")
        else:
            console.print(f"[bold]{key}[/bold]: {value}")


OVERLAP_HELP = (
    "Decode each chunk while the next one is denoised (frames arrive one chunk later): on a CPU in a worker "
    "process that takes a few seconds to start (this process keeps the other cores), on CUDA on a second stream."
)
FP8_HELP = (
    "Run the transformer blocks' linear layers in float8 e4m3 with row-wise scales (CUDA compute capability "
    ">= 8.9; on a CPU slower, for measuring the quality cost)."
)


def _fp8(dit):
    """`--fp8`: the DiT's block linears in float8, in place (diagvid.model.fp8), each expert's for a pair of
    noise experts; returns the DiT."""
    from diagvid.model.experts import NoiseExperts
    from diagvid.model.fp8 import quantize_fp8

    for part in (dit.high, dit.low) if isinstance(dit, NoiseExperts) else (dit,):
        quantize_fp8(part)
    return dit


DECODE_THREADS_HELP = "With --overlap-decode: the worker's threads (this process gets the rest, at least 1)."


def _overlap_decode(pipe, decode_threads: int) -> None:
    """Turn on `overlap_decode`; on a CPU give the worker its threads, this process the rest, and start it."""
    import torch

    from diagvid.decode_worker import check_overlap, threads_beside_worker

    check_overlap(pipe.device, decode_threads, "--decode-threads")
    pipe.config.overlap_decode = True
    pipe.config.decode_threads = decode_threads
    if pipe.device.type == "cpu":
        torch.set_num_threads(threads_beside_worker(decode_threads))
        pipe.start_decode_worker()


DECODER_HELP = (
    "vae | tiny | a tiny decoder folder: tiny decodes with the pipeline's fast decoder (tiny-decoder/), "
    "~7x less decode time than the VAE's on the toy CPU; softer objects, jumpier motion."
)
DECODER_DTYPE_HELP = (
    "fp32 | bf16 | fp16: the tiny decoder's precision (default fp32); bf16 decodes about 4x faster on a CPU "
    "with AMX, 58-63 dB from fp32's pixels."
)


@app.command()
def generate(
    prompt: list[str] = typer.Option(
        [], "--prompt", "-p", help="Prompt; repeat with '@4s ...' to switch prompts mid-stream."
    ),
    prompt_file: str | None = typer.Option(
        None, "--prompt-file", help='JSON-lines timeline: {"at": 0, "prompt": "..."} per line.'
    ),
    out: str = typer.Option(
        "clip.mp4", "--out", "-o", help="Output: .mp4, .gif, or a folder for PNG frames."
    ),
    seconds: float = typer.Option(5.0, "--seconds", "-s", help="Length of the video in seconds."),
    schedule: str | None = typer.Option(
        None, "--schedule", help="diagonal | diagonal-5to2 | self-forcing | causvid (default: the model's)."
    ),
    steps: str | None = typer.Option(
        None, "--steps", help="Per-chunk timesteps, e.g. '1000,933,833,357;1000,933,357;1000,357'."
    ),
    context: str | None = typer.Option(
        None, "--context", help="Context policy of every chunk: noisy | clean."
    ),
    seed: int = typer.Option(0, "--seed", help="Noise seed: the same seed gives the same video."),
    image: str | None = typer.Option(None, "--image", help="First frame (image-to-video)."),
    continue_from: str | None = typer.Option(
        None, "--continue", help="A clip to continue: its frames are encoded into the cache first."
    ),
    video: str | None = typer.Option(None, "--video", help="Input video for streaming video-to-video."),
    strength: float = typer.Option(0.6, "--strength", help="Video-to-video: how much to change, in (0, 1]."),
    model: str = typer.Option("toy", "--model", help="Bundled name or pipeline folder."),
    generator: str | None = typer.Option(None, "--generator", help=GENERATOR_HELP),
    decoder: str = typer.Option("vae", "--decoder", help=DECODER_HELP),
    decoder_dtype: str | None = typer.Option(None, "--decoder-dtype", help=DECODER_DTYPE_HELP),
    window: int | None = typer.Option(None, "--window", help="KV window in latent frames (endless video)."),
    sink: int | None = typer.Option(None, "--sink", help="Attention-sink frames kept when the window rolls."),
    recache: bool = typer.Option(
        False, "--recache", help="On a prompt switch, recompute the cached frames' K/V under the new prompt."
    ),
    device: str | None = typer.Option(
        None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if present)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the run's figures as JSON on stdout."),
    overlap_decode: bool = typer.Option(False, "--overlap-decode", help=OVERLAP_HELP),
    decode_threads: int = typer.Option(1, "--decode-threads", help=DECODE_THREADS_HELP),
    fp8: bool = typer.Option(False, "--fp8", help=FP8_HELP),
) -> None:
    """Generate a video, writing frames as each chunk is ready."""
    import time

    from rich.progress import BarColumn, Progress, TextColumn

    from diagvid.pretrained import load_pipeline
    from diagvid.sampling import get_schedule
    from diagvid.video_io import VideoWriter, output_kind, read_image, read_video

    pipe = None
    try:
        # every check before any compute
        if schedule and steps:
            raise ValueError("give --schedule or --steps, not both")
        if bool(prompt) == bool(prompt_file):
            raise ValueError("give --prompt (repeatable) or --prompt-file, exactly one of them")
        from diagvid.stream import read_timeline

        timeline = read_timeline(prompt_file) if prompt_file else prompt
        sched = (
            get_schedule(steps or schedule or "diagonal", context) if (steps or schedule or context) else None
        )
        output_kind(out)
        first = read_image(image) if image else None
        previous = read_video(continue_from) if continue_from else None
        source = read_video(video) if video else None
        pipe = load_pipeline(
            model, generator=generator, device=device, decoder=decoder, decoder_dtype=decoder_dtype
        )
        if window is not None:
            pipe.config.window_frames = window
        if sink is not None:
            pipe.config.sink_frames = sink
        if fp8:
            _fp8(pipe.generator)
        if overlap_decode:
            _overlap_decode(pipe, decode_threads)
        length = {} if source is not None else {"num_chunks": pipe.num_chunks(seconds)}
        stream = pipe.stream(
            timeline,
            schedule=sched,
            seed=seed,
            image=first,
            continue_from=previous,
            video=source,
            strength=strength,
            recache=recache,
            **length,
        )
        num_chunks = length.get("num_chunks") or pipe.chunks_of_video(len(source))
        t0 = time.perf_counter()
        chunks, ttff = [], None
        bar = Progress(
            TextColumn("[bold]generate"), BarColumn(), TextColumn("{task.fields[info]}"), console=console
        )
        with _sigterm_as_interrupt(), bar, VideoWriter(out, pipe.config.fps) as writer:
            task = bar.add_task("gen", total=num_chunks, info="")
            for chunk in stream:
                writer.append(chunk.frames)
                ttff = ttff if ttff is not None else time.perf_counter() - t0
                chunks.append(chunk)
                elapsed = time.perf_counter() - t0
                bar.update(
                    task,
                    completed=max(0, chunk.index + 1),
                    info=f"chunk {chunk.index + 1}/{num_chunks}  nfe {sum(c.nfe for c in chunks)}  "
                    f"{writer.frames_written / elapsed:.1f} fps",
                )
        total = time.perf_counter() - t0  # the file is complete; stopping a decode worker is not generation
    except (ValueError, FileNotFoundError, FloatingPointError, UnicodeDecodeError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from err
    except OSError as err:  # disk full, permissions, a vanished folder: the writer has removed its temp file
        console.print(f"[red]error:[/red] could not write {out}: {err}; nothing written")
        raise typer.Exit(1) from err
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted:[/yellow] nothing written to {out}")
        raise typer.Exit(130) from None
    finally:
        if pipe is not None:
            pipe.close()  # the decode worker, if one was started
    figures = {
        "out": out,
        "frames": writer.frames_written,
        "seconds_of_video": writer.frames_written / pipe.config.fps,
        "chunks": len([c for c in chunks if c.index >= 0]),
        "nfe": sum(c.nfe for c in chunks),
        "recache_nfe": sum(c.recache_nfe for c in chunks),
        "wall_s": round(total, 3),
        "fps": round(writer.frames_written / total, 2),
        "ttff_s": round(ttff or 0.0, 3),
        "per_chunk": [
            {
                "index": c.index,
                "nfe": c.nfe,
                "recache_nfe": c.recache_nfe,
                "timesteps": list(c.timesteps),
                "seconds": round(c.seconds, 4),
                "prompt": c.prompt,
            }
            for c in chunks
        ],
    }
    if as_json:
        typer.echo(json.dumps(figures, indent=2))
    else:
        console.print(
            f"wrote {out}: {figures['frames']} frames ({figures['seconds_of_video']:.2f} s) in {total:.2f} s, "
            f"{figures['fps']} fps, NFE {figures['nfe']}, first frame after {figures['ttff_s']} s"
        )


@app.command()
def convert(
    src: str = typer.Argument(
        ..., help="Checkpoint folder or file: ours, Wan2.1, diffusers, Self-Forcing/CausVid/LongLive/DD."
    ),
    dst: str = typer.Argument(..., help="Output folder."),
    to: str = typer.Option("diagvid", "--to", help="Output layout: diagvid | wan | diffusers."),
    config: str | None = typer.Option(
        None,
        "--config",
        help="Architecture of a checkpoint that carries none: preset or config.json (default wan2.1-t2v-1.3b).",
    ),
    no_ema: bool = typer.Option(False, "--no-ema", help="Take `generator` instead of `generator_ema`."),
    lora: str | None = typer.Option(None, "--lora", help="Separate LoRA file to merge (LongLive / DD-S)."),
    lora_scale: float = typer.Option(
        1.0, "--lora-scale", help="LoRA alpha / rank (1.0 for their rank 256, alpha 256)."
    ),
    shards: int = typer.Option(1, "--shards", help="Split wan/diffusers weights over this many files."),
    dtype: str | None = typer.Option(
        None, "--dtype", help="Cast floating tensors: fp32 | fp16 | bf16 (default: keep their precision)."
    ),
) -> None:
    """Convert a DiT checkpoint between layouts; pickles are read with weights_only=True, never executed."""
    from diagvid.model.weights import convert as convert_weights

    try:
        lines = convert_weights(
            src,
            dst,
            to=to,
            config=config,
            ema=not no_ema,
            lora=lora,
            lora_scale=lora_scale,
            shards=shards,
            dtype=dtype,
        )
    except (ValueError, FileNotFoundError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from err
    for line in lines:
        console.print(line, highlight=False)


@app.command()
def assemble(
    generator: str = typer.Argument(..., help="Trained causal generator folder (e.g. a distill --export)."),
    out: str = typer.Argument(..., help="Pipeline folder to write (pipeline.json, generator/, vae/, text/)."),
    vae: str = typer.Option("toy/vae", "--vae", help="VAE: bundled name or folder."),
    text: str = typer.Option("toy/text", "--text", help="Text encoder: bundled name or folder."),
    schedule: str = typer.Option("diagonal", "--schedule", help="The pipeline's default schedule."),
    dtype: str | None = typer.Option(
        None, "--dtype", help="Store generator and VAE weights as fp16 | bf16 | fp32 (default: as they are)."
    ),
) -> None:
    """Build a pipeline folder that `diagvid generate --model` (and `serve`, `eval`) can run."""
    from diagvid.pretrained import assemble_pipeline

    try:
        folder = assemble_pipeline(generator, out, vae=vae, text=text, dtype=dtype, schedule=schedule)
    except (ValueError, FileNotFoundError) as err:
        console.print(f"[red]error:[/red] {err}", highlight=False)
        raise typer.Exit(2) from err
    console.print(f"wrote {folder}", highlight=False)


@app.command()
def bench(
    suite: str = typer.Option("toy", "--suite", help="toy | wan-1.3b | tiny"),
    random_weights: bool = typer.Option(
        False,
        "--random-weights",
        help="Time random-weight models of the suite's geometry (no checkpoints; needed for every suite but toy, "
        "whose methods otherwise run on their shipped models).",
    ),
    methods: str | None = typer.Option(
        None, "--methods", help="Comma list, e.g. diagonal,self-forcing,teacher."
    ),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda ... (default: cuda if present)."),
    dtype: str | None = typer.Option(
        None, "--dtype", help="bf16 | fp16 | fp32 (default: bf16 on GPU, fp32 on CPU)."
    ),
    out: str | None = typer.Option(None, "--json", help="Write the report to this JSON file."),
    quick: bool = typer.Option(
        False, "--quick", help="Smoke run: no warm-up, the teacher timed over 5 steps and scaled to 50."
    ),
    teacher_steps: int | None = typer.Option(
        None, "--teacher-timed-steps", help="Time this many teacher steps and scale to the full count."
    ),
    compile_mode: str | None = typer.Option(
        None,
        "--compile",
        help="torch.compile the transformer: default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs.",
    ),
    decoder: str = typer.Option(
        "vae",
        "--decoder",
        help="vae | tiny | a tiny decoder folder: what decodes every method's latents (tiny: the bundled one).",
    ),
    decoder_dtype: str | None = typer.Option(None, "--decoder-dtype", help=DECODER_DTYPE_HELP),
    repeats: int = typer.Option(
        1,
        "--repeats",
        help="Timed rounds, every method once per round, in turn; each method reports its median "
        "(use 5 or more on a shared machine).",
    ),
    overlap_decode: bool = typer.Option(False, "--overlap-decode", help=OVERLAP_HELP),
    decode_threads: int = typer.Option(1, "--decode-threads", help=DECODE_THREADS_HELP),
    fp8: bool = typer.Option(False, "--fp8", help=FP8_HELP),
    stream_seconds: float | None = typer.Option(
        None,
        "--stream-seconds",
        help="Instead of the methods: one diagonal stream this long with a rolling KV window (random weights), "
        "reporting memory inside the stream (flat means no leak).",
    ),
    window_frames: int = typer.Option(
        21, "--window-frames", help="With --stream-seconds: latent frames the rolling KV window keeps."
    ),
    sink_frames: int = typer.Option(
        3, "--sink-frames", help="With --stream-seconds: first latent frames the window always keeps."
    ),
) -> None:
    """Time every method in one process: NFE, FPS (DiT-only and end to end), time to first frame, memory."""
    from pathlib import Path

    from rich.table import Table

    from diagvid.bench import run_bench, stream_memory

    try:
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)  # fail on an unwritable path before timing
        if stream_seconds is not None:
            ignored = [
                flag
                for flag, used in (
                    ("--methods", methods is not None),
                    ("--compile", compile_mode is not None),
                    ("--decoder", decoder != "vae"),
                    ("--decoder-dtype", decoder_dtype is not None),
                    ("--repeats", repeats != 1),
                    ("--overlap-decode", overlap_decode),
                    ("--quick", quick),
                    ("--teacher-timed-steps", teacher_steps is not None),
                    ("--fp8", fp8),
                )
                if used
            ]
            if ignored:
                raise ValueError(
                    f"--stream-seconds runs one plain diagonal stream; drop {', '.join(ignored)}"
                )
            report = stream_memory(
                suite, stream_seconds, window_frames, sink_frames, device=device, dtype=dtype
            )
            console.print_json(data=report)
            if out:
                Path(out).write_text(json.dumps(report, indent=2) + "\n")
                console.print(f"wrote {out}")
            return
        chosen = tuple(m.strip() for m in methods.split(",")) if methods else None
        if teacher_steps is not None and teacher_steps < 1:
            raise ValueError(f"--teacher-timed-steps={teacher_steps} must be >= 1")
        report = run_bench(
            suite,
            device=device,
            dtype=dtype,
            methods=chosen,
            warmup=not quick,
            teacher_timed_steps=teacher_steps or (5 if quick else None),
            compile_mode=compile_mode,
            random_weights=random_weights,
            decoder=decoder,
            decoder_dtype=decoder_dtype,
            repeats=repeats,
            overlap_decode=overlap_decode,
            decode_threads=decode_threads,
            fp8=fp8,
        )
    except (ValueError, OSError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from err
    overlap = ", overlapped" if overlap_decode else ""
    rounds = f", median of {repeats} rounds" if repeats > 1 else ""
    precision = ", fp8 blocks" if fp8 else ""
    table = Table(
        title=f"suite {suite} on {report['machine']['device']}, {decoder} decoder{overlap}{rounds}{precision}"
    )
    for col in ("method", "nfe", "frames", "wall_s", "dit_s", "fps", "ttff_s", "peak_mem_mb"):
        table.add_column(col)
    for r in report["results"]:
        table.add_row(
            *(
                str(r[c])
                for c in ("method", "nfe", "frames", "wall_s", "dit_s", "fps", "ttff_s", "peak_mem_mb")
            )
        )
    console.print(table)
    console.print(f"ratios: {report['ratios']}")
    if out:
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"wrote {out}")


@app.command("eval")
def eval_cmd(
    suite: str = typer.Option("toy", "--suite", help="toy (the world whose metrics read videos back)."),
    quick: bool = typer.Option(
        False,
        "--quick",
        help="Smoke run: 8 prompts, 17 and 33 frames, 200 bootstrap draws (not the 81-frame protocol).",
    ),
    methods: str | None = typer.Option(
        None,
        "--methods",
        help="Comma list of real, vae, teacher and the shipped toy students: ode-init, causvid, self-forcing, "
        "diagonal, diagonal-clean, diagonal-noflow, diagonal-nodf, schedule-only; or all. "
        "Default: all, or real beside --teacher/--student.",
    ),
    vae: str = typer.Option(
        "toy/vae", "--vae", help="Codec for the vae method and the teacher (name or folder)."
    ),
    decoder: str = typer.Option(
        "vae",
        "--decoder",
        help="vae | tiny | a tiny decoder folder: what decodes every method's latents (tiny: the bundled one).",
    ),
    decoder_dtype: str | None = typer.Option(None, "--decoder-dtype", help=DECODER_DTYPE_HELP),
    teacher: str | None = typer.Option(
        None,
        "--teacher",
        help=(
            "Teacher DiT (folder or bundled name) for the 50-step CFG method (default: toy/teacher, the "
            "students' teacher; toy/teacher-deep is the better 12-layer one, and toy/teacher-low its low-noise "
            "expert, to pair with --teacher-high toy/teacher-high)."
        ),
    ),
    text: str = typer.Option("toy/text", "--text", help="Text encoder for the teacher (name or folder)."),
    teacher_guidance: float = typer.Option(
        5.0,
        "--teacher-guidance",
        help="The teacher's CFG scale w (v = v_u + w (v_c - v_u)); the toy teacher scores a better FVD-world at 2 than at 5.",
    ),
    teacher_start_sigma: float = typer.Option(
        1.0,
        "--teacher-start-sigma",
        help="A probe: below 1, the teacher starts from each held-out real clip noised to this level (SDEdit) "
        "instead of pure noise, to see what of its layout and motion it keeps.",
    ),
    teacher_high: str | None = typer.Option(
        None,
        "--teacher-high",
        help="A high-noise expert DiT (folder or bundled name, trained with sigma_min): it denoises the "
        "teacher's steps at noise levels >= --teacher-boundary, --teacher (required with it) the rest "
        "(Wan2.2's split); toy/teacher-high is toy/teacher-deep trained at 0.7 and up, so pair it with "
        "toy/teacher-low (the same trained below 0.7, the best pair) or toy/teacher-deep.",
    ),
    teacher_boundary: float | None = typer.Option(
        None,
        "--teacher-boundary",
        help="Noise level in (0, 1) where --teacher-high hands over to the teacher (its sigma_min; default 0.7).",
    ),
    teacher_high_guidance: float | None = typer.Option(
        None,
        "--teacher-high-guidance",
        help="The CFG scale of --teacher-high's steps, as Wan2.2 guides its two experts apart (default: "
        "--teacher-guidance).",
    ),
    teacher_i2v_high: str | None = typer.Option(
        None,
        "--teacher-i2v-high",
        help="An image-to-video high-noise expert (folder or bundled name, trained with clean_first_frame): "
        "after the teacher samples a clip, the frames after its first are sampled again given that frame, "
        "by this expert at the levels >= --teacher-boundary and --teacher below it (twice the forwards). "
        "configs/toy/teacher-i2v-high.toml trains one that reads the sign of the direction words, which the "
        'text-to-video teacher does not (docs/status.md, "Where the sign is learned").',
    ),
    teacher_eta: float = typer.Option(
        0.0,
        "--teacher-eta",
        help="Stochastic teacher steps in [0, 1] (DDIM's eta: 0 is the Euler ODE sampler, 1 DDPM's "
        "ancestral one, fresh noise in each step).",
    ),
    teacher_motion_guidance: list[float] = typer.Option(
        [],
        "--teacher-motion-guidance",
        metavar="SCALE",
        help="Classifier guidance toward what each prompt asks of the motion classifier, at this scale "
        "(0: off; 100 lifts the toy pair's direction accuracy from 0.31 to 0.53, and to 0.68 with --teacher-eta "
        "1: docs/status.md). Repeat it "
        "once per --motion-classifier, in the same order, to guide by several.",
    ),
    motion_classifier: list[str] = typer.Option(
        [],
        "--motion-classifier",
        metavar="NAME",
        help="A motion classifier for --teacher-motion-guidance (repeatable): a bundled name (toy/motion: "
        "the direction, from the first frames; toy/motion-axes: axes and speed, over the whole clip; "
        "toy/realness: a discriminator, toward the world's clips; toy/realness-direction: one per captioned "
        "direction, toward the world's clips that move the asked way) or a folder (diagvid train motion "
        "--export DIR); default toy/motion.",
    ),
    teacher_motion_sigma: float = typer.Option(
        0.5,
        "--teacher-motion-sigma",
        help="Motion guidance acts at the teacher's steps at this noise level and above.",
    ),
    teacher_motion_candidates: int = typer.Option(
        1,
        "--teacher-motion-candidates",
        help="Best of N starts: N noises per prompt run together down to --teacher-motion-sigma, where the "
        "motion classifier keeps the one most likely to move the asked way (N times the high-noise steps); "
        "with --teacher-verifier, run to the end and judged finished.",
    ),
    teacher_verifier: str | None = typer.Option(
        None,
        "--teacher-verifier",
        help="With --teacher-motion-candidates N: sample all N starts of each prompt that asks for a "
        "direction to the end (N times the steps) and keep the one this image-to-video expert (folder or "
        "bundled name, trained with clean_first_frame: toy/teacher-i2v-high), given the sample's first "
        "frame, finds the prompt explains better than the prompt with its direction reversed "
        '(docs/status.md, "An image-to-video expert as the judge").',
    ),
    teacher_motion_choose_by: list[str] = typer.Option(
        [],
        "--teacher-motion-choose-by",
        metavar="NAME",
        help="With --teacher-motion-candidates: only this --motion-classifier (repeatable, named as given "
        "there) picks the start; default every one. E.g. toy/motion picks while toy/realness-direction "
        "guides too.",
    ),
    fp8: bool = typer.Option(
        False,
        "--fp8",
        help="Every generator's transformer blocks in float8 e4m3 with row-wise scales: fp8's quality cost.",
    ),
    students: list[str] = typer.Option(
        [],
        "--student",
        help="NAME=PIPELINE_FOLDER[:SCHEDULE[:CONTEXT]] (repeatable), e.g. dd=runs/dd:diagonal.",
    ),
    lengths: str | None = typer.Option(
        None,
        "--lengths",
        help="Comma list of multiples of the clip length, 81 frames (17 with --quick): 1,4,10.",
    ),
    prompts: str | None = typer.Option(
        None, "--prompts", help="Held-out prompt set: heldout-48 (default) or heldout-8 (--quick's)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the first prompt (prompt i uses seed + i)."),
    features: str = typer.Option(
        "toy/features", "--features", help="FVD-world network (name or folder); 'none' skips fvd_world."
    ),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda ... (default: cuda if present)."),
    out: str | None = typer.Option(None, "--json", help="Write the report to this JSON file."),
) -> None:
    """Score every method with the world's metrics on held-out prompts, with bootstrap confidence intervals,
    and its fvd_world against real clips of the same prompts."""
    from dataclasses import replace
    from pathlib import Path

    from rich.table import Table

    from diagvid import evaluate as ev

    try:
        if suite != "toy":
            raise ValueError(f"unknown eval suite {suite!r}; allowed: 'toy'")
        cfg = ev.QUICK if quick else ev.EvalConfig()
        if lengths:
            cfg = replace(cfg, lengths=tuple(_parse_int(x, "--lengths") for x in lengths.split(",")))
        if prompts:
            cfg = replace(cfg, prompts=prompts)
        cfg = replace(cfg, seed=seed, features="" if features == "none" else features)
        if cfg.features:
            from diagvid.pretrained import load_features

            load_features(cfg.features)  # a missing or broken network fails here, before any method runs
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
        runs = _eval_methods(
            methods,
            vae,
            teacher,
            text,
            students,
            device,
            decoder,
            teacher_guidance,
            teacher_start_sigma,
            decoder_dtype,
            teacher_high=teacher_high,
            teacher_boundary=teacher_boundary,
            teacher_high_guidance=teacher_high_guidance,
            teacher_eta=teacher_eta,
            teacher_i2v_high=teacher_i2v_high,
            teacher_verifier=teacher_verifier,
            motion=MotionOptions(
                tuple(motion_classifier),
                tuple(teacher_motion_guidance),
                teacher_motion_sigma,
                teacher_motion_candidates,
                tuple(teacher_motion_choose_by),
            ),
            fp8=fp8,
        )
    except (ValueError, FileNotFoundError, OSError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from err
    try:  # a method can only check some settings against the clip length when it runs
        report = ev.run_eval(
            runs,
            cfg,
            fixed_length=("teacher",),
            reconstructions=("vae",),
            progress=lambda msg: console.print(f"[dim]{msg}[/dim]"),
        )
    except ValueError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from err
    report["vae"] = vae  # the codec of the vae method and the teacher (students decode with their own)
    report["decoder"] = decoder
    report["decoder_dtype"] = decoder_dtype or "fp32"
    report["fp8"] = fp8  # the generators' transformer blocks in float8 (the teacher's and every student's)
    if "teacher" in runs:
        report["teacher"] = teacher or "toy/teacher"
        report["teacher_guidance"] = teacher_guidance
        report["teacher_start_sigma"] = teacher_start_sigma
        report["teacher_eta"] = teacher_eta
        if any(teacher_motion_guidance) or (teacher_motion_candidates > 1 and not teacher_verifier):
            from diagvid.pretrained import DEFAULT_MOTION_CLASSIFIER

            names = motion_classifier or [DEFAULT_MOTION_CLASSIFIER]
            scales = teacher_motion_guidance or [0.0]
            report["teacher_motion_guidance"] = {  # one classifier: its name and scale; several: lists
                "classifier": names[0] if len(names) == 1 else names,
                "scale": scales[0] if len(scales) == 1 else scales,
                "sigma_min": teacher_motion_sigma,
                "candidates": teacher_motion_candidates,
            }
            if teacher_motion_choose_by:
                report["teacher_motion_guidance"]["choose_by"] = teacher_motion_choose_by
        if teacher_high:
            from diagvid.model.experts import TOY_BOUNDARY

            boundary = TOY_BOUNDARY if teacher_boundary is None else teacher_boundary
            high_guidance = teacher_guidance if teacher_high_guidance is None else teacher_high_guidance
            report["teacher_high"] = {"model": teacher_high, "boundary": boundary, "guidance": high_guidance}
        if teacher_i2v_high:
            report["teacher_i2v_high"] = teacher_i2v_high
        if teacher_verifier:
            report["teacher_verifier"] = {"model": teacher_verifier, "candidates": teacher_motion_candidates}
    table = Table(title=f"{cfg.prompts}: means [95% CI]")
    keys = ("colour_accuracy", "shape_accuracy", "direction_accuracy", "speed_accuracy", "saturation_slope")
    for col in ("method", "length", *keys, "fvd_world"):
        table.add_column(col)
    for name, by_length in report["results"].items():
        for length, scores in by_length.items():
            cells = []
            for k in keys:
                m = scores["summary"].get(k, {})
                cells.append(
                    "-" if m.get("mean") is None else f"{m['mean']:.3g} [{m['low']:.3g}, {m['high']:.3g}]"
                )
            fvd = scores.get("fvd_world")
            table.add_row(name, length, *cells, "-" if fvd is None else f"{fvd:.3g}")
    console.print(table)
    if report.get("fvd_world"):
        floor = ", ".join(f"{k} {v:.3g}" for k, v in report["fvd_world"]["floor"].items())
        console.print(f"fvd_world floor (what real clips score against the reference draw): {floor}")
    if out:
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"wrote {out}")


class MotionOptions(NamedTuple):
    """`diagvid eval`'s motion-classifier options for the teacher (see `evaluate.teacher_method`)."""

    classifiers: tuple[str, ...] = ()
    """folders or bundled names; none: DEFAULT_MOTION_CLASSIFIER when used"""
    scales: tuple[float, ...] = ()
    """one guidance scale per classifier; none: 0 (no guidance)"""
    sigma_min: float = 0.5
    candidates: int = 1
    choose_by: tuple[str, ...] = ()
    """the classifiers (named as in `classifiers`) whose log-probabilities pick the start; none: all"""


def _parse_int(text: str, option: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{option}: {text!r} is not an integer") from None


def _eval_methods(
    methods: str | None,
    vae: str,
    teacher: str | None,
    text: str,
    students: list[str],
    device,
    decoder: str = "vae",
    teacher_guidance: float = 5.0,
    teacher_start_sigma: float = 1.0,
    decoder_dtype: str | None = None,
    *,
    teacher_high: str | None = None,
    teacher_boundary: float | None = None,
    teacher_high_guidance: float | None = None,
    teacher_eta: float = 0.0,
    teacher_i2v_high: str | None = None,
    teacher_verifier: str | None = None,
    motion: MotionOptions = MotionOptions(),
    fp8: bool = False,
):
    """Build the evaluation methods the options ask for (errors name the bad option)."""
    from diagvid import evaluate as ev
    from diagvid.model.experts import NoiseExperts
    from diagvid.pretrained import (
        DEFAULT_MOTION_CLASSIFIER,
        TOY_STUDENT_METHODS,
        load_dit_model,
        load_motion_classifier,
        load_pipeline,
        load_teacher,
        load_text_encoder,
        load_toy_student,
        load_vae,
        with_decoder,
        with_high_expert,
    )

    allowed = ("real", "vae", "teacher", *TOY_STUDENT_METHODS)
    if not (math.isfinite(teacher_guidance) and teacher_guidance >= 0):
        raise ValueError(f"--teacher-guidance {teacher_guidance}: the CFG scale must be a finite number >= 0")
    if not 0 < teacher_start_sigma <= 1:
        raise ValueError(f"--teacher-start-sigma {teacher_start_sigma}: must be in (0, 1]")
    if not 0 <= teacher_eta <= 1:
        raise ValueError(f"--teacher-eta {teacher_eta}: must be in [0, 1] (0: Euler, 1: DDPM ancestral)")
    motion_folders, motion_scales, motion_sigma, motion_candidates, choose_by = motion
    motion_names = motion_folders or (DEFAULT_MOTION_CLASSIFIER,)  # the classifiers, when motion is used
    for scale in motion_scales:
        if not (math.isfinite(scale) and scale >= 0):
            raise ValueError(f"--teacher-motion-guidance {scale}: the scale must be a finite number >= 0")
    if len(motion_scales) > 1 and len(motion_folders) != len(motion_scales):
        raise ValueError(
            f"--teacher-motion-guidance given {len(motion_scales)} times: name one --motion-classifier for "
            f"each, in the same order (got {len(motion_folders)})"
        )
    if len(motion_folders) > 1 and len(motion_scales) not in (0, len(motion_folders)):
        raise ValueError(
            f"--motion-classifier given {len(motion_folders)} times: give one --teacher-motion-guidance "
            f"scale for each, in the same order (got {len(motion_scales)})"
        )
    if not 0 <= motion_sigma <= 1:
        raise ValueError(f"--teacher-motion-sigma {motion_sigma}: must be a noise level in [0, 1]")
    if motion_candidates < 1:
        raise ValueError(f"--teacher-motion-candidates {motion_candidates}: must be >= 1")
    if motion_candidates > 1 and teacher_start_sigma < 1:
        raise ValueError(
            f"--teacher-motion-candidates {motion_candidates}: the starts are noise; no --teacher-start-sigma"
        )
    if teacher_verifier and motion_candidates < 2:
        raise ValueError(
            f"--teacher-verifier {teacher_verifier}: picks among finished samples; give "
            "--teacher-motion-candidates N >= 2"
        )
    if teacher_verifier and choose_by:
        raise ValueError(
            f"--teacher-motion-choose-by {', '.join(choose_by)}: --teacher-verifier {teacher_verifier} makes "
            "the choice; give one of them"
        )
    motion_used = any(motion_scales) or (motion_candidates > 1 and not teacher_verifier)
    motion_choose = None
    if choose_by:
        if motion_candidates < 2:
            raise ValueError(
                f"--teacher-motion-choose-by {', '.join(choose_by)}: picks among starts; only means something "
                "with --teacher-motion-candidates N >= 2"
            )
        unknown = [n for n in choose_by if n not in motion_names]
        if unknown or len(set(choose_by)) != len(choose_by):
            raise ValueError(
                f"--teacher-motion-choose-by {', '.join(unknown or choose_by)}: name each chooser once, as "
                f"given to --motion-classifier ({', '.join(motion_names)})"
            )
        motion_choose = [motion_names.index(n) for n in choose_by]
    if motion_folders and not motion_used:
        raise ValueError(
            f"--motion-classifier {', '.join(motion_folders)}: only means something with "
            "--teacher-motion-guidance SCALE or --teacher-motion-candidates N"
        )
    if teacher_high and not teacher:
        raise ValueError(
            f"--teacher-high {teacher_high}: name the teacher below the boundary with --teacher "
            "(toy/teacher-high pairs with --teacher toy/teacher-low, trained below its boundary)"
        )
    if teacher_i2v_high and not teacher:
        raise ValueError(
            f"--teacher-i2v-high {teacher_i2v_high}: name the teacher below the boundary with --teacher "
            "(toy/teacher-low)"
        )
    if teacher_i2v_high and teacher_start_sigma < 1:
        raise ValueError(
            f"--teacher-i2v-high {teacher_i2v_high}: its second pass starts from noise; no --teacher-start-sigma"
        )
    if teacher_boundary is not None and not (teacher_high or teacher_i2v_high):
        raise ValueError(
            f"--teacher-boundary {teacher_boundary}: only means something with --teacher-high or --teacher-i2v-high"
        )
    if teacher_boundary is not None and not 0 < teacher_boundary < 1:
        raise ValueError(f"--teacher-boundary {teacher_boundary}: must be a noise level in (0, 1)")
    if teacher_high_guidance is not None and not teacher_high:
        raise ValueError(
            f"--teacher-high-guidance {teacher_high_guidance}: only means something with --teacher-high"
        )
    if teacher_high_guidance is not None and not (
        math.isfinite(teacher_high_guidance) and teacher_high_guidance >= 0
    ):
        raise ValueError(
            f"--teacher-high-guidance {teacher_high_guidance}: the CFG scale must be a finite number >= 0"
        )
    if methods is None:
        methods = "real" if (teacher or teacher_high or students) else "all"
    builtin = [m.strip() for m in methods.split(",") if m.strip()]
    if builtin == ["all"]:
        builtin = list(allowed)
    for m in builtin:
        if m not in allowed:
            raise ValueError(
                f"--methods: unknown method {m!r}; allowed: all, {', '.join(allowed)} "
                "(add your own models with --teacher/--student)"
            )
    if (teacher or teacher_high) and "teacher" not in builtin:
        builtin.append("teacher")
    parsed = []
    for spec in students:  # syntax first, before loading anything
        name, sep, rest = spec.partition("=")
        if not sep or not name or not rest:
            raise ValueError(f"--student {spec!r}: write NAME=PIPELINE_FOLDER[:SCHEDULE[:CONTEXT]]")
        if name in (*builtin, *(p[0] for p in parsed)):
            raise ValueError(f"--student {spec!r}: the name {name!r} is already used")
        folder, _, tail = rest.partition(":")
        schedule, _, context = tail.partition(":")
        parsed.append((name, folder, schedule or None, context or None))
    if not builtin and not parsed:
        raise ValueError("nothing to evaluate: give --methods, --teacher or --student")

    def fp8_if_asked(dit):
        return _fp8(dit) if fp8 else dit

    # "tiny" for the bundled models is the toy pipeline's; a pipeline of --student uses its own
    toy_decoder = "toy/tiny-decoder" if decoder == "tiny" else decoder
    runs: dict = {}
    codec = None
    if "vae" in builtin or "teacher" in builtin:
        codec = with_decoder(load_vae(vae, device=device), toy_decoder, device=device, dtype=decoder_dtype)
    for m in builtin:
        if m == "real":
            runs[m] = ev.real_method()
        elif m == "vae":
            runs[m] = ev.vae_method(codec)
        elif m == "teacher":  # the bundled toy teacher unless --teacher names another
            dit = load_teacher(teacher or "toy/teacher", teacher_high, teacher_boundary, device=codec.device)
            fp8_if_asked(dit)  # both experts' blocks when it is a pair
            guidance_above = None
            if teacher_high_guidance is not None:
                guidance_above = (dit.boundary, teacher_high_guidance)
            second_pass = None
            if teacher_i2v_high:  # the image-to-video expert above the boundary, the teacher's low half below
                low = dit.low if isinstance(dit, NoiseExperts) else dit
                second_pass = with_high_expert(
                    low, teacher, teacher_i2v_high, teacher_boundary, device=codec.device
                )
                fp8_if_asked(second_pass.high)  # the low half is the teacher's own, already done
            verifier = None
            if teacher_verifier:
                from diagvid.verify import DirectionVerifier

                judge = load_dit_model(teacher_verifier, device=codec.device).eval()
                verifier = DirectionVerifier(fp8_if_asked(judge), load_text_encoder(text))
            classifier, scale = None, motion_scales[0] if motion_scales else 0.0
            if motion_used:  # one classifier and scale as they are; several as lists
                loaded = [load_motion_classifier(name, codec.device) for name in motion_names]
                classifier = loaded[0] if len(loaded) == 1 else loaded
                if len(loaded) > 1:
                    scale = list(motion_scales) if motion_scales else [0.0] * len(loaded)
            runs[m] = ev.teacher_method(
                dit,
                codec,
                load_text_encoder(text),
                guidance=teacher_guidance,
                start_sigma=teacher_start_sigma,
                guidance_above=guidance_above,
                eta=teacher_eta,
                motion=classifier,
                motion_scale=scale,
                motion_sigma_min=motion_sigma,
                motion_candidates=motion_candidates,
                motion_choose=motion_choose,
                image_to_video=second_pass,
                verifier=verifier,
            )
        else:
            pipe, schedule, context = load_toy_student(
                m, device=device, decoder=toy_decoder, decoder_dtype=decoder_dtype
            )
            fp8_if_asked(pipe.generator)
            runs[m] = ev.student_method(pipe, schedule, context)
    for name, folder, schedule, context in parsed:
        pipe = load_pipeline(folder, device=device, decoder=decoder, decoder_dtype=decoder_dtype)
        fp8_if_asked(pipe.generator)
        runs[name] = ev.student_method(pipe, schedule, context)
    return runs


@app.command()
def report(
    bench: str | None = typer.Option(None, "--bench", help="JSON written by `diagvid bench --json`."),
    eval_json: str | None = typer.Option(None, "--eval", help="JSON written by `diagvid eval --json`."),
    out: str = typer.Option(".", "--out", "-o", help="Folder for the PNGs (made if missing)."),
    metric: str = typer.Option(
        "all_accuracy", "--metric", help="Eval metric of the quality-vs-NFE plot, e.g. colour_accuracy."
    ),
    length: str = typer.Option("1x", "--length", help="Eval length of the quality-vs-NFE plot: 1x, 4x ..."),
    signal: str = typer.Option(
        "saturation", "--signal", help="Drift signal over time: saturation | brightness | noise."
    ),
) -> None:
    """Plots from bench/eval JSON: speed bars, quality against NFE, drift over time (PNG files)."""
    from diagvid.report import PlotsUnavailable, ReportError, write_report

    try:
        written = write_report(
            bench,
            eval_json,
            out,
            metric=metric,
            length=length,
            signal=signal,
            note=lambda msg: console.print(
                f"[yellow]warning:[/yellow] {msg}", highlight=False, soft_wrap=True
            ),
        )
    except (ReportError, PlotsUnavailable) as err:
        console.print(f"[red]error:[/red] {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from err
    except OSError as err:
        console.print(f"[red]error:[/red] could not write to {out}: {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from err
    for path in written:
        console.print(f"wrote {path}", highlight=False, soft_wrap=True)


@app.command()
def serve(
    model: str = typer.Option("toy", "--model", help="Bundled name or pipeline folder."),
    generator: str | None = typer.Option(None, "--generator", help=GENERATOR_HELP),
    device: str | None = typer.Option(
        None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if present)."
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (loopback by default)."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    max_queue: int = typer.Option(8, "--max-queue", help="Streams that may wait behind the running one."),
    max_seconds: float = typer.Option(
        60.0, "--max-seconds", help="Longest stream per client in seconds (endless ones too)."
    ),
    max_prompt_chars: int = typer.Option(200, "--max-prompt-chars", help="Longest prompt in characters."),
    schedules: str | None = typer.Option(
        None, "--schedules", help="Comma list of schedule presets clients may pick (default: all)."
    ),
    frame_format: str = typer.Option("jpeg", "--frame-format", help="Frames on the wire: jpeg | png."),
    lead_seconds: float = typer.Option(
        2.0, "--lead-seconds", help="Generate at most this far ahead of real time (0: no pacing)."
    ),
    max_connections: int = typer.Option(64, "--max-connections", help="Open websockets at most."),
    allow_origin: list[str] = typer.Option(
        [], "--allow-origin", help="Browser origin allowed besides the page's own (repeatable)."
    ),
    window: int | None = typer.Option(None, "--window", help="KV window in latent frames (long streams)."),
    decoder: str = typer.Option("vae", "--decoder", help=DECODER_HELP),
    decoder_dtype: str | None = typer.Option(None, "--decoder-dtype", help=DECODER_DTYPE_HELP),
    overlap_decode: bool = typer.Option(
        False, "--overlap-decode", help=OVERLAP_HELP + " A prompt switch shows one chunk later."
    ),
    decode_threads: int = typer.Option(1, "--decode-threads", help=DECODE_THREADS_HELP),
    fp8: bool = typer.Option(False, "--fp8", help=FP8_HELP),
) -> None:
    """Serve a live web demo: prompt, watch the stream, switch prompts while it plays."""
    import ipaddress

    from diagvid.pretrained import load_pipeline

    try:
        import uvicorn
        import websockets  # noqa: F401  (uvicorn needs a websocket implementation)

        from diagvid.serve import ServeSettings, create_app
    except ImportError as err:
        console.print(f"[red]error:[/red] {err}; install the server extras: pip install 'diagvid[serve]'")
        raise typer.Exit(2) from err
    try:
        chosen = tuple(s.strip() for s in schedules.split(",")) if schedules else None
        settings = ServeSettings(
            max_queue=max_queue,
            max_seconds=max_seconds,
            max_prompt_chars=max_prompt_chars,
            frame_format=frame_format,
            lead_seconds=lead_seconds or None,
            max_connections=max_connections,
            allowed_origins=tuple(allow_origin),
            **({"schedules": chosen} if chosen else {}),
        )
        pipe = load_pipeline(
            model, generator=generator, device=device, decoder=decoder, decoder_dtype=decoder_dtype
        )
        if window is not None:
            pipe.config.window_frames = window
        if fp8:
            _fp8(pipe.generator)
        if overlap_decode:
            _overlap_decode(pipe, decode_threads)  # the worker starts now, not in the first client's stream
    except (ValueError, FileNotFoundError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from err
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        console.print(
            f"[yellow]warning:[/yellow] listening on {host}: anyone who can reach this machine can use the "
            "model. There is no TLS and no login here; before exposing it, put it behind a reverse proxy that "
            "adds TLS, authentication and per-address rate limits (see docs/serve.md)."
        )
    console.print(f"serving {model} on http://{host}:{port}/ (Ctrl-C stops)")
    # a message a little over the limit still gets the server's error reply; far larger ones are cut off
    ws_max_size = max(65536, 4 * settings.max_message_bytes)
    try:
        uvicorn.run(
            create_app(pipe, settings), host=host, port=port, ws_max_size=ws_max_size, log_level="info"
        )
    finally:
        pipe.close()  # a decode worker must not outlive the server, however it stopped


train_app = typer.Typer(help="Train the toy world models and distilled students.", no_args_is_help=True)
app.add_typer(train_app, name="train")

_CONFIG = typer.Option(None, "--config", "-c", help="Recipe file (TOML) under configs/.")
_SET = typer.Option([], "--set", help="Override a recipe field: --set optim.lr=3e-4 (repeatable).")
_MAX_STEPS = typer.Option(None, "--max-steps", help="Stop at this step (the run can be continued later).")
_FRESH = typer.Option(False, "--fresh", help="Ignore an existing checkpoint in the run folder.")
_EXPORT = typer.Option(None, "--export", help="Write the final weights to this folder.")


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """Within the block, SIGTERM raises KeyboardInterrupt, so cleanup (the writer's abort) runs as for Ctrl-C."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _setup_logging(out_dir: str) -> None:
    import logging
    from pathlib import Path

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(message)s",
        handlers=[logging.FileHandler(Path(out_dir) / "train.log")],
    )


@contextlib.contextmanager
def _training_errors():
    """Bad recipes exit 2 with the message; Ctrl-C / SIGTERM exit 130 after the final checkpoint."""
    from diagvid.train.loop import StopRequested

    try:
        yield
    except (ValueError, TypeError, FileNotFoundError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from err
    except StopRequested as stop:
        console.print(f"[yellow]{stop}[/yellow]")
        raise typer.Exit(130) from None


@train_app.command("text")
def train_text_cmd(
    export: str = typer.Option(..., "--export", help="Folder to write the encoder to."),
    seed: int = typer.Option(0, "--seed", help="Seed of the frozen random weights."),
) -> None:
    """Build the toy text encoder: a word tokenizer over the world's vocabulary + a tiny frozen umT5.

    Nothing is trained: like umT5 for Wan, it is a fixed feature map; the DiT's text projection learns on it.
    """
    from diagvid.model.text import ToyTextConfig, ToyTextEncoder
    from diagvid.world import VOCABULARY

    ToyTextEncoder(VOCABULARY, ToyTextConfig(seed=seed)).save(export)
    console.print(f"wrote {export} ({len(VOCABULARY)} words)")


@train_app.command("vae")
def train_vae_cmd(
    config: str | None = _CONFIG,
    overrides: list[str] = _SET,
    max_steps: int | None = _MAX_STEPS,
    fresh: bool = _FRESH,
    export: str | None = _EXPORT,
) -> None:
    """Train the toy VAE (diffusers AutoencoderKLWan) on world clips; resumes from the run folder."""
    from diagvid.config import load_config
    from diagvid.train.vae import VAETrainConfig, evaluate_vae, heldout_clips, train_vae

    with _training_errors():
        cfg = load_config(VAETrainConfig, config, overrides)
        _setup_logging(cfg.out_dir)
        vae = train_vae(cfg, resume=not fresh, max_steps=max_steps)
    metrics = evaluate_vae(vae, *heldout_clips(cfg.eval_clips, cfg.size))
    console.print(f"held-out PSNR {metrics['psnr']} dB")
    if export:
        vae.save(export)
        console.print(f"wrote {export}")


@train_app.command("tiny-decoder")
def train_tiny_decoder_cmd(
    config: str | None = _CONFIG,
    overrides: list[str] = _SET,
    max_steps: int | None = _MAX_STEPS,
    fresh: bool = _FRESH,
    export: str | None = _EXPORT,
) -> None:
    """Train the tiny streaming decoder behind a frozen VAE encoder (the fast decode); resumes."""
    from diagvid.config import load_config
    from diagvid.pretrained import load_vae
    from diagvid.train.tiny_decoder import TinyDecoderTrainConfig, evaluate_decoder, train_tiny_decoder
    from diagvid.train.vae import evaluate_vae, heldout_clips

    with _training_errors():
        cfg = load_config(TinyDecoderTrainConfig, config, overrides)
        _setup_logging(cfg.out_dir)
        decoder = train_tiny_decoder(cfg, resume=not fresh, max_steps=max_steps)
    vae = load_vae(cfg.vae)
    clips, masks = heldout_clips(16, cfg.size, cfg.eval_frames)
    ours, full = evaluate_decoder(decoder, vae, clips, masks), evaluate_vae(vae, clips, masks)
    console.print(
        f"held-out PSNR {ours['psnr']} dB (objects {ours.get('object_psnr')}); "
        f"the VAE's own decoder {full['psnr']} dB (objects {full.get('object_psnr')})"
    )
    if export:
        decoder.save(export)
        console.print(f"wrote {export}")


@train_app.command("features")
def train_features_cmd(
    config: str | None = _CONFIG,
    overrides: list[str] = _SET,
    max_steps: int | None = _MAX_STEPS,
    fresh: bool = _FRESH,
    export: str | None = _EXPORT,
) -> None:
    """Train the FVD-world feature network on world clips (colour, shape, direction, speed); resumes."""
    from diagvid.config import load_config
    from diagvid.train.features import FeaturesTrainConfig, accuracy, heldout_windows, train_features

    with _training_errors():
        cfg = load_config(FeaturesTrainConfig, config, overrides)
        _setup_logging(cfg.out_dir)
        net = train_features(cfg, resume=not fresh, max_steps=max_steps)
    scores = accuracy(net, *heldout_windows(cfg))
    console.print("held-out accuracy " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    if export:
        net.save(export)
        console.print(f"wrote {export}")


@train_app.command("motion")
def train_motion_cmd(
    config: str | None = _CONFIG,
    overrides: list[str] = _SET,
    max_steps: int | None = _MAX_STEPS,
    fresh: bool = _FRESH,
    export: str | None = _EXPORT,
) -> None:
    """Train a motion classifier (from noisy latents: the direction objects move in, or with the recipe's
    `model.target = "axis-speed"` their axes and speed, or with "realness" a discriminator of the world's clips
    against a sampler's, which it samples first; "realness-direction": the same per captioned direction) for
    classifier guidance (`diagvid eval --teacher-motion-guidance`); resumes."""
    from diagvid.config import load_config
    from diagvid.train.motion import MotionTrainConfig, accuracy, labelled_latents, train_motion

    with _training_errors():
        cfg = load_config(MotionTrainConfig, config, overrides)
        _setup_logging(cfg.out_dir)
        data = labelled_latents(cfg)  # read once: for training, then for the held-out accuracy
        net = train_motion(cfg, resume=not fresh, max_steps=max_steps, data=data)
        scores = accuracy(net, *data[2:])
    console.print("held-out accuracy " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    if export:
        net.save(export)
        console.print(f"wrote {export}")


@train_app.command("teacher")
def train_teacher_cmd(
    config: str | None = _CONFIG,
    overrides: list[str] = _SET,
    max_steps: int | None = _MAX_STEPS,
    fresh: bool = _FRESH,
    export: str | None = _EXPORT,
) -> None:
    """Train the bidirectional teacher by flow matching on world latents; resumes from the run folder."""
    from diagvid.config import load_config
    from diagvid.train.teacher import TeacherConfig, export_teacher, train_teacher

    with _training_errors():
        cfg = load_config(TeacherConfig, config, overrides)
        _setup_logging(cfg.out_dir)
        out = train_teacher(cfg, resume=not fresh, max_steps=max_steps)
    if export:
        export_teacher(out, export)
        console.print(f"wrote {export}")


@train_app.command("ode")
def train_ode_cmd(config: str | None = _CONFIG, overrides: list[str] = _SET) -> None:
    """Write the teacher's ODE pairs (50-step Euler + CFG) in shards; rerun to resume, complete shards are kept."""
    from diagvid.config import load_config
    from diagvid.train.distributed import is_main_process
    from diagvid.train.ode import OdeConfig, write_ode_pairs

    with _training_errors():
        cfg = load_config(OdeConfig, config, overrides)
        if is_main_process():
            _setup_logging(cfg.out_dir)
        out = write_ode_pairs(cfg)
    if is_main_process():
        console.print(f"wrote {cfg.num_samples} ODE pairs to {out}")


@train_app.command("init")
def train_init_cmd(
    config: str | None = _CONFIG,
    overrides: list[str] = _SET,
    max_steps: int | None = _MAX_STEPS,
    fresh: bool = _FRESH,
    export: str | None = _EXPORT,
) -> None:
    """Initialise the causal student from the teacher by ODE regression; resumes; torchrun for several ranks."""
    from diagvid.train.ode_init import InitConfig, train_init

    _run_student_stage(InitConfig, train_init, config, overrides, max_steps, fresh, export, "")


@train_app.command("distill")
def train_distill_cmd(
    config: str | None = _CONFIG,
    overrides: list[str] = _SET,
    max_steps: int | None = _MAX_STEPS,
    fresh: bool = _FRESH,
    export: str | None = _EXPORT,
) -> None:
    """Distill the causal generator with DMD (causvid, self-forcing or diagonal rollouts); resumes; torchrun ok."""
    from diagvid.train.distill import DistillConfig, train_distill

    _run_student_stage(
        DistillConfig, train_distill, config, overrides, max_steps, fresh, export, " (generator EMA)"
    )


def _run_student_stage(config_cls, train, config, overrides, max_steps, fresh, export, what: str) -> None:
    """Load a stage's recipe, train (rank 0 logs and exports), export the result if asked."""
    from diagvid.config import load_config
    from diagvid.train.distributed import is_main_process
    from diagvid.train.loop import export_model

    with _training_errors():
        cfg = load_config(config_cls, config, overrides)
        if is_main_process():
            _setup_logging(cfg.out_dir)
        out = train(cfg, resume=not fresh, max_steps=max_steps, progress=is_main_process())
    if export and is_main_process():
        export_model(out, export)
        console.print(f"wrote {export}{what}")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
