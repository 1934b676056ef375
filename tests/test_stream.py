"""`ps3edge stream` and `ps3edge.stream(...)` on real streams over loopback, each bounded in time:
a UDP MPEG-TS stream sent by another process (and that sender killed and restarted mid-run), video
files as fast as they decode and at their own rate, an image folder at --fps, a consumer slower
than the camera (frames dropped and counted, latency bounded), SIGTERM with --out (exit 143,
every shard whole), a processed frame against `ps3edge run` and Encoder.run on the same pixels,
and a source that cannot be opened (one error line, exit 2; --allow-missing runs the others)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import clean_env, cli, cli_command
from stream_support import by_source, free_udp_port, make_folder, read, records, summary_counts, wait_for

av = pytest.importorskip("av", reason="PyAV (the extract extra) decodes the streams")

STEPS = ("--num-look-close", "1")          # the shortest look-close pass: these tests time the stream, not PS3
WIDTH, HEIGHT, FPS = 128, 96, 15

# A camera in another process: `python -c SENDER URL FRAMES` encodes FRAMES frames of WIDTH x HEIGHT
# as MPEG-2 in MPEG-TS and sends them to URL at FPS frames a second, in real time.
SENDER = f"""
import sys, time
import av, numpy as np
url, count = sys.argv[1], int(sys.argv[2])
out = av.open(url, "w", format="mpegts")
stream = out.add_stream("mpeg2video", rate={FPS})
stream.width, stream.height, stream.pix_fmt = {WIDTH}, {HEIGHT}, "yuv420p"
stream.codec_context.gop_size = 5
start = time.monotonic()
for i in range(count):
    rgb = np.zeros(({HEIGHT}, {WIDTH}, 3), np.uint8)
    rgb[..., 0] = (i * 8) % 256
    rgb[:, (i * 4) % {WIDTH}, 1] = 255
    for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
        out.mux(packet)
    time.sleep(max(0.0, start + (i + 1) / {FPS} - time.monotonic()))
for packet in stream.encode():
    out.mux(packet)
out.close()
"""


def start_sender(port: int, frames: int = 100_000) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SENDER, f"udp://127.0.0.1:{port}?pkt_size=1316", str(frames)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


def make_video(path: Path, frames: int = 30, fps: int = FPS) -> Path:
    """An MPEG-4 file whose frame i differs from every other (a moving line, a changing red)."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for i in range(frames):
            rgb = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
            rgb[..., 0] = (i * 8) % 256
            rgb[:, (i * 4) % WIDTH, 1] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def test_a_udp_stream_from_another_process(artifacts):
    port = free_udp_port()
    sender = start_sender(port)
    try:
        result = cli("stream", artifacts("ps3-tiny"), "--source", f"udp://127.0.0.1:{port}", *STEPS,
                     "--max-frames", "3", "--jsonl", "-")
    finally:
        stop_process(sender)
    assert result.returncode == 0, result.stderr
    recs = records(result.stdout)
    assert len(recs) == 3 and {r["source"] for r in recs} == {"cam0"}
    frames = [r["frame"] for r in recs]
    assert frames == sorted(set(frames))                      # never out of order, never twice
    for r in recs:
        assert r["status"] == "computed" and r["steps"] == 1 and r["tokens"] > 729
        assert (r["width"], r["height"]) == (WIDTH, HEIGHT) and r["pts"] is not None
        assert r["result_time"] >= r["arrival"] and r["latency_ms"] > 0
    counts = summary_counts(result.stderr, "cam0")
    assert counts["processed"] == 3 and counts["in"] >= 3


def test_files_as_fast_as_they_decode_and_an_image_folder_at_fps(artifacts, tmp_path):
    video = make_video(tmp_path / "drive.mp4", frames=30)
    folder = make_folder(tmp_path / "stills", count=4)
    result = cli("stream", artifacts("ps3-tiny"), "--source", video, "--source", f"stills={folder}",
                 "--fps", "4", *STEPS, "--jsonl", tmp_path / "r.jsonl", "--duration", "60")
    assert result.returncode == 0, result.stderr            # both ended: the file at its end, the folder too
    recs = by_source(records((tmp_path / "r.jsonl").read_text()))
    assert set(recs) == {"cam0", "stills"}
    video_counts = summary_counts(result.stderr, "cam0")
    assert video_counts["in"] == 30                           # every frame decoded, most dropped
    assert video_counts["processed"] + video_counts["dropped"] >= 29
    assert video_counts["dropped"] > 0
    stills = recs["stills"]
    assert all(r["pts"] == pytest.approx(r["frame"] / 4) for r in stills)
    assert (stills[0]["width"], stills[0]["height"]) == (120, 90)
    assert summary_counts(result.stderr, "stills")["in"] == 4


