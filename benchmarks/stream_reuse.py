"""Reuse between frames (`ps3edge stream --reuse`, runtime/reuse.py): its error and its speed-up
against computing every frame whole, on generated scenes, one run.

Scenes (seeded numpy, 640 x 480, one source each):

    still          a static camera, nothing moves (whole frames are reused)
    objects        a static camera, three objects moving 4-6 px a frame over a textured scene
    objects-noisy  the same with sensor noise (Gaussian, sigma 1.5 levels, rounded)
    pan            a camera panning 3 px a frame over a larger textured scene

For each scene and threshold, every frame runs both ways in turn (so a change in the machine's
load hits both alike): the normal path (`Pipeline.run_batch`, the reference) and the reuse rule
(`FrameReuse.run`, refresh every `--refresh` frames). Per frame: the per-token cosine of the
features (min and mean over the tokens both have: the 729 low-res ones and the high-res patches
both selected), the IoU of the selected high-res patches, the patches encoded and reused, and
the wall time of each path. Writes JSON and a markdown table.

    nice python benchmarks/stream_reuse.py --out benchmarks/measured/cpu-2core-2026-12-07
    python benchmarks/stream_reuse.py --artifact art/ --frames 12 --threshold 0 --threshold 6
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ps3edge.runtime.lookclose import Pipeline                   # noqa: E402
from ps3edge.runtime.planning import LookCloseSettings           # noqa: E402
from ps3edge.runtime.reuse import FrameReuse                     # noqa: E402

W, H = 640, 480


def texture(rng, width: int, height: int) -> np.ndarray:
    """A textured scene: smooth stripes and blobs over noise, so the selector's ranking is not flat."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = rng.random((height, width, 3)).astype(np.float32) * 80
    rgb[..., 0] += (np.sin(xx / 23.0) + 1) * 80
    rgb[..., 1] += (np.cos(yy / 31.0 + xx / 57.0) + 1) * 80
    rgb[..., 2] += (np.sin((xx + yy) / 41.0) + 1) * 60
    return np.clip(rgb, 0, 255).astype(np.uint8)


def scene(name: str, count: int, seed: int = 0):
    """The scene's `count` frames, (H, W, 3) uint8 each."""
    rng = np.random.default_rng(seed)
    if name == "pan":
        world = texture(rng, W + 3 * count + 8, H)
        return [world[:, 3 * i: 3 * i + W].copy() for i in range(count)]
    background = texture(rng, W, H)
    if name == "still":
        return [background.copy() for _ in range(count)]
    objects = [((60, 80), (5, 2), (255, 40, 40), 60), ((300, 200), (-4, 3), (40, 220, 40), 80),
               ((420, 100), (6, -1), (30, 30, 30), 50)]
    frames = []
    for i in range(count):
        rgb = background.copy()
        for (x0, y0), (dx, dy), color, size in objects:
            x, y = (x0 + dx * i) % (W - size), (y0 + dy * i) % (H - size)
            rgb[y: y + size, x: x + size] = color
        if name == "objects-noisy":
            rgb = np.clip(rgb + np.round(rng.normal(0, 1.5, rgb.shape)), 0, 255).astype(np.uint8)
        frames.append(rgb)
    return frames


def positions(result, geometry) -> np.ndarray:
    plan = result.plan
    return np.sort(np.concatenate([plan.step_positions(geometry, t) for t in range(len(plan.steps))]))


def compare(ours, reference, geometry) -> dict:
    """Per-token cosine over the tokens both have, and the IoU of the selected patches."""
    n0 = geometry.lowres_grid ** 2
    pa, pb = positions(ours, geometry), positions(reference, geometry)
    common, ia, ib = np.intersect1d(pa, pb, return_indices=True)
    a = np.concatenate([ours.features[0, :n0], ours.features[0, n0:][ia]])
    b = np.concatenate([reference.features[0, :n0], reference.features[0, n0:][ib]])
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    union = len(np.union1d(pa, pb))
    return {"cos_min": float(cos.min()), "cos_mean": float(cos.mean()),
            "iou": float(len(common) / union) if union else 1.0}


def run_scene(pipeline, name: str, frames, threshold: float, refresh: int, settings, reference):
    reuse = FrameReuse(pipeline, threshold=threshold, refresh=refresh)
    rows = []
    for i, rgb in enumerate(frames):
        if reference[i] is None:
            t = time.perf_counter()
            reference[i] = (pipeline.run_batch([rgb], settings)[0], (time.perf_counter() - t) * 1e3)
        full, full_ms = reference[i]
        t = time.perf_counter()
        out = reuse.run([0], [rgb], settings, -2)[0]
        ms = (time.perf_counter() - t) * 1e3
        rows.append({"frame": i, "status": out.status, "encoded": out.encoded_patches, "reused": out.reused_patches,
                     "difference": out.difference, "full_ms": full_ms, "reuse_ms": ms,
                     **compare(out.result, full, pipeline.geometry)})
    return rows


