"""The TensorRT-compatibility lint: each seeded problem in a small graph is flagged, and only it;
our own exported stages lint clean; `ps3edge inspect --lint` exits non-zero on errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import cli as run_cli
from ps3edge.artifact.profiles import attention_step_limit, highres_rows
from ps3edge.errors import Ps3EdgeError
from ps3edge.exporter.lint import lint_artifacts, lint_model, parse_trt_version
from ps3edge.artifact.io import file_sha256
from ps3edge.artifact.manifest import load_manifest

F, I32, I64, F64 = TensorProto.FLOAT, TensorProto.INT32, TensorProto.INT64, TensorProto.DOUBLE


def model(nodes, inputs, outputs, initializers=(), opset=17):
    """A checked ONNX model from (name, type, shape) inputs / outputs."""
    graph = helper.make_graph(
        nodes, "seeded",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs],
        initializer=list(initializers))
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def const(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def only(report, check, severity="error"):
    """The report's findings are all of one check and severity; returns them."""
    assert report.findings, "expected a finding"
    got = {(f.check, f.severity) for f in report.findings}
    assert got == {(check, severity)}, [f.to_dict() for f in report.findings]
    return report.findings


def relu(x_shape=(2, 8), opset=17):
    return model([helper.make_node("Relu", ["X"], ["Y"], name="relu")],
                 [("X", F, list(x_shape))], [("Y", F, list(x_shape))], opset=opset)


# --- the seeded problems ------------------------------------------------------------------------
def test_a_clean_graph_has_no_findings():
    report = lint_model(relu())
    assert report.findings == [] and report.ok


def test_unsupported_op():
    m = model([helper.make_node("Det", ["X"], ["Y"], name="det")], [("X", F, [2, 3, 3])], [("Y", F, [2])])
    (f,) = only(lint_model(m), "op")
    assert (f.node, f.op) == ("det", "Det") and "not supported" in f.message


def test_op_newer_than_the_target_version():
    nodes = [helper.make_node("Constant", [], ["size"], value=const("s", np.array(8, np.int64))),
             helper.make_node("HannWindow", ["size"], ["W"], name="hann"),
             helper.make_node("Mul", ["X", "W"], ["Y"], name="mul")]
    m = model(nodes, [("X", F, [8])], [("Y", F, [8])])
    (f,) = only(lint_model(m, "10.3"), "op")
    assert f.op == "HannWindow" and "10.4" in f.message
    assert lint_model(m, "10.4").findings == []


def test_int64_graph_input():
    m = model([helper.make_node("Cast", ["X"], ["Y"], name="cast", to=F)], [("X", I64, [4])], [("Y", F, [4])])
    (f,) = only(lint_model(m), "int64")
    assert (f.node, f.op) == ("X", "input")


def test_int64_constant_beyond_int32():
    nodes = [helper.make_node("Cast", ["big"], ["bigf"], name="cast", to=F),
             helper.make_node("Mul", ["X", "bigf"], ["Y"], name="mul")]
    m = model(nodes, [("X", F, [4])], [("Y", F, [4])], [const("big", np.array([2 ** 40], np.int64))])
    (f,) = only(lint_model(m), "int64")
    assert "big" in f.message and str(2 ** 40) in f.message


def test_int64_max_as_slice_end_is_fine():
    nodes = [helper.make_node("Slice", ["X", "starts", "ends"], ["Y"], name="slice")]
    m = model(nodes, [("X", F, [8])], [("Y", F, [7])],
              [const("starts", np.array([1], np.int64)), const("ends", np.array([2 ** 63 - 1], np.int64))])
    assert lint_model(m).findings == []


def test_cast_to_int64_of_runtime_data():
    nodes = [helper.make_node("Cast", ["positions"], ["pos64"], name="cast", to=I64),
             helper.make_node("Gather", ["table", "pos64"], ["Y"], name="gather", axis=0)]
    m = model(nodes, [("positions", I32, [2, 8])], [("Y", F, [2, 8, 4])],
              [const("table", np.zeros((100, 4), np.float32))])
    (f,) = only(lint_model(m), "int64", "warning")
    assert (f.node, f.op) == ("cast", "Cast")


