"""The `onnxruntime` backend: the exported ONNX stage files on an onnxruntime session.

Providers are chosen from what is installed: TensorRT and CUDA when onnxruntime-gpu provides
them (the `gpu` extra), CPU always last; PS3EDGE_ORT_PROVIDERS (comma-separated provider names)
overrides the choice. The TensorRT provider gets the stage's optimization profile and an engine
cache keyed by the stage file's sha256. On the CPU provider alone, an FP32 stage's attention runs
as onnxruntime's fused MultiHeadAttention, rewritten in memory when the session loads (the file
on disk stays plain ONNX, for TensorRT): see exporter/ort_optimize.py. A session's CPU threads
are OMP_NUM_THREADS where it is set (cpu_threads), else onnxruntime's default; every ps3edge
session takes its options from cpu_session_options (exporter/ort_session.py).

The trunk's weights once in memory: where several stage graphs point into one external data
file (trunk.onnx.data, exporter/share.py), the CPU sessions of one load take those tensors as
user initializers (SessionOptions.add_initializer) over one read-only memory map of the file
(`SharedWeights`), instead of each reading its own copy. Their MatMul weights are then not
pre-packed: onnxruntime's MLAS would pack a private copy per session (its container that
shares packed weights across sessions is not in the Python API), which is the copy this
avoids. Mapped, the weights are clean file pages: resident once however many sessions (or
processes) use them, and reclaimable by the kernel. Those sessions run without a CPU arena, so
that lowres's working memory is not held while highres runs; and on the CPU a highres call takes
no more rows than fit ORT_CPU_ATTENTION_SCORES_BYTES of attention scores (`cpu_rows_per_call`).
PS3EDGE_ORT_SHARED_WEIGHTS=0 gives every session its own pre-packed copy again (faster MatMuls,
the weights twice in memory).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ... import defaults
from ...artifact.precisions import stage_entries
from ...errors import Ps3EdgeError
# the options of every ps3edge session, shared with the export's check of its files
from ...exporter.ort_session import ENV_CPU_THREADS, cpu_session_options, cpu_threads  # noqa: F401
from ..device import CPU, CUDA
from .base import StageRunner
from .probe import Facts
from .registry import Backend

ENV_ORT_PROVIDERS = "PS3EDGE_ORT_PROVIDERS"
ENV_ORT_SHARED_WEIGHTS = "PS3EDGE_ORT_SHARED_WEIGHTS"     # "0": each session its own copy of shared weights
EXTERNAL_DATA_FOLDER = "session.model_external_initializers_file_folder_path"   # onnxruntime's config key
DISABLE_PREPACKING = "session.disable_prepacking"                               # onnxruntime's config key

# provider -> the device label a runner (and `ps3edge doctor`) reports
PROVIDER_DEVICES = {"CPUExecutionProvider": "CPU EP", "CUDAExecutionProvider": "CUDA EP",
                    "TensorrtExecutionProvider": "TensorRT EP"}
# onnxruntime's tensor type names -> numpy's
ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int32)": "int32",
              "tensor(int64)": "int64", "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(bool)": "bool"}


def session_loader(path: Path, providers: list | None = None, threads: int | None = None,
                   attention_heads: int | None = None, qdq: bool = False, shared: "SharedWeights | None" = None):
    """A loader for OnnxRuntimeRunner: the InferenceSession of `path`, or one Ps3EdgeError line.

    attention_heads: the model's head count, to run its attention as onnxruntime's fused
    MultiHeadAttention (exporter/ort_optimize.py) when the session runs on the CPU provider alone.
    qdq: the file is a calibrated INT8 stage (Q/DQ pairs), run as the exact simulation of its
    quantization.
    shared: the memory map of the external data files this load's stages share (SharedWeights);
    on the CPU provider alone, the session takes the tensors in them from it.
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
            model = _rewritten_model(path, chosen, attention_heads, options, shared)
            if model is not None:
                return ort.InferenceSession(model, sess_options=options, providers=chosen)
            return ort.InferenceSession(str(path), sess_options=options, providers=chosen)
        except Exception as e:  # onnxruntime raises its own exception types for bad models
            raise Ps3EdgeError(f"onnxruntime cannot load {Path(path).name}: {str(e).splitlines()[0]}") from None
    return load


def _cpu_only(providers: list) -> bool:
    return [p if isinstance(p, str) else p[0] for p in providers] == ["CPUExecutionProvider"]


def _fused_model(path: Path, providers: list, heads: int | None, options) -> bytes | None:
    """The stage graph with its attention fused (serialized, weights left where they are), or None
    where nothing applies: no head count, another provider than the CPU's (TensorRT and CUDA run
    the plain graph), or no attention in the graph. The fused kernel is onnxruntime's, CPU only."""
    return _rewritten_model(path, providers, heads, options, None)


