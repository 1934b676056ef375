"""`vila.json`: the manifest of a VILA-HD artifact, checked and immutable.

    {"schema_version": 1, "kind": "vila-hd", "ps3edge_version": "...",
     "source": {"kind": "preset", "name", "seed"} | {"kind": "checkpoint", "path", "sha256"
                [, "repo_id", "revision", "commit"]},      # the last three: a Hugging Face hub checkpoint
     "context_length": C, "opset": 17,
     "llm": {"hidden_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size"[, "head_dim"]},
     "top_down": bool,                      # prompt_head.npz holds the top-down prompt head
     "files": {"<name>": "<sha256>"},       # every file outside ps3/ (ps3/ has its own manifest)
     "engines": {"projector": {...}, "llm": {...}}}     # written by `ps3edge build` (engines.py)

`load_vila_manifest` refuses a file that is missing, unreadable, of another schema or kind, whose
context or LLM shape is not positive whole numbers, or (verify) whose files do not match their
recorded hashes, each in one line naming the file and the field. `VilaManifest` is what every
other layer reads: typed sections, nothing outside this package indexes the JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from ..version import __version__
from ..errors import Ps3EdgeError
from ..model.config import is_whole_number
from .engines import EngineEntry, check_entry, merge_engines
from .io import file_sha256, write_json_atomic
from .records import freeze, thaw

VILA_MANIFEST = "vila.json"
VILA_SCHEMA_VERSION = 1
VILA_KIND = "vila-hd"
LLM_FIELDS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size")


@dataclass(frozen=True)
class LLMShape:
    """The exported LLM's dimensions (what the KV cache and the engine profiles are made of)."""
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    head_dim: int                       # recorded, else hidden_size // num_heads (Qwen2's default)


def _positive(value) -> bool:
    return is_whole_number(value) and value >= 1


def _check(data, path) -> None:
    """vila.json's sections, each refused in one line naming `path` and the field."""
    if not isinstance(data, dict):
        raise Ps3EdgeError(f"{path} is not a JSON object")
    version = data.get("schema_version")
    if isinstance(version, bool) or version != VILA_SCHEMA_VERSION:
        raise Ps3EdgeError(f"{path} has schema {version!r}, this ps3edge reads {VILA_SCHEMA_VERSION}")
    if data.get("kind") != VILA_KIND:
        raise Ps3EdgeError(f"{path}: kind must be '{VILA_KIND}', got {data.get('kind')!r}")
    context = data.get("context_length")
    if not _positive(context):
        raise Ps3EdgeError(f"{path}: context_length must be a positive whole number, got {context!r}")
    llm = data.get("llm")
    if not isinstance(llm, dict):
        raise Ps3EdgeError(f"{path} lacks the 'llm' section - re-export the model")
    for key in LLM_FIELDS:
        if not _positive(llm.get(key)):
            raise Ps3EdgeError(f"{path}: llm.{key} must be a positive whole number, got {llm.get(key)!r}")
    if llm.get("head_dim") is not None and not _positive(llm["head_dim"]):
        raise Ps3EdgeError(f"{path}: llm.head_dim must be a positive whole number, got {llm['head_dim']!r}")
    if not isinstance(data.get("source"), dict):
        raise Ps3EdgeError(f"{path} lacks the 'source' section - re-export the model")
    files = data.get("files", {})
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise Ps3EdgeError(f"{path}: 'files' must map file names to sha256 strings")
    engines = data.get("engines", {})
    if not isinstance(engines, dict):
        raise Ps3EdgeError(f"{path}: 'engines' is not an object")

    def bad_engine(what: str):
        raise Ps3EdgeError(f"{path}: {what} - rebuild the engines with 'ps3edge build'")
    for name, entry in engines.items():
        check_entry(f"engines.{name}", entry, bad_engine)


