"""The budget rule: how a patch count is split over the high-res scales.

Upstream PS3 gives each split's rounding remainder to the last scale (N asked, N given); the
installed reference, ps3-torch 0.1.3, floors every scale. ps3edge plans by upstream's rule, and
parity finds the installed reference's rule by running its code and plans ours by it. Here the
installed reference is checked as it is (floor), and given upstream's two lines inside a test
(`upstream_reference`), where parity must find and match the other rule.
"""

from __future__ import annotations

import inspect
import json
import textwrap

import numpy as np
import pytest
import torch

from ps3edge.model import load_checkpoint, random_model
from ps3edge.model.config import (PRESETS, BudgetRule, default_select_num_each_scale, preset,
                                  split_in_proportion)
from ps3edge.parity import run_parity
from ps3edge.reference import _import_official, official_model, reference_budget_rules
from ps3edge.runtime.fast import FastLookClose
from ps3edge.runtime.planning import Geometry, resolve, settings_from_env

FLOOR, UPSTREAM = BudgetRule.FLOOR_EACH_SCALE, BudgetRule.REMAINDER_TO_LAST
SCALES_4K = (378, 756, 1512, 3780)
BUDGETS = [(512, 2048), (85, 341, 2134), (40, 200, 1000), (300, 1000), (1, 2), (2000, 60, 500), (0, 2560),
           (2560,), (7, 7, 7)]


def highres_patches(name: str, tokens: int, rule=None) -> int:
    geo = Geometry.of(preset(name))
    settings = settings_from_env({}, num_token_look_close=tokens)
    schedule = resolve(settings, geo) if rule is None else resolve(settings, geo, rule)
    return sum(map(sum, schedule.counts))


# ------------------------------------------------------------------------------------------
# the rule
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("budget", BUDGETS, ids=["+".join(map(str, b)) for b in BUDGETS])
def test_upstream_rule_gives_exactly_the_count_asked(budget):
    floors_short = 0
    for n in range(sum(budget) + 1):
        shares = split_in_proportion(n, budget)
        floored = split_in_proportion(n, budget, FLOOR)
        assert sum(shares) == n and min(shares) >= 0, (n, shares)
        assert shares[:-1] == floored[:-1]                 # only the last scale differs
        assert 0 <= n - sum(floored) < len(budget)          # the floor rule loses < one patch per scale
        floors_short += sum(floored) < n
    assert floors_short or len(budget) == 1 or budget == (0, 2560)


@pytest.mark.parametrize("name", ["ps3-tiny", "ps3-tiny-4k", "ps3-4k"])
def test_a_token_count_gives_that_many_patches(name):
    per_step = preset(name).tokens_per_step
    for n in [1, 2, 999, 1000, 1001, 2559, 2560, 2561, 3000, 4321, 4500, 7777, 3 * per_step + 920]:
        assert highres_patches(name, n) == n, n


def test_4500_tokens_on_4k_are_4500_and_4499_under_the_floor_rule():
    assert highres_patches("ps3-4k", 4500) == 4500
    assert highres_patches("ps3-4k", 4500, FLOOR) == 4499
    # the last step: 1940 of 85 + 341 + 2134 -> 64 + 258 + 1617.2 (floored 1617, upstream 1618)
    geo = Geometry.of(preset("ps3-4k"))
    settings = settings_from_env({}, num_token_look_close=4500)
    assert resolve(settings, geo).counts == ((85, 341, 2134), (64, 258, 1618))
    assert resolve(settings, geo, FLOOR).counts == ((85, 341, 2134), (64, 258, 1617))


def test_the_rule_is_taken_by_name_too():
    assert split_in_proportion(4500 - 2560, (85, 341, 2134), "floor-each-scale") == (64, 258, 1617)
    assert highres_patches("ps3-4k", 4500, "remainder-to-last") == 4500
    with pytest.raises(ValueError):
        split_in_proportion(10, (1, 2), "round")


