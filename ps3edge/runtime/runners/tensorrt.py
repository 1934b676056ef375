"""The `tensorrt` backend: the engines of `ps3edge build` (the manifest's `engines` section).

Engines are checked against this machine first (engines/platform.py: one line when the TensorRT
release or GPU architecture differs) and deserialized with Polygraphy's `EngineFromPath` loader
(polygraphy/backend/trt/loader.py: it registers TensorRT's plugins, allows the host code of
version-compatible engines and, in its TensorRT 10 releases, streams the file through its
FileReader, so a multi-GB engine is not read into host memory first); TensorRT tensor types map
to torch's through Polygraphy's `DataType`. Polygraphy and TensorRT are the `tensorrt` extra,
imported only when an engine is loaded.

Execution stays hand-written instead of Polygraphy's `TrtRunner` (polygraphy/backend/trt/
runner.py), for what that runner does differently:
- `TrtRunner.activate_impl` creates a CUDA stream per runner (`cuda.Stream()`); our stages, and
  VILA-HD's projector and LLM, share one torch CUDA stream, so one stage's output feeds the next
  without cross-stream synchronisation and benchmarks/trt_check.py times them with CUDA events
  recorded on it.
- `TrtRunner._infer_impl` copies host inputs into per-call resized buffers (trt/util.py
  `_get_array_on_gpu`), sets an output allocator on every output on every call, and returns the
  outputs in that allocator's buffers. Ours binds one buffer per tensor, allocated at the
  profile's max shape, once (set_tensor_address at activation); a call only copies the inputs in
  and sets their shapes, and `infer_device` returns zero-copy torch views of the output buffers.
  The LLM (llm/engine.py) writes its present KV cache straight into the buffer that becomes the
  next call's past, which needs tensor addresses of our choosing.
- every `TrtRunner` call turns on the debug-tensor listener where TensorRT has one
  (`set_all_tensors_debug_state`, `set_debug_listener`): work the look-close loop does not need.
- its failures print through Polygraphy's logger before they raise; ours are one line.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np

from ...errors import Ps3EdgeError
from ..device import CUDA
from .base import StageRunner
from .probe import Facts
from .registry import Backend

INSTALL_POLYGRAPHY = "pip install polygraphy (it comes with the tensorrt extra: pip install 'ps3edge[tensorrt]')"


@contextlib.contextmanager
def _quiet_polygraphy():
    """Polygraphy's logger prints a failure before raising it; ps3edge reports it in one line."""
    from polygraphy.logger import G_LOGGER

    with G_LOGGER.verbosity(G_LOGGER.CRITICAL + 1):
        yield


def import_polygraphy_trt():
    """polygraphy.backend.trt, or a one-line Ps3EdgeError saying how to install it."""
    try:
        from polygraphy.backend import trt as polygraphy_trt
    except ImportError as e:
        raise Ps3EdgeError(f"Polygraphy is not installed here ({e}); the tensorrt backend loads engines with it: "
                           f"{INSTALL_POLYGRAPHY}") from None
    return polygraphy_trt


def engine_loader(trt, path: Path):
    """A loader: () -> (runtime, engine) for the engine file at `path`; the runtime is returned
    because it must outlive the engine."""
    polygraphy_trt = import_polygraphy_trt()
    from polygraphy.exception import PolygraphyException

    path = Path(path)
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    load_engine = polygraphy_trt.EngineFromPath(str(path), runtime=runtime)

    def load():
        try:
            with _quiet_polygraphy():
                engine = load_engine()
        except PolygraphyException:
            engine = None
        if engine is None:
            raise Ps3EdgeError(f"TensorRT cannot load {path.name}; rebuild it with 'ps3edge build'")
        return runtime, engine
    return load


def execution_context(engine, path: Path):
    context = engine.create_execution_context()
    if context is None:
        raise Ps3EdgeError(f"TensorRT cannot create an execution context for {Path(path).name} (out of GPU memory?)")
    return context


def open_engine(trt, path: Path):
    """(runtime, engine, context) of the engine file at `path`."""
    runtime, engine = engine_loader(trt, path)()
    return runtime, engine, execution_context(engine, path)


