"""The GPU check's table: ps3-1.5k and ps3-4k at NUM_LOOK_CLOSE 1 and 6, B 1 and 8 images, ours
against the official code on the same card in one run, with peak memory and bf16 parity.

For each model (seeded weights at the real widths, built once) and each (NUM_LOOK_CLOSE, B), on B
views of one frame (the bench's views: mirrored, flipped, shifted) preprocessed as the official
processor does, the same device pixels for both sides:

- ours: the torch backend's fast path (`runtime/fast.py`, what `ps3edge.load(art, backend="torch",
  device="cuda")` runs): all B images in one program replayed from a CUDA graph; ms a batch, ms an
  image, images/s; also with the features and probabilities copied to the host as float32, which
  `Encoder.run_batch` returns (the torch backend's run_loop); one eager run split per stage (ms
  and torch's peak CUDA allocation per stage, runtime/memory.py);
- the official ps3-torch model configured as VILA-HD configures it (the last 2 blocks' hidden
  states returned), given the B images as one batch;
- peak memory of each side's run: torch.cuda.max_memory_allocated from the first (eager) run
  through the CUDA graph's capture and the timed replays, next to what was allocated before it
  (both models' weights: `resident_gib`); each row's CUDA graph is dropped after it;
- at B=1 the bf16 parity: selection against the official run as published, and the features
  against the official code made to take our patches (min per-token cosine; the check asks for
  >= 0.99 in bf16).

Rows go to --json and --markdown after every row (written whole each time), so that a run cut
off by the time guard keeps what it measured; --deadline-s stops starting rows after that many
seconds from the start, --run-budget-s caps the timed repeats of one measurement.

    python benchmarks/gpu_table.py --image frame.png --json table.json --markdown table.md
    python benchmarks/gpu_table.py --models ps3-tiny,ps3-tiny-4k --num-look-close 1,2 --batch 1,2 \\
        --device cpu --warmup 0 --repeat 1                                     # a dry run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ps3edge.bench import OFFICIAL_CONFIG, Timer, compare, script_device      # noqa: E402
from ps3edge.model import preset, random_model                               # noqa: E402
from ps3edge.reference import VILA_HD_LAYERS_TO_RETURN, official_model, run_official_with_selection   # noqa: E402
from ps3edge.runtime.fast import DTYPES, FastLookClose                       # noqa: E402
from ps3edge.runtime.planning import LookCloseSettings, plan, resolve       # noqa: E402
from ps3edge.runtime.preprocess import preprocess                           # noqa: E402
from ps3edge.throughput import batch_images                                 # noqa: E402

GIB = 2 ** 30
# the fast path's stages (planning includes cutting the selected patches from the pixels)
STAGES = ("lowres", "selector", "planning", "highres", "assemble")


def measure(timer: Timer, fn, warmup: int, repeat: int, budget_s: float) -> float:
    """Median ms of fn() after `warmup` runs: at most `repeat` runs, and no more once they
    took `budget_s` seconds and were 3 or more."""
    for _ in range(warmup):
        fn()
    samples = [timer.measure(fn, 0, 1)]
    while len(samples) < repeat and (len(samples) < 3 or sum(samples) < budget_s * 1e3):
        samples.append(timer.measure(fn, 0, 1))
    return float(np.median(samples))


class Peak:
    """torch's peak CUDA allocation over a block of runs, and what was allocated before it."""

    def __init__(self, dev: torch.device):
        self.cuda = dev.type == "cuda"
        self.resident = self.peak = None

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            self.resident = torch.cuda.memory_allocated() / GIB
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() / GIB


def drop_graphs(fast: FastLookClose, dev: torch.device):
    """Free the captured CUDA graphs and their memory pools, so that the next row's peak and
    resident figures hold this row's weights and nothing of its graph."""
    for name in ("_graphs", "_seen"):
        cache = getattr(fast, name, None)
        if cache is not None:
            cache.clear()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def to_host(out):
    """What the torch backend's run_loop copies to the host for run_batch's results."""
    return out.features.float().cpu().numpy(), out.prob.float().cpu().numpy(), [s.cpu().numpy() for s in out.steps]


