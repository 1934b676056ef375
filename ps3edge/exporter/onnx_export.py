"""Export the three PS3 stages to ONNX and write the artifact directory.

The artifact is assembled in a hidden sibling directory and renamed into place only when every
file and the manifest are written, so an interrupted export never leaves a half artifact; the
target's writer lock (artifact/lock.py) keeps a second export out and removes what a killed one
left behind.
Stages whose weights approach protobuf's 2 GiB limit store them in one `<stage>.onnx.data` file.
Each stage file is then simplified by onnxruntime's basic-level rewrites (ort_optimize.py); the
weights that lowres and highres both hold (the trunk) are written once, to `trunk.onnx.data`
(share.py); and each stage file, as it will be published, is checked in onnxruntime against its
PyTorch module (validate.py) before anything is renamed into place.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch

from .. import defaults
from ..artifact.io import file_sha256, temp_dir
from ..artifact.lock import writer_lock
from ..artifact.manifest import Manifest, build_manifest
from ..artifact.outdir import OutDir, prepare_out_dir
from ..artifact.profiles import check_max_batch
from ..artifact.spec import STAGE_ORDER, stage_specs
from ..errors import Ps3EdgeError
from ..model import HighResStage, LowResStage, SelectorStage, build
from ..model.stages import normalize_layers
from ..model.weights import LoadedModel, state_dict_sha256
from .ort_optimize import simplify_stage
from .share import external_files, share_weights as write_shared_weights
from .validate import validate_stage


def _example_inputs(stage: str, cfg, spec) -> tuple:
    """Inputs to trace a stage with: B = 2 images and T = 3 step rows of N = 8 tokens, any small
    sizes other than 1 (a traced size of 1 could be taken for a constant); the axes are exported
    as dynamic."""
    gen = torch.Generator().manual_seed(0)
    sizes = {"B": 2, "T": 3, "N": 8}
    shape = lambda t: [sizes.get(d, d) for d in t.shape]                      # noqa: E731
    if stage == "highres":
        patches, positions, step_image, kv = spec.inputs
        return (torch.randn(*shape(patches), generator=gen),
                torch.randint(0, cfg.highres_patches_total, shape(positions), generator=gen, dtype=torch.int32),
                torch.tensor([1, 0, 1], dtype=torch.int32),
                torch.randn(*shape(kv), generator=gen))
    return tuple(torch.randn(*shape(t), generator=gen) for t in spec.inputs)


def _export_stage(module, example, spec, opset: int, scratch: Path, final: Path) -> list[Path]:
    """Trace one stage to ONNX; returns the files written (model, and external data if any)."""
    scratch.mkdir(parents=True, exist_ok=True)
    raw = scratch / spec.file
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, example, str(raw), dynamo=False, opset_version=opset,
            input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
            dynamic_axes=spec.dynamic_axes() or None, do_constant_folding=True)
    model = onnx.load(str(raw), load_external_data=True)
    files = [final]
    # weights are initializers, but traced buffers (the highres position table) become Constant
    # nodes: measure the whole graph, and move both kinds to the external file
    if model.ByteSize() > defaults.EXTERNAL_DATA_THRESHOLD_BYTES:
        data_name = spec.file + ".data"
        onnx.save_model(model, str(final), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024, convert_attribute=True)
        files.append(final.parent / data_name)
    else:
        onnx.save_model(model, str(final))
    onnx.checker.check_model(str(final))
    shutil.rmtree(scratch, ignore_errors=True)
    return files


def _max_opset() -> int | None:
    """The newest opset torch's TorchScript-based ONNX exporter can write (None if unknown)."""
    try:
        from torch.onnx import _constants
        return int(_constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)
    except (ImportError, AttributeError, TypeError, ValueError):
        return None


def export(model_spec, out_dir, opset: int = defaults.DEFAULT_OPSET,
           returned_layers=defaults.DEFAULT_RETURNED_LAYERS, seed: int = defaults.DEFAULT_SEED,
           overwrite: bool = False, progress: Callable[[str], None] | None = None,
           max_batch: int = defaults.DEFAULT_MAX_BATCH, share_weights: bool | None = None) -> Manifest:
    """Export `model_spec` (preset name, checkpoint dir or hub id, or an already built weights.LoadedModel)
    to `out_dir`; returns the manifest. `max_batch`: the most images one pass takes (the
    TensorRT profiles' bound of the batch axis; onnxruntime and torch are held to it too).
    `share_weights`: None writes the weights several stages hold (the trunk) once, to
    trunk.onnx.data, when they come to defaults.SHARED_WEIGHTS_MIN_BYTES or more (share.py);
    True does so at any size; False never (each stage keeps its own copy: the layout before
    sharing, kept to measure against and to debug with)."""
    say = progress or (lambda msg: None)
    if opset < defaults.MIN_OPSET:
        raise Ps3EdgeError(f"opset {opset} is too old; ps3edge exports opset {defaults.MIN_OPSET} or newer")
    newest = _max_opset()
    if newest is not None and opset > newest:
        raise Ps3EdgeError(f"opset {opset} is too new; this torch exports opsets {defaults.MIN_OPSET} to {newest}")
    returned_layers = list(returned_layers)
    if not returned_layers:
        raise Ps3EdgeError("no returned layers given; export at least one block, e.g. -2,-1")
    target = prepare_out_dir(out_dir, overwrite)
    with writer_lock(target.path):
        target = prepare_out_dir(out_dir, overwrite)    # again, now that no other writer runs
        return _export_locked(model_spec, target, opset, returned_layers, seed, say, max_batch, share_weights)


