"""The one TensorRT check: build, compare with onnxruntime fp32, time - on a machine WITH TensorRT.

    python benchmarks/trt_check.py                                  # ps3-tiny and ps3-4k, everything
    python benchmarks/trt_check.py --model ps3-tiny --route onnx --precision fp16
    python benchmarks/trt_check.py --artifacts art/ --json rows.json

For every model (exported here into --out, or the artifact directories given), every route
(`onnx`: TensorRT's ONNX parser; `torch-tensorrt`: Torch-TensorRT dynamo) and every precision
(fp32, fp16) it builds the engines with `ps3edge build`'s code, then

- parity, stage by stage: each engine gets exactly the inputs that onnxruntime fp32 (CPU) got and
  its outputs are compared with onnxruntime's: max |diff|, min per-row cosine, and for the
  selector whether the planned selection is identical; then the whole look-close loop end to end;
- speed: each engine's call (device-resident inputs, copies into its buffers included) timed with
  CUDA events, median of --repeat, and the end-to-end loop's wall time.

It prints one table and exits 1 if any row is outside the precision's tolerance
(ps3edge.defaults.TOLERANCES). Without TensorRT (or without a GPU) it exits 2 with one line that
says what is missing. Engines are cached in --out/engine-cache, so a rerun only re-measures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from ps3edge import defaults
from ps3edge.errors import Ps3EdgeError

ROUTES = ("onnx", "torch-tensorrt")
PRECISIONS = ("fp32", "fp16")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", action="append", help="preset to export and check (repeatable); default ps3-tiny, ps3-4k")
    p.add_argument("--artifacts", action="append", type=Path, help="check this exported artifact instead (repeatable)")
    p.add_argument("--route", action="append", choices=ROUTES, help="build route (repeatable); default both")
    p.add_argument("--precision", action="append", choices=PRECISIONS, help="precision (repeatable); default both")
    p.add_argument("--out", type=Path, default=Path("trt-check"), help="work directory (exports, engines, caches)")
    p.add_argument("--num-look-close", default=None, help="look-close steps of the end-to-end run (default 6)")
    p.add_argument("--max-look-close", default=None, help="T_max of the highres profile (default: the model's)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--json", type=Path, help="also write the rows as JSON")
    return p.parse_args(argv)


def fail(message: str, code: int = 2):
    print(f"trt_check: {message}", file=sys.stderr)
    sys.exit(code)


def require_tensorrt_and_gpu():
    from ps3edge.engines.platform import import_tensorrt, machine_facts

    try:
        trt = import_tensorrt()
        return trt, machine_facts(trt)
    except Ps3EdgeError as e:
        fail(str(e))


# --- artifacts ---------------------------------------------------------------------------------------
def exported(model: str, out: Path) -> Path:
    from ps3edge.exporter.onnx_export import export

    art = out / model / "artifacts"
    if not (art / defaults.MANIFEST_NAME).is_file():
        print(f"exporting {model} -> {art}", flush=True)
        export(model, art, overwrite=True, progress=lambda m: print(f"  {m}", flush=True))
    return art


def linked_copy(art: Path, dst: Path) -> Path:
    """A copy of the artifact whose large files are hard links: each build writes its own manifest
    and engines (both through rename, so the links are never written through)."""
    if dst.exists():
        shutil.rmtree(dst)

    def link(src, target):
        try:
            os.link(src, target)
        except OSError:
            shutil.copy2(src, target)
    shutil.copytree(art, dst, copy_function=link)
    return dst


# --- reference ---------------------------------------------------------------------------------------
def reference_run(art: Path, image, settings):
    """onnxruntime fp32 on the CPU: every stage's inputs and outputs, and the end-to-end result."""
    from ps3edge.runtime.runners.onnxruntime import ENV_ORT_PROVIDERS
    from ps3edge.runtime.lookclose import Pipeline

    saved = os.environ.get(ENV_ORT_PROVIDERS)
    os.environ[ENV_ORT_PROVIDERS] = "CPUExecutionProvider"         # the stages load in Pipeline()
    try:
        pipe = Pipeline(art, "onnxruntime")
    finally:
        if saved is None:
            del os.environ[ENV_ORT_PROVIDERS]
        else:
            os.environ[ENV_ORT_PROVIDERS] = saved
    pixels = pipe.pixels(image)
    low = pipe.stages["lowres"].infer({"pixels": pixels})
    sel_feed = {"selection_features": low["selection_features"], "conv_features": low["conv_features"],
                "prompt": pipe.prompt(settings, None)}
    prob = pipe.stages["selector"].infer(sel_feed)["prob"]
    result = pipe.run_from_lowres(low, settings)
    return {"pipeline": pipe, "pixels": pixels, "low": low, "sel_feed": sel_feed, "prob": prob,
            "settings": settings, "result": result}


