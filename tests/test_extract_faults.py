"""`ps3edge extract` at its edges, through the real command line: every refusal leaves --out as it
found it (absent stays absent, a directory to resume unchanged byte for byte), a non-finite
--fps is refused from Python too, a video cut short is noted (errors.jsonl, a warning, exit 1)
with its frames read kept, path lists with a byte-order mark or CRLF line ends, file names that
are not UTF-8 kept losslessly in index.jsonl and recognised on resume, and (slow) a healthy
`--ray local` run that prints only the job's own bar and summary."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import cli, cli_process, random_image
from test_extract import FLAGS, make_video, one_line_error, read_jsonl

av = pytest.importorskip("av", reason="PyAV (the extract extra) makes and reads the test videos")


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` (hidden ones included) -> its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def folder(tmp_path_factory, artifacts):
    """(artifact, a folder of 3 images, a finished extract of it in shards of 2, a wrong-width
    prompt embedding)."""
    tiny = artifacts("ps3-tiny")
    root = tmp_path_factory.mktemp("faults")
    images = root / "images"
    images.mkdir()
    for i in range(3):
        random_image(64 + 8 * i, 48, seed=i).save(images / f"img{i}.png")
    done = root / "done"
    result = cli("extract", tiny, "--input", images, "--out", done, "--shard-size", "2", *FLAGS)
    assert result.returncode == 0, result.stderr
    bad_prompt = root / "prompt3.npy"
    np.save(bad_prompt, np.ones(3, np.float32))
    return tiny, images, done, bad_prompt


# --- refusals: nothing created, nothing changed -------------------------------------------------
REFUSALS = [
    (("--num-look-close", "99"), "NUM_LOOK_CLOSE"),
    (("--select-num-each-scale", "abc"), "SELECT_NUM_EACH_SCALE"),
    (("--batch-size", "64"), "over this artifact's bound"),
    (("--prompt-embedding", "PROMPT"), "prompt embedding must hold"),
    (("--precision", "int8"), "no int8 stages"),
    (("--precision", "fp16"), "no fp16 stages"),
    (("--backend", "tensorrt"), ""),                 # no engines built (or no TensorRT here): refused either way
    (("--backend", "nope"), "unknown backend"),
    (("--layer", "50"), "layer 50"),
    (("--dtype", "bf16"), "--dtype takes"),
    (("--fps", "0"), "--fps must be above 0"),
    (("--fps", "inf"), "--fps"),
    (("--ray", "local", "--batch-size", "64"), "over this artifact's bound"),    # refused before Ray starts
    (("--ray", "local", "--num-look-close", "99"), "NUM_LOOK_CLOSE"),
]


def flags_with(flags: tuple, bad_prompt: Path) -> list:
    return [bad_prompt if f == "PROMPT" else f for f in flags]


@pytest.mark.parametrize("flags, needle", REFUSALS, ids=[" ".join(f) for f, _ in REFUSALS])
def test_a_refusal_creates_no_out(folder, tmp_path, flags, needle):
    tiny, images, _, bad_prompt = folder
    out = tmp_path / "new" / "features"              # its parent is missing too: nothing may make it
    one_line_error(cli("extract", tiny, "--input", images, "--out", out, *FLAGS, *flags_with(flags, bad_prompt)),
                   needle)
    assert not (tmp_path / "new").exists()


RESUME_REFUSALS = [
    (("--num-look-close", "99"), "NUM_LOOK_CLOSE"),
    (("--batch-size", "64"), "over this artifact's bound"),
    (("--prompt-embedding", "PROMPT"), "prompt embedding"),
    (("--precision", "int8"), "int8"),
    (("--layer", "50"), "layer"),
    (("--shard-size", "3"), "another shard_size (2, here 3)"),
    (("--dtype", "fp16"), "another dtype"),
]


@pytest.mark.parametrize("flags, needle", RESUME_REFUSALS, ids=[" ".join(f) for f, _ in RESUME_REFUSALS])
def test_a_refused_resume_changes_nothing_in_out(folder, tmp_path, flags, needle):
    """A directory to continue, with a shard lost and a temporary a killed writer left: a refused
    rerun leaves both as they were (the cleanup belongs to a run that starts)."""
    tiny, images, done, bad_prompt = folder
    out = tmp_path / "features"
    shutil.copytree(done, out)
    (out / "shard-00001.safetensors").unlink()
    (out / ".shard-00001.safetensors.ps3edge-tmp-a1b2c3.tmp").write_bytes(b"half a shard")
    before = snapshot(out)
    shard_size = () if "--shard-size" in flags else ("--shard-size", "2")
    one_line_error(cli("extract", tiny, "--input", images, "--out", out, *shard_size, *FLAGS,
                       *flags_with(flags, bad_prompt)), needle)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features"]      # no lock file left beside it


@pytest.mark.parametrize("fps", [float("inf"), float("-inf"), float("nan"), 0.0, -2.0])
def test_a_non_finite_or_non_positive_fps_is_refused_from_python(folder, tmp_path, fps):
    from ps3edge.errors import Ps3EdgeError
    from ps3edge.extract.job import run_extract
    from ps3edge.extract.work import Work
    from ps3edge.runtime.planning import settings_from_env

    tiny, images, _, _ = folder
    work = Work(artifact_dir=tiny, backend="onnxruntime", precision="fp32", device=None,
                settings=settings_from_env({}, num_look_close="1"), prompt=None, layer=-1, dtype="fp32",
                exif_transpose=False, batch_size=None)
    with pytest.raises(Ps3EdgeError, match="--fps must be above 0 and finite"):
        run_extract(artifact_dir=tiny, inputs=[images], out=tmp_path / "out", work=work, fps=fps, shard_size=2)
    assert not (tmp_path / "out").exists()


# --- a video cut short --------------------------------------------------------------------------
def cut(path: Path, fraction: float) -> Path:
    """`path` with only its first `fraction` of bytes (as a copy interrupted part way leaves it)."""
    data = path.read_bytes()
    short = path.with_name(f"short-{path.name}")
    short.write_bytes(data[: int(len(data) * fraction)])
    return short


@pytest.mark.parametrize("suffix, stated", [(".avi", 20), (".mkv", None)])
def test_a_video_cut_short_is_noted_and_its_frames_kept(folder, tmp_path, suffix, stated):
    """.avi states its frame count in its header, .mkv only its duration: either way the frames
    read are extracted, errors.jsonl says how many of how many, a warning line says so and the
    job exits 1 (errors.jsonl has entries); the rerun finds the same and changes nothing."""
    tiny = folder[0]
    video = cut(make_video(tmp_path / f"drive{suffix}", frames=20, rate=5), 0.6)
    out = tmp_path / "features"
    args = ("extract", tiny, "--input", video, "--out", out, "--shard-size", "4", *FLAGS)
    result = cli(*args)
    one_line_error(result, "1 video was cut short", "errors.jsonl", code=1)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "cut short" in warnings[0] and video.name in warnings[0], result.stderr
    index = read_jsonl(out / "index.jsonl")
    errors = read_jsonl(out / "errors.jsonl")
    assert len(errors) == 1, errors
    entry = errors[0]
    assert entry["source"] == str(video) and entry["index"] is None and entry["frame"] is None
    assert 1 <= entry["frames_read"] < 20 and entry["frames_expected"] == stated
    assert f"{entry['frames_read']} frames read" in entry["reason"]
    assert [e["frame"] for e in index] == list(range(entry["frames_read"]))      # every frame read is extracted
    assert f"extracted {len(index)} of {len(index)} inputs" in result.stdout
    before = snapshot(out)
    again = cli(*args)
    assert again.returncode == 1 and "finished before" in again.stdout, again.stderr
    assert snapshot(out) == before


@pytest.mark.parametrize("suffix", [".avi", ".mkv", ".mp4"])
def test_a_whole_video_is_not_noted(folder, tmp_path, suffix):
    tiny = folder[0]
    video = make_video(tmp_path / f"drive{suffix}", frames=12, rate=5)
    out = tmp_path / "features"
    result = cli("extract", tiny, "--input", video, "--out", out, "--fps", "2", *FLAGS)
    assert result.returncode == 0 and "warning" not in result.stderr, result.stderr
    assert (out / "errors.jsonl").read_text() == "" and len(read_jsonl(out / "index.jsonl")) == 5   # 0, .5, .., 2 s


def test_an_mp4_cut_short_is_an_unreadable_video(folder, tmp_path):
    """An .mp4 keeps its index at its end: cut short, no frame of it can be listed."""
    tiny = folder[0]
    video = cut(make_video(tmp_path / "drive.mp4", frames=20, rate=5), 0.6)
    random_image(64, 48, seed=5).save(tmp_path / "still.png")
    listing = tmp_path / "inputs.txt"
    listing.write_text(f"{video.name}\nstill.png\n")
    out = tmp_path / "features"
    result = cli("extract", tiny, "--input", listing, "--out", out, *FLAGS)
    one_line_error(result, "1 of 2 inputs could not be read", code=1)
    errors = read_jsonl(out / "errors.jsonl")
    assert [e["source"] for e in errors] == [str(video)] and "frames_read" not in errors[0]


# --- path lists ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bom, newline", [(True, "\n"), (True, "\r\n"), (False, "\r\n")],
                         ids=["bom-lf", "bom-crlf", "crlf"])
def test_a_list_with_a_bom_or_crlf_reads_every_path(folder, tmp_path, bom, newline):
    tiny, images, _, _ = folder
    lines = ["# the stills", "", str(images / "img2.png"), "  img0.png  ", "# img1.png is left out", ""]
    listing = tmp_path / "inputs.txt"
    shutil.copy(images / "img0.png", tmp_path / "img0.png")
    listing.write_bytes((b"\xef\xbb\xbf" if bom else b"") + newline.join(lines).encode())
    out = tmp_path / "features"
    result = cli("extract", tiny, "--input", listing, "--out", out, *FLAGS)
    assert result.returncode == 0, result.stderr
    assert [e["source"] for e in read_jsonl(out / "index.jsonl")] == sorted([str(tmp_path / "img0.png"),
                                                                           str(images / "img2.png")])
    assert (out / "errors.jsonl").read_text() == ""


# --- file names that are not UTF-8 --------------------------------------------------------------
def bytes_name(directory: Path, name: bytes) -> bytes:
    """The path of `directory`/`name` as bytes (skips where the file system refuses such names)."""
    path = os.fsencode(directory) + b"/" + name
    try:
        with open(path, "wb"):
            pass
    except OSError as e:
        pytest.skip(f"this file system takes no non-UTF-8 names ({e})")
    return path


def test_a_non_utf8_file_name_round_trips_and_resumes(folder, tmp_path):
    tiny, images, _, _ = folder
    data = tmp_path / "data"
    data.mkdir()
    weird = bytes_name(data, b"caf\xe9-\xff.png")                 # latin-1 bytes, not UTF-8
    with open(weird, "wb") as f:
        random_image(64, 48, seed=7).save(f, format="PNG")
    broken = bytes_name(data, b"\xfe-broken.png")
    with open(broken, "wb") as f:
        f.write(b"not a png")
    random_image(72, 48, seed=8).save(data / "plain.png")
    out = tmp_path / "features"
    args = ("extract", tiny, "--input", data, "--out", out, "--shard-size", "1", *FLAGS)
    result = cli(*args)
    one_line_error(result, "1 of 3 inputs could not be read", code=1)

    for name in ("index.jsonl", "errors.jsonl"):
        text = (out / name).read_bytes().decode("utf-8")        # strict: valid UTF-8 throughout
        assert not re.search(r"\\ud[89a-f]", text, re.IGNORECASE), f"{name} holds a lone surrogate: {text}"
    index = read_jsonl(out / "index.jsonl")
    by_bytes = {base64.b64decode(e["source_bytes"]): e for e in index if "source_bytes" in e}
    assert list(by_bytes) == [weird]
    assert by_bytes[weird]["source"] == str(data) + "/caf\\xe9-\\xff.png"
    assert [e for e in index if "source_bytes" not in e][0]["source"] == str(data / "plain.png")
    errors = read_jsonl(out / "errors.jsonl")
    assert [base64.b64decode(e["source_bytes"]) for e in errors] == [broken]
    assert "\\xfe-broken.png" in errors[0]["source"]

    from ps3edge.extract.sources import record_source
    assert os.fsencode(record_source(by_bytes[weird])) == weird

    # resume: the shard of the non-UTF-8 name is recognised as done, the lost one is redone
    before_index, before_errors = (out / "index.jsonl").read_text(), (out / "errors.jsonl").read_text()
    lost = by_bytes[weird]["shard"]
    kept = next(e["shard"] for e in index if "source_bytes" not in e)
    (out / kept).unlink()
    (out / "index.jsonl").unlink()
    again = cli(*args)
    assert again.returncode == 1 and "(2 finished before)" in again.stdout, again.stdout + again.stderr
    assert (out / lost).exists() and (out / kept).exists()
    assert (out / "index.jsonl").read_text() == before_index
    assert (out / "errors.jsonl").read_text() == before_errors

    # the same file through a list holding the name's own bytes
    listing = data / "inputs.txt"
    listing.write_bytes(b"\xef\xbb\xbf" + os.path.basename(weird) + b"\r\nplain.png\r\n")
    listed = cli("extract", tiny, "--input", listing, "--out", tmp_path / "listed", *FLAGS)
    assert listed.returncode == 0, listed.stderr
    sources = [base64.b64decode(e["source_bytes"]) if "source_bytes" in e else os.fsencode(e["source"])
               for e in read_jsonl(tmp_path / "listed" / "index.jsonl")]
    assert sorted(sources) == sorted([weird, os.fsencode(data / "plain.png")])


# --- Ray: quiet, and the job's own rate ---------------------------------------------------------
@pytest.mark.slow
def test_ray_prints_only_the_jobs_bar_and_summary(folder, tmp_path):
    """In a fresh process (Ray logs its actor-constructor line once per process): stderr holds the
    bar alone, whose rate is the summary's; a refusal the actors make (a layer that was not
    exported) is one line and creates no --out."""
    pytest.importorskip("ray.data", reason="Ray Data (the ray extra) runs this engine")
    tiny, images, done, _ = folder
    out = tmp_path / "ray"
    result = cli_process("extract", tiny, "--input", images, "--out", out, "--shard-size", "2", *FLAGS,
                         "--ray", "local", "--actors", "1", timeout=600)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("extract "), result.stderr
    bar = float(re.search(r"3/3 ([0-9.]+) items/s", lines[0]).group(1))
    summary = float(re.search(r", ([0-9.]+) items/s ->", result.stdout).group(1))
    assert abs(bar - summary) <= 0.1 * summary + 0.02, (lines[0], result.stdout)
    assert snapshot(out) == snapshot(done)                          # the local engine's files, byte for byte

    refused = cli_process("extract", tiny, "--input", images, "--out", tmp_path / "never", *FLAGS,
                          "--ray", "local", "--actors", "1", "--layer", "50", timeout=600)
    one_line_error(refused, "layer 50")
    assert [line for line in refused.stderr.splitlines() if line.strip()] == \
        [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    assert not (tmp_path / "never").exists()
