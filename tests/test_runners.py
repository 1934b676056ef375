"""The stage-runner interface (runtime/runners/): one lifecycle for every backend (lazy load,
close, context manager, a closed runner refusing in one line), the registry's answers about
what works here, a runner's step limit and the runtime grouping its calls to fit it, the LLM
engines' lifecycle, and the TensorRT backend's Polygraphy loader against a stand-in TensorRT."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from ps3edge.artifact.manifest import load_manifest
from ps3edge.errors import Ps3EdgeError
from ps3edge.runtime.device import Device
from ps3edge.runtime.lookclose import Pipeline
from ps3edge.runtime.planning import settings_from_env
from ps3edge.runtime.runners import BACKENDS, StageRunner, backends, close_all, get_backend, load_stages
from ps3edge.runtime.runners.onnxruntime import OnnxRuntimeRunner, session_loader
from ps3edge.runtime.runners.probe import Facts


def _lowres_feed(manifest) -> dict:
    shape = [1 if d == "B" else d for d in manifest.stages["lowres"].inputs[0].shape]
    return {"pixels": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_close_frees_and_refuses_further_infer(artifacts, backend):
    art = artifacts("ps3-tiny")
    manifest = load_manifest(art)
    stages = load_stages(art, manifest, backend)
    assert set(stages) == {"lowres", "selector", "highres"}
    assert all(isinstance(r, StageRunner) and r.is_active and r.backend == backend for r in stages.values())
    lowres = stages["lowres"]
    assert lowres.input_names == ["pixels"] and lowres.output_names == manifest.stages["lowres"].output_names
    assert lowres.input_metadata() == {"pixels": ("float32", tuple(manifest.stages["lowres"].inputs[0].shape))}
    assert stages["highres"].input_metadata()["patches"][1][:2] == ("T", "N")
    out = lowres.infer(_lowres_feed(manifest))
    assert set(out) == set(lowres.output_names)
    close_all(stages)
    assert not lowres.is_active and lowres.closed
    assert (lowres.session if backend == "onnxruntime" else lowres.module) is None      # freed
    for runner in stages.values():
        with pytest.raises(Ps3EdgeError, match=f"the {backend} runner of stage '{runner.name}' is closed"):
            runner.infer({})
    lowres.close()                                                   # closing twice is harmless


def test_a_runner_loads_lazily_and_closes_at_the_end_of_its_with_block(artifacts, tmp_path):
    art = artifacts("ps3-tiny")
    manifest = load_manifest(art)
    calls = []
    load = session_loader(art / manifest.stages["lowres"].file)

    def loader():
        calls.append(1)
        return load()

    runner = OnnxRuntimeRunner("lowres", manifest.stages["lowres"], loader)
    assert not calls and not runner.is_active                        # nothing loaded yet
    with runner as r:
        assert r is runner and r.is_active and calls == [1]
        assert r.device == Device("cpu") and r.device_label == "CPU EP"
        r.infer(_lowres_feed(manifest))
        r.infer(_lowres_feed(manifest))
    assert calls == [1] and runner.closed and runner.session is None
    with pytest.raises(Ps3EdgeError, match="is closed"):
        with runner:
            pass

    (tmp_path / "broken.onnx").write_bytes(b"not onnx")
    with pytest.raises(Ps3EdgeError, match="^onnxruntime cannot load broken.onnx: "):
        OnnxRuntimeRunner.from_path(tmp_path / "broken.onnx")             # from_path loads at once


def test_a_runner_refuses_a_call_with_more_steps_than_it_takes(artifacts):
    art = artifacts("ps3-tiny")
    manifest = load_manifest(art)
    entry = manifest.stages["highres"]
    runner = OnnxRuntimeRunner("highres", entry, session_loader(art / entry.file))
    runner.max_steps_per_call = 2
    rng = np.random.default_rng(0)
    kv = rng.standard_normal([1 if d == "B" else d for d in entry.inputs[3].shape]).astype(np.float32)

    def feed(t):
        return {"patches": rng.standard_normal((t, 8, 588)).astype(np.float32),
                "positions": rng.integers(0, 2916, (t, 8)).astype(np.int32),
                "step_image": np.zeros(t, np.int32), "kv_cache": kv}
    with runner:
        assert runner.steps_in(feed(3)) == 3
        with pytest.raises(Ps3EdgeError, match="^stage 'highres' takes at most 2 steps per call, got 3$"):
            runner.infer(feed(3))
        assert runner.infer(feed(2))["highres_features"].shape[1] == 2


def test_the_runtime_groups_highres_calls_to_the_runners_limit(artifacts, image):
    """The one place a step limit is enforced: the pipeline asks the highres runner for its limit
    and groups the plan's steps so that no call exceeds it; the result does not change."""
    settings = settings_from_env({}, num_look_close=3, mode="after_image")
    with Pipeline(artifacts("ps3-tiny"), "onnxruntime") as pipe:
        assert pipe.stages["highres"].max_steps_per_call is None and pipe.steps_per_call() == 6
        whole = pipe.run(image, settings)
        pipe.stages["highres"].max_steps_per_call = 1
        assert pipe.steps_per_call() == 1
        one_by_one = pipe.run(image, settings)
    assert all(t <= 1 for t, _ in one_by_one.highres_calls) and len(one_by_one.highres_calls) > len(whole.highres_calls)
    assert np.abs(one_by_one.features - whole.features).max() <= 1e-5


