"""VILA-HD questions on a stream: `--ask` answers about each source's newest processed frame every
`--every`, `--alert` says when a yes / no answer flips. One answer thread beside the frame loop.

The rules are stated here; the code is exactly them.

- One PS3. The artifact is a VILA-HD one; its PS3 pipeline (`VilaPipeline.ps3`) is the one the
  frame loop runs, through an Encoder over it, so one set of PS3 stages is in memory. The loop's
  step and each of an answer's two PS3 calls (the low-res pass; the selector and high-res steps)
  take turns on it through a first-come, first-served lock (`TurnLock`): a step waits for at most
  one of an answer's PS3 calls, and the answer's LLM work runs beside the loop. The turns hold on
  every backend: TensorRT's execution contexts and bound buffers, and each stage runner's last
  inference time, are not for two threads at once.
- One answer at a time. VILA-HD's LLM keeps one KV cache, so one thread answers.
- Schedule. Rounds are due at t0, t0 + every, t0 + 2 every, ..., t0 being when the first frame was
  processed. At a due time the thread takes, for each asked source, its newest processed frame
  not yet asked about, and asks it every question (sources in order; --ask, then --alert, each in
  flag order). A due time that passes while a round runs is skipped and counted, never queued:
  the next round is the first due time after the round ends. A due time with no new frame is idle.
  Answers never reach the decoders: they read processed frames, not the sources' mailboxes.
- End. When the stream ends by itself (duration, max frames, sources ended) the round running, and
  one already due, finish and give their records; no round starts after the end. A stop (Ctrl-C,
  SIGTERM, leaving the `with`, an error) abandons the answer running before its next PS3 call or
  LLM step (StoppableLLM), so it waits for one of those at most.
- Alerts. An answer's first word, without the punctuation around it, lower-cased, is `yes` or
  `no`; anything else (no word, "maybe", "yes/no") is `unknown`. Per source and question the first
  yes / no is the initial state (an AlertRecord with `initial`), and one that differs from the last
  yes / no is a flip. An unknown answer is recorded (the answer's `value`) and changes nothing.
- Sampling is greedy, so a frame's answer is `VilaPipeline.answer`'s on that frame, and an alert
  flips because the frame changed, not because of a draw.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np

from .. import defaults
from ..api import Encoder
from ..runtime.planning import LookCloseSettings
from .record import AlertRecord, AnswerRecord, FrameRecord

ASK, ALERT = "ask", "alert"
YES, NO, UNKNOWN = "yes", "no", "unknown"
_EDGES = re.compile(r"^\W+|\W+$")


def yes_no(answer: str) -> str:
    """An alert's answer -> yes, no or unknown (the module's rule)."""
    words = str(answer).split()
    word = _EDGES.sub("", words[0]).lower() if words else ""
    return word if word in (YES, NO) else UNKNOWN


@dataclass(frozen=True)
class Question:
    text: str
    kind: str                          # ask | alert
    max_new_tokens: int


class _Cancelled(Exception):
    """The stream stopped: the answer running is abandoned (raised at its next PS3 call or LLM step)."""


class TurnLock:
    """A lock given in the order it was asked for (a ticket lock), so the frame loop and the
    answer thread alternate when both wait; a waiter interrupted gives its turn up."""

    def __init__(self):
        self._cond = threading.Condition()
        self._next = self._serving = 0
        self._abandoned: set = set()

    def __enter__(self) -> None:
        with self._cond:
            ticket, self._next = self._next, self._next + 1
            try:
                self._cond.wait_for(lambda: self._serving == ticket)
            except BaseException:                # Ctrl-C while waiting: the turn must not be lost
                self._abandoned.add(ticket)
                self._advance()
                raise

    def __exit__(self, *exc) -> None:
        with self._cond:
            self._serving += 1
            self._advance()

    def _advance(self) -> None:
        while self._serving in self._abandoned:
            self._abandoned.discard(self._serving)
            self._serving += 1
        self._cond.notify_all()


class SharedPS3:
    """VilaPipeline's view of the one PS3 pipeline while it answers on a stream: every `run*`
    method (run_lowres, run_from_lowres, run_batch_from_lowres, ...: the calls that run stages)
    takes its turn with the frame loop's, unless the stream has stopped (then the answer is
    abandoned before the call); everything else is the pipeline's own."""

    def __init__(self, pipeline, turns: TurnLock, cancel: threading.Event):
        self._pipeline, self._turns, self._cancel = pipeline, turns, cancel

    def __getattr__(self, name):
        value = getattr(self._pipeline, name)
        if not (name == "run" or name.startswith("run_")) or not callable(value):
            return value
        if name == "run_batches":                         # a generator: its passes would run outside the turn
            raise AttributeError("run_batches is not shared on a stream; call run_batch per pass")

        def in_turn(*args, **kwargs):
            with self._turns:
                if self._cancel.is_set():
                    raise _Cancelled()
                return value(*args, **kwargs)
        return in_turn


