"""The streaming engine: chunk loop, KV-cache policy, prompt switching, image/video conditioning, decode.

One engine serves every method: the schedule (`diagvid.sampling.Schedule`) decides how many steps each
chunk takes and whether a clean context pass follows it. Frames are decoded chunk by chunk with the Wan
VAE's causal feature cache, so the first frames exist after one chunk.

Shape letters: B batch (always 1 here), C latent channels, F latent frames, K latent frames per chunk,
h/w latent size, T pixel frames, H/W pixel size.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from diagvid.decode_worker import (
    CudaStreamDecode,
    DecodeWorker,
    DecodeWorkerError,
    InlineDecode,
    WorkerStage,
    check_overlap,
)
from diagvid.model.cache import KVCache
from diagvid.model.dit import WanDiT
from diagvid.model.vae import TEMPORAL_STRIDE, frames_to_tensor, pixel_frames
from diagvid.sampling import NUM_TRAIN_TIMESTEPS, FlowMatch, Schedule, get_schedule

MAX_PROMPT_CHARS = 2000
"""longer prompts are refused (umT5 reads 512 tokens; the toy encoder far fewer)"""


@dataclass(frozen=True)
class PromptEvent:
    """From `at_seconds` on, the stream follows `prompt`."""

    at_seconds: float
    prompt: str


def parse_timeline(prompts: str | Sequence[str | PromptEvent | tuple[float, str]]) -> list[PromptEvent]:
    """Prompts -> a time-ordered timeline. Strings may start with "@4s " to set their start time.

    The first prompt starts at 0 s; later ones without a time are an error (ambiguous).
    """
    items = [prompts] if isinstance(prompts, str) else list(prompts)
    if not items:
        raise ValueError("no prompt given; pass at least one prompt")
    events: list[PromptEvent] = []
    for i, item in enumerate(items):
        if isinstance(item, PromptEvent):
            event = item
        elif isinstance(item, tuple):
            event = PromptEvent(float(item[0]), str(item[1]))
        else:
            text = str(item).strip()
            at = 0.0
            if text.startswith("@"):
                head, _, rest = text.partition(" ")
                number = head[1:].removesuffix("s")
                try:
                    at = float(number)
                except ValueError as err:
                    raise ValueError(
                        f"prompt {i} {item!r}: bad time {head!r}; write it like '@4s a blue square moves up'"
                    ) from err
                text = rest.strip()
            elif i > 0:
                raise ValueError(f"prompt {i} {item!r} has no start time; write it like '@4s {text}'")
            event = PromptEvent(at, text)
        if not event.prompt.strip():
            raise ValueError(f"prompt {i} is empty; describe the video, e.g. 'a red circle moves left'")
        if len(event.prompt) > MAX_PROMPT_CHARS:
            raise ValueError(
                f"prompt {i} has {len(event.prompt)} characters ({event.prompt[:40]!r}...); "
                f"the limit is {MAX_PROMPT_CHARS}"
            )
        bad = [c for c in event.prompt if not c.isprintable()]
        if bad:
            raise ValueError(f"prompt {i} {event.prompt[:80]!r} contains the control character {bad[0]!r}")
        if not math.isfinite(event.at_seconds) or event.at_seconds < 0:
            raise ValueError(f"prompt {i} starts at {event.at_seconds} s; times must be >= 0")
        events.append(event)
    if events[0].at_seconds != 0:
        raise ValueError(f"the first prompt must start at 0 s, not {events[0].at_seconds} s")
    times = [e.at_seconds for e in events]
    if any(b <= a for a, b in itertools.pairwise(times)):
        raise ValueError(f"prompt times {times} must be strictly increasing")
    return events


def read_timeline(path: str | Path) -> list[PromptEvent]:
    """A prompt timeline from a JSON-lines file: one {"at": seconds, "prompt": "..."} object a line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no timeline file at {path}")
    try:
        text = path.read_text(encoding="utf-8", errors="strict")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text: byte {err.start} ({err.reason})") from None
    events = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            events.append(PromptEvent(float(item.get("at", 0.0)), str(item["prompt"])))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(
                f'{path}:{n}: expected {{"at": seconds, "prompt": "..."}}, got {line[:80]!r} ({err})'
            ) from err
    return parse_timeline(events)