def test_a_pipeline_closes_its_runners(artifacts, image):
    with Pipeline(artifacts("ps3-tiny"), "torch", device="cpu") as pipe:
        runners = list(pipe.stages.values())
    assert all(r.closed for r in runners)
    with pytest.raises(Ps3EdgeError, match="this pipeline of .* is closed"):
        pipe.run(image, settings_from_env({}, num_look_close=1))
    pipe.close()


@pytest.mark.parametrize("value, threads", [("1", 1), ("3,2", 3), ("", 0), ("four", 0), ("0", 0)])
def test_onnxruntime_sessions_take_their_cpu_threads_from_omp_num_threads(artifacts, monkeypatch, value, threads):
    """OMP_NUM_THREADS (its first number, as OpenMP's list syntax allows) sets a session's threads;
    unset or not a positive number, onnxruntime chooses (0)."""
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    runner = OnnxRuntimeRunner.from_path(artifacts("ps3-tiny") / "selector.onnx")
    assert runner.session.get_session_options().intra_op_num_threads == threads
    runner.close()


def test_the_registry_answers_what_works_here():
    assert BACKENDS == ("onnxruntime", "torch", "tensorrt") and [b.name for b in backends()] == list(BACKENDS)
    with pytest.raises(Ps3EdgeError, match="^unknown backend 'onnx'; choose one of: onnxruntime, torch, tensorrt$"):
        get_backend("onnx")
    with pytest.raises(Ps3EdgeError, match="^unknown backend 'onnx'"):
        load_stages(".", None, "onnx")
    assert get_backend("onnxruntime").available() == (True, "")
    assert get_backend("onnxruntime").available("CPU EP", "int8") == (True, "CPUExecutionProvider runs Q/DQ models")
    assert get_backend("torch").available("cpu", "fp32") == (True, "CPU")
    for backend in backends():
        for device, precision, ok, why in backend.support():
            assert device in backend.devices and precision in backend.devices[device]
            assert isinstance(ok, bool) and isinstance(why, str) and (ok or why)

    # the answers follow the machine's facts
    def facts(tensorrt="10.3.0", polygraphy=True, gpu=(8, 7), bf16=True):
        pkg = lambda v: {"installed": v is not None, "version": v, "error": None}   # noqa: E731
        cuda = ({"available": True, "reason": None, "devices": [{"name": "Orin", "compute_capability": list(gpu),
                                                                 "bf16": bf16}]} if gpu else
                {"available": False, "reason": "no CUDA GPU visible: driver or device missing", "devices": []})
        return Facts({"torch": pkg("2.5"), "onnxruntime": pkg("1.20"), "tensorrt": pkg(tensorrt),
                      "polygraphy": pkg("0.49.9" if polygraphy else None)},
                     ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], cuda)
    trt = get_backend("tensorrt")
    assert trt.available(facts=facts()) == (True, "")
    assert trt.available("cuda", "fp16", facts()) == (True, "SM 8.7")
    assert trt.available("cuda", "bf16", facts(gpu=(7, 5))) == (False, "bf16 needs SM 8.0+, this GPU is SM 7.5")
    assert trt.available("cuda", "fp32", facts(gpu=None)) == (False, "no CUDA GPU visible: driver or device missing")
    assert trt.available(facts=facts(tensorrt=None)) == (False, "tensorrt not installed")
    ok, why = trt.available(facts=facts(tensorrt="8.6.1"))
    assert not ok and "TensorRT 10 or newer" in why and "8.6.1" in why
    ok, why = trt.available(facts=facts(polygraphy=False))
    assert not ok and why.startswith("polygraphy not installed") and "ps3edge build and the tensorrt backend use it" in why
    assert trt.engines_usable(facts(polygraphy=False)) == (True, "")
    ort = get_backend("onnxruntime")
    assert ort.available("TensorRT EP", "int8", facts()) == (True, "TensorrtExecutionProvider, SM 8.7")
    assert ort.available("TensorRT EP", "fp32", facts(tensorrt=None)) == \
        (False, "TensorrtExecutionProvider listed, but tensorrt not installed")
    assert get_backend("torch").available("cuda", "bf16", facts(bf16=False)) == (False, "this GPU has no bf16 support")
    assert get_backend("torch").available("cuda", "fp16", facts()) == \
        (True, "Orin: fast path (CUDA graph, device preprocessing)")


