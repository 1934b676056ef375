"""The manifest's "precisions" section: the FP16 / INT8 stage files that `ps3edge calibrate`
wrote next to the FP32 ones, their precision maps, and how the runtime finds them.

    "precisions": {
      "int8": {
        "producer": "ps3edge 0.1.0", "tool": "onnxruntime 1.32.0",
        "method": "percentile", "samples": 32, "highres_samples": 64,
        "exclude_blocks": [], "exclude_selection_branch": true,
        "calibration_images": [{"name": "a.png", "sha256": "..."}, ...],
        "report": "accuracy.int8.json",            # optional, written after the stages
        "stages": {
          "lowres":   {"file": "lowres.int8.onnx", "external_data": [], "precision_map": {...}},
          "selector": {"file": "selector.onnx",    "external_data": [], "precision_map": {...}},
          "highres":  {"file": "highres.int8.onnx", "external_data": [], "precision_map": {...}}
        }
      },
      "fp16": { ... the same "stages" layout, no calibration keys ... }
    }

A stage kept in FP32 (the selector, always) names the FP32 file itself. Every file named here has
its sha256 in the manifest's "files", so `load_manifest` verifies it like the FP32 stages. The
precision map's schema is in calibration/precision.py; `calibrate` writes this section.
"""

from __future__ import annotations

from .. import defaults
from ..errors import Ps3EdgeError

SECTION = "precisions"
STAGES = ("lowres", "selector", "highres")


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
        stages = entry["stages"]
        if sorted(stages) != sorted(STAGES):
            bad(f"{SECTION}.{precision}.stages must name {', '.join(STAGES)}, got {', '.join(sorted(stages)) or 'none'}")
        for name, info in stages.items():
            if not isinstance(info, dict) or not isinstance(info.get("file"), str):
                bad(f"{SECTION}.{precision}.stages.{name} has no 'file'")
            extra = info.get("external_data", [])
            if not isinstance(extra, list) or not all(isinstance(f, str) for f in extra):
                bad(f"{SECTION}.{precision}.stages.{name}.external_data must be a list of file names")
            for f in [info["file"], *extra]:
                if f not in files:
                    bad(f"{SECTION}.{precision} stage '{name}' file {f!r} has no sha256 in 'files'")
            pmap = info.get("precision_map")
            if not isinstance(pmap, dict) or pmap.get("default") not in ("fp32", "fp16", "int8"):
                bad(f"{SECTION}.{precision}.stages.{name} has no valid 'precision_map'")
        report = entry.get("report")
        if report is not None and report not in files:
            bad(f"{SECTION}.{precision} report {report!r} has no sha256 in 'files'")


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
    return {name: info["file"] for name, info in entry.stages.items()}


def referenced_files(manifest: dict) -> set[str]:
    """Files that the FP32 stages, the prior prompt and the other precisions' entries of a
    manifest's JSON use."""
    used = {defaults.PRIOR_PROMPT_FILE}
    for info in manifest["stages"].values():
        used.add(info["file"])
        used.update(info.get("external_data", []))
    for entry in manifest.get(SECTION, {}).values():
        for info in entry["stages"].values():
            used.add(info["file"])
            used.update(info.get("external_data", []))
        if entry.get("report"):
            used.add(entry["report"])
    return used


def without_precision(manifest, precision: str):
    """The Manifest without `precision`'s entry or the files only it used."""
    m = manifest.to_dict()
    entry = m.get(SECTION, {}).pop(precision, None)
    if entry is None:
        return manifest
    keep = referenced_files(m)
    mine = {info["file"] for info in entry["stages"].values()}
    mine |= {f for info in entry["stages"].values() for f in info.get("external_data", [])}
    if entry.get("report"):
        mine.add(entry["report"])
    for f in mine - keep:
        m["files"].pop(f, None)
    if not m[SECTION]:
        del m[SECTION]
    return type(manifest).from_dict(m, manifest.path)

