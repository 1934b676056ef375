"""`ps3edge bench`: latency, tokens and peak memory of the look-close loop, against the official code.

For each model and NUM_LOOK_CLOSE it times, on one device and one image:
- ours: the device-resident fast path (`runtime/fast.py`), replayed from a CUDA graph on CUDA,
  end to end from normalised pixels to the assembled features; plus one instrumented eager run
  for the per-stage split (lowres, selector, planning, each highres call, assemble);
- preprocessing both ways: PIL on the CPU (what the official processor does) and ours on the
  device (`preprocess_on_device`, bit-identical), from the decoded 8-bit image;
- for a checkpoint (a directory or a Hugging Face hub id): its PS3, and for a VILA-HD one (or
  `vila-hd-tiny`) also the projector, the
  LLM prefill of the image's embeddings plus a short prompt, and greedy decode per token, with
  the transformers LLM on the same device and dtype;
- the official `ps3-torch` model on the same pixels, same dtype (`--against official`),
  configured as VILA-HD configures it (it returns the last two blocks' hidden states,
  `reference.VILA_HD_LAYERS_TO_RETURN`), and how far its output is from ours (selection
  agreement, cosine, max abs); optionally also its default configuration (every block's hidden
  states, merged across steps), as an extra labelled column.
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
from .runtime.memory import StageMemory
from .model import load_checkpoint, preset, random_model
from .model.config import PRESETS
from .model.hub import locate
from .model.weights import PS3_FILES
from .compare import feature_diff
from .runtime.fast import DTYPES, FastLookClose
from .runtime.planning import LookCloseSettings, plan, resolve

PROMPT_TOKENS = 32                  # the text part of the LLM prefill (a short question)
OFFICIAL_CONFIG = "VILA-HD: last 2 layers returned"   # how the official code is configured here


def script_device(name: str) -> torch.device:
    """The --device of a benchmarks/ script; exits in one line where CUDA is asked for and absent."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device (use --device cpu for a dry run)")
    return device


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

    def stages(self, fast: FastLookClose, pixels, counts) -> tuple[dict, dict]:
        """One eager run split into stages (events between stages on CUDA): milliseconds, and the
        peak memory of each stage in MiB (host resident; torch's CUDA allocation on a GPU)."""
        marks = []
        memory = StageMemory(self.device)

        def mark(name):
            if name != "start":
                memory.mark(name)
            if self.device.type == "cuda":
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
                marks.append((name, ev))
            else:
                marks.append((name, time.perf_counter()))

        mark("start")
        memory.start()
        fast.forward(pixels, counts, timer=mark)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            stages = {n: round(e0.elapsed_time(e1), 3) for (_, e0), (n, e1) in zip(marks, marks[1:])}
        else:
            stages = {n: round((t1 - t0) * 1e3, 3) for (_, t0), (n, t1) in zip(marks, marks[1:])}
        stages["highres"] = round(sum(v for k, v in stages.items() if k.startswith("highres[")), 3)
        peaks = {where: {k: round(v, 1) for k, v in per_stage.items()} for where, per_stage in memory.mib().items()}
        for per_stage in peaks.values():
            per_stage["highres"] = max((v for k, v in per_stage.items() if k.startswith("highres[")), default=0.0)
        return stages, peaks


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


def _load(name: str, depth: int | None, say):
    """(PS3 model, VILA-HD model or None, label) for a PS3 or VILA-HD preset, or a PS3 or VILA-HD
    checkpoint (a directory or hub id)."""
    from .llm.vila import VILA_FILES, VILA_PRESETS, build_vila, is_vila_checkpoint, load_vila

    preset_name = name in VILA_PRESETS or name in PRESETS
    checkpoint = None if preset_name else locate(name, PS3_FILES.either(VILA_FILES), say)
    say(f"{name}: {'building seeded weights' if checkpoint is None else 'loading the checkpoint'}")
    if depth is not None and (name in VILA_PRESETS or checkpoint is not None):
        raise Ps3EdgeError("--depth truncates PS3 presets; it does not apply to a VILA-HD model or a checkpoint")
    if name in VILA_PRESETS or (checkpoint is not None and is_vila_checkpoint(checkpoint.path)):
        vila = build_vila(name) if checkpoint is None else load_vila(checkpoint)
        return vila.ps3.model, vila, name
    if checkpoint is not None:
        return load_checkpoint(checkpoint).model, None, name
    cfg = preset(name)
    if depth is not None:
        if not 1 <= depth <= cfg.depth:
            raise Ps3EdgeError(f"--depth truncates {name} to its first N blocks: 1 to {cfg.depth}, got {depth}")
        cfg = cfg.replace(depth=depth, select_layers=tuple(min(l, depth - 1) for l in cfg.select_layers))
    return random_model(cfg), None, name if depth is None else f"{name}-depth{depth}"


