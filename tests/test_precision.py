"""FP16 precision policy and INT8 Q/DQ calibration: the converted stages of ps3-tiny and of a
real-width model (PS3-1.5K geometry, width 1152, 16 heads, 2 blocks) run in onnxruntime, and the
accuracy report's figures against the FP32 stages are asserted on held-out images."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from ps3edge import defaults
from ps3edge.calibration import int8 as int8mod
from ps3edge.calibration.calibrate import CalibrationOptions, calibrate
from ps3edge.calibration.data import synthetic_image
from ps3edge.calibration.histogram import ENTROPY_LEVELS, AbsHistogram, clipped_kl
from ps3edge.calibration.precision import convert_fp16, fp32_layer_matcher
from ps3edge.calibration.report import AccuracyReport
from ps3edge.errors import Ps3EdgeError
from ps3edge.artifact.manifest import load_manifest
from ps3edge.exporter.onnx_export import export
from ps3edge.model import random_model, save_checkpoint
from ps3edge.model.config import preset
from ps3edge.compare import feature_diff
from ps3edge.runtime.lookclose import Pipeline
from ps3edge.runtime.planning import LookCloseSettings

from test_cli import cli

ONE_STEP = LookCloseSettings(num_look_close=1)
FEATURE_ROWS = ("lowres", "lowres kv", "selection features", "conv features", "highres (stage)", "end-to-end")
# The targets: FP16 >= 0.999 and INT8 >= 0.98 / IoU >= 0.9. Measured on these images (docs/precision.md,
# "Reduced precision"): FP16 >= 0.999995 on every row with identical selections, so its bar is
# tightened to 0.9999 (an image whose map has a near tie at the cut can swap patches; the
# end-to-end row then compares both on the FP32 run's selection, so the swap stays the selection
# row's business and end to end still measures FP16 arithmetic alone); INT8 >= 0.9916 (tiny's 16-wide K/V heads,
# the noisiest row) and >= 0.9984 at real width; with onnxruntime 1.32 tiny's end-to-end row
# measures 0.98492, so the INT8 bar is the target itself, 0.98 (the accuracy report's tolerance);
# the IoU bar stays 0.9 (measured 0.954 - 0.984: the selection moves in 2x2 / 4x4 blocks, each
# ~1.5% of a pick).
FP16_MIN_COSINE = 0.9999
INT8_MIN_COSINE = defaults.TOLERANCES["int8"]["min_cosine"]
INT8_MIN_IOU = 0.9


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Disjoint calibration (4) and held-out (2) folders."""
    root = tmp_path_factory.mktemp("precision-images")
    cal, held = root / "cal", root / "held"
    cal.mkdir()
    held.mkdir()
    for k in range(4):
        synthetic_image(k).save(cal / f"cal{k}.png")
    for k in range(2):
        synthetic_image(100 + k).save(held / f"held{k}.png")
    return cal, held


def copy_artifact(src, dst):
    shutil.copytree(src, dst)
    return dst


def calibrated(artifact, images, samples, highres_steps):
    cal, held = images
    fp16 = calibrate(artifact, CalibrationOptions("fp16", holdout_images=held, report_settings=ONE_STEP))
    int8 = calibrate(artifact, CalibrationOptions("int8", cal, samples=samples, holdout_images=held,  # the default method
                                            report_settings=ONE_STEP, highres_steps=highres_steps))
    return artifact, fp16, int8


@pytest.fixture(scope="module")
def tiny(artifacts, images, tmp_path_factory):
    art = copy_artifact(artifacts("ps3-tiny"), tmp_path_factory.mktemp("tiny-precision") / "art")
    return calibrated(art, images, samples=4, highres_steps=2)


