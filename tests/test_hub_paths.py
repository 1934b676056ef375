"""Where a checkpoint's paths may lead: a Hugging Face snapshot's files resolve inside the repo's cache
folder, refs hold commit hashes, revisions are git ref names or commits, an index names files inside
its checkpoint; a local directory's links are followed wherever they lead. Every refusal is one
`error:` line through the real CLI, with nothing written at --out."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from conftest import clean_env
from conftest import cli as run_cli
from ps3edge.artifact.manifest import load_manifest
from ps3edge.errors import Ps3EdgeError
from ps3edge.model import build, load_checkpoint, preset, random_model
from ps3edge.model.hub import check_revision, recorded_checkpoint
from test_bad_input import assert_one_line_error
from test_hub import COMMIT_MAIN, hf_cache, ps3_dirs, put_snapshot, same_weights, shard, vila_dir  # noqa: F401

REPO = "owner/ps3-tiny"
SHARD = "model-00002-of-00003.safetensors"


def cli(*args):
    return run_cli(*args, env=clean_env(columns="400"))


def export(spec, out: Path, *extra):
    return cli("export", "--model", spec, "--out", out, *extra)


def refused(result, *needles) -> str:
    """One `error:` line (exit 2, no traceback) naming `needles`, and no advice to download: what it
    names is not missing, it points elsewhere."""
    line = assert_one_line_error(result, *needles)
    assert "hf download" not in line and "without" not in line and "lacks" not in line, line
    return line


def relink(path: Path, target: Path) -> None:
    path.unlink()
    path.symlink_to(target)


def elsewhere(tmp_path: Path, src: Path) -> Path:
    """A copy of the file `src` outside the Hugging Face cache (what a hostile link points at)."""
    dst = tmp_path / "elsewhere" / src.name
    dst.parent.mkdir(exist_ok=True)
    shutil.copyfile(src, dst)
    return dst


def seed11(model) -> bool:
    return same_weights(model, random_model(preset("ps3-tiny"), seed=11))


@pytest.fixture
def sharded(ps3_dirs, tmp_path) -> Path:
    return shard(ps3_dirs / "seed11", tmp_path / "sharded")


# --- a snapshot's files resolve inside the repo's cache folder --------------------------------------

@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "preprocessor_config.json"])
def test_a_snapshot_file_linked_out_of_the_cache(hf_cache, ps3_dirs, tmp_path, name):
    snapshot = put_snapshot(hf_cache, REPO, ps3_dirs / "seed11", COMMIT_MAIN)
    target = elsewhere(tmp_path, snapshot / name)
    relink(snapshot / name, target)
    out = tmp_path / "out"
    refused(export(REPO, out), f"{snapshot / name} in the Hugging Face cache links to {target}",
            f"outside {REPO}'s cache folder {hf_cache / 'models--owner--ps3-tiny'}")
    assert not out.exists()


@pytest.mark.parametrize("name", [SHARD, "model.safetensors.index.json"])
def test_a_sharded_snapshot_file_linked_out_of_the_cache(hf_cache, sharded, tmp_path, name):
    snapshot = put_snapshot(hf_cache, REPO, sharded, COMMIT_MAIN)
    target = elsewhere(tmp_path, snapshot / name)
    relink(snapshot / name, target)
    out = tmp_path / "out"
    refused(export(REPO, out), f"{snapshot / name} in the Hugging Face cache links to {target}")
    assert not out.exists()


def test_a_blob_linked_out_of_the_cache(hf_cache, ps3_dirs, tmp_path):
    """The snapshot's link enters blobs/ as it should, but the blob itself leads elsewhere."""
    snapshot = put_snapshot(hf_cache, REPO, ps3_dirs / "seed11", COMMIT_MAIN)
    blob = (snapshot / "model.safetensors").resolve()
    target = elsewhere(tmp_path, blob)
    relink(blob, target)
    out = tmp_path / "out"
    refused(export(REPO, out), f"{snapshot / 'model.safetensors'} in the Hugging Face cache links to {target}")
    assert not out.exists()


