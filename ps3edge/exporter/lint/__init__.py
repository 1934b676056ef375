"""TensorRT-compatibility lint: checks ONNX graphs, without TensorRT, against what the ONNX-TensorRT
parser of a target TensorRT 10.x accepts, and what an engine built with ps3edge's optimization
profiles can hold. `ps3edge inspect --lint ARTIFACTS` runs it on every stage of an artifact.

This package's entry points are `lint_model` (one graph) and `lint_artifacts` (every stage of an
artifact); `ops` holds the operator allow-list and the version facts (and where they come from),
`graph` prepares a graph and infers its shapes, `checks` and `restrictions` hold the checks, and
`findings` the results. Each finding names a severity (`error`: the parser or builder rejects it, or
the ps3edge TensorRT runtime cannot run it; `warning`: it builds, but loses precision or speed, or
could not be verified), the node, the op and one line.

Checks (the `check` field of a finding):
  opset         the ai.onnx opset must lie in the target's range; other domains need plugins
  op            the op must be supported by the target version's parser
  restriction   per-op restrictions: TopK `sorted`; Resize modes / antialias / aspect policy;
                LayerNormalization extra outputs; pooling rank, dilations, MaxPool indices;
                axes / axis / depth inputs that must be build-time constants (Reduce*, CumSum,
                OneHot, and Slice / Pad / Squeeze / Unsqueeze before 10.3 / 10.4 / 10.7);
                Q/DQ zero points; ScatterND reduction; Dropout training; Einsum before 10.12;
                Constant sparse / string values
  topk          TopK's K must be a constant <= 3840
  dtype         each op's data type must be in its supported-types row (DOUBLE: a warning, the
                parser casts it down to FLOAT)
  int64         INT64 graph inputs / outputs (ps3edge binds integers as INT32); INT64 constants
                beyond INT32 range (ONNX's Slice "to the end" sentinel excepted); Casts to INT64
                whose run-time result feeds data rather than shapes
  shape-tensor  shape-tensor patterns: a shape input (Reshape / Expand / Tile / ConstantOfShape /
                Slice / Range / Resize sizes / Pad pads / TopK K / axes inputs ...) computed from
                run-time values - from a graph input (a TensorRT shape-tensor input, which ps3edge
                profiles do not bound) or from data (a data-dependent shape); ops whose output
                size depends on data (NonZero, NonMaxSuppression); shape tensors with more than
                64 elements
  dynamic-dim   every symbolic or unknown input dimension must be bounded by the optimization
                profile and declared dynamic by the stage declaration; fixed dimensions must
                match the profile; declared dtypes must match the graph
  overflow      at the profile's max shapes, no tensor may reach 2^31 elements (attention scores
                of a highres call with many steps are the tensor that hits it)
  rank          no tensor may have more than 8 dimensions
"""

from __future__ import annotations

from pathlib import Path

import onnx

from ... import defaults
from ...artifact.manifest import load_manifest
from ...artifact.precisions import stage_entries
from ...artifact.profiles import look_close_steps, profile_bounds
from ...errors import Ps3EdgeError
from .checks import Linter
from .findings import SEVERITIES, Finding, LintReport, group_findings, sort_findings
from .ops import (INT32_MAX, INT32_MIN, MAX_RANK, MAX_SHAPE_TENSOR_ELEMENTS, MAX_TENSOR_ELEMENTS,
                  NEWEST_MATRIX, OPERATORS, SHAPE_INPUTS, TOPK_MAX_K, opset_range, parse_trt_version,
                  type_name, version_note)

__all__ = [
    "Finding", "LintReport", "group_findings", "lint_model", "lint_artifacts", "parse_trt_version",
    "opset_range", "type_name", "OPERATORS", "SHAPE_INPUTS", "SEVERITIES", "NEWEST_MATRIX", "TOPK_MAX_K",
    "MAX_TENSOR_ELEMENTS", "MAX_RANK", "MAX_SHAPE_TENSOR_ELEMENTS", "INT32_MAX", "INT32_MIN",
]


def lint_model(model, trt_version=defaults.DEFAULT_LINT_TRT_VERSION, profile: dict | None = None,
               declared: dict | None = None, base_dir=None, stage: str = "") -> LintReport:
    """Lint one ONNX model (a ModelProto or a path).

    profile: input name -> {"min", "opt", "max"} shapes (one stage of artifact.profiles.profile_bounds);
             every symbolic input dimension must be bounded here.
    declared: input name -> {"dtype", "shape"} from the stage declaration (manifest), if any.
    """
    version = parse_trt_version(trt_version)
    report = _lint_stage(model, version, profile, declared, base_dir, stage)
    if version_note(version):
        report.notes.append(version_note(version))
    sort_findings(report)
    return report


def _lint_stage(model, version: tuple[int, int], profile, declared, base_dir, stage) -> LintReport:
    if isinstance(model, (str, Path)):
        path = Path(model)
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as e:
            raise Ps3EdgeError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        base_dir = path.parent if base_dir is None else base_dir
    return Linter(model, version, profile, declared, Path(base_dir) if base_dir else None, stage).run()


def lint_artifacts(artifact_dir, trt_version=defaults.DEFAULT_LINT_TRT_VERSION, max_look_close=None,
                   manifest=None, precision: str = "fp32") -> tuple[LintReport, int]:
    """Lint every stage of an artifact against the profiles a build would use: the FP32 stage
    files, or the FP16 / INT8 ones 'ps3edge calibrate' registered (`precision`).

    Returns one report (findings carry their stage) and T_max, the steps per highres call bounded."""
    artifact_dir = Path(artifact_dir)
    if manifest is None:
        manifest = load_manifest(artifact_dir, verify=True)
    files = manifest.stage_files(precision, artifact_dir)
    t_max = look_close_steps(manifest, max_look_close)
    bounds = profile_bounds(manifest, max_look_close)
    version = parse_trt_version(trt_version)
    report = LintReport(trt_version=".".join(map(str, version)))
    if version_note(version):
        report.notes.append(version_note(version))
    for stage, info in stage_entries(manifest, precision).items():     # as the precision's file declares it
        declared = {t.name: t.to_dict() for t in info.inputs}
        r = _lint_stage(artifact_dir / files[stage], version, bounds.get(stage), declared, artifact_dir, stage)
        report.findings.extend(r.findings)
        report.notes.extend(f"{stage}: {n}" for n in r.notes)
        report.largest_tensor = max(report.largest_tensor, r.largest_tensor)
    sort_findings(report)
    return report, t_max
