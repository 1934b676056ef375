"""`ps3edge build`: the exported stages -> TensorRT engines, recorded in the manifest.

For each stage the builder decides, from the manifest and the flags alone (`plan_build`, no
TensorRT needed), which ONNX file it builds from, how the network is typed, which builder flags
are set, the optimization profile and the engine-cache key; then it builds (or reuses) each
engine and records it in the manifest's `engines` section (engines/metadata.py).

Precision (`--precision`), per stage. The FP16 and INT8 stages and their precision maps are
those `ps3edge calibrate` records in the manifest's "precisions" section (calibration/registry.py,
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

Routes (`--via`): `onnx` parses the ONNX file with TensorRT's parser; `torch-tensorrt` compiles
our PyTorch stage modules (model/stages.py) with Torch-TensorRT's dynamo frontend into a
serialized engine with the same profiles and manifest entry. Its fp32 is strongly typed; its
fp16 is weakly typed (`enabled_precisions`: TensorRT may run any layer of the stage in fp16,
where the ONNX route holds LayerNorm and softmax in fp32), so it needs TensorRT 10 and a
Torch-TensorRT whose converter still takes `enabled_precisions` (before 2.14).

Writes are atomic: engine files get names that include their cache key, are written through a
temporary file and rename, and the manifest is replaced in one rename after all of them; files of
engines that a rebuild replaced are removed only after that.
"""

from __future__ import annotations

import inspect
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import defaults
from ..calibration.precision import WHOLE_STAGE_FP32
from ..errors import Ps3EdgeError
from ..artifact.engines import merge_engines
from ..artifact.manifest import Manifest, load_manifest
from ..artifact.io import copy_atomic, file_sha256, write_bytes_atomic
from ..artifact.spec import STAGE_ORDER
from .cache import EngineCache, engine_cache_key, read_timing_cache, write_timing_cache
from .platform import import_tensorrt, import_torch_tensorrt, machine_facts, version_tuple
from ..artifact.profiles import is_dynamic, look_close_steps, profile_bounds


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


# --- deciding (pure) -----------------------------------------------------------------------------
def stage_variants(manifest: Manifest, stage: str) -> dict[str, dict]:
    """precision -> {"file", "external_data", "precision_map"} of a stage, from the manifest's
    "precisions" section (fp16 / int8, written by `ps3edge calibrate`)."""
    out = {}
    for precision, entry in manifest.precisions.items():
        info = entry.to_dict().get("stages", {}).get(stage)
        if info:
            out[precision] = {"file": info["file"], "external_data": list(info.get("external_data", [])),
                              "precision_map": info.get("precision_map") or {}}
    return out


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


