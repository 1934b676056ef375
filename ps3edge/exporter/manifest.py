"""`manifest.json`: the contract between exporter, builder and runtime.

It records the schema version, the model config and where the weights came from, the
geometry (scales, grids, budgets), preprocessing, per-stage I/O, the opset and precision, and a
sha256 for every file of the artifact. `load_manifest` refuses an artifact whose manifest is
unreadable, of another schema, inconsistent with itself (a hand-edited model config that no
longer matches the stages' I/O, say), or whose files do not match their recorded hashes, and
says exactly what differs. Optional sections written later: "engines" (ps3edge build) and
"precisions" (ps3edge calibrate: FP16 / INT8 stage files and precision maps, calibration/registry.py).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .. import __version__, defaults
from ..errors import Ps3EdgeError
from ..model.config import PS3Config, is_whole_number
from ..model.weights import file_sha256
from .spec import stage_specs

REQUIRED_SECTIONS = ("producer", "model", "source", "returned_layers", "opset", "precision", "geometry",
                     "defaults", "preprocessing", "stages", "files")


def apply_default_mode(path) -> None:
    """Give a file from mkstemp (0600) or a directory from mkdtemp (0700) the permissions that a
    plain open() / mkdir() would, so artifacts and outputs are readable as the umask allows."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~mask)


def publish_dir(staging: Path, target: Path, replace: bool = False) -> None:
    """Make a finished staging directory the target: its tree made readable (mkdtemp / mkstemp
    create private entries), then renamed into place. An existing target is swapped out and then
    deleted with `replace` (whole until the new one is in place), else it must be empty."""
    for root, _, names in os.walk(staging):
        os.chmod(root, 0o755)
        for name in names:
            os.chmod(os.path.join(root, name), 0o644)
    if target.exists() and replace:
        # swap, then delete: the old artifact is whole until the new one is in place
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
        target.rename(old / target.name)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
        return
    if target.exists():
        target.rmdir()
    staging.rename(target)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same directory and a rename; the
    file gets the permissions a plain open() would give."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise Ps3EdgeError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        apply_default_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: dict) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=2) + "\n").encode())


