"""The SigLIP2-based PS3 checkpoints (nvidia/PS3-*-SigLIP2, PS3_Lang-*-SigLIP2, the vision tower of
VILA-HD-8B-PS3-*-SigLIP2): written by the official ps3-torch in the published layout with a truncated
trunk (the real timm `vit_so400m_patch14_siglip_378`, 2 blocks), loaded by directory and by hub id from a
Hugging Face cache offline, exported and run against the official code loading the same files.
RADIO-based PS3 checkpoints are refused in one line."""

from __future__ import annotations

import contextlib
import copy
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from safetensors.torch import save_file

from conftest import random_image
from ps3edge import defaults
from ps3edge.errors import Ps3EdgeError
from ps3edge.metrics import feature_diff
from ps3edge.model import load_checkpoint, preset
from ps3edge.model.config import default_select_num_each_scale
from ps3edge.model.weights import Stored, config_from_checkpoint, seeded_init_
from test_bad_input import assert_one_line_error
from test_hub import COMMIT_MAIN, cli, hf_cache, put_snapshot  # noqa: F401  (hf_cache: a fixture)

ps3 = pytest.importorskip("ps3", reason="the official ps3-torch writes these checkpoints (the dev extra)")

# https://huggingface.co/nvidia/PS3-4K-SigLIP2/blob/main/config.json as published. Against the SigLIP
# ones it names the timm trunk vit_so400m_patch14_siglip_378 (not ..._384: the same shape, a 27 x 27
# pos_embed either way), gives max_select_num without max_select_num_each_scale, and its text tower
# is SigLIP2's (256000-token vocabulary, tanh GELU). The 1.5K ones differ in ps3_scales only.
PUBLISHED_4K = {
    "architectures": ["PS3Model"], "model_type": "ps3",
    "vision_config": {
        "architectures": ["PS3VisionModel"], "model_type": "ps3_vision_model",
        "model_name": "vit_so400m_patch14_siglip_378", "hidden_size": 1152, "pool": "map", "ps3": True,
        "ps3_scales": [378, 756, 1512, 3780], "select_based_on_layer": [0, 9, 18, 26], "min_select_num": 1,
        "max_select_num": 2560, "separate_pos_emb": True, "highres_selection_feature": True},
    "text_config": {
        "context_length": 64, "vocab_size": 256000, "hf_tokenizer_name": "timm/ViT-SO400M-14-SigLIP2-378",
        "tokenizer_kwargs": {"clean": "canonicalize"}, "width": 1152, "heads": 16, "layers": 27,
        "mlp_ratio": 3.7362, "no_causal_mask": True, "proj_bias": True, "pool_type": "last",
        "norm_kwargs": {"eps": 1e-06}, "act_kwargs": {"approximate": "tanh"}, "architectures": ["PS3TextModel"],
        "model_type": "ps3_text_model", "output_dim": 1152, "prompt_proj_dim": 1152}}
SCALES = {"1.5K": [378, 756, 1512], "4K": [378, 756, 1512, 3780]}
WIDTH, HEADS, DEPTH = 64, 4, 2          # the truncated trunk: timm's so400m with these sizes
SELECT_LAYERS = [0, 1, 1, 1]


def published(res: str) -> dict:
    cfg = copy.deepcopy(PUBLISHED_4K)
    cfg["vision_config"]["ps3_scales"] = SCALES[res]
    return cfg


@contextlib.contextmanager
def truncated_trunk(**sizes):
    """The official code builds its trunk with timm.create_model(model_name, ...): the real registry
    entry (vit_so400m_patch14_siglip_378: patch 14, img 378, map pool, exact GELU), `sizes` on top."""
    import timm
    real = timm.create_model
    timm.create_model = lambda name, **kwargs: real(name, **{**kwargs, **sizes})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        timm.create_model = real


def small_sizes(width: int) -> dict:
    return {"depth": DEPTH} if width == 1152 else {"depth": DEPTH, "embed_dim": width, "num_heads": HEADS}


