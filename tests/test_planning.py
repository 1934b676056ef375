"""Look-close settings and selection planning, checked against the official get_selection_maps."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ps3edge import defaults
from ps3edge.errors import Ps3EdgeError
from ps3edge.model import random_model
from ps3edge.model.config import preset
from ps3edge.reference import official_model, reference_budget_rules, stable_topk
from ps3edge.runtime.planning import (Geometry, LookCloseSettings, plan, resolve, resolve_steps,
                                      settings_from_env)


def geometry(name: str) -> Geometry:
    return Geometry.of(preset(name))


GEO_15K = geometry("ps3-tiny")
GEO_4K = geometry("ps3-tiny-4k")


# ------------------------------------------------------------------------------------------
# environment variables and flags
# ------------------------------------------------------------------------------------------

def test_no_environment_gives_the_defaults():
    s = settings_from_env({})
    assert s == LookCloseSettings(num_look_close=None, num_token_look_close=None, select_num_each_scale=None,
                                  mode="after_prompt", smooth_selection_prob=False)
    budget, targets = resolve_steps(s, GEO_15K)
    assert budget == (512, 2048)
    assert targets == [None] * defaults.DEFAULT_NUM_LOOK_CLOSE


@pytest.mark.parametrize("value, expected", [("1", 1), ("6", 6), (" 3 ", 3), ("all", "all"), ("ALL", "all"),
                                             (" All ", "all"), ("", None)])
def test_num_look_close_env(value, expected):
    assert settings_from_env({"NUM_LOOK_CLOSE": value}).num_look_close == expected


def test_num_token_look_close_env():
    assert settings_from_env({"NUM_TOKEN_LOOK_CLOSE": "3000"}).num_token_look_close == 3000
    assert settings_from_env({"NUM_TOKEN_LOOK_CLOSE": ""}).num_token_look_close is None


@pytest.mark.parametrize("value, expected", [("300+1000", (300, 1000)), ("40+200+1000", (40, 200, 1000)),
                                             ("512", (512,))])
def test_select_num_each_scale_env(value, expected):
    assert settings_from_env({"SELECT_NUM_EACH_SCALE": value}).select_num_each_scale == expected


@pytest.mark.parametrize("value", ["after_image", "after_prompt"])
def test_look_close_mode_env(value):
    assert settings_from_env({"LOOK_CLOSE_MODE": value}).mode == value


@pytest.mark.parametrize("value, expected", [("true", True), ("True", True), ("1", True), ("yes", True),
                                             ("false", False), ("FALSE", False), ("0", False), ("", False)])
def test_smooth_selection_prob_env(value, expected):
    assert settings_from_env({"SMOOTH_SELECTION_PROB": value}).smooth_selection_prob is expected


def test_all_five_variables_together():
    env = {"NUM_LOOK_CLOSE": "2", "NUM_TOKEN_LOOK_CLOSE": "3000", "SELECT_NUM_EACH_SCALE": "300+1000",
           "LOOK_CLOSE_MODE": "after_image", "SMOOTH_SELECTION_PROB": "true"}
    assert settings_from_env(env) == LookCloseSettings(
        num_look_close=2, num_token_look_close=3000, select_num_each_scale=(300, 1000),
        mode="after_image", smooth_selection_prob=True)


def test_flags_override_environment():
    env = {"NUM_LOOK_CLOSE": "5", "NUM_TOKEN_LOOK_CLOSE": "3000", "SELECT_NUM_EACH_SCALE": "300+1000",
           "LOOK_CLOSE_MODE": "after_image", "SMOOTH_SELECTION_PROB": "true"}
    s = settings_from_env(env, num_look_close="all", num_token_look_close=1000, select_num_each_scale="256+1024",
                          mode="after_prompt", smooth_selection_prob=False)
    assert s == LookCloseSettings(num_look_close="all", num_token_look_close=1000,
                                  select_num_each_scale=(256, 1024), mode="after_prompt",
                                  smooth_selection_prob=False)


def test_a_flag_makes_its_malformed_environment_variable_irrelevant():
    env = {"NUM_LOOK_CLOSE": "abc", "NUM_TOKEN_LOOK_CLOSE": "-4", "SELECT_NUM_EACH_SCALE": "x+y",
           "LOOK_CLOSE_MODE": "sideways", "SMOOTH_SELECTION_PROB": "maybe"}
    s = settings_from_env(env, num_look_close=2, select_num_each_scale="256+1024", mode="after_image",
                          smooth_selection_prob=True)
    assert s == LookCloseSettings(num_look_close=2, num_token_look_close=None, select_num_each_scale=(256, 1024),
                                  mode="after_image", smooth_selection_prob=True)
    with pytest.raises(Ps3EdgeError, match="NUM_LOOK_CLOSE"):       # without its flag, it is read and refused
        settings_from_env(env, select_num_each_scale="256+1024", mode="after_image", smooth_selection_prob=True)


def test_flags_left_unset_keep_the_environment():
    env = {"NUM_LOOK_CLOSE": "4", "SELECT_NUM_EACH_SCALE": "300+1000", "SMOOTH_SELECTION_PROB": "1"}
    s = settings_from_env(env, num_look_close=None, num_token_look_close=None, select_num_each_scale=None,
                          mode=None, smooth_selection_prob=None)
    assert (s.num_look_close, s.select_num_each_scale, s.smooth_selection_prob) == (4, (300, 1000), True)


def test_step_flag_beats_token_count_from_the_environment():
    """--num-look-close 2 with NUM_TOKEN_LOOK_CLOSE in the environment: the flag decides (2 full steps)."""
    s = settings_from_env({"NUM_TOKEN_LOOK_CLOSE": "3000"}, num_look_close=2)
    budget, targets = resolve_steps(s, GEO_15K)
    assert targets == [None, None]
    prob = np.random.default_rng(0).random((27, 27), dtype=np.float32)
    assert plan(prob, resolve(s, GEO_15K), GEO_15K).num_tokens == 5120


@pytest.mark.parametrize("value, expected", [("false", False), ("true", True), ("0", False), (True, True)])
def test_smooth_flag_given_as_text_is_parsed(value, expected):
    assert settings_from_env({}, smooth_selection_prob=value).smooth_selection_prob is expected


@pytest.mark.parametrize("env, message", [
    ({"NUM_LOOK_CLOSE": "many"}, "NUM_LOOK_CLOSE must be a whole number or 'all', got 'many'"),
    ({"NUM_LOOK_CLOSE": "2.5"}, "NUM_LOOK_CLOSE must be a whole number"),
    ({"NUM_TOKEN_LOOK_CLOSE": "lots"}, "NUM_TOKEN_LOOK_CLOSE must be a whole number, got 'lots'"),
    ({"NUM_TOKEN_LOOK_CLOSE": "1e3"}, "NUM_TOKEN_LOOK_CLOSE must be a whole number"),
    ({"SELECT_NUM_EACH_SCALE": "a+b"}, "SELECT_NUM_EACH_SCALE must look like 512\\+2048, got 'a\\+b'"),
    ({"SELECT_NUM_EACH_SCALE": "512,2048"}, "SELECT_NUM_EACH_SCALE must look like"),
    ({"SELECT_NUM_EACH_SCALE": "512+"}, "SELECT_NUM_EACH_SCALE must look like"),
    ({"LOOK_CLOSE_MODE": "sideways"}, "LOOK_CLOSE_MODE must be one of after_prompt, after_image, got 'sideways'"),
    ({"SMOOTH_SELECTION_PROB": "maybe"}, "SMOOTH_SELECTION_PROB must be true or false, got 'maybe'"),
])
def test_garbage_values_are_rejected(env, message):
    with pytest.raises(Ps3EdgeError, match=message):
        settings_from_env(env)


@pytest.mark.parametrize("geo, nlc, message", [
    (GEO_15K, 0, "NUM_LOOK_CLOSE must be between 1 and 6 for this model \\(or 'all'\\), got 0"),
    (GEO_15K, 7, "NUM_LOOK_CLOSE must be between 1 and 6 for this model \\(or 'all'\\), got 7"),
    (GEO_15K, -1, "NUM_LOOK_CLOSE must be between 1 and 6"),
    (GEO_4K, 36, "NUM_LOOK_CLOSE must be between 1 and 35 for this model \\(or 'all'\\), got 36"),
])
def test_num_look_close_out_of_range(geo, nlc, message):
    with pytest.raises(Ps3EdgeError, match=message):
        resolve_steps(settings_from_env({"NUM_LOOK_CLOSE": str(nlc)}), geo)


@pytest.mark.parametrize("geo, n, message", [
    (GEO_15K, 0, "NUM_TOKEN_LOOK_CLOSE must be between 1 and 14580 for this model, got 0"),
    (GEO_15K, 14581, "NUM_TOKEN_LOOK_CLOSE must be between 1 and 14580 for this model, got 14581"),
    (GEO_4K, 87481, "NUM_TOKEN_LOOK_CLOSE must be between 1 and 87480 for this model, got 87481"),
])
def test_num_token_look_close_out_of_range(geo, n, message):
    with pytest.raises(Ps3EdgeError, match=message):
        resolve_steps(settings_from_env({"NUM_TOKEN_LOOK_CLOSE": str(n)}), geo)


@pytest.mark.parametrize("geo, value, message", [
    (GEO_15K, "2560", "SELECT_NUM_EACH_SCALE needs 2 parts for this model \\(e.g. 512\\+2048\\), got 1"),
    (GEO_15K, "40+200+1000", "SELECT_NUM_EACH_SCALE needs 2 parts for this model \\(e.g. 512\\+2048\\), got 3"),
    (GEO_4K, "512+2048", "SELECT_NUM_EACH_SCALE needs 3 parts for this model \\(e.g. 85\\+341\\+2134\\), got 2"),
    (GEO_15K, "1000+2000", "SELECT_NUM_EACH_SCALE sums to 3000; one look-close step takes at most 2560"),
    (GEO_4K, "100+400+2061", "SELECT_NUM_EACH_SCALE sums to 2561"),
    (GEO_15K, "-5+100", "SELECT_NUM_EACH_SCALE parts must be >= 0 and not all 0"),
    (GEO_15K, "0+0", "SELECT_NUM_EACH_SCALE parts must be >= 0 and not all 0"),
])
def test_select_num_each_scale_rejected(geo, value, message):
    with pytest.raises(Ps3EdgeError, match=message):
        resolve_steps(settings_from_env({"SELECT_NUM_EACH_SCALE": value}), geo)


@pytest.mark.parametrize("geo, nlc", [(GEO_15K, 1), (GEO_15K, 6), (GEO_4K, 35)])
def test_range_limits_are_inclusive(geo, nlc):
    _, targets = resolve_steps(settings_from_env({}, num_look_close=nlc), geo)
    assert len(targets) == nlc
    total = sum(g * g for g in geo.highres_grids)
    _, targets = resolve_steps(settings_from_env({}, num_token_look_close=total), geo)
    assert len(targets) == math.ceil(total / 2560)


def test_custom_budget_changes_the_step_limit():
    # 1300 patches a step: ceil(14580 / 1300) = 12 steps cover the image
    s = settings_from_env({"SELECT_NUM_EACH_SCALE": "300+1000"}, num_look_close=12)
    assert len(resolve_steps(s, GEO_15K)[1]) == 12
    with pytest.raises(Ps3EdgeError, match="between 1 and 12"):
        resolve_steps(settings_from_env({"SELECT_NUM_EACH_SCALE": "300+1000"}, num_look_close=13), GEO_15K)


# ------------------------------------------------------------------------------------------
# step counts and sizes, computed by hand
# ------------------------------------------------------------------------------------------

def _step_sizes(p):
    return [[len(idx) for idx in step] for step in p.steps]


def test_all_steps_15k():
    # scale 54: 2916 = 5 x 512 + 356; scale 108: 11664 = 5 x 2048 + 1424. Step 6 lacks 156 at
    # scale 54 and spills them to scale 108, which has only 1424 left, so the step is 1780.
    p = plan(np.random.default_rng(1).random((27, 27), dtype=np.float32),
             resolve(settings_from_env({}, num_look_close="all"), GEO_15K), GEO_15K)
    assert _step_sizes(p) == [[512, 2048]] * 5 + [[356, 1424]]
    assert p.num_tokens == 14580
    assert all(m.all() for m in p.selection_maps)


def test_all_steps_4k():
    # 87480 / 2560 -> 35 steps; after 34 full steps 26 / 70 / 344 patches are left, and the
    # 59 + 330 that scales 54 and 108 cannot give spill down to scale 270.
    p = plan(np.random.default_rng(2).random((27, 27), dtype=np.float32),
             resolve(settings_from_env({}, num_look_close="all"), GEO_4K), GEO_4K)
    assert len(p.steps) == 35
    assert _step_sizes(p) == [[85, 341, 2134]] * 34 + [[26, 70, 344]]
    assert p.num_tokens == 87480
    assert all(m.all() for m in p.selection_maps)


@pytest.mark.parametrize("geo, settings, sizes", [
    # 1001 tokens: int(512*1001/2560) = 200, and the last scale the rest, 801 (upstream's rule)
    (GEO_15K, dict(num_token_look_close=1001), [[200, 801]]),
    # 3000 = 2560 + 440: int(512*440/2560) = 88, 440 - 88 = 352
    (GEO_15K, dict(num_token_look_close=3000), [[512, 2048], [88, 352]]),
    # 5120 = two full steps exactly: the last step takes a full budget, not 0
    (GEO_15K, dict(num_token_look_close=5120), [[512, 2048], [512, 2048]]),
    # 1300 a step; 3000 = 2 x 1300 + 400: int(300*400/1300) = 92, 400 - 92 = 308
    (GEO_15K, dict(num_token_look_close=3000, select_num_each_scale="300+1000"),
     [[300, 1000], [300, 1000], [92, 308]]),
    # 4K, 1000 tokens: 33.2 / 133.2 -> 33 + 133, and 1000 - 166 = 834
    (GEO_4K, dict(num_token_look_close=1000), [[33, 133, 834]]),
    # 1240 a step; 3000 = 2 x 1240 + 520: 16.8 / 83.9 -> 16 + 83, and 520 - 99 = 421
    (GEO_4K, dict(num_token_look_close=3000, select_num_each_scale="40+200+1000"),
     [[40, 200, 1000], [40, 200, 1000], [16, 83, 421]]),
    # scale 54 (2916) runs dry in step 2 and spills 2084 to scale 108
    (GEO_15K, dict(num_look_close=2, select_num_each_scale="2500+60"), [[2500, 60], [416, 2144]]),
])
def test_step_sizes(geo, settings, sizes):
    p = plan(np.random.default_rng(3).random((27, 27), dtype=np.float32),
             resolve(settings_from_env({}, **settings), geo), geo)
    assert _step_sizes(p) == sizes
    assert p.num_tokens == sum(map(sum, sizes))


def test_max_token_count_on_4k_leaves_patches_out():
    # NUM_TOKEN_LOOK_CLOSE = 87480 (everything): 34 full steps, then the last 440 split 14 / 58 /
    # 368 (upstream's rule; 366 floored) while 26 / 70 / 344 are left -> 416: the spill only runs to
    # the next scale, so 24 patches stay unselected, as in the official code (checked against it below).
    p = plan(np.random.default_rng(4).random((27, 27), dtype=np.float32),
             resolve(settings_from_env({}, num_token_look_close=87480), GEO_4K), GEO_4K)
    assert _step_sizes(p)[-1] == [14, 58, 344]
    assert p.num_tokens == 87480 - 24


def test_steps_partition_the_selection():
    p = plan(np.random.default_rng(5).random((27, 27), dtype=np.float32),
             resolve(settings_from_env({}, num_look_close=4), GEO_4K), GEO_4K)
    for s, g in enumerate(GEO_4K.highres_grids):
        idx = np.concatenate([step[s] for step in p.steps])
        assert len(np.unique(idx)) == len(idx)                      # no patch twice
        m = np.zeros(g * g, np.uint8)
        m[idx] = 1
        np.testing.assert_array_equal(m.reshape(g, g), p.selection_maps[s])
    pos = np.concatenate([p.step_positions(GEO_4K, t) for t in range(len(p.steps))])
    assert pos.dtype == np.int32 and len(np.unique(pos)) == len(pos) == p.num_tokens
    assert pos.min() >= 0 and pos.max() < 87480


def test_default_steps_are_capped_by_a_small_model():
    """A model with one high-res scale of 54 x 54 = 2916 patches and a 2560 budget has 2 steps:
    unset NUM_LOOK_CLOSE gives those 2, not an error about the default 6."""
    small = Geometry(lowres_grid=27, highres_grids=(54,), select_num_each_scale=(2560,))
    budget, targets = resolve_steps(settings_from_env({}), small)
    assert budget == (2560,) and targets == [None, None]
    with pytest.raises(Ps3EdgeError, match="between 1 and 2"):
        resolve_steps(settings_from_env({}, num_look_close=6), small)


@pytest.mark.parametrize("steps_per_call", [None, 2, 1])
def test_highres_feeds_group_steps_by_length(steps_per_call):
    """3 full steps of 2560 and a last one of the 920 left (upstream's rule; 918 floored): calls hold
    steps of one length, longest first, at most steps_per_call each; every step once, in order."""
    from ps3edge.runtime.batching import highres_feeds

    p = plan(np.random.default_rng(6).random((27, 27), dtype=np.float32),
             resolve(settings_from_env({}, num_token_look_close=3 * 2560 + 920), GEO_4K), GEO_4K)
    from ps3edge.model.patches import PatchTaps, gather_patches

    low = {"pixels": np.random.default_rng(7).random((1, 3, 3780, 3780), dtype=np.float32),
           "kv_cache": np.zeros((2, 1, 4, 729, 16), np.float32)}
    feeds = list(highres_feeds(p, low, GEO_4K, steps_per_call))
    shapes = [f["positions"].shape for f in feeds]
    assert shapes == {None: [(3, 2560), (1, 920)], 2: [(2, 2560), (1, 2560), (1, 920)],
                      1: [(1, 2560)] * 3 + [(1, 920)]}[steps_per_call]
    got = [row for f in feeds for row in f["positions"]]
    want = [p.step_positions(GEO_4K, t) for t in range(len(p.steps))]
    assert [r.tolist() for r in got] == [w.tolist() for w in want]     # steps in plan order
    for f in feeds:
        cut = gather_patches(low["pixels"], np.zeros(f["positions"].size, int), f["positions"].reshape(-1),
                             PatchTaps(3780, (756, 1512, 3780), 14), 512)
        np.testing.assert_array_equal(f["patches"], cut.reshape(*f["positions"].shape, -1))
        assert f["kv_cache"] is low["kv_cache"]


# ------------------------------------------------------------------------------------------
# the tie rule
# ------------------------------------------------------------------------------------------

def test_ties_go_to_the_lower_raster_index():
    prob = np.full((27, 27), 0.5, np.float32)
    prob[26, 26] = 0.9                        # one cell above the rest: its 2x2 / 4x4 copies first
    prob[0, 0] = 0.1                          # one cell below the rest: its copies last
    p = plan(prob, resolve(settings_from_env({}, num_look_close=1), GEO_15K), GEO_15K)
    first54 = [52 * 54 + 52, 52 * 54 + 53, 53 * 54 + 52, 53 * 54 + 53]
    rest54 = [i for i in range(54 * 54) if i not in first54 and i not in (0, 1, 54, 55)]
    np.testing.assert_array_equal(p.steps[0][0], first54 + rest54[: 512 - 4])
    first108 = [r * 108 + c for r in range(104, 108) for c in range(104, 108)]
    low108 = {r * 108 + c for r in range(4) for c in range(4)}
    rest108 = [i for i in range(108 * 108) if i not in first108 and i not in low108]
    np.testing.assert_array_equal(p.steps[0][1], first108 + rest108[: 2048 - 16])


def test_flat_map_selects_in_raster_order():
    p = plan(np.full((27, 27), 0.25, np.float32), resolve(settings_from_env({}, num_look_close=2), GEO_4K), GEO_4K)
    for s, b in enumerate((85, 341, 2134)):
        np.testing.assert_array_equal(p.steps[0][s], np.arange(b))
        np.testing.assert_array_equal(p.steps[1][s], np.arange(b, 2 * b))


# ------------------------------------------------------------------------------------------
# against the official PS3VisionEncoder.get_selection_maps / update_selection_maps, our plan split
# by the installed reference's budget rule (ps3-torch 0.1.3 floors every scale)
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference_rule():
    return reference_budget_rules().tokens


@pytest.fixture(scope="module")
def official_encoder():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = official_model(random_model(preset(name), seed=7)).vision_model
        return cache[name]

    return get


def official_prob_maps(enc, name, seed, prompt=False, smooth=False):
    """The official get_selection_probs on random selector inputs: per-scale (1,g,g) maps."""
    cfg = preset(name)
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(1, cfg.width * len(cfg.select_layers), 27, 27, generator=gen)
    conv = torch.randn(1, cfg.conv_out, 54, 54, generator=gen)
    p = torch.randn(1, cfg.width, generator=gen) if prompt else None
    with torch.no_grad():
        probs, _, _ = enc.get_selection_probs(torch.zeros(1, 3, 378, 378), feats, conv, prompt=p,
                                              smooth_selection_prob=smooth)
    return probs


def nearest_maps(prob27: np.ndarray, geo: Geometry):
    """A hand-made (27,27) map copied to every scale grid, as the official selector's last line does."""
    t = torch.from_numpy(prob27)[None, None]
    return [F.interpolate(t, size=(g, g), mode="nearest")[:, 0] for g in geo.highres_grids]


def official_selection(enc, probs, budget, num_look_close=None, num_token_look_close=None):
    """Drive the official selection step by step exactly as PS3VisionEncoder.forward does, with
    top-k ties pinned. Returns (maps of each step, cumulative maps), numpy (g,g) per scale."""
    saved = enc.max_select_num_each_scale
    enc.max_select_num_each_scale = list(budget)
    try:
        per_step = sum(enc.max_select_num_each_scale)
        total = enc.max_highres_token_num(torch.zeros(1, 3, 378, 378))
        last = None
        if num_look_close == "all":
            steps = math.ceil(total / per_step)
        elif num_look_close is not None:
            steps = min(num_look_close, math.ceil(total / per_step))
        else:
            n = min(num_token_look_close, total)
            steps = math.ceil(n / per_step)
            last = n % per_step or per_step
        first = num_token_look_close if num_token_look_close is not None and num_token_look_close <= per_step else None
        with torch.no_grad(), stable_topk():
            maps = enc.get_selection_maps(probs, num_select_token=first)
            each = [maps]
            for k in range(steps - 1):
                new = enc.get_selection_maps(probs, old_selection_maps=maps,
                                             num_select_token=last if last is not None and k == steps - 2 else None)
                each.append(new)
                maps = enc.update_selection_maps(maps, new)
    finally:
        enc.max_select_num_each_scale = saved
    as_np = lambda ms: [m[0].numpy().astype(np.uint8) for m in ms]     # noqa: E731
    return [as_np(ms) for ms in each], as_np(maps)


def assert_same_as_official(p, geo, official_each, official_cumulative):
    ours_each = p.step_maps(geo)
    assert len(ours_each) == len(official_each), "step count"
    for t, (mine, theirs) in enumerate(zip(ours_each, official_each)):
        for s, (a, b) in enumerate(zip(mine, theirs)):
            assert a.sum() == b.sum(), f"step {t} scale {s}: {a.sum()} patches, official {b.sum()}"
            np.testing.assert_array_equal(a, b, err_msg=f"step {t} scale {s}")
    for s, (a, b) in enumerate(zip(p.selection_maps, official_cumulative)):
        np.testing.assert_array_equal(a, b, err_msg=f"cumulative map, scale {s}")


CASES_15K = [
    dict(num_look_close=1),
    dict(num_look_close=2),
    dict(num_look_close="all"),
    dict(num_token_look_close=1001),
    dict(num_token_look_close=3000),
    dict(num_token_look_close=5120),
    dict(num_token_look_close=14580),
    dict(num_token_look_close=14000),
    dict(num_token_look_close=3000, select_num_each_scale=(300, 1000)),
    dict(num_look_close="all", select_num_each_scale=(300, 1000)),
    dict(num_look_close="all", select_num_each_scale=(2500, 60)),
    dict(num_look_close="all", select_num_each_scale=(0, 2560)),
    dict(num_look_close=3, smooth_selection_prob=True),
    dict(num_token_look_close=7777, smooth_selection_prob=True),
]
CASES_4K = [
    dict(num_look_close=1),
    dict(num_look_close=6),
    dict(num_look_close="all"),
    dict(num_token_look_close=1000),
    dict(num_token_look_close=87480),
    dict(num_token_look_close=3000, select_num_each_scale=(40, 200, 1000)),
    dict(num_look_close="all", select_num_each_scale=(40, 200, 1000)),
    dict(num_look_close="all", select_num_each_scale=(2000, 60, 500)),
    dict(num_look_close=6, smooth_selection_prob=True),
]


def _id(case):
    return ",".join(f"{k}={'+'.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in case.items())


@pytest.mark.parametrize("name, case", [("ps3-tiny", c) for c in CASES_15K] + [("ps3-tiny-4k", c) for c in CASES_4K],
                         ids=[f"1.5k-{_id(c)}" for c in CASES_15K] + [f"4k-{_id(c)}" for c in CASES_4K])
def test_plan_matches_official_selection(official_encoder, reference_rule, name, case):
    geo = geometry(name)
    enc = official_encoder(name)
    smooth = case.get("smooth_selection_prob", False)
    seed = zlib.crc32(_id(case).encode()) % 10_000
    official_probs = official_prob_maps(enc, name, seed, prompt=seed % 2 == 1, smooth=smooth)
    unsmoothed = official_prob_maps(enc, name, seed, prompt=seed % 2 == 1, smooth=False)
    prob27 = unsmoothed[0][0, ::2, ::2].numpy()          # scale 54 is a 2x2 nearest copy of 27x27

    settings = settings_from_env({}, **case)
    p = plan(prob27, resolve(settings, geo, reference_rule), geo)
    # the ranked maps are bit-identical to the official ones (smoothed or not)
    for ours, theirs in zip(p.scale_probs, official_probs):
        np.testing.assert_array_equal(ours, theirs[0].numpy())

    budget = case.get("select_num_each_scale", geo.select_num_each_scale)
    each, cumulative = official_selection(enc, official_probs, budget, case.get("num_look_close"),
                                          case.get("num_token_look_close"))
    assert_same_as_official(p, geo, each, cumulative)


@pytest.mark.parametrize("name, case", [
    ("ps3-tiny", dict(num_look_close="all")),
    ("ps3-tiny", dict(num_token_look_close=3001, select_num_each_scale=(300, 1000))),
    ("ps3-tiny-4k", dict(num_look_close=5)),
    ("ps3-tiny-4k", dict(num_token_look_close=4321)),
])
def test_plan_matches_official_with_many_equal_probabilities(official_encoder, reference_rule, name, case):
    """Few distinct values across the whole map: ties between cells, not only inside a copy block."""
    geo = geometry(name)
    enc = official_encoder(name)
    rng = np.random.default_rng(11)
    prob27 = (rng.integers(1, 5, size=(27, 27)) / 5.0).astype(np.float32)
    probs = nearest_maps(prob27, geo)
    p = plan(prob27, resolve(settings_from_env({}, **case), geo, reference_rule), geo)
    for ours, theirs in zip(p.scale_probs, probs):
        np.testing.assert_array_equal(ours, theirs[0].numpy())
    budget = case.get("select_num_each_scale", geo.select_num_each_scale)
    each, cumulative = official_selection(enc, probs, budget, case.get("num_look_close"),
                                          case.get("num_token_look_close"))
    assert_same_as_official(p, geo, each, cumulative)


def test_official_pick_without_pinning_is_tie_equivalent(official_encoder):
    """Unpinned, the official top-k may take other members of a tie group, never other values."""
    geo = GEO_4K
    enc = official_encoder("ps3-tiny-4k")
    probs = official_prob_maps(enc, "ps3-tiny-4k", 21)
    p = plan(probs[0][0, ::2, ::2].numpy(), resolve(settings_from_env({}, num_look_close=1), geo), geo)
    with torch.no_grad():
        theirs = enc.get_selection_maps(probs)
    for mine, their, sp in zip(p.selection_maps, theirs, p.scale_probs):
        their = their[0].numpy().astype(bool)
        assert mine.sum() == their.sum()
        np.testing.assert_array_equal(np.sort(sp[mine.astype(bool)]), np.sort(sp[their]))