def summary(name: str, threshold: float, rows: list) -> dict:
    later = rows[1:]                                         # the first frame is computed whole either way
    statuses = [r["status"] for r in later]
    patches = sum(r["encoded"] + r["reused"] for r in later if r["status"] != "reused")
    full_ms, reuse_ms = sum(r["full_ms"] for r in later), sum(r["reuse_ms"] for r in later)
    return {"scene": name, "threshold": threshold, "frames": len(rows),
            "computed": statuses.count("computed"), "partial": statuses.count("partial"),
            "reused": statuses.count("reused"),
            "patches_reused_pct": 100.0 * sum(r["reused"] for r in later if r["status"] != "reused") / patches
            if patches else None,
            "cos_min": min(r["cos_min"] for r in rows), "cos_mean": float(np.mean([r["cos_mean"] for r in rows])),
            "iou_min": min(r["iou"] for r in rows),
            "full_ms": full_ms / len(later), "reuse_ms": reuse_ms / len(later), "speedup": full_ms / reuse_ms}


def markdown(results: list, meta: dict) -> str:
    lines = [f"ps3-tiny, onnxruntime, {meta['steps']} look-close steps, {meta['frames']} frames per scene "
             f"({W} x {H}), refresh {meta['refresh']}; {meta['machine']}. Frames after the first: how they were "
             f"made, the high-res patches reused in partial frames, error against computing every frame whole "
             f"(all frames), and the mean wall time per frame.", "",
             "| scene | threshold | computed / partial / reused | patches reused | cos min | cos mean | "
             "selection IoU min | full ms | reuse ms | speed-up |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in results:
        pct = "-" if s["patches_reused_pct"] is None else f"{s['patches_reused_pct']:.1f}%"
        lines.append(f"| {s['scene']} | {s['threshold']:g} | {s['computed']} / {s['partial']} / {s['reused']} | {pct} | "
                     f"{s['cos_min']:.4f} | {s['cos_mean']:.5f} | {s['iou_min']:.3f} | {s['full_ms']:.0f} | "
                     f"{s['reuse_ms']:.0f} | {s['speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", help="an exported artifact (default: ps3-tiny exported to a temporary folder)")
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--refresh", type=int, default=10)
    ap.add_argument("--threshold", type=float, action="append", help="levels (repeatable; default 0 and 6)")
    ap.add_argument("--num-look-close", type=int, default=None, help="default: the artifact's (6 on ps3-tiny)")
    ap.add_argument("--scene", action="append", help="still, objects, objects-noisy, pan (repeatable; default all)")
    ap.add_argument("--out", type=Path, help="folder for stream_reuse.json and stream_reuse.md")
    args = ap.parse_args()
    thresholds = args.threshold or [0.0, 6.0]
    scenes = args.scene or ["still", "objects", "objects-noisy", "pan"]
    with tempfile.TemporaryDirectory() as tmp:
        artifact = args.artifact
        if artifact is None:
            from ps3edge.exporter.onnx_export import export
            artifact = Path(tmp) / "art"
            export("ps3-tiny", artifact)
        settings = LookCloseSettings(num_look_close=args.num_look_close)
        with Pipeline(artifact) as pipeline:
            pipeline.run_batch([scene("still", 1)[0]], settings)                       # warm up
            steps = pipeline.run_batch([scene("still", 1)[0]], settings)[0].num_steps
            results, per_frame = [], {}
            for name in scenes:
                frames = scene(name, args.frames)
                reference = [None] * len(frames)                                        # shared by the thresholds
                for threshold in thresholds:
                    rows = run_scene(pipeline, name, frames, threshold, args.refresh, settings, reference)
                    per_frame[f"{name}@{threshold:g}"] = rows
                    results.append(summary(name, threshold, rows))
                    print(markdown(results[-1:], {"steps": steps, "frames": args.frames, "refresh": args.refresh,
                                                  "machine": ""}).splitlines()[-1], flush=True)
    meta = {"steps": steps, "frames": args.frames, "refresh": args.refresh,
            "machine": f"{platform.machine()} {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end"}
    text = markdown(results, meta)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "stream_reuse.json").write_text(json.dumps({"meta": meta, "summary": results, "frames": per_frame},
                                                               indent=1))
        (args.out / "stream_reuse.md").write_text(text)


if __name__ == "__main__":
    main()