def write_official(path: Path, res: str, width: int = WIDTH, seed: int = 5, vila_tower: bool = False) -> Path:
    """An official checkpoint in the published layout: PS3Model.save_pretrained (vision_model.* and
    text_model.*, a small text tower), the published config.json truncated to 2 blocks, and the official
    PS3ImageProcessor's preprocessor_config.json (mean = std = 0.5). `vila_tower`: VILA-HD's vision_tower/,
    PS3VisionModel.save_pretrained (flat config.json, vision_model.* only)."""
    from ps3.configuration_ps3 import PS3Config, PS3VisionConfig
    from ps3.image_processing_ps3 import PS3ImageProcessor
    from ps3.modeling_ps3 import PS3Model, PS3VisionModel

    config = published(res)
    vision, text = config["vision_config"], config["text_config"]
    vision["select_based_on_layer"] = SELECT_LAYERS
    if width != 1152:                     # no timm name gives these sizes: ps3edge is told the heads
        vision["num_heads"] = HEADS
    text.update(context_length=8, vocab_size=300, width=64, heads=4, layers=1, output_dim=width, prompt_proj_dim=width)
    with truncated_trunk(**small_sizes(width)):
        if vila_tower:
            model = PS3VisionModel(PS3VisionConfig(**vision)).eval()
        else:
            model = PS3Model(PS3Config(vision_config=vision, text_config=text)).eval()
    # SigLIP-like magnitudes, and pos_emb_residual (zeros in a fresh official model) non-zero
    seeded_init_(model.vision_model, seed, unit_noise=("prior_prompt",), small_noise=("pos_embed", "pos_emb_residual"))
    model.save_pretrained(str(path))
    if not vila_tower:
        (path / "config.json").write_text(json.dumps(config, indent=2))
    PS3ImageProcessor(image_size=SCALES[res][-1], mean=[0.5] * 3, std=[0.5] * 3).save_pretrained(str(path))
    return path


def official_from(path: Path, width: int = WIDTH):
    """The official PS3VisionModel.from_pretrained on the checkpoint's own files."""
    from ps3.modeling_ps3 import PS3VisionModel
    with truncated_trunk(**small_sizes(width)):
        return PS3VisionModel.from_pretrained(str(path)).eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """res -> an official 2-block, 64-wide checkpoint in the published SigLIP2 layout."""
    root = tmp_path_factory.mktemp("siglip2")
    return {res: write_official(root / res, res) for res in SCALES}


def assert_same_weights(loaded, official):
    written = official.vision_model.state_dict()
    kept = loaded.model.state_dict()
    assert set(written) - set(kept) == {k for k in written if k.startswith(("trunk.attn_pool.", "trunk.norm."))}
    for key, value in kept.items():
        assert torch.equal(value, written[key]), key


# --- the published config.json, parsed -------------------------------------------------------------

@pytest.mark.parametrize("res, name", [("1.5K", "ps3-1.5k"), ("4K", "ps3-4k")])
def test_the_published_siglip2_config_gives_the_real_architecture(tmp_path, res, name):
    """The published config.json with real-width weights' shapes: 16 heads from the timm name (no
    num_heads key), depth from the weights, the per-step budget split from max_select_num alone."""
    (tmp_path / "config.json").write_text(json.dumps(published(res)))
    f = tmp_path / "model.safetensors"
    tensors = {"trunk.pos_embed": Stored(f, (1, 729, 1152)),
               **{f"trunk.blocks.{i}.mlp.fc1.weight": Stored(f, (4304, 1152)) for i in range(27)}}
    cfg = config_from_checkpoint(tmp_path, tensors)
    real = preset(name)
    assert (cfg.width, cfg.depth, cfg.num_heads, cfg.mlp_dim, cfg.patch_size, cfg.ln_eps) == \
        (real.width, real.depth, real.num_heads, real.mlp_dim, real.patch_size, real.ln_eps) == (1152, 27, 16, 4304, 14, 1e-6)
    assert cfg.scales == real.scales and cfg.select_layers == (0, 9, 18, 26)
    assert cfg.select_num_each_scale == default_select_num_each_scale(real.scales, 2560)
    assert (cfg.conv_hidden, cfg.conv_out, cfg.conv_depth, cfg.conv_kernel) == (512, 512, 3, 28)


