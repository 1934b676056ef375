"""Look-close settings and selection planning: which high-res patches each step looks at.

Once the low-res pass is done the probability map is fixed, so the official step-by-step
"top-k among the patches not yet selected" equals cutting ONE ranking per scale into
consecutive chunks. The ranking is the probability in descending order; ties (the map is a
nearest-neighbour copy of the 27 x 27 grid, so whole 2x2 / 4x4 / 10x10 blocks tie) are broken
by the lower raster index within the scale. That rule is ours: the official code calls
`torch.topk`, whose choice among equal values is implementation-defined, so where a step's cut
falls inside a block of equal values the official pick can differ from ours by which of the
equal-probability patches it took (the parity report measures that by IoU).

How many patches each step takes from each scale depends only on the settings and the
geometry, not on the probabilities: every step takes the per-step budget, except the last step
of a token target (NUM_TOKEN_LOOK_CLOSE), which splits its target in proportion to the budget by
the official `num_select_token` rule: each scale floor(budget_s * target / sum(budget)), and the
last scale the rest, so a target of N patches gives N (upstream PS3; `BudgetRule`). Then a scale
with fewer patches left than its share gives the rest to the next scale (the official spill).
ps3-torch 0.1.3 floors the last scale too (N=4500 on 4K gives 4499); `resolve` takes that rule
as `rule=BudgetRule.FLOOR_EACH_SCALE`, which only parity uses, to match an installed reference
that has it. So the settings are resolved once, by `resolve`, into a `Schedule` (the budget and
counts[t][s]); a pass resolves once, and every image's `plan` (and the device-resident fast
path, runtime/fast.py) cuts its rankings by the same schedule.

The settings are the five environment variables of the VILA-HD README; command-line flags
override them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .. import defaults
from ..errors import Ps3EdgeError
from ..model.config import DEFAULT_BUDGET_RULE, BudgetRule, split_in_proportion, whole_number


# ------------------------------------------------------------------------------------------
# settings
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LookCloseSettings:
    num_look_close: int | str | None = None       # steps, or "all"; None: the default (6)
    num_token_look_close: int | None = None       # total high-res patches; overrides steps
    select_num_each_scale: tuple[int, ...] | None = None   # per-step patches per scale
    mode: str = "after_prompt"                    # after_prompt (top-down) | after_image (bottom-up)
    smooth_selection_prob: bool = False


def parse_num_look_close(value) -> int | str | None:
    if value is None or value == "":
        return None
    if isinstance(value, str) and value.strip().lower() == "all":
        return "all"
    try:
        return whole_number(value)
    except ValueError:
        raise Ps3EdgeError(f"NUM_LOOK_CLOSE must be a whole number or 'all', got '{value}'") from None


def parse_num_token_look_close(value) -> int | None:
    if value is None or value == "" or str(value).lower() == "none":
        return None
    try:
        return whole_number(value)
    except ValueError:
        raise Ps3EdgeError(f"NUM_TOKEN_LOOK_CLOSE must be a whole number, got '{value}'") from None


def parse_select_num_each_scale(value) -> tuple[int, ...] | None:
    if value is None or value == "":
        return None
    parts = value if isinstance(value, (tuple, list)) else str(value).split("+")
    try:
        return tuple(whole_number(part) for part in parts)
    except ValueError:
        raise Ps3EdgeError(f"SELECT_NUM_EACH_SCALE must look like 512+2048, got '{value}'") from None


def parse_bool(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise Ps3EdgeError(f"{name} must be true or false, got '{value}'")


def settings_from_env(env=None, **overrides) -> LookCloseSettings:
    """The VILA-HD environment variables as defaults; keyword arguments that are not None win.

    A step count given as a keyword replaces a token count from the environment too (a token
    count, wherever it comes from, would otherwise take precedence over any step count).
    """
    env = os.environ if env is None else env
    smooth = lambda v: parse_bool(defaults.ENV_SMOOTH_SELECTION_PROB, v)                  # noqa: E731
    # setting -> (its environment variable, the parser of a value, the value when neither is given;
    # an empty variable counts as unset)
    sources = {
        "num_look_close": (defaults.ENV_NUM_LOOK_CLOSE, parse_num_look_close, None),
        "num_token_look_close": (defaults.ENV_NUM_TOKEN_LOOK_CLOSE, parse_num_token_look_close, None),
        "select_num_each_scale": (defaults.ENV_SELECT_NUM_EACH_SCALE, parse_select_num_each_scale, None),
        "mode": (defaults.ENV_LOOK_CLOSE_MODE, lambda v: v, "after_prompt"),
        "smooth_selection_prob": (defaults.ENV_SMOOTH_SELECTION_PROB, smooth, False),
    }
    flags = {key: value for key, value in overrides.items() if value is not None}
    values = {}
    for key, (name, parse, unset) in sources.items():
        if key in flags:                 # a flag wins; its environment variable is not even read
            values[key] = parse(flags[key])
        elif key == "num_token_look_close" and "num_look_close" in flags:
            values[key] = None
        else:
            values[key] = parse(env[name]) if env.get(name) else unset
    if values["mode"] not in defaults.LOOK_CLOSE_MODES:
        raise Ps3EdgeError(f"LOOK_CLOSE_MODE must be one of {', '.join(defaults.LOOK_CLOSE_MODES)}, "
                           f"got '{values['mode']}'")
    return LookCloseSettings(**values)


# ------------------------------------------------------------------------------------------
# the plan
# ------------------------------------------------------------------------------------------

@dataclass
class Geometry:
    """What planning needs to know about the model (read from the manifest or a PS3Config)."""
    lowres_grid: int                          # 27
    highres_grids: tuple[int, ...]            # (54, 108) or (54, 108, 270)
    select_num_each_scale: tuple[int, ...]    # the model's per-step budget
    max_tokens_per_call: int = defaults.MAX_TOKENS_PER_HIGHRES_CALL
    default_num_look_close: int | None = None  # the artifact's steps when none are asked for

    @classmethod
    def of(cls, cfg) -> "Geometry":
        """A PS3Config's geometry, with its own per-step budget."""
        return cls(lowres_grid=cfg.lowres_grid, highres_grids=cfg.highres_grids,
                   select_num_each_scale=cfg.select_num_each_scale)

    @property
    def patches_each_scale(self) -> tuple[int, ...]:
        return tuple(g * g for g in self.highres_grids)

    @property
    def scale_offsets(self) -> tuple[int, ...]:
        """Global index of each scale's first patch (scale-major raster order)."""
        return tuple(int(x) for x in np.cumsum((0,) + self.patches_each_scale[:-1]))


