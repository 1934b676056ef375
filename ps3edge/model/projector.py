"""VILA-HD's multimodal projector: PS3 features -> LLM embeddings (VILA `mlp_downsample`).

    2x2 space-to-channel downsample -> LayerNorm(4C) -> Linear(4C, H) -> GELU -> Linear(H, H)

The downsample stacks each 2x2 cell's four patch features along channels in the order
(2i,2j), (2i,2j+1), (2i+1,2j), (2i+1,2j+1); an odd grid is padded with zeros at the bottom and
right. Parameter names follow VILA's `mm_projector` (`layers.1` LayerNorm, `layers.2` and
`layers.4` Linear; `layers.0` is the parameter-free downsample, `layers.3` the GELU).

How PS3's token sequence becomes the image's LLM sequence (VILA-HD):
- low-res: the 27x27 map -> 14x14 = 196 cells, all kept;
- high-res, per scale: the selected tokens scattered back onto the scale's grid; only the 2x2
  cells whose four patches were ALL selected are kept, in raster order;
- [196 low-res ; high-res cells by scale ; the newline embedding] is the image's sequence.
With every patch of PS3-1.5K selected that is 196 + 729 + 2916 = 3841 embeddings (+ newline).
"""

from __future__ import annotations

import numpy as np
import torch.nn as nn


class Projector(nn.Module):
    def __init__(self, vision_width: int, llm_width: int):
        super().__init__()
        self.vision_width = vision_width
        self.llm_width = llm_width
        self.layers = nn.ModuleDict({
            "1": nn.LayerNorm(4 * vision_width),
            "2": nn.Linear(4 * vision_width, llm_width),
            "4": nn.Linear(llm_width, llm_width),
        })

    def forward(self, cells):                        # (M, 4C) -> (M, H)
        x = self.layers["1"](cells)
        x = nn.functional.gelu(self.layers["2"](x))
        return self.layers["4"](x)


def space_to_channel(grid: np.ndarray) -> np.ndarray:
    """(g, g, C) -> (ceil(g/2), ceil(g/2), 4C), channels (2i,2j), (2i,2j+1), (2i+1,2j), (2i+1,2j+1)."""
    g, _, C = grid.shape
    if g % 2:
        grid = np.pad(grid, ((0, 1), (0, 1), (0, 0)))         # zeros at bottom / right
        g += 1
    h = g // 2
    x = grid.reshape(h, 2, h, 2, C)                             # (i, di, j, dj, C)
    return x.transpose(0, 2, 1, 3, 4).reshape(h, h, 4 * C)     # di-major, then dj


def full_cells(selection_map: np.ndarray) -> np.ndarray:
    """(g, g) 0/1 -> (ceil(g/2), ceil(g/2)) bool: the cells whose four patches were all selected."""
    m = selection_map.astype(bool)
    if m.shape[0] % 2:
        m = np.pad(m, ((0, 1), (0, 1)))                          # padding is never selected
    h = m.shape[0] // 2
    return m.reshape(h, 2, h, 2).all(axis=(1, 3))


def projector_cells(features: np.ndarray, selection_maps: list[np.ndarray], lowres_grid: int):
    """PS3 output (tokens, C) in the official order -> projector input (M, 4C) and counts.

    `selection_maps` are the cumulative per-scale maps of the run. Returns the cells in VILA-HD's
    order and a dict of how many came from the low-res map and from each high-res scale.
    """
    C = features.shape[-1]
    n0 = lowres_grid * lowres_grid
    parts = [space_to_channel(features[:n0].reshape(lowres_grid, lowres_grid, C)).reshape(-1, 4 * C)]
    counts = {"lowres": parts[0].shape[0]}
    offset = n0
    for m in selection_maps:
        g = m.shape[0]
        n = int(m.sum())
        grid = np.zeros((g * g, C), dtype=features.dtype)
        grid[np.flatnonzero(m.reshape(-1))] = features[offset: offset + n]   # raster order in, raster out
        offset += n
        keep = full_cells(m)
        cells = space_to_channel(grid.reshape(g, g, C))[keep]             # (k, 4C), raster order
        parts.append(cells)
        counts[str(g)] = int(keep.sum())
    if offset != features.shape[0]:
        raise ValueError(f"features hold {features.shape[0]} tokens but the maps account for {offset}")
    return np.concatenate(parts, axis=0), counts


def random_projector(vision_width: int, llm_width: int, seed: int = 0) -> Projector:
    from .weights import seeded_init_

    proj = Projector(vision_width, llm_width)
    seeded_init_(proj, seed)
    return proj.eval()
