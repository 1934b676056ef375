"""How the look-close steps of a batch become highres calls, and their outputs each image's tokens.

    plans (one per image) --rows--> every step of every image, a row of N patch positions that
    names its image --calls--> rows of equal N from any image in one call (T rows x N tokens),
    longest first, at most `steps_per_call` rows a call --highres--> features (T,N,C) per call
    --assemble--> per image: [low-res tokens ; high-res tokens in scale-major raster order]

Steps are independent (each attends to its own image's low-res K/V, named by `step_image`, and
to its own tokens), so the grouping changes no result; it only decides how many calls run. The
fewest calls the equal-N rule allows: one per length, unless a length has more rows than a call
takes. Within a call, rows keep image order, then step order.

`given` (None on the normal path, which it leaves unchanged): per image, None or the features of
some of its planned patches known already (`planned_given`; runtime/reuse.py takes them from
the previous frame). Those patches are left out of the rows, and `assemble` puts their given
features in their places.
"""

from __future__ import annotations

from collections import defaultdict
from functools import lru_cache

import numpy as np

from .. import defaults
from ..model.patches import PatchTaps, gather_patches
from .planning import Geometry, Plan


def step_rows(plans: list[Plan], geometry: Geometry, given=None) -> list[tuple[int, np.ndarray]]:
    """(image, positions (N,) int32) of every non-empty step, image by image, in step order;
    without the patches whose features are `given` (the module docstring)."""
    rows = []
    for image, the_plan in enumerate(plans):
        known = None if given is None or given[image] is None else given[image][0]
        for t in range(len(the_plan.steps)):
            positions = the_plan.step_positions(geometry, t)
            if known is not None and len(known):
                positions = positions[~np.isin(positions, known)]
            if len(positions):
                rows.append((image, positions))
    return rows


def planned_given(plans: list[Plan], known: list, geometry: Geometry) -> list:
    """Per image, the known (positions (n,), features (n,C)) cut to the patches its plan holds
    (None where nothing is known): a known patch the plan does not take is not a token."""
    given = []
    for the_plan, k in zip(plans, known):
        if k is None:
            given.append(None)
            continue
        positions, feats = k
        planned = np.concatenate([the_plan.step_positions(geometry, t) for t in range(len(the_plan.steps))]
                                 or [np.zeros(0, np.int32)])
        keep = np.isin(positions, planned)
        given.append((np.asarray(positions)[keep].astype(np.int32), np.asarray(feats)[keep]))
    return given


@lru_cache(maxsize=8)
def patch_taps(max_size: int, highres_grids: tuple) -> PatchTaps:
    """The windowed resize's taps for S_max x S_max pixels and these high-res grids, made once."""
    return PatchTaps(max_size, [g * defaults.PATCH_SIZE for g in highres_grids], defaults.PATCH_SIZE)


def highres_feeds(plans, low: dict, geometry: Geometry, steps_per_call: int | None = None, given=None,
                  dtype=np.float32):
    """The highres stage's inputs for the plans of a batch (or one plan), one call at a time.

    `low` holds the lowres pass of the same images: the normalised pixels (B,3,S,S) float32 it
    was given and its kv_cache (L,2,B,H,N0,D). Each feed has patches (T,N,588) in `dtype` (the
    highres stage's), cut from the pixels for this call only (model/patches.py: the values of
    the full resize's patches, bit for bit), positions (T,N) and step_image (T,) int32;
    `steps_per_call` None means no limit; `given` as the module docstring says."""
    if isinstance(plans, Plan):
        plans = [plans]
    by_length = defaultdict(list)
    for image, positions in step_rows(plans, geometry, given):
        by_length[len(positions)].append((image, positions))
    pixels = low["pixels"]                                                        # (B,3,S,S)
    taps = patch_taps(pixels.shape[-1], tuple(geometry.highres_grids))
    for _, group in sorted(by_length.items(), reverse=True):
        chunk = steps_per_call or len(group)
        for t0 in range(0, len(group), chunk):
            rows = group[t0: t0 + chunk]
            step_image = np.array([image for image, _ in rows], dtype=np.int32)  # (T,)
            positions = np.stack([p for _, p in rows])                           # (T,N) int32
            images = np.broadcast_to(step_image[:, None], positions.shape)
            patches = gather_patches(pixels, images, positions, taps, defaults.PATCH_WINDOW_CHUNK)
            yield {"patches": patches.reshape(*positions.shape, -1).astype(dtype, copy=False),
                   "positions": positions, "step_image": step_image, "kv_cache": low["kv_cache"]}


def assemble(lowres_tokens: np.ndarray, feeds: list[dict], features: list[np.ndarray],
             given=None) -> list[np.ndarray]:
    """Each image's (N0 + its high-res tokens, C) sequence from the calls' features (and the
    `given` ones, the module docstring).

    lowres_tokens (B,N0,C); feeds and features (T,N,C) pair up call by call."""
    width = lowres_tokens.shape[-1]
    positions = defaultdict(list)
    rows = defaultdict(list)
    for feed, out in zip(feeds, features):
        for image, pos, feat in zip(feed["step_image"], feed["positions"], out):
            positions[int(image)].append(pos)
            rows[int(image)].append(feat)
    for image, g in enumerate(given or ()):
        if g is not None and len(g[0]):
            positions[image].append(g[0])
            rows[image].append(g[1].astype(lowres_tokens.dtype, copy=False))
    tokens = []
    for image in range(len(lowres_tokens)):
        if not positions[image]:
            tokens.append(np.ascontiguousarray(lowres_tokens[image]))
            continue
        pos = np.concatenate(positions[image])
        order = np.argsort(pos, kind="stable")                                    # scale-major raster order
        place = np.empty_like(order)
        place[order] = np.arange(len(order))                                      # where each row goes
        n0 = lowres_tokens.shape[1]
        out = np.empty((n0 + len(pos), width), dtype=np.result_type(lowres_tokens, *rows[image]))
        out[:n0] = lowres_tokens[image]
        start = 0
        # each call's rows straight to their places: no concatenated and no reordered copy of them
        for feat in rows[image]:
            feat = feat.reshape(-1, width)
            out[n0 + place[start: start + len(feat)]] = feat
            start += len(feat)
        tokens.append(out)
    return tokens
