"""A stream's frames logged to Rerun (`--rerun FILE.rrd`, `--rerun-connect URL`): per processed
frame its image, its selection maps and its latency and steps, for Rerun's viewer.

Entities, per source (its name as `--source` gave it, cam0, ...):

    /<source>/image                 the decoded frame, downscaled to at most STREAM_RERUN_MAX_SIDE
                                    pixels a side and JPEG-compressed (so the log stays small)
    /<source>/selection/<scale>     the (g, g) selection map of that high-res scale as a segmentation
                                    image (class 1: a patch encoded at that scale), with a 2D scale
                                    transform that lays it over the image
    /<source>/latency_ms            Scalars: the frame's latency (arrival to result)
    /<source>/steps                 Scalars: the look-close steps it ran

Timelines: `frame` (the record's frame number, a sequence) and `pts` (the stream's timestamp, a
duration; absent where the stream has none), beside Rerun's own `log_time`.

The file is written where ps3edge writes every file: to a temporary beside it
(`.NAME.rrd.ps3edge-tmp-*.tmp`), renamed to NAME.rrd on stop, Ctrl-C and SIGTERM included, once
Rerun has flushed it and written its footer. Rerun itself streams straight into the file it is
given, and a file cut short mid-message is refused by its reader. So a killed run (SIGKILL, power
loss) leaves no NAME.rrd, only that temporary. `--rerun-connect` streams to a running viewer or
`rerun --serve-grpc` proxy; the sink refuses at the start a URL nothing listens on.

Rerun (`rerun-sdk`, the `rerun` extra) is imported only when one of these is asked for.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

from .. import defaults
from ..artifact.io import apply_default_mode, temp_file
from ..errors import Ps3EdgeError
from ..runtime.outputs import SCALE_COLOURS
from .record import FrameRecord

RERUN_MISSING = "--rerun and --rerun-connect need the Rerun SDK: pip install 'ps3edge[rerun]'"
APPLICATION_ID = "ps3edge-stream"
URL_SCHEMES = ("rerun", "rerun+http", "rerun+https")
URL_EXAMPLE = "rerun+http://127.0.0.1:9876/proxy"
SELECTION_ALPHA = 110                     # a selected patch tints the frame under it, it does not hide it


def _rerun():
    try:
        import rerun
    except ImportError:
        raise Ps3EdgeError(RERUN_MISSING) from None
    return rerun


def check_rerun_path(path) -> Path:
    """--rerun: a .rrd file name in a folder that exists and is writable."""
    p = Path(path)
    if p.is_dir():
        raise Ps3EdgeError(f"--rerun {p} is a directory; give a file name ending in .rrd")
    if p.suffix != ".rrd":
        raise Ps3EdgeError(f"--rerun {p}: give a file name ending in .rrd (Rerun's viewer opens recordings by it)")
    parent = p.parent
    if not parent.is_dir():
        raise Ps3EdgeError(f"--rerun {p}: its folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise Ps3EdgeError(f"--rerun {p}: its folder {parent} is not writable")
    return p


def check_rerun_url(url: str, timeout: float = defaults.STREAM_RERUN_CONNECT_TIMEOUT_S) -> None:
    """--rerun-connect: a Rerun proxy URL, and something accepting connections there. Rerun's own
    connect waits 5 s and then logs into a buffer that is never delivered; this says so at once."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme not in URL_SCHEMES or not parts.hostname or port is None or parts.path != "/proxy":
        raise Ps3EdgeError(f"--rerun-connect {url}: give a viewer's URL with its port, like {URL_EXAMPLE} "
                           f"(schemes: {', '.join(s + '://' for s in URL_SCHEMES)}; the path is /proxy)")
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            pass
    except OSError as e:
        raise Ps3EdgeError(f"--rerun-connect {url}: nothing accepts a connection at {parts.hostname}:{port} "
                           f"({e.strerror or e}); start a viewer first (`rerun` listens on {URL_EXAMPLE})") from None


def check_rerun(path: Optional[str], url: Optional[str]) -> None:
    """Refuse, before any source is opened or anything written, what the Rerun sink cannot do."""
    if path is None and url is None:
        return
    _rerun()
    if path is not None:
        check_rerun_path(path)
    if url is not None:
        check_rerun_url(url)


def _downscaled(rgb: np.ndarray, max_side: int) -> np.ndarray:
    height, width = rgb.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1:
        return rgb
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0))


