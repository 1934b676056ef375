"""`vila.json`: the manifest of a VILA-HD artifact, checked and immutable.

    {"schema_version": 2, "kind": "vila-hd", "ps3edge_version": "...",
     "source": {"kind": "preset", "name", "seed"} | {"kind": "checkpoint", "path", "sha256"
                [, "repo_id", "revision", "commit"]},      # the last three: a Hugging Face hub checkpoint
     "context_length": C, "opset": 17,
     "llm": {"hidden_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size"[, "head_dim"]},
     "top_down": bool,                      # prompt_head.npz holds the top-down prompt head
     "ps3": {"weights_sha256", "returned_layers"},     # the encoder in ps3/ this LLM was exported with
     "files": {"<name>": "<sha256>"},       # every file outside ps3/ (ps3/ has its own manifest)
     "engines": {"projector": {...}, "llm": {...}},     # written by `ps3edge build` (engines.py)
     "precisions": {"int4": {...}},         # written by `ps3edge calibrate --precision int4` (below)
     "integrity": {"<section>": "<sha256>"}}           # of every section above (integrity.py)

Schema 2 added the integrity record; schema 1 files (which had none) are refused with "re-export".
`load_vila_manifest` refuses a file that is missing, unreadable, of another schema or kind, whose
context or LLM shape is not positive whole numbers, whose files or engines are not listed as they
must be, whose integrity record is missing or does not match a section (always), or (verify)
whose files do not match their recorded hashes, each in one line naming the file and the field.
`VilaManifest` is what every other layer reads: typed sections, nothing outside this package
indexes the JSON.

The "precisions" section: the LLM's reduced precisions beside the FP32 llm.onnx (llm/int4*.py
writes them), each file of an entry listed in "files" with its sha256, so verified like the rest:

    "precisions": {"int4": {
        "producer": "ps3edge 0.1.0", "tool": "onnxruntime 1.32.0 MatMulNBits",
        "format": "MatMulNBits",            # or "QDQ" (Model Optimizer's INT4-AWQ, for TensorRT)
        "llm": "llm.int4.onnx", "external_data": [],
        "embed_tokens": "embed_tokens.int4.npz",     # absent: the FP32 embed_tokens.npy
        "settings": {"bits": 4, "block_size": 32, "symmetric": false, "accuracy_level": 0,
                     "quantized_nodes": 15},
        "report": "accuracy.int4.json", "summary": {...}}}      # once the report is written
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from .. import defaults
from ..version import __version__
from ..errors import Ps3EdgeError
from ..model.config import is_whole_number
from .engines import EngineEntry, check_entry, merge_engines
from .integrity import INTEGRITY, check_integrity, with_integrity
from .io import file_sha256, write_json_atomic
from .records import JsonRecord, extra_keys, freeze, thaw

VILA_MANIFEST = "vila.json"
VILA_SCHEMA_VERSION = 2          # 2: the integrity record
VILA_KIND = "vila-hd"
LLM_FIELDS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size")
VILA_ENGINES = ("projector", "llm")
# the files every VILA-HD pipeline reads (prompt_head.npz too where top_down): listed, so verified
VILA_FILES = ("projector.onnx", "llm.onnx", "embed_tokens.npy")
PRECISIONS = "precisions"


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
        raise Ps3EdgeError(f"{path} has schema {version!r}, this ps3edge reads {VILA_SCHEMA_VERSION} - "
                           f"re-export the model")
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
    ps3 = data.get("ps3")
    if not isinstance(ps3, dict) or not isinstance(ps3.get("weights_sha256"), str) or \
            not isinstance(ps3.get("returned_layers"), list):
        raise Ps3EdgeError(f"{path} lacks the 'ps3' section (the encoder's weights_sha256 and returned_layers) "
                           f"- re-export the model")
    _check_files(data, path)
    _check_precisions(data, path)
    engines = data.get("engines", {})
    if not isinstance(engines, dict):
        raise Ps3EdgeError(f"{path}: 'engines' is not an object")

    def bad_engine(what: str):
        raise Ps3EdgeError(f"{path}: {what} - rebuild the engines with 'ps3edge build'")
    unknown = sorted(set(engines) - set(VILA_ENGINES))
    if unknown:
        bad_engine(f"'engines' names {unknown}; a VILA-HD artifact's are {list(VILA_ENGINES)}")
    for name, entry in engines.items():
        check_entry(f"engines.{name}", entry, bad_engine)
        if data["files"].get(entry["file"]) != entry["sha256"]:
            bad_engine(f"engines.{name}.file {entry['file']} is not listed in 'files' with the engine's sha256")


def _check_files(data: dict, path) -> None:
    """'files': relative names inside the artifact and outside ps3/ (which has its own manifest),
    each with a sha256, the files every pipeline reads among them."""
    if "files" not in data:
        raise Ps3EdgeError(f"{path} lacks the 'files' section - re-export the model")
    files = data["files"]
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise Ps3EdgeError(f"{path}: 'files' must map file names to sha256 strings")
    outside = sorted(n for n in files if not n or n.startswith("/") or "\\" in n
                     or any(part in ("", ".", "..") for part in n.split("/")) or n.split("/")[0] == "ps3")
    if outside:
        raise Ps3EdgeError(f"{path}: 'files' names paths outside the artifact or inside ps3/: {outside}")
    needed = [*VILA_FILES, *(["prompt_head.npz"] if data.get("top_down") else [])]
    unlisted = [n for n in needed if n not in files]
    if unlisted:
        raise Ps3EdgeError(f"{path}: 'files' lacks {unlisted} - re-export the model")


@dataclass(frozen=True, kw_only=True)
class LLMPrecision(JsonRecord):
    """One entry of vila.json's "precisions" (the schema in the module docstring)."""
    producer: str | None = None
    tool: str | None = None
    format: str
    llm: str
    external_data: tuple[str, ...]
    embed_tokens: str | None = None
    settings: Mapping
    report: str | None = None
    summary: Mapping | None = None
    extra: Mapping = extra_keys()

    @property
    def files(self) -> set[str]:
        """Every file the entry names."""
        return {self.llm, *self.external_data, *(f for f in (self.embed_tokens, self.report) if f)}


