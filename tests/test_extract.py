"""`ps3edge extract`: shards equal to `ps3edge run` item for item, one entry per input, the errors
file and exit code, resume after SIGKILL, refusals, and the Ray engine against the local one.

The default run extracts a small folder (images, a corrupt file, a generated video sampled with
--fps) once; the 40-image dataset, the SIGKILL and the Ray cases are marked slow."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import clean_env, cli, cli_command, cli_process, random_image
from ps3edge.extract.shards import read_header, read_items

av = pytest.importorskip("av", reason="PyAV (the extract extra) makes and reads the test videos")

FLAGS = ("--num-look-close", "1")              # one step: the cheapest look-close, the same code path
TOL = 1e-5


def make_video(path: Path, frames: int = 10, rate: int = 5, size=(64, 48)) -> Path:
    """A short mpeg4 video of moving stripes (frames / rate seconds)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(frames):
            rgb = np.asarray(random_image(size[0], size[1], seed=100 + i))
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def video_frames(path: Path) -> list:
    """Every frame of a video as a PIL image, in presentation order (decoded here, apart from ps3edge)."""
    with av.open(str(path)) as container:
        frames = sorted(((f.pts, f.to_image()) for f in container.decode(video=0)), key=lambda t: t[0])
    return [image for _, image in frames]


def make_dataset(root: Path, images: int, video_frames_count: int = 10) -> Path:
    root.mkdir(parents=True)
    (root / "nested").mkdir()
    for i in range(images):
        where = root / "nested" if i % 3 == 0 else root
        random_image(96 + 8 * (i % 4), 64 + 4 * (i % 3), seed=i).save(where / f"img{i:03d}.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (root / "notes.json").write_text("{}")                       # neither image nor video: not an input
    make_video(root / "drive.mp4", frames=video_frames_count)
    return root


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def shard_digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("shard-*.safetensors"))}


def all_items(out: Path) -> dict[int, dict]:
    items: dict[int, dict] = {}
    for path in sorted(out.glob("shard-*.safetensors")):
        for index, tensors in read_items(path).items():
            assert index not in items, f"item {index} is in two shards"
            items[index] = tensors
    return items


def one_line_error(result, *needles, code: int = 2) -> str:
    assert result.returncode == code, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stdout + result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


# --- the default run: a small folder, extracted once --------------------------------------------
@pytest.fixture(scope="module")
def small(tmp_path_factory, artifacts):
    """A folder of 3 images (one nested), a corrupt file and a 2 s video sampled at 1 fps, extracted
    into shards of 2 items: (artifact, folder, out, the command's result)."""
    tiny = artifacts("ps3-tiny")
    root = make_dataset(tmp_path_factory.mktemp("small") / "data", images=3)
    out = root.parent / "features"
    result = cli("extract", tiny, "--input", root, "--out", out, "--fps", "1", "--shard-size", "2", *FLAGS)
    return tiny, root, out, result


def test_extract_equals_run_item_for_item(small):
    from ps3edge.runtime.lookclose import Pipeline
    from ps3edge.runtime.planning import settings_from_env

    tiny, root, out, result = small
    # 3 images + 2 sampled frames extracted; the corrupt file is the one failure: exit 1, one error line
    assert result.returncode == 1, result.stderr
    assert "extracted 5 of 6 inputs into 3 shards" in result.stdout
    one_line_error(result, "1 of 6 inputs could not be read", "errors.jsonl", code=1)
    index = read_jsonl(out / "index.jsonl")
    assert [e["index"] for e in index] == sorted({e["index"] for e in index}) and len(index) == 5
    items = all_items(out)
    assert sorted(items) == [e["index"] for e in index]
    frames = video_frames(root / "drive.mp4")
    with Pipeline(tiny) as pipeline:                     # what `ps3edge run` runs (and writes, by name)
        for entry in index:
            if entry["frame"] is None:
                image = Path(entry["source"])
                assert (entry["width"], entry["height"]) == Image.open(image).size
            else:                                          # 5 fps: 1 fps samples frames 0 and 5
                assert entry["source"].endswith("drive.mp4") and entry["frame"] in (0, 5)
                assert entry["timestamp"] == pytest.approx(entry["frame"] / 5)
                assert (entry["width"], entry["height"]) == (64, 48)
                image = frames[entry["frame"]]
            assert_item_equals_run(items[entry["index"]], pipeline.run(image, settings_from_env({}, num_look_close="1")))


