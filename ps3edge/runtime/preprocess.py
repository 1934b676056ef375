"""Images in: open, validate, and preprocess exactly like the official PS3 image processor.

The official processor squash-resizes the PIL image to S_max x S_max (bicubic), scales to
[0, 1] and normalises with the checkpoint's mean / std. Like VILA's image loader, we convert to
RGB first, so grayscale, palette, RGBA (alpha dropped) and CMYK images all work; 16-bit images
are scaled to 8 bits (65535 -> 255) rather than clipped.

`preprocess` runs on the CPU with PIL; `preprocess_on_device` does the same on a torch device
(the GPU fast path), bit for bit.

Like the official processor, only the first frame of an animated or multi-page file is used and
the EXIF orientation is ignored (parity holds); `open_image` says so in the image's
`info[NOTES]` for the command line to print, and `exif_transpose=True` applies the orientation
for cameras that write rotated JPEGs.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .. import defaults
from ..errors import Ps3EdgeError
from ..paths import expect_file


NOTES = "ps3edge.notes"            # image.info key: what open_image did that the user should hear
EXIF_ORIENTATION = 0x0112
ROTATIONS = {3: "rotated 180 degrees", 6: "rotated 90 degrees", 8: "rotated 270 degrees", 2: "mirrored",
             4: "flipped", 5: "transposed", 7: "transversed"}


def open_image(path, exif_transpose: bool = False, name: str | None = None) -> Image.Image:
    """Open and fully decode an image file, or raise a one-line Ps3EdgeError. `image.info[NOTES]`
    lists what was done that the official processor also does silently (first frame only, EXIF
    orientation ignored), or, with `exif_transpose`, the orientation applied.

    path may also be a binary file object (an encoded image received over the network); `name`
    then stands for it in the messages."""
    if hasattr(path, "read"):
        label = name or "the image"
    else:
        path = Path(path)
        label = str(path)
        expect_file(path, "image")
    short = getattr(path, "name", None) or label
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = defaults.MAX_IMAGE_PIXELS
            with Image.open(path) as im:
                im.load()                       # decode now: truncated files fail here
                frames = getattr(im, "n_frames", 1)
                orientation = im.getexif().get(EXIF_ORIENTATION, 1)
                image = im.copy()
    except UnidentifiedImageError:
        raise Ps3EdgeError(f"{label} is not an image file PIL can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise Ps3EdgeError(f"{label} is too large (over {defaults.MAX_IMAGE_PIXELS} pixels)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise Ps3EdgeError(f"{label} is a corrupt or truncated image ({e})") from None
    if image.width < 1 or image.height < 1:
        raise Ps3EdgeError(f"{label} has no pixels")
    notes = []
    if frames > 1:
        notes.append(f"{short} has {frames} frames; only the first is used, as the official processor does")
    if orientation in ROTATIONS and exif_transpose:
        image = ImageOps.exif_transpose(image)
        notes.append(f"{short}: EXIF orientation applied ({ROTATIONS[orientation]})")
    elif orientation in ROTATIONS:
        notes.append(f"{short} is {ROTATIONS[orientation]} by its EXIF orientation, which is ignored as the "
                     f"official processor does; --exif-transpose applies it")
    image.info[NOTES] = notes
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
    """PIL image -> (1,3,size,size) float32, resized (bicubic), scaled to [0,1], normalised.

    Each pixel's value is looked up in the 256 normalised levels of its channel (`normalise`
    applied to the levels once): the same float32 values as normalising every pixel, in a third
    of the time (a 3780 x 3780 image: 1.1 s -> 0.33 s on this project's 2-core CPU)."""
    image = to_rgb(image).resize((size, size), Image.BICUBIC)
    planes = np.asarray(image).transpose(2, 0, 1)                          # (3,S,S) uint8 levels
    table = normalise_table(mean, std)                                     # (3,256)
    out = np.empty((1, 3, size, size), np.float32)
    for c in range(3):
        out[0, c] = table[c][planes[c]]
    return out


def normalise(levels: np.ndarray, mean, std) -> np.ndarray:
    """8-bit RGB levels (...,3) -> float32 (...,3): scaled to [0,1], minus mean, over std."""
    x = levels.astype(np.float32) / np.float32(255.0)
    return (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)


def normalise_table(mean, std) -> np.ndarray:
    """(3,256) float32: what each 8-bit value of each channel normalises to (`normalise` itself).
    Both preprocessing paths look pixels up in it; on a device that gives bit-identical values
    (CUDA divides by a scalar as a multiply by its reciprocal, 1 ulp off numpy). Cached per
    (mean, std): do not modify it."""
    return _normalise_table(tuple(float(m) for m in mean), tuple(float(s) for s in std))


@functools.lru_cache(maxsize=8)
def _normalise_table(mean: tuple, std: tuple) -> np.ndarray:
    levels = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)             # (256,3)
    return np.ascontiguousarray(normalise(levels, mean, std).T)                         # (3,256)


# --- the same preprocessing on a torch device ----------------------------------------------------
# Pillow resizes 8-bit images in two separable passes with fixed-point coefficients, rounding
# to 8 bits after each pass; torch's bicubic (even antialiased) differs from it by up to 28
# levels on small images. So the device path repeats Pillow's arithmetic exactly: the same
# kernel (a = -0.5, support widened by the scale when shrinking), the same coefficient rounding
# to 22 fractional bits, int32 accumulation, and the same pass order. Result: bit-identical
# pixels, so the features and the selection do not depend on where preprocessing ran.

PIL_PRECISION_BITS = 32 - 8 - 2             # Pillow's fixed point for 8-bit images (Resample.c)


