"""The manifest's `engines` section: what `ps3edge build` records about each engine, and the check
that `load_manifest` runs on it.

    "engines": {
      "<stage>": {
        "file": "highres.fp16.3f2a9c0d1b7e.engine",  # in the artifact directory, also in "files"
        "sha256": "...",                    # the same hash as files[file]
        "built_via": "onnx" | "torch-tensorrt",
        "precision": "fp32" | "fp16" | "int8" | "best",   # what this stage's engine runs
        "requested_precision": "...",       # what `--precision` asked for
        "strongly_typed": bool,
        "precision_constraints": int,       # layers held in fp32 by the manifest's precision map
        "precision_map": "precisions.fp16", # the "precisions" entry whose file / map was used, if any
        "tensorrt_version": "10.3.0", "cuda_version": "12.6", "gpu_name": "Orin", "sm": 87,
        "jetpack": "6.2", "l4t": "36.4.3",  # only on a Jetson
        "profiles": {"<input>": {"min": [...], "opt": [...], "max": [...]}},
        "max_look_close": 6,                # T_max of the profile
        "workspace_bytes": int, "builder_optimization_level": int,
        "device_memory_bytes": int,         # activation memory of one execution context
        "bindings": {"<manifest tensor name>": "<engine tensor name>"},
        "cache_key": "<sha256 of the build inputs>"
      }
    }

VILA-HD's vila.json has an `engines` section of the same entries for its projector and LLM
(artifact/vila.py), without "max_look_close" and with "max_prompt", and for the LLM
"context_length" and "optimization_profiles" ({"prefill": {...}, "decode": {...}}).
`EngineEntry` is how every other layer reads an entry.

The check holds every entry against the rest of the manifest: the file is listed in `files` with
the same hash, the profiles name exactly the stage's inputs, agree with their static dimensions,
and stay within the bounds the stage accepts (T within 'all' steps, N within
max_tokens_per_highres_call), and all engines of an artifact come from one TensorRT on one GPU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from .. import defaults
from ..errors import Ps3EdgeError
from .profiles import axis_bounds, highres_rows
from .records import JsonRecord, extra_keys

# an optimization profile: input -> {"min", "opt", "max"} shapes (artifact/profiles.py's bounds)
Profile = Mapping[str, Mapping[str, tuple[int, ...]]]


@dataclass(frozen=True, kw_only=True)
class EngineEntry(JsonRecord):
    """One engine of an `engines` section (the schema above), in the order `ps3edge build` writes
    its keys; an optional key the entry does not have is None."""
    file: str
    sha256: str
    built_via: str
    precision: str
    requested_precision: str | None = None
    strongly_typed: bool | None = None
    precision_constraints: int | None = None
    tensorrt_version: str
    cuda_version: str
    gpu_name: str
    sm: int
    profiles: Profile
    max_look_close: int | None = None
    workspace_bytes: int | None = None
    builder_optimization_level: int | None = None
    bindings: Mapping[str, str] | None = None
    cache_key: str
    precision_map: str | None = None
    device_memory_bytes: int | None = None
    jetpack: str | None = None
    l4t: str | None = None
    max_prompt: int | None = None                           # VILA-HD's projector and LLM
    context_length: int | None = None                       # VILA-HD's LLM
    optimization_profiles: Mapping[str, Profile] | None = None
    extra: Mapping = extra_keys()

    @property
    def facts(self) -> dict:
        """The machine it was built on, in the form of engines/platform.py's machine_facts."""
        facts = {"tensorrt_version": self.tensorrt_version, "cuda_version": self.cuda_version,
                 "gpu_name": self.gpu_name, "sm": self.sm}
        return {**facts, **{k: getattr(self, k) for k in ("l4t", "jetpack") if getattr(self, k) is not None}}

REQUIRED = {"file": str, "sha256": str, "built_via": str, "precision": str, "tensorrt_version": str,
            "cuda_version": str, "gpu_name": str, "sm": int, "profiles": dict, "cache_key": str}
OPTIONAL = {"requested_precision": str, "strongly_typed": bool, "precision_constraints": int, "jetpack": str,
            "l4t": str, "max_look_close": int, "workspace_bytes": int, "builder_optimization_level": int,
            "device_memory_bytes": int, "bindings": dict, "precision_map": str,
            "max_prompt": int, "context_length": int, "optimization_profiles": dict}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_VERSION = re.compile(r"^\d+(\.\d+)*")


def check_engines_section(manifest, bad) -> None:
    """Raise through `bad(what)` (one line) when the `engines` section of a Manifest is malformed
    or disagrees with the rest of it. Absent section: nothing to check."""
    raw = manifest.to_dict()
    engines = raw.get("engines")
    if engines is None:
        return
    if not isinstance(engines, dict):
        bad("'engines' is not an object")
    stages, files = raw["stages"], raw["files"]
    unknown = sorted(set(engines) - set(stages))
    if unknown:
        bad(f"'engines' names stages that do not exist: {unknown}")
    # bounds a recorded profile may not exceed: every step ('all') and the per-call token limit
    limits = axis_bounds(manifest, "all")
    machines = set()
    for stage, entry in engines.items():
        where = f"engines.{stage}"
        check_entry(where, entry, bad)
        if files.get(entry["file"]) != entry["sha256"]:
            bad(f"{where}.file {entry['file']} is not listed in 'files' with the engine's sha256")
        _check_profiles(where, entry["profiles"], stages[stage], limits, bad)
        steps = entry.get("max_look_close")
        rows = _axis_max(stages[stage], entry["profiles"], "T")
        if steps is not None and rows is not None and rows != highres_rows(manifest, steps):
            bad(f"{where}.max_look_close {steps} (x {manifest.geometry.max_batch} images) does not match its "
                f"profile's T max {rows}")
        if "bindings" in entry:
            names = [t["name"] for t in stages[stage]["inputs"] + stages[stage]["outputs"]]
            b = entry["bindings"]
            if sorted(b) != sorted(names) or not all(isinstance(v, str) and v for v in b.values()) \
                    or len(set(b.values())) != len(b):
                bad(f"{where}.bindings must map each of the stage's tensors {names} to a distinct engine tensor")
        machines.add((".".join(str(x) for x in _version3(entry["tensorrt_version"])), entry["sm"]))
    if len(machines) > 1:
        bad(f"'engines' were built by different TensorRT versions or GPUs {sorted(machines)}; rebuild them together")


