"""The stream loop and its Python face, `ps3edge.stream(...)`.

    import ps3edge

    with ps3edge.stream("art/", ["front=rtsp://10.0.0.5/cam", "/dev/video0"],
                        settings=ps3edge.LookCloseSettings(num_look_close=2)) as frames:
        for record in frames:                      # a FrameRecord per processed frame (record.py)
            use(record.source, record.frame, record.result.features)

Each step takes the newest frame of every source that has a new one and runs them as one batch
(`Encoder.run_batch`), then gives a record per frame, in the sources' order. A step takes at most
one frame per source and steps run one after the other, so a source's frames are never processed
out of order. A frame that waited while a newer one came is dropped by its source's mailbox
(sources.py), so however slow the consumer, what waits is one frame per source.

With `ask` / `alert` (ask.py, questions.py) the artifact is a VILA-HD one: an answer thread
asks its LLM about each source's newest processed frame every `every` seconds, sharing the
loop's PS3, and the answers come out as AnswerRecords and AlertRecords among the frames (or go
to `on_answer`).

With `reuse` (runtime/reuse.py) a frame whose pixels did not change is given its source's last
computed result, and a changed one reuses the features of its unchanged high-res patches, with
a full computation at least every `refresh` frames. With `deadline_ms` (deadline.py) each step
runs as many look-close steps as its measured costs say fit in the deadline.

The loop ends when every source has ended for good (files and folders without `loop`), after
`duration` seconds, after `max_frames` processed frames, or at `stop()`; its end, or leaving the
`with`, stops the decoder threads (and closes the encoder, where the stream loaded it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
from typing import Callable, Iterable, Iterator, Optional, Union

from .. import defaults
from ..api import Encoder, checked_settings, load
from ..errors import Ps3EdgeError
from ..runtime.planning import LookCloseSettings, resolve
from ..runtime.reuse import FrameReuse, Outcome, check_reuse
from .ask import AskingEncoder, Asker
from .deadline import DeadlineRule
from .questions import ask_options
from .record import COMPUTED, REUSED, FrameRecord
from .sources import Pacing, SourceSpec, SourceThread, parse_sources
from .stats import StreamStats

_POLL_S = 0.1                     # how often a loop with nothing to do looks at its clock and its sources


class Stream:
    """Sources decoding in threads and the loop over them; iterate it for FrameRecords. Made by
    `ps3edge.stream`; a context manager that stops the threads on exit."""

    def __init__(self, encoder: Encoder, specs: list[SourceSpec], *, settings: LookCloseSettings, layer: int,
                 pacing: Pacing, duration: Optional[float], max_frames: Optional[int], own_encoder: bool,
                 reuse: Optional[FrameReuse] = None, deadline: Optional[DeadlineRule] = None,
                 ask: Optional[Asker] = None, on_answer: Optional[Callable] = None):
        self.encoder, self.specs, self.settings, self.layer = encoder, specs, settings, layer
        self.reuse, self.deadline = reuse, deadline
        # with questions: the answer thread, and the turns the loop's PS3 passes take with its own
        self.ask, self.on_answer = ask, on_answer
        self._turns = ask.turns if ask is not None else contextlib.nullcontext()
        self.pacing, self.duration, self.max_frames = pacing, duration, max_frames
        self._own_encoder = own_encoder
        self._stop = threading.Event()
        self._bell = threading.Condition()
        self.sources = [SourceThread(i, s, pacing, self._bell, self._stop) for i, s in enumerate(specs)]
        self.stats = StreamStats(self.sources)
        self.missing: list[str] = []                 # sources that did not open at the start (allow_missing)
        self.steps = 0
        self._started = False

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self, allow_missing: bool = False) -> "Stream":
        """Start every source and wait for each one's first frame: one that cannot be opened is
        an error, or with allow_missing a note in `missing` (it goes on trying)."""
        if self._started:
            return self
        self._started = True
        for source in self.sources:
            source.start()
        deadline = time.monotonic() + self.pacing.open_timeout + 2 * self.pacing.read_timeout
        for source in self.sources:
            if not source.opened.wait(max(0.0, deadline - time.monotonic())):
                source.first_error = (f"{source.spec.target} gave no frame within "
                                      f"{self.pacing.open_timeout + 2 * self.pacing.read_timeout:g} s")
            if source.first_error is not None:
                message = f"source {source.spec.name}: {source.first_error}"
                if not allow_missing:
                    self.stop()
                    raise Ps3EdgeError(f"{message} (--allow-missing runs the other sources without it)")
                self.missing.append(message)
        return self

    def stop(self) -> None:
        """Stop the decoder threads (each leaves within its read timeout; they are daemons)."""
        self._stop.set()
        with self._bell:
            self._bell.notify_all()
        if self.ask is not None:
            self.ask.stop()
        deadline = time.monotonic() + 1.0
        for source in self.sources:
            source.join(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        self.stop()
        if self._own_encoder:
            self.encoder.close()

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the loop --------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[FrameRecord]:
        return self.records()

    def records(self) -> Iterator[FrameRecord]:
        """FrameRecords as steps produce them, until the stream ends (see the module docstring)."""
        self.start()
        began = time.monotonic()
        try:
            while not self._stop.is_set():
                left = None if self.max_frames is None else self.max_frames - self.stats.total_processed
                if left is not None and left <= 0:
                    break
                remaining = None if self.duration is None else began + self.duration - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                frames = self._take(left, _POLL_S if remaining is None else min(_POLL_S, remaining))
                if frames is None:
                    break
                if frames:
                    for record in self._step(frames):
                        if self.ask is not None:
                            self.ask.offer(record)
                        yield record
                if self.ask is not None:
                    yield from self._answers(self.ask.drain())
            if self.ask is not None and not self._stop.is_set():    # ended by itself: the due answers finish
                yield from self._answers(self.ask.finish())
        finally:
            self.stop()

    def _answers(self, records) -> Iterator:
        """The answer thread's records: given to on_answer, or yielded among the frames."""
        for record in records:
            if self.on_answer is None:
                yield record
            else:
                self.on_answer(record)

    def _take(self, limit: Optional[int], wait: float):
        """The waiting frames, one per source (at most `limit`, taken in turn from the sources so
        none is always last); [] when none came within `wait`; None when every source has ended."""
        with self._bell:
            self._bell.wait_for(lambda: self._stop.is_set() or any(s.mailbox.waiting for s in self.sources)
                                or all(s.ended for s in self.sources), wait)
            n = len(self.sources)
            order = [self.sources[(self.steps + k) % n] for k in range(n)]
            frames = []
            for source in order:
                if limit is not None and len(frames) >= limit:
                    break
                frame = source.mailbox.take()
                if frame is not None:
                    frames.append(frame)
            if not frames and all(s.ended for s in self.sources):
                return None
        return sorted(frames, key=lambda f: f.source)

    def _step(self, frames) -> Iterator[FrameRecord]:
        self.steps += 1
        started = time.monotonic()
        settings, choice = self.settings, None
        if self.deadline is not None:
            waited = max(started - f.arrived_mono for f in frames) * 1000.0
            choice = self.deadline.choose(len(frames), waited)
            settings = dataclasses.replace(settings, num_look_close=choice.steps, num_token_look_close=None)
        outcomes = self._run(frames, settings)
        done, done_mono = time.time(), time.monotonic()
        if self.deadline is not None:
            ran = [o for o in outcomes if o.status != REUSED]
            if ran:
                self.deadline.cost.observe(len(ran), choice.steps, ran[0].result.timings_ms,
                                           (done_mono - started) * 1000.0)
        for f, outcome in zip(frames, outcomes):
            result = outcome.result
            latency = (done_mono - f.arrived_mono) * 1000.0
            met = None if choice is None else latency <= self.deadline.deadline_ms
            self.stats.processed(f.source, latency, outcome.status == REUSED, met is False)
            height, width = f.rgb.shape[:2]
            yield FrameRecord(source=self.specs[f.source].name, source_index=f.source, frame=f.number, pts=f.pts,
                              arrival=f.arrived, result_time=done, latency_ms=latency, status=outcome.status,
                              steps=result.num_steps, tokens=int(result.features.shape[1]), step=self.steps,
                              batch=len(frames), width=width, height=height, result=result, image=f.rgb,
                              reused_patches=None if self.reuse is None else outcome.reused_patches,
                              encoded_patches=None if self.reuse is None else outcome.encoded_patches,
                              deadline_ms=None if choice is None else self.deadline.deadline_ms,
                              deadline_met=met, deadline_fits=None if choice is None else choice.fits,
                              arrival_mono=f.arrived_mono)

    def _run(self, frames, settings: LookCloseSettings) -> list[Outcome]:
        """The step's frames through the encoder, or through the reuse rule (in passes of the
        artifact's max batch, as run_batch splits them)."""
        with self._turns:                   # with questions, the answers' PS3 calls take turns with these
            return self._run_turn(frames, settings)

    def _run_turn(self, frames, settings: LookCloseSettings) -> list[Outcome]:
        if self.reuse is None:
            results = self.encoder.run_batch([f.rgb for f in frames], settings, layer=self.layer)
            return [Outcome(r, COMPUTED, r.plan.num_tokens, 0, None) for r in results]
        outcomes = []
        size = self.encoder.max_batch
        for k in range(0, len(frames), size):
            part = frames[k: k + size]
            outcomes += self.reuse.run([f.source for f in part], [f.rgb for f in part], settings, self.layer)
        return outcomes


