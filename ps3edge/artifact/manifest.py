"""`manifest.json`: the contract between exporter, builder and runtime.

It records the schema version, the model config and where the weights came from, the
geometry (scales, grids, budgets), preprocessing, per-stage I/O, the opset and precision, and a
sha256 for every file of the artifact, and the integrity record of all of that (integrity.py).
`load_manifest` refuses an artifact whose manifest is unreadable, of another schema, inconsistent
with itself (a hand-edited model config that no longer matches the stages' I/O, say), without a
matching integrity record (any section edited, added or removed by hand; the record removed), or
whose files do not match their recorded hashes, and says exactly what differs. Optional
sections written later: "engines" (ps3edge build) and "precisions" (ps3edge calibrate: FP16 /
INT8 stage files and precision maps, precisions.py).

`Manifest` is the checked, immutable object every other layer reads: typed sections
(`config`, `stages`, `geometry`, `look_close_defaults`, `preprocessing`, `files`, `engines`,
`precisions`); nothing outside this package indexes the JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from .. import defaults
from ..version import __version__
from ..errors import Ps3EdgeError
from ..model.config import PS3Config
from .checks import check_consistent, geometry_section, preprocessing_section
from .engines import EngineEntry, check_engines_section, merge_engines
from .integrity import INTEGRITY, check_integrity, with_integrity
from .io import file_sha256
from .precisions import PrecisionEntry, check_precisions
from .records import freeze, thaw
from .spec import TensorSpec

REQUIRED_SECTIONS = ("producer", "model", "source", "returned_layers", "opset", "precision", "geometry",
                     "defaults", "preprocessing", "stages", "files")
# every export writes these too, but a manifest built in code may lack them (a plan made before export)
REQUIRED_ON_DISK = (*REQUIRED_SECTIONS, "weights_sha256")


def build_manifest(cfg: PS3Config, source: dict, returned_layers, returned_layers_requested,
                   opset: int, stages: dict, files: dict, weights_sha256: str | None = None,
                   max_batch: int = defaults.DEFAULT_MAX_BATCH) -> "Manifest":
    """The manifest of a fresh export (checked like a loaded one)."""
    return Manifest.from_dict({
        "schema_version": defaults.MANIFEST_SCHEMA_VERSION,
        "producer": {"name": "ps3edge", "version": __version__},
        "model": cfg.to_dict(),
        "source": source,
        "returned_layers": list(returned_layers),
        "returned_layers_requested": list(returned_layers_requested),
        "opset": opset,
        "precision": "fp32",
        "geometry": geometry_section(cfg, max_batch),
        "defaults": {
            "select_num_each_scale": list(cfg.select_num_each_scale),
            # the runtime's step count when neither NUM_LOOK_CLOSE nor NUM_TOKEN_LOOK_CLOSE is set
            "num_look_close": min(defaults.DEFAULT_NUM_LOOK_CLOSE, cfg.max_look_close),
        },
        "preprocessing": preprocessing_section(cfg),
        "stages": stages,
        "files": files,
        **({"weights_sha256": weights_sha256} if weights_sha256 else {}),
    })


def _read_json(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise Ps3EdgeError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise Ps3EdgeError(f"{path} is not a ps3edge manifest")
    return manifest


def load_manifest(artifact_dir, verify: bool = True) -> "Manifest":
    """Read and check an artifact directory's manifest: its sections, their integrity record
    (always: it costs a few hashes of the JSON), and with `verify` every file's sha256 (which reads
    every file: a caller that has just verified them, or runs nothing, may pass False)."""
    artifact_dir = Path(artifact_dir)
    path = artifact_dir / defaults.MANIFEST_NAME
    if not artifact_dir.is_dir():
        raise Ps3EdgeError(f"artifact directory not found: {artifact_dir}")
    if not path.is_file():
        if (artifact_dir / "vila.json").is_file() and (artifact_dir / "ps3" / defaults.MANIFEST_NAME).is_file():
            raise Ps3EdgeError(f"{artifact_dir} is a VILA-HD artifact; its PS3 stages are the artifact "
                               f"{artifact_dir / 'ps3'}")
        raise Ps3EdgeError(f"{artifact_dir} has no {defaults.MANIFEST_NAME}; create one with 'ps3edge export'")
    data = _read_json(path)
    manifest = Manifest.from_dict(data, path)          # what is wrong in a section, named first
    missing = [key for key in REQUIRED_ON_DISK if key not in data]
    if missing:
        raise Ps3EdgeError(f"{path} lacks the '{missing[0]}' section - re-export the model")
    # every manifest of this schema was written with its record: one without it is refused, never trusted
    check_integrity(data, path)
    if verify:
        manifest.verify_files(artifact_dir)
    return manifest


@dataclass(frozen=True)
class StageEntry:
    """One exported stage: its ONNX file (and external data) and its declared tensors."""
    name: str
    file: str
    external_data: tuple[str, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @classmethod
    def from_dict(cls, name: str, d: dict) -> "StageEntry":
        tensors = lambda ts: tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in ts)  # noqa: E731
        return cls(name, d["file"], tuple(d.get("external_data", [])), tensors(d["inputs"]), tensors(d["outputs"]))

    @property
    def files(self) -> tuple[str, ...]:
        return (self.file, *self.external_data)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def tensor(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs + self.outputs if t.name == name)

    def to_dict(self) -> dict:
        return {"file": self.file, "external_data": list(self.external_data),
                "inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs]}


@dataclass(frozen=True)
class GeometryRecord:
    """The look-close geometry the artifact was exported with (derived from the model config)."""
    scales: tuple[int, ...]
    grids: tuple[int, ...]
    lowres_tokens: int
    highres_patches_each_scale: tuple[int, ...]
    highres_patches_total: int
    patch_dim: int
    max_tokens_per_highres_call: int
    max_batch: int                       # images per pass (export --max-batch)


@dataclass(frozen=True)
class LookCloseDefaults:
    select_num_each_scale: tuple[int, ...]
    num_look_close: int | None
    look_close_mode: str | None


@dataclass(frozen=True)
class Preprocessing:
    resize: str
    size: int
    interpolation: str
    rescale: str
    mean: tuple[float, ...]
    std: tuple[float, ...]


class Manifest:
    """An artifact's `manifest.json`, checked and immutable. Sections are typed attributes;
    `to_dict()` gives the JSON, `replace(section=...)` a new checked manifest."""

    def __init__(self, data: dict, path=None):
        self._data = freeze(data)
        self.path = path
        self.config = PS3Config.from_dict(thaw(self._data["model"]))
        self.stages = MappingProxyType({n: StageEntry.from_dict(n, thaw(d)) for n, d in self._data["stages"].items()})
        g = self._data["geometry"]
        self.geometry = GeometryRecord(**{k: g[k] for k in GeometryRecord.__dataclass_fields__})
        d = self._data["defaults"]
        self.look_close_defaults = LookCloseDefaults(tuple(d["select_num_each_scale"]), d.get("num_look_close"),
                                                     d.get("look_close_mode"))
        self.preprocessing = Preprocessing(**{k: self._data["preprocessing"][k]
                                              for k in Preprocessing.__dataclass_fields__})

    # the sections written later, typed on first use: their checks (engines.py, precisions.py) run
    # on this object in `from_dict` and make sure every entry can be read so
    @cached_property
    def engines(self) -> Mapping[str, EngineEntry]:
        """stage -> its TensorRT engine (`ps3edge build`; schema in engines.py)."""
        return MappingProxyType({n: EngineEntry.from_dict(e) for n, e in (self._data.get("engines") or {}).items()})

    @cached_property
    def precisions(self) -> Mapping[str, PrecisionEntry]:
        """fp16 / int8 -> its stage files and precision maps (`ps3edge calibrate`; schema in precisions.py)."""
        return MappingProxyType({p: PrecisionEntry.from_dict(e)
                                 for p, e in (self._data.get("precisions") or {}).items()})

    # --- construction ------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict, path=None) -> "Manifest":
        """Check `data` (schema, sections, their agreement with each other) and freeze it. An
        integrity record in `data` is dropped: `load_manifest` checks the one on disk, and
        `to_dict` / `write` give a fresh one."""
        where = path if path is not None else "the manifest"
        data = {k: v for k, v in data.items() if k != INTEGRITY}
        version = data.get("schema_version")
        if isinstance(version, bool) or version != defaults.MANIFEST_SCHEMA_VERSION:
            raise Ps3EdgeError(f"{where} has schema version {version!r}; this ps3edge reads version "
                               f"{defaults.MANIFEST_SCHEMA_VERSION} - re-export the model")
        for key in REQUIRED_SECTIONS:
            if key not in data:
                raise Ps3EdgeError(f"{where} lacks the '{key}' section - re-export the model")
        check_consistent(data, where)
        manifest = cls(json.loads(json.dumps(data)), path)

        def bad_engine(what: str):
            raise Ps3EdgeError(f"{where} is inconsistent: {what} - rebuild the engines with 'ps3edge build'")
        check_engines_section(manifest, bad_engine)
        check_precisions(manifest, where)
        return manifest

    def replace(self, **sections) -> "Manifest":
        """A new manifest with whole sections replaced (None removes an optional section); its
        integrity record is written afresh."""
        data = thaw(self._data)
        for key, value in sections.items():
            if value is None:
                data.pop(key, None)
            else:
                data[key] = thaw(value)                # typed sections (records) give their JSON
        return Manifest.from_dict(data, self.path)

    def with_engines(self, entries: Mapping[str, EngineEntry]) -> "Manifest":
        """`entries` recorded in the engines section, their files' hashes in `files` (those of
        replaced engines dropped)."""
        return Manifest.from_dict(merge_engines(thaw(self._data), entries), self.path)

    def to_dict(self) -> dict:
        """The JSON, with a fresh integrity record of its sections."""
        return with_integrity(thaw(self._data))

    def write(self, artifact_dir) -> None:
        from .io import write_json_atomic
        write_json_atomic(Path(artifact_dir) / defaults.MANIFEST_NAME, self.to_dict())

    # --- sections ----------------------------------------------------------------------------
    @property
    def schema_version(self) -> int:
        return self._data["schema_version"]

    @property
    def producer(self) -> Mapping:
        return self._data["producer"]

    @property
    def source(self) -> Mapping:
        """Where the weights came from: {"kind": "preset", "name", "seed"} or {"kind": "checkpoint", "path", "sha256"},
        the latter from the Hugging Face hub with "repo_id", "revision" and the resolved "commit" too."""
        return self._data["source"]

    @property
    def returned_layers(self) -> tuple[int, ...]:
        return self._data["returned_layers"]

    @property
    def returned_layers_requested(self) -> tuple[int, ...]:
        return self._data.get("returned_layers_requested", self._data["returned_layers"])

    @property
    def weights_sha256(self) -> str | None:
        """sha256 of the exported model's state dict (model/weights.state_dict_sha256); every
        exported manifest has it (load_manifest requires it), None only in one built in code."""
        return self._data.get("weights_sha256")

    @property
    def opset(self) -> int:
        return self._data["opset"]

    @property
    def precision(self) -> str:
        return self._data["precision"]

    @property
    def files(self) -> Mapping[str, str]:
        """File name -> sha256 of every file of the artifact."""
        return self._data["files"]

    @property
    def stage_order(self) -> tuple[str, ...]:
        return tuple(self.stages)

    # --- files -------------------------------------------------------------------------------
    def verify_files(self, artifact_dir) -> None:
        """Every listed file exists and has its recorded sha256."""
        for name, expected in self.files.items():
            f = Path(artifact_dir) / name
            if not f.is_file():
                raise Ps3EdgeError(f"artifact file {f} is missing")
            actual = file_sha256(f)
            if actual != expected:
                raise Ps3EdgeError(f"artifact file {f} was changed after export "
                                   f"(sha256 {actual[:12]}... != manifest {expected[:12]}...)")

    # --- the precisions section (schema in precisions.py) ------------------------------------
    def stage_files(self, precision: str, artifact_dir=None) -> dict[str, str]:
        from .precisions import stage_files
        return stage_files(self, precision, artifact_dir)

    def without_precision(self, precision: str) -> "Manifest":
        from .precisions import without_precision
        return without_precision(self, precision)

