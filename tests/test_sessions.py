"""One interface for everything that runs an artifact: the typed --device (runtime/device.py), a
backend's session and what it states (runners/session.py; the torch backend's fast path is one),
a runner checking a feed against its declared inputs and timing itself (runners/base.py), the
look-close schedule resolved once (planning.resolve), and the registry of VILA-HD's language-side
implementations (llm/implementations.py)."""

from __future__ import annotations

import numpy as np
import pytest

from ps3edge.artifact.manifest import load_manifest
from ps3edge.errors import Ps3EdgeError
from ps3edge.runtime.device import AUTO, CPU, Device, on_torch
from ps3edge.runtime.lookclose import Pipeline
from ps3edge.runtime.planning import Geometry, Schedule, resolve, settings_from_env, step_counts
from ps3edge.runtime.runners import BACKENDS, Session, get_backend, open_session
from ps3edge.runtime.runners.onnxruntime import OnnxRuntimeRunner

GEO = Geometry(lowres_grid=27, highres_grids=(54, 108), select_num_each_scale=(512, 2048))


# --- the device ----------------------------------------------------------------------------------
@pytest.mark.parametrize("text, device", [(None, AUTO), ("auto", AUTO), ("cpu", CPU), ("cuda", Device("cuda")),
                                          ("cuda:1", Device("cuda", 1)), (" cpu ", CPU), (CPU, CPU)])
def test_device_text_is_parsed_once(text, device):
    parsed = Device.parse(text)
    assert parsed == device and Device.parse(str(parsed)) == parsed


@pytest.mark.parametrize("text", ["tpu", "cuda:x", "cuda:", "cpu:0", "CUDA", ""])
def test_a_device_ps3edge_does_not_know_is_one_line(text):
    with pytest.raises(Ps3EdgeError, match=r"^--device takes auto, cpu, cuda \(or cuda:N\), got '.*'$"):
        Device.parse(text)


def test_backends_resolve_the_device_they_run_on():
    import torch

    assert on_torch(AUTO) == (Device("cuda") if torch.cuda.is_available() else CPU)
    assert get_backend("torch").resolve_device(CPU) == CPU
    for name in ("onnxruntime", "tensorrt"):               # they choose their own device
        assert get_backend(name).resolve_device(AUTO) == AUTO
        with pytest.raises(Ps3EdgeError, match=f"^--device applies to the torch backend; {name} chooses"):
            get_backend(name).resolve_device(CPU)
    if not torch.cuda.is_available():
        with pytest.raises(Ps3EdgeError, match="^--device cuda:0 asked for, but torch sees no CUDA device here$"):
            on_torch(Device("cuda", 0))


# --- sessions: the backend decides, the session states it ---------------------------------------------
def test_each_backend_states_what_it_needs_and_can_do():
    stated = {name: (b.takes_device, b.runs_whole_loop, b.runs_calibrated_stages, b.needs_gpu, b.cast_precisions)
              for name, b in ((n, get_backend(n)) for n in BACKENDS)}
    assert stated == {"onnxruntime": (False, False, True, False, ("fp32",)),
                      "torch": (True, True, False, False, ("fp32", "fp16", "bf16")),
                      "tensorrt": (False, False, False, True, ("fp32",))}


def test_a_staged_session_hands_out_its_runners(artifacts):
    art = artifacts("ps3-tiny")
    session = open_session(art, load_manifest(art), "onnxruntime")
    assert isinstance(session, Session) and not session.whole_loop and not session.preprocesses_on_device
    assert session.device == AUTO and session.preprocess_device == CPU and session.program is None
    assert session.label == "onnxruntime" and session.device_label == "CPU EP"
    runners = list(session.stages.values())
    assert len(runners) == 3 and session.steps_per_call(load_manifest(art)) == 6
    session.close()
    assert session.closed and all(r.closed for r in runners)
    with pytest.raises(Ps3EdgeError, match="this onnxruntime session is closed"):
        session.stages
    with pytest.raises(Ps3EdgeError, match="^the device-resident fast path runs on the torch backend only$"):
        open_session(art, load_manifest(art), "onnxruntime", whole_loop=True)


def test_the_torch_backend_chooses_the_fast_path_and_its_session_says_so(artifacts, image):
    art = artifacts("ps3-tiny")
    settings = settings_from_env({}, num_look_close=1, mode="after_image")
    with Pipeline(art, "torch", device="cpu") as staged:                  # the CPU: stage by stage
        assert not staged.session.whole_loop and staged.fast is None and staged.device == CPU
        assert staged.session.label == "torch" and staged.preprocess_on == "cpu"
        want = staged.run(image, settings)
    with Pipeline(art, "torch", device="cpu", fast=True) as fast:         # asked for: the one program
        session = fast.session
        assert session.whole_loop and session.preprocesses_on_device and fast.preprocess_on == "device"
        assert session.preprocess_device == CPU and fast.fast is session.program is not None
        assert session.label == "torch, cpu, fast path" and session.device_label == "cpu"
        got = fast.run(image, settings)
        assert set(session.last_timings) == {"look-close (device)", "to host"}
        assert set(fast.stages) == {"lowres", "selector", "highres"}       # the staged runners, on demand
    assert fast.fast is None and session.closed
    assert np.abs(got.features - want.features).max() <= 1e-4
    with pytest.raises(Ps3EdgeError, match=r"^the torch fast path runs in fp32, fp16, bf16, not int8"):
        Pipeline(art, "torch", device="cpu", fast=True, precision="int8")


