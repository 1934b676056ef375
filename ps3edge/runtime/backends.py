"""Stage backends behind one small interface: `infer(feed) -> outputs`, keyed by tensor name.

- `onnxruntime`: runs the exported ONNX files; providers are chosen from what is installed:
  TensorRT and CUDA when onnxruntime-gpu provides them (the `gpu` extra), CPU always last.
  PS3EDGE_ORT_PROVIDERS (comma-separated provider names) overrides the choice.
- `torch`: runs our own PyTorch stage modules, rebuilt from the manifest's weight source, so an
  artifact can be checked against the model it came from.
- `tensorrt`: runs the engines of `ps3edge build` (the manifest's `engines` section): one
  execution context per engine, device buffers (torch CUDA tensors) allocated once at the
  profile's max shape, one CUDA stream for all stages, execute_async_v3. Engines built for
  another TensorRT release or GPU architecture are refused in one line.

Arrays cross the interface as numpy; the torch backend converts without copying.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .. import defaults
from ..errors import Ps3EdgeError
from ..artifact.weights import rebuild_torch_model
from ..model import HighResStage, LowResStage, SelectorStage

BACKENDS = ("onnxruntime", "torch", "tensorrt")
ENV_ORT_PROVIDERS = "PS3EDGE_ORT_PROVIDERS"


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


def preferred_ort_providers(available: list[str] | None = None, tensorrt_options: dict | None = None,
                            env=None) -> list:
    """onnxruntime providers, best first: TensorRT (with `tensorrt_options`), CUDA, then CPU.

    `available` defaults to what the installed onnxruntime offers; PS3EDGE_ORT_PROVIDERS (in `env`,
    default os.environ) names the providers to use instead, in order.
    """
    import os

    if available is None:
        import onnxruntime as ort
        available = ort.get_available_providers()
    env = os.environ if env is None else env
    override = [p.strip() for p in env.get(ENV_ORT_PROVIDERS, "").split(",") if p.strip()]
    if override:
        unknown = [p for p in override if p not in available]
        if unknown:
            raise Ps3EdgeError(f"{ENV_ORT_PROVIDERS} names providers this onnxruntime lacks: {unknown} "
                               f"(available: {', '.join(available)})")
        wanted = override
    else:
        wanted = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
                  if p in available]
        if not wanted:
            return list(available)
        if "CPUExecutionProvider" not in wanted and "CPUExecutionProvider" in available:
            wanted.append("CPUExecutionProvider")
    return [(p, dict(tensorrt_options)) if p == "TensorrtExecutionProvider" and tensorrt_options else p
            for p in wanted]


def ort_tensorrt_options(stage_bounds: dict | None, cache_dir: Path) -> dict:
    """onnxruntime's TensorRT provider options: engine and timing caches under `cache_dir`, and the
    stage's optimization profile (engines/profiles.py) when it has dynamic inputs. fp32, as the
    exported stages are; TensorRT engines of other precisions come from `ps3edge build`."""
    from ..artifact.profiles import is_dynamic, shape_arg

    options = {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache_dir),
               "trt_timing_cache_enable": "True", "trt_timing_cache_path": str(cache_dir),
               "trt_fp16_enable": "False"}
    if stage_bounds and is_dynamic(stage_bounds):
        options.update({"trt_profile_min_shapes": shape_arg(stage_bounds, "min"),
                        "trt_profile_opt_shapes": shape_arg(stage_bounds, "opt"),
                        "trt_profile_max_shapes": shape_arg(stage_bounds, "max")})
    return options


def load_stages(artifact_dir: Path, manifest, backend: str, precision: str = "fp32", loaded=None) -> dict:
    """name -> runner for the three stages of an artifact, on the chosen backend.

    `precision` (fp32, fp16, int8) picks the stage files that 'ps3edge calibrate' registered in
    the manifest's "precisions" section (onnxruntime); the torch backend runs fp16 / bf16 by the
    same policy (calibration/precision.py). `loaded`: the torch backend's model, if already built
    (see rebuild_torch_model)."""
    if backend not in BACKENDS:
        raise Ps3EdgeError(f"unknown backend '{backend}'; choose one of: {', '.join(BACKENDS)}")
    stages = manifest.stages
    if backend == "onnxruntime":
        files = manifest.stage_files(precision, artifact_dir)
        return {name: OnnxRuntimeStage(Path(artifact_dir) / files[name],
                                       providers=_ort_providers(manifest, name, files[name], precision))
                for name in stages}
    if backend == "tensorrt":
        if precision != "fp32":
            raise Ps3EdgeError("--precision picks ONNX stage files (onnxruntime, torch); TensorRT engines run at "
                               "the precision 'ps3edge build --precision' gave them")
        return load_tensorrt_stages(Path(artifact_dir), manifest)
    model = rebuild_torch_model(manifest, loaded)
    layers = list(manifest.returned_layers)
    if precision == "fp32":
        modules = {"lowres": LowResStage(model, layers), "selector": SelectorStage(model),
                   "highres": HighResStage(model, layers)}
    else:
        from ..calibration.precision import torch_stage_modules
        modules = torch_stage_modules(model, layers, precision)
    return {name: TorchStage(modules[name], info.input_names, info.output_names) for name, info in stages.items()}


def _ort_providers(manifest, stage: str, file: str | None = None, precision: str = "fp32") -> list:
    """Providers for one stage file; the TensorRT provider (when there is one) gets the stage's
    profile and an engine cache keyed by the file's sha256, and INT8 enabled for Q/DQ files
    (explicit quantization needs it in TensorRT 10's weakly typed networks)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    options = None
    if "TensorrtExecutionProvider" in available:
        from ..engines.cache import default_engine_cache_dir
        from ..artifact.profiles import profile_bounds

        file = file or manifest.stages[stage].file
        cache_dir = default_engine_cache_dir().parent / "ort-tensorrt" / manifest.files[file][:16]
        cache_dir.mkdir(parents=True, exist_ok=True)
        options = ort_tensorrt_options(profile_bounds(manifest)[stage], cache_dir)
        if precision == "int8":
            options["trt_int8_enable"] = "True"
    return preferred_ort_providers(available, options)


# --- TensorRT --------------------------------------------------------------------------------------
def _torch_dtype(trt, dtype):
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
             trt.int8: torch.int8, trt.bool: torch.bool}
    for attr, td in (("int64", torch.int64), ("bfloat16", torch.bfloat16), ("uint8", torch.uint8)):
        if hasattr(trt, attr):
            table[getattr(trt, attr)] = td
    if dtype not in table:
        raise Ps3EdgeError(f"the engine has a tensor of type {dtype}, which ps3edge cannot feed")
    return table[dtype]