def selection_maps(selection: np.ndarray, grids) -> list[np.ndarray]:
    """The fast path's flat (P,) selection -> one (g,g) map per high-res scale."""
    maps, start = [], 0
    for g in grids:
        maps.append(selection[start: start + g * g].reshape(g, g))
        start += g * g
    return maps


def time_vila_tail(vila, result, fast: FastLookClose, timer: "Timer", dtype: str, warmup: int, repeat: int,
                   decode_tokens: int) -> dict:
    """VILA-HD after PS3 (run at VILA's layer), on PS3's device: projector, LLM prefill, LLM
    decode per token."""
    from .model.projector import projector_cells

    dev, td, cfg = fast.device, DTYPES[dtype], fast.cfg
    features = result.features[0].float().cpu().numpy()
    maps = selection_maps(result.selection[0].cpu().numpy(), cfg.highres_grids)
    cells, _ = projector_cells(features, maps, cfg.lowres_grid)
    projector = vila.projector.to(dev, td).eval()
    llm = vila.llm.to(dev, td).eval()
    cells_t = torch.from_numpy(cells).to(dev, td)
    with torch.inference_mode():
        projector_ms = timer.measure(lambda: projector(cells_t), warmup, repeat)
        image_embeds = projector(cells_t)[None]                                   # (1,M,H)
        text_ids = torch.arange(PROMPT_TOKENS, device=dev)[None] % llm.config.vocab_size
        prompt = torch.cat([image_embeds, llm.get_input_embeddings()(text_ids)], dim=1)

        def prefill():
            return llm(inputs_embeds=prompt, use_cache=True, logits_to_keep=1)

        def prefill_and_decode():
            out = prefill()
            cache, n = out.past_key_values, prompt.shape[1]
            token = out.logits[:, -1:].argmax(-1)
            for i in range(decode_tokens):
                position = torch.tensor([[n + i]], device=dev)
                out = llm(input_ids=token, past_key_values=cache, use_cache=True, position_ids=position,
                          cache_position=position[0], logits_to_keep=1)
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            return token

        prefill_ms = timer.measure(prefill, warmup, repeat)
        total_ms = timer.measure(prefill_and_decode, warmup, repeat)
    return {"projector_ms": round(projector_ms, 3), "projector_cells": int(cells.shape[0]),
            "llm_prefill_ms": round(prefill_ms, 3), "llm_prompt_tokens": int(prompt.shape[1]),
            "llm_decode_ms_per_token": round(max(total_ms - prefill_ms, 0.0) / max(decode_tokens, 1), 3),
            "llm_decode_tokens": decode_tokens}


