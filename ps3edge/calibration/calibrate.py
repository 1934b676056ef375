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
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import onnx

from .. import defaults
from ..version import __version__
from ..artifact.io import apply_default_mode, file_sha256, temp_dir, temp_file
from ..artifact.lock import writer_lock
from ..artifact.manifest import Manifest, load_manifest
from ..artifact.precisions import (Calibration, CalibrationImage, PrecisionEntry, PrecisionMap, PrecisionStage,
                                   register_precision)
from ..errors import Ps3EdgeError
from ..runtime.lookclose import Pipeline, geometry_of
from ..runtime.planning import LookCloseSettings, resolve_steps
from ..runtime.preprocess import open_image
from . import int8 as int8mod
from .data import image_files
from .precision import FP16_BUFFERS, convert_fp16, check_types, fp16_precision_map, tensor_types
from .report import AccuracyReport, accuracy_report
from .stage_inputs import StageInputs

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


@dataclass(frozen=True)
class CalibrationOptions:
    """What `ps3edge calibrate` writes and how it measures it.

    images: calibration folder (INT8: required; the first `samples` by name calibrate, the next
    `holdout` are the held-out set unless `holdout_images` names another folder). FP16 needs no
    calibration: its report runs on `holdout_images`, else `images`, else the sample image.
    settings: the look-close settings of the runs that capture highres calibration samples
    (`highres_steps` steps per image; default: the manifest's); report_settings: those of the
    report's runs (default: one step).
    """
    precision: str = "int8"
    images: Path | None = None
    method: str = defaults.DEFAULT_CALIBRATION_METHOD
    samples: int = defaults.DEFAULT_CALIBRATION_SAMPLES
    exclude_blocks: str = defaults.DEFAULT_EXCLUDE_BLOCKS
    exclude_selection_branch: bool = True
    tool: str = "auto"
    holdout_images: Path | None = None
    holdout: int = defaults.DEFAULT_HOLDOUT_SAMPLES
    settings: LookCloseSettings | None = None
    report_settings: LookCloseSettings | None = None
    layer: int = defaults.DEFAULT_RUN_LAYER
    with_torch: bool = False
    report: bool = True
    highres_steps: int = defaults.CALIBRATION_HIGHRES_STEPS

    def validate(self) -> None:
        """The checks that need no artifact (one-line errors); the rest run against it in calibrate()."""
        if self.precision not in defaults.CALIBRATION_PRECISIONS:
            raise Ps3EdgeError(f"unknown precision '{self.precision}'; calibrate writes "
                               f"{' or '.join(defaults.CALIBRATION_PRECISIONS)}")
        if self.with_torch and self.precision != "fp16":
            raise Ps3EdgeError("--with-torch compares our torch model in fp16; it has no INT8 path")
        if self.precision == "int8":
            if self.images is None:
                raise Ps3EdgeError("INT8 calibration needs images: --images DIR")
            int8mod.resolve_tool(self.tool, self.method)


@dataclass(frozen=True)
class _Inputs:
    """What calibrate() checked before writing: the images it reads and the resolved INT8 choices."""
    calib_files: list[Path]
    held: list[Path]                    # the report's images
    blocks: tuple[int, ...]             # INT8: transformer blocks kept float
    tool: str                           # INT8: the quantizer that runs
    report_settings: LookCloseSettings


def calibrate(artifact_dir, options: CalibrationOptions,
              progress: Callable[[str], None] | None = None) -> AccuracyReport | None:
    """Write and register `options.precision`'s stages; returns the accuracy report (None if
    `options.report` is off)."""
    say = progress or (lambda msg: None)
    artifact_dir = Path(artifact_dir)
    options.validate()
    manifest = load_manifest(artifact_dir, verify=True)
    if not os.access(artifact_dir, os.W_OK):
        raise Ps3EdgeError(f"{artifact_dir} is not writable")
    # the sample image, when the report has no other, goes in a folder removed with `scratch`
    with tempfile.TemporaryDirectory(prefix="ps3edge-sample-") as scratch:
        inputs = _check_inputs(manifest, options, Path(scratch))
        with writer_lock(artifact_dir):
            manifest = load_manifest(artifact_dir, verify=True)       # as it is now that no other writer runs
            return _write_precision(artifact_dir, manifest, options, inputs, say)


def _check_inputs(manifest: Manifest, options: CalibrationOptions, scratch: Path) -> _Inputs:
    """Everything the run will read is checked before anything is written: the INT8 choices against
    this model, the report's settings against it, and every image it will open."""
    calib_files: list[Path] = []
    blocks: tuple[int, ...] = ()
    tool = options.tool
    if options.precision == "int8":
        tool = int8mod.resolve_tool(options.tool, options.method)
        blocks = int8mod.parse_exclude_blocks(options.exclude_blocks, manifest.config.depth)
        calib_files = image_files(options.images, limit=options.samples, what="calibration image folder")
    report_settings = options.report_settings or LookCloseSettings(num_look_close=1)
    held: list[Path] = []
    if options.report:
        resolve_steps(report_settings, geometry_of(manifest))
        held = _report_images(options, calib_files, scratch)
    for f in dict.fromkeys(calib_files + held):
        open_image(f)
    return _Inputs(calib_files, held, blocks, tool, report_settings)


