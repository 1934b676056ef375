"""The inputs of an extract job: listing them in a fixed order, and decoding them.

An input (`--input`, repeatable) is an image folder (searched recursively, hidden entries
skipped), a text file listing paths, an image file or a video file. Folders and lists may hold
images and videos alike; a file is an image or a video by its suffix. A list holds one path per
line, read as UTF-8 (a byte-order mark is dropped; bytes that are not UTF-8 are kept as the
file name's own bytes, as the file system gives them), with LF or CRLF line ends; each line is
stripped of surrounding white space, blank lines and lines starting with `#` are skipped, and
relative paths are taken from the list's folder.

The listing is the job's contract: every file sorted by its path, each video expanded into the
frames it samples (all of them, or with `fps` the first frame at or after each 1/fps seconds),
in presentation order. Item i of that list goes to shard i // shard_size, so the same inputs
give the same shards on any engine and on every rerun. Listing reads no pixels: an image that
cannot be decoded stays an item and fails when it is decoded; a video whose frames cannot even
be listed is a listing failure. A video cut short (a truncated file: reading stops at an error,
or ends before the frame count or duration its container states) keeps the frames read as
items and is noted as a failure of its own (`Failure.frames_read`). Videos are read with PyAV
(the `extract` extra).

File names are str as the file system gives them (os.fsdecode: bytes that are not UTF-8 become
lone surrogates); `source_fields` is how a record shows one in JSON without losing it.
"""

from __future__ import annotations

import base64
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from PIL import Image

from ..errors import Ps3EdgeError
from ..paths import expect_file
from ..runtime.preprocess import open_image

VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".avi", ".webm", ".mpg", ".mpeg", ".ts", ".flv", ".wmv"})
LIST_SUFFIXES = frozenset({".txt", ".lst", ".list"})
PYAV_MISSING = "reading videos needs PyAV: pip install 'ps3edge[extract]'"


@dataclass(frozen=True)
class Item:
    """One input of the job: an image file, or one frame of a video (frame: its index among the
    video's frames in presentation order; pts: its presentation time in the stream's time base;
    timestamp: that time in seconds)."""
    source: str
    frame: Optional[int] = None
    pts: Optional[int] = None
    timestamp: Optional[float] = None

    def to_dict(self) -> dict:
        return {"source": self.source, "frame": self.frame, "pts": self.pts, "timestamp": self.timestamp}

    @classmethod
    def from_dict(cls, d: dict) -> "Item":
        return cls(d["source"], d.get("frame"), d.get("pts"), d.get("timestamp"))


@dataclass(frozen=True)
class Failure:
    """An input that could not be read, and why; or, with frames_read set, a video cut short
    whose frames_read frames are items (frames_expected: the count its container states, if it
    states one)."""
    source: str
    reason: str
    frame: Optional[int] = None
    frames_read: Optional[int] = None
    frames_expected: Optional[int] = None

    @property
    def cut_short(self) -> bool:
        return self.frames_read is not None


def display(text: str) -> str:
    """`text` as valid Unicode: the bytes of a non-UTF-8 file name shown as \\xNN escapes."""
    if not _undecodable(text):
        return text
    try:
        return os.fsencode(text).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:                # a surrogate no file name decodes to
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _undecodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def source_fields(source: str) -> dict:
    """A record's source: {"source": path} for a UTF-8 path; for a file name that is not UTF-8,
    "source" shows it with \\xNN escapes and "source_bytes" holds its exact bytes in base64
    (read back with base64.b64decode, a bytes path open() takes)."""
    if not _undecodable(source):
        return {"source": source}
    return {"source": display(source), "source_bytes": base64.b64encode(os.fsencode(source)).decode("ascii")}


def record_source(record: dict) -> str:
    """The path a record's source fields name (source_fields, reversed)."""
    raw = record.get("source_bytes")
    return os.fsdecode(base64.b64decode(raw)) if raw else record["source"]


def image_suffixes() -> frozenset:
    """Suffixes of the formats PIL can open (not those it can only write)."""
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def is_video(path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def _walk(folder: Path, media: frozenset) -> list[Path]:
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(root) / n for n in names if not n.startswith(".") and Path(n).suffix.lower() in media]
    return found