@pytest.fixture(scope="module")
def real_width(images, tmp_path_factory):
    """ps3-1.5k truncated to 2 blocks, random weights, saved as a checkpoint and exported."""
    root = tmp_path_factory.mktemp("real-width")
    cfg = preset("ps3-1.5k").replace(depth=2, select_layers=(0, 1, 1, 1))
    save_checkpoint(random_model(cfg, 0), root / "checkpoint")
    export(str(root / "checkpoint"), root / "art")
    cal, held = images
    fp16 = calibrate(root / "art", CalibrationOptions("fp16", holdout_images=held, report_settings=ONE_STEP))
    int8 = calibrate(root / "art", CalibrationOptions("int8", cal, samples=3, holdout_images=held,
                                                report_settings=ONE_STEP, highres_steps=1))
    return root / "art", fp16, int8


def table(report: AccuracyReport) -> str:
    return "\n".join(f"{r.stage:<20} {r.compared:<28} max_abs={r.max_abs} min_cos={r.min_cosine} iou={r.iou} "
                     f"{r.selection} {'ok' if r.ok else 'FAIL'}" for r in report.rows)


def check_fp16(report: AccuracyReport, torch_rows: bool):
    info = table(report)
    assert report.ok, info
    labels = {r.compared for r in report.rows}
    assert labels == {"fp16 vs fp32 (onnxruntime)"} | ({"fp16 vs fp32 (torch)"} if torch_rows else set()), info
    for label in labels:
        rows = {r.stage: r for r in report.rows if r.compared == label}
        for stage in FEATURE_ROWS:
            assert rows[stage].min_cosine >= FP16_MIN_COSINE, info
            assert rows[stage].max_abs <= defaults.TOLERANCES["fp16"]["max_abs"], info
        assert rows["selection"].selection == "identical" and rows["selection"].iou == 1.0, info
        assert rows["highres patches"].max_abs == 0.0, info            # image space stays fp32
        assert rows["selector (stage)"].max_abs == 0.0, info           # the selector stays fp32
        assert rows["end-to-end"].selection == "3289 of 3289 tokens compared", info
    assert all(i["held_out"] for i in report.images) and len(report.images) == 2


def check_int8(report: AccuracyReport):
    info = table(report)
    assert report.ok, info
    rows = {r.stage: r for r in report.rows}
    for stage in FEATURE_ROWS:
        assert rows[stage].min_cosine >= INT8_MIN_COSINE, info
        assert rows[stage].max_abs <= defaults.TOLERANCES["int8"]["max_abs"], info
    assert rows["selection"].iou >= INT8_MIN_IOU, info
    assert rows["highres patches"].max_abs == 0.0 and rows["selector (stage)"].max_abs == 0.0, info
    # the ShallowConvNet feeds only the selector: kept float, so only kernels differ (a real-width
    # export shares its trunk, whose onnxruntime sessions run without weight pre-packing, while the
    # calibrated file is self-contained and pre-packed)
    assert rows["conv features"].max_abs <= 1e-5, info
    assert all(i["held_out"] for i in report.images) and not report.notes, info


def check_registered(artifact, expect_fp16=True):
    manifest = load_manifest(artifact, verify=True)                    # every sha256 checked
    section = manifest.to_dict()["precisions"]
    assert sorted(section) == (["fp16", "int8"] if expect_fp16 else ["int8"])
    for precision, entry in section.items():
        assert entry["stages"]["selector"]["file"] == "selector.onnx"
        for stage in ("lowres", "highres"):
            assert entry["stages"][stage]["file"] == f"{stage}.{precision}.onnx"
        assert entry["report"] == f"accuracy.{precision}.json"
        saved = json.loads((artifact / entry["report"]).read_text())
        assert saved["precision"] == precision and saved["ok"] is True
    assert not [p.name for p in artifact.iterdir() if p.name.startswith(".")]    # no temporary files left
    return manifest


# ------------------------------------------------------------------------------------------
# the FP16 policy itself
# ------------------------------------------------------------------------------------------

def value_types(model: onnx.ModelProto) -> dict:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    g = inferred.graph
    types = {i.name: i.data_type for i in g.initializer}
    types.update({v.name: v.type.tensor_type.elem_type for v in list(g.input) + list(g.output) + list(g.value_info)})
    return types


