"""The batcher: one thread owns the VilaPipeline and answers the admitted requests.

    collect: the first waiting request, then more for up to --batch-delay-ms or --max-batch
    group:   by equal look-close settings (in order of arrival), in chunks of the artifact's bound
    vision:  VilaPipeline.look_batch per group: PS3's low-res pass as ONE batch, each request's
             top-down prompt (the LLM's prefill over [prefix ; low-res image ; question], one
             request at a time: the LLM has one KV cache), selector + high-res as ONE batch
    answer:  each request of the group in turn: high-res projector, prefill, decode, its text
             streamed to its own client as it comes

So only PS3's passes are shared; the LLM's work is serialized. A request's answer is
`VilaPipeline.answer`'s for the same image, question, settings and sampling. Admission is
bounded (--max-queue: waiting or being answered); one more is refused with 429 at once.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional

from ..errors import Ps3EdgeError
from .protocol import FINISH, ApiError

LOG = logging.getLogger("ps3edge.openai")


@dataclass
class Outcome:
    """A finished request: its text (cut at a stop string), finish reason and token counts, or its error."""
    text: str = ""
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: Optional[ApiError] = None


@dataclass
class Job:
    request: object                       # llm.pipeline.VilaRequest
    image: object                         # a decoded PIL image
    stops: tuple                          # stop strings
    emit: Callable[[str], None]           # a piece of the answer, called in the batcher's thread
    finish: Callable[[Outcome], None]     # called once, in the batcher's thread
    cancelled: threading.Event = field(default_factory=threading.Event)     # the client went away
    admitted_at: float = field(default_factory=time.monotonic)
    first_text_at: Optional[float] = None


class StopStrings:
    """The answer's pieces as they come, passed on except what could still become a stop string;
    at the first stop string the text before it is passed on and generation is asked to end."""

    def __init__(self, job: Job):
        self.job, self.text, self.sent, self.hit = job, "", 0, False

    def _send(self, end: int) -> None:
        if end > self.sent:
            if self.job.first_text_at is None:
                self.job.first_text_at = time.monotonic()
            self.job.emit(self.text[self.sent:end])
            self.sent = end

    def __call__(self, piece: str) -> bool:
        if self.hit or self.job.cancelled.is_set():
            return True
        self.text += piece
        found = [i for i in (self.text.find(s) for s in self.job.stops) if i >= 0]
        if found:
            self.hit = True
            self.text = self.text[:min(found)]
            self._send(len(self.text))
            return True
        held = max((k for s in self.job.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        self._send(len(self.text) - held)
        return False

    def close(self) -> None:
        """The end of the answer without a stop string: what was held back goes too."""
        if not self.hit:
            self._send(len(self.text))


class Batcher:
    def __init__(self, pipeline, max_batch: int, delay_s: float, max_queue: int, metrics):
        self.pipeline, self.delay_s, self.max_queue, self.metrics = pipeline, delay_s, max_queue, metrics
        self.max_batch = max_batch
        self.chunk = min(max_batch, pipeline.ps3.max_batch)     # the artifact's own bound per vision pass
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._admitted = 0
        self._thread = threading.Thread(target=self._loop, name="ps3edge-openai-batcher", daemon=True)

    # --- admission -----------------------------------------------------------------------------
    def reserve(self) -> None:
        """Take a place for one request, or 429 when --max-queue requests are already admitted."""
        with self._lock:
            if self._admitted >= self.max_queue:
                raise ApiError(429, f"the server is busy: {self.max_queue} requests are queued or running "
                                    f"(--max-queue); retry later", None, "queue_full")
            self._admitted += 1
        self.metrics.in_flight.inc()

    def release(self) -> None:
        with self._lock:
            self._admitted -= 1
        self.metrics.in_flight.dec()

    @property
    def admitted(self) -> int:
        with self._lock:
            return self._admitted

    def submit(self, job: Job) -> None:
        """A reserved request, to be answered; `job.finish` is called once whatever happens."""
        self.metrics.queue_depth.inc()
        self._queue.put(job)

    # --- the thread ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout_s: float) -> None:
        self._queue.put(None)
        self._thread.join(timeout_s)

    def _collect(self, first: Job) -> tuple[list, bool]:
        jobs, deadline = [first], time.monotonic() + self.delay_s
        while len(jobs) < self.max_batch:
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
        return jobs, False

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            jobs, stopping = self._collect(first)
            self.metrics.queue_depth.dec(len(jobs))
            groups: dict = {}
            for job in jobs:
                groups.setdefault(job.request.settings, []).append(job)
            for group in groups.values():
                for i in range(0, len(group), self.chunk):
                    self._run(group[i: i + self.chunk])

    def _run(self, jobs: list) -> None:
        """One vision batch, then each answer in turn; every job is finished once."""
        live = []
        for job in jobs:
            if job.cancelled.is_set():
                self._finish(job, Outcome(error=ApiError(499, "the client went away")))
            else:
                live.append(job)
        if not live:
            return
        started = time.monotonic()
        for job in live:
            self.metrics.queue_wait.observe(started - job.admitted_at)
        try:
            looked = self.pipeline.look_batch([j.image for j in live], [j.request for j in live])
        except Exception as e:
            if len(live) > 1:              # one request's failure must not fail its batch-mates: each alone
                LOG.warning("a vision batch of %d failed (%s: %s); running its requests one by one",
                            len(live), type(e).__name__, e)
                for job in live:
                    self._run([job])
                return
            self._finish(live[0], Outcome(error=self._failure(e)))
            return
        self.metrics.batch_size.observe(len(live))
        self.metrics.vision_seconds.observe(time.monotonic() - started)
        for job, seen in zip(live, looked):
            self._answer(job, seen)

    def _answer(self, job: Job, seen) -> None:
        if job.cancelled.is_set():
            self._finish(job, Outcome(error=ApiError(499, "the client went away")))
            return
        pieces = StopStrings(job)
        started = time.monotonic()
        try:
            answer = self.pipeline.generate_answer(job.request, seen, on_text=pieces)
        except Exception as e:
            self._finish(job, Outcome(error=self._failure(e)))
            return
        self.metrics.generation_seconds.observe(time.monotonic() - started)
        pieces.close()
        finish = "stop" if pieces.hit else FINISH.get(answer.stop_reason, "stop")
        text = pieces.text if pieces.hit or job.cancelled.is_set() else answer.text
        prompt, completion = answer.tokens["prompt"], answer.tokens["generated"]
        self.metrics.prompt_tokens.inc(prompt)
        self.metrics.completion_tokens.inc(completion)
        self._finish(job, Outcome(text, finish, prompt, completion))

    @staticmethod
    def _failure(e: Exception) -> ApiError:
        if not isinstance(e, Ps3EdgeError):
            LOG.error("a request failed:\n%s", traceback.format_exc())
        return ApiError(500, f"the model failed on this request ({type(e).__name__}: {e})", None, "model_error")

    def _finish(self, job: Job, outcome: Outcome) -> None:
        if job.first_text_at is not None:
            self.metrics.first_token.observe(job.first_text_at - job.admitted_at)
        try:
            job.finish(outcome)
        except Exception:                  # the app's callback: never let it stop the thread
            LOG.error("finishing a request failed:\n%s", traceback.format_exc())
        finally:
            self.release()
