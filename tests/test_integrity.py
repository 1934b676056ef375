"""The integrity record of manifest.json and vila.json: required (a record deleted, null, of the wrong
type, missing sections or pasted from another file is refused), covering every top-level section
(each edited in turn), re-written by ps3edge's own writers, and checked by every command that runs
or shows an artifact and by ps3edge.load. Each refusal is one `error:` line, exit 2, no traceback,
and leaves the artifact's files as they were."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from conftest import cli, cli_process
from ps3edge.artifact.engines import EngineEntry
from ps3edge.artifact.io import file_sha256
from ps3edge.artifact.manifest import load_manifest
from ps3edge.artifact.profiles import profile_bounds
from ps3edge.artifact.vila import load_vila_manifest
from ps3edge.errors import Ps3EdgeError

NO_RECORD = "has no 'integrity' record"


# --- helpers -------------------------------------------------------------------------------------
def snapshot(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


def assert_refused(result, *needles: str) -> None:
    both = result.stdout + result.stderr
    assert result.returncode == 2, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in both, both
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


def assert_load_refused(path: Path, *needles: str) -> None:
    import ps3edge

    with pytest.raises(Ps3EdgeError) as e:
        ps3edge.load(path)
    assert "\n" not in str(e.value)
    for needle in needles:
        assert needle in str(e.value), f"{needle!r} not in {str(e.value)!r}"


@pytest.fixture
def other_records(vila_art) -> dict:
    """Integrity records of other files, to paste in: vila.json's and another PS3 export's."""
    return {"vila": json.loads((vila_art / "vila.json").read_text())["integrity"],
            "ps3": json.loads((vila_art / "ps3" / "manifest.json").read_text())["integrity"]}


# --- manifest.json: the record must be there, well formed, and match -------------------------------
def _mean(m):                      # the probe's edit: the image mean, in the config and in preprocessing
    m["model"]["image_mean"] = [0.1, 0.2, 0.3]
    m["preprocessing"]["mean"] = [0.1, 0.2, 0.3]


PS3_CASES = {
    "deleted, mean edited": (lambda m, o: (m.pop("integrity"), _mean(m)), NO_RECORD),
    "deleted, num_look_close 6 -> 2": (lambda m, o: (m.pop("integrity"), m["defaults"].update(num_look_close=2)),
                                       NO_RECORD),
    "null": (lambda m, o: m.update(integrity=None), "'integrity' must be an object"),
    "a string": (lambda m, o: m.update(integrity="sha256 of everything"), "got str"),
    "a list": (lambda m, o: m.update(integrity=[m["integrity"]]), "got list"),
    "missing sections": (lambda m, o: [m["integrity"].pop(k) for k in ("defaults", "preprocessing")],
                         "section 'defaults' was added"),
    "not digests": (lambda m, o: m["integrity"].update(opset=17), "not sha256 hex digests (sections ['opset'])"),
    "vila.json's record pasted": (lambda m, o: m.update(integrity=o["vila"]),
                                  "section 'context_length' was removed"),
    "another export's record pasted": (lambda m, o: m.update(integrity=o["ps3"]), "section 'files' was edited"),
    "mean edited, record kept": (lambda m, o: _mean(m), "section 'model' was edited"),
    "num_look_close edited, record kept": (lambda m, o: m["defaults"].update(num_look_close=2),
                                           "section 'defaults' was edited"),
}


@pytest.mark.parametrize("case", PS3_CASES)
def test_a_ps3_manifest_without_its_record_is_refused_by_every_command(ps3_copy, other_records, image_file,
                                                                        tmp_path, case):
    change, needle = PS3_CASES[case]
    edit_json(ps3_copy / "manifest.json", lambda m: change(m, other_records))
    before = snapshot(ps3_copy)
    out = tmp_path / "f.safetensors"
    for args in (("run", ps3_copy, "--image", image_file, "--out", out), ("inspect", ps3_copy),
                 ("inspect", ps3_copy, "--json"), ("build", ps3_copy)):
        assert_refused(cli(*args), "manifest.json is inconsistent", needle, "re-export")
    assert_load_refused(ps3_copy, needle)
    with pytest.raises(Ps3EdgeError, match="is inconsistent"):
        load_manifest(ps3_copy, verify=False)                 # skipping the files' hashes keeps the record's check
    assert not out.exists() and snapshot(ps3_copy) == before


def test_the_console_script_refuses_a_deleted_record(ps3_copy, image_file, tmp_path):
    edit_json(ps3_copy / "manifest.json", lambda m: (m.pop("integrity"), _mean(m)))
    before = snapshot(ps3_copy)
    r = cli_process("run", ps3_copy, "--image", image_file, "--out", tmp_path / "f.safetensors")
    assert_refused(r, NO_RECORD)
    r = cli_process("inspect", ps3_copy)
    assert_refused(r, NO_RECORD)
    assert "all sha256 match" not in r.stdout and snapshot(ps3_copy) == before


def test_the_unedited_artifact_runs_and_inspects(ps3_copy, image_file, tmp_path):
    r = cli("inspect", ps3_copy)
    assert r.returncode == 0 and "all sha256 match the manifest" in r.stdout
    r = cli("run", ps3_copy, "--image", image_file, "--out", tmp_path / "f.safetensors")
    assert r.returncode == 0, r.stderr


# --- vila.json and the ps3/ sub-artifact ---------------------------------------------------------------
VILA_CASES = {
    "context_length 8192 -> 20000": ("vila.json", lambda m, o: m.update(context_length=20000),
                                     "section 'context_length' was edited"),
    "context_length raised, record deleted": ("vila.json", lambda m, o: (m.pop("integrity"),
                                                                         m.update(context_length=20000)), NO_RECORD),
    "record deleted": ("vila.json", lambda m, o: m.pop("integrity"), NO_RECORD),
    "record null": ("vila.json", lambda m, o: m.update(integrity=None), "'integrity' must be an object"),
    "record a string": ("vila.json", lambda m, o: m.update(integrity="ok"), "got str"),
    "record missing a section": ("vila.json", lambda m, o: m["integrity"].pop("files"), "section 'files' was added"),
    "manifest.json's record pasted": ("vila.json", lambda m, o: m.update(integrity=o["ps3"]),
                                      "section 'context_length' was added"),
    "an LLM file's hash edited": ("vila.json", lambda m, o: m["files"].update({"llm.onnx": "0" * 64}),
                                  "section 'files' was edited"),
    "top_down switched off": ("vila.json", lambda m, o: m.update(top_down=False), "section 'top_down' was edited"),
    "ps3/ mean edited, record kept": ("ps3/manifest.json", lambda m, o: _mean(m), "section 'model' was edited"),
    "ps3/ record deleted": ("ps3/manifest.json", lambda m, o: (m.pop("integrity"),
                                                               m["defaults"].update(num_look_close=1)), NO_RECORD),
}


@pytest.mark.parametrize("case", VILA_CASES)
def test_a_vila_artifact_edited_by_hand_is_refused_by_every_command(vila_copy, other_records, image_file, case):
    name, change, needle = VILA_CASES[case]
    edit_json(vila_copy / name, lambda m: change(m, other_records))
    before = snapshot(vila_copy)
    for args in (("chat", "--model-path", "vila-hd-tiny", "--text", "what is this?", "--media", image_file,
                  "--artifacts", vila_copy), ("inspect", vila_copy), ("build", vila_copy)):
        assert_refused(cli(*args), f"{name} is inconsistent", needle)
    assert_load_refused(vila_copy, needle)
    if name == "vila.json":
        for verify in (True, False):
            with pytest.raises(Ps3EdgeError, match="vila.json is inconsistent"):
                load_vila_manifest(vila_copy, verify=verify)
    assert snapshot(vila_copy) == before


def test_a_vila_json_of_the_schema_before_the_record_is_refused_with_re_export(vila_copy, image_file):
    edit_json(vila_copy / "vila.json", lambda m: (m.pop("integrity"), m.update(schema_version=1)))
    r = cli("chat", "--model-path", "vila-hd-tiny", "--text", "hi", "--media", image_file, "--artifacts", vila_copy)
    assert_refused(r, "has schema 1, this ps3edge reads 2", "re-export")


def test_the_chat_cache_exports_again_over_a_refused_vila_json(tmp_path, monkeypatch):
    """The cache is ps3edge's own: an entry whose vila.json is refused is not current."""
    from ps3edge.llm import export as vila_export

    art = tmp_path / "cache" / "vila"
    art.parent.mkdir()
    monkeypatch.setattr(vila_export, "cache_dir_for", lambda *a, **k: art)
    vila_export.ensure_artifacts("vila-hd-tiny")
    edit_json(art / "vila.json", lambda m: m.update(context_length=20000))
    assert vila_export.ensure_artifacts("vila-hd-tiny") == art
    assert load_vila_manifest(art, verify=True).context_length == 8192