def test_fp16_policy_keeps_the_sensitive_parts_fp32(artifacts):
    art = artifacts("ps3-tiny")
    F32, F16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    for stage in ("lowres", "highres"):
        model, pmap = convert_fp16(onnx.load(str(art / f"{stage}.onnx")), stage)
        types = value_types(model)
        names = {n.name: n for n in model.graph.node}
        ln_softmax = [n for n in model.graph.node if n.op_type in ("LayerNormalization", "Softmax")]
        assert ln_softmax and all(n.name in pmap["fp32_nodes"] for n in ln_softmax)
        for n in ln_softmax:                                        # computed on float32, not just listed
            assert types[n.input[0]] == F32 and types[n.output[0]] == F32, n.name
        weighted = [n for n in model.graph.node if n.op_type in ("MatMul", "Conv") and
                    any(i.name == n.input[1] for i in model.graph.initializer)]
        assert weighted and all(types[n.input[1]] == F16 and types[n.input[0]] == F16 for n in weighted)
        assert all(i.type.tensor_type.elem_type != F16 for i in list(model.graph.input) + list(model.graph.output))
        assert all(name in names for name in pmap["fp32_nodes"])   # node names survive the conversion
        match = fp32_layer_matcher(pmap)
        assert match(ln_softmax[0].name, []) and match("renamed", [pmap["fp32_tensors"][0]])
        assert not match(weighted[0].name, list(weighted[0].output))
        assert pmap["tensorrt"]["builder_flags"] == ["FP16", "OBEY_PRECISION_CONSTRAINTS"]
        if stage == "lowres":
            # the bicubic-resize gathers (image space) stay fp32
            gathers = [n for n in model.graph.node if n.op_type == "Gather" and n.name in pmap["fp32_nodes"]]
            assert len(gathers) >= 4 and all(types[n.output[0]] == F32 for n in gathers)


# ------------------------------------------------------------------------------------------
# accuracy: ps3-tiny and the real-width model
# ------------------------------------------------------------------------------------------

def test_tiny_fp16_accuracy_onnxruntime(tiny):
    _, fp16, _ = tiny
    check_fp16(fp16, torch_rows=False)


# slow: torch's half precision on the CPU is emulated (its report adds about 12 s to a 6 s FP16
# calibration on one thread); by default the FP16 rows are onnxruntime's, the test above
@pytest.mark.slow
def test_tiny_fp16_accuracy_torch(artifacts, images, tmp_path):
    art = copy_artifact(artifacts("ps3-tiny"), tmp_path / "art")
    _, held = images
    fp16 = calibrate(art, CalibrationOptions("fp16", holdout_images=held, report_settings=ONE_STEP, with_torch=True))
    check_fp16(fp16, torch_rows=True)


def test_tiny_int8_accuracy(tiny):
    _, _, int8 = tiny
    check_int8(int8)


@pytest.mark.slow
def test_real_width_fp16_accuracy(real_width):
    _, fp16, _ = real_width
    check_fp16(fp16, torch_rows=False)


@pytest.mark.slow
def test_real_width_int8_accuracy(real_width):
    art, _, int8 = real_width
    check_int8(int8)
    manifest = check_registered(art)
    calibration = manifest.precisions["int8"].calibration
    assert calibration.samples == 3 and calibration.highres_samples == 3
    assert calibration.method == defaults.DEFAULT_CALIBRATION_METHOD == "entropy"
    assert [i.name for i in calibration.calibration_images] == ["cal0.png", "cal1.png", "cal2.png"]


