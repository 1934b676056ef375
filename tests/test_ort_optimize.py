"""onnxruntime's graph optimizations (exporter/ort_optimize.py): the stage files stay plain ONNX
(what TensorRT's parser and the lint read), and an onnxruntime CPU session runs each attention as
the fused MultiHeadAttention, computing what the plain graph computes."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from ps3edge.artifact.manifest import load_manifest
from ps3edge.exporter.ort_optimize import fuse_attention
from ps3edge.runtime.lookclose import Pipeline, highres_feeds
from ps3edge.runtime.planning import plan, resolve, settings_from_env
from ps3edge.runtime.runners.onnxruntime import _fused_model, cpu_session_options


def _plain_session(path):
    return ort.InferenceSession(str(path), cpu_session_options(), providers=["CPUExecutionProvider"])


def test_stage_files_hold_standard_onnx_ops_only(artifacts):
    art = artifacts("ps3-tiny-4k")
    for entry in load_manifest(art).stages.values():
        model = onnx.load(str(art / entry.file), load_external_data=False)
        assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}, entry.file
        assert [o.domain for o in model.opset_import] == [""], entry.file


def test_stage_files_are_saved_simplified(artifacts, tmp_path):
    """Export saved onnxruntime's basic rewrites: simplifying a stage file again removes nothing."""
    import shutil

    from ps3edge.exporter.ort_optimize import simplify_stage

    art = artifacts("ps3-tiny-4k")
    for entry in load_manifest(art).stages.values():
        again = tmp_path / entry.name / entry.file
        again.parent.mkdir()
        shutil.copy(art / entry.file, again)
        for name in entry.external_data:
            shutil.copy(art / name, again.parent / name)
        data = entry.external_data[0] if entry.external_data else None
        simplify_stage(again, tmp_path / entry.name / "scratch", data)
        before = onnx.load(str(art / entry.file), load_external_data=False)
        after = onnx.load(str(again), load_external_data=False)
        assert len(after.graph.node) == len(before.graph.node), entry.file


@pytest.mark.parametrize("stage, fused", [("lowres", 4), ("highres", 4), ("selector", 0)])
def test_every_attention_is_fused_and_nothing_else(artifacts, stage, fused):
    art = artifacts("ps3-tiny-4k")
    manifest = load_manifest(art)
    model = onnx.load(str(art / manifest.stages[stage].file))
    assert fuse_attention(model, manifest.config.num_heads) == fused
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MultiHeadAttention") == fused
    if fused:
        assert "Softmax" not in ops                    # the plain attention is gone, not left beside it
        onnx.checker.check_model(model)


def test_the_fused_stages_compute_what_the_plain_ones_do(artifacts, image):
    """The runner's sessions (fused) against plain sessions of the same files, lowres and a
    two-step highres call at 4K."""
    art = artifacts("ps3-tiny-4k")
    pipe = Pipeline(art, "onnxruntime")
    pixels = pipe.pixels(image)
    low = pipe.stages["lowres"].infer({"pixels": pixels})
    plain_low = dict(zip(pipe.stages["lowres"].output_names,
                         _plain_session(art / "lowres.onnx").run(None, {"pixels": pixels})))
    for name, value in low.items():
        assert np.abs(value - plain_low[name]).max() <= 1e-5, name
    prob = pipe.stages["selector"].infer({"selection_features": low["selection_features"],
                                          "conv_features": low["conv_features"],
                                          "prompt": pipe.prior_prompt.astype(np.float32)})["prob"][0]
    the_plan = plan(prob, resolve(settings_from_env({}, num_look_close=2), pipe.geometry), pipe.geometry)
    feed = next(iter(highres_feeds(the_plan, {**low, "pixels": pixels}, pipe.geometry, pipe.steps_per_call())))
    fused = pipe.stages["highres"].infer(feed)["highres_features"]
    plain = _plain_session(art / "highres.onnx").run(None, feed)[0]
    assert fused.shape == plain.shape and np.abs(fused - plain).max() <= 1e-5


def test_fusion_is_for_the_cpu_provider_alone(artifacts):
    path = artifacts("ps3-tiny") / "highres.onnx"
    options = ort.SessionOptions()
    assert _fused_model(path, ["CPUExecutionProvider"], 4, options) is not None
    assert _fused_model(path, ["CPUExecutionProvider"], None, options) is None          # no head count given
    assert _fused_model(path, ["CUDAExecutionProvider", "CPUExecutionProvider"], 4, options) is None
    assert _fused_model(path, [("TensorrtExecutionProvider", {}), "CPUExecutionProvider"], 4, options) is None


def test_attention_with_a_mask_is_left_alone(tmp_path):
    class Masked(torch.nn.Module):
        def forward(self, q, k, v, mask):
            h = lambda x: x.unflatten(-1, (2, 4)).transpose(1, 2)                      # noqa: E731
            out = torch.nn.functional.scaled_dot_product_attention(h(q), h(k), h(v), attn_mask=mask)
            return out.transpose(1, 2).reshape(1, 3, 8)

    q, k, v = torch.randn(1, 3, 8), torch.randn(1, 5, 8), torch.randn(1, 5, 8)
    path = tmp_path / "masked.onnx"
    torch.onnx.export(Masked(), (q, k, v, torch.zeros(3, 5)), str(path), dynamo=False, opset_version=17)
    model = onnx.load(str(path))
    assert fuse_attention(model, 2) == 0
    assert len(model.graph.node) == len(onnx.load(str(path)).graph.node)


@pytest.mark.parametrize("simplified", [False, True])
def test_an_explicit_scale_is_fused_with_its_value(tmp_path, simplified):
    """scale=0.3 instead of 1/sqrt(D): the exporter folds its factors into constants, and the
    fused node takes their product as its scale, as exported and after onnxruntime's rewrites;
    the session computes what the plain graph does."""
    from ps3edge.exporter.ort_optimize import simplify_stage

    class Scaled(torch.nn.Module):
        def forward(self, q, k, v):
            h = lambda x: x.unflatten(-1, (2, 4)).transpose(1, 2)                      # noqa: E731
            out = torch.nn.functional.scaled_dot_product_attention(h(q), h(k), h(v), scale=0.3)
            return out.transpose(1, 2).reshape(1, 3, 8)

    g = torch.Generator().manual_seed(0)
    feeds = {"q": torch.randn(1, 3, 8, generator=g), "k": torch.randn(1, 5, 8, generator=g),
             "v": torch.randn(1, 5, 8, generator=g)}
    path = tmp_path / "scaled.onnx"
    torch.onnx.export(Scaled(), tuple(feeds.values()), str(path), dynamo=False, opset_version=17,
                      input_names=list(feeds))
    if simplified:
        simplify_stage(path, tmp_path / "scratch")
    model = onnx.load(str(path))
    assert fuse_attention(model, 2) == 1
    (node,) = [n for n in model.graph.node if n.op_type == "MultiHeadAttention"]
    assert [onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "scale"] == [pytest.approx(0.3)]
    arrays = {k: v.numpy() for k, v in feeds.items()}
    plain = _plain_session(path).run(None, arrays)[0]
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, arrays)[0]
    assert np.abs(got - plain).max() <= 1e-6
