"""What `ps3edge run` writes: the features file and the selection overlay, both atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from safetensors.numpy import save_file

from .lookclose import LookCloseResult

# one colour per high-res scale, coarse to fine
SCALE_COLOURS = [(40, 120, 255), (255, 150, 0), (230, 30, 60), (40, 200, 90)]
OVERLAY_MAX_SIDE = 1024


def _atomic_target(path: Path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def write_features(result: LookCloseResult, path) -> None:
    """features (1,tokens,C) float32, prob (G0,G0), selection_map_<scale> (g,g) uint8."""
    tensors = {"features": np.ascontiguousarray(result.features, dtype=np.float32),
               "prob": np.ascontiguousarray(result.prob, dtype=np.float32)}
    for scale, m in zip(result.scales, result.plan.selection_maps):
        tensors[f"selection_map_{scale}"] = np.ascontiguousarray(m, dtype=np.uint8)
    metadata = {"layer": str(result.layer),
                "tokens_each_scale": ",".join(f"{k}:{v}" for k, v in result.tokens_each_scale.items())}
    tmp = _atomic_target(path)
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
            box = (j * W / g, i * H / g, (j + 1) * W / g - 1, (i + 1) * H / g - 1)
            draw.rectangle(box, fill=colour + (70,))
    out = Image.alpha_composite(base.convert("RGBA"), layer)
    legend = ImageDraw.Draw(out)
    for s, (sc, n) in enumerate(zip(result.scales, result.plan.tokens_each_scale())):
        legend.rectangle((6, 6 + 16 * s, 18, 18 + 16 * s), fill=SCALE_COLOURS[s % len(SCALE_COLOURS)] + (255,))
        legend.text((24, 6 + 16 * s), f"{sc}px: {n} patches", fill=(255, 255, 255, 255))
    return out.convert("RGB")


def write_overlay(image: Image.Image, result: LookCloseResult, path) -> None:
    tmp = _atomic_target(path)
    try:
        draw_overlay(image, result).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
