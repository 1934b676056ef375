"""Calibration and evaluation data: the images of a folder, synthetic images, and the reader
that hands calibration samples to the quantizer one at a time (the samples themselves, each
stage's inputs as the FP32 pipeline produces them, come from stage_inputs.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw
from onnxruntime.quantization import CalibrationDataReader

from ..errors import Ps3EdgeError
from ..paths import expect_dir

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm")


def image_files(folder, limit: int | None = None, what: str = "image folder") -> list[Path]:
    """The images of `folder` (not recursive), sorted by name; at most `limit`."""
    folder = Path(folder)
    expect_dir(folder, what)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise Ps3EdgeError(f"{folder} holds no images ({' '.join(IMAGE_SUFFIXES)})")
    if limit is not None:
        if limit < 1:
            raise Ps3EdgeError(f"the number of samples must be at least 1, got {limit}")
        files = files[:limit]
    return files


def spread(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n), first and last included."""
    if n <= 0 or k <= 0:
        return []
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, min(k, n))})


class FeedReader(CalibrationDataReader):
    """onnxruntime's calibration reader over lazily made feeds; supports set_range, so the
    calibrator can take one sample at a time (CalibStridedMinMax) and never hold them all."""

    def __init__(self, feeds: list[Callable[[], dict]], progress: Callable[[str], None] | None = None,
                 label: str = "sample"):
        self.feeds = list(feeds)
        self.progress = progress or (lambda msg: None)
        self.label = label
        self._range = range(len(self.feeds))
        self._iter = iter(self._range)

    def __len__(self) -> int:
        return len(self.feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._range = range(start_index, min(end_index, len(self.feeds)))
        self._iter = iter(self._range)

    def rewind(self) -> None:
        self.set_range(0, len(self.feeds))

    def get_first(self) -> dict | None:
        """The first feed, without moving the iteration (NVIDIA Model Optimizer's readers have it,
        and its INT8 quantize calls it to find GEMV MatMuls)."""
        return self.feeds[0]() if self.feeds else None

    def get_next(self) -> dict | None:
        i = next(self._iter, None)
        if i is None:
            return None
        self.progress(f"{self.label} {i + 1}/{len(self.feeds)}")
        return self.feeds[i]()


def synthetic_image(seed: int) -> Image.Image:
    """A varied synthetic image (sizes, aspect ratios, smooth fields, shapes, noise) for tests and
    benchmarks: no real images ship with ps3edge."""
    rng = np.random.default_rng(seed)
    w, h = [(640, 480), (512, 512), (800, 450), (300, 600), (1024, 768)][seed % 5]
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    a, b, c = rng.uniform(2, 20, 3)
    rgb = np.stack([np.sin(a * xx + rng.uniform(0, 6)), np.cos(b * yy + c * xx), np.sin((a + b) * xx * yy)], -1)
    image = Image.fromarray(((rgb * 0.5 + 0.5) * 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 12))):
        x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        box = [x0, y0, x0 + int(rng.integers(10, w // 3)), y0 + int(rng.integers(10, h // 3))]
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    noisy = np.asarray(image, np.float32) + rng.normal(0, rng.uniform(0, 30), (h, w, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
