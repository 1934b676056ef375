"""What `ps3edge run` writes: the features file and the selection overlays, all atomically.

`write_outputs` (one image) and `write_batch_outputs` (several, one features file with a batch
axis and one overlay each) write all of their files or none: each goes to a temporary file next
to its target first, and only when all are complete are they renamed into place.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from safetensors.numpy import save_file

from ..errors import Ps3EdgeError
from ..artifact.io import apply_default_mode
from .result import LookCloseResult

# one colour per high-res scale, coarse to fine
SCALE_COLOURS = [(40, 120, 255), (255, 150, 0), (230, 30, 60), (40, 200, 90)]
OVERLAY_MAX_SIDE = 1024


def _atomic_target(path: Path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def check_output_path(path, what: str = "output") -> None:
    """Refuse, before any work is done, an output path that cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise Ps3EdgeError(f"{what} {path} is a directory")
    parent = next((p for p in (path.parent, *path.parent.parents) if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise Ps3EdgeError(f"{what} {path}: {parent} is not a directory")
    if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
        raise Ps3EdgeError(f"{what} {path}: {parent} is not writable")


def write_outputs(result: LookCloseResult, image: Image.Image, features_path, overlay_path=None) -> None:
    """The features file and (optionally) the overlay: both are written, or neither."""
    write_batch_outputs([result], [image], features_path, None if overlay_path is None else [overlay_path],
                        stacked=False)


def write_batch_outputs(results: list, images: list, features_path, overlay_paths=None, stacked: bool = True) -> None:
    """One features file for a batch (every tensor with a leading batch axis, in the order of
    `results`; `stacked=False` writes one result's tensors as they are) and one overlay per
    image: all of them are written, or none."""
    targets = [Path(features_path)] + [Path(p) for p in overlay_paths or ()]
    for t in targets:
        check_output_path(t)
    staged, target = [], targets[0]
    try:
        tmp = _atomic_target(target)
        staged.append(tmp)
        _save_features(results, tmp, stacked)
        for image, result, target in zip(images, results, targets[1:]):
            tmp = _atomic_target(target)
            staged.append(tmp)
            draw_overlay(image, result).save(tmp, format="PNG")
        for tmp, target in zip(staged, targets):
            apply_default_mode(tmp)          # mkstemp makes 0600; outputs get the usual umask mode
            os.replace(tmp, target)
    except OSError as e:
        raise Ps3EdgeError(f"cannot write {target}: {e.strerror or e}") from None
    finally:
        for tmp in staged:
            tmp.unlink(missing_ok=True)


def result_tensors(result: LookCloseResult) -> dict[str, np.ndarray]:
    """The named tensors of a run, as the features file (and the server) give them: features
    (1,tokens,C) float32, prob (G0,G0) float32, selection_map_<scale> (g,g) uint8."""
    tensors = {"features": np.ascontiguousarray(result.features, dtype=np.float32),
               "prob": np.ascontiguousarray(result.prob, dtype=np.float32)}
    for scale, m in zip(result.scales, result.plan.selection_maps):
        tensors[f"selection_map_{scale}"] = np.ascontiguousarray(m, dtype=np.uint8)
    return tensors


def _save_features(results: list, path, stacked: bool) -> None:
    each = [result_tensors(r) for r in results]
    if stacked:      # features (B,tokens,C): the one image axis of `features` becomes the batch axis
        tensors = {name: np.concatenate([t[name] for t in each]) if name == "features"
                   else np.stack([t[name] for t in each]) for name in each[0]}
    else:
        tensors = each[0]
    first = results[0]
    metadata = {"layer": str(first.layer),
                "tokens_each_scale": ",".join(f"{k}:{v}" for k, v in first.tokens_each_scale.items())}
    if stacked:
        metadata["batch"] = str(len(results))
    save_file(tensors, str(path), metadata=metadata)


def write_features(result: LookCloseResult, path) -> None:
    """features (1,tokens,C) float32, prob (G0,G0), selection_map_<scale> (g,g) uint8."""
    write_outputs(result, None, path)


def draw_overlay(image: Image.Image, result: LookCloseResult) -> Image.Image:
    """The image with each scale's selected patches tinted (finer scales on top)."""
    from .preprocess import to_rgb

    base = to_rgb(image)
    scale = min(1.0, OVERLAY_MAX_SIDE / max(base.size))
    base = base.resize((max(1, round(base.width * scale)), max(1, round(base.height * scale))), Image.BICUBIC)
    W, H = base.size
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for s, m in enumerate(result.plan.selection_maps):
        colour = SCALE_COLOURS[s % len(SCALE_COLOURS)]
        g = m.shape[0]
        for i, j in zip(*np.nonzero(m)):
            x0, y0 = j * W / g, i * H / g          # images smaller than the grid: at least a point
            box = (x0, y0, max(x0, (j + 1) * W / g - 1), max(y0, (i + 1) * H / g - 1))
            draw.rectangle(box, fill=colour + (70,))
    out = Image.alpha_composite(base.convert("RGBA"), layer)
    legend = ImageDraw.Draw(out)
    for s, (sc, n) in enumerate(zip(result.scales, result.plan.tokens_each_scale())):
        legend.rectangle((6, 6 + 16 * s, 18, 18 + 16 * s), fill=SCALE_COLOURS[s % len(SCALE_COLOURS)] + (255,))
        legend.text((24, 6 + 16 * s), f"{sc}px: {n} patches", fill=(255, 255, 255, 255))
    return out.convert("RGB")


def write_overlay(image: Image.Image, result: LookCloseResult, path) -> None:
    check_output_path(path)
    try:
        tmp = _atomic_target(path)
    except OSError as e:
        raise Ps3EdgeError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        draw_overlay(image, result).save(tmp, format="PNG")
        apply_default_mode(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise Ps3EdgeError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)
