"""CPU benchmark: the official ps3-torch against our runtime (torch and onnxruntime), one run.

For each model and NUM_LOOK_CLOSE it times, on the same preprocessed image and the same
machine: the official `PS3VisionModel` forward (bottom-up, output_hidden_states=True) configured
as VILA-HD configures it (the last two layers' hidden states returned,
`vision_model.num_hidden_layers_to_return = 2`; `--official-all-layers` adds its default, every
layer's, as an extra column), our look-close pipeline on the torch backend, and on the
onnxruntime backend over the exported ONNX stages. The three run in turn within each round
(rotating who goes first), so that a change in the machine's load hits all of them alike. It
prints end-to-end and per-stage medians, the official / ours ratios and onnxruntime / torch per
stage (the goal: within 1.2x), as markdown tables, with the load average before and after; it
can write JSON. Re-run it on a quiet machine for figures to quote.

    python benchmarks/cpu_stages.py                       # ps3-tiny and ps3-tiny-4k, 1 and 2 steps
    python benchmarks/cpu_stages.py --model ps3-tiny-4k --num-look-close 2 --repeat 7
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
from ps3edge.reference import (VILA_HD_LAYERS_TO_RETURN, layers_returned, official_model,  # noqa: E402
                               run_official)
from ps3edge.runtime.lookclose import Pipeline                    # noqa: E402
from ps3edge.runtime.planning import settings_from_env            # noqa: E402


STAGES = ["preprocess", "lowres", "selector", "planning", "highres", "assemble"]
BACKENDS = ("torch", "onnxruntime")


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def bench_model(name: str, depth: int | None, steps_list, warmup: int, repeat: int, workdir: Path,
                all_layers: bool = False) -> list[dict]:
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
    official = official_model(pipelines["torch"].stages["lowres"].model, VILA_HD_LAYERS_TO_RETURN)
    pixels = pipelines["torch"].pixels(sample_image())
    px = torch.from_numpy(pixels)

    rows = []
    for steps in steps_list:
        settings = settings_from_env({}, num_look_close=steps, mode="after_image")
        row = {"model": label, "num_look_close": steps, "export_s": round(export_s, 2),
               "official_config": f"last {VILA_HD_LAYERS_TO_RETURN} layers returned (VILA-HD)"}
        runs = {"official": lambda: run_official(official, px, num_look_close=steps)}
        if all_layers:
            def all_layers_run():
                with layers_returned(official, cfg.depth):
                    run_official(official, px, num_look_close=steps)
            runs["official_all_layers"] = all_layers_run
        stage_samples = {b: {} for b in BACKENDS}
        for backend, pipe in pipelines.items():
            def once(pipe=pipe, backend=backend):
                res = pipe.run(pixels, settings)
                for k, v in res.timings_ms.items():
                    stage_samples[backend].setdefault(k, []).append(v)
                row["tokens"] = res.features.shape[1]
            runs[backend] = once
        samples = interleaved(runs, warmup, repeat)
        for key, values in samples.items():
            row[f"{key}_ms"] = round(statistics.median(values), 1)
        for backend in BACKENDS:
            row[f"{backend}_stages_ms"] = {k: round(statistics.median(v[warmup:]), 2)
                                           for k, v in stage_samples[backend].items()}
            row[f"ratio_official_over_{backend}"] = round(row["official_ms"] / row[f"{backend}_ms"], 2)
        row["onnxruntime_over_torch_stages"] = {
            k: round(row["onnxruntime_stages_ms"][k] / row["torch_stages_ms"][k], 2)
            for k in ("lowres", "selector", "highres") if row["torch_stages_ms"].get(k)}
        rows.append(row)
        print(f"  {label} NUM_LOOK_CLOSE={steps}: official {row['official_ms']:.0f} ms, "
              f"torch {row['torch_ms']:.0f} ms, onnxruntime {row['onnxruntime_ms']:.0f} ms", flush=True)
    return rows


def interleaved(runs: dict, warmup: int, repeat: int) -> dict:
    """Times of each run, taken in turn within each round (the first of a round rotates);
    warm-up rounds first, untimed."""
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name]()
    samples = {name: [] for name in names}
    for i in range(repeat):
        for name in names[i % len(names):] + names[: i % len(names)]:
            samples[name].append(timed(runs[name]))
    return samples


def markdown(rows: list[dict]) -> str:
    extra = any("official_all_layers_ms" in r for r in rows)
    head = "| model | steps | tokens | official ms (VILA-HD: last 2 layers) | ours torch ms | ours ORT ms | official/torch | official/ORT |"
    if extra:
        head += " official ms (all layers returned) |"
    lines = [head, "|" + "---|" * head.count(" |")]
    for r in rows:
        line = (f"| {r['model']} | {r['num_look_close']} | {r['tokens']} | {r['official_ms']:.1f} | "
                f"{r['torch_ms']:.1f} | {r['onnxruntime_ms']:.1f} | {r['ratio_official_over_torch']:.2f} | "
                f"{r['ratio_official_over_onnxruntime']:.2f} |")
        if extra:
            line += f" {r.get('official_all_layers_ms', float('nan')):.1f} |"
        lines.append(line)
    lines += ["", "| model | steps | backend | " + " | ".join(STAGES) + " |", "|---|---|---|" + "---|" * len(STAGES)]
    for r in rows:
        for backend in BACKENDS:
            st = r[f"{backend}_stages_ms"]
            lines.append(f"| {r['model']} | {r['num_look_close']} | {backend} | "
                         + " | ".join(f"{st.get(k, 0):.1f}" for k in STAGES) + " |")
    lines += ["", "| model | steps | ORT / torch lowres | selector | highres |", "|---|---|---|---|---|"]
    for r in rows:
        q = r["onnxruntime_over_torch_stages"]
        lines.append(f"| {r['model']} | {r['num_look_close']} | "
                     + " | ".join(f"{q[k]:.2f}" if k in q else "" for k in ("lowres", "selector", "highres")) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", help="preset (repeatable); default ps3-tiny and ps3-tiny-4k")
    ap.add_argument("--depth", type=int, default=None, help="truncate the presets to their first N blocks")
    ap.add_argument("--num-look-close", type=int, action="append", help="steps (repeatable); default 1 and 2")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--official-all-layers", action="store_true",
                    help="also time the official code in its default configuration (every layer returned)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    models = args.model or ["ps3-tiny", "ps3-tiny-4k"]
    steps = args.num_look_close or [1, 2]

    import onnxruntime
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime {onnxruntime.__version__}; "
          f"load average {load()}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ps3edge-bench-") as tmp:
        for name in models:
            rows += bench_model(name, args.depth, steps, args.warmup, args.repeat, Path(tmp), args.official_all_layers)
    print()
    print(markdown(rows))
    print(f"\nload average after: {load()} (on {os.cpu_count()} cores; figures to quote need a quiet machine)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    sys.exit(main())