def highres_calls(ref: dict, steps_per_call: int | None) -> tuple[list, list]:
    """The highres calls of the loop for the reference's probability map, grouped as the runtime
    groups them for an engine taking at most `steps_per_call` steps, and onnxruntime's outputs."""
    from ps3edge.runtime.batching import highres_feeds
    from ps3edge.runtime.planning import plan, resolve

    pipe = ref["pipeline"]
    the_plan = plan(ref["prob"][0], resolve(ref["settings"], pipe.geometry), pipe.geometry)
    calls = list(highres_feeds(the_plan, ref["low"], pipe.geometry, steps_per_call))
    return calls, [pipe.stages["highres"].infer(feed) for feed in calls]


# --- measuring ---------------------------------------------------------------------------------------
def cuda_median_ms(stage, feed: dict, warmup: int, repeat: int) -> float:
    import torch

    dev = {k: torch.from_numpy(np.ascontiguousarray(v)).cuda() for k, v in feed.items()}
    for _ in range(warmup):
        stage.infer_device(dev)
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stage.stream)               # the stream all engines of an artifact share
        stage.infer_device(dev)
        end.record(stage.stream)
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def compare(ours: dict, ref: dict, names) -> tuple[float, float]:
    from ps3edge.compare import feature_diff

    worst_abs, worst_cos = 0.0, 1.0
    for n in names:
        a, b = np.asarray(ours[n], np.float64), np.asarray(ref[n], np.float64)
        if a.shape != b.shape:
            return float("inf"), -1.0
        d, c = feature_diff(a, b)
        worst_abs, worst_cos = max(worst_abs, d), min(worst_cos, c)
    return worst_abs, worst_cos


