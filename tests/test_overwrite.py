"""`export --out`: what it may write into and what `--overwrite` may replace. An artifact is what
ps3edge wrote and can verify; a directory holding anything its manifest does not list, or one that
is not a verifiable ps3edge artifact, is refused in one line and left byte for byte as it was, and a
directory made by someone else while the export runs is kept (the export fails)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from conftest import cli
from ps3edge.artifact.io import TEMP_MARK
from ps3edge.artifact.manifest import load_manifest
from test_bad_input import assert_one_line_error

EXPORT = ("export", "--model", "ps3-tiny")


def tree(root: Path) -> dict[str, object]:
    """Every entry under `root` (symlinks not followed): a file's bytes, a link's target, a folder."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            found[rel] = (("link", os.readlink(p)) if p.is_symlink() else
                          "dir" if p.is_dir() else p.read_bytes())
    return found


def temporaries(root: Path) -> list[str]:
    return [rel for rel in tree(root) if TEMP_MARK in rel]


def refused(tmp_path: Path, out, *flags, needles=(), cwd=None) -> str:
    """`ps3edge export --out OUT FLAGS` is one `error:` line, exit 2, and nothing under tmp_path
    changed (every user file byte-identical, no staging or lock left)."""
    before = tree(tmp_path)
    line = assert_one_line_error(cli(*EXPORT, "--out", out, *flags, cwd=cwd), *needles)
    assert tree(tmp_path) == before, "the refused export changed something"
    return line


def exported(out: Path, seed: int) -> bool:
    return load_manifest(out).source["seed"] == seed


@pytest.fixture
def art(ps3_copy) -> Path:
    """A genuine ps3-tiny artifact (seed 0) of the user's."""
    return ps3_copy


@pytest.fixture
def vila(vila_copy) -> Path:
    return vila_copy


# --- replaced: a genuine artifact ------------------------------------------------------------------
def test_overwrite_replaces_a_genuine_artifact(art, tmp_path):
    r = cli(*EXPORT, "--out", art, "--overwrite", "--seed", "5")
    assert r.returncode == 0, r.stderr
    assert exported(art, 5) and temporaries(tmp_path) == []
    assert sorted(p.name for p in art.iterdir()) == sorted(["manifest.json", *load_manifest(art).files])


def test_overwrite_replaces_a_verifiable_vila_hd_artifact_too(vila, tmp_path):
    assert cli(*EXPORT, "--out", vila, "--overwrite", "--seed", "5").returncode == 0
    assert exported(vila, 5) and not (vila / "ps3").exists() and temporaries(tmp_path) == []


def test_a_symlinked_out_is_followed_and_stays_a_link(art, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(art.name)
    assert cli(*EXPORT, "--out", link, "--overwrite", "--seed", "5").returncode == 0
    assert link.is_symlink() and os.readlink(link) == "art" and exported(art, 5)
    assert temporaries(tmp_path) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "link2").symlink_to(empty)
    assert cli(*EXPORT, "--out", tmp_path / "link2").returncode == 0
    assert (tmp_path / "link2").is_symlink() and exported(empty, 0)


# --- refused: files the manifest does not list ---------------------------------------------------
@pytest.mark.parametrize("user_files, named", [
    ({"NOTES.txt": b"my notes"}, ["NOTES.txt"]),
    ({"calib/a.png": b"\x89PNG...", "calib/b.png": b"\x89PNG,,,"}, ["calib/"]),
    ({"NOTES.txt": b"n", "calib/a.png": b"p", ".hidden": b"h"}, [".hidden", "NOTES.txt", "calib/"]),
    ({"empty/": None}, ["empty/"]),
])
def test_an_artifact_holding_unlisted_files_is_refused(art, tmp_path, user_files, named):
    for rel, data in user_files.items():
        path = art / rel
        if data is None:
            path.mkdir()
        else:
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(data)
    line = refused(tmp_path, art, "--overwrite", needles=("does not list", "nothing was changed", *named))
    assert [line.index(n) for n in named] == sorted(line.index(n) for n in named)


def test_a_vila_hd_artifact_with_a_user_file_in_ps3_is_refused(vila, tmp_path):
    (vila / "ps3" / "NOTES.txt").write_text("which layers")
    refused(tmp_path, vila, "--overwrite", needles=("ps3/NOTES.txt", "does not list"))


# --- refused: not a verifiable ps3edge artifact ----------------------------------------------------
@pytest.mark.parametrize("files, needle", [
    ({"manifest.json": "{}", "data.csv": "a,b\n1,2\n"}, "manifest.json is not a ps3edge manifest"),
    ({"manifest.json": "not json", "data.csv": "a,b\n"}, "manifest.json is not a ps3edge manifest"),
    ({"manifest.json": json.dumps({"producer": {"name": "other"}}), "w.bin": "x"}, "not a ps3edge manifest"),
    ({"vila.json": json.dumps({"kind": "llava"}), "w.bin": "x"}, "vila.json is not a ps3edge manifest"),
    ({"data.csv": "a,b\n"}, "no manifest.json or vila.json"),
])
def test_a_directory_that_only_looks_like_an_artifact_is_refused(tmp_path, files, needle):
    out = tmp_path / "mine"
    out.mkdir()
    for name, text in files.items():
        (out / name).write_text(text)
    refused(tmp_path, out, "--overwrite", needles=("mine", "not a ps3edge artifact", needle))


