"""`ps3edge extract` throughput against the alternatives, on this machine's CPU.

For one model it generates N images (PNG, 640x480), then times, in items/s:
  run loop     `ps3edge run` once per image, as a shell loop would (a process and a model load each)
  run_batch    one Pipeline, images decoded and run_batch'ed one batch after the other (no overlap)
  extract      `ps3edge extract` (the local engine: decode threads overlapping run_batch)
  extract ray  `ps3edge extract --ray local --actors A` (when Ray is installed)
and the peak RSS of each extract process (/usr/bin/time -v), to show memory does not grow with N.

    python benchmarks/extract_cpu.py --model ps3-tiny --images 24
    python benchmarks/extract_cpu.py --model ps3-1.5k --depth 2 --images 16
    python benchmarks/extract_cpu.py --model ps3-tiny --images 1000 --only extract   # the RSS check

Each extract writes into a fresh directory; the times include process start and model load, as a
user sees them; the `_after_load` rates are extract's own (first item to last). --num-look-close defaults to 1 (pass another value to compare).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from conftest import random_image                                  # noqa: E402
from ps3edge.exporter.onnx_export import export                    # noqa: E402
from ps3edge.model import preset, random_model, save_checkpoint    # noqa: E402

SCRIPT = Path(sys.executable).with_name("ps3edge")


def artifact(name: str, depth, workdir: Path) -> Path:
    if depth is None:
        export(name, workdir / "art")
        return workdir / "art"
    cfg = preset(name)
    cfg = cfg.replace(depth=depth, select_layers=tuple(min(layer, depth - 1) for layer in cfg.select_layers))
    save_checkpoint(random_model(cfg), workdir / "ckpt")
    export(str(workdir / "ckpt"), workdir / "art")
    return workdir / "art"


def timed(command: list[str], env: dict) -> tuple[float, int, subprocess.CompletedProcess]:
    """Seconds and peak RSS (kB) of a command run under /usr/bin/time -v."""
    t0 = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-v", *command], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)
    if result.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    return seconds, int(rss.group(1)) if rss else -1, result


def said_rate(result: subprocess.CompletedProcess) -> float:
    """The items/s extract reports: from its first item to its last (no process start, no model load)."""
    found = re.search(r"([0-9.]+) items/s ->", result.stdout)
    return float(found.group(1)) if found else float("nan")


def run_batch_rate(art: Path, images: list[Path], steps: str) -> float:
    from ps3edge.runtime.lookclose import Pipeline
    from ps3edge.runtime.planning import settings_from_env
    from ps3edge.runtime.preprocess import open_image

    settings = settings_from_env({}, num_look_close=steps)
    t0 = time.perf_counter()
    with Pipeline(art) as pipeline:
        for start in range(0, len(images), pipeline.max_batch):
            batch = [open_image(p) for p in images[start:start + pipeline.max_batch]]
            pipeline.run_batch(batch, settings)
    return len(images) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ps3-tiny")
    ap.add_argument("--depth", type=int, default=None)
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--num-look-close", default="1")
    ap.add_argument("--loop-images", type=int, default=4, help="images timed for the run loop (it is slow)")
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--only", choices=("extract",), default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                                         os.environ.get("PYTHONPATH", "")])}
    flags = ["--num-look-close", args.num_look_close]
    row = {"model": args.model + (f" (depth {args.depth})" if args.depth else ""), "images": args.images,
           "num_look_close": args.num_look_close, "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        art = artifact(args.model, args.depth, work)
        (work / "images").mkdir()
        images = []
        for i in range(args.images):
            images.append(work / "images" / f"{i:05d}.png")
            random_image(640, 480, seed=i).save(images[-1])
        if args.only is None:
            t0 = time.perf_counter()
            for i, image in enumerate(images[:args.loop_images]):
                timed([str(SCRIPT), "run", str(art), "--image", str(image), "--out", str(work / f"run{i}.safetensors"),
                       *flags], env)
            row["run_loop_items_s"] = args.loop_images / (time.perf_counter() - t0)
            row["run_batch_items_s"] = run_batch_rate(art, images, args.num_look_close)
        seconds, rss, result = timed([str(SCRIPT), "extract", str(art), "--input", str(work / "images"),
                                      "--out", str(work / "out"), *flags], env)
        row["extract_items_s"], row["extract_peak_rss_mb"] = args.images / seconds, rss / 1024
        row["extract_items_s_after_load"] = said_rate(result)
        if args.only is None:
            try:
                import ray  # noqa: F401
                seconds, rss, result = timed([str(SCRIPT), "extract", str(art), "--input", str(work / "images"),
                                              "--out", str(work / "ray"), "--ray", "local", "--actors",
                                              str(args.actors), *flags], env)
                row[f"extract_ray_{args.actors}_actors_items_s"] = args.images / seconds
                row[f"extract_ray_{args.actors}_actors_items_s_after_start"] = said_rate(result)
            except ImportError:
                row["extract_ray"] = "ray not installed"
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