def test_the_fast_path_counts_by_the_same_rule():
    fast = FastLookClose(random_model(preset("ps3-tiny-4k"), seed=0), device="cpu", dtype="fp32")
    settings = settings_from_env({}, num_token_look_close=1000)
    assert fast.counts(settings) == [[33, 133, 834]]
    assert fast.counts(settings, FLOOR) == [[33, 133, 833]]


# ------------------------------------------------------------------------------------------
# the per-step budget of a config that gives only max_select_num
# ------------------------------------------------------------------------------------------

def test_a_4k_config_with_max_select_num_2560_budgets_85_341_2134():
    assert default_select_num_each_scale(SCALES_4K, 2560) == (85, 341, 2134)
    assert default_select_num_each_scale(SCALES_4K, 2560, FLOOR) == (85, 341, 2133)
    assert default_select_num_each_scale((378, 756, 1512), 2560) == (512, 2048)
    assert default_select_num_each_scale((378, 756, 1512), 2561) == (512, 2049)


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_budget_is_the_config_rule_of_its_scales(name):
    cfg = preset(name)
    assert default_select_num_each_scale(cfg.scales, cfg.tokens_per_step) == cfg.select_num_each_scale


def test_a_4k_checkpoint_config_without_per_scale_budgets_loads_as_the_4k_preset(tmp_path):
    """As the published nvidia/PS3-4K-SigLIP2 config.json: max_select_num 2560 and no
    max_select_num_each_scale; the loaded budget is the ps3-4k preset's."""
    path = tmp_path / "ckpt"
    official_model(random_model(preset("ps3-tiny-4k"), seed=2)).save_pretrained(str(path))
    config = json.loads((path / "config.json").read_text())
    vision = config.get("vision_config", config)
    vision.pop("max_select_num_each_scale", None)
    vision.update(max_select_num=2560, depth=4, num_heads=4)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    cfg = load_checkpoint(path).cfg
    assert cfg.select_num_each_scale == preset("ps3-4k").select_num_each_scale == (85, 341, 2134)


# ------------------------------------------------------------------------------------------
# the installed reference, as it is and with upstream's rule
# ------------------------------------------------------------------------------------------

def with_remainder_to_last(installed_init):
    """PS3VisionEncoder.__init__ and then upstream's line after its per-step budget split."""
    def init(self, config, **kwargs):
        installed_init(self, config, **kwargs)
        if config.max_select_num_each_scale is None:
            self.max_select_num_each_scale[-1] += config.max_select_num - sum(self.max_select_num_each_scale)
    return init


@pytest.fixture
def upstream_reference(monkeypatch):
    """The installed ps3-torch given upstream PS3's two lines (NVlabs/PS3 f7e3fd4): after each split,
    the last scale takes what the floors leave. get_selection_maps is the installed source with the
    line added; __init__ adds its line after the installed one has run."""
    modeling_ps3, _, _ = _import_official()
    encoder = modeling_ps3.PS3VisionEncoder
    floor_line = "select_num_each_scale = [int(x * num_select_token / sum(self.max_select_num_each_scale))"
    source = textwrap.dedent(inspect.getsource(encoder.get_selection_maps))
    lines = source.splitlines()
    [at] = [i for i, line in enumerate(lines) if floor_line in line]
    indent = lines[at][: len(lines[at]) - len(lines[at].lstrip())]
    lines.insert(at + 1, indent + "select_num_each_scale[-1] += num_select_token - sum(select_num_each_scale)")
    namespace = dict(vars(modeling_ps3))
    exec(compile("\n".join(lines), modeling_ps3.__file__, "exec"), namespace)
    monkeypatch.setattr(encoder, "get_selection_maps", namespace["get_selection_maps"])
    monkeypatch.setattr(encoder, "__init__", with_remainder_to_last(encoder.__init__))
    return encoder


