"""The build plan: what each stage's engine is built from and how, decided without TensorRT.

For each stage `plan_build` decides, from the manifest and the flags alone, which ONNX file it
builds from, how the network is typed, which builder flags are set or cleared, the layers the
precision map holds in fp32, the optimization profile and the engine-cache key; `engine_entry`
is the manifest's `engines.<stage>` entry of the engine built from a plan.

Precision (`--precision`), per stage. The FP16 and INT8 stages and their precision maps are
those `ps3edge calibrate` records in the manifest's "precisions" section (artifact/precisions.py,
calibration/precision.py):

    fp32  the fp32 ONNX; TF32 off, so the engine matches onnxruntime fp32.
    fp16  TensorRT 10: the fp32 ONNX with the builder flags of the stage's FP16 precision map
          (FP16 + OBEY_PRECISION_CONSTRAINTS) and its fp32 layers held with layer precisions;
          without a map, the FP16 flag alone (and a warning). TensorRT 11 has no FP16 flag: the
          stage's converted FP16 ONNX, strongly typed; refused when there is none.
    int8  the Q/DQ ONNX, strongly typed (explicit quantization); a stage the calibration left in
          fp32 (the selector) builds fp32. No INT8 stages at all: refused.
    best  Q/DQ where a stage is quantized, fp16 elsewhere (TensorRT 10: INT8 + FP16 flags on the
          Q/DQ network, the FP16 map's fp32 layers held; TensorRT 11: the strongly typed files).

The Torch-TensorRT route (`--via torch-tensorrt`, torch_route.py) builds from the PyTorch stage
modules: fp32 strongly typed, fp16 weakly typed (TensorRT may run any layer of the stage in fp16),
so its fp16 needs TensorRT 10.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .. import defaults
from ..artifact.engines import EngineEntry
from ..artifact.manifest import Manifest
from ..artifact.precisions import PrecisionStage
from ..artifact.profiles import look_close_steps, profile_bounds
from ..artifact.spec import STAGE_ORDER
from ..calibration.precision import WHOLE_STAGE_FP32
from ..errors import Ps3EdgeError
from .cache import engine_cache_key
from .platform import version_tuple


@dataclass(frozen=True)
class BuildOptions:
    precision: str = defaults.DEFAULT_ENGINE_PRECISION
    max_look_close: int | str | None = None            # T_max of the highres profile; None: the default steps
    workspace_gb: float = defaults.DEFAULT_WORKSPACE_GB
    optimization_level: int = defaults.DEFAULT_BUILDER_OPTIMIZATION_LEVEL
    timing_cache: Path | None = None
    via: str = "onnx"
    engine_cache: Path | None = None                    # None: no engine cache
    force: bool = False                                 # rebuild even when an identical engine exists

    def validate(self) -> "BuildOptions":
        if self.precision not in defaults.ENGINE_PRECISIONS:
            raise Ps3EdgeError(f"--precision must be one of {', '.join(defaults.ENGINE_PRECISIONS)}, got '{self.precision}'")
        if self.via not in defaults.ENGINE_ROUTES:
            raise Ps3EdgeError(f"--via must be one of {', '.join(defaults.ENGINE_ROUTES)}, got '{self.via}'")
        if not self.workspace_gb > 0:
            raise Ps3EdgeError(f"--workspace-gb must be positive, got {self.workspace_gb}")
        if not 0 <= self.optimization_level <= 5:
            raise Ps3EdgeError(f"--optimization-level must be between 0 and 5, got {self.optimization_level}")
        if self.via == "torch-tensorrt" and self.precision in ("int8", "best"):
            raise Ps3EdgeError(f"--precision {self.precision} builds the Q/DQ ONNX stages of 'ps3edge calibrate'; "
                               "use --via onnx")
        return self


@dataclass
class StagePlan:
    """Everything that decides one stage's engine, decided without TensorRT."""
    stage: str
    onnx_file: str                      # relative to the artifact directory
    source_files: list[str]             # the ONNX file and its external data: their hashes key the cache
    precision: str                      # what the engine runs: fp32 | fp16 | int8 | best
    strongly_typed: bool
    flags: tuple[str, ...]              # BuilderFlag names to set
    clear_flags: tuple[str, ...]        # BuilderFlag names to clear
    fp32_nodes: tuple[str, ...]         # layers (ONNX node names) held in fp32 by the precision map
    fp32_tensors: tuple[str, ...]       # ... or recognised by their output tensors
    profile: dict                       # input -> {"min", "opt", "max"}
    max_look_close: int
    note: str = ""                      # said during the build (e.g. fp16 without a precision map)
    map_source: str = ""                # "precisions.fp16" etc.: where the file / precision map came from
    key_inputs: dict = field(default_factory=dict)
    key: str = ""
    extra_profiles: tuple = ()          # further optimization profiles (the LLM's decode profile)

    @property
    def engine_file(self) -> str:
        return f"{self.stage}.{self.precision}.{self.key[:12]}.engine"


def workspace_bytes(gb: float) -> int:
    return int(gb * (1 << 30))


