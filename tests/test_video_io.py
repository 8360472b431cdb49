"""Video files: round trips, atomic writes, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from diagvid.video_io import VideoWriter, read_image, read_video, write_video


def clip(t: int = 9) -> np.ndarray:
    y, x = np.mgrid[0:32, 0:32]
    return np.stack(
        [np.stack([(x * 8 + i * 10) % 256, y * 8, np.full_like(x, 128)], -1) for i in range(t)]
    ).astype(np.uint8)


@pytest.mark.parametrize(("name", "tol"), [("a.mp4", 12.0), ("a.gif", 20.0), ("frames", 0.0)])
def test_round_trip(tmp_path, name, tol):
    frames = clip()
    write_video(frames, tmp_path / name, fps=16)
    back = read_video(tmp_path / name)
    assert back.shape == frames.shape
    assert np.abs(back.astype(float) - frames).mean() <= tol


def test_interrupted_write_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt), VideoWriter(tmp_path / "x.mp4", 16) as w:
        w.append(clip())
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_interrupted_rewrite_keeps_the_old_file(tmp_path):
    write_video(clip(5), tmp_path / "x.gif")
    before = (tmp_path / "x.gif").read_bytes()
    with pytest.raises(RuntimeError), VideoWriter(tmp_path / "x.gif", 16) as w:
        w.append(clip(9))
        raise RuntimeError("chunk 3 failed")
    assert (tmp_path / "x.gif").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.gif"]


def test_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown format '\.avi'"):
        VideoWriter(tmp_path / "x.avi", 16)
    with pytest.raises(ValueError, match="uint8"):
        write_video(clip().astype(np.float32), tmp_path / "x.mp4")
    with pytest.raises(FileNotFoundError):
        read_video(tmp_path / "missing.mp4")
    (tmp_path / "junk.mp4").write_bytes(b"not a video")
    with pytest.raises(ValueError, match="cannot read video"):
        read_video(tmp_path / "junk.mp4")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image"):
        read_image(tmp_path / "junk.png")
    from PIL import Image

    Image.new("CMYK", (4, 4)).save(tmp_path / "c.jpg")
    with pytest.raises(ValueError, match="mode 'CMYK'"):
        read_image(tmp_path / "c.jpg")


@pytest.mark.parametrize("name", ["clip.mp4", "frames"])
def test_written_files_get_the_usual_permissions(tmp_path, name):
    """Temporary files start at 0600; what lands must have the mode a plain open() gives (umask applied)."""
    import os

    from diagvid.model.dit import WanDiT, preset
    from diagvid.model.weights import save_dit
    from diagvid.train.checkpoint import save_atomic

    old = os.umask(0o022)
    try:
        out = write_video(np.zeros((3, 16, 16, 3), np.uint8), tmp_path / name, fps=8)
        ckpt = save_atomic({"w": np.zeros(1)}, tmp_path / "c.pt")
        weights = save_dit(WanDiT(preset("tiny")), tmp_path / "model") / "model.safetensors"
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == (0o755 if out.is_dir() else 0o644)
    assert ckpt.stat().st_mode & 0o777 == 0o644
    assert weights.stat().st_mode & 0o777 == 0o644


def test_an_interrupt_while_the_mp4_writer_starts_still_leaves_nothing(tmp_path):
    """Ctrl-C landing while ffmpeg starts is held until the writer exists, so abort stops it and no file
    comes back afterwards (it once did: an orphaned ffmpeg rewrote the removed temp file)."""
    import signal
    import threading
    import time

    from diagvid.video_io import VideoWriter

    frames = np.zeros((2, 16, 16, 3), np.uint8)

    def open_then_signal(real_open):
        def start(imageio):
            started = real_open(imageio)
            started.append_data(frames[0])  # ffmpeg is running and has the temp file open
            # arrives mid-start, as a user's Ctrl-C would; sent to the main thread so that its Python handler
            # runs here, not whenever another thread that took a process-wide signal wakes it up
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            return started

        return start

    # Python's own Ctrl-C behaviour, whatever handler or signal mask an earlier test in this worker left
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    try:
        with pytest.raises(KeyboardInterrupt), VideoWriter(tmp_path / "c.mp4", fps=8) as writer:
            writer._open_writer = open_then_signal(writer._open_writer)
            writer.append(frames)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        signal.signal(signal.SIGINT, handler)
    time.sleep(0.5)  # give a stray ffmpeg time to write
    assert list(tmp_path.iterdir()) == []
