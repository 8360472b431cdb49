"""The one benchmark protocol: every method in one process, on one machine, timed the same way.

Speed does not depend on the weights' values, so `random_weights=True` measures a geometry without any
checkpoint (the GPU suite uses the Wan2.1-1.3B geometry this way). Per method: one warm-up run, then a
timed run; NFE is counted by the model itself; time to first frame is prompt -> first decoded chunk;
DiT-only time excludes decoding; peak memory is the process's peak RSS on CPU (reset per method) or
`torch.cuda.max_memory_allocated` on GPU. Ratios are taken between methods of the same run.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

from diagvid.decode_worker import check_overlap, threads_beside_worker
from diagvid.machine import cpu_info
from diagvid.model.dit import WanDiT, preset
from diagvid.model.fp8 import check_fp8_device, quantize_fp8
from diagvid.model.vae import WanVAE
from diagvid.model.vae import preset as vae_preset
from diagvid.model.weights import STORAGE_DTYPES
from diagvid.sampling import get_schedule, sample_euler
from diagvid.stream import Pipeline, StreamConfig


@dataclass(frozen=True)
class Suite:
    """A geometry to benchmark."""

    dit: str
    vae: str
    latent_hw: tuple[int, int]
    frames_per_chunk: int = 3
    num_chunks: int = 7
    teacher_steps: int = 50
    guidance: float = 5.0


SUITES = {
    "toy": Suite(dit="toy", vae="toy", latent_hw=(8, 8)),
    "wan-1.3b": Suite(dit="wan2.1-t2v-1.3b", vae="wan2.1", latent_hw=(60, 104)),
    "tiny": Suite(
        dit="tiny", vae="tiny", latent_hw=(4, 4), frames_per_chunk=2, num_chunks=4, teacher_steps=4
    ),
}

# what every method generates: a caption of the toy world (random-weight suites ignore the text)
PROMPT = "a red circle moves left"

DECODERS = ("vae", "tiny")
"""what decodes the latents: the Wan VAE's decoder, or the tiny streaming one (or a tiny decoder folder)"""

# torch.compile modes `run_bench(compile_mode=...)` accepts
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# (method, schedule, context override); the teacher is the undistilled 50-step CFG sampler
METHODS = (
    ("teacher", None, None),
    ("causvid", "causvid", None),
    ("self-forcing", "self-forcing", None),
    ("diagonal", "diagonal", None),
    ("diagonal-clean", "diagonal", "clean"),
)


class PrecomputedText:
    """Stands in for the text encoder: benchmarks time generation, not prompt encoding."""

    def __init__(self, text_len: int, dim: int, device, dtype) -> None:
        gen = torch.Generator().manual_seed(0)
        self.emb = torch.randn(1, text_len, dim, generator=gen).to(device, dtype)

    def token_ids(self, prompt: str) -> list[int]:
        return []

    def encode(self, prompts):
        return self.emb.expand(len(prompts), -1, -1), None


class Clock:
    """Wall time that waits for the GPU when there is one."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with contextlib.suppress(OSError):  # Linux: writing 5 resets this process's peak resident set size
            Path("/proc/self/clear_refs").write_text("5")


def _peak_mb(device: torch.device, pid: int | None = None) -> float | None:
    """Peak memory of this process (or, on Linux, of process `pid`: None elsewhere)."""
    if device.type == "cuda" and pid is None:
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path(f"/proc/{pid or 'self'}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    if pid is not None:
        return None
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def trained(
    method: str,
    device: torch.device,
    dtype: torch.dtype,
    decoder: str = "vae",
    decoder_dtype: str | None = None,
) -> Pipeline:
    """The shipped toy models of a method: its distilled student, or the teacher in the bundled pipeline."""
    from diagvid.pretrained import DEFAULT_PIPELINE, load_pipeline, load_toy_student

    if method != "teacher":
        return load_toy_student(
            method, device=device, dtype=dtype, decoder=decoder, decoder_dtype=decoder_dtype
        )[0]
    return load_pipeline(
        DEFAULT_PIPELINE,
        generator="toy/teacher",
        device=device,
        dtype=dtype,
        decoder=decoder,
        decoder_dtype=decoder_dtype,
    )


def _suite(name: str) -> Suite:
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; allowed: {sorted(SUITES)}")
    return SUITES[name]


def _device_and_dtype(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """The run's device (default: cuda if present) and weight precision (default: bf16 on GPU, fp32 on CPU)."""
    if dtype is not None and dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype {dtype!r}; allowed: {', '.join(sorted(STORAGE_DTYPES))}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but this torch sees no CUDA device")
    default = torch.bfloat16 if dev.type == "cuda" else torch.float32
    return dev, STORAGE_DTYPES[dtype] if dtype else default


