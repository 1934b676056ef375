"""Caches of the engine builder: the engine cache and the persistent timing cache.

- Engine cache: a directory of `<key>.engine` files with a `<key>.json` of their facts. The key
  is the sha256 of everything that decides the engine's bytes - the sha256 of each ONNX file the
  stage is built from, the build flags (precision, network typing, profiles, workspace, builder
  optimization level, route), the TensorRT version and the GPU SM - so an identical build is
  copied instead of rebuilt, and any change to an input gives another key.
- Timing cache: TensorRT's per-tactic timings, kept in one file across builds
  (`--timing-cache FILE`); read before a build, replaced atomically after it.

Every write goes to a temporary file in the destination's directory and is renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .. import defaults
from ..errors import Ps3EdgeError
from ..artifact.io import write_bytes_atomic

KEY_SCHEMA = 1          # bump when the meaning of the key's inputs changes


def engine_cache_key(onnx_hashes: dict[str, str], flags: dict, tensorrt_version: str, sm: int) -> str:
    """sha256 of the canonical JSON of the build's inputs (see the module docstring)."""
    payload = {"schema": KEY_SCHEMA, "onnx": dict(sorted(onnx_hashes.items())), "flags": flags,
               "tensorrt": str(tensorrt_version), "sm": int(sm)}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# --- timing cache -------------------------------------------------------------------------------
def read_timing_cache(path: Path | None) -> bytes:
    """The serialized timing cache at `path`; b"" (start empty) when there is none yet."""
    if path is None:
        return b""
    path = Path(path)
    if path.is_dir():
        raise Ps3EdgeError(f"--timing-cache {path} is a directory; give a file name")
    if not path.exists():
        if not path.parent.is_dir():
            raise Ps3EdgeError(f"--timing-cache {path}: directory {path.parent} does not exist")
        return b""
    try:
        return path.read_bytes()
    except OSError as e:
        raise Ps3EdgeError(f"cannot read timing cache {path}: {e.strerror or e}") from None


def write_timing_cache(path: Path | None, data: bytes) -> None:
    if path is None or not data:
        return
    write_bytes_atomic(Path(path), bytes(data))


# --- engine cache ------------------------------------------------------------------------------
def default_engine_cache_dir() -> Path:
    return Path(os.environ.get(defaults.ENV_ENGINE_CACHE) or defaults.DEFAULT_ENGINE_CACHE_DIR).expanduser()


class EngineCache:
    """`<root>/<key>.engine` + `<key>.json`. A missing or damaged entry is a miss, never an error."""

    def __init__(self, root: Path):
        self.root = Path(root).expanduser()

    def paths(self, key: str) -> tuple[Path, Path]:
        return self.root / f"{key}.engine", self.root / f"{key}.json"

    def get(self, key: str) -> tuple[Path, dict] | None:
        engine, meta = self.paths(key)
        if not (engine.is_file() and meta.is_file()):
            return None
        try:
            facts = json.loads(meta.read_text())
        except (OSError, ValueError):
            return None
        from ..artifact.io import file_sha256
        if not isinstance(facts, dict) or facts.get("sha256") != file_sha256(engine):
            return None
        return engine, facts

    def put(self, key: str, engine_bytes: bytes, facts: dict) -> None:
        engine, meta = self.paths(key)
        write_bytes_atomic(engine, engine_bytes)
        write_bytes_atomic(meta, (json.dumps(facts, indent=2) + "\n").encode())
