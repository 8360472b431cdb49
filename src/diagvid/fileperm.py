"""How files land: written through a temporary file, renamed into place, with the usual permissions.

`tempfile.mkstemp` creates files readable by their owner only (0600) and `mkdtemp` folders likewise (0700);
renamed into place, a video, checkpoint or weight file would keep that. These helpers apply the process's
umask to the usual 0666 / 0777 instead.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

_lock = threading.Lock()


def _umask() -> int:
    with _lock:  # os.umask can only be read by setting it
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def as_created(path: str | os.PathLike, folder: bool = False) -> None:
    """Give `path` the mode open() / mkdir() would have: 0666 (files) or 0777 (folders) minus the umask."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


def replace_atomically(path: Path, write: Callable[[str], None]) -> None:
    """Run write(tmp) on a temp file beside `path`, fsync it, and rename it over `path`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        as_created(tmp)  # after the write: safetensors replaces the file, so an earlier chmod is lost
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)


def write_json(obj: dict, path: str | os.PathLike) -> None:
    """Write a JSON file atomically (after the weights it describes, so a config never outruns them)."""
    replace_atomically(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))
