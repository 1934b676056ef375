"""Weights: seeded presets, and checkpoints in the official save_pretrained layout, loaded or refused."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import clean_env
from conftest import cli as run_cli
from ps3edge import defaults
from ps3edge.errors import Ps3EdgeError
from ps3edge.model import PS3, build, load_checkpoint, preset, random_model, save_checkpoint


def cli(*args) -> subprocess.CompletedProcess:
    """The shared runner with COLUMNS=400: rich wraps at 80 columns when not on a terminal."""
    return run_cli(*args, env=clean_env(columns="400"))


def assert_same_state(a: torch.nn.Module | dict, b: torch.nn.Module | dict):
    sa = a if isinstance(a, dict) else a.state_dict()
    sb = b if isinstance(b, dict) else b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert sa[k].shape == sb[k].shape, k
        assert torch.equal(sa[k].float(), sb[k].float()), k


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def copy_checkpoint(src: Path, dst: Path, *, config=None, tensors=None) -> Path:
    """A copy of checkpoint `src` with its config.json and/or weights replaced."""
    shutil.copytree(src, dst)
    if config is not None:
        (dst / "config.json").write_text(json.dumps(config))
    if tensors is not None:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"))
    return dst


@pytest.fixture(scope="module")
def tiny_cfg():
    return preset("ps3-tiny")


@pytest.fixture(scope="module")
def ours(tiny_cfg) -> PS3:
    return random_model(tiny_cfg, seed=11)


@pytest.fixture(scope="module")
def official_dir(tmp_path_factory, ours) -> Path:
    """Written by the official PS3VisionModel.save_pretrained, plus num_heads (its model_name is no timm name)."""
    pytest.importorskip("ps3", reason="the official ps3-torch writes this checkpoint (the dev extra)")
    from ps3edge.reference import official_model

    path = tmp_path_factory.mktemp("official") / "ps3-tiny-official"
    official_model(ours).save_pretrained(str(path))
    config = json.loads((path / "config.json").read_text())
    assert "depth" not in config and "num_heads" not in config
    config["num_heads"] = 4
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


@pytest.fixture(scope="module")
def official_config(official_dir) -> dict:
    return json.loads((official_dir / "config.json").read_text())


@pytest.fixture(scope="module")
def official_tensors(official_dir) -> dict[str, torch.Tensor]:
    return read_tensors(official_dir / "model.safetensors")


# --- seeded presets ---------------------------------------------------------------------------

def test_same_seed_gives_the_same_weights(tiny_cfg):
    assert_same_state(random_model(tiny_cfg, seed=3), random_model(tiny_cfg, seed=3))
    assert_same_state(build("ps3-tiny", seed=3).model, random_model(tiny_cfg, seed=3))


def test_different_seeds_give_different_weights(tiny_cfg):
    a, b = random_model(tiny_cfg, seed=3).state_dict(), random_model(tiny_cfg, seed=4).state_dict()
    assert all(not torch.equal(a[k], b[k]) for k in a)


def test_build_records_the_preset_source():
    loaded = build("ps3-tiny", seed=9)
    assert loaded.source == {"kind": "preset", "name": "ps3-tiny", "seed": 9}
    assert loaded.cfg == preset("ps3-tiny")


def test_build_refuses_an_unknown_spec(tmp_path):
    with pytest.raises(Ps3EdgeError, match="ps3-tiny"):
        build("ps3-enormous")
    with pytest.raises(Ps3EdgeError, match="neither a preset"):
        build(str(tmp_path / "nowhere"))


# --- the official save_pretrained layout --------------------------------------------------------

def test_official_checkpoint_has_the_expected_layout(official_dir, official_tensors):
    assert (official_dir / "config.json").is_file() and (official_dir / "model.safetensors").is_file()
    assert all(k.startswith("vision_model.") for k in official_tensors)
    assert any(k.startswith("vision_model.trunk.attn_pool.") for k in official_tensors)   # ignored by us


def test_official_checkpoint_loads_with_identical_tensors(official_dir, ours, tiny_cfg):
    loaded = load_checkpoint(official_dir)
    assert_same_state(loaded.model, ours)
    assert loaded.cfg.to_dict() == {**tiny_cfg.to_dict(), "name": "ps3-tiny-official",
                                    "image_mean": list(defaults.CLIP_MEAN), "image_std": list(defaults.CLIP_STD)}
    assert loaded.source["kind"] == "checkpoint"
    assert loaded.source["path"] == str(official_dir.resolve())
    assert len(loaded.source["sha256"]) == 64


def test_official_checkpoint_model_computes_like_the_original(official_dir, ours):
    loaded = load_checkpoint(official_dir)
    pixels = torch.randn(1, 3, 1512, 1512, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = ours.lowres(pixels, (3,))
        b = loaded.model.lowres(pixels, (3,))
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_config_nested_under_vision_config(official_dir, official_config, ours, tmp_path):
    nested = {"model_type": "ps3", "vision_config": official_config,
              "text_config": {"hidden_size": 32}}
    path = copy_checkpoint(official_dir, tmp_path / "nested", config=nested)
    loaded = load_checkpoint(path)
    assert_same_state(loaded.model, ours)
    assert loaded.cfg.num_heads == 4 and loaded.cfg.select_num_each_scale == (512, 2048)


def test_text_model_keys_are_ignored(official_dir, official_tensors, ours, tmp_path):
    tensors = dict(official_tensors)
    tensors["text_model.token_embedding.weight"] = torch.zeros(10, 8)
    tensors["text_model.encoder.layers.0.mlp.fc1.weight"] = torch.zeros(4, 8)
    tensors["logit_scale"] = torch.ones(1)
    path = copy_checkpoint(official_dir, tmp_path / "with-text", tensors=tensors)
    assert_same_state(load_checkpoint(path).model, ours)


def test_sharded_checkpoint_with_an_index(official_dir, official_tensors, ours, tmp_path):
    path = tmp_path / "sharded"
    path.mkdir()
    shutil.copy(official_dir / "config.json", path / "config.json")
    keys = sorted(official_tensors)
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for name, part in halves.items():
        save_file({k: official_tensors[k].contiguous() for k in part}, str(path / name))
        weight_map.update({k: name for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_same_state(load_checkpoint(path).model, ours)


def test_depth_key_truncates_the_trunk(official_dir, official_config, ours, tmp_path):
    # a 3-block model: its selector must read blocks that exist, so select_based_on_layer changes too
    config = {**official_config, "depth": 3, "select_based_on_layer": [0, 1, 2, 2]}
    loaded = load_checkpoint(copy_checkpoint(official_dir, tmp_path / "depth3", config=config))
    assert loaded.cfg.depth == 3 and len(loaded.model.trunk.blocks) == 3
    state, full = loaded.model.state_dict(), ours.state_dict()
    assert not any(k.startswith("trunk.blocks.3.") for k in state)
    assert sorted(state) == sorted(k for k in full if not k.startswith("trunk.blocks.3."))
    for k in state:
        assert torch.equal(state[k], full[k]), k


@pytest.mark.parametrize("depth", [0, -1, 5])
def test_depth_outside_the_weights_is_refused(official_dir, official_config, tmp_path, depth):
    path = copy_checkpoint(official_dir, tmp_path / "bad-depth", config={**official_config, "depth": depth})
    with pytest.raises(Ps3EdgeError, match=rf"depth {depth}.*4 blocks"):
        load_checkpoint(path)


def test_missing_num_heads_with_an_unknown_model_name_is_refused(official_dir, official_config, tmp_path):
    # width 64 with no num_heads: guessing (say one 64-wide head) would load and silently compute wrong
    config = {k: v for k, v in official_config.items() if k != "num_heads"}
    path = copy_checkpoint(official_dir, tmp_path / "no-heads", config=config)
    with pytest.raises(Ps3EdgeError, match="num_heads"):
        load_checkpoint(path)


def test_preprocessor_config_mean_and_std_are_read(official_dir, tmp_path):
    path = copy_checkpoint(official_dir, tmp_path / "with-pp")
    (path / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "PS3ImageProcessor", "image_size": 1512,
         "image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6]}))
    cfg = load_checkpoint(path).cfg
    assert cfg.image_mean == (0.1, 0.2, 0.3) and cfg.image_std == (0.4, 0.5, 0.6)


def test_preprocessor_config_with_scalar_mean_and_std(official_dir, tmp_path):
    path = copy_checkpoint(official_dir, tmp_path / "scalar-pp")
    (path / "preprocessor_config.json").write_text(json.dumps({"mean": 0.5, "std": 0.5}))
    cfg = load_checkpoint(path).cfg
    assert cfg.image_mean == (0.5, 0.5, 0.5) and cfg.image_std == (0.5, 0.5, 0.5)


def test_without_preprocessor_config_the_clip_statistics_apply(official_dir):
    cfg = load_checkpoint(official_dir).cfg
    assert cfg.image_mean == defaults.CLIP_MEAN and cfg.image_std == defaults.CLIP_STD


# --- keys that do not match: one error that lists them -------------------------------------------

def test_missing_keys_are_listed(official_dir, official_tensors, tmp_path):
    tensors = {k: v for k, v in official_tensors.items()
               if k not in ("vision_model.prior_prompt", "vision_model.trunk.blocks.1.attn.proj.bias")}
    path = copy_checkpoint(official_dir, tmp_path / "missing", tensors=tensors)
    with pytest.raises(Ps3EdgeError) as e:
        load_checkpoint(path)
    message = str(e.value)
    assert "missing: prior_prompt, trunk.blocks.1.attn.proj.bias" in message
    assert "unexpected" not in message and "wrong shape" not in message and "\n" not in message


def test_unexpected_keys_are_listed(official_dir, official_tensors, tmp_path):
    tensors = {**official_tensors, "vision_model.trunk.blocks.0.attn.q_norm.weight": torch.ones(16),
               "vision_model.extra_head.weight": torch.ones(2, 2)}
    path = copy_checkpoint(official_dir, tmp_path / "unexpected", tensors=tensors)
    with pytest.raises(Ps3EdgeError) as e:
        load_checkpoint(path)
    message = str(e.value)
    assert "unexpected: extra_head.weight, trunk.blocks.0.attn.q_norm.weight" in message
    assert "missing" not in message


def test_mis_shaped_keys_are_listed_with_both_shapes(official_dir, official_tensors, tmp_path):
    tensors = {**official_tensors, "vision_model.trunk.blocks.2.mlp.fc2.weight": torch.zeros(64, 255),
               "vision_model.pos_emb_residual.1": torch.zeros(1, 11663, 64)}
    path = copy_checkpoint(official_dir, tmp_path / "misshaped", tensors=tensors)
    with pytest.raises(Ps3EdgeError) as e:
        load_checkpoint(path)
    message = str(e.value)
    assert "wrong shape" in message
    assert "trunk.blocks.2.mlp.fc2.weight (64, 255) != (64, 256)" in message
    assert "pos_emb_residual.1 (1, 11663, 64) != (1, 11664, 64)" in message


def test_missing_unexpected_and_mis_shaped_in_one_error(official_dir, official_tensors, tmp_path):
    tensors = {k: v for k, v in official_tensors.items() if k != "vision_model.prompt_proj_for_highres.bias"}
    tensors["vision_model.surplus"] = torch.ones(3)
    tensors["vision_model.prior_prompt"] = torch.ones(65)
    path = copy_checkpoint(official_dir, tmp_path / "all-three", tensors=tensors)
    with pytest.raises(Ps3EdgeError) as e:
        load_checkpoint(path)
    message = str(e.value)
    assert str(path) in message
    assert "missing: prompt_proj_for_highres.bias" in message
    assert "unexpected: surplus" in message
    assert "wrong shape: prior_prompt (65,) != (64,)" in message


def test_many_missing_keys_are_summarised(official_dir, official_tensors, tmp_path):
    tensors = {k: v for k, v in official_tensors.items() if not k.startswith("vision_model.selection_feature_proj.")
               and not k.startswith("vision_model.highres_selection_feature_module.")}
    path = copy_checkpoint(official_dir, tmp_path / "many-missing", tensors=tensors)
    with pytest.raises(Ps3EdgeError, match=r"missing: .* \(\+\d+ more\)"):
        load_checkpoint(path)


def test_weights_without_the_vision_model_prefix(official_dir, official_tensors, tmp_path):
    tensors = {k[len("vision_model."):]: v for k, v in official_tensors.items()}
    path = copy_checkpoint(official_dir, tmp_path / "no-prefix", tensors=tensors)
    with pytest.raises(Ps3EdgeError, match="vision_model"):
        load_checkpoint(path)


# --- broken files -------------------------------------------------------------------------------

def test_truncated_model_safetensors(official_dir, tmp_path):
    path = copy_checkpoint(official_dir, tmp_path / "truncated")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(Ps3EdgeError, match=r"cannot read weights .*model\.safetensors"):
        load_checkpoint(path)


@pytest.mark.parametrize("content", [b"", b"definitely not safetensors", b"\xff" * 64])
def test_corrupt_model_safetensors(official_dir, tmp_path, content):
    path = copy_checkpoint(official_dir, tmp_path / "corrupt")
    (path / "model.safetensors").write_bytes(content)
    with pytest.raises(Ps3EdgeError, match=r"cannot read weights .*model\.safetensors"):
        load_checkpoint(path)


def test_no_weights_file(official_dir, tmp_path):
    path = copy_checkpoint(official_dir, tmp_path / "no-weights")
    (path / "model.safetensors").unlink()
    with pytest.raises(Ps3EdgeError, match="no model.safetensors"):
        load_checkpoint(path)


def test_no_config_json(official_dir, tmp_path):
    path = copy_checkpoint(official_dir, tmp_path / "no-config")
    (path / "config.json").unlink()
    with pytest.raises(Ps3EdgeError, match="no config.json"):
        load_checkpoint(path)


@pytest.mark.parametrize("text, needle", [
    ("{ not json", "cannot read"),
    ("[1, 2, 3]", "not a JSON object"),
    ('{"vision_config": 7}', "vision_config"),
    ('{"num_heads": 4, "depth": "four"}', "invalid value"),
    ('{"num_heads": 4, "ps3_scales": null}', "invalid value"),
    ('{"num_heads": 5}', "not divisible by num_heads 5"),
])
def test_bad_config_json(official_dir, tmp_path, text, needle):
    path = copy_checkpoint(official_dir, tmp_path / "bad-config")
    (path / "config.json").write_text(text)
    with pytest.raises(Ps3EdgeError, match=needle) as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value)


# --- our own writer ---------------------------------------------------------------------------

def test_save_checkpoint_round_trips(tmp_path):
    cfg = preset("ps3-tiny-4k").replace(image_mean=(0.25, 0.5, 0.75), image_std=(0.2, 0.3, 0.4))
    model = random_model(cfg, seed=21)
    save_checkpoint(model, tmp_path / "ckpt")
    assert all(k.startswith("vision_model.") for k in read_tensors(tmp_path / "ckpt" / "model.safetensors"))
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.cfg.to_dict() == cfg.to_dict()
    assert_same_state(loaded.model, model)


def test_checkpoint_changed_after_loading_gives_another_digest(tmp_path, tiny_cfg):
    save_checkpoint(random_model(tiny_cfg, seed=1), tmp_path / "ckpt")
    first = load_checkpoint(tmp_path / "ckpt").source["sha256"]
    save_checkpoint(random_model(tiny_cfg, seed=2), tmp_path / "ckpt")
    assert load_checkpoint(tmp_path / "ckpt").source["sha256"] != first


# --- through the command line -------------------------------------------------------------------

def test_export_from_an_official_checkpoint_directory(official_dir, tmp_path, image_file):
    out = tmp_path / "art"
    result = cli("export", "--model", official_dir, "--out", out)
    assert result.returncode == 0, result.stderr
    written = json.loads((out / "manifest.json").read_text())
    assert written["source"]["kind"] == "checkpoint"
    assert written["source"]["path"] == str(official_dir.resolve())
    assert written["source"]["sha256"] == load_checkpoint(official_dir).source["sha256"]
    assert written["model"]["name"] == "ps3-tiny-official" and written["model"]["num_heads"] == 4
    assert written["preprocessing"]["mean"] == list(defaults.CLIP_MEAN)
    inspect = cli("inspect", out)
    assert inspect.returncode == 0 and f"checkpoint {official_dir.resolve()}" in " ".join(inspect.stdout.split())
    # the torch backend rebuilds the model from the checkpoint the manifest names
    features = tmp_path / "f.safetensors"
    run = cli("run", out, "--image", image_file, "--out", features, "--backend", "torch", "--num-look-close", "1")
    assert run.returncode == 0, run.stderr
    assert read_tensors(features)["features"].shape == (1, 729 + 2560, 64)


def test_export_from_a_checkpoint_with_mismatched_keys_fails_cleanly(official_dir, official_tensors, tmp_path):
    tensors = {k: v for k, v in official_tensors.items() if k != "vision_model.prior_prompt"}
    path = copy_checkpoint(official_dir, tmp_path / "broken", tensors=tensors)
    out = tmp_path / "art"
    result = cli("export", "--model", path, "--out", out)
    assert result.returncode == 2 and "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing: prior_prompt" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]
