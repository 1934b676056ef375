"""`ps3edge stream --rerun` and `--rerun-connect`, read back with Rerun's own reader
(rerun.chunk.RrdReader): the entity paths, one row per processed frame on the `frame` and `pts`
timelines, selection maps equal to the frames' results (the --out shards, and the Python face's
records), latency and steps equal to the JSON lines, the frame downscaled; a file put in place
whole on stop (SIGTERM too) and none at all after SIGKILL; a real `rerun` server as the viewer;
and the refusals (one error line, exit 2, nothing written), the missing package among them."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import clean_env, cli, cli_command
from stream_support import free_port, make_folder, read, wait_for

HAVE_RERUN = importlib.util.find_spec("rerun") is not None
needs_rerun = pytest.mark.skipif(not HAVE_RERUN, reason="rerun-sdk (the rerun extra: pip install -e '.[rerun]') "
                                 "writes and reads the recordings")
STEPS = ("--num-look-close", "1")


def read_recording(path: Path, whole: bool = True) -> dict[str, list[dict]]:
    """entity path -> its rows (static ones under 'static:<path>'), read with Rerun's reader.
    whole: the file must have its footer (a file Rerun finished writing): no warning, store() opens."""
    from rerun.chunk import RrdReader

    with warnings.catch_warnings():
        # a footerless file (cut short, or a server's, which saves as it receives) warns as it opens
        warnings.simplefilter("error" if whole else "ignore")
        reader = RrdReader(path)
        if whole:
            reader.store()                            # needs the footer's manifest
        rows: dict[str, list[dict]] = {}
        for chunk in reader.stream():
            key = ("static:" if chunk.is_static else "") + chunk.entity_path
            rows.setdefault(key, []).extend(chunk.to_record_batch().to_pylist())
    for key in rows:
        if not key.startswith("static:") and key != "/__properties":
            rows[key].sort(key=lambda r: r["frame"])
    return rows


def selection(row: dict) -> np.ndarray:
    fmt = row["SegmentationImage:format"][0]
    return np.asarray(row["SegmentationImage:buffer"][0], np.uint8).reshape(fmt["height"], fmt["width"])


def scalar(row: dict) -> float:
    return row["Scalars:scalars"][0]


def jpeg_size(row: dict) -> tuple[int, int]:
    assert row["EncodedImage:media_type"][0] == "image/jpeg"
    return Image.open(io.BytesIO(bytes(row["EncodedImage:blob"][0]))).size


def leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


@needs_rerun
def test_a_recording_holds_each_frame_its_selection_maps_latency_and_steps(artifacts, tmp_path):
    from ps3edge.extract.shards import read_header, read_items

    stills = make_folder(tmp_path / "stills")
    result = cli("stream", artifacts("ps3-tiny"), "--source", f"front={stills}", "--fps", "4", "--loop", *STEPS,
                 "--max-frames", "3", "--jsonl", tmp_path / "r.jsonl", "--out", tmp_path / "feats",
                 "--rerun", tmp_path / "rec.rrd")
    assert result.returncode == 0, result.stderr
    assert "stream: 3 frames logged to Rerun" in result.stderr
    assert leftovers(tmp_path, {"stills", "r.jsonl", "feats"}) == ["rec.rrd"]          # no temporary left
    recs = read(tmp_path / "r.jsonl")
    assert len(recs) == 3
    rows = read_recording(tmp_path / "rec.rrd")
    shard = next((tmp_path / "feats" / "front").glob("shard-*.safetensors"))
    items = read_items(shard)
    by_frame = {r["frame"]: items[r["index"]] for r in read_header(shard)["items"]}
    scales = sorted(int(k.rsplit("_", 1)[1]) for k in next(iter(by_frame.values())) if k.startswith("selection_map_"))
    assert len(scales) == 2
    expected = {"/front/image", "/front/latency_ms", "/front/steps", *(f"/front/selection/{s}" for s in scales)}
    assert {k for k in rows if not k.startswith(("static:", "/__"))} == expected
    assert {f"static:/front/selection/{s}" for s in scales} <= set(rows)               # their colours
    frames = [r["frame"] for r in recs]
    for entity in expected:
        assert [row["frame"] for row in rows[entity]] == frames, entity                 # one row per frame
        assert [row["pts"].total_seconds() for row in rows[entity]] == pytest.approx([r["pts"] for r in recs])
    assert [scalar(row) for row in rows["/front/latency_ms"]] == pytest.approx([r["latency_ms"] for r in recs], abs=1e-3)
    assert [scalar(row) for row in rows["/front/steps"]] == [r["steps"] for r in recs] == [1, 1, 1]
    assert all(jpeg_size(row) == (120, 90) for row in rows["/front/image"])           # small frames: not downscaled
    for s in scales:
        for row in rows[f"/front/selection/{s}"]:
            grid = selection(row)
            assert np.array_equal(grid, by_frame[row["frame"]][f"selection_map_{s}"])
            assert grid.any()
            assert row["Transform3D:scale"][0] == pytest.approx([120 / grid.shape[1], 90 / grid.shape[0], 1.0])


@needs_rerun
def test_the_python_face_logs_records_and_large_frames_are_downscaled(artifacts, tmp_path):
    import ps3edge
    from ps3edge import defaults
    from ps3edge.streaming.rerun_sink import RerunSink

    big = make_folder(tmp_path / "big", count=2, width=1000, height=700)
    sink = RerunSink(tmp_path / "api.rrd")
    seen = {}
    try:
        with ps3edge.stream(artifacts("ps3-tiny"), [str(big)], settings=ps3edge.LookCloseSettings(num_look_close=1),
                            max_frames=2) as live:
            for record in live:
                sink.add(record)
                seen[record.frame] = record.result.selection_maps
    finally:
        sink.close()
    assert sink.warnings == [] and leftovers(tmp_path, {"big"}) == ["api.rrd"]
    rows = read_recording(tmp_path / "api.rrd")
    side = defaults.STREAM_RERUN_MAX_SIDE
    small = (side, round(700 * side / 1000))
    assert [jpeg_size(row) for row in rows["/cam0/image"]] == [small] * len(seen)
    for scale in next(iter(seen.values())):
        logged = rows[f"/cam0/selection/{scale}"]
        assert [row["frame"] for row in logged] == sorted(seen)
        for row in logged:
            grid = selection(row)
            assert np.array_equal(grid, seen[row["frame"]][scale])
            assert row["Transform3D:scale"][0] == pytest.approx([small[0] / grid.shape[1], small[1] / grid.shape[0], 1.0])


def test_bad_rerun_outputs_are_one_error_line_and_leave_nothing_behind(artifacts, tmp_path, monkeypatch):
    stills = make_folder(tmp_path / "stills")
    (tmp_path / "adir").mkdir()
    base = ("stream", artifacts("ps3-tiny"), "--source", stills, *STEPS, "--jsonl", tmp_path / "r.jsonl")
    cases = [(("--rerun", tmp_path / "nowhere" / "x.rrd"), "does not exist"),
             (("--rerun", tmp_path / "adir"), "is a directory"),
             (("--rerun", tmp_path / "x.txt"), "ending in .rrd"),
             (("--rerun-connect", "http://127.0.0.1:9876/proxy"), "give a viewer's URL"),
             (("--rerun-connect", "rerun+http://127.0.0.1/proxy"), "give a viewer's URL"),
             (("--rerun-connect", f"rerun+http://127.0.0.1:{free_port()}/proxy"), "nothing accepts a connection")]
    if HAVE_RERUN:
        for flags, why in cases:
            started = time.monotonic()
            result = cli(*base, *flags)
            lines = result.stderr.strip().splitlines()
            assert result.returncode == 2 and len(lines) == 1, (flags, result.stderr)
            assert lines[0].startswith(f"error: {flags[0]} ") and why in lines[0], lines[0]
            assert time.monotonic() - started < 10                     # refused before the model loads
            assert leftovers(tmp_path, {"stills", "adir"}) == [] and not any((tmp_path / "adir").iterdir())
    # without the package: one line naming the extra, whichever flag asked for it
    monkeypatch.setitem(sys.modules, "rerun", None)                    # `import rerun` raises ImportError
    for flags in (("--rerun", tmp_path / "x.rrd"), ("--rerun-connect", "rerun+http://127.0.0.1:9876/proxy")):
        result = cli(*base, *flags)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines() == ["error: --rerun and --rerun-connect need the Rerun SDK: "
                                                      "pip install 'ps3edge[rerun]'"]
        assert leftovers(tmp_path, {"stills", "adir"}) == []


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@needs_rerun
def test_rerun_connect_streams_to_a_running_rerun_server(artifacts, tmp_path):
    port = free_port()
    rerun_cli = Path(sys.executable).with_name("rerun")
    if not rerun_cli.is_file():
        pytest.skip(f"no rerun command beside {sys.executable} (it comes with rerun-sdk)")
    # Rerun's own server, on loopback, saving what SDKs send it (no viewer window); its analytics
    # are turned off in a config folder of its own
    env = clean_env(XDG_CONFIG_HOME=str(tmp_path / "config"), XDG_DATA_HOME=str(tmp_path / "data"))
    subprocess.run([str(rerun_cli), "analytics", "disable"], env=env, capture_output=True, timeout=30)
    # a session of its own: the `rerun` script starts the real binary as its child, and both must stop
    server = subprocess.Popen([str(rerun_cli), "--bind", "127.0.0.1", "--port", str(port), "--save",
                               str(tmp_path / "server.rrd")], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: listening(port), 30)
        stills = make_folder(tmp_path / "stills")
        result = cli("stream", artifacts("ps3-tiny"), "--source", stills, "--fps", "4", "--loop", *STEPS,
                     "--max-frames", "2", "--jsonl", tmp_path / "r.jsonl",
                     "--rerun-connect", f"rerun+http://127.0.0.1:{port}/proxy")
        assert result.returncode == 0, result.stderr
        assert "warning" not in result.stderr
        # the server writes as it receives: the stream flushed before it exited
        wait_for(lambda: len(read_recording(tmp_path / "server.rrd", whole=False).get("/cam0/steps", [])) == 2, 20)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=20)
    rows = read_recording(tmp_path / "server.rrd", whole=False)
    assert [row["frame"] for row in rows["/cam0/latency_ms"]] == [r["frame"] for r in read(tmp_path / "r.jsonl")]


@needs_rerun
@pytest.mark.slow
def test_a_killed_run_leaves_no_recording_and_sigterm_a_whole_one(artifacts, tmp_path):
    stills = make_folder(tmp_path / "stills")

    def start(name: str) -> subprocess.Popen:
        return subprocess.Popen([*cli_command(), "stream", str(artifacts("ps3-tiny")), "--source", str(stills),
                                 "--fps", "4", "--loop", *STEPS, "--jsonl", str(tmp_path / f"{name}.jsonl"),
                                 "--rerun", str(tmp_path / f"{name}.rrd")],
                                env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    killed = start("killed")
    try:
        wait_for(lambda: len(read(tmp_path / "killed.jsonl")) >= 2, 90)
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
    finally:
        if killed.poll() is None:
            killed.kill()
    assert not (tmp_path / "killed.rrd").exists()                     # nothing where the recording goes
    temps = [p.name for p in tmp_path.iterdir() if p.name.startswith(".killed.rrd.ps3edge-")]
    assert len(temps) == 1                                             # only the temporary, named as ps3edge's are

    stopped = start("stopped")
    try:
        wait_for(lambda: len(read(tmp_path / "stopped.jsonl")) >= 2, 90)
        stopped.send_signal(signal.SIGTERM)
        _, stderr = stopped.communicate(timeout=60)
    finally:
        if stopped.poll() is None:
            stopped.kill()
    assert stopped.returncode == 143, stderr
    rows = read_recording(tmp_path / "stopped.rrd")                   # whole: it has its footer
    logged, lines = [row["frame"] for row in rows["/cam0/steps"]], [r["frame"] for r in read(tmp_path / "stopped.jsonl")]
    # every frame logged before the signal; the signal may land between the JSON line and the Rerun log
    assert logged and logged == lines[:len(logged)] and len(logged) >= len(lines) - 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".stopped.rrd")]
