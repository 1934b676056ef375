"""Optimization-profile bounds of every stage, derived from a Manifest: the one place that says
which input shapes the stages of an artifact accept.

The TensorRT builder turns them into optimization profiles, the onnxruntime TensorRT provider
gets them as its profile shapes, the manifest check holds recorded engine profiles against them,
and the lint can ask them whether every dynamic dimension is bounded. The named axes:

    B  images in one pass              [1, geometry.max_batch (export --max-batch)], opt max
    T  look-close step rows in one     [1, T_max], opt T_max
       highres call, of any image
    N  tokens per step                 [1, geometry.max_tokens_per_highres_call (2560)], opt max

T_max is the steps of NUM_LOOK_CLOSE = `max_look_close` (by default the manifest's default, 6,
capped by 'all': 6 steps for 1.5K, 35 for 4K; `'all'` asks for every step) for each of the
max_batch images, capped at what one call's attention scores allow. A call with more steps
than an engine's T_max is split by the runtime, so T_max trades engine memory against calls,
never correctness. Both bounds are capped by TensorRT's 2^31-element tensor limit.
"""

from __future__ import annotations

import math

from .. import defaults
from ..model.config import is_whole_number, whole_number
from ..errors import Ps3EdgeError


def max_steps(manifest) -> int:
    """Steps that NUM_LOOK_CLOSE='all' takes with the model's default per-step budget."""
    per_step = sum(manifest.look_close_defaults.select_num_each_scale)
    return math.ceil(manifest.geometry.highres_patches_total / per_step)


def attention_step_limit(manifest) -> int:
    """Most steps one highres call may hold: TensorRT tensors have fewer than 2^31 elements, and
    the attention scores of a call are T x heads x N x (N0 + N) (4K: 15 steps)."""
    n = manifest.geometry.max_tokens_per_highres_call
    keys = manifest.geometry.lowres_tokens + n
    per_step = manifest.config.num_heads * n * keys
    return max(1, (2 ** 31 - 1) // per_step)


def look_close_steps(manifest, max_look_close=None) -> int:
    """Steps of one image for `--max-look-close` (an int, 'all', or None for the model's default steps).

    'all' and the default are capped at `attention_step_limit`; an explicit larger number is
    refused (the runtime splits longer runs into several calls anyway)."""
    most = max_steps(manifest)
    limit = attention_step_limit(manifest)
    if max_look_close is None:
        steps = manifest.look_close_defaults.num_look_close
        return min(defaults.DEFAULT_NUM_LOOK_CLOSE if steps is None else steps, most, limit)
    if isinstance(max_look_close, str):
        text = max_look_close.strip().lower()
        if text == "all":
            return min(most, limit)
        try:
            max_look_close = whole_number(text)
        except ValueError:
            raise Ps3EdgeError(f"--max-look-close must be a whole number or 'all', got '{max_look_close}'") from None
    if not is_whole_number(max_look_close) or not 1 <= max_look_close <= most:
        raise Ps3EdgeError(f"--max-look-close must be between 1 and {most} for this model (or 'all'), "
                           f"got {max_look_close}")
    if max_look_close > limit:
        raise Ps3EdgeError(f"--max-look-close {max_look_close} is over {limit}, the most steps one engine call can "
                           f"hold (its attention scores would pass 2^31 elements); longer runs are split into calls")
    return max_look_close


def batch_limit(stages) -> int:
    """Most images per pass: every declared tensor with a B axis stays under 2^31 elements (4K:
    47 images, the K/V cache (27 x 2 x B x 16 x 729 x 72)). `stages`: name -> StageSpec or StageEntry."""
    per_image = [math.prod(d for d in t.shape if isinstance(d, int))
                 for info in stages.values() for t in (*info.inputs, *info.outputs)
                 if "B" in t.shape and not any(isinstance(d, str) and d != "B" for d in t.shape)]
    return max(1, (2 ** 31 - 1) // max(per_image, default=1))


def check_max_batch(stages, max_batch) -> int:
    """`export --max-batch`: a whole number from 1 to `batch_limit`."""
    limit = batch_limit(stages)
    if not is_whole_number(max_batch) or not 1 <= max_batch <= limit:
        raise Ps3EdgeError(f"--max-batch must be a whole number from 1 to {limit} for this model "
                           f"(TensorRT tensors hold fewer than 2^31 elements), got {max_batch}")
    return int(max_batch)


def highres_rows(manifest, steps: int) -> int:
    """T_max: `steps` look-close steps for each of max_batch images, at most what one call holds."""
    return min(steps * manifest.geometry.max_batch, attention_step_limit(manifest))


def axis_bounds(manifest, max_look_close=None) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of every named dynamic axis of the stages."""
    t_max = highres_rows(manifest, look_close_steps(manifest, max_look_close))
    b_max = manifest.geometry.max_batch
    n_max = manifest.geometry.max_tokens_per_highres_call
    return {"B": (1, b_max, b_max), "T": (1, t_max, t_max), "N": (1, n_max, n_max)}


def profile_bounds(manifest, max_look_close=None) -> dict[str, dict[str, dict[str, list[int]]]]:
    """stage -> input name -> {"min", "opt", "max"} shapes, for every input of every stage.

    Static inputs have min = opt = max = their shape. A dynamic axis with no bound here is an
    error: an engine could not be built for it.
    """
    axes = axis_bounds(manifest, max_look_close)
    bounds = {}
    for stage, info in manifest.stages.items():
        per_input = {}
        for tensor in info.inputs:
            shape = {"min": [], "opt": [], "max": []}
            for dim in tensor.shape:
                if isinstance(dim, str):
                    if dim not in axes:
                        raise Ps3EdgeError(f"stage '{stage}' input '{tensor.name}' has dynamic axis '{dim}' "
                                           f"that no optimization profile bounds (known: {', '.join(axes)})")
                    lo, opt, hi = axes[dim]
                else:
                    lo = opt = hi = int(dim)
                shape["min"].append(lo)
                shape["opt"].append(opt)
                shape["max"].append(hi)
            per_input[tensor.name] = shape
        bounds[stage] = per_input
    return bounds


def is_dynamic(stage_bounds: dict[str, dict[str, list[int]]]) -> bool:
    """Whether a stage (one entry of profile_bounds) needs an optimization profile."""
    return any(b["min"] != b["max"] for b in stage_bounds.values())


def shape_arg(stage_bounds: dict[str, dict[str, list[int]]], which: str) -> str:
    """'name:1x2x3,other:4x5' - the shape-list syntax of trtexec and onnxruntime's TensorRT provider."""
    return ",".join(f"{name}:{'x'.join(str(d) for d in b[which])}" for name, b in stage_bounds.items())
