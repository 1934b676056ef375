"""Live sources: what a `--source` names, decoding it in a thread of its own, and the one-slot
mailbox each source leaves its newest frame in.

A source is one of

    /dev/videoN                          a V4L2 camera (FFmpeg's v4l2 input)
    rtsp:// rtsps:// udp:// tcp://       a network stream FFmpeg opens
    http:// https:// srt:// rtmp://
    a video file                         at its own frame rate with `realtime`, else as fast as it decodes
    an image folder                      its images (sorted by path, as `extract` lists them) at `fps`

optionally named: `front=rtsp://...` (else cam0, cam1, ... by position). Decoding is PyAV's (the
`extract` extra), frames come out as RGB uint8 (H, W, 3) numpy arrays with the stream's
presentation time in seconds.

Each source decodes in its own daemon thread and leaves only its newest frame in its mailbox: a
frame the loop has not taken before a newer one arrives is dropped and counted, so a slow
consumer costs frames, never memory, and never holds a decoder up. A source that ends (a network
stream, a camera) or fails reopens after a wait that doubles up to a cap; a file or folder at its
end stops, or starts again with `loop`. The frame number counts every frame the source gave,
dropped ones included, across reopenings.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from .. import defaults
from ..errors import Ps3EdgeError
from ..extract.sources import PYAV_MISSING, display, input_files, is_video
from ..runtime.frames import levels
from ..runtime.preprocess import open_image

NETWORK_SCHEMES = ("rtsp", "rtsps", "udp", "tcp", "http", "https", "srt", "rtmp", "rtmps")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_NAME = re.compile(r"^([A-Za-z][A-Za-z0-9_-]{0,31})=(.+)$")
ACCEPTED = ("a V4L2 device (/dev/video0), a network stream (" + ", ".join(f"{s}://" for s in NETWORK_SCHEMES)
            + "), a video file or an image folder")


@dataclass(frozen=True)
class SourceSpec:
    """One `--source`: its name, what was given, and its kind (device, network, file, folder)."""
    name: str
    target: str
    kind: str

    @property
    def live(self) -> bool:
        """A camera or network stream: it never ends for good, it is reopened."""
        return self.kind in ("device", "network")


def parse_source(text: str, position: int) -> SourceSpec:
    """A `--source` value -> its spec; refuses a scheme FFmpeg is not asked to open here."""
    text = str(text).strip()
    if not text:
        raise Ps3EdgeError(f"--source is empty; give {ACCEPTED}")
    name, target = f"cam{position}", text
    m = _NAME.match(text)
    if m and not _SCHEME.match(text):
        name, target = m.group(1), m.group(2)
    scheme = _SCHEME.match(target)
    if scheme:
        if scheme.group(1).lower() not in NETWORK_SCHEMES:
            raise Ps3EdgeError(f"--source {target}: the scheme {scheme.group(1)}:// is not one ps3edge streams; "
                               f"give {ACCEPTED}")
        return SourceSpec(name, target, "network")
    if target.startswith("/dev/"):
        return SourceSpec(name, target, "device")
    return SourceSpec(name, target, "folder" if Path(target).is_dir() else "file")


def parse_sources(texts) -> list[SourceSpec]:
    specs = [parse_source(t, i) for i, t in enumerate(texts)]
    if not specs:
        raise Ps3EdgeError(f"give at least one --source: {ACCEPTED}")
    seen: dict = {}
    for spec in specs:
        if spec.name in seen:
            raise Ps3EdgeError(f"two sources are named {spec.name} ({seen[spec.name]} and {spec.target}); "
                               f"name them apart, like front=... back=...")
        seen[spec.name] = spec.target
    return specs


@dataclass
class Arrival:
    """A decoded frame as it reached its mailbox: its source, its number among the source's frames,
    its presentation time (seconds; None where the stream has none) and when it arrived (wall
    clock, and the monotonic clock latencies are measured on)."""
    source: int
    number: int
    pts: Optional[float]
    arrived: float
    arrived_mono: float
    rgb: np.ndarray


def _pyav():
    try:
        import av
    except ImportError:
        raise Ps3EdgeError(PYAV_MISSING) from None
    return av


@dataclass(frozen=True)
class Pacing:
    """How a source is played: realtime (a file at its own frame rate), fps (an image folder),
    loop (a file or folder starts again at its end), the network timeouts in seconds."""
    realtime: bool = False
    fps: Optional[float] = None
    loop: bool = False
    open_timeout: float = defaults.STREAM_OPEN_TIMEOUT_S
    read_timeout: float = defaults.STREAM_READ_TIMEOUT_S


def _decode_video(spec: SourceSpec, pacing: Pacing, stop: threading.Event) -> Iterator[tuple[np.ndarray, Optional[float]]]:
    """The frames of a device, network stream or video file, opened now (an error opening it is
    raised before the first frame)."""
    av = _pyav()
    kwargs: dict = {}
    if spec.kind == "device":
        kwargs["format"] = "v4l2"
    if spec.live:
        kwargs["timeout"] = (pacing.open_timeout, pacing.read_timeout)
    elif not Path(spec.target).is_file():
        raise Ps3EdgeError(f"{display(spec.target)} does not exist")
    try:
        container = av.open(spec.target, **kwargs)
    except (av.FFmpegError, OSError, ValueError) as e:
        raise Ps3EdgeError(f"cannot open {display(spec.target)} ({' '.join(str(e).split())})") from None
    with container:
        if not container.streams.video:
            raise Ps3EdgeError(f"{display(spec.target)} has no video stream")
        stream = container.streams.video[0]
        if spec.kind == "file":
            stream.thread_type = "AUTO"
        clock = _Clock(pacing.realtime and spec.kind == "file", stop)
        for frame in container.decode(stream):
            pts = frame.time
            clock.wait_for(pts)
            yield frame.to_ndarray(format="rgb24"), pts


def _decode_folder(spec: SourceSpec, pacing: Pacing, stop: threading.Event) -> Iterator[tuple[np.ndarray, Optional[float]]]:
    """The images of a folder, one each 1/fps seconds; pts: the image's place in that clock."""
    files = [p for p in input_files([Path(spec.target)]) if not is_video(p)]
    if not files:
        raise Ps3EdgeError(f"{display(spec.target)} holds no images")
    fps = pacing.fps or defaults.STREAM_FOLDER_FPS
    clock = _Clock(True, stop)
    for i, path in enumerate(files):
        pts = i / fps
        rgb = np.asarray(levels(open_image(path)))
        clock.wait_for(pts)
        yield rgb, pts
    clock.wait_for(len(files) / fps)                  # the last image's time, so that a loop keeps the rate