def _choose_source(manifest: Manifest, stage: str, precision: str, trt_major: int) -> _Source:
    base = manifest.stages[stage]
    variants = stage_variants(manifest, stage)
    weak = trt_major < 11                 # TensorRT 11 builds strongly typed networks only

    def fp32():
        return _Source(base.file, base.external_data, "fp32", not weak)

    def from_file(p, engine_precision):
        v = variants[p]
        return _Source(v["file"], tuple(v["external_data"]), engine_precision, True, map_source=f"precisions.{p}")

    def quantized():
        v = variants.get("int8")
        return bool(v and (v["precision_map"].get("quantized_nodes") or v["file"] != base.file))

    def fp16_map():
        pmap = variants.get("fp16", {}).get("precision_map")
        return (tuple(pmap.get("fp32_nodes", ())), tuple(pmap.get("fp32_tensors", ()))) if pmap else ((), ())

    def fp16_weak():
        v = variants.get("fp16")
        if v is None and stage in WHOLE_STAGE_FP32:   # the FP16 policy's rule, map or no map
            return fp32()
        if v is None:
            return _Source(base.file, base.external_data, "fp16", False, ("FP16",),
                           note=f"stage '{stage}': no FP16 precision map (ps3edge calibrate ARTIFACTS --precision "
                                "fp16), so every layer may run in fp16, LayerNorm and Softmax included")
        pmap = v["precision_map"]
        flags = tuple(pmap.get("tensorrt", {}).get("builder_flags", ("FP16", "OBEY_PRECISION_CONSTRAINTS")))
        if "FP16" not in flags:                    # the policy keeps this stage (the selector) in fp32
            return fp32()
        nodes, tensors = fp16_map()
        return _Source(base.file, base.external_data, "fp16", False, flags, nodes, tensors,
                       map_source="precisions.fp16")

    def fp16_strong():
        v = variants.get("fp16")
        if v is None:
            return None
        return from_file("fp16", "fp32" if v["precision_map"].get("default") == "fp32" else "fp16")

    if precision == "fp32":
        return fp32()
    if precision == "int8":
        return from_file("int8", "int8") if quantized() else fp32()
    if precision == "best" and quantized():
        if not weak:
            return from_file("int8", "int8")
        nodes, tensors = fp16_map()
        nodes = tuple(dict.fromkeys(nodes + tuple(variants["int8"]["precision_map"].get("fp32_nodes", ()))))
        flags = ("INT8", "FP16") + (("OBEY_PRECISION_CONSTRAINTS",) if nodes or tensors else ())
        v = variants["int8"]
        return _Source(v["file"], tuple(v["external_data"]), "best", False, flags, nodes, tensors,
                       map_source="precisions.int8" + (" + precisions.fp16" if "fp16" in variants else ""))
    # fp16, or best for a stage that is not quantized
    if weak:
        return fp16_weak()
    strong = fp16_strong()
    if strong is not None:
        return strong
    if precision == "best":
        return fp32()
    raise Ps3EdgeError(f"TensorRT {trt_major} has no FP16 builder flag and stage '{stage}' has no FP16 ONNX; "
                       "write it with 'ps3edge calibrate ARTIFACTS --precision fp16', or build with TensorRT 10")


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
            # Torch-TensorRT converts our torch stage modules (fp16: weakly typed, see the module
            # docstring); the fp32 ONNX files only fingerprint the weights in the cache key
            base = manifest.stages[stage]
            fp16 = options.precision == "fp16" and stage not in WHOLE_STAGE_FP32
            if fp16 and trt_major >= 11:
                raise Ps3EdgeError(f"TensorRT {tensorrt_version} has no weak typing, which --via torch-tensorrt "
                                   "needs for fp16; build fp16 with --via onnx (after 'ps3edge calibrate "
                                   "ARTIFACTS --precision fp16')")
            src = _Source(base.file, base.external_data, "fp16" if fp16 else "fp32",
                          strongly_typed=not fp16,
                          note=f"stage '{stage}': Torch-TensorRT fp16 is weakly typed (TensorRT may run any layer "
                               "in fp16; --via onnx holds LayerNorm and softmax in fp32)" if fp16 else "")
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
        plan.key_inputs = {
            "onnx_hashes": {f: manifest.files[f] for f in plan.source_files},
            "flags": {"stage": stage, "via": options.via, "precision": plan.precision,
                      "strongly_typed": plan.strongly_typed, "set": sorted(plan.flags),
                      "clear": sorted(plan.clear_flags), "fp32_nodes": sorted(plan.fp32_nodes),
                      "fp32_tensors": sorted(plan.fp32_tensors), "profile": plan.profile,
                      "workspace_bytes": workspace_bytes(options.workspace_gb),
                      "optimization_level": options.optimization_level},
        }
        if options.via == "torch-tensorrt":
            # the torch route builds from the weights, not the ONNX: key it on them too
            plan.key_inputs["flags"].update({"source": dict(manifest.source), "model": manifest.config.to_dict(),
                                             "returned_layers": list(manifest.returned_layers),
                                             "torch_tensorrt": torch_tensorrt_version})
        plan.key = engine_cache_key(plan.key_inputs["onnx_hashes"], plan.key_inputs["flags"], tensorrt_version, sm)
        plans.append(plan)
    return plans


def workspace_bytes(gb: float) -> int:
    return int(gb * (1 << 30))


def engine_entry(plan: StagePlan, options: BuildOptions, facts: dict, sha256: str, inspected: dict) -> dict:
    """The manifest's engines.<stage> object (see engines/metadata.py)."""
    entry = {
        "file": plan.engine_file, "sha256": sha256, "built_via": options.via, "precision": plan.precision,
        "requested_precision": options.precision, "strongly_typed": plan.strongly_typed,
        "precision_constraints": int(inspected.get("precision_constraints", 0)),
        "tensorrt_version": facts["tensorrt_version"], "cuda_version": facts["cuda_version"],
        "gpu_name": facts["gpu_name"], "sm": facts["sm"],
        "profiles": plan.profile, "max_look_close": plan.max_look_close,
        "workspace_bytes": workspace_bytes(options.workspace_gb),
        "builder_optimization_level": options.optimization_level,
        "bindings": inspected["bindings"], "cache_key": plan.key,
    }
    if plan.map_source:
        entry["precision_map"] = plan.map_source
    if inspected.get("device_memory_bytes") is not None:
        entry["device_memory_bytes"] = int(inspected["device_memory_bytes"])
    for k in ("jetpack", "l4t"):
        if facts.get(k):
            entry[k] = facts[k]
    return entry


