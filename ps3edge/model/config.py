"""PS3 architecture description (`PS3Config`) and the named presets.

A config says everything needed to build the network and to plan look-close: trunk sizes,
scales, which low-res layers feed the selector, the ShallowConvNet sizes, the per-step budget
per high-res scale and the image normalisation. Presets are the real PS3-1.5K / PS3-4K
architectures and two tiny ones with the same geometry for tests and the demo.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from dataclasses import dataclass, field

from .. import defaults
from ..errors import Ps3EdgeError


@dataclass(frozen=True)
class PS3Config:
    name: str
    width: int                      # C, channels of every trunk token
    depth: int                      # number of transformer blocks
    num_heads: int                  # attention heads; head_dim = width // num_heads
    mlp_dim: int                    # hidden size of each block's MLP
    scales: tuple[int, ...]         # image sizes; scales[0] is the low-res pass
    select_layers: tuple[int, ...]  # low-res blocks whose outputs feed the selector
    select_num_each_scale: tuple[int, ...]  # patches per look-close step per high-res scale
    conv_hidden: int = 512          # ShallowConvNet width
    conv_out: int = 512             # ShallowConvNet output channels
    conv_depth: int = 3             # ConvNeXt blocks in the ShallowConvNet
    conv_kernel: int = 28           # ShallowConvNet stem kernel = stride
    patch_size: int = defaults.PATCH_SIZE
    ln_eps: float = 1e-6
    image_mean: tuple[float, float, float] = defaults.SNAPSHOT_MEAN
    image_std: tuple[float, float, float] = defaults.SNAPSHOT_STD
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    # --- derived geometry ----------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def max_size(self) -> int:
        return self.scales[-1]

    @property
    def grids(self) -> tuple[int, ...]:
        """Patches per side at every scale, e.g. (27, 54, 108) for 1.5K."""
        return tuple(s // self.patch_size for s in self.scales)

    @property
    def lowres_grid(self) -> int:
        return self.grids[0]

    @property
    def lowres_tokens(self) -> int:
        return self.lowres_grid ** 2

    @property
    def highres_grids(self) -> tuple[int, ...]:
        return self.grids[1:]

    @property
    def highres_patches_each_scale(self) -> tuple[int, ...]:
        return tuple(g * g for g in self.highres_grids)

    @property
    def highres_patches_total(self) -> int:
        return sum(self.highres_patches_each_scale)

    @property
    def patch_dim(self) -> int:
        return 3 * self.patch_size * self.patch_size

    @property
    def conv_grid(self) -> int:
        return defaults.SELECTOR_CONV_INPUT_SIZE // self.conv_kernel

    @property
    def tokens_per_step(self) -> int:
        return sum(self.select_num_each_scale)

    @property
    def max_look_close(self) -> int:
        """Look-close steps that NUM_LOOK_CLOSE='all' takes with the default per-step budget."""
        return math.ceil(self.highres_patches_total / self.tokens_per_step)

    def validate(self) -> "PS3Config":
        problems = self._value_problems()
        if not problems:                    # the geometry checks below divide by these values
            problems = self._geometry_problems()
        if problems:
            raise Ps3EdgeError(f"invalid PS3 config '{self.name}': " + "; ".join(problems))
        return self

    def _value_problems(self) -> list[str]:
        """Every field of the right type and sign: a JSON file can hold anything."""
        problems = []
        if not isinstance(self.name, str):
            problems.append(f"name must be a string, got {self.name!r}")
        for key in ("width", "depth", "num_heads", "mlp_dim", "conv_hidden", "conv_out", "conv_depth",
                    "conv_kernel", "patch_size"):
            value = getattr(self, key)
            if not is_whole_number(value) or value < 1:
                problems.append(f"{key} must be a positive whole number, got {value!r}")
        for key, least in (("scales", 1), ("select_layers", 0), ("select_num_each_scale", 0)):
            value = getattr(self, key)
            if not isinstance(value, tuple) or not all(is_whole_number(v) and v >= least for v in value):
                kind = "positive whole numbers" if least else "whole numbers >= 0"
                problems.append(f"{key} must be a list of {kind}, got {_shown(value)}")
        if not is_finite_number(self.ln_eps) or self.ln_eps <= 0:
            problems.append(f"ln_eps must be a number above 0, got {self.ln_eps!r}")
        for key in ("image_mean", "image_std"):
            value = getattr(self, key)
            if not isinstance(value, tuple) or len(value) != 3 or not all(is_finite_number(v) for v in value):
                problems.append(f"{key} must be 3 finite numbers, got {_shown(value)}")
            elif key == "image_std" and min(value) <= 0:
                problems.append(f"image_std must be above 0 (it divides the pixels), got {_shown(value)}")
        return problems

    def _geometry_problems(self) -> list[str]:
        problems = []
        if self.width % self.num_heads:
            problems.append(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if len(self.scales) < 2 or list(self.scales) != sorted(set(self.scales)):
            problems.append(f"scales must be at least two sizes in increasing order, got {list(self.scales)}")
        if any(s % self.patch_size for s in self.scales):
            problems.append(f"every scale must be a multiple of the patch size {self.patch_size}: {list(self.scales)}")
        if self.scales and self.scales[0] != defaults.LOWRES_SIZE:
            problems.append(f"the low-res scale must be {defaults.LOWRES_SIZE}, got {self.scales[0]}")
        if len(self.select_num_each_scale) != len(self.scales) - 1:
            problems.append(f"select_num_each_scale needs one entry per high-res scale "
                            f"({len(self.scales) - 1}), got {list(self.select_num_each_scale)}")
        if not 1 <= self.tokens_per_step <= defaults.MAX_TOKENS_PER_HIGHRES_CALL:
            problems.append(f"select_num_each_scale must sum to 1..{defaults.MAX_TOKENS_PER_HIGHRES_CALL} "
                            f"patches per look-close step, got {list(self.select_num_each_scale)}")
        if not self.select_layers or any(not 0 <= l < self.depth for l in self.select_layers):
            problems.append(f"select_layers {list(self.select_layers)} must be one or more of 0..{self.depth - 1}")
        if not problems and self.conv_grid // 2 != self.lowres_grid:
            # the selector max-pools the ShallowConvNet's grid 2 x 2 onto the low-res grid
            problems.append(f"conv_kernel {self.conv_kernel} gives a {self.conv_grid} x {self.conv_grid} selector "
                            f"grid; it must be {2 * self.lowres_grid} x {2 * self.lowres_grid}, twice the "
                            f"low-res grid")
        return problems

    def replace(self, **changes) -> "PS3Config":
        return dataclasses.replace(self, **changes).validate()

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("extra")
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PS3Config":
        if not isinstance(d, dict):
            raise Ps3EdgeError(f"a PS3 config must be an object, got {type(d).__name__}")
        fields = dataclasses.fields(cls)
        missing = [f.name for f in fields
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in d]
        if missing:
            raise Ps3EdgeError(f"a PS3 config needs {', '.join(missing)}")
        known = {f.name for f in fields} - {"extra"}
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known}
        return cls(**kwargs).validate()


_WHOLE_NUMBER = re.compile(r"[+-]?[0-9]+")


def whole_number(value) -> int:
    """An int, or the text of one in ASCII digits; ValueError otherwise. Python's int() would also
    take '1_0' (10), full-width or other Unicode digits, and truncate 4.9: all refused here."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _WHOLE_NUMBER.fullmatch(value.strip()):
        return int(value.strip())
    raise ValueError(value)