def _read_list(path: Path) -> list[Path]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise Ps3EdgeError(f"cannot read the input list {path}: {e.strerror or e}") from None
    # UTF-8 after a byte-order mark (as utf-8-sig reads it), and surrogateescape keeps a non-UTF-8
    # name's bytes as os.fsdecode does for the names a folder gives; lines end at LF only (a CR
    # before it goes with the white space), since splitlines would also cut at the NEL or LS
    # characters a file name may hold
    text = data.removeprefix(b"\xef\xbb\xbf").decode("utf-8", "surrogateescape")
    entries = [line.strip() for line in text.split("\n")]
    return [p if p.is_absolute() else path.parent / p
            for p in (Path(e) for e in entries if e and not e.startswith("#"))]


def input_files(inputs: Iterable) -> list[Path]:
    """Every file the inputs name, sorted by path, each once; refuses an input that is none of
    the four kinds, or inputs that hold no image or video."""
    images = image_suffixes()
    media = images | VIDEO_SUFFIXES
    files: list[Path] = []
    for given in inputs:
        path = Path(given)
        suffix = path.suffix.lower()
        if path.is_dir():
            files += _walk(path, media)
        elif not path.exists():
            raise Ps3EdgeError(f"--input {path} does not exist")
        elif suffix in LIST_SUFFIXES:
            files += _read_list(path)
        elif suffix in media:
            files.append(path)
        else:
            raise Ps3EdgeError(f"--input {path} is not a folder, an image, a video or a list of paths "
                               f"({', '.join(sorted(LIST_SUFFIXES))})")
    unique = sorted(set(files), key=str)
    if not unique:
        raise Ps3EdgeError(f"no images or videos found in {', '.join(str(i) for i in inputs)}")
    return unique


def list_items(inputs: Iterable, fps: Optional[float] = None) -> tuple[list[Item], list[Failure]]:
    """The job's items in their fixed order, and the videos whose frames could not be listed or
    that were cut short (Failure.cut_short: their frames read are items)."""
    items: list[Item] = []
    failures: list[Failure] = []
    for path in input_files(inputs):
        if not is_video(path):
            items.append(Item(str(path)))
            continue
        _pyav()                                   # without PyAV the job is refused, not every video failed
        try:
            frames, short = video_items(path, fps)
        except Ps3EdgeError as e:
            failures.append(Failure(str(path), str(e)))
            continue
        items += frames
        if short is not None:
            failures.append(short)
    return items, failures


def _pyav():
    try:
        import av
    except ImportError:
        raise Ps3EdgeError(PYAV_MISSING) from None
    return av


def _open_video(path: Path):
    av = _pyav()
    expect_file(path, "video")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, ValueError) as e:
        raise Ps3EdgeError(f"{path} is not a video PyAV can read ({e})") from None
    if not container.streams.video:
        container.close()
        raise Ps3EdgeError(f"{path} has no video stream")
    return container


def sample(times: list[float], fps: Optional[float]) -> list[int]:
    """Which frames (indices into `times`, ascending) to take: all, or the first at or after
    each multiple of 1/fps seconds (one frame per slot even where the video is slower)."""
    if fps is None:
        return list(range(len(times)))
    chosen, slot = [], -math.inf
    for i, t in enumerate(times):
        k = math.floor(t * fps + 1e-9)
        if k > slot:
            chosen.append(i)
            slot = k
    return chosen


def video_items(path: Path, fps: Optional[float]) -> tuple[list[Item], Optional[Failure]]:
    """A video's sampled frames, from the packets' presentation times (no frame is decoded), and
    the note of a video cut short (None when it reads to its stated end)."""
    av = _pyav()
    stopped = None
    found: set = set()
    with _open_video(path) as container:
        stream = container.streams.video[0]
        try:
            for packet in container.demux(stream):
                if packet.pts is not None and packet.size:
                    found.add(packet.pts)
        except (av.FFmpegError, OSError) as e:
            stopped = " ".join(str(e).split())
        base = stream.time_base
        stated_frames = stream.frames or None
        stated_seconds = container.duration / av.time_base if container.duration else None
        start = container.start_time / av.time_base if container.start_time else 0.0
    pts = sorted(found)
    if not pts:
        if stopped is not None:
            raise Ps3EdgeError(f"{path} cannot be read ({stopped})")
        raise Ps3EdgeError(f"{path} has no frames with presentation times")
    times = [float(p * base) for p in pts]
    items = [Item(str(path), i, pts[i], times[i]) for i in sample(times, fps)]
    return items, _cut_short(path, times, start, stopped, stated_frames, stated_seconds)


