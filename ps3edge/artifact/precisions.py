"""The manifest's "precisions" section: the FP16 / INT8 stage files that `ps3edge calibrate`
wrote next to the FP32 ones, their precision maps, and how the runtime finds them.

    "precisions": {
      "int8": {
        "producer": "ps3edge 0.1.0", "tool": "onnxruntime 1.32.0",
        "method": "percentile", "percentile": 99.99,    # null for the other methods
        "samples": 32, "highres_samples": 64,
        "exclude_blocks": [], "exclude_selection_branch": true,
        "calibration_images": [{"name": "a.png", "sha256": "..."}, ...],
        "stages": {
          "lowres":   {"file": "lowres.int8.onnx", "external_data": [], "precision_map": {...}},
          "selector": {"file": "selector.onnx",    "external_data": [], "precision_map": {...}},
          "highres":  {"file": "highres.int8.onnx", "external_data": [], "precision_map": {...}}
        },
        "report": "accuracy.int8.json"             # optional, written after the stages
      },
      "fp16": { ... the same "stages" layout, no calibration keys ... }
    }

A stage kept in FP32 (the selector, always) names the FP32 file itself. An FP16 stage's map
records the dtype of each of its float inputs and outputs ("io_dtypes": the K/V cache, the
features and the high-res patches pass between the FP16 stages in float16); `stage_entries`
gives the stages' declared tensors with those dtypes, which is what a runner of the precision's
files checks its feeds against. Every file named here has
its sha256 in the manifest's "files", so `load_manifest` verifies it like the FP32 stages. The
precision map's schema is in calibration/precision.py; `calibrate` writes this section.
`PrecisionEntry` (its stages `PrecisionStage`, their `PrecisionMap`) is how every other layer
reads an entry; `check_precisions` makes sure each one can be read so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from .. import defaults
from ..errors import Ps3EdgeError
from .io import apply_default_mode, file_sha256
from .records import JsonRecord, extra_keys

SECTION = "precisions"
STAGES = ("lowres", "selector", "highres")
# the keys of an INT8 entry that say how it was calibrated (`PrecisionEntry.calibration`)
CALIBRATION = ("method", "percentile", "samples", "highres_samples", "exclude_blocks", "exclude_selection_branch",
               "calibration_images")


@dataclass(frozen=True, kw_only=True)
class TensorRTHints(JsonRecord):
    """A precision map's "tensorrt": how a TensorRT builder applies it."""
    strongly_typed: bool
    builder_flags: tuple[str, ...]              # BuilderFlag names
    extra: Mapping = extra_keys()


@dataclass(frozen=True, kw_only=True)
class PrecisionMap(JsonRecord):
    """One stage's precision map (schema 1; the policy that writes it and how a builder applies
    it: calibration/precision.py)."""
    schema: int
    default: str                                # every float layer not listed: fp32 | fp16 | int8
    io_dtype: str                               # of the stage file's float inputs and outputs: float32 | float16 | mixed
    io_dtypes: Mapping[str, str] | None = None  # FP16 maps: each float input / output -> its dtype
    quantized_nodes: tuple[str, ...] | None = None      # INT8 maps: the nodes whose inputs carry Q/DQ
    fp32_op_types: tuple[str, ...]              # the rule, for people
    fp32_regions: tuple[str, ...]               # the rule, for people
    fp32_nodes: tuple[str, ...]                 # ONNX node names (of the FP32 stage file) held in fp32
    fp32_tensors: tuple[str, ...]               # the float outputs of those nodes
    fp16_node_count: int | None = None          # FP16 maps
    tensorrt: TensorRTHints
    extra: Mapping = extra_keys()

    @classmethod
    def from_dict(cls, data: Mapping) -> "PrecisionMap":
        return super().from_dict(data, tensorrt=TensorRTHints.from_dict(data["tensorrt"]))


@dataclass(frozen=True, kw_only=True)
class PrecisionStage(JsonRecord):
    """One stage of a precision: its ONNX file (and external data) and its precision map."""
    file: str
    external_data: tuple[str, ...]
    precision_map: PrecisionMap
    extra: Mapping = extra_keys()

    @classmethod
    def from_dict(cls, data: Mapping) -> "PrecisionStage":
        return super().from_dict(data, precision_map=PrecisionMap.from_dict(data["precision_map"]))

    @property
    def files(self) -> tuple[str, ...]:
        return (self.file, *self.external_data)


@dataclass(frozen=True, kw_only=True)
class CalibrationImage(JsonRecord):
    name: str
    sha256: str
    extra: Mapping = extra_keys()


