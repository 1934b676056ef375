"""What a backend opens an artifact as: a `Session`, the one object a Pipeline runs.

    session = get_backend(name).open(artifact_dir, manifest, Device.parse("auto"), "fp32")
    session.device            where it computes (runtime/device.py)
    session.whole_loop        False: `stages`, the three stage runners (base.StageRunner), run
                              the loop stage by stage in the pipeline; True: `run_loop` runs it
                              all as one device program (torch.py FastSession)
    session.preprocesses_on_device    its default --preprocess: on `preprocess_device`, else PIL
    session.close()

A backend states here what it needs of the pipeline - where pixels are made, whether it runs
the whole loop, how many look-close steps one highres call takes, how a report names it - so
the pipeline never asks which backend it holds. This class is the staged session every backend
gives; the torch backend's whole-loop session extends it.
"""

from __future__ import annotations

from typing import Callable

from ...errors import Ps3EdgeError
from ..device import CPU, Device


class Session:
    whole_loop = False                  # runs the whole loop as one program (`run_loop`)
    preprocesses_on_device = False      # by default, pixels are made with PIL on the host
    program = None                      # the whole-loop program, where there is one

    def __init__(self, backend: str, device: Device, precision: str, load_stages: Callable[[], dict]):
        self.backend = backend
        self.device = device
        self.precision = precision
        self._load_stages = load_stages
        self._stages: dict | None = None
        self.closed = False

    @property
    def stages(self) -> dict:
        """name -> StageRunner of the three stages, loaded on first use."""
        if self.closed:
            raise Ps3EdgeError(f"this {self.backend} session is closed; open the artifact again")
        if self._stages is None:
            self._stages = self._load_stages()
        return self._stages

    def load(self) -> "Session":
        """Load the stage runners now, so a broken file is refused when the artifact opens."""
        self.stages
        return self

    @property
    def preprocess_device(self) -> Device:
        """Where --preprocess device resizes: the host, for a session fed numpy arrays."""
        return CPU

    @property
    def label(self) -> str:
        """How `ps3edge run` names what ran."""
        return self.backend

    @property
    def device_label(self) -> str:
        """How a benchmark row names the device: the highres runner's (onnxruntime: its provider)."""
        return self.stages["highres"].device_label

    def synchronize(self) -> None:
        """Wait for the device's queued work (a host session has none)."""

    def steps_per_call(self, manifest) -> int:
        """Most look-close step rows (of any images) in one highres call: the highres runner's
        own limit (a TensorRT engine's T_max; on the CPU, onnxruntime's attention-scores bound
        and torch's MLP-activation bound, one row for the real models), else the profile bound
        of artifact/profiles.py
        (the default steps of max_batch images, at most what one call's attention scores
        allow). On the CPU, one image's default steps: a call's attention scores are
        materialised there (at 4K one step's take 16 x 2560 x 3289 floats = 539 MB per block),
        and rows of 2560 tokens already fill the CPU's matrix units, so larger calls would only
        cost memory."""
        from ...artifact.profiles import axis_bounds, look_close_steps

        runner = self.stages["highres"]
        if runner.max_steps_per_call:
            return runner.max_steps_per_call
        rows = axis_bounds(manifest)["T"][2]
        return min(rows, look_close_steps(manifest)) if runner.device.is_cpu else rows

    def close(self) -> None:
        """Close the stage runners (sessions, engines, buffers); the session refuses to run afterwards."""
        for runner in (self._stages or {}).values():
            runner.close()
        self._stages, self.closed = None, True