def assert_item_equals_run(got: dict, want) -> None:
    """A shard item against a look-close result: the tensors `ps3edge run` writes, batch axis dropped."""
    maps = {f"selection_map_{scale}": m for scale, m in zip(want.scales, want.plan.selection_maps)}
    assert set(got) == {"features", "prob", *maps}
    assert got["features"].shape == want.features.shape[1:] and got["features"].dtype == np.float32
    assert np.abs(got["features"] - want.features[0]).max() <= TOL
    assert np.abs(got["prob"] - want.prob).max() <= TOL
    for name, m in maps.items():
        assert np.array_equal(got[name], m), name


def test_errors_file_and_run_record(small):
    tiny, root, out, result = small
    errors = read_jsonl(out / "errors.jsonl")
    assert len(errors) == 1
    assert errors[0]["source"] == str(root / "corrupt.png") and "not an image file" in errors[0]["reason"]
    record = json.loads((out / "run.json").read_text())
    from ps3edge import __version__
    from ps3edge.artifact.manifest import load_manifest
    assert record["ps3edge"] == __version__ and record["artifact_files"] == dict(load_manifest(tiny).files)
    assert record["settings"]["num_look_close"] == 1 and record["shard_size"] == 2 and record["fps"] == 1
    assert record["items"] == 6 and record["shards"] == 3
    header = read_header(out / "shard-00000.safetensors")
    assert header["shard"] == 0 and [e["index"] for e in header["errors"]] == [0]    # corrupt.png sorts first


def test_rerun_continues_and_is_identical(small, tmp_path):
    """A shard lost and another torn (a temporary a killed writer left): the rerun writes exactly
    those, equal to the first run's, removes the temporary, and keeps one entry per input."""
    tiny, root, out, _ = small
    copy = tmp_path / "features"
    shutil.copytree(out, copy)
    before = shard_digests(out)
    (copy / "shard-00000.safetensors").unlink()
    torn = copy / ".shard-00002.safetensors.ps3edge-tmp-x1y2z3.tmp"
    torn.write_bytes(b"half a shard")
    (copy / "index.jsonl").unlink()
    result = cli("extract", tiny, "--input", root, "--out", copy, "--fps", "1", "--shard-size", "2", *FLAGS)
    assert result.returncode == 1 and "(2 finished before)" in result.stdout, result.stderr
    assert shard_digests(copy) == before
    assert not torn.exists()
    assert (copy / "index.jsonl").read_text() == (out / "index.jsonl").read_text()
    assert (copy / "errors.jsonl").read_text() == (out / "errors.jsonl").read_text()


@pytest.mark.parametrize("flags, needle", [
    (("--shard-size", "3", *FLAGS), "another shard_size (2, here 3)"),
    (("--shard-size", "2", "--num-look-close", "2"), "another look-close num_look_close (1, here 2)"),
    (("--shard-size", "2", "--dtype", "fp16", *FLAGS), "another dtype"),
    (("--shard-size", "2", "--fps", "2", *FLAGS), "another fps"),
])
def test_other_settings_into_the_same_out_are_refused(small, flags, needle):
    tiny, root, out, _ = small
    before = shard_digests(out)
    fps = () if "--fps" in flags else ("--fps", "1")
    one_line_error(cli("extract", tiny, "--input", root, "--out", out, *fps, *flags), needle)
    assert shard_digests(out) == before


def test_other_inputs_into_the_same_out_are_refused(small, tmp_path):
    tiny, root, out, _ = small
    more = tmp_path / "more"
    shutil.copytree(root, more)
    random_image(64, 64, seed=99).save(more / "extra.png")
    one_line_error(cli("extract", tiny, "--input", more, "--out", out, "--fps", "1", "--shard-size", "2", *FLAGS),
                   "another number of items (6, here 7)")