def test_int8_graph_and_registration(tiny):
    art, _, _ = tiny
    manifest = check_registered(art)
    for stage, expected in (("lowres", 4 * 4 + 1), ("highres", 4 * 4 + 1)):   # 4 per block + patch embed
        model = onnx.load(str(art / f"{stage}.int8.onnx"))
        pmap = manifest.precisions["int8"].stages[stage].precision_map
        assert pmap.tensorrt.strongly_typed is True and len(pmap.quantized_nodes) == expected
        by_output = {o: n for n in model.graph.node for o in n.output}
        for node in model.graph.node:
            if node.op_type == "DequantizeLinear":
                users = [n for n in model.graph.node if node.output[0] in n.input]
                assert users and all(u.op_type in ("MatMul", "Conv") and u.name in pmap.quantized_nodes
                                     for u in users), node.name
            if node.op_type == "QuantizeLinear":
                zero = [i for i in model.graph.initializer if i.name == node.input[2]]
                assert zero and not onnx.numpy_helper.to_array(zero[0]).any()     # symmetric
        for node in model.graph.node:                     # the selector's inputs and attention stay float
            if node.op_type in ("MatMul", "Conv") and node.name not in pmap.quantized_nodes:
                a = by_output.get(node.input[0])
                assert a is None or a.op_type != "DequantizeLinear", node.name
        if stage == "lowres":
            assert all(("selection_feature_proj" in n or "highres_selection_feature_module" in n)
                       for n in pmap.fp32_nodes) and pmap.fp32_nodes
    # per-channel weights: one scale per output channel of every quantized MatMul
    model = onnx.load(str(art / "highres.int8.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    scales = [inits[n.input[1]] for n in model.graph.node
              if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].data_type == onnx.TensorProto.INT8]
    assert scales and all(len(s.dims) == 1 and s.dims[0] > 1 for s in scales)


def test_feed_reader_first_feed_does_not_advance():
    """Model Optimizer's INT8 quantize asks the reader for get_first (GEMV detection) before
    it iterates with get_next."""
    from ps3edge.calibration.data import FeedReader

    made = []
    reader = FeedReader([lambda i=i: made.append(i) or {"x": i} for i in range(3)])
    assert reader.get_first() == {"x": 0}
    assert [reader.get_next(), reader.get_next(), reader.get_next(), reader.get_next()] == [
        {"x": 0}, {"x": 1}, {"x": 2}, None]
    assert made == [0, 0, 1, 2]                        # feeds are made on demand, one at a time
    assert FeedReader([]).get_first() is None


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_calibrated_stages_lint_clean(tiny, precision):
    """`inspect --lint --precision P` checks the stage files the build takes for P (a Q/DQ
    graph, an FP16 one): clean for TensorRT 10.3, every tensor sized."""
    from ps3edge.exporter.lint import lint_artifacts

    art, _, _ = tiny
    report, t_max = lint_artifacts(art, "10.3", precision=precision)
    assert report.findings == [] and report.notes == [], [f.to_dict() for f in report.findings] + report.notes
    # highres attention scores: t_max steps of each of the 8 images of a pass, 4 heads
    assert report.largest_tensor == 8 * t_max * 4 * 2560 * (729 + 2560)
    r = cli("inspect", "--lint", art, "--precision", precision)
    assert r.returncode == 0 and f"{precision} stages" in r.stdout, r.stdout + r.stderr
    r = cli("inspect", art, "--precision", precision)
    assert r.returncode == 2 and "--precision applies to --lint" in r.stderr


def test_precision_pipelines_run_and_differ_slightly(tiny, images):
    art, _, _ = tiny
    _, held = images
    image = held / "held0.png"
    ref = Pipeline(art, "onnxruntime").run(image, ONE_STEP)
    for precision, bound in (("fp16", FP16_MIN_COSINE), ("int8", INT8_MIN_COSINE)):
        result = Pipeline(art, "onnxruntime", precision=precision).run(image, ONE_STEP)
        assert result.features.dtype == np.float32 and result.features.shape == ref.features.shape
        d, c = feature_diff(result.features[:, :729], ref.features[:, :729])
        assert 0 < d and c >= bound, (precision, d, c)


# ------------------------------------------------------------------------------------------
# calibration details
# ------------------------------------------------------------------------------------------

