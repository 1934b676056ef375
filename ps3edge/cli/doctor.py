"""The `doctor` command: what this machine can do (packages, CUDA / GPU, Jetson, which backends and
precisions work), as tables or one JSON object."""

from __future__ import annotations

import json

import typer

from . import views


def doctor(
    as_json: bool = typer.Option(False, "--json", help="Print everything as one JSON object."),
):
    """What this machine can do: packages, CUDA / GPU, Jetson, and which backends and precisions work."""
    from ..doctor import collect

    info = collect()
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        views.print_doctor(info)
