"""Values checked where they enter: PS3Config (presets, checkpoint config.json, a manifest's "model"), the
rest of manifest.json, preprocessor_config.json, checkpoint weights and vila.json. Each bad value is one
`error:` line naming the file and the field, never a traceback, a warning or a run that gives NaN."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from conftest import cli
from ps3edge.errors import Ps3EdgeError
from ps3edge.artifact.manifest import load_manifest
from ps3edge.exporter.onnx_export import export
from ps3edge.artifact.vila import load_vila_manifest
from ps3edge.model import load_checkpoint, preset, random_model, save_checkpoint
from ps3edge.model.config import PRESETS, PS3Config


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    both = result.stdout + result.stderr
    assert result.returncode == 2, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in both and "Warning" not in both, both
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


# --- PS3Config ----------------------------------------------------------------------------------

def test_every_preset_is_valid():
    for name in PRESETS:
        assert preset(name).validate() is not None


@pytest.mark.parametrize("changes, needle", [
    ({"width": 0}, "width must be a positive whole number, got 0"),
    ({"depth": 0}, "depth must be a positive whole number, got 0"),
    ({"num_heads": 0}, "num_heads must be a positive whole number, got 0"),
    ({"num_heads": -4}, "num_heads must be a positive whole number, got -4"),
    ({"mlp_dim": 0}, "mlp_dim must be a positive whole number"),
    ({"conv_hidden": 0}, "conv_hidden must be a positive whole number"),
    ({"conv_out": -1}, "conv_out must be a positive whole number"),
    ({"conv_depth": 0}, "conv_depth must be a positive whole number"),
    ({"conv_kernel": 0}, "conv_kernel must be a positive whole number, got 0"),
    ({"conv_kernel": 14}, "conv_kernel 14 gives a 108 x 108 selector grid"),
    ({"patch_size": 0}, "patch_size must be a positive whole number, got 0"),
    ({"patch_size": 2.5}, "patch_size must be a positive whole number, got 2.5"),
    ({"width": True}, "width must be a positive whole number, got True"),
    ({"scales": "abc"}, "scales must be a list of positive whole numbers, got 'abc'"),
    ({"scales": (378, 0, 1512)}, "scales must be a list of positive whole numbers"),
    ({"scales": (378, 756, 756)}, "scales must be at least two sizes in increasing order"),
    ({"select_num_each_scale": (0, 0)}, "select_num_each_scale must sum to 1..2560"),
    ({"select_num_each_scale": (2048, 2048)}, "select_num_each_scale must sum to 1..2560"),
    ({"select_layers": ()}, "select_layers [] must be one or more of 0..3"),
    ({"ln_eps": 0.0}, "ln_eps must be a number above 0"),
    ({"ln_eps": math.nan}, "ln_eps must be a number above 0"),
    ({"image_mean": (0.5, math.nan, 0.5)}, "image_mean must be 3 finite numbers"),
    ({"image_std": (0.5, 0.5)}, "image_std must be 3 finite numbers"),
    ({"image_std": (0.0, 0.0, 0.0)}, "image_std must be above 0"),
    ({"name": 7}, "name must be a string"),
])
def test_bad_config_value_is_refused_naming_the_field(changes, needle):
    with pytest.raises(Ps3EdgeError) as e:
        preset("ps3-tiny").replace(**changes)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_config_from_dict_names_missing_fields_and_refuses_non_objects():
    d = preset("ps3-tiny").to_dict()
    del d["width"], d["scales"]
    with pytest.raises(Ps3EdgeError, match="needs width, scales"):
        PS3Config.from_dict(d)
    with pytest.raises(Ps3EdgeError, match="must be an object, got list"):
        PS3Config.from_dict([1, 2])


# --- manifest.json ------------------------------------------------------------------------------

@pytest.fixture
def copy_of_tiny(artifacts, tmp_path) -> Path:
    art = tmp_path / "artifact"
    shutil.copytree(artifacts("ps3-tiny"), art)
    return art


STEPS = "defaults.num_look_close must be a whole number from 1 to 6, got "


@pytest.mark.parametrize("change, needle", [
    (lambda m: m["defaults"].update(num_look_close="abc"), STEPS + "'abc'"),
    (lambda m: m["defaults"].update(num_look_close=None), STEPS + "None"),
    (lambda m: m["defaults"].update(num_look_close=0), STEPS + "0"),
    (lambda m: m["defaults"].update(num_look_close=100), STEPS + "100"),
    (lambda m: m["defaults"].update(look_close_mode="bogus"), "defaults.look_close_mode must be one of after_prompt"),
    (lambda m: m.update(precision="int8"), "precision must be 'fp32'"),
    (lambda m: m.update(precision="bogus"), "precision must be 'fp32'"),
    (lambda m: m.update(opset="abc"), "opset must be a whole number >= 17, got 'abc'"),
    (lambda m: m.update(schema_version="1"), "schema version '1'; this ps3edge reads version 3"),
    (lambda m: m.update(schema_version=True), "schema version True"),
    (lambda m: m["model"].update(patch_size=0), "patch_size must be a positive whole number, got 0"),
    (lambda m: m["model"].update(scales="abc"), "scales must be a list of positive whole numbers, got 'abc'"),
    (lambda m: m["model"].update(num_heads=0), "num_heads must be a positive whole number"),
    (lambda m: m["model"].update(conv_kernel=0), "conv_kernel must be a positive whole number"),
    (lambda m: m["model"].update(image_std=[0, 0, 0]), "image_std must be above 0"),
    (lambda m: m["model"].pop("width"), "needs width"),
])
def test_hand_edited_manifest_value_is_refused_by_inspect(copy_of_tiny, change, needle):
    edit_json(copy_of_tiny / "manifest.json", change)
    assert_one_line_error(cli("inspect", copy_of_tiny), "manifest.json", needle)


def test_bad_default_steps_are_refused_by_run_and_lint(copy_of_tiny, image_file, tmp_path):
    # these used to reach engines/profiles.py and fail there with a ValueError
    edit_json(copy_of_tiny / "manifest.json", lambda m: m["defaults"].update(num_look_close="abc"))
    out = tmp_path / "features.safetensors"
    assert_one_line_error(cli("run", copy_of_tiny, "--image", image_file, "--out", out), "defaults.num_look_close")
    assert not out.exists()
    assert_one_line_error(cli("inspect", copy_of_tiny, "--lint"), "defaults.num_look_close")


def test_zero_patch_size_is_refused_by_run(copy_of_tiny, image_file, tmp_path):
    edit_json(copy_of_tiny / "manifest.json", lambda m: m["model"].update(patch_size=0))
    assert_one_line_error(cli("run", copy_of_tiny, "--image", image_file, "--out", tmp_path / "f.safetensors"),
                          "manifest.json", "patch_size")


# --- checkpoints --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("checkpoint") / "tiny"
    save_checkpoint(random_model(preset("ps3-tiny"), seed=5), path)
    return path


@pytest.fixture
def checkpoint(tiny_checkpoint, tmp_path) -> Path:
    """A copy of the tiny checkpoint to tamper with."""
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, path)
    return path


def test_zero_budget_checkpoint_is_refused_at_export(checkpoint, tmp_path):
    edit_json(checkpoint / "config.json", lambda c: c.update(max_select_num_each_scale=[0, 0]))
    out = tmp_path / "art"
    assert_one_line_error(cli("export", "--model", checkpoint, "--out", out),
                          str(checkpoint / "config.json"), "select_num_each_scale must sum to 1..2560")
    assert not out.exists()


@pytest.mark.parametrize("key", ["highres_selection_module_kernel_size", "highres_selection_module_hidden_dim",
                                 "highres_selection_module_out_dim", "highres_selection_module_depth"])
@pytest.mark.parametrize("value", [0, -2, "x"])
def test_bad_selector_size_in_config_json_names_the_key(checkpoint, key, value):
    edit_json(checkpoint / "config.json", lambda c: c.update({key: value}))
    with pytest.raises(Ps3EdgeError) as e:
        load_checkpoint(checkpoint)
    assert f"config.json: {key} must be a positive whole number, got {value!r}" in str(e.value)


def test_zero_kernel_checkpoint_gives_no_torch_warning(checkpoint, tmp_path):
    edit_json(checkpoint / "config.json", lambda c: c.update(highres_selection_module_kernel_size=0))
    assert_one_line_error(cli("export", "--model", checkpoint, "--out", tmp_path / "art"),
                          "highres_selection_module_kernel_size")


@pytest.mark.parametrize("config, needle", [
    ({"num_heads": 0}, "num_heads must be a positive whole number"),
    ({"ps3_scales": [378]}, "scales must be at least two sizes"),
    ({"ps3_scales": [378, 0]}, "scales must be a list of positive whole numbers"),
    ({"max_select_num": 0, "max_select_num_each_scale": None}, "select_num_each_scale must sum"),
    ({"select_based_on_layer": [0, "one"]}, "select_layers must be a list"),
])
def test_bad_config_json_value_names_the_file(checkpoint, config, needle):
    edit_json(checkpoint / "config.json", lambda c: c.update(config))
    with pytest.raises(Ps3EdgeError) as e:
        load_checkpoint(checkpoint)
    assert str(checkpoint / "config.json") in str(e.value) and needle in str(e.value)


@pytest.mark.parametrize("values, needle", [
    ({"image_std": [0, 0, 0]}, "image_std must be above 0"),
    ({"image_std": 0}, "image_std must be above 0"),
    ({"image_std": [0.5, -0.5, 0.5]}, "image_std must be above 0"),
    ({"image_mean": "abc"}, "image_mean must be 3 finite numbers (or one), got 'abc'"),
    ({"image_mean": [0.5, 0.5]}, "image_mean must be 3 finite numbers"),
    ({"image_mean": [0.5, None, 0.5]}, "image_mean must be 3 finite numbers"),
    ({"image_std": [0.5, float("nan"), 0.5]}, "image_std must be 3 finite numbers"),
])
def test_bad_preprocessor_config_names_that_file(checkpoint, values, needle):
    edit_json(checkpoint / "preprocessor_config.json", lambda p: p.update(values))
    with pytest.raises(Ps3EdgeError) as e:
        load_checkpoint(checkpoint)
    message = str(e.value)
    assert str(checkpoint / "preprocessor_config.json") in message and needle in message
    assert str(checkpoint / "config.json") not in message


def test_zero_std_is_refused_by_export(checkpoint, tmp_path):
    edit_json(checkpoint / "preprocessor_config.json", lambda p: p.update(image_std=[0, 0, 0]))
    assert_one_line_error(cli("export", "--model", checkpoint, "--out", tmp_path / "art"),
                          "preprocessor_config.json", "image_std")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weight_is_refused_naming_the_tensor(checkpoint, bad):
    tensors = load_file(checkpoint / "model.safetensors")
    tensors["vision_model.trunk.blocks.1.mlp.fc2.weight"][3, 5] = bad
    save_file(tensors, checkpoint / "model.safetensors")
    with pytest.raises(Ps3EdgeError) as e:
        load_checkpoint(checkpoint)
    assert "NaN or infinite" in str(e.value)
    assert "vision_model.trunk.blocks.1.mlp.fc2.weight" in str(e.value)


def test_nan_weight_is_refused_by_export(checkpoint, tmp_path):
    tensors = load_file(checkpoint / "model.safetensors")
    tensors["vision_model.prior_prompt"][0] = float("nan")
    save_file(tensors, checkpoint / "model.safetensors")
    out = tmp_path / "art"
    assert_one_line_error(cli("export", "--model", checkpoint, "--out", out), "vision_model.prior_prompt", "NaN")
    assert not out.exists()


def test_a_model_with_fewer_steps_exports_a_default_it_can_take(tmp_path):
    # two scales and a 2048 budget: 'all' is 2 steps, so the written default cannot be 6
    cfg = preset("ps3-tiny").replace(name="two-scale", scales=(378, 756), select_num_each_scale=(2048,))
    save_checkpoint(random_model(cfg), tmp_path / "ckpt")
    export(str(tmp_path / "ckpt"), tmp_path / "art")
    assert load_manifest(tmp_path / "art").look_close_defaults.num_look_close == cfg.max_look_close == 2


# --- vila.json ----------------------------------------------------------------------------------

@pytest.fixture
def vila_copy(vila_art, tmp_path) -> Path:
    art = tmp_path / "vila"
    shutil.copytree(vila_art, art)
    return art


@pytest.mark.parametrize("change, needle", [
    (lambda m: m.update(kind="bogus"), "kind must be 'vila-hd', got 'bogus'"),
    (lambda m: m.update(context_length="x"), "context_length must be a positive whole number, got 'x'"),
    (lambda m: m.update(context_length=0), "context_length must be a positive whole number, got 0"),
    (lambda m: m.pop("llm"), "lacks the 'llm' section"),
    (lambda m: m["llm"].update(vocab_size=0), "llm.vocab_size must be a positive whole number, got 0"),
    (lambda m: m["llm"].pop("num_kv_heads"), "llm.num_kv_heads must be a positive whole number, got None"),
    (lambda m: m["llm"].update(head_dim=-1), "llm.head_dim must be a positive whole number"),
    (lambda m: m.update(schema_version="1"), "has schema '1'"),
    (lambda m: m.update(files=["llm.onnx"]), "'files' must map file names"),
    (lambda m: m.update(source=None), "lacks the 'source' section"),
])
def test_bad_vila_manifest_is_refused(vila_copy, change, needle):
    edit_json(vila_copy / "vila.json", change)
    for verify in (False, True):
        with pytest.raises(Ps3EdgeError) as e:
            load_vila_manifest(vila_copy, verify=verify)
        assert "vila.json" in str(e.value) and needle in str(e.value) and "\n" not in str(e.value)


def test_vila_manifest_that_is_not_an_object(vila_copy):
    (vila_copy / "vila.json").write_text("[1, 2]")
    with pytest.raises(Ps3EdgeError, match="not a JSON object"):
        load_vila_manifest(vila_copy)


def test_bad_context_length_is_refused_by_chat(vila_copy, image_file):
    edit_json(vila_copy / "vila.json", lambda m: m.update(context_length="x"))
    result = cli("chat", "--model-path", "vila-hd-tiny", "--text", "what is this?", "--media", image_file,
                 "--artifacts", vila_copy)
    assert_one_line_error(result, "vila.json", "context_length")
