"""How far apart two sets of features are, and what a precision's tolerance accepts: the measure and
the features rule that every comparison in ps3edge uses.

Pure numpy over defaults.py, at the bottom layer, so that the export's check of its own stage files
(exporter/validate.py) and the stage-by-stage comparisons (compare.py: parity, calibration's
accuracy report) measure and judge features the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import defaults

DIFF_BLOCK_ELEMENTS = 1 << 18  # feature_diff's block: 2 MB per float64 copy


@dataclass(frozen=True)
class Tolerance:
    """What a precision must meet: defaults.TOLERANCES, SELECTION_MIN_IOU, SELECTION_NEAR_TIES_ACCEPTED."""
    max_abs: float
    min_cosine: float
    min_iou: float = 1.0
    near_ties: bool = False

    @classmethod
    def of(cls, precision: str) -> Tolerance:
        tol = defaults.TOLERANCES[precision]
        return cls(tol["max_abs"], tol["min_cosine"], defaults.SELECTION_MIN_IOU.get(precision, 1.0),
                   precision in defaults.SELECTION_NEAR_TIES_ACCEPTED)

    def accepts_features(self, max_abs: float, min_cosine: float) -> bool:
        """Whether features that differ by `max_abs` at most, with `min_cosine` the least per-token
        cosine (feature_diff's pair), are within this tolerance."""
        return max_abs <= self.max_abs and min_cosine >= self.min_cosine

    def to_dict(self) -> dict:
        return {"max_abs": self.max_abs, "min_cosine": self.min_cosine, "min_iou": self.min_iou,
                "near_ties": self.near_ties}


def feature_diff(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(max |a-b|, min cosine over tokens) for (..., tokens, C) arrays of equal shape, in float64.

    Computed over blocks of about DIFF_BLOCK_ELEMENTS values: every token's cosine is its own row's
    sums either way, so the figures are the same, while the float64 copies of a whole 4K
    highres_patches table (51 M values, 411 MB each) cost twice the time in memory traffic."""
    a = a.reshape(-1, a.shape[-1])
    b = b.reshape(-1, b.shape[-1])
    if a.shape != b.shape:
        return float("inf"), -1.0
    if a.size == 0:
        return 0.0, 1.0
    rows = max(1, DIFF_BLOCK_ELEMENTS // a.shape[-1])
    max_abs, min_cos = 0.0, np.inf
    for i in range(0, len(a), rows):
        x, y = a[i:i + rows].astype(np.float64), b[i:i + rows].astype(np.float64)
        nx, ny = np.linalg.norm(x, axis=-1), np.linalg.norm(y, axis=-1)
        # two all-zero rows are the same row: cosine 1, not the 0 the plain formula gives
        cos = np.where((nx == 0) & (ny == 0), 1.0, (x * y).sum(-1) / np.maximum(nx * ny, 1e-30))
        max_abs, min_cos = max(max_abs, float(np.abs(x - y).max())), min(min_cos, float(cos.min()))
    return max_abs, min_cos
