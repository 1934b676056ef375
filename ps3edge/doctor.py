"""`ps3edge doctor`: what this machine can do.

Owns the environment probe: Python and the versions of the packages ps3edge can use (torch, onnx,
onnxruntime and its execution providers, tensorrt, torch-tensorrt, polygraphy, modelopt), CUDA and
every GPU (name, compute capability, free / total memory), Jetson (L4T and JetPack from
/etc/nv_tegra_release), and from those, which backend x precision combinations will work here
and why not where they will not. Every probe is guarded: a missing or broken package is
reported ('not installed', or the first line of its import error), never raised.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import platform
import sys
from pathlib import Path

from . import __version__
from .engines.platform import jetpack_for, parse_tegra_release

# label -> (import name, distribution names to ask for a version, import it to prove it loads)
PACKAGES: dict[str, tuple[str, tuple[str, ...], bool]] = {
    "torch": ("torch", ("torch",), True),
    "onnx": ("onnx", ("onnx",), False),
    "onnxruntime": ("onnxruntime", ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml",
                                    "onnxruntime-openvino"), True),
    "tensorrt": ("tensorrt", ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu11"), True),
    "torch-tensorrt": ("torch_tensorrt", ("torch-tensorrt", "torch_tensorrt"), True),
    "polygraphy": ("polygraphy", ("polygraphy",), False),
    "modelopt": ("modelopt", ("nvidia-modelopt",), False),
}

TEGRA_RELEASE = Path("/etc/nv_tegra_release")
DEVICE_TREE_MODEL = Path("/proc/device-tree/model")

# the GPU feature each precision needs (compute capability), for TensorRT / torch on CUDA
MIN_SM = {"fp32": (3, 0), "fp16": (5, 3), "int8": (6, 1), "bf16": (8, 0)}


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


def probe_package(label: str) -> dict:
    """{'installed', 'version', 'error'} for one package; never raises."""
    module_name, dists, do_import = PACKAGES[label]
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return {"installed": False, "version": None, "error": None}
    version = None
    for dist in dists:
        try:
            version = importlib.metadata.version(dist)
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    error = None
    if do_import:
        try:
            module = importlib.import_module(module_name)
            version = getattr(module, "__version__", None) or version
        except BaseException as e:  # a broken install raises anything (ImportError, OSError, RuntimeError)
            if isinstance(e, KeyboardInterrupt):
                raise
            error = _first_line(e)
    return {"installed": True, "version": version, "error": error}


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


def probe_cuda(torch_ok: bool) -> dict:
    info = {"available": False, "torch_cuda": None, "cudnn": None, "devices": [], "reason": None}
    if not torch_ok:
        info["reason"] = "torch is not usable"
        return info
    try:
        import torch

        info["torch_cuda"] = torch.version.cuda
        if not torch.cuda.is_available():
            info["reason"] = ("this torch has no CUDA support" if torch.version.cuda is None
                              else "no CUDA GPU visible: driver or device missing")
            return info
        info["available"] = True
        info["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            device = {"index": i, "name": torch.cuda.get_device_name(i), "sm": f"{major}.{minor}",
                      "compute_capability": [major, minor], "free_gib": None, "total_gib": None,
                      "bf16": None}
            try:
                free, total = torch.cuda.mem_get_info(i)
                device["free_gib"], device["total_gib"] = round(free / 2 ** 30, 2), round(total / 2 ** 30, 2)
            except Exception as e:
                device["memory_error"] = _first_line(e)
            try:
                with torch.cuda.device(i):
                    device["bf16"] = bool(torch.cuda.is_bf16_supported())
            except Exception:
                pass
            info["devices"].append(device)
    except Exception as e:
        info["available"] = False
        info["reason"] = _first_line(e)
    return info


def _row(backend, device, precision, ok, reason):
    return {"backend": backend, "device": device, "precision": precision, "ok": bool(ok), "reason": reason}


def _sm_reason(precision: str, sm: tuple[int, int] | None) -> tuple[bool, str]:
    need = MIN_SM[precision]
    if sm is None:
        return False, "no CUDA GPU"
    if sm < need:
        return False, f"{precision} needs SM {need[0]}.{need[1]}+, this GPU is SM {sm[0]}.{sm[1]}"
    return True, f"SM {sm[0]}.{sm[1]}"


def backend_matrix(packages: dict, providers: list[str], cuda: dict, jetson: dict | None = None) -> list[dict]:
    """Which backend x precision will work here, each with the reason."""
    rows = []
    jetson = jetson or {}
    sm = tuple(cuda["devices"][0]["compute_capability"]) if cuda["available"] and cuda["devices"] else None

    def usable(label):
        p = packages[label]
        if not p["installed"]:
            if label == "tensorrt" and jetson.get("jetpack_tensorrt"):
                return False, (f"tensorrt not installed (JetPack {jetson['jetpack']} ships TensorRT "
                               f"{jetson['jetpack_tensorrt']}: apt install python3-libnvinfer)")
            return False, f"{label} not installed"
        if p["error"]:
            return False, f"{label} fails to import ({p['error']})"
        return True, ""

    # torch: our own stage modules on the CPU; on CUDA the device-resident fast path (run, bench)
    ok, why = usable("torch")
    rows.append(_row("torch", "cpu", "fp32", ok, why or "CPU"))
    rows.append(_row("torch", "cpu", "bf16", ok, why or "CPU (slow; for checks, not speed)"))
    for precision in ("fp32", "fp16", "bf16"):
        if not ok:
            rows.append(_row("torch", "cuda", precision, False, why))
        elif not cuda["available"]:
            rows.append(_row("torch", "cuda", precision, False, cuda["reason"] or "no CUDA GPU"))
        elif precision == "bf16" and cuda["devices"] and cuda["devices"][0].get("bf16") is False:
            rows.append(_row("torch", "cuda", precision, False, "this GPU has no bf16 support"))
        else:
            rows.append(_row("torch", "cuda", precision, True,
                             f"{cuda['devices'][0]['name']}: fast path (CUDA graph, device preprocessing)"))

    # TensorRT, decided once: importable (what onnxruntime's TensorRT EP rows ask), and importable in a
    # release ps3edge builds and runs engines with (platform.import_tensorrt's check, for `ps3edge build`)
    trt_import_ok, trt_import_why = usable("tensorrt")
    trt_engine_ok, trt_engine_why = trt_import_ok, trt_import_why
    if trt_import_ok:
        try:
            from .engines.platform import MIN_TENSORRT_MAJOR, version_tuple

            version = packages["tensorrt"]["version"]
            if version is None or version_tuple(version)[0] < MIN_TENSORRT_MAJOR:
                trt_engine_ok, trt_engine_why = False, (
                    f"ps3edge builds and runs engines with TensorRT {MIN_TENSORRT_MAJOR} or newer; this is "
                    f"TensorRT {version or '(version unknown)'} (JetPack 6.1+ ships TensorRT 10.3)")
        except Exception as e:
            trt_engine_ok, trt_engine_why = False, f"tensorrt version check failed ({_first_line(e)})"

    # onnxruntime: the exported stages, per execution provider
    ok, why = usable("onnxruntime")
    if not ok:
        for precision in ("fp32", "fp16", "int8"):
            rows.append(_row("onnxruntime", "CPU EP", precision, False, why))
    else:
        if "CPUExecutionProvider" in providers:
            rows.append(_row("onnxruntime", "CPU EP", "fp32", True, "CPUExecutionProvider"))
            rows.append(_row("onnxruntime", "CPU EP", "fp16", True,
                             "CPUExecutionProvider (ops without fp16 kernels run in fp32 behind inserted casts)"))
            rows.append(_row("onnxruntime", "CPU EP", "int8", True, "CPUExecutionProvider runs Q/DQ models"))
        for provider, device, precisions in (("CUDAExecutionProvider", "CUDA EP", ("fp32", "fp16")),
                                             ("TensorrtExecutionProvider", "TensorRT EP", ("fp32", "fp16", "int8"))):
            for precision in precisions:
                if provider not in providers:
                    rows.append(_row("onnxruntime", device, precision, False,
                                     f"{provider} not available (needs onnxruntime-gpu)"))
                elif not cuda["available"]:
                    rows.append(_row("onnxruntime", device, precision, False,
                                     f"{provider} listed, but {cuda['reason'] or 'no CUDA GPU'}"))
                elif provider == "TensorrtExecutionProvider" and not trt_import_ok:
                    rows.append(_row("onnxruntime", device, precision, False,
                                     f"{provider} listed, but {trt_import_why}"))
                else:
                    good, reason = _sm_reason(precision, sm)
                    rows.append(_row("onnxruntime", device, precision, good, f"{provider}, {reason}"))

    # TensorRT engines: ps3edge build (ONNX parser) and --via torch-tensorrt (which needs TensorRT too)
    tt_ok, tt_why = usable("torch-tensorrt")
    if tt_ok and not trt_engine_ok:
        tt_ok, tt_why = False, trt_engine_why
    for backend, ok, why in (("tensorrt", trt_engine_ok, trt_engine_why), ("torch-tensorrt", tt_ok, tt_why)):
        for precision in ("fp32", "fp16", "bf16", "int8"):
            if not ok:
                rows.append(_row(backend, "cuda", precision, False, why))
            elif not cuda["available"]:
                rows.append(_row(backend, "cuda", precision, False, cuda["reason"] or "no CUDA GPU"))
            else:
                good, reason = _sm_reason(precision, sm)
                rows.append(_row(backend, "cuda", precision, good, reason))

    # INT8 calibration (ps3edge calibrate): Model Optimizer where installed, else onnxruntime
    # (the decision is calibrate's own: int8.modelopt_available, which also wants a data-reader-taking PTQ)
    mo_ok, mo_why = usable("modelopt")
    if mo_ok:
        try:
            from .calibration.int8 import modelopt_available

            mo_version = modelopt_available()
        except Exception as e:
            mo_version, mo_why = None, f"modelopt unusable ({_first_line(e)})"
        if mo_version is None:
            mo_ok = False
            mo_why = mo_why or ("modelopt's ONNX quantization does not import, or is too old to take a "
                                "calibration data reader")
    ort_ok, ort_why = usable("onnxruntime")
    if mo_ok:
        rows.append(_row("calibrate", "cpu", "int8", True, "NVIDIA Model Optimizer ONNX PTQ"))
    else:
        rows.append(_row("calibrate", "cpu", "int8", ort_ok,
                         f"onnxruntime quantization ({mo_why})" if ort_ok else ort_why))
    return rows


def collect(release_file: Path = TEGRA_RELEASE, model_file: Path = DEVICE_TREE_MODEL) -> dict:
    """Everything `ps3edge doctor` reports, as plain data (the --json output)."""
    packages = {label: probe_package(label) for label in PACKAGES}
    providers: list[str] = []
    if packages["onnxruntime"]["installed"] and not packages["onnxruntime"]["error"]:
        try:
            import onnxruntime

            providers = list(onnxruntime.get_available_providers())
        except Exception as e:
            packages["onnxruntime"]["error"] = _first_line(e)
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
