"""Atomic, complete training checkpoints that resume bit-identically.

A checkpoint is one file holding a dict of state dicts (models, optimisers, EMA, RNG states, data cursor,
step). It is written to a temporary file in the same folder, flushed to disk and renamed over the old one,
so a crash at any moment leaves either the previous checkpoint or the new one, never half of one. It is
read back with `torch.load(weights_only=True)`: plain tensors and containers, nothing executed.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diagvid.fileperm import as_created


def rng_state() -> dict[str, Any]:
    """Every global random generator a training loop may draw from."""
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (
            torch.from_numpy(np_keys.astype(np.int64)),
            int(np_pos),
            int(np_has_gauss),
            float(np_gauss),
        ),
        "python": (int(py_version), torch.tensor(py_state, dtype=torch.int64), py_gauss),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, py_state, py_gauss = state["python"]
    random.setstate((version, tuple(int(x) for x in py_state.tolist()), py_gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_atomic(path: Path, write) -> Path:
    """Call write(file) on a temp file beside `path`, flush and fsync it, rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    as_created(tmp)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_atomic(obj: Any, path: str | Path) -> Path:
    """torch.save `obj` to `path` atomically (temp file + fsync + rename)."""
    return _write_atomic(Path(path), lambda f: torch.save(obj, f))


def save_tensors_atomic(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    """Write tensors as one safetensors file atomically (a killed writer leaves no partial file)."""
    from safetensors.torch import save

    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    return _write_atomic(Path(path), lambda f: f.write(data))


def write_text_atomic(text: str, path: str | Path) -> Path:
    """Write a small text file (a manifest) atomically."""
    return _write_atomic(Path(path), lambda f: f.write(text.encode()))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint safely, with an error naming the file if it is damaged."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise ValueError(f"checkpoint {path} is unreadable ({type(err).__name__}: {err})") from err
