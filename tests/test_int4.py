"""The weight-only INT4 LLM of a VILA-HD artifact: `ps3edge calibrate VILA_ARTIFACT --precision int4`
(llm/int4*.py), its record in vila.json, its accuracy report, and `chat --precision int4`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import cli, clean_env, random_image
from ps3edge import defaults
from ps3edge.artifact.io import file_sha256
from ps3edge.artifact.vila import VILA_MANIFEST, load_vila_manifest
from ps3edge.errors import Ps3EdgeError
from ps3edge.llm.engine import OnnxLLM
from ps3edge.llm.int4 import (Int4Embedding, Int4Settings, _quantizer_module, dequantize_matmulnbits,
                              modelopt_int4_available, quantize_embedding, weight_matmuls)


@pytest.fixture(scope="module")
def calibrated(vila_art, tmp_path_factory):
    """A copy of the vila-hd-tiny artifact with its int4 precision, and the calibrate run's result."""
    art = tmp_path_factory.mktemp("int4") / "art"
    shutil.copytree(vila_art, art)
    return art, cli("calibrate", art, "--precision", "int4")


def _entry(art: Path) -> dict:
    return json.loads((art / VILA_MANIFEST).read_text())["precisions"]["int4"]


def test_calibrate_records_int4_in_vila_json(calibrated):
    art, r = calibrated
    assert r.returncode == 0, r.stderr + r.stdout
    assert "min logit cosine" in r.stdout and "pass" in r.stdout
    entry = _entry(art)
    assert entry["llm"] == defaults.INT4_FILE and entry["embed_tokens"] == defaults.INT4_EMBED_FILE
    assert entry["format"] == "MatMulNBits" and entry["report"] == "accuracy.int4.json"
    assert entry["settings"] == {"bits": 4, "block_size": defaults.INT4_BLOCK_SIZE,
                                 "symmetric": defaults.INT4_SYMMETRIC, "accuracy_level": 0, "quantized_nodes": 15}
    files = json.loads((art / VILA_MANIFEST).read_text())["files"]
    for name in (entry["llm"], *entry["external_data"], entry["embed_tokens"], entry["report"]):
        assert files[name] == file_sha256(art / name)
    manifest = load_vila_manifest(art, verify=True)         # integrity record and every sha256
    assert manifest.precisions["int4"].summary["pass"] is True
    assert not [p for p in art.iterdir() if ".ps3edge-" in p.name]          # no temporaries left
    shown = cli("inspect", art)
    assert shown.returncode == 0 and "LLM int4: llm.int4.onnx (MatMulNBits, block 32" in shown.stdout


def test_hand_edit_of_the_precisions_section_is_refused(calibrated, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(calibrated[0], art)
    data = json.loads((art / VILA_MANIFEST).read_text())
    data["precisions"]["int4"]["summary"]["pass"] = True
    data["precisions"]["int4"]["settings"]["block_size"] = 128
    (art / VILA_MANIFEST).write_text(json.dumps(data))
    with pytest.raises(Ps3EdgeError, match="section 'precisions' was edited"):
        load_vila_manifest(art)


def test_graph_holds_matmulnbits_and_no_float_weights(calibrated):
    art, _ = calibrated
    fp32 = onnx.load(str(art / "llm.onnx"))
    int4 = onnx.load(str(art / defaults.INT4_FILE))
    expected = weight_matmuls(fp32)
    assert "/lm_head/MatMul" in expected and len(expected) == 15
    assert weight_matmuls(int4) == []
    nbits = [n for n in int4.graph.node if n.op_type == "MatMulNBits"]
    assert sorted(n.name for n in nbits) == sorted(f"{name}_Q4" for name in expected)
    fp32_weights = {i.name for i in fp32.graph.initializer if len(i.dims) == 2}
    assert not fp32_weights & {i.name for i in int4.graph.initializer}          # no fp32 weight kept


def _identity_dequant(node, inits) -> np.ndarray:
    """What onnxruntime's MatMulNBits kernel multiplies by: the node alone fed the identity (K x K)."""
    k, n = (helper.get_node_attr_value(node, a) for a in ("K", "N"))
    graph = helper.make_graph([helper.make_node("MatMulNBits", ["a", *node.input[1:]], ["y"], domain="com.microsoft",
                                                **{a.name: helper.get_attribute_value(a) for a in node.attribute})],
                              "w", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [k, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [k, n])],
                              [inits[t] for t in node.input[1:]])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"a": np.eye(k, dtype=np.float32)})[0]


