"""`ps3edge calibrate`: write an artifact's FP16 or INT8 stages next to its FP32 ones, register
them in the manifest, and measure them.

    ARTIFACTS/lowres.int8.onnx, highres.int8.onnx      (the selector stays selector.onnx)
    ARTIFACTS/manifest.json   "precisions": {"int8": {...}}   (schema in registry.py)
    ARTIFACTS/accuracy.int8.json                        (report.py)

Atomic like the export: the new files are written under temporary names first; the manifest then
drops any previous entry of that precision, the files are renamed into place, and the manifest
gains the new entry with every sha256. An interruption at any point leaves a consistent artifact
(at worst without that precision). The FP32 stages are never touched.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import onnx

from .. import __version__, defaults
from ..artifact.io import apply_default_mode, file_sha256, temp_dir, temp_file
from ..artifact.lock import writer_lock
from ..artifact.manifest import Manifest, load_manifest
from ..errors import Ps3EdgeError
from ..runtime.planning import LookCloseSettings, resolve_steps
from ..runtime.preprocess import open_image
from . import int8 as int8mod
from .data import StageInputs, image_files
from .precision import convert_fp16, check_types, fp16_precision_map, tensor_types
from .report import AccuracyReport, accuracy_report

QUANTIZED_STAGES = ("lowres", "highres")           # the selector stays FP32 in every precision


def _temp_path(directory: Path, final_name: str) -> Path:
    return temp_file(directory, final_name)


def save_model(model: onnx.ModelProto, path: Path, final_name: str) -> list[tuple[Path, str]]:
    """Save `model` at `path` (a temporary name); weights over the exporter's threshold go to one
    external file whose final name is `final_name`.data. Returns (temporary path, final name) pairs."""
    if model.ByteSize() > defaults.EXTERNAL_DATA_THRESHOLD_BYTES:
        data_name = final_name + ".data"
        # the data file is written under its final name: the model refers to it by that name
        data_tmp = _temp_path(path.parent, data_name)
        data_tmp.unlink()
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_tmp.name, size_threshold=1024, convert_attribute=True)
        # point the model at the final data name, then rewrite the (small) model file
        stub = onnx.load(str(path), load_external_data=False)
        for t in _external_tensors(stub):
            for entry in t.external_data:
                if entry.key == "location":
                    entry.value = data_name
        onnx.save_model(stub, str(path))
        return [(path, final_name), (data_tmp, data_name)]
    onnx.save_model(model, str(path))
    return [(path, final_name)]


def _external_tensors(model: onnx.ModelProto):
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            yield t
    for node in model.graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_location == onnx.TensorProto.EXTERNAL:
                yield a.t


def _register(artifact_dir: Path, manifest: Manifest, precision: str, entry: dict,
              staged: list[tuple[Path, str]]) -> Manifest:
    """Drop the old entry, move the staged files into place, record the new entry and hashes."""
    manifest = manifest.without_precision(precision)
    manifest.write(artifact_dir)
    for tmp, final in staged:
        apply_default_mode(tmp)
        os.replace(tmp, artifact_dir / final)
    files = {**manifest.files, **{final: file_sha256(artifact_dir / final) for _, final in staged}}
    precisions = {**{p: e.to_dict() for p, e in manifest.precisions.items()}, precision: entry}
    manifest = manifest.replace(files=files, precisions=precisions)
    manifest.write(artifact_dir)
    return manifest


def calibrate(artifact_dir, precision: str = "int8", images=None, *, method: str = defaults.DEFAULT_CALIBRATION_METHOD,
              samples: int = defaults.DEFAULT_CALIBRATION_SAMPLES, exclude_blocks=defaults.DEFAULT_EXCLUDE_BLOCKS,
              exclude_selection_branch: bool = True, tool: str = "auto", holdout_images=None,
              holdout: int = defaults.DEFAULT_HOLDOUT_SAMPLES, settings: LookCloseSettings | None = None,
              report_settings: LookCloseSettings | None = None, layer: int = defaults.DEFAULT_RUN_LAYER,
              with_torch: bool = False, report: bool = True,
              highres_steps: int = defaults.CALIBRATION_HIGHRES_STEPS,
              progress: Callable[[str], None] | None = None) -> AccuracyReport | None:
    """Write and register `precision`'s stages; returns the accuracy report (None if `report` is off).

    images: calibration folder (INT8: required; the first `samples` by name calibrate, the next
    `holdout` are the held-out set unless `holdout_images` names another folder). FP16 needs no
    calibration: its report runs on `holdout_images`, else `images`, else the sample image.
    """
    say = progress or (lambda msg: None)
    artifact_dir = Path(artifact_dir)
    if precision not in defaults.CALIBRATION_PRECISIONS:
        raise Ps3EdgeError(f"unknown precision '{precision}'; calibrate writes "
                           f"{' or '.join(defaults.CALIBRATION_PRECISIONS)}")
    if with_torch and precision != "fp16":
        raise Ps3EdgeError("--with-torch compares our torch model in fp16; it has no INT8 path")
    manifest = load_manifest(artifact_dir, verify=True)
    cfg = manifest.config
    if not os.access(artifact_dir, os.W_OK):
        raise Ps3EdgeError(f"{artifact_dir} is not writable")

    calib_files: list[Path] = []
    calib_digests: list[str] = []                   # sha256 of each calibration image, hashed once
    if precision == "int8":
        if images is None:
            raise Ps3EdgeError("INT8 calibration needs images: --images DIR")
        tool = int8mod.resolve_tool(tool, method)
        blocks = int8mod.parse_exclude_blocks(exclude_blocks, cfg.depth)
        calib_files = image_files(images, limit=samples, what="calibration image folder")
    # everything the run will read is checked before anything is written: the report's settings
    # against this model, and every image it will open
    report_settings = report_settings or LookCloseSettings(num_look_close=1)
    held: list[Path] = []
    if report:
        from ..runtime.lookclose import geometry_of
        resolve_steps(report_settings, geometry_of(manifest))
        # the sample image, when the report has no other, goes in a folder removed with `scratch`
        scratch = tempfile.TemporaryDirectory(prefix="ps3edge-sample-")
        held = _report_images(precision, images, calib_files, holdout_images, holdout, Path(scratch.name))
    for f in dict.fromkeys(calib_files + held):
        open_image(f)
    with writer_lock(artifact_dir):
        manifest = load_manifest(artifact_dir, verify=True)       # as it is now that no other writer runs
        return _write_precision(artifact_dir, manifest, precision, cfg, calib_files, held, report, report_settings,
                                blocks if precision == "int8" else (), tool, method, exclude_selection_branch,
                                settings, highres_steps, layer, with_torch, say)


def _write_precision(artifact_dir, manifest, precision, cfg, calib_files, held, report, report_settings, blocks,
                     tool, method, exclude_selection_branch, settings, highres_steps, layer, with_torch, say):
    """Write, register and (with `report`) measure the stages, under the artifact's writer lock."""
    calib_digests: list[str] = []
    staged: list[tuple[Path, str]] = []
    try:
        stages_entry = {}
        if precision == "fp16":
            for name in ("lowres", "highres"):
                say(f"converting {name} to fp16")
                staged_files, pmap = _fp16_stage(artifact_dir, manifest, name)
                staged += staged_files
                stages_entry[name] = {"file": staged_files[0][1], "external_data": [f for _, f in staged_files[1:]],
                                      "precision_map": pmap}
            entry = {"producer": f"ps3edge {__version__}", "tool": "ps3edge fp16 policy"}
        else:
            from ..runtime.lookclose import Pipeline
            say(f"loading the fp32 stages to capture calibration inputs ({len(calib_files)} images)")
            inputs = StageInputs(Pipeline(artifact_dir, "onnxruntime", verify=False), calib_files, settings,
                                 highres_steps=highres_steps)
            feeds = {"lowres": inputs.lowres_feeds(), "highres": inputs.highres_feeds()}
            for name in QUANTIZED_STAGES:
                staged_files, pmap = _int8_stage(artifact_dir, manifest, name, cfg.depth, blocks,
                                                 exclude_selection_branch, feeds[name], method, tool, say)
                staged += staged_files
                stages_entry[name] = {"file": staged_files[0][1], "external_data": [f for _, f in staged_files[1:]],
                                      "precision_map": pmap}
            calib_digests = [file_sha256(f) for f in calib_files]
            entry = {"producer": f"ps3edge {__version__}", "tool": int8mod.tool_version(tool), "method": method,
                     "percentile": defaults.CALIBRATION_PERCENTILE if method == "percentile" else None,
                     "samples": len(calib_files), "highres_samples": len(feeds["highres"]),
                     "exclude_blocks": list(blocks), "exclude_selection_branch": exclude_selection_branch,
                     "calibration_images": [{"name": f.name, "sha256": d} for f, d in zip(calib_files, calib_digests)]}
        sel = manifest.stages["selector"]
        stages_entry["selector"] = {"file": sel.file, "external_data": list(sel.external_data),
                                    "precision_map": fp16_precision_map("selector")}
        entry["stages"] = {k: stages_entry[k] for k in ("lowres", "selector", "highres")}
        say("registering the stages in the manifest")
        manifest = _register(artifact_dir, manifest, precision, entry, staged)
        staged = []
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)

    if not report:
        return None
    rep = accuracy_report(artifact_dir, precision, held, report_settings, layer=layer,
                          held_out=set(calib_digests), with_torch=with_torch, progress=say)
    _attach_report(artifact_dir, manifest, precision, rep)
    return rep


