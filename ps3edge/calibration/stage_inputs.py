"""Calibration samples: each stage's inputs as the FP32 pipeline produces them, per image.

The highres stage is calibrated on what it will really see: for each image the FP32 lowres and
selector stages run, the planner picks the look-close steps, and a few of those steps (spread
from the first to the last of the default budget) become calibration samples - real patches,
their positions and that image's K/V cache. Everything is computed lazily, one image at a time
(a 4K image's K/V cache alone is 181 MB), so the sample count is bounded by time, not memory.
It runs the runtime's pipeline, so it belongs to the calibration workflow (with calibrate.py),
not to data.py below the runtime.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from .. import defaults
from ..model.patches import gather_patches
from ..runtime.batching import patch_taps
from ..runtime.planning import LookCloseSettings, plan, resolve
from ..runtime.preprocess import open_image
from .data import spread


class StageInputs:
    """Per image, the FP32 pipeline's inputs of each stage (computed on demand, last one cached)."""

    def __init__(self, pipeline, images: list[Path], settings: LookCloseSettings | None = None,
                 highres_steps: int = defaults.CALIBRATION_HIGHRES_STEPS):
        self.pipeline = pipeline
        self.images = list(images)
        steps = pipeline.manifest.look_close_defaults.num_look_close
        self.settings = settings or LookCloseSettings(
            num_look_close=defaults.DEFAULT_NUM_LOOK_CLOSE if steps is None else steps)
        self.schedule = resolve(self.settings, pipeline.geometry)      # every image's plan is cut by it
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
            low["plan"] = plan(prob, self.schedule, self.pipeline.geometry)
            self._cached = (i, low)
        return self._cached[1]

    def lowres_feed(self, i: int) -> dict:
        return {"pixels": self.pixels(i)}

    def highres_feeds(self) -> list[Callable[[], dict]]:
        """One callable per sample: (image, step) pairs, `highres_steps` steps per image."""
        steps = self.schedule.steps
        return [(lambda i=i, t=t: self.highres_feed(i, t))
                for i in range(len(self.images)) for t in spread(steps, self.highres_steps)]

    def highres_feed(self, i: int, t: int) -> dict:
        low = self._lowres(i)
        pos = low["plan"].step_positions(self.pipeline.geometry, t)[None]          # (1,N) int32
        patches = gather_patches(low["pixels"], np.zeros(pos.size, np.int64), pos.reshape(-1),
                                 patch_taps(low["pixels"].shape[-1], tuple(self.pipeline.geometry.highres_grids)),
                                 defaults.PATCH_WINDOW_CHUNK)
        return {"patches": patches.reshape(*pos.shape, -1), "positions": pos, "step_image": np.zeros(1, np.int32),
                "kv_cache": low["kv_cache"]}

    def lowres_feeds(self) -> list[Callable[[], dict]]:
        return [(lambda i=i: self.lowres_feed(i)) for i in range(len(self.images))]