def _check_precisions(data: dict, path) -> None:
    """"precisions": known names, each entry readable as an LLMPrecision, its files in 'files'."""
    section = data.get(PRECISIONS)
    if section is None:
        return

    def bad(what: str):
        raise Ps3EdgeError(f"{path}: {what} - run 'ps3edge calibrate' again")
    if not isinstance(section, dict):
        bad(f"'{PRECISIONS}' is not an object")
    known = defaults.LLM_PRECISIONS[1:]
    for name, entry in section.items():
        where = f"{PRECISIONS}.{name}"
        if name not in known:
            bad(f"'{PRECISIONS}' names '{name}'; a VILA-HD artifact's are {list(known)}")
        if not isinstance(entry, dict):
            bad(f"{where} is not an object")
        for key in ("format", "llm"):
            if not isinstance(entry.get(key), str):
                bad(f"{where}.{key} is missing or not a string")
        extra = entry.get("external_data")
        if not isinstance(extra, list) or not all(isinstance(f, str) for f in extra):
            bad(f"{where}.external_data must be a list of file names")
        if not isinstance(entry.get("settings"), dict):
            bad(f"{where}.settings is missing or not an object")
        for key in ("embed_tokens", "report", "producer", "tool"):
            if entry.get(key) is not None and not isinstance(entry[key], str):
                bad(f"{where}.{key} is not a string")
        if entry.get("summary") is not None and not isinstance(entry["summary"], dict):
            bad(f"{where}.summary is not an object")
        unlisted = sorted(f for f in LLMPrecision.from_dict(entry).files if f not in data["files"])
        if unlisted:
            bad(f"{where} names {unlisted}, which have no sha256 in 'files'")


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
        self.precisions: Mapping[str, LLMPrecision] = MappingProxyType(
            {n: LLMPrecision.from_dict(e) for n, e in (data.get(PRECISIONS) or {}).items()})

    @classmethod
    def from_dict(cls, data: dict, path=None) -> "VilaManifest":
        """Check `data`'s sections and freeze them. An integrity record in `data` is dropped:
        `load_vila_manifest` checks the one on disk, and `to_dict` / `write` give a fresh one."""
        _check(data, path if path is not None else VILA_MANIFEST)
        return cls(json.loads(json.dumps({k: v for k, v in data.items() if k != INTEGRITY})), path)

    def replace(self, **sections) -> "VilaManifest":
        """A new manifest with whole sections replaced (None removes an optional section); its
        integrity record is written afresh."""
        data = thaw(self._raw)
        for key, value in sections.items():
            if value is None:
                data.pop(key, None)
            else:
                data[key] = thaw(value)                # typed sections (records) give their JSON
        return VilaManifest.from_dict(data, self.path)

    def with_engines(self, entries: Mapping[str, EngineEntry]) -> "VilaManifest":
        """`entries` recorded in the engines section, their files' hashes in `files` (those of
        replaced engines dropped)."""
        return VilaManifest.from_dict(merge_engines(thaw(self._raw), entries), self.path)

    def to_dict(self) -> dict:
        """The JSON, with a fresh integrity record of its sections."""
        return with_integrity(thaw(self._raw))

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
    def ps3_encoder(self) -> Mapping:
        """The encoder ps3/ must hold: {"weights_sha256", "returned_layers"}."""
        return self._raw["ps3"]

    @property
    def top_down(self) -> bool:
        """Whether the artifact has the top-down prompt head (prompt_head.npz)."""
        return bool(self._raw.get("top_down"))

    @property
    def files(self) -> Mapping[str, str]:
        """File name -> sha256 of every file outside ps3/ (engine files included)."""
        return self._raw["files"]

    def llm_files(self, precision: str, artifact_dir=None) -> tuple[str, str]:
        """(LLM graph, token embedding) file names of `precision`; one line naming the remedy when
        the artifact has no such precision."""
        if precision not in defaults.LLM_PRECISIONS:
            raise Ps3EdgeError(f"unknown LLM precision '{precision}'; choose one of: "
                               f"{', '.join(defaults.LLM_PRECISIONS)}")
        if precision == "fp32":
            return "llm.onnx", "embed_tokens.npy"
        entry = self.precisions.get(precision)
        if entry is None:
            where = artifact_dir if artifact_dir is not None else "VILA_ARTIFACT"
            raise Ps3EdgeError(f"{where} has no {precision} LLM; run 'ps3edge calibrate {where} --precision "
                               f"{precision}' first")
        return entry.llm, entry.embed_tokens or "embed_tokens.npy"

    def without_precision(self, precision: str) -> "VilaManifest":
        """The manifest without `precision`'s entry and the files only it named."""
        entry = self.precisions.get(precision)
        if entry is None:
            return self
        rest = {p: e for p, e in self.precisions.items() if p != precision}
        keep = set(VILA_FILES).union(*(e.files for e in rest.values()))
        files = {f: h for f, h in self.files.items() if f not in entry.files or f in keep}
        return self.replace(files=files, precisions=rest or None)

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
                        files: Mapping[str, str], ps3_manifest) -> VilaManifest:
    """The manifest of a fresh export (checked like a loaded one); `ps3_manifest` is the Manifest
    of the encoder exported into ps3/ beside it."""
    return VilaManifest.from_dict({
        "schema_version": VILA_SCHEMA_VERSION, "kind": VILA_KIND, "ps3edge_version": __version__,
        "source": thaw(source), "context_length": context_length, "opset": opset,
        "llm": {k: getattr(llm, k) for k in LLM_FIELDS},
        "top_down": top_down, "files": thaw(files),
        "ps3": {"weights_sha256": ps3_manifest.weights_sha256,
                "returned_layers": list(ps3_manifest.returned_layers)},
    })


