"""The high-res patches cut from the pixels (model/patches.py) are the full resize's patches bit
for bit, on numpy and torch, at every scale; no stage outputs a table of every patch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ps3edge import defaults
from ps3edge.artifact.manifest import load_manifest
from ps3edge.model.config import PRESETS
from ps3edge.model.patches import PatchTaps, gather_patches, window_patches
from ps3edge.model.ps3 import bicubic_resize, image_to_patches, separable_bicubic_resize
from ps3edge.runtime.batching import highres_feeds
from ps3edge.runtime.lookclose import Pipeline
from ps3edge.runtime.planning import LookCloseSettings


def full_table(pixels: torch.Tensor, cfg) -> np.ndarray:
    """Every high-res patch of every scale, as the lowres stage used to output it: (B,P,588)."""
    return torch.cat([image_to_patches(separable_bicubic_resize(pixels, s), cfg.patch_size)
                      for s in cfg.scales[1:]], dim=1).numpy()


@pytest.mark.parametrize("preset", ["ps3-tiny", "ps3-tiny-4k"])
def test_windowed_patches_equal_the_full_resize_at_every_scale(preset):
    cfg = PRESETS[preset]
    rng = np.random.default_rng(3)
    pixels = torch.from_numpy(rng.standard_normal((2, 3, cfg.max_size, cfg.max_size), dtype=np.float32))
    table = full_table(pixels, cfg)
    taps = PatchTaps.of(cfg)
    images, positions = [], []
    for k in range(len(cfg.scales) - 1):       # every scale, its corners and random positions
        lo, hi = int(taps.offsets[k]), int(taps.offsets[k + 1])
        g = taps.grids[k]
        pos = np.concatenate([[lo, lo + g - 1, hi - g, hi - 1], rng.integers(lo, hi, 300)])
        positions.append(pos)
        images.append(rng.integers(0, 2, len(pos)))
    images, positions = np.concatenate(images), np.concatenate(positions)
    want = table[images, positions]
    # numpy (the onnxruntime / TensorRT paths), in chunks smaller than a scale's share
    assert np.array_equal(gather_patches(pixels.numpy(), images, positions, taps, 97), want)
    # torch (the torch paths), scale by scale
    scale = taps.scale_of(positions)
    for k in range(len(cfg.scales) - 1):
        at = scale == k
        got = window_patches(pixels, torch.from_numpy(images[at]), torch.from_numpy(positions[at] - taps.offsets[k]),
                             taps, k)
        assert np.array_equal(got.numpy(), want[at]), k
    # no positions: an empty (0,588)
    assert gather_patches(pixels.numpy(), [], [], taps, 64).shape == (0, cfg.patch_dim)


def test_the_written_out_taps_keep_the_official_resize():
    """The 4-tap sum written out (for bit-identity across backends) still matches F.interpolate."""
    x = torch.randn(1, 3, 1512, 1512, generator=torch.Generator().manual_seed(0))
    for size in (378, 756):
        assert (separable_bicubic_resize(x, size) - bicubic_resize(x, size)).abs().max() < 1e-5


def test_the_lowres_stage_outputs_no_patch_table_and_the_feeds_match_the_old_table(artifacts):
    art = artifacts("ps3-tiny")
    manifest = load_manifest(art)
    assert [t.name for t in manifest.stages["lowres"].outputs] == [
        "lowres_features", "kv_cache", "selection_features", "conv_features"]
    assert manifest.schema_version == defaults.MANIFEST_SCHEMA_VERSION == 3
    with Pipeline(art) as pipe:
        rng = np.random.default_rng(5)
        pixels = rng.standard_normal((1, 3, pipe.cfg.max_size, pipe.cfg.max_size), dtype=np.float32)
        low, _ = pipe.run_lowres(pixels)
        assert low["pixels"] is pixels and set(low) == {"lowres_features", "kv_cache", "selection_features",
                                                        "conv_features", "pixels"}
        result = pipe.run_from_lowres(low, LookCloseSettings(num_look_close=2))
        table = full_table(torch.from_numpy(pixels), pipe.cfg)[0]
        for feed in highres_feeds(result.plan, low, pipe.geometry):
            assert feed["patches"].dtype == np.float32
            assert np.array_equal(feed["patches"], table[feed["positions"]])