def test_a_file_with_realtime_plays_at_its_own_rate(artifacts, tmp_path):
    video = make_video(tmp_path / "drive.mp4", frames=30)         # 2 s at 15 fps
    started = time.monotonic()
    result = cli("stream", artifacts("ps3-tiny"), "--source", video, "--realtime", *STEPS, "--jsonl", "-")
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started >= 1.9
    recs = records(result.stdout)
    assert len(recs) >= 2
    first, last = recs[0], recs[-1]
    # frames arrive as their timestamps say: the wall clock between two arrivals is their pts apart
    assert last["arrival"] - first["arrival"] == pytest.approx(last["pts"] - first["pts"], abs=0.35)
    assert summary_counts(result.stderr, "cam0")["in"] == 30


def test_a_sender_killed_and_restarted_reconnects_while_the_other_source_goes_on(artifacts, tmp_path):
    port = free_udp_port()
    folder = make_folder(tmp_path / "stills", count=3)
    sender = start_sender(port)
    proc = subprocess.Popen([*cli_command(), "stream", str(artifacts("ps3-tiny")), "--source", f"udp://127.0.0.1:{port}",
                             "--source", str(folder), "--fps", "3", "--loop", *STEPS, "--jsonl", str(tmp_path / "r.jsonl"),
                             "--duration", "25"], env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        jsonl = tmp_path / "r.jsonl"
        wait_for(lambda: "cam0" in by_source(read(jsonl)), 60)
        stop_process(sender)                                       # the camera dies mid-stream
        killed = time.time()
        time.sleep(3)
        sender = start_sender(port)                                # and comes back
        restarted = time.time()
        wait_for(lambda: any(r["arrival"] > restarted for r in by_source(read(jsonl)).get("cam0", [])), 40)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    finally:
        stop_process(sender)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr
    recs = by_source(read(tmp_path / "r.jsonl"))
    cam = recs["cam0"]
    assert [r["frame"] for r in cam] == sorted({r["frame"] for r in cam})
    assert any(r["arrival"] < killed for r in cam) and any(r["arrival"] > restarted for r in cam)
    assert summary_counts(stderr, "cam0")["reconnects"] >= 1
    # the folder never stopped: its results kept coming while the camera was away
    # (away: from the kill until the camera's first frame after it came back, which on a loaded
    # machine can be several loop steps after the restart)
    stills = [r["result_time"] for r in recs["cam1"]]
    back = min(r["arrival"] for r in cam if r["arrival"] > restarted)
    assert any(killed < t < back for t in stills)
    assert max(b - a for a, b in zip(stills, stills[1:])) < 8


def test_a_consumer_slower_than_the_camera_drops_frames_and_keeps_latency_bounded(artifacts, tmp_path):
    import ps3edge

    video = make_video(tmp_path / "drive.mp4", frames=60)          # 4 s at 15 fps
    with ps3edge.stream(artifacts("ps3-tiny"), [str(video)], realtime=True,
                        settings=ps3edge.LookCloseSettings(num_look_close=1)) as live:
        box = live.sources[0].mailbox
        got, arrived_while_away = [], []
        for record in live:
            got.append(record)
            before = box.arrived
            time.sleep(1.0)                                        # a slow sink: the decoder does not wait for it
            arrived_while_away.append(box.arrived - before)
        row = live.stats.rows()[0]
    assert box.arrived == 60
    assert row.dropped >= 60 - len(got) - 1 and row.dropped > 30   # at most one frame waits, never a queue
    assert max(arrived_while_away[:-1]) >= 10
    frames = [r.frame for r in got]
    assert frames == sorted(frames) and max(np.diff(frames)) > 5
    # latency is arrival to result, and with one waiting frame it is about one pass, whatever the consumer
    assert max(r.latency_ms for r in got) < 5000
    assert all(isinstance(r, ps3edge.FrameRecord) and r.result is not None for r in got)


def test_sigterm_with_out_exits_143_and_leaves_only_whole_shards(artifacts, tmp_path):
    from ps3edge.extract.shards import read_header, read_items

    video = make_video(tmp_path / "drive.mp4", frames=30)
    out = tmp_path / "feats"
    proc = subprocess.Popen([*cli_command(), "stream", str(artifacts("ps3-tiny")), "--source", str(video), "--realtime",
                             "--loop", *STEPS, "--out", str(out), "--shard-size", "2", "--jsonl", str(tmp_path / "r.jsonl")],
                            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: len(read(tmp_path / "r.jsonl")) >= 3, 90)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, stderr
    assert "terminated" in stderr
    shards = sorted((out / "cam0").glob("*"))
    assert shards and all(p.name.startswith("shard-") and p.suffix == ".safetensors" for p in shards)
    frames = []
    for path in shards:
        header = read_header(path)
        assert header is not None and len(header["items"]) <= 2
        items = read_items(path)
        assert sorted(items) == [r["index"] for r in header["items"]]
        frames += [r["frame"] for r in header["items"]]
    assert frames == [r["frame"] for r in read(tmp_path / "r.jsonl")]      # every processed frame, once
    assert json.loads((out / "stream.json").read_text())["shard_size"] == 2


def test_a_processed_frame_equals_run_on_the_same_decoded_frame(artifacts, tmp_path):
    import ps3edge
    from ps3edge.extract.shards import read_header, read_items
    from safetensors.numpy import load_file

    art = artifacts("ps3-tiny")
    video = make_video(tmp_path / "drive.mp4", frames=30)
    # the Python face: the record's own frame, written losslessly, run by `ps3edge run`
    with ps3edge.stream(art, [str(video)], settings=ps3edge.LookCloseSettings(num_look_close=1),
                        max_frames=1) as live:
        record = next(iter(live))
    Image.fromarray(record.image).save(tmp_path / "frame.png")
    ran = cli("run", art, "--image", tmp_path / "frame.png", "--out", tmp_path / "f.safetensors", *STEPS)
    assert ran.returncode == 0, ran.stderr
    assert np.array_equal(load_file(str(tmp_path / "f.safetensors"))["features"], record.result.features)
    # the command line: a frame in its shard against Encoder.run on that frame decoded apart
    result = cli("stream", art, "--source", video, *STEPS, "--out", tmp_path / "feats", "--quiet")
    assert result.returncode == 0, result.stderr
    shard = next((tmp_path / "feats" / "cam0").glob("shard-*.safetensors"))
    item = read_header(shard)["items"][-1]
    with av.open(str(video)) as container:
        decoded = next(f for i, f in enumerate(container.decode(video=0)) if i == item["frame"]).to_ndarray(format="rgb24")
    Image.fromarray(decoded).save(tmp_path / "again.png")
    with ps3edge.load(art) as encoder:
        alone = encoder.run(str(tmp_path / "again.png"), ps3edge.LookCloseSettings(num_look_close=1))
    assert np.array_equal(read_items(shard)[item["index"]]["features"], alone.features[0])


def test_a_source_that_cannot_be_opened_is_one_error_line_or_skipped(artifacts, tmp_path):
    folder = make_folder(tmp_path / "stills", count=2)
    missing = tmp_path / "nowhere.mp4"
    refused = cli("stream", artifacts("ps3-tiny"), "--source", folder, "--source", missing, *STEPS, "--out", tmp_path / "o")
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: source cam1:") and "nowhere.mp4" in lines[0]
    assert not (tmp_path / "o").exists()
    scheme = cli("stream", artifacts("ps3-tiny"), "--source", "ftp://example.com/x")
    assert scheme.returncode == 2 and scheme.stderr.startswith("error: --source ftp://")
    allowed = cli("stream", artifacts("ps3-tiny"), "--source", folder, "--source", missing, *STEPS,
                  "--allow-missing", "--loop", "--jsonl", "-", "--duration", "20", "--max-frames", "2")
    assert allowed.returncode == 0, allowed.stderr
    assert {r["source"] for r in records(allowed.stdout)} == {"cam0"}
    assert "warning: source cam1:" in allowed.stderr
