"""Where an artifact runs: `Device`, parsed once from the user's --device text.

    Device.parse("auto")   -> Device("auto")     the backend chooses
    Device.parse("cpu")    -> Device("cpu")
    Device.parse("cuda:1") -> Device("cuda", 1)  str() gives the text back: "cuda:1"

A backend turns the device asked for into the one it runs on (runners/registry.py
`Backend.resolve_device`): the torch backend by what torch sees here (`on_torch`), onnxruntime
and TensorRT by their own choice (providers, engines), for which only "auto" may be asked.
Anything else given as --device is one Ps3EdgeError line.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import Ps3EdgeError

KINDS = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Device:
    kind: str = "auto"                 # auto (the backend chooses), cpu, or cuda
    index: int | None = None           # a CUDA device's ordinal; None: torch's current device

    @classmethod
    def parse(cls, text: "str | Device | None") -> "Device":
        """--device text (auto, cpu, cuda, cuda:N; None: auto) -> a Device, or one Ps3EdgeError line."""
        if isinstance(text, Device):
            return text
        text = "auto" if text is None else str(text).strip()
        kind, colon, index = text.partition(":")
        if kind in KINDS and not colon:
            return cls(kind)
        if kind == "cuda" and index.isdigit():
            return cls("cuda", int(index))
        raise Ps3EdgeError(f"--device takes {', '.join(KINDS)} (or cuda:N), got '{text}'")

    @property
    def is_auto(self) -> bool:
        return self.kind == "auto"

    @property
    def is_cpu(self) -> bool:
        return self.kind == "cpu"

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    def torch(self):
        """This device as a torch.device (auto has none: a backend resolves it first)."""
        import torch

        if self.is_auto:
            raise ValueError("Device('auto') is resolved by a backend before it is used")
        return torch.device(self.kind, self.index)

    def __str__(self) -> str:
        return self.kind if self.index is None else f"{self.kind}:{self.index}"


AUTO, CPU, CUDA = Device("auto"), Device("cpu"), Device("cuda")


def on_torch(device: Device) -> Device:
    """Where torch runs when `device` is asked for: auto is CUDA when torch sees a GPU, else the
    CPU; a CUDA device torch does not see is one Ps3EdgeError line."""
    import torch

    if device.is_auto:
        return CUDA if torch.cuda.is_available() else CPU
    if device.is_cuda and not torch.cuda.is_available():
        raise Ps3EdgeError(f"--device {device} asked for, but torch sees no CUDA device here")
    if device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise Ps3EdgeError(f"--device {device}: torch sees {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return device
