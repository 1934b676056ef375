"""Camera frames in: every form a caller hands ps3edge, checked and turned into 8-bit RGB levels.

A frame is what a camera driver, OpenCV, PyAV, `cv_bridge` or a file gives:

    a path (str or os.PathLike)          an image file, opened as `open_image` opens it
    a PIL image                          any mode, converted to RGB as `preprocess.to_rgb` does
    numpy uint8 (H, W, 3) / (H, W, 4)    RGB by default; channels="bgr" for OpenCV and ROS bgr8,
                                         "rgba" / "bgra" to drop an alpha channel
    numpy uint8 (H, W) or (H, W, 1)      grayscale, each level copied to R, G and B
    torch uint8 (H, W, C) or (C, H, W)   on the CPU or on CUDA, C in 1, 3, 4 as above; the last
                                         axis is channels when it holds 1, 3 or 4, else the first

`levels(frame, channels)` gives either a PIL RGB image (host frames) or a (3, H, W) uint8 torch
tensor on the frame's own device (torch frames), never a float: the model's normalisation is the
artifact's, so a frame must carry raw 8-bit levels, and the same levels give bit-identical
features in every form (the PIL and the device resize agree bit for bit, preprocess.py).
Anything else is one Ps3EdgeError naming what was given and what is taken.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image

from ..errors import Ps3EdgeError
from .preprocess import open_image, to_rgb

CHANNELS = ("rgb", "bgr", "rgba", "bgra")
ACCEPTED = ("a path, a PIL image, a numpy uint8 array (H, W, 3), (H, W, 4) with channels='rgba'/'bgra', "
            "or (H, W), or a torch uint8 tensor (H, W, 3) or (3, H, W)")

Frame = Union[str, os.PathLike, Image.Image, np.ndarray, Any]     # Any: a torch.Tensor (imported lazily)


def check_channels(channels: str) -> str:
    if channels not in CHANNELS:
        raise Ps3EdgeError(f"channels must be one of {', '.join(CHANNELS)}, got {channels!r}")
    return channels


def describe(frame) -> str:
    """What a caller passed, in a few words, for the error line."""
    if isinstance(frame, np.ndarray):
        return f"a numpy {frame.dtype} array of shape {tuple(frame.shape)}"
    if is_tensor(frame):
        return f"a torch {str(frame.dtype).replace('torch.', '')} tensor of shape {tuple(frame.shape)} on {frame.device}"
    return f"a {type(frame).__module__}.{type(frame).__qualname__}"


def is_tensor(frame) -> bool:
    """A torch tensor, asked without importing torch (a caller holding one has imported it)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(frame, torch.Tensor)


def levels(frame: Frame, channels: str = "rgb", exif_transpose: bool = False):
    """A frame -> PIL RGB image, or (3, H, W) uint8 torch tensor on the frame's device."""
    check_channels(channels)
    if isinstance(frame, (str, os.PathLike)):
        return to_rgb(open_image(Path(frame), exif_transpose=exif_transpose))
    if isinstance(frame, Image.Image):
        if frame.width < 1 or frame.height < 1:
            raise Ps3EdgeError("the frame is a PIL image with no pixels")
        return to_rgb(frame)
    if isinstance(frame, np.ndarray):
        return Image.fromarray(_rgb_hwc(frame, frame.shape, channels, describe(frame)), mode="RGB")
    if is_tensor(frame):
        return _tensor_levels(frame, channels)
    raise Ps3EdgeError(f"cannot read a frame from {describe(frame)}; ps3edge takes {ACCEPTED}")


def _rgb_hwc(array: np.ndarray, shape, channels: str, what: str) -> np.ndarray:
    """A numpy uint8 (H,W), (H,W,1|3|4) array -> a contiguous (H,W,3) RGB array."""
    _check_levels(array.dtype == np.uint8, shape, what)
    if array.ndim == 2:
        array = array[:, :, None]
    c = array.shape[2]
    _check_channel_count(c, channels, what)
    if c == 1:
        return np.ascontiguousarray(np.repeat(array, 3, axis=2))
    rgb = array[:, :, :3]
    if channels.startswith("bgr"):
        rgb = rgb[:, :, ::-1]
    return np.ascontiguousarray(rgb)


def _tensor_levels(tensor, channels: str):
    """A torch uint8 (H,W,C) or (C,H,W) tensor -> (3,H,W) uint8 RGB on the same device."""
    import torch

    what = describe(tensor)
    _check_levels(tensor.dtype == torch.uint8, tuple(tensor.shape), what)
    if tensor.ndim == 2:
        tensor = tensor[None]
    elif tensor.shape[-1] in (1, 3, 4):
        tensor = tensor.permute(2, 0, 1)                    # (H,W,C) -> (C,H,W)
    elif tensor.shape[0] not in (1, 3, 4):
        raise Ps3EdgeError(f"cannot read a frame from {what}: neither its first nor its last axis holds "
                           f"1, 3 or 4 channels; ps3edge takes {ACCEPTED}")
    c = tensor.shape[0]
    _check_channel_count(c, channels, what)
    if c == 1:
        return tensor.expand(3, -1, -1).contiguous()
    rgb = tensor[:3]
    if channels.startswith("bgr"):
        rgb = rgb.flip(0)
    return rgb.contiguous()


def _check_levels(is_uint8: bool, shape: tuple, what: str) -> None:
    """8-bit levels of rank 2 or 3 with pixels, else one line."""
    if not is_uint8:
        raise Ps3EdgeError(f"cannot read a frame from {what}: ps3edge takes 8-bit levels (uint8, 0..255), "
                           f"not normalised values; convert with (x * 255).round().astype('uint8') if it "
                           f"holds 0..1, or pass the camera's uint8 frame")
    if len(shape) not in (2, 3):
        raise Ps3EdgeError(f"cannot read a frame from {what}: a frame has 2 or 3 axes; ps3edge takes {ACCEPTED}")
    if 0 in shape:
        raise Ps3EdgeError(f"cannot read a frame from {what}: it is empty")


def _check_channel_count(c: int, channels: str, what: str) -> None:
    if c not in (1, 3, 4):
        raise Ps3EdgeError(f"cannot read a frame from {what}: {c} channels; ps3edge takes {ACCEPTED}")
    if c == 4 and channels in ("rgb", "bgr"):
        raise Ps3EdgeError(f"cannot read a frame from {what}: 4 channels; say channels='rgba' or 'bgra' "
                           f"to drop the alpha channel")
    if c == 3 and channels in ("rgba", "bgra"):
        raise Ps3EdgeError(f"cannot read a frame from {what}: 3 channels, but channels={channels!r} says 4")
