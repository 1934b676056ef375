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
tensors and the image, and `"type": "frame"`.

With VILA-HD questions (`--ask`, `--alert`: ask.py) the stream also gives `AnswerRecord`s (one
per answer, `"type": "answer"`) and `AlertRecord`s (a yes / no answer's first value or its flip,
`"type": "alert"`); every record's `type` says which it is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import numpy as np

from ..runtime.result import LookCloseResult
from ..runtime.reuse import COMPUTED, PARTIAL, REUSED

__all__ = ["COMPUTED", "PARTIAL", "REUSED", "AlertRecord", "AnswerRecord", "FrameRecord"]


@dataclass
class FrameRecord:
    type: ClassVar[str] = "frame"
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
    arrival_mono: Optional[float] = field(default=None, repr=False)   # arrival on the monotonic clock (not in JSON)

    def to_json(self) -> dict:
        """The record as one JSON object, without tensors or pixels."""
        out = {"type": self.type,
               "source": self.source, "source_index": self.source_index, "frame": self.frame, "pts": self.pts,
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


@dataclass
class AnswerRecord:
    """One VILA-HD answer about a source's frame (ask.py). `kind`: "ask" or "alert"; `value`: an
    alert's answer read as yes / no / unknown (None for --ask). `latency_ms`: from the frame's
    arrival to the answer; `answer_ms`: the answer alone (VILA-HD, with its waits for PS3)."""
    type: ClassVar[str] = "answer"
    source: str
    source_index: int
    frame: int
    pts: Optional[float]
    arrival: float                     # the frame's arrival (wall clock, seconds)
    question: str
    kind: str
    answer: str
    value: Optional[str]
    round: int                         # the answer round (one per --every tick that ran)
    asked: float                       # when this answer began (wall clock)
    answer_time: float                 # when it was ready (wall clock)
    latency_ms: float
    answer_ms: float
    generated: int                     # tokens generated
    stop_reason: str
    image: Optional[np.ndarray] = field(default=None, repr=False)

    def to_json(self) -> dict:
        return {"type": self.type, "source": self.source, "source_index": self.source_index, "frame": self.frame,
                "pts": self.pts, "arrival": self.arrival, "question": self.question, "kind": self.kind,
                "answer": self.answer, "value": self.value, "round": self.round, "asked": self.asked,
                "answer_time": self.answer_time, "latency_ms": round(self.latency_ms, 3),
                "answer_ms": round(self.answer_ms, 3), "generated": self.generated, "stop_reason": self.stop_reason}

    def line(self) -> str:
        """What `ps3edge stream` prints on stdout: one line, the answer's blanks and newlines as single spaces."""
        question = json.dumps(self.question, ensure_ascii=False)
        return f"{self.source} frame {self.frame}: {question} -> {' '.join(self.answer.split())}"


@dataclass
class AlertRecord:
    """An --alert question's yes / no value for a source: its first known value (`initial`,
    `previous` None) or a flip from the previous known value."""
    type: ClassVar[str] = "alert"
    source: str
    source_index: int
    frame: int
    pts: Optional[float]
    question: str
    value: str
    previous: Optional[str]
    initial: bool
    answer_time: float

    def to_json(self) -> dict:
        return {"type": self.type, "source": self.source, "source_index": self.source_index, "frame": self.frame,
                "pts": self.pts, "question": self.question, "value": self.value, "previous": self.previous,
                "initial": self.initial, "answer_time": self.answer_time}

    def line(self) -> str:
        """What `ps3edge stream` prints on stderr."""
        change = f"is {self.value} (initial state)" if self.initial else f"{self.previous} -> {self.value}"
        return f"alert {self.source} frame {self.frame}: {json.dumps(self.question, ensure_ascii=False)} {change}"