def bench_model(name: str, *, device: str, dtype: str, steps_list, against_official: bool,
                warmup: int, repeat: int, graphs: bool = True, depth: int | None = None,
                pin_ties: bool = False, image=None, decode_tokens: int = 16, progress=None,
                official_all_layers: bool = False) -> list[dict]:
    """Rows for one model. pin_ties: compare against the official run with its top-k ties
    pinned to our rule (reference.stable_topk), so that 4K selections can be identical too.
    image: a PIL image (default: the sample image). official_all_layers: also time the official
    code in its default configuration (every block's hidden states)."""
    say = progress or (lambda msg: None)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise Ps3EdgeError("--device cuda asked for, but torch sees no CUDA device here")
    if dtype not in DTYPES:
        raise Ps3EdgeError(f"--dtype must be one of {', '.join(DTYPES)}")
    model, vila, label = _load(name, depth, say)
    official = None
    if against_official:
        from .reference import VILA_HD_LAYERS_TO_RETURN, official_model
        official = official_model(model, VILA_HD_LAYERS_TO_RETURN).to(device=dev, dtype=DTYPES[dtype])
    if vila is not None:
        from .llm.vila import VILA_LAYER
        fast = FastLookClose(model, layer=VILA_LAYER, device=dev, dtype=dtype)
    else:
        fast = FastLookClose(model, device=dev, dtype=dtype)
    timer = Timer(dev)
    if image is None:
        from .demo import sample_image
        image = sample_image()
    pixels_np, preprocessing = _preprocessing_columns(image, model.cfg, dev, timer, repeat, say)
    pixels = torch.from_numpy(pixels_np).to(dev, DTYPES[dtype])

    rows = []
    for steps in steps_list:
        say(f"{label}: NUM_LOOK_CLOSE={steps}")
        row, result, schedule = _our_row(fast, pixels, steps, dev, timer, graphs, warmup, repeat)
        ours = row
        row = {"model": label, "device": ours.pop("device"), "dtype": dtype}
        row.update({k: ours.pop(k) for k in ("num_look_close", "tokens", "highres_calls", "ours_ms", "cuda_graph")})
        row.update({"image": f"{image.width}x{image.height}", **preprocessing, **ours})     # then stages, peak
        if vila is not None:
            say(f"{label}: projector and LLM, NUM_LOOK_CLOSE={steps}")
            row.update(time_vila_tail(vila, result, fast, timer, dtype, warmup, repeat, decode_tokens))
        if official is not None:
            row.update(_official_columns(official, fast, pixels, steps, schedule, result, timer, warmup, repeat,
                                         pin_ties, row["ours_ms"], official_all_layers))
        rows.append(row)
    return rows


def _preprocessing_columns(image, cfg, dev, timer, repeat: int, say) -> tuple[np.ndarray, dict]:
    """PIL's pixels (as the official processor makes them) and the preprocessing columns: PIL on
    the CPU (median of 3), the same resize on the device, and whether the two agree."""
    from .runtime.preprocess import preprocess, preprocess_on_device

    samples = []
    for _ in range(3):
        t0 = time.perf_counter()
        pixels_np = preprocess(image, cfg.max_size, cfg.image_mean, cfg.image_std)
        samples.append((time.perf_counter() - t0) * 1e3)

    def on_device():
        return preprocess_on_device(image, cfg.max_size, cfg.image_mean, cfg.image_std, dev)
    device_ms = timer.measure(on_device, warmup=1, repeat=max(1, min(repeat, 5)))
    check = compare_preprocessing(image, cfg, dev, pixels_np, on_device())
    if not check["identical"]:
        say(f"WARNING: preprocessing on {dev} differs from PIL's on this image: {check}; "
            "please report it (the timings below use PIL's pixels)")
    return pixels_np, {"preprocess_cpu_ms": round(statistics.median(samples), 1),
                       "preprocess_device_ms": round(device_ms, 3), "preprocess_device_check": check}


def _our_row(fast, pixels, steps: int, dev, timer, graphs: bool, warmup: int, repeat: int):
    """Our columns for one step count, the run's result and its schedule (planning.resolve)."""
    schedule = resolve(LookCloseSettings(num_look_close=steps, mode="after_image"), fast.geometry)
    counts = schedule.counts
    run = (lambda: fast.graphed(pixels, counts)) if graphs else (lambda: fast.forward(pixels, counts))
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    ours_ms = timer.measure(run, warmup, repeat)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if dev.type == "cuda" else None
    result = run()
    row = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
           "num_look_close": steps, "tokens": int(result.features.shape[1]),
           # highres calls as {N tokens: T steps}
           "highres_calls": {str(n): [sum(c) for c in counts].count(n) for n in sorted({sum(c) for c in counts})},
           "ours_ms": round(ours_ms, 3), "cuda_graph": graphs and dev.type == "cuda",
           "peak_gib": None if peak is None else round(peak, 3)}
    row["stages_ms"], row["stages_peak_mib"] = timer.stages(fast, pixels, counts)
    return row, result, schedule