def test_thresholds_of_each_method():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(200_000).astype(np.float32)
    x[:20] *= 40                                                   # a few outliers
    h = AbsHistogram()
    for part in np.split(x, 4):                                    # the range grows between samples
        h.add(part)
    absmax = float(np.abs(x).max())
    assert h.absmax == pytest.approx(absmax)
    p = h.percentile(99.99)
    assert abs(p - np.percentile(np.abs(x), 99.99)) <= 2 * h.width + 1e-6
    e = h.entropy()
    assert 2.0 < e < 0.5 * absmax                                  # clips the outliers, keeps the body


def reference_kl(hist: np.ndarray, i: int) -> float:
    """KL(p || q) of TensorRT's entropy calibration at cut i, summed bin by bin (inf where q sums to 0)."""
    p = hist[:i].copy()
    p[-1] += hist[i:].sum()
    nonzero = p > 0
    edges = np.linspace(0, i, ENTROPY_LEVELS + 1).astype(np.int64)
    sums = np.add.reduceat(hist[:i], edges[:-1])
    nz_counts = np.add.reduceat(nonzero.astype(np.float64), edges[:-1])
    level = np.repeat(np.arange(ENTROPY_LEVELS), np.diff(edges))
    q = np.where(nonzero, sums[level] / np.maximum(nz_counts[level], 1), 0.0)
    if q.sum() == 0:
        return np.inf
    p_n, q_n = p / p.sum(), q / q.sum()
    m = nonzero & (q_n > 0)
    return float(np.sum(p_n[m] * np.log(p_n[m] / q_n[m]))) + (np.inf if np.any(nonzero & (q_n == 0)) else 0.0)


def activation_samples(kind: str, rng) -> list[np.ndarray]:
    """A few calibration samples of one activation's values, shaped like what PS3's layers produce."""
    if kind == "gelu":                                   # MLP hidden: GELU of a normal, a long positive tail
        x = rng.standard_normal((4, 50_000))
        return list((0.5 * x * (1 + np.tanh(0.79788456 * (x + 0.044715 * x ** 3)))).astype(np.float32))
    if kind == "outlier channels":                       # LayerNorm output with a few large channels
        x = rng.standard_normal((4, 500, 64)).astype(np.float32)
        x[..., :3] *= 30
        return list(x)
    if kind == "heavy tail":
        return list(rng.standard_t(2, (4, 40_000)).astype(np.float32))
    if kind == "sparse":                                 # mostly exact zeros, a few values
        x = rng.standard_normal((4, 40_000)).astype(np.float32)
        x[rng.random(x.shape) < 0.97] = 0
        return list(x)
    if kind == "few levels":                             # whole numbers: most bins empty
        return list(rng.integers(-20, 21, (4, 30_000)).astype(np.float32))
    if kind == "growing range":                          # later samples reach ten times further: bins grow
        return [rng.standard_normal(30_000).astype(np.float32) * s for s in (1, 3, 10, 10)]
    if kind == "one far outlier":                        # the histogram grows to ~30,000 bins
        x = rng.standard_normal((2, 30_000)).astype(np.float32)
        x[1, 0] = 60
        return list(x)
    if kind == "clipped into empty bins":                # nothing between the body and one far value
        x = np.abs(rng.standard_normal(30_000)).astype(np.float32) * 0.1
        x[0] = 1.0
        return [x]
    raise ValueError(kind)


ACTIVATION_KINDS = ["gelu", "outlier channels", "heavy tail", "sparse", "few levels", "growing range",
                    "one far outlier", "clipped into empty bins"]