def test_the_unedited_vila_artifact_inspects_with_both_manifests(vila_copy):
    r = cli("inspect", vila_copy)
    assert r.returncode == 0, r.stderr
    assert "all sha256 match the manifest" in r.stdout and "all sha256 match vila.json" in r.stdout
    printed = json.loads(cli("inspect", vila_copy, "--json").stdout)
    assert set(printed) == {"vila.json", "manifest.json"} and "integrity" in printed["vila.json"]


# --- coverage: every top-level section, edited in turn ---------------------------------------------------
def _fake_ps3_engines(art: Path) -> dict:
    """Engine entries as `ps3edge build` records them (files of made-up bytes)."""
    manifest = load_manifest(art)
    bounds = profile_bounds(manifest)
    entries = {}
    for stage in manifest.stages:
        name = f"{stage}.fp16.{'0' * 12}.engine"
        (art / name).write_bytes(f"not really a {stage} engine".encode())
        entries[stage] = EngineEntry(
            file=name, sha256=file_sha256(art / name), built_via="onnx", precision="fp16", tensorrt_version="10.3.0",
            cuda_version="12.6", gpu_name="Orin", sm=87, profiles=bounds[stage], max_look_close=6, cache_key="a" * 64)
    return entries


def _int8_entry(manifest) -> dict:
    """A precisions entry whose stages are the FP32 files (nothing quantized): valid, no new files."""
    pmap = {"schema": 1, "default": "fp32", "io_dtype": "float32", "quantized_nodes": [], "fp32_op_types": [],
            "fp32_regions": [], "fp32_nodes": [], "fp32_tensors": [],
            "tensorrt": {"strongly_typed": True, "builder_flags": []}}
    return {"stages": {n: {"file": s.file, "external_data": [], "precision_map": pmap}
                       for n, s in manifest.stages.items()}}