def test_stage_times_come_from_the_runners(artifacts, image):
    with Pipeline(artifacts("ps3-tiny"), "onnxruntime") as pipe:
        result = pipe.run(image, settings_from_env({}, num_look_close=2, mode="after_image"))
        highres = pipe.stages["highres"]
        assert list(result.timings_ms) == ["preprocess", "lowres", "selector", "planning", "highres", "assemble"]
        assert result.timings_ms["lowres"] == pytest.approx(pipe.stages["lowres"].last_inference_time() * 1e3)
        assert result.timings_ms["selector"] == pytest.approx(pipe.stages["selector"].last_inference_time() * 1e3)
        assert len(result.highres_calls) == 1
        assert result.timings_ms["highres"] == pytest.approx(highres.last_inference_time() * 1e3)


# --- a feed against the declared inputs ----------------------------------------------------------------
@pytest.fixture
def highres(artifacts):
    art = artifacts("ps3-tiny")
    entry = load_manifest(art).stages["highres"]
    runner = OnnxRuntimeRunner.from_path(art / entry.file, entry)
    yield runner, entry
    runner.close()


def _feed(entry, t=2, n=8):
    rng = np.random.default_rng(0)
    kv = rng.standard_normal([1 if d == "B" else d for d in entry.tensor("kv_cache").shape]).astype(np.float32)
    return {"patches": rng.standard_normal((t, n, 588)).astype(np.float32),
            "positions": rng.integers(0, 2916, (t, n)).astype(np.int32), "step_image": np.zeros(t, np.int32),
            "kv_cache": kv}


def test_a_runner_checks_the_feed_against_its_declared_inputs(highres):
    runner, entry = highres
    assert runner.last_inference_time() is None
    runner.infer(_feed(entry))
    assert runner.last_inference_time() > 0
    declared = str(entry.tensor("patches").shape).replace("'", "")
    bad = {
        "missing": ({k: v for k, v in _feed(entry).items() if k != "positions"},
                    r"^stage 'highres' was fed no input 'positions': given \['kv_cache', 'patches', 'step_image'\], "
                    r"declared \['patches', 'positions', 'step_image', 'kv_cache'\]$"),
        "extra": ({**_feed(entry), "prompt": np.zeros(3)}, r"^stage 'highres' was fed an input 'prompt' it does not take"),
        "dtype": ({**_feed(entry), "positions": _feed(entry)["positions"].astype(np.int64)},
                  r"^stage 'highres' input 'positions': given int64 \(2, 8\), declared int32 \(T, N\)$"),
        "rank": ({**_feed(entry), "patches": _feed(entry)["patches"][0]},
                 rf"^stage 'highres' input 'patches': given float32 \(8, 588\), declared float32 {re_escape(declared)}$"),
        "fixed dim": ({**_feed(entry), "patches": np.zeros((2, 8, 587), np.float32)},
                      r"^stage 'highres' input 'patches': given float32 \(2, 8, 587\), declared float32 \(T, N, 588\)$"),
    }
    for what, (feed, message) in bad.items():
        with pytest.raises(Ps3EdgeError, match=message):
            runner.infer(feed)
    runner.max_steps_per_call = 1                           # a bound on a dynamic axis
    assert runner.axis_bounds() == {"T": 1}
    with pytest.raises(Ps3EdgeError, match="^stage 'highres' takes at most 1 steps per call, got 2$"):
        runner.infer(_feed(entry))
    with pytest.raises(Ps3EdgeError, match=r"given int64 \(1, 8\), declared int32 \(T, N\) with T <= 1$"):
        runner.infer({**_feed(entry, t=1), "positions": np.zeros((1, 8), np.int64)})


def re_escape(text: str) -> str:
    import re
    return re.escape(text)


# --- the schedule ---------------------------------------------------------------------------------------
def test_settings_resolve_once_into_the_schedule_every_plan_follows():
    settings = settings_from_env({}, num_token_look_close=3000)
    schedule = resolve(settings, GEO)
    assert isinstance(schedule, Schedule) and schedule.budget == (512, 2048) and schedule.steps == 2
    assert schedule.targets == (2560, 440) and schedule.patches_asked == 3000
    assert [list(c) for c in schedule.counts] == step_counts(settings, GEO) == [[512, 2048], [88, 352]]
    smooth = resolve(settings_from_env({}, num_look_close=1, smooth_selection_prob=True), GEO)
    assert smooth.smooth and smooth.counts == ((512, 2048),)
    with pytest.raises(Ps3EdgeError, match="NUM_LOOK_CLOSE must be between 1 and"):
        resolve(settings_from_env({}, num_look_close=99), GEO)


def test_a_pass_resolves_its_settings_once(artifacts, image, monkeypatch):
    from ps3edge.runtime import lookclose, planning

    calls = []
    real = planning.resolve_steps

    def counting(*args):
        calls.append(1)
        return real(*args)
    monkeypatch.setattr(planning, "resolve_steps", counting)
    settings = settings_from_env({}, num_look_close=2, mode="after_image")
    with Pipeline(artifacts("ps3-tiny"), "onnxruntime") as pipe:
        pipe.run_batch([image, image], settings)
    assert len(calls) == 1 and lookclose.resolve is planning.resolve


# --- VILA-HD's language side ----------------------------------------------------------------------------
def test_the_language_side_has_a_registry_like_the_stage_backends():
    from ps3edge.llm.implementations import IMPLEMENTATIONS, get_implementation, implementations

    assert IMPLEMENTATIONS == BACKENDS and [i.name for i in implementations()] == list(BACKENDS)
    with pytest.raises(Ps3EdgeError, match="^unknown backend 'onnx'; choose one of: onnxruntime, torch, tensorrt$"):
        get_implementation("onnx")
    for impl in implementations():
        assert impl.ps3_backend == impl.name
        ok, why = impl.available()
        assert isinstance(ok, bool) and (ok or why)
    assert get_implementation("onnxruntime").available() == (True, "")
    get_implementation("torch").require()
