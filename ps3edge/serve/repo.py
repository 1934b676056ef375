"""`ps3edge triton-repo`: a model repository for a stock tritonserver. The `ps3` model's
config.pbtxt (the inputs, outputs, dynamic batching, queue policy and instances of `ps3edge serve`),
a Python-backend model.py that runs ps3edge's look-close loop, and the artifact beside it. The
repository is built in a temporary directory and renamed into place whole.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..artifact.io import found_at, publish_dir, temp_dir
from ..errors import Ps3EdgeError
from .python_backend import ARTIFACT_DIR
from .settings import LookCloseDefaults, ServeOptions
from .tensors import TensorDecl

MODEL_PY = '''"""Triton Python backend model written by `ps3edge triton-repo`: the look-close loop of ps3edge
(installed in the Python that runs tritonserver's Python-backend stub)."""

from ps3edge.serve.python_backend import TritonPythonModel  # noqa: F401
'''


def _tensor_block(kind: str, declarations: list[TensorDecl]) -> str:
    rows = []
    for d in declarations:
        optional = " optional: true" if d.optional else ""
        dims = ", ".join(str(x) for x in d.shape)
        rows.append(f'  {{ name: "{d.name}" data_type: {d.triton_type} dims: [ {dims} ]{optional} }}')
    return f"{kind} [\n" + ",\n".join(rows) + "\n]\n"


def config_pbtxt(name: str, inputs, outputs, options: ServeOptions, parameters: dict[str, str],
                 instance_kind: str) -> str:
    """One model's config.pbtxt (protobuf text format)."""
    params = "".join(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}\n'
                     for k, v in parameters.items())
    return (f'name: "{name}"\nbackend: "python"\nmax_batch_size: {options.max_batch}\n'
            + _tensor_block("input", inputs) + _tensor_block("output", outputs)
            + "dynamic_batching {\n"
              f"  max_queue_delay_microseconds: {options.max_queue_delay_us}\n"
              "  default_queue_policy {\n    timeout_action: REJECT\n"
              f"    default_timeout_microseconds: {options.queue_timeout_ms * 1000}\n"
              f"    max_queue_size: {options.max_queue_size}\n  }}\n}}\n"
            + f"instance_group [ {{ count: {options.instances} kind: {instance_kind} }} ]\n" + params)


def write_repository(artifact_dir: Path, out: Path, options: ServeOptions, defaults: LookCloseDefaults,
                     layer: int) -> list[str]:
    """Write the repository at `out` (absent or empty); returns the models it holds."""
    from ..artifact.vila import is_vila_artifact
    from ..runtime.lookclose import Pipeline
    from ..runtime.runners.registry import get_backend
    from .ps3_model import Ps3Model

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise Ps3EdgeError(f"--out {out} exists and is not an empty directory; nothing was written")
    start = found_at(out)                  # a directory someone makes meanwhile is theirs: kept, and we fail
    ps3_dir = artifact_dir / "ps3" if is_vila_artifact(artifact_dir) else artifact_dir
    with Pipeline(ps3_dir, options.backend, precision=options.precision) as pipeline:
        model = Ps3Model(pipeline, defaults, layer)            # checks the layer; declares the tensors
        inputs, outputs = model.inputs(), model.outputs()
    parameters = {"backend": options.backend, "precision": options.precision, "layer": str(layer),
                  **{k: str(v) for k, v in vars(defaults).items() if v is not None}}
    kind = "KIND_GPU" if get_backend(options.backend).needs_gpu else "KIND_CPU"
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = temp_dir(out.parent, out.name, "staging")
    try:
        version = staging / Ps3Model.name / "1"
        version.mkdir(parents=True)
        (staging / Ps3Model.name / "config.pbtxt").write_text(
            config_pbtxt(Ps3Model.name, inputs, outputs, options, parameters, kind))
        (version / "model.py").write_text(MODEL_PY)
        shutil.copytree(ps3_dir, version / ARTIFACT_DIR)
        publish_dir(staging, out, start=start)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return [Ps3Model.name]