def test_bad_arguments_are_one_line(small, tmp_path, monkeypatch):
    tiny, root, out, _ = small
    new = tmp_path / "new"
    base = (tiny, "--out", new, *FLAGS)
    one_line_error(cli("extract", *base, "--input", tmp_path / "missing"), "does not exist")
    (tmp_path / "empty").mkdir()
    one_line_error(cli("extract", *base, "--input", tmp_path / "empty"), "no images or videos found")
    one_line_error(cli("extract", *base, "--input", root, "--dtype", "bf16"), "--dtype takes fp32 or fp16")
    one_line_error(cli("extract", *base, "--input", root, "--fps", "0"), "--fps must be above 0")
    one_line_error(cli("extract", *base, "--input", root, "--actors", "2"), "--actors", "--ray")
    one_line_error(cli("extract", *base, "--input", root, "--batch-size", "64"), "over this artifact's bound",
                   "--max-batch 64")
    (tmp_path / "file").write_text("x")
    one_line_error(cli("extract", tiny, "--input", root, "--out", tmp_path / "file", *FLAGS), "is a file")
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "keep.txt").write_text("x")
    one_line_error(cli("extract", tiny, "--input", root, "--out", tmp_path / "theirs", *FLAGS), "not empty")
    assert not new.exists() or not any(new.iterdir())
    monkeypatch.setitem(sys.modules, "ray", None)                 # as if Ray were not installed
    one_line_error(cli("extract", *base, "--input", root, "--ray", "local"), "pip install 'ps3edge[ray]'")
    monkeypatch.setitem(sys.modules, "av", None)                  # as if PyAV were not installed
    one_line_error(cli("extract", *base, "--input", root), "pip install 'ps3edge[extract]'")


def test_a_list_of_paths_and_fp16(small, tmp_path):
    """A .txt list (relative to its folder, comments skipped; a missing entry is a failure) and --dtype fp16."""
    tiny, root, out, _ = small
    listing = root / "list.txt"
    listing.write_text("# one image and a missing one\n\nnested/img000.png\nmissing.png\n")
    try:
        result = cli("extract", tiny, "--input", listing, "--out", tmp_path / "f16", "--dtype", "fp16", *FLAGS)
    finally:
        listing.unlink()
    assert result.returncode == 1, result.stderr
    index = read_jsonl(tmp_path / "f16" / "index.jsonl")
    assert [Path(e["source"]).name for e in index] == ["img000.png"]
    errors = read_jsonl(tmp_path / "f16" / "errors.jsonl")
    assert [Path(e["source"]).name for e in errors] == ["missing.png"] and "not found" in errors[0]["reason"]
    items = all_items(tmp_path / "f16")
    reference = all_items(out)
    by_source = {e["source"]: e["index"] for e in read_jsonl(out / "index.jsonl")}
    for entry in index:
        got = items[entry["index"]]["features"]
        assert got.dtype == np.float16
        want = reference[by_source[entry["source"]]]["features"]
        assert np.abs(got.astype(np.float32) - want).max() <= 1e-2 * max(1.0, np.abs(want).max())


# --- slow: 40 images, SIGKILL and resume, Ray ---------------------------------------------------
FORTY_FLAGS = ("--fps", "2", "--shard-size", "4", "--batch-size", "2", *FLAGS)


@pytest.fixture(scope="module")
def forty(tmp_path_factory, artifacts):
    """40 images, a corrupt file and a 2 s video at 2 fps (4 frames), extracted without interruption."""
    tiny = artifacts("ps3-tiny")
    root = make_dataset(tmp_path_factory.mktemp("forty") / "data", images=40)
    out = root.parent / "features"
    result = cli("extract", tiny, "--input", root, "--out", out, *FORTY_FLAGS)
    assert result.returncode == 1, result.stderr
    return tiny, root, out