def denoise_chunk(
    generator: WanDiT,
    fm: FlowMatch,
    x: torch.Tensor,
    steps: Sequence[float],
    ctx: torch.Tensor,
    cache: KVCache,
    start_frame: int,
    gen: torch.Generator,
    *,
    context_t: float | None = None,
    exit_step: int | None = None,
    on_context: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Denoise one chunk x [B, C, K, h, w] (noise at steps[0]) against the cache; the engine and the
    training rollouts share this function.

    Each step predicts x0 and re-noises it with fresh noise to the next timestep (the few-step sampler of
    CausVid / Self-Forcing / DD). Every forward overwrites the chunk's cache slots, so with
    `context_t=None` later chunks see the K/V of the last denoising forward (DD's noisy context). With
    `context_t`, one more forward, without gradient, on the output re-noised to `context_t` (0: clean)
    writes the chunk's K/V instead. `exit_step` (training): the steps before it run without gradient, the
    forward at `exit_step` keeps its graph (if gradients are enabled) and the chunk stops there.
    `on_context(x, t)`, if given, receives the input [B, C, K, h, w] and timesteps [B, K] of the forward whose
    K/V the chunk leaves in the cache (the engine's prompt re-cache replays it).
    """
    last = len(steps) - 1 if exit_step is None else exit_step
    if not 0 <= last < len(steps):
        raise ValueError(f"exit_step={exit_step} outside the {len(steps)} steps {list(steps)}")
    want_grad = torch.is_grad_enabled()
    x0 = x
    for i in range(last + 1):
        tt = torch.full((x.shape[0], x.shape[2]), float(steps[i]), device=x.device)
        with torch.set_grad_enabled(want_grad and i == last):
            x0 = fm.x0_from_v(x, generator(x, tt, ctx, cache=cache, start_frame=start_frame), tt)
        if i < last:
            fresh = torch.randn(x.shape, generator=gen).to(x.device, x.dtype)
            x = fm.add_noise(x0, fresh, float(steps[i + 1]))
    if context_t is None and on_context is not None:
        on_context(x.detach(), tt)
    if context_t is not None:
        with torch.no_grad():
            tc = torch.full((x0.shape[0], x0.shape[2]), float(context_t), device=x0.device)
            x_ctx = x0.detach()
            if context_t > 0:
                fresh = torch.randn(x0.shape, generator=gen).to(x0.device, x0.dtype)
                x_ctx = fm.add_noise(x_ctx, fresh, tc)
            generator(x_ctx, tc, ctx, cache=cache, start_frame=start_frame)
            if on_context is not None:
                on_context(x_ctx, tc)
    return x0


@dataclass
class ChunkResult:
    """One generated chunk: its decoded frames and the figures of its generation."""

    index: int
    frames: np.ndarray  # uint8 [T, H, W, 3], possibly empty
    latents: torch.Tensor  # [1, C, K, h, w]
    timesteps: tuple[float, ...]
    nfe: int  # transformer forwards spent on this chunk (context pass included)
    seconds: float  # wall time on this chunk: denoise + decode (overlapped: + the wait for its frames)
    dit_seconds: float  # wall time of the transformer part
    prompt: str
    first_frame: int  # index of frames[0] in the whole video
    recache_nfe: int = 0  # forwards of a prompt re-cache before this chunk (included in nfe)


def _hand_out(result: ChunkResult, decode: InlineDecode | WorkerStage | CudaStreamDecode) -> ChunkResult:
    """`result` with its frames, once they are decoded; the wait counts in its `seconds`."""
    start = time.perf_counter()
    result.frames = decode.take()
    result.seconds += time.perf_counter() - start
    return result


@dataclass
class StreamConfig:
    """How a pipeline generates: geometry, sampler and cache policy."""

    frames_per_chunk: int = 3
    """latent frames per chunk K"""
    latent_hw: tuple[int, int] = (8, 8)
    """latent height and width"""
    fps: int = 16
    """pixel frames per second"""
    shift: float = 5.0
    """flow shift of the student's sampler"""
    sigma_mode: str = "exact"
    """"exact" or "nearest" (reference parity)"""
    schedule: str = "diagonal"
    """default schedule"""
    window_frames: int | None = None
    """KV-cache capacity in latent frames; None = the whole video (no eviction)"""
    sink_frames: int = 0
    """frames at the start kept forever once the window rolls"""
    rope: str = "absolute"
    """"absolute" (reference) or "cache" (positions inside the window: unbounded length)"""
    static_shapes: bool = False
    """attend over the whole cache buffer with a mask: same shapes every forward (for CUDA graphs)"""
    recache: bool = False
    """on a prompt switch, recompute the self-attention K/V of every cached frame under the new prompt
    (LongLive's KV re-cache); False keeps them and only resets the cross-attention cache"""
    overlap_decode: bool = False
    """decode chunk i while chunk i + 1 is denoised, and yield each chunk after the first one chunk later:
    on a CPU the codec runs in a worker process, on CUDA on a second stream (`diagvid.decode_worker`)"""
    decode_threads: int = 1
    """intra-op threads of the CPU worker (give the main process the other cores)"""
    extra: dict = field(default_factory=dict)


class Pipeline:
    """A causal generator, its VAE and text encoder, and the chunk loop that streams video from them."""

    def __init__(self, generator: WanDiT, vae, text_encoder, config: StreamConfig | None = None) -> None:
        self.generator = generator.eval()
        self.vae = vae
        self.text_encoder = text_encoder
        self.config = config or StreamConfig()
        self.fm = FlowMatch(self.config.shift, self.config.sigma_mode)
        self._worker: DecodeWorker | None = None

    @property
    def decode_worker(self) -> DecodeWorker | None:
        """The worker process of `overlap_decode`, once a stream has started it."""
        return self._worker

    def close(self) -> None:
        """Stop the decode worker, if `overlap_decode` started one (a later stream starts a new one)."""
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def device(self) -> torch.device:
        return next(self.generator.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.generator.parameters()).dtype

    # ----- sizes -------------------------------------------------------------------------------------------

    def num_chunks(self, seconds: float) -> int:
        """Chunks needed for at least `seconds` of video."""
        if not (isinstance(seconds, int | float) and math.isfinite(seconds) and seconds > 0):
            raise ValueError(f"seconds={seconds!r} must be a finite number > 0")
        frames = max(1, round(seconds * self.config.fps))
        latents = 1 + math.ceil((frames - 1) / TEMPORAL_STRIDE)  # round up to a whole latent frame
        return math.ceil(latents / self.config.frames_per_chunk)

    def chunks_of_video(self, frames: int) -> int:
        """Whole chunks in a video of `frames` pixel frames (what video-to-video generates)."""
        return (1 + (frames - 1) // TEMPORAL_STRIDE) // self.config.frames_per_chunk

    # ----- the stream --------------------------------------------------------------------------------------

    @torch.no_grad()
    def stream(
        self,
        prompt: str | Sequence[str | PromptEvent | tuple[float, str]],
        *,
        seconds: float | None = None,
        num_chunks: int | None = None,
        schedule: str | Schedule | None = None,
        context: str | None = None,
        seed: int = 0,
        image: np.ndarray | None = None,
        continue_from: np.ndarray | None = None,
        video: np.ndarray | None = None,
        strength: float = 0.6,
        prompt_source: Callable[[int], str | None] | None = None,
        recache: bool | None = None,
    ) -> Iterator[ChunkResult]:
        """Yield decoded chunks as soon as each is ready.

        Args:
            prompt: a prompt, or a timeline of prompts ("@4s a blue square moves up" switches at 4 s).
            seconds / num_chunks: length (one of them; default 5 s).
            schedule: preset name, per-chunk step string or a `Schedule`; default from the config.
            context: override the context policy of every chunk ("clean" or "noisy").
            seed: noise seed; the same seed gives the same video on the same device.
            image: uint8 [H, W, 3] first frame (image-to-video): encoded into the cache before chunk 0.
            continue_from: uint8 [T, H, W, 3] frames to continue; the last 1 + 4k of them are encoded into
                the cache (and re-decoded as the start of the output), then new chunks follow.
            video: uint8 [T, H, W, 3] input of streaming video-to-video: each chunk of it is encoded,
                re-noised to t = 1000 * `strength` and denoised with the remaining steps of the schedule.
                The length comes from the video.
            strength: how much of the input video to replace, in (0, 1].
            prompt_source: live prompt switching (the web demo): called with the chunk index before each
                chunk; a new non-empty prompt it returns is followed from that chunk on, switched exactly
                like a timeline event (re-encoded, cross-attention cache reset). None keeps the prompt; a
                timeline event reached later still switches. Its prompts are checked when they arrive, so
                an unknown word raises ValueError at that chunk.
            recache: at a prompt switch, also recompute the self-attention K/V of every frame still in the
                cache (sink + window) under the new prompt, as LongLive does; default from the config
                (off). The engine keeps, for the cached chunks only, the input and timesteps of the forward
                that wrote each one (the clean context pass, or the last denoising forward under the noisy
                policy) and replays those forwards with the new text, chunk by chunk at their own start
                frames, into the emptied cache: it ends with the same frames, slots and positions. Each
                replayed chunk sees the replayed chunks before it; frames a rolling window had evicted are
                not brought back. The replay's forwards count in the next chunk's `nfe` and `recache_nfe`.
        """
        # 1. validate everything before any compute
        cfg = self.config
        timeline = parse_timeline(prompt)
        sched = get_schedule(schedule or cfg.schedule, context)
        k = cfg.frames_per_chunk
        h, w = cfg.latent_hw
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(f"seed={seed!r} must be an int in [0, 2**63)")
        recache = cfg.recache if recache is None else recache
        if not isinstance(recache, bool):
            raise ValueError(f"recache={recache!r} must be True or False")
        if cfg.overlap_decode:
            check_overlap(self.device, cfg.decode_threads)
        if sum(x is not None for x in (image, continue_from, video)) > 1:
            raise ValueError("give at most one of image, continue_from and video")
        if video is not None:
            if seconds is not None or num_chunks is not None:
                raise ValueError("video-to-video takes its length from the video; drop seconds / num_chunks")
            if not (isinstance(strength, int | float) and 0 < strength <= 1):
                raise ValueError(f"strength={strength!r} must be in (0, 1]")
            self._check_frames(video, "video")
            num_chunks = self.chunks_of_video(len(video))
            if num_chunks < 1:
                need = 1 + TEMPORAL_STRIDE * (k - 1)
                raise ValueError(f"video has {len(video)} frames; video-to-video needs at least {need}")
        elif num_chunks is None:
            num_chunks = self.num_chunks(5.0 if seconds is None else seconds)
        elif seconds is not None:
            raise ValueError("give seconds or num_chunks, not both")
        if not isinstance(num_chunks, int) or num_chunks < 1:
            raise ValueError(f"num_chunks={num_chunks!r} must be an int >= 1")
        if cfg.window_frames is None:
            sched.check_fits(num_chunks)
        for event in timeline:
            self.text_encoder.token_ids(event.prompt)  # unknown words or an over-long prompt fail here
        if image is not None:
            self._check_frames(image[None] if isinstance(image, np.ndarray) else image, "image")
            continue_from = image[None]
        prefix = 0  # latent frames pushed into the cache before chunk 0
        if continue_from is not None:
            self._check_frames(continue_from, "continue_from")
            prefix = 1 + (len(continue_from) - 1) // TEMPORAL_STRIDE
            continue_from = continue_from[-(1 + TEMPORAL_STRIDE * (prefix - 1)) :]  # the last 1 + 4k frames
        capacity = cfg.window_frames or (prefix + num_chunks * k)

        # 2. encode the first prompt, prepare cache, noise and decoder
        gen = torch.Generator(device="cpu").manual_seed(seed)
        cache = self.generator.new_cache(
            batch_size=1,
            latent_hw=(h, w),
            capacity_frames=capacity,
            sink_frames=cfg.sink_frames,
            rope=cfg.rope,
            static_shapes=cfg.static_shapes,
        )
        decode = self._decode_stage()
        # for re-cache: (start frame, input, timesteps) of the forward that wrote each chunk still cached
        cached_inputs: list[tuple[int, torch.Tensor, torch.Tensor]] = []

        def remember(start_frame: int, x: torch.Tensor, t: torch.Tensor) -> None:
            if not recache:
                return
            cached_inputs.append((start_frame, x, t))
            # a chunk stays while any of its frames is cached (of a sink's chunk, only the sink may be left)
            held = set(cache.slot_frames)
            cached_inputs[:] = [
                r for r in cached_inputs if held.intersection(range(r[0], r[0] + r[2].shape[1]))
            ]

        ctx = None
        current_prompt = None

        encoder = self.vae.stream_encoder() if video is not None else None
        v2v_start = float(NUM_TRAIN_TIMESTEPS * strength) if video is not None else None

        # 3. image-to-video / continuation: the given frames become clean context, in pieces of at most K
        if continue_from is not None:
            start = time.perf_counter()
            first_latents = self._encode_frames(continue_from)
            current_prompt = timeline[0].prompt
            ctx = self._encode_prompt(current_prompt)
            for a in range(0, prefix, k):
                piece = first_latents[:, :, a : a + k]
                t0 = torch.zeros(1, piece.shape[2], device=self.device)
                self.generator(piece, t0, ctx, cache=cache, start_frame=a)
                remember(a, piece, t0)
            decode.submit(first_latents)
            pixels = decode.take()
            nfe = math.ceil(prefix / k)
            elapsed = time.perf_counter() - start
            yield ChunkResult(-1, pixels, first_latents, (0.0,), nfe, elapsed, elapsed, current_prompt, 0)

        # 4. the chunk loop
        scheduled = current_prompt  # the timeline's prompt at the previous chunk
        pending: deque[ChunkResult] = deque()  # denoised and submitted, frames not yet handed out
        try:
            for index in range(num_chunks):
                start = time.perf_counter()
                frames_out = pixel_frames(prefix + index * k)  # frames of every chunk before this one
                at_seconds = frames_out / cfg.fps
                now_scheduled = [e.prompt for e in timeline if e.at_seconds <= at_seconds + 1e-9][-1]
                # a timeline event switches when it is reached; in between, a live prompt may have replaced it
                wanted = now_scheduled if now_scheduled != scheduled else current_prompt
                scheduled = now_scheduled
                live = prompt_source(index) if prompt_source is not None else None
                if live is not None and live.strip():
                    self.text_encoder.token_ids(live)  # unknown words fail before the cache is touched
                    wanted = live
                forwards_before = self.generator.stats.forwards
                recache_nfe = 0
                if wanted != current_prompt:
                    cache.reset_text()  # the next forward encodes the new prompt's cross-attention K/V
                    ctx = self._encode_prompt(wanted)
                    current_prompt = wanted
                    if recache and cached_inputs:
                        recache_nfe = self._recache(cache, cached_inputs, ctx)
                noise = torch.randn(1, self.generator.cfg.in_dim, k, h, w, generator=gen).to(
                    self.device, self.dtype
                )
                steps = tuple(sched.chunk_steps(index))
                if encoder is not None:
                    # video-to-video: this chunk's input frames, encoded and re-noised to the start timestep
                    lo = 0 if index == 0 else 1 + TEMPORAL_STRIDE * (index * k - 1)
                    hi = 1 + TEMPORAL_STRIDE * ((index + 1) * k - 1)
                    clean = encoder.encode(frames_to_tensor(video[lo:hi])[None]).to(self.device, self.dtype)
                    noise = self.fm.add_noise(clean, noise, v2v_start)
                    steps = (v2v_start, *(t for t in steps if t < v2v_start))
                clean = sched.chunk_context(index) == "clean"
                latents = denoise_chunk(
                    self.generator,
                    self.fm,
                    noise,
                    steps,
                    ctx,
                    cache,
                    prefix + index * k,
                    gen,
                    context_t=sched.context_t if clean else None,
                    on_context=lambda x, t, start=prefix + index * k: remember(start, x, t),
                )
                if not torch.isfinite(latents).all():
                    # never write garbage into a video: stop and say where it happened
                    raise FloatingPointError(
                        f"chunk {index} produced NaN or Inf latents (prompt {current_prompt!r})"
                    )
                dit_seconds = time.perf_counter() - start
                decode.submit(latents)
                pending.append(
                    ChunkResult(
                        index=index,
                        frames=np.empty((0, 0, 0, 3), np.uint8),  # filled in by `_hand_out`
                        latents=latents,
                        timesteps=steps,
                        nfe=self.generator.stats.forwards - forwards_before,
                        seconds=time.perf_counter() - start,
                        dit_seconds=dit_seconds,
                        prompt=current_prompt,
                        first_frame=frames_out,
                        recache_nfe=recache_nfe,
                    )
                )
                # an overlapped decode hands chunk i out once chunk i + 1 is submitted, so that the worker
                # decodes it while the next chunk is denoised; the first goes at once (time to first frame)
                hold = 1 if cfg.overlap_decode and index > 0 else 0
                while len(pending) > hold:
                    yield _hand_out(pending.popleft(), decode)
        except Exception as err:
            # chunks already denoised are handed out before the error, as an in-line decode would have
            # (unless the decode itself failed: then no later chunk follows the missing one)
            while pending and not isinstance(err, DecodeWorkerError):
                yield _hand_out(pending.popleft(), decode)
            raise
        while pending:
            yield _hand_out(pending.popleft(), decode)

    def generate(self, prompt, **kwargs) -> tuple[np.ndarray, list[ChunkResult]]:
        """The whole clip as uint8 [T, H, W, 3] plus the per-chunk results."""
        chunks = list(self.stream(prompt, **kwargs))
        frames = np.concatenate([c.frames for c in chunks], axis=0)
        return frames, chunks

    # ----- helpers -----------------------------------------------------------------------------------------

    def start_decode_worker(self) -> DecodeWorker:
        """Start (or keep) the worker process of `overlap_decode` now rather than at the first stream: it
        takes a few seconds, a fresh interpreter importing torch. Restarts it if `vae` or `decode_threads`
        changed since it started, or if it died. CPU pipelines only (on CUDA the decode overlaps on a
        second stream, with no process)."""
        if self.device.type != "cpu":
            raise ValueError(f"the decode worker is for CPU pipelines; this one is on {self.device}")
        worker = self._worker
        if worker is not None and (
            worker.codec is not self.vae or worker.threads != self.config.decode_threads or not worker.alive
        ):
            self.close()
        if self._worker is None:
            self._worker = DecodeWorker(self.vae, self.config.decode_threads)
        return self._worker

    def _decode_stage(self) -> InlineDecode | WorkerStage | CudaStreamDecode:
        """Where this stream's chunks are decoded: in line, by the pipeline's worker, or on a CUDA stream."""
        if not self.config.overlap_decode:
            return InlineDecode(self.vae)
        if self.device.type == "cuda":
            return CudaStreamDecode(self.vae, self.device)
        return self.start_decode_worker().begin()

    def _recache(self, cache: KVCache, inputs: list[tuple[int, torch.Tensor, torch.Tensor]], ctx) -> int:
        """Recompute every cached frame's K/V under the prompt `ctx` by replaying the forwards that wrote
        them (`inputs`, in order) into the emptied cache; returns the number of forwards."""
        held = list(cache.slot_frames)
        cache.reset()
        for start, x, t in inputs:
            if start > cache.next_frame:
                cache.skip_to(start)  # the window's first chunk after the sink's: the frames between are gone
            self.generator(x, t, ctx, cache=cache, start_frame=start)
        assert cache.slot_frames == held, f"re-cache left frames {cache.slot_frames}; the cache held {held}"
        return len(inputs)

    def _encode_prompt(self, prompt: str) -> torch.Tensor:
        emb, _mask = self.text_encoder.encode([prompt])
        return emb.to(self.device, self.dtype)

    def _check_frames(self, frames: np.ndarray, name: str) -> None:
        """uint8 [T, H, W, 3] at the pipeline's pixel size, or an error naming what is wrong."""
        h, w = self.config.latent_hw
        size = (h * self.vae.spatial_stride, w * self.vae.spatial_stride)
        ok = isinstance(frames, np.ndarray) and frames.dtype == np.uint8 and frames.ndim == 4
        if not ok or frames.shape[1:] != (*size, 3) or len(frames) < 1:
            got = (getattr(frames, "shape", None), getattr(frames, "dtype", type(frames).__name__))
            raise ValueError(
                f"{name} must be uint8 frames of size {size} (H, W) with 3 channels (RGB); got shape/dtype {got}"
            )

    def _encode_frames(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 [T, H, W, 3], T = 1 + 4k -> clean latents [1, C, 1 + k, h, w]."""
        return self.vae.encode(frames_to_tensor(frames)[None].to(self.device)).to(self.dtype)