def stage_variants(manifest: Manifest, stage: str) -> dict[str, PrecisionStage]:
    """precision -> the stage's file and precision map of that precision, from the manifest's
    "precisions" section (fp16 / int8, written by `ps3edge calibrate`)."""
    return {precision: entry.stages[stage] for precision, entry in manifest.precisions.items()
            if stage in entry.stages}


# --- the source of one stage's engine ---------------------------------------------------------------
@dataclass(frozen=True)
class _Source:
    onnx_file: str
    external_data: tuple[str, ...]
    precision: str
    strongly_typed: bool
    flags: tuple[str, ...] = ()
    fp32_nodes: tuple[str, ...] = ()
    fp32_tensors: tuple[str, ...] = ()
    note: str = ""
    map_source: str = ""                  # the manifest section whose precision map / file was used


def _fp32(base, weak: bool) -> _Source:
    return _Source(base.file, base.external_data, "fp32", not weak)


def _from_file(variants: dict, p: str, engine_precision: str) -> _Source:
    """The stage's file of precision `p`, strongly typed (its graph carries its own types)."""
    v = variants[p]
    return _Source(v.file, v.external_data, engine_precision, True, map_source=f"precisions.{p}")


def _quantized(base, variants: dict) -> bool:
    v = variants.get("int8")
    return bool(v and (v.precision_map.quantized_nodes or v.file != base.file))


def _fp16_map(variants: dict) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The fp32 nodes and tensors of the stage's FP16 precision map (none without one)."""
    v = variants.get("fp16")
    return (v.precision_map.fp32_nodes, v.precision_map.fp32_tensors) if v else ((), ())


def _fp16_weak(stage: str, base, variants: dict) -> _Source:
    """TensorRT 10's fp16: the fp32 ONNX with the FP16 precision map's flags and fp32 layers."""
    v = variants.get("fp16")
    if v is None and stage in WHOLE_STAGE_FP32:   # the FP16 policy's rule, map or no map
        return _fp32(base, weak=True)
    if v is None:
        return _Source(base.file, base.external_data, "fp16", False, ("FP16",),
                       note=f"stage '{stage}': no FP16 precision map (ps3edge calibrate ARTIFACTS --precision "
                            "fp16), so every layer may run in fp16, LayerNorm and Softmax included")
    flags = v.precision_map.tensorrt.builder_flags
    if "FP16" not in flags:                    # the policy keeps this stage (the selector) in fp32
        return _fp32(base, weak=True)
    nodes, tensors = _fp16_map(variants)
    return _Source(base.file, base.external_data, "fp16", False, flags, nodes, tensors,
                   map_source="precisions.fp16")


def _fp16_strong(variants: dict) -> _Source | None:
    """TensorRT 11's fp16: the converted FP16 ONNX (None without one)."""
    v = variants.get("fp16")
    if v is None:
        return None
    return _from_file(variants, "fp16", "fp32" if v.precision_map.default == "fp32" else "fp16")


def _best_weak(variants: dict) -> _Source:
    """TensorRT 10's best on a quantized stage: the Q/DQ network with the INT8 and FP16 flags,
    the fp32 layers of both precision maps held."""
    nodes, tensors = _fp16_map(variants)
    v = variants["int8"]
    nodes = tuple(dict.fromkeys(nodes + v.precision_map.fp32_nodes))
    flags = ("INT8", "FP16") + (("OBEY_PRECISION_CONSTRAINTS",) if nodes or tensors else ())
    return _Source(v.file, v.external_data, "best", False, flags, nodes, tensors,
                   map_source="precisions.int8" + (" + precisions.fp16" if "fp16" in variants else ""))


def _choose_source(manifest: Manifest, stage: str, precision: str, trt_major: int) -> _Source:
    """The ONNX route's source of a stage at `precision` (see the module docstring)."""
    base = manifest.stages[stage]
    variants = stage_variants(manifest, stage)
    weak = trt_major < 11                 # TensorRT 11 builds strongly typed networks only
    if precision == "fp32":
        return _fp32(base, weak)
    if precision == "int8":
        return _from_file(variants, "int8", "int8") if _quantized(base, variants) else _fp32(base, weak)
    if precision == "best" and _quantized(base, variants):
        return _best_weak(variants) if weak else _from_file(variants, "int8", "int8")
    # fp16, or best for a stage that is not quantized
    if weak:
        return _fp16_weak(stage, base, variants)
    strong = _fp16_strong(variants)
    if strong is not None:
        return strong
    if precision == "best":
        return _fp32(base, weak)
    raise Ps3EdgeError(f"TensorRT {trt_major} has no FP16 builder flag and stage '{stage}' has no FP16 ONNX; "
                       "write it with 'ps3edge calibrate ARTIFACTS --precision fp16', or build with TensorRT 10")