def _official_columns(official, fast, pixels, steps: int, schedule, result, timer, warmup: int, repeat: int,
                      pin_ties: bool, ours_ms: float, all_layers: bool = False) -> dict:
    """The official code's time on the same pixels (configured as VILA-HD runs it; with
    all_layers also in its default configuration), the ratio, and how close our features are to
    its published run and to its run on our selection."""
    from .reference import layers_returned, run_official_with_selection, stable_topk

    def official_run():
        with torch.no_grad():
            return official(pixels, num_look_close=steps)
    official_ms = timer.measure(official_run, warmup, repeat)
    extra = {}
    if all_layers:
        with layers_returned(official, fast.cfg.depth):
            all_ms = timer.measure(official_run, warmup, repeat)
        extra = {"official_all_layers_ms": round(all_ms, 3), "speedup_all_layers": round(all_ms / ours_ms, 2)}
    if pin_ties:
        with stable_topk():
            published = official_run()
    else:
        published = official_run()
    the_plan = plan(result.prob[0].float().cpu().numpy(), schedule, fast.geometry)
    same_selection = run_official_with_selection(official, pixels, the_plan.step_maps(fast.geometry))
    ours = result.features[0].float().cpu().numpy()
    return {"official_ms": round(official_ms, 3), "speedup": round(official_ms / ours_ms, 2),
            "official_config": OFFICIAL_CONFIG, **extra,
            "official_ties": "pinned" if pin_ties else "published",
            **compare(ours, result.selection[0].cpu().numpy(), published, same_selection)}


def fit_per_step(rows: list[dict], key: str) -> float | None:
    """Least-squares slope of latency against NUM_LOOK_CLOSE (ms per step)."""
    pts = [(r["num_look_close"], r[key]) for r in rows if key in r]
    if len(pts) < 2:
        return None
    x, y = np.array(pts, dtype=float).T
    return float(np.polyfit(x, y, 1)[0])


def compare_preprocessing(image, cfg, dev, pixels_np: np.ndarray, on_device: torch.Tensor) -> dict:
    """Device preprocessing against PIL's: identical or not, and if not, whether the 8-bit resize
    (in levels) or only the normalisation (in float) is off, and by how much."""
    from PIL import Image

    from .runtime.preprocess import resize_like_pil, to_rgb
    got = on_device.float().cpu().numpy()
    if np.array_equal(got, pixels_np):
        return {"identical": True}
    size = cfg.max_size
    want_levels = np.asarray(to_rgb(image).resize((size, size), Image.BICUBIC), dtype=np.int64)
    rgb = torch.from_numpy(np.array(to_rgb(image), dtype=np.uint8)).to(dev).permute(2, 0, 1)
    got_levels = resize_like_pil(rgb, size, size).permute(1, 2, 0).cpu().numpy().astype(np.int64)
    level_diff = np.abs(got_levels - want_levels)
    return {"identical": False, "resize_max_level_diff": int(level_diff.max()),
            "resize_pixels_off": int((level_diff > 0).sum()),
            "normalised_max_abs": float(np.abs(got - pixels_np).max())}