def _cut_short(path: Path, times: list[float], start: float, stopped: Optional[str],
               stated_frames: Optional[int], stated_seconds: Optional[float]) -> Optional[Failure]:
    """The note of a video whose listing read fewer frames than it holds: reading stopped at an
    error, or fewer frames than its header counts, or (no count stated) its last frame well
    before the duration it states (more than two frame intervals and half a second: a healthy
    file's duration ends one frame interval after its last frame's time)."""
    read = len(times)
    if stopped is not None:
        what = f"reading stopped at an error ({stopped[:200]})"
    elif stated_frames is not None:
        if read >= stated_frames:
            return None
        what = "the file ends early"
    else:
        end = times[-1] - start
        gap = statistics.median(b - a for a, b in zip(times, times[1:])) if read > 1 else 0.0
        if stated_seconds is None or stated_seconds - end <= max(0.5, 2 * gap):
            return None
        what = f"the file ends early (its last frame read is at {end:.2f} s of the {stated_seconds:.2f} s it states)"
    of = f" of the {stated_frames} its container states" if stated_frames is not None else ""
    return Failure(str(path), f"{display(str(path))} is cut short: {what}; {read} frames read{of}, "
                              f"and those are extracted", frames_read=read, frames_expected=stated_frames)


def decode(items: list[Item], exif_transpose: bool = False) -> list:
    """Each item's RGB-convertible PIL image, or its Failure, in the items' order. The frames
    of one video that follow each other in `items` are decoded in one pass."""
    out: list = []
    i = 0
    while i < len(items):
        item = items[i]
        if item.frame is None:
            try:
                out.append(open_image(item.source, exif_transpose=exif_transpose))
            except Ps3EdgeError as e:
                out.append(Failure(item.source, str(e)))
            i += 1
            continue
        j = i
        while j < len(items) and items[j].source == item.source and items[j].frame is not None:
            j += 1
        out += _decode_frames(items[i:j])
        i = j
    return out


def _scan(container, stream, wanted: dict, found: list, seek: bool) -> bool:
    """Decode from the key frame at or before the first wanted frame (from the start when not
    `seek`) to the last; False when the seek landed past the first wanted frame."""
    first, last = min(wanted), max(wanted)
    if seek:
        container.seek(first, stream=stream, backward=True, any_frame=False)
    for frame in container.decode(stream):
        if frame.pts is None:
            continue
        if seek and frame.pts > first and found[wanted[first]] is None:
            return False
        seek = False
        if frame.pts in wanted:
            found[wanted[frame.pts]] = frame.to_image()
        if frame.pts >= last:
            break
    return True


def _decode_frames(items: list[Item]) -> list:
    """Frames of one video: seek to the key frame before the first, decode to the last."""
    av = _pyav()
    path = Path(items[0].source)
    wanted = {it.pts: k for k, it in enumerate(items)}
    found: list = [None] * len(items)
    try:
        with _open_video(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            if not _scan(container, stream, wanted, found, seek=True):
                container.seek(0, stream=stream, backward=True, any_frame=False)
                _scan(container, stream, wanted, found, seek=False)
    except Ps3EdgeError as e:
        return [Failure(it.source, str(e), it.frame) for it in items]
    except (av.FFmpegError, OSError, ValueError) as e:
        return [f if f is not None else Failure(it.source, f"{path}: frame {it.frame} cannot be decoded ({e})", it.frame)
                for f, it in zip(found, items)]
    return [f if f is not None else Failure(it.source, f"{path}: frame {it.frame} (at {it.timestamp:.3f} s) "
                                                       f"could not be decoded", it.frame)
            for f, it in zip(found, items)]
