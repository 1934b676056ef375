"""The machine an engine is built for and runs on: TensorRT and CUDA versions, GPU name and SM,
and JetPack / L4T on a Jetson (read from /etc/nv_tegra_release; `ps3edge doctor` reports the
same facts through this module).

The builder records these facts in the manifest's `engines` section; the `tensorrt` runtime
backend compares them with the machine it runs on and refuses an engine built for another
TensorRT version or another GPU architecture, in one line that names both. Importing TensorRT
goes through `import_tensorrt` (and Polygraphy, which drives the ONNX route's builder, through
`import_polygraphy`), so that a machine without it gets one line that says how to install it
instead of a traceback.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from ..artifact.engines import EngineEntry
from ..errors import Ps3EdgeError

MIN_TENSORRT_MAJOR = 10
MIN_POLYGRAPHY = (0, 49, 13)            # the first to route its log through Python's logging
NV_TEGRA_RELEASE = Path("/etc/nv_tegra_release")

# Jetson Linux (L4T) release -> JetPack, and the TensorRT that JetPack ships
JETPACK = {
    (38, 2): ("7.0", "10.13"),
    (36, 4, 4): ("6.2.1", "10.3"), (36, 4, 3): ("6.2", "10.3"), (36, 4): ("6.1", "10.3"),
    (36, 3): ("6.0", "8.6"), (36, 2): ("6.0 DP", "8.6"),
    (35, 6): ("5.1.4", "8.5"), (35, 5): ("5.1.3", "8.5"), (35, 4): ("5.1.2", "8.5"), (35, 3): ("5.1.1", "8.5"),
    (35, 2): ("5.1", "8.5"), (35, 1): ("5.0.2", "8.4"),
}
JETPACK_MAJOR = {38: "7.x", 36: "6.x", 35: "5.x", 34: "5.0 (developer preview)", 32: "4.x"}

INSTALL_TENSORRT = ("install the tensorrt wheel from NVIDIA's package index (pip install tensorrt-cu12, "
                    "or tensorrt-cu13 for CUDA 13) or, on a Jetson, JetPack 6.1+ (apt install nvidia-jetpack; "
                    "python3-libnvinfer)")


def import_tensorrt():
    """The `tensorrt` module, or a one-line Ps3EdgeError saying it is missing and how to get it."""
    try:
        import tensorrt as trt
    except ImportError as e:  # also OSError-like failures surface as ImportError from the bindings
        raise Ps3EdgeError(f"TensorRT is not installed here ({e}); {INSTALL_TENSORRT}") from None
    major = version_tuple(trt.__version__)[0]
    if major < MIN_TENSORRT_MAJOR:
        raise Ps3EdgeError(f"ps3edge builds and runs engines with TensorRT {MIN_TENSORRT_MAJOR} or newer; this is "
                           f"TensorRT {trt.__version__} (JetPack 6.1+ ships TensorRT 10.3)")
    return trt


def import_torch_tensorrt():
    try:
        import torch_tensorrt
    except ImportError as e:
        raise Ps3EdgeError(f"Torch-TensorRT is not installed here ({e}); pip install torch-tensorrt matching "
                           "your torch version (and the tensorrt wheel it names), or build with --via onnx") from None
    return torch_tensorrt


def import_polygraphy():
    """Polygraphy's TensorRT backend (`polygraphy.backend.trt`), or a one-line Ps3EdgeError."""
    install = f"pip install 'polygraphy>={'.'.join(map(str, MIN_POLYGRAPHY))}'"
    try:
        import polygraphy
        from polygraphy.backend import trt as polygraphy_trt
    except ImportError as e:
        raise Ps3EdgeError(f"Polygraphy is not installed here ({e}); {install} (ps3edge builds TensorRT engines "
                           "from ONNX through it), or build with --via torch-tensorrt") from None
    if version_tuple(polygraphy.__version__) < MIN_POLYGRAPHY:
        raise Ps3EdgeError(f"Polygraphy {polygraphy.__version__} is too old for ps3edge build; {install}")
    return polygraphy_trt


