"""The `diagvid` command line: parse, load, call the library. No logic of its own."""

from __future__ import annotations

import json
import platform

import typer
from rich.console import Console

import diagvid

app = typer.Typer(
    help="Real-time streaming video generation with Diagonal Distillation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """Real-time streaming video generation with Diagonal Distillation."""


@app.command()
def info(as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON.")) -> None:
    """Version, torch, device and where the bundled weights are."""
    import torch

    from diagvid.assets import bundled_models

    cuda = torch.cuda.is_available()
    data = {
        "diagvid": diagvid.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "bundled": bundled_models(),
    }
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    for key, value in data.items():
        if key == "bundled":
            console.print("[bold]bundled weights[/bold]:")
            for name, where in value.items():
                console.print(f"  {name}: {where}")
        else:
            console.print(f"[bold]{key}[/bold]: {value}")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
