"""Images in: open, validate, and preprocess exactly like the official PS3 image processor.

The official processor squash-resizes the PIL image to S_max x S_max (bicubic), scales to
[0, 1] and normalises with the checkpoint's mean / std. Like VILA's image loader, we convert to
RGB first, so grayscale, palette, RGBA (alpha dropped) and CMYK images all work; 16-bit images
are scaled to 8 bits (65535 -> 255) rather than clipped.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .. import defaults
from ..errors import Ps3EdgeError


def open_image(path) -> Image.Image:
    """Open and fully decode an image file, or raise a one-line Ps3EdgeError."""
    path = Path(path)
    if not path.is_file():
        raise Ps3EdgeError(f"image not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = defaults.MAX_IMAGE_PIXELS
            with Image.open(path) as im:
                im.load()                       # decode now: truncated files fail here
                image = im.copy()
    except UnidentifiedImageError:
        raise Ps3EdgeError(f"{path} is not an image file PIL can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise Ps3EdgeError(f"{path} is too large (over {defaults.MAX_IMAGE_PIXELS} pixels)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise Ps3EdgeError(f"{path} is a corrupt or truncated image ({e})") from None
    if image.width < 1 or image.height < 1:
        raise Ps3EdgeError(f"{path} has no pixels")
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. High-bit-depth grayscale is scaled, not clipped."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F" and values.size and values.max() <= 1.0:
            values = values * 255.0
        elif image.mode.startswith("I;16") or (values.size and values.max() > 255):
            values = values / 257.0                           # 16 bits -> 8 bits, even a dark image
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
    return image if image.mode == "RGB" else image.convert("RGB")


def preprocess(image: Image.Image, size: int, mean, std) -> np.ndarray:
    """PIL image -> (1,3,size,size) float32, resized (bicubic), scaled to [0,1], normalised."""
    image = to_rgb(image).resize((size, size), Image.BICUBIC)
    x = np.asarray(image, dtype=np.float32) / np.float32(255.0)          # (S,S,3)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])               # (1,3,S,S)
