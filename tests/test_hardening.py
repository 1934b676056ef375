"""Requests are checked against the artifact before any model work, and what ps3edge does that the
official processor does silently is said once."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import random_image
from ps3edge.errors import Ps3EdgeError
from ps3edge.runtime.planning import LookCloseSettings
from ps3edge.runtime.preprocess import NOTES, open_image


def no_model_work(*args, **kwargs):
    raise AssertionError("model work started before the request was checked")


def test_an_over_long_question_is_refused_before_any_model_work(vila_art, monkeypatch):
    from ps3edge.llm.pipeline import VilaPipeline

    pipeline = VilaPipeline(vila_art)
    monkeypatch.setattr(pipeline.ps3, "run_lowres", no_model_work)
    monkeypatch.setattr(pipeline.llm, "prefill", no_model_work)
    question = "What is written on the sign behind the second car, and in which language? " * 700   # ~50k characters
    with pytest.raises(Ps3EdgeError, match=r"the prompt could take \d+ positions .* context is 8192") as e:
        pipeline.answer(random_image(), question, LookCloseSettings(num_look_close=2))
    assert "\n" not in str(e.value)


def test_a_question_that_fits_is_answered(vila_art):
    from ps3edge.llm.generate import SamplingConfig
    from ps3edge.llm.pipeline import VilaPipeline

    answer = VilaPipeline(vila_art).answer(random_image(), "What is here? " * 100, LookCloseSettings(num_look_close=1),
                                           SamplingConfig(max_new_tokens=2))
    assert answer.tokens["text"] > 300 and answer.tokens["prompt"] < 8192


# --- said once ---------------------------------------------------------------------------------------
def test_multi_page_tiff_and_rotated_jpeg_are_noted(tmp_path):
    pages = [random_image(40, 30, seed=k) for k in range(4)]
    pages[0].save(tmp_path / "scan.tiff", save_all=True, append_images=pages[1:])
    tiff = open_image(tmp_path / "scan.tiff")
    assert tiff.info[NOTES] == ["scan.tiff has 4 frames; only the first is used, as the official processor does"]
    assert np.array_equal(np.asarray(tiff.convert("RGB")), np.asarray(pages[0]))

    exif = Image.Exif()
    exif[0x0112] = 8                                                      # rotated 270 degrees
    random_image(40, 30).save(tmp_path / "cam.jpg", exif=exif, quality=95)
    kept = open_image(tmp_path / "cam.jpg")
    assert kept.size == (40, 30) and "--exif-transpose applies it" in kept.info[NOTES][0]
    turned = open_image(tmp_path / "cam.jpg", exif_transpose=True)
    assert turned.size == (30, 40) and turned.info[NOTES] == ["cam.jpg: EXIF orientation applied (rotated 270 degrees)"]
    random_image(40, 30).save(tmp_path / "plain.png")
    assert open_image(tmp_path / "plain.png").info[NOTES] == []


# --- the manifest's defaults are what runs --------------------------------------------------------------
def test_out_of_range_steps_are_refused_before_the_lowres_stage(artifacts, monkeypatch):
    from ps3edge.runtime.lookclose import Pipeline

    pipeline = Pipeline(artifacts("ps3-tiny"))
    monkeypatch.setattr(pipeline, "run_lowres", no_model_work)
    for settings, needle in ((LookCloseSettings(num_look_close=7), "NUM_LOOK_CLOSE must be between 1 and 6"),
                             (LookCloseSettings(num_token_look_close=20000), "NUM_TOKEN_LOOK_CLOSE must be between"),
                             (LookCloseSettings(select_num_each_scale=(512, 2048, 1)), "SELECT_NUM_EACH_SCALE needs 2")):
        with pytest.raises(Ps3EdgeError, match=needle):
            pipeline.run(random_image(), settings)


def test_the_artifacts_default_step_count_is_the_one_run_takes(artifacts, tmp_path):
    import shutil

    from ps3edge.artifact.manifest import load_manifest
    from ps3edge.runtime.lookclose import Pipeline

    art = tmp_path / "art"
    shutil.copytree(artifacts("ps3-tiny"), art)
    manifest = load_manifest(art)
    assert manifest.look_close_defaults.num_look_close == 6 and manifest.look_close_defaults.look_close_mode is None
    manifest.replace(defaults={**manifest.to_dict()["defaults"], "num_look_close": 2}).write(art)
    with Pipeline(art) as pipeline:
        unset = pipeline.run(random_image(), LookCloseSettings())
        asked = pipeline.run(random_image(), LookCloseSettings(num_look_close=3))
    assert len(unset.plan.steps) == 2 and len(asked.plan.steps) == 3


def test_run_says_it_once_and_exif_transpose_applies_it(artifacts, tmp_path):
    from conftest import cli

    exif = Image.Exif()
    exif[0x0112] = 6                                                      # rotated 90 degrees
    random_image(320, 240).save(tmp_path / "cam.jpg", exif=exif, quality=95)
    plain = cli("run", artifacts("ps3-tiny"), "--image", tmp_path / "cam.jpg", "--out", tmp_path / "a.safetensors",
                "--num-look-close", "1")
    assert plain.returncode == 0, plain.stderr
    assert plain.stderr.strip().splitlines() == [
        "note: cam.jpg is rotated 90 degrees by its EXIF orientation, which is ignored as the official processor "
        "does; --exif-transpose applies it"]
    turned = cli("run", artifacts("ps3-tiny"), "--image", tmp_path / "cam.jpg", "--out", tmp_path / "b.safetensors",
                 "--num-look-close", "1", "--exif-transpose", "--overlay", tmp_path / "b.png")
    assert turned.returncode == 0, turned.stderr
    assert "EXIF orientation applied (rotated 90 degrees)" in turned.stderr
    assert Image.open(tmp_path / "b.png").size == (240, 320)             # the overlay is drawn on the upright image