def test_llm_engines_close_and_refuse_further_calls(tmp_path):
    from ps3edge.llm.engine import DecoderLLM, LLMRunner, OnnxLLM, TorchLLM, export_llm
    from ps3edge.llm.vila import build_vila

    llm = build_vila("vila-hd-tiny").llm
    embeds = np.random.default_rng(0).standard_normal((3, llm.config.hidden_size)).astype(np.float32)
    onnx = OnnxLLM(export_llm(llm, tmp_path / "llm.onnx"))
    for engine in (TorchLLM(llm), DecoderLLM(llm), onnx):
        assert isinstance(engine, LLMRunner)
        with engine as e:
            e.reset()
            assert e.prefill(embeds).logits.shape == (llm.config.vocab_size,)
            e.decode(embeds[0])
        assert engine.closed
        with pytest.raises(Ps3EdgeError, match=f"this {type(engine).__name__} is closed"):
            engine.decode(embeds[0])
    assert onnx.stage.closed


STAND_IN_TENSORRT = '''
__version__ = "10.3.0"
class DataType:
    def __init__(self, name): self.name = name
    def __repr__(self): return "DataType." + self.name
float32, float16, int32, int8, bool, int64, uint8, bfloat16 = (DataType(n) for n in
    ("FLOAT", "HALF", "INT32", "INT8", "BOOL", "INT64", "UINT8", "BF16"))
fp8 = DataType("FP8")
class Logger:
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)
    def __init__(self, severity=None): pass
class ILogger:
    def __init__(self): pass
class IStreamReader:
    def __init__(self): pass
def init_libnvinfer_plugins(logger, namespace): return True
class Runtime:
    def __init__(self, logger): pass
    def deserialize_cuda_engine(self, reader):
        return "an engine" if reader.read(4) == b"good" else None
'''


def test_the_tensorrt_loader_is_polygraphys_and_fails_in_one_line(tmp_path):
    """EngineFromPath and DataType, driven through ps3edge's wrappers against a stand-in TensorRT
    (TensorRT itself cannot be installed here): an engine file loads, a bad one is refused in one
    line with nothing printed, and TensorRT tensor types map to torch's."""
    pytest.importorskip("polygraphy", reason="Polygraphy (the tensorrt extra) is not installed")
    (tmp_path / "tensorrt").mkdir()
    (tmp_path / "tensorrt" / "__init__.py").write_text(STAND_IN_TENSORRT)
    (tmp_path / "good.engine").write_bytes(b"good engine")
    (tmp_path / "bad.engine").write_bytes(b"junk")
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import tensorrt as trt, torch
        from ps3edge.errors import Ps3EdgeError
        from ps3edge.runtime.runners.tensorrt import engine_loader, torch_dtype
        runtime, engine = engine_loader(trt, {str(tmp_path / "good.engine")!r})()
        assert engine == "an engine" and isinstance(runtime, trt.Runtime)
        try:
            engine_loader(trt, {str(tmp_path / "bad.engine")!r})()
        except Ps3EdgeError as e:
            print("refused:", e)
        assert torch_dtype(trt.float16) is torch.float16 and torch_dtype(trt.int32) is torch.int32
        assert torch_dtype(trt.bfloat16) is torch.bfloat16
        try:
            torch_dtype(trt.fp8)
        except Ps3EdgeError as e:
            print("refused:", e)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "refused: TensorRT cannot load bad.engine; rebuild it with 'ps3edge build'",
        "refused: the engine has a tensor of type DataType.FP8, which ps3edge cannot feed"], r.stdout
