"""The VILA-HD projector / LLM TensorRT engines (engines/llm_engine.py, llm/engine.py TensorRTLLM):
profile bounds from a real exported vila-hd-tiny artifact, the cache key, `ps3edge build` and
`ps3edge chat --backend tensorrt` without TensorRT, and (where TensorRT and a GPU exist) the
engine against onnxruntime for prefill and each decode step."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from conftest import clean_env, cli, random_image
from ps3edge.engines.builder import BuildOptions
from ps3edge.engines.llm_engine import (DEFAULT_LLM_MAX_PROMPT, llm_profiles, max_prompt_for, plan_vila_build,
                                        projector_width)
from ps3edge.errors import Ps3EdgeError
from ps3edge.artifact.io import file_sha256
from ps3edge.artifact.vila import load_vila_manifest
from ps3edge.llm.pipeline import VilaPipeline
from test_engines import _need_gpu_tensorrt, tensorrt_missing


@pytest.fixture(scope="module")
def vila_manifest(vila_art):
    return load_vila_manifest(vila_art)


def snapshot(root):
    return {p.relative_to(root).as_posix(): file_sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


# --- profiles ------------------------------------------------------------------------------------
def test_llm_profiles_follow_the_exported_graph_and_context(vila_art, vila_manifest):
    c = vila_manifest.context_length
    profiles = llm_profiles(vila_manifest)
    m = min(c - 1, DEFAULT_LLM_MAX_PROMPT)
    assert max_prompt_for(vila_manifest) == m
    graph = onnx.load(str(vila_art / "llm.onnx"), load_external_data=False).graph
    dims = {i.name: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in i.type.tensor_type.shape.dim]
            for i in graph.input}
    for name, p in profiles.items():
        for tensor, b in p.items():
            for which in ("min", "opt", "max"):      # every static dimension is the graph's
                assert len(b[which]) == len(dims[tensor])
                assert all(d == s for d, s in zip(b[which], dims[tensor]) if isinstance(s, int) and s > 0), (name, tensor)
    pre, dec = profiles["prefill"], profiles["decode"]
    assert pre["inputs_embeds"]["min"][1] == 1 and pre["inputs_embeds"]["max"][1] == m
    assert pre["past_kv"]["min"][4] == 0 and pre["past_kv"]["opt"][4] == 0 and pre["past_kv"]["max"][4] == c - 1
    assert dec["inputs_embeds"]["min"][1] == dec["inputs_embeds"]["max"][1] == 1
    assert dec["past_kv"]["min"][4] == 1 and dec["past_kv"]["max"][4] == c - 1
    small = llm_profiles(vila_manifest, "100")
    assert small["prefill"]["inputs_embeds"]["max"][1] == 100 and small["decode"]["past_kv"]["opt"][4] == 100


@pytest.mark.parametrize("value", ["0", "-3", "x", 10 ** 9, True])
def test_max_prompt_out_of_range(vila_manifest, value):
    with pytest.raises(Ps3EdgeError, match="--max-prompt must be"):
        max_prompt_for(vila_manifest, value)


def test_plan_keys_and_profiles(vila_art, vila_manifest):
    w = projector_width(vila_art)
    plans = plan_vila_build(vila_manifest, BuildOptions(), "10.13.0.35", 90, w)
    proj, llm = plans
    assert [p.stage for p in plans] == ["projector", "llm"]
    assert proj.extra_profiles == () and proj.profile["cells"]["max"] == [max_prompt_for(vila_manifest), w]
    assert llm.profile == llm_profiles(vila_manifest)["prefill"]
    assert llm.extra_profiles == (llm_profiles(vila_manifest)["decode"],)
    assert llm.clear_flags == ("TF32",) and llm.flags == () and llm.precision == "fp32"
    assert llm.key_inputs["onnx_hashes"] == {"llm.onnx": vila_manifest.files["llm.onnx"]}
    same = plan_vila_build(vila_manifest, BuildOptions(), "10.13.0.35", 90, w)
    assert [p.key for p in same] == [p.key for p in plans]
    keys = {p.key for p in plans}
    for other in (plan_vila_build(vila_manifest, BuildOptions(), "10.13.0.35", 90, w, 64),
                  plan_vila_build(vila_manifest, BuildOptions(precision="fp16"), "10.13.0.35", 90, w),
                  plan_vila_build(vila_manifest, BuildOptions(), "10.3.0", 90, w),
                  plan_vila_build(vila_manifest, BuildOptions(), "10.13.0.35", 87, w),
                  plan_vila_build(vila_manifest, BuildOptions(workspace_gb=2), "10.13.0.35", 90, w)):
        assert not keys & {p.key for p in other}
    assert plan_vila_build(vila_manifest, BuildOptions(precision="fp16"), "10.3.0", 87, w)[1].flags == ("FP16",)
    assert llm.engine_file.startswith("llm.fp32.") and llm.engine_file.endswith(".engine")


@pytest.mark.parametrize("options, version, message", [
    (BuildOptions(precision="int8"), "10.3.0", "built at fp32 or fp16"),
    (BuildOptions(precision="best"), "10.3.0", "built at fp32 or fp16"),
    (BuildOptions(precision="fp16"), "11.0.0", "no FP16 builder flag"),
    (BuildOptions(via="torch-tensorrt"), "10.3.0", "use --via onnx"),
])
def test_plan_refuses_what_the_llm_cannot_be_built_as(vila_art, vila_manifest, options, version, message):
    with pytest.raises(Ps3EdgeError, match=message):
        plan_vila_build(vila_manifest, options, version, 87, projector_width(vila_art))


def test_tensorrt_pipeline_needs_engines(vila_art):
    with pytest.raises(Ps3EdgeError, match="has no TensorRT engine for projector, llm; build them"):
        VilaPipeline(vila_art, "tensorrt")


# --- without TensorRT ------------------------------------------------------------------------------
@pytest.mark.skipif(not tensorrt_missing(), reason="TensorRT is installed here: the refusal cannot happen")
def test_build_and_chat_without_tensorrt_exit_2_with_one_line_and_write_nothing(vila_art, tmp_path):
    before = snapshot(vila_art)
    env = clean_env(PS3EDGE_ENGINE_CACHE=str(tmp_path / "engine-cache"))
    for extra in ([], ["--precision", "fp16", "--max-prompt", "64"]):
        r = cli("build", vila_art, "--timing-cache", tmp_path / "timing.cache", *extra, env=env)
        assert r.returncode == 2, r.stderr
        lines = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: TensorRT is not installed here"), lines
    # a bad --max-prompt is refused before TensorRT is looked for
    r = cli("build", vila_art, "--max-prompt", "0", env=env)
    assert r.returncode == 2 and "--max-prompt must be" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    img = tmp_path / "img.png"
    random_image(seed=3).save(img)
    r = cli("chat", "--model-path", "vila-hd-tiny", "--artifacts", tmp_path / "new-art", "--text", "x",
            "--media", img, "--backend", "tensorrt", env=env)
    assert r.returncode == 2 and r.stderr.startswith("error: TensorRT is not installed here"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not r.stdout.strip()
    assert not (tmp_path / "new-art").exists()
    assert snapshot(vila_art) == before
    assert not (tmp_path / "engine-cache").exists() and not (tmp_path / "timing.cache").exists()


def test_vila_engine_entries_are_recorded_typed_and_checked(vila_art, vila_manifest, tmp_path):
    """The projector's and the LLM's entries as `ps3edge build` records them in vila.json (a PS3
    stage's entry without T_max, with the max prompt; the LLM's with the context and both profiles
    by name), read back as EngineEntry, and a hand-edited entry refused in one line."""
    import shutil

    from ps3edge.engines.llm_engine import _entry, record_vila_engines

    art = tmp_path / "art"
    shutil.copytree(vila_art, art)
    facts = {"tensorrt_version": "10.3.0", "cuda_version": "12.6", "gpu_name": "Orin", "sm": 87}
    entries = {}
    for plan in plan_vila_build(vila_manifest, BuildOptions(), "10.3.0", 87, projector_width(art), 8):
        (art / plan.engine_file).write_bytes(f"not really a {plan.stage} engine".encode())
        entries[plan.stage] = _entry(plan, BuildOptions(), facts, file_sha256(art / plan.engine_file),
                                     {"bindings": {}}, vila_manifest, 8)
    record_vila_engines(art, entries)
    manifest = load_vila_manifest(art, verify=True)
    llm, projector = manifest.engines["llm"], manifest.engines["projector"]
    assert dict(manifest.engines) == entries and llm.max_look_close is None and llm.max_prompt == 8
    assert llm.context_length == vila_manifest.context_length and set(llm.optimization_profiles) == {"prefill", "decode"}
    assert projector.context_length is None and projector.optimization_profiles is None
    raw = json.loads((art / "vila.json").read_text())
    assert list(raw["engines"]["llm"])[-3:] == ["max_prompt", "context_length", "optimization_profiles"]
    raw["engines"]["llm"]["sm"] = "87"
    (art / "vila.json").write_text(json.dumps(raw))
    with pytest.raises(Ps3EdgeError, match="engines.llm.sm is missing or not a int - rebuild the engines") as e:
        load_vila_manifest(art)
    assert "\n" not in str(e.value)


# --- with TensorRT (skipped here) ------------------------------------------------------------------
@pytest.fixture
def vila_copy(vila_art, tmp_path):
    import shutil
    dst = tmp_path / "art"
    shutil.copytree(vila_art, dst)
    return dst


def test_llm_engine_matches_onnxruntime_prefill_and_decode(vila_copy, tmp_path):
    _need_gpu_tensorrt()
    from ps3edge.engines.llm_engine import build_vila_engines
    from ps3edge.llm.engine import OnnxLLM, TensorRTLLM

    options = BuildOptions(engine_cache=tmp_path / "cache", timing_cache=tmp_path / "t.cache")
    manifest = build_vila_engines(vila_copy, options, max_prompt=8)      # small: the prompt is chunked
    assert set(manifest.engines) == {"projector", "llm"}
    load_vila_manifest(vila_copy, verify=True)                          # engine files are in files, hashed
    assert build_vila_engines(vila_copy, options, max_prompt=8).engines == manifest.engines
    entry = manifest.engines["llm"]
    assert set(entry.optimization_profiles) == {"prefill", "decode"}
    trt_llm = TensorRTLLM(vila_copy / entry.file, entry)
    ref = OnnxLLM(vila_copy / "llm.onnx")
    rng = np.random.default_rng(0)
    hidden = ref.hidden_size
    for llm in (trt_llm, ref):
        llm.reset()
    prompt = rng.standard_normal((19, hidden), dtype=np.float32)        # 3 chunks of <= 8, first with P = 0
    outs = [(a.prefill(prompt), b.prefill(prompt)) for a, b in [(trt_llm, ref)]]
    for _ in range(4):
        x = rng.standard_normal(hidden, dtype=np.float32)
        outs.append((trt_llm.decode(x), ref.decode(x)))
    for got, want in outs:
        assert np.abs(got.logits - want.logits).max() <= 1e-3
        assert np.abs(got.hidden - want.hidden).max() <= 1e-3
    assert trt_llm.length == ref.length == 23
    np.testing.assert_allclose(trt_llm.present().cpu().numpy(), ref.kv, atol=1e-3)


def test_chat_on_tensorrt_equals_onnxruntime(vila_copy, tmp_path):
    _need_gpu_tensorrt()
    img = tmp_path / "img.png"
    random_image(seed=4).save(img)
    env = clean_env(NUM_LOOK_CLOSE="1", PS3EDGE_ENGINE_CACHE=str(tmp_path / "cache"))
    assert cli("build", vila_copy, env=env).returncode == 0
    answers = {}
    for backend in ("onnxruntime", "tensorrt"):
        r = cli("chat", "--model-path", "vila-hd-tiny", "--artifacts", vila_copy, "--text", "What is it?",
                "--media", img, "--max-new-tokens", "5", "--json", "--backend", backend, env=env)
        assert r.returncode == 0, r.stderr
        answers[backend] = json.loads(r.stdout)["token_ids"]
    assert answers["tensorrt"] == answers["onnxruntime"]