@dataclass
class Plan:
    steps: list[list[np.ndarray]]             # steps[t][s]: local raster indices at scale s
    selection_maps: list[np.ndarray]          # per scale, (g_s, g_s) uint8, all steps together
    scale_probs: list[np.ndarray] = field(default_factory=list)   # per scale, the ranked map
    budget: tuple[int, ...] = ()

    def step_positions(self, geometry: Geometry, t: int) -> np.ndarray:
        """Global patch indices of step t, scale-major (order inside a step does not matter)."""
        return np.concatenate([idx + off for idx, off in zip(self.steps[t], geometry.scale_offsets)]
                              ).astype(np.int32)

    def step_maps(self, geometry: Geometry) -> list[list[np.ndarray]]:
        """steps[t] as (g_s, g_s) uint8 maps, one per scale."""
        maps = []
        for step in self.steps:
            per_scale = []
            for idx, g in zip(step, geometry.highres_grids):
                m = np.zeros(g * g, dtype=np.uint8)
                m[idx] = 1
                per_scale.append(m.reshape(g, g))
            maps.append(per_scale)
        return maps

    def tokens_each_scale(self) -> list[int]:
        return [int(m.sum()) for m in self.selection_maps]

    @property
    def num_tokens(self) -> int:
        return sum(self.tokens_each_scale())