def test_dequantized_weights_equal_the_quantizers_own(calibrated):
    art, _ = calibrated
    fp32 = onnx.load(str(art / "llm.onnx"))
    weights = {n.name: numpy_helper.to_array(next(i for i in fp32.graph.initializer if i.name == n.input[1]))
               for n in fp32.graph.node if n.name in weight_matmuls(fp32)}
    int4 = onnx.load(str(art / defaults.INT4_FILE))
    inits = {i.name: i for i in int4.graph.initializer}
    nbits = _quantizer_module()
    quantizer = nbits.DefaultWeightOnlyQuantizer(nbits.DefaultWeightOnlyQuantConfig(
        block_size=defaults.INT4_BLOCK_SIZE, is_symmetric=defaults.INT4_SYMMETRIC))
    for node in (n for n in int4.graph.node if n.op_type == "MatMulNBits"):
        w = weights[node.name.removesuffix("_Q4")]
        packed, scales, zp = (numpy_helper.to_array(inits[t]) for t in node.input[1:4])
        ref_packed, ref_scales, ref_zp = quantizer.qbits_block_quant(w)        # the quantizer on the FP32 weight
        assert np.array_equal(packed, ref_packed) and np.array_equal(scales, ref_scales) and np.array_equal(zp, ref_zp)
        k, n = w.shape
        ours = dequantize_matmulnbits(packed, scales, zp, k, n, defaults.INT4_BLOCK_SIZE)
        assert np.array_equal(ours, _identity_dequant(node, inits)), node.name     # bit for bit, as the kernel
        step = np.repeat(scales.T, defaults.INT4_BLOCK_SIZE, axis=0)[:k]
        assert np.all(np.abs(ours - w) <= step + 1e-7), node.name          # within one quantization step


def test_symmetric_dequantization_matches_the_kernel(calibrated):
    """No zero points: MatMulNBits takes 8, and dequantize_matmulnbits does the same."""
    art, _ = calibrated
    fp32 = onnx.load(str(art / "llm.onnx"))
    w = numpy_helper.to_array(next(i for i in fp32.graph.initializer if list(i.dims) == [128, 64]))   # down_proj
    nbits = _quantizer_module()
    quantizer = nbits.DefaultWeightOnlyQuantizer(nbits.DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True))
    packed, scales, _ = quantizer.qbits_block_quant(w)
    inits = {"q": numpy_helper.from_array(packed, "q"), "s": numpy_helper.from_array(scales, "s")}
    node = helper.make_node("MatMulNBits", ["x", "q", "s"], ["y"], domain="com.microsoft", K=128, N=64, bits=4,
                            block_size=32)
    ours = dequantize_matmulnbits(packed, scales, None, 128, 64, 32)
    assert np.array_equal(ours, _identity_dequant(node, inits)) and np.abs(ours - w).max() < np.abs(w).max() / 7