def _report_images(precision, images, calib_files, holdout_images, holdout, scratch: Path) -> list[Path]:
    if holdout_images is not None:
        return image_files(holdout_images, limit=holdout, what="held-out image folder")
    if images is not None:
        every = image_files(images, what="calibration image folder")
        rest = every[len(calib_files):] if precision == "int8" else every
        if rest:
            return rest[:holdout]
        return calib_files[:holdout]            # nothing held out: the report says so
    from ..demo import sample_image
    sample_image().save(scratch / "sample.png")
    return [scratch / "sample.png"]


def _attach_report(artifact_dir: Path, manifest: Manifest, precision: str, rep: AccuracyReport) -> None:
    name = defaults.ACCURACY_REPORT.format(precision=precision)
    rep.write(artifact_dir / name)
    apply_default_mode(artifact_dir / name)
    precisions = {p: e.to_dict() for p, e in manifest.precisions.items()}
    precisions[precision]["report"] = name
    manifest.replace(files={**manifest.files, name: file_sha256(artifact_dir / name)},
                     precisions=precisions).write(artifact_dir)


def _fp16_stage(artifact_dir: Path, manifest: Manifest, name: str):
    src = artifact_dir / manifest.stages[name].file
    types = tensor_types(onnx.load(str(src), load_external_data=False))
    model = onnx.load(str(src))
    model, pmap = convert_fp16(model, name, types)
    if model.ByteSize() < 2 ** 31 - 1:
        check_types(model)
    final = name + defaults.PRECISION_FILE_SUFFIX["fp16"]
    return save_model(model, _temp_path(artifact_dir, final), final), pmap


def _int8_stage(artifact_dir: Path, manifest: Manifest, name: str, depth: int, blocks, exclude_selection_branch,
                feeds, method: str, tool: str, say):
    info = manifest.stages[name]
    src = artifact_dir / info.file
    meta = onnx.load(str(src), load_external_data=False)
    selection = int8mod.select_nodes(meta, name, depth, blocks, exclude_selection_branch)
    final = name + defaults.PRECISION_FILE_SUFFIX["int8"]
    large = bool(info.external_data)
    scratch = temp_dir(artifact_dir, final, "int8")
    try:
        dst = scratch / final
        int8mod.quantize_stage(src, dst, name, selection, feeds, method, tool, large, progress=say)
        model = onnx.load(str(dst))
        int8mod.tidy_qdq(model, selection)
        quantized = int8mod.check_qdq(model, selection)
        pmap = int8mod.int8_precision_map(selection, quantized)
        say(f"{name}: {len(quantized)} layers quantized, {len(selection.excluded)} kept float")
        return save_model(model, _temp_path(artifact_dir, final), final), pmap
    finally:
        import shutil
        shutil.rmtree(scratch, ignore_errors=True)
