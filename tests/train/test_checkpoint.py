"""Atomic checkpoints and exact RNG restore."""

from __future__ import annotations

import os
import pickle
import random

import numpy as np
import pytest
import torch

from diagvid.train.checkpoint import load_checkpoint, rng_state, save_atomic, set_rng_state


def test_rng_round_trip(tmp_path):
    random.random()
    np.random.rand()
    torch.rand(1)
    path = save_atomic({"rng": rng_state()}, tmp_path / "c.pt")
    first = (random.random(), np.random.rand(), torch.rand(3).tolist())
    set_rng_state(load_checkpoint(path)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(3).tolist()) == first


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path, monkeypatch):
    path = save_atomic({"step": 1, "w": torch.ones(3)}, tmp_path / "c.pt")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_atomic({"step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1  # the previous checkpoint is intact
    assert os.listdir(tmp_path) == ["c.pt"]


def test_damaged_and_foreign_files_are_refused(tmp_path):
    path = save_atomic({"w": torch.randn(100)}, tmp_path / "c.pt")
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.pt is unreadable"):
        load_checkpoint(tmp_path / "cut.pt")

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"x": Evil()}, protocol=2))
    with pytest.raises(ValueError, match=r"evil\.pt is unreadable"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
