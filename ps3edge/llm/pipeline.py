"""The VILA-HD pipeline over exported stages: image + question -> answer.

    image --lowres (once)--> low-res tokens --projector--> 196 embeddings (+ the "\\n" embedding)
    after_prompt: LLM over [chat prefix ; low-res image ; user text] -> last hidden
                  --top-down prompt head--> PS3 prompt        (after_image: PS3's prior prompt)
    selector(prompt) -> plan -> highres -> full 2x2 cells per scale --projector-->
    [196 low-res ; high-res by scale ; "\\n"] spliced at <image> in the chat prompt -> LLM -> tokens

The image's newline is the LLM embedding of the text "\\n" that VILA appends after each image.
The top-down hidden state is taken at the last token of the user's text (before <|im_end|>), as
VILA-HD's `look_close_positions`. The VILA-HD context rule: a model whose context is shorter than
(high-res patches / 4) + 1024 (NUM_LOOK_CLOSE * 2560 / 4 + 1024) refuses the request up front.

`answer` is `request` (the prompt, checked) + `look_batch` (the vision side up to the selected
high-res features, for several requests of equal settings at once: the low-res pass and the
selector / highres calls batched, the top-down prefills one by one) + `generate_answer` (the rest,
one request); `ps3edge serve-openai` batches `look_batch` over concurrent requests.

The artifact (exported by llm/export.py, described by vila.json in artifact/vila.py) is run by
one of the language-side implementations of implementations.py (onnxruntime, torch, tensorrt),
with PS3 on the stage backend that implementation names; this module only reads it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import Ps3EdgeError
from ..artifact.vila import load_vila_manifest
from ..model.projector import projector_cells, space_to_channel
from ..runtime.lookclose import Pipeline
from ..runtime.planning import LookCloseSettings, resolve
from .generate import Generation, SamplingConfig, generate
from .implementations import get_implementation
from .tokenizer import IM_END, IMAGE_TOKEN, load_tokenizer, stop_token_ids
from .vila import VILA_LAYER

CONTEXT_MARGIN = 1024                 # VILA-HD: context >= high-res patches / 4 + 1024


@dataclass
class VilaAnswer:
    text: str
    token_ids: list[int]
    stop_reason: str
    tokens: dict                        # lowres, highres per scale, newline, image, text, prompt, generated
    timings_ms: dict = field(default_factory=dict)
    prompt_embedding: np.ndarray | None = None   # the top-down prompt fed to the selector (after_prompt)
    selection_maps: list = field(default_factory=list)

    def to_json(self) -> dict:
        return {"answer": self.text, "token_ids": self.token_ids, "stop_reason": self.stop_reason,
                "tokens": self.tokens, "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()}}


def required_context(settings: LookCloseSettings, pipeline: Pipeline) -> int:
    """VILA-HD's rule: NUM_LOOK_CLOSE * 2560 / 4 + 1024 (per-step budget x steps, or the token target)."""
    return resolve(settings, pipeline.geometry).patches_asked // 4 + CONTEXT_MARGIN