class StoppableLLM:
    """VilaPipeline's LLM while it answers on a stream: each prefill and decode step first checks
    that the stream has not stopped, so a stop abandons an answer within one step, whatever text
    it is making; everything else is the LLM's own."""

    def __init__(self, llm, cancel: threading.Event):
        self._llm, self._cancel = llm, cancel

    def prefill(self, *args, **kwargs):
        if self._cancel.is_set():
            raise _Cancelled()
        return self._llm.prefill(*args, **kwargs)

    def decode(self, *args, **kwargs):
        if self._cancel.is_set():
            raise _Cancelled()
        return self._llm.decode(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._llm, name)


class Schedule:
    """The due times t0 + k * every of the module docstring; counts those a round let pass."""

    def __init__(self, every: float):
        self.every, self.origin, self.k, self.skipped = float(every), None, 0, 0

    def start(self, now: float) -> None:
        if self.origin is None:
            self.origin = now

    @property
    def due(self) -> Optional[float]:
        return None if self.origin is None else self.origin + self.k * self.every

    def _after(self, now: float) -> int:
        return math.floor((now - self.origin) / self.every) + 1      # the first due index later than now

    def ran(self, now: float, end: Optional[float] = None) -> int:
        """The round of the current due time ended at `now`: the due times after it up to now
        (and up to the stream's `end`) are skipped; the next is the first after now."""
        passed = self._after(now if end is None else min(now, end)) - 1
        missed = max(0, passed - self.k)
        self.skipped += missed
        self.k = max(self.k + 1, self._after(now))
        return missed

    def idle(self, now: float) -> None:
        """The current due time had nothing to ask about: on to the first after now."""
        self.k = max(self.k + 1, self._after(now))


class AlertState:
    """Per source and question, the last yes / no (the module's rule)."""

    def __init__(self):
        self._known: dict = {}

    def update(self, source: int, question: str, value: str) -> Optional[tuple]:
        """(previous, initial) where `value` is to be reported, else None."""
        if value not in (YES, NO):
            return None
        key = (source, question)
        previous = self._known.get(key)
        self._known[key] = value
        if previous is None:
            return None, True
        return (previous, False) if previous != value else None