def test_a_width_the_timm_name_does_not_have_needs_num_heads(tmp_path):
    """vit_so400m_* is 1152 wide with 16 heads: 64-wide weights under that name are no guess."""
    config = published("1.5K")
    (tmp_path / "config.json").write_text(json.dumps(config))
    f = tmp_path / "model.safetensors"
    tensors = {"trunk.pos_embed": Stored(f, (1, 729, 64)), "trunk.blocks.0.mlp.fc1.weight": Stored(f, (239, 64))}
    with pytest.raises(Ps3EdgeError, match='names no known trunk 64 wide; add "num_heads"'):
        config_from_checkpoint(tmp_path, tensors)


# --- official checkpoints, by directory and by hub id -------------------------------------------------

@pytest.mark.parametrize("repo_id, res", [("nvidia/PS3-1.5K-SigLIP2", "1.5K"), ("nvidia/PS3-4K-SigLIP2", "4K"),
                                          ("nvidia/PS3_Lang-1.5K-SigLIP2", "1.5K"), ("nvidia/PS3_Lang-4K-SigLIP2", "4K")])
def test_siglip2_checkpoints_load_by_hub_id_offline(hf_cache, checkpoints, repo_id, res):
    from ps3edge.model import build

    snapshot = put_snapshot(hf_cache, repo_id, checkpoints[res], COMMIT_MAIN)
    loaded = build(repo_id)
    assert loaded.source["repo_id"] == repo_id and loaded.source["commit"] == COMMIT_MAIN
    cfg = loaded.cfg
    assert (cfg.width, cfg.depth, cfg.num_heads, cfg.mlp_dim) == (WIDTH, DEPTH, HEADS, int(WIDTH * 3.7362))
    assert list(cfg.scales) == SCALES[res] and list(cfg.select_layers) == SELECT_LAYERS
    assert cfg.image_mean == cfg.image_std == (0.5, 0.5, 0.5)      # the official processor's file
    assert cfg.select_num_each_scale == default_select_num_each_scale(cfg.scales, 2560)
    official = official_from(snapshot)
    assert_same_weights(loaded, official)
    assert load_checkpoint(checkpoints[res]).source["sha256"] == loaded.source["sha256"]     # by directory
    # what the installed reference makes of max_select_num alone: 1.5K splits evenly; at 4K ps3-torch
    # 0.1.3 floors every scale (85 + 341 + 2133 = 2559), upstream PS3 gives the last scale the rest
    theirs = tuple(official.vision_model.max_select_num_each_scale)
    if res == "1.5K":
        assert theirs == cfg.select_num_each_scale == (512, 2048)
    else:
        assert theirs[:2] == cfg.select_num_each_scale[:2] == (85, 341) and theirs[2] in (2133, 2134)


