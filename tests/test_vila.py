"""VILA-HD end to end on `vila-hd-tiny`: checkpoint layout, the exported LLM against transformers,
generation, the exported pipeline against the torch one, token counts, the context rule, `chat`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import random_image
from ps3edge.errors import Ps3EdgeError
from ps3edge.llm.engine import DecoderLLM, OnnxLLM, TorchLLM, export_llm
from ps3edge.llm.generate import SamplingConfig, generate, pick_token
from ps3edge.llm.export import export_vila
from ps3edge.llm.pipeline import VilaPipeline
from ps3edge.llm.tokenizer import IMAGE_TOKEN, QWEN2_CHAT_TEMPLATE
from ps3edge.llm.vila import build_vila, load_vila, save_vila
from ps3edge.runtime.planning import settings_from_env
from test_cli import cli, clean_env

LOGIT_TOL = 1e-3                      # fp32, max abs


@pytest.fixture(scope="module")
def tiny():
    return build_vila("vila-hd-tiny")


@pytest.fixture(scope="module")
def pipelines(vila_art):
    return {b: VilaPipeline(vila_art, b) for b in ("onnxruntime", "torch")}


# --- checkpoint layout --------------------------------------------------------------------------

def test_checkpoint_round_trip(tiny, tmp_path):
    save_vila(tiny, tmp_path / "ck")
    for sub in ("llm/config.json", "llm/model.safetensors", "llm/tokenizer.json", "vision_tower/model.safetensors",
                "mm_projector/config.json", "mm_projector/model.safetensors", "config.json"):
        assert (tmp_path / "ck" / sub).is_file(), sub
    from safetensors import safe_open
    with safe_open(str(tmp_path / "ck/mm_projector/model.safetensors"), "pt") as f:
        assert {k.rsplit(".", 1)[0] for k in f.keys()} == {"layers.1", "layers.2", "layers.4", "top_down_prompt_head"}
    back = load_vila(tmp_path / "ck")
    for a, b in [(tiny.llm, back.llm), (tiny.projector, back.projector), (tiny.top_down_head, back.top_down_head),
                 (tiny.ps3.model, back.ps3.model)]:
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    chat = [{"role": "user", "content": IMAGE_TOKEN + "What is this? ünïcode"}]
    ids = tiny.tokenizer.apply_chat_template(chat, add_generation_prompt=True)
    assert back.tokenizer.apply_chat_template(chat, add_generation_prompt=True) == ids
    assert tiny.tokenizer.decode(ids).endswith("<|im_start|>user\n<image>What is this? ünïcode<|im_end|>\n"
                                               "<|im_start|>assistant\n")
    assert back.tokenizer.chat_template == QWEN2_CHAT_TEMPLATE
    assert back.context_length == tiny.context_length == 8192
    assert back.llm.config.num_key_value_heads == 2 and back.llm.config.num_attention_heads == 4


def test_bad_checkpoints_are_refused_in_one_line(tiny, tmp_path):
    save_vila(tiny, tmp_path / "ck")
    (tmp_path / "ck/mm_projector/model.safetensors").unlink()
    with pytest.raises(Ps3EdgeError, match="no .safetensors"):
        load_vila(tmp_path / "ck")
    with pytest.raises(Ps3EdgeError, match="not a VILA-HD checkpoint: no llm/"):
        load_vila(tmp_path / "ck" / "vision_tower")
    with pytest.raises(Ps3EdgeError, match="neither a VILA-HD preset"):
        build_vila(str(tmp_path / "nowhere"))


# --- the exported LLM against transformers ------------------------------------------------------

def test_onnx_llm_matches_transformers_prefill_and_decode(tiny, tmp_path):
    path = export_llm(tiny.llm, tmp_path / "llm.onnx")
    ref, ours, onnx = TorchLLM(tiny.llm), DecoderLLM(tiny.llm), OnnxLLM(path)
    rng = np.random.default_rng(0)
    prompt = tiny.llm.get_input_embeddings().weight[torch.from_numpy(rng.integers(0, 260, 41))].detach().numpy()
    worst = []
    outs = [e.prefill(prompt) for e in (ref, ours, onnx)]
    for step in range(8):                                       # prefill, then 7 greedy decode steps
        for o in outs[1:]:
            worst.append(float(np.abs(o.logits - outs[0].logits).max()))
            assert np.abs(o.logits - outs[0].logits).max() <= LOGIT_TOL, step
            assert np.abs(o.hidden - outs[0].hidden).max() <= LOGIT_TOL, step
        if step == 7:
            break
        token = int(np.argmax(outs[0].logits))
        emb = tiny.llm.get_input_embeddings().weight[token].detach().numpy()
        outs = [e.decode(emb) for e in (ref, ours, onnx)]
    assert onnx.length == ours.length == 41 + 7
    print("max abs logit diff per step:", worst)
    # chunked prefill (past > 0, several new positions) is the same graph
    onnx.reset()
    onnx.prefill(prompt[:20])
    chunked = onnx.prefill(prompt[20:])
    ref.reset()
    assert np.abs(chunked.logits - ref.prefill(prompt).logits).max() <= LOGIT_TOL


def test_generation_greedy_sampling_stop_tokens(tiny, tmp_path):
    engines = [TorchLLM(tiny.llm), OnnxLLM(export_llm(tiny.llm, tmp_path / "llm.onnx"))]
    table = tiny.llm.get_input_embeddings().weight.detach().numpy()
    prompt = table[[257, 70, 71, 72, 258]]
    embed = lambda t: table[t]                                                  # noqa: E731
    greedy = [generate(e, prompt, embed, SamplingConfig(max_new_tokens=10)) for e in engines]
    assert greedy[0].token_ids == greedy[1].token_ids and len(greedy[0].token_ids) == 10
    assert greedy[0].stop_reason == "max_new_tokens"
    # stopping on a token: it is not emitted
    first = greedy[0].token_ids[0]
    stopped = generate(engines[1], prompt, embed, SamplingConfig(max_new_tokens=10, stop_token_ids=(greedy[0].token_ids[3],)))
    assert stopped.stop_reason == "stop_token" and stopped.token_ids == greedy[0].token_ids[:greedy[0].token_ids.index(greedy[0].token_ids[3])]
    assert first == greedy[1].token_ids[0]
    # sampling: reproducible per seed, the same on both engines, and a different seed differs
    hot = SamplingConfig(max_new_tokens=12, temperature=1.5, top_p=0.95, seed=7)
    a, b = (generate(e, prompt, embed, hot).token_ids for e in engines)
    assert a == b == generate(engines[1], prompt, embed, hot).token_ids
    assert a != generate(engines[1], prompt, embed, SamplingConfig(12, 1.5, 0.95, seed=8)).token_ids
    # a top-p so small it keeps one token is greedy
    assert generate(engines[1], prompt, embed, SamplingConfig(10, 1.0, 1e-9, 3)).token_ids == greedy[0].token_ids
    logits = np.array([0.0, 3.0, 3.0, 1.0], np.float32)
    assert pick_token(logits, SamplingConfig(), np.random.default_rng(0)) == 1          # ties: lowest id
    with pytest.raises(Ps3EdgeError, match="top-p"):
        SamplingConfig(top_p=0).validate()


# --- the pipeline: exported vs torch ----------------------------------------------------------

# slow: six steps ("6", as the environment gives it) repeats in more steps what two steps check, in both
# modes; every step at 1.5K (six) through the exported pipeline is test_every_patch_selected_gives_vila_hd_count
CASES = [(1, "What is written on the sign?", 1), (2, "How many cars are there?", 2),
         pytest.param(4, "Colour of the door", "6", marks=pytest.mark.slow)]


@pytest.mark.parametrize("mode", ["after_prompt", "after_image"])
@pytest.mark.parametrize("seed,question,steps", CASES)
def test_exported_pipeline_equals_torch_token_for_token(pipelines, mode, seed, question, steps):
    image = random_image(seed=seed, width=300 + 40 * seed, height=200 + 30 * seed)
    settings = settings_from_env({}, num_look_close=steps, mode=mode)
    runs = {b: p.answer(image, question, settings, SamplingConfig(max_new_tokens=12)) for b, p in pipelines.items()}
    onnx, ref = runs["onnxruntime"], runs["torch"]
    assert onnx.token_ids == ref.token_ids and len(onnx.token_ids) > 0
    assert onnx.tokens == ref.tokens
    for a, b in zip(onnx.selection_maps, ref.selection_maps):
        assert np.array_equal(a, b)
    if mode == "after_prompt":
        assert np.abs(onnx.prompt_embedding - ref.prompt_embedding).max() < 1e-4
    else:
        assert onnx.prompt_embedding is None and ref.prompt_embedding is None
    t = onnx.tokens
    assert t["lowres"] == 196 and t["newline"] == 1
    assert t["image"] == 196 + sum(t["highres"].values()) + 1
    assert t["prompt"] == t["text"] + t["image"]
    print(mode, seed, steps, onnx.token_ids)


def test_top_down_prompt_follows_the_question(pipelines):
    p = pipelines["onnxruntime"]
    image = random_image(seed=5)
    settings = settings_from_env({}, num_look_close=1, mode="after_prompt")
    a = p.answer(image, "Where is the exit?", settings, SamplingConfig(max_new_tokens=1))
    b = p.answer(image, "Read the small print at the bottom.", settings, SamplingConfig(max_new_tokens=1))
    assert np.abs(a.prompt_embedding - b.prompt_embedding).max() > 1e-2
    assert np.abs(a.prompt_embedding - p.ps3.prior_prompt[0]).max() > 1e-2


def test_every_patch_selected_gives_vila_hd_count(pipelines):
    # 1.5K, NUM_LOOK_CLOSE=all: every 2x2 cell is full -> 196 + 729 + 2916 (+ the newline)
    ans = pipelines["onnxruntime"].answer(random_image(seed=6), "Describe.", settings_from_env({}, num_look_close="all"),
                                          SamplingConfig(max_new_tokens=1))
    assert ans.tokens["highres"] == {"756": 729, "1512": 2916}
    assert ans.tokens["image"] == 3841 + 1 and ans.tokens["ps3"] == 729 + 14580


# --- the context-length rule --------------------------------------------------------------------

@pytest.fixture(scope="module")
def short_context_art(tmp_path_factory):
    """vila-hd-tiny saved with a 2048-token context, exported from the checkpoint directory."""
    root = tmp_path_factory.mktemp("short")
    model = build_vila("vila-hd-tiny")
    model.context_length = 2048
    save_vila(model, root / "ck")
    export_vila(str(root / "ck"), root / "art")
    return root


def test_context_rule_refuses_requests_that_cannot_fit(short_context_art):
    p = VilaPipeline(short_context_art / "art", "torch")           # torch rebuilds from the checkpoint
    assert p.manifest.source["kind"] == "checkpoint"
    with pytest.raises(Ps3EdgeError) as e:
        p.answer(random_image(), "Where?", settings_from_env({}, num_look_close=6), SamplingConfig(max_new_tokens=2))
    msg = str(e.value)
    assert "\n" not in msg and "2048" in msg and "4864" in msg and "NUM_LOOK_CLOSE" in msg
    # 1 step needs 2560 / 4 + 1024 = 1664 <= 2048: runs
    ok = p.answer(random_image(), "Where?", settings_from_env({}, num_look_close=1), SamplingConfig(max_new_tokens=2))
    assert ok.tokens["generated"] <= 2
    assert p.check_context(settings_from_env({}, num_token_look_close=1000)) == 1000 // 4 + 1024
    with pytest.raises(Ps3EdgeError, match="at least 2274"):                   # 5000 // 4 + 1024
        p.check_context(settings_from_env({}, num_token_look_close=5000))


def test_vision_tower_is_built_once(short_context_art, tmp_path, monkeypatch):
    """Export and the torch pipeline use VILA-HD's own vision tower for the PS3 stages instead of
    loading the checkpoint's (or building the preset's) weights a second time."""
    import ps3edge.artifact.weights as weights
    import ps3edge.exporter.onnx_export as onnx_export
    from ps3edge.artifact.manifest import load_manifest
    from ps3edge.artifact.weights import rebuild_torch_model
    from ps3edge.model.weights import LoadedModel

    def refuse(*args, **kwargs):
        raise AssertionError("the PS3 model was built a second time")
    for module, name in ((weights, "build"), (weights, "load_checkpoint"), (onnx_export, "build")):
        monkeypatch.setattr(module, name, refuse)
    export_vila("vila-hd-tiny", tmp_path / "art", seed=3)
    p = VilaPipeline(short_context_art / "art", "torch")
    assert p.manifest.source["kind"] == "checkpoint"
    tower = p.ps3.stages["lowres"].model
    assert p.ps3.stages["highres"].model is tower

    # a tower that is not the artifact's is refused in one line
    other = build_vila("vila-hd-tiny", seed=5).ps3
    with pytest.raises(Ps3EdgeError, match="not the one the artifact was exported from"):
        rebuild_torch_model(load_manifest(tmp_path / "art" / "ps3", verify=False), other)
    same = build_vila("vila-hd-tiny", seed=3).ps3
    manifest = load_manifest(tmp_path / "art" / "ps3", verify=False)
    assert rebuild_torch_model(manifest, same) is same.model
    assert isinstance(same, LoadedModel)


# --- the chat command ---------------------------------------------------------------------------

def test_chat_cli_json_and_exit_codes(vila_art, short_context_art, tmp_path):
    img = tmp_path / "img.png"
    random_image(seed=2).save(img)
    env = clean_env(NUM_LOOK_CLOSE="1", LOOK_CLOSE_MODE="after_image")
    r = cli("chat", "--model-path", "vila-hd-tiny", "--artifacts", vila_art, "--text", "What is it?",
            "--media", img, "--max-new-tokens", "5", "--json", env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert {"answer", "token_ids", "stop_reason", "tokens", "timings_ms", "backend", "look_close_mode"} <= set(out)
    assert out["look_close_mode"] == "after_image"
    assert out["tokens"]["lowres"] == 196 and set(out["tokens"]["highres"]) == {"756", "1512"}
    assert {"lowres", "selector", "highres", "llm_prefill", "llm_decode"} <= set(out["timings_ms"])
    assert "llm_top_down" not in out["timings_ms"]
    # streamed (no --json), top-down by default, torch backend: the same tokens as the JSON run would give
    r2 = cli("chat", "--model-path", "vila-hd-tiny", "--artifacts", vila_art, "--text", "What is it?",
             "--media", img, "--max-new-tokens", "5", "--backend", "torch", env=clean_env(NUM_LOOK_CLOSE="1"))
    assert r2.returncode == 0, r2.stderr
    assert "low-res 196" in r2.stderr
    # errors: one line, exit 2
    bad = [
        (["--media", tmp_path / "missing.png"], clean_env()),
        (["--media", img, "--conv-mode", "llama_3"], clean_env()),
        (["--media", img, "--max-new-tokens", "0"], clean_env()),
        (["--media", img], clean_env(LOOK_CLOSE_MODE="sideways")),
    ]
    for extra, e in bad:
        r = cli("chat", "--model-path", "vila-hd-tiny", "--artifacts", vila_art, "--text", "x", *extra, env=e)
        assert r.returncode == 2, (extra, r.stderr)
        assert r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = cli("chat", "--model-path", short_context_art / "ck", "--artifacts", short_context_art / "art", "--text", "x",
            "--media", img, env=clean_env(NUM_LOOK_CLOSE="6"))
    assert r.returncode == 2 and "context length 2048" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = cli("chat", "--model-path", "vila-hd-tiny", "--media", img, env=clean_env())       # no --text
    assert r.returncode == 2


def test_4k_six_steps_count_on_the_real_geometry():
    """PS3-4K, NUM_LOOK_CLOSE=6 (85+341+2134 per step): 196 + 127 + 511 + 3200 = 4034 (+ newline).

    The published 4036 is 196 + 6 * 2560 / 4, as if every selected patch were a quarter cell; with
    the ranking cut in raster order inside equal-probability blocks, the last block of each scale is
    partial (510 = 127 * 4 + 2, 2046 = 127 * 16 + 14, 12804 = 128 * 100 + 4) and its loose patches
    form no full 2x2 cell: 0.5 + 0.5 + 1 = 2 cells fewer.
    """
    from ps3edge.model.projector import full_cells
    from ps3edge.runtime.planning import Geometry, plan, resolve
    geometry = Geometry(lowres_grid=27, highres_grids=(54, 108, 270), select_num_each_scale=(85, 341, 2134))
    prob = np.random.default_rng(0).permutation(729).reshape(27, 27).astype(np.float32) / 729   # distinct values
    the_plan = plan(prob, resolve(settings_from_env({}, num_look_close=6), geometry), geometry)
    assert the_plan.tokens_each_scale() == [510, 2046, 12804]
    cells = [int(full_cells(m).sum()) for m in the_plan.selection_maps]
    assert cells == [127, 511, 3200]
    assert 196 + sum(cells) == 4034 == 196 + 6 * 2560 // 4 - 2
