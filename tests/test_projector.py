"""VILA-HD's projector: 2x2 space-to-channel order, full-cell selection, token counts, ONNX export."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from ps3edge.exporter.onnx_export import export_projector
from ps3edge.model.projector import full_cells, projector_cells, random_projector, space_to_channel
from ps3edge.runtime.lookclose import Pipeline
from ps3edge.runtime.planning import settings_from_env


def reference_cells(grid: np.ndarray) -> np.ndarray:
    """Cell (i, j) = [x(2i,2j), x(2i,2j+1), x(2i+1,2j), x(2i+1,2j+1)], zeros beyond the grid."""
    g, _, C = grid.shape
    h = (g + 1) // 2
    out = np.zeros((h, h, 4 * C), dtype=grid.dtype)
    for i in range(h):
        for j in range(h):
            for k, (di, dj) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
                r, c = 2 * i + di, 2 * j + dj
                if r < g and c < g:
                    out[i, j, k * C:(k + 1) * C] = grid[r, c]
    return out


@pytest.mark.parametrize("g", [2, 5, 27, 54])
def test_space_to_channel_order_and_padding(g):
    grid = np.random.default_rng(g).standard_normal((g, g, 3)).astype(np.float32)
    assert np.array_equal(space_to_channel(grid), reference_cells(grid))


def test_full_cells_needs_all_four_patches_and_padding_never_counts():
    m = np.zeros((5, 5), dtype=np.uint8)
    m[0:2, 0:2] = 1          # a full cell
    m[2:4, 0:1] = 1          # half a cell
    m[4, 4] = 1              # the corner cell is 3/4 padding
    cells = full_cells(m)
    assert cells.shape == (3, 3)
    assert cells.tolist() == [[True, False, False], [False, False, False], [False, False, False]]


@pytest.mark.parametrize("grids,expected", [
    ((27, 54, 108), 196 + 729 + 2916),            # PS3-1.5K, every patch selected: 3841
    ((27, 54, 108, 270), 196 + 729 + 2916 + 18225),
])
def test_token_counts_with_every_patch_selected(grids, expected):
    C = 4
    tokens = sum(g * g for g in grids)
    feats = np.random.default_rng(0).standard_normal((tokens, C)).astype(np.float32)
    maps = [np.ones((g, g), dtype=np.uint8) for g in grids[1:]]
    cells, counts = projector_cells(feats, maps, grids[0])
    assert cells.shape == (expected, 4 * C)
    assert counts["lowres"] == 196
    assert sum(counts.values()) == expected


def test_cells_of_a_real_run_follow_the_selection(artifacts, image):
    result = Pipeline(artifacts("ps3-tiny"), "torch", device="cpu").run(image, settings_from_env({}, num_look_close=1, mode="after_image"))
    feats = result.features[0]
    cells, counts = projector_cells(feats, result.plan.selection_maps, 27)
    for m, (key, n) in zip(result.plan.selection_maps, list(counts.items())[1:]):
        g = m.shape[0]
        expected = sum(m[2 * i:2 * i + 2, 2 * j:2 * j + 2].all() for i in range(g // 2) for j in range(g // 2))
        assert n == expected
    # the first high-res cell is made of the features of its four patches, found by position
    m = result.plan.selection_maps[0]
    i, j = map(int, np.argwhere(full_cells(m))[0])
    order = np.flatnonzero(m.reshape(-1))                          # raster positions of the tokens
    def token(r, c):
        return feats[729 + int(np.searchsorted(order, r * m.shape[0] + c))]
    expected = np.concatenate([token(2 * i, 2 * j), token(2 * i, 2 * j + 1),
                               token(2 * i + 1, 2 * j), token(2 * i + 1, 2 * j + 1)])
    assert np.array_equal(cells[196], expected)


def test_projector_math_and_onnx_export(tmp_path):
    proj = random_projector(64, 48, seed=1)
    x = torch.randn(10, 256, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        manual = F.linear(F.gelu(F.linear(F.layer_norm(x, (256,), proj.layers["1"].weight, proj.layers["1"].bias),
                                          proj.layers["2"].weight, proj.layers["2"].bias)),
                          proj.layers["4"].weight, proj.layers["4"].bias)
        assert torch.allclose(proj(x), manual, atol=1e-6)
    path = export_projector(proj, tmp_path / "projector.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for m in (1, 196, 3841):                                      # dynamic cell count
        cells = np.random.default_rng(m).standard_normal((m, 256)).astype(np.float32)
        (out,) = sess.run(None, {"cells": cells})
        with torch.no_grad():
            ref = proj(torch.from_numpy(cells)).numpy()
        assert out.shape == (m, 48)
        assert np.abs(out - ref).max() <= 1e-5
    assert not list(tmp_path.glob(".*"))                          # no staging left behind
