"""Decoding overlapped with the transformer: the codec in a second process, or on a second CUDA stream.

`Pipeline.stream` alternates two kinds of work: the transformer denoises chunk i, then the codec decodes it
into pixels. The decode of chunk i needs nothing from chunk i + 1, so it can run while chunk i + 1 is being
denoised. Three decode stages share one small interface, `submit(latents)` then `take() -> frames` in the
same order:

- `InlineDecode` decodes at `submit`, in this thread (the default).
- `DecodeWorker.begin()` (CPU): the codec in a second process with its own intra-op threads. Not a thread:
  the toy transformer's many small operations hold Python's lock often enough that a decode thread barely
  overlaps with it (eighth session, docs/benchmarks.md). The worker is a fresh interpreter holding a copy
  of the codec; latents go in and uint8 frames come back through a socket pair, a few kilobytes in and
  about 150 out per toy chunk. Starting one takes a second or more (it imports torch), so the pipeline keeps
  it until `Pipeline.close`.
- `CudaStreamDecode` (GPU): the codec's kernels are queued on a second CUDA stream behind the chunk's
  denoising, so they run beside the next chunk's, and the frames come back through pinned memory.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys
import traceback
import weakref
from collections import deque
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import torch

from diagvid.model.frames import tensor_to_frames, uint8_frames

START_TIMEOUT_S = 300.0
"""how long a new worker may take to import torch and receive the codec"""

POLL_S = 0.5
"""how often a waiting `take` checks that the worker is still alive"""


def check_overlap(device: torch.device, threads: int, name: str = "decode_threads") -> None:
    """ValueError unless an overlapped decode can run on `device` with `threads` worker threads (named `name`
    in the message); the one check behind the pipeline, the benchmark and the command line."""
    if torch.device(device).type not in ("cpu", "cuda"):
        raise ValueError(f"overlap_decode runs on a CPU or a CUDA device; device is {device}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"{name}={threads!r} must be >= 1 (an int)")


def threads_beside_worker(threads: int) -> int:
    """This process's intra-op threads once a CPU decode worker has taken `threads` of them (at least 1)."""
    return max(1, torch.get_num_threads() - threads)


class InlineDecode:
    """Decodes each chunk when it is submitted, in this process: the default stage."""

    def __init__(self, codec) -> None:
        self._decoder = codec.stream_decoder()
        self._done: deque[np.ndarray] = deque()

    def submit(self, latents: torch.Tensor) -> None:
        self._done.append(tensor_to_frames(self._decoder.decode(latents)[0]))

    def take(self) -> np.ndarray:
        return self._done.popleft()


class DecodeWorkerError(RuntimeError):
    """The decode worker failed on a chunk (its traceback is in the message) or is gone."""


def _send(conn: Connection, message) -> None:
    # plain pickle (tensors by value): `Connection.send` would use torch's fd-sharing reductions, which
    # need a multiprocessing parent
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def _recv(conn: Connection):
    return pickle.loads(conn.recv_bytes())