class VilaPipeline:
    """A VILA-HD artifact on one implementation of implementations.py: `onnxruntime` (the
    exported files), `torch` (the reference: transformers' Qwen2 and our PyTorch PS3 / projector,
    rebuilt from the source) or `tensorrt` (the engines of `ps3edge build ARTIFACT`: PS3 stages,
    projector, LLM). `precision`: the LLM's, fp32 or one of vila.json's "precisions" (int4: the
    weight-only INT4 LLM and token embedding of `ps3edge calibrate --precision int4`)."""

    def __init__(self, artifact_dir, backend: str = "onnxruntime", verify: bool = True, precision: str = "fp32"):
        implementation = get_implementation(backend)         # refuses an unknown name
        self.art = Path(artifact_dir)
        self.manifest = load_vila_manifest(self.art, verify)
        self.backend, self.precision = backend, precision
        implementation.check_precision(self.art, self.manifest, precision)
        implementation.check(self.art, self.manifest)
        side = implementation.open(self.art, self.manifest, precision)
        # VILA-HD looks at the low-res tokens before it selects (run_lowres / run_from_lowres),
        # which a whole-loop session does not split: PS3 runs stage by stage on every backend.
        # The torch implementation's PS3 model comes with it (one model for both sides).
        self.ps3 = Pipeline(self.art / "ps3", implementation.ps3_backend, verify=verify, fast=False,
                            loaded=side.ps3_model)
        self.tokenizer = load_tokenizer(self.art / "tokenizer")
        self.context_length = self.manifest.context_length
        self.llm, self._project, self._head, self.embed_table = side.llm, side.project, side.head, side.embed_table
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.im_end_id = self.tokenizer.convert_tokens_to_ids(IM_END)
        self.newline_ids = self.tokenizer.encode("\n", add_special_tokens=False)
        self.stop_ids = tuple(stop_token_ids(self.tokenizer))

    # --- pieces ------------------------------------------------------------------------------
    def embed(self, ids) -> np.ndarray:
        return self.embed_table[np.asarray(ids, dtype=np.int64)].astype(np.float32, copy=False)

    def project(self, cells: np.ndarray) -> np.ndarray:
        if len(cells) == 0:
            return np.zeros((0, self.embed_table.shape[1]), np.float32)
        return self._project(np.ascontiguousarray(cells, dtype=np.float32))

    def prompt_ids(self, text: str) -> tuple[list[int], int, int]:
        """Chat prompt ids, the index of <image>, and the index of the user's last text token."""
        if IMAGE_TOKEN in text:
            raise Ps3EdgeError(f"the question must not contain {IMAGE_TOKEN}: the image goes in front of it")
        ids = self.tokenizer.apply_chat_template([{"role": "user", "content": IMAGE_TOKEN + text}],
                                                 add_generation_prompt=True, tokenize=True)
        ids = list(ids)
        where = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(where) != 1:
            raise Ps3EdgeError(f"the chat template put {len(where)} image placeholders in the prompt, expected 1")
        img = where[0]
        end = next((i for i in range(img + 1, len(ids)) if ids[i] == self.im_end_id), None)
        if end is None:
            raise Ps3EdgeError("the chat template does not close the user turn with <|im_end|>")
        return ids, img, end - 1

    def check_context(self, settings: LookCloseSettings) -> int:
        need = required_context(settings, self.ps3)
        if need > self.context_length:
            raise Ps3EdgeError(
                f"context length {self.context_length} is too short for these look-close settings: VILA-HD "
                f"needs at least {need} (high-res patches / 4 + {CONTEXT_MARGIN}); lower NUM_LOOK_CLOSE "
                f"or NUM_TOKEN_LOOK_CLOSE")
        return need

    def check_prompt_size(self, ids: list[int], settings: LookCloseSettings) -> None:
        """Before any model work: the question, the low-res image, its newline and the most high-res
        cells these settings can select (selected patches / 4) must fit the context, so that an
        over-long question is refused up front, not after a prefill over all of it."""
        patches = resolve(settings, self.ps3.geometry).patches_asked
        lowres = math.ceil(self.ps3.cfg.lowres_grid / 2) ** 2
        text = len(ids) - 1                                          # without the <image> placeholder
        most = text + lowres + len(self.newline_ids) + patches // 4
        if most + 1 > self.context_length:
            raise Ps3EdgeError(f"the prompt could take {most} positions ({text} of question, up to {most - text} of "
                               f"image) and the model's context is {self.context_length}: shorten the question "
                               f"or lower NUM_LOOK_CLOSE / NUM_TOKEN_LOOK_CLOSE")

    def prompt_ids_of_messages(self, messages: list[dict], image_message: int) -> tuple[list[int], int, int]:
        """`prompt_ids` for a conversation: `messages` are {"role", "content"} with text content
        (system, user, assistant turns as the chat template takes them), the image goes in front
        of the text of message `image_message` (VILA's order, as `chat` puts it), and the top-down
        position is the last text token of the last turn, which must be the user's."""
        if not messages or messages[-1].get("role") != "user":
            raise Ps3EdgeError("the last message must be the user's: the model answers it")
        if any(IMAGE_TOKEN in m["content"] for m in messages):
            raise Ps3EdgeError(f"the messages must not contain {IMAGE_TOKEN}: the image goes in front of its message's text")
        turns = [dict(m) for m in messages]
        turns[image_message]["content"] = IMAGE_TOKEN + turns[image_message]["content"]
        ids = list(self.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True))
        where = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(where) != 1:
            raise Ps3EdgeError(f"the chat template put {len(where)} image placeholders in the prompt, expected 1")
        img = where[0]
        ends = [i for i in range(img + 1, len(ids)) if ids[i] == self.im_end_id]
        if not ends:
            raise Ps3EdgeError("the chat template does not close the user turn with <|im_end|>")
        return ids, img, ends[-1] - 1

    def request(self, text_or_messages, settings: LookCloseSettings, sampling: SamplingConfig | None = None,
                image_message: int = 0) -> "VilaRequest":
        """A question (or a conversation, as `prompt_ids_of_messages` takes it) checked for these
        settings before any model work: the context rule, the prompt's size, the sampling."""
        sampling = sampling or SamplingConfig()
        if not sampling.stop_token_ids:
            sampling = SamplingConfig(sampling.max_new_tokens, sampling.temperature, sampling.top_p,
                                      sampling.seed, self.stop_ids)
        sampling.validate()
        self.check_context(settings)
        if isinstance(text_or_messages, str):
            ids, img, look = self.prompt_ids(text_or_messages)
        else:
            ids, img, look = self.prompt_ids_of_messages(list(text_or_messages), image_message)
        self.check_prompt_size(ids, settings)
        return VilaRequest(ids, img, look, settings, sampling)

    # --- the whole thing -----------------------------------------------------------------------
    def answer(self, image, text: str, settings: LookCloseSettings, sampling: SamplingConfig | None = None,
               on_text: Callable[[str], None] | None = None) -> VilaAnswer:
        request = self.request(text, settings, sampling)
        return self.generate_answer(request, self.look_batch([image], [request])[0], on_text)

    def look_batch(self, images: list, requests: list["VilaRequest"]) -> list["LookedImage"]:
        """The vision side of several requests with equal look-close settings, image b for
        request b: the low-res pass as one batch, each request's top-down prompt (the LLM, one
        request at a time: it has one cache), then the selector and highres as one batch."""
        settings = requests[0].settings
        if any(r.settings != settings for r in requests) or len(images) != len(requests):
            raise Ps3EdgeError("a batch takes one image per request, all with the same look-close settings")
        r = self.ps3.layer_index(VILA_LAYER)
        C, g0 = self.ps3.cfg.width, self.ps3.cfg.lowres_grid
        low, t = self.ps3.run_lowres(list(images))
        shared = {k: v * 1e3 for k, v in t.items()}
        looked, prompts = [], []
        for b, request in enumerate(requests):
            times = dict(shared)
            t0 = time.perf_counter()
            low_cells = space_to_channel(low["lowres_features"][r, b].reshape(g0, g0, C)).reshape(-1, 4 * C)
            lowres_embeds = self.project(low_cells)                                   # (196, H)
            newline = self.embed(self.newline_ids)
            times["projector_lowres"] = (time.perf_counter() - t0) * 1e3
            prompt = None
            if settings.mode == "after_prompt" and self._head is not None:
                ids, img, look = request.ids, request.image_at, request.look_at
                t0 = time.perf_counter()
                prefix = np.concatenate([self.embed(ids[:img]), lowres_embeds, newline,
                                         self.embed(ids[img + 1: look + 1])])
                self.llm.reset()
                hidden = self.llm.prefill(prefix).hidden
                times["llm_top_down"] = (time.perf_counter() - t0) * 1e3
                prompt = self._head(hidden[None].astype(np.float32)).astype(np.float32)    # (1, C)
            prompts.append(prompt)
            looked.append(LookedImage(lowres_embeds, newline, prompt, times))
        results = self.ps3.run_batch_from_lowres(low, settings, prompts, VILA_LAYER)
        for item, result in zip(looked, results):
            item.result = result
            item.timings_ms.update({k: v for k, v in result.timings_ms.items() if k not in item.timings_ms})
        return looked

    def generate_answer(self, request: "VilaRequest", looked: "LookedImage",
                        on_text: Callable[[str], object] | None = None) -> VilaAnswer:
        """The language side of one request after `look_batch`: the high-res cells through the
        projector, the image spliced at <image>, generation. `on_text` gets each piece of text as
        it comes; a true return stops generating there (stop_reason "stopped")."""
        ids, img, sampling = request.ids, request.image_at, request.sampling
        g0 = self.ps3.cfg.lowres_grid
        result, times, newline = looked.result, dict(looked.timings_ms), looked.newline
        t0 = time.perf_counter()
        cells, counts = projector_cells(result.features[0], result.plan.selection_maps, g0)
        highres_embeds = self.project(cells[counts["lowres"]:])
        times["projector_highres"] = (time.perf_counter() - t0) * 1e3
        image_embeds = np.concatenate([looked.lowres_embeds, highres_embeds, newline])
        embeds = np.concatenate([self.embed(ids[:img]), image_embeds, self.embed(ids[img + 1:])])
        if len(embeds) + 1 > self.context_length:
            raise Ps3EdgeError(f"the prompt takes {len(embeds)} positions; the model's context is {self.context_length}")

        streamer = _Streamer(self.tokenizer, on_text) if on_text else None
        gen: Generation = generate(self.llm, embeds, lambda tok: self.embed([tok]), sampling,
                                   on_token=streamer, context_length=self.context_length)
        times.update(gen.timings_ms)
        if streamer and gen.stop_reason != "stopped":
            streamer.flush()
        scales = self.ps3.cfg.scales[1:]
        highres = {str(s): counts[str(g)] for s, g in zip(scales, self.ps3.cfg.highres_grids)}
        tokens = {"lowres": counts["lowres"], "highres": highres, "newline": len(newline),
                  "image": len(image_embeds), "text": len(ids) - 1, "prompt": len(embeds),
                  "generated": len(gen.token_ids), "ps3": int(result.features.shape[1])}
        answer = self.tokenizer.decode(gen.token_ids, skip_special_tokens=True)
        return VilaAnswer(answer, gen.token_ids, gen.stop_reason, tokens, times,
                          None if looked.prompt is None else looked.prompt[0], result.plan.selection_maps)


@dataclass(frozen=True)
class VilaRequest:
    """A question checked by `VilaPipeline.request`: its chat prompt ids, where <image> is, the
    top-down position, its look-close settings and sampling."""
    ids: list
    image_at: int
    look_at: int
    settings: LookCloseSettings
    sampling: SamplingConfig


@dataclass
class LookedImage:
    """What `look_batch` gives one request: its projected low-res image and newline, its top-down
    prompt (None: PS3's prior), its look-close result and the stage times so far."""
    lowres_embeds: np.ndarray
    newline: np.ndarray
    prompt: np.ndarray | None
    timings_ms: dict
    result: object = None


class _Streamer:
    """Turns token ids into text pieces as they come (holding back incomplete UTF-8)."""

    def __init__(self, tokenizer, on_text):
        self.tokenizer, self.on_text = tokenizer, on_text
        self.ids, self.sent = [], ""

    def __call__(self, token: int):
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd") and len(text) > len(self.sent):
            piece, self.sent = text[len(self.sent):], text
            return self.on_text(piece)           # true: the caller has what it wants, stop generating

    def flush(self):
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if len(text) > len(self.sent):
            self.on_text(text[len(self.sent):])
            self.sent = text