class VilaManifest:
    """A VILA-HD artifact's `vila.json`, checked and immutable. Sections are typed attributes;
    `to_dict()` gives the JSON, `replace(section=...)` a new checked manifest."""

    def __init__(self, data: dict, path=None):
        self._raw = freeze(data)                # read-only mappings and tuples
        self.path = path
        llm = data["llm"]
        self.llm = LLMShape(**{k: llm[k] for k in LLM_FIELDS},
                            head_dim=llm.get("head_dim") or llm["hidden_size"] // llm["num_heads"])
        self.engines: Mapping[str, EngineEntry] = MappingProxyType(
            {n: EngineEntry.from_dict(e) for n, e in (data.get("engines") or {}).items()})

    @classmethod
    def from_dict(cls, data: dict, path=None) -> "VilaManifest":
        _check(data, path if path is not None else VILA_MANIFEST)
        return cls(json.loads(json.dumps(data)), path)

    def replace(self, **sections) -> "VilaManifest":
        """A new manifest with whole sections replaced (None removes an optional section)."""
        data = self.to_dict()
        for key, value in sections.items():
            if value is None:
                data.pop(key, None)
            else:
                data[key] = thaw(value)                # typed sections (records) give their JSON
        return VilaManifest.from_dict(data, self.path)

    def with_engines(self, entries: Mapping[str, EngineEntry]) -> "VilaManifest":
        """`entries` recorded in the engines section, their files' hashes in `files` (those of
        replaced engines dropped)."""
        return VilaManifest.from_dict(merge_engines(self.to_dict(), entries), self.path)

    def to_dict(self) -> dict:
        return thaw(self._raw)

    def write(self, artifact_dir) -> None:
        write_json_atomic(Path(artifact_dir) / VILA_MANIFEST, self.to_dict())

    # --- sections ----------------------------------------------------------------------------
    @property
    def schema_version(self) -> int:
        return self._raw["schema_version"]

    @property
    def ps3edge_version(self) -> str | None:
        return self._raw.get("ps3edge_version")

    @property
    def source(self) -> Mapping:
        """Where the weights came from: {"kind": "preset", "name", "seed"} or {"kind": "checkpoint", "path", "sha256"}."""
        return self._raw["source"]

    @property
    def context_length(self) -> int:
        return int(self._raw["context_length"])

    @property
    def opset(self) -> int | None:
        return self._raw.get("opset")

    @property
    def top_down(self) -> bool:
        """Whether the artifact has the top-down prompt head (prompt_head.npz)."""
        return bool(self._raw.get("top_down"))

    @property
    def files(self) -> Mapping[str, str]:
        """File name -> sha256 of every file outside ps3/ (engine files included)."""
        return self._raw.get("files") or MappingProxyType({})

    # --- files -------------------------------------------------------------------------------
    def verify_files(self, artifact_dir) -> None:
        """Every listed file exists and has its recorded sha256."""
        for name, digest in self.files.items():
            f = Path(artifact_dir) / name
            if not f.is_file():
                raise Ps3EdgeError(f"VILA-HD artifact {artifact_dir} lacks {name}")
            if file_sha256(f) != digest:
                raise Ps3EdgeError(f"VILA-HD artifact {artifact_dir}: {name} does not match its sha256 in "
                                   f"{VILA_MANIFEST}")


def build_vila_manifest(source: Mapping, context_length: int, opset: int, llm: LLMShape, top_down: bool,
                        files: Mapping[str, str]) -> VilaManifest:
    """The manifest of a fresh export (checked like a loaded one)."""
    return VilaManifest.from_dict({
        "schema_version": VILA_SCHEMA_VERSION, "kind": VILA_KIND, "ps3edge_version": __version__,
        "source": thaw(source), "context_length": context_length, "opset": opset,
        "llm": {k: getattr(llm, k) for k in LLM_FIELDS},
        "top_down": top_down, "files": thaw(files),
    })


def load_vila_manifest(art, verify: bool = True) -> VilaManifest:
    """Read and check a VILA-HD artifact's vila.json; verify every listed file's sha256."""
    path = Path(art) / VILA_MANIFEST
    if not path.is_file():
        raise Ps3EdgeError(f"{art} is not a VILA-HD artifact (no {VILA_MANIFEST}); export one with 'ps3edge chat'")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise Ps3EdgeError(f"cannot read {path}: {e}") from None
    manifest = VilaManifest.from_dict(data, path)
    if verify:
        manifest.verify_files(art)
    return manifest


def is_vila_artifact(path) -> bool:
    return (Path(path) / VILA_MANIFEST).is_file()