def version_tuple(version: str) -> tuple[int, ...]:
    """'10.13.0.35' -> (10, 13, 0, 35); non-numeric parts stop the tuple."""
    parts = []
    for p in str(version).split("."):
        m = re.match(r"\d+", p)
        if not m:
            break
        parts.append(int(m.group()))
    return tuple(parts) or (0,)


def same_tensorrt(a: str, b: str) -> bool:
    """Engines load only in the TensorRT release that built them: compare major.minor.patch (the
    fourth, build number is printed by pip wheels and not by JetPack's packages)."""
    return version_tuple(a)[:3] == version_tuple(b)[:3]


def parse_tegra_release(text: str) -> tuple[int, int, int] | None:
    """'# R36 (release), REVISION: 4.3, ...' -> (36, 4, 3)."""
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*(\d+)(?:\.(\d+))?", text)
    if not m:
        return None
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def jetpack_for(l4t: tuple[int, int, int]) -> tuple[str | None, str | None]:
    """(JetPack, TensorRT it ships) for an L4T release; JetPack by major release where not listed."""
    for key in (l4t, l4t[:2]):
        if key in JETPACK:
            return JETPACK[key]
    return JETPACK_MAJOR.get(l4t[0]), None


def l4t_version(path: Path = NV_TEGRA_RELEASE) -> str | None:
    """'36.4.3' from '# R36 (release), REVISION: 4.3, ...', or None when this is not a Jetson."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return None
    release = parse_tegra_release(text)
    return None if release is None else ".".join(str(x) for x in release)


def jetpack_version(l4t: str | None) -> str | None:
    """JetPack release: from the nvidia-jetpack package when installed, else from the L4T release
    (the JETPACK table above, which `ps3edge doctor` reports too)."""
    if l4t is None:
        return None
    try:
        out = subprocess.run(["dpkg-query", "--showformat=${Version}", "--show", "nvidia-jetpack"],
                             capture_output=True, text=True, timeout=10)
        m = re.match(r"(\d+(?:\.\d+)+)", out.stdout.strip()) if out.returncode == 0 else None
        if m:
            return m.group(1)
    except (OSError, subprocess.SubprocessError):
        pass
    return jetpack_for(tuple(version_tuple(l4t) + (0, 0))[:3])[0]


def gpu_facts(device_index: int = 0) -> dict:
    """GPU name, SM (major * 10 + minor, e.g. 87 for Orin, 90 for H100) and CUDA version, via torch."""
    import torch

    if not torch.cuda.is_available():
        raise Ps3EdgeError("no CUDA GPU is visible to torch; TensorRT engines are built and run on an NVIDIA GPU "
                           "(a CUDA build of torch is needed too)")
    major, minor = torch.cuda.get_device_capability(device_index)
    return {"gpu_name": torch.cuda.get_device_name(device_index), "sm": major * 10 + minor,
            "cuda_version": torch.version.cuda or "unknown"}


def machine_facts(trt) -> dict:
    """Everything the manifest records about the machine an engine was built on."""
    facts = {"tensorrt_version": trt.__version__, **gpu_facts()}
    l4t = l4t_version()
    if l4t is not None:
        facts["l4t"] = l4t
        jetpack = jetpack_version(l4t)
        if jetpack is not None:
            facts["jetpack"] = jetpack
    return facts


def describe(facts: dict) -> str:
    text = f"TensorRT {facts.get('tensorrt_version')} on SM{facts.get('sm')} ({facts.get('gpu_name')}"
    if facts.get("jetpack"):
        text += f", JetPack {facts['jetpack']}"
    return text + ")"


def check_engine_compatible(stage: str, entry: EngineEntry, here: dict) -> None:
    """Refuse an engine built for another TensorRT release or another GPU architecture than
    `here` (machine_facts)."""
    differs = []
    if not same_tensorrt(entry.tensorrt_version, here["tensorrt_version"]):
        differs.append("TensorRT version")
    if entry.sm != here["sm"]:
        differs.append("GPU architecture")
    if differs:
        raise Ps3EdgeError(f"engine '{stage}' ({entry.file}) was built for {describe(entry.facts)}; this machine "
                           f"has {describe(here)}: the {' and '.join(differs)} differ - rebuild the engines here "
                           "with 'ps3edge build ARTIFACTS'")