def resolve_steps(settings: LookCloseSettings, geometry: Geometry) -> tuple[tuple[int, ...], list[int | None]]:
    """Validate the settings; return the per-step budget and, per step, its token target.

    A token target of None means the full budget; an int means the official
    `num_select_token` rule (the target split in proportion to the budget, `resolve`'s `rule`).
    """
    budget = geometry.select_num_each_scale
    if settings.select_num_each_scale is not None:
        budget = tuple(settings.select_num_each_scale)
        n_scales = len(geometry.highres_grids)
        if len(budget) != n_scales:
            example = "+".join(str(b) for b in geometry.select_num_each_scale)
            raise Ps3EdgeError(f"SELECT_NUM_EACH_SCALE needs {n_scales} parts for this model "
                               f"(e.g. {example}), got {len(budget)}")
        if any(b < 0 for b in budget) or sum(budget) == 0:
            raise Ps3EdgeError(f"SELECT_NUM_EACH_SCALE parts must be >= 0 and not all 0, got {budget}")
    per_step = sum(budget)
    if per_step > geometry.max_tokens_per_call:
        raise Ps3EdgeError(f"SELECT_NUM_EACH_SCALE sums to {per_step}; one look-close step takes at most "
                           f"{geometry.max_tokens_per_call} patches")
    total = sum(geometry.patches_each_scale)
    max_steps = math.ceil(total / per_step)

    if settings.num_token_look_close is not None:
        n = settings.num_token_look_close
        if not 1 <= n <= total:
            raise Ps3EdgeError(f"NUM_TOKEN_LOOK_CLOSE must be between 1 and {total} for this model, got {n}")
        steps = math.ceil(n / per_step)
        # the official code: full steps, then the rest through the num_select_token rule
        return budget, [None] * (steps - 1) + [n % per_step or per_step]

    # unset: the artifact's default; without one VILA-HD's, or every step a model with fewer
    # high-res patches has
    nlc = settings.num_look_close
    if nlc is None:
        nlc = geometry.default_num_look_close or min(defaults.DEFAULT_NUM_LOOK_CLOSE, max_steps)
    if nlc == "all":
        steps = max_steps
    else:
        if not 1 <= nlc <= max_steps:
            raise Ps3EdgeError(f"NUM_LOOK_CLOSE must be between 1 and {max_steps} for this model "
                               f"(or 'all'), got {nlc}")
        steps = nlc
    return budget, [None] * steps


def scale_probability_maps(prob: np.ndarray, geometry: Geometry, smooth: bool) -> list[np.ndarray]:
    """The (G0,G0) map copied to each scale's grid (nearest), optionally smoothed on a 6x6 grid.

    Done with the same torch operations as the official code so that the values - and hence
    the ranking - are bit-identical.
    """
    p = torch.from_numpy(np.ascontiguousarray(prob, dtype=np.float32))[None, None]   # (1,1,G0,G0)
    maps = []
    for g in geometry.highres_grids:
        m = F.interpolate(p, size=(g, g), mode="nearest")                            # (1,1,g,g)
        if smooth:
            grid = defaults.SMOOTH_SELECTION_GRID
            m = F.interpolate(F.interpolate(m, size=(grid, grid), mode="area"), size=(g, g), mode="nearest")
        maps.append(m[0, 0].numpy())
    return maps


@dataclass(frozen=True)
class Schedule:
    """Settings resolved against a geometry: what every plan of a pass cuts its rankings by."""
    budget: tuple[int, ...]                   # per-step patches per scale
    targets: tuple[int, ...]                  # per step, the patches asked for (sum(budget) when full)
    counts: tuple[tuple[int, ...], ...]       # counts[t][s]: patches step t takes from scale s
    smooth: bool = False                      # the probability map smoothed on a 6x6 grid first

    @property
    def steps(self) -> int:
        return len(self.counts)

    @property
    def patches_asked(self) -> int:
        """The high-res patches the settings ask for (VILA-HD's context rule counts these)."""
        return sum(self.targets)