def _rewritten_model(path: Path, providers: list, heads: int | None, options,
                     shared: "SharedWeights | None") -> bytes | None:
    """The stage graph as the CPU provider runs it - its attention fused where `heads` is given,
    the tensors of `shared`'s files added to `options` as shared initializers - serialized with
    its other weights left where they are; None where neither applies (another provider than
    the CPU's alone: TensorRT and CUDA run the plain graph and place their weights themselves)."""
    if not (heads or shared) or not _cpu_only(providers):
        return None
    import onnx
    from ...exporter.ort_optimize import fuse_attention

    model = onnx.load(str(path), load_external_data=False)
    fused = bool(heads) and fuse_attention(model, heads) > 0
    added = shared.add_to(options, model) if shared is not None else 0
    if not (fused or added):
        return None
    # a model given as bytes finds its external data files in this folder
    options.add_session_config_entry(EXTERNAL_DATA_FOLDER, str(Path(path).resolve().parent))
    return model.SerializeToString()


class SharedWeights:
    """The external data files that several stage graphs of one load point into: each mapped
    once, read-only, and one OrtValue per tensor in it, given to every session that holds the
    tensor (under that graph's own name for it). The OrtValues read the map in place: this
    object must outlive the sessions (each runner's loader holds it)."""

    def __init__(self, directory, files):
        self.directory = Path(directory)
        self.files = tuple(files)
        self._maps: dict = {}
        self._values: dict = {}

    @classmethod
    def of_graphs(cls, paths) -> "SharedWeights | None":
        """The files two or more of the graphs at `paths` (one directory) point into; None if none,
        or where PS3EDGE_ORT_SHARED_WEIGHTS is "0"."""
        if os.environ.get(ENV_ORT_SHARED_WEIGHTS, "").strip() == "0":
            return None
        import onnx
        from ...exporter.share import external_files

        paths = [Path(p) for p in paths]
        counts: dict[str, int] = {}
        for p in paths:
            for f in external_files(onnx.load(str(p), load_external_data=False)):
                counts[f] = counts.get(f, 0) + 1
        shared = [f for f, n in counts.items() if n > 1]
        return cls(paths[0].parent, shared) if shared else None

    def add_to(self, options, model) -> int:
        """Add every tensor of `model` held in a shared file to `options` as an initializer, and
        turn off pre-packing (it would copy them per session); returns how many were added."""
        import onnxruntime as ort
        from onnx.helper import tensor_dtype_to_np_dtype
        from ...exporter.share import shared_initializers

        added = 0
        for location in self.files:
            for t, ref in shared_initializers(model, location):
                key = (location, ref.offset, ref.length, t.data_type, tuple(t.dims))
                value = self._values.get(key)
                if value is None:
                    data = self._map(location)[ref.offset: ref.offset + ref.length]
                    array = data.view(tensor_dtype_to_np_dtype(t.data_type)).reshape(tuple(t.dims))
                    value = self._values[key] = ort.OrtValue.ortvalue_from_numpy(array)
                options.add_initializer(t.name, value)
                added += 1
        if added:
            options.add_session_config_entry(DISABLE_PREPACKING, "1")
            # and no CPU arena: each call's working memory goes back when it returns, so the
            # lowres pass's is not held while highres runs (the arena keeps every session's peak)
            options.enable_cpu_mem_arena = False
        return added

    def _map(self, location: str) -> np.ndarray:
        if location not in self._maps:
            self._maps[location] = np.memmap(self.directory / location, dtype=np.uint8, mode="r")
        return self._maps[location]


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
                  qdq: bool = False, shared: SharedWeights | None = None) -> "OnnxRuntimeRunner":
        """A runner of the file at `path`, loaded now (a bad file is refused here)."""
        path = Path(path)
        name = entry.name if entry is not None else path.stem
        return cls(name, entry, session_loader(path, providers, threads, attention_heads, qdq, shared)).activate()

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
        # the files several stages point into (the trunk's), mapped once for all their CPU sessions
        shared = SharedWeights.of_graphs([Path(artifact_dir) / files[name] for name in manifest.stages])
        # an INT8 run reads the calibrated Q/DQ file where a stage has one, else the FP32 file
        runners = {name: OnnxRuntimeRunner.from_path(Path(artifact_dir) / files[name], entry,
                                                     providers=stage_providers(manifest, name, files[name], precision),
                                                     attention_heads=heads,
                                                     qdq=precision == "int8" and files[name] != entry.file,
                                                     shared=shared)
                   # each stage as the precision's file declares it (FP16 stages pass float16 between them)
                   for name, entry in stage_entries(manifest, precision).items()}
        highres = runners.get("highres")
        if highres is not None and highres.device.is_cpu:
            highres.max_steps_per_call = cpu_rows_per_call(manifest)
        return runners


def cpu_rows_per_call(manifest) -> int | None:
    """The most look-close rows one highres call takes on onnxruntime's CPU provider, or None
    (no bound of its own) where the default steps' scores fit: its attention kernel writes a
    call's whole scores, rows x heads x N x (N0 + N) floats, so a real model's 6 default steps in
    one call (3.2 GB of scores at 4K) would be the peak of the run; rows of 2560 tokens already
    fill the CPU's matrix units, so smaller calls cost no speed."""
    from ...artifact.profiles import look_close_steps

    g = manifest.geometry
    n = g.max_tokens_per_highres_call
    per_row = manifest.config.num_heads * n * (g.lowres_tokens + n) * 4
    rows = max(1, defaults.ORT_CPU_ATTENTION_SCORES_BYTES // per_row)
    return rows if rows < look_close_steps(manifest) else None


BACKEND = OnnxRuntimeBackend()
