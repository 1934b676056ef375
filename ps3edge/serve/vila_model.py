"""The VILA-HD models: `vila-hd` answers a question about an image in one response (HTTP and
gRPC); `vila-hd-stream`, a decoupled model, sends the answer as it is generated, one response per
piece of text (gRPC streaming: Triton's HTTP endpoint does not serve decoupled models).

Sampling comes from the request parameters `max_tokens`, `temperature`, `top_p` and `seed` (as
`ps3edge chat`'s flags), look-close settings from the same parameters as the `ps3` model. The LLM
keeps a cache per pipeline, so one instance answers one request at a time.
"""

from __future__ import annotations

import io
import logging
import queue
import threading
import traceback
from typing import Iterator, Optional

from .. import defaults
from ..errors import Ps3EdgeError
from ..llm.generate import SamplingConfig
from ..runtime.preprocess import open_image
from .settings import LookCloseDefaults, checked_settings
from .tensors import ERROR, TensorDecl, error_output, failed, one_string, text_array

LOG = logging.getLogger("ps3edge.serve")
TEXT, IMAGE, ANSWER = "text", "image", "answer"
SAMPLING_PARAMETERS = ("max_tokens", "temperature", "top_p", "seed")
SEED_MAX = defaults.SEED_MAX
_DONE = object()


def _number(name: str, value, kind):
    if isinstance(value, bool):
        raise Ps3EdgeError(f"request parameter {name} must be a number, got {value!r}")
    try:
        number = kind(value)
        if kind is int and str(value).strip() != str(number) and not isinstance(value, int):
            raise ValueError
    except (TypeError, ValueError):
        raise Ps3EdgeError(f"request parameter {name} must be {'a whole number' if kind is int else 'a number'}, "
                           f"got {value!r}") from None
    return number


def sampling_from(parameters: Optional[dict]) -> SamplingConfig:
    """`chat`'s sampling settings from the request parameters (absent: chat's defaults)."""
    p = parameters or {}
    base = SamplingConfig()
    seed = _number("seed", p.get("seed", base.seed), int)
    if not 0 <= seed <= SEED_MAX:
        raise Ps3EdgeError(f"request parameter seed must be between 0 and {SEED_MAX}, got {seed}")
    return SamplingConfig(max_new_tokens=_number("max_tokens", p.get("max_tokens", base.max_new_tokens), int),
                          temperature=_number("temperature", p.get("temperature", base.temperature), float),
                          top_p=_number("top_p", p.get("top_p", base.top_p), float), seed=seed).validate()


class VilaModel:
    """The callable of `vila-hd` (whole answers); `stream()` gives its streaming twin."""

    name = "vila-hd"
    stream_name = "vila-hd-stream"

    def __init__(self, pipeline, defaults: LookCloseDefaults):
        self.pipeline = pipeline
        self.defaults = defaults

    @staticmethod
    def inputs() -> list[TensorDecl]:
        return [TensorDecl(TEXT, bytes, (1,)), TensorDecl(IMAGE, bytes, (1,))]

    @staticmethod
    def outputs() -> list[TensorDecl]:
        return [TensorDecl(ANSWER, bytes, (1,)), error_output()]

    def _prepare(self, request):
        """(image, question, settings, sampling) of one request, or a one-line Ps3EdgeError."""
        settings = checked_settings(self.defaults, request.parameters, self.pipeline.ps3.geometry,
                                    known=SAMPLING_PARAMETERS)
        sampling = sampling_from(request.parameters)
        self.pipeline.check_context(settings)
        try:
            text = one_string(request, TEXT, "question").decode("utf-8")
        except UnicodeDecodeError:
            raise Ps3EdgeError("the question is not UTF-8 text") from None
        if not text.strip():
            raise Ps3EdgeError("the question is empty: ask a question about the image")
        image = open_image(io.BytesIO(one_string(request, IMAGE, "encoded image")), name="the request's image")
        return image, text, settings, sampling

    def _answer(self, request, on_text=None) -> dict:
        try:
            image, text, settings, sampling = self._prepare(request)
            answer = self.pipeline.answer(image, text, settings, sampling, on_text=on_text)
        except Ps3EdgeError as e:
            return failed(str(e))
        except Exception as e:          # answered as an error, logged in full: the server keeps serving
            LOG.error("vila-hd: a request failed:\n%s", traceback.format_exc())
            return failed(f"the model failed on this request ({type(e).__name__}: {e})")
        return {ANSWER: text_array(answer.text), ERROR: text_array("")}

    def __call__(self, requests) -> list[dict]:
        return [self._answer(request) for request in requests]

    def stream(self, requests) -> Iterator[list[dict]]:
        """The decoupled model's generator: one response per piece of text, then the final flag
        (PyTriton sends it when the generator ends). Its model takes one request per call; should
        Triton hand over more, each gets its whole answer in one response."""
        if len(requests) != 1:
            yield self(requests)
            return
        pieces: queue.Queue = queue.Queue()
        outcome = {}

        def work():
            outcome["answer"] = self._answer(requests[0], on_text=pieces.put)
            pieces.put(_DONE)

        worker = threading.Thread(target=work, name="vila-hd-stream", daemon=True)
        worker.start()
        while (piece := pieces.get()) is not _DONE:
            yield [{ANSWER: text_array(piece), ERROR: text_array("")}]
        worker.join()
        if outcome["answer"][ERROR][0, 0]:
            yield [outcome["answer"]]

    def warm_up(self, image_bytes: bytes) -> None:
        """One short answer through the whole path; refuse to serve if it fails."""
        import numpy as np
        from .ps3_model import Call

        call = Call({TEXT: np.array([[b"Describe the image."]], dtype=object),
                     IMAGE: np.array([[image_bytes]], dtype=object)}, {"max_tokens": 1})
        message = self([call])[0][ERROR][0, 0].decode()
        if message:
            raise Ps3EdgeError(f"the vila-hd warm-up request failed: {message}")
