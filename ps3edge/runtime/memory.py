"""Peak memory per stage: `StageMemory`, stage name -> the process's peak resident memory while that
stage ran (and torch's peak CUDA allocation, where the stage runs on a GPU through torch).

A Jetson's CPU and GPU share one memory, so the figure that decides whether a pipeline fits is the
peak resident set of the process, stage by stage. Linux keeps that peak as VmHWM in
/proc/self/status and lets a process reset it to the current resident set by writing "5" to
/proc/self/clear_refs; so each stage starts its own peak. Resetting is the process's business: a
host program that watches its own VmHWM would see it drop, which is why only the command line
(`run --json`, `bench`) turns this on, and the Python API only when asked.

Where VmHWM cannot be reset (not Linux, a kernel without clear_refs, a sandbox that forbids the
write) the figures are the peak since the process began, and `resettable` says so.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_RESET_PEAK = "5"                      # clear_refs: "5" resets the peak RSS (VmHWM) to the current RSS


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])              # "VmHWM:   223064 kB"
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_bytes() -> int | None:
    """The process's peak resident set since it began or since the last reset; None off Linux."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    try:
        import resource
    except ImportError:                                  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024     # bytes on macOS, KiB elsewhere


def reset_peak_rss() -> bool:
    """Start a new peak at the current resident set; False where the kernel does not allow it."""
    try:
        _CLEAR_REFS.write_text(_RESET_PEAK)
    except OSError:
        return False
    return True


class StageMemory:
    """Per stage: peak resident bytes, and peak CUDA bytes that torch allocated on `cuda_device`
    (a torch.device, or None when nothing runs there through torch). A stage measured twice keeps
    the larger peak."""

    def __init__(self, cuda_device=None):
        self.cuda_device = cuda_device
        self.resettable = reset_peak_rss()
        self.host: dict[str, int] = {}
        self.cuda: dict[str, int] = {}

    def start(self) -> None:
        """Begin a stage: its peaks start from what is resident (and allocated) now."""
        if self.resettable:
            reset_peak_rss()
        torch = self._torch_cuda()
        if torch is not None:
            torch.cuda.synchronize(self.cuda_device)
            torch.cuda.reset_peak_memory_stats(self.cuda_device)

    def mark(self, name: str) -> None:
        """End the stage begun by the last start() or mark() as `name`, and begin the next."""
        peak = peak_rss_bytes()
        if peak is not None:
            self.host[name] = max(self.host.get(name, 0), peak)
        torch = self._torch_cuda()
        if torch is not None:
            torch.cuda.synchronize(self.cuda_device)
            self.cuda[name] = max(self.cuda.get(name, 0), torch.cuda.max_memory_allocated(self.cuda_device))
        self.start()

    @contextlib.contextmanager
    def measure(self, name: str):
        self.start()
        yield
        self.mark(name)

    def _torch_cuda(self):
        if self.cuda_device is None or getattr(self.cuda_device, "type", None) != "cuda":
            return None
        import torch
        return torch

    def mib(self) -> dict[str, dict[str, float]]:
        """{"host": {stage: MiB}, "cuda": {stage: MiB}} (cuda only where measured)."""
        out = {"host": {k: v / 2 ** 20 for k, v in self.host.items()}}
        if self.cuda:
            out["cuda"] = {k: v / 2 ** 20 for k, v in self.cuda.items()}
        return out