class ModelBench:
    """One model's two sides on the device, built once (seeded weights): ours (the fast path) and
    the official code as VILA-HD configures it, and B views of the frame; `row` measures one
    (NUM_LOOK_CLOSE, B)."""

    def __init__(self, name: str, args, dev: torch.device, frame, say):
        t0 = time.monotonic()
        self.name, self.args, self.dev, self.frame = name, args, dev, frame
        cfg = preset(name)
        model = random_model(cfg)
        dtype = DTYPES[args.dtype]
        self.official = official_model(model, VILA_HD_LAYERS_TO_RETURN).to(device=dev, dtype=dtype)
        self.fast = FastLookClose(model, device=dev, dtype=args.dtype)       # moves `model` to dev, dtype
        views = batch_images(frame, max(args.batch))
        host = np.concatenate([preprocess(v, cfg.max_size, cfg.image_mean, cfg.image_std) for v in views])
        self.pixels = torch.from_numpy(host).to(dev, dtype)
        self.card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
        self.timer = Timer(dev)
        self.build_s = round(time.monotonic() - t0, 1)
        say(f"{name}: built (ours and official, {args.dtype}) in {self.build_s} s")

    def row(self, steps: int, b: int) -> dict:
        args, dev, fast, official, timer = self.args, self.dev, self.fast, self.official, self.timer
        t1 = time.monotonic()
        schedule = resolve(LookCloseSettings(num_look_close=steps, mode="after_image"), fast.geometry)
        counts = schedule.counts
        px = self.pixels[:b]
        # on CUDA the first run is eager and the second captures the graph: both in the peak
        warmup = max(args.warmup, 2) if dev.type == "cuda" else args.warmup
        with Peak(dev) as ours_peak:
            ours_ms = measure(timer, lambda: fast.graphed(px, counts), warmup, args.repeat, args.run_budget_s)
        host_ms = measure(timer, lambda: to_host(fast.graphed(px, counts)), min(1, args.warmup), args.repeat,
                          args.run_budget_s / 2)
        stages_ms, stages_peak = timer.stages(fast, px, counts)
        result = fast.forward(px, counts)
        drop_graphs(fast, dev)

        def official_run():
            with torch.no_grad():
                return official(px, num_look_close=steps)
        with Peak(dev) as official_peak:
            official_ms = measure(timer, official_run, args.warmup, args.repeat, args.run_budget_s)
        row = {"model": self.name, "device": self.card, "dtype": args.dtype, "num_look_close": steps, "batch": b,
               "image": f"{self.frame.width}x{self.frame.height}", "tokens": int(result.features.shape[1]),
               "ours_ms": round(ours_ms, 3), "ours_ms_per_image": round(ours_ms / b, 3),
               "ours_images_per_s": round(1e3 * b / ours_ms, 3), "ours_to_host_ms": round(host_ms, 3),
               "cuda_graph": dev.type == "cuda",
               "ours_peak_gib": _round(ours_peak.peak), "ours_resident_gib": _round(ours_peak.resident),
               "stages_ms": stages_ms, "stages_peak_mib": stages_peak,
               "official_ms": round(official_ms, 3), "official_ms_per_image": round(official_ms / b, 3),
               "official_images_per_s": round(1e3 * b / official_ms, 3),
               "official_peak_gib": _round(official_peak.peak),
               "official_resident_gib": _round(official_peak.resident), "official_config": OFFICIAL_CONFIG,
               "speedup": round(official_ms / ours_ms, 2)}
        if b == 1:
            row.update(parity(official, fast, px, steps, schedule, result))
        del result
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        row["seconds"] = round(time.monotonic() - t1, 1)
        return row


def parity(official, fast, px, steps: int, schedule, result) -> dict:
    """Selection against the official run as published; features against the official code made
    to take our patches (same step-mates, so token for token), in the run's dtype."""
    with torch.no_grad():
        published = official(px, num_look_close=steps)
    the_plan = plan(result.prob[0].float().cpu().numpy(), schedule, fast.geometry)
    same_selection = run_official_with_selection(official, px, the_plan.step_maps(fast.geometry))
    return compare(result.features[0].float().cpu().numpy(), result.selection[0].cpu().numpy(), published,
                   same_selection)


def _round(x):
    return None if x is None else round(x, 3)


def line(r: dict) -> str:
    text = (f"{r['model']} NUM_LOOK_CLOSE={r['num_look_close']} B={r['batch']}: ours {r['ours_ms']:.1f} ms "
            f"({r['ours_images_per_s']:.1f} images/s), official {r['official_ms']:.1f} ms, {r['speedup']:.2f}x")
    if r["ours_peak_gib"] is not None:
        text += f"; peak GiB ours {r['ours_peak_gib']:.2f} / official {r['official_peak_gib']:.2f}"
    if "min_cosine" in r:
        selection = "identical" if r["selection_identical"] else f"IoU {r['selection_iou']:.3f}"
        text += f"; min cos {r['min_cosine']:.5f}, selection {selection}"
    return text + f" [{r['seconds']} s]"


