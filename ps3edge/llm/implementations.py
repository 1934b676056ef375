"""The registry of VILA-HD's language-side implementations: name -> how an artifact's projector,
LLM and top-down prompt head run, and whether they can run here.

    impl = get_implementation("onnxruntime")
    impl.available()                  # (True, "") or (False, why), as the stage backends answer
    impl.require()                    # or one Ps3EdgeError line, before anything is exported
    impl.check(art, manifest)         # what the artifact must hold for it (TensorRT: engines)
    impl.check_precision(art, manifest, "int4")   # an LLM precision it runs and the artifact holds
    side = impl.open(art, manifest, "int4")       # a LanguageSide: llm, project, head, embed_table, ps3_model

- onnxruntime: the exported files (llm.onnx on `engine.OnnxLLM`, projector.onnx, the token
  embedding table and the prompt head as numpy); also the int4 precision of vila.json (llm.int4.onnx,
  the INT4 embedding dequantized per looked-up row: int4.py);
- torch: the reference, rebuilt from the recorded source: transformers' Qwen2 (`engine.TorchLLM`)
  and our PyTorch projector and head; its PS3 model is handed to the PS3 pipeline (`ps3_model`);
- tensorrt: the engines of `ps3edge build ARTIFACT` (projector and `engine.TensorRTLLM`), the
  tables as for onnxruntime.

Each runs PS3's stages on the stage backend of the same name (runtime/runners/registry.py), its
`ps3_backend`. The VILA-HD pipeline (pipeline.py) and `ps3edge chat` ask the implementation what
it needs and can do; which one they hold is decided here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .. import defaults
from ..errors import Ps3EdgeError
from ..runtime.runners.registry import BACKENDS, get_backend

IMPLEMENTATIONS = BACKENDS            # one implementation per stage backend, by the same name


@dataclass
class LanguageSide:
    """What an implementation gives the VILA-HD pipeline."""
    llm: object                                    # an engine.LLMRunner: prefill / decode on embeddings
    project: Callable[[np.ndarray], np.ndarray]    # (n, 4C) float32 cells -> (n, H) embeddings
    head: Callable[[np.ndarray], np.ndarray] | None   # (1, H) hidden -> (1, C) PS3 prompt; None: no top-down head
    embed_table: np.ndarray                        # (V, H) token embeddings (int4: an Int4Embedding, rows on demand)
    ps3_model: object = None                       # the PS3 LoadedModel the PS3 pipeline shares (torch)


class Implementation:
    name = ""
    llm_precisions: tuple[str, ...] = ("fp32",)      # the LLM precisions (vila.json) it runs

    @property
    def ps3_backend(self) -> str:
        """The stage backend PS3's stages run on beside this implementation."""
        return self.name

    def available(self, facts=None) -> tuple[bool, str]:
        """Whether this implementation runs here, and why not in a few words."""
        return get_backend(self.ps3_backend).available(facts=facts)

    def require(self) -> None:
        """Nothing, or one Ps3EdgeError line saying why this implementation cannot run here."""
        ok, why = self.available()
        if not ok:
            raise Ps3EdgeError(f"--backend {self.name} cannot run here: {why}")

    def check(self, art: Path, manifest) -> None:
        """Refuse, in one line, an artifact that lacks what this implementation runs."""

    def check_precision(self, art: Path, manifest, precision: str) -> None:
        """Refuse, in one line, an LLM precision this implementation does not run or the artifact lacks."""
        manifest.llm_files(precision, art)                 # unknown, or not calibrated: its own line
        if precision not in self.llm_precisions:
            raise Ps3EdgeError(f"--precision {precision} runs on --backend "
                               f"{' or '.join(i.name for i in _REGISTRY.values() if precision in i.llm_precisions)}"
                               f"; --backend {self.name} runs the LLM in {', '.join(self.llm_precisions)}")

    def open(self, art: Path, manifest, precision: str = "fp32") -> LanguageSide:
        raise NotImplementedError


def _exported_tables(art: Path, manifest, embed_file: str = "embed_tokens.npy") -> tuple[Callable | None, object]:
    """The prompt head (None without one) and the token embeddings, as the export (or, an .npz,
    `calibrate --precision int4`) wrote them."""
    from .int4 import Int4Embedding

    head = np.load(art / "prompt_head.npz") if manifest.top_down else None
    apply = (lambda h: h @ head["weight"].T + head["bias"]) if head is not None else None
    table = Int4Embedding.load(art / embed_file) if embed_file.endswith(".npz") else np.load(art / embed_file)
    return apply, table


