"""The high-res patches a highres call reads, cut from the normalised pixels where it needs them.

Patch p (global position: scale-major raster order over the high-res scales, the index space
of `positions`) at scale s, row r, col c is rows r*14..r*14+13 and columns c*14..c*14+13 of
`separable_bicubic_resize(pixels, s)`, flattened (c, kh, kw) as `image_to_patches` does. Those
14 x 14 output pixels read 4 bicubic taps each (`cubic_taps`): 56 source rows and 56 source
columns. `window_patches` gathers that (3,56,56) window of each patch and applies the same
height-then-width `four_taps` arithmetic as the full resize, so its values are the full
resize's bit for bit; a scale that is the input size is the identity there too (a plain 14 x 14
crop). No full high-res image and no table of every patch (P x 588: 196 MiB fp32 per 4K image)
is ever made.

The same code runs on numpy arrays (the onnxruntime / TensorRT paths, on the host) and torch
tensors (the torch paths, on their device); everything it indexes with is built once per
artifact (`PatchTaps`).
"""

from __future__ import annotations

import numpy as np

from .ps3 import cubic_taps, four_taps


class PatchTaps:
    """Per high-res scale: its global offset, grid, and for each patch row (= patch column, the
    images are square) the 56 source rows its taps read and their (14,4) weights."""

    def __init__(self, max_size: int, scales, patch_size: int):
        self.max_size, self.patch_size = int(max_size), int(patch_size)
        self.scales = tuple(int(s) for s in scales)
        self.grids = tuple(s // self.patch_size for s in self.scales)
        self.offsets = np.cumsum((0,) + tuple(g * g for g in self.grids))      # (len(scales)+1,)
        self.rows, self.weights = [], []
        p = self.patch_size
        for s, g in zip(self.scales, self.grids):
            if s == self.max_size:                     # the identity: rows r*14.. of the image itself
                self.rows.append(np.arange(s, dtype=np.int64).reshape(g, p))
                self.weights.append(None)
                continue
            rows, weights = cubic_taps(self.max_size, s)                          # (s,4)
            self.rows.append(rows.numpy().astype(np.int64).reshape(g, 4 * p))     # (g,56), (kh, tap) order
            self.weights.append(weights.numpy().reshape(g, p, 4))                 # (g,14,4)
        self._on = {}

    @classmethod
    def of(cls, cfg) -> "PatchTaps":
        return cls(cfg.max_size, cfg.scales[1:], cfg.patch_size)

    def on(self, device):
        """The rows and weights as torch tensors on `device`, made once."""
        import torch

        key = str(device)
        if key not in self._on:
            self._on[key] = ([torch.as_tensor(r, device=device) for r in self.rows],
                             [None if w is None else torch.as_tensor(w, device=device) for w in self.weights])
        return self._on[key]

    def scale_of(self, positions: np.ndarray) -> np.ndarray:
        """(n,) global positions -> (n,) the index of their high-res scale."""
        return np.searchsorted(self.offsets, positions, side="right") - 1


def window_patches(pixels, images, local, taps: PatchTaps, k: int):
    """pixels (B,3,S,S) float32, images (n,) and local (n,) integer (positions within scale k,
    raster order) -> (n,588) patches of scale k. numpy in, numpy out; torch in, torch out."""
    p, g = taps.patch_size, taps.grids[k]
    r, c = local // g, local % g
    n = len(local)
    if isinstance(pixels, np.ndarray):
        weights = taps.weights[k]
        if weights is None:            # the identity scale: whole 14-value runs of a (B,3,g,14,g,14) view
            B, C = pixels.shape[:2]
            view = np.ascontiguousarray(pixels).reshape(B, C, g, p, g, p)
            return view[images, :, r, :, c, :].reshape(n, 3 * p * p)
        # one flat int32 index per window value (B <= 50 keeps B*3*S*S under 2^31): numpy's take
        # is several times quicker than a 4-array fancy index here
        S = pixels.shape[-1]
        rows = taps.rows[k].astype(np.int32)
        start = images.astype(np.int32)[:, None] * np.int32(pixels.shape[1] * S * S) + rows[r] * np.int32(S)
        plane = np.arange(pixels.shape[1], dtype=np.int32) * np.int32(S * S)
        index = start[:, None, :, None] + plane[None, :, None, None] + rows[c][:, None, None, :]
        window = np.take(np.ascontiguousarray(pixels).reshape(-1), index)         # (n,3,56,56)
    else:
        import torch

        rows, weights = (t[k] for t in taps.on(pixels.device))
        channel = torch.arange(pixels.shape[1], device=pixels.device)
        window = pixels[images[:, None, None, None], channel[None, :, None, None],
                        rows[r][:, None, :, None], rows[c][:, None, None, :]]    # (n,3,56,56)
        if weights is None:                                                 # the identity scale
            return window.reshape(n, 3 * p * p)
    # height: output row kh of the patch = four_taps of its 4 source rows, for each of 56 columns
    x = window.reshape(n, 3, p, 4, 4 * p)                                   # (n,3,14,4,56)
    x = four_taps([x[:, :, :, a] for a in range(4)], _tap_major(weights[r])[:, :, None, :, None])   # (n,3,14,56)
    # width: output col kw = four_taps of its 4 source columns
    x = x.reshape(n, 3, p, p, 4)                                            # (n,3,14,14,4)
    x = four_taps([x[..., a] for a in range(4)], _tap_major(weights[c])[:, :, None, None, :])   # (n,3,14,14)
    return x.reshape(n, 3 * p * p)


def _tap_major(w):
    """(n,14,4) weights -> (n,4,14): four_taps takes tap a as [:, a]."""
    return w.transpose(0, 2, 1) if isinstance(w, np.ndarray) else w.transpose(1, 2)


def gather_patches(pixels, images, positions, taps: PatchTaps, chunk: int):
    """pixels (B,3,S,S) float32; images and positions (n,) integer (global positions, any mix
    of scales) -> (n,588) float32 patches, `chunk` patches' windows at a time (a window is 9408
    values, 37 KiB fp32)."""
    images, positions = np.asarray(images).reshape(-1), np.asarray(positions).reshape(-1)
    out = np.empty((len(positions), 3 * taps.patch_size ** 2), dtype=pixels.dtype)
    scale = taps.scale_of(positions)
    for k in np.unique(scale).tolist():
        where = np.nonzero(scale == k)[0]
        for a in range(0, len(where), chunk):
            idx = where[a: a + chunk]
            out[idx] = window_patches(pixels, images[idx].astype(np.int64),
                                      positions[idx].astype(np.int64) - taps.offsets[k], taps, k)
    return out