@pytest.mark.parametrize("damage, needle", [
    (lambda a: (a / "selector.onnx").write_bytes(b"edited"), "changed after export"),
    (lambda a: (a / "prior_prompt.npy").unlink(), "is missing"),
    (lambda a: edit(a / "manifest.json", lambda m: m["defaults"].update(num_look_close=2)), "section 'defaults'"),
    (lambda a: edit(a / "manifest.json", lambda m: m.update(schema_version=1)), "schema version 1"),
])
def test_an_artifact_that_does_not_verify_is_refused(art, tmp_path, damage, needle):
    damage(art)
    refused(tmp_path, art, "--overwrite", needles=("art", "cannot be verified", needle, "nothing was changed"))


def test_a_vila_hd_artifact_whose_ps3_part_does_not_verify_is_refused(vila, tmp_path):
    (vila / "ps3" / "lowres.onnx").write_bytes(b"edited")
    refused(tmp_path, vila, "--overwrite", needles=("cannot be verified", "lowres.onnx"))


def edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


# --- refused: what --out names --------------------------------------------------------------------
def test_an_out_that_is_a_file_or_a_link_to_one_is_refused(art, tmp_path):
    (tmp_path / "features.bin").write_bytes(b"data")
    (tmp_path / "to-file").symlink_to("features.bin")
    for out in ("features.bin", "to-file", "art/manifest.json"):
        refused(tmp_path, tmp_path / out, "--overwrite", needles=(out, "not a directory"))


def test_a_dangling_or_looping_symlink_is_refused(tmp_path):
    (tmp_path / "dangling").symlink_to("nowhere")
    refused(tmp_path, tmp_path / "dangling", needles=("dangling", "nowhere", "does not exist"))
    (tmp_path / "loop").symlink_to("loop")
    refused(tmp_path, tmp_path / "loop", "--overwrite", needles=("loop",))


def test_a_symlink_to_a_user_directory_is_refused_like_the_directory(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "manifest.json").write_text("{}")
    (tmp_path / "link").symlink_to(mine)
    refused(tmp_path, tmp_path / "link", "--overwrite", needles=("link", "manifest.json is not a ps3edge manifest"))


def test_an_out_inside_an_artifact_is_refused(art, vila, tmp_path):
    refused(tmp_path, art / "sub", "--overwrite", needles=("art/sub", "inside the ps3edge PS3 artifact"))
    refused(tmp_path, vila / "ps3", "--overwrite", needles=("vila/ps3", "inside the ps3edge VILA-HD artifact"))
    refused(tmp_path, vila / "ps3" / "new", needles=("inside the ps3edge",))


def test_an_out_that_holds_the_current_directory_is_refused(art, tmp_path):
    refused(tmp_path, ".", "--overwrite", needles=("current directory",), cwd=art)
    refused(tmp_path, "../art", "--overwrite", needles=("current directory",), cwd=art)
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(tmp_path, ".", needles=("current directory",), cwd=empty)


def test_without_overwrite_an_artifact_is_named_and_kept(art, tmp_path):
    refused(tmp_path, art, needles=("ps3edge artifact", "--overwrite"))


# --- made by someone else while the export runs ----------------------------------------------------
class WhileExporting(threading.Thread):
    """Waits (at most 60 s) for the export's staging directory beside `out` to appear, then does `act()`."""

    def __init__(self, out: Path, act):
        super().__init__(daemon=True)
        self.out, self.act, self.done = out, act, False

    def run(self):
        deadline = time.monotonic() + 60
        prefix = f".{self.out.name}{TEMP_MARK}export-"
        while time.monotonic() < deadline:
            if any(p.name.startswith(prefix) for p in self.out.parent.iterdir()):
                self.act()
                self.done = True
                return
            time.sleep(0.005)


def export_while(tmp_path: Path, out: Path, act, *flags):
    watcher = WhileExporting(out, act)
    watcher.start()
    result = cli(*EXPORT, "--out", out, *flags)
    watcher.join(timeout=60)
    assert watcher.done, "the export's staging directory never appeared"
    return result


@pytest.mark.parametrize("make, made", [
    (lambda out: out.mkdir(), {"art": "dir"}),
    (lambda out: (out.mkdir(), (out / "results.csv").write_text("keep me")), {"art": "dir", "art/results.csv": b"keep me"}),
    (lambda out: out.symlink_to(out.parent / "elsewhere"), {"art": ("link", "")}),
])
def test_a_directory_made_while_the_export_runs_is_kept_and_the_export_fails(tmp_path, make, made):
    out = tmp_path / "art"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    made = {k: ("link", str(elsewhere)) if v == ("link", "") else v for k, v in made.items()}
    result = export_while(tmp_path, out, lambda: make(out))
    assert_one_line_error(result, "art", "created or filled while ps3edge was writing it", "nothing of it")
    assert tree(tmp_path) == {"elsewhere": "dir", **made}            # theirs, as they made it; nothing else


def test_an_empty_out_swapped_for_another_while_the_export_runs_is_kept(tmp_path):
    out = tmp_path / "art"
    out.mkdir()
    result = export_while(tmp_path, out, lambda: (out.rename(tmp_path / "moved"), out.mkdir()))
    assert_one_line_error(result, "created or filled while ps3edge was writing it")
    assert tree(tmp_path) == {"art": "dir", "moved": "dir"}


def test_a_file_added_to_the_artifact_while_it_is_replaced_keeps_the_artifact(art, tmp_path):
    before = tree(art)
    result = export_while(tmp_path, art, lambda: (art / "NOTES.txt").write_text("mine"), "--overwrite", "--seed", "5")
    assert_one_line_error(result, "art", "NOTES.txt", "nothing of it was replaced")
    assert tree(art) == {**before, "NOTES.txt": b"mine"} and temporaries(tmp_path) == []
    assert exported(art, 0)