def test_a_snapshot_folder_linked_out_of_the_cache(hf_cache, ps3_dirs, tmp_path):
    snapshot = hf_cache / "models--owner--ps3-tiny" / "snapshots" / COMMIT_MAIN
    snapshot.parent.mkdir(parents=True)
    (hf_cache / "models--owner--ps3-tiny" / "refs").mkdir()
    (hf_cache / "models--owner--ps3-tiny" / "refs" / "main").write_text(COMMIT_MAIN)
    copy = shutil.copytree(ps3_dirs / "seed11", tmp_path / "elsewhere")
    snapshot.symlink_to(copy, target_is_directory=True)
    out = tmp_path / "out"
    refused(export(REPO, out), f"{snapshot / 'config.json'} in the Hugging Face cache links to {copy / 'config.json'}")
    assert not out.exists()


def test_a_link_chain_that_leaves_and_comes_back_is_judged_by_where_it_ends(hf_cache, ps3_dirs, tmp_path):
    snapshot = put_snapshot(hf_cache, REPO, ps3_dirs / "seed11", COMMIT_MAIN)
    hop = tmp_path / "hop" / "model.safetensors"
    hop.parent.mkdir()
    hop.symlink_to((snapshot / "model.safetensors").resolve())          # back into the repo's blobs/
    relink(snapshot / "model.safetensors", hop)
    loaded = build(REPO)
    assert seed11(loaded.model) and loaded.source["commit"] == COMMIT_MAIN


def test_a_vila_snapshot_llm_file_linked_out_of_the_cache(hf_cache, vila_dir, tmp_path, image_file):
    """transformers reads the LLM's files itself: they are checked before it runs."""
    snapshot = put_snapshot(hf_cache, "owner/vila-tiny", vila_dir, COMMIT_MAIN)
    target = elsewhere(tmp_path, snapshot / "llm" / "model.safetensors")
    relink(snapshot / "llm" / "model.safetensors", target)
    r = cli("chat", "--model-path", "owner/vila-tiny", "--text", "hi", "--media", image_file, "--json",
            "--max-new-tokens", "1", "--num-look-close", "1")
    refused(r, f"{snapshot / 'llm' / 'model.safetensors'} in the Hugging Face cache links to {target}")
    assert not list((tmp_path / "ps3edge-cache").rglob("manifest.json"))


def test_a_snapshot_changed_after_the_export_is_refused_when_rebuilt(hf_cache, ps3_dirs, tmp_path):
    """A manifest's source (as the torch backend rebuilds it) is held to the same rule."""
    snapshot = put_snapshot(hf_cache, REPO, ps3_dirs / "seed11", COMMIT_MAIN)
    source = build(REPO).source
    target = elsewhere(tmp_path, snapshot / "model.safetensors")
    relink(snapshot / "model.safetensors", target)
    with pytest.raises(Ps3EdgeError, match="in the Hugging Face cache links to") as e:
        load_checkpoint(recorded_checkpoint(source))
    assert "\n" not in str(e.value)


# --- refs hold a commit hash ---------------------------------------------------------------------

@pytest.mark.parametrize("held", ["../../../somewhere", "ABSOLUTE", "good", COMMIT_MAIN + "\n", ""])
def test_a_ref_that_is_no_commit_hash(hf_cache, ps3_dirs, tmp_path, held):
    """A ref whose text would make another directory the snapshot (one with a valid checkpoint in it)."""
    snapshot = put_snapshot(hf_cache, REPO, ps3_dirs / "seed11", COMMIT_MAIN)
    somewhere = shutil.copytree(ps3_dirs / "seed12", tmp_path / "somewhere")
    held = str(somewhere) if held == "ABSOLUTE" else held
    if held == "good":
        shutil.copytree(ps3_dirs / "seed12", snapshot.parent / "good")
    ref = hf_cache / "models--owner--ps3-tiny" / "refs" / "main"
    ref.write_text(held)
    out = tmp_path / "out"
    refused(export(REPO, out), f"{ref} in the Hugging Face cache holds {held[:80]!r}, not a commit hash")  # shown cut at 80
    assert not out.exists()