def stream(artifact_or_encoder: Union[str, os.PathLike, Encoder], sources: Iterable[str], *,
           settings: Optional[LookCloseSettings] = None, layer: int = defaults.DEFAULT_RUN_LAYER,
           backend: str = "onnxruntime", device: str = "auto", precision: str = "fp32",
           realtime: bool = False, fps: Optional[float] = None, loop: bool = False,
           duration: Optional[float] = None, max_frames: Optional[int] = None, allow_missing: bool = False,
           open_timeout: float = defaults.STREAM_OPEN_TIMEOUT_S,
           read_timeout: float = defaults.STREAM_READ_TIMEOUT_S, reuse: bool = False,
           reuse_threshold: float = defaults.STREAM_REUSE_THRESHOLD, refresh: int = defaults.STREAM_REFRESH_FRAMES,
           reuse_patches: bool = True, deadline_ms: Optional[float] = None, ask=None, alert=None,
           every: Optional[float] = None, ask_sources=None, max_new_tokens: Optional[int] = None,
           alert_max_new_tokens: Optional[int] = None, on_answer: Optional[Callable] = None) -> Stream:
    """Open live sources and run them through an encoder; iterate the result for FrameRecords.

    artifact_or_encoder: an artifact directory (loaded with backend, device, precision and closed
    with the stream) or an open Encoder (left open). sources: `--source` strings (sources.py).
    realtime: video files at their own frame rate; fps: image folders' rate (default
    STREAM_FOLDER_FPS); loop: files and folders start again at their end. duration / max_frames
    bound the run. A source that cannot be opened raises Ps3EdgeError, unless allow_missing
    (then `stream.missing` says which, and it keeps being retried). Sources are opened here.
    reuse, reuse_threshold (levels), refresh (frames), reuse_patches: runtime/reuse.py's rule;
    deadline_ms: deadline.py's.

    VILA-HD questions (ask.py): `ask` and `alert`, a question or a list of them, need a VILA-HD
    artifact directory (then `precision` is its LLM's, fp32 or int4, and `device` stays auto) or
    an open `VilaPipeline` (left open). `every`: seconds between answer rounds (default
    STREAM_ASK_EVERY_S); `ask_sources`: the names of the sources asked (default all);
    `max_new_tokens`: --ask answers' (default STREAM_ASK_MAX_NEW_TOKENS); `alert_max_new_tokens`:
    --alert answers' (default STREAM_ALERT_MAX_NEW_TOKENS). Their AnswerRecords and AlertRecords
    come among the FrameRecords, or, with `on_answer`, go to it (called in the iterating thread)."""
    specs = parse_sources([str(s) for s in ([sources] if isinstance(sources, (str, os.PathLike)) else sources)])
    for name, value in (("fps", fps), ("duration", duration), ("open_timeout", open_timeout),
                        ("read_timeout", read_timeout)):
        if value is not None and not value > 0:
            raise Ps3EdgeError(f"{name} must be a number above 0, got {value}")
    if max_frames is not None and max_frames < 1:
        raise Ps3EdgeError(f"max_frames must be 1 or more, got {max_frames}")
    settings = checked_settings(settings)
    if reuse:
        check_reuse(reuse_threshold, refresh)
    if deadline_ms is not None and not deadline_ms > 0:
        raise Ps3EdgeError(f"deadline_ms must be a number above 0, got {deadline_ms}")
    asking = ask_options(ask, alert, every=every, sources=ask_sources, max_new_tokens=max_new_tokens,
                         alert_max_new_tokens=alert_max_new_tokens)
    if asking is None and on_answer is not None:
        raise Ps3EdgeError("on_answer is for VILA-HD questions: give ask or alert with it")
    own = not isinstance(artifact_or_encoder, Encoder)
    if asking is None:
        encoder = load(artifact_or_encoder, backend, device, precision) if own else artifact_or_encoder
    else:
        encoder = _asking_encoder(asking, artifact_or_encoder, specs, settings, backend, device, precision)
    pacing = Pacing(realtime=realtime, fps=fps, loop=loop, open_timeout=open_timeout, read_timeout=read_timeout)
    try:
        helpers = stream_helpers(encoder, settings, reuse=reuse, reuse_threshold=reuse_threshold, refresh=refresh,
                                 reuse_patches=reuse_patches, deadline_ms=deadline_ms)
    except BaseException:
        if own or asking is not None:
            encoder.close()
        raise
    if asking is not None:
        helpers.update(ask=encoder.asker, on_answer=on_answer)
    s = Stream(encoder, specs, settings=settings, layer=layer, pacing=pacing, duration=duration,
               max_frames=max_frames, own_encoder=own or asking is not None, **helpers)
    try:
        return s.start(allow_missing)
    except BaseException:
        s.close()
        raise


