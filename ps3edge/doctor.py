"""`ps3edge doctor`: what this machine can do.

Reports the environment probe (runtime/runners/probe.py): Python and the versions of the packages
ps3edge can use (torch, onnx, onnxruntime and its execution providers, tensorrt, torch-tensorrt,
polygraphy, modelopt), CUDA and every GPU (name, compute capability, free / total memory); probes
Jetson (L4T and JetPack from /etc/nv_tegra_release); and from those, which backend x precision
combinations will work here and why not where they will not - each backend of the registry
answers for itself (runners/registry.py), and doctor adds the two build and calibration routes
that are no runtime backend. Every probe is guarded: a missing or broken package is reported
('not installed', or the first line of its import error), never raised.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

from .version import __version__
from .engines.platform import jetpack_for, parse_tegra_release
from .runtime.runners.probe import PACKAGES, Facts, first_line, probe_cuda, probe_package, probe_providers

TEGRA_RELEASE = Path("/etc/nv_tegra_release")
DEVICE_TREE_MODEL = Path("/proc/device-tree/model")



def probe_jetson(release_file: Path = TEGRA_RELEASE, model_file: Path = DEVICE_TREE_MODEL) -> dict:
    info = {"is_jetson": False, "l4t": None, "jetpack": None, "jetpack_tensorrt": None, "model": None}
    try:
        text = Path(release_file).read_text(errors="replace")
    except OSError:
        return info
    info["is_jetson"] = True
    l4t = parse_tegra_release(text)
    if l4t is not None:
        info["l4t"] = ".".join(map(str, l4t))
        info["jetpack"], info["jetpack_tensorrt"] = jetpack_for(l4t)
    try:
        info["model"] = Path(model_file).read_text(errors="replace").strip("\x00\n ") or None
    except OSError:
        pass
    return info


def _row(backend, device, precision, ok, reason):
    return {"backend": backend, "device": device, "precision": precision, "ok": bool(ok), "reason": reason}


def backend_matrix(packages: dict, providers: list[str], cuda: dict, jetson: dict | None = None) -> list[dict]:
    """Which backend x precision will work here, each with the reason: every runtime backend's own
    answers, then the routes that are no runtime backend (Torch-TensorRT builds, INT8 calibration)."""
    from .runtime.runners.registry import backends
    from .runtime.runners.tensorrt import TensorRTBackend

    facts = Facts(packages, providers, cuda, jetson)
    rows = [_row(b.name, *support) for b in backends() for support in b.support(facts)]

    # TensorRT engines --via torch-tensorrt need Torch-TensorRT and a TensorRT ps3edge builds with
    ok, why = facts.usable("torch-tensorrt")
    if ok:
        ok, why = TensorRTBackend.engines_usable(facts)
    for precision in ("fp32", "fp16", "bf16", "int8"):
        if not ok:
            rows.append(_row("torch-tensorrt", "cuda", precision, False, why))
        elif facts.cuda_missing():
            rows.append(_row("torch-tensorrt", "cuda", precision, False, facts.cuda_missing()))
        else:
            rows.append(_row("torch-tensorrt", "cuda", precision, *facts.sm_supports(precision)))
    rows.append(_row("calibrate", "cpu", "int8", *calibration_route(facts)))
    return rows


def calibration_route(facts: Facts) -> tuple[bool, str]:
    """INT8 calibration (ps3edge calibrate): Model Optimizer where installed, else onnxruntime (the
    decision is calibrate's own: int8.modelopt_available, which also wants a data-reader-taking PTQ)."""
    mo_ok, mo_why = facts.usable("modelopt")
    if mo_ok:
        try:
            from .calibration.int8 import modelopt_available

            mo_version = modelopt_available()
        except Exception as e:
            mo_version, mo_why = None, f"modelopt unusable ({first_line(e)})"
        if mo_version is None:
            mo_ok = False
            mo_why = mo_why or ("modelopt's ONNX quantization does not import, or is too old to take a "
                                "calibration data reader")
    if mo_ok:
        return True, "NVIDIA Model Optimizer ONNX PTQ"
    ort_ok, ort_why = facts.usable("onnxruntime")
    return ort_ok, f"onnxruntime quantization ({mo_why})" if ort_ok else ort_why


def collect(release_file: Path = TEGRA_RELEASE, model_file: Path = DEVICE_TREE_MODEL) -> dict:
    """Everything `ps3edge doctor` reports, as plain data (the --json output)."""
    packages = {label: probe_package(label) for label in PACKAGES}
    providers, error = probe_providers(packages["onnxruntime"])
    if error:
        packages["onnxruntime"]["error"] = error
    torch_ok = packages["torch"]["installed"] and not packages["torch"]["error"]
    cuda = probe_cuda(torch_ok)
    jetson = probe_jetson(release_file, model_file)
    if jetson["is_jetson"]:
        for device in cuda["devices"]:
            device["unified_memory"] = True       # Jetson GPUs share the system memory
    return {
        "ps3edge": __version__,
        "python": {"version": platform.python_version(), "executable": sys.executable,
                   "platform": platform.platform(), "machine": platform.machine()},
        "packages": packages,
        "onnxruntime_providers": providers,
        "cuda": cuda,
        "jetson": jetson,
        "backends": backend_matrix(packages, providers, cuda, jetson),
    }
