"""One model for every client: a bounded queue of stream jobs and one worker thread that runs them in turn.

The worker generates a job chunk by chunk (torch releases the GIL, so the event loop keeps serving) and
hands each chunk to the job's `deliver` callback. Backpressure: a job holds `chunks_ahead` credits; one is
taken before each chunk is generated and given back by the client's sender once that chunk's frames are
sent, so a slow client slows only its own stream and nothing is buffered without bound. A stop or a
disconnect sets the job's cancel flag, which the worker checks between chunks and while it waits.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from diagvid.serve.frames import encode_frame
from diagvid.serve.protocol import StartRequest
from diagvid.serve.settings import ServeSettings
from diagvid.serve.videos import VideoStore
from diagvid.stream import ChunkResult, Pipeline

log = logging.getLogger("diagvid.serve")

_POLL_S = 0.05  # how often a waiting worker looks at the cancel flag


@dataclass
class Outgoing:
    """One message for a client: a JSON object, then its frames as binary messages."""

    message: dict
    frames: list[bytes] = field(default_factory=list)
    sent: Callable[[], None] | None = None
    """called once everything is sent (gives the chunk's credit back)"""
    close: bool = False
    """close the connection after this message"""


@dataclass
class StreamFigures:
    """The running figures of one stream, and the chunk and done messages built from them."""

    t0: float
    """when generation began"""
    frames: int = 0
    nfe: int = 0
    chunks: int = 0
    model_seconds: float = 0.0
    """wall time inside the engine (denoise + decode)"""
    ttff: float | None = None
    t_first: float | None = None
    """when the first frames were ready: a viewer's clock starts there"""

    def add(self, chunk: ChunkResult, now: float) -> dict:
        """Count a chunk ready at `now`; its `chunk` message."""
        if self.ttff is None:
            self.ttff, self.t_first = now - self.t0, now
        self.frames += len(chunk.frames)
        self.nfe += chunk.nfe
        self.chunks += 1
        self.model_seconds += chunk.seconds
        return {
            "type": "chunk",
            "index": chunk.index,
            "frames": len(chunk.frames),
            "first_frame": chunk.first_frame,
            "nfe": chunk.nfe,
            "timesteps": [round(t, 2) for t in chunk.timesteps],
            "chunk_seconds": round(chunk.seconds, 4),
            "prompt": chunk.prompt,
            "fps": round(self.frames / (now - self.t0), 2),
            "model_fps": round(self.frames / self.model_seconds, 2) if self.model_seconds > 0 else None,
            "ttff": round(self.ttff, 4),
        }

    def done_message(self, reason: str, video: str | None) -> dict:
        """The stream's last message: why it ended, its totals and the download path (or None)."""
        return {
            "type": "done",
            "reason": reason,
            "frames": self.frames,
            "chunks": self.chunks,
            "nfe": self.nfe,
            "seconds": round(time.perf_counter() - self.t0, 3),
            "video": video,
        }


def _started_message(job: Job, num_chunks: int, fps: int, frame_format: str) -> dict:
    req = job.request
    return {
        "type": "started",
        "id": job.id,
        "prompt": req.prompt,
        "seed": req.seed,
        "schedule": req.schedule,
        "seconds": req.seconds,
        "endless": req.seconds is None,
        "num_chunks": num_chunks,
        "fps": fps,
        "format": frame_format,
    }


class QueueFull(RuntimeError):
    """No room in the queue; the message says so to the client."""


class Job:
    """One client's stream: its request, its cancel flag, its credits and the live prompt it asked for."""

    def __init__(self, request: StartRequest, deliver: Callable[[Outgoing], None], chunks_ahead: int) -> None:
        self.id = secrets.token_hex(6)
        self.request = request
        self.deliver = deliver
        self.position = 0
        self.cancelled = threading.Event()
        self.ended = threading.Event()
        self.disconnected = False
        self._credits = threading.Semaphore(chunks_ahead)
        self._lock = threading.Lock()
        self._next_prompt: str | None = None

    def switch_prompt(self, prompt: str) -> None:
        """Follow `prompt` from the next chunk on."""
        with self._lock:
            self._next_prompt = prompt

    def take_prompt(self, _index: int) -> str | None:
        """The engine's prompt source: a new prompt once, then None."""
        with self._lock:
            prompt, self._next_prompt = self._next_prompt, None
        return prompt

    def chunk_sent(self) -> None:
        """The client has this chunk's frames: the stream may go on."""
        self._credits.release()

    def wait_credit(self, stall_seconds: float) -> bool:
        """Block until the client took an earlier chunk; False if cancelled or stalled that long."""
        deadline = time.monotonic() + stall_seconds
        while not self._credits.acquire(timeout=_POLL_S):
            if self.cancelled.is_set() or time.monotonic() > deadline:
                return False
        return not self.cancelled.is_set()


class Runner:
    """The queue, the worker thread and the served counts; every method is safe from any thread."""

    def __init__(self, pipeline: Pipeline, settings: ServeSettings, store: VideoStore) -> None:
        self.pipeline = pipeline
        self.settings = settings
        self.store = store
        self.started_at = time.time()
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._active: Job | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self.counts = dict.fromkeys(
            ("submitted", "started", "finished", "stopped", "failed", "refused", "chunks", "frames", "nfe"), 0
        )
        self._chunk_seconds = 0.0
        self._last_ttff: float | None = None

    # ----- called by the clients' sessions -----------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue a job, or raise QueueFull with a message for the client."""
        with self._cond:
            if self._closed:
                raise QueueFull("the server is shutting down; try again later")
            if len(self._waiting) >= self.settings.max_queue:
                self.counts["refused"] += 1
                raise QueueFull(
                    f"the queue is full ({len(self._waiting)} streams waiting, limit {self.settings.max_queue}); "
                    "try again later"
                )
            self.counts["submitted"] += 1
            self._waiting.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="diagvid-serve-worker", daemon=True)
                self._thread.start()
            self._announce_positions()
            self._cond.notify_all()

    def cancel(self, job: Job, *, disconnected: bool = False) -> None:
        """Stop a job: a waiting one leaves the queue now, the running one within a chunk."""
        job.disconnected = job.disconnected or disconnected
        job.cancelled.set()
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
                self.counts["stopped"] += 1
                job.ended.set()
                job.deliver(Outgoing({"type": "done", "reason": "stopped", "frames": 0, "video": None}))
                self._announce_positions()

    def snapshot(self) -> dict:
        """Queue, active stream and counts, for /health and /metrics."""
        with self._cond:
            active = self._active
            chunks = self.counts["chunks"]
            return {
                "queue_length": len(self._waiting),
                "active": None if active is None else {"id": active.id, "schedule": active.request.schedule},
                "worker_alive": self._thread is None or self._thread.is_alive(),
                "counts": dict(self.counts),
                "mean_chunk_seconds": round(self._chunk_seconds / chunks, 4) if chunks else None,
                "last_ttff_seconds": self._last_ttff,
                "uptime_seconds": round(time.time() - self.started_at, 1),
            }

    def close(self) -> None:
        """Cancel everything and stop the worker."""
        with self._cond:
            self._closed = True
            jobs = [*self._waiting, *([self._active] if self._active else [])]
        for job in jobs:
            self.cancel(job, disconnected=True)
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # ----- the worker --------------------------------------------------------------------------------------

    def _announce_positions(self) -> None:
        """Tell each waiting job its place when it changes (1 = next). Caller holds the lock."""
        busy = self._active is not None
        for place, job in enumerate(self._waiting, 1):
            if (busy or place > 1) and job.position != place:
                job.position = place
                job.deliver(Outgoing({"type": "queued", "position": place}))

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job = self._active = self._waiting.popleft()
                self.counts["started"] += 1
                self._announce_positions()
            try:
                self._run(job)
            except Exception:  # the worker serves everyone: one broken stream must not stop it
                log.exception("stream %s failed", job.id)
                if not job.ended.is_set():
                    job.ended.set()
                    job.deliver(
                        Outgoing({"type": "error", "message": "internal error; the stream was stopped"})
                    )
                    job.deliver(Outgoing({"type": "done", "reason": "error", "frames": 0, "video": None}))
            finally:
                with self._cond:
                    self._active = None
                    self._announce_positions()

    def _run(self, job: Job) -> None:
        """Generate one job chunk by chunk, recording it as mp4, until done, cancelled or failed."""
        pipe, settings, req = self.pipeline, self.settings, job.request
        fps = pipe.config.fps
        num_chunks = pipe.num_chunks(req.seconds if req.seconds is not None else settings.max_seconds)
        figures = StreamFigures(time.perf_counter())
        job.deliver(Outgoing(_started_message(job, num_chunks, fps, settings.frame_format)))
        video_id, writer = self.store.record(fps)
        stream = pipe.stream(
            req.prompt,
            num_chunks=num_chunks,
            schedule=req.schedule,
            seed=req.seed,
            prompt_source=job.take_prompt,
        )
        reason, error, video = "finished", None, None
        try:
            while True:
                if not job.wait_credit(settings.stall_seconds):
                    reason = "stopped" if job.cancelled.is_set() else "stalled"
                    break
                if figures.t_first is not None and not self._pace(job, figures.frames / fps, figures.t_first):
                    reason = "stopped"
                    break
                chunk = next(stream, None)
                now = time.perf_counter()
                if chunk is None:
                    reason = "limit" if req.seconds is None else "finished"
                    break
                if job.cancelled.is_set():  # the chunk under way when the client stopped is not sent
                    reason = "stopped"
                    break
                encoded = [
                    encode_frame(f, settings.frame_format, settings.jpeg_quality) for f in chunk.frames
                ]
                message = figures.add(chunk, now)
                self._count_chunk(chunk, figures.ttff if figures.chunks == 1 else None)
                job.deliver(Outgoing(message, encoded, sent=job.chunk_sent))
                writer.append(chunk.frames)  # the recording, while the client receives
            if figures.frames and not job.disconnected:
                self.store.publish(video_id, writer)
                video = f"/videos/{video_id}.mp4"
        except (ValueError, FloatingPointError) as err:
            reason, error, video = "error", str(err), None  # an unfinished recording is not offered
        except Exception as err:  # reported to the client and logged; the server goes on
            log.exception("stream %s failed", job.id)
            reason, error, video = (
                "error",
                f"internal error ({type(err).__name__}); the stream was stopped",
                None,
            )
        finally:
            stream.close()
            if video is None:
                writer.abort()
        with self._cond:
            self.counts[
                {"finished": "finished", "limit": "finished", "error": "failed"}.get(reason, "stopped")
            ] += 1
        job.ended.set()
        if error is not None:
            job.deliver(Outgoing({"type": "error", "message": error}))
        job.deliver(Outgoing(figures.done_message(reason, video)))

    def _pace(self, job: Job, video_seconds: float, t_first: float) -> bool:
        """Wait until the stream is at most `lead_seconds` ahead of a viewer who started playing at
        `t_first`; False if cancelled."""
        lead = self.settings.lead_seconds
        if lead is None:
            return not job.cancelled.is_set()
        while (ahead := video_seconds - (time.perf_counter() - t_first)) > lead:
            if job.cancelled.wait(timeout=min(_POLL_S, ahead - lead)):
                return False
        return not job.cancelled.is_set()

    def _count_chunk(self, chunk: ChunkResult, ttff: float | None) -> None:
        with self._cond:
            self.counts["chunks"] += 1
            self.counts["nfe"] += chunk.nfe
            self.counts["frames"] += len(chunk.frames)
            self._chunk_seconds += chunk.seconds
            if ttff is not None:
                self._last_ttff = round(ttff, 4)