def _asking_encoder(asking, given, specs, settings: LookCloseSettings, backend: str, device: str,
                    precision: str) -> AskingEncoder:
    """The Encoder over a VILA-HD pipeline's PS3, with its answer thread: of an artifact directory
    (loaded here, closed with the stream) or of an open VilaPipeline (left open)."""
    from ..llm.pipeline import VilaPipeline

    asking.source_indices(specs)                       # a wrong source name, before anything loads
    if isinstance(given, Encoder):
        raise Ps3EdgeError("ask and alert need a VILA-HD artifact directory or a VilaPipeline, not an Encoder: "
                           "the answers run its LLM")
    if isinstance(given, VilaPipeline):
        return AskingEncoder(asking.asker(given, settings, specs), own=False)
    if device != "auto":
        raise Ps3EdgeError(f"device {device}: with ask or alert VILA-HD chooses where it runs, as `ps3edge chat` "
                           f"does; leave device auto")
    return asking.load(given, backend, precision, settings, specs)


def stream_helpers(encoder: Encoder, settings: LookCloseSettings, *, reuse: bool, reuse_threshold: float,
                   refresh: int, reuse_patches: bool, deadline_ms: Optional[float]) -> dict:
    """Stream's `reuse` and `deadline` keywords for these options (None where off)."""
    pipeline = encoder.pipeline             # the reuse rule drives the stages, below Encoder's frames-in face
    helpers: dict = {"reuse": None, "deadline": None}
    if reuse:
        helpers["reuse"] = FrameReuse(pipeline, reuse_threshold, refresh, patches=reuse_patches)
    if deadline_ms is not None:
        ceiling = resolve(settings, pipeline.geometry, pipeline.budget_rule).steps
        helpers["deadline"] = DeadlineRule(deadline_ms, ceiling)
    return helpers
