"""Peak memory per stage (runtime/memory.py): the stage mark resets and reads the process's peak
resident set, `ps3edge run --json` and `ps3edge.load(..., measure_memory=True)` report it per
stage, and a library call leaves the process's peak mark alone unless asked."""

from __future__ import annotations

import json

import numpy as np
import pytest

import ps3edge
from conftest import cli, random_image
from ps3edge.runtime.memory import StageMemory, peak_rss_bytes, reset_peak_rss

MIB = 2 ** 20
STAGES = {"preprocess", "lowres", "selector", "planning", "highres", "assemble"}


@pytest.fixture(scope="module")
def art(artifacts):
    return artifacts("ps3-tiny")


def test_a_stage_that_allocates_has_the_higher_peak_and_the_next_stage_starts_afresh():
    if not reset_peak_rss():
        pytest.skip("this kernel does not let a process reset its peak RSS (/proc/self/clear_refs)")
    memory = StageMemory()
    with memory.measure("small"):
        np.ones(MIB // 8).sum()
    with memory.measure("big"):
        block = np.ones(300 * MIB // 8)             # 300 MiB, touched
        block.sum()
        del block
    with memory.measure("after"):
        np.ones(MIB // 8).sum()
    peaks = memory.mib()["host"]
    assert peaks["big"] >= peaks["small"] + 250
    assert peaks["after"] < peaks["big"] - 250      # the mark was reset when "after" began
    assert "cuda" not in memory.mib()


def test_run_json_on_stdout_is_the_only_output_and_has_every_stage(art, tmp_path):
    image = tmp_path / "a.png"
    random_image(seed=3).save(image)
    proc = cli("run", art, "--image", image, "--image", image, "--out", tmp_path / "f.safetensors",
               "--num-look-close", "2", "--json", "-")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)                # nothing else on stdout
    assert record["backend"] == "onnxruntime" and record["precision"] == "fp32"
    assert [r["image"] for r in record["images"]] == [str(image)] * 2
    for r in record["images"]:
        assert r["num_steps"] == 2 and sum(r["tokens_each_scale"].values()) == r["features_shape"][1]
        assert set(r["timings_ms"]) == STAGES
        host = r["peak_memory_mib"]["host"]
        assert set(host) == STAGES and min(host.values()) > 50      # the process with its model loaded
        assert "cuda" not in r["peak_memory_mib"]


def test_run_json_to_a_file_and_its_refusals(art, tmp_path):
    image = tmp_path / "a.png"
    random_image(seed=4).save(image)
    out = tmp_path / "f.safetensors"
    proc = cli("run", art, "--image", image, "--out", out, "--json", tmp_path / "run.json")
    assert proc.returncode == 0, proc.stderr
    assert set(json.loads((tmp_path / "run.json").read_text())["images"][0]["peak_memory_mib"]["host"]) == STAGES
    for bad, needle in ((tmp_path / "run.txt", "give a .json name"), (tmp_path, "give a .json name")):
        proc = cli("run", art, "--image", image, "--out", tmp_path / "g.safetensors", "--json", bad)
        assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr
        assert not (tmp_path / "g.safetensors").exists()
    (tmp_path / "dir.json").mkdir()
    proc = cli("run", art, "--image", image, "--out", tmp_path / "g.safetensors", "--json", tmp_path / "dir.json")
    assert proc.returncode == 2 and "is a directory" in proc.stderr


def test_the_api_measures_only_when_asked(art):
    frame = np.asarray(random_image(seed=5))
    with ps3edge.load(art) as encoder:
        assert encoder.run(frame).memory_mib == {}
    if not reset_peak_rss():
        pytest.skip("this kernel does not let a process reset its peak RSS (/proc/self/clear_refs)")
    block = np.ones(400 * MIB // 8)
    block.sum()
    del block
    before = peak_rss_bytes()
    with ps3edge.load(art) as encoder:
        quiet = encoder.run(frame)
    assert peak_rss_bytes() >= before                # the caller's peak mark was not reset
    assert quiet.memory_mib == {}
    with ps3edge.load(art, measure_memory=True) as encoder:
        results = encoder.run_batch([frame, frame])
    assert results[0].memory_mib == results[1].memory_mib
    assert set(results[0].memory_mib["host"]) == STAGES
