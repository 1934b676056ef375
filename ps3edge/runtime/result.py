"""What one image's look-close pass gives back: `LookCloseResult`, a typed record.

    result.features            (1, tokens, C) float32: [low-res tokens ; high-res tokens, scale-major]
    result.prob                (G0, G0) selection probability (27 x 27)
    result.selection_maps      {scale: (g, g) uint8}, 1 where a high-res patch was encoded
    result.tokens_each_scale   {"lowres": 729, "756": ..., "1512": ...}
    result.timings_ms          the pass's stage times (a batch's images share them)
    result.settings            the look-close settings it ran with
    result.memory_mib          peak memory per stage, when the pipeline measured it (memory.py)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .planning import LookCloseSettings, Plan


@dataclass
class LookCloseResult:
    features: np.ndarray                 # (1, tokens, C) float32
    layer: int                           # the block the features come from (0-based)
    prob: np.ndarray                     # (G0, G0) selection probability
    plan: Plan
    scales: tuple[int, ...]              # the high-res scales, matching plan.selection_maps
    timings_ms: dict = field(default_factory=dict)
    highres_calls: list = field(default_factory=list)   # (T, N) of each highres call of its pass
    batch: int = 1                       # images in the pass that produced it (timings are the pass's)
    settings: LookCloseSettings = field(default_factory=LookCloseSettings)   # what it ran with
    memory_mib: dict = field(default_factory=dict)      # {"host": {stage: MiB}, "cuda": ...} when measured

    @property
    def tokens_each_scale(self) -> dict[str, int]:
        counts = {"lowres": self.features.shape[1] - self.plan.num_tokens}
        counts.update({str(s): n for s, n in zip(self.scales, self.plan.tokens_each_scale())})
        return counts

    @property
    def selection_maps(self) -> dict[int, np.ndarray]:
        """scale -> (g, g) uint8 map of the high-res patches encoded at that scale, all steps."""
        return dict(zip(self.scales, self.plan.selection_maps))

    @property
    def num_steps(self) -> int:
        """Look-close steps the pass ran."""
        return len(self.plan.steps)