def test_topk_k_over_3840():
    def topk(k):
        node = helper.make_node("TopK", ["X", "K"], ["values", "indices"], name="topk", axis=-1)
        return model([node], [("X", F, [1, 10000])], [("values", F, [1, k])],
                     [const("K", np.array([k], np.int64))])
    (f,) = only(lint_model(topk(5000)), "topk")
    assert f.op == "TopK" and "5000" in f.message and "3840" in f.message
    assert lint_model(topk(3840)).findings == []


def test_unbounded_dynamic_dimension():
    m = relu(("B", 8))
    (f,) = only(lint_model(m), "dynamic-dim")
    assert f.node == "X" and "'B'" in f.message
    profile = {"X": {"min": [1, 8], "opt": [4, 8], "max": [16, 8]}}
    assert lint_model(m, profile=profile).findings == []


def test_dynamic_in_the_graph_but_static_in_the_declaration():
    m = relu(("B", 8))
    profile = {"X": {"min": [1, 8], "opt": [1, 8], "max": [1, 8]}}
    declared = {"X": {"name": "X", "dtype": "float32", "shape": [1, 8]}}
    (f,) = only(lint_model(m, profile=profile, declared=declared), "dynamic-dim")
    assert "fixes it to 1" in f.message


def attention_scores():
    """Step-batched attention scores: q (T,16,N,72) x k^T (1,16,72,729+2560), as in highres."""
    node = helper.make_node("MatMul", ["q", "kt"], ["scores"], name="attn/MatMul")
    return model([node], [("q", F, ["T", 16, "N", 72]), ("kt", F, [1, 16, 72, 3289])],
                 [("scores", F, ["T", 16, "N", 3289])])


def test_attention_overflows_at_the_profile_max():
    def profile(t_max):
        return {"q": {"min": [1, 16, 1, 72], "opt": [t_max, 16, 2560, 72], "max": [t_max, 16, 2560, 72]}}
    (f,) = only(lint_model(attention_scores(), profile=profile(35)), "overflow")
    assert (f.node, f.op) == ("attn/MatMul", "MatMul") and "(35, 16, 2560, 3289)" in f.message
    # 15 steps: 15 * 16 * 2560 * 3289 < 2^31 <= 16 * 16 * 2560 * 3289
    assert lint_model(attention_scores(), profile=profile(15)).findings == []
    only(lint_model(attention_scores(), profile=profile(16)), "overflow")


def test_opset_out_of_range():
    (f,) = only(lint_model(relu(opset=7)), "opset")
    assert "opset 7" in f.message
    only(lint_model(relu(opset=21), "10.3"), "opset")
    assert lint_model(relu(opset=21), "10.15").findings == []


def test_graph_input_used_as_a_shape():
    nodes = [helper.make_node("Cast", ["shape"], ["shape64"], name="cast", to=I64),
             helper.make_node("Reshape", ["X", "shape64"], ["Y"], name="reshape")]
    m = model(nodes, [("X", F, [2, 8]), ("shape", I32, [2])], [("Y", F, [4, 4])])
    (f,) = only(lint_model(m), "shape-tensor")
    assert (f.node, f.op) == ("reshape", "Reshape") and "'shape'" in f.message


def test_shape_arithmetic_from_shape_ops_is_fine():
    nodes = [helper.make_node("Shape", ["X"], ["s"], name="shape"),
             helper.make_node("ReduceProd", ["s"], ["n"], name="prod", keepdims=1),
             helper.make_node("Reshape", ["X", "n"], ["Y"], name="reshape")]
    m = model(nodes, [("X", F, [2, 8])], [("Y", F, [16])])
    assert lint_model(m).findings == []


def test_data_dependent_output_size():
    nodes = [helper.make_node("NonZero", ["X"], ["idx"], name="nonzero"),
             helper.make_node("Cast", ["idx"], ["Y"], name="cast", to=I32)]
    m = model(nodes, [("X", F, [8])], [("Y", I32, [1, None])])
    (f,) = only(lint_model(m), "shape-tensor")
    assert f.op == "NonZero"


def test_double_is_a_warning():
    m = model([helper.make_node("Sqrt", ["X"], ["Y"], name="sqrt")], [("X", F64, [4])], [("Y", F64, [4])])
    (f,) = only(lint_model(m), "dtype", "warning")
    assert "DOUBLE" in f.message


def test_unsupported_type():
    m = model([helper.make_node("MatMul", ["A", "B"], ["Y"], name="mm")],
              [("A", I32, [2, 3]), ("B", I32, [3, 4])], [("Y", I32, [2, 4])])
    (f,) = only(lint_model(m), "dtype")
    assert "INT32" in f.message


