"""The `onnxruntime` backend: the exported ONNX stage files on an onnxruntime session.

Providers are chosen from what is installed: TensorRT and CUDA when onnxruntime-gpu provides
them (the `gpu` extra), CPU always last; PS3EDGE_ORT_PROVIDERS (comma-separated provider names)
overrides the choice. The TensorRT provider gets the stage's optimization profile and an engine
cache keyed by the stage file's sha256. On the CPU provider alone, an FP32 stage's attention runs
as onnxruntime's fused MultiHeadAttention, rewritten in memory when the session loads (the file
on disk stays plain ONNX, for TensorRT): see exporter/ort_optimize.py. A session's CPU threads
are OMP_NUM_THREADS where it is set (cpu_threads), else onnxruntime's default; every ps3edge
session takes its options from cpu_session_options (exporter/ort_session.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ...errors import Ps3EdgeError
# the options of every ps3edge session, shared with the export's check of its files
from ...exporter.ort_session import ENV_CPU_THREADS, cpu_session_options, cpu_threads  # noqa: F401
from ..device import CPU, CUDA
from .base import StageRunner
from .probe import Facts
from .registry import Backend

ENV_ORT_PROVIDERS = "PS3EDGE_ORT_PROVIDERS"
EXTERNAL_DATA_FOLDER = "session.model_external_initializers_file_folder_path"   # onnxruntime's config key

# provider -> the device label a runner (and `ps3edge doctor`) reports
PROVIDER_DEVICES = {"CPUExecutionProvider": "CPU EP", "CUDAExecutionProvider": "CUDA EP",
                    "TensorrtExecutionProvider": "TensorRT EP"}
# onnxruntime's tensor type names -> numpy's
ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int32)": "int32",
              "tensor(int64)": "int64", "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(bool)": "bool"}


def session_loader(path: Path, providers: list | None = None, threads: int | None = None,
                   attention_heads: int | None = None, qdq: bool = False):
    """A loader for OnnxRuntimeRunner: the InferenceSession of `path`, or one Ps3EdgeError line.

    attention_heads: the model's head count, to run its attention as onnxruntime's fused
    MultiHeadAttention (exporter/ort_optimize.py) when the session runs on the CPU provider alone.
    qdq: the file is a calibrated INT8 stage (Q/DQ pairs), run as the exact simulation of its
    quantization.
    """
    def load():
        import onnxruntime as ort

        options = cpu_session_options(threads)
        chosen = providers or preferred_ort_providers()
        if qdq:
            # A Q/DQ stage runs as the exact simulation of its quantization (the float parts
            # optimised as in the FP32 stage): onnxruntime's fusion of Q/DQ pairs into integer
            # kernels, on a graph with a dynamic batch axis, cost ps3-tiny's INT8 lowres 0.996 ->
            # 0.987 min cosine against FP32 here.
            options.add_session_config_entry("session.disable_quant_qdq", "1")
        try:
            fused = _fused_model(path, chosen, attention_heads, options)
            if fused is not None:
                return ort.InferenceSession(fused, sess_options=options, providers=chosen)
            return ort.InferenceSession(str(path), sess_options=options, providers=chosen)
        except Exception as e:  # onnxruntime raises its own exception types for bad models
            raise Ps3EdgeError(f"onnxruntime cannot load {Path(path).name}: {str(e).splitlines()[0]}") from None
    return load


def _fused_model(path: Path, providers: list, heads: int | None, options) -> bytes | None:
    """The stage graph with its attention fused (serialized, weights left where they are), or None
    where nothing applies: no head count, another provider than the CPU's (TensorRT and CUDA run
    the plain graph), or no attention in the graph. The fused kernel is onnxruntime's, CPU only."""
    if not heads or [p if isinstance(p, str) else p[0] for p in providers] != ["CPUExecutionProvider"]:
        return None
    import onnx
    from ...exporter.ort_optimize import fuse_attention

    model = onnx.load(str(path), load_external_data=False)
    if not fuse_attention(model, heads):
        return None
    # a model given as bytes finds its external data files in this folder
    options.add_session_config_entry(EXTERNAL_DATA_FOLDER, str(Path(path).resolve().parent))
    return model.SerializeToString()


class OnnxRuntimeRunner(StageRunner):
    """One ONNX file on an onnxruntime InferenceSession. Without a manifest entry (VILA-HD's
    projector and LLM) the tensor names and metadata are the session's own."""

    backend = "onnxruntime"

    def __init__(self, name: str, entry, loader):
        super().__init__(name, entry, loader)
        self.session = None
        self.providers: list[str] = []
        self.provider_label = "CPU EP"        # the first provider, as `ps3edge doctor` names it

    @classmethod
    def from_path(cls, path: Path, entry=None, providers: list | None = None,
                  threads: int | None = None, attention_heads: int | None = None,
                  qdq: bool = False) -> "OnnxRuntimeRunner":
        """A runner of the file at `path`, loaded now (a bad file is refused here)."""
        path = Path(path)
        name = entry.name if entry is not None else path.stem
        return cls(name, entry, session_loader(path, providers, threads, attention_heads, qdq)).activate()

    def _activate(self, session) -> None:
        self.session = session
        self.providers = list(session.get_providers())
        first = self.providers[0] if self.providers else "CPUExecutionProvider"
        self.provider_label = PROVIDER_DEVICES.get(first, first)
        # every provider but the CPU's computes on the GPU onnxruntime was given (CUDA, TensorRT)
        self.device = CPU if first == "CPUExecutionProvider" else CUDA

    @property
    def device_label(self) -> str:
        return self.provider_label

    def _release(self) -> None:
        self.session = None

    @property
    def input_names(self) -> list[str]:
        if self.entry is not None:
            return self.entry.input_names
        return [i.name for i in self.activate().session.get_inputs()]

    @property
    def output_names(self) -> list[str]:
        if self.entry is not None:
            return self.entry.output_names
        return [o.name for o in self.activate().session.get_outputs()]

    def input_metadata(self) -> dict[str, tuple[str, tuple]]:
        if self.entry is not None:
            return super().input_metadata()
        return {i.name: (ORT_DTYPES.get(i.type, i.type), tuple(i.shape)) for i in self.activate().session.get_inputs()}

    def _infer(self, feed: dict) -> dict[str, np.ndarray]:
        names = self.output_names
        outputs = self.session.run(names, {k: feed[k] for k in self.input_names})
        return dict(zip(names, outputs))