class Asker:
    """The answer thread of a stream (the module docstring). The loop `offer`s each processed
    frame, and takes the answers' records with `drain` between its steps and `finish` at its end."""

    def __init__(self, vila, questions: Sequence[Question], *, every: float, settings: LookCloseSettings,
                 only: Optional[set] = None):
        self.vila, self.questions, self.settings, self.only = vila, tuple(questions), settings, only
        self.turns = TurnLock()
        self._cancel = threading.Event()
        self.pipeline = vila.ps3                         # the one PS3: the loop's Encoder is over it
        vila.ps3 = SharedPS3(self.pipeline, self.turns, self._cancel)   # and the answers' calls take turns on it
        self.llm = vila.llm
        vila.llm = StoppableLLM(self.llm, self._cancel)
        self.schedule = Schedule(every)
        self.alerts = AlertState()
        self.rounds = self.answers = self.idle = self.flips = self.unknown = 0
        self._answer_ms: deque = deque(maxlen=defaults.STREAM_LATENCY_WINDOW)
        self._cond = threading.Condition()
        self._newest: dict = {}                          # source index -> its newest processed frame not yet asked
        self._outbox: deque = deque()
        self._end: Optional[float] = None
        self._stop_by: Optional[float] = None
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="ps3edge-ask", daemon=True)
        self._started = False

    @property
    def every(self) -> float:
        return self.schedule.every

    @property
    def skipped(self) -> int:
        return self.schedule.skipped

    # --- the loop's side -------------------------------------------------------------------------
    def offer(self, record: FrameRecord) -> None:
        """A processed frame: its source's newest, for the next round."""
        if self.only is not None and record.source_index not in self.only:
            return
        with self._cond:
            self._newest[record.source_index] = record
            self.schedule.start(time.monotonic())
            if not self._started:
                self._started = True
                self._thread.start()
            self._cond.notify_all()

    def drain(self) -> Iterator:
        """The records ready now; an error of the answer thread is raised here, in the loop's thread."""
        with self._cond:
            ready, error = list(self._outbox), self._error
            self._outbox.clear()
            self._error = None
        yield from ready
        if error is not None:
            raise error

    def finish(self) -> Iterator:
        """The stream ended by itself: the round running and one already due finish; their records."""
        with self._cond:
            self._end = time.monotonic()
            self._cond.notify_all()
        while self._started and self._thread.is_alive():
            yield from self.drain()
            self._thread.join(0.1)
        yield from self.drain()

    def stop(self, wait: float = defaults.STREAM_ASK_STOP_WAIT_S) -> None:
        """Abandon the answer running (at its next token, or after its PS3 call) and end the thread,
        waiting for it `wait` seconds in all, however often this is called."""
        if self._stop_by is None:
            self._stop_by = time.monotonic() + wait
        self._cancel.set()
        with self._cond:
            self._cond.notify_all()
        if self._started:
            self._thread.join(max(0.0, self._stop_by - time.monotonic()))

    @property
    def running(self) -> bool:
        """The answer thread has not ended (a stop that timed out leaves it running)."""
        return self._started and self._thread.is_alive()

    def close(self) -> None:
        self.stop()
        self.vila.ps3, self.vila.llm = self.pipeline, self.llm

    def summary(self) -> str:
        ms = np.asarray(self._answer_ms, dtype=np.float64)
        p50 = f", answer p50 {np.percentile(ms, 50):.0f} ms" if ms.size else ""
        return (f"ask: {self.answers} answers in {self.rounds} rounds every {self.every:g} s, "
                f"{self.skipped} due rounds skipped (an answer was running), {self.idle} idle, "
                f"{self.flips} alert changes, {self.unknown} unknown alert answers{p50}")

    # --- the answer thread -----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    batch = self._next_round()
                    if batch is None:
                        return
                    if not batch:
                        self.idle += 1
                        self.schedule.idle(time.monotonic())
                        continue
                    self.rounds += 1
                    number = self.rounds
                for index in sorted(batch):
                    for question in self.questions:
                        self._answer(batch[index], question, number)
                with self._cond:
                    self.schedule.ran(time.monotonic(), self._end)
        except _Cancelled:
            return
        except BaseException as e:                # given to the loop's thread by drain()
            with self._cond:
                self._error = e

    def _next_round(self) -> Optional[dict]:
        """Under the condition: wait for the next due time; the frames to ask about then ({}:
        none new), or None when no round is left (stopped, or the stream ended before it)."""
        while not self._cancel.is_set():
            due, now = self.schedule.due, time.monotonic()
            if due is not None and (self._end is None or due <= self._end):
                if due <= now:
                    batch, self._newest = self._newest, {}
                    return batch
                self._cond.wait(due - now)
            elif self._end is not None:
                return None
            else:
                self._cond.wait()
        return None

    def _answer(self, frame: FrameRecord, question: Question, number: int) -> None:
        from ..llm.generate import SamplingConfig

        if self._cancel.is_set():
            raise _Cancelled()
        asked, started = time.time(), time.monotonic()
        answer = self.vila.answer(frame.image, question.text, self.settings,
                                  SamplingConfig(max_new_tokens=question.max_new_tokens))
        done, done_mono = time.time(), time.monotonic()
        arrived = frame.arrival_mono if frame.arrival_mono is not None else started
        value = yes_no(answer.text) if question.kind == ALERT else None
        records: list = [AnswerRecord(
            source=frame.source, source_index=frame.source_index, frame=frame.frame, pts=frame.pts,
            arrival=frame.arrival, question=question.text, kind=question.kind, answer=answer.text, value=value,
            round=number, asked=asked, answer_time=done, latency_ms=(done_mono - arrived) * 1000.0,
            answer_ms=(done_mono - started) * 1000.0, generated=len(answer.token_ids),
            stop_reason=answer.stop_reason, image=frame.image)]
        change = None if value is None else self.alerts.update(frame.source_index, question.text, value)
        if change is not None:
            records.append(AlertRecord(source=frame.source, source_index=frame.source_index, frame=frame.frame,
                                       pts=frame.pts, question=question.text, value=value, previous=change[0],
                                       initial=change[1], answer_time=done))
        with self._cond:
            self.answers += 1
            self.unknown += int(value == UNKNOWN)
            self.flips += int(change is not None and not change[1])
            self._answer_ms.append((done_mono - started) * 1000.0)
            self._outbox.extend(records)


class AskingEncoder(Encoder):
    """The Encoder a stream with questions runs its frames through: over the VILA-HD pipeline's
    PS3, with the Asker that shares it. Closing it stops the answers and gives VilaPipeline its
    PS3 back; with `own` it also closes the PS3 stages and the LLM."""

    def __init__(self, asker: Asker, own: bool):
        super().__init__(asker.pipeline)
        self.asker, self._own = asker, own

    def close(self) -> None:
        self.asker.close()
        if self._own and not self.asker.running:          # never under a thread still in a stage call
            super().close()
            self.asker.llm.close()
