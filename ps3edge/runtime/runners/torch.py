"""The `torch` backend: our own PyTorch stage modules, rebuilt from the manifest's weight source,
so an artifact can be checked against the model it came from.

The staged modules run on the CPU, in fp32 or in fp16 / bf16 by the precision policy of
calibration/precision.py. Arrays cross as numpy, converted without copying.

On CUDA the torch backend is the device-resident fast path instead: the whole look-close loop as
one program (runtime/fast.py FastLookClose) behind a `FastSession`, preprocessing on its device.
That choice is made here, in `TorchBackend.open` (auto: CUDA when torch sees a GPU, and there the
fast path), so the pipeline only reads what the session states (session.py). The fast path runs
on the CPU too when asked for (whole_loop=True), which is how it is checked without a GPU.
"""

from __future__ import annotations

import ctypes
import functools
import sys

import numpy as np

from ... import defaults
from ...errors import Ps3EdgeError
from ..device import CPU, Device, on_torch
from ..timing import StageTimes
from .base import StageRunner
from .probe import Facts
from .registry import Backend
from .session import Session

FAST_PRECISIONS = ("fp32", "fp16", "bf16")


class TorchRunner(StageRunner):
    """One stage module in eval mode. `model`: the PS3 model (fp32, as rebuilt from the
    manifest's weight source) the stage modules were made from - what parity and the benchmarks
    compare the official model with."""

    backend = "torch"

    def __init__(self, name: str, entry, loader, model=None):
        super().__init__(name, entry, loader, device=CPU)
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
        outputs = {name: out.numpy() for name, out in zip(self.output_names, outputs)}
        release_free_heap()
        return outputs