def preferred_ort_providers(available: list[str] | None = None, tensorrt_options: dict | None = None,
                            env=None) -> list:
    """onnxruntime providers, best first: TensorRT (with `tensorrt_options`), CUDA, then CPU.

    `available` defaults to what the installed onnxruntime offers; PS3EDGE_ORT_PROVIDERS (in `env`,
    default os.environ) names the providers to use instead, in order.
    """
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
    stage's optimization profile (artifact/profiles.py) when it has dynamic inputs. fp32, as the
    exported stages are; TensorRT engines of other precisions come from `ps3edge build`."""
    from ...artifact.profiles import is_dynamic, shape_arg

    options = {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache_dir),
               "trt_timing_cache_enable": "True", "trt_timing_cache_path": str(cache_dir),
               "trt_fp16_enable": "False"}
    if stage_bounds and is_dynamic(stage_bounds):
        options.update({"trt_profile_min_shapes": shape_arg(stage_bounds, "min"),
                        "trt_profile_opt_shapes": shape_arg(stage_bounds, "opt"),
                        "trt_profile_max_shapes": shape_arg(stage_bounds, "max")})
    return options


def stage_providers(manifest, stage: str, file: str | None = None, precision: str = "fp32") -> list:
    """Providers for one stage file; the TensorRT provider (when there is one) gets the stage's
    profile and an engine cache keyed by the file's sha256, and INT8 enabled for Q/DQ files
    (explicit quantization needs it in TensorRT 10's weakly typed networks)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    options = None
    if "TensorrtExecutionProvider" in available:
        from ...engines.cache import default_engine_cache_dir
        from ...artifact.profiles import profile_bounds

        file = file or manifest.stages[stage].file
        cache_dir = default_engine_cache_dir().parent / "ort-tensorrt" / manifest.files[file][:16]
        cache_dir.mkdir(parents=True, exist_ok=True)
        options = ort_tensorrt_options(profile_bounds(manifest)[stage], cache_dir)
        if precision == "int8":
            options["trt_int8_enable"] = "True"
    return preferred_ort_providers(available, options)


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    runs_calibrated_stages = True
    devices = {"CPU EP": ("fp32", "fp16", "int8"), "CUDA EP": ("fp32", "fp16"),
               "TensorRT EP": ("fp32", "fp16", "int8")}
    CPU_NOTES = {"fp32": "CPUExecutionProvider",
                 "fp16": "CPUExecutionProvider (ops without fp16 kernels run in fp32 behind inserted casts)",
                 "int8": "CPUExecutionProvider runs Q/DQ models"}

    def available(self, device=None, precision=None, facts=None):
        facts = facts or Facts()
        ok, why = facts.usable("onnxruntime")
        if not ok or device is None:
            return ok, why
        provider = next(p for p, d in PROVIDER_DEVICES.items() if d == device)
        if provider not in facts.providers:
            return False, (f"{provider} not available" if provider == "CPUExecutionProvider"
                           else f"{provider} not available (needs onnxruntime-gpu)")
        if provider == "CPUExecutionProvider":
            return True, self.CPU_NOTES[precision or "fp32"]
        if facts.cuda_missing():
            return False, f"{provider} listed, but {facts.cuda_missing()}"
        if provider == "TensorrtExecutionProvider":
            trt_ok, trt_why = facts.usable("tensorrt")
            if not trt_ok:
                return False, f"{provider} listed, but {trt_why}"
        good, reason = facts.sm_supports(precision or "fp32")
        return good, f"{provider}, {reason}"

    def load_stages(self, artifact_dir, manifest, precision="fp32", loaded=None):
        files = manifest.stage_files(precision, artifact_dir)
        # the fused attention kernel is float32 only; calibrated files keep their plain graph
        heads = manifest.config.num_heads if precision == "fp32" else None
        # an INT8 run reads the calibrated Q/DQ file where a stage has one, else the FP32 file
        return {name: OnnxRuntimeRunner.from_path(Path(artifact_dir) / files[name], entry,
                                                  providers=stage_providers(manifest, name, files[name], precision),
                                                  attention_heads=heads,
                                                  qdq=precision == "int8" and files[name] != entry.file)
                for name, entry in manifest.stages.items()}


BACKEND = OnnxRuntimeBackend()
