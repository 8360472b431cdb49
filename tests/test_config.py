"""Recipe loading: bases, overrides, unknown keys and wrong types."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from diagvid.config import load_config


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class Recipe:
    name: str = "x"
    steps: int = 10
    window: int | None = None
    optim: Optim = field(default_factory=Optim)


def test_base_chain_and_overrides(tmp_path):
    (tmp_path / "base.toml").write_text('name = "base"\nsteps = 5\n[optim]\nlr = 0.1\n')
    (tmp_path / "run.toml").write_text('base = "base.toml"\nsteps = 7\n[optim]\nbetas = [0.0, 0.99]\n')
    cfg = load_config(Recipe, tmp_path / "run.toml", ["optim.lr=3e-4", "window=4"])
    assert cfg == Recipe(name="base", steps=7, window=4, optim=Optim(lr=3e-4, betas=(0.0, 0.99)))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("stepz = 3", r"unknown config keys \['stepz'\]"),
        ("[optim]\nlrr = 3", r"unknown config keys \['optim.lrr'\]"),
        ('steps = "ten"', "steps='ten' must be an integer"),
        ("steps = 1.5", "must be an integer"),
        ("optim = 3", "optim must be a table"),
        ("[optim]\nbetas = [0.9]", "must have 2 entries"),
        ("steps = ", "not valid TOML"),
    ],
)
def test_bad_recipes_raise(tmp_path, text, message):
    (tmp_path / "r.toml").write_text(text)
    with pytest.raises((ValueError, TypeError), match=message):
        load_config(Recipe, tmp_path / "r.toml")


def test_missing_recipe(tmp_path):
    with pytest.raises(FileNotFoundError, match="no recipe file"):
        load_config(Recipe, tmp_path / "nope.toml")
