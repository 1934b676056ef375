"""Helpers for the stream tests: free loopback ports, image folders, the JSON lines a run wrote, the
summary line's numbers, and a bounded wait."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

from conftest import random_image


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_folder(path: Path, count: int = 3, width: int = 120, height: int = 90) -> Path:
    path.mkdir()
    for i in range(count):
        random_image(width, height, seed=i).save(path / f"{i:03d}.png")
    return path


def records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def read(path: Path) -> list[dict]:
    """The records of a --jsonl file (none while it does not exist yet)."""
    return records(path.read_text()) if path.is_file() else []


def by_source(recs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in recs:
        out.setdefault(r["source"], []).append(r)
    return out


def summary_counts(stderr: str, name: str) -> dict:
    """The numbers of a source's summary line."""
    line = next(l for l in stderr.splitlines() if l.startswith(f"stream {name}:"))
    words = line.replace(",", "").split()
    return {"in": int(words[2]), "processed": int(words[5]), "dropped": int(words[7]),
            "reconnects": int(words[words.index("reconnects") - 1])}


def wait_for(condition, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)
