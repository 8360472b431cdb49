"""Tiny models and recipes shared by the distillation-stage tests (tests/test_distill*.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from diagvid.model.dit import WanDiT, preset
from diagvid.model.weights import save_dit
from tests.conftest import randomize

# 4 latent channels, text width 12; 16 text tokens, the toy encoder's prompt length
TINY = {"text_len": 16}


def tiny_text(folder: Path) -> Path:
    """The toy text encoder over the world's vocabulary, at the tiny DiT's text width."""
    from diagvid.model.text import ToyTextConfig, ToyTextEncoder
    from diagvid.world import VOCABULARY

    torch.manual_seed(0)
    return ToyTextEncoder(VOCABULARY, ToyTextConfig(d_model=12, num_layers=1, num_heads=2, d_ff=16)).save(
        folder
    )


def tiny_dit_folder(folder: Path, seed: int = 0) -> Path:
    """A tiny random DiT written as one of our model folders (a stand-in teacher)."""
    torch.manual_seed(seed)
    return save_dit(randomize(WanDiT(preset("tiny", **TINY)), seed=seed, std=0.2), folder)


def ode_recipe(root: Path, **changes) -> dict:
    """ODE pairs of 4 latent frames at 4x4: 5 samples in shards of 2, a 4-step teacher, 2 kept states."""
    return {
        "teacher": str(root / "teacher"),
        "text": str(root / "text"),
        "out_dir": str(root / "ode"),
        "num_samples": 5,
        "shard_size": 2,
        "batch_size": 2,
        "latent_frames": 4,
        "latent_hw": [4, 4],
        "student_steps": [1000.0, 750.0],
        "num_steps": 4,
        "shift": 3.0,
        "guidance": 2.0,
        "device": "cpu",
        **changes,
    }


def codecs(root: Path) -> Path:
    """Teacher and text encoder folders under root (built once per test module)."""
    tiny_text(root / "text")
    tiny_dit_folder(root / "teacher", seed=5)
    return root


def init_recipe(root: Path, out_dir: Path, **changes) -> dict:
    """ODE regression of a student started from the tiny teacher, chunks of 2 latent frames."""
    return {
        "generator": str(root / "teacher"),
        "data_dir": str(root / "ode"),
        "frames_per_chunk": 2,
        "steps": 4,
        "batch_size": 2,
        "optim": {"lr": 3e-3, "betas": [0.9, 0.99], "warmup": 1, "grad_clip": 10.0},
        "ema_decay": 0.9,
        "out_dir": str(out_dir),
        "log_every": 1,
        "ckpt_every": 2,
        "parallel": {"device": "cpu"},
        **changes,
    }


def codecs_and_pairs(root: Path, **ode_changes) -> Path:
    """Teacher, text encoder and a finished folder of ODE pairs under root."""
    from diagvid.config import from_dict
    from diagvid.train.ode import OdeConfig, write_ode_pairs

    codecs(root)
    write_ode_pairs(from_dict(OdeConfig, ode_recipe(root, **ode_changes)), progress=False)
    return root


SCHEDULE_OF = {"diagonal": "diagonal", "self-forcing": "self-forcing", "causvid": "causvid"}


def distill_recipe(root: Path, out_dir: Path, rollout: str = "diagonal", **changes) -> dict:
    """DMD on 2 chunks of 2 latent frames at 4x4; generator, teacher and critic start from the tiny teacher."""
    recipe = {
        "generator": str(root / "teacher"),
        "teacher": str(root / "teacher"),
        "text": str(root / "text"),
        "rollout": rollout,
        "schedule": SCHEDULE_OF.get(rollout, "diagonal"),
        "frames_per_chunk": 2,
        "num_chunks": 2,
        "latent_hw": [4, 4],
        "guidance": 3.0,
        "critic_steps": 1,
        "steps": 2,
        "batch_size": 1,
        "generator_optim": {"lr": 1e-3, "betas": [0.0, 0.999], "warmup": 1},
        "critic_optim": {"lr": 1e-3, "betas": [0.0, 0.999], "warmup": 1},
        "ema_start": 1,
        "out_dir": str(out_dir),
        "ckpt_every": 1,
        "parallel": {"device": "cpu"},
    }
    if rollout == "causvid":
        recipe["ode_dir"] = str(root / "ode")
    return {**recipe, **changes}


def write_toml(recipe: dict, path: Path) -> Path:
    """A flat-or-one-level-nested recipe dict as a TOML file (enough for these recipes)."""
    import json

    def value(v) -> str:
        return json.dumps(v)  # numbers, strings, booleans and lists read the same in TOML

    top = [f"{k} = {value(v)}" for k, v in recipe.items() if not isinstance(v, dict) and v is not None]
    tables = [
        f"\n[{k}]\n" + "\n".join(f"{kk} = {value(vv)}" for kk, vv in v.items())
        for k, v in recipe.items()
        if isinstance(v, dict)
    ]
    path.write_text("\n".join(top) + "\n" + "\n".join(tables) + "\n")
    return path
