"""Batched look-close: every image of a batch equals the same image run alone (fp32: max abs <=
1e-5, selection identical) on onnxruntime and the torch stages, with mixed images and prompts,
a remainder step, 1.5K and 4K; the official code on each image (parity --batch); the CLI's
batch outputs; and the bound an artifact is exported with."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors import safe_open

from conftest import cli, random_image
from test_bad_input import assert_one_line_error
from ps3edge import defaults
from ps3edge.errors import Ps3EdgeError
from ps3edge.model.patches import PatchTaps, gather_patches
from ps3edge.runtime.batching import assemble, highres_feeds
from ps3edge.runtime.lookclose import Pipeline
from ps3edge.runtime.planning import Geometry, plan, resolve, settings_from_env

WIDTH = 64                       # the tiny presets' width


def images(count: int, seed: int = 0) -> list:
    return [random_image(320 + 16 * i, 240 + 8 * i, seed=seed + i) for i in range(count)]


def assert_each_as_alone(pipe: Pipeline, batch, settings, prompts=None):
    """run_batch against run, image by image: features within 1e-5, identical selection."""
    got = pipe.run_batch(batch, settings, prompts)
    assert len(got) == len(batch)
    given = [None] * len(batch) if prompts is None else prompts
    for image, prompt, result in zip(batch, given, got):
        alone = pipe.run(image, settings, prompt)
        assert result.features.shape == alone.features.shape
        assert np.abs(result.features - alone.features).max() <= defaults.BATCH_MAX_ABS_FP32
        assert np.abs(result.prob - alone.prob).max() <= 1e-6
        for a, b in zip(result.plan.selection_maps, alone.plan.selection_maps):
            assert np.array_equal(a, b)
    return got


# slow: a batch of one is the path `run` itself takes (run is run_batch of one image), so that case
# compares the pass with itself run again; batches of 2 and 3 are the default cases, and one image's
# highres calls are test_fast.py's test_long_runs_are_split_into_calls_of_at_most_the_profile_steps_at_1_5k
@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
@pytest.mark.parametrize("count", [pytest.param(1, marks=pytest.mark.slow), 2, 3])
def test_each_image_of_a_batch_equals_it_alone(artifacts, backend, count):
    settings = settings_from_env({}, num_look_close=2)
    with Pipeline(artifacts("ps3-tiny"), backend, device="cpu" if backend == "torch" else None) as pipe:
        got = assert_each_as_alone(pipe, images(count), settings)
    # B images x 2 steps of 2560 go through one highres call
    assert got[0].highres_calls == [(2 * count, 2560)] and got[0].batch == count


def test_mixed_prompts_and_a_remainder_step_in_one_batch(artifacts):
    """Four images: two with their own prompts, two bottom-up (the learned prior); a token budget
    of 2560 + 920 makes a full step and a shorter last one for each image."""
    rng = np.random.default_rng(5)
    prompts = [rng.standard_normal(WIDTH).astype(np.float32), None,
               rng.standard_normal(WIDTH).astype(np.float32), None]
    settings = settings_from_env({}, num_token_look_close=2560 + 920)
    with Pipeline(artifacts("ps3-tiny"), "onnxruntime") as pipe:
        got = assert_each_as_alone(pipe, images(4, seed=10), settings, prompts)
    assert got[0].highres_calls == [(4, 2560), (4, 920)]          # the steps of all four images, by length
    # different prompts select differently on the same kind of image
    assert not np.array_equal(got[0].prob, got[1].prob)


@pytest.mark.slow
def test_a_batch_of_eight_equals_each_alone(artifacts):
    with Pipeline(artifacts("ps3-tiny"), "onnxruntime") as pipe:
        got = assert_each_as_alone(pipe, images(8, seed=20), settings_from_env({}, num_look_close=1))
    assert got[0].highres_calls == [(6, 2560), (2, 2560)]       # on the CPU, at most 6 rows a call


# slow: by default a batch against each image alone is test_a_batch_of_eight_equals_each_alone and
# test_each_image_of_a_batch_equals_it_alone (1.5K, two scales), and 4K's three scales run end to end
# in test_fast.py's ps3-tiny-4k 3000-token case
@pytest.mark.slow
def test_a_4k_batch_equals_each_alone(artifacts):
    settings = settings_from_env({}, num_look_close=1)
    with Pipeline(artifacts("ps3-tiny-4k"), "onnxruntime") as pipe:
        assert_each_as_alone(pipe, images(2, seed=30), settings)


def test_highres_feeds_put_the_steps_of_several_images_in_one_call():
    """Rows of equal length share a call whatever their image; each row's patches come from its
    own image's table, and `step_image` says which K/V cache it attends to."""
    geo = Geometry(lowres_grid=27, highres_grids=(54, 108), select_num_each_scale=(512, 2048),
                   max_tokens_per_call=2560)
    settings = settings_from_env({}, num_token_look_close=2560 + 920)
    rng = np.random.default_rng(1)
    plans = [plan(rng.random((27, 27), dtype=np.float32), resolve(settings, geo), geo) for _ in range(3)]
    low = {"pixels": rng.random((3, 3, 1512, 1512), dtype=np.float32), "kv_cache": np.zeros((1, 2, 3, 1, 1, 1))}
    taps = PatchTaps(1512, (756, 1512), 14)
    for limit, shapes in ((None, [(3, 2560), (3, 920)]), (2, [(2, 2560), (1, 2560), (2, 920), (1, 920)])):
        feeds = list(highres_feeds(plans, low, geo, limit))
        assert [f["positions"].shape for f in feeds] == shapes
        rows = [(int(i), p.tolist()) for f in feeds for i, p in zip(f["step_image"], f["positions"])]
        want = [(i, pl.step_positions(geo, t).tolist()) for i, pl in enumerate(plans) for t in range(len(pl.steps))]
        assert sorted(rows) == sorted(want)                           # every step once, with its image
        for f in feeds:
            assert f["step_image"].dtype == np.int32 and f["kv_cache"] is low["kv_cache"]
            for i, pos, patches in zip(f["step_image"], f["positions"], f["patches"]):
                np.testing.assert_array_equal(patches, gather_patches(low["pixels"], np.full(len(pos), i), pos, taps, 512))
    # assembly: each image gets its own rows back, in scale-major raster order after its low-res tokens
    lowres = rng.random((3, 729, 4), dtype=np.float32)
    outs = [np.broadcast_to(f["positions"][..., None].astype(np.float32), (*f["positions"].shape, 4)) +
            f["step_image"][:, None, None] * 1e5 for f in feeds]
    tokens = assemble(lowres, feeds, outs)
    for i, t in enumerate(tokens):
        assert np.array_equal(t[:729], lowres[i])
        high = t[729:, 0]
        assert np.all(high // 1e5 == i) and np.all(np.diff(high) > 0)


def test_a_batch_over_the_artifacts_bound_is_refused(artifacts, tmp_path):
    art = tmp_path / "art"
    r = cli("export", "--model", "ps3-tiny", "--out", art, "--max-batch", "2")
    assert r.returncode == 0, r.stderr
    assert json.loads((art / "manifest.json").read_text())["geometry"]["max_batch"] == 2
    with Pipeline(art, "onnxruntime") as pipe:
        assert pipe.max_batch == 2
        with pytest.raises(Ps3EdgeError, match="over this artifact's bound of 2.*export --max-batch 3"):
            pipe.run_batch(images(3), settings_from_env({}, num_look_close=1))
    src = tmp_path / "a.png"
    random_image().save(src)
    out = tmp_path / "f.safetensors"
    r = cli("run", art, *sum((["--image", src] for _ in range(3)), []), "--batch-size", "3", "--out", out,
            "--num-look-close", "1")
    assert_one_line_error(r, "bound of 2", "ps3edge export --max-batch 3", absent=(out,))
    # the lint and inspect name the bound
    r = cli("inspect", art)
    assert "up to 2 images per pass" in r.stdout


@pytest.mark.parametrize("value", ["0", "51"])
def test_export_refuses_a_max_batch_out_of_range(tmp_path, value):
    out = tmp_path / "art"
    r = cli("export", "--model", "ps3-tiny-4k", "--out", out, "--max-batch", value)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--max-batch" in r.stderr
    assert not out.exists()


def test_an_artifact_of_the_previous_schema_is_refused_with_re_export(artifacts, tmp_path):
    art = tmp_path / "old"
    shutil.copytree(artifacts("ps3-tiny"), art)
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["schema_version"] = 1
    manifest.pop("integrity", None)
    (art / "manifest.json").write_text(json.dumps(manifest))
    r = cli("run", art, "--image", "examples/sample.png", "--out", tmp_path / "f.safetensors")
    assert_one_line_error(r, "schema version 1", "re-export", absent=(tmp_path / "f.safetensors",))


# --- the CLI ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("batch-images")
    paths = []
    for i, im in enumerate(images(3, seed=40)):
        paths.append(folder / f"cam{i}.png")
        im.save(paths[-1])
    return paths


def read(path) -> dict:
    with safe_open(str(path), "np") as f:
        return {k: f.get_tensor(k) for k in f.keys()} | {"__metadata__": f.metadata()}


def test_run_with_several_images_writes_a_batch_axis_in_flag_order(artifacts, image_files, tmp_path):
    art = artifacts("ps3-tiny")
    flags = sum((["--image", p] for p in image_files), [])
    rng = np.random.default_rng(2)
    prompts = rng.standard_normal((3, WIDTH)).astype(np.float32)
    np.save(tmp_path / "p.npy", prompts)
    out, overlays = tmp_path / "batch.safetensors", tmp_path / "overlays"
    r = cli("run", art, *flags, "--prompt-embedding", tmp_path / "p.npy", "--out", out, "--overlay", overlays,
            "--num-look-close", "1", "--batch-size", "2")
    assert r.returncode == 0, r.stderr
    got = read(out)
    assert got["features"].shape == (3, 729 + 2560, WIDTH) and got["prob"].shape == (3, 27, 27)
    assert got["selection_map_756"].shape == (3, 54, 54) and got["selection_map_1512"].shape == (3, 108, 108)
    assert got["__metadata__"]["batch"] == "3"
    assert sorted(p.name for p in overlays.iterdir()) == ["0-cam0.png", "1-cam1.png", "2-cam2.png"]
    # each row is that image run alone, with its own prompt
    for i, path in enumerate(image_files):
        one = tmp_path / f"one{i}.safetensors"
        np.save(tmp_path / f"p{i}.npy", prompts[i])
        r = cli("run", art, "--image", path, "--prompt-embedding", tmp_path / f"p{i}.npy", "--out", one,
                "--num-look-close", "1")
        alone = read(one)
        assert alone["features"].shape == (1, 729 + 2560, WIDTH)           # one image: today's shapes
        assert np.abs(got["features"][i] - alone["features"][0]).max() <= defaults.BATCH_MAX_ABS_FP32
        assert np.array_equal(got["selection_map_1512"][i], alone["selection_map_1512"])


def test_a_corrupt_image_fails_the_batch_naming_it_and_writes_nothing(artifacts, image_files, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(image_files[0].read_bytes()[:200])
    out, overlays = tmp_path / "f.safetensors", tmp_path / "ov"
    r = cli("run", artifacts("ps3-tiny"), "--image", image_files[0], "--image", bad, "--image", image_files[1],
            "--out", out, "--overlay", overlays, "--num-look-close", "1")
    assert_one_line_error(r, str(bad), absent=(out, overlays), clean_dirs=(tmp_path,))


def test_a_prompt_file_that_does_not_match_the_images_is_refused(artifacts, image_files, tmp_path):
    np.save(tmp_path / "p.npy", np.ones((2, WIDTH), np.float32))
    out = tmp_path / "f.safetensors"
    r = cli("run", artifacts("ps3-tiny"), *sum((["--image", p] for p in image_files), []),
            "--prompt-embedding", tmp_path / "p.npy", "--out", out)
    assert_one_line_error(r, "2 prompts for 3 images", absent=(out,))


def test_parity_batch_checks_each_image_against_the_official_code_and_alone(artifacts):
    # the shared artifact: `parity --model` (its own export) is test_cli.py's parity case
    r = cli("parity", "--artifacts", artifacts("ps3-tiny"), "--batch", "3", "--num-look-close", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    text = " ".join(r.stdout.split())
    for label in ("ours-torch", "onnxruntime"):
        for i in (1, 2, 3):
            for row in ("vs official", "in the batch vs alone"):
                assert f"{label} image {i}/3 {row}" in text, (label, i, row, r.stdout)
    assert "DIFFERENT" not in r.stdout