def _serve(fd: int) -> None:
    """The worker process: receive the codec, then decode chunks of the current stream until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops this process
    conn = Connection(fd)
    codec, threads = _recv(conn)  # from the parent process that started this one, never from a file
    torch.set_num_threads(threads)
    _send(conn, ("ready", 0, 0, None))
    decoder, token = None, 0
    with torch.no_grad():
        while True:
            try:
                message = _recv(conn)
            except EOFError:  # the parent is gone
                return
            if message is None:
                return
            kind, token_in, seq, payload = message
            if kind == "begin":
                decoder, token = codec.stream_decoder(), token_in
                continue
            try:
                pixels = tensor_to_frames(decoder.decode(torch.from_numpy(payload))[0])
                _send(conn, ("frames", token, seq, pixels))
            except Exception:  # the stream fails in the parent with this traceback; the worker lives on
                _send(conn, ("error", token, seq, traceback.format_exc()))


def _stop(process: subprocess.Popen, conn: Connection) -> None:
    try:
        if process.poll() is None:
            _send(conn, None)
            process.wait(timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        process.kill()
        process.wait(timeout=5)
    finally:
        conn.close()


class DecodeWorker:
    """A process that holds a copy of `codec` (anything with `stream_decoder()`, e.g. `WanVAE` or
    `FastDecodeCodec`; of the latter only its tiny decoder, its `decoding_module`) and decodes latent chunks
    with `threads` intra-op threads.

    The worker is a fresh interpreter (`python -c`), not a fork (never fork a process whose thread pools
    run) and not a multiprocessing spawn (that re-runs the caller's main script, which a script without
    a `__main__` guard does not survive). The codec is copied once, when it starts: later changes to the
    parent's codec do not reach it. Give the parent process the remaining cores (`torch.set_num_threads`),
    or the two will fight over them.
    """

    def __init__(self, codec, threads: int = 1) -> None:
        check_overlap(torch.device("cpu"), threads, "threads")
        self.codec = codec
        self.threads = threads
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[1])  # importable even when not installed
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        # os._exit: nothing is left to flush, and a torch interpreter's normal teardown takes about a second
        code = (
            "import os, sys; from diagvid.decode_worker import _serve; _serve(int(sys.argv[1])); os._exit(0)"
        )
        self._process = subprocess.Popen(
            [sys.executable, "-c", code, str(theirs.fileno())], pass_fds=(theirs.fileno(),), env=env
        )
        theirs.close()
        self._conn = Connection(ours.detach())
        self._finalizer = weakref.finalize(self, _stop, self._process, self._conn)
        self._token = 0
        try:
            self._send((getattr(codec, "decoding_module", codec), threads))  # the part that decodes
            self._receive(token=0, seq=0, timeout=START_TIMEOUT_S)
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def alive(self) -> bool:
        return self._process.poll() is None

    def begin(self) -> WorkerStage:
        """A stage for one new stream; replies still due to an earlier, abandoned stream are dropped."""
        if not self.alive:
            raise DecodeWorkerError(f"the decode worker (pid {self.pid}) is not running; start a new one")
        self._token += 1
        self._send(("begin", self._token, 0, None))
        return WorkerStage(self, self._token)

    def close(self) -> None:
        """Stop the process (idempotent)."""
        self._finalizer()

    def _send(self, message) -> None:
        try:
            _send(self._conn, message)
        except OSError as err:
            raise DecodeWorkerError(f"the decode worker (pid {self.pid}) is gone: {err}") from err

    def _receive(self, token: int, seq: int, timeout: float | None = None):
        """The reply for (token, seq), skipping stale ones; raises if the worker failed or died."""
        waited = 0.0
        while True:
            if not self._conn.poll(POLL_S):
                waited += POLL_S
                if not self.alive:
                    raise DecodeWorkerError(
                        f"the decode worker (pid {self.pid}) exited with code {self._process.returncode} "
                        f"before returning chunk {seq}"
                    )
                if timeout is not None and waited >= timeout:
                    raise TimeoutError(
                        f"the decode worker (pid {self.pid}) did not answer in {timeout:.0f} s"
                    )
                continue
            try:
                kind, token_in, seq_in, payload = _recv(self._conn)
            except EOFError as err:
                raise DecodeWorkerError(f"the decode worker (pid {self.pid}) closed its end") from err
            if token_in != token:
                continue  # a chunk of a stream the caller stopped reading
            if kind == "error":
                raise DecodeWorkerError(f"the decode worker failed on chunk {seq_in}:\n{payload}")
            if seq_in != seq:
                raise DecodeWorkerError(f"decode worker replied with chunk {seq_in}, expected {seq}")
            return payload


class WorkerStage:
    """One stream's view of a `DecodeWorker`: chunks go in order, frames come back in the same order."""

    def __init__(self, worker: DecodeWorker, token: int) -> None:
        self._worker, self._token = worker, token
        self._sent = self._taken = 0

    def submit(self, latents: torch.Tensor) -> None:
        array = latents.detach().to("cpu", torch.float32).numpy()
        self._worker._send(("decode", self._token, self._sent, array))
        self._sent += 1

    def take(self) -> np.ndarray:
        if self._taken >= self._sent:
            raise RuntimeError("take() without a submitted chunk")
        frames = self._worker._receive(self._token, self._taken)
        self._taken += 1
        return frames


class CudaStreamDecode:
    """Decodes on a second CUDA stream. `submit` only queues work: the side stream waits for the kernels
    that produced the latents, decodes, converts to uint8 and copies into pinned host memory, all
    asynchronously; `take` waits for that chunk's copy alone. Written for issue 10; it has not yet run on a
    GPU (its test skips without CUDA)."""

    def __init__(self, codec, device: torch.device) -> None:
        self._decoder = codec.stream_decoder()
        self._stream = torch.cuda.Stream(device)
        self._done: deque[tuple[torch.Tensor, torch.cuda.Event]] = deque()

    def submit(self, latents: torch.Tensor) -> None:
        self._stream.wait_stream(torch.cuda.current_stream(latents.device))  # the latents are written
        with torch.cuda.stream(self._stream):
            frames = uint8_frames(self._decoder.decode(latents)[0])
            host = torch.empty(frames.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(frames, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._stream)
        latents.record_stream(self._stream)  # not reused by the main stream before the decode has read it
        self._done.append((host, done))

    def take(self) -> np.ndarray:
        host, done = self._done.popleft()
        done.synchronize()
        return host.numpy()