def check_entry(where: str, entry, bad) -> None:
    """One entry's keys and their values on their own (the JSON an `EngineEntry` is read from);
    raise through `bad(what)`."""
    if not isinstance(entry, dict):
        bad(f"{where} is not an object")
    for key, kind in REQUIRED.items():
        if not isinstance(entry.get(key), kind) or (kind is int and isinstance(entry.get(key), bool)):
            bad(f"{where}.{key} is missing or not a {kind.__name__}")
    for key, kind in OPTIONAL.items():
        if key in entry and (not isinstance(entry[key], kind) or (kind is int and isinstance(entry[key], bool))):
            bad(f"{where}.{key} is not a {kind.__name__}")
    name = entry["file"]
    if name in ("", ".", "..") or Path(name).name != name:
        bad(f"{where}.file {name!r} is not a file name inside the artifact directory")
    if not _SHA256.match(entry["sha256"]):
        bad(f"{where}.sha256 is not a sha256 hex digest")
    if entry["built_via"] not in defaults.ENGINE_ROUTES:
        bad(f"{where}.built_via must be one of {', '.join(defaults.ENGINE_ROUTES)}, got {entry['built_via']!r}")
    for key in ("precision", "requested_precision"):
        if key in entry and entry[key] not in defaults.ENGINE_PRECISIONS:
            bad(f"{where}.{key} must be one of {', '.join(defaults.ENGINE_PRECISIONS)}, got {entry[key]!r}")
    if not _VERSION.match(entry["tensorrt_version"]):
        bad(f"{where}.tensorrt_version {entry['tensorrt_version']!r} is not a version number")
    if entry["sm"] < 10:
        bad(f"{where}.sm {entry['sm']} is not a GPU architecture like 87 or 90")


def cached_entry(data) -> EngineEntry | None:
    """The entry the engine cache kept next to an engine (engines/cache.py), or None where it is
    not a whole entry (the cache treats it as a miss, as it does a damaged engine)."""
    def bad(what: str):
        raise Ps3EdgeError(what)
    try:
        check_entry("the cached entry", data, bad)
    except Ps3EdgeError:
        return None
    return EngineEntry.from_dict(data)


def _version3(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in _VERSION.match(text).group().split("."))[:3]


def _check_profiles(where: str, profiles: dict, stage: dict, limits: dict, bad) -> None:
    inputs = {t["name"]: t["shape"] for t in stage["inputs"]}
    if sorted(profiles) != sorted(inputs):
        bad(f"{where}.profiles name inputs {sorted(profiles)}, the stage has {sorted(inputs)}")
    seen = {}
    for name, shape in inputs.items():
        p = profiles[name]
        if not isinstance(p, dict) or sorted(p) != ["max", "min", "opt"]:
            bad(f"{where}.profiles.{name} must have min, opt and max shapes")
        for which in ("min", "opt", "max"):
            dims = p[which]
            if (not isinstance(dims, list) or len(dims) != len(shape)
                    or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims)):
                bad(f"{where}.profiles.{name}.{which} must be {len(shape)} integers")
        for axis, dim in enumerate(shape):
            lo, opt, hi = p["min"][axis], p["opt"][axis], p["max"][axis]
            if not 1 <= lo <= opt <= hi:
                bad(f"{where}.profiles.{name} axis {axis}: min {lo} <= opt {opt} <= max {hi} does not hold")
            if isinstance(dim, str):
                if dim in limits and hi > limits[dim][2]:
                    bad(f"{where}.profiles.{name} axis {axis} ({dim}) max {hi} exceeds the {limits[dim][2]} "
                        f"this stage accepts")
                if seen.setdefault(dim, (lo, opt, hi)) != (lo, opt, hi):
                    bad(f"{where}.profiles give axis {dim} different bounds on different inputs")
            elif (lo, opt, hi) != (dim, dim, dim):
                bad(f"{where}.profiles.{name} axis {axis} is static ({dim}) but the profile says "
                    f"{lo}/{opt}/{hi}")


def _axis_max(stage: dict, profiles: dict, axis_name: str):
    for t in stage["inputs"]:
        for axis, dim in enumerate(t["shape"]):
            if dim == axis_name:
                return profiles[t["name"]]["max"][axis]
    return None


def merge_engines(manifest: dict, entries: Mapping[str, EngineEntry]) -> dict:
    """A manifest's JSON (manifest.json or vila.json) with `entries` in its engines section and the
    engine files' hashes in `files` (those of replaced engines dropped)."""
    old = manifest.get("engines") or {}
    files = {k: v for k, v in manifest["files"].items() if k not in {e["file"] for e in old.values()}}
    engines = {**{s: e for s, e in old.items() if s not in entries}, **{s: e.to_dict() for s, e in entries.items()}}
    for e in engines.values():
        files[e["file"]] = e["sha256"]
    return {**manifest, "files": files, "engines": engines}