def _torch_source(manifest: Manifest, stage: str, precision: str, tensorrt_version: str) -> _Source:
    """The Torch-TensorRT route converts our torch stage modules (fp16: weakly typed, see the
    module docstring); the fp32 ONNX files only fingerprint the weights in the cache key."""
    base = manifest.stages[stage]
    fp16 = precision == "fp16" and stage not in WHOLE_STAGE_FP32
    if fp16 and version_tuple(tensorrt_version)[0] >= 11:
        raise Ps3EdgeError(f"TensorRT {tensorrt_version} has no weak typing, which --via torch-tensorrt "
                           "needs for fp16; build fp16 with --via onnx (after 'ps3edge calibrate "
                           "ARTIFACTS --precision fp16')")
    return _Source(base.file, base.external_data, "fp16" if fp16 else "fp32", strongly_typed=not fp16,
                   note=f"stage '{stage}': Torch-TensorRT fp16 is weakly typed (TensorRT may run any layer "
                        "in fp16; --via onnx holds LayerNorm and softmax in fp32)" if fp16 else "")


# --- the plan ----------------------------------------------------------------------------------------
def _key_inputs(manifest: Manifest, plan: StagePlan, options: BuildOptions,
                torch_tensorrt_version: str | None) -> dict:
    """Everything that decides the engine's bytes besides TensorRT and the GPU (cache.py)."""
    inputs = {
        "onnx_hashes": {f: manifest.files[f] for f in plan.source_files},
        "flags": {"stage": plan.stage, "via": options.via, "precision": plan.precision,
                  "strongly_typed": plan.strongly_typed, "set": sorted(plan.flags),
                  "clear": sorted(plan.clear_flags), "fp32_nodes": sorted(plan.fp32_nodes),
                  "fp32_tensors": sorted(plan.fp32_tensors), "profile": plan.profile,
                  "workspace_bytes": workspace_bytes(options.workspace_gb),
                  "optimization_level": options.optimization_level},
    }
    if options.via == "torch-tensorrt":
        # the torch route builds from the weights, not the ONNX: key it on them too
        inputs["flags"].update({"source": dict(manifest.source), "model": manifest.config.to_dict(),
                                "returned_layers": list(manifest.returned_layers),
                                "torch_tensorrt": torch_tensorrt_version})
    return inputs


def plan_build(manifest: Manifest, options: BuildOptions, tensorrt_version: str, sm: int,
               torch_tensorrt_version: str | None = None) -> list[StagePlan]:
    """Decide every stage's build; raises one line for a combination that cannot be built."""
    options.validate()
    trt_major = version_tuple(tensorrt_version)[0]
    bounds = profile_bounds(manifest, options.max_look_close)
    t_max = look_close_steps(manifest, options.max_look_close)
    if options.precision == "int8" and not any("int8" in stage_variants(manifest, s) for s in manifest.stages):
        raise Ps3EdgeError("--precision int8 needs the Q/DQ stages of 'ps3edge calibrate ARTIFACTS --images DIR'; "
                           "this artifact has none")
    plans = []
    for stage in STAGE_ORDER:
        if options.via == "torch-tensorrt":
            src = _torch_source(manifest, stage, options.precision, tensorrt_version)
        else:
            src = _choose_source(manifest, stage, options.precision, trt_major)
        files = [src.onnx_file, *src.external_data]
        missing = [f for f in files if f not in manifest.files]
        if missing:
            raise Ps3EdgeError(f"stage '{stage}' is built from {missing}, which the manifest's 'files' does not list")
        plan = StagePlan(stage=stage, onnx_file=src.onnx_file, source_files=files, precision=src.precision,
                         strongly_typed=src.strongly_typed, flags=src.flags,
                         clear_flags=("TF32",) if src.precision == "fp32" else (),
                         fp32_nodes=src.fp32_nodes, fp32_tensors=src.fp32_tensors,
                         profile=bounds[stage], max_look_close=t_max, note=src.note, map_source=src.map_source)
        plan.key_inputs = _key_inputs(manifest, plan, options, torch_tensorrt_version)
        plan.key = engine_cache_key(plan.key_inputs["onnx_hashes"], plan.key_inputs["flags"], tensorrt_version, sm)
        plans.append(plan)
    return plans


def engine_entry(plan: StagePlan, options: BuildOptions, facts: dict, sha256: str, inspected: dict) -> EngineEntry:
    """The manifest's engines.<stage> entry (its checks: artifact/engines.py). `facts`: the
    machine (platform.machine_facts); `inspected`: the engine (builder.inspect_engine)."""
    memory = inspected.get("device_memory_bytes")
    return EngineEntry(
        file=plan.engine_file, sha256=sha256, built_via=options.via, precision=plan.precision,
        requested_precision=options.precision, strongly_typed=plan.strongly_typed,
        precision_constraints=int(inspected.get("precision_constraints", 0)),
        tensorrt_version=facts["tensorrt_version"], cuda_version=facts["cuda_version"],
        gpu_name=facts["gpu_name"], sm=facts["sm"],
        profiles=plan.profile, max_look_close=plan.max_look_close,
        workspace_bytes=workspace_bytes(options.workspace_gb),
        builder_optimization_level=options.optimization_level,
        bindings=inspected["bindings"], cache_key=plan.key,
        precision_map=plan.map_source or None,
        device_memory_bytes=None if memory is None else int(memory),
        jetpack=facts.get("jetpack") or None, l4t=facts.get("l4t") or None)