def open_engine(trt, path: Path):
    """Deserialize the engine file at `path` and create its execution context: (runtime, engine,
    context); the runtime is returned because it must outlive the engine."""
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
    if engine is None:
        raise Ps3EdgeError(f"TensorRT cannot load {Path(path).name}; rebuild it with 'ps3edge build'")
    context = engine.create_execution_context()
    if context is None:
        raise Ps3EdgeError(f"TensorRT cannot create an execution context for {Path(path).name} (out of GPU memory?)")
    return runtime, engine, context


class TensorRTStage:
    """One engine behind `infer(feed) -> outputs`.

    One execution context; every input and output has one device buffer (a flat torch CUDA
    tensor) allocated at the profile's max shape and bound once with set_tensor_address; a call
    copies the inputs into the front of their buffers, sets the input shapes and enqueues the
    engine on the shared stream (execute_async_v3). A call with more look-close steps (axis T)
    than the engine's profile takes is split into calls of at most T_max steps.
    """

    def __init__(self, path: Path, stage: str, info, entry, trt, stream):
        self.stage, self.path = stage, Path(path)
        self.input_names = info.input_names
        self.output_names = info.output_names
        self.bindings = dict(entry.get("bindings") or {n: n for n in self.input_names + self.output_names})
        self.profiles = entry.profiles
        self.stream = stream
        self.device = torch.device("cuda", torch.cuda.current_device())
        self._runtime, self.engine, self.context = open_engine(trt, self.path)
        # the T axis (look-close steps) of every tensor that has one, from the manifest's shapes
        self.t_axis = {t.name: t.shape.index("T") for t in info.inputs + info.outputs if "T" in t.shape}
        self.t_max = next((self.profiles[n]["max"][a] for n, a in self.t_axis.items() if n in self.profiles), None)
        self.buffers, self.dtypes = {}, {}
        for name in self.input_names:
            engine_name = self.bindings[name]
            max_shape = tuple(self.profiles[name]["max"])
            self.dtypes[name] = _torch_dtype(trt, self.engine.get_tensor_dtype(engine_name))
            self.buffers[name] = torch.empty(int(np.prod(max_shape)), dtype=self.dtypes[name], device=self.device)
            self._set_shape(engine_name, max_shape)
        for name in self.output_names:                 # all inputs at max: every output at its max
            engine_name = self.bindings[name]
            shape = tuple(self.context.get_tensor_shape(engine_name))
            self.dtypes[name] = _torch_dtype(trt, self.engine.get_tensor_dtype(engine_name))
            self.buffers[name] = torch.empty(max(1, int(np.prod(shape))), dtype=self.dtypes[name], device=self.device)
        for name, buf in self.buffers.items():
            if not self.context.set_tensor_address(self.bindings[name], buf.data_ptr()):
                raise Ps3EdgeError(f"TensorRT refused the buffer of '{name}' in {self.path.name}")

    def _set_shape(self, engine_name: str, shape: tuple) -> None:
        if not self.context.set_input_shape(engine_name, shape):
            raise Ps3EdgeError(f"engine '{self.stage}' does not take {engine_name} of shape {shape}")

    def _check_shape(self, name: str, shape: tuple) -> None:
        p = self.profiles[name]
        if len(shape) != len(p["max"]) or any(not lo <= d <= hi for d, lo, hi in zip(shape, p["min"], p["max"])):
            raise Ps3EdgeError(f"engine '{self.stage}' input '{name}' of shape {shape} is outside its profile "
                               f"(min {tuple(p['min'])}, max {tuple(p['max'])}); rebuild with a larger --max-look-close")

    def infer(self, feed: dict) -> dict[str, np.ndarray]:
        """numpy (or torch) inputs -> numpy outputs; floating outputs as float32. A call with more
        than T_max steps runs as several."""
        outputs = self.infer_device(feed, split=True)
        return {name: (out.float() if out.is_floating_point() else out).cpu().numpy()
                for name, out in outputs.items()}

    def infer_device(self, feed: dict, split: bool = False) -> dict:
        """Like infer, but the outputs stay on the GPU, as views of the engine's buffers that
        are valid until its next call - unless `split` lets a call with more than T_max steps
        run as several, whose outputs are then concatenated copies."""
        steps = next((feed[n].shape[a] for n, a in self.t_axis.items() if n in feed), None)
        if self.t_max is None or steps is None or steps <= self.t_max:
            return self._run(feed)
        if not split:
            raise Ps3EdgeError(f"engine '{self.stage}' takes at most {self.t_max} steps per call, got {steps}")
        parts = []
        for t0 in range(0, steps, self.t_max):
            sub = {}
            for name, value in feed.items():
                axis = self.t_axis.get(name)
                index = [slice(None)] * value.ndim
                if axis is not None:
                    index[axis] = slice(t0, t0 + self.t_max)
                sub[name] = value[tuple(index)]
            parts.append({k: v.clone() for k, v in self._run(sub).items()})
        return {name: torch.cat([p[name] for p in parts], dim=self.t_axis[name]) if name in self.t_axis
                else parts[-1][name] for name in self.output_names}

    def _run(self, feed: dict) -> dict:
        with torch.cuda.stream(self.stream):
            for name in self.input_names:
                value = feed[name]
                src = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))
                shape = tuple(src.shape)
                self._check_shape(name, shape)
                view = self.buffers[name][: int(np.prod(shape))].view(shape)
                view.copy_(src, non_blocking=src.is_cuda)
                self._set_shape(self.bindings[name], shape)
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise Ps3EdgeError(f"TensorRT failed to run engine '{self.stage}' ({self.path.name})")
            outputs = {}
            for name in self.output_names:
                shape = tuple(self.context.get_tensor_shape(self.bindings[name]))
                outputs[name] = self.buffers[name][: int(np.prod(shape))].view(shape)
        self.stream.synchronize()
        return outputs


def load_tensorrt_stages(artifact_dir: Path, manifest) -> dict:
    """name -> TensorRTStage for every stage; checks every engine against this machine first."""
    from ..engines.platform import check_engine_compatible, import_tensorrt, machine_facts

    engines = manifest.engines
    missing = [s for s in manifest.stages if s not in engines]
    if missing:
        raise Ps3EdgeError(f"{artifact_dir} has no TensorRT engine for {', '.join(missing)}; "
                           f"build them with 'ps3edge build {artifact_dir}'")
    trt = import_tensorrt()
    here = machine_facts(trt)
    for name, entry in engines.items():
        check_engine_compatible(name, entry, here)
    stream = torch.cuda.Stream()
    return {name: TensorRTStage(artifact_dir / engines[name].file, name, info, engines[name], trt, stream)
            for name, info in manifest.stages.items()}
