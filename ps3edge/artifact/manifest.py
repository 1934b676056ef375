"""`manifest.json`: the contract between exporter, builder and runtime.

It records the schema version, the model config and where the weights came from, the
geometry (scales, grids, budgets), preprocessing, per-stage I/O, the opset and precision, and a
sha256 for every file of the artifact. `load_manifest` refuses an artifact whose manifest is
unreadable, of another schema, inconsistent with itself (a hand-edited model config that no
longer matches the stages' I/O, say), or whose files do not match their recorded hashes, and
says exactly what differs. Optional sections written later: "engines" (ps3edge build) and
"precisions" (ps3edge calibrate: FP16 / INT8 stage files and precision maps, precisions.py).

`Manifest` is the checked, immutable object every other layer reads: typed sections
(`config`, `stages`, `geometry`, `look_close_defaults`, `preprocessing`, `files`, `engines`,
`precisions`); nothing outside this package indexes the JSON.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from .. import __version__, defaults
from ..errors import Ps3EdgeError
from ..model.config import PS3Config, is_whole_number
from .io import file_sha256
from .spec import TensorSpec, stage_specs

REQUIRED_SECTIONS = ("producer", "model", "source", "returned_layers", "opset", "precision", "geometry",
                     "defaults", "preprocessing", "stages", "files")


def build_manifest(cfg: PS3Config, source: dict, returned_layers, returned_layers_requested,
                   opset: int, stages: dict, files: dict, weights_sha256: str | None = None) -> "Manifest":
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
        "geometry": _geometry(cfg),
        "defaults": {
            "select_num_each_scale": list(cfg.select_num_each_scale),
            # the runtime's step count when neither NUM_LOOK_CLOSE nor NUM_TOKEN_LOOK_CLOSE is set
            "num_look_close": min(defaults.DEFAULT_NUM_LOOK_CLOSE, cfg.max_look_close),
        },
        "preprocessing": _preprocessing(cfg),
        "stages": stages,
        "files": files,
        **({"weights_sha256": weights_sha256} if weights_sha256 else {}),
    })


def _geometry(cfg: PS3Config) -> dict:
    return {
        "scales": list(cfg.scales),
        "grids": list(cfg.grids),
        "lowres_tokens": cfg.lowres_tokens,
        "highres_patches_each_scale": list(cfg.highres_patches_each_scale),
        "highres_patches_total": cfg.highres_patches_total,
        "patch_dim": cfg.patch_dim,
        "max_tokens_per_highres_call": defaults.MAX_TOKENS_PER_HIGHRES_CALL,
    }


def _preprocessing(cfg: PS3Config) -> dict:
    return {
        "resize": "squash", "size": cfg.max_size, "interpolation": "bicubic",
        "rescale": "1/255", "mean": list(cfg.image_mean), "std": list(cfg.image_std),
    }


def _check_consistent(manifest: dict, path) -> None:
    """The sections must agree with each other: catches a hand-edited manifest before it runs."""
    def bad(what: str):
        raise Ps3EdgeError(f"{path} is inconsistent: {what} - re-export the model")

    for key in ("producer", "source", "defaults"):
        if not isinstance(manifest[key], dict):
            bad(f"'{key}' is not an object")
    files = manifest["files"]
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        bad("'files' must map file names to sha256 strings")
    outside = sorted(n for n in files if n in ("", ".", "..") or Path(n).name != n)
    if outside:
        bad(f"'files' names paths outside the artifact directory: {outside}")
    if defaults.PRIOR_PROMPT_FILE not in files:
        bad(f"'files' lacks {defaults.PRIOR_PROMPT_FILE}")
    try:
        cfg = PS3Config.from_dict(manifest["model"])
    except Ps3EdgeError as e:
        bad(f"the 'model' section is not a valid PS3 config ({e})")
    except (TypeError, ValueError, AttributeError) as e:
        bad(f"the 'model' section is not a valid PS3 config ({type(e).__name__}: {e})")
    digest = manifest.get("weights_sha256")
    if digest is not None and not (isinstance(digest, str) and len(digest) == 64
                                   and all(c in "0123456789abcdef" for c in digest)):
        bad(f"weights_sha256 must be a sha256 hex digest, got {digest!r}")
    opset = manifest["opset"]
    if not is_whole_number(opset) or opset < defaults.MIN_OPSET:
        bad(f"opset must be a whole number >= {defaults.MIN_OPSET}, got {opset!r}")
    if manifest["precision"] != "fp32":
        bad(f"precision must be 'fp32' (the exported stages; 'ps3edge calibrate' records others under "
            f"'precisions'), got {manifest['precision']!r}")
    _check_defaults(manifest["defaults"], cfg, bad)
    layers = manifest["returned_layers"]
    if (not isinstance(layers, list) or not layers
            or not all(isinstance(l, int) and 0 <= l < cfg.depth for l in layers)):
        bad(f"returned_layers {layers} must be block indices of the {cfg.depth}-block model")
    geometry = manifest["geometry"]
    expected = _geometry(cfg)
    if not isinstance(geometry, dict):
        bad("'geometry' is not an object")
    limit = geometry.get("max_tokens_per_highres_call")
    if not isinstance(limit, int) or limit < 1:
        bad(f"geometry.max_tokens_per_highres_call must be a positive integer, got {limit!r}")
    differs = sorted(k for k, v in expected.items() if k != "max_tokens_per_highres_call" and geometry.get(k) != v)
    if differs:
        bad(f"geometry {', '.join(differs)} do not match the model config")
    budget = manifest["defaults"].get("select_num_each_scale")
    if budget != list(cfg.select_num_each_scale):
        bad(f"defaults.select_num_each_scale {budget} does not match the model config "
            f"{list(cfg.select_num_each_scale)}")
    pre = manifest["preprocessing"]
    if pre != _preprocessing(cfg):
        bad("'preprocessing' does not match the model config")
    stages = manifest["stages"]
    if not isinstance(stages, dict):
        bad("'stages' is not an object")
    for name, spec in stage_specs(cfg, len(layers)).items():
        stage = stages.get(name)
        if not isinstance(stage, dict):
            bad(f"stage '{name}' is missing")
        if stage.get("file") != spec.file:
            bad(f"stage '{name}' file is {stage.get('file')!r}, expected {spec.file!r}")
        extra = stage.get("external_data", [])
        if not isinstance(extra, list) or not all(isinstance(f, str) for f in extra):
            bad(f"stage '{name}' external_data must be a list of file names")
        for f in [spec.file, *extra]:
            if f not in files:
                bad(f"stage '{name}' file {f!r} has no sha256 in 'files'")
        if {"inputs": stage.get("inputs"), "outputs": stage.get("outputs")} != spec.to_dict():
            bad(f"stage '{name}' inputs/outputs do not match the model config")


def _check_defaults(section: dict, cfg: PS3Config, bad) -> None:
    """The look-close defaults that build and calibrate read (select_num_each_scale is checked
    against the model config by the caller)."""
    if "num_look_close" in section:
        steps = section["num_look_close"]
        if not is_whole_number(steps) or not 1 <= steps <= cfg.max_look_close:
            bad(f"defaults.num_look_close must be a whole number from 1 to {cfg.max_look_close}, got {steps!r}")
    # look_close_mode: written by earlier releases and never read (the mode comes from
    # LOOK_CLOSE_MODE and the prompt); still checked so that a manifest of theirs stays valid
    if "look_close_mode" in section and section["look_close_mode"] not in defaults.LOOK_CLOSE_MODES:
        bad(f"defaults.look_close_mode must be one of {', '.join(defaults.LOOK_CLOSE_MODES)}, "
            f"got {section['look_close_mode']!r}")


INTEGRITY = "integrity"         # section -> sha256 of its canonical JSON, written with every manifest


def section_digests(data: dict) -> dict[str, str]:
    """sha256 of each section's canonical JSON (sorted keys, no spaces), the integrity section aside."""
    return {key: hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
            for key, value in sorted(data.items()) if key != INTEGRITY}