# --- building (TensorRT) ---------------------------------------------------------------------------
def build(artifact_dir, options: BuildOptions, progress: Callable[[str], None] | None = None) -> dict:
    """Build (or reuse) every stage's engine and record them in the manifest; returns the manifest."""
    say = progress or (lambda msg: None)
    artifact_dir = Path(artifact_dir)
    options.validate()
    manifest = load_manifest(artifact_dir, verify=True)
    profile_bounds(manifest, options.max_look_close)          # a bad --max-look-close fails before TensorRT
    trt = import_tensorrt()                                   # nothing has been written yet
    tt = import_torch_tensorrt() if options.via == "torch-tensorrt" else None
    if tt is not None:
        _torch_tensorrt_converter(tt, options.precision)     # fp16 it cannot build: refused before any stage
    facts = machine_facts(trt)
    say(f"TensorRT {facts['tensorrt_version']} on {facts['gpu_name']} (SM{facts['sm']})"
        + (f", JetPack {facts['jetpack']}" if facts.get("jetpack") else ""))
    plans = plan_build(manifest, options, facts["tensorrt_version"], facts["sm"],
                       getattr(tt, "__version__", None) if tt else None)
    for plan in plans:
        if plan.note:
            say(plan.note)
    cache = EngineCache(options.engine_cache) if options.engine_cache else None
    models = {}                         # the torch route's rebuilt model, shared by the stages

    def build_one(plan, timing):
        say(f"stage '{plan.stage}': building {plan.precision} engine from "
            f"{plan.onnx_file if options.via == 'onnx' else 'the PyTorch stage'} via {options.via}"
            + (f", T <= {plan.max_look_close}" if is_dynamic(plan.profile) else ""))
        if options.via == "onnx":
            engine_bytes, timing, constraints = _build_from_onnx(trt, artifact_dir, plan, options, timing, say)
        else:
            engine_bytes, timing, constraints = _build_with_torch_tensorrt(
                tt, trt, artifact_dir, manifest, plan, options, timing, models)
        inspected = inspect_engine(trt, engine_bytes, manifest.stages[plan.stage].to_dict())
        inspected["precision_constraints"] = constraints
        return engine_bytes, timing, lambda sha256: engine_entry(plan, options, facts, sha256, inspected)

    return reuse_or_build(artifact_dir, plans, {k: e.to_dict() for k, e in manifest.engines.items()}, options, cache,
                          say, build_one, record_engines)


def reuse_or_build(art: Path, plans, old: dict, options: BuildOptions, cache, say, build_one, record) -> dict:
    """The engine loop shared by the PS3 stages and VILA-HD's projector / LLM.

    For each plan: keep the engine the manifest already records (same cache key, file intact),
    else copy it from the engine cache, else `build_one(plan, timing)`, which returns the engine
    bytes, the updated timing cache and a function from the written file's sha256 to its entry.
    `record(art, entries)` then writes the manifest once. New files are removed again if anything
    fails; files of replaced engines are removed after the manifest no longer names them.
    """
    timing = read_timing_cache(options.timing_cache)
    old_files = {e["file"] for e in old.values()}
    entries, written = {}, []           # written: new files, removed again if the build fails
    try:
        for plan in plans:
            previous = old.get(plan.stage)
            if (not options.force and previous and previous.get("cache_key") == plan.key
                    and (art / previous["file"]).is_file()
                    and file_sha256(art / previous["file"]) == previous["sha256"]):
                say(f"stage '{plan.stage}': engine {previous['file']} is up to date")
                entries[plan.stage] = previous
                continue
            hit = None if (options.force or cache is None) else cache.get(plan.key)
            target = art / plan.engine_file
            if hit is not None:
                say(f"stage '{plan.stage}': reusing the cached engine {plan.key[:12]}")
                copy_atomic(hit[0], target)
                written += [target] if target.name not in old_files else []
                entry = {**hit[1], "file": plan.engine_file, "requested_precision": options.precision}
            else:
                engine_bytes, timing, make_entry = build_one(plan, timing)
                write_timing_cache(options.timing_cache, timing)
                write_bytes_atomic(target, engine_bytes)
                written += [target] if target.name not in old_files else []
                entry = make_entry(file_sha256(target))
                if cache is not None:
                    cache.put(plan.key, engine_bytes, entry)
                say(f"stage '{plan.stage}': wrote {plan.engine_file} ({len(engine_bytes) / 2**20:.1f} MiB)")
            entries[plan.stage] = entry
        manifest = record(art, entries)
    except BaseException:
        for f in written:
            f.unlink(missing_ok=True)
        raise
    for name in old_files - {e["file"] for e in entries.values()}:
        (art / name).unlink(missing_ok=True)
    return manifest


