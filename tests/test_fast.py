"""The device-resident fast path (runtime/fast.py) and `ps3edge bench`, checked on the CPU in fp32."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from conftest import clean_env, cli
from ps3edge.model import build
from ps3edge.runtime.fast import FastLookClose
from ps3edge.runtime.lookclose import Pipeline
from ps3edge.runtime.planning import BudgetRule, settings_from_env, step_counts
from PIL import Image

from ps3edge.runtime.preprocess import (_height_first_new_rule, _height_first_old_rule, pillow_pass_order,
                                        preprocess, preprocess_on_device, resize_like_pil)


@pytest.fixture
def pipeline():
    """Pipeline(...), closed (its stage runners freed) when the test ends."""
    opened = []

    def open_pipeline(*args, **kwargs) -> Pipeline:
        opened.append(Pipeline(*args, **kwargs))
        return opened[-1]
    yield open_pipeline
    for pipe in opened:
        pipe.close()


CASES = [
    ("ps3-tiny", dict(num_look_close=1)),
    ("ps3-tiny", dict(num_look_close="all")),
    ("ps3-tiny", dict(num_token_look_close=1001, smooth_selection_prob=True)),
    # slow: two whole 4K steps; by default 4K runs here with 3000 tokens over custom budgets
    pytest.param("ps3-tiny-4k", dict(num_look_close=2), marks=pytest.mark.slow),
    ("ps3-tiny-4k", dict(num_token_look_close=3000, select_num_each_scale="40+200+1000")),
]


def _case_id(case) -> str:
    preset, kwargs = case.values if hasattr(case, "values") else case
    return f"{preset}-{kwargs}"


@pytest.mark.parametrize("preset,kwargs", CASES, ids=[_case_id(c) for c in CASES])
def test_fast_path_equals_staged_pipeline(pipeline, artifacts, image, preset, kwargs):
    settings = settings_from_env({}, mode="after_image", **kwargs)
    staged_pipeline = pipeline(artifacts(preset), "torch", device="cpu")
    staged = staged_pipeline.run(image, settings)
    pixels = staged_pipeline.pixels(image)

    fast = FastLookClose(build(preset).model, device="cpu", dtype="fp32")
    out = fast.forward(torch.from_numpy(pixels), step_counts(settings, fast.geometry),
                       smooth=settings.smooth_selection_prob)

    ours_sel = out.selection[0].numpy()
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


# slow: by default bench against the official code runs in test_throughput.py's
# test_bench_official_all_layers_is_an_extra_labelled_column (one step, the JSON, markdown and table)
@pytest.mark.slow
def test_bench_cli_on_cpu_against_official(tmp_path):
    pytest.importorskip("ps3", reason="the official ps3-torch reference is not installed")
    out = tmp_path / "rows.json"
    md = tmp_path / "table.md"
    proc = cli("bench", "--model", "ps3-tiny", "--device", "cpu", "--dtype", "fp32", "--num-look-close", "1,2",
               "--against", "official", "--warmup", "0", "--repeat", "1", "--json", out, "--markdown", md,
               env=clean_env(columns=None))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert [r["num_look_close"] for r in rows] == [1, 2]
    assert [r["tokens"] for r in rows] == [729 + 2560, 729 + 5120]
    for r in rows:
        assert r["official_tokens"] == r["tokens"]
        assert r["selection_identical"]                 # 1.5K default budgets: no ties at the cut
        assert r["max_abs"] <= 1e-3 and r["min_cosine"] >= 0.99999
        steps = r["num_look_close"]
        assert set(r["stages_ms"]) == {"lowres", "selector", "planning", "highres", f"highres[{steps}x2560]", "assemble"}
        assert r["stages_ms"]["highres"] == r["stages_ms"][f"highres[{steps}x2560]"]
        host = r["stages_peak_mib"]["host"]             # per stage, each at least the process's resident set
        assert set(host) == set(r["stages_ms"]) and min(host.values()) > 50
        assert "cuda" not in r["stages_peak_mib"]
        assert r["ours_ms"] > 0 and r["official_ms"] > 0
        assert r["preprocess_cpu_ms"] > 0 and r["preprocess_device_ms"] > 0 and r["image"] == "1600x1000"
    assert "| ps3-tiny |" in md.read_text()


def test_bench_times_projector_and_llm_for_a_vila_hd_model(tmp_path):
    out = tmp_path / "rows.json"
    proc = cli("bench", "--model", "vila-hd-tiny", "--device", "cpu", "--dtype", "fp32", "--num-look-close", "1",
               "--warmup", "0", "--repeat", "1", "--decode-tokens", "3", "--json", out, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(out.read_text())
    # 196 low-res cells + the fully selected 2x2 cells of one step's 2560 patches, + 32 prompt tokens
    assert row["llm_prompt_tokens"] == row["projector_cells"] + 32
    assert row["projector_cells"] > 196
    assert row["projector_ms"] > 0 and row["llm_prefill_ms"] > 0 and row["llm_decode_ms_per_token"] >= 0
    assert row["llm_decode_tokens"] == 3


def test_bench_refuses_bad_options():
    proc = cli("bench", "--num-look-close", "one", env=dict(os.environ))
    assert proc.returncode == 2
    assert "--num-look-close" in proc.stderr and "Traceback" not in proc.stderr


def test_one_token_look_close_gives_one_patch_or_under_the_floor_rule_none(pipeline, artifacts, image):
    """NUM_TOKEN_LOOK_CLOSE=1: upstream's rule floors 512 / 2560 to 0 and gives the last scale the
    one patch. ps3-torch 0.1.3's floor rule (parity's, with that reference) gives every scale 0
    (the official code then fails on an empty torch.cat); ours then returns the low-res tokens."""
    settings = settings_from_env({}, num_token_look_close=1, mode="after_image")
    staged_pipeline = pipeline(artifacts("ps3-tiny"), "onnxruntime")
    staged = staged_pipeline.run(image, settings)
    assert staged.features.shape == (1, 730, 64)
    assert staged.highres_calls == [(1, 1)] and staged.plan.tokens_each_scale() == [0, 1]
    staged_pipeline.budget_rule = BudgetRule.FLOOR_EACH_SCALE
    floored = staged_pipeline.run(image, settings)
    assert floored.features.shape == (1, 729, 64) and floored.highres_calls == []
    fast = FastLookClose(build("ps3-tiny").model, device="cpu", dtype="fp32")
    pixels = torch.from_numpy(pipeline(artifacts("ps3-tiny"), "torch", device="cpu").pixels(image))
    out = fast.forward(pixels, fast.counts(settings))
    assert out.features.shape == (1, 730, 64) and int(out.selection.sum()) == 1
    np.testing.assert_allclose(out.features.numpy(), staged.features, atol=1e-4)
    out = fast.forward(pixels, fast.counts(settings, BudgetRule.FLOOR_EACH_SCALE))
    assert out.features.shape == (1, 729, 64) and int(out.selection.sum()) == 0


def test_long_runs_are_split_into_calls_of_at_most_the_profile_steps_at_1_5k(pipeline, artifacts, image):
    """Budgets of 100+400 a step make 1.5K 'all' 30 steps (29 of 500 patches, then the 16 + 64 left);
    the staged pipeline runs them in calls of at most 6 (the profile's T_max), and the result equals
    the one-program fast path, which batches them all."""
    settings = settings_from_env({}, num_look_close="all", select_num_each_scale="100+400", mode="after_image")
    pipe = pipeline(artifacts("ps3-tiny"), "torch", device="cpu")
    staged = pipe.run(image, settings)
    assert pipe.steps_per_call() == 6
    assert staged.highres_calls == [(6, 500)] * 4 + [(5, 500)] + [(1, 80)]       # 29 full steps + 80
    assert staged.features.shape == (1, 729 + 14580, 64)
    fast = FastLookClose(build("ps3-tiny").model, device="cpu", dtype="fp32")
    out = fast.forward(torch.from_numpy(pipe.pixels(image)), step_counts(settings, fast.geometry))
    assert np.abs(out.features.numpy() - staged.features).max() <= 1e-4


# slow: the same split at 1.5K is test_long_runs_are_split_into_calls_of_at_most_the_profile_steps_at_1_5k
@pytest.mark.slow
def test_long_runs_are_split_into_calls_of_at_most_the_profile_steps(pipeline, artifacts, image):
    """4K 'all' is 35 steps; the staged pipeline runs them in calls of at most 6 (the profile's
    T_max), and the result equals the one-program fast path, which batches them all."""
    settings = settings_from_env({}, num_look_close="all", mode="after_image")
    pipe = pipeline(artifacts("ps3-tiny-4k"), "torch", device="cpu")
    staged = pipe.run(image, settings)
    assert pipe.steps_per_call() == 6
    assert staged.highres_calls == [(6, 2560)] * 5 + [(4, 2560)] + [(1, 440)]    # 34 full steps + 440
    assert staged.features.shape == (1, 729 + 87480, 64)
    fast = FastLookClose(build("ps3-tiny-4k").model, device="cpu", dtype="fp32")
    out = fast.forward(torch.from_numpy(pipe.pixels(image)), step_counts(settings, fast.geometry))
    assert np.abs(out.features.numpy() - staged.features).max() <= 1e-4


# --- preprocessing on the device ------------------------------------------------------------------
def _noise(h, w, seed=0):
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8))


PIL_SIZES = [(320, 240), (4000, 3000), (100, 2000), (2000, 90), (7, 301), (1, 1), (378, 378), (1512, 1512),
             (600, 1600)]
# slow: the two 12-megapixel resizes of 4000 x 3000; shrinking both sides many times over is
# 378-2000-1500, and both sides at 1512 is 1512-1700-1600, added for them
PIL_CASES = [pytest.param(w, h, size, id=f"{size}-{w}-{h}", marks=pytest.mark.slow if (w, h) == (4000, 3000) else ())
             for size in (378, 1512) for w, h in PIL_SIZES] + [pytest.param(2000, 1500, 378, id="378-2000-1500"),
                                                               pytest.param(1700, 1600, 1512, id="1512-1700-1600")]


@pytest.mark.parametrize("w,h,size", PIL_CASES)
def test_device_preprocessing_is_bit_identical_to_pil(w, h, size):
    """Same pixels as the official processor's PIL resize, whatever the scale factors (shrink,
    enlarge, one of each, identity) - hence the same features and the same selection."""
    image = _noise(h, w, seed=w + h)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    want = preprocess(image, size, mean, std)
    got = preprocess_on_device(image, size, mean, std, "cpu")
    assert got.dtype == torch.float32 and got.shape == (1, 3, size, size)
    assert np.array_equal(got.numpy(), want)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16"])
def test_device_preprocessing_handles_every_mode_like_pil(mode):
    base = _noise(200, 260, seed=5)
    image = base.convert("L").convert("I;16") if mode == "I;16" else base.convert(mode)
    want = preprocess(image, 378, (0.5,) * 3, (0.5,) * 3)
    assert np.array_equal(preprocess_on_device(image, 378, (0.5,) * 3, (0.5,) * 3).numpy(), want)


def test_device_normalisation_is_exact_for_every_level():
    """The normalisation is a per-channel lookup of PIL-path values, so no device arithmetic
    (CUDA divides by a scalar via its reciprocal) can move a value by an ulp."""
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    image = Image.fromarray(np.stack([levels, levels.T, 255 - levels], axis=-1))
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    assert np.array_equal(preprocess_on_device(image, 16, mean, std).numpy(), preprocess(image, 16, mean, std))


def test_bench_reports_which_part_of_device_preprocessing_is_off():
    from ps3edge.bench import compare_preprocessing
    from ps3edge.model import preset as model_preset
    cfg = model_preset("ps3-tiny")
    image = _noise(120, 160, seed=3)
    want = preprocess(image, cfg.max_size, cfg.image_mean, cfg.image_std)
    got = preprocess_on_device(image, cfg.max_size, cfg.image_mean, cfg.image_std)
    assert compare_preprocessing(image, cfg, torch.device("cpu"), want, got) == {"identical": True}
    off = got.clone()
    off[0, 1, 5, 7] = torch.nextafter(off[0, 1, 5, 7], torch.tensor(9.0))       # one ulp, one value
    check = compare_preprocessing(image, cfg, torch.device("cpu"), want, off)
    assert check["identical"] is False and check["resize_max_level_diff"] == 0
    assert 0 < check["normalised_max_abs"] < 1e-6


def test_pillow_pass_order_matters_and_is_detected():
    """Pillow rounds to 8 bits between its two passes, so the order changes pixels; newer
    Pillow does the vertical pass first when the height shrinks much more than the width."""
    image = _noise(900, 120, seed=1)                         # tall: height shrinks far more
    want = np.asarray(image.resize((110, 40), Image.BICUBIC))
    src = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    ours = resize_like_pil(src, 40, 110).permute(1, 2, 0).numpy()
    assert np.array_equal(ours, want)
    other = (_height_first_old_rule if pillow_pass_order() is _height_first_new_rule else _height_first_new_rule)
    assert not np.array_equal(resize_like_pil(src, 40, 110, other).permute(1, 2, 0).numpy(), want)


# --- the fast path behind Pipeline / `ps3edge run` ------------------------------------------------
# slow: 4K; the Pipeline's fast path is the 1.5K case, and FastLookClose at 4K against the staged
# pipeline is test_fast_path_equals_staged_pipeline's two 4K cases
@pytest.mark.parametrize("preset,kwargs", [
    ("ps3-tiny", dict(num_look_close=2)),
    pytest.param("ps3-tiny-4k", dict(num_token_look_close=3000, smooth_selection_prob=True), marks=pytest.mark.slow),
])
def test_pipeline_fast_path_equals_staged_path(pipeline, artifacts, image, preset, kwargs):
    settings = settings_from_env({}, mode="after_image", **kwargs)
    staged = pipeline(artifacts(preset), "torch", device="cpu").run(image, settings)
    pipe = pipeline(artifacts(preset), "torch", device="cpu", fast=True)
    assert pipe.fast is not None and pipe.preprocess_on == "device"
    fast = pipe.run(image, settings)
    assert fast.features.dtype == np.float32 and fast.features.shape == staged.features.shape
    assert np.abs(fast.features - staged.features).max() <= 1e-4
    for a, b in zip(fast.plan.selection_maps, staged.plan.selection_maps):
        assert np.array_equal(a, b)
    for t in range(len(staged.plan.steps)):
        assert np.array_equal(np.sort(fast.plan.step_positions(pipe.geometry, t)),
                              np.sort(staged.plan.step_positions(pipe.geometry, t)))
    assert fast.tokens_each_scale == staged.tokens_each_scale
    assert {"preprocess", "look-close (device)", "to host"} <= set(fast.timings_ms)


def test_pipeline_fast_path_top_down(pipeline, artifacts, image):
    prompt = np.random.default_rng(4).standard_normal(64).astype(np.float32)
    settings = settings_from_env({}, num_look_close=1)
    staged = pipeline(artifacts("ps3-tiny"), "torch", device="cpu").run(image, settings, prompt_embedding=prompt)
    fast = pipeline(artifacts("ps3-tiny"), "torch", device="cpu", fast=True).run(image, settings, prompt_embedding=prompt)
    assert np.array_equal(fast.plan.selection_maps[0], staged.plan.selection_maps[0])
    assert np.abs(fast.features - staged.features).max() <= 1e-4


def test_run_cli_device_options(artifacts, image_file, tmp_path):
    base = ["run", artifacts("ps3-tiny"), "--image", image_file, "--num-look-close", "1"]
    ok = cli(*base, "--out", tmp_path / "a.safetensors", "--backend", "torch", "--device", "cpu",
             "--preprocess", "device", env=dict(os.environ))
    assert ok.returncode == 0, ok.stderr
    bad = [
        (["--backend", "onnxruntime", "--device", "cpu"], "--device applies to the torch backend"),
        (["--backend", "torch", "--device", "tpu"], "--device takes"),
        (["--backend", "torch", "--preprocess", "gpu"], "--preprocess takes"),
    ]
    if not torch.cuda.is_available():
        bad.append((["--backend", "torch", "--device", "cuda"], "torch sees no CUDA device"))
    for extra, message in bad:
        out = tmp_path / "b.safetensors"
        proc = cli(*base, "--out", out, *extra, env=dict(os.environ))
        assert proc.returncode == 2, (extra, proc.stderr)
        assert message in proc.stderr and "Traceback" not in proc.stderr
        assert not out.exists()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_pipeline_fast_path_half_precision_stays_within_tolerance(pipeline, artifacts, image, precision):
    """bf16 / fp16 (the GPU precisions, run here on the CPU): the selection equal up to
    near-ties (IoU >= 0.9), per-token cosine >= 0.99 on the low-res tokens, and on every token
    against the official fp32 model run on the same steps."""
    from ps3edge.compare import feature_diff, selection_iou

    settings = settings_from_env({}, num_look_close=2, mode="after_image")
    ref = pipeline(artifacts("ps3-tiny"), "torch", device="cpu").run(image, settings)
    half = pipeline(artifacts("ps3-tiny"), "torch", device="cpu", fast=True, precision=precision).run(image, settings)
    assert half.features.dtype == np.float32 and np.all(np.isfinite(half.features))
    for a, b in zip(half.plan.selection_maps, ref.plan.selection_maps):
        assert selection_iou(a, b) >= 0.9
    _, lowres_cos = feature_diff(half.features[0, :729], ref.features[0, :729])
    assert lowres_cos >= 0.99
    # a token's features depend on its step-mates, and near-ties may split the same patches
    # differently: compare every token with the official fp32 model made to take our steps
    pytest.importorskip("ps3", reason="the official ps3-torch reference is not installed")
    from ps3edge.reference import official_model, run_official_with_selection
    pipe = pipeline(artifacts("ps3-tiny"), "torch", device="cpu")
    official = official_model(build("ps3-tiny").model)
    same_steps = run_official_with_selection(official, torch.from_numpy(pipe.pixels(image)),
                                             half.plan.step_maps(pipe.geometry))
    _, cos = feature_diff(half.features[0], same_steps)
    assert cos >= 0.99


def test_bench_summary_states_ratio_step_cost_and_scale_gap():
    from ps3edge.bench import summary

    def row(model, steps, ours, official, highres):
        return {"model": model, "num_look_close": steps, "ours_ms": ours, "official_ms": official,
                "speedup": round(official / ours, 2), "stages_ms": {"highres": highres}}
    rows = [row("a", 1, 15.0, 36.0, 10.0), row("a", 6, 55.0, 150.0, 48.0),
            row("b", 1, 14.0, 30.0, 11.0), row("b", 6, 50.0, 113.0, 46.0)]
    lines = summary(rows)
    assert lines[0] == ("a: NUM_LOOK_CLOSE=6 55.0 ms, official 150.0 ms, 2.73x; 8.00 ms per step (fit), "
                        "the high-res blocks alone 8.00-10.00 ms per step (1.00x of the fastest)")
    assert lines[1].startswith("b: NUM_LOOK_CLOSE=6 50.0 ms, official 113.0 ms, 2.26x; 7.20 ms per step")
    assert lines[2] == "a vs b at NUM_LOOK_CLOSE=6: 55.0 vs 50.0 ms (9% apart)"
