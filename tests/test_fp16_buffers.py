"""FP16 buffers between the FP16 stages: after `calibrate --precision fp16` the tensors that pass
from one FP16 stage to the next (K/V cache, high-res patches, features) are float16 in the graphs
and in the precision map, the runtime hands them on without casting them up, and the results
are float32 and within the FP16 tolerance of the FP32 stages, batched or not."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from ps3edge import defaults
from ps3edge.artifact.manifest import load_manifest
from ps3edge.artifact.precisions import stage_entries
from ps3edge.calibration.calibrate import CalibrationOptions, calibrate
from ps3edge.calibration.data import synthetic_image
from ps3edge.calibration.precision import FP16_BUFFERS, convert_fp16
from ps3edge.errors import Ps3EdgeError
from ps3edge.metrics import feature_diff
from ps3edge.runtime.lookclose import Pipeline
from ps3edge.runtime.planning import LookCloseSettings

from test_cli import cli

F32, F16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
ONE_STEP = LookCloseSettings(num_look_close=1)
TWO_STEPS = LookCloseSettings(num_look_close=2)
TOL = defaults.TOLERANCES["fp16"]
# the float inputs / outputs of each stage file, as calibrate writes them
EXPECTED = {
    "lowres": {"pixels": F32, "lowres_features": F16, "kv_cache": F16, "selection_features": F32,
               "conv_features": F32},
    "highres": {"patches": F16, "kv_cache": F16, "highres_features": F16},
}


@pytest.fixture(scope="module")
def calibrated(artifacts, tmp_path_factory):
    root = tmp_path_factory.mktemp("fp16-buffers")
    art = root / "art"
    shutil.copytree(artifacts("ps3-tiny"), art)
    held = root / "held"
    held.mkdir()
    for k in range(2):
        synthetic_image(100 + k).save(held / f"held{k}.png")
    report = calibrate(art, CalibrationOptions("fp16", holdout_images=held, report_settings=ONE_STEP))
    return art, sorted(held.iterdir()), report


def graph_types(path) -> dict:
    g = onnx.load(str(path), load_external_data=False).graph
    return {v.name: v.type.tensor_type.elem_type for v in list(g.input) + list(g.output)}


def test_inter_stage_tensors_are_fp16_in_the_graphs_and_the_manifest(calibrated):
    art, _, report = calibrated
    assert report.ok
    manifest = load_manifest(art, verify=True)
    entry = manifest.precisions["fp16"]
    for stage, expected in EXPECTED.items():
        types = graph_types(art / entry.stages[stage].file)
        assert {k: types[k] for k in expected} == expected, stage
        pmap = entry.stages[stage].precision_map
        assert pmap.io_dtype == "mixed" if stage == "lowres" else pmap.io_dtype == "float16"
        assert dict(pmap.io_dtypes) == {k: "float16" if t == F16 else "float32" for k, t in expected.items()}
    assert entry.stages["selector"].precision_map.io_dtypes is None          # the FP32 selector, float32 I/O
    declared = stage_entries(manifest, "fp16")
    assert declared["highres"].tensor("kv_cache").dtype == "float16"
    assert declared["highres"].tensor("positions").dtype == "int32"
    assert declared["selector"].tensor("selection_features").dtype == "float32"
    assert stage_entries(manifest, "fp32")["highres"].tensor("kv_cache").dtype == "float32"
    # the manifest's own FP32 stage declarations are unchanged
    assert manifest.stages["highres"].tensor("kv_cache").dtype == "float32"
    # the onnxruntime sessions agree with the graphs
    with Pipeline(art, precision="fp16") as pipe:
        session = pipe.stages["highres"].session
        assert {i.name: i.type for i in session.get_inputs()}["kv_cache"] == "tensor(float16)"


def test_runtime_passes_fp16_buffers_without_upcasting(calibrated):
    art, images, _ = calibrated
    with Pipeline(art, precision="fp16") as pipe:
        low, _ = pipe.run_lowres(images[0])
        assert {k: v.dtype.name for k, v in low.items()} == {
            "lowres_features": "float16", "kv_cache": "float16", "pixels": "float32",
            "selection_features": "float32", "conv_features": "float32"}
        highres = pipe.stages["highres"]
        seen = []
        infer = highres.infer

        def recording(feed):
            seen.append({k: v.dtype.name for k, v in feed.items()})
            out = infer(feed)
            seen[-1]["highres_features"] = out["highres_features"].dtype.name
            return out
        highres.infer = recording
        result = pipe.run(images[0], TWO_STEPS)
    assert seen and all(s == {"patches": "float16", "positions": "int32", "step_image": "int32",
                              "kv_cache": "float16", "highres_features": "float16"} for s in seen)
    assert result.features.dtype == np.float32


def test_fp16_run_is_within_the_fp16_tolerance_of_fp32_batched_or_not(calibrated):
    art, images, _ = calibrated
    with Pipeline(art) as p32, Pipeline(art, precision="fp16") as p16:
        batch = p16.run_batch(images, TWO_STEPS)
        for image, batched in zip(images, batch):
            ref, single = p32.run(image, TWO_STEPS), p16.run(image, TWO_STEPS)
            for r in (single, batched):
                assert r.features.dtype == np.float32 and r.features.shape == ref.features.shape
                assert all(np.array_equal(a, b) for a, b in zip(r.plan.selection_maps, ref.plan.selection_maps))
                max_abs, min_cos = feature_diff(r.features, ref.features)
                assert max_abs <= TOL["max_abs"] and min_cos >= TOL["min_cosine"], (max_abs, min_cos)
            max_abs, min_cos = feature_diff(batched.features, single.features)
            assert max_abs <= TOL["max_abs"] and min_cos >= 0.9999, (max_abs, min_cos)


def test_cli_run_fp16_writes_float32_features(calibrated, tmp_path):
    art, images, _ = calibrated
    out = tmp_path / "f.safetensors"
    done = cli("run", art, "--image", images[0], "--out", out, "--precision", "fp16", "--json", "-")
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["precision"] == "fp16" and "highres" in record["images"][0]["peak_memory_mib"]["host"]
    from safetensors.numpy import load_file
    assert load_file(str(out))["features"].dtype == np.float32


def test_converter_refuses_an_unknown_buffer_and_keeps_fp32_io_by_default(artifacts):
    art = artifacts("ps3-tiny")
    model, pmap = convert_fp16(onnx.load(str(art / "highres.onnx")), "highres")
    assert pmap["io_dtype"] == "float32" and set(pmap["io_dtypes"].values()) == {"float32"}
    assert F16 not in graph_types_of(model).values()
    with pytest.raises(Ps3EdgeError, match="no float input or output 'positions'"):
        convert_fp16(onnx.load(str(art / "highres.onnx")), "highres", fp16_io=("positions",))
    assert set(FP16_BUFFERS) == {"lowres", "highres"}


def graph_types_of(model) -> dict:
    g = model.graph
    return {v.name: v.type.tensor_type.elem_type for v in list(g.input) + list(g.output)}


def test_a_malformed_io_dtypes_is_refused(calibrated, tmp_path):
    art, _, _ = calibrated
    copy = tmp_path / "art"
    shutil.copytree(art, copy)
    data = json.loads((copy / defaults.MANIFEST_NAME).read_text())
    data["precisions"]["fp16"]["stages"]["highres"]["precision_map"]["io_dtypes"]["kv_cache"] = "float8"
    data.pop("integrity", None)
    from ps3edge.artifact.manifest import Manifest
    with pytest.raises(Ps3EdgeError, match="io_dtypes is not"):
        Manifest.from_dict(data)
