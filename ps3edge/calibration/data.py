"""Calibration and evaluation data: images from a folder, through the runtime's own
preprocessing, and the inputs of every stage as the FP32 pipeline produces them.

The highres stage is calibrated on what it will really see: for each image the FP32 lowres and
selector stages run, the planner picks the look-close steps, and a few of those steps (spread
from the first to the last of the default budget) become calibration samples - real patches,
their positions and that image's K/V cache. Everything is computed lazily, one image at a time
(a 4K image's K/V cache alone is 181 MB), so the sample count is bounded by time, not memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw
from onnxruntime.quantization import CalibrationDataReader

from .. import defaults
from ..errors import Ps3EdgeError
from ..runtime.planning import LookCloseSettings, plan, resolve_steps
from ..runtime.preprocess import open_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm")


def image_files(folder, limit: int | None = None, what: str = "image folder") -> list[Path]:
    """The images of `folder` (not recursive), sorted by name; at most `limit`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise Ps3EdgeError(f"{what} not found: {folder}")
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


class StageInputs:
    """Per image, the FP32 pipeline's inputs of each stage (computed on demand, last one cached)."""

    def __init__(self, pipeline, images: list[Path], settings: LookCloseSettings | None = None,
                 highres_steps: int = defaults.CALIBRATION_HIGHRES_STEPS):
        self.pipeline = pipeline
        self.images = list(images)
        steps = pipeline.manifest.look_close_defaults.num_look_close
        self.settings = settings or LookCloseSettings(
            num_look_close=defaults.DEFAULT_NUM_LOOK_CLOSE if steps is None else steps)
        self.highres_steps = highres_steps
        self._cached: tuple[int, dict] | None = None

    def pixels(self, i: int) -> np.ndarray:
        return self.pipeline.pixels(open_image(self.images[i]))

    def _lowres(self, i: int) -> dict:
        if self._cached is None or self._cached[0] != i:
            self._cached = None                     # free the previous image's K/V first
            low, _ = self.pipeline.run_lowres(self.pixels(i))
            prob = self.pipeline.stages["selector"].infer({
                "selection_features": low["selection_features"], "conv_features": low["conv_features"],
                "prompt": self.pipeline.prior_prompt.astype(np.float32)})["prob"][0]
            low["plan"] = plan(prob, self.settings, self.pipeline.geometry)
            self._cached = (i, low)
        return self._cached[1]

    def lowres_feed(self, i: int) -> dict:
        return {"pixels": self.pixels(i)}

    def highres_feeds(self) -> list[Callable[[], dict]]:
        """One callable per sample: (image, step) pairs, `highres_steps` steps per image."""
        steps = len(resolve_steps(self.settings, self.pipeline.geometry)[1])
        return [(lambda i=i, t=t: self.highres_feed(i, t))
                for i in range(len(self.images)) for t in spread(steps, self.highres_steps)]

    def highres_feed(self, i: int, t: int) -> dict:
        low = self._lowres(i)
        pos = low["plan"].step_positions(self.pipeline.geometry, t)[None]          # (1,N) int32
        return {"patches": low["highres_patches"][0][pos], "positions": pos, "kv_cache": low["kv_cache"]}

    def lowres_feeds(self) -> list[Callable[[], dict]]:
        return [(lambda i=i: self.lowres_feed(i)) for i in range(len(self.images))]


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
