"""Finished streams kept as mp4 files for download, in a folder the server owns, under random ids.

Clients only ever name an id; the id is looked up in a dict, never joined to a path, so no request can
reach another file. The oldest video is deleted once `max_videos` are kept.
"""

from __future__ import annotations

import re
import secrets
import shutil
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

from diagvid.video_io import VideoWriter

VIDEO_ID = re.compile(r"^[A-Za-z0-9_-]{22}$")


class VideoStore:
    """mp4 recordings of streams: written while they play, published when they end, capped in number."""

    def __init__(self, max_videos: int) -> None:
        self.max_videos = max_videos
        self.folder = Path(tempfile.mkdtemp(prefix="diagvid-serve-"))
        self._videos: OrderedDict[str, Path] = OrderedDict()
        self._lock = threading.Lock()

    def record(self, fps: int) -> tuple[str, VideoWriter]:
        """A fresh id and an atomic writer for it; `publish` or `VideoWriter.abort` when done."""
        video_id = secrets.token_urlsafe(16)  # 22 characters
        return video_id, VideoWriter(self.folder / f"{video_id}.mp4", fps)

    def publish(self, video_id: str, writer: VideoWriter) -> None:
        """Finish the file and make it downloadable; drop the oldest beyond the cap."""
        path = writer.close()
        with self._lock:
            self._videos[video_id] = path
            while len(self._videos) > self.max_videos:
                _, old = self._videos.popitem(last=False)
                old.unlink(missing_ok=True)

    def get(self, video_id: str) -> Path | None:
        """The file of a published id, or None (malformed, unknown or evicted)."""
        if not VIDEO_ID.match(video_id):
            return None
        with self._lock:
            return self._videos.get(video_id)

    def __len__(self) -> int:
        with self._lock:
            return len(self._videos)

    def close(self) -> None:
        """Delete every video and the folder."""
        with self._lock:
            self._videos.clear()
        shutil.rmtree(self.folder, ignore_errors=True)
