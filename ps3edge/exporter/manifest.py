"""`manifest.json`: the contract between exporter, builder and runtime.

It records the schema version, the model config and where the weights came from, the
geometry (scales, grids, budgets), preprocessing, per-stage I/O, the opset and precision, and a
sha256 for every file of the artifact. `load_manifest` refuses an artifact whose manifest is
unreadable, of another schema, or whose files do not match their recorded hashes, and says
exactly which file differs.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .. import __version__, defaults
from ..errors import Ps3EdgeError
from ..model.config import PS3Config
from ..model.weights import file_sha256


def write_json_atomic(path: Path, data: dict) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
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
        "geometry": {
            "scales": list(cfg.scales),
            "grids": list(cfg.grids),
            "lowres_tokens": cfg.lowres_tokens,
            "highres_patches_each_scale": list(cfg.highres_patches_each_scale),
            "highres_patches_total": cfg.highres_patches_total,
            "patch_dim": cfg.patch_dim,
            "max_tokens_per_highres_call": defaults.MAX_TOKENS_PER_HIGHRES_CALL,
        },
        "defaults": {
            "select_num_each_scale": list(cfg.select_num_each_scale),
            "num_look_close": defaults.DEFAULT_NUM_LOOK_CLOSE,
            "look_close_mode": "after_prompt",
        },
        "preprocessing": {
            "resize": "squash", "size": cfg.max_size, "interpolation": "bicubic",
            "rescale": "1/255", "mean": list(cfg.image_mean), "std": list(cfg.image_std),
        },
        "stages": stages,
        "files": files,
    }


def load_manifest(artifact_dir, verify: bool = True) -> dict:
    """Read and check an artifact directory's manifest; verify every file's sha256."""
    artifact_dir = Path(artifact_dir)
    path = artifact_dir / defaults.MANIFEST_NAME
    if not artifact_dir.is_dir():
        raise Ps3EdgeError(f"artifact directory not found: {artifact_dir}")
    if not path.is_file():
        raise Ps3EdgeError(f"{artifact_dir} has no {defaults.MANIFEST_NAME}; create one with 'ps3edge export'")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise Ps3EdgeError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise Ps3EdgeError(f"{path} is not a ps3edge manifest")
    version = manifest.get("schema_version")
    if version != defaults.MANIFEST_SCHEMA_VERSION:
        raise Ps3EdgeError(f"{path} has schema version {version}; this ps3edge reads version "
                           f"{defaults.MANIFEST_SCHEMA_VERSION} - re-export the model")
    for key in ("model", "stages", "files", "geometry", "returned_layers", "preprocessing"):
        if key not in manifest:
            raise Ps3EdgeError(f"{path} lacks the '{key}' section - re-export the model")
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
