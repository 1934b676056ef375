"""The `--ask` / `--alert` flags of a stream (and `ps3edge.stream`'s `ask=`, `alert=`, ... keywords),
checked before anything loads: the questions (not empty, none twice), the interval, the asked
sources, the token counts; then the VILA-HD artifact loaded and its own checks (its context for
the look-close settings, each question's prompt) run before any source opens. What runs then is
ask.py's."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from .. import defaults
from ..artifact.vila import VILA_MANIFEST, is_vila_artifact
from ..errors import Ps3EdgeError
from ..paths import expect_dir
from ..runtime.planning import LookCloseSettings
from .ask import ALERT, ASK, Asker, AskingEncoder, Question


@dataclass(frozen=True)
class AskOptions:
    """The checked --ask / --alert flags: the questions, the interval (seconds) and the asked
    sources' names (None: all)."""
    questions: tuple
    every: float
    sources: Optional[tuple] = None

    def source_indices(self, specs) -> Optional[set]:
        if self.sources is None:
            return None
        names = [s.name for s in specs]
        unknown = [n for n in self.sources if n not in names]
        if unknown:
            raise Ps3EdgeError(f"--ask-source {unknown[0]} is not a source; the sources are {', '.join(names)}")
        return {names.index(n) for n in self.sources}

    def load(self, artifact, backend: str, precision: str, settings: LookCloseSettings, specs,
             verify: bool = True) -> "AskingEncoder":
        """The VILA-HD artifact loaded (precision: the LLM's), the questions checked against it
        before any source opens, and the Encoder over its PS3 that the frame loop runs."""
        vila = open_vila(artifact, backend, precision, verify)
        try:
            return AskingEncoder(self.asker(vila, settings, specs), own=True)
        except BaseException:
            vila.ps3.close()
            vila.llm.close()
            raise

    def asker(self, vila, settings: LookCloseSettings, specs) -> "Asker":
        check_questions(vila, self.questions, settings)
        return Asker(vila, self.questions, every=self.every, settings=settings, only=self.source_indices(specs))


def _texts(value, flag: str) -> list:
    texts = [] if value is None else [value] if isinstance(value, str) else list(value)
    for text in texts:
        if not isinstance(text, str):
            raise Ps3EdgeError(f"{flag} takes questions as text, got {type(text).__name__}")
        if not text.strip():
            raise Ps3EdgeError(f"{flag} is empty: ask a question about the frames")
    if len(set(texts)) != len(texts):
        raise Ps3EdgeError(f"{flag} {next(t for t in texts if texts.count(t) > 1)!r} is given twice")
    return texts


def _count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise Ps3EdgeError(f"{name} must be a whole number of 1 or more, got {value!r}")
    return int(value)


def check_every(every) -> float:
    """--every in seconds: a finite number above 0, at most STREAM_ASK_EVERY_MAX_S."""
    if isinstance(every, bool) or not isinstance(every, (int, float, np.integer, np.floating)) \
            or not math.isfinite(every) or not 0 < every <= defaults.STREAM_ASK_EVERY_MAX_S:
        raise Ps3EdgeError(f"--every must be a number of seconds above 0 and at most "
                           f"{defaults.STREAM_ASK_EVERY_MAX_S:g}, got {every!r}")
    return float(every)


def ask_options(ask=None, alert=None, *, every=None, sources=None, max_new_tokens=None,
                alert_max_new_tokens=None) -> Optional[AskOptions]:
    """The flags checked: None without --ask / --alert (then none of the others may be given)."""
    asks, alerts = _texts(ask, "--ask"), _texts(alert, "--alert")
    sources = None if sources is None else ([sources] if isinstance(sources, str) else list(sources))
    if not asks and not alerts:
        for name, value in (("--every", every), ("--ask-source", sources), ("--max-new-tokens", max_new_tokens),
                            ("alert_max_new_tokens", alert_max_new_tokens)):
            if value is not None and value != []:
                raise Ps3EdgeError(f"{name} is for VILA-HD questions: give --ask or --alert with it")
        return None
    if max_new_tokens is not None and not asks:
        raise Ps3EdgeError("--max-new-tokens sets --ask's answers; --alert answers take "
                           f"{defaults.STREAM_ALERT_MAX_NEW_TOKENS} tokens (only their first word counts)")
    ask_tokens = _count(defaults.STREAM_ASK_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens,
                        "--max-new-tokens")
    alert_tokens = _count(defaults.STREAM_ALERT_MAX_NEW_TOKENS if alert_max_new_tokens is None
                          else alert_max_new_tokens, "alert_max_new_tokens")
    if sources is not None and not sources:
        sources = None
    for name in sources or ():
        if not isinstance(name, str) or not name.strip():
            raise Ps3EdgeError("--ask-source is empty: name a source (cam0, or the NAME of NAME=...)")
    questions = tuple([Question(t, ASK, ask_tokens) for t in asks] + [Question(t, ALERT, alert_tokens) for t in alerts])
    return AskOptions(questions, check_every(defaults.STREAM_ASK_EVERY_S if every is None else every),
                      None if sources is None else tuple(sources))


def vila_dir(artifact):
    """The artifact directory, or one line saying it is not a VILA-HD one (--ask and --alert run its LLM)."""
    path = expect_dir(artifact, "artifact directory")
    if not is_vila_artifact(path):
        raise Ps3EdgeError(f"--ask and --alert need a VILA-HD artifact (one with {VILA_MANIFEST}, as `ps3edge chat "
                           f"--artifacts DIR` exports); {path} has none")
    return path


def open_vila(artifact, backend: str = "onnxruntime", precision: str = "fp32", verify: bool = True):
    """A VILA-HD artifact's pipeline (precision: its LLM's)."""
    from ..llm.pipeline import VilaPipeline

    return VilaPipeline(vila_dir(artifact), backend, verify=verify, precision=precision)


def check_questions(vila, questions: Sequence[Question], settings: LookCloseSettings) -> None:
    """VILA-HD's own refusals, before any source opens: the context for these look-close settings,
    and each question's prompt (no <image> in it, its size within the context)."""
    vila.check_context(settings)
    for q in questions:
        ids, _, _ = vila.prompt_ids(q.text)
        vila.check_prompt_size(ids, settings)
