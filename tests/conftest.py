"""Shared fixtures: exported tiny artifacts, PS3 and VILA-HD (once per test session), small test images,
and the runner for the `ps3edge` command line (`cli`, `clean_env`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ps3edge.exporter.onnx_export import export

LOOK_CLOSE_VARS = ("NUM_LOOK_CLOSE", "NUM_TOKEN_LOOK_CLOSE", "SELECT_NUM_EACH_SCALE", "LOOK_CLOSE_MODE",
                   "SMOOTH_SELECTION_PROB")
SCRIPT = Path(sys.executable).with_name("ps3edge")


def clean_env(columns: str | None = "200", **extra: str) -> dict:
    """os.environ without the look-close variables (so the developer's shell cannot leak in), COLUMNS set to
    `columns` (rich wraps tables at 80 columns when not on a terminal; None leaves COLUMNS as it is), and `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in LOOK_CLOSE_VARS}
    if columns is not None:
        env["COLUMNS"] = columns
    env.update(extra)
    return env


def cli(*args, env: dict | None = None, cwd=None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the installed console script (or `python -m ps3edge.cli` where it is not installed); env defaults
    to clean_env()."""
    command = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "ps3edge.cli"]
    return subprocess.run(command + [str(a) for a in args], env=clean_env() if env is None else env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    """preset name -> exported artifact directory (ps3-tiny and ps3-tiny-4k, seed 0)."""
    cache = {}

    def get(preset: str = "ps3-tiny"):
        if preset not in cache:
            out = tmp_path_factory.mktemp(preset) / "artifacts"
            export(preset, out)
            cache[preset] = out
        return cache[preset]

    return get


@pytest.fixture(scope="session")
def vila_art(tmp_path_factory):
    """The exported vila-hd-tiny artifact (read-only: tests that change it work on a copy)."""
    from ps3edge.llm.export import export_vila

    out = tmp_path_factory.mktemp("vila") / "art"
    export_vila("vila-hd-tiny", out)
    return out


def random_image(width=320, height=240, seed=0, mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    rgb = (rng.random((height, width, 3)) * 255).astype(np.uint8)
    # smooth structure as well as noise, so the selector's ranking is not flat
    yy, xx = np.mgrid[0:height, 0:width]
    rgb[..., 0] = ((np.sin(xx / 17.0 + seed) + 1) * 127).astype(np.uint8)
    img = Image.fromarray(rgb, "RGB")
    return img if mode == "RGB" else img.convert(mode)


@pytest.fixture
def image():
    return random_image()


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "input.png"
    random_image().save(path)
    return path