def _edited(section: str) -> str:
    return f"section '{section}' was edited"


PS3_SECTION_EDITS = {             # section -> an edit that every other check of the manifest accepts, the refusal
    "schema_version": (lambda m: m.update(schema_version=3.0), _edited("schema_version")),
    "producer": (lambda m: m["producer"].update(version="9.9.9"), _edited("producer")),
    "model": (lambda m: m["model"].update(name="renamed"), _edited("model")),
    "source": (lambda m: m["source"].update(seed=1), _edited("source")),
    "returned_layers": (lambda m: m["returned_layers"].reverse(), _edited("returned_layers")),
    "returned_layers_requested": (lambda m: m["returned_layers_requested"].reverse(),
                                  _edited("returned_layers_requested")),
    "opset": (lambda m: m.update(opset=m["opset"] + 1), _edited("opset")),
    # one value is valid: any other is refused before the record is read
    "precision": (lambda m: m.update(precision="fp16"), "precision must be 'fp32'"),
    "geometry": (lambda m: m["geometry"].update(note="edited"), _edited("geometry")),
    "defaults": (lambda m: m["defaults"].update(num_look_close=1), _edited("defaults")),
    # it must equal what the model config gives: edited with the config, the config's edit is named first
    "preprocessing": (_mean, _edited("model")),
    "stages": (lambda m: m["stages"]["highres"].update(note="edited"), _edited("stages")),
    "files": (lambda m: m["files"].update({"extra.bin": "0" * 64}), _edited("files")),
    "weights_sha256": (lambda m: m.update(weights_sha256="0" * 64), _edited("weights_sha256")),
    "engines": (lambda m: next(iter(m["engines"].values())).update(gpu_name="Thor"), _edited("engines")),
    "precisions": (lambda m: m["precisions"]["int8"].update(tool="by hand"), _edited("precisions")),
}


def test_the_record_covers_every_section_of_manifest_json(ps3_copy):
    from ps3edge.engines.builder import record_engines

    record_engines(ps3_copy, _fake_ps3_engines(ps3_copy))           # ps3edge's writers re-write the record
    manifest = load_manifest(ps3_copy, verify=True)
    manifest.replace(precisions={"int8": _int8_entry(manifest)}).write(ps3_copy)
    path = ps3_copy / "manifest.json"
    original = path.read_text()
    written = json.loads(original)
    assert set(PS3_SECTION_EDITS) == set(written) - {"integrity"}   # a new section needs a case here
    assert set(written["integrity"]) == set(PS3_SECTION_EDITS)
    load_manifest(ps3_copy, verify=True)
    for section, (change, needle) in PS3_SECTION_EDITS.items():
        path.write_text(original)
        edit_json(path, change)
        with pytest.raises(Ps3EdgeError) as e:
            load_manifest(ps3_copy, verify=False)
        assert needle in str(e.value), (section, str(e.value))


