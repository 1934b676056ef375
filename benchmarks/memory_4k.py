"""Memory of ps3-4k on the CPU: the artifact's bytes on disk, and the peak resident memory of
`ps3edge run` on a 3840 x 2160 frame, on onnxruntime and torch, at NUM_LOOK_CLOSE 2 and 6.

It exports `ps3-4k` (seeded random weights) once - with the trunk written once, to
trunk.onnx.data (exporter/share.py), or with `--unshared` each stage keeping its own copy, the
layout before sharing - and runs each (backend, steps) pair in a fresh `ps3edge run` process,
so that each peak is that run's alone: each stage's (`run --json`: peak_memory_mib) and the
whole process's (the larger of those and GNU time's %M, the child's ru_maxrss, which the stages'
peak resets lower). `--ort-own-copies` adds onnxruntime runs with
PS3EDGE_ORT_SHARED_WEIGHTS=0 (every session its own pre-packed copy of the shared weights).
It writes JSON and a markdown table.

    nice python benchmarks/memory_4k.py                   # ~15-25 min on a 2-core CPU
    nice python benchmarks/memory_4k.py --unshared --out-name before
    python benchmarks/memory_4k.py --artifact DIR         # reuse an export
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from collections import Counter
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ps3edge.exporter.onnx_export import export                      # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "measured" / "cpu-2core-2026-12-07"
GIB, MIB = 2 ** 30, 2 ** 20


def frame(path: Path) -> Path:
    """A 3840 x 2160 frame of smooth colour with detail (random weights care little what it shows)."""
    y, x = np.mgrid[0:2160, 0:3840].astype(np.float32)
    rgb = np.stack([x / 3840, y / 2160, 0.5 + 0.5 * np.sin(x / 37.0) * np.cos(y / 23.0)], axis=-1)
    noise = np.random.default_rng(0).random((2160, 3840, 3), dtype=np.float32) * 0.1
    Image.fromarray((np.clip(rgb + noise, 0, 1) * 255).astype(np.uint8)).save(path)
    return path


def run_once(artifact: Path, image: Path, backend: str, steps: int, env_extra: dict, scratch: Path) -> dict:
    """One `ps3edge run` in a fresh process: its whole peak RSS (GNU time's %M, the child's
    ru_maxrss), wall time, and the run's own record (stage times, per-stage peak memory)."""
    env = {k: v for k, v in os.environ.items() if k not in ("NUM_LOOK_CLOSE", "NUM_TOKEN_LOOK_CLOSE")}
    env.update(env_extra)
    peak_file = scratch / "peak.txt"
    cmd = ["/usr/bin/time", "-f", "%M", "-o", str(peak_file),
           sys.executable, "-m", "ps3edge.cli", "run", str(artifact), "--image", str(image),
           "--out", str(scratch / "out.safetensors"), "--backend", backend, "--num-look-close", str(steps),
           "--json", "-"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    record = json.loads(proc.stdout)["images"][0]
    stage_peak = record["peak_memory_mib"]["host"]
    # `run --json` resets the peak mark at every stage (/proc/self/clear_refs), which lowers the
    # ru_maxrss the child leaves too: the process's peak is the larger of it and the stages' peaks
    at_exit = int(peak_file.read_text().split()[-1]) * 1024
    return {"backend": backend, "num_look_close": steps, "env": env_extra, "wall_s": round(wall, 1),
            "peak_rss_bytes": max(at_exit, int(max(stage_peak.values()) * MIB)), "ru_maxrss_bytes": at_exit,
            "stage_peak_mib": stage_peak, "timings_ms": record["timings_ms"], "highres_calls": record["highres_calls"]}


def markdown(result: dict) -> str:
    export = "reused (--artifact)" if result["export_s"] is None else f"{result['export_s']} s"
    lines = [f"# ps3-4k memory, {result['machine']} ({result['date']})", "",
             f"Layout: {result['layout']}; export {export}; benchmark {result['total_s']} s.", "",
             "| file | bytes | GiB |", "|---|---:|---:|"]
    for name, size in sorted(result["files"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {name} | {size} | {size / GIB:.3f} |")
    lines.append(f"| **artifact** | {result['artifact_bytes']} | {result['artifact_bytes'] / GIB:.3f} |")
    lines += ["", "| backend | env | NUM_LOOK_CLOSE | peak RSS (MiB) | (GB) | (GiB) | max stage peak (MiB) | "
              "highres calls | lowres ms | highres ms | wall s |",
              "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in result["runs"]:
        peak = r["peak_rss_bytes"]
        sizes = "n/a | n/a | n/a" if peak is None else f"{peak / MIB:.0f} | {peak / 1e9:.2f} | {peak / GIB:.2f}"
        env = ",".join(f"{k}={v}" for k, v in r["env"].items()) or "-"
        calls = ", ".join(f"{k} x ({t}x{n})" for (t, n), k in
                          Counter(tuple(c) for c in r.get("highres_calls", [])).items()) or "n/a"
        lines.append(f"| {r['backend']} | {env} | {r['num_look_close']} | {sizes} | "
                     f"{max(r['stage_peak_mib'].values()):.0f} | {calls} | {r['timings_ms'].get('lowres', 0):.0f} | "
                     f"{r['timings_ms'].get('highres', 0):.0f} | {r['wall_s']} |")
    lines += ["", "Stage peaks (MiB): " + "; ".join(
        f"{r['backend']} NLC {r['num_look_close']}: "
        + ", ".join(f"{k} {v:.0f}" for k, v in r["stage_peak_mib"].items()) for r in result["runs"])]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path, help="Reuse this ps3-4k export instead of exporting.")
    ap.add_argument("--unshared", action="store_true", help="Export with each stage's own copy of the trunk.")
    ap.add_argument("--steps", default="2,6", help="NUM_LOOK_CLOSE values, comma-separated.")
    ap.add_argument("--backends", default="onnxruntime,torch")
    ap.add_argument("--ort-own-copies", action="store_true",
                    help="Also run onnxruntime with PS3EDGE_ORT_SHARED_WEIGHTS=0.")
    ap.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--out-name", default="memory_4k")
    ap.add_argument("--keep", action="store_true", help="Keep the exported artifact (printed).")
    args = ap.parse_args()

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ps3edge-mem4k-") as tmp:
        tmp = Path(tmp)
        artifact, export_s = args.artifact, None
        if artifact is None:
            artifact = (Path(tempfile.mkdtemp(prefix="ps3edge-4k-")) if args.keep else tmp) / "ps3-4k"
            t = time.perf_counter()
            export("ps3-4k", artifact, share_weights=False if args.unshared else None, progress=print)
            export_s = round(time.perf_counter() - t, 1)
            print(f"exported in {export_s} s: {artifact}")
        files = {f.name: f.stat().st_size for f in sorted(artifact.iterdir()) if f.is_file()}
        image = frame(tmp / "frame-3840x2160.png")
        runs = []
        for backend in args.backends.split(","):
            envs = [{}] + ([{"PS3EDGE_ORT_SHARED_WEIGHTS": "0"}] if backend == "onnxruntime" and args.ort_own_copies else [])
            for env_extra in envs:
                for steps in (int(s) for s in args.steps.split(",")):
                    row = run_once(artifact, image, backend, steps, env_extra, tmp)
                    print(json.dumps(row))
                    runs.append(row)
        result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d"),
                  "layout": "unshared (each stage its own trunk)" if args.unshared and args.artifact is None
                  else ("trunk once (trunk.onnx.data)" if "trunk.onnx.data" in files else "as given"),
                  "export_s": export_s, "files": files, "artifact_bytes": sum(files.values()), "runs": runs,
                  "load_average": os.getloadavg()}
        result["total_s"] = round(time.perf_counter() - start, 1)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{args.out_name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out_dir / f"{args.out_name}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