class _Clock:
    """Holds frames back to their presentation times (the first frame sets the origin)."""

    def __init__(self, paced: bool, stop: threading.Event):
        self.paced, self.stop, self.origin = paced, stop, None

    def wait_for(self, pts: Optional[float]) -> None:
        if not self.paced or pts is None:
            return
        now = time.monotonic()
        if self.origin is None:
            self.origin = now - pts
        delay = self.origin + pts - now
        if delay > 0:
            self.stop.wait(delay)


class Mailbox:
    """One slot: `put` leaves the newest frame (counting the one it replaces as dropped), `take`
    empties it. The bell is shared by every source, so the loop waits for any of them."""

    def __init__(self, bell: threading.Condition):
        self.bell = bell
        self._frame: Optional[Arrival] = None
        self.arrived = 0
        self.dropped = 0

    def put(self, frame: Arrival) -> None:
        with self.bell:
            if self._frame is not None:
                self.dropped += 1
            self._frame = frame
            self.arrived += 1
            self.bell.notify_all()

    def take(self) -> Optional[Arrival]:
        with self.bell:
            frame, self._frame = self._frame, None
            return frame

    @property
    def waiting(self) -> bool:
        return self._frame is not None


class SourceThread:
    """One source decoding in a daemon thread into its mailbox, reopening it as the module says.
    `state`: opening, open, reconnecting, ended; `opened` is set once the first opening has
    succeeded or failed (`first_error`)."""

    def __init__(self, index: int, spec: SourceSpec, pacing: Pacing, bell: threading.Condition,
                 stop: threading.Event):
        self.index, self.spec, self.pacing, self.stop = index, spec, pacing, stop
        self.mailbox = Mailbox(bell)
        self.state = "opening"
        self.reconnects = 0
        self.last_error: Optional[str] = None
        self.first_error: Optional[str] = None
        self.opened = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"ps3edge-source-{spec.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def ended(self) -> bool:
        return self.state == "ended"

    def _frames(self):
        if self.spec.kind == "folder":
            return _decode_folder(self.spec, self.pacing, self.stop)
        return _decode_video(self.spec, self.pacing, self.stop)

    def _run(self) -> None:
        wait = defaults.STREAM_RECONNECT_FIRST_S
        try:
            while not self.stop.is_set():
                delivered, error = self._play()
                if self.stop.is_set():
                    break
                if error is None and not self.spec.live:
                    if not self.pacing.loop:
                        break
                    continue                                    # a file or folder again from its start
                if delivered:
                    wait = defaults.STREAM_RECONNECT_FIRST_S
                self.last_error = error or "the stream ended"
                self.state = "reconnecting"
                self.reconnects += 1
                self.stop.wait(wait)
                wait = min(2 * wait, defaults.STREAM_RECONNECT_MAX_S)
        finally:
            self.state = "ended"
            self.opened.set()
            with self.mailbox.bell:
                self.mailbox.bell.notify_all()                  # a loop waiting for frames sees the end

    def _play(self) -> tuple[int, Optional[str]]:
        """Open the source and deliver its frames until it ends (None) or fails (why); returns
        the frames delivered too."""
        delivered = 0
        try:
            for rgb, pts in self._frames():
                if not delivered:
                    self.state = "open"
                    self.opened.set()
                if self.stop.is_set():
                    break
                self.mailbox.put(Arrival(self.index, self.mailbox.arrived, pts, time.time(), time.monotonic(), rgb))
                delivered += 1
            if not delivered and not self.opened.is_set():
                raise Ps3EdgeError(f"{display(self.spec.target)} gave no frames")
        except Exception as e:                 # a decoder's error of any kind: the source fails, the others go on
            message = str(e) if isinstance(e, Ps3EdgeError) else f"{display(self.spec.target)}: {' '.join(str(e).split())}"
            if not self.opened.is_set():
                self.first_error = message
                self.opened.set()
            return delivered, message
        return delivered, None
