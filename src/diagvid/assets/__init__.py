"""Weights that ship inside the package (the toy world models), and where to find them."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent


def bundled_models() -> dict[str, str]:
    """Name (path under assets/) -> folder, for every bundled folder holding weights (*.safetensors)."""
    found = {}
    for weights in sorted(ASSETS.rglob("*.safetensors")):
        found.setdefault(str(weights.parent.relative_to(ASSETS)), str(weights.parent))
    return found or {"(none yet)": str(ASSETS)}


def asset_dir(name: str) -> Path:
    """Folder of a bundled model, with an error listing what exists when it is missing."""
    path = ASSETS / name
    if not path.is_dir():
        raise FileNotFoundError(f"no bundled model {name!r} in {ASSETS}; have: {sorted(bundled_models())}")
    return path
