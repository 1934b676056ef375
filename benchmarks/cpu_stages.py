"""CPU benchmark: the official ps3-torch against our runtime (torch and onnxruntime), one run.

For each model and NUM_LOOK_CLOSE it times, on the same preprocessed image and the same
machine: the official `PS3VisionModel` forward (bottom-up, output_hidden_states=True), our
look-close pipeline on the torch backend, and on the onnxruntime backend over the exported ONNX
stages. It prints per-stage medians, end-to-end medians and the official / ours ratios, as a
markdown table, and can write JSON.

    python benchmarks/cpu_stages.py                       # ps3-tiny and ps3-tiny-4k, 1 and 2 steps
    python benchmarks/cpu_stages.py --model ps3-1.5k --depth 2 --num-look-close 1

`--depth N` truncates a preset to its first N blocks (a real-width, shallow model); the model is
written as a checkpoint directory and exported from there, exactly as a user would.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ps3edge.demo import sample_image                             # noqa: E402
from ps3edge.exporter.onnx_export import export                   # noqa: E402
from ps3edge.model import preset, random_model, save_checkpoint   # noqa: E402
from ps3edge.reference import official_model, run_official        # noqa: E402
from ps3edge.runtime.lookclose import Pipeline                    # noqa: E402
from ps3edge.runtime.planning import settings_from_env            # noqa: E402


def median_ms(fn, warmup: int, repeat: int) -> tuple[float, list]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples), samples


def bench_model(name: str, depth: int | None, steps_list, warmup: int, repeat: int, workdir: Path) -> list[dict]:
    cfg = preset(name)
    if depth is not None:
        cfg = cfg.replace(depth=depth, select_layers=tuple(min(l, depth - 1) for l in cfg.select_layers))
    label = name if depth is None else f"{name} (depth {depth})"
    model = random_model(cfg)
    ckpt = workdir / f"{cfg.name}-d{cfg.depth}-ckpt"
    save_checkpoint(model, ckpt)
    t0 = time.perf_counter()
    art = workdir / f"{cfg.name}-d{cfg.depth}-artifacts"
    export(str(ckpt), art)
    export_s = time.perf_counter() - t0

    pipelines = {"torch": Pipeline(art, "torch", device="cpu"), "onnxruntime": Pipeline(art, "onnxruntime")}
    official = official_model(pipelines["torch"].stages["lowres"].model)
    pixels = pipelines["torch"].pixels(sample_image())
    px = torch.from_numpy(pixels)

    rows = []
    for steps in steps_list:
        settings = settings_from_env({}, num_look_close=steps, mode="after_image")
        row = {"model": label, "num_look_close": steps, "export_s": round(export_s, 2)}
        row["official_ms"], _ = median_ms(lambda: run_official(official, px, num_look_close=steps),
                                          warmup, repeat)
        for backend, pipe in pipelines.items():
            stage_samples = {}

            def once():
                res = pipe.run(pixels, settings)
                for k, v in res.timings_ms.items():
                    stage_samples.setdefault(k, []).append(v)
                row["tokens"] = res.features.shape[1]

            row[f"{backend}_ms"], _ = median_ms(once, warmup, repeat)
            row[f"{backend}_stages_ms"] = {k: round(statistics.median(v[warmup:]), 2)
                                           for k, v in stage_samples.items()}
            row[f"ratio_official_over_{backend}"] = round(row["official_ms"] / row[f"{backend}_ms"], 2)
        rows.append(row)
        print(f"  {label} NUM_LOOK_CLOSE={steps}: official {row['official_ms']:.0f} ms, "
              f"torch {row['torch_ms']:.0f} ms, onnxruntime {row['onnxruntime_ms']:.0f} ms", flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| model | steps | tokens | official ms | ours torch ms | ours ORT ms | official/torch | official/ORT |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['num_look_close']} | {r['tokens']} | {r['official_ms']:.1f} | "
                     f"{r['torch_ms']:.1f} | {r['onnxruntime_ms']:.1f} | {r['ratio_official_over_torch']:.2f} | "
                     f"{r['ratio_official_over_onnxruntime']:.2f} |")
    lines += ["", "| model | steps | backend | " + " | ".join(
        ["preprocess", "lowres", "selector", "planning", "highres", "assemble"]) + " |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for backend in ("torch", "onnxruntime"):
            st = r[f"{backend}_stages_ms"]
            lines.append(f"| {r['model']} | {r['num_look_close']} | {backend} | " + " | ".join(
                f"{st.get(k, 0):.1f}" for k in ["preprocess", "lowres", "selector", "planning", "highres", "assemble"])
                + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", help="preset (repeatable); default ps3-tiny and ps3-tiny-4k")
    ap.add_argument("--depth", type=int, default=None, help="truncate the presets to their first N blocks")
    ap.add_argument("--num-look-close", type=int, action="append", help="steps (repeatable); default 1 and 2")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    models = args.model or ["ps3-tiny", "ps3-tiny-4k"]
    steps = args.num_look_close or [1, 2]

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads)", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ps3edge-bench-") as tmp:
        for name in models:
            rows += bench_model(name, args.depth, steps, args.warmup, args.repeat, Path(tmp))
    print()
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