def test_a_ref_linked_out_of_the_cache(hf_cache, ps3_dirs, tmp_path):
    put_snapshot(hf_cache, REPO, ps3_dirs / "seed11", COMMIT_MAIN)
    ref = hf_cache / "models--owner--ps3-tiny" / "refs" / "main"
    target = elsewhere(tmp_path, ref)
    relink(ref, target)
    refused(export(REPO, tmp_path / "out"), f"{ref} in the Hugging Face cache links to {target}")


def test_a_ref_to_a_commit_that_is_not_cached(hf_cache, ps3_dirs, tmp_path):
    """Nothing points elsewhere here: the snapshot is missing, and fetching it is the advice."""
    put_snapshot(hf_cache, REPO, ps3_dirs / "seed11", COMMIT_MAIN)
    (hf_cache / "models--owner--ps3-tiny" / "refs" / "main").write_text(hashlib.sha1(b"other").hexdigest())
    assert_one_line_error(export(REPO, tmp_path / "out"), f"{REPO} is not in the Hugging Face cache",
                          "hf download", absent=(tmp_path / "out",))


# --- revisions are branch or tag names, or commits ----------------------------------------------------

BAD_REVISIONS = ["..", "a/../b", "/etc", "../../refs/main", "main/", "a//b", ".hidden", "v1.lock", "a b",
                 "a\\b", "x@{1}"]


@pytest.mark.parametrize("revision", BAD_REVISIONS)
def test_a_revision_flag_that_is_no_ref_name(hf_cache, ps3_dirs, tmp_path, revision):
    put_snapshot(hf_cache, REPO, ps3_dirs / "seed11", COMMIT_MAIN)
    out = tmp_path / "out"
    refused(export(REPO, out, "--revision", revision), f"--revision {revision!r} is no branch, tag or commit hash")
    assert not out.exists()


@pytest.mark.parametrize("revision", ["..", "a/../b", "/etc"])
def test_a_revision_in_the_hub_id_that_is_no_ref_name(hf_cache, tmp_path, revision):
    out = tmp_path / "out"
    refused(export(f"{REPO}@{revision}", out), f"{REPO}: revision {revision!r} is no branch, tag or commit hash")
    assert not out.exists()


def test_ref_names_git_accepts_are_revisions(hf_cache, ps3_dirs):
    for ok in ("main", "v1.0", "feature/x", "refs/pr/1", "release-2024_01", COMMIT_MAIN):
        assert check_revision(ok, "--revision") == ok
    snapshot = put_snapshot(hf_cache, REPO, ps3_dirs / "seed11", COMMIT_MAIN)
    pr = snapshot.parent.parent / "refs" / "refs" / "pr" / "1"          # where the hub's PR refs are cached
    pr.parent.mkdir(parents=True)
    pr.write_text(COMMIT_MAIN)
    assert build(f"{REPO}@refs/pr/1").source["commit"] == COMMIT_MAIN


# --- an index names files inside its checkpoint ----------------------------------------------------

def index_naming(checkpoint: Path, name: str) -> Path:
    """The sharded checkpoint with its second shard named `name` in the index."""
    index = checkpoint / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = {k: (name if v == SHARD else v) for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))
    return checkpoint


@pytest.mark.parametrize("how", ["dotdot", "absolute"])
def test_a_local_index_naming_a_file_outside(sharded, tmp_path, how):
    target = elsewhere(tmp_path, sharded / SHARD)
    name = "../elsewhere/" + SHARD if how == "dotdot" else str(target)
    index_naming(sharded, name)
    out = tmp_path / "out"
    refused(export(sharded, out), f"names the weight file {name!r}, which points to {target}",
            f"outside the checkpoint directory {sharded}")
    assert not out.exists()


@pytest.mark.parametrize("how", ["dotdot", "absolute"])
def test_a_snapshot_index_naming_a_file_outside(hf_cache, sharded, tmp_path, how):
    target = elsewhere(tmp_path, sharded / SHARD)
    name = "../../x.safetensors" if how == "dotdot" else str(target)
    snapshot = put_snapshot(hf_cache, REPO, index_naming(sharded, name), COMMIT_MAIN)
    points = snapshot.parent.parent / "x.safetensors" if how == "dotdot" else target
    out = tmp_path / "out"
    refused(export(REPO, out), f"{snapshot / 'model.safetensors.index.json'} names the weight file {name!r}, "
            f"which points to {points}, outside the checkpoint directory {snapshot}")
    assert not out.exists()


