"""`ps3edge build`: the exported stages -> TensorRT engines, recorded in the manifest.

`build` plans every stage (plan.py: source ONNX, typing, flags, profile, cache key; no TensorRT
needed), then builds each engine by its route - `--via onnx` parses the ONNX file
(onnx_route.py, through Polygraphy), `--via torch-tensorrt` compiles our PyTorch stage modules
(torch_route.py) - or reuses it, and records them in the manifest's `engines` section
(artifact/engines.py). `reuse_or_build` is the engine loop that VILA-HD's projector and LLM
(llm_engine.py) share; llm_engine.py imports it, `inspect_engine`, the ONNX route and the plan's
names from here.

Writes are atomic: engine files get names that include their cache key, are written through a
temporary file and rename, and the manifest is replaced in one rename after all of them; files of
engines that a rebuild replaced are removed only after that.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable, Mapping

from ..artifact.engines import EngineEntry, cached_entry
from ..artifact.io import copy_atomic, file_sha256, write_bytes_atomic
from ..artifact.manifest import Manifest, load_manifest
from ..artifact.profiles import is_dynamic, profile_bounds
from ..errors import Ps3EdgeError
from .cache import EngineCache, read_timing_cache, write_timing_cache
from .onnx_route import build_from_onnx
from .plan import BuildOptions, engine_entry, plan_build
from .platform import import_polygraphy, import_tensorrt, import_torch_tensorrt, machine_facts
from .torch_route import _build_with_torch_tensorrt, _torch_tensorrt_converter

# llm_engine.py imports these from here, besides the names above
from .plan import StagePlan, workspace_bytes  # noqa: F401
_build_from_onnx = build_from_onnx


def build(artifact_dir, options: BuildOptions, progress: Callable[[str], None] | None = None) -> Manifest:
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
    else:
        import_polygraphy()                                   # the ONNX route builds through it
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
            + (", " + ", ".join(f"{name} <= {b['max']}" for name, b in plan.profile.items() if b["min"] != b["max"])
               if is_dynamic(plan.profile) else ""))
        if options.via == "onnx":
            engine_bytes, timing, constraints = build_from_onnx(trt, artifact_dir, plan, options, timing, say)
        else:
            engine_bytes, timing, constraints = _build_with_torch_tensorrt(
                tt, trt, artifact_dir, manifest, plan, options, timing, models)
        inspected = inspect_engine(trt, engine_bytes, manifest.stages[plan.stage])
        inspected["precision_constraints"] = constraints
        return engine_bytes, timing, lambda sha256: engine_entry(plan, options, facts, sha256, inspected)

    return reuse_or_build(artifact_dir, plans, manifest.engines, options, cache, say, build_one, record_engines)


def reuse_or_build(art: Path, plans, old: Mapping[str, EngineEntry], options: BuildOptions, cache, say, build_one,
                   record):
    """The engine loop shared by the PS3 stages and VILA-HD's projector / LLM.

    For each plan: keep the engine the manifest already records (same cache key, file intact),
    else copy it from the engine cache, else `build_one(plan, timing)`, which returns the engine
    bytes, the updated timing cache and a function from the written file's sha256 to its EngineEntry.
    `record(art, entries)` then writes the manifest once. New files are removed again if anything
    fails; files of replaced engines are removed after the manifest no longer names them.
    """
    timing = read_timing_cache(options.timing_cache)
    old_files = {e.file for e in old.values()}
    entries, written = {}, []           # written: new files, removed again if the build fails
    try:
        for plan in plans:
            previous = old.get(plan.stage)
            if (not options.force and previous and previous.cache_key == plan.key
                    and (art / previous.file).is_file()
                    and file_sha256(art / previous.file) == previous.sha256):
                say(f"stage '{plan.stage}': engine {previous.file} is up to date")
                entries[plan.stage] = previous
                continue
            hit = None if (options.force or cache is None) else cache.get(plan.key)
            cached = cached_entry(hit[1]) if hit is not None else None
            target = art / plan.engine_file
            if cached is not None:
                say(f"stage '{plan.stage}': reusing the cached engine {plan.key[:12]}")
                copy_atomic(hit[0], target)
                written += [target] if target.name not in old_files else []
                entry = replace(cached, file=plan.engine_file, requested_precision=options.precision)
            else:
                engine_bytes, timing, make_entry = build_one(plan, timing)
                write_timing_cache(options.timing_cache, timing)
                write_bytes_atomic(target, engine_bytes)
                written += [target] if target.name not in old_files else []
                entry = make_entry(file_sha256(target))
                if cache is not None:
                    cache.put(plan.key, engine_bytes, entry.to_dict())
                say(f"stage '{plan.stage}': wrote {plan.engine_file} ({len(engine_bytes) / 2**20:.1f} MiB)")
            entries[plan.stage] = entry
        manifest = record(art, entries)
    except BaseException:
        for f in written:
            f.unlink(missing_ok=True)
        raise
    for name in old_files - {e.file for e in entries.values()}:
        (art / name).unlink(missing_ok=True)
    return manifest


def record_engines(artifact_dir: Path, entries: Mapping[str, EngineEntry]) -> Manifest:
    """Write the engines section (and their files' hashes) into the manifest, atomically.

    The manifest is re-read here so that sections others wrote since the build began are kept.
    """
    manifest = load_manifest(artifact_dir, verify=False).with_engines(entries)     # its integrity checked first
    manifest.write(artifact_dir)
    return manifest


def _trt_dtype_name(trt, dtype) -> str:
    names = {trt.float32: "float32", trt.float16: "float16", trt.int32: "int32", trt.int8: "int8", trt.bool: "bool"}
    for attr, name in (("int64", "int64"), ("bfloat16", "bfloat16"), ("uint8", "uint8")):
        if hasattr(trt, attr):
            names[getattr(trt, attr)] = name
    return names.get(dtype, str(dtype))


def inspect_engine(trt, engine_bytes: bytes, stage) -> dict:
    """Deserialize a fresh engine: match its tensors to the stage's (a StageEntry or StageSpec: by
    name, else by position) and read its activation memory. Refuses an engine whose tensors do not
    fit the stage."""
    runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    if engine is None:
        raise Ps3EdgeError("TensorRT cannot load the engine it just built")
    ins, outs = [], []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        (ins if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outs).append(name)
    want_in = [t.name for t in stage.inputs]
    want_out = [t.name for t in stage.outputs]
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