def markdown(rows: list[dict]) -> str:
    def f(v, spec):
        return "" if v is None else format(v, spec)

    def stage_peaks(r):
        per = r["stages_peak_mib"].get("cuda") or r["stages_peak_mib"].get("host", {})
        return " / ".join(f"{per.get(k, 0):.0f}" for k in STAGES)

    cols = [
        ("model", lambda r: r["model"]), ("NLC", lambda r: r["num_look_close"]), ("B", lambda r: r["batch"]),
        ("tokens/image", lambda r: r["tokens"]),
        ("ours ms (batch)", lambda r: f"{r['ours_ms']:.1f}"), ("ours ms/image", lambda r: f"{r['ours_ms_per_image']:.1f}"),
        ("ours images/s", lambda r: f"{r['ours_images_per_s']:.1f}"),
        ("ours + to host ms", lambda r: f"{r['ours_to_host_ms']:.1f}"),
        ("official ms (batch; VILA-HD: last 2 layers)", lambda r: f"{r['official_ms']:.1f}"),
        ("official images/s", lambda r: f"{r['official_images_per_s']:.1f}"),
        ("speedup", lambda r: f"{r['speedup']:.2f}x"),
        ("peak GiB ours / official (resident before)", lambda r: "" if r["ours_peak_gib"] is None else
         f"{r['ours_peak_gib']:.2f} / {r['official_peak_gib']:.2f} ({r['ours_resident_gib']:.2f})"),
        ("stages ms lowres / selector / planning / highres / assemble", lambda r: " / ".join(
            f"{r['stages_ms'].get(k, 0):.1f}" for k in STAGES)),
        ("stage peaks MiB (same order; CUDA, else host RSS)", stage_peaks),
        ("selection vs official", lambda r: "" if "selection_identical" not in r else
         ("identical" if r["selection_identical"] else f"IoU {r['selection_iou']:.3f}")),
        ("min cos (same selection)", lambda r: f(r.get("min_cosine"), ".5f")),
    ]
    card = rows[0]["device"] if rows else "?"
    graph = " (CUDA graph)" if rows and rows[0]["cuda_graph"] else ""
    head = (f"{card}, {rows[0]['dtype'] if rows else ''}, one run; ours: the torch backend's fast path{graph}; "
            f"official: ps3-torch, {OFFICIAL_CONFIG}; frame {rows[0]['image'] if rows else ''}\n\n")
    lines = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
    ordered = sorted(rows, key=lambda r: (r["model"], r["batch"], r["num_look_close"]))
    lines += ["| " + " | ".join(str(get(r)) for _, get in cols) + " |" for r in ordered]
    return head + "\n".join(lines) + "\n"


def write(path: Path | None, text: str):
    if path is None:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="ps3-1.5k,ps3-4k")
    ap.add_argument("--num-look-close", default="1,6")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--image", type=Path, default=None, help="the frame (default: the sample image at 3840x2160)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--run-budget-s", type=float, default=3.0, help="seconds of timed repeats per measurement")
    ap.add_argument("--deadline-s", type=float, default=1e9, help="start no row after this many seconds")
    ap.add_argument("--sweep", default="", help="more NUM_LOOK_CLOSE values, at B=1 only (the per-step fit)")
    ap.add_argument("--reserve-per-model-s", type=float, default=75.0,
                    help="the sweep rows of a model stop this many seconds per model still to come before the deadline")
    ap.add_argument("--plot", type=Path, default=None, help="PNG of the B=1 rows against NUM_LOOK_CLOSE")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--markdown", type=Path, default=None)
    args = ap.parse_args()
    args.num_look_close = [int(x) for x in args.num_look_close.split(",")]
    args.batch = [int(x) for x in args.batch.split(",")]
    args.sweep = [int(x) for x in args.sweep.split(",") if x]
    dev = script_device(args.device)
    start = time.monotonic()
    deadline = start + args.deadline_s

    def say(msg):
        print(f"{time.strftime('%H:%M:%S')} [{time.monotonic() - start:5.1f}s] {msg}", flush=True)

    from PIL import Image
    from ps3edge.demo import sample_image
    frame = Image.open(args.image).convert("RGB") if args.image else sample_image().resize((3840, 2160), Image.BICUBIC)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}")
    rows = []

    def add(row):
        rows.append(row)
        say(line(row))
        write(args.json, json.dumps(rows, indent=2))
        write(args.markdown, markdown(rows))

    names = args.models.split(",")
    for i, name in enumerate(names):
        if time.monotonic() > deadline:
            say(f"{name}: skipped: the time guard (--deadline-s) has passed")
            continue
        bench = ModelBench(name, args, dev, frame, say)
        for steps in args.num_look_close:
            for b in args.batch:
                if time.monotonic() > deadline:
                    say(f"{name}: NUM_LOOK_CLOSE={steps} B={b} skipped: the time guard (--deadline-s) has passed")
                    continue
                add(bench.row(steps, b))
        # the per-step sweep at B=1, while the models that follow still have their reserve
        for steps in args.sweep:
            if time.monotonic() > deadline - args.reserve_per_model_s * (len(names) - 1 - i):
                say(f"{name}: sweep NUM_LOOK_CLOSE={steps} skipped: the time guard")
                continue
            add(bench.row(steps, 1))
        del bench
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    ones = sorted((r for r in rows if r["batch"] == 1), key=lambda r: (r["model"], r["num_look_close"]))
    if ones:
        from ps3edge import bench as benchmod
        print("\n".join(benchmod.summary(ones)))
        if args.plot and benchmod.plot(ones, args.plot):
            say(f"wrote {args.plot} (B=1: ms against NUM_LOOK_CLOSE, ours and official)")
    print(markdown(rows) if rows else "no rows")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