def is_whole_number(value) -> bool:
    """An int from JSON or a caller, not a bool (which Python counts as an int)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _shown(value) -> str:
    return repr(list(value) if isinstance(value, tuple) else value)


class BudgetRule(str, enum.Enum):
    """How a whole number of patches is split over the high-res scales in proportion to weights
    (the per-step budget by pixel count, a NUM_TOKEN_LOOK_CLOSE step by the per-step budget)."""
    # every share floored: up to one patch per scale but the last is lost (ps3-torch 0.1.3)
    FLOOR_EACH_SCALE = "floor-each-scale"
    # every share floored but the last, which takes the rest: N asked is N given (upstream PS3)
    REMAINDER_TO_LAST = "remainder-to-last"


DEFAULT_BUDGET_RULE = BudgetRule(defaults.DEFAULT_BUDGET_RULE)


def split_in_proportion(total: int, weights, rule: BudgetRule | str = DEFAULT_BUDGET_RULE) -> tuple[int, ...]:
    """`total` split over `weights` as the official code computes it, int(total * w / sum(weights))
    per scale, and under REMAINDER_TO_LAST the last scale given what the floors leave."""
    rule = BudgetRule(rule)
    whole = sum(weights) or 1               # all weights 0: nothing to share (callers refuse such budgets)
    shares = [int(total * w / whole) for w in weights]
    if rule is BudgetRule.REMAINDER_TO_LAST and shares:
        shares[-1] += total - sum(shares)
    return tuple(shares)


def default_select_num_each_scale(scales, max_select_num: int,
                                  rule: BudgetRule | str = DEFAULT_BUDGET_RULE) -> tuple[int, ...]:
    """The official rule for a config that gives only `max_select_num`: the per-step budget split
    in proportion to each high-res scale's pixel count (4K, 2560: 85 + 341 + 2134)."""
    pixels = [s * s for s in scales]
    return split_in_proportion(max_select_num, pixels[1:], rule)


_SCALES_15K = (378, 756, 1512)
_SCALES_4K = (378, 756, 1512, 3780)

PRESETS: dict[str, PS3Config] = {
    "ps3-1.5k": PS3Config(
        name="ps3-1.5k", width=1152, depth=27, num_heads=16, mlp_dim=4304,
        scales=_SCALES_15K, select_layers=(0, 9, 18, 26), select_num_each_scale=(512, 2048)),
    "ps3-4k": PS3Config(
        name="ps3-4k", width=1152, depth=27, num_heads=16, mlp_dim=4304,
        scales=_SCALES_4K, select_layers=(0, 9, 18, 26), select_num_each_scale=(85, 341, 2134)),
    "ps3-tiny": PS3Config(
        name="ps3-tiny", width=64, depth=4, num_heads=4, mlp_dim=256,
        scales=_SCALES_15K, select_layers=(0, 1, 2, 3), select_num_each_scale=(512, 2048),
        conv_hidden=32, conv_out=32, conv_depth=1),
    "ps3-tiny-4k": PS3Config(
        name="ps3-tiny-4k", width=64, depth=4, num_heads=4, mlp_dim=256,
        scales=_SCALES_4K, select_layers=(0, 1, 2, 3), select_num_each_scale=(85, 341, 2134),
        conv_hidden=32, conv_out=32, conv_depth=1),
}


def preset(name: str) -> PS3Config:
    try:
        return PRESETS[name].validate()
    except KeyError:
        raise Ps3EdgeError(f"unknown preset '{name}'; choose one of: {', '.join(PRESETS)}") from None
