"""What the stream gives per processed frame: `FrameRecord`, a typed record, and its JSON line.

    record.source        the source's name (cam0, ... or the name given as NAME=...)
    record.frame         the frame's number among all its source gave (dropped ones included)
    record.pts           the stream's own timestamp of the frame, seconds (None where it has none)
    record.arrival       when the decoded frame reached its mailbox (wall clock, seconds)
    record.result_time   when its result was ready (wall clock, seconds)
    record.latency_ms    result - arrival (measured on the monotonic clock)
    record.status        "computed": this frame's own look-close pass; with reuse (runtime/reuse.py)
                         also "reused": the source's last computed result, nothing run, and
                         "partial": its own low-res pass and selection, the unchanged high-res
                         patches' features taken from the previous frame
    record.reused_patches / encoded_patches   with reuse: high-res patches taken / encoded
    record.deadline_ms / deadline_met / deadline_fits   with a deadline (streaming/deadline.py):
                         the deadline, latency_ms <= it, and whether the steps chosen were
                         predicted to fit (False: even the floor was predicted over it)
    record.steps         look-close steps run; record.tokens: tokens in its features
    record.result        the LookCloseResult; record.image: the decoded RGB frame (H, W, 3) uint8

`status` says how the result was made so that a result carried over from an earlier frame can
be told apart from a computed one; the JSON line (`to_json`) holds every field but the result's
tensors and the image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..runtime.result import LookCloseResult
from ..runtime.reuse import COMPUTED, PARTIAL, REUSED

__all__ = ["COMPUTED", "PARTIAL", "REUSED", "FrameRecord"]


@dataclass
class FrameRecord:
    source: str
    source_index: int                  # the source's place among the sources given
    frame: int
    pts: Optional[float]
    arrival: float
    result_time: float
    latency_ms: float
    status: str
    steps: int
    tokens: int
    step: int                          # the loop's step that ran it (frames of one step ran as one batch)
    batch: int                         # frames in that step
    width: int
    height: int
    result: Optional[LookCloseResult] = field(default=None, repr=False)
    image: Optional[np.ndarray] = field(default=None, repr=False)
    reused_patches: Optional[int] = None
    encoded_patches: Optional[int] = None
    deadline_ms: Optional[float] = None
    deadline_met: Optional[bool] = None
    deadline_fits: Optional[bool] = None

    def to_json(self) -> dict:
        """The record as one JSON object, without tensors or pixels."""
        out = {"source": self.source, "source_index": self.source_index, "frame": self.frame, "pts": self.pts,
               "arrival": self.arrival, "result_time": self.result_time,
               "latency_ms": round(self.latency_ms, 3), "status": self.status, "steps": self.steps,
               "tokens": self.tokens, "step": self.step, "batch": self.batch,
               "width": self.width, "height": self.height,
               "reused_patches": self.reused_patches, "encoded_patches": self.encoded_patches,
               "deadline_ms": self.deadline_ms, "deadline_met": self.deadline_met,
               "deadline_fits": self.deadline_fits}
        if self.result is not None:
            out["tokens_each_scale"] = self.result.tokens_each_scale
        return out
