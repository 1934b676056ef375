"""Reusing a source's previous result for its next frame: whole frames that did not change, and
the high-res patches that did not.

The rule, per frame of a source (the code is exactly this):

    difference   the largest absolute difference of any value, in 0-255 levels (the normalised
                 pixels mapped back through the manifest's mean and std), between two frames'
                 pixels as a stage sees them: the 378 x 378 low-res view the lowres stage
                 makes (the official bicubic resize of the preprocessed frame; the exported
                 stage's gather form of it differs by ~1e-6) for a whole frame; a high-
                 res patch's 588 values at its own scale (as the highres stage is fed them,
                 model/patches.py) for a patch. The largest, not the mean: a small object that moves is a change
                 however still the rest of the frame is.
    full         the source's first frame, and any frame with `refresh - 1` frames since the
                 last full one (so at least one frame in every `refresh` is computed whole; the
                 refresh frames are the normal path's results, bit-identical for a batch of one)
    reused       else, a frame whose low-res view differs from that of the last computed frame
                 by at most `threshold`: the last computed result itself, nothing run. The
                 reference is the last computed frame, not the last frame seen, so a slow drift
                 of many small changes cannot add up unnoticed.
    partial      else (with patch reuse on): lowres and selector run on the frame, so the
                 low-res tokens and the selection are the frame's own; of the patches its plan
                 takes, those the previous result has features of and whose pixels differ by at
                 most `threshold` from the pixels those features were computed from keep those
                 features; only the others are encoded, each step's changed patches as one row
                 (Pipeline.run_known). The approximation, the user's to accept or not: a kept
                 patch's features attended to an earlier frame's low-res K/V cache and to that
                 step's patches then; an encoded patch attends to the step's encoded patches
                 only. benchmarks/stream_reuse.py measures what that costs.
    computed     with patch reuse off, a changed frame is computed whole.

What a source keeps between frames: the last computed frame's low-res view (3 x 378 x 378
float32), the normalised pixels of the patches its result encoded (or kept), as float16 (n x
588 for its n high-res tokens: 18 MiB for 6 steps of 2560; float16 steps there are at most 1/16
of a level, so a difference under that is no change) and its result. A patch its result does
not hold has no features to reuse, so its pixels are not kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .. import defaults
from ..errors import Ps3EdgeError
from ..model.patches import gather_patches
from ..model.ps3 import bicubic_resize
from .batching import patch_taps
from .planning import LookCloseSettings
from .result import LookCloseResult
from .timing import StageTimes

COMPUTED, PARTIAL, REUSED = "computed", "partial", "reused"


@dataclass
class Memory:
    """What a source's last computed frame left (the module docstring)."""
    view: np.ndarray                  # (3,378,378) float32 levels
    positions: np.ndarray             # (n,) sorted: the high-res patches its result holds
    patches: np.ndarray               # (n,588) float16 levels of the pixels their features are of
    result: LookCloseResult
    since_full: int = 0               # frames since the last full computation


@dataclass
class Outcome:
    """How one frame's result was made."""
    result: LookCloseResult
    status: str                       # computed, partial or reused
    encoded_patches: int              # high-res patches the highres stage ran for this frame
    reused_patches: int               # high-res patches whose features came from the previous frame
    difference: Optional[float]       # the low-res view's difference to the reference (None: first frame)


def check_reuse(threshold: float, refresh: int) -> None:
    if not (threshold >= 0 and np.isfinite(threshold)):
        raise Ps3EdgeError(f"--reuse-threshold must be a number of levels (0-255) of 0 or more, got {threshold}")
    if int(refresh) != refresh or refresh < 1:
        raise Ps3EdgeError(f"--refresh must be a whole number of frames of 1 or more, got {refresh}")


