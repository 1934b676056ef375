"""`ps3edge stream`: live cameras, network streams, video files and image folders through the
look-close loop, continuously: JSON lines, rolling shards, and a live table of each source's
rates, drops and latency on stderr (a summary line per source where stderr is no terminal)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from .. import defaults
from .options import Layer, LookCloseFlags, look_close_options
from .views import err_console, say


def _ms(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.0f}"


def _fps(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1f}"


class _LiveTable:
    """The sources' numbers as a rich table, rebuilt at each refresh from a snapshot; `reused`
    with --reuse and `over deadline` with --deadline, as the summary line has them."""

    def __init__(self, stats, reuse: bool = False, deadline: bool = False):
        self.stats, self.reuse, self.deadline = stats, reuse, deadline

    def __rich__(self) -> Table:
        table = Table(title="ps3edge stream", show_edge=False)
        extra = (("reused",) if self.reuse else ()) + (("over deadline",) if self.deadline else ())
        for col, right in (("source", False), ("state", False), ("in fps", True), ("processed fps", True),
                           ("frames", True), ("processed", True), ("dropped", True), ("p50 ms", True),
                           ("p99 ms", True), ("reconnects", True), *((c, True) for c in extra)):
            table.add_column(col, justify="right" if right else "left")
        for r in self.stats.rows():
            counts = ((str(r.reused),) if self.reuse else ()) + ((str(r.missed),) if self.deadline else ())
            table.add_row(escape(r.name), r.state, _fps(r.input_fps), _fps(r.processed_fps), str(r.arrived),
                          str(r.processed), str(r.dropped), _ms(r.p50_ms), _ms(r.p99_ms), str(r.reconnects), *counts)
        return table


def _summary(stats) -> None:
    """One line per source: what it gave, what was processed and dropped, the latency."""
    for r in stats.rows():
        error = f", last error: {r.last_error}" if r.last_error and r.reconnects else ""
        extra = (f", {r.reused} reused" if r.reused else "") + (f", {r.missed} over the deadline" if r.missed else "")
        err_console.print(f"stream {escape(r.name)}: {r.arrived} frames in, {r.processed} processed, "
                          f"{r.dropped} dropped, latency p50 {_ms(r.p50_ms)} ms p99 {_ms(r.p99_ms)} ms, "
                          f"{r.reconnects} reconnects{escape(extra)}{escape(error)}", highlight=False, soft_wrap=True)


@look_close_options()
def stream(
    artifacts: Path = typer.Argument(..., help="Artifact directory from 'ps3edge export'."),
    source: List[str] = typer.Option(..., "--source", help="/dev/videoN, rtsp:// udp:// http(s):// srt:// tcp:// rtmp:// URL, a video file or an image folder; NAME=... names it (default cam0, cam1, ...). Repeatable."),
    backend: str = typer.Option("onnxruntime", "--backend", help="onnxruntime, torch, or tensorrt (the engines of 'ps3edge build')."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, or the fp16 / int8 stages of 'ps3edge calibrate'; torch backend: fp16 / bf16."),
    device: str = typer.Option("auto", "--device", help="torch backend: cuda, cpu, or auto."),
    look_close: LookCloseFlags = None,
    layer: int = Layer,
    # --- VILA-HD questions on the stream (streaming/ask.py) ---
    ask: Optional[List[str]] = typer.Option(None, "--ask", help="Ask VILA-HD this about each source's newest processed frame every --every (ARTIFACTS must be a VILA-HD artifact; --precision is then its LLM's, fp32 or int4). Repeatable."),
    alert: Optional[List[str]] = typer.Option(None, "--alert", help="A yes / no question asked as --ask is: a line on stderr when a source's answer first says yes or no, and when it flips. Repeatable."),
    every: Optional[str] = typer.Option(None, "--every", help=f"With --ask / --alert: how often, e.g. 2s, 500ms, 1m, or plain seconds (default {defaults.STREAM_ASK_EVERY_S:g}s). A round still running when the next is due skips it."),
    ask_source: Optional[List[str]] = typer.Option(None, "--ask-source", help="With --ask / --alert: ask about this source only (its name: cam0, or NAME of NAME=...). Repeatable; default all."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1, help=f"--ask: most tokens an answer generates, greedy (default {defaults.STREAM_ASK_MAX_NEW_TOKENS}; --alert takes {defaults.STREAM_ALERT_MAX_NEW_TOKENS})."),
    realtime: bool = typer.Option(False, "--realtime", help="Video files: play at their own frame rate (default: as fast as they decode)."),
    fps: Optional[float] = typer.Option(None, "--fps", min=0.001, help=f"Image folders: frames per second (default {defaults.STREAM_FOLDER_FPS:g})."),
    loop: bool = typer.Option(False, "--loop", help="Video files and image folders start again at their end (default: they stop there)."),
    duration: Optional[float] = typer.Option(None, "--duration", min=0.001, help="Stop after this many seconds."),
    max_frames: Optional[int] = typer.Option(None, "--max-frames", min=1, help="Stop after this many processed frames (all sources together)."),
    jsonl: Optional[str] = typer.Option(None, "--jsonl", help="A JSON line per processed frame to this file, or '-' for stdout (flushed per line)."),
    out: Optional[Path] = typer.Option(None, "--out", help="A new or empty directory: per source, rolling feature shards (extract's format) and stream.json."),
    shard_size: int = typer.Option(defaults.STREAM_SHARD_SIZE, "--shard-size", min=1, help="Frames per shard of --out."),
    rerun: Optional[str] = typer.Option(None, "--rerun", help="Log each processed frame (image, selection maps, latency, steps) to this Rerun .rrd file, put in place on stop (the rerun extra)."),
    rerun_connect: Optional[str] = typer.Option(None, "--rerun-connect", help="Stream the same to a running Rerun viewer at this URL, e.g. rerun+http://127.0.0.1:9876/proxy (the rerun extra)."),
    allow_missing: bool = typer.Option(False, "--allow-missing", help="A source that cannot be opened at the start is a warning (and retried), not an error."),
    quiet: bool = typer.Option(False, "--quiet", help="No live table and no summary."),
    reuse: bool = typer.Option(False, "--reuse", help="A frame whose pixels did not change gets its source's last result (status reused); a changed one reuses its unchanged high-res patches' features (status partial)."),
    reuse_threshold: float = typer.Option(defaults.STREAM_REUSE_THRESHOLD, "--reuse-threshold", help="--reuse: the largest pixel difference, in levels 0-255, that counts as unchanged (0: identical)."),
    refresh: int = typer.Option(defaults.STREAM_REFRESH_FRAMES, "--refresh", help="--reuse: compute at least one frame in this many whole."),
    reuse_patches: bool = typer.Option(True, "--reuse-patches/--no-reuse-patches", help="--reuse: reuse unchanged high-res patches too (an approximation, docs/streams.md), or whole frames only."),
    deadline: Optional[float] = typer.Option(None, "--deadline", help="Milliseconds from a frame's arrival to its result: each step runs as many look-close steps as the measured costs say fit (at least 1)."),
):
    """Run live cameras and streams through the look-close loop, newest frame first."""
    from rich.live import Live

    from ..api import load
    from ..streaming.loop import Stream
    from ..streaming.outputs import JsonlSink, ShardSink, open_sinks, stream_record
    from ..streaming.sources import Pacing, parse_sources

    from ..errors import Ps3EdgeError
    from ..runtime.reuse import check_reuse
    from ..streaming.loop import stream_helpers
    from ..streaming.rerun_sink import RerunSink

    settings = look_close.settings()
    specs = parse_sources(source)
    if reuse:
        check_reuse(reuse_threshold, refresh)
    if deadline is not None and not deadline > 0:
        raise Ps3EdgeError(f"--deadline must be a number of milliseconds above 0, got {deadline:g}")
    open_sinks(jsonl, out, rerun, rerun_connect)
    pacing = Pacing(realtime=realtime, fps=fps, loop=loop)
    asking = _asking(artifacts, ask, alert, every, ask_source, max_new_tokens, device, specs)   # --ask / --alert
    with (load(artifacts, backend, device, precision) if asking is None
          else asking.load(artifacts, backend, precision, settings, specs)) as encoder:
        helpers = stream_helpers(encoder, settings, reuse=reuse, reuse_threshold=reuse_threshold, refresh=refresh,
                                 reuse_patches=reuse_patches, deadline_ms=deadline)
        if asking is not None:                                  # answers go out as they come, beside the frames
            helpers.update(ask=encoder.asker, on_answer=lambda record: _answered(record, sinks, jsonl))
        live = Stream(encoder, specs, settings=settings, layer=layer, pacing=pacing, duration=duration,
                      max_frames=max_frames, own_encoder=False, **helpers)
        sinks: list = []
        table, opened = None, False
        try:
            live.start(allow_missing)
            opened = True
            for message in live.missing:
                err_console.print(f"[yellow]warning:[/yellow] {escape(message)}; retrying it in the background",
                                  highlight=False, soft_wrap=True)
            if jsonl is not None:
                sinks.append(JsonlSink(jsonl))
            if out is not None:
                record = stream_record(encoder=encoder, settings=settings, layer=layer, specs=specs,
                                       shard_size=shard_size)
                sinks.append(ShardSink(out, record, specs, shard_size))
            if rerun is not None or rerun_connect is not None:
                sinks.append(RerunSink(rerun, rerun_connect))       # last: its close may refuse, after the others'
            if not quiet and err_console.is_terminal:
                table = Live(_LiveTable(live.stats, reuse=reuse, deadline=deadline is not None), console=err_console,
                             refresh_per_second=1 / defaults.STREAM_TABLE_REFRESH_S)
                table.start()
            for frame in live:
                for sink in sinks:
                    (sink.write if isinstance(sink, JsonlSink) else sink.add)(frame)
        finally:
            live.stop()
            if table is not None:
                table.stop()
            for sink in sinks:
                sink.close()                  # the partial shards: also on Ctrl-C and SIGTERM
            if not quiet and table is None and opened:
                _summary(live.stats)
            if not quiet and opened and asking is not None:
                err_console.print(escape(encoder.asker.summary()), highlight=False, soft_wrap=True)
            for sink in (s for s in sinks if isinstance(s, RerunSink)):
                for message in sink.warnings:                           # a viewer gone away
                    err_console.print(f"[yellow]warning:[/yellow] {escape(message)}", highlight=False, soft_wrap=True)
        shards = next((s for s in sinks if isinstance(s, ShardSink)), None)
        if shards is not None and not quiet:
            say(f"stream: {live.stats.total_processed} frames processed, {shards.describe()}", err=True)
        logged = next((s for s in sinks if isinstance(s, RerunSink)), None)
        if logged is not None and not quiet:
            say(f"stream: {logged.describe()}", err=True)


# --- VILA-HD questions on the stream (--ask / --alert: streaming/ask.py) -----------------------------

def _asking(artifacts: Path, ask, alert, every, ask_source, max_new_tokens, device: str, specs):
    """The --ask / --alert flags checked before anything loads or opens (None without them)."""
    from ..errors import Ps3EdgeError
    from ..streaming.questions import ask_options, vila_dir
    from .options import parse_duration

    asking = ask_options(ask or None, alert or None, every=None if every is None else parse_duration(every, "--every"),
                         sources=ask_source or None, max_new_tokens=max_new_tokens)
    if asking is None:
        return None
    asking.source_indices(specs)
    if device != "auto":
        raise Ps3EdgeError(f"--device {device}: with --ask / --alert VILA-HD chooses where it runs, as `ps3edge chat` "
                           f"does; leave --device out")
    vila_dir(artifacts)
    return asking


def _answered(record, sinks: list, jsonl: Optional[str]) -> None:
    """An answer or alert: a JSON line with --jsonl; an --ask answer also a line on stdout (unless
    the JSON lines are there), an alert's initial state or flip a line on stderr."""
    import sys

    from ..streaming.outputs import JsonlSink

    for sink in sinks:
        if isinstance(sink, JsonlSink):
            sink.write(record)
    if record.type == "alert":
        err_console.print(escape(record.line()), highlight=False, soft_wrap=True)
    elif record.kind == "ask" and jsonl != "-":
        sys.stdout.write(record.line() + "\n")
        sys.stdout.flush()
