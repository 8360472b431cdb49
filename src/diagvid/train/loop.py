"""Pieces every training stage shares: EMA, the JSONL log, the resumable step loop with atomic checkpoints."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from diagvid.train.checkpoint import load_checkpoint, rng_state, save_atomic, set_rng_state

log = logging.getLogger("diagvid.train")


class EMA:
    """Exponential moving average of a model's parameters, kept in fp32."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay={decay} must be in [0, 1)")
        self.decay = decay
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, decay: float | None = None) -> None:
        """Move towards `model`'s parameters; `decay=0` copies them (before an EMA start step)."""
        decay = self.decay if decay is None else decay
        for ema_p, p in zip(self.model.parameters(), model.parameters(), strict=True):
            p = p.full_tensor() if hasattr(p, "full_tensor") else p  # FSDP2 shards are gathered
            ema_p.lerp_(p.detach().float().to(ema_p.device), 1.0 - decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)


def seeded(*parts: int | str) -> torch.Generator:
    """A CPU generator whose seed is a fixed function of `parts` (run seed, step, sample index, ...).

    Training stages draw every random number from such generators, keyed by what the number is for, so a
    draw depends neither on how the batch is split over ranks and micro-batches nor on earlier draws.
    """
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest) >> 1)


def start_run(out_dir: str | Path, config: dict[str, Any], seed: int) -> Path:
    """Seed torch, create the run folder and write the resolved config beside the checkpoint."""
    torch.manual_seed(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def adamw_with_warmup(
    params,
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    warmup: int,
    *,
    total_steps: int = 0,
    decay_steps: int = 0,
    final_lr_ratio: float = 0.1,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW, a linear warm-up over `warmup` steps and, optionally, a linear decay over the last
    `decay_steps` of `total_steps` down to `final_lr_ratio * lr` (both checkpointable)."""
    if decay_steps < 0 or decay_steps > total_steps:
        raise ValueError(f"decay_steps={decay_steps} must be in [0, total_steps={total_steps}]")
    if not 0 <= final_lr_ratio <= 1:
        raise ValueError(f"final_lr_ratio={final_lr_ratio} must be in [0, 1]")
    opt = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    decay_from = total_steps - decay_steps

    def factor(step: int) -> float:
        # LambdaLR calls this with the number of steps taken so far
        scale = min(1.0, (step + 1) / max(1, warmup))
        if decay_steps and step >= decay_from:
            done = min(1.0, (step - decay_from) / decay_steps)
            scale *= 1.0 - (1.0 - final_lr_ratio) * done
        return scale

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _step_of(line: str, default: int) -> int:
    """The step a log line belongs to; a line cut short by a crash counts as past the checkpoint."""
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return default


class JsonlLog:
    """Append-only JSON-lines log; on resume, lines past the checkpoint's step are dropped first."""

    def __init__(self, path: Path, resume_step: int = 0) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            kept = [
                ln
                for ln in path.read_text().splitlines()
                if _step_of(ln, default=resume_step + 1) <= resume_step
            ]
            path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


class StopRequested(Exception):
    """Raised inside the loop after SIGINT/SIGTERM so that a final checkpoint is written."""


def run_loop(
    *,
    out_dir: Path,
    max_steps: int,
    state: dict[str, Any],
    train_step: Callable[[int], dict[str, float]],
    ckpt_every: int,
    log_every: int,
    evaluate: Callable[[int], dict[str, Any]] | None = None,
    eval_every: int = 0,
    config: dict[str, Any] | None = None,
    resume: bool = True,
    progress: bool = True,
    writer: bool = True,
    agree: Callable[[bool], bool] | None = None,
) -> int:
    """Run `train_step(step)` from the last checkpoint (if any) until `max_steps`, checkpointing atomically.

    `state` maps names to objects with state_dict/load_state_dict (models, optimisers, EMA); RNG states and
    the step are added here. Returns the step reached. The data position must be a function of the step
    (the stages index their data by step), which is what makes a resumed run bit-identical.

    Distributed runs call this on every rank: `writer` is true on rank 0 alone (log, bar, checkpoint file;
    state dicts are still gathered on every rank, FSDP needs all of them), and `agree(flag)` returns
    whether any rank was asked to stop, so that all ranks leave after the same step.
    """
    ckpt_path = out_dir / "checkpoint.pt"
    # a write cut short by a crash or SIGKILL; only the rank that writes checkpoints cleans up after them
    for stale in out_dir.glob(f".{ckpt_path.name}.*.tmp") if writer else ():
        log.warning("removing %s, left by an interrupted checkpoint write", stale)
        stale.unlink()
    step = 0
    if resume and ckpt_path.exists():
        blob = load_checkpoint(ckpt_path)
        for name, obj in state.items():
            if name not in blob["state"]:
                raise ValueError(f"{ckpt_path} has no {name!r} state; it holds {sorted(blob['state'])}")
            obj.load_state_dict(blob["state"][name])
        set_rng_state(blob["rng"])
        step = int(blob["step"])
        log.info("resumed from %s at step %d", ckpt_path, step)
    jsonl = JsonlLog(out_dir / "log.jsonl", resume_step=step) if writer else None

    def save() -> None:
        blob = {
            "step": step,
            "state": {name: obj.state_dict() for name, obj in state.items()},
            "rng": rng_state(),
            "config": json.dumps(config or {}),
        }
        if writer:
            save_atomic(blob, ckpt_path)

    stop = {"flag": False}

    def request_stop(signum, frame):  # finish the current step, then save and leave
        stop["flag"] = True

    old = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    shown = progress_bar(progress and writer, "train", max_steps, completed=step, info=True)
    bar, task = shown if shown is not None else (None, None)
    try:
        t0 = time.perf_counter()
        while step < max_steps:
            metrics = train_step(step)
            step += 1
            if jsonl is not None and (step % log_every == 0 or step == max_steps):
                record = {"step": step, "time": round(time.perf_counter() - t0, 3), **metrics}
                jsonl.write(record)
                log.info(
                    " ".join(
                        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                    )
                )
            due = eval_every and (step % eval_every == 0 or step == max_steps)
            if jsonl is not None and evaluate is not None and due:
                jsonl.write({"step": step, "eval": evaluate(step)})
            if step % ckpt_every == 0 or step == max_steps:
                save()
            if bar is not None:
                bar.update(
                    task,
                    completed=step,
                    info=" ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)),
                )
            if agree(stop["flag"]) if agree is not None else stop["flag"]:
                save()
                raise StopRequested(f"stopped at step {step}; checkpoint written to {ckpt_path}")
    finally:
        if bar is not None:
            bar.stop()
        for s, handler in old.items():
            signal.signal(s, handler)
    return step


def progress_bar(
    show: bool, label: str, total: int, *, completed: int = 0, info: bool = False
) -> tuple[Any, Any] | None:
    """A started rich progress bar over `total` items (with a free-text `info` field when asked) and its task;
    None when not shown. The caller stops it."""
    if not show:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    bar = Progress(*columns, *([TextColumn("{task.fields[info]}")] if info else []))
    task = bar.add_task(label, total=total, completed=completed, info="")
    bar.start()
    return bar, task


def write_model_config(out_dir: Path, model: torch.nn.Module) -> None:
    """Record the trained DiT's architecture beside the checkpoint (`export_model` rebuilds it from there)."""
    (out_dir / "model.json").write_text(json.dumps(model.cfg.to_dict(), indent=2) + "\n")


def export_model(run_dir: str | Path, folder: str | Path, part: str = "ema", kind: str = "generator") -> Path:
    """Write one model of a run's checkpoint (default: the EMA weights) as a model folder of ours."""
    from diagvid.model.dit import DiTConfig, WanDiT
    from diagvid.model.weights import save_dit

    run_dir = Path(run_dir)
    blob = load_checkpoint(run_dir / "checkpoint.pt")
    if part not in blob["state"]:
        raise ValueError(f"{run_dir}/checkpoint.pt has no {part!r}; it holds {sorted(blob['state'])}")
    cfg = DiTConfig.from_dict(json.loads((run_dir / "model.json").read_text()))
    with torch.device("meta"):
        model = WanDiT(cfg)
    model.load_state_dict(blob["state"][part], assign=True)
    return save_dit(model, folder, kind=kind)
