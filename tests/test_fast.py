"""The device-resident fast path (runtime/fast.py) and `ps3edge bench`, checked on the CPU in fp32."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ps3edge.model import build
from ps3edge.runtime.fast import FastLookClose
from ps3edge.runtime.lookclose import Pipeline
from ps3edge.runtime.planning import settings_from_env, step_counts
from ps3edge.runtime.preprocess import preprocess

CASES = [
    ("ps3-tiny", dict(num_look_close=1)),
    ("ps3-tiny", dict(num_look_close="all")),
    ("ps3-tiny", dict(num_token_look_close=1001, smooth_selection_prob=True)),
    ("ps3-tiny-4k", dict(num_look_close=2)),
    ("ps3-tiny-4k", dict(num_token_look_close=3000, select_num_each_scale="40+200+1000")),
]


@pytest.mark.parametrize("preset,kwargs", CASES, ids=[f"{p}-{k}" for p, k in CASES])
def test_fast_path_equals_staged_pipeline(artifacts, image, preset, kwargs):
    settings = settings_from_env({}, mode="after_image", **kwargs)
    staged = Pipeline(artifacts(preset), "torch").run(image, settings)
    pixels = Pipeline(artifacts(preset), "torch").pixels(image)

    fast = FastLookClose(build(preset).model, device="cpu", dtype="fp32")
    out = fast.forward(torch.from_numpy(pixels), step_counts(settings, fast.geometry),
                       smooth=settings.smooth_selection_prob)

    ours_sel = out.selection.numpy()
    staged_sel = np.concatenate([m.reshape(-1) for m in staged.plan.selection_maps])
    assert np.array_equal(ours_sel, staged_sel)
    assert out.features.shape == staged.features.shape
    assert np.abs(out.features.numpy() - staged.features).max() <= 1e-4
    assert np.abs(out.prob.numpy() - staged.prob).max() <= 1e-6


def test_fast_path_top_down_prompt_changes_selection(image):
    loaded = build("ps3-tiny")
    fast = FastLookClose(loaded.model, device="cpu", dtype="fp32")
    cfg = loaded.cfg
    pixels = torch.from_numpy(preprocess(image, cfg.max_size, cfg.image_mean, cfg.image_std))
    counts = step_counts(settings_from_env({}, num_look_close=1), fast.geometry)
    bottom_up = fast.forward(pixels, counts)
    prompt = torch.randn(1, loaded.cfg.width, generator=torch.Generator().manual_seed(3))
    top_down = fast.forward(pixels, counts, prompt=prompt)
    assert not torch.equal(bottom_up.prob, top_down.prob)
    assert not torch.equal(bottom_up.selection, top_down.selection)
    assert int(top_down.selection.sum()) == 2560


def test_bench_cli_on_cpu_against_official(tmp_path):
    pytest.importorskip("ps3", reason="the official ps3-torch reference is not installed")
    env = {k: v for k, v in os.environ.items() if k not in (
        "NUM_LOOK_CLOSE", "NUM_TOKEN_LOOK_CLOSE", "SELECT_NUM_EACH_SCALE", "LOOK_CLOSE_MODE", "SMOOTH_SELECTION_PROB")}
    out = tmp_path / "rows.json"
    md = tmp_path / "table.md"
    proc = subprocess.run(
        [sys.executable, "-m", "ps3edge.cli", "bench", "--model", "ps3-tiny", "--device", "cpu", "--dtype", "fp32",
         "--num-look-close", "1,2", "--against", "official", "--warmup", "0", "--repeat", "1",
         "--json", str(out), "--markdown", str(md)],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert [r["num_look_close"] for r in rows] == [1, 2]
    assert [r["tokens"] for r in rows] == [729 + 2560, 729 + 5120]
    for r in rows:
        assert r["official_tokens"] == r["tokens"]
        assert r["selection_identical"]                 # 1.5K default budgets: no ties at the cut
        assert r["max_abs"] <= 1e-3 and r["min_cosine"] >= 0.99999
        assert set(r["stages_ms"]) == {"lowres", "selector", "planning", "highres", "assemble"}
        assert r["ours_ms"] > 0 and r["official_ms"] > 0
    assert "| ps3-tiny |" in md.read_text()


def test_bench_refuses_bad_options():
    proc = subprocess.run([sys.executable, "-m", "ps3edge.cli", "bench", "--num-look-close", "one"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--num-look-close" in proc.stderr and "Traceback" not in proc.stderr


def test_one_token_look_close_rounds_to_no_high_res_tokens(artifacts, image):
    """NUM_TOKEN_LOOK_CLOSE=1: the official floor rule gives every scale int(b * 1 / 2560) = 0
    patches (the official code then fails on an empty torch.cat); ours returns the low-res tokens."""
    settings = settings_from_env({}, num_token_look_close=1, mode="after_image")
    staged = Pipeline(artifacts("ps3-tiny"), "onnxruntime").run(image, settings)
    assert staged.features.shape == (1, 729, 64)
    assert staged.highres_calls == []
    fast = FastLookClose(build("ps3-tiny").model, device="cpu", dtype="fp32")
    pixels = torch.from_numpy(Pipeline(artifacts("ps3-tiny"), "torch").pixels(image))
    out = fast.forward(pixels, step_counts(settings, fast.geometry))
    assert out.features.shape == (1, 729, 64) and int(out.selection.sum()) == 0


def test_long_runs_are_split_into_calls_of_at_most_the_profile_steps(artifacts, image):
    """4K 'all' is 35 steps; the staged pipeline runs them in calls of at most 6 (the profile's
    T_max), and the result equals the one-program fast path, which batches them all."""
    settings = settings_from_env({}, num_look_close="all", mode="after_image")
    pipe = Pipeline(artifacts("ps3-tiny-4k"), "torch")
    staged = pipe.run(image, settings)
    assert pipe.steps_per_call() == 6
    assert staged.highres_calls == [(6, 2560)] * 5 + [(4, 2560)] + [(1, 440)]    # 34 full steps + 440
    assert staged.features.shape == (1, 729 + 87480, 64)
    fast = FastLookClose(build("ps3-tiny-4k").model, device="cpu", dtype="fp32")
    out = fast.forward(torch.from_numpy(pipe.pixels(image)), step_counts(settings, fast.geometry))
    assert np.abs(out.features.numpy() - staged.features).max() <= 1e-4