def record_engines(artifact_dir: Path, entries: dict[str, dict]) -> Manifest:
    """Write the engines section (and their files' hashes) into the manifest, atomically.

    The manifest is re-read here so that sections others wrote since the build began are kept.
    """
    path = Path(artifact_dir) / defaults.MANIFEST_NAME
    manifest = Manifest.from_dict(merge_engines(json.loads(path.read_text()), entries), path)
    manifest.write(artifact_dir)
    return manifest


def _make_logger(trt, say):
    """A TensorRT logger that keeps errors for the one-line message and passes warnings to `say`."""
    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(str(msg).strip())
            elif severity == trt.ILogger.Severity.WARNING:
                say(f"TensorRT: {str(msg).strip()}")
    return Logger()


def _last_error(logger, fallback: str) -> str:
    return (logger.errors[-1].splitlines()[0] if logger.errors else fallback)[:400]


def _create_network(trt, builder, strongly_typed: bool):
    flags = 0
    if strongly_typed and version_tuple(trt.__version__)[0] < 11:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return builder.create_network(flags)


def _configure(trt, builder, config, plan: StagePlan, options: BuildOptions, timing: bytes, say):
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes(options.workspace_gb))
    config.builder_optimization_level = options.optimization_level
    for name in plan.flags:
        if not hasattr(trt.BuilderFlag, name):
            raise Ps3EdgeError(f"TensorRT {trt.__version__} has no builder flag {name}; stage '{plan.stage}' "
                               f"cannot be built at {plan.precision} this way")
        config.set_flag(getattr(trt.BuilderFlag, name))
    for name in plan.clear_flags:
        if hasattr(trt.BuilderFlag, name):
            config.clear_flag(getattr(trt.BuilderFlag, name))
    try:
        cache = config.create_timing_cache(timing or b"")
    except (RuntimeError, TypeError):                      # a damaged cache file
        cache = None
    if cache is None or not config.set_timing_cache(cache, False):
        say("the timing cache is damaged or was made by another TensorRT or GPU; starting an empty one")
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    if is_dynamic(plan.profile) or plan.extra_profiles:
        # profile 0 is plan.profile; more (the LLM's decode profile) follow in order, and the
        # runtime selects them with set_optimization_profile_async
        for bounds in (plan.profile, *plan.extra_profiles):
            profile = builder.create_optimization_profile()
            for name, b in bounds.items():
                try:      # the binding raises RuntimeError for shapes it refuses
                    profile.set_shape(name, tuple(b["min"]), tuple(b["opt"]), tuple(b["max"]))
                except RuntimeError as e:
                    raise Ps3EdgeError(f"TensorRT refused the profile of '{plan.stage}' input '{name}' "
                                       f"{b}: {str(e).splitlines()[0]}") from None
            if config.add_optimization_profile(profile) < 0:
                raise Ps3EdgeError(f"TensorRT refused an optimization profile of '{plan.stage}': {bounds}")
    return cache


def _apply_precision_map(trt, network, nodes: tuple[str, ...], tensors: tuple[str, ...]) -> int:
    """Hold in fp32 the layers the precision map names (by ONNX node, or by output tensor: the
    parser names layers after their nodes and keeps tensor names); returns how many."""
    if not nodes and not tensors:
        return 0
    from ..calibration.precision import fp32_layer_matcher

    match = fp32_layer_matcher({"fp32_nodes": list(nodes), "fp32_tensors": list(tensors)})
    held = 0
    floating = {trt.float32, trt.float16}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        float_outputs = [j for j, out in enumerate(outputs) if out.dtype in floating]
        # a layer with no floating output (shape arithmetic, integer gathers) has no fp16 to avoid,
        # and an fp32 precision constraint on it could make the builder fail under OBEY
        if not float_outputs or not match(layer.name, [o.name for o in outputs]):
            continue
        layer.precision = trt.float32
        for j in float_outputs:
            layer.set_output_type(j, trt.float32)
        held += 1
    return held