class RerunSink:
    """Logs each FrameRecord to a recording of its own (never Rerun's global one, so a program
    that uses Rerun itself keeps its own); `path`, `url` or both. `close()` publishes the file."""

    def __init__(self, path=None, url: Optional[str] = None, *, max_side: int = defaults.STREAM_RERUN_MAX_SIDE,
                 jpeg_quality: int = defaults.STREAM_RERUN_JPEG_QUALITY):
        if path is None and url is None:
            raise Ps3EdgeError("RerunSink needs a .rrd path, a viewer URL, or both")
        self._rr = rr = _rerun()
        self.path = None if path is None else check_rerun_path(path)
        self.url, self.max_side, self.jpeg_quality = url, max_side, jpeg_quality
        self.logged = 0
        self.warnings: list[str] = []
        self._contexts: set[str] = set()          # entities whose colours (a static annotation context) are logged
        self._tmp: Optional[Path] = None
        self._closed = False
        self.recording = rr.RecordingStream(APPLICATION_ID)
        try:
            sinks = []
            if self.path is not None:
                self._tmp = temp_file(self.path.parent, self.path.name)
                sinks.append(rr.FileSink(str(self._tmp)))
            if url is not None:
                sinks.append(rr.GrpcSink(url))
            self.recording.set_sinks(*sinks)
        except (OSError, ValueError, RuntimeError) as e:
            self._discard()
            raise Ps3EdgeError(f"cannot start the Rerun recording ({' '.join(str(e).split())})") from None

    def add(self, record: FrameRecord) -> None:
        """Log one processed frame (a record without its image or result logs its scalars only)."""
        rr, rec = self._rr, self.recording
        base = f"/{record.source}"
        rec.reset_time()                          # a source without pts must not inherit another's
        rec.set_time("frame", sequence=record.frame)
        if record.pts is not None:
            rec.set_time("pts", duration=float(record.pts))
        if record.image is not None:
            small = _downscaled(record.image, self.max_side)
            rec.log(f"{base}/image", rr.Image(small).compress(jpeg_quality=self.jpeg_quality))
            height, width = small.shape[:2]
        else:
            height, width = record.height, record.width
        if record.result is not None:
            for k, (scale, grid) in enumerate(record.result.selection_maps.items()):
                entity = f"{base}/selection/{scale}"
                if entity not in self._contexts:
                    colour = SCALE_COLOURS[k % len(SCALE_COLOURS)]
                    rec.log(entity, rr.AnnotationContext([(0, "not encoded", (0, 0, 0, 0)),
                                                          (1, f"encoded at {scale}px", (*colour, SELECTION_ALPHA))]),
                            static=True)
                    self._contexts.add(entity)
                rows, cols = grid.shape
                # the grid covers the whole frame (PS3 resizes it to a square): one cell per patch
                rec.log(entity, rr.SegmentationImage(np.ascontiguousarray(grid, dtype=np.uint8)),
                        rr.Transform3D(scale=[width / cols, height / rows, 1.0]))
        rec.log(f"{base}/latency_ms", rr.Scalars(float(record.latency_ms)))
        rec.log(f"{base}/steps", rr.Scalars(float(record.steps)))
        self.logged += 1

    def close(self) -> None:
        """Flush what was logged, close the file and the connection, and put the file in place
        (on any stop: what was logged is whole). A viewer gone away is a warning, not an error."""
        if self._closed:
            return
        self._closed = True
        try:
            self.recording.flush(timeout_sec=defaults.STREAM_RERUN_CLOSE_TIMEOUT_S)
        except Exception as e:                  # rerun raises a bare RuntimeError for a sink that did not drain
            self.warnings.append(f"Rerun: {' '.join(str(e).split())}")
        self.recording.disconnect()             # closes the file sink: writes the footer
        if self._tmp is not None:
            try:
                apply_default_mode(self._tmp)
                os.replace(self._tmp, self.path)
            except OSError as e:
                self._discard()
                raise Ps3EdgeError(f"cannot write --rerun {self.path}: {e.strerror or e}") from None
            self._tmp = None

    def _discard(self) -> None:
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None

    def describe(self) -> str:
        where = [str(p) for p in (self.path, self.url) if p is not None]
        return f"{self.logged} frames logged to Rerun -> {', '.join(where)}"
