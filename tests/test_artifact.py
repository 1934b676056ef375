"""The artifact layer: one writer at a time, nothing of the user's ever replaced, no litter after a
killed writer, a manifest that verifies as a whole (its own content and the weights it names),
checkpoint files read only from inside the checkpoint, and numbers taken only as written."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import clean_env, cli, cli_command
from ps3edge.artifact.io import TEMP_MARK, publish_dir, temp_dir
from ps3edge.artifact.lock import lock_path, writer_lock
from ps3edge.artifact.manifest import load_manifest
from ps3edge.artifact.weights import rebuild_torch_model
from ps3edge.errors import Ps3EdgeError
from ps3edge.exporter.onnx_export import export
from ps3edge.model.config import preset
from ps3edge.model.weights import load_checkpoint, random_model, save_checkpoint
from ps3edge.runtime.planning import settings_from_env
from test_bad_input import assert_one_line_error


def litter(directory: Path) -> list[str]:
    """ps3edge's temporaries (and lock files) in a directory, recursively one level into children."""
    names = [p.name for p in directory.iterdir() if TEMP_MARK in p.name]
    names += [f"{c.name}/{p.name}" for c in directory.iterdir() if c.is_dir() for p in c.iterdir() if TEMP_MARK in p.name]
    return names


# --- one writer at a time ----------------------------------------------------------------------------
def test_a_second_writer_is_refused_with_the_owners_pid(tmp_path):
    target = tmp_path / "art"
    with writer_lock(target):
        with pytest.raises(Ps3EdgeError, match=rf"being written by another ps3edge \(pid {os.getpid()}\)"):
            with writer_lock(target):
                pass
    assert not lock_path(target).exists()                    # released and removed
    with writer_lock(target):                                # and free again
        pass


def test_export_while_another_process_writes_the_target_is_refused(tmp_path):
    out = tmp_path / "art"
    with writer_lock(out):
        r = cli("export", "--model", "ps3-tiny", "--out", out)
    assert_one_line_error(r, str(out), f"pid {os.getpid()}", "wait for it")
    assert not out.exists() and litter(tmp_path) == []


def test_the_lock_removes_what_a_dead_writer_left_and_nothing_else(tmp_path):
    target = tmp_path / "art"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    (target / ".hidden").write_text("mine too")
    (tmp_path / ".art.backup").mkdir()                       # the user's, though it looks like ours
    staging = temp_dir(tmp_path, "art", "export")
    (staging / "lowres.onnx").write_bytes(b"half")
    scratch = temp_dir(target, "highres.int8.onnx", "int8")
    (target / f".lowres.int8.onnx{TEMP_MARK}tmp-x.tmp").write_bytes(b"half")
    lock_path(target).write_text("999999\n")               # a lock file whose owner died
    with writer_lock(target):
        assert not staging.exists() and not scratch.exists()
        assert litter(tmp_path) == [lock_path(target).name]   # only the live lock
    assert sorted(p.name for p in target.iterdir()) == [".hidden", "notes.txt"]
    assert (tmp_path / ".art.backup").is_dir() and litter(tmp_path) == []


