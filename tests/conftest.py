"""Shared fixtures: exported tiny artifacts, PS3 and VILA-HD (once per test session), and small test images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ps3edge.exporter.onnx_export import export


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
    from ps3edge.llm.pipeline import export_vila

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