def build(
    suite: Suite,
    device: torch.device,
    dtype: torch.dtype,
    decoder: str = "vae",
    decoder_dtype: str | None = None,
) -> Pipeline:
    """Random-weight models of the suite's geometry (speed does not depend on weight values); with
    decoder="tiny", the VAE decodes through a random tiny decoder of the suite's preset, with a tiny decoder
    folder through that decoder (its geometry must match the suite's latents). On a GPU
    the codec runs in the transformer's precision (bf16 by default), as the papers' demos run it; on a
    CPU in fp32; `decoder_dtype` ("fp32", "bf16", "fp16") sets a tiny decoder's precision instead."""
    from diagvid.model.tiny_decoder import FastDecodeCodec, TinyDecoder
    from diagvid.model.tiny_decoder import preset as tiny_preset
    from diagvid.pretrained import load_tiny_decoder

    torch.manual_seed(0)
    cfg = preset(suite.dit)
    with torch.device(device):
        dit = WanDiT(cfg).to(dtype).eval()
        codec_dtype = dtype if device.type == "cuda" else torch.float32
        vae = WanVAE(vae_preset(suite.vae)).to(device, codec_dtype).eval()
        tiny_dtype = STORAGE_DTYPES[decoder_dtype] if decoder_dtype else codec_dtype
        if decoder == "tiny":
            vae = FastDecodeCodec(vae, TinyDecoder(tiny_preset(suite.vae)).to(device, tiny_dtype).eval())
        elif decoder != "vae":
            vae = FastDecodeCodec(vae, load_tiny_decoder(decoder, device).to(tiny_dtype))
    text = PrecomputedText(cfg.text_len, cfg.text_dim, device, dtype)
    stream_cfg = StreamConfig(frames_per_chunk=suite.frames_per_chunk, latent_hw=suite.latent_hw)
    return Pipeline(dit, vae, text, stream_cfg)


def _run_student(pipe: Pipeline, suite: Suite, schedule: str, context: str | None, clock: Clock) -> dict:
    sched = get_schedule(schedule, context)
    forwards = pipe.generator.stats.forwards
    t0 = clock.now()
    arrivals, frames, chunk_dit = [], 0, []
    for chunk in pipe.stream(PROMPT, num_chunks=suite.num_chunks, schedule=sched, seed=0):
        arrivals.append(clock.now() - t0)
        frames += len(chunk.frames)
        chunk_dit.append(chunk.dit_seconds)
    total = clock.now() - t0
    return {
        "nfe": pipe.generator.stats.forwards - forwards,
        "frames": frames,
        "wall_s": total,
        "dit_s": sum(chunk_dit),
        "ttff_s": arrivals[0],
        # the gaps between chunks reaching the viewer (the first: the time to first frame), and each chunk's
        # DiT time (overlapped, chunk i >= 1 is handed out after chunk i + 1's denoising: the gap holds that)
        "chunk_s": [b - a for a, b in zip([0.0, *arrivals], arrivals, strict=False)],
        "chunk_dit_s": chunk_dit,
    }


def _run_teacher(pipe: Pipeline, suite: Suite, clock: Clock, timed_steps: int | None = None) -> dict:
    """The undistilled sampler; with `timed_steps`, only that many Euler steps run and the DiT time is scaled
    to the full `teacher_steps` (every step costs the same: one CFG-batched forward at one shape)."""
    dit, vae = pipe.generator, pipe.vae
    f = suite.num_chunks * suite.frames_per_chunk
    noise = torch.randn(1, dit.cfg.in_dim, f, *suite.latent_hw, generator=torch.Generator().manual_seed(0))
    noise = noise.to(pipe.device, pipe.dtype)
    ctx = pipe.text_encoder.encode([PROMPT])[0]
    forwards = dit.stats.forwards
    t0 = clock.now()
    steps = min(timed_steps or suite.teacher_steps, suite.teacher_steps)
    with torch.no_grad():
        latents, _ = sample_euler(
            dit, noise, ctx, torch.zeros_like(ctx), num_steps=steps, guidance=suite.guidance
        )
        dit_s = (clock.now() - t0) * suite.teacher_steps / steps
        t1 = clock.now()
        video = vae.decode(latents.float())
    total = dit_s + clock.now() - t1
    # CFG batches the conditional and unconditional passes: count both, as the papers do
    nfe = 2 * (dit.stats.forwards - forwards) * suite.teacher_steps // steps
    out = {"nfe": nfe, "frames": int(video.shape[2]), "wall_s": total, "dit_s": dit_s, "ttff_s": total}
    if steps < suite.teacher_steps:
        out["extrapolated_from_steps"] = steps
    return out