def _check_integrity(data: dict, integrity, where) -> None:
    """A manifest whose sections agree with each other can still be edited by hand (the image mean
    and the config's mean together, say): every section must match the digest written with it."""
    if not isinstance(integrity, dict):
        raise Ps3EdgeError(f"{where} is inconsistent: '{INTEGRITY}' is not an object - re-export the model")
    actual = section_digests(data)
    for key in sorted(set(actual) | set(integrity)):
        if key not in integrity:
            what = f"section '{key}' was added after the manifest was written"
        elif key not in actual:
            what = f"section '{key}' was removed after the manifest was written"
        elif integrity[key] != actual[key]:
            what = f"section '{key}' was edited after the manifest was written (its sha256 differs from the integrity record)"
        else:
            continue
        raise Ps3EdgeError(f"{where} is inconsistent: {what} - re-export the model")


def _read_json(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise Ps3EdgeError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise Ps3EdgeError(f"{path} is not a ps3edge manifest")
    return manifest


def load_manifest(artifact_dir, verify: bool = True) -> "Manifest":
    """Read and check an artifact directory's manifest; verify every file's sha256."""
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
    if INTEGRITY in data:                              # manifests of older releases have none
        _check_integrity({k: v for k, v in data.items() if k != INTEGRITY}, data[INTEGRITY], path)
    if verify:
        manifest.verify_files(artifact_dir)
    return manifest


def _freeze(value):
    """JSON data made immutable: objects -> read-only mappings, arrays -> tuples."""
    if isinstance(value, dict):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value):
    """The inverse of _freeze: plain JSON data (a fresh copy)."""
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


