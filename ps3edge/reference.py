"""The official implementation (`ps3-torch`) as the parity reference.

Builds the official `PS3VisionModel` with exactly the architecture and weights of one of our
`PS3` models, runs it with the look-close settings of the VILA-HD README, and returns what our
runtime returns (features of one layer, prob map, cumulative selection maps), so the two can be
compared number for number. Needs the `dev` extra (ps3-torch, timm 1.0.15, torchvision).

Which budget rule the installed reference follows (ps3-torch 0.1.3 floors every scale's share,
upstream PS3 gives the last scale the rest) is found by running its own code on a small probe
(`reference_budget_rules`), so that parity plans ours by the same rule.
"""

from __future__ import annotations

import contextlib
import math
import types
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .errors import Ps3EdgeError
from .model.config import BudgetRule, preset, split_in_proportion
from .model.ps3 import PS3


def _import_official():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import timm  # noqa: F401
            import ps3    # noqa: F401
            from ps3 import modeling_ps3
            from ps3.configuration_ps3 import PS3VisionConfig
            from ps3.image_processing_ps3 import PS3ImageProcessor
    except Exception as e:  # ImportError, or timm's incompatibility errors at import time
        raise Ps3EdgeError(
            f"the official reference (ps3-torch) is not usable here ({type(e).__name__}: {e}); "
            "install it with: pip install -e '.[dev]'") from None
    return modeling_ps3, PS3VisionConfig, PS3ImageProcessor


