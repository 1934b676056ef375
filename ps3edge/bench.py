"""`ps3edge bench`: latency, tokens and peak memory of the look-close loop, against the official code.

For each model and NUM_LOOK_CLOSE it times, on one device and one preprocessed image:
- ours: the device-resident fast path (`runtime/fast.py`), replayed from a CUDA graph on CUDA,
  end to end from normalised pixels to the assembled features; plus one instrumented eager run
  for the per-stage split (lowres, selector, planning, highres, assemble);
- preprocessing (PIL resize + normalise, on the CPU, as the official processor does);
- the official `ps3-torch` model on the same pixels, same dtype (`--against official`),
  and how far its output is from ours (selection agreement, cosine, max abs).
Warm-up first, then medians over repeats, timed with CUDA events on CUDA. Results come as rows
(JSON), a markdown table and, where matplotlib is installed, a PNG of latency against steps.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch

from .errors import Ps3EdgeError
from .model import preset, random_model
from .parity import feature_diff
from .runtime.fast import DTYPES, FastLookClose
from .runtime.planning import LookCloseSettings, plan, step_counts


@dataclass
class Timer:
    device: torch.device

    def measure(self, fn, warmup: int, repeat: int) -> float:
        """Median milliseconds of fn()."""
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(repeat):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples)

    def stages(self, fast: FastLookClose, pixels, counts) -> dict:
        """One eager run split into stages (events between stages on CUDA)."""
        marks = []

        def mark(name):
            if self.device.type == "cuda":
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
                marks.append((name, ev))
            else:
                marks.append((name, time.perf_counter()))

        mark("start")
        fast.forward(pixels, counts, timer=mark)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return {n: round(e0.elapsed_time(e1), 3) for (_, e0), (n, e1) in zip(marks, marks[1:])}
        return {n: round((t1 - t0) * 1e3, 3) for (_, t0), (n, t1) in zip(marks, marks[1:])}


def compare(ours: np.ndarray, ours_sel: np.ndarray, official_published, official_same_selection) -> dict:
    """Two separate questions, two answers.

    Selection: ours against the official code as run (its own top-k), on the cumulative maps.
    Features: ours against the official code made to take OUR patches at every step, so that
    each token sees the same step-mates (a different split of the same patches into steps
    changes the attention context and hence the features, which is not a precision question).
    """
    official_sel = np.concatenate([m[0].reshape(-1).float().cpu().numpy()
                                   for m in official_published.selection_maps])
    inter = np.logical_and(ours_sel > 0, official_sel > 0).sum()
    union = np.logical_or(ours_sel > 0, official_sel > 0).sum()
    row = {"selection_identical": bool(np.array_equal(ours_sel > 0, official_sel > 0)),
           "selection_iou": float(inter / union) if union else 1.0,
           "official_tokens": int(official_published.hidden_states[-1].shape[1])}
    max_abs, min_cos = feature_diff(ours, official_same_selection)
    row.update(min_cosine=min_cos, max_abs=max_abs)
    return row


def bench_model(name: str, *, device: str, dtype: str, steps_list, against_official: bool,
                warmup: int, repeat: int, graphs: bool = True, depth: int | None = None,
                pin_ties: bool = False, progress=None) -> list[dict]:
    """Rows for one preset. pin_ties: compare against the official run with its top-k ties
    pinned to our rule (reference.stable_topk), so that 4K selections can be identical too."""
    say = progress or (lambda msg: None)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise Ps3EdgeError("--device cuda asked for, but torch sees no CUDA device here")
    if dtype not in DTYPES:
        raise Ps3EdgeError(f"--dtype must be one of {', '.join(DTYPES)}")
    cfg = preset(name)
    if depth is not None:
        cfg = cfg.replace(depth=depth, select_layers=tuple(min(l, depth - 1) for l in cfg.select_layers))
    label = name if depth is None else f"{name}-depth{depth}"
    say(f"{label}: building seeded weights")
    model = random_model(cfg)
    official = None
    if against_official:
        from .reference import official_model
        official = official_model(model).to(device=dev, dtype=DTYPES[dtype])
    fast = FastLookClose(model, device=dev, dtype=dtype)
    timer = Timer(dev)

    from .demo import sample_image
    from .runtime.preprocess import preprocess
    image = sample_image()
    t0 = time.perf_counter()
    pixels_np = preprocess(image, cfg.max_size, cfg.image_mean, cfg.image_std)
    preprocess_ms = (time.perf_counter() - t0) * 1e3
    pixels = torch.from_numpy(pixels_np).to(dev, DTYPES[dtype])

    rows = []
    for steps in steps_list:
        settings = LookCloseSettings(num_look_close=steps, mode="after_image")
        counts = step_counts(settings, fast.geometry)
        say(f"{label}: NUM_LOOK_CLOSE={steps}")
        run = (lambda: fast.graphed(pixels, counts)) if graphs else (lambda: fast.forward(pixels, counts))
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        ours_ms = timer.measure(run, warmup, repeat)
        peak = torch.cuda.max_memory_allocated() / 2 ** 30 if dev.type == "cuda" else None
        result = run()
        ours = result.features[0].float().cpu().numpy()
        row = {"model": label, "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
               "dtype": dtype, "num_look_close": steps, "tokens": int(ours.shape[0]),
               # highres calls as {N tokens: T steps}
               "highres_calls": {str(n): [sum(c) for c in counts].count(n) for n in sorted({sum(c) for c in counts})},
               "ours_ms": round(ours_ms, 3), "cuda_graph": graphs and dev.type == "cuda",
               "preprocess_cpu_ms": round(preprocess_ms, 1),
               "stages_ms": timer.stages(fast, pixels, counts),
               "peak_gib": None if peak is None else round(peak, 3)}
        if official is not None:
            def official_run():
                with torch.no_grad():
                    return official(pixels, num_look_close=steps)
            row["official_ms"] = round(timer.measure(official_run, warmup, repeat), 3)
            row["speedup"] = round(row["official_ms"] / ours_ms, 2)
            from .reference import run_official_with_selection, stable_topk
            if pin_ties:
                with stable_topk():
                    published = official_run()
            else:
                published = official_run()
            the_plan = plan(result.prob.float().cpu().numpy(), settings, fast.geometry)
            same_selection = run_official_with_selection(official, pixels, the_plan.step_maps(fast.geometry))
            row["official_ties"] = "pinned" if pin_ties else "published"
            row.update(compare(ours, result.selection.cpu().numpy(), published, same_selection))
        rows.append(row)
    return rows


def fit_per_step(rows: list[dict], key: str) -> float | None:
    """Least-squares slope of latency against NUM_LOOK_CLOSE (ms per step)."""
    pts = [(r["num_look_close"], r[key]) for r in rows if key in r]
    if len(pts) < 2:
        return None
    x, y = np.array(pts, dtype=float).T
    return float(np.polyfit(x, y, 1)[0])


def markdown(rows: list[dict]) -> str:
    head = ("| model | device | dtype | steps | tokens | ours ms | official ms | speedup | lowres | selector "
            "| planning | highres | assemble | peak GiB | selection vs official | min cos (same selection) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        st = r["stages_ms"]
        sel = "" if "selection_identical" not in r else (
            "identical" if r["selection_identical"] else f"IoU {r['selection_iou']:.3f}")
        cos = r.get("min_cosine")
        lines.append(
            f"| {r['model']} | {r['device']} | {r['dtype']} | {r['num_look_close']} | {r['tokens']} | "
            f"{r['ours_ms']:.1f} | {r.get('official_ms', float('nan')):.1f} | {r.get('speedup', float('nan')):.2f} | "
            + " | ".join(f"{st.get(k, 0):.2f}" for k in ("lowres", "selector", "planning", "highres", "assemble"))
            + f" | {r['peak_gib'] if r['peak_gib'] is not None else ''} | {sel} | "
            + ("" if cos is None else f"{cos:.5f}") + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path) -> bool:
    """Latency against NUM_LOOK_CLOSE, ours and official, one line per model. False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for model in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == model]
        x = [r["num_look_close"] for r in rs]
        ax.plot(x, [r["ours_ms"] for r in rs], "o-", label=f"{model} ps3edge")
        if "official_ms" in rs[0]:
            ax.plot(x, [r["official_ms"] for r in rs], "s--", label=f"{model} official")
    ax.set_xlabel("NUM_LOOK_CLOSE")
    ax.set_ylabel("latency, ms (median)")
    ax.set_title(f"PS3 look-close, {rows[0]['device']}, {rows[0]['dtype']}, batch 1")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True