def resolve(settings: LookCloseSettings, geometry: Geometry,
            rule: BudgetRule | str = DEFAULT_BUDGET_RULE) -> Schedule:
    """The settings, validated (`resolve_steps`), as each step's counts per scale with the spill.

    rule: how a token target is split over the scales; upstream's remainder-to-last unless parity
    asks for the installed reference's (reference.py `reference_budget_rules`)."""
    budget, targets = resolve_steps(settings, geometry)
    per_step = sum(budget)
    left = list(geometry.patches_each_scale)         # patches not yet taken, per scale
    schedule = []
    for target in targets:
        counts = list(budget) if target is None else list(split_in_proportion(target, budget, rule))
        for s in range(len(counts)):
            if left[s] < counts[s]:
                if s + 1 < len(counts):
                    counts[s + 1] += counts[s] - left[s]
                counts[s] = left[s]
        for s, k in enumerate(counts):
            left[s] -= k
        schedule.append(tuple(counts))
    return Schedule(budget=tuple(budget), targets=tuple(per_step if t is None else t for t in targets),
                    counts=tuple(schedule), smooth=settings.smooth_selection_prob)


def step_counts(settings: LookCloseSettings, geometry: Geometry,
                rule: BudgetRule | str = DEFAULT_BUDGET_RULE) -> list[list[int]]:
    """counts[t][s]: how many patches step t takes from scale s (`resolve`'s counts, as lists)."""
    return [list(counts) for counts in resolve(settings, geometry, rule).counts]


def plan(prob: np.ndarray, schedule: Schedule, geometry: Geometry) -> Plan:
    """Turn the (G0,G0) probability map into per-step patch lists, cut as `schedule` says."""
    scale_probs = scale_probability_maps(prob, geometry, schedule.smooth)
    # One ranking per scale: descending probability, ties -> lower raster index (stable sort).
    rankings = [np.argsort(-m.reshape(-1), kind="stable") for m in scale_probs]
    taken = [0] * len(rankings)                      # how far down each ranking we are
    steps = []
    for counts in schedule.counts:
        step = []
        for s, k in enumerate(counts):
            step.append(rankings[s][taken[s]: taken[s] + k])
            taken[s] += k
        steps.append(step)

    maps = []
    for s, g in enumerate(geometry.highres_grids):
        m = np.zeros(g * g, dtype=np.uint8)
        m[rankings[s][: taken[s]]] = 1
        maps.append(m.reshape(g, g))
    return Plan(steps=steps, selection_maps=maps, scale_probs=scale_probs, budget=schedule.budget)


def plan_from_steps(step_positions: list[np.ndarray], prob: np.ndarray, schedule: Schedule,
                    geometry: Geometry) -> Plan:
    """The Plan of a run whose steps were chosen elsewhere (the device-resident fast path):
    step_positions[t] holds step t's global patch indices, scale-major, as `schedule` counts them."""
    if len(step_positions) != schedule.steps:
        raise ValueError(f"{len(step_positions)} steps given, the settings make {schedule.steps}")
    steps = []
    maps = [np.zeros(g * g, dtype=np.uint8) for g in geometry.highres_grids]
    for positions, counts in zip(step_positions, schedule.counts):
        positions = np.asarray(positions, dtype=np.int64)
        if len(positions) != sum(counts):
            raise ValueError(f"a step holds {len(positions)} patches, the settings say {sum(counts)}")
        step, start = [], 0
        for s, k in enumerate(counts):
            local = positions[start: start + k] - geometry.scale_offsets[s]
            start += k
            step.append(local)
            maps[s][local] = 1
        steps.append(step)
    maps = [m.reshape(g, g) for m, g in zip(maps, geometry.highres_grids)]
    scale_probs = scale_probability_maps(prob, geometry, schedule.smooth)
    return Plan(steps=steps, selection_maps=maps, scale_probs=scale_probs, budget=schedule.budget)
