"""How the look-close steps of a batch become highres calls, and their outputs each image's tokens.

    plans (one per image) --rows--> every step of every image, a row of N patch positions that
    names its image --calls--> rows of equal N from any image in one call (T rows x N tokens),
    longest first, at most `steps_per_call` rows a call --highres--> features (T,N,C) per call
    --assemble--> per image: [low-res tokens ; high-res tokens in scale-major raster order]

Steps are independent (each attends to its own image's low-res K/V, named by `step_image`, and
to its own tokens), so the grouping changes no result; it only decides how many calls run. The
fewest calls the equal-N rule allows: one per length, unless a length has more rows than a call
takes. Within a call, rows keep image order, then step order.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from .planning import Geometry, Plan


def step_rows(plans: list[Plan], geometry: Geometry) -> list[tuple[int, np.ndarray]]:
    """(image, positions (N,) int32) of every non-empty step, image by image, in step order."""
    rows = []
    for image, the_plan in enumerate(plans):
        for t in range(len(the_plan.steps)):
            positions = the_plan.step_positions(geometry, t)
            if len(positions):
                rows.append((image, positions))
    return rows


def highres_feeds(plans, low: dict, geometry: Geometry, steps_per_call: int | None = None):
    """The highres stage's inputs for the plans of a batch (or one plan), one call at a time.

    `low` holds the lowres outputs of the same images: highres_patches (B,P,588) and kv_cache
    (L,2,B,H,N0,D). Each feed has patches (T,N,588), positions (T,N) and step_image (T,) int32;
    `steps_per_call` None means no limit."""
    if isinstance(plans, Plan):
        plans = [plans]
    by_length = defaultdict(list)
    for image, positions in step_rows(plans, geometry):
        by_length[len(positions)].append((image, positions))
    all_patches = low["highres_patches"]                                          # (B,P,588)
    for _, group in sorted(by_length.items(), reverse=True):
        chunk = steps_per_call or len(group)
        for t0 in range(0, len(group), chunk):
            rows = group[t0: t0 + chunk]
            step_image = np.array([image for image, _ in rows], dtype=np.int32)  # (T,)
            positions = np.stack([p for _, p in rows])                           # (T,N) int32
            yield {"patches": all_patches[step_image[:, None], positions], "positions": positions,
                   "step_image": step_image, "kv_cache": low["kv_cache"]}


def assemble(lowres_tokens: np.ndarray, feeds: list[dict], features: list[np.ndarray]) -> list[np.ndarray]:
    """Each image's (N0 + its high-res tokens, C) sequence from the calls' features.

    lowres_tokens (B,N0,C); feeds and features (T,N,C) pair up call by call."""
    width = lowres_tokens.shape[-1]
    positions = defaultdict(list)
    rows = defaultdict(list)
    for feed, out in zip(feeds, features):
        for image, pos, feat in zip(feed["step_image"], feed["positions"], out):
            positions[int(image)].append(pos)
            rows[int(image)].append(feat)
    tokens = []
    for image in range(len(lowres_tokens)):
        if not positions[image]:
            tokens.append(np.ascontiguousarray(lowres_tokens[image]))
            continue
        pos = np.concatenate(positions[image])
        feat = np.concatenate(rows[image]).reshape(-1, width)
        order = np.argsort(pos, kind="stable")                                    # scale-major raster order
        tokens.append(np.concatenate([lowres_tokens[image], feat[order]], axis=0))
    return tokens
