"""The one registry of stage backends: name -> backend, and what each can do here.

    backend = get_backend("onnxruntime")
    backend.available()                 # (True, "") or (False, "onnxruntime not installed")
    backend.available("CUDA EP", "fp16")
    session = backend.open(artifact_dir, manifest, Device.parse("auto"), "fp32")   # session.py
    stages = backend.load_stages(artifact_dir, manifest, "fp32")    # name -> StageRunner

A backend lists the devices it runs on and the precisions each takes (`devices`), answers
whether a device x precision works on this machine and why not (`available`, from the probes of
probe.py), turns the --device asked for into the one it runs on (`resolve_device`), and opens an
artifact as a session (`open`): its stage runners, or for the torch backend on CUDA the whole
loop as one device program. Which of the two a backend gives is its own decision, made in its
module and stated by the session (session.py), so no caller asks which backend it holds. What a
backend can do is stated as attributes: `takes_device`, `runs_whole_loop`, `cast_precisions`,
`runs_calibrated_stages`, `needs_gpu`. Each backend lives in its own module (onnxruntime.py,
torch.py, tensorrt.py), imported only when asked for; none imports its framework before it is
used, so asking about a missing or broken one never raises.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from ...errors import Ps3EdgeError
from ..device import AUTO, Device
from .probe import Facts
from .session import Session

BACKENDS = ("onnxruntime", "torch", "tensorrt")


class Backend:
    """What every backend module's `BACKEND` object provides."""

    name = ""
    devices: dict[str, tuple[str, ...]] = {}     # device -> the precisions it runs
    takes_device = False           # runs on the --device asked for (else it chooses its own: providers, engines)
    runs_whole_loop = False        # can run the whole look-close loop as one device program
    cast_precisions = ("fp32",)    # precisions it runs from the FP32 stages, without calibrated files
    runs_calibrated_stages = False  # runs the stage files 'ps3edge calibrate' registers (the manifest's precisions)
    needs_gpu = False              # runs on a GPU only (a serving instance of it is a GPU instance)

    def available(self, device: str | None = None, precision: str | None = None,
                  facts: Facts | None = None) -> tuple[bool, str]:
        """Whether this backend runs here (on `device`, in `precision` when given), and why or
        why not in a few words. `facts`: the machine's probes (probed now when not given)."""
        raise NotImplementedError

    def load_stages(self, artifact_dir: Path, manifest, precision: str = "fp32", loaded=None) -> dict:
        """name -> active StageRunner for every stage of an artifact."""
        raise NotImplementedError

    def resolve_device(self, device: Device) -> Device:
        """The device this backend runs on when `device` is asked for. This one chooses its own
        device (providers, engines): only auto may be asked for, and it stays auto."""
        if not device.is_auto:
            raise Ps3EdgeError(f"--device applies to the torch backend; {self.name} chooses its own device")
        return device

    def open(self, artifact_dir: Path, manifest, device: Device | str | None = AUTO, precision: str = "fp32",
             loaded=None, whole_loop: bool | None = None) -> Session:
        """The artifact on this backend, on the device `device` resolves to: a session of its stage
        runners, loaded now (a broken file is refused here). whole_loop True asks for the one-program
        path, which only a backend that `runs_whole_loop` has."""
        runs_on = self.resolve_device(Device.parse(device))
        if whole_loop and not self.runs_whole_loop:
            raise Ps3EdgeError("the device-resident fast path runs on the torch backend only")
        return self.staged(artifact_dir, manifest, runs_on, precision, loaded)

    def staged(self, artifact_dir: Path, manifest, device: Device, precision: str, loaded=None) -> Session:
        """A session of the stage runners, loaded now."""
        return Session(self.name, device, precision,
                       lambda: self.load_stages(artifact_dir, manifest, precision, loaded)).load()

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


def open_session(artifact_dir, manifest, backend: str, device: "Device | str | None" = None, precision: str = "fp32",
                 whole_loop: bool | None = None, loaded=None) -> Session:
    """An artifact open on the chosen backend, on `device` (--device text or a Device; None: auto)
    in `precision`; whole_loop None lets the backend choose (the torch backend: on CUDA)."""
    return get_backend(backend).open(Path(artifact_dir), manifest, Device.parse(device), precision, loaded, whole_loop)


def load_stages(artifact_dir, manifest, backend: str, precision: str = "fp32", loaded=None) -> dict:
    """name -> runner for the three stages of an artifact, on the chosen backend.

    `precision` (fp32, fp16, int8) picks the stage files that 'ps3edge calibrate' registered in
    the manifest's "precisions" section (onnxruntime); the torch backend runs fp16 / bf16 by the
    same policy (calibration/precision.py). `loaded`: the torch backend's model, if already built
    (see rebuild_torch_model)."""
    return get_backend(backend).load_stages(Path(artifact_dir), manifest, precision, loaded)
