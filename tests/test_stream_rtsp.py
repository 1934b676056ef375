"""`ps3edge stream` on a real RTSP camera: GStreamer's RTSP server (tests/rtsp_server.py, run by the
system Python, which has Debian's GStreamer bindings) serving H.264 on loopback, read by PyAV /
FFmpeg as any `rtsp://` source is. Then that server killed mid-run and started again on the same
port: the stream reconnects and goes on, counting the reconnection.

Skipped, with the reason, where /usr/bin/python3 cannot import GstRtspServer or lacks the
GStreamer elements the server uses (.ci/run installs them: gir1.2-gst-rtsp-server-1.0,
python3-gi, gstreamer1.0-plugins-{base,good,ugly})."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import clean_env, cli, cli_command
from stream_support import free_port, read, records, summary_counts, wait_for

av = pytest.importorskip("av", reason="PyAV (the extract extra) decodes the streams")

SYSTEM_PYTHON = "/usr/bin/python3"
SERVER = Path(__file__).with_name("rtsp_server.py")
ELEMENTS = ("videotestsrc", "videoconvert", "x264enc", "rtph264pay")
STEPS = ("--num-look-close", "1")
WIDTH, HEIGHT, FPS = 160, 120, 15

PROBE = f"""
import gi
gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import Gst, GstRtspServer
Gst.init(None)
missing = [e for e in {ELEMENTS!r} if Gst.ElementFactory.find(e) is None]
print(" ".join(missing))
"""


def _server_missing() -> str | None:
    """Why the RTSP server cannot run here (None: it can)."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return f"no {SYSTEM_PYTHON}"
    try:
        probe = subprocess.run([SYSTEM_PYTHON, "-c", PROBE], env=_system_env(), capture_output=True, text=True,
                               timeout=60)
    except subprocess.TimeoutExpired:
        return f"{SYSTEM_PYTHON} took over 60 s to load GStreamer"
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return f"{SYSTEM_PYTHON} cannot import GStreamer's RTSP server ({last}); apt-get install gir1.2-gst-rtsp-server-1.0 python3-gi"
    if probe.stdout.strip():
        return f"GStreamer lacks {probe.stdout.strip()} (gstreamer1.0-plugins-base, -good, -ugly)"
    return None


def _system_env() -> dict:
    """The environment without the virtual environment's Python settings (the system Python's own
    site-packages hold gi)."""
    return {k: v for k, v in clean_env().items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


MISSING = _server_missing()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=f"no RTSP server: {MISSING}")


def start_server(port: int) -> subprocess.Popen:
    """The RTSP server, once it says it listens (within 30 s)."""
    proc = subprocess.Popen([SYSTEM_PYTHON, str(SERVER), str(port), str(WIDTH), str(HEIGHT), str(FPS)],
                            env=_system_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc
        except OSError:
            if proc.poll() is not None:
                raise AssertionError(f"the RTSP server exited: {proc.stderr.read()}")
            time.sleep(0.2)
    stop(proc)
    raise AssertionError("the RTSP server did not listen within 30 s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


def test_an_rtsp_camera_is_read_through_ffmpeg(artifacts):
    port = free_port()
    server = start_server(port)
    try:
        result = cli("stream", artifacts("ps3-tiny"), "--source", f"rtsp://127.0.0.1:{port}/test", *STEPS,
                     "--max-frames", "3", "--jsonl", "-")
    finally:
        stop(server)
    assert result.returncode == 0, result.stderr
    recs = records(result.stdout)
    assert len(recs) == 3 and {r["source"] for r in recs} == {"cam0"}
    frames = [r["frame"] for r in recs]
    assert frames == sorted(set(frames))
    for r in recs:
        assert r["status"] == "computed" and r["steps"] == 1 and (r["width"], r["height"]) == (WIDTH, HEIGHT)
    assert any(r["pts"] is not None for r in recs)               # RTP timestamps come through as pts
    counts = summary_counts(result.stderr, "cam0")
    assert counts["processed"] == 3 and counts["reconnects"] == 0


@pytest.mark.slow
def test_an_rtsp_server_killed_and_restarted_is_reconnected(artifacts, tmp_path):
    port = free_port()
    server = start_server(port)
    jsonl = tmp_path / "r.jsonl"
    proc = subprocess.Popen([*cli_command(), "stream", str(artifacts("ps3-tiny")), "--source",
                             f"rtsp://127.0.0.1:{port}/test", *STEPS, "--jsonl", str(jsonl), "--duration", "60"],
                            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: len(read(jsonl)) >= 2, 60)
        stop(server)                                             # the camera goes away mid-stream
        killed = time.time()
        time.sleep(3)
        server = start_server(port)                              # and comes back on the same port
        restarted = time.time()
        wait_for(lambda: any(r["arrival"] > restarted for r in read(jsonl)), 40)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    finally:
        stop(server)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr
    recs = read(jsonl)
    frames = [r["frame"] for r in recs]
    assert frames == sorted(set(frames))                         # counted across the reconnection, never back
    assert any(r["arrival"] < killed for r in recs) and any(r["arrival"] > restarted for r in recs)
    assert summary_counts(stderr, "cam0")["reconnects"] >= 1