def _projector_call(stage) -> Callable[[np.ndarray], np.ndarray]:
    return lambda cells: stage.infer({"cells": cells})["embeddings"]


class OnnxRuntimeImplementation(Implementation):
    name = "onnxruntime"
    llm_precisions = defaults.LLM_PRECISIONS

    def open(self, art, manifest, precision: str = "fp32"):
        from ..runtime.runners.onnxruntime import OnnxRuntimeRunner
        from .engine import OnnxLLM

        llm_file, embed_file = manifest.llm_files(precision, art)
        llm = OnnxLLM(art / llm_file)
        projector = OnnxRuntimeRunner.from_path(art / "projector.onnx")
        head, embed_table = _exported_tables(art, manifest, embed_file)
        return LanguageSide(llm, _projector_call(projector), head, embed_table)


class TorchImplementation(Implementation):
    name = "torch"

    def open(self, art, manifest, precision: str = "fp32"):
        import torch

        from .engine import TorchLLM

        model = _rebuild(manifest)

        def project(cells):
            with torch.inference_mode():
                return model.projector(torch.from_numpy(cells)).numpy()

        def head(h):
            with torch.inference_mode():
                return model.top_down_head(torch.from_numpy(h)).numpy()
        embed_table = model.llm.get_input_embeddings().weight.detach().float().numpy()
        return LanguageSide(TorchLLM(model.llm), project, head if model.top_down_head is not None else None,
                            embed_table, ps3_model=model.ps3)


def _rebuild(manifest):
    """The whole VILA-HD model from the artifact's recorded source: a preset, or the checkpoint
    it was exported from (refused if it changed since)."""
    from ..model.hub import recorded_checkpoint
    from .vila import build_vila, load_vila

    source = manifest.source
    if source.get("kind") == "preset":
        return build_vila(source["name"], int(source.get("seed", defaults.DEFAULT_SEED)))
    model = load_vila(recorded_checkpoint(source))
    if model.source.get("sha256") != source.get("sha256"):
        raise Ps3EdgeError(f"checkpoint {source['path']} changed since export; re-export the artifact")
    return model


class TensorRTImplementation(Implementation):
    name = "tensorrt"
    ENGINES = ("projector", "llm")

    def require(self) -> None:
        from ..engines.platform import import_tensorrt

        import_tensorrt()                    # no TensorRT: its install hint, in one line
        super().require()

    def check(self, art, manifest):
        missing = [s for s in self.ENGINES if s not in manifest.engines]
        if missing:
            raise Ps3EdgeError(f"{art} has no TensorRT engine for {', '.join(missing)}; build them with "
                               f"'ps3edge build {art}'")

    def open(self, art, manifest, precision: str = "fp32"):
        """The projector as a TensorRTRunner and the LLM as a TensorRTLLM, after checking both
        engines against this machine's TensorRT and GPU."""
        import torch

        from ..artifact.manifest import StageEntry
        from ..engines.llm_engine import projector_width, vila_stage_specs
        from ..engines.platform import check_engine_compatible, import_tensorrt, machine_facts
        from ..runtime.runners.tensorrt import TensorRTRunner
        from .engine import TensorRTLLM

        trt = import_tensorrt()
        here = machine_facts(trt)
        engines = manifest.engines
        for name in self.ENGINES:
            check_engine_compatible(name, engines[name], here)
        stream = torch.cuda.Stream()
        specs = vila_stage_specs(manifest, projector_width(art))
        llm = TensorRTLLM(art / engines["llm"].file, engines["llm"], trt, stream)
        entry = StageEntry.from_dict("projector", {"file": engines["projector"].file, **specs["projector"]})
        projector = TensorRTRunner.from_record(art, "projector", entry, engines["projector"], trt, stream)
        head, embed_table = _exported_tables(art, manifest)
        return LanguageSide(llm, _projector_call(projector), head, embed_table)


_REGISTRY = {impl.name: impl for impl in (OnnxRuntimeImplementation(), TorchImplementation(),
                                          TensorRTImplementation())}


def get_implementation(name: str) -> Implementation:
    """The implementation called `name`, or a one-line Ps3EdgeError naming the choices."""
    if name not in _REGISTRY:
        raise Ps3EdgeError(f"unknown backend '{name}'; choose one of: {', '.join(IMPLEMENTATIONS)}")
    return _REGISTRY[name]


def implementations() -> list[Implementation]:
    return [get_implementation(name) for name in IMPLEMENTATIONS]