VILA_SECTION_EDITS = {
    "schema_version": (lambda m: m.update(schema_version=2.0), _edited("schema_version")),
    "kind": (lambda m: m.update(kind="vila"), "kind must be 'vila-hd'"),       # one value is valid
    "ps3edge_version": (lambda m: m.update(ps3edge_version="9.9.9"), _edited("ps3edge_version")),
    "source": (lambda m: m["source"].update(seed=1), _edited("source")),
    "context_length": (lambda m: m.update(context_length=20000), _edited("context_length")),
    "opset": (lambda m: m.update(opset=m["opset"] + 1), _edited("opset")),
    "llm": (lambda m: m["llm"].update(num_layers=m["llm"]["num_layers"] + 1), _edited("llm")),
    "top_down": (lambda m: m.update(top_down=not m["top_down"]), _edited("top_down")),
    "files": (lambda m: m["files"].update({"llm.onnx": "0" * 64}), _edited("files")),
    "engines": (lambda m: m["engines"]["llm"].update(max_prompt=4096), _edited("engines")),
    "ps3": (lambda m: m["ps3"].update(returned_layers=[0]), _edited("ps3")),
}


def test_the_record_covers_every_section_of_vila_json(vila_copy):
    from ps3edge.engines.llm_engine import _entry, plan_vila_build, projector_width, record_vila_engines
    from ps3edge.engines.plan import BuildOptions

    manifest = load_vila_manifest(vila_copy)
    facts = {"tensorrt_version": "10.3.0", "cuda_version": "12.6", "gpu_name": "Orin", "sm": 87}
    entries = {}
    for plan in plan_vila_build(manifest, BuildOptions(), "10.3.0", 87, projector_width(vila_copy), 8):
        (vila_copy / plan.engine_file).write_bytes(f"not really a {plan.stage} engine".encode())
        entries[plan.stage] = _entry(plan, BuildOptions(), facts, file_sha256(vila_copy / plan.engine_file),
                                     {"bindings": {}}, manifest, 8)
    record_vila_engines(vila_copy, entries)                          # build's writer re-writes the record
    path = vila_copy / "vila.json"
    original = path.read_text()
    written = json.loads(original)
    assert set(VILA_SECTION_EDITS) == set(written) - {"integrity"}
    assert set(written["integrity"]) == set(VILA_SECTION_EDITS)
    assert load_vila_manifest(vila_copy, verify=True).engines == entries
    for section, (change, needle) in VILA_SECTION_EDITS.items():
        path.write_text(original)
        edit_json(path, change)
        with pytest.raises(Ps3EdgeError) as e:
            load_vila_manifest(vila_copy, verify=False)
        assert needle in str(e.value), (section, str(e.value))


def test_code_that_rewrites_vila_json_rewrites_its_record(vila_copy):
    manifest = load_vila_manifest(vila_copy)
    manifest.replace(context_length=4096).write(vila_copy)
    assert load_vila_manifest(vila_copy, verify=True).context_length == 4096


@pytest.mark.parametrize("change", ["other weights", "other layers"])
def test_another_consistent_encoder_in_ps3_is_refused(vila_copy, change):
    """vila.json's files stop at ps3/ (it has its own manifest), so the encoder is bound by its
    weights and returned layers: a whole other PS3 export, integrity record and all, is refused."""
    import ps3edge

    ps3 = load_manifest(vila_copy / "ps3")
    edited = ps3.replace(weights_sha256="0" * 64) if change == "other weights" else \
        ps3.replace(returned_layers=[0], returned_layers_requested=[0])
    edited.write(vila_copy / "ps3")                       # a valid manifest with a fresh record
    load_manifest(vila_copy / "ps3", verify=False)
    before = snapshot(vila_copy)
    with pytest.raises(Ps3EdgeError, match="is not the encoder .* was exported with"):
        load_vila_manifest(vila_copy, verify=False)
    with pytest.raises(Ps3EdgeError, match="is not the encoder"):
        ps3edge.load(vila_copy)
    assert snapshot(vila_copy) == before
