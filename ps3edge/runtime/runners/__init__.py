"""Stage runners: every backend behind one interface (base.StageRunner), one module per backend
(onnxruntime.py, torch.py, tensorrt.py), one registry of them (registry.py), and what a backend
opens an artifact as (session.py)."""

from .base import StageRunner, close_all
from .registry import BACKENDS, Backend, backends, get_backend, load_stages, open_session
from .session import Session

__all__ = ["BACKENDS", "Backend", "Session", "StageRunner", "backends", "close_all", "get_backend", "load_stages",
           "open_session"]