def torch_dtype(dtype):
    """The torch dtype of a TensorRT tensor type (Polygraphy's DataType), or one Ps3EdgeError line."""
    import torch
    from polygraphy.datatype import DataType

    try:
        with _quiet_polygraphy():
            converted = DataType.to_dtype(DataType.from_dtype(dtype, "tensorrt"), "torch")
    except Exception:  # Polygraphy raises its own exception types for types it cannot map
        converted = None
    if not isinstance(converted, torch.dtype):
        raise Ps3EdgeError(f"the engine has a tensor of type {dtype}, which ps3edge cannot feed")
    return converted


class TensorRTRunner(StageRunner):
    """One engine: one execution context; every input and output has one device buffer (a flat
    torch CUDA tensor) allocated at the profile's max shape and bound once with
    set_tensor_address; a call copies the inputs into the front of their buffers, sets the input
    shapes and enqueues the engine on the shared stream (execute_async_v3).
    `max_steps_per_call` is the profile's T max."""

    backend = "tensorrt"
    kind = "engine"

    def __init__(self, name: str, entry, record, path: Path, loader, stream):
        super().__init__(name, entry, loader, device=CUDA)
        self.path = Path(path)
        self.bindings = dict(record.bindings or {n: n for n in entry.input_names + entry.output_names})
        self.profiles = record.profiles
        self.stream = stream
        self.max_steps_per_call = next((self.profiles[n]["max"][a] for n, a in self.step_axes.items()
                                        if n in self.profiles), None)
        self.engine = self.context = self._runtime = None
        self.buffers: dict = {}

    @classmethod
    def from_record(cls, artifact_dir: Path, name: str, entry, record, trt, stream) -> "TensorRTRunner":
        """The engine `record` (a manifest `engines` entry) describes, loaded now."""
        path = Path(artifact_dir) / record.file
        return cls(name, entry, record, path, engine_loader(trt, path), stream).activate()

    def _activate(self, loaded) -> None:
        import torch

        self._runtime, self.engine = loaded
        self.context = execution_context(self.engine, self.path)
        cuda = torch.device("cuda", torch.cuda.current_device())
        dtype = lambda name: torch_dtype(self.engine.get_tensor_dtype(self.bindings[name]))   # noqa: E731
        for name in self.input_names:
            max_shape = tuple(self.profiles[name]["max"])
            self.buffers[name] = torch.empty(int(np.prod(max_shape)), dtype=dtype(name), device=cuda)
            self._set_shape(self.bindings[name], max_shape)
        for name in self.output_names:                 # all inputs at max: every output at its max
            shape = tuple(self.context.get_tensor_shape(self.bindings[name]))
            self.buffers[name] = torch.empty(max(1, int(np.prod(shape))), dtype=dtype(name), device=cuda)
        for name, buf in self.buffers.items():
            if not self.context.set_tensor_address(self.bindings[name], buf.data_ptr()):
                raise Ps3EdgeError(f"TensorRT refused the buffer of '{name}' in {self.path.name}")

    def _release(self) -> None:
        # the context goes before its engine, the engine before its runtime
        self.buffers = {}
        self.context = None
        self.engine = None
        self._runtime = None

    def _set_shape(self, engine_name: str, shape: tuple) -> None:
        if not self.context.set_input_shape(engine_name, shape):
            raise Ps3EdgeError(f"engine '{self.name}' does not take {engine_name} of shape {shape}")

    def _check_shape(self, name: str, shape: tuple) -> None:
        p = self.profiles[name]
        if len(shape) != len(p["max"]) or any(not lo <= d <= hi for d, lo, hi in zip(shape, p["min"], p["max"])):
            raise Ps3EdgeError(f"engine '{self.name}' input '{name}' of shape {shape} is outside its profile "
                               f"(min {tuple(p['min'])}, max {tuple(p['max'])}); rebuild with a larger --max-look-close")

    def _infer(self, feed: dict) -> dict[str, np.ndarray]:
        """numpy (or torch) inputs -> numpy outputs; floating outputs as float32."""
        return {name: (out.float() if out.is_floating_point() else out).cpu().numpy()
                for name, out in self._run(feed).items()}

    def infer_device(self, feed: dict) -> dict:
        """Like infer, but the outputs stay on the GPU, as views of the engine's buffers that
        are valid until its next call."""
        self.activate()
        self.check_feed(feed)
        start = time.perf_counter()
        outputs = self._run(feed)
        self._last_time = time.perf_counter() - start
        return outputs

    def _run(self, feed: dict) -> dict:
        import torch

        with torch.cuda.stream(self.stream):
            for name in self.input_names:
                value = feed[name]
                src = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))
                shape = tuple(src.shape)
                self._check_shape(name, shape)
                self.buffers[name][: int(np.prod(shape))].view(shape).copy_(src, non_blocking=src.is_cuda)
                self._set_shape(self.bindings[name], shape)
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise Ps3EdgeError(f"TensorRT failed to run engine '{self.name}' ({self.path.name})")
            outputs = {}
            for name in self.output_names:
                shape = tuple(self.context.get_tensor_shape(self.bindings[name]))
                outputs[name] = self.buffers[name][: int(np.prod(shape))].view(shape)
        self.stream.synchronize()
        return outputs


