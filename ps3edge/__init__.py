"""ps3edge: PS3 / VILA-HD from PyTorch to ONNX and TensorRT, and a runtime for the look-close loop.

The public Python API (api.py), importable from here:

    import ps3edge
    with ps3edge.load("art/") as encoder:
        result = encoder.run(frame, channels="bgr")
    with ps3edge.stream("art/", ["rtsp://10.0.0.5/cam", "/dev/video0"]) as frames:
        for record in frames: ...                     # live cameras: streaming/loop.py

Its names are imported on first use, so `import ps3edge` (and the command line's start-up) does
not load torch or onnxruntime until a name that needs them is asked for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .version import __version__

# public name -> the module that defines it
_EXPORTS = {
    "load": "ps3edge.api",
    "Encoder": "ps3edge.api",
    "LookCloseResult": "ps3edge.runtime.result",
    "LookCloseSettings": "ps3edge.runtime.planning",
    "settings_from_env": "ps3edge.runtime.planning",
    "Ps3EdgeError": "ps3edge.errors",
    "stream": "ps3edge.streaming.loop",
    "Stream": "ps3edge.streaming.loop",
    "FrameRecord": "ps3edge.streaming.record",
    "AnswerRecord": "ps3edge.streaming.record",
    "AlertRecord": "ps3edge.streaming.record",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:                       # what type checkers and IDEs see
    from .api import Encoder, load
    from .errors import Ps3EdgeError
    from .runtime.planning import LookCloseSettings, settings_from_env
    from .runtime.result import LookCloseResult
    from .streaming.loop import Stream, stream
    from .streaming.record import AlertRecord, AnswerRecord, FrameRecord


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value           # found once, then a plain attribute
        return value
    raise AttributeError(f"module 'ps3edge' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