@pytest.fixture(scope="module")
def official_encoder():
    """An official 4K encoder; its get_selection_maps is looked up on the class, patched or not."""
    return official_model(random_model(preset("ps3-tiny-4k"), seed=1)).vision_model


def official_split(enc, tokens: int, budget) -> list[int]:
    """The reference's get_selection_maps' per-scale count for a num_select_token of `tokens`."""
    enc.max_select_num_each_scale = list(budget)
    probs = [torch.rand(1, g, g, generator=torch.Generator().manual_seed(g)) for g in (54, 108, 270)]
    with torch.no_grad():
        maps = enc.get_selection_maps(probs, num_select_token=tokens)
    return [int(m.sum()) for m in maps]


def test_the_installed_reference_floors_every_scale(official_encoder):
    rules = reference_budget_rules()
    assert (rules.per_step, rules.tokens) == (FLOOR, FLOOR)
    assert rules.describe() == f"floor-each-scale (ps3-torch {rules.version})"
    for n in (1, 1000, 1940, 2559):
        split = official_split(official_encoder, n, (85, 341, 2134))
        assert split == list(split_in_proportion(n, (85, 341, 2134), FLOOR)), n
    assert sum(official_split(official_encoder, 1940, (85, 341, 2134))) == 1939   # 4500 on 4K: 2560 + 1939


def test_the_reference_given_upstream_rule_splits_as_ps3edge(official_encoder, upstream_reference):
    rules = reference_budget_rules()
    assert (rules.per_step, rules.tokens) == (UPSTREAM, UPSTREAM)
    assert rules.describe().startswith("remainder-to-last (ps3-torch ")
    for n in (1, 1000, 1940, 2559):
        assert official_split(official_encoder, n, (85, 341, 2134)) == list(split_in_proportion(n, (85, 341, 2134))), n


def test_a_reference_splitting_each_way_once_is_described_per_split(monkeypatch):
    modeling_ps3, _, _ = _import_official()
    encoder = modeling_ps3.PS3VisionEncoder
    monkeypatch.setattr(encoder, "__init__", with_remainder_to_last(encoder.__init__))
    rules = reference_budget_rules()
    assert (rules.per_step, rules.tokens) == (UPSTREAM, FLOOR)
    assert rules.describe().startswith("per-step budget remainder-to-last, token count floor-each-scale")


# ------------------------------------------------------------------------------------------
# parity under each rule: 1001 tokens at 1.5K are 200 + 800 floored, 200 + 801 upstream
# ------------------------------------------------------------------------------------------

def parity_1001_tokens(artifacts, image):
    report = run_parity("ps3-tiny", image, settings_from_env({}, num_token_look_close=1001),
                        artifact_dir=artifacts("ps3-tiny"))
    table = "\n".join(f"{r.stage} | {r.compared} | {r.max_abs} | {r.min_cosine} | {r.selection} | {r.ok}"
                      for r in report.rows)
    [rule_row] = [r for r in report.rows if r.stage == "budget rule"]
    assert rule_row.selection == report.budget_rule and rule_row.ok, table
    return report, table


def assert_matches(report, table, highres: int):
    assert report.ok, table
    assert report.tokens == 729 + highres, table
    for r in report.rows:
        if r.stage == "end-to-end":
            assert r.selection == f"{729 + highres} tokens", table
        if r.stage == "highres":
            assert r.selection == "identical", table


def test_parity_finds_the_floor_rule_of_the_installed_reference_and_matches(artifacts, image):
    report, table = parity_1001_tokens(artifacts, image)
    assert report.budget_rule.startswith("floor-each-scale (ps3-torch "), table
    assert_matches(report, table, 1000)


def test_parity_finds_upstream_rule_in_a_patched_reference_and_matches(artifacts, image, upstream_reference):
    report, table = parity_1001_tokens(artifacts, image)
    assert report.budget_rule.startswith("remainder-to-last (ps3-torch "), table
    assert_matches(report, table, 1001)