@dataclass(frozen=True, kw_only=True)
class Calibration(JsonRecord):
    """How an INT8 entry was calibrated; its keys sit in the entry's own JSON object."""
    NULLABLE = ("percentile",)                  # written as null when the method is not percentile
    method: str                                 # max | entropy | percentile
    percentile: float | None = None
    samples: int                                # calibration images
    highres_samples: int                        # highres calibration feeds captured from them
    exclude_blocks: tuple[int, ...]             # transformer blocks kept float
    exclude_selection_branch: bool
    calibration_images: tuple[CalibrationImage, ...]
    extra: Mapping = extra_keys()

    @classmethod
    def from_dict(cls, data: Mapping) -> "Calibration":
        images = tuple(CalibrationImage.from_dict(i) for i in data["calibration_images"])
        return super().from_dict(data, calibration_images=images)


@dataclass(frozen=True, kw_only=True)
class PrecisionEntry(JsonRecord):
    """One precision of the section (the schema above)."""
    producer: str | None = None                 # "ps3edge 0.1.0"
    tool: str | None = None                     # what wrote the stages
    calibration: Calibration | None = None      # INT8's; None for FP16
    stages: Mapping[str, PrecisionStage]
    report: str | None = None                   # accuracy.<precision>.json, once written
    extra: Mapping = extra_keys()

    @classmethod
    def from_dict(cls, data: Mapping) -> "PrecisionEntry":
        calibration = {k: data[k] for k in CALIBRATION if k in data}
        return super().from_dict({k: v for k, v in data.items() if k not in CALIBRATION},
                                 calibration=Calibration.from_dict(calibration) if calibration else None,
                                 stages={n: PrecisionStage.from_dict(i) for n, i in data["stages"].items()})

    def to_dict(self) -> dict:
        out = {}
        for key, value in super().to_dict().items():
            if key == "calibration":              # its keys sit in the entry's own object
                out.update(value)
            else:
                out[key] = value
        return out

    @property
    def files(self) -> set[str]:
        """Every file the entry names: its stages' files and its report."""
        return {f for stage in self.stages.values() for f in stage.files} | ({self.report} if self.report else set())


# what the values of the keys a record reads must be: (test, what it is, in the one-line error)
_STR = (lambda v: isinstance(v, str), "a string")
_INT = (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer")
_BOOL = (lambda v: isinstance(v, bool), "true or false")
_STRS = (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings")
_INTS = (lambda v: isinstance(v, list) and all(_INT[0](x) for x in v), "a list of integers")
_PERCENTILE = (lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)), "a number or null")
_IMAGES = (lambda v: isinstance(v, list) and all(isinstance(i, dict) and _STR[0](i.get("name"))
                                                   and _STR[0](i.get("sha256")) for i in v),
           'a list of {"name", "sha256"} objects')
CALIBRATION_KEYS = dict(zip(CALIBRATION, (_STR, _PERCENTILE, _INT, _INT, _INTS, _BOOL, _IMAGES)))
MAP_KEYS = {"schema": _INT, "io_dtype": _STR, "fp32_op_types": _STRS, "fp32_regions": _STRS, "fp32_nodes": _STRS,
            "fp32_tensors": _STRS}
_DTYPES = (lambda v: isinstance(v, dict) and all(isinstance(k, str) and x in ("float32", "float16")
                                                  for k, x in v.items()),
           'an object of tensor -> "float32" | "float16"')
MAP_OPTIONAL = {"quantized_nodes": _STRS, "fp16_node_count": _INT, "io_dtypes": _DTYPES}


def _check_keys(where: str, obj: dict, required: dict, optional: dict, bad) -> None:
    for key, (ok, what) in required.items():
        if key not in obj or not ok(obj[key]):
            bad(f"{where}.{key} is missing or not {what}")
    for key, (ok, what) in optional.items():
        if key in obj and not ok(obj[key]):
            bad(f"{where}.{key} is not {what}")


def _check_map(where: str, pmap, bad) -> None:
    """A stage's precision map, as far as `PrecisionMap` reads it."""
    if not isinstance(pmap, dict) or pmap.get("default") not in ("fp32", "fp16", "int8"):
        bad(f"{where} has no valid 'precision_map'")
    _check_keys(f"{where}.precision_map", pmap, MAP_KEYS, MAP_OPTIONAL, bad)
    if not isinstance(pmap.get("tensorrt"), dict):
        bad(f"{where}.precision_map.tensorrt is missing or not an object")
    _check_keys(f"{where}.precision_map.tensorrt", pmap["tensorrt"], {"strongly_typed": _BOOL, "builder_flags": _STRS},
                {}, bad)