class TensorRTBackend(Backend):
    name = "tensorrt"
    devices = {"cuda": ("fp32", "fp16", "bf16", "int8")}
    needs_gpu = True               # engines run on a GPU only

    @staticmethod
    def engines_usable(facts: Facts) -> tuple[bool, str]:
        """Whether TensorRT imports here in a release ps3edge builds and runs engines with
        (engines/platform.import_tensorrt's check); `ps3edge build` needs no more than this."""
        ok, why = facts.usable("tensorrt")
        if not ok:
            return ok, why
        try:
            from ...engines.platform import MIN_TENSORRT_MAJOR, version_tuple

            version = facts.package("tensorrt")["version"]
            if version is None or version_tuple(version)[0] < MIN_TENSORRT_MAJOR:
                return False, (f"ps3edge builds and runs engines with TensorRT {MIN_TENSORRT_MAJOR} or newer; this "
                               f"is TensorRT {version or '(version unknown)'} (JetPack 6.1+ ships TensorRT 10.3)")
        except Exception as e:
            from .probe import first_line
            return False, f"tensorrt version check failed ({first_line(e)})"
        return True, ""

    def available(self, device=None, precision=None, facts=None):
        facts = facts or Facts()
        ok, why = self.engines_usable(facts)
        if ok:
            ok, why = facts.usable("polygraphy")
            why = why and f"{why} (ps3edge build and the tensorrt backend use it)"
        if not ok or device is None:
            return ok, why
        if facts.cuda_missing():
            return False, facts.cuda_missing()
        return facts.sm_supports(precision or "fp32")

    def load_stages(self, artifact_dir, manifest, precision="fp32", loaded=None):
        """name -> TensorRTRunner for every stage; checks every engine against this machine first."""
        import torch

        from ...engines.platform import check_engine_compatible, import_tensorrt, machine_facts

        if precision != "fp32":
            raise Ps3EdgeError("--precision picks ONNX stage files (onnxruntime, torch); TensorRT engines run at "
                               "the precision 'ps3edge build --precision' gave them")
        engines = manifest.engines
        missing = [s for s in manifest.stages if s not in engines]
        if missing:
            raise Ps3EdgeError(f"{artifact_dir} has no TensorRT engine for {', '.join(missing)}; "
                               f"build them with 'ps3edge build {artifact_dir}'")
        trt = import_tensorrt()
        here = machine_facts(trt)
        for name, record in engines.items():
            check_engine_compatible(name, record, here)
        import_polygraphy_trt()
        stream = torch.cuda.Stream()
        return {name: TensorRTRunner.from_record(artifact_dir, name, entry, engines[name], trt, stream)
                for name, entry in manifest.stages.items()}


BACKEND = TensorRTBackend()