def test_rank_over_8():
    shape = [1] * 9
    findings = only(lint_model(relu(shape)), "rank")
    assert {f.op for f in findings} == {"input", "Relu"}


def test_resize_restrictions():
    def resize(**attrs):
        node = helper.make_node("Resize", ["X", "", "scales"], ["Y"], name="resize", **attrs)
        return model([node], [("X", F, [1, 3, 4, 4])], [("Y", F, [1, 3, 8, 8])],
                     [const("scales", np.array([1, 1, 2, 2], np.float32))], opset=18)
    assert lint_model(resize(mode="linear")).findings == []
    only(lint_model(resize(mode="linear", antialias=1)), "restriction")
    only(lint_model(resize(mode="cubic")), "restriction", "warning")


def test_trt_version_parsing():
    assert parse_trt_version("10.3") == (10, 3)
    assert parse_trt_version("10.3.0.26") == (10, 3)
    assert parse_trt_version("11") == (11, 0)
    for bad in ("8.6", "ten", ""):
        with pytest.raises(Ps3EdgeError):
            parse_trt_version(bad)
    report = lint_model(relu(), "11.0")
    assert report.findings == [] and "10.15" in report.notes[0]


# --- our own stages -----------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["ps3-tiny", "ps3-tiny-4k"])
@pytest.mark.parametrize("max_look_close", [None, "all"])
def test_our_stages_lint_clean(artifacts, preset, max_look_close):
    report, t_max = lint_artifacts(artifacts(preset), "10.3", max_look_close)
    assert report.errors == [], [f.to_dict() for f in report.errors]
    # the exporter writes the resizes' gather indices as int32 constants: no DOUBLE, no INT64 data
    assert not [f for f in report.findings if f.check in ("dtype", "int64")]
    assert t_max == (6 if max_look_close is None else {"ps3-tiny": 6, "ps3-tiny-4k": 35}[preset])
    assert {f.stage for f in report.findings} <= {"lowres", "selector", "highres"}
    # shape inference follows every stage to the end (the `unflatten` axis arithmetic of the
    # traced attention is folded first), so the attention scores, T x heads x N x (N0 + N),
    # are sized and are the largest tensor at the profile max
    assert report.notes == []
    manifest = load_manifest(artifacts(preset))
    n, n0 = manifest.geometry.max_tokens_per_highres_call, manifest.geometry.lowres_tokens
    rows = highres_rows(manifest, t_max)           # t_max steps of each of the max_batch images, capped
    assert rows == min(8 * t_max, attention_step_limit(manifest))
    assert report.largest_tensor == rows * manifest.config.num_heads * n * (n0 + n)


def cli(*args):
    """The shared runner in a bare environment: only COLUMNS and the system PATH."""
    return run_cli(*args, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})


def test_cli_inspect_lint(artifacts, tmp_path):
    good = artifacts("ps3-tiny")
    r = cli("inspect", "--lint", good)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 errors" in r.stdout and "TensorRT 10.3" in r.stdout
    # 48 step rows (6 steps x 8 images) x 4 heads x 2560 queries x 3289 keys
    assert "largest tensor at the profile max: 1.62e+09 elements (75% of TensorRT's 2^31 limit)" in r.stdout
    assert "B <= 8 images, highres profile T <= 48 step rows (6 steps per image)" in r.stdout
    r = cli("inspect", "--lint", good, "--precision", "int8")          # nothing calibrated yet
    assert r.returncode == 2 and "has no int8 stages" in r.stderr and "ps3edge calibrate" in r.stderr

    # the same artifact with its highres stage declared opset 21: TensorRT 10.3 cannot parse it
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    m = onnx.load(str(bad / "highres.onnx"))
    m.opset_import[0].version = 21
    onnx.save(m, str(bad / "highres.onnx"))
    manifest = load_manifest(bad, verify=False)          # the new file recorded as ps3edge would record it
    manifest.replace(files={**manifest.files, "highres.onnx": file_sha256(bad / "highres.onnx")}).write(bad)
    r = cli("inspect", "--lint", bad)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "opset 21" in r.stdout and "1 errors" in r.stdout
    r = cli("inspect", "--lint", bad, "--trt-version", "10.15", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["errors"] == 0
    r = cli("inspect", "--lint", bad, "--trt-version", "8.6")
    assert r.returncode == 2 and "TensorRT 10" in r.stderr
