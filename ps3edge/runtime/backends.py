"""Stage backends behind one small interface: `infer(feed) -> outputs`, keyed by tensor name.

- `onnxruntime`: runs the exported ONNX files; providers are chosen from what is installed
  (CUDA when onnxruntime-gpu is present, else CPU).
- `torch`: runs our own PyTorch stage modules, rebuilt from the manifest's weight source, so an
  artifact can be checked against the model it came from.

Arrays cross the interface as numpy; the torch backend converts without copying.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .. import defaults
from ..errors import Ps3EdgeError
from ..exporter.manifest import config_from_manifest
from ..model import HighResStage, LowResStage, SelectorStage, build, load_checkpoint

BACKENDS = ("onnxruntime", "torch")


class OnnxRuntimeStage:
    def __init__(self, path: Path, providers: list[str] | None = None, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        self.providers = providers or preferred_ort_providers()
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=self.providers)
        except Exception as e:  # onnxruntime raises its own exception types for bad models
            raise Ps3EdgeError(f"onnxruntime cannot load {path.name}: {str(e).splitlines()[0]}") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.session.run(self.output_names, {k: feed[k] for k in self.input_names})
        return dict(zip(self.output_names, outputs))


class TorchStage:
    def __init__(self, module: torch.nn.Module, input_names, output_names):
        self.module = module.eval()
        self.input_names = list(input_names)
        self.output_names = list(output_names)

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            outputs = self.module(*[torch.from_numpy(np.ascontiguousarray(feed[k])) for k in self.input_names])
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        return {name: out.numpy() for name, out in zip(self.output_names, outputs)}


def preferred_ort_providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    return wanted or available


def _rebuild_torch_model(manifest: dict):
    source = manifest.get("source", {})
    if source.get("kind") == "preset":
        loaded = build(source["name"], seed=int(source.get("seed", defaults.DEFAULT_SEED)))
    elif source.get("kind") == "checkpoint":
        loaded = load_checkpoint(Path(source["path"]))
        if loaded.source["sha256"] != source.get("sha256"):
            raise Ps3EdgeError(f"checkpoint {source['path']} changed since export; the torch backend "
                               "would not match the artifact - re-export")
    else:
        raise Ps3EdgeError("the manifest does not say where the weights came from; the torch backend needs it")
    expected = config_from_manifest(manifest)
    if loaded.cfg.to_dict() != expected.to_dict():
        raise Ps3EdgeError("the model rebuilt for the torch backend differs from the manifest's config")
    return loaded.model


def load_stages(artifact_dir: Path, manifest: dict, backend: str) -> dict:
    """name -> runner for the three stages of an artifact, on the chosen backend."""
    if backend not in BACKENDS:
        raise Ps3EdgeError(f"unknown backend '{backend}'; choose one of: {', '.join(BACKENDS)}")
    stages = manifest["stages"]
    if backend == "onnxruntime":
        return {name: OnnxRuntimeStage(Path(artifact_dir) / info["file"]) for name, info in stages.items()}
    model = _rebuild_torch_model(manifest)
    layers = manifest["returned_layers"]
    modules = {"lowres": LowResStage(model, layers), "selector": SelectorStage(model),
               "highres": HighResStage(model, layers)}
    return {name: TorchStage(modules[name], [t["name"] for t in info["inputs"]],
                             [t["name"] for t in info["outputs"]])
            for name, info in stages.items()}