class FrameReuse:
    """Frames of numbered sources through a pipeline, reusing as the module docstring says.

    patches: reuse unchanged high-res patches too (else only whole frames)."""

    def __init__(self, pipeline, threshold: float = 0.0, refresh: int = 10, patches: bool = True):
        check_reuse(threshold, refresh)
        self.pipeline, self.threshold, self.refresh, self.patches = pipeline, float(threshold), int(refresh), patches
        # one level of each channel in normalised units: a difference is measured in levels
        self._level = 1.0 / (np.asarray(pipeline.manifest.preprocessing.std, np.float32) * 255.0)
        self._lowres = pipeline.cfg.scales[0]
        self.memory: dict = {}

    def forget(self, source) -> None:
        """The source's next frame is computed whole (e.g. after it reconnected)."""
        self.memory.pop(source, None)

    # --- the pixels compared ----------------------------------------------------------------------
    def lowres_view(self, pixels: np.ndarray) -> np.ndarray:
        """(B,3,S,S) normalised -> (B,3,378,378) normalised: what the lowres stage's resize gives."""
        with torch.inference_mode():
            return bicubic_resize(torch.from_numpy(np.ascontiguousarray(pixels)), self._lowres).numpy()

    def view_difference(self, a: np.ndarray, b: np.ndarray) -> float:
        """Largest difference of two (3,h,w) normalised views, in levels."""
        return float((np.abs(a - b).reshape(3, -1).max(axis=1) / self._level).max())

    def patch_levels(self, pixels: np.ndarray, image: int, positions: np.ndarray) -> np.ndarray:
        """(n,) positions of image `image` of the (B,3,S,S) pixels -> (n,588) float16: the
        patches there as the highres stage is fed them."""
        taps = patch_taps(pixels.shape[-1], tuple(self.pipeline.geometry.highres_grids))
        return gather_patches(pixels, np.full(len(positions), image), positions, taps,
                              defaults.PATCH_WINDOW_CHUNK).astype(np.float16)

    def same_patches(self, now: np.ndarray, before: np.ndarray) -> np.ndarray:
        """(n,588) float16 patches now and before -> (n,) bool: no value moved more than the threshold."""
        if self.threshold == 0:                       # identical: the same bits (and far quicker)
            return (now.view(np.uint16) == before.view(np.uint16)).all(axis=1)
        with torch.inference_mode():                  # torch widens float16 far faster than numpy
            diff = (torch.from_numpy(now).float() - torch.from_numpy(before).float()).abs()
            diff = diff.reshape(len(now), 3, -1).amax(dim=2).numpy()
        return (diff / self._level <= self.threshold).all(axis=1)

    # --- a batch ------------------------------------------------------------------------------------
    def run(self, sources: list, images, settings: LookCloseSettings, layer: int) -> list[Outcome]:
        """One frame of each of `sources` (one entry each, no source twice) -> an Outcome each."""
        if len(set(sources)) != len(sources):
            raise ValueError("a batch holds at most one frame per source")
        p = self.pipeline
        times = StageTimes()
        with times.measure("preprocess"):
            pixels = p.pixels_batch(list(images))
        with times.measure("compare"):
            views = self.lowres_view(pixels)
        outcomes: list = [None] * len(sources)
        run, full = [], []
        for i, source in enumerate(sources):
            mem = self.memory.get(source)
            difference = None if mem is None else self.view_difference(views[i], mem.view)
            if mem is None or mem.since_full + 1 >= self.refresh:
                run.append((i, difference))
                full.append(True)
            elif difference <= self.threshold:
                mem.since_full += 1
                outcomes[i] = Outcome(mem.result, REUSED, 0, 0, difference)
            else:
                run.append((i, difference))
                full.append(not self.patches)
        if not run:
            return outcomes
        index = [i for i, _ in run]
        low, seconds = p.run_lowres(pixels[index])
        times.update({k: v for k, v in seconds.items() if k != "preprocess"})
        known = []
        p.layer_index(layer)                 # an unknown layer is refused before any comparing
        n0 = p.cfg.lowres_grid ** 2
        with times.measure("compare"):
            for k, (i, _) in enumerate(run):
                if full[k]:
                    known.append(None)
                    continue
                mem = self.memory[sources[i]]       # its features are in the order of mem.positions
                same = self.same_patches(self.patch_levels(low["pixels"], k, mem.positions), mem.patches)
                known.append((mem.positions[same].astype(np.int32), mem.result.features[0, n0:][same]))
        results = p.run_known(low, settings, known, layer, times.seconds)
        for k, ((i, difference), result) in enumerate(zip(run, results)):
            planned = result.plan.num_tokens
            source, mem = sources[i], self.memory.get(sources[i])
            positions = np.sort(_planned(result, p.geometry))
            with times.measure("compare"):
                patches = self.patch_levels(low["pixels"], k, positions)
            if known[k] is None:
                status, kept, since = COMPUTED, 0, 0
            else:
                kept_positions = known[k][0][np.isin(known[k][0], positions)]
                kept, status, since = len(kept_positions), PARTIAL, mem.since_full + 1
                # the pixels the kept features are of
                patches[np.searchsorted(positions, kept_positions)] = \
                    mem.patches[np.searchsorted(mem.positions, kept_positions)]
            self.memory[source] = Memory(views[i], positions, patches, result, since)
            outcomes[i] = Outcome(result, status, planned - kept, kept, difference)
        return outcomes


def _planned(result: LookCloseResult, geometry) -> np.ndarray:
    plan = result.plan
    return np.concatenate([plan.step_positions(geometry, t) for t in range(len(plan.steps))] or [np.zeros(0, np.int32)])