def copy_atomic(src: Path, dst: Path) -> None:
    """Copy `src` to `dst` through a temporary file beside `dst` and a rename."""
    dst = Path(dst)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        apply_default_mode(tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_manifest(cfg: PS3Config, source: dict, returned_layers, returned_layers_requested,
                   opset: int, stages: dict, files: dict) -> dict:
    return {
        "schema_version": defaults.MANIFEST_SCHEMA_VERSION,
        "producer": {"name": "ps3edge", "version": __version__},
        "model": cfg.to_dict(),
        "source": source,
        "returned_layers": list(returned_layers),
        "returned_layers_requested": list(returned_layers_requested),
        "opset": opset,
        "precision": "fp32",
        "geometry": _geometry(cfg),
        "defaults": {
            "select_num_each_scale": list(cfg.select_num_each_scale),
            "num_look_close": min(defaults.DEFAULT_NUM_LOOK_CLOSE, cfg.max_look_close),
            "look_close_mode": "after_prompt",
        },
        "preprocessing": _preprocessing(cfg),
        "stages": stages,
        "files": files,
    }


def _geometry(cfg: PS3Config) -> dict:
    return {
        "scales": list(cfg.scales),
        "grids": list(cfg.grids),
        "lowres_tokens": cfg.lowres_tokens,
        "highres_patches_each_scale": list(cfg.highres_patches_each_scale),
        "highres_patches_total": cfg.highres_patches_total,
        "patch_dim": cfg.patch_dim,
        "max_tokens_per_highres_call": defaults.MAX_TOKENS_PER_HIGHRES_CALL,
    }


def _preprocessing(cfg: PS3Config) -> dict:
    return {
        "resize": "squash", "size": cfg.max_size, "interpolation": "bicubic",
        "rescale": "1/255", "mean": list(cfg.image_mean), "std": list(cfg.image_std),
    }


def _check_consistent(manifest: dict, path: Path) -> None:
    """The sections must agree with each other: catches a hand-edited manifest before it runs."""
    def bad(what: str):
        raise Ps3EdgeError(f"{path} is inconsistent: {what} - re-export the model")

    for key in ("producer", "source", "defaults"):
        if not isinstance(manifest[key], dict):
            bad(f"'{key}' is not an object")
    files = manifest["files"]
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        bad("'files' must map file names to sha256 strings")
    outside = sorted(n for n in files if n in ("", ".", "..") or Path(n).name != n)
    if outside:
        bad(f"'files' names paths outside the artifact directory: {outside}")
    if defaults.PRIOR_PROMPT_FILE not in files:
        bad(f"'files' lacks {defaults.PRIOR_PROMPT_FILE}")
    try:
        cfg = config_from_manifest(manifest)
    except Ps3EdgeError as e:
        bad(f"the 'model' section is not a valid PS3 config ({e})")
    except (TypeError, ValueError, AttributeError) as e:
        bad(f"the 'model' section is not a valid PS3 config ({type(e).__name__}: {e})")
    opset = manifest["opset"]
    if not is_whole_number(opset) or opset < defaults.MIN_OPSET:
        bad(f"opset must be a whole number >= {defaults.MIN_OPSET}, got {opset!r}")
    if manifest["precision"] != "fp32":
        bad(f"precision must be 'fp32' (the exported stages; 'ps3edge calibrate' records others under "
            f"'precisions'), got {manifest['precision']!r}")
    _check_defaults(manifest["defaults"], cfg, bad)
    layers = manifest["returned_layers"]
    if (not isinstance(layers, list) or not layers
            or not all(isinstance(l, int) and 0 <= l < cfg.depth for l in layers)):
        bad(f"returned_layers {layers} must be block indices of the {cfg.depth}-block model")
    geometry = manifest["geometry"]
    expected = _geometry(cfg)
    if not isinstance(geometry, dict):
        bad("'geometry' is not an object")
    limit = geometry.get("max_tokens_per_highres_call")
    if not isinstance(limit, int) or limit < 1:
        bad(f"geometry.max_tokens_per_highres_call must be a positive integer, got {limit!r}")
    differs = sorted(k for k, v in expected.items() if k != "max_tokens_per_highres_call" and geometry.get(k) != v)
    if differs:
        bad(f"geometry {', '.join(differs)} do not match the model config")
    budget = manifest["defaults"].get("select_num_each_scale")
    if budget != list(cfg.select_num_each_scale):
        bad(f"defaults.select_num_each_scale {budget} does not match the model config "
            f"{list(cfg.select_num_each_scale)}")
    pre = manifest["preprocessing"]
    if pre != _preprocessing(cfg):
        bad("'preprocessing' does not match the model config")
    stages = manifest["stages"]
    if not isinstance(stages, dict):
        bad("'stages' is not an object")
    for name, spec in stage_specs(cfg, len(layers)).items():
        stage = stages.get(name)
        if not isinstance(stage, dict):
            bad(f"stage '{name}' is missing")
        if stage.get("file") != spec.file:
            bad(f"stage '{name}' file is {stage.get('file')!r}, expected {spec.file!r}")
        extra = stage.get("external_data", [])
        if not isinstance(extra, list) or not all(isinstance(f, str) for f in extra):
            bad(f"stage '{name}' external_data must be a list of file names")
        for f in [spec.file, *extra]:
            if f not in files:
                bad(f"stage '{name}' file {f!r} has no sha256 in 'files'")
        if {"inputs": stage.get("inputs"), "outputs": stage.get("outputs")} != spec.to_dict():
            bad(f"stage '{name}' inputs/outputs do not match the model config")
    # the TensorRT engines that 'ps3edge build' recorded (optional section)
    from ..engines.metadata import check_engines_section

    def bad_engine(what: str):
        raise Ps3EdgeError(f"{path} is inconsistent: {what} - rebuild the engines with 'ps3edge build'")
    check_engines_section(manifest, bad_engine)
    # the FP16 / INT8 stages that 'ps3edge calibrate' recorded (optional section)
    from ..calibration.registry import check_precisions
    check_precisions(manifest, path)


def _check_defaults(section: dict, cfg: PS3Config, bad) -> None:
    """The look-close defaults that build and calibrate read (select_num_each_scale is checked
    against the model config by the caller)."""
    if "num_look_close" in section:
        steps = section["num_look_close"]
        if not is_whole_number(steps) or not 1 <= steps <= cfg.max_look_close:
            bad(f"defaults.num_look_close must be a whole number from 1 to {cfg.max_look_close}, got {steps!r}")
    if "look_close_mode" in section and section["look_close_mode"] not in defaults.LOOK_CLOSE_MODES:
        bad(f"defaults.look_close_mode must be one of {', '.join(defaults.LOOK_CLOSE_MODES)}, "
            f"got {section['look_close_mode']!r}")


def load_manifest(artifact_dir, verify: bool = True) -> dict:
    """Read and check an artifact directory's manifest; verify every file's sha256."""
    artifact_dir = Path(artifact_dir)
    path = artifact_dir / defaults.MANIFEST_NAME
    if not artifact_dir.is_dir():
        raise Ps3EdgeError(f"artifact directory not found: {artifact_dir}")
    if not path.is_file():
        if (artifact_dir / "vila.json").is_file() and (artifact_dir / "ps3" / defaults.MANIFEST_NAME).is_file():
            raise Ps3EdgeError(f"{artifact_dir} is a VILA-HD artifact; its PS3 stages are the artifact "
                               f"{artifact_dir / 'ps3'}")
        raise Ps3EdgeError(f"{artifact_dir} has no {defaults.MANIFEST_NAME}; create one with 'ps3edge export'")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise Ps3EdgeError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise Ps3EdgeError(f"{path} is not a ps3edge manifest")
    version = manifest.get("schema_version")
    if isinstance(version, bool) or version != defaults.MANIFEST_SCHEMA_VERSION:
        raise Ps3EdgeError(f"{path} has schema version {version!r}; this ps3edge reads version "
                           f"{defaults.MANIFEST_SCHEMA_VERSION} - re-export the model")
    for key in REQUIRED_SECTIONS:
        if key not in manifest:
            raise Ps3EdgeError(f"{path} lacks the '{key}' section - re-export the model")
    _check_consistent(manifest, path)
    if verify:
        for name, expected in manifest["files"].items():
            f = artifact_dir / name
            if not f.is_file():
                raise Ps3EdgeError(f"artifact file {f} is missing")
            actual = file_sha256(f)
            if actual != expected:
                raise Ps3EdgeError(f"artifact file {f} was changed after export "
                                   f"(sha256 {actual[:12]}... != manifest {expected[:12]}...)")
    return manifest


def config_from_manifest(manifest: dict) -> PS3Config:
    return PS3Config.from_dict(manifest["model"])