def check_precisions(manifest, path) -> None:
    """Raise if the "precisions" section of a Manifest is malformed or names files without a sha256."""
    def bad(what: str):
        raise Ps3EdgeError(f"{path} is inconsistent: {what} - run 'ps3edge calibrate' again")

    raw = manifest.to_dict()
    section = raw.get(SECTION)
    if section is None:
        return
    if not isinstance(section, dict):
        bad(f"'{SECTION}' is not an object")
    files = raw["files"]
    for precision, entry in section.items():
        if precision not in defaults.CALIBRATION_PRECISIONS:
            bad(f"'{SECTION}' has an unknown precision '{precision}' "
                f"(known: {', '.join(defaults.CALIBRATION_PRECISIONS)})")
        if not isinstance(entry, dict) or not isinstance(entry.get("stages"), dict):
            bad(f"{SECTION}.{precision} has no 'stages' object")
        where = f"{SECTION}.{precision}"
        _check_keys(where, entry, {}, {"producer": _STR, "tool": _STR, "report": _STR}, bad)
        if any(k in entry for k in CALIBRATION):            # an INT8 calibration: all of its keys
            _check_keys(where, entry, CALIBRATION_KEYS, {}, bad)
        stages = entry["stages"]
        if sorted(stages) != sorted(STAGES):
            bad(f"{where}.stages must name {', '.join(STAGES)}, got {', '.join(sorted(stages)) or 'none'}")
        for name, info in stages.items():
            if not isinstance(info, dict) or not isinstance(info.get("file"), str):
                bad(f"{where}.stages.{name} has no 'file'")
            extra = info.get("external_data")
            if not isinstance(extra, list) or not all(isinstance(f, str) for f in extra):
                bad(f"{where}.stages.{name}.external_data must be a list of file names")
            for f in [info["file"], *extra]:
                if f not in files:
                    bad(f"{where} stage '{name}' file {f!r} has no sha256 in 'files'")
            _check_map(f"{where}.stages.{name}", info.get("precision_map"), bad)
        report = entry.get("report")
        if report is not None and report not in files:
            bad(f"{where} report {report!r} has no sha256 in 'files'")


def stage_files(manifest, precision: str, artifact_dir=None) -> dict[str, str]:
    """stage -> ONNX file name of that precision; a one-line error when there is none."""
    if precision == "fp32":
        return {name: stage.file for name, stage in manifest.stages.items()}
    if precision not in defaults.CALIBRATION_PRECISIONS:
        raise Ps3EdgeError(f"unknown precision '{precision}'; choose one of: fp32, "
                           f"{', '.join(defaults.CALIBRATION_PRECISIONS)}")
    entry = manifest.precisions.get(precision)
    if entry is None:
        where = artifact_dir if artifact_dir is not None else "ARTIFACTS"
        images = " --images DIR" if precision == "int8" else ""
        raise Ps3EdgeError(f"{where} has no {precision} stages; run 'ps3edge calibrate {where} "
                           f"--precision {precision}{images}' first")
    return {name: info.file for name, info in entry.stages.items()}


def stage_entries(manifest, precision: str) -> dict:
    """stage -> its StageEntry as `precision`'s file declares it: the FP32 entry with the dtypes
    its precision map records ("io_dtypes"; a map without them: float32, as exported). fp32:
    the manifest's own entries."""
    from dataclasses import replace

    if precision == "fp32" or precision not in manifest.precisions:
        return dict(manifest.stages)
    entries = {}
    for name, entry in manifest.stages.items():
        stage = manifest.precisions[precision].stages.get(name)
        dtypes = (stage.precision_map.io_dtypes if stage is not None else None) or {}
        typed = lambda ts: tuple(replace(t, dtype=dtypes.get(t.name, t.dtype)) for t in ts)  # noqa: E731
        entries[name] = replace(entry, inputs=typed(entry.inputs), outputs=typed(entry.outputs))
    return entries


def referenced_files(manifest, precisions) -> set[str]:
    """Files that the FP32 stages and the prior prompt of a Manifest and the entries `precisions`
    use."""
    used = {defaults.PRIOR_PROMPT_FILE}
    for stage in manifest.stages.values():
        used.update(stage.files)
    for entry in precisions:
        used |= entry.files
    return used


def without_precision(manifest, precision: str):
    """The Manifest without `precision`'s entry or the files only it used."""
    entry = manifest.precisions.get(precision)
    if entry is None:
        return manifest
    rest = {p: e for p, e in manifest.precisions.items() if p != precision}
    mine = entry.files - referenced_files(manifest, rest.values())
    return manifest.replace(files={f: h for f, h in manifest.files.items() if f not in mine},
                            precisions=rest or None)


def register_precision(artifact_dir, manifest, name: str, entry, staged):
    """Record precision `name` in an artifact (a Manifest or a VilaManifest: both have
    `without_precision`, `files`, `precisions`, `replace` and `write`): drop the old entry first (so
    no manifest ever names a file being replaced), move the `staged` (temporary, final name) files
    into place, then write the new entry with the files' hashes. The caller holds the writer lock."""
    artifact_dir = Path(artifact_dir)
    manifest = manifest.without_precision(name)
    manifest.write(artifact_dir)
    for tmp, final in staged:
        apply_default_mode(tmp)
        os.replace(tmp, artifact_dir / final)
    files = {**manifest.files, **{final: file_sha256(artifact_dir / final) for _, final in staged}}
    manifest = manifest.replace(files=files, precisions={**manifest.precisions, name: entry})
    manifest.write(artifact_dir)
    return manifest
