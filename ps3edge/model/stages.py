"""The three exported stages as `nn.Module`s with tensor-only signatures.

The exporter traces these, and the `torch` runtime backend runs them, so both see one
definition. Each wraps a `PS3` and fixes the returned layers (and, for `highres`, the
per-scale position table that is baked in as a constant).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .ps3 import PS3, bicubic_resize, separable_bicubic_resize


def normalize_layers(layers, depth: int) -> tuple[int, ...]:
    """Negative layer indices count from the end, as in Python: -1 is the last block."""
    return tuple(l % depth for l in layers)


class LowResStage(nn.Module):
    """`for_export=True` writes the bicubic resizes as gathers (see separable_bicubic_resize) and
    stacks the K/V cache; otherwise (the torch runtime) the cache is filled in place."""

    def __init__(self, model: PS3, returned_layers, for_export: bool = False):
        super().__init__()
        self.model = model
        self.returned_layers = normalize_layers(returned_layers, model.cfg.depth)
        self.resize = separable_bicubic_resize if for_export else bicubic_resize
        self.kv_in_place = not for_export

    def forward(self, pixels):
        return self.model.lowres(pixels, self.returned_layers, resize=self.resize, kv_in_place=self.kv_in_place)


class SelectorStage(nn.Module):
    def __init__(self, model: PS3):
        super().__init__()
        self.model = model

    def forward(self, selection_features, conv_features, prompt):
        return self.model.selector(selection_features, conv_features, prompt)


class HighResStage(nn.Module):
    """`bake_positions=True` (export, compiled engines) holds the per-scale position table as a
    buffer, the constant an exported graph bakes in; False (the torch runtime) builds only the
    rows a call reads (PS3.highres_position_rows), so the table (4K: 385 MiB) is not held beside
    the residuals it is made of. Same values either way."""

    def __init__(self, model: PS3, returned_layers, bake_positions: bool = True):
        super().__init__()
        self.model = model
        self.returned_layers = normalize_layers(returned_layers, model.cfg.depth)
        with torch.no_grad():
            table = model.highres_position_table() if bake_positions else None
        self.register_buffer("position_table", table, persistent=False)

    def forward(self, patches, positions, step_image, kv_cache):
        return self.model.highres(patches, positions, step_image, kv_cache, self.position_table,
                                  self.returned_layers)