@pytest.mark.slow
def test_forty_images_equal_run(forty, tmp_path):
    from safetensors.numpy import load_file

    from ps3edge.runtime.lookclose import Pipeline
    from ps3edge.runtime.planning import settings_from_env

    tiny, root, out = forty
    index = read_jsonl(out / "index.jsonl")
    assert len(index) == 44 and len({e["index"] for e in index}) == 44
    items = all_items(out)
    frames = video_frames(root / "drive.mp4")
    settings = settings_from_env({}, num_look_close="1")
    with Pipeline(tiny) as pipeline:
        for entry in index:
            image = Path(entry["source"]) if entry["frame"] is None else frames[entry["frame"]]
            assert_item_equals_run(items[entry["index"]], pipeline.run(image, settings))
    # and two of them through `ps3edge run` itself (a frame saved as PNG keeps its decoded pixels)
    frame = next(e for e in index if e["frame"] is not None)
    still = next(e for e in index if e["frame"] is None)
    frames[frame["frame"]].save(tmp_path / "frame.png")
    for entry, image in ((still, Path(still["source"])), (frame, tmp_path / "frame.png")):
        written = tmp_path / f"run{entry['index']}.safetensors"
        assert cli("run", tiny, "--image", image, "--out", written, *FLAGS).returncode == 0
        want, got = load_file(str(written)), items[entry["index"]]
        assert set(got) == set(want) and np.abs(got["features"] - want["features"][0]).max() <= TOL
        assert all(np.abs(got[name] - want[name]).max() <= TOL for name in want if name != "features")


@pytest.mark.slow
def test_sigkill_halfway_then_rerun_gives_one_entry_each(forty, tmp_path):
    tiny, root, out = forty
    resumed = tmp_path / "features"
    process = subprocess.Popen(cli_command() + ["extract", str(tiny), "--input", str(root), "--out", str(resumed),
                                          *FORTY_FLAGS], env=clean_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while len(list(resumed.glob("shard-*.safetensors"))) < 5 and process.poll() is None:
            assert time.monotonic() < deadline, "the first run wrote no 5 shards in 10 minutes"
            time.sleep(0.2)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed halfway"
    written = len(list(resumed.glob("shard-*.safetensors")))
    assert 5 <= written < 12 and not (resumed / "index.jsonl").exists()
    result = cli_process("extract", tiny, "--input", root, "--out", resumed, *FORTY_FLAGS, timeout=900)
    assert result.returncode == 1, result.stderr
    assert f"({written} finished before)" in result.stdout
    index = read_jsonl(resumed / "index.jsonl")
    assert len(index) == 44 and len({e["index"] for e in index}) == 44
    assert (resumed / "index.jsonl").read_text() == (out / "index.jsonl").read_text()
    assert (resumed / "errors.jsonl").read_text() == (out / "errors.jsonl").read_text()
    assert shard_digests(resumed) == shard_digests(out)
    assert not [p for p in resumed.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_another_artifact_into_the_same_out_is_refused(forty, artifacts):
    tiny, root, out = forty
    one_line_error(cli("extract", artifacts("ps3-tiny-4k"), "--input", root, "--out", out, *FORTY_FLAGS),
                   "another artifact")


@pytest.mark.slow
def test_ray_local_equals_the_local_engine(forty, tmp_path):
    ray = pytest.importorskip("ray", reason="Ray Data (the ray extra) runs this engine")
    pytest.importorskip("ray.data", reason="Ray Data (the ray extra) runs this engine")
    tiny, root, out = forty
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = cli("extract", tiny, "--input", root, "--out", tmp_path / "ray", *FORTY_FLAGS,
                     "--ray", "local", "--actors", "2")
    finally:
        if started:
            ray.shutdown()
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert shard_digests(tmp_path / "ray") == shard_digests(out)
    assert (tmp_path / "ray" / "index.jsonl").read_text() == (out / "index.jsonl").read_text()
    assert (tmp_path / "ray" / "errors.jsonl").read_text() == (out / "errors.jsonl").read_text()
