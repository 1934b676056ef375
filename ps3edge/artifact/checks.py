"""The checks a manifest's JSON passes before it becomes a `Manifest`: every section well formed
and in agreement with the model config (a hand edit that breaks that is named). A hand edit that
keeps the sections in agreement is named by the integrity record (integrity.py)."""

from __future__ import annotations

from pathlib import Path

from .. import defaults
from ..errors import Ps3EdgeError
from ..model.config import PS3Config, is_whole_number
from .profiles import batch_limit
from .spec import stage_specs


def geometry_section(cfg: PS3Config, max_batch: int = defaults.DEFAULT_MAX_BATCH) -> dict:
    return {
        "max_batch": max_batch,
        "scales": list(cfg.scales),
        "grids": list(cfg.grids),
        "lowres_tokens": cfg.lowres_tokens,
        "highres_patches_each_scale": list(cfg.highres_patches_each_scale),
        "highres_patches_total": cfg.highres_patches_total,
        "patch_dim": cfg.patch_dim,
        "max_tokens_per_highres_call": defaults.MAX_TOKENS_PER_HIGHRES_CALL,
    }


def preprocessing_section(cfg: PS3Config) -> dict:
    return {
        "resize": "squash", "size": cfg.max_size, "interpolation": "bicubic",
        "rescale": "1/255", "mean": list(cfg.image_mean), "std": list(cfg.image_std),
    }


def check_consistent(manifest: dict, path) -> None:
    """The sections must agree with each other: catches a hand-edited manifest before it runs."""
    def bad(what: str):
        raise Ps3EdgeError(f"{path} is inconsistent: {what} - re-export the model")

    cfg = _check_model_and_files(manifest, bad)
    _check_derived(manifest, cfg, bad)
    _check_stages(manifest, cfg, bad)


def _check_model_and_files(manifest: dict, bad) -> PS3Config:
    """The object sections, the file list, the model config, the weights digest, opset, precision."""
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
        cfg = PS3Config.from_dict(manifest["model"])
    except Ps3EdgeError as e:
        bad(f"the 'model' section is not a valid PS3 config ({e})")
    except (TypeError, ValueError, AttributeError) as e:
        bad(f"the 'model' section is not a valid PS3 config ({type(e).__name__}: {e})")
    digest = manifest.get("weights_sha256")
    if digest is not None and not (isinstance(digest, str) and len(digest) == 64
                                   and all(c in "0123456789abcdef" for c in digest)):
        bad(f"weights_sha256 must be a sha256 hex digest, got {digest!r}")
    opset = manifest["opset"]
    if not is_whole_number(opset) or opset < defaults.MIN_OPSET:
        bad(f"opset must be a whole number >= {defaults.MIN_OPSET}, got {opset!r}")
    if manifest["precision"] != "fp32":
        bad(f"precision must be 'fp32' (the exported stages; 'ps3edge calibrate' records others under "
            f"'precisions'), got {manifest['precision']!r}")
    return cfg


def _check_derived(manifest: dict, cfg: PS3Config, bad) -> None:
    """The sections derived from the model config: defaults, returned layers, geometry, preprocessing."""
    _check_defaults(manifest["defaults"], cfg, bad)
    layers = manifest["returned_layers"]
    if (not isinstance(layers, list) or not layers
            or not all(isinstance(l, int) and 0 <= l < cfg.depth for l in layers)):
        bad(f"returned_layers {layers} must be block indices of the {cfg.depth}-block model")
    geometry = manifest["geometry"]
    expected = geometry_section(cfg)
    if not isinstance(geometry, dict):
        bad("'geometry' is not an object")
    limit = geometry.get("max_tokens_per_highres_call")
    if not isinstance(limit, int) or limit < 1:
        bad(f"geometry.max_tokens_per_highres_call must be a positive integer, got {limit!r}")
    batch = geometry.get("max_batch")
    if not is_whole_number(batch) or batch < 1:
        bad(f"geometry.max_batch must be a positive integer, got {batch!r}")
    if batch > batch_limit(stage_specs(cfg, len(layers))):
        bad(f"geometry.max_batch {batch} is over {batch_limit(stage_specs(cfg, len(layers)))}, the most images "
            f"whose tensors stay under 2^31 elements")
    chosen = ("max_tokens_per_highres_call", "max_batch")     # export settings, not derived from the config
    differs = sorted(k for k, v in expected.items() if k not in chosen and geometry.get(k) != v)
    if differs:
        bad(f"geometry {', '.join(differs)} do not match the model config")
    budget = manifest["defaults"].get("select_num_each_scale")
    if budget != list(cfg.select_num_each_scale):
        bad(f"defaults.select_num_each_scale {budget} does not match the model config "
            f"{list(cfg.select_num_each_scale)}")
    pre = manifest["preprocessing"]
    if pre != preprocessing_section(cfg):
        bad("'preprocessing' does not match the model config")


def _check_stages(manifest: dict, cfg: PS3Config, bad) -> None:
    """Every stage as the declarations (spec.py) say, its files listed with a sha256."""
    files, layers = manifest["files"], manifest["returned_layers"]
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


def _check_defaults(section: dict, cfg: PS3Config, bad) -> None:
    """The look-close defaults that build and calibrate read (select_num_each_scale is checked
    against the model config by the caller)."""
    if "num_look_close" in section:
        steps = section["num_look_close"]
        if not is_whole_number(steps) or not 1 <= steps <= cfg.max_look_close:
            bad(f"defaults.num_look_close must be a whole number from 1 to {cfg.max_look_close}, got {steps!r}")
    # look_close_mode: written by earlier releases and never read (the mode comes from
    # LOOK_CLOSE_MODE and the prompt); still checked so that a manifest of theirs stays valid
    if "look_close_mode" in section and section["look_close_mode"] not in defaults.LOOK_CLOSE_MODES:
        bad(f"defaults.look_close_mode must be one of {', '.join(defaults.LOOK_CLOSE_MODES)}, "
            f"got {section['look_close_mode']!r}")