@contextlib.contextmanager
def _trunk_factory(cfg):
    """Make timm.create_model return a SigLIP ViT of our sizes (official code names a timm model)."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    real = timm.create_model

    def create(model_name, pretrained=False, **kwargs):
        kwargs.pop("pretrained", None)
        return VisionTransformer(
            img_size=cfg.scales[0], patch_size=cfg.patch_size, embed_dim=cfg.width, depth=cfg.depth,
            num_heads=cfg.num_heads, mlp_ratio=(cfg.mlp_dim + 0.5) / cfg.width, class_token=False,
            **{**kwargs, "global_pool": "map"})

    timm.create_model = create
    try:
        yield
    finally:
        timm.create_model = real


# VILA-HD's PS3 encoder wrapper sets `vision_model.num_hidden_layers_to_return = 2` (so do the PS3
# README's examples): the official forward then keeps, and merges across look-close steps, the
# hidden states of the last two blocks only; its default keeps every block's.
VILA_HD_LAYERS_TO_RETURN = 2


@dataclass(frozen=True)
class ReferenceRules:
    """How the installed reference splits a patch count over the high-res scales, found by
    running its own code: the per-step budget of a config that gives only `max_select_num`
    (`PS3VisionEncoder.__init__`), and a NUM_TOKEN_LOOK_CLOSE step's target
    (`get_selection_maps`' `num_select_token`)."""
    per_step: BudgetRule
    tokens: BudgetRule
    version: str                       # the installed ps3-torch, named in the report only

    def describe(self) -> str:
        if self.per_step is self.tokens:
            rule = self.tokens.value
        else:
            rule = f"per-step budget {self.per_step.value}, token count {self.tokens.value}"
        return f"{rule} (ps3-torch {self.version})"


# The probes, where the two rules differ. A token count: 2 patches over a budget of 1 + 2 are
# 0 + 1 floored, 0 + 2 with the remainder to the last scale. A per-step budget: 3 patches over
# scales 756 and 1512 (pixels 1 : 4) are 0 + 2 floored, 0 + 3 with the remainder.
_TOKEN_PROBE = ((1, 2), 2)
_STEP_PROBE_SCALES, _STEP_PROBE_BUDGET = (378, 756, 1512), 3


def reference_budget_rules() -> ReferenceRules:
    """The budget rules of the installed ps3-torch, by behaviour (its version string is not trusted
    to say: a patched or newer release may split either way)."""
    modeling_ps3, PS3VisionConfig, _ = _import_official()
    from importlib.metadata import PackageNotFoundError, version
    try:
        installed = version("ps3-torch")
    except PackageNotFoundError:
        installed = "unknown version"
    try:
        weights, total = _TOKEN_PROBE
        stand_in = types.SimpleNamespace(max_select_num_each_scale=list(weights), ps3_scales=list(_STEP_PROBE_SCALES))
        probs = [torch.arange(4, dtype=torch.float32).reshape(1, 2, 2) / 4 for _ in weights]
        with torch.no_grad():
            maps = modeling_ps3.PS3VisionEncoder.get_selection_maps(stand_in, probs, num_select_token=total)
        tokens = [int(m.sum()) for m in maps]
        probe = preset("ps3-tiny").replace(width=8, num_heads=1, depth=1, mlp_dim=8, select_layers=(0,))
        vcfg = PS3VisionConfig(
            model_name="ps3edge-budget-probe", hidden_size=probe.width, pool="map",
            ps3_scales=list(_STEP_PROBE_SCALES), select_based_on_layer=[0], max_select_num=_STEP_PROBE_BUDGET,
            max_select_num_each_scale=None, separate_pos_emb=False, highres_selection_feature=False)
        with warnings.catch_warnings(), _trunk_factory(probe):
            warnings.simplefilter("ignore")
            per_step = [int(n) for n in modeling_ps3.PS3VisionEncoder(vcfg).max_select_num_each_scale]
    except Exception as e:         # the reference's internals changed: say so rather than guess a rule
        raise Ps3EdgeError(f"cannot tell how the installed ps3-torch {installed} splits a budget over the "
                           f"scales ({type(e).__name__}: {e})") from None
    pixels = [s * s for s in _STEP_PROBE_SCALES[1:]]
    return ReferenceRules(per_step=_rule_of(per_step, pixels, _STEP_PROBE_BUDGET, "a per-step budget", installed),
                          tokens=_rule_of(tokens, weights, total, "a token count", installed), version=installed)


def _rule_of(counts, weights, total, what: str, installed: str) -> BudgetRule:
    for rule in BudgetRule:
        if tuple(counts) == split_in_proportion(total, weights, rule):
            return rule
    known = ", ".join(f"{r.value} {list(split_in_proportion(total, weights, r))}" for r in BudgetRule)
    raise Ps3EdgeError(f"the installed ps3-torch {installed} splits {what} of {total} over weights {list(weights)} "
                       f"as {list(counts)}, which is no rule ps3edge knows ({known})")


def official_model(model: PS3, layers_to_return: int | None = None):
    """The official PS3VisionModel with `model`'s architecture and weights (fp32, eval).

    layers_to_return: how many of the last blocks' hidden states its forward returns
    (`vision_model.num_hidden_layers_to_return`); None keeps the official default, every block.
    VILA-HD runs it with VILA_HD_LAYERS_TO_RETURN; `hidden_states[-2]` is the same either way."""
    modeling_ps3, PS3VisionConfig, _ = _import_official()
    cfg = model.cfg
    vcfg = PS3VisionConfig(
        model_name="ps3edge-reference", hidden_size=cfg.width, pool="map",
        ps3_scales=list(cfg.scales), select_based_on_layer=list(cfg.select_layers),
        max_select_num=cfg.tokens_per_step, max_select_num_each_scale=list(cfg.select_num_each_scale),
        highres_selection_module_hidden_dim=cfg.conv_hidden,
        highres_selection_module_out_dim=cfg.conv_out,
        highres_selection_module_depth=cfg.conv_depth,
        highres_selection_module_kernel_size=cfg.conv_kernel)
    with warnings.catch_warnings(), _trunk_factory(cfg):
        warnings.simplefilter("ignore")
        official = modeling_ps3.PS3VisionModel(vcfg)
    result = official.vision_model.load_state_dict(model.state_dict(), strict=False)
    stray = [k for k in result.missing_keys if not k.startswith(("trunk.attn_pool.", "trunk.norm."))]
    if stray or result.unexpected_keys:
        raise Ps3EdgeError(f"internal: weights do not map onto the official model "
                           f"(missing {stray[:5]}, unexpected {result.unexpected_keys[:5]})")
    if layers_to_return is not None:
        official.vision_model.num_hidden_layers_to_return = layers_to_return
    return official.eval()


@contextlib.contextmanager
def layers_returned(official, count: int):
    """Run `official` returning the last `count` blocks' hidden states inside this context."""
    enc = official.vision_model
    saved = enc.num_hidden_layers_to_return
    enc.num_hidden_layers_to_return = count
    try:
        yield official
    finally:
        enc.num_hidden_layers_to_return = saved


def official_preprocess(image, cfg):
    """The official PS3ImageProcessor on a PIL image -> (1,3,S,S) float32."""
    _, _, PS3ImageProcessor = _import_official()
    proc = PS3ImageProcessor(image_size=cfg.max_size, mean=cfg.image_mean, std=cfg.image_std)
    return proc.preprocess(image)["pixel_values"][0][None].float()


@dataclass
class OfficialResult:
    features: np.ndarray              # (1, tokens, C) for the requested layer
    prob: np.ndarray                  # (G0, G0) selection probability (before smoothing)
    selection_maps: list[np.ndarray]  # per high-res scale, (g_s, g_s) uint8, cumulative


@contextlib.contextmanager
def stable_topk():
    """Pin torch.topk's choice among equal values to ps3edge's documented rule.

    The official selection calls `Tensor.topk`, whose pick among ties is implementation-defined.
    Inside this context it returns the first k of a stable descending sort: equal values go to
    the lower index. With it the official code's selection is reproducible, and must equal ours.
    """
    real = torch.Tensor.topk

    def topk(self, k, dim=-1, largest=True, sorted=True):
        values, indices = torch.sort(self, dim=dim, descending=largest, stable=True)
        return torch.return_types.topk((values.narrow(dim, 0, k), indices.narrow(dim, 0, k)))

    torch.Tensor.topk = topk
    try:
        yield
    finally:
        torch.Tensor.topk = real


def run_official(official, pixels: torch.Tensor, *, num_look_close=None, num_token_look_close=None,
                 select_num_each_scale=None, prompt=None, smooth_selection_prob=False,
                 layer: int = -2, tie_rule: str = "official") -> OfficialResult:
    """One official forward with VILA-HD's knobs. `pixels` is the preprocessed (1,3,S,S) input.

    tie_rule "official" runs the code as published; "stable" pins its top-k tie-breaking to ours.
    """
    enc = official.vision_model
    saved_budget = enc.max_select_num_each_scale
    if select_num_each_scale is not None:
        enc.max_select_num_each_scale = list(select_num_each_scale)   # what SELECT_NUM_EACH_SCALE sets
    ties = stable_topk() if tie_rule == "stable" else contextlib.nullcontext()
    try:
        with torch.no_grad(), warnings.catch_warnings(), ties:
            warnings.simplefilter("ignore")
            out = official(pixels, num_look_close=num_look_close, num_token_look_close=num_token_look_close,
                           prompt=prompt, smooth_selection_prob=smooth_selection_prob)
            # the prob map before smoothing, at the low-res grid (the scale maps are nearest copies)
            feature_map_probs = _unsmoothed_prob(official, pixels, prompt)
    except (AssertionError, RuntimeError, ValueError, IndexError) as e:   # the reference, not our code, gave up
        raise Ps3EdgeError(f"the official ps3-torch model fails on these settings or inputs "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no message'})") from None
    finally:
        enc.max_select_num_each_scale = saved_budget
    features = out.hidden_states[layer].float().numpy()
    maps = [m[0].numpy().astype(np.uint8) for m in out.selection_maps]
    return OfficialResult(features=features, prob=feature_map_probs, selection_maps=maps)


def _unsmoothed_prob(official, pixels, prompt) -> np.ndarray:
    enc = official.vision_model
    out = official(pixels, num_look_close=0, prompt=prompt, smooth_selection_prob=False)
    prob = out.selection_probs[0][0]                     # (g_1, g_1), nearest copy of (G0, G0)
    step = prob.shape[-1] // int(math.isqrt(enc.low_res_token_num))
    return prob[::step, ::step].float().numpy()


def run_official_with_selection(official, pixels: torch.Tensor, steps_maps, layer: int = -2) -> np.ndarray:
    """The official forward, but each look-close step takes the given patches.

    steps_maps[t][s] is a (g_s, g_s) 0/1 map of step t at high-res scale s (disjoint across
    steps). With the selection fixed, the official features can be compared token for token
    with ours in any precision, whatever each side's ranking ties would have picked.
    Returns the (tokens, C) features of `layer` as float32.
    """
    enc = official.vision_model
    queue = iter(steps_maps)

    def given_selection(select_probs, old_selection_maps=None, num_select_token=None,
                        only_select_first_n_scale=None):
        like = select_probs[0]
        return [torch.as_tensor(np.asarray(m), dtype=like.dtype, device=like.device)[None] for m in next(queue)]

    enc.get_selection_maps = given_selection          # instance attribute shadows the method
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = official(pixels, num_look_close=len(steps_maps))
    finally:
        del enc.get_selection_maps
    return out.hidden_states[layer][0].float().cpu().numpy()