def _build_from_onnx(trt, artifact_dir: Path, plan: StagePlan, options: BuildOptions, timing: bytes, say):
    logger = _make_logger(trt, say)
    builder = trt.Builder(logger)
    network = _create_network(trt, builder, plan.strongly_typed)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file reads the external data file next to the model
    if not parser.parse_from_file(str(artifact_dir / plan.onnx_file)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        first = (errors[0] if errors else _last_error(logger, "unknown error")).splitlines()[0]
        raise Ps3EdgeError(f"TensorRT's ONNX parser rejected {plan.onnx_file}: {first}")
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if sorted(names) != sorted(plan.profile):
        raise Ps3EdgeError(f"{plan.onnx_file} has inputs {names}, the manifest says {sorted(plan.profile)}")
    config = builder.create_builder_config()
    cache = _configure(trt, builder, config, plan, options, timing, say)
    held = _apply_precision_map(trt, network, plan.fp32_nodes, plan.fp32_tensors)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise Ps3EdgeError(f"TensorRT could not build stage '{plan.stage}': "
                           f"{_last_error(logger, 'see the TensorRT log above')}")
    return bytes(serialized), bytes(cache.serialize()), held


_TORCH_DTYPES = {"float32": "float32", "int32": "int32"}


def export_stage_program(module, stage: dict, profile: dict, num_positions: int, device: str = "cpu"):
    """torch.export of a stage module with the profile's dynamic axes (T, N) as export Dims and
    example inputs at the profile's opt shapes: what Torch-TensorRT compiles."""
    import torch

    examples, dynamic, dims = [], {}, {}
    for t in stage["inputs"]:
        b = profile[t["name"]]
        dtype = getattr(torch, _TORCH_DTYPES[t["dtype"]])
        if t["name"] == "positions":
            examples.append(torch.randint(0, num_positions, tuple(b["opt"]), dtype=dtype, device=device))
        else:
            examples.append(torch.randn(tuple(b["opt"]), dtype=dtype, device=device))
        axes = {}
        for axis, d in enumerate(t["shape"]):
            if isinstance(d, str) and b["min"][axis] != b["max"][axis]:
                dims.setdefault(d, torch.export.Dim(d, min=b["min"][axis], max=b["max"][axis]))
                axes[axis] = dims[d]
        dynamic[t["name"]] = axes or None
    with torch.no_grad():
        return torch.export.export(module, tuple(examples), dynamic_shapes=dynamic if dims else None)


def _torch_tensorrt_converter(tt, precision: str):
    """Torch-TensorRT's ExportedProgram -> engine converter and its parameters; refuses fp16
    where the converter takes no enabled_precisions (2.14 on: it builds in the program's dtypes)."""
    convert = tt.dynamo.convert_exported_program_to_serialized_trt_engine
    params = inspect.signature(convert).parameters
    if precision == "fp16" and "enabled_precisions" not in params:
        raise Ps3EdgeError(f"Torch-TensorRT {tt.__version__} builds engines in the exported program's own dtypes "
                           "(its converter takes no enabled_precisions); build fp16 with --via onnx")
    return convert, params


def torch_tensorrt_typing(params, precision: str, input_names: list[str], output_names: list[str]) -> dict:
    """The converter's typing and naming keywords, chosen from its parameters: the converter
    takes no autocast (only dynamo.compile does) and drops keywords it does not know into
    **kwargs without a word. fp16: weak typing with fp16 allowed (2.10 on default to explicit
    typing, which would build the fp32 program as fp32); fp32: explicit typing."""
    import torch

    kwargs = {}
    if "enabled_precisions" in params:
        kwargs["enabled_precisions"] = {torch.float32, torch.float16} if precision == "fp16" else {torch.float32}
    if "use_explicit_typing" in params:
        kwargs["use_explicit_typing"] = precision != "fp16"
    if "arg_input_binding_names" in params:                # name the engine's tensors as the manifest does
        # the names mirror the exported program's argument spec, a tuple
        kwargs["arg_input_binding_names"] = tuple(input_names)
        kwargs["output_binding_names"] = tuple(output_names) if len(output_names) > 1 else output_names[0]
    return kwargs


def _build_with_torch_tensorrt(tt, trt, artifact_dir: Path, manifest: Manifest, plan: StagePlan,
                               options: BuildOptions, timing: bytes, models: dict):
    """Compile our PyTorch stage module with Torch-TensorRT (dynamo) into a serialized engine.
    `models` keeps the rebuilt PS3 between the stages."""
    import torch

    from ..model import HighResStage, LowResStage, SelectorStage
    from ..artifact.weights import rebuild_torch_model

    if "model" not in models:
        models["model"] = rebuild_torch_model(manifest).eval().cuda()
    model = models["model"]
    layers = list(manifest.returned_layers)
    module = {"lowres": lambda: LowResStage(model, layers, for_export=True),
              "selector": lambda: SelectorStage(model),
              "highres": lambda: HighResStage(model, layers)}[plan.stage]().eval().cuda()
    stage = manifest.stages[plan.stage].to_dict()
    program = export_stage_program(module, stage, plan.profile, manifest.geometry.highres_patches_total, "cuda")
    inputs = []
    for t in stage["inputs"]:
        b, dtype = plan.profile[t["name"]], getattr(torch, _TORCH_DTYPES[t["dtype"]])
        if b["min"] == b["max"]:
            inputs.append(tt.Input(shape=tuple(b["max"]), dtype=dtype))
        else:
            inputs.append(tt.Input(min_shape=tuple(b["min"]), opt_shape=tuple(b["opt"]),
                                   max_shape=tuple(b["max"]), dtype=dtype))

    convert, params = _torch_tensorrt_converter(tt, plan.precision)
    kwargs = {"arg_inputs": inputs, "workspace_size": workspace_bytes(options.workspace_gb),
              "optimization_level": options.optimization_level, "require_full_compilation": True,
              "min_block_size": 1, "disable_tf32": plan.precision == "fp32"}
    kwargs.update(torch_tensorrt_typing(params, plan.precision, [t["name"] for t in stage["inputs"]],
                                        [t["name"] for t in stage["outputs"]]))
    scratch = Path(tempfile.mkdtemp(prefix=".ps3edge-timing-", dir=artifact_dir))
    try:
        timing_path = scratch / "timing.cache"
        if timing:
            timing_path.write_bytes(timing)
        kwargs["timing_cache_path"] = str(timing_path)
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            raise Ps3EdgeError(f"Torch-TensorRT {tt.__version__}'s converter does not take {unknown}; "
                               "build with --via onnx")
        try:
            try:
                engine = convert(program, **kwargs)
            except Exception as e:
                if "BindingName" not in type(e).__name__:
                    raise
                # names the exported program's structure does not take: inspect_engine maps by position
                kwargs.pop("arg_input_binding_names")
                kwargs.pop("output_binding_names")
                engine = convert(program, **kwargs)
        except Exception as e:  # Torch-TensorRT raises many types; the first line says what failed
            raise Ps3EdgeError(f"Torch-TensorRT could not compile stage '{plan.stage}': "
                               f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        timing = timing_path.read_bytes() if timing_path.is_file() else timing
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return bytes(engine), timing, 0


def _trt_dtype_name(trt, dtype) -> str:
    names = {trt.float32: "float32", trt.float16: "float16", trt.int32: "int32", trt.int8: "int8", trt.bool: "bool"}
    for attr, name in (("int64", "int64"), ("bfloat16", "bfloat16"), ("uint8", "uint8")):
        if hasattr(trt, attr):
            names[getattr(trt, attr)] = name
    return names.get(dtype, str(dtype))


def inspect_engine(trt, engine_bytes: bytes, stage: dict) -> dict:
    """Deserialize a fresh engine: match its tensors to the stage's (by name, else by position) and
    read its activation memory. Refuses an engine whose tensors do not fit the stage."""
    runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    if engine is None:
        raise Ps3EdgeError("TensorRT cannot load the engine it just built")
    ins, outs = [], []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        (ins if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outs).append(name)
    want_in = [t["name"] for t in stage["inputs"]]
    want_out = [t["name"] for t in stage["outputs"]]
    if len(ins) != len(want_in) or len(outs) != len(want_out):
        raise Ps3EdgeError(f"the engine has inputs {ins} and outputs {outs}; the stage has {want_in} and {want_out}")
    bindings = {}
    for want, got in ((want_in, ins), (want_out, outs)):
        same = sorted(want) == sorted(got)
        bindings.update({w: (w if same else g) for w, g in zip(want, got)})
    memory = getattr(engine, "device_memory_size_v2", None)
    if memory is None:
        memory = getattr(engine, "device_memory_size", None)
    return {"bindings": bindings, "device_memory_bytes": memory,
            "dtypes": {w: _trt_dtype_name(trt, engine.get_tensor_dtype(g)) for w, g in bindings.items()}}
