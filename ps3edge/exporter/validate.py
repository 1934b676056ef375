"""The export's check of what it wrote: an exported ONNX file, run in onnxruntime on the example
inputs its export traced with, against the PyTorch module it came from, every output within the
FP32 tolerance.

Each stage file is checked where it was written - in the export's staging directory, after
onnxruntime's rewrites (ort_optimize.simplify_stage) and before the artifact is renamed into
place - so a file that computes something else than its module (a tracer or rewrite that changed
the graph's arithmetic) fails the export and no artifact is left. Measuring and the features rule
are the comparisons' own (metrics.py: feature_diff, Tolerance.of("fp32")); the session takes
every ps3edge session's options (ort_session.py) on the CPU provider, whose FP32 results the
artifact's other checks are made against too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..artifact.spec import StageSpec
from ..errors import Ps3EdgeError
from ..metrics import Tolerance, feature_diff
from .ort_session import cpu_session_options

CHECKED_PRECISION = "fp32"          # the stage files are exported in FP32


@dataclass(frozen=True)
class OutputCheck:
    output: str
    max_abs: float
    min_cosine: float


@dataclass(frozen=True)
class StageCheck:
    """What the check of one stage file measured, output by output, and the tolerance it met."""
    stage: str
    outputs: tuple[OutputCheck, ...]
    tolerance: Tolerance

    def summary(self) -> str:
        worst = max(self.outputs, key=lambda o: o.max_abs)
        least = min(o.min_cosine for o in self.outputs)
        return (f"stage '{self.stage}' matches PyTorch in onnxruntime: max |diff| {worst.max_abs:.1e} "
                f"({worst.output}), min cosine {least:.7f} over {len(self.outputs)} output(s) "
                f"({CHECKED_PRECISION}: <= {self.tolerance.max_abs}, >= {self.tolerance.min_cosine})")


def validate_stage(module, example: tuple, spec: StageSpec, path: Path) -> StageCheck:
    """Run the ONNX file at `path` (its external data beside it) and `module` on `example` and
    compare every output of `spec`; a Ps3EdgeError line names the first output out of tolerance."""
    tol = Tolerance.of(CHECKED_PRECISION)
    expected = _torch_outputs(module, example, spec)
    got = _onnx_outputs(Path(path), example, spec)
    checks = []
    for tensor, ref, out in zip(spec.outputs, expected, got):
        if out.shape != ref.shape:
            raise Ps3EdgeError(f"exported stage '{spec.name}' does not match its PyTorch module: output "
                               f"'{tensor.name}' has shape {list(out.shape)} in onnxruntime, "
                               f"{list(ref.shape)} in PyTorch; nothing was written")
        checks.append(OutputCheck(tensor.name, *feature_diff(out, ref)))
    failed = [c for c in checks if not tol.accepts_features(c.max_abs, c.min_cosine)]
    if failed:
        c, more = failed[0], len(failed) - 1
        raise Ps3EdgeError(
            f"exported stage '{spec.name}' does not match its PyTorch module: output '{c.output}' "
            f"max |diff| {c.max_abs:.3g} (tolerance {tol.max_abs}), min cosine {c.min_cosine:.6f} "
            f"(tolerance {tol.min_cosine}) in onnxruntime on the traced example inputs"
            + (f"; {more} more output(s) out of tolerance" if more else "") + "; nothing was written")
    return StageCheck(spec.name, tuple(checks), tol)


def _torch_outputs(module, example: tuple, spec: StageSpec) -> list[np.ndarray]:
    """The module's outputs in the order the export named them (the tracer flattens nested
    tuples and lists the same way)."""
    with torch.no_grad():
        result = module(*example)
    flat = []

    def collect(x):
        if isinstance(x, (tuple, list)):
            for item in x:
                collect(item)
        else:
            flat.append(x.detach().cpu().numpy())
    collect(result)
    if len(flat) != len(spec.outputs):
        raise Ps3EdgeError(f"stage '{spec.name}' returns {len(flat)} tensors; its declaration names "
                           f"{len(spec.outputs)} outputs")
    return flat


def _onnx_outputs(path: Path, example: tuple, spec: StageSpec) -> list[np.ndarray]:
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), cpu_session_options(), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for models it cannot load
        raise Ps3EdgeError(f"onnxruntime cannot load the exported {path.name}: {str(e).splitlines()[0]}") from None
    feeds = {t.name: x.detach().cpu().numpy() for t, x in zip(spec.inputs, example)}
    return session.run([t.name for t in spec.outputs], feeds)
