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

Artifact (`export_vila`): `vila.json` (schema, source, LLM shape, context, sha256 of every file),
`ps3/` (a PS3 artifact, layer -2), `projector.onnx`, `llm.onnx`, `embed_tokens.npy`,
`prompt_head.npz` (the top-down head's weight / bias), `tokenizer/`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import __version__, defaults
from ..errors import Ps3EdgeError
from ..artifact.io import file_sha256, publish_dir, write_json_atomic
from ..model.config import is_whole_number
from ..model.projector import projector_cells, space_to_channel
from ..runtime.lookclose import Pipeline
from ..runtime.runners.registry import get_backend
from ..runtime.planning import LookCloseSettings, resolve_steps
from .engine import OnnxLLM, TensorRTLLM, TorchLLM, export_llm
from .generate import Generation, SamplingConfig, generate
from .tokenizer import IM_END, IMAGE_TOKEN, load_tokenizer, stop_token_ids
from .vila import VILA_PRESETS, VilaHD, build_vila

VILA_MANIFEST = "vila.json"
VILA_SCHEMA_VERSION = 1
VILA_LAYER = -2                       # VILA-HD feeds PS3's second-to-last block to the projector
CONTEXT_MARGIN = 1024                 # VILA-HD: context >= high-res patches / 4 + 1024


# ------------------------------------------------------------------------------------------
# export
# ------------------------------------------------------------------------------------------

def export_vila(model_spec: str, out_dir, seed: int = defaults.DEFAULT_SEED, opset: int = defaults.DEFAULT_OPSET,
                progress: Callable[[str], None] | None = None) -> dict:
    """Export every stage VILA-HD needs into `out_dir` (built in a hidden sibling, renamed into place)."""
    from ..exporter.onnx_export import export as export_ps3, export_projector

    say = progress or (lambda msg: None)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise Ps3EdgeError(f"{out_dir} exists and is not an empty directory")
    say(f"loading {model_spec}")
    model = build_vila(model_spec, seed)              # a bad model path fails before any directory is made
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.export-"))
    try:
        say("exporting PS3 stages")
        export_ps3(model.ps3, staging / "ps3", opset=opset, returned_layers=(VILA_LAYER,))
        say("exporting the projector")
        export_projector(model.projector, staging / "projector.onnx", opset=opset)
        say("exporting the LLM")
        export_llm(model.llm, staging / "llm.onnx", opset=opset)
        np.save(staging / "embed_tokens.npy", model.llm.get_input_embeddings().weight.detach().float().numpy())
        if model.top_down_head is not None:
            np.savez(staging / "prompt_head.npz", weight=model.top_down_head.weight.detach().float().numpy(),
                     bias=model.top_down_head.bias.detach().float().numpy())
        model.tokenizer.save_pretrained(str(staging / "tokenizer"))
        cfg = model.llm.config
        files = {f.relative_to(staging).as_posix(): file_sha256(f)
                 for f in sorted(staging.rglob("*")) if f.is_file() and not f.relative_to(staging).parts[0] == "ps3"}
        manifest = {
            "schema_version": VILA_SCHEMA_VERSION, "kind": "vila-hd", "ps3edge_version": __version__,
            "source": model.source, "context_length": model.context_length, "opset": opset,
            "llm": {"hidden_size": cfg.hidden_size, "num_layers": cfg.num_hidden_layers,
                    "num_heads": cfg.num_attention_heads, "num_kv_heads": cfg.num_key_value_heads,
                    "vocab_size": cfg.vocab_size},
            "top_down": model.top_down_head is not None, "files": files,
        }
        write_json_atomic(staging / VILA_MANIFEST, manifest)
        publish_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def load_vila_manifest(art: Path, verify: bool = True) -> dict:
    path = Path(art) / VILA_MANIFEST
    if not path.is_file():
        raise Ps3EdgeError(f"{art} is not a VILA-HD artifact (no {VILA_MANIFEST}); export one with 'ps3edge chat'")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise Ps3EdgeError(f"cannot read {path}: {e}") from None
    if not isinstance(manifest, dict):
        raise Ps3EdgeError(f"{path} is not a JSON object")
    version = manifest.get("schema_version")
    if isinstance(version, bool) or version != VILA_SCHEMA_VERSION:
        raise Ps3EdgeError(f"{path} has schema {version!r}, this ps3edge reads {VILA_SCHEMA_VERSION}")

    def whole(value) -> bool:
        return is_whole_number(value) and value >= 1

    if manifest.get("kind") != "vila-hd":
        raise Ps3EdgeError(f"{path}: kind must be 'vila-hd', got {manifest.get('kind')!r}")
    context = manifest.get("context_length")
    if not whole(context):
        raise Ps3EdgeError(f"{path}: context_length must be a positive whole number, got {context!r}")
    llm = manifest.get("llm")
    if not isinstance(llm, dict):
        raise Ps3EdgeError(f"{path} lacks the 'llm' section - re-export the model")
    for key in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size"):
        if not whole(llm.get(key)):
            raise Ps3EdgeError(f"{path}: llm.{key} must be a positive whole number, got {llm.get(key)!r}")
    if llm.get("head_dim") is not None and not whole(llm["head_dim"]):
        raise Ps3EdgeError(f"{path}: llm.head_dim must be a positive whole number, got {llm['head_dim']!r}")
    if not isinstance(manifest.get("source"), dict):
        raise Ps3EdgeError(f"{path} lacks the 'source' section - re-export the model")
    files = manifest.get("files", {})
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise Ps3EdgeError(f"{path}: 'files' must map file names to sha256 strings")
    if verify:
        for name, digest in files.items():
            f = Path(art) / name
            if not f.is_file():
                raise Ps3EdgeError(f"VILA-HD artifact {art} lacks {name}")
            if file_sha256(f) != digest:
                raise Ps3EdgeError(f"VILA-HD artifact {art}: {name} does not match its sha256 in {VILA_MANIFEST}")
    return manifest


def cache_dir_for(model_spec: str, seed: int) -> Path:
    """Where `ps3edge chat` keeps the export of a model: one directory per preset+seed or checkpoint."""
    root = Path(os.environ.get("PS3EDGE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ps3edge")
    if model_spec in VILA_PRESETS:
        key = f"{model_spec}-seed{seed}"
    else:
        import hashlib
        key = f"{Path(model_spec).name}-{hashlib.sha256(str(Path(model_spec).resolve()).encode()).hexdigest()[:12]}"
    return root / f"vila-{__version__}" / key


def ensure_artifacts(model_spec: str, seed: int = defaults.DEFAULT_SEED, progress=None) -> Path:
    """The cached export of `model_spec`, exporting it first if absent or stale."""
    art = cache_dir_for(model_spec, seed)
    if (art / VILA_MANIFEST).is_file():
        manifest = load_vila_manifest(art, verify=False)
        if model_spec in VILA_PRESETS or manifest["source"].get("sha256") == build_source_sha(model_spec):
            return art
        shutil.rmtree(art)
    elif art.exists():
        shutil.rmtree(art)
    export_vila(model_spec, art, seed=seed, progress=progress)
    return art


def build_source_sha(model_spec: str) -> str | None:
    from .vila import checkpoint_sha256
    return checkpoint_sha256(model_spec) if Path(model_spec).is_dir() else None


# ------------------------------------------------------------------------------------------
# running
# ------------------------------------------------------------------------------------------

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
    budget, targets = resolve_steps(settings, pipeline.geometry)
    patches = sum(sum(budget) if t is None else t for t in targets)
    return patches // 4 + CONTEXT_MARGIN


class VilaPipeline:
    """A VILA-HD artifact on one backend: `onnxruntime` (the exported files), `torch` (the
    reference: transformers' Qwen2 and our PyTorch PS3 / projector, rebuilt from the source) or
    `tensorrt` (the engines of `ps3edge build ARTIFACT`: PS3 stages, projector, LLM)."""

    def __init__(self, artifact_dir, backend: str = "onnxruntime", verify: bool = True):
        get_backend(backend)                  # refuses an unknown name
        self.art = Path(artifact_dir)
        self.manifest = load_vila_manifest(self.art, verify)
        self.backend = backend
        if backend == "tensorrt":
            missing = [s for s in ("projector", "llm") if s not in (self.manifest.get("engines") or {})]
            if missing:
                raise Ps3EdgeError(f"{self.art} has no TensorRT engine for {', '.join(missing)}; build them with "
                                   f"'ps3edge build {self.art}'")
        # the torch backend's whole model, built once: its vision tower also runs the PS3 stages
        model = self._rebuild() if backend == "torch" else None
        # VILA-HD looks at the low-res tokens before it selects (run_lowres / run_from_lowres),
        # which the one-program GPU fast path does not split; its torch backend stays staged
        self.ps3 = Pipeline(self.art / "ps3", backend, verify=verify, fast=False if backend == "torch" else None,
                            loaded=model.ps3 if model is not None else None)
        self.tokenizer = load_tokenizer(self.art / "tokenizer")
        self.context_length = int(self.manifest["context_length"])
        if backend in ("onnxruntime", "tensorrt"):
            if backend == "onnxruntime":
                self.llm = OnnxLLM(self.art / "llm.onnx")
                from ..runtime.runners.onnxruntime import OnnxRuntimeRunner
                stage = OnnxRuntimeRunner.from_path(self.art / "projector.onnx")
            else:
                stage = self._tensorrt_engines()
            self._project = lambda cells: stage.infer({"cells": cells})["embeddings"]
            self.embed_table = np.load(self.art / "embed_tokens.npy")
            head = np.load(self.art / "prompt_head.npz") if self.manifest.get("top_down") else None
            self._head = (lambda h: h @ head["weight"].T + head["bias"]) if head is not None else None
        else:
            self.llm = TorchLLM(model.llm)
            self.embed_table = model.llm.get_input_embeddings().weight.detach().float().numpy()

            def project(cells):
                with torch.inference_mode():
                    return model.projector(torch.from_numpy(cells)).numpy()
            self._project = project
            if model.top_down_head is not None:
                def head_fn(h):
                    with torch.inference_mode():
                        return model.top_down_head(torch.from_numpy(h)).numpy()
                self._head = head_fn
            else:
                self._head = None
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.im_end_id = self.tokenizer.convert_tokens_to_ids(IM_END)
        self.newline_ids = self.tokenizer.encode("\n", add_special_tokens=False)
        self.stop_ids = tuple(stop_token_ids(self.tokenizer))

    def _tensorrt_engines(self):
        """The projector as a TensorRTRunner and the LLM as a TensorRTLLM (sets self.llm), after
        checking both engines against this machine's TensorRT and GPU."""
        from ..engines.llm_engine import projector_width, vila_stage_specs
        from ..engines.platform import check_engine_compatible, import_tensorrt, machine_facts
        from ..artifact.manifest import Record, StageEntry
        from ..runtime.runners.tensorrt import TensorRTRunner

        trt = import_tensorrt()
        here = machine_facts(trt)
        engines = self.manifest["engines"]
        for name in ("projector", "llm"):
            check_engine_compatible(name, engines[name], here)
        stream = torch.cuda.Stream()
        specs = vila_stage_specs(self.manifest, projector_width(self.art))
        self.llm = TensorRTLLM(self.art / engines["llm"]["file"], engines["llm"], trt, stream)
        projector = StageEntry.from_dict("projector", {"file": engines["projector"]["file"], **specs["projector"]})
        return TensorRTRunner.from_record(self.art, "projector", projector, Record(engines["projector"]), trt, stream)

    def _rebuild(self) -> VilaHD:
        source = self.manifest["source"]
        if source.get("kind") == "preset":
            return build_vila(source["name"], int(source.get("seed", defaults.DEFAULT_SEED)))
        model = build_vila(source["path"])
        if model.source.get("sha256") != source.get("sha256"):
            raise Ps3EdgeError(f"checkpoint {source['path']} changed since export; re-export the artifact")
        return model

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

    # --- the whole thing -----------------------------------------------------------------------
    def answer(self, image, text: str, settings: LookCloseSettings, sampling: SamplingConfig | None = None,
               on_text: Callable[[str], None] | None = None) -> VilaAnswer:
        sampling = sampling or SamplingConfig()
        if not sampling.stop_token_ids:
            sampling = SamplingConfig(sampling.max_new_tokens, sampling.temperature, sampling.top_p,
                                      sampling.seed, self.stop_ids)
        sampling.validate()
        self.check_context(settings)
        ids, img, look = self.prompt_ids(text)
        r = self.ps3.layer_index(VILA_LAYER)
        C, g0 = self.ps3.cfg.width, self.ps3.cfg.lowres_grid
        times = {}

        low, t = self.ps3.run_lowres(image)
        times.update({k: v * 1e3 for k, v in t.items()})
        t0 = time.perf_counter()
        low_cells = space_to_channel(low["lowres_features"][r, 0].reshape(g0, g0, C)).reshape(-1, 4 * C)
        lowres_embeds = self.project(low_cells)                                       # (196, H)
        newline = self.embed(self.newline_ids)
        times["projector_lowres"] = (time.perf_counter() - t0) * 1e3

        prompt = None
        if settings.mode == "after_prompt" and self._head is not None:
            t0 = time.perf_counter()
            prefix = np.concatenate([self.embed(ids[:img]), lowres_embeds, newline, self.embed(ids[img + 1: look + 1])])
            self.llm.reset()
            hidden = self.llm.prefill(prefix).hidden
            times["llm_top_down"] = (time.perf_counter() - t0) * 1e3
            prompt = self._head(hidden[None].astype(np.float32)).astype(np.float32)    # (1, C)

        result = self.ps3.run_from_lowres(low, settings, prompt, VILA_LAYER)
        times.update({k: v for k, v in result.timings_ms.items() if k not in times})

        t0 = time.perf_counter()
        cells, counts = projector_cells(result.features[0], result.plan.selection_maps, g0)
        highres_embeds = self.project(cells[counts["lowres"]:])
        times["projector_highres"] = (time.perf_counter() - t0) * 1e3
        image_embeds = np.concatenate([lowres_embeds, highres_embeds, newline])
        embeds = np.concatenate([self.embed(ids[:img]), image_embeds, self.embed(ids[img + 1:])])
        if len(embeds) + 1 > self.context_length:
            raise Ps3EdgeError(f"the prompt takes {len(embeds)} positions; the model's context is {self.context_length}")

        streamer = _Streamer(self.tokenizer, on_text) if on_text else None
        gen: Generation = generate(self.llm, embeds, lambda tok: self.embed([tok]), sampling,
                                   on_token=streamer, context_length=self.context_length)
        times.update(gen.timings_ms)
        if streamer:
            streamer.flush()
        scales = self.ps3.cfg.scales[1:]
        highres = {str(s): counts[str(g)] for s, g in zip(scales, self.ps3.cfg.highres_grids)}
        tokens = {"lowres": counts["lowres"], "highres": highres, "newline": len(newline),
                  "image": len(image_embeds), "text": len(ids) - 1, "prompt": len(embeds),
                  "generated": len(gen.token_ids), "ps3": int(result.features.shape[1])}
        answer = self.tokenizer.decode(gen.token_ids, skip_special_tokens=True)
        return VilaAnswer(answer, gen.token_ids, gen.stop_reason, tokens, times,
                          None if prompt is None else prompt[0], result.plan.selection_maps)


class _Streamer:
    """Turns token ids into text pieces as they come (holding back incomplete UTF-8)."""

    def __init__(self, tokenizer, on_text):
        self.tokenizer, self.on_text = tokenizer, on_text
        self.ids, self.sent = [], ""

    def __call__(self, token: int):
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd") and len(text) > len(self.sent):
            self.on_text(text[len(self.sent):])
            self.sent = text

    def flush(self):
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if len(text) > len(self.sent):
            self.on_text(text[len(self.sent):])
            self.sent = text