def release_free_heap() -> None:
    """Give the pages malloc keeps free back to the system (glibc's malloc_trim; elsewhere nothing).

    A stage's activations below glibc's mmap threshold (32 MiB at most) come from the heap, and
    the long-lived outputs among them leave the freed space in pieces that malloc keeps resident,
    through every later call: 80-90 MiB after the 4K lowres stage (370 MiB before its K/V cache
    was filled in place). Trimming takes about 10 ms and changes no value."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim          # glibc; musl has none
    except (OSError, AttributeError):
        return None


def cpu_rows_per_call(manifest) -> int | None:
    """The most look-close rows one highres call takes on the staged torch path, or None (no
    bound of its own) where the default steps fit: each block's MLP activation, rows x N x
    mlp_dim floats (42 MiB a row for the real models), within TORCH_CPU_HIGHRES_MLP_BYTES. A
    call's working memory grows with its rows (4K, 6 rows: 1.2 GB above the model; 1 row: 0.25
    GB) while rows of 2560 tokens already fill the CPU's matrix units."""
    from ...artifact.profiles import look_close_steps

    per_row = manifest.geometry.max_tokens_per_highres_call * manifest.config.mlp_dim * 4
    rows = max(1, defaults.TORCH_CPU_HIGHRES_MLP_BYTES // per_row)
    return rows if rows < look_close_steps(manifest) else None


class FastSession(Session):
    """The whole look-close loop as one device-resident program (fast.FastLookClose), with the
    images preprocessed on its device. The staged runners load only if asked for (`stages`)."""

    whole_loop = True
    preprocesses_on_device = True

    def __init__(self, program, device: Device, precision: str, load_stages):
        super().__init__(TorchBackend.name, device, precision, load_stages)
        self.program = program
        self.last_timings: dict[str, float] = {}      # the last run_loop's stages, in seconds

    @property
    def preprocess_device(self) -> Device:
        return self.device

    @property
    def label(self) -> str:
        return f"{self.backend}, {self.device}, fast path"

    @property
    def device_label(self) -> str:
        import torch
        return torch.cuda.get_device_name(self.device.torch()) if self.device.is_cuda else "cpu"

    def synchronize(self) -> None:
        if self.device.is_cuda:
            import torch
            torch.cuda.synchronize(self.device.torch())

    def run_loop(self, pixels, schedule, prompts, layer: int) -> tuple[np.ndarray, np.ndarray, list]:
        """pixels (B,3,S,S) on the device, the pass's schedule (planning.resolve), prompts (B,C)
        numpy or None (the learned prior everywhere), `layer` the block whose features come back
        -> host arrays: features (B,tokens,C) and prob (B,G0,G0) float32, each step's global
        patch indices (B,N_t). Times itself into `last_timings`: the device program, the copy."""
        import torch

        if self.closed:
            raise Ps3EdgeError(f"this {self.backend} session is closed; open the artifact again")
        times = StageTimes()
        prompt = None if prompts is None else torch.from_numpy(prompts).to(pixels.device)
        with times.measure("look-close (device)", self.synchronize):
            out = self.program.graphed(pixels, schedule.counts, smooth=schedule.smooth, prompt=prompt, layer=layer)
        with times.measure("to host"):
            features = out.features.float().cpu().numpy()                        # (B,tokens,C)
            prob = out.prob.float().cpu().numpy()                                # (B,G0,G0)
            steps = [s.cpu().numpy() for s in out.steps]                         # each (B,N_t)
        self.last_timings = times.seconds
        return features, prob, steps

    def close(self) -> None:
        super().close()
        self.program = None


class TorchBackend(Backend):
    name = "torch"
    devices = {"cpu": ("fp32", "bf16"), "cuda": ("fp32", "fp16", "bf16")}
    CPU_NOTES = {"fp32": "CPU", "bf16": "CPU (slow; for checks, not speed)"}
    takes_device = True
    runs_whole_loop = True
    cast_precisions = FAST_PRECISIONS

    def resolve_device(self, device: Device) -> Device:
        return on_torch(device)

    def open(self, artifact_dir, manifest, device=None, precision="fp32", loaded=None, whole_loop=None):
        """On CUDA the fast path (FastSession), on the CPU the staged modules; whole_loop True or
        False asks for one of them (the fast path on the CPU, or staged where auto finds CUDA).
        `loaded`: the artifact's PS3 model when the caller holds it; the fast path moves it to
        its device and dtype."""
        asked = Device.parse(device)
        runs_on = self.resolve_device(asked)
        if whole_loop is None:
            whole_loop = runs_on.is_cuda
        if whole_loop:
            return self._open_fast(artifact_dir, manifest, runs_on, precision, loaded)
        if runs_on.is_cuda and not asked.is_auto:
            raise Ps3EdgeError("the staged torch backend runs on the CPU; on CUDA the torch backend is the fast path")
        return self.staged(artifact_dir, manifest, CPU, precision, loaded)

    def _open_fast(self, artifact_dir, manifest, device: Device, precision: str, loaded) -> FastSession:
        from ...artifact.weights import rebuild_torch_model
        from ..fast import FastLookClose

        if precision not in FAST_PRECISIONS:
            raise Ps3EdgeError(f"the torch fast path runs in {', '.join(FAST_PRECISIONS)}, not {precision} "
                               f"(--device cpu runs the staged torch path)")
        program = FastLookClose(rebuild_torch_model(manifest, loaded), device=device.torch(), dtype=precision)
        return FastSession(program, device, precision,
                           lambda: self.load_stages(artifact_dir, manifest, precision, loaded))

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
            # the highres positions row by row, not as a table beside the residuals (stages.py)
            modules = {"lowres": LowResStage(model, layers), "selector": SelectorStage(model),
                       "highres": HighResStage(model, layers, bake_positions=False)}
        else:
            from ...calibration.precision import torch_stage_modules
            modules = torch_stage_modules(model, layers, precision)
        runners = {name: TorchRunner(name, entry, (lambda m=modules[name]: m), model=model).activate()
                   for name, entry in manifest.stages.items()}
        runners["highres"].max_steps_per_call = cpu_rows_per_call(manifest)
        return runners


BACKEND = TorchBackend()
