"""A small training run for the SIGKILL test, started as its own process: `python killable_run.py OUT STEPS`.

It goes through the same `run_loop` every training stage uses (model, AdamW + warm-up, EMA, data drawn
from the global RNG, atomic checkpoints every 2 steps). Checkpoint writes are slowed down (written in
pieces with pauses) so that a kill can land inside one. When it finishes it writes `final.pt`.
"""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import torch

from diagvid.train import checkpoint
from diagvid.train.loop import EMA, adamw_with_warmup, run_loop, start_run


def _slow_save(obj, f) -> None:
    buf = io.BytesIO()
    _real_save(obj, buf)
    data = buf.getvalue()
    piece = len(data) // 4 + 1
    for i in range(0, len(data), piece):
        f.write(data[i : i + piece])
        f.flush()
        time.sleep(0.02)


_real_save = torch.save


def main(out_dir: str, steps: int) -> None:
    torch.set_num_threads(1)
    checkpoint.torch.save = _slow_save  # this process only
    out = start_run(out_dir, {"steps": steps}, seed=0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))
    ema = EMA(model, 0.9)
    opt, sched = adamw_with_warmup(model.parameters(), 1e-2, (0.9, 0.99), 0.01, warmup=5)

    def train_step(step: int) -> dict[str, float]:
        x = torch.randn(32, 16)  # the global RNG: only a restored RNG state makes a resumed run identical
        keep = (torch.rand(32, 16) > 0.1).float()
        loss = ((model(x * keep) - x.flip(1)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        ema.update(model)
        time.sleep(0.01)
        return {"loss": loss.item()}

    state = {"model": model, "ema": ema, "opt": opt, "sched": sched}
    run_loop(
        out_dir=out,
        max_steps=steps,
        state=state,
        train_step=train_step,
        ckpt_every=2,
        log_every=1,
        progress=False,
    )
    checkpoint.torch.save = _real_save
    checkpoint.save_atomic({"model": model.state_dict(), "ema": ema.state_dict()}, Path(out) / "final.pt")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