@pytest.mark.parametrize("kind", ACTIVATION_KINDS)
def test_entropy_thresholds_are_the_bin_by_bin_searchs(kind):
    """The per-level KL formula computes each candidate's KL as summing bin by bin does, and chooses
    the very threshold the candidate-by-candidate search chooses."""
    rng = np.random.default_rng(7)
    h = AbsHistogram()
    for sample in activation_samples(kind, rng):
        h.add(sample)
    hist = h.counts.astype(np.float64)
    if kind == "one far outlier":
        assert len(hist) > 20_000                        # candidates 50 bins apart
    cuts = np.arange(ENTROPY_LEVELS, len(hist) + 1, max(1, len(hist) // 512))
    expected = np.array([reference_kl(hist, i) for i in cuts])
    got = clipped_kl(hist, cuts)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(expected))
    finite = np.isfinite(expected)
    assert finite.any() and (kind != "clipped into empty bins" or not finite.all())
    np.testing.assert_allclose(got[finite], expected[finite], rtol=1e-9, atol=1e-12)
    best_i, best_kl = len(hist), np.inf                  # the search: the first cut of least KL
    for i, kl in zip(cuts, expected):
        if kl < best_kl:
            best_kl, best_i = kl, int(i)
    assert h.entropy() == min((best_i + 0.5) * h.width, h.absmax)


def test_near_tie_swaps_are_told_apart_from_real_differences():
    from ps3edge.compare import near_ties_only
    from ps3edge.runtime.planning import Geometry, plan, resolve

    geometry = Geometry(lowres_grid=27, highres_grids=(54, 108), select_num_each_scale=(512, 2048))
    ranked = np.linspace(0.9, 0.1, 27 * 27)                  # distinct, 1.1e-3 apart
    prob = ranked.reshape(27, 27).astype(np.float32)
    ref = plan(prob, resolve(ONE_STEP, geometry), geometry)      # the top 128 cells at both scales
    near = prob.copy()
    near.flat[127], near.flat[128] = prob.flat[128], prob.flat[127] + 1e-6   # the cells at the cut swap
    swapped = plan(near, resolve(ONE_STEP, geometry), geometry)
    assert not np.array_equal(swapped.selection_maps[0], ref.selection_maps[0])
    assert near_ties_only(ref, swapped, prob_error=float(np.abs(near - prob).max()))
    far = prob.copy()
    far.flat[0], far.flat[600] = prob.flat[600], prob.flat[0]                 # the best cell drops out
    moved = plan(far, resolve(ONE_STEP, geometry), geometry)
    assert not near_ties_only(ref, moved, prob_error=2e-3)


def lowres_qdq_cosine(art, image) -> float:
    """The lowres Q/DQ stage run in onnxruntime as ps3edge runs it: its minimum per-token cosine against
    the fp32 stage."""
    from ps3edge.runtime.runners.onnxruntime import cpu_session_options, session_loader

    px = Pipeline(art, "onnxruntime").pixels(image)
    ref = ort.InferenceSession(str(art / "lowres.onnx"), cpu_session_options()).run(["lowres_features"], {"pixels": px})[0]
    # the session ps3edge runs the Q/DQ stage in
    q = session_loader(art / "lowres.int8.onnx", ["CPUExecutionProvider"], qdq=True)().run(["lowres_features"], {"pixels": px})[0]
    return feature_diff(q, ref)[1]


# slow: each method's Q/DQ stages are written, recorded and run in the default run too: max by
# test_cli_calibrate_run_and_parity (`calibrate --method max`, its accuracy report, `run --precision int8`),
# percentile by test_recalibration_replaces_the_entry (with this test's checks, on one sample)
@pytest.mark.slow
@pytest.mark.parametrize("method", ["max", "percentile"])
def test_other_methods_write_runnable_qdq(artifacts, images, tmp_path, method):
    art = copy_artifact(artifacts("ps3-tiny"), tmp_path / "art")
    cal, held = images
    assert calibrate(art, CalibrationOptions("int8", cal, method=method, samples=2, highres_steps=1, report=False)) is None
    entry = load_manifest(art).precisions["int8"]
    assert entry.calibration.method == method and entry.tool.startswith("onnxruntime")
    assert lowres_qdq_cosine(art, held / "held1.png") >= INT8_MIN_COSINE


# slow: the default run writes every QDQ graph from the calibration cache; this checks the one-sample
# pass that an onnxruntime without the calibration cache gets instead
@pytest.mark.slow
def test_the_calibration_cache_writes_the_graph_the_one_sample_pass_writes(artifacts, images, tmp_path, monkeypatch):
    import onnxruntime.quantization.calibrate as ort_calibrate

    cal, _ = images
    options = CalibrationOptions("int8", cal, samples=2, highres_steps=1, report=False)
    cached = calibrate(copy_artifact(artifacts("ps3-tiny"), tmp_path / "cached"), options)
    monkeypatch.setattr(ort_calibrate, "save_tensors_data", None)       # as where it does not exist
    one_sample = calibrate(copy_artifact(artifacts("ps3-tiny"), tmp_path / "one-sample"), options)
    assert cached is None and one_sample is None
    for stage in ("lowres", "highres"):
        name = f"{stage}.int8.onnx"
        assert (tmp_path / "cached" / name).read_bytes() == (tmp_path / "one-sample" / name).read_bytes(), name


def test_exclude_blocks_and_tool_choice():
    assert int8mod.parse_exclude_blocks("first,last", 27) == (0, 26)
    assert int8mod.parse_exclude_blocks("", 27) == () and int8mod.parse_exclude_blocks("none,-1", 4) == (3,)
    with pytest.raises(Ps3EdgeError, match="does not exist"):
        int8mod.parse_exclude_blocks("30", 27)
    with pytest.raises(Ps3EdgeError, match="first, last or block numbers"):
        int8mod.parse_exclude_blocks("middle", 27)
    if int8mod.modelopt_available() is None:
        assert int8mod.resolve_tool("auto", "entropy") == "onnxruntime"
        with pytest.raises(Ps3EdgeError, match="Model Optimizer"):
            int8mod.resolve_tool("modelopt", "max")
    assert int8mod.resolve_tool("auto", "percentile") == "onnxruntime"    # modelopt has no percentile


def test_excluded_blocks_stay_float(artifacts, images, tmp_path):
    art = copy_artifact(artifacts("ps3-tiny"), tmp_path / "art")
    cal, _ = images
    calibrate(art, CalibrationOptions("int8", cal, method="max", samples=1, highres_steps=1,
                                        exclude_blocks="first,last", report=False))
    pmap = load_manifest(art).precisions["int8"].stages["highres"].precision_map
    assert pmap.quantized_nodes and not any(n.startswith(("/blocks.0/", "/blocks.3/")) for n in pmap.quantized_nodes)
    assert {n for n in pmap.fp32_nodes if n.startswith("/blocks.")} == {
        f"/blocks.{b}/{m}/MatMul" for b in (0, 3) for m in ("attn/qkv", "attn/proj", "mlp/fc1", "mlp/fc2")}


def test_failed_calibration_leaves_the_artifact_as_it_was(artifacts, images, tmp_path, monkeypatch):
    art = copy_artifact(artifacts("ps3-tiny"), tmp_path / "art")
    cal, _ = images
    before = (art / "manifest.json").read_text()
    real = int8mod.quantize_stage

    def fail_on_highres(src, dst, stage, *args, **kwargs):
        if stage == "highres":
            raise Ps3EdgeError("interrupted")
        return real(src, dst, stage, *args, **kwargs)
    monkeypatch.setattr(int8mod, "quantize_stage", fail_on_highres)
    with pytest.raises(Ps3EdgeError, match="interrupted"):
        calibrate(art, CalibrationOptions("int8", cal, method="max", samples=1, highres_steps=1, report=False))
    assert (art / "manifest.json").read_text() == before
    assert sorted(p.name for p in art.iterdir()) == sorted(p.name for p in artifacts("ps3-tiny").iterdir())


def test_manifest_checks_the_precisions_section(tiny, tmp_path):
    art = copy_artifact(tiny[0], tmp_path / "art")
    path = art / "manifest.json"
    good = json.loads(path.read_text())

    def with_manifest(change):
        m = json.loads(json.dumps(good))
        change(m)
        path.write_text(json.dumps(m))

    with_manifest(lambda m: m["precisions"]["int8"]["stages"].pop("highres"))
    with pytest.raises(Ps3EdgeError, match="precisions.int8.stages must name lowres, selector, highres.*calibrate"):
        load_manifest(art)
    with_manifest(lambda m: m["precisions"].update(int4=m["precisions"]["int8"]))
    with pytest.raises(Ps3EdgeError, match="unknown precision 'int4'"):
        load_manifest(art)
    with_manifest(lambda m: m["files"].pop("lowres.fp16.onnx"))
    with pytest.raises(Ps3EdgeError, match="'lowres.fp16.onnx' has no sha256"):
        load_manifest(art)
    # what the typed entries read (artifact/precisions.py) is there and of its type
    with_manifest(lambda m: m["precisions"]["int8"]["stages"]["lowres"]["precision_map"].pop("tensorrt"))
    with pytest.raises(Ps3EdgeError, match="precisions.int8.stages.lowres.precision_map.tensorrt is missing"):
        load_manifest(art)
    with_manifest(lambda m: m["precisions"]["int8"].update(samples="3"))
    with pytest.raises(Ps3EdgeError, match="precisions.int8.samples is missing or not an integer"):
        load_manifest(art)
    path.write_text(json.dumps(good))
    with open(art / "highres.int8.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(Ps3EdgeError, match="highres.int8.onnx was changed"):
        load_manifest(art)


def test_recalibration_replaces_the_entry(tiny, images, tmp_path):
    art = copy_artifact(tiny[0], tmp_path / "art")
    cal, held = images
    assert calibrate(art, CalibrationOptions("int8", cal, method="percentile", samples=1, highres_steps=1,
                                             report=False)) is None
    manifest = load_manifest(art, verify=True)
    entry = manifest.precisions["int8"]
    assert entry.calibration.method == "percentile" and entry.report is None
    assert "accuracy.int8.json" not in manifest.files and "fp16" in manifest.precisions
    assert entry.tool.startswith("onnxruntime")
    assert lowres_qdq_cosine(art, held / "held1.png") >= INT8_MIN_COSINE        # the percentile stages run


# ------------------------------------------------------------------------------------------
# the command line
# ------------------------------------------------------------------------------------------

def test_cli_calibrate_run_and_parity(artifacts, images, tmp_path):
    art = copy_artifact(artifacts("ps3-tiny"), tmp_path / "art")
    cal, held = images
    image = held / "held0.png"

    missing = cli("run", art, "--image", image, "--out", tmp_path / "f.safetensors", "--precision", "int8")
    assert missing.returncode == 2
    assert f"has no int8 stages; run 'ps3edge calibrate {art} --precision int8 --images DIR' first" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1

    done = cli("calibrate", art, "--images", cal, "--samples", "2", "--method", "max", "--holdout-images", held,
               "--holdout", "1")
    assert done.returncode == 0, done.stderr
    assert "int8 vs fp32" in done.stdout and "end-to-end" in done.stdout and "FAIL" not in done.stdout
    assert (art / "lowres.int8.onnx").is_file() and (art / "accuracy.int8.json").is_file()
    entry = load_manifest(art).precisions["int8"]
    assert entry.calibration.method == "max" and entry.tool.startswith("onnxruntime")

    ran = cli("run", art, "--image", image, "--out", tmp_path / "f.safetensors", "--precision", "int8",
              "--num-look-close", "1")
    assert ran.returncode == 0, ran.stderr
    assert "precision int8" in ran.stdout and "features (1, 3289, 64)" in ran.stdout

    par = cli("parity", "--precision", "int8", "--artifacts", art, "--images", held, "--num-look-close", "1")
    assert par.returncode == 0, par.stderr
    assert "parity, int8 vs fp32" in par.stdout and "FAIL" not in par.stdout

    bad = cli("calibrate", art, "--precision", "int8", "--images", tmp_path / "nowhere")
    assert bad.returncode == 2 and "calibration image folder not found" in bad.stderr
