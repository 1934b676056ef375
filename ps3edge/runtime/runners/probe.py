"""What this machine offers the backends: package states, onnxruntime's providers, CUDA devices.

Every probe is guarded: a missing or broken package is reported ('not installed', or the first
line of its import error), never raised. `Facts` holds the answers, probed lazily (importing
torch-tensorrt takes seconds, and a backend asks only about what it needs); `ps3edge doctor`
probes everything once and hands the same Facts to every backend's `available`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util

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

# the GPU feature each precision needs (compute capability), for TensorRT / torch on CUDA
MIN_SM = {"fp32": (3, 0), "fp16": (5, 3), "int8": (6, 1), "bf16": (8, 0)}


def first_line(e: BaseException) -> str:
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
            error = first_line(e)
    return {"installed": True, "version": version, "error": error}


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
        info["devices"] = [_probe_device(torch, i) for i in range(torch.cuda.device_count())]
    except Exception as e:
        info["available"] = False
        info["reason"] = first_line(e)
    return info


def _probe_device(torch, i: int) -> dict:
    major, minor = torch.cuda.get_device_capability(i)
    device = {"index": i, "name": torch.cuda.get_device_name(i), "sm": f"{major}.{minor}",
              "compute_capability": [major, minor], "free_gib": None, "total_gib": None, "bf16": None}
    try:
        free, total = torch.cuda.mem_get_info(i)
        device["free_gib"], device["total_gib"] = round(free / 2 ** 30, 2), round(total / 2 ** 30, 2)
    except Exception as e:
        device["memory_error"] = first_line(e)
    try:
        with torch.cuda.device(i):
            device["bf16"] = bool(torch.cuda.is_bf16_supported())
    except Exception:
        pass
    return device


def probe_providers(package: dict) -> tuple[list[str], str | None]:
    """onnxruntime's execution providers, and an import error to record (None when fine)."""
    if not package["installed"] or package["error"]:
        return [], None
    try:
        import onnxruntime

        return list(onnxruntime.get_available_providers()), None
    except Exception as e:
        return [], first_line(e)


class Facts:
    """The probes above, each run at most once, or handed in by a caller that ran them already.

    `jetson`: the Jetson probe (`ps3edge doctor`'s), for the JetPack install hint; empty when not
    given."""

    def __init__(self, packages: dict | None = None, providers: list[str] | None = None,
                 cuda: dict | None = None, jetson: dict | None = None):
        self.packages = dict(packages or {})
        self._providers = providers
        self._cuda = cuda
        self.jetson = jetson or {}

    def package(self, label: str) -> dict:
        if label not in self.packages:
            self.packages[label] = probe_package(label)
        return self.packages[label]

    @property
    def providers(self) -> list[str]:
        if self._providers is None:
            self._providers, error = probe_providers(self.package("onnxruntime"))
            if error:
                self.packages["onnxruntime"] = {**self.package("onnxruntime"), "error": error}
        return self._providers

    @property
    def cuda(self) -> dict:
        if self._cuda is None:
            self._cuda = probe_cuda(self.usable("torch")[0])
        return self._cuda

    @property
    def sm(self) -> tuple[int, int] | None:
        """The first GPU's compute capability, None without CUDA."""
        cuda = self.cuda
        return tuple(cuda["devices"][0]["compute_capability"]) if cuda["available"] and cuda["devices"] else None

    def usable(self, label: str) -> tuple[bool, str]:
        """(installed and imports, why not)."""
        p = self.package(label)
        if not p["installed"]:
            if label == "tensorrt" and self.jetson.get("jetpack_tensorrt"):
                return False, (f"tensorrt not installed (JetPack {self.jetson['jetpack']} ships TensorRT "
                               f"{self.jetson['jetpack_tensorrt']}: apt install python3-libnvinfer)")
            return False, f"{label} not installed"
        if p["error"]:
            return False, f"{label} fails to import ({p['error']})"
        return True, ""

    def cuda_missing(self) -> str | None:
        """Why there is no CUDA GPU here, None when there is one."""
        return None if self.cuda["available"] else (self.cuda["reason"] or "no CUDA GPU")

    def sm_supports(self, precision: str) -> tuple[bool, str]:
        """Whether the first GPU has what `precision` needs, and its SM."""
        need, sm = MIN_SM[precision], self.sm
        if sm is None:
            return False, "no CUDA GPU"
        if sm < need:
            return False, f"{precision} needs SM {need[0]}.{need[1]}+, this GPU is SM {sm[0]}.{sm[1]}"
        return True, f"SM {sm[0]}.{sm[1]}"