def check_encoder(vila: "VilaManifest", art) -> None:
    """The encoder in ps3/ is the one this LLM was exported with: its manifest (integrity-checked)
    names the same weights and returned layers. vila.json's file list stops at ps3/, so without
    this a whole other PS3 export put in its place would pass."""
    from .manifest import load_manifest

    ps3 = load_manifest(Path(art) / "ps3", verify=False)
    recorded = vila.ps3_encoder
    if ps3.weights_sha256 != recorded["weights_sha256"] or \
            list(ps3.returned_layers) != list(recorded["returned_layers"]):
        raise Ps3EdgeError(f"{Path(art) / 'ps3'} is not the encoder {Path(art) / VILA_MANIFEST} was exported with "
                           f"(weights {str(ps3.weights_sha256)[:12]}..., layers {list(ps3.returned_layers)}; recorded "
                           f"{recorded['weights_sha256'][:12]}..., {list(recorded['returned_layers'])}) - re-export the model")


def load_vila_manifest(art, verify: bool = True) -> VilaManifest:
    """Read and check a VILA-HD artifact's vila.json: its sections, their integrity record
    (always), and with `verify` every listed file's sha256 (which reads the LLM's ONNX, possibly
    tens of GB: a caller that has just verified them, or runs none of them, may pass False)."""
    path = Path(art) / VILA_MANIFEST
    if not path.is_file():
        raise Ps3EdgeError(f"{art} is not a VILA-HD artifact (no {VILA_MANIFEST}); export one with 'ps3edge chat'")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise Ps3EdgeError(f"cannot read {path}: {e}") from None
    manifest = VilaManifest.from_dict(data, path)     # what is wrong in a section, named first
    check_integrity(data, path)
    check_encoder(manifest, art)
    if verify:
        manifest.verify_files(art)
    return manifest


def is_vila_artifact(path) -> bool:
    return (Path(path) / VILA_MANIFEST).is_file()