def test_int4_embedding_is_exact_to_gather_block_quantized(calibrated):
    """Int4Embedding's rows are what onnxruntime's GatherBlockQuantized gives for the quantizer's
    own Gather quantization of the same table (quantize axis 1, the hidden axis)."""
    art, _ = calibrated
    table = np.load(art / "embed_tokens.npy")
    graph = helper.make_graph([helper.make_node("Gather", ["table", "ids"], ["rows"], name="g")], "e",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
                              [helper.make_tensor_value_info("rows", TensorProto.FLOAT, [None, table.shape[1]])],
                              [numpy_helper.from_array(table, "table")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    nbits = _quantizer_module()
    config = nbits.DefaultWeightOnlyQuantConfig(block_size=defaults.INT4_BLOCK_SIZE, is_symmetric=defaults.INT4_SYMMETRIC,
                                                op_types_to_quantize=("Gather",), quant_axes=(("Gather", 1),))
    quantizer = nbits.MatMulNBitsQuantizer(model, algo_config=config)
    quantizer.process()
    session = ort.InferenceSession(quantizer.model.model.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.arange(table.shape[0], dtype=np.int64)
    kernel = session.run(None, {"ids": ids})[0]
    stored = Int4Embedding.load(art / defaults.INT4_EMBED_FILE)
    assert stored.shape == table.shape and np.array_equal(stored[ids], kernel)
    assert np.array_equal(stored[[7, 3, 7]], kernel[[7, 3, 7]])
    # and the symmetric arithmetic too (signed nibbles, no zero points)
    sym = Int4Embedding(quantize_embedding(table, Int4Settings(block_size=32, symmetric=True)))
    assert np.abs(sym[ids] - table).max() <= np.abs(table).max() / 7


def test_onnxruntime_runs_the_int4_llm(calibrated):
    art, _ = calibrated
    table = Int4Embedding.load(art / defaults.INT4_EMBED_FILE)
    with OnnxLLM(art / defaults.INT4_FILE) as llm, OnnxLLM(art / "llm.onnx") as ref:
        out = llm.prefill(table[[1, 2, 3, 4]])
        step = llm.decode(table[[int(np.argmax(out.logits))]][0])
        base = ref.prefill(np.load(art / "embed_tokens.npy")[[1, 2, 3, 4]])
    assert out.logits.shape == base.logits.shape == (260,) and np.isfinite(step.logits).all()
    assert llm.closed


def test_report_is_written_and_in_range(calibrated):
    art, r = calibrated
    report = json.loads((art / "accuracy.int4.json").read_text())
    s = report["summary"]
    assert s == json.loads(json.dumps(_entry(art)["summary"]))             # vila.json records the same summary
    assert report["tolerance"] == {"min_logit_cosine": defaults.INT4_MIN_LOGIT_COSINE}
    assert len(report["prompts"]) == len(defaults.INT4_REPORT_PROMPTS) == s["prompts"]
    for p in report["prompts"]:
        assert len(p["logit_cosine"]) == len(p["top1_agree"]) == len(p["fp32_tokens"]) == defaults.INT4_REPORT_STEPS
        assert all(-1 <= c <= 1 for c in p["logit_cosine"] + p["hidden_cosine"])
        assert p["greedy_equal"] == (p["fp32_tokens"] == p["int4_tokens"])
    assert 0.9 < s["min_logit_cosine"] <= s["mean_logit_cosine"] <= 1 and 0 <= s["top1_agreement"] <= 1
    assert 0 <= s["greedy_equal"] <= s["prompts"] and s["pass"] == (s["min_logit_cosine"] >= defaults.INT4_MIN_LOGIT_COSINE)
    sizes = s["sizes"]
    assert sizes["llm"]["int4"] < sizes["llm"]["fp32"] / 3 and sizes["embed_tokens"]["int4"] < sizes["embed_tokens"]["fp32"] / 4
    assert sizes["llm"]["int4"] == (art / defaults.INT4_FILE).stat().st_size


def test_chat_int4_answers_through_the_cli(calibrated, tmp_path):
    art, _ = calibrated
    img = tmp_path / "img.png"
    random_image(seed=4).save(img)
    env = clean_env(NUM_LOOK_CLOSE="1")
    r = cli("chat", "--model-path", "vila-hd-tiny", "--artifacts", art, "--text", "What is it?", "--media", img,
            "--max-new-tokens", "4", "--precision", "int4", "--json", env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["precision"] == "int4" and len(out["token_ids"]) <= 4
    assert out["token_ids"] or out["stop_reason"] == "stop_token"
    streamed = cli("chat", "--model-path", "vila-hd-tiny", "--artifacts", art, "--text", "What is it?", "--media", img,
                   "--max-new-tokens", "4", "--precision", "int4", env=env)
    assert streamed.returncode == 0, streamed.stderr


@pytest.mark.parametrize("extra, says", [
    (["--precision", "int4"], "has no int4 LLM; run 'ps3edge calibrate"),
    (["--precision", "int3"], "unknown --precision 'int3'"),
    (["--precision", "int4", "--backend", "torch"], "--precision int4 runs on --backend onnxruntime"),
])
def test_missing_or_unsupported_precision_is_one_line(vila_art, tmp_path, extra, says):
    img = tmp_path / "img.png"
    random_image().save(img)
    r = cli("chat", "--model-path", "vila-hd-tiny", "--artifacts", vila_art, "--text", "x", "--media", img, *extra)
    assert r.returncode == 2 and says in r.stderr, r.stderr
    assert r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_calibrate_int4_refuses_what_it_cannot_quantize(vila_art, tmp_path):
    r = cli("calibrate", vila_art / "ps3", "--precision", "int4")          # a PS3 artifact: no LLM
    assert r.returncode == 2 and "is not one" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = cli("calibrate", vila_art, "--precision", "int4", "--block-size", "24")
    assert r.returncode == 2 and "power of two" in r.stderr, r.stderr
    r = cli("calibrate", vila_art, "--precision", "int4", "--images", tmp_path)
    assert r.returncode == 2 and "takes no --images" in r.stderr, r.stderr
    assert "precisions" not in json.loads((vila_art / VILA_MANIFEST).read_text())


def test_calibrate_twice_gives_the_same_files(calibrated, tmp_path):
    """Running it again replaces the entry; the onnxruntime route is deterministic, so it is idempotent."""
    art = tmp_path / "art"
    shutil.copytree(calibrated[0], art)
    before = json.loads((art / VILA_MANIFEST).read_text())
    r = cli("calibrate", art, "--precision", "int4")
    assert r.returncode == 0, r.stderr
    after = json.loads((art / VILA_MANIFEST).read_text())
    for name in (defaults.INT4_FILE, defaults.INT4_EMBED_FILE):
        assert after["files"][name] == before["files"][name]
    assert after["precisions"]["int4"]["settings"] == before["precisions"]["int4"]["settings"]
    load_vila_manifest(art, verify=True)


def test_large_llm_goes_to_external_data(vila_art, tmp_path, monkeypatch):
    """Above the exporter's threshold the INT4 weights go to llm.int4.onnx.data, listed and verified."""
    from ps3edge.llm.int4_calibrate import calibrate_int4

    art = tmp_path / "art"
    shutil.copytree(vila_art, art)
    monkeypatch.setattr(defaults, "EXTERNAL_DATA_THRESHOLD_BYTES", 1000)
    assert calibrate_int4(art, report=False) is None
    entry = load_vila_manifest(art, verify=True).precisions["int4"]
    assert entry.external_data == (defaults.INT4_FILE + ".data",) and entry.report is None
    with OnnxLLM(art / entry.llm) as llm:
        assert np.isfinite(llm.prefill(np.load(art / "embed_tokens.npy")[[5, 6]]).logits).all()


def test_modelopt_int4_awq_route(vila_art, tmp_path):
    if modelopt_int4_available() is None:
        pytest.skip("NVIDIA Model Optimizer is not installed here (its ONNX extra pins onnxruntime-gpu); "
                    "the INT4-AWQ route is written against its documented API and unrun")
    from ps3edge.llm.int4_calibrate import calibrate_int4

    art = tmp_path / "art"
    shutil.copytree(vila_art, art)
    rep = calibrate_int4(art, tool="modelopt")
    entry = load_vila_manifest(art, verify=True).precisions["int4"]
    assert entry.format == "QDQ" and rep.summary()["min_logit_cosine"] > 0.5
