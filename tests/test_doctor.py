"""`ps3edge doctor`: its JSON keys, what it says about this machine (in this process, through the
console script's main()), and that a broken package is reported rather than crashing it (a real
subprocess: the broken package is put on its import path)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

from conftest import cli, cli_process
from ps3edge.doctor import jetpack_for, parse_tegra_release, probe_jetson


def doctor(*args, env_extra: dict | None = None, runner=cli) -> subprocess.CompletedProcess:
    """`ps3edge doctor ARGS` through a shared runner, in the full os.environ (look-close variables kept)."""
    return runner("doctor", *args, env={**os.environ, "COLUMNS": "200", **(env_extra or {})})


def test_doctor_json_describes_this_machine():
    r = doctor("--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert set(info) >= {"ps3edge", "python", "packages", "onnxruntime_providers", "cuda", "jetson", "backends"}
    assert set(info["packages"]) == {"torch", "onnx", "onnxruntime", "tensorrt", "torch-tensorrt", "polygraphy",
                                     "modelopt"}
    for p in info["packages"].values():
        assert set(p) == {"installed", "version", "error"}
    assert info["python"]["version"] == ".".join(map(str, sys.version_info[:3]))
    assert info["packages"]["onnx"]["installed"] and info["packages"]["onnx"]["version"]
    assert "CPUExecutionProvider" in info["onnxruntime_providers"]
    assert set(info["cuda"]) >= {"available", "torch_cuda", "cudnn", "devices", "reason"}
    assert set(info["jetson"]) >= {"is_jetson", "l4t", "jetpack", "model"}

    rows = {(b["backend"], b["device"], b["precision"]): b for b in info["backends"]}
    assert rows[("onnxruntime", "CPU EP", "fp32")]["ok"] is True
    assert rows[("torch", "cpu", "fp32")]["ok"] is True
    trt = info["packages"]["tensorrt"]
    if importlib.util.find_spec("tensorrt") is None:          # this project's machines
        assert trt == {"installed": False, "version": None, "error": None}
        for precision in ("fp32", "fp16", "int8"):
            row = rows[("tensorrt", "cuda", precision)]
            assert row["ok"] is False and "tensorrt not installed" in row["reason"]
    else:
        assert trt["installed"] and trt["version"]
    if not info["cuda"]["available"]:
        assert info["cuda"]["devices"] == [] and info["cuda"]["reason"]
        assert rows[("torch", "cuda", "fp16")]["ok"] is False
    else:
        d = info["cuda"]["devices"][0]
        assert d["name"] and d["sm"] and d["total_gib"] > 0


def test_doctor_table():
    r = doctor()
    assert r.returncode == 0, r.stderr
    for text in ("packages", "onnxruntime", "tensorrt", "what works here", "CPU EP", "Jetson"):
        assert text in r.stdout, r.stdout


def test_a_broken_package_is_reported_not_raised(tmp_path):
    fake = tmp_path / "tensorrt"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "raise ImportError('libnvinfer.so.10: cannot open shared object file')\n")
    r = doctor("--json", env_extra={"PYTHONPATH": str(tmp_path)}, runner=cli_process)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    trt = info["packages"]["tensorrt"]
    assert trt["installed"] is True and "libnvinfer.so.10" in trt["error"]
    rows = [b for b in info["backends"] if b["backend"] == "tensorrt"]
    assert rows and all(not b["ok"] and "fails to import" in b["reason"] for b in rows)


def test_a_tensorrt_older_than_build_accepts_is_reported_as_unusable(tmp_path):
    """doctor agrees with `ps3edge build` (engines/platform.import_tensorrt): TensorRT 8.6 imports,
    but engines need 10 or newer."""
    fake = tmp_path / "tensorrt"
    fake.mkdir()
    (fake / "__init__.py").write_text("__version__ = '8.6.1'\n")
    r = doctor("--json", env_extra={"PYTHONPATH": str(tmp_path)}, runner=cli_process)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["packages"]["tensorrt"] == {"installed": True, "version": "8.6.1", "error": None}
    rows = [b for b in info["backends"] if b["backend"] == "tensorrt"]
    assert rows and all(not b["ok"] and "TensorRT 10 or newer" in b["reason"] and "8.6.1" in b["reason"]
                        for b in rows)


def test_jetson_release_parsing(tmp_path):
    line = "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan  8"
    assert parse_tegra_release(line) == (36, 4, 3)
    assert jetpack_for((36, 4, 3)) == ("6.2", "10.3")
    assert jetpack_for((36, 4, 0)) == ("6.1", "10.3")
    assert jetpack_for((35, 4, 1)) == ("5.1.2", "8.5")
    assert jetpack_for((36, 9, 0)) == ("6.x", None)
    assert parse_tegra_release("not a release file") is None

    release, model = tmp_path / "nv_tegra_release", tmp_path / "model"
    release.write_text(line + "\n")
    model.write_bytes(b"NVIDIA Jetson AGX Orin Developer Kit\x00")
    info = probe_jetson(release, model)
    assert info == {"is_jetson": True, "l4t": "36.4.3", "jetpack": "6.2", "jetpack_tensorrt": "10.3",
                    "model": "NVIDIA Jetson AGX Orin Developer Kit"}
    assert probe_jetson(tmp_path / "absent", model)["is_jetson"] is False