def _write_precision(artifact_dir: Path, manifest: Manifest, options: CalibrationOptions, inputs: _Inputs,
                     say) -> AccuracyReport | None:
    """Write, register and (with `options.report`) measure the stages, under the artifact's writer lock."""
    staged: list[tuple[Path, str]] = []          # (temporary path, final name), removed unless registered
    try:
        if options.precision == "fp16":
            entry = _fp16_entry(artifact_dir, manifest, staged, say)
        else:
            entry = _int8_entry(artifact_dir, manifest, options, inputs, staged, say)
        sel = manifest.stages["selector"]                # every precision keeps the FP32 selector
        selector = PrecisionStage(file=sel.file, external_data=sel.external_data,
                                  precision_map=PrecisionMap.from_dict(fp16_precision_map("selector")))
        entry = replace(entry, stages={k: entry.stages[k] if k != "selector" else selector
                                       for k in ("lowres", "selector", "highres")})
        say("registering the stages in the manifest")
        manifest = register_precision(artifact_dir, manifest, options.precision, entry, staged)
        staged = []
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)

    if not options.report:
        return None
    calibration = {i.sha256 for i in entry.calibration.calibration_images} if entry.calibration else set()
    rep = accuracy_report(artifact_dir, options.precision, inputs.held, inputs.report_settings,
                          layer=options.layer, held_out=calibration, with_torch=options.with_torch, progress=say)
    _attach_report(artifact_dir, manifest, options.precision, rep)
    return rep


def _stage_entry(staged_files: list[tuple[Path, str]], pmap: dict) -> PrecisionStage:
    return PrecisionStage(file=staged_files[0][1], external_data=tuple(f for _, f in staged_files[1:]),
                          precision_map=PrecisionMap.from_dict(pmap))


def _fp16_entry(artifact_dir: Path, manifest: Manifest, staged: list, say) -> PrecisionEntry:
    """Convert lowres and highres (their files added to `staged`); the precision's manifest entry."""
    stages = {}
    for name in ("lowres", "highres"):
        say(f"converting {name} to fp16")
        staged_files, pmap = _fp16_stage(artifact_dir, manifest, name)
        staged += staged_files
        stages[name] = _stage_entry(staged_files, pmap)
    return PrecisionEntry(producer=f"ps3edge {__version__}", tool="ps3edge fp16 policy", stages=stages)


def _int8_entry(artifact_dir: Path, manifest: Manifest, options: CalibrationOptions, inputs: _Inputs,
                staged: list, say) -> PrecisionEntry:
    """Calibrate and quantize lowres and highres (their files added to `staged`); the manifest entry."""
    files = inputs.calib_files
    say(f"loading the fp32 stages to capture calibration inputs ({len(files)} images)")
    samples = StageInputs(Pipeline(artifact_dir, "onnxruntime", verify=False), files, options.settings,
                          highres_steps=options.highres_steps)
    feeds = {"lowres": samples.lowres_feeds(), "highres": samples.highres_feeds()}
    stages = {}
    for name in QUANTIZED_STAGES:
        staged_files, pmap = _int8_stage(artifact_dir, manifest, name, manifest.config.depth, inputs.blocks,
                                         options.exclude_selection_branch, feeds[name], options.method,
                                         inputs.tool, say)
        staged += staged_files
        stages[name] = _stage_entry(staged_files, pmap)
    digests = [file_sha256(f) for f in files]
    method = options.method
    calibration = Calibration(
        method=method, percentile=defaults.CALIBRATION_PERCENTILE if method == "percentile" else None,
        samples=len(files), highres_samples=len(feeds["highres"]),
        exclude_blocks=tuple(inputs.blocks), exclude_selection_branch=options.exclude_selection_branch,
        calibration_images=tuple(CalibrationImage(name=f.name, sha256=d) for f, d in zip(files, digests)))
    return PrecisionEntry(producer=f"ps3edge {__version__}", tool=int8mod.tool_version(inputs.tool),
                          calibration=calibration, stages=stages)


def _report_images(options: CalibrationOptions, calib_files: list[Path], scratch: Path) -> list[Path]:
    if options.holdout_images is not None:
        return image_files(options.holdout_images, limit=options.holdout, what="held-out image folder")
    if options.images is not None:
        every = image_files(options.images, what="calibration image folder")
        rest = every[len(calib_files):] if options.precision == "int8" else every
        if rest:
            return rest[:options.holdout]
        return calib_files[:options.holdout]            # nothing held out: the report says so
    from ..demo import sample_image         # the one image that ships with ps3edge (demo sits higher)
    sample_image().save(scratch / "sample.png")
    return [scratch / "sample.png"]


def _attach_report(artifact_dir: Path, manifest: Manifest, precision: str, rep: AccuracyReport) -> None:
    name = defaults.ACCURACY_REPORT.format(precision=precision)
    rep.write(artifact_dir / name)
    apply_default_mode(artifact_dir / name)
    precisions = {**manifest.precisions, precision: replace(manifest.precisions[precision], report=name)}
    manifest.replace(files={**manifest.files, name: file_sha256(artifact_dir / name)},
                     precisions=precisions).write(artifact_dir)


def _fp16_stage(artifact_dir: Path, manifest: Manifest, name: str):
    src = artifact_dir / manifest.stages[name].file
    types = tensor_types(onnx.load(str(src), load_external_data=False))
    model = onnx.load(str(src))
    model, pmap = convert_fp16(model, name, types, fp16_io=FP16_BUFFERS[name])
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
        shutil.rmtree(scratch, ignore_errors=True)