def check_one(art: Path, ref: dict, image, settings, route: str, precision: str, args, model: str) -> list[dict]:
    from ps3edge.engines.builder import BuildOptions, build
    from ps3edge.compare import selection_iou
    from ps3edge.runtime.runners import close_all, load_stages
    from ps3edge.runtime.lookclose import Pipeline
    from ps3edge.runtime.planning import plan, resolve

    tol = defaults.TOLERANCES[precision]
    work = linked_copy(art, args.out / model / f"{route}-{precision}")
    options = BuildOptions(precision=precision, via=route, max_look_close=args.max_look_close,
                           engine_cache=args.out / "engine-cache", timing_cache=args.out / "timing.cache")
    t0 = time.perf_counter()
    try:
        manifest = build(work, options, progress=lambda m: print(f"  [{model} {route} {precision}] {m}", flush=True))
    except Ps3EdgeError as e:
        return [{"model": model, "route": route, "precision": precision, "stage": "build", "ok": False,
                 "note": str(e)}]
    build_s = time.perf_counter() - t0
    stages = load_stages(work, manifest, "tensorrt")
    rows = []

    def row(stage, max_abs, min_cos, ms, selection="", ok=None, note=""):
        good = (max_abs <= tol["max_abs"] and min_cos >= tol["min_cosine"]) if ok is None else ok
        rows.append({"model": model, "route": route, "precision": precision, "stage": stage,
                     "max_abs": max_abs, "min_cosine": min_cos, "selection": selection, "median_ms": ms,
                     "ok": bool(good), "note": note})

    low = stages["lowres"].infer({"pixels": ref["pixels"]})
    d, c = compare(low, ref["low"], low.keys())
    row("lowres", d, c, cuda_median_ms(stages["lowres"], {"pixels": ref["pixels"]}, args.warmup, args.repeat),
        note=f"build {build_s:.0f} s")
    prob = stages["selector"].infer(ref["sel_feed"])
    pipe = ref["pipeline"]
    ours_plan = plan(prob["prob"][0], resolve(settings, pipe.geometry), pipe.geometry)
    ref_plan = plan(ref["prob"][0], resolve(settings, pipe.geometry), pipe.geometry)
    same = all(np.array_equal(a, b) for a, b in zip(ours_plan.selection_maps, ref_plan.selection_maps))
    iou = min(selection_iou(a, b) for a, b in zip(ours_plan.selection_maps, ref_plan.selection_maps))
    d, c = compare(prob, {"prob": ref["prob"]}, ["prob"])
    row("selector", d, c, cuda_median_ms(stages["selector"], ref["sel_feed"], args.warmup, args.repeat),
        selection="identical" if same else f"IoU {iou:.4f}",
        ok=d <= max(tol["max_abs"], defaults.PROB_MAX_ABS_FP32) and same)
    for feed, expected in zip(*highres_calls(ref, stages["highres"].max_steps_per_call)):
        T, N = feed["positions"].shape
        out = stages["highres"].infer(feed)
        d, c = compare(out, expected, ["highres_features"])
        row(f"highres {T}x{N}", d, c, cuda_median_ms(stages["highres"], feed, args.warmup, args.repeat))
    close_all(stages)                            # the engines of every route and precision add up otherwise
    # end to end, through the runtime's own loop
    with Pipeline(work, "tensorrt") as trt_pipe:
        result = trt_pipe.run(image, settings)
        walls = []
        for _ in range(max(1, args.repeat // 4)):
            t0 = time.perf_counter()
            trt_pipe.run(image, settings)
            walls.append((time.perf_counter() - t0) * 1e3)
    ref_result = ref["result"]
    same = all(np.array_equal(a, b) for a, b in zip(result.plan.selection_maps, ref_result.plan.selection_maps))
    d, c = compare({"f": result.features}, {"f": ref_result.features}, ["f"])
    row("end to end", d, c, statistics.median(walls), selection="identical" if same else "differs",
        ok=same and d <= tol["max_abs"] and c >= tol["min_cosine"], note=f"{result.features.shape[1]} tokens, wall ms")
    return rows


def print_table(rows: list[dict], facts: dict) -> None:
    print(f"\nTensorRT {facts['tensorrt_version']}, {facts['gpu_name']} (SM{facts['sm']}), CUDA {facts['cuda_version']}")
    head = f"{'model':<12} {'route':<15} {'prec':<5} {'stage':<18} {'max abs':>10} {'min cos':>10} {'selection':<10} {'median ms':>10}  ok"
    print(head)
    print("-" * len(head))
    for r in rows:
        if r["stage"] == "build":
            print(f"{r['model']:<12} {r['route']:<15} {r['precision']:<5} {'build':<18} {'':>10} {'':>10} {'':<10} {'':>10}  "
                  f"FAIL  {r['note']}")
            continue
        print(f"{r['model']:<12} {r['route']:<15} {r['precision']:<5} {r['stage']:<18} {r['max_abs']:>10.2e} "
              f"{r['min_cosine']:>10.6f} {r['selection']:<10} {r['median_ms']:>10.2f}  {'ok' if r['ok'] else 'FAIL'}"
              + (f"  {r['note']}" if r["note"] else ""))


def main(argv=None) -> int:
    args = parse_args(argv)
    trt, facts = require_tensorrt_and_gpu()
    routes = args.route or list(ROUTES)
    if "torch-tensorrt" in routes:
        try:
            import torch_tensorrt  # noqa: F401
        except ImportError:
            if args.route:
                fail("Torch-TensorRT is not installed: pip install torch-tensorrt, or drop --route torch-tensorrt")
            print("Torch-TensorRT is not installed: checking the onnx route only", flush=True)
            routes = ["onnx"]
    from ps3edge.demo import sample_image
    from ps3edge.artifact.manifest import load_manifest
    from ps3edge.runtime.planning import settings_from_env

    args.out.mkdir(parents=True, exist_ok=True)
    image = sample_image()
    settings = settings_from_env(env={}, num_look_close=args.num_look_close or defaults.DEFAULT_NUM_LOOK_CLOSE)
    targets = [(load_manifest(a).config.name, a) for a in (args.artifacts or [])]
    if not targets:
        targets = [(m, exported(m, args.out)) for m in (args.model or ["ps3-tiny", "ps3-4k"])]
    rows = []
    for model, art in targets:
        print(f"onnxruntime fp32 reference for {model}", flush=True)
        ref = reference_run(art, image, settings)
        for route in routes:
            for precision in args.precision or list(PRECISIONS):
                rows += check_one(art, ref, image, settings, route, precision, args, model)
    print_table(rows, facts)
    if args.json:
        args.json.write_text(json.dumps({"machine": facts, "rows": rows}, indent=2))
    bad = [r for r in rows if not r["ok"]]
    print(f"\n{len(rows) - len(bad)} ok, {len(bad)} outside tolerance")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