def _export_locked(model_spec, target: OutDir, opset: int, returned_layers: list, seed: int,
                   say, max_batch: int, share_weights: bool | None) -> Manifest:
    if isinstance(model_spec, LoadedModel):
        loaded = model_spec
    else:
        say(f"loading {model_spec}")
        loaded = build(model_spec, seed, say)
    model, cfg = loaded.model, loaded.cfg
    bad = [l for l in returned_layers if not -cfg.depth <= l < cfg.depth]
    if bad:
        raise Ps3EdgeError(f"returned layers {bad} do not exist in a {cfg.depth}-block model")
    layers = normalize_layers(returned_layers, cfg.depth)
    if len(set(layers)) != len(layers):
        raise Ps3EdgeError(f"returned layers {returned_layers} name the same block twice in a {cfg.depth}-block "
                           f"model (blocks {list(layers)})")
    specs = stage_specs(cfg, len(layers))
    max_batch = check_max_batch(specs, max_batch)
    modules = {"lowres": LowResStage(model, layers, for_export=True), "selector": SelectorStage(model),
               "highres": HighResStage(model, layers)}

    staging = temp_dir(target.path.parent, target.path.name, "export")
    try:
        stages, files, examples = {}, {}, {}
        for name in STAGE_ORDER:
            say(f"exporting stage '{name}'")
            spec = specs[name]
            examples[name] = _example_inputs(name, cfg, spec)
            written = _export_stage(modules[name], examples[name], spec, opset, staging / "scratch", staging / spec.file)
            simplify_stage(written[0], staging / "scratch", written[1].name if len(written) > 1 else None)
        if share_weights is not False:
            shared = write_shared_weights(staging, [specs[n].file for n in STAGE_ORDER],
                                          min_bytes=0 if share_weights else defaults.SHARED_WEIGHTS_MIN_BYTES)
            if shared:
                say(f"wrote the weights the stages share once ({shared / 2 ** 20:.1f} MiB, "
                    f"{defaults.SHARED_WEIGHTS_FILE})")
        for name in STAGE_ORDER:
            spec = specs[name]
            # the files as they will be published, before anything is renamed into place
            say(validate_stage(modules[name], examples[name], spec, staging / spec.file).summary())
            data = sorted(external_files(onnx.load(str(staging / spec.file), load_external_data=False)),
                          key=lambda f: f == defaults.SHARED_WEIGHTS_FILE)     # its own data file first
            for f in (spec.file, *data):
                if f not in files:                  # the shared file is hashed once
                    files[f] = file_sha256(staging / f)
            stages[name] = {"file": spec.file, "external_data": data, **spec.to_dict()}
        np.save(staging / defaults.PRIOR_PROMPT_FILE, model.prior_prompt.detach().numpy().astype(np.float32))
        files[defaults.PRIOR_PROMPT_FILE] = file_sha256(staging / defaults.PRIOR_PROMPT_FILE)

        manifest = build_manifest(cfg, loaded.source, layers, returned_layers, opset, stages, files,
                                  weights_sha256=state_dict_sha256(model), max_batch=max_batch)
        manifest.write(staging)
        say("finalising artifact")
        target.publish(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def export_single_file(module, example: tuple, spec, path, opset: int, too_large: str) -> Path:
    """One module to one self-contained ONNX file at `path`, written atomically; `too_large` is
    the error when its weights would need an external data file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = temp_dir(path.parent, path.name, "export")
    try:
        written = _export_stage(module, example, spec, opset, staging / "scratch", staging / spec.file)
        if len(written) != 1:
            raise Ps3EdgeError(too_large)
        validate_stage(module, example, spec, written[0])
        written[0].chmod(0o644)
        written[0].replace(path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def export_projector(projector, path, opset: int = defaults.DEFAULT_OPSET) -> Path:
    """VILA-HD's projector to one ONNX file (dynamic cell count M), written atomically."""
    from ..artifact.spec import projector_spec

    spec = projector_spec(projector.vision_width, projector.llm_width)
    example = (torch.randn(3, 4 * projector.vision_width, generator=torch.Generator().manual_seed(0)),)
    return export_single_file(projector.eval(), example, spec, path, opset,
                              "the projector is too large for one ONNX file")
