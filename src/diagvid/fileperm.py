"""Permissions for files written through a temporary file: what a plain open() would have given them.

`tempfile.mkstemp` creates files readable by their owner only (0600) and `mkdtemp` folders likewise (0700);
renamed into place, a video, checkpoint or weight file would keep that. These helpers apply the process's
umask to the usual 0666 / 0777 instead.
"""

from __future__ import annotations

import os
import threading

_lock = threading.Lock()


def _umask() -> int:
    with _lock:  # os.umask can only be read by setting it
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def as_created(path: str | os.PathLike, folder: bool = False) -> None:
    """Give `path` the mode open() / mkdir() would have: 0666 (files) or 0777 (folders) minus the umask."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())
