"""Reading and writing video files; every write is atomic (temp file + rename, nothing half-written left)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from diagvid.fileperm import as_created

FORMATS = (".mp4", ".gif", "png folder (a path without suffix or ending in /)")


def output_kind(path: str | Path) -> str:
    """'mp4', 'gif' or 'png', from the path; an error names what is allowed."""
    p = str(path)
    suffix = Path(p).suffix.lower()
    if suffix == ".mp4":
        return "mp4"
    if suffix == ".gif":
        return "gif"
    if suffix == "" or p.endswith(os.sep):
        return "png"
    raise ValueError(f"cannot write {p!r}: unknown format {suffix!r}; allowed: {', '.join(FORMATS)}")


_DEFERRED = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT and SIGTERM until the block is done, then deliver the first one (main thread only).

    Starting the mp4 writer launches an ffmpeg process that opens the temp file; if Ctrl-C or SIGTERM lands
    before the writer object exists, `abort` cannot close it, and ffmpeg writes the file back after `abort`
    removed it. Deferred, the signal arrives once the writer is known, and `abort` stops it cleanly. The
    hold is a Python-level handler: masking the signal in the main thread is not enough, since the kernel
    hands a process-directed signal to any thread that does not block it (torch and ffmpeg pipes start
    threads) and Python then raises in the main thread all the same.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _frame: held.append(signum)) for s in _DEFERRED}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if held:
            signal.raise_signal(held[0])  # now to its own handler: KeyboardInterrupt for Ctrl-C


class VideoWriter:
    """Append uint8 frames [T, H, W, 3] chunk by chunk; `close()` publishes the file, `abort()` removes it.

    Used as a context manager, an exception (Ctrl-C included) aborts, so the destination is either the
    complete new video or untouched.
    """

    def __init__(self, path: str | Path, fps: int) -> None:
        self.path = Path(path)
        self.kind = output_kind(path)
        self.fps = fps
        self.frames_written = 0
        parent = self.path.parent
        parent.mkdir(parents=True, exist_ok=True)
        if self.kind == "png":
            self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", dir=parent))
            as_created(self._tmp, folder=True)
            self._writer = None
        else:
            # the file goes inside a private temp folder: whatever happens to the encoder process, removing
            # the folder on abort leaves it nowhere to (re)create the file
            self._dir = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", dir=parent))
            self._tmp = self._dir / self.path.name
            self._writer = None  # opened on the first frames, when the size is known

    def append(self, frames: np.ndarray) -> None:
        """Write frames uint8 [T, H, W, 3]."""
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
        if self.kind == "png":
            from PIL import Image

            for frame in frames:
                Image.fromarray(frame).save(self._tmp / f"{self.frames_written:06d}.png")
                self.frames_written += 1
            return
        import imageio.v2 as imageio

        if self._writer is None:
            with _signals_deferred():  # an interrupt mid-start would orphan an ffmpeg that writes the file
                self._writer = self._open_writer(imageio)
        for frame in frames:
            self._writer.append_data(frame)
            self.frames_written += 1

    def _open_writer(self, imageio):
        if self.kind == "mp4":
            return imageio.get_writer(
                self._tmp,
                format="FFMPEG",
                fps=self.fps,
                codec="libx264",
                quality=8,
                macro_block_size=1,
                ffmpeg_log_level="error",
            )
        return imageio.get_writer(self._tmp, format="GIF", duration=1000 / self.fps, loop=0)

    def close(self) -> Path:
        """Finish the file and move it into place."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self.frames_written == 0:
            self.abort()
            raise ValueError(f"no frames were written to {self.path}")
        try:
            if self.kind == "png":
                if self.path.exists():
                    shutil.rmtree(self.path)
                os.replace(self._tmp, self.path)
            else:
                as_created(self._tmp)
                os.replace(self._tmp, self.path)
                self._dir.rmdir()
        except BaseException:
            self.abort()  # nothing half-published stays behind
            raise
        return self.path

    def abort(self) -> None:
        """Drop everything written so far."""
        try:
            if self._writer is not None:
                self._writer.close()
        except Exception:  # the temp file goes away regardless
            pass
        self._writer = None
        folder = self._tmp if self.kind == "png" else self._dir
        for _ in range(50):  # a still-running encoder may add the file back between listing and rmdir
            shutil.rmtree(folder, ignore_errors=True)
            if not folder.exists():
                break
            time.sleep(0.02)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_video(frames: np.ndarray, path: str | Path, fps: int = 16) -> Path:
    """Write a whole clip atomically."""
    with VideoWriter(path, fps) as w:
        w.append(frames)
    return Path(path)


def read_video(path: str | Path) -> np.ndarray:
    """All frames of a video file (or a folder of PNGs) as uint8 [T, H, W, 3]."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no video at {path}")
    if path.is_dir():
        from PIL import Image

        files = sorted(path.glob("*.png"))
        if not files:
            raise ValueError(f"{path} holds no .png frames")
        return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    import imageio.v3 as iio

    try:
        frames = iio.imread(path, index=None)
    except Exception as err:
        raise ValueError(f"cannot read video {path}: {type(err).__name__}: {err}") from err
    frames = np.asarray(frames)
    if frames.ndim == 3:  # a single image or a one-frame gif
        frames = frames[None]
    return np.ascontiguousarray(frames[..., :3]).astype(np.uint8)


def read_image(path: str | Path) -> np.ndarray:
    """An RGB image file as uint8 [H, W, 3]; other modes are refused with the mode named."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no image at {path}")
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from err
    if img.mode not in ("RGB", "RGBA", "L"):
        raise ValueError(f"image {path} has mode {img.mode!r}; use an RGB (or RGBA / greyscale) image")
    return np.asarray(img.convert("RGB"))
