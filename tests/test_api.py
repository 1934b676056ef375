"""The public Python API (`ps3edge.load`): every frame form a camera or a library hands over gives
the features `ps3edge run` writes for the same image file, bit for bit; every refused form is one
Ps3EdgeError naming what was given and what is taken."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file

import ps3edge
from ps3edge import defaults
from conftest import cli, random_image

ONE_STEP = ps3edge.LookCloseSettings(num_look_close=1)     # the frame forms differ before the loop: one step shows it


@pytest.fixture(scope="module")
def art(artifacts):
    return artifacts("ps3-tiny")


@pytest.fixture(scope="module")
def encoder(art):
    with ps3edge.load(art) as enc:
        yield enc


@pytest.fixture(scope="module")
def rgb():
    return np.asarray(random_image(seed=3))                  # (240, 320, 3) uint8


def cli_features(art, image: Image.Image, tmp_path: Path) -> dict:
    """What `ps3edge run` writes for `image` saved as a PNG file, with one look-close step."""
    path, out = tmp_path / "frame.png", tmp_path / "run.safetensors"
    image.save(path)
    done = cli("run", art, "--image", path, "--out", out, "--num-look-close", "1")
    assert done.returncode == 0, done.stderr
    return load_file(str(out))


def assert_same(result, written: dict) -> None:
    assert np.array_equal(result.features, written["features"])
    assert np.array_equal(result.prob, written["prob"])
    for scale, selection in result.selection_maps.items():
        assert np.array_equal(selection, written[f"selection_map_{scale}"])


def rgb_forms(rgb: np.ndarray, path: Path) -> dict:
    """name -> (frame, channels): the same pixels in every form a caller may hold them."""
    chw = torch.from_numpy(rgb).permute(2, 0, 1)
    return {
        "path": (path, "rgb"),
        "str path": (str(path), "rgb"),
        "PIL": (Image.fromarray(rgb), "rgb"),
        "numpy RGB": (rgb, "rgb"),
        "numpy BGR": (np.ascontiguousarray(rgb[:, :, ::-1]), "bgr"),
        "numpy BGR, a strided view": (rgb[:, :, ::-1], "bgr"),
        "numpy RGBA": (np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)]), "rgba"),
        "numpy BGRA": (np.dstack([rgb[:, :, ::-1], np.zeros(rgb.shape[:2], np.uint8)]), "bgra"),
        "torch (H,W,3)": (torch.from_numpy(rgb), "rgb"),
        "torch (3,H,W)": (chw, "rgb"),
        "torch (3,H,W) BGR": (chw.flip(0), "bgr"),
    }


def gray_forms(gray: np.ndarray) -> list:
    return [gray, gray[:, :, None], torch.from_numpy(gray), torch.from_numpy(gray)[None], Image.fromarray(gray, "L")]


def test_every_rgb_frame_form_equals_ps3edge_run_on_the_file(art, encoder, rgb, tmp_path):
    """Each form's model input is the file's bit for bit (a deterministic session then gives the same
    features); the whole loop runs for a form of each kind against `ps3edge run`'s output."""
    written = cli_features(art, Image.fromarray(rgb), tmp_path)
    forms = rgb_forms(rgb, tmp_path / "frame.png")
    pixels = encoder._pipeline.pixels(tmp_path / "frame.png")
    for name, (frame, channels) in forms.items():
        assert np.array_equal(encoder._pipeline.pixels(frame, channels), pixels), name
    for name in ("path", "numpy BGR", "torch (3,H,W)"):
        frame, channels = forms[name]
        assert_same(encoder.run(frame, ONE_STEP, channels=channels), written), name


def test_grayscale_frames_equal_ps3edge_run_on_a_grayscale_file(art, encoder, rgb, tmp_path):
    gray = np.asarray(Image.fromarray(rgb).convert("L"))                 # (H, W)
    written = cli_features(art, Image.fromarray(gray, "L"), tmp_path)
    pixels = encoder._pipeline.pixels(tmp_path / "frame.png")
    assert all(np.array_equal(encoder._pipeline.pixels(frame), pixels) for frame in gray_forms(gray))
    assert_same(encoder.run(gray, ONE_STEP), written)


