"""The live table of `ps3edge stream` (cli/stream.py's _LiveTable), rendered by rich as a terminal
shows it: its columns, and the `reused` and `over deadline` columns only with --reuse and
--deadline, holding the same counts as the summary line. The numbers come from a real StreamStats
over real (unstarted) source threads."""

from __future__ import annotations

import io
import threading

import pytest
from rich.console import Console

from ps3edge.cli.stream import _LiveTable
from ps3edge.streaming.sources import Pacing, SourceThread, parse_sources
from ps3edge.streaming.stats import StreamStats

BASE = ["source", "state", "in fps", "processed fps", "frames", "processed", "dropped", "p50 ms", "p99 ms",
        "reconnects"]


def stats_of_two_sources() -> StreamStats:
    bell, stop = threading.Condition(), threading.Event()
    specs = parse_sources(["front=rtsp://127.0.0.1:8554/a", "back=rtsp://127.0.0.1:8554/b"])
    stats = StreamStats([SourceThread(i, s, Pacing(), bell, stop) for i, s in enumerate(specs)])
    for latency, reused, missed in ((100.0, False, False), (120.0, True, False), (900.0, True, True)):
        stats.processed(0, latency, reused=reused, missed=missed)       # front: 3 processed, 2 reused, 1 over
    stats.processed(1, 50.0)                                            # back: 1 processed, none of either
    return stats


def rendered(table: _LiveTable) -> list[list[str]]:
    """The table's header and rows as a terminal shows them, split into cells."""
    console = Console(record=True, width=220, color_system=None, file=io.StringIO())
    console.print(table)
    lines = [l.replace("┃", "│") for l in console.export_text().splitlines()]      # the header's bar is heavier
    return [[cell.strip() for cell in line.split("│")] for line in lines if "│" in line]


@pytest.mark.parametrize("reuse,deadline", [(False, False), (True, False), (False, True), (True, True)])
def test_the_live_table_shows_reused_and_over_deadline_only_when_asked(reuse, deadline):
    header, *rows = rendered(_LiveTable(stats_of_two_sources(), reuse=reuse, deadline=deadline))
    extra = (["reused"] if reuse else []) + (["over deadline"] if deadline else [])
    assert header == BASE + extra
    assert [r[0] for r in rows] == ["front", "back"]
    front, back = (dict(zip(header, r)) for r in rows)
    assert front["processed"] == "3" and back["processed"] == "1"
    assert front["state"] == "opening" and front["reconnects"] == "0"
    assert front["p50 ms"] == "120" and back["p99 ms"] == "50"
    if reuse:
        assert (front["reused"], back["reused"]) == ("2", "0")
    if deadline:
        assert (front["over deadline"], back["over deadline"]) == ("1", "0")