def _pil_bicubic_kernel(x: np.ndarray) -> np.ndarray:
    a = -0.5
    x = np.abs(x)
    return np.where(x < 1.0, ((a + 2.0) * x - (a + 3.0)) * x * x + 1,
                    np.where(x < 2.0, (((x - 5) * x + 8) * x - 4) * a, 0.0))


@functools.lru_cache(maxsize=16)
def pil_bicubic_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's resampling taps along one axis: source indices (out, K) and int32 weights
    (out, K) in 22-bit fixed point (unused taps have weight 0 and a valid index). Cached: do
    not modify the arrays."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)                       # shrinking widens the kernel (antialias)
    support = 2.0 * filterscale
    ksize = int(np.ceil(support)) * 2 + 1
    center = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    xmin = np.maximum((center - support + 0.5).astype(np.int64), 0)
    count = np.minimum((center + support + 0.5).astype(np.int64), in_size) - xmin
    k = np.arange(ksize)
    used = k[None, :] < count[:, None]
    w = np.where(used, _pil_bicubic_kernel((k[None, :] + xmin[:, None] - center[:, None] + 0.5) / filterscale), 0.0)
    total = w.sum(axis=1, keepdims=True)
    w = np.where(total != 0.0, w / np.where(total == 0.0, 1.0, total), w)
    fixed = np.trunc(w * (1 << PIL_PRECISION_BITS) + np.where(w < 0, -0.5, 0.5)).astype(np.int32)
    index = np.minimum(xmin[:, None] + k[None, :], in_size - 1)
    return index, fixed


def _resize_axis(x: torch.Tensor, axis: int, out_size: int) -> torch.Tensor:
    """One Pillow pass over int32 pixels (C,H,W) along `axis`: weighted taps, round, clip to 0..255."""
    index, weight = pil_bicubic_taps(x.shape[axis], out_size)
    index = torch.from_numpy(index).to(x.device)
    weight = torch.from_numpy(weight).to(x.device)
    shape = [1] * x.ndim
    shape[axis] = out_size
    out_shape = list(x.shape)
    out_shape[axis] = out_size
    acc = torch.full(out_shape, 1 << (PIL_PRECISION_BITS - 1), dtype=torch.int32, device=x.device)
    for t in range(index.shape[1]):
        acc += x.index_select(axis, index[:, t]) * weight[:, t].reshape(shape)
    return (acc >> PIL_PRECISION_BITS).clamp_(0, 255)


def _height_first_new_rule(in_hw, out_hw) -> bool:
    """Pillow >= 13: the vertical pass goes first when the height shrinks by more than twice
    as many pixels as the width does (python-pillow/Pillow#9549)."""
    (H, W), (h, w) = in_hw, out_hw
    return h < H and (H - h) > 2 * (W - w)


def _height_first_old_rule(in_hw, out_hw) -> bool:
    return False                                         # older Pillow: always horizontal first


@functools.lru_cache(maxsize=1)
def pillow_pass_order():
    """Which pass order the installed Pillow uses, found by resizing one probe image both ways."""
    rng = np.random.default_rng(0)
    probe = (rng.random((24, 24, 3)) * 255).astype(np.uint8)
    want = np.asarray(Image.fromarray(probe).resize((23, 4), Image.BICUBIC))
    for rule in (_height_first_new_rule, _height_first_old_rule):
        got = resize_like_pil(torch.from_numpy(probe).permute(2, 0, 1), 4, 23, rule)
        if np.array_equal(got.permute(1, 2, 0).numpy(), want):
            return rule
    raise Ps3EdgeError(f"Pillow {Image.__version__} resizes in a way ps3edge cannot reproduce on the device; "
                       "preprocess on the CPU instead (--preprocess cpu)")


def resize_like_pil(pixels: torch.Tensor, height: int, width: int, height_first=None) -> torch.Tensor:
    """(C,H,W) uint8 -> (C,height,width) int32 in 0..255, equal to PIL's bicubic resize."""
    height_first = height_first or pillow_pass_order()
    x = pixels.to(torch.int32)
    H, W = x.shape[-2:]
    passes = [(2, width, W != width), (1, height, H != height)]
    if height_first((H, W), (height, width)):
        passes.reverse()
    for axis, size, needed in passes:
        if needed:
            x = _resize_axis(x, axis, size)
    return x


def preprocess_on_device(image: Image.Image, size: int, mean, std, device="cpu",
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`preprocess` on a torch device: the 8-bit image goes up once, the resize and the
    normalisation run there. Bit-identical to `preprocess` in float32."""
    rgb = np.array(to_rgb(image), dtype=np.uint8)                            # (H,W,3), a writable copy
    return preprocess_levels_on_device(torch.from_numpy(rgb).to(device).permute(2, 0, 1), size, mean, std, dtype)


def preprocess_levels_on_device(levels: torch.Tensor, size: int, mean, std,
                                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(3,H,W) uint8 RGB levels already on a device (a camera frame decoded there) -> the
    (1,3,size,size) normalised input on that device; no host round trip."""
    x = resize_like_pil(levels, size, size)                                  # (3,S,S) int32 levels 0..255
    table = torch.from_numpy(normalise_table(mean, std)).to(x.device)
    # row c of the table starts at 256 c: look each level up with int32 indices (an int64 index
    # of a 3780^2 image would be another 343 MB)
    x += torch.arange(0, 3 * 256, 256, dtype=torch.int32, device=x.device).reshape(3, 1, 1)
    return table.flatten().index_select(0, x.flatten()).reshape(1, 3, size, size).to(dtype)
