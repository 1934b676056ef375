"""The `ps3` model: one encoded image (and optionally a prompt embedding) per request in, the
look-close features, the selection probabilities and the selection maps out.

Triton's dynamic batcher hands over several requests at once. Each is decoded and checked on its
own first, so that a request with undecodable bytes or settings this model cannot take is answered
with its own `error` while the others are run: the valid ones are grouped by equal look-close
settings and each group goes to `Pipeline.run_batch` in chunks of at most `pipeline.max_batch`.
"""

from __future__ import annotations

import io
import logging
import traceback
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ..errors import Ps3EdgeError
from ..runtime.outputs import result_tensors
from ..runtime.preprocess import open_image
from .settings import LookCloseDefaults, checked_settings
from .tensors import ERROR, TensorDecl, error_output, failed, one_string, text_array

LOG = logging.getLogger("ps3edge.serve")
IMAGE, PROMPT = "image", "prompt_embedding"


@dataclass
class Call:
    """A request as the model reads it (PyTriton's Request has the same two fields)."""
    data: dict
    parameters: Optional[dict] = None


@dataclass
class _Item:
    image: Any
    settings: Any
    prompt: Optional[np.ndarray]


class Ps3Model:
    """The callable Triton runs for `ps3` (one per model instance, each with its own pipeline)."""

    name = "ps3"

    def __init__(self, pipeline, defaults: LookCloseDefaults, layer: int):
        self.pipeline = pipeline
        self.defaults = defaults
        self.layer = layer
        pipeline.layer_index(layer)              # refuse an unexported layer at start, not per request

    def inputs(self) -> list[TensorDecl]:
        return [TensorDecl(IMAGE, bytes, (1,)), TensorDecl(PROMPT, np.float32, (self.pipeline.cfg.width,), optional=True)]

    def outputs(self) -> list[TensorDecl]:
        cfg = self.pipeline.cfg
        maps = [TensorDecl(f"selection_map_{s}", np.uint8, (g, g)) for s, g in zip(cfg.scales[1:], cfg.highres_grids)]
        return [TensorDecl("features", np.float32, (-1, cfg.width)),
                TensorDecl("prob", np.float32, (cfg.lowres_grid, cfg.lowres_grid)), *maps, error_output()]

    def _prepare(self, request) -> _Item:
        """Decode and check one request (a one-line Ps3EdgeError names what is wrong with it)."""
        settings = checked_settings(self.defaults, request.parameters, self.pipeline.geometry)
        raw = one_string(request, IMAGE, "encoded image")
        image = open_image(io.BytesIO(raw), name="the request's image")
        prompt = request.data.get(PROMPT)
        if prompt is not None:
            prompt = np.asarray(prompt, dtype=np.float32).reshape(-1)
            self.pipeline.prompt(settings, prompt)          # the checks `run` makes: size, finite, mode
        return _Item(image, settings, prompt)

    def __call__(self, requests) -> list[dict]:
        responses: list[Optional[dict]] = [None] * len(requests)
        groups: dict[Any, list[int]] = {}
        items = {}
        for i, request in enumerate(requests):
            try:
                items[i] = self._prepare(request)
            except Ps3EdgeError as e:
                responses[i] = failed(str(e))
                continue
            groups.setdefault(items[i].settings, []).append(i)
        step = self.pipeline.max_batch
        for settings, members in groups.items():
            for start in range(0, len(members), step):
                chunk = members[start: start + step]
                for i, answer in zip(chunk, self._run(settings, [items[i] for i in chunk])):
                    responses[i] = answer
        return responses

    def _run(self, settings, chunk: list[_Item]) -> list[dict]:
        """One `run_batch` call; should it fail, every request of the chunk gets the error."""
        try:
            results = self.pipeline.run_batch([item.image for item in chunk], settings,
                                              prompt_embeddings=[item.prompt for item in chunk], layer=self.layer)
        except Ps3EdgeError as e:
            return [failed(str(e))] * len(chunk)
        except Exception as e:          # answered as an error, logged in full: the server keeps serving
            LOG.error("ps3: a batch of %d failed:\n%s", len(chunk), traceback.format_exc())
            return [failed(f"the model failed on this batch ({type(e).__name__}: {e})")] * len(chunk)
        return [self._response(result) for result in results]

    @staticmethod
    def _response(result) -> dict:
        """A result's tensors, each with the request's batch dimension of 1."""
        tensors = result_tensors(result)
        out = {name: (value if name == "features" else value[None]) for name, value in tensors.items()}
        out[ERROR] = text_array("")
        return out

    def warm_up(self, image_bytes: bytes) -> None:
        """Run one request through the whole path; refuse to serve if it does not come back whole."""
        answer = self([Call({IMAGE: np.array([[image_bytes]], dtype=object)})])[0]
        message = answer[ERROR][0, 0].decode()
        if message:
            raise Ps3EdgeError(f"the ps3 warm-up request failed: {message}")