def test_a_batch_of_mixed_forms_equals_each_frame_alone(encoder, rgb):
    other = np.asarray(random_image(seed=4))
    batch = [rgb, torch.from_numpy(other), Image.fromarray(rgb)]
    results = encoder.run_batch(batch, ONE_STEP)
    assert [r.batch for r in results] == [3, 3, 3]
    for frame, result in zip(batch, results):           # within the batch tolerance, as test_batch.py
        alone = encoder.run(frame, ONE_STEP)
        assert np.abs(result.features - alone.features).max() <= defaults.BATCH_MAX_ABS_FP32
        assert np.abs(result.prob - alone.prob).max() <= 1e-6
        assert all(np.array_equal(a, b) for a, b in zip(result.plan.selection_maps, alone.plan.selection_maps))


def test_the_result_is_typed_and_says_how_it_ran(encoder, rgb):
    result = encoder.run(rgb, ps3edge.LookCloseSettings(num_look_close="2"))     # parsed as the CLI parses it
    assert isinstance(result, ps3edge.LookCloseResult)
    assert result.settings.num_look_close == 2 and result.num_steps == 2
    cfg = encoder.manifest.config
    assert result.features.shape == (1, result.features.shape[1], cfg.width) and result.features.dtype == np.float32
    assert result.prob.shape == (cfg.lowres_grid, cfg.lowres_grid)
    assert list(result.selection_maps) == list(cfg.scales[1:])
    assert {s: int(m.sum()) for s, m in result.selection_maps.items()} == \
        {int(k): v for k, v in result.tokens_each_scale.items() if k != "lowres"}
    assert result.tokens_each_scale["lowres"] == cfg.lowres_grid ** 2
    assert sum(result.tokens_each_scale.values()) == result.features.shape[1]
    assert {"preprocess", "lowres", "selector", "highres"} <= set(result.timings_ms)
    assert encoder.run(rgb).settings == ps3edge.LookCloseSettings()          # None: the artifact's defaults
    assert (encoder.backend, encoder.device, encoder.precision) == ("onnxruntime", "CPU EP", "fp32")


def test_device_preprocessing_of_every_torch_form_equals_pil(encoder, rgb):
    """Where the fast path runs, a torch frame is preprocessed where it lies (no host copy):
    bit-identical to PIL's resize for every form, RGB and grayscale (on CUDA where there is one)."""
    from ps3edge.runtime.frames import levels
    from ps3edge.runtime.preprocess import preprocess, preprocess_levels_on_device

    pre = encoder.manifest.preprocessing
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    for image, forms in ((rgb, [(f, c) for f, c in rgb_forms(rgb, Path()).values() if isinstance(f, torch.Tensor)]),
                         (gray, [(f, "rgb") for f in gray_forms(gray) if isinstance(f, torch.Tensor)])):
        want = preprocess(Image.fromarray(image), pre.size, pre.mean, pre.std)
        for frame, channels in forms:
            on_device = levels(frame.to(device), channels)
            assert on_device.device.type == device
            got = preprocess_levels_on_device(on_device, pre.size, pre.mean, pre.std)
            assert got.device.type == device and np.array_equal(got.cpu().numpy(), want)


# slow: the device-resident program built on the CPU takes ~10 s; the test above covers its preprocessing
@pytest.mark.slow
def test_the_fast_path_keeps_a_torch_frame_on_its_device_and_agrees_with_pil(art, rgb):
    from ps3edge.api import Encoder
    from ps3edge.runtime.lookclose import Pipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with Encoder(Pipeline(art, "torch", device=device, fast=True, preprocess="device")) as enc:
        frame = torch.from_numpy(rgb).to(device)
        on_device = enc.run(frame, ONE_STEP)
        from_pil = enc.run(Image.fromarray(rgb), ONE_STEP)
        bgr = enc.run(frame.flip(-1), ONE_STEP, channels="bgr")
    assert np.array_equal(on_device.features, from_pil.features)
    assert np.array_equal(on_device.features, bgr.features)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")
def test_a_cuda_frame_on_the_onnxruntime_backend_equals_the_cpu_frame(encoder, rgb):
    assert np.array_equal(encoder.run(torch.from_numpy(rgb).cuda(), ONE_STEP).features,
                          encoder.run(rgb, ONE_STEP).features)