def run_bench(
    suite_name: str = "toy",
    *,
    device: str | None = None,
    dtype: str | None = None,
    methods: tuple[str, ...] | None = None,
    warmup: bool = True,
    teacher_timed_steps: int | None = None,
    compile_mode: str | None = None,
    random_weights: bool = True,
    decoder: str = "vae",
    decoder_dtype: str | None = None,
    repeats: int = 1,
    overlap_decode: bool = False,
    decode_threads: int = 1,
    fp8: bool = False,
) -> dict:
    """Benchmark every method on one suite in this process; returns the JSON-ready report.

    `teacher_timed_steps`: time only that many teacher steps and scale to the full count (the report says
    so in `extrapolated_from_steps`); the quick mode and the GPU suite use it.
    `fp8`: the transformer blocks' linear layers run in float8 e4m3 with row-wise scales
    (`diagvid.model.fp8`; CUDA of compute capability 8.9 and up, or a CPU, where it is only a numerics check).
    `compile_mode`: `torch.compile` the transformer's forward in that mode (`WanDiT.compile_forward`) and
    run the students against fixed-shape KV buffers (`static_shapes`); the warm-up run pays the compile.
    `random_weights=False` (toy suite only) times each method on its own shipped model: the teacher and the
    distilled students of `diagvid.pretrained.TOY_STUDENT_METHODS`.
    `decoder`: "vae" (the Wan VAE's causal decoder), "tiny" (`diagvid.model.tiny_decoder`: the shipped toy
    one, or a random one of the suite's geometry) or a tiny decoder folder / bundled name, for every
    method's decode. `decoder_dtype`: a tiny decoder's precision ("fp32", "bf16", "fp16"; default: the
    transformer's on a GPU, fp32 on a CPU).
    `repeats`: timed rounds; each round runs every method once, in turn, so that a slow spell of a shared
    machine hits every method alike. Each method reports the median of its rounds (and every round's wall
    time), the ratios are taken between those medians, and `ratios_per_round` gives each round's own.
    `overlap_decode`: the students decode each chunk while the next is denoised (`StreamConfig.overlap_decode`):
    on a CPU in a worker process with `decode_threads` threads, this process keeping the other threads (at
    least one) while the benchmark runs; on CUDA on a second stream. The teacher decodes its whole video at
    the end, in line.
    """
    suite = _suite(suite_name)
    known = [m[0] for m in METHODS]
    chosen = methods or tuple(known)
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; allowed: {known}")
    if decoder not in DECODERS:
        from diagvid.pretrained import _resolve  # the path-or-bundled-name lookup every loader uses

        try:
            _resolve(decoder)
        except FileNotFoundError as err:
            raise ValueError(
                f"decoder {decoder!r}; allowed: {', '.join(DECODERS)} or a tiny decoder folder ({err})"
            ) from err
    from diagvid.pretrained import check_decoder_dtype

    check_decoder_dtype(decoder, decoder_dtype)
    if compile_mode is not None and compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {compile_mode!r}; allowed: {', '.join(COMPILE_MODES)}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats={repeats!r} must be an int >= 1")
    dev, dt = _device_and_dtype(device, dtype)
    if not random_weights and suite_name != "toy":
        raise ValueError(f"suite {suite_name!r} ships no trained weights; time it with random weights")
    if overlap_decode:
        check_overlap(dev, decode_threads)
    if fp8:
        check_fp8_device(dev)

    def ready(pipe: Pipeline) -> Pipeline:
        pipe.config.overlap_decode = overlap_decode
        pipe.config.decode_threads = decode_threads
        if fp8:
            quantize_fp8(pipe.generator)
        if compile_mode is not None:
            pipe.config.static_shapes = True  # one shape per chunk forward: what a compiled graph needs
            pipe.generator.compile_forward(mode=compile_mode)
        return pipe

    threads_before = torch.get_num_threads()
    if overlap_decode and dev.type == "cpu":
        torch.set_num_threads(threads_beside_worker(decode_threads))
    clock = Clock(dev)
    pipes: dict[str, Pipeline] = {}
    runs: dict[str, Callable[[], dict]] = {}
    rounds: dict[str, list[dict]] = {}
    try:
        shared = ready(build(suite, dev, dt, decoder, decoder_dtype)) if random_weights else None
        for name, schedule, context in METHODS:
            if name not in chosen:
                continue
            pipe = pipes[name] = shared or ready(trained(name, dev, dt, decoder, decoder_dtype))
            runs[name] = (
                partial(_run_teacher, pipe, suite, clock, teacher_timed_steps)
                if schedule is None
                else partial(_run_student, pipe, suite, schedule, context, clock)
            )
            if warmup:
                runs[name]()
            rounds[name] = []
        for _ in range(repeats):
            for name, run in runs.items():
                _reset_peak(dev)
                r = run()
                r["peak_mem_mb"] = _peak_mb(dev)
                if pipes[name].decode_worker is not None:  # since it started
                    r["decode_worker_peak_mem_mb"] = _peak_mb(dev, pipes[name].decode_worker.pid)
                rounds[name].append(r)
        main_threads = torch.get_num_threads()
        codec = next(iter(pipes.values())).vae
        decoding_dtype = str(getattr(codec, "decoding_module", codec).dtype).removeprefix("torch.")
    finally:
        for pipe in {id(p): p for p in pipes.values()}.values():
            pipe.close()  # decode workers, if any
        torch.set_num_threads(threads_before)
    results = [_summary(name, rs) for name, rs in rounds.items()]
    by = {r["method"]: r for r in results}
    ratios, per_round = {}, {}
    if "diagonal" in by and "self-forcing" in by:
        ratios["diagonal_vs_self_forcing"] = round(by["self-forcing"]["wall_s"] / by["diagonal"]["wall_s"], 3)
        ratios["diagonal_vs_self_forcing_dit"] = round(
            by["self-forcing"]["dit_s"] / by["diagonal"]["dit_s"], 3
        )
        for key, field_ in (
            ("diagonal_vs_self_forcing", "wall_s"),
            ("diagonal_vs_self_forcing_dit", "dit_s"),
        ):
            pairs = zip(rounds["self-forcing"], rounds["diagonal"], strict=True)
            per_round[key] = [round(a[field_] / b[field_], 3) for a, b in pairs]
    if "diagonal" in by and "teacher" in by:
        ratios["diagonal_vs_teacher"] = round(by["teacher"]["wall_s"] / by["diagonal"]["wall_s"], 3)
    return {
        "suite": suite_name,
        "geometry": {**asdict(suite), "latent_hw": list(suite.latent_hw)},
        "machine": {
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            **cpu_info(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the widest vector code torch runs
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "cpu_threads": main_threads,
            "torch": torch.__version__,
            "dtype": str(dt).removeprefix("torch."),
        },
        "weights": "random (speed does not depend on values)" if random_weights else "shipped toy models",
        "compile": compile_mode,
        "fp8": "e4m3, row-wise scales, transformer blocks' linear layers" if fp8 else None,
        "decoder": decoder,
        "decoder_dtype": decoding_dtype,
        "overlap_decode": {"decode_threads": decode_threads} if overlap_decode else None,
        "repeats": repeats,
        "results": results,
        "ratios": ratios,
        "ratios_per_round": per_round,
    }


def _summary(method: str, rounds: list[dict]) -> dict:
    """One method's report: the median of each timed figure over its rounds, the largest peak memory, and
    every round's wall time."""
    r = {"method": method, **rounds[0]}
    for key in ("wall_s", "dit_s", "ttff_s"):
        r[key] = statistics.median(x[key] for x in rounds)
    for key in ("chunk_s", "chunk_dit_s"):  # per chunk, the median over rounds
        if key in r:
            r[key] = [statistics.median(chunk) for chunk in zip(*(x[key] for x in rounds), strict=True)]
    for key in ("peak_mem_mb", "decode_worker_peak_mem_mb"):
        values = [x[key] for x in rounds if x.get(key) is not None]
        if key in r:
            r[key] = max(values) if values else None
    r.update(
        fps=r["frames"] / r["wall_s"],
        dit_fps=r["frames"] / r["dit_s"] if r["dit_s"] > 0 else None,
    )
    if len(rounds) > 1:
        r["wall_s_rounds"] = [x["wall_s"] for x in rounds]
    return _rounded(r)


def _rounded(value):
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value if not isinstance(value, dict) else {k: _rounded(v) for k, v in value.items()}


def _live_tensors() -> tuple[int, float]:
    """Number and total storage (MB) of the tensors Python can reach: a leak in the chunk loop grows these."""
    import gc
    import warnings

    gc.collect()
    count, nbytes = 0, 0
    with warnings.catch_warnings():  # isinstance() on torch's deprecated module aliases warns
        warnings.simplefilter("ignore", FutureWarning)
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor):
                count += 1
                nbytes += obj.untyped_storage().nbytes()
    return count, nbytes / 2**20