def test_export_run_and_parity_against_the_official_code(hf_cache, checkpoints, tmp_path):
    """`ps3edge export` by hub id, `ps3edge run`, against the official PS3VisionModel.from_pretrained and
    PS3ImageProcessor.from_pretrained on the same snapshot: the same selection, features within fp32
    tolerance; then `ps3edge parity` on the artifact."""
    from ps3.image_processing_ps3 import PS3ImageProcessor
    from ps3edge.reference import run_official

    snapshot = put_snapshot(hf_cache, "nvidia/PS3-1.5K-SigLIP2", checkpoints["1.5K"], COMMIT_MAIN)
    art, feats, img = tmp_path / "art", tmp_path / "feats.safetensors", tmp_path / "in.png"
    random_image().save(img)
    r = cli("export", "--model", "nvidia/PS3-1.5K-SigLIP2", "--out", art)
    assert r.returncode == 0, r.stderr
    r = cli("run", art, "--image", img, "--out", feats, "--num-look-close", "1")
    assert r.returncode == 0, r.stderr
    ours = load_file(str(feats))

    official = official_from(snapshot)
    pil = random_image()
    pixels = PS3ImageProcessor.from_pretrained(str(snapshot)).preprocess(pil)["pixel_values"][0][None].float()
    theirs = run_official(official, pixels, num_look_close=1, layer=defaults.DEFAULT_RUN_LAYER)
    for scale, m in zip(SCALES["1.5K"][1:], theirs.selection_maps):
        assert np.array_equal(ours[f"selection_map_{scale}"], m), scale
    assert ours["features"].shape == theirs.features.shape == (1, 729 + 2560, WIDTH)
    max_abs, min_cos = feature_diff(ours["features"], theirs.features)
    tol = defaults.TOLERANCES["fp32"]
    assert max_abs <= tol["max_abs"] and min_cos >= tol["min_cosine"], (max_abs, min_cos)

    r = cli("parity", "--artifacts", art, "--image", img, "--num-look-close", "1")
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_vila_hd_siglip2_checkpoint_loads_by_hub_id(hf_cache, tmp_path):
    """VILA-HD-8B-PS3-*-SigLIP2's layout: its vision_tower/ as the official PS3VisionModel writes it
    (flat config.json naming vit_so400m_patch14_siglip_378); here with vila-hd-tiny's LLM and projector."""
    import shutil
    from ps3edge.llm.vila import build_vila, save_vila

    ck = save_vila(build_vila("vila-hd-tiny", seed=4), tmp_path / "vila")
    shutil.rmtree(ck / "vision_tower")
    write_official(ck / "vision_tower", "1.5K", seed=7, vila_tower=True)
    assert json.loads((ck / "vision_tower" / "config.json").read_text())["model_name"] == "vit_so400m_patch14_siglip_378"
    snapshot = put_snapshot(hf_cache, "nvidia/VILA-HD-8B-PS3-1.5K-SigLIP2", ck, COMMIT_MAIN)
    vila = build_vila("nvidia/VILA-HD-8B-PS3-1.5K-SigLIP2")
    assert vila.source["repo_id"] == "nvidia/VILA-HD-8B-PS3-1.5K-SigLIP2"
    assert (vila.ps3.cfg.width, vila.ps3.cfg.num_heads, vila.ps3.cfg.depth) == (WIDTH, HEADS, DEPTH)
    assert_same_weights(vila.ps3, official_from(snapshot / "vision_tower"))


# --- RADIO: refused ----------------------------------------------------------------------------------

def test_a_radio_based_checkpoint_is_refused_in_one_line(tmp_path):
    """nvidia/PS3-*-C-RADIOv2's vision config says "radio": true (a RADIO trunk and its SigLIP adapter MLP)."""
    ck = tmp_path / "radio"
    ck.mkdir()
    config = published("1.5K")
    config["vision_config"].update(model_name="vit_large_patch16_224", radio=True, radio_adapter_mlp_version="v2",
                                   radio_adapter_mlp_input_dim=1024, radio_adapter_mlp_hidden_dim=1152,
                                   radio_adapter_mlp_output_dim=1152, radio_adapter_mlp_num_inner=1)
    (ck / "config.json").write_text(json.dumps(config))
    save_file({"vision_model.trunk.pos_embed": torch.zeros(1, 576, 1024),
               "vision_model.trunk.blocks.0.mlp.fc1.weight": torch.zeros(4096, 1024)}, str(ck / "model.safetensors"))
    out = tmp_path / "art"
    r = cli("export", "--model", ck, "--out", out)
    assert_one_line_error(r, "RADIO-based", '"radio": true', "SigLIP2", absent=[out])


# --- real width (slow) --------------------------------------------------------------------------------

@pytest.mark.slow
def test_parity_real_width_siglip2_4k_checkpoint(hf_cache, tmp_path):
    """The published 4K config at the real width (1152, 16 heads inferred from the timm name), 2 blocks:
    loaded by hub id with the official weights, then `ps3edge parity` against the official code."""
    src = write_official(tmp_path / "ck", "4K", width=1152, seed=3)
    assert "num_heads" not in json.loads((src / "config.json").read_text())["vision_config"]
    snapshot = put_snapshot(hf_cache, "nvidia/PS3-4K-SigLIP2", src, COMMIT_MAIN)
    loaded = load_checkpoint(snapshot)
    assert (loaded.cfg.width, loaded.cfg.num_heads, loaded.cfg.depth, loaded.cfg.mlp_dim) == (1152, 16, 2, 4304)
    assert_same_weights(loaded, official_from(snapshot, width=1152))
    img = tmp_path / "in.png"
    random_image().save(img)
    r = cli("parity", "--model", "nvidia/PS3-4K-SigLIP2", "--image", img, "--num-look-close", "1")
    assert r.returncode == 0, r.stdout + r.stderr
