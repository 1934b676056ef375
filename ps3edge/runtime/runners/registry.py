"""The one registry of stage backends: name -> backend, and what each can do here.

    backend = get_backend("onnxruntime")
    backend.available()                 # (True, "") or (False, "onnxruntime not installed")
    backend.available("CUDA EP", "fp16")
    stages = backend.load_stages(artifact_dir, manifest, "fp32")    # name -> StageRunner

A backend lists the devices it runs on and the precisions each takes (`devices`), answers
whether a device x precision works on this machine and why not (`available`, from the probes of
probe.py), and loads an artifact's stages as runners. Each backend lives in its own module
(onnxruntime.py, torch.py, tensorrt.py), imported only when asked for; none imports its
framework before it is used, so asking about a missing or broken one never raises.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from ...errors import Ps3EdgeError
from .probe import Facts

BACKENDS = ("onnxruntime", "torch", "tensorrt")


class Backend:
    """What every backend module's `BACKEND` object provides."""

    name = ""
    devices: dict[str, tuple[str, ...]] = {}     # device -> the precisions it runs

    def available(self, device: str | None = None, precision: str | None = None,
                  facts: Facts | None = None) -> tuple[bool, str]:
        """Whether this backend runs here (on `device`, in `precision` when given), and why or
        why not in a few words. `facts`: the machine's probes (probed now when not given)."""
        raise NotImplementedError

    def load_stages(self, artifact_dir: Path, manifest, precision: str = "fp32", loaded=None) -> dict:
        """name -> active StageRunner for every stage of an artifact."""
        raise NotImplementedError

    def support(self, facts: Facts | None = None) -> list[tuple[str, str, bool, str]]:
        """(device, precision, works, why) for every device and precision this backend knows."""
        facts = facts or Facts()
        return [(device, precision, *self.available(device, precision, facts))
                for device, precisions in self.devices.items() for precision in precisions]


def get_backend(name: str) -> Backend:
    """The backend called `name`, or a one-line Ps3EdgeError naming the choices."""
    if name not in BACKENDS:
        raise Ps3EdgeError(f"unknown backend '{name}'; choose one of: {', '.join(BACKENDS)}")
    return importlib.import_module(f"{__package__}.{name}").BACKEND


def backends() -> list[Backend]:
    return [get_backend(name) for name in BACKENDS]


def load_stages(artifact_dir, manifest, backend: str, precision: str = "fp32", loaded=None) -> dict:
    """name -> runner for the three stages of an artifact, on the chosen backend.

    `precision` (fp32, fp16, int8) picks the stage files that 'ps3edge calibrate' registered in
    the manifest's "precisions" section (onnxruntime); the torch backend runs fp16 / bf16 by the
    same policy (calibration/precision.py). `loaded`: the torch backend's model, if already built
    (see rebuild_torch_model)."""
    return get_backend(backend).load_stages(Path(artifact_dir), manifest, precision, loaded)
