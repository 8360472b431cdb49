"""Weights that ship inside the package (the toy world models), and where to find them."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent


def bundled_models() -> dict[str, str]:
    """Name -> folder of every bundled model folder that exists (a folder holding a config.json)."""
    found = {}
    for cfg in sorted(ASSETS.glob("*/*.json")):
        found.setdefault(cfg.parent.name, str(cfg.parent))
    return found or {"(none yet)": str(ASSETS)}


def asset_dir(name: str) -> Path:
    """Folder of a bundled model, with an error listing what exists when it is missing."""
    path = ASSETS / name
    if not path.is_dir():
        raise FileNotFoundError(f"no bundled model {name!r} in {ASSETS}; have: {sorted(bundled_models())}")
    return path