def _retained_rss_mb() -> float | None:
    """Resident memory after glibc hands its free pages back (`malloc_trim`): what the process really holds,
    without the allocator's cached slack that peak RSS also counts. None where glibc or /proc is missing."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, AttributeError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _allocated_mb(device: torch.device) -> float | None:
    """Memory the CUDA caching allocator has handed out to live tensors now (None on a CPU)."""
    return torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else None


def stream_memory(
    suite_name: str,
    seconds: float,
    window_frames: int,
    sink_frames: int = 3,
    device: str | None = "cpu",
    dtype: str | None = None,
) -> dict:
    """Memory of one endless-style stream with a rolling window (run once per process to compare lengths).

    Peak RSS includes whatever the allocator keeps cached, so it rises a little with the number of chunks
    even when nothing leaks; the live tensors and the trimmed RSS after the first and the last chunk tell a
    leak (they grow) from allocator slack (they do not). On CUDA the peak is the GPU's
    (`max_memory_allocated`) and every probe also records the GPU memory held by live tensors, which a
    flat stream keeps constant once its window has filled. `device=None` takes CUDA if present.
    """
    suite = _suite(suite_name)
    if not seconds > 0:
        raise ValueError(f"seconds={seconds} must be > 0")
    if window_frames < 1 or not 0 <= sink_frames < window_frames:
        raise ValueError(
            f"window_frames={window_frames}, sink_frames={sink_frames}: need window_frames >= 1 and "
            "0 <= sink_frames < window_frames"
        )
    dev, dt = _device_and_dtype(device, dtype)
    pipe = build(suite, dev, dt)
    pipe.config.window_frames, pipe.config.sink_frames, pipe.config.rope = window_frames, sink_frames, "cache"
    _reset_peak(dev)
    frames = chunks = 0
    probes: list[dict] = []  # measured inside the stream (after chunk 1, then every 10th): caches are live
    measuring = 0.0
    t0 = time.perf_counter()
    for chunk in pipe.stream(PROMPT, seconds=seconds, schedule="diagonal", seed=0):
        frames += len(chunk.frames)  # frames are dropped as they come, as a live stream would
        chunks += 1
        if chunks == 1 or chunks % 10 == 0:
            t = time.perf_counter()
            probes.append(
                {
                    "chunk": chunks,
                    "tensors": _live_tensors(),
                    "rss": _retained_rss_mb(),
                    "gpu": _allocated_mb(dev),
                }
            )
            measuring += time.perf_counter() - t
    wall = time.perf_counter() - t0 - measuring
    peak = _peak_mb(dev)
    first, last = probes[0], probes[-1]
    report = {
        "suite": suite_name,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "dtype": str(dt).removeprefix("torch."),
        "torch": torch.__version__,
        "seconds": seconds,
        "frames": frames,
        "chunks": chunks,
        "window_frames": window_frames,
        "sink_frames": sink_frames,
        "wall_s": round(wall, 2),
        "fps": round(frames / wall, 2) if wall > 0 else None,
        "peak_mem_mb" if dev.type == "cuda" else "peak_rss_mb": round(peak, 1) if peak is not None else None,
        "probed_chunks_first_last": [first["chunk"], last["chunk"]],
        "live_tensors_first_last": [first["tensors"][0], last["tensors"][0]],
        "live_tensor_mb_first_last": [round(first["tensors"][1], 2), round(last["tensors"][1], 2)],
        "trimmed_rss_mb_first_last": [
            None if v is None else round(v, 1) for v in (first["rss"], last["rss"])
        ],
    }
    if dev.type == "cuda":
        report["gpu_allocated_mb_per_probe"] = {p["chunk"]: round(p["gpu"], 1) for p in probes}
    return report
