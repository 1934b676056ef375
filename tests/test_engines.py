"""TensorRT engines: everything provable without TensorRT, and the TensorRT paths where it exists.

Without TensorRT (none can be installed on this project's machines): optimization-profile bounds from
real manifests, the build plan (sources, typing, flags) for each precision and TensorRT major,
the engine-cache key, the timing-cache file, the manifest's `engines` section and its checks,
the engine/machine compatibility check, onnxruntime provider selection, and `ps3edge build`
refusing cleanly. The tests at the end build and run real engines; they skip with the reason
where TensorRT, Torch-TensorRT or a CUDA GPU is missing.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import runpy
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from conftest import cli, cli_process
from ps3edge import defaults
from ps3edge.engines import cache as cache_mod
from ps3edge.engines.builder import record_engines
from ps3edge.artifact.engines import EngineEntry
from ps3edge.engines.cache import EngineCache, engine_cache_key, read_timing_cache, write_timing_cache
from ps3edge.engines.plan import BuildOptions, plan_build
from ps3edge.artifact.engines import check_engines_section
from ps3edge.engines.platform import check_engine_compatible, jetpack_version, l4t_version, same_tensorrt
from ps3edge.artifact.profiles import (attention_step_limit, axis_bounds, batch_limit, is_dynamic, look_close_steps,
                                      profile_bounds, shape_arg)
from ps3edge.errors import Ps3EdgeError
from ps3edge.artifact.manifest import Manifest, build_manifest, load_manifest
from ps3edge.artifact.spec import stage_specs
from ps3edge.model.config import preset
from ps3edge.artifact.io import file_sha256
from ps3edge.runtime.runners.onnxruntime import ort_tensorrt_options, preferred_ort_providers
from ps3edge.runtime.runners.registry import load_stages

TRT_SKIP = "TensorRT is not installed (its wheels come from NVIDIA's index, which this machine cannot reach); benchmarks/trt_check.py runs this path where it is"


def unexported_manifest(name: str, max_batch: int = defaults.DEFAULT_MAX_BATCH) -> Manifest:
    """The manifest `export` would write for a preset, without exporting (for geometry checks)."""
    cfg = preset(name)
    specs = stage_specs(cfg, 2)
    stages = {n: {"file": s.file, "external_data": [], **s.to_dict()} for n, s in specs.items()}
    files = {s.file: "0" * 64 for s in specs.values()} | {defaults.PRIOR_PROMPT_FILE: "0" * 64}
    layers = [cfg.depth - 2, cfg.depth - 1]          # 25, 26 for the real presets
    return build_manifest(cfg, {"kind": "preset", "name": name, "seed": 0}, layers, [-2, -1], 17, stages, files,
                          max_batch=max_batch)


@pytest.fixture
def tiny_copy(artifacts, tmp_path):
    """A private copy of the exported ps3-tiny artifact (the session's one is shared)."""
    dst = tmp_path / "art"
    shutil.copytree(artifacts("ps3-tiny"), dst)
    return dst


# --- profiles -------------------------------------------------------------------------------------
def test_profile_bounds_from_an_exported_manifest(artifacts):
    manifest = load_manifest(artifacts("ps3-tiny"))
    bounds = profile_bounds(manifest)
    kv = [1 if d == "B" else d for d in manifest.stages["highres"].inputs[3].shape]
    # T: the default 6 steps of each of the 8 images of a pass (export --max-batch's default)
    assert bounds["highres"]["patches"] == {"min": [1, 1, 588], "opt": [48, 2560, 588], "max": [48, 2560, 588]}
    assert bounds["highres"]["positions"] == {"min": [1, 1], "opt": [48, 2560], "max": [48, 2560]}
    assert bounds["highres"]["step_image"] == {"min": [1], "opt": [48], "max": [48]}
    assert bounds["highres"]["kv_cache"] == {"min": kv, "opt": kv[:2] + [8] + kv[3:], "max": kv[:2] + [8] + kv[3:]}
    assert bounds["lowres"]["pixels"] == {"min": [1, 3, 1512, 1512], "opt": [8, 3, 1512, 1512], "max": [8, 3, 1512, 1512]}
    assert bounds["selector"]["prompt"] == {"min": [1, 64], "opt": [8, 64], "max": [8, 64]}
    assert set(bounds["selector"]) == {"selection_features", "conv_features", "prompt"}
    assert is_dynamic(bounds["highres"]) and is_dynamic(bounds["lowres"]) and is_dynamic(bounds["selector"])
    # 1.5K: 14580 patches, 2560 a step -> 'all' is 6 steps, the same as the default
    assert look_close_steps(manifest, "all") == 6 == look_close_steps(manifest)
    assert profile_bounds(manifest, 2)["highres"]["patches"]["max"] == [16, 2560, 588]
    assert shape_arg(bounds["highres"], "min").startswith("patches:1x1x588,positions:1x1,step_image:1,kv_cache:")


def test_profile_bounds_4k_default_all_and_explicit():
    manifest = unexported_manifest("ps3-4k")
    # 6 steps x 8 images would be 48 rows, but one call holds at most 15: 15 x 16 heads x 2560
    # queries x 3289 keys of attention scores stays under 2^31 elements, 16 would not
    assert attention_step_limit(manifest) == 15
    assert axis_bounds(manifest) == {"B": (1, 8, 8), "T": (1, 15, 15), "N": (1, 2560, 2560)}
    one = unexported_manifest("ps3-4k", max_batch=1)            # one image a pass: T is its steps
    assert axis_bounds(one) == {"B": (1, 1, 1), "T": (1, 6, 6), "N": (1, 2560, 2560)}
    # 'all' is ceil(87480 / 2560) = 35 steps, capped at 15 a call
    assert axis_bounds(one, "all")["T"] == (1, 15, 15)
    assert axis_bounds(one, "ALL")["T"] == (1, 15, 15)
    assert axis_bounds(one, 12)["T"] == (1, 12, 12)
    with pytest.raises(Ps3EdgeError, match="over 15, the most steps one engine call can hold"):
        look_close_steps(one, 16)
    assert axis_bounds(one, "3")["T"] == (1, 3, 3)
    assert axis_bounds(unexported_manifest("ps3-4k", max_batch=2), "3")["T"] == (1, 6, 6)
    bounds = profile_bounds(manifest)
    assert bounds["lowres"]["pixels"]["max"] == [8, 3, 3780, 3780]
    assert bounds["highres"]["kv_cache"]["max"] == [27, 2, 8, 16, 729, 72]
    # the batch bound: 47 images keep the 4K K/V cache (27 x 2 x B x 16 x 729 x 72) under 2^31 elements
    assert batch_limit(manifest.stages) == 47


@pytest.mark.parametrize("value", [0, 36, -1, "x", "1.5", True])
def test_max_look_close_out_of_range(value):
    with pytest.raises(Ps3EdgeError, match="--max-look-close") as e:
        look_close_steps(unexported_manifest("ps3-4k"), value)
    assert "\n" not in str(e.value)


def test_a_dynamic_axis_without_bounds_is_refused():
    raw = unexported_manifest("ps3-1.5k").to_dict()
    raw["stages"]["selector"]["inputs"][2]["shape"] = ["M", 1152]
    with pytest.raises(Ps3EdgeError, match="dynamic axis 'M' that no optimization profile bounds"):
        profile_bounds(Manifest(raw))                   # unchecked: the manifest check would refuse it first


# --- the build plan ---------------------------------------------------------------------------------
def with_precision(manifest: Manifest, precision: str, quantized=("lowres", "highres")) -> Manifest:
    """The manifest with a "precisions" entry as `ps3edge calibrate` writes it (artifact/precisions.py)."""
    from ps3edge.calibration.precision import fp16_precision_map

    raw = manifest.to_dict()
    stages = {}
    for s in ("lowres", "selector", "highres"):
        if precision == "fp16":
            name = f"{s}.fp16.onnx"
            pmap = fp16_precision_map(s, fp32_nodes=[f"/{s}/LayerNormalization"], fp32_tensors=[f"/{s}/Softmax_output_0"])
        else:
            name = f"{s}.int8.onnx" if s in quantized else raw["stages"][s]["file"]
            pmap = {"schema": 1, "default": "fp32", "io_dtype": "float32",
                    "quantized_nodes": [f"/{s}/MatMul"] if s in quantized else [], "fp32_op_types": [],
                    "fp32_regions": [], "fp32_nodes": [f"/{s}/blocks.0/MatMul"] if s in quantized else [],
                    "fp32_tensors": [], "tensorrt": {"strongly_typed": True, "builder_flags": []}}
        raw["files"].setdefault(name, f"{abs(hash(name)) & 0xffffffff:064x}")
        stages[s] = {"file": name, "external_data": [], "precision_map": pmap}
    raw.setdefault("precisions", {})[precision] = {"stages": stages}
    return Manifest.from_dict(raw)


def plans_by_stage(manifest, trt="10.3.0", sm=87, **options):
    return {p.stage: p for p in plan_build(manifest, BuildOptions(**options), trt, sm)}


def test_plan_fp32_is_strict_and_weakly_typed_on_trt10():
    plans = plans_by_stage(unexported_manifest("ps3-1.5k"))
    for p in plans.values():
        assert (p.precision, p.strongly_typed, p.flags, p.clear_flags) == ("fp32", False, (), ("TF32",))
        assert p.onnx_file == f"{p.stage}.onnx" and p.engine_file == f"{p.stage}.fp32.{p.key[:12]}.engine"
    assert plans["highres"].max_look_close == 6 and plans["highres"].profile["patches"]["max"][0] == 15
    assert all(p.strongly_typed for p in plans_by_stage(unexported_manifest("ps3-1.5k"), trt="11.4.0.106").values())


def test_plan_fp16_trt10_applies_the_precision_map_to_the_fp32_onnx():
    manifest = unexported_manifest("ps3-1.5k")
    plain = plans_by_stage(manifest, precision="fp16")
    assert plain["highres"].flags == ("FP16",) and plain["highres"].fp32_nodes == ()
    assert "no FP16 precision map" in plain["highres"].note
    assert (plain["selector"].precision, plain["selector"].flags) == ("fp32", ())   # the policy's whole-stage rule
    plans = plans_by_stage(with_precision(manifest, "fp16"), precision="fp16")
    h = plans["highres"]
    assert (h.onnx_file, h.precision, h.strongly_typed) == ("highres.onnx", "fp16", False)
    assert h.flags == ("FP16", "OBEY_PRECISION_CONSTRAINTS")
    assert (h.fp32_nodes, h.fp32_tensors) == (("/highres/LayerNormalization",), ("/highres/Softmax_output_0",))
    assert not h.note and h.map_source == "precisions.fp16" and plain["highres"].map_source == ""
    assert (plans["selector"].precision, plans["selector"].flags) == ("fp32", ())
    assert plans["highres"].key != plain["highres"].key


def test_plan_fp16_trt11_needs_the_fp16_onnx():
    manifest = unexported_manifest("ps3-1.5k")
    with pytest.raises(Ps3EdgeError, match="no FP16 builder flag") as e:
        plans_by_stage(manifest, trt="11.4.0.106", precision="fp16")
    assert "\n" not in str(e.value)
    plans = plans_by_stage(with_precision(manifest, "fp16"), trt="11.4.0.106", precision="fp16")
    h, sel = plans["highres"], plans["selector"]
    assert (h.onnx_file, h.strongly_typed, h.flags, h.precision) == ("highres.fp16.onnx", True, (), "fp16")
    assert (sel.onnx_file, sel.precision) == ("selector.fp16.onnx", "fp32")


def test_plan_int8_needs_qdq_stages_and_keeps_the_rest_fp32():
    manifest = unexported_manifest("ps3-1.5k")
    with pytest.raises(Ps3EdgeError, match="ps3edge calibrate"):
        plans_by_stage(manifest, precision="int8")
    qdq = with_precision(manifest, "int8")                      # the selector is left in fp32
    plans = plans_by_stage(qdq, precision="int8")
    h = plans["highres"]
    assert (h.onnx_file, h.precision, h.strongly_typed, h.flags) == ("highres.int8.onnx", "int8", True, ())
    assert (plans["selector"].onnx_file, plans["selector"].precision) == ("selector.onnx", "fp32")
    best = plans_by_stage(with_precision(qdq, "fp16"), precision="best")
    h = best["highres"]
    assert (h.onnx_file, h.precision, h.strongly_typed) == ("highres.int8.onnx", "best", False)
    assert h.flags == ("INT8", "FP16", "OBEY_PRECISION_CONSTRAINTS")
    assert h.fp32_nodes == ("/highres/LayerNormalization", "/highres/blocks.0/MatMul")
    assert best["selector"].precision == "fp32"
    best11 = plans_by_stage(qdq, trt="11.4.0.106", precision="best")
    assert best11["highres"].strongly_typed and best11["highres"].precision == "int8"
    assert best11["selector"].precision == "fp32"


def test_plan_torch_tensorrt_route_fp16_is_weakly_typed():
    manifest = unexported_manifest("ps3-1.5k")
    plans = plans_by_stage(manifest, trt="10.3.0", precision="fp16", via="torch-tensorrt")
    assert plans["highres"].precision == "fp16" and plans["selector"].precision == "fp32"
    assert plans["highres"].onnx_file == "highres.onnx"
    assert not plans["highres"].strongly_typed and "weakly typed" in plans["highres"].note
    assert plans["selector"].strongly_typed and plans["selector"].note == ""
    fp32 = plans_by_stage(manifest, trt="11.4.0.106", via="torch-tensorrt")
    assert all(p.strongly_typed and p.precision == "fp32" for p in fp32.values())
    with pytest.raises(Ps3EdgeError, match="no weak typing.*--via onnx"):      # TensorRT 11 dropped it
        plans_by_stage(manifest, trt="11.4.0.106", precision="fp16", via="torch-tensorrt")


# the converter's signatures (keyword parameters only) in Torch-TensorRT 2.12 and 2.14, as published
def _convert_2_12(exported_program, inputs=None, *, arg_inputs=None, enabled_precisions=None,
                  use_explicit_typing=True, workspace_size=0, timing_cache_path="", **kwargs):
    raise AssertionError("signature only")


def _convert_2_14(exported_program, inputs=None, *, arg_inputs=None, workspace_size=0, timing_cache_path="",
                  arg_input_binding_names=None, kwarg_input_binding_names=None, output_binding_names=None,
                  **kwargs):
    raise AssertionError("signature only")


def test_torch_tensorrt_keywords_follow_the_converters_signature():
    """The converter ignores keywords it does not know, so each is chosen from its signature:
    fp16 is weak typing with fp16 enabled (2.12 would otherwise build the fp32 program as fp32),
    2.14 (no enabled_precisions) refuses fp16, binding names go as the tuple the program's
    argument spec is."""
    import inspect
    from types import SimpleNamespace

    import torch

    from ps3edge.engines.torch_route import _torch_tensorrt_converter, torch_tensorrt_typing

    p12, p14 = (inspect.signature(f).parameters for f in (_convert_2_12, _convert_2_14))
    assert torch_tensorrt_typing(p12, "fp16", ["a"], ["y"]) == {
        "enabled_precisions": {torch.float32, torch.float16}, "use_explicit_typing": False}
    assert torch_tensorrt_typing(p12, "fp32", ["a"], ["y"]) == {
        "enabled_precisions": {torch.float32}, "use_explicit_typing": True}
    assert torch_tensorrt_typing(p14, "fp32", ["patches", "positions"], ["y", "z"]) == {
        "arg_input_binding_names": ("patches", "positions"), "output_binding_names": ("y", "z")}
    assert torch_tensorrt_typing(p14, "fp32", ["a"], ["y"])["output_binding_names"] == "y"
    tt = lambda convert, version: SimpleNamespace(                                   # noqa: E731
        __version__=version, dynamo=SimpleNamespace(convert_exported_program_to_serialized_trt_engine=convert))
    assert _torch_tensorrt_converter(tt(_convert_2_12, "2.12.0"), "fp16")[0] is _convert_2_12
    assert _torch_tensorrt_converter(tt(_convert_2_14, "2.14.0"), "fp32")[0] is _convert_2_14
    with pytest.raises(Ps3EdgeError, match="Torch-TensorRT 2.14.0 builds engines in the exported program's own dtypes"):
        _torch_tensorrt_converter(tt(_convert_2_14, "2.14.0"), "fp16")


def test_torch_tensorrt_route_exports_the_stages_with_the_profile_dims(artifacts):
    """The first half of --via torch-tensorrt, which needs no TensorRT: torch.export of our stage
    modules with T and N as export dimensions bounded by the profile."""
    import torch

    from ps3edge.engines.torch_route import export_stage_program
    from ps3edge.model import HighResStage, SelectorStage, build

    manifest = load_manifest(artifacts("ps3-tiny"))
    bounds = profile_bounds(manifest, 3)
    model = build("ps3-tiny").model.eval()
    highres = HighResStage(model, list(manifest.returned_layers)).eval()
    program = export_stage_program(highres, manifest.stages["highres"], bounds["highres"], 14580)
    kv = torch.randn(*[3 if i == 2 else d for i, d in enumerate(bounds["highres"]["kv_cache"]["max"])])
    for T, N in ((1, 1), (3, 2560), (2, 77)):
        patches = torch.randn(T, N, 588)
        positions = torch.randint(0, 14580, (T, N), dtype=torch.int32)
        step_image = torch.arange(T, dtype=torch.int32) % 3
        with torch.no_grad():
            got = program.module()(patches, positions, step_image, kv)
            want = highres(patches, positions, step_image, kv)
        assert got.shape == (2, T, N, 64) and torch.allclose(got, want, atol=1e-5)
    with pytest.raises(Exception):                     # beyond the profile's T_max (3 steps x 8 images): refused
        program.module()(torch.randn(25, 8, 588), torch.zeros(25, 8, dtype=torch.int32),
                         torch.zeros(25, dtype=torch.int32), kv)
    selector = export_stage_program(SelectorStage(model).eval(), manifest.stages["selector"],
                                    bounds["selector"], 14580)
    assert [n.meta["val"].shape for n in selector.graph.nodes if n.op == "placeholder"][-1] == (8, 64)


def test_plan_refuses_bad_options():
    manifest = unexported_manifest("ps3-1.5k")
    for options, match in (({"precision": "fp8"}, "--precision"), ({"via": "tvm"}, "--via"),
                           ({"workspace_gb": 0}, "--workspace-gb"), ({"optimization_level": 6}, "--optimization-level"),
                           ({"via": "torch-tensorrt", "precision": "int8"}, "use --via onnx")):
        with pytest.raises(Ps3EdgeError, match=match):
            plans_by_stage(manifest, **options)


# --- the ONNX route's Polygraphy loaders (constructed and inspected; TensorRT is not run) ----------------
def fake_tensorrt(version="10.3.0", tf32=True):
    """The few TensorRT names the loaders are given (enum members stand in as strings)."""
    from types import SimpleNamespace

    flags = {"FP16": "FP16", "INT8": "INT8", "OBEY_PRECISION_CONSTRAINTS": "OBEY"} | ({"TF32": "TF32"} if tf32 else {})
    return SimpleNamespace(__version__=version, BuilderFlag=SimpleNamespace(**flags),
                           MemoryPoolType=SimpleNamespace(WORKSPACE="WORKSPACE"),
                           ProfilingVerbosity=SimpleNamespace(LAYER_NAMES_ONLY="LAYER_NAMES_ONLY"))


def test_polygraphy_loaders_get_the_plans_settings(capsys):
    """CreateConfig / Profile / NetworkFromOnnxPath built from real plans: a keyword Polygraphy
    does not take raises here, and every setting of the plan must arrive."""
    pg = pytest.importorskip("polygraphy.backend.trt", reason="Polygraphy is not installed")
    from ps3edge.engines.onnx_route import config_loader, onnx_network, plan_profiles, polygraphy_log

    manifest = unexported_manifest("ps3-1.5k")
    trt = fake_tensorrt()
    said = []
    with polygraphy_log(said.append):                  # CreateConfig logs when constructed
        fp32 = plans_by_stage(manifest)
        c = config_loader(pg, trt, fp32["highres"], BuildOptions(workspace_gb=2, optimization_level=5))
        assert (c.tf32, c.fp16, c.int8, c.precision_constraints) == (False, False, False, None)
        assert c.memory_pool_limits == {"WORKSPACE": 2 << 30} and c.builder_optimization_level == 5
        assert c.profiling_verbosity == "LAYER_NAMES_ONLY" and c.timing_cache_path is None
        [profile] = c.profiles
        bounds = fp32["highres"].profile
        assert list(profile) == list(bounds) == ["patches", "positions", "step_image", "kv_cache"]
        for name, b in bounds.items():
            assert tuple(profile[name]) == (tuple(b["min"]), tuple(b["opt"]), tuple(b["max"]))
        [low] = plan_profiles(pg, fp32["lowres"])                  # the batch axis: 1 to 8 images
        assert tuple(low["pixels"]) == ((1, 3, 1512, 1512), (8, 3, 1512, 1512), (8, 3, 1512, 1512))
        decode = {n: {"min": b["max"], "opt": b["max"], "max": b["max"]} for n, b in bounds.items()}
        two = plan_profiles(pg, replace(fp32["highres"], extra_profiles=(decode,)))
        assert [tuple(p["patches"]) for p in two] == [tuple(tuple(bounds["patches"][k]) for k in ("min", "opt", "max")),
                                                       (tuple(bounds["patches"]["max"]),) * 3]
        fp16 = plans_by_stage(with_precision(manifest, "fp16"), precision="fp16")["highres"]
        c = config_loader(pg, trt, fp16, BuildOptions())
        assert (c.tf32, c.fp16, c.int8, c.precision_constraints) == (True, True, False, "obey")
        assert c.memory_pool_limits == {"WORKSPACE": int(defaults.DEFAULT_WORKSPACE_GB * (1 << 30))}
        qdq = with_precision(manifest, "int8")
        best = plans_by_stage(with_precision(qdq, "fp16"), precision="best")["highres"]
        c = config_loader(pg, trt, best, BuildOptions())
        assert (c.fp16, c.int8, c.precision_constraints) == (True, True, "obey")
        assert config_loader(pg, fake_tensorrt(tf32=False), fp16, BuildOptions()).tf32 is False
    # strongly typed networks: the flag on TensorRT 10, none on 11 (every network is strongly typed)
    int8 = plans_by_stage(qdq, precision="int8")["highres"]
    n = onnx_network(pg, trt, Path("art") / int8.onnx_file, int8)
    assert (n.path, n.strongly_typed) == (str(Path("art") / "highres.int8.onnx"), True)
    assert onnx_network(pg, trt, Path("art/highres.onnx"), fp32["highres"]).strongly_typed is False
    trt11 = plans_by_stage(qdq, trt="11.4.0.106", precision="int8")["highres"]
    assert onnx_network(pg, fake_tensorrt("11.4.0.106"), Path("x.onnx"), trt11).strongly_typed is False
    assert said == [] and capsys.readouterr() == ("", "")


def test_polygraphy_log_keeps_errors_and_passes_warnings(capsys):
    pytest.importorskip("polygraphy.backend.trt", reason="Polygraphy is not installed")
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER

    from ps3edge.engines.onnx_route import polygraphy_log

    said = []
    before = (G_LOGGER.use_python_logging_system, G_LOGGER.letter)
    with polygraphy_log(said.append) as log:
        G_LOGGER.info("building")
        G_LOGGER.warning("weights are subnormal")
        G_LOGGER.error("first failure\nits detail")
        G_LOGGER.error("second failure")
        with pytest.raises(PolygraphyException, match="Invalid Engine"):
            G_LOGGER.critical("Invalid Engine")
    assert said == ["TensorRT: weights are subnormal"]
    assert log.first_error("none") == "first failure" and log.last_error("none") == "second failure"
    assert (G_LOGGER.use_python_logging_system, G_LOGGER.letter) == before
    assert capsys.readouterr() == ("", "")


def test_timing_cache_another_machines_or_damaged_is_replaced_by_an_empty_one():
    from types import SimpleNamespace

    from ps3edge.engines.onnx_route import attach_timing_cache

    class Config:
        def __init__(self, readable=True, accepted=True):
            self.readable, self.accepted, self.caches, self.flags = readable, accepted, [], []

        def create_timing_cache(self, data):
            if data and not self.readable:
                raise RuntimeError("bad timing cache")
            return ("cache", data)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.caches.append(cache)
            return self.accepted or cache == ("cache", b"")

        def set_flag(self, flag):
            self.flags.append(flag)

    plan = plans_by_stage(unexported_manifest("ps3-tiny"))["highres"]
    trt = fake_tensorrt()
    for config, caches, message in ((Config(), [("cache", b"old")], False),
                                    (Config(readable=False), [("cache", b"")], True),
                                    (Config(accepted=False), [("cache", b"old"), ("cache", b"")], True)):
        said = []
        attach_timing_cache(trt, config, plan, b"old", said.append)
        assert config.caches == caches
        assert said == (["the timing cache is damaged or was made by another TensorRT or GPU; starting an empty one"]
                        if message else [])
    leftover = Config()
    attach_timing_cache(SimpleNamespace(BuilderFlag=SimpleNamespace(SPARSE_WEIGHTS="SPARSE")), leftover,
                        replace(plan, flags=("SPARSE_WEIGHTS", "FP16")), b"", lambda m: None)
    assert leftover.flags == ["SPARSE"]                 # CreateConfig has no keyword for it; FP16 it has


# --- engine-cache key --------------------------------------------------------------------------------
def test_engine_cache_key_changes_with_every_input_and_only_then():
    onnx = {"highres.onnx": "a" * 64, "highres.onnx.data": "b" * 64}
    flags = {"precision": "fp16", "profile": {"patches": {"max": [6, 2560, 588]}}, "workspace_bytes": 1 << 32}
    base = engine_cache_key(onnx, flags, "10.3.0", 87)
    assert len(base) == 64
    # same inputs in another order: same key
    assert engine_cache_key(dict(reversed(list(onnx.items()))), dict(reversed(list(flags.items()))), "10.3.0", 87) == base
    changed = [
        engine_cache_key({**onnx, "highres.onnx.data": "c" * 64}, flags, "10.3.0", 87),
        engine_cache_key({"highres.onnx": "a" * 64}, flags, "10.3.0", 87),
        engine_cache_key(onnx, {**flags, "precision": "fp32"}, "10.3.0", 87),
        engine_cache_key(onnx, {**flags, "profile": {"patches": {"max": [5, 2560, 588]}}}, "10.3.0", 87),
        engine_cache_key(onnx, {**flags, "workspace_bytes": 1 << 31}, "10.3.0", 87),
        engine_cache_key(onnx, flags, "10.3.1", 87),
        engine_cache_key(onnx, flags, "10.3.0", 90),
    ]
    assert base not in changed and len(set(changed)) == len(changed)


def test_plan_keys_follow_their_inputs():
    manifest = unexported_manifest("ps3-4k")
    a = plans_by_stage(manifest)
    assert {s: p.key for s, p in a.items()} == {s: p.key for s, p in plans_by_stage(manifest).items()}
    # T_max only shapes the highres profile: the other stages keep their engines
    b = plans_by_stage(manifest, max_look_close=1)                 # 8 rows a call instead of 15
    assert b["highres"].key != a["highres"].key
    assert (b["lowres"].key, b["selector"].key) == (a["lowres"].key, a["selector"].key)
    c = plans_by_stage(manifest, sm=90)
    assert all(c[s].key != a[s].key for s in a)
    d = plans_by_stage(manifest, trt="10.3.1")
    assert all(d[s].key != a[s].key for s in a)
    e = plans_by_stage(manifest, optimization_level=5)
    assert all(e[s].key != a[s].key for s in a)
    f = plans_by_stage(manifest, via="torch-tensorrt")
    assert all(f[s].key != a[s].key for s in a)
    edited = manifest.to_dict()
    edited["files"]["selector.onnx"] = "f" * 64
    g = plans_by_stage(Manifest.from_dict(edited))
    assert g["selector"].key != a["selector"].key and g["highres"].key == a["highres"].key


# --- caches on disk -------------------------------------------------------------------------------
def test_timing_cache_file_round_trip_and_atomic_replace(tmp_path, monkeypatch):
    path = tmp_path / "timing.cache"
    assert read_timing_cache(None) == b"" and read_timing_cache(path) == b""
    write_timing_cache(path, b"\x00first")
    assert read_timing_cache(path) == b"\x00first"
    write_timing_cache(path, b"")                        # nothing to save: the file stays
    assert path.read_bytes() == b"\x00first"
    write_timing_cache(path, b"second")
    assert path.read_bytes() == b"second"

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(cache_mod.os, "replace", broken_replace)
    with pytest.raises(OSError):
        write_timing_cache(path, b"third")
    assert path.read_bytes() == b"second"                # the old cache survives a failed write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["timing.cache"]   # and no temporary is left


def test_atomic_writes_give_the_usual_file_permissions(tmp_path):
    """Manifests rewritten by build / calibrate, engines and caches are readable as a plain
    open() would make them (mkstemp's temporaries are 0600)."""
    import os
    import stat

    from ps3edge.artifact.io import copy_atomic, write_json_atomic

    mask = os.umask(0)
    os.umask(mask)
    write_json_atomic(tmp_path / "manifest.json", {"a": 1})
    write_json_atomic(tmp_path / "manifest.json", {"a": 2})           # replacing an existing file
    write_timing_cache(tmp_path / "timing.cache", b"tactics")
    copy_atomic(tmp_path / "timing.cache", tmp_path / "copy.engine")
    for name in ("manifest.json", "timing.cache", "copy.engine"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask, name
    assert json.loads((tmp_path / "manifest.json").read_text()) == {"a": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.engine", "manifest.json", "timing.cache"]


def test_timing_cache_path_errors(tmp_path):
    with pytest.raises(Ps3EdgeError, match="is a directory"):
        read_timing_cache(tmp_path)
    with pytest.raises(Ps3EdgeError, match="does not exist"):
        read_timing_cache(tmp_path / "no" / "such" / "timing.cache")


def test_engine_cache_hit_miss_and_damage(tmp_path):
    cache = EngineCache(tmp_path / "cache")
    key = "1" * 64
    assert cache.get(key) is None
    cache.put(key, b"engine bytes", {"sha256": cache_mod.hashlib.sha256(b"engine bytes").hexdigest(), "sm": 87})
    path, facts = cache.get(key)
    assert path.read_bytes() == b"engine bytes" and facts["sm"] == 87
    path.write_bytes(b"engine bytez")                    # damaged: a miss, not a wrong engine
    assert cache.get(key) is None
    cache.paths(key)[1].write_text("{not json")
    assert cache.get(key) is None


# --- the manifest's engines section ----------------------------------------------------------------
def fake_engines(art: Path, tensorrt_version="10.3.0", sm=87) -> dict:
    """Engine entries written by hand (files with made-up bytes), as `ps3edge build` records them."""
    manifest = load_manifest(art)
    bounds = profile_bounds(manifest)
    entries = {}
    for stage in manifest.stages:
        name = f"{stage}.fp16.{'0' * 12}.engine"
        (art / name).write_bytes(f"not really a {stage} engine".encode())
        entries[stage] = EngineEntry(
            file=name, sha256=file_sha256(art / name), built_via="onnx", precision="fp16",
            requested_precision="fp16", strongly_typed=False, precision_constraints=0,
            tensorrt_version=tensorrt_version, cuda_version="12.6", gpu_name="Orin", sm=sm,
            jetpack="6.2", l4t="36.4.3", profiles=bounds[stage], max_look_close=6,
            workspace_bytes=1 << 30, builder_optimization_level=3, device_memory_bytes=123456,
            bindings={n: n for n in manifest.stages[stage].input_names + manifest.stages[stage].output_names},
            cache_key="a" * 64)
    return entries


def test_manifest_accepts_an_engines_section(tiny_copy):
    record_engines(tiny_copy, fake_engines(tiny_copy))
    manifest = load_manifest(tiny_copy, verify=True)
    assert set(manifest.engines) == {"lowres", "selector", "highres"}
    assert all(manifest.files[e.file] == e.sha256 for e in manifest.engines.values())
    assert not list(tiny_copy.glob(".*.tmp"))
    # recording again replaces the entries and drops the old files' hashes
    newer = {}
    for stage, e in fake_engines(tiny_copy).items():
        newer[stage] = replace(e, file=e.file.replace("0" * 12, "1" * 12))
        shutil.copy(tiny_copy / e.file, tiny_copy / newer[stage].file)
    record_engines(tiny_copy, newer)
    manifest = load_manifest(tiny_copy, verify=True)
    assert not any(".000000000000." in f for f in manifest.files)


def tampered(art: Path, edit) -> str:
    """Apply `edit` to the manifest's JSON; return the one-line error load_manifest gives."""
    path = art / defaults.MANIFEST_NAME
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(Ps3EdgeError) as e:
        load_manifest(art, verify=True)
    assert "\n" not in str(e.value)
    return str(e.value)


def _set(path, value):
    def edit(m):
        node = m
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
    return edit


@pytest.mark.parametrize("edit, message", [
    (_set(["engines", "highres", "sha256"], "f" * 64), "not listed in 'files' with the engine's sha256"),
    (_set(["engines", "highres", "profiles", "patches", "max"], [48, 4000, 588]), "exceeds the 2560"),
    (_set(["engines", "highres", "profiles", "patches", "max"], [60, 2560, 588]), r"\(T\) max 60 exceeds the 48"),
    (_set(["engines", "highres", "profiles", "kv_cache", "max"], [4, 2, 8, 4, 729, 17]), "is static"),
    (_set(["engines", "highres", "profiles", "patches", "min"], [49, 1, 588]), "min 49 <= opt 48 <= max 48 does not hold"),
    (_set(["engines", "highres", "profiles", "positions"], {"min": [1, 1], "opt": [5, 2560], "max": [5, 2560]}),
     "different bounds"),
    (_set(["engines", "highres", "max_look_close"], 4), r"max_look_close 4 \(x 8 images\) does not match its profile's T max 48"),
    (_set(["engines", "lowres", "profiles", "pixels", "max"], [9, 3, 1512, 1512]), r"\(B\) max 9 exceeds the 8"),
    (_set(["engines", "lowres", "profiles"], {"image": {"min": [1], "opt": [1], "max": [1]}}), "name inputs"),
    (_set(["engines", "selector", "precision"], "fp8"), "precision must be one of"),
    (_set(["engines", "selector", "sm"], "87"), "sm is missing or not a int"),
    (_set(["engines", "selector", "built_via"], "tvm"), "built_via"),
    (_set(["engines", "selector", "file"], "../selector.engine"), "not a file name inside"),
    (_set(["engines", "selector", "bindings", "prob"], "prompt"), "distinct engine tensor"),
    (_set(["engines", "selector", "tensorrt_version"], "10.13.0.35"), "different TensorRT versions"),
    (_set(["engines", "projector"], {}), "stages that do not exist"),
    (_set(["engines"], []), "'engines' is not an object"),
])
def test_manifest_refuses_a_tampered_engines_section(tiny_copy, edit, message):
    record_engines(tiny_copy, fake_engines(tiny_copy))
    error = tampered(tiny_copy, edit)
    assert "rebuild the engines" in error
    assert re.search(message, error), error


def test_a_changed_engine_file_is_refused(tiny_copy):
    entries = fake_engines(tiny_copy)
    record_engines(tiny_copy, entries)
    (tiny_copy / entries["highres"].file).write_bytes(b"another engine")
    with pytest.raises(Ps3EdgeError, match="highres.fp16.000000000000.engine was changed"):
        load_manifest(tiny_copy, verify=True)


def test_record_engines_refuses_an_inconsistent_section_and_writes_nothing(tiny_copy):
    before = (tiny_copy / defaults.MANIFEST_NAME).read_bytes()
    entries = fake_engines(tiny_copy)
    profiles = entries["highres"].profiles
    entries["highres"] = replace(entries["highres"], profiles={**profiles, "patches": {**profiles["patches"],
                                                                                      "max": [48, 9999, 588]}})
    with pytest.raises(Ps3EdgeError, match="exceeds"):
        record_engines(tiny_copy, entries)
    assert (tiny_copy / defaults.MANIFEST_NAME).read_bytes() == before


def test_inspect_lists_the_engines(tiny_copy):
    record_engines(tiny_copy, fake_engines(tiny_copy))
    result = cli("inspect", tiny_copy, env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert "engine highres: highres.fp16.000000000000.engine, fp16 via onnx, TensorRT 10.3.0 on SM87 (Orin), T <= 6" \
        in result.stdout


def test_typed_sections_give_back_the_json_they_were_read_from(tiny_copy):
    """The engines and precisions sections read as records and written back are the same JSON, key
    for key and in order (a manifest that build or calibrate rewrites keeps its bytes); keys this
    release does not know are kept."""
    record_engines(tiny_copy, fake_engines(tiny_copy))
    raw = json.loads((tiny_copy / defaults.MANIFEST_NAME).read_text())
    raw["engines"]["highres"]["from_a_newer_release"] = {"x": [1]}
    manifest = with_precision(with_precision(Manifest.from_dict(raw), "int8"), "fp16")
    again = manifest.replace(engines=dict(manifest.engines), precisions=dict(manifest.precisions))
    assert json.dumps(again.to_dict()) == json.dumps(manifest.to_dict())
    assert manifest.engines["highres"].extra == {"from_a_newer_release": {"x": (1,)}}
    int8 = manifest.precisions["int8"]
    assert int8.calibration is None and int8.stages["highres"].precision_map.quantized_nodes == ("/highres/MatMul",)
    fp16 = manifest.precisions["fp16"].stages["lowres"].precision_map
    assert fp16.tensorrt.builder_flags == ("FP16", "OBEY_PRECISION_CONSTRAINTS") and fp16.quantized_nodes is None


def test_check_engines_section_without_engines_is_silent():
    check_engines_section(unexported_manifest("ps3-tiny"), lambda what: pytest.fail(what))


# --- this machine against the engine ------------------------------------------------------------------
def test_engine_compatibility_names_both_sides():
    entry = EngineEntry(file="highres.fp16.x.engine", sha256="0" * 64, built_via="onnx", precision="fp16",
                        tensorrt_version="10.3.0", cuda_version="12.6", sm=87, gpu_name="Orin", jetpack="6.2",
                        profiles={}, cache_key="a" * 64)
    check_engine_compatible("highres", entry, {"tensorrt_version": "10.3.0.30", "sm": 87, "gpu_name": "Orin"})
    with pytest.raises(Ps3EdgeError) as e:
        check_engine_compatible("highres", entry, {"tensorrt_version": "10.13.0.35", "sm": 90,
                                                   "gpu_name": "NVIDIA H100 80GB HBM3"})
    text = str(e.value)
    assert "\n" not in text
    for part in ("TensorRT 10.3.0 on SM87 (Orin, JetPack 6.2)", "TensorRT 10.13.0.35 on SM90 (NVIDIA H100",
                 "TensorRT version and GPU architecture differ", "ps3edge build"):
        assert part in text
    with pytest.raises(Ps3EdgeError, match="the GPU architecture differ"):
        check_engine_compatible("highres", entry, {"tensorrt_version": "10.3.0", "sm": 72, "gpu_name": "Xavier"})
    assert same_tensorrt("10.3.0", "10.3.0.30") and not same_tensorrt("10.3.0", "10.4.0")


def test_jetson_release_parsing(tmp_path):
    release = tmp_path / "nv_tegra_release"
    release.write_text("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, "
                       "DATE: Wed Jan  8 01:49:37 UTC 2025\n")
    assert l4t_version(release) == "36.4.3"
    assert l4t_version(tmp_path / "missing") is None
    release.write_text("garbage")
    assert l4t_version(release) is None
    if shutil.which("dpkg-query") is None or subprocess.run(
            ["dpkg-query", "--show", "nvidia-jetpack"], capture_output=True).returncode != 0:
        assert jetpack_version("36.4.3") == "6.2"      # no nvidia-jetpack package here: the L4T table
    assert jetpack_version(None) is None


# --- onnxruntime providers -------------------------------------------------------------------------
def test_ort_providers_prefer_tensorrt_then_cuda_and_keep_cpu(artifacts, tmp_path):
    assert preferred_ort_providers(["AzureExecutionProvider", "CPUExecutionProvider"], env={}) == ["CPUExecutionProvider"]
    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    bounds = profile_bounds(load_manifest(artifacts("ps3-tiny")))
    options = ort_tensorrt_options(bounds["highres"], tmp_path)
    providers = preferred_ort_providers(gpu, options, env={})
    assert providers[1:] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    name, opts = providers[0]
    assert name == "TensorrtExecutionProvider" and opts["trt_engine_cache_enable"] == "True"
    assert opts["trt_profile_max_shapes"].startswith(
        "patches:48x2560x588,positions:48x2560,step_image:48,kv_cache:4x2x8x4x729x16")
    assert ort_tensorrt_options(bounds["lowres"], tmp_path)["trt_profile_max_shapes"] == "pixels:8x3x1512x1512"
    assert preferred_ort_providers(["CUDAExecutionProvider", "CPUExecutionProvider"], env={}) == \
        ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert preferred_ort_providers(gpu, options, env={"PS3EDGE_ORT_PROVIDERS": "CUDAExecutionProvider"}) == \
        ["CUDAExecutionProvider"]
    with pytest.raises(Ps3EdgeError, match="lacks"):
        preferred_ort_providers(["CPUExecutionProvider"], env={"PS3EDGE_ORT_PROVIDERS": "CUDAExecutionProvider"})


# --- without TensorRT ---------------------------------------------------------------------------------
def tensorrt_missing() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return True
    return False


def test_tensorrt_backend_needs_engines(tiny_copy):
    with pytest.raises(Ps3EdgeError, match="has no TensorRT engine for lowres, selector, highres; build them"):
        load_stages(tiny_copy, load_manifest(tiny_copy), "tensorrt")


@pytest.mark.skipif(not tensorrt_missing(), reason="TensorRT is installed here: the refusal cannot happen")
def test_build_without_tensorrt_exits_2_with_one_line_and_writes_nothing(tiny_copy, tmp_path):
    def snapshot():
        return {p.name: file_sha256(p) for p in tiny_copy.iterdir()}
    before = snapshot()
    env = {**os.environ, "COLUMNS": "200", defaults.ENV_ENGINE_CACHE: str(tmp_path / "engine-cache")}
    # onnx in a real process from the console script (a refusal's exit code and stderr as the shell
    # sees them), torch-tensorrt in this one
    for via, runner in (("onnx", cli_process), ("torch-tensorrt", cli)):
        result = runner("build", tiny_copy, "--precision", "fp16", "--via", via,
                        "--timing-cache", tmp_path / "timing.cache", env=env)
        assert result.returncode == 2, result.stderr
        lines = [l for l in (result.stdout + result.stderr).splitlines() if l.strip()]
        assert len(lines) == 1, lines
        assert lines[0].startswith("error: TensorRT is not installed here") and "tensorrt" in lines[0]
        assert "JetPack" in lines[0]
    assert snapshot() == before
    assert not (tmp_path / "engine-cache").exists() and not (tmp_path / "timing.cache").exists()


# --- with TensorRT (skipped here, run by benchmarks/trt_check.py's machine) --------------------------------
def _need_gpu_tensorrt():
    trt = pytest.importorskip("tensorrt", reason=TRT_SKIP)
    import torch
    if not torch.cuda.is_available():
        pytest.skip("TensorRT is installed but no CUDA GPU is visible")
    return trt


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_build_and_run_tiny_engines_match_onnxruntime(tiny_copy, tmp_path, image, precision):
    _need_gpu_tensorrt()
    from ps3edge.engines.builder import build
    from ps3edge.runtime.lookclose import Pipeline
    from ps3edge.runtime.planning import settings_from_env

    options = BuildOptions(precision=precision, engine_cache=tmp_path / "cache", timing_cache=tmp_path / "t.cache")
    manifest = build(tiny_copy, options)
    assert set(manifest.engines) == {"lowres", "selector", "highres"} and (tmp_path / "t.cache").is_file()
    load_manifest(tiny_copy, verify=True)
    rebuilt = build(tiny_copy, options)                             # identical build: nothing changes
    assert rebuilt.engines == manifest.engines
    settings = settings_from_env(env={}, num_look_close=6)
    ref = Pipeline(tiny_copy, "onnxruntime").run(image, settings)
    got = Pipeline(tiny_copy, "tensorrt").run(image, settings)
    tol = defaults.TOLERANCES[precision]
    assert [m.tolist() for m in got.plan.selection_maps] == [m.tolist() for m in ref.plan.selection_maps]
    assert np.abs(got.features - ref.features).max() <= tol["max_abs"]


def test_tensorrt_highres_refuses_calls_beyond_t_max_and_the_runtime_splits_them(tiny_copy, tmp_path, image):
    """The engine's T_max is the highres runner's max_steps_per_call: a larger call is refused,
    calls of at most T_max steps match onnxruntime, and the runtime's loop groups its calls to fit."""
    _need_gpu_tensorrt()
    from ps3edge.engines.builder import build
    from ps3edge.runtime.lookclose import Pipeline
    from ps3edge.runtime.planning import settings_from_env

    build(tiny_copy, BuildOptions(max_look_close=2, engine_cache=None))
    manifest = load_manifest(tiny_copy)
    stages = load_stages(tiny_copy, manifest, "tensorrt")
    onnx = load_stages(tiny_copy, manifest, "onnxruntime")
    rng = np.random.default_rng(0)
    kv_shape = [2 if d == "B" else d for d in manifest.stages["highres"].inputs[3].shape]
    feed = {"patches": rng.standard_normal((20, 64, 588), dtype=np.float32),
            "positions": rng.integers(0, 14580, (20, 64), dtype=np.int32),
            "step_image": np.arange(20, dtype=np.int32) % 2,
            "kv_cache": rng.standard_normal(kv_shape, dtype=np.float32)}
    assert stages["highres"].max_steps_per_call == 16                # 2 steps x 8 images
    with pytest.raises(Ps3EdgeError, match="engine 'highres' takes at most 16 steps per call, got 20"):
        stages["highres"].infer(feed)
    got = np.concatenate([stages["highres"].infer({**feed, "patches": feed["patches"][t: t + 16],
                                                   "positions": feed["positions"][t: t + 16],
                                                   "step_image": feed["step_image"][t: t + 16]})["highres_features"]
                          for t in range(0, 20, 16)], axis=1)
    ref = onnx["highres"].infer(feed)["highres_features"]
    assert got.shape == ref.shape and np.abs(got - ref).max() < 1e-3
    with Pipeline(tiny_copy, "tensorrt") as pipe:
        assert pipe.steps_per_call() == 16
        results = pipe.run_batch([image] * 3, settings_from_env(env={}, num_look_close=6))
        assert results[0].highres_calls == [(16, 2560), (2, 2560)]


def test_build_via_torch_tensorrt(tiny_copy, tmp_path):
    _need_gpu_tensorrt()
    pytest.importorskip("torch_tensorrt", reason="Torch-TensorRT is not installed")
    from ps3edge.engines.builder import build

    manifest = build(tiny_copy, BuildOptions(via="torch-tensorrt", engine_cache=None))
    assert {e.built_via for e in manifest.engines.values()} == {"torch-tensorrt"}
    stages = load_stages(tiny_copy, manifest, "tensorrt")
    assert set(stages) == {"lowres", "selector", "highres"}


# --- the Jetson memory plan ------------------------------------------------------------------------
def test_jetson_readme_tables_are_the_memory_plan_scripts_output(monkeypatch):
    root = Path(__file__).resolve().parents[1] / "examples" / "jetson"
    out = io.StringIO()
    monkeypatch.setattr("sys.argv", [str(root / "memory_plan.py")])
    with contextlib.redirect_stdout(out):          # the script as `python memory_plan.py` runs it
        runpy.run_path(str(root / "memory_plan.py"), run_name="__main__")
    plan = out.getvalue()
    # the walk-through shows the plan's verdict table (the whole plan is in docs/tensorrt-and-jetson.md,
    # checked by tests/test_memory_plan.py): every row of its tables is a row the script prints
    readme = (root / "README.md").read_text().split("## Memory plan")[1]
    rows = [line for line in readme.splitlines() if line.startswith("| ") and not line.startswith("| board |")
            and not line.startswith("| ---")]
    assert len(rows) == 4
    missing = [r for r in rows if r not in plan.splitlines()]
    assert not missing, missing
    # the figures the issue names, checked against their definitions
    assert "| ps3-4k | K/V cache | 27 x 2 x 1 x 16 x 729 x 72 | 45,349,632 | 173.0 |" in plan
    assert "| ps3-4k | highres_patches | 1 x 87480 x 588 | 51,438,240 | 196.2 |" in plan
