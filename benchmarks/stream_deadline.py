"""The per-frame deadline (`ps3edge stream --deadline MS`, streaming/deadline.py) under load: 2 and
then 4 sources at 15 fps, p99 latency against the deadline and the look-close steps each frame
ran, one run.

Each source is an image folder of generated frames (a static camera, moving objects; seeded
numpy, 640 x 480) looped at 15 fps, as a camera would give them; every configuration runs for
`--seconds` through `ps3edge.stream` in this process. Per configuration: frames processed,
latency p50 / p99 / max, the share over the deadline, the steps per frame (mean and each
count's frames), and the steps predicted over the deadline even at the floor. Writes JSON and a
markdown table.

    nice python benchmarks/stream_deadline.py --out benchmarks/measured/cpu-2core-2026-12-07
    python benchmarks/stream_deadline.py --artifact art/ --sources 2 --deadline 4000 --seconds 30
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ps3edge                                                    # noqa: E402
from stream_reuse import scene                                    # noqa: E402


def folders(root: Path, count: int, frames: int) -> list[str]:
    out = []
    for k in range(count):
        folder = root / f"cam{k}"
        folder.mkdir(parents=True)
        for i, rgb in enumerate(scene("objects", frames, seed=k)):
            Image.fromarray(rgb).save(folder / f"{i:03d}.png")
        out.append(f"cam{k}={folder}")
    return out


def run(encoder, sources, deadline: float, seconds: float, fps: float) -> dict:
    records = []
    with ps3edge.stream(encoder, sources, fps=fps, loop=True, duration=seconds, deadline_ms=deadline) as live:
        for r in live:
            records.append({"source": r.source, "latency_ms": r.latency_ms, "steps": r.steps, "batch": r.batch,
                            "met": r.deadline_met, "fits": r.deadline_fits})
        rows = live.stats.rows()
    lat = np.array([r["latency_ms"] for r in records])
    steps = Counter(r["steps"] for r in records)
    return {"sources": len(sources), "deadline_ms": deadline, "seconds": seconds, "frames": len(records),
            "arrived": sum(r.arrived for r in rows), "dropped": sum(r.dropped for r in rows),
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)), "max_ms": float(lat.max()),
            "over_pct": 100.0 * float(np.mean([not r["met"] for r in records])),
            "steps_mean": float(np.mean([r["steps"] for r in records])),
            "steps": {str(k): v for k, v in sorted(steps.items())},
            "floor_predicted_over": sum(1 for r in records if r["fits"] is False),
            "records": records}


def markdown(results: list, meta: dict) -> str:
    lines = [f"ps3-tiny, onnxruntime, settings' ceiling {meta['ceiling']} steps, sources looping at {meta['fps']:g} fps, "
             f"{meta['seconds']:g} s per row; {meta['machine']}.", "",
             "| sources | deadline ms | frames processed | latency p50 ms | p99 ms | max ms | over deadline | "
             "steps per frame (mean) | frames per step count | floor predicted over |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in results:
        counts = ", ".join(f"{k}: {v}" for k, v in s["steps"].items())
        lines.append(f"| {s['sources']} | {s['deadline_ms']:g} | {s['frames']} | {s['p50_ms']:.0f} | {s['p99_ms']:.0f} | "
                     f"{s['max_ms']:.0f} | {s['over_pct']:.1f}% | {s['steps_mean']:.2f} | {counts} | "
                     f"{s['floor_predicted_over']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", help="an exported artifact (default: ps3-tiny exported to a temporary folder)")
    ap.add_argument("--sources", type=int, action="append", help="repeatable; default 2 and 4")
    ap.add_argument("--deadline", type=float, action="append", help="ms, repeatable; default 4000 and 8000")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--fps", type=float, default=15.0)
    ap.add_argument("--out", type=Path, help="folder for stream_deadline.json and stream_deadline.md")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        artifact = args.artifact
        if artifact is None:
            from ps3edge.exporter.onnx_export import export
            artifact = Path(tmp) / "art"
            export("ps3-tiny", artifact)
        all_sources = folders(Path(tmp) / "frames", max(args.sources or [2, 4]), 30)
        results = []
        with ps3edge.load(artifact) as encoder:
            ceiling = encoder.run(scene("still", 1)[0]).num_steps                   # warm up; the default steps
            for count in args.sources or [2, 4]:
                for deadline in args.deadline or [4000.0, 8000.0]:
                    results.append(run(encoder, all_sources[:count], deadline, args.seconds, args.fps))
                    print(markdown(results[-1:], {"ceiling": ceiling, "fps": args.fps, "seconds": args.seconds,
                                                  "machine": ""}).splitlines()[-1], flush=True)
    meta = {"ceiling": ceiling, "fps": args.fps, "seconds": args.seconds,
            "machine": f"{platform.machine()} {os.cpu_count()} cores shared, load average "
                       f"{os.getloadavg()[0]:.1f} at the end"}
    text = markdown(results, meta)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "stream_deadline.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        (args.out / "stream_deadline.md").write_text(text)


if __name__ == "__main__":
    main()
