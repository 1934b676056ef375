"""Stage runners: every backend behind one interface (base.StageRunner), one module per backend
(onnxruntime.py, torch.py, tensorrt.py), one registry of them (registry.py)."""

from .base import StageRunner, close_all
from .registry import BACKENDS, Backend, backends, get_backend, load_stages

__all__ = ["BACKENDS", "Backend", "StageRunner", "backends", "close_all", "get_backend", "load_stages"]