def signalled_once(args: list[str], started, sig: int, env: dict | None = None,
                   poll_s: float = 0.05) -> tuple[int, str]:
    """Start `ps3edge ARGS`, send `sig` once started() is true; its exit code and stderr."""
    proc = subprocess.Popen(cli_command() + args, env=clean_env() if env is None else env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not started():
        assert proc.poll() is None and time.monotonic() < deadline, \
            f"ps3edge {args[0]} never reached the point to stop it at"
        time.sleep(poll_s)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def staging_started(parent: Path, name: str):
    return lambda: any(p.name.startswith(f".{name}{TEMP_MARK}export-") for p in parent.iterdir())


def test_export_killed_halfway_leaves_nothing_after_the_rerun(tmp_path):
    out = tmp_path / "big"
    signalled_once(["export", "--model", "ps3-tiny-4k", "--out", str(out)], staging_started(tmp_path, "big"),
                   signal.SIGKILL)
    assert litter(tmp_path), "a killed export leaves its staging directory (until the next writer)"
    r = cli("export", "--model", "ps3-tiny", "--out", out)
    assert r.returncode == 0, r.stderr
    assert litter(tmp_path) == [] and load_manifest(out).config.name == "ps3-tiny"


def test_calibrate_killed_halfway_leaves_nothing_after_the_rerun(artifacts, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(artifacts("ps3-tiny"), art)
    before = sorted(p.name for p in art.iterdir())
    signalled_once(["calibrate", str(art), "--precision", "fp16"],
                   lambda: litter(tmp_path) and litter(tmp_path) != [lock_path(art).name], signal.SIGKILL, poll_s=0.02)
    assert sorted(p.name for p in art.iterdir() if TEMP_MARK not in p.name) == before   # the artifact as it was
    load_manifest(art, verify=True)
    r = cli("calibrate", art, "--precision", "fp16")
    assert r.returncode == 0, r.stderr
    assert litter(tmp_path) == [] and "fp16" in load_manifest(art, verify=True).precisions


@pytest.mark.slow
def test_export_and_bench_terminated_halfway_clean_up_on_the_way_out(tmp_path):
    """SIGTERM (a scheduler's stop, `timeout`) unwinds like Ctrl-C: exit 143, one word, and nothing
    left behind at once - an export's staging, and bench's temporary directory (an exported
    artifact inside it), which the default action would leave in the temporary folder for good."""
    out = tmp_path / "big"
    code, err = signalled_once(["export", "--model", "ps3-tiny-4k", "--out", str(out)],
                               staging_started(tmp_path, "big"), signal.SIGTERM)
    assert code == 143 and err.strip().splitlines()[-1] == "terminated" and "Traceback" not in err, err
    assert litter(tmp_path) == [] and not out.exists()

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    code, err = signalled_once(["bench", "--model", "ps3-tiny", "--device", "cpu", "--batch", "1", "--backend",
                                "onnxruntime", "--num-look-close", "1", "--warmup", "0", "--repeat", "1"],
                               lambda: any(scratch.glob("ps3edge-bench-*/*")), signal.SIGTERM,
                               clean_env(TMPDIR=str(scratch)))
    assert code == 143 and err.strip().splitlines()[-1] == "terminated" and "Traceback" not in err, err
    assert not any(scratch.glob("ps3edge-*"))


# --- nothing of the user's replaced ------------------------------------------------------------------
def test_a_directory_made_while_the_export_runs_is_kept(tmp_path):
    out = tmp_path / "art"

    def user_makes_the_directory(message: str):
        if message == "finalising artifact":
            out.mkdir()
            (out / "results.csv").write_text("keep me")

    with pytest.raises(Ps3EdgeError, match="created or filled while ps3edge was writing it; nothing of it was replaced"):
        export("ps3-tiny", out, progress=user_makes_the_directory)
    assert [p.name for p in out.iterdir()] == ["results.csv"] and (out / "results.csv").read_text() == "keep me"
    assert litter(tmp_path) == []


def test_overwrite_replaces_only_an_artifact(tmp_path):
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "manifest.json").write_text("{}")
    target = tmp_path / "art"
    target.mkdir()
    (target / "data.bin").write_bytes(b"user data, no manifest")
    with pytest.raises(Ps3EdgeError, match="nothing of it was replaced"):
        publish_dir(staging, target, replace=True)
    assert (target / "data.bin").read_bytes() == b"user data, no manifest"


def test_an_empty_out_directory_becomes_the_artifact(tmp_path):
    out = tmp_path / "art"
    out.mkdir()
    export("ps3-tiny", out)
    assert (out / "manifest.json").is_file() and litter(tmp_path) == []


# --- the manifest verifies as a whole ----------------------------------------------------------------
@pytest.fixture
def tiny_copy(artifacts, tmp_path):
    dst = tmp_path / "art"
    shutil.copytree(artifacts("ps3-tiny"), dst)
    return dst


@pytest.mark.parametrize("section, change", [
    ("source", lambda m: m["source"].update(seed=1)),                                  # other random weights
    ("defaults", lambda m: m["defaults"].update(num_look_close=2)),                    # valid, but not what was exported
    ("model", lambda m: (m["model"].update(image_std=[0.25] * 3), m["preprocessing"].update(std=[0.25] * 3))),
])
def test_a_self_consistent_edit_is_refused_naming_the_section(tiny_copy, image_file, tmp_path, section, change):
    path = tiny_copy / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    out = tmp_path / "f.safetensors"
    for r in (cli("inspect", tiny_copy), cli("run", tiny_copy, "--image", image_file, "--out", out)):
        assert_one_line_error(r, f"section '{section}' was edited", "re-export", absent=(out,))


def test_a_removed_integrity_record_section_is_named(tiny_copy):
    path = tiny_copy / "manifest.json"
    data = json.loads(path.read_text())
    del data["integrity"]["opset"]
    path.write_text(json.dumps(data))
    with pytest.raises(Ps3EdgeError, match="section 'opset' was added after the manifest was written"):
        load_manifest(tiny_copy)


def test_a_manifest_without_its_weights_digest_is_refused(tiny_copy):
    # every export of this schema records it: its absence never switches the torch backend's check off
    manifest = load_manifest(tiny_copy).replace(weights_sha256=None)
    manifest.write(tiny_copy)                                         # a fresh integrity record, no digest
    with pytest.raises(Ps3EdgeError, match="lacks the 'weights_sha256' section - re-export"):
        load_manifest(tiny_copy, verify=True)
    with pytest.raises(Ps3EdgeError, match="has no weights_sha256"):
        rebuild_torch_model(manifest)


def test_the_torch_backend_proves_it_rebuilt_the_exported_weights(tiny_copy):
    manifest = load_manifest(tiny_copy)
    rebuild_torch_model(manifest)                                   # the recorded digest matches
    other = manifest.replace(source={**manifest.source, "seed": 7})  # written by code: integrity follows
    with pytest.raises(Ps3EdgeError, match="not the exported ones"):
        rebuild_torch_model(other)


# --- checkpoints: files inside, numbers as written ----------------------------------------------------
def sharded_checkpoint(tmp_path: Path, shard_name: str) -> Path:
    ckpt = tmp_path / "ckpt"
    save_checkpoint(random_model(preset("ps3-tiny")), ckpt)
    (ckpt / "model.safetensors").rename(tmp_path / "weights.safetensors")
    index = {"weight_map": {"vision_model.trunk.pos_embed": shard_name}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    return ckpt


@pytest.mark.parametrize("how", ["dotdot", "absolute"])       # links of a local directory: test_hub_paths.py
def test_a_shard_outside_the_checkpoint_is_refused(tmp_path, how):
    outside = tmp_path / "weights.safetensors"
    name = {"dotdot": "../weights.safetensors", "absolute": str(outside)}[how]
    ckpt = sharded_checkpoint(tmp_path, name)
    with pytest.raises(Ps3EdgeError, match="outside the checkpoint directory") as e:
        load_checkpoint(ckpt)
    assert "\n" not in str(e.value)


def test_a_shard_inside_the_checkpoint_loads(tmp_path):
    ckpt = sharded_checkpoint(tmp_path, "model-00001-of-00001.safetensors")
    (tmp_path / "weights.safetensors").rename(ckpt / "model-00001-of-00001.safetensors")
    assert load_checkpoint(ckpt).cfg.depth == 4


@pytest.mark.parametrize("key, value, needle", [
    ("depth", 3.0, "depth must be a whole number, got 3.0"),
    ("num_heads", 4.5, "num_heads must be a whole number, got 4.5"),
    ("max_select_num_each_scale", [511.5, 2048], "select_num_each_scale must be a list of whole numbers"),
])
def test_checkpoint_numbers_are_never_truncated(tmp_path, key, value, needle):
    ckpt = tmp_path / "ckpt"
    save_checkpoint(random_model(preset("ps3-tiny")), ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config[key] = value
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(Ps3EdgeError, match=needle.replace("[", r"\[").replace("(", r"\(")):
        load_checkpoint(ckpt)


def test_integer_weights_are_refused_not_cast(tmp_path):
    ckpt = tmp_path / "ckpt"
    save_checkpoint(random_model(preset("ps3-tiny")), ckpt)
    from safetensors.torch import load_file
    tensors = load_file(ckpt / "model.safetensors")
    key = "vision_model.trunk.blocks.1.attn.proj.weight"
    tensors[key] = (tensors[key] * 100).to(torch.int16)
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(Ps3EdgeError, match=r"integer tensors .*blocks.1.attn.proj.weight \(int16\)"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("variable, value", [
    ("NUM_LOOK_CLOSE", "2_0"), ("NUM_LOOK_CLOSE", "\u0662"),             # Arabic-Indic digit two
    ("NUM_TOKEN_LOOK_CLOSE", "1_024"), ("NUM_TOKEN_LOOK_CLOSE", "\uff15\uff11\uff12"),   # full-width 512
    ("SELECT_NUM_EACH_SCALE", "5_12+2048"),
])
def test_environment_numbers_are_ascii_whole_numbers(variable, value):
    with pytest.raises(Ps3EdgeError, match=variable):
        settings_from_env(env={variable: value})


def test_ascii_whole_numbers_still_parse():
    s = settings_from_env(env={"NUM_LOOK_CLOSE": " 3 ", "SELECT_NUM_EACH_SCALE": "512+2048"})
    assert s.num_look_close == 3 and s.select_num_each_scale == (512, 2048)
