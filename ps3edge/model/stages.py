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
    """`for_export=True` writes the bicubic resizes as gathers (see separable_bicubic_resize)."""

    def __init__(self, model: PS3, returned_layers, for_export: bool = False):
        super().__init__()
        self.model = model
        self.returned_layers = normalize_layers(returned_layers, model.cfg.depth)
        self.resize = separable_bicubic_resize if for_export else bicubic_resize

    def forward(self, pixels):
        return self.model.lowres(pixels, self.returned_layers, resize=self.resize)


class SelectorStage(nn.Module):
    def __init__(self, model: PS3):
        super().__init__()
        self.model = model

    def forward(self, selection_features, conv_features, prompt):
        return self.model.selector(selection_features, conv_features, prompt)


class HighResStage(nn.Module):
    def __init__(self, model: PS3, returned_layers):
        super().__init__()
        self.model = model
        self.returned_layers = normalize_layers(returned_layers, model.cfg.depth)
        with torch.no_grad():
            self.register_buffer("position_table", model.highres_position_table(), persistent=False)

    def forward(self, patches, positions, step_image, kv_cache):
        return self.model.highres(patches, positions, step_image, kv_cache, self.position_table,
                                  self.returned_layers)