REFUSED = [
    (lambda f: f.astype(np.float32) / 255, r"numpy float32 array of shape \(240, 320, 3\).*8-bit levels"),
    (lambda f: torch.from_numpy(f).float(), r"torch float32 tensor of shape \(240, 320, 3\) on cpu.*8-bit levels"),
    (lambda f: f.astype(np.uint16), "numpy uint16 array.*8-bit levels"),
    (lambda f: f[None], r"shape \(1, 240, 320, 3\): a frame has 2 or 3 axes"),
    (lambda f: f[:, :, :2], r"shape \(240, 320, 2\): 2 channels; ps3edge takes a path"),
    (lambda f: np.dstack([f, f[:, :, :1]]), "4 channels; say channels='rgba' or 'bgra'"),
    (lambda f: f[:0], r"shape \(0, 320, 3\): it is empty"),
    (lambda f: torch.zeros(5, 8, 8, dtype=torch.uint8), "neither its first nor its last axis holds 1, 3 or 4"),
    (lambda f: f.tolist(), "cannot read a frame from a builtins.list; ps3edge takes a path"),
    (lambda f: 42, "cannot read a frame from a builtins.int"),
    (lambda f: b"\x89PNG", "cannot read a frame from a builtins.bytes"),
]


@pytest.mark.parametrize("make, message", REFUSED)
def test_a_refused_frame_is_one_line_naming_what_was_given(encoder, rgb, make, message):
    with pytest.raises(ps3edge.Ps3EdgeError, match=message) as refused:
        encoder.run(make(rgb))
    assert "\n" not in str(refused.value)


def test_refused_calls_name_the_mistake(encoder, rgb, tmp_path):
    cases = [
        (lambda: encoder.run(rgb, channels="BGR"), "channels must be one of rgb, bgr, rgba, bgra, got 'BGR'"),
        (lambda: encoder.run(rgb, channels="rgba"), "3 channels, but channels='rgba' says 4"),
        (lambda: encoder.run(tmp_path / "missing.png"), "image not found"),
        (lambda: encoder.run(rgb, settings={"num_look_close": 2}), "settings must be a ps3edge.LookCloseSettings"),
        (lambda: encoder.run(rgb, ps3edge.LookCloseSettings(num_look_close=0)), "NUM_LOOK_CLOSE must be between"),
        (lambda: encoder.run_batch(rgb), "run_batch takes a list of frames; use run"),
        (lambda: encoder.run_batch([]), "at least one frame"),
        (lambda: encoder.run(rgb, prompt_embedding=np.ones(3)), "prompt embedding must hold"),
    ]
    for call, message in cases:
        with pytest.raises(ps3edge.Ps3EdgeError, match=message):
            call()


def test_load_refuses_what_is_not_an_artifact_and_a_closed_encoder_refuses_to_run(art, rgb, tmp_path):
    with pytest.raises(ps3edge.Ps3EdgeError):
        ps3edge.load(tmp_path)
    with pytest.raises(ps3edge.Ps3EdgeError, match="unknown backend"):
        ps3edge.load(art, backend="tensorflow")
    with ps3edge.load(art) as enc:
        pass
    with pytest.raises(ps3edge.Ps3EdgeError, match="closed"):
        enc.run(rgb)


def test_import_ps3edge_is_light_and_exports_a_typed_api():
    """`import ps3edge` loads neither torch nor onnxruntime; every name of __all__ resolves; py.typed ships."""
    code = ("import sys, ps3edge; assert 'torch' not in sys.modules and 'onnxruntime' not in sys.modules, sys.modules.keys();"
            "[getattr(ps3edge, n) for n in ps3edge.__all__]; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "ok", done.stderr
    assert {"load", "Encoder", "LookCloseSettings", "LookCloseResult", "Ps3EdgeError"} <= set(ps3edge.__all__)
    assert (Path(ps3edge.__file__).parent / "py.typed").is_file()
    with pytest.raises(AttributeError):
        ps3edge.no_such_name


def test_load_of_a_vila_hd_artifact_opens_its_ps3_encoder(vila_art, rgb):
    with ps3edge.load(vila_art) as enc:
        assert enc.artifact == Path(vila_art) / "ps3"
        assert enc.run(rgb, ONE_STEP).features.shape[-1] == enc.manifest.config.width
