"""The `torch` backend: our own PyTorch stage modules, rebuilt from the manifest's weight source,
so an artifact can be checked against the model it came from.

The staged modules run on the CPU, in fp32 or in fp16 / bf16 by the precision policy of
calibration/precision.py; on CUDA the torch backend is the device-resident fast path
(runtime/fast.py), which does not go through these runners. Arrays cross as numpy, converted
without copying.
"""

from __future__ import annotations

import numpy as np

from .base import StageRunner
from .probe import Facts
from .registry import Backend


class TorchRunner(StageRunner):
    """One stage module in eval mode. `model`: the PS3 model (fp32, as rebuilt from the
    manifest's weight source) the stage modules were made from - what parity and the benchmarks
    compare the official model with."""

    backend = "torch"

    def __init__(self, name: str, entry, loader, model=None):
        super().__init__(name, entry, loader, device="cpu")
        self.model = model
        self.module = None

    def _activate(self, module) -> None:
        self.module = module.eval()

    def _release(self) -> None:
        self.module = None
        self.model = None

    def _infer(self, feed: dict) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            outputs = self.module(*[torch.from_numpy(np.ascontiguousarray(feed[k])) for k in self.input_names])
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        return {name: out.numpy() for name, out in zip(self.output_names, outputs)}


class TorchBackend(Backend):
    name = "torch"
    devices = {"cpu": ("fp32", "bf16"), "cuda": ("fp32", "fp16", "bf16")}
    CPU_NOTES = {"fp32": "CPU", "bf16": "CPU (slow; for checks, not speed)"}

    def available(self, device=None, precision=None, facts=None):
        facts = facts or Facts()
        ok, why = facts.usable("torch")
        if not ok or device is None:
            return ok, why
        if device == "cpu":
            return True, self.CPU_NOTES.get(precision or "fp32", "CPU")
        if facts.cuda_missing():
            return False, facts.cuda_missing()
        first = facts.cuda["devices"][0] if facts.cuda["devices"] else {}
        if precision == "bf16" and first.get("bf16") is False:
            return False, "this GPU has no bf16 support"
        return True, f"{first.get('name')}: fast path (CUDA graph, device preprocessing)"

    def load_stages(self, artifact_dir, manifest, precision="fp32", loaded=None):
        from ...artifact.weights import rebuild_torch_model
        from ...model import HighResStage, LowResStage, SelectorStage

        model = rebuild_torch_model(manifest, loaded)
        layers = list(manifest.returned_layers)
        if precision == "fp32":
            modules = {"lowres": LowResStage(model, layers), "selector": SelectorStage(model),
                       "highres": HighResStage(model, layers)}
        else:
            from ...calibration.precision import torch_stage_modules
            modules = torch_stage_modules(model, layers, precision)
        return {name: TorchRunner(name, entry, (lambda m=modules[name]: m), model=model).activate()
                for name, entry in manifest.stages.items()}


BACKEND = TorchBackend()