def test_a_local_vila_llm_index_naming_a_file_outside(vila_dir, tmp_path, image_file, monkeypatch):
    """transformers would read the LLM's shards from wherever the index says: checked before it runs."""
    monkeypatch.setenv("PS3EDGE_CACHE", str(tmp_path / "ps3edge-cache"))
    ck = shutil.copytree(vila_dir, tmp_path / "ck")
    target = elsewhere(tmp_path, ck / "llm" / "model.safetensors")
    (ck / "llm" / "model.safetensors").unlink()
    (ck / "llm" / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"lm_head.weight": "../../elsewhere/model.safetensors"}}))
    r = cli("chat", "--model-path", ck, "--text", "hi", "--media", image_file, "--json",
            "--max-new-tokens", "1", "--num-look-close", "1")
    refused(r, "names the weight file '../../elsewhere/model.safetensors', which points to " + str(target))
    assert not list((tmp_path / "ps3edge-cache").rglob("manifest.json"))


def test_an_index_may_name_files_in_a_subfolder(sharded):
    (sharded / "shards").mkdir()
    (sharded / SHARD).rename(sharded / "shards" / SHARD)
    assert seed11(load_checkpoint(index_naming(sharded, "shards/" + SHARD)).model)


# --- a local directory's links are followed ----------------------------------------------------------

def test_a_local_directory_of_links_to_shared_storage_exports(ps3_dirs, tmp_path):
    """Every file a link to shared storage (the checkpoint is not copied), through the CLI."""
    shared, ck = shutil.copytree(ps3_dirs / "seed11", tmp_path / "shared"), tmp_path / "ck"
    ck.mkdir()
    for f in shared.iterdir():
        (ck / f.name).symlink_to(f)
    out = tmp_path / "out"
    r = export(ck, out)
    assert r.returncode == 0, r.stderr
    assert load_manifest(out).source["sha256"] == load_checkpoint(ps3_dirs / "seed11").source["sha256"]


def test_local_directories_linked_in_other_ways_load(hf_cache, ps3_dirs, sharded, tmp_path):
    linked_dir = tmp_path / "linked-dir"
    linked_dir.symlink_to(ps3_dirs / "seed11", target_is_directory=True)
    assert seed11(build(str(linked_dir)).model)
    shared = tmp_path / "shared-shards"                 # shards linked from elsewhere, the index beside them
    shared.mkdir()
    (sharded / SHARD).rename(shared / SHARD)
    (sharded / SHARD).symlink_to(shared / SHARD)
    assert seed11(build(str(sharded)).model)
    edited = tmp_path / "edited"                        # a config edited beside linked weights
    edited.mkdir()
    (edited / "model.safetensors").symlink_to(ps3_dirs / "seed11" / "model.safetensors")
    config = json.loads((ps3_dirs / "seed11" / "config.json").read_text())
    (edited / "config.json").write_text(json.dumps({**config, "name": "edited"}))
    assert build(str(edited)).cfg.name == "edited"
    # a snapshot's path named as a local directory: its links lead out of it, to the blobs
    snapshot = put_snapshot(hf_cache, REPO, ps3_dirs / "seed11", COMMIT_MAIN)
    loaded = build(str(snapshot))
    assert seed11(loaded.model) and "commit" not in loaded.source


def test_a_proper_sharded_snapshot_still_loads(hf_cache, sharded):
    """(test_hub.py exports a snapshot through the CLI.)"""
    put_snapshot(hf_cache, REPO, sharded, COMMIT_MAIN)
    loaded = build(REPO)
    assert seed11(loaded.model) and loaded.source["commit"] == COMMIT_MAIN
    assert loaded.source["sha256"] == load_checkpoint(sharded).source["sha256"]