class Record:
    """A read-only JSON object with attribute access (`entry.file`, `entry.get("jetpack")`), for the
    sections whose keys are documented and checked where they are defined (engines.py,
    precisions.py)."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping):
        object.__setattr__(self, "_data", _freeze(dict(data)))

    def __getattr__(self, key):
        try:
            return self._data[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key, value):
        raise AttributeError("a manifest record is read-only")

    def __getitem__(self, key):
        return self._data[key]

    def get(self, key, default=None):
        return self._data.get(key, default)

    def __contains__(self, key) -> bool:
        return key in self._data

    def __eq__(self, other) -> bool:
        return isinstance(other, Record) and self.to_dict() == other.to_dict()

    def to_dict(self) -> dict:
        return _thaw(self._data)


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


def _records(section) -> Mapping[str, Record]:
    if not isinstance(section, Mapping):
        return MappingProxyType({})
    return MappingProxyType({n: Record(e) for n, e in section.items() if isinstance(e, Mapping)})


class Manifest:
    """An artifact's `manifest.json`, checked and immutable. Sections are typed attributes;
    `to_dict()` gives the JSON, `replace(section=...)` a new checked manifest."""

    def __init__(self, data: dict, path=None):
        self._data = _freeze(data)
        self.path = path
        self.config = PS3Config.from_dict(_thaw(self._data["model"]))
        self.stages = MappingProxyType({n: StageEntry.from_dict(n, _thaw(d)) for n, d in self._data["stages"].items()})
        g = self._data["geometry"]
        self.geometry = GeometryRecord(**{k: g[k] for k in GeometryRecord.__dataclass_fields__})
        d = self._data["defaults"]
        self.look_close_defaults = LookCloseDefaults(tuple(d["select_num_each_scale"]), d.get("num_look_close"),
                                                     d.get("look_close_mode"))
        self.preprocessing = Preprocessing(**{k: self._data["preprocessing"][k]
                                              for k in Preprocessing.__dataclass_fields__})
        self.engines = _records(self._data.get("engines"))          # checked after construction
        self.precisions = _records(self._data.get("precisions"))

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
        _check_consistent(data, where)
        manifest = cls(json.loads(json.dumps(data)), path)
        from .engines import check_engines_section
        from .precisions import check_precisions

        def bad_engine(what: str):
            raise Ps3EdgeError(f"{where} is inconsistent: {what} - rebuild the engines with 'ps3edge build'")
        check_engines_section(manifest, bad_engine)
        check_precisions(manifest, where)
        return manifest

    def replace(self, **sections) -> "Manifest":
        """A new manifest with whole sections replaced (None removes an optional section); its
        integrity record is written afresh."""
        data = _thaw(self._data)
        for key, value in sections.items():
            if value is None:
                data.pop(key, None)
            else:
                data[key] = _thaw(value) if isinstance(value, (Mapping, tuple)) else value
        return Manifest.from_dict(data, self.path)

    def to_dict(self) -> dict:
        """The JSON, with a fresh integrity record of its sections."""
        data = _thaw(self._data)
        return {**data, INTEGRITY: section_digests(data)}

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
        """Where the weights came from: {"kind": "preset", "name", "seed"} or {"kind": "checkpoint", "path", "sha256"}."""
        return self._data["source"]

    @property
    def returned_layers(self) -> tuple[int, ...]:
        return self._data["returned_layers"]

    @property
    def returned_layers_requested(self) -> tuple[int, ...]:
        return self._data.get("returned_layers_requested", self._data["returned_layers"])

    @property
    def weights_sha256(self) -> str | None:
        """sha256 of the exported model's state dict (model/weights.state_dict_sha256); None in
        artifacts of older releases."""
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