def summary(rows: list[dict]) -> list[str]:
    """The headline numbers, in words: per model the ratio at the most steps, the cost of
    a step (fit) against the high-res blocks alone, and 1.5K against 4K at equal steps."""
    lines = []
    by_model = {}
    for r in rows:
        by_model.setdefault(r["model"], []).append(r)
    for name, rs in by_model.items():
        last = max(rs, key=lambda r: r["num_look_close"])
        line = f"{name}: NUM_LOOK_CLOSE={last['num_look_close']} {last['ours_ms']:.1f} ms"
        if "speedup" in last:
            config = f" ({last['official_config']})" if "official_config" in last else ""
            line += f", official{config} {last['official_ms']:.1f} ms, {last['speedup']:.2f}x"
        if "speedup_all_layers" in last:
            line += f" (all layers returned: {last['official_all_layers_ms']:.1f} ms, {last['speedup_all_layers']:.2f}x)"
        slope = fit_per_step(rs, "ours_ms")
        if slope is not None:
            blocks = [r["stages_ms"]["highres"] / r["num_look_close"] for r in rs if r["num_look_close"]]
            line += (f"; {slope:.2f} ms per step (fit), the high-res blocks alone {min(blocks):.2f}-"
                     f"{max(blocks):.2f} ms per step ({slope / min(blocks):.2f}x of the fastest)")
        lines.append(line)
    for name, rs in by_model.items():
        check = rs[0].get("preprocess_device_check")
        if check and not check["identical"]:
            lines.append(f"{name}: preprocessing on the device is NOT identical to PIL's: {check}")
    names = list(by_model)
    for a in names:
        for b in names[names.index(a) + 1:]:
            common = sorted({r["num_look_close"] for r in by_model[a]} & {r["num_look_close"] for r in by_model[b]})
            if common:
                n = common[-1]
                ms_a = next(r["ours_ms"] for r in by_model[a] if r["num_look_close"] == n)
                ms_b = next(r["ours_ms"] for r in by_model[b] if r["num_look_close"] == n)
                lines.append(f"{a} vs {b} at NUM_LOOK_CLOSE={n}: {ms_a:.1f} vs {ms_b:.1f} ms "
                             f"({abs(ms_a - ms_b) / max(ms_a, ms_b) * 100:.0f}% apart)")
    return lines


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def markdown(rows: list[dict]) -> str:
    """One line per row; the VILA-HD columns only when a row has them."""
    def selection(r):
        if "selection_identical" not in r:
            return ""
        return "identical" if r["selection_identical"] else f"IoU {r['selection_iou']:.3f}"

    def highres_calls(r):
        return ", ".join(f"{k[8:-1]}: {v:.2f}" for k, v in r["stages_ms"].items() if k.startswith("highres["))

    columns = [
        ("model", lambda r: r["model"]), ("device", lambda r: r["device"]), ("dtype", lambda r: r["dtype"]),
        ("steps", lambda r: r["num_look_close"]), ("tokens", lambda r: r["tokens"]),
        ("ours ms", lambda r: f"{r['ours_ms']:.1f}"),
        ("official ms (VILA-HD: last 2 layers)", lambda r: _fmt(r.get("official_ms"), ".1f")),
        ("speedup", lambda r: _fmt(r.get("speedup"), ".2f")),
        *([("official ms (all layers returned)", lambda r: _fmt(r.get("official_all_layers_ms"), ".1f")),
           ("speedup (all layers)", lambda r: _fmt(r.get("speedup_all_layers"), ".2f"))]
          if any("official_all_layers_ms" in r for r in rows) else []),
        *[(k, (lambda k: lambda r: f"{r['stages_ms'].get(k, 0):.2f}")(k))
          for k in ("lowres", "selector", "planning", "highres", "assemble")],
        ("highres calls (TxN: ms)", highres_calls),
        ("preprocess CPU / device ms", lambda r: f"{r['preprocess_cpu_ms']:.1f} / {r['preprocess_device_ms']:.2f}"),
        ("peak GiB", lambda r: _fmt(r["peak_gib"], ".3f")),
        ("peak host MiB (lowres / highres)", lambda r: "{:.0f} / {:.0f}".format(
            r["stages_peak_mib"]["host"].get("lowres", 0), r["stages_peak_mib"]["host"].get("highres", 0))),
        ("selection vs official", selection),
        ("min cos (same selection)", lambda r: _fmt(r.get("min_cosine"), ".5f")),
    ]
    if any("llm_prefill_ms" in r for r in rows):
        columns += [("projector ms", lambda r: _fmt(r.get("projector_ms"), ".2f")),
                    ("LLM prefill ms (tokens)", lambda r: "" if "llm_prefill_ms" not in r else
                     f"{r['llm_prefill_ms']:.2f} ({r['llm_prompt_tokens']})"),
                    ("LLM decode ms/token", lambda r: _fmt(r.get("llm_decode_ms_per_token"), ".2f"))]
    lines = ["| " + " | ".join(name for name, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(str(get(r)) for _, get in columns) + " |")
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
            ax.plot(x, [r["official_ms"] for r in rs], "s--", label=f"{model} official (VILA-HD config)")
    ax.set_xlabel("NUM_LOOK_CLOSE")
    ax.set_ylabel("latency, ms (median)")
    ax.set_title(f"PS3 look-close, {rows[0]['device']}, {rows[0]['dtype']}, batch 1")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True
