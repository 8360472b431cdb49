"""Training survives SIGKILL anywhere, checkpoint writes included, and finishes bit-identical (issue #9)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diagvid.train.checkpoint import load_checkpoint

SCRIPT = Path(__file__).with_name("killable_run.py")
STEPS = 120


def _start(out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), str(out), str(STEPS)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def _finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 60.0) -> bool:
    """Poll `cond` until true; False if the process ended first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    raise TimeoutError("the training process made no progress")


def _logged_steps(out: Path) -> int:
    log = out / "log.jsonl"
    return len(log.read_text().splitlines()) if log.exists() else 0


def _temp_files(out: Path) -> list[Path]:
    return list(out.glob(".checkpoint.pt.*.tmp"))


@pytest.mark.timeout(900)
def test_sigkill_at_ten_points_then_resume_is_bit_identical(tmp_path):
    ref = tmp_path / "ref"
    _finish(_start(ref))

    run = tmp_path / "killed"
    rng = random.Random(1234)
    kills, in_write, last_step = 0, 0, 0
    while kills < 10:
        proc = _start(run)
        # wait until this process has trained at least one step past where it resumed
        start_lines = _logged_steps(run)
        if not _wait_for(lambda n=start_lines: _logged_steps(run) > n, proc):
            pytest.fail(f"training finished after only {kills} kills; make STEPS larger")
        if kills % 3 == 0:
            # inside a checkpoint write: the temporary file exists and the rename has not happened yet
            if not _wait_for(lambda: bool(_temp_files(run)), proc):
                pytest.fail("training finished before a checkpoint write could be interrupted")
            in_write += 1
        else:
            time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        # the checkpoint on disk is always a complete one, never older than the previous one
        ckpt = run / "checkpoint.pt"
        if ckpt.exists():
            step = int(load_checkpoint(ckpt)["step"])
            assert step >= last_step
            last_step = step
    assert in_write >= 3
    assert last_step < STEPS, "every kill should have landed before the end"

    _finish(_start(run))
    assert not _temp_files(run), "the stale temporary file of an interrupted write was not removed"
    a = load_checkpoint(ref / "final.pt")
    b = load_checkpoint(run / "final.pt")
    for part in ("model", "ema"):
        for name, tensor in a[part].items():
            assert torch.equal(tensor, b[part][name]), f"{part}.{name} differs after kills and resumes"
    # the log holds every step once, in order, even though lines were cut by kills
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))
