"""`ps3edge bench --batch 1,2,4,8`: throughput of B images through one `Pipeline.run_batch` call,
against the official code given the same B images as one batch.

For each model, NUM_LOOK_CLOSE, backend and B it reports the time of one batch (the latency every
image of it sees), milliseconds per image, images per second and peak memory, ours and the
official code's, and the ratio of images per second. The model is exported to a scratch artifact
first, as a user would; every backend runs that artifact. Both sides start from the same
normalised pixels on the host (PIL preprocessing, what the official processor does, is left out
of both), different views of one image so that each image selects its own patches; at a fixed
NUM_LOOK_CLOSE every image selects as many patches per scale, which is when the official code
tokenizes a batch at once instead of image by image. The official code is configured as VILA-HD
configures it (`reference.VILA_HD_LAYERS_TO_RETURN`) and runs in torch on the bench's device
and dtype; the onnxruntime backend runs the exported FP32 stages.

Peak memory is the device's (torch's allocator: weights included) where the run is on CUDA
through torch, else the process's peak resident set during the call (Linux: reset through
/proc/self/clear_refs first), which counts everything the process holds: the weights of every
backend loaded so far and of the official model too. Compare it across B, not across sides.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import Ps3EdgeError

BACKENDS = ("torch", "onnxruntime")


def parse_batches(text: str) -> list[int]:
    """--batch: distinct batch sizes >= 1, comma-separated."""
    try:
        sizes = [int(x) for x in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1 or len(set(sizes)) != len(sizes):
        raise Ps3EdgeError(f"--batch must be distinct whole numbers >= 1, comma-separated like 1,2,4,8; got '{text}'")
    return sizes


def parse_backends(text: str) -> list[str]:
    """--backend with --batch: torch and / or onnxruntime, comma-separated."""
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in BACKENDS]
    if not names or bad or len(set(names)) != len(names):
        raise Ps3EdgeError(f"--backend with --batch takes {' and / or '.join(BACKENDS)}, comma-separated; got '{text}'")
    return names


def batch_images(image: Image.Image, count: int) -> list[Image.Image]:
    """`count` different views of one image (mirrored, flipped, shifted), same size."""
    views = []
    for i in range(count):
        view = image
        if i % 2:
            view = ImageOps.mirror(view)
        if (i // 2) % 2:
            view = ImageOps.flip(view)
        shift = i // 4
        if shift:       # roll by a fraction of the width: new content at every patch position
            dx = shift * image.width // 7
            view = Image.fromarray(np.roll(np.asarray(view), dx, axis=1))
        views.append(view)
    return views


class PeakMemory:
    """Peak memory of one call, in GiB: torch's CUDA allocator on `device`, else the process's
    peak resident set (None where the kernel does not let the peak be reset)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda" if device.type == "cuda" else "process RSS"

    def of(self, fn) -> float | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            fn()
            torch.cuda.synchronize(self.device)
            return round(torch.cuda.max_memory_allocated(self.device) / 2 ** 30, 3)
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            return None
        fn()
        return round(_status_kib("VmHWM:") / 2 ** 20, 3)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def _export(name: str, depth: int | None, workdir: Path, say):
    """(artifact directory, LoadedModel) of a PS3 preset, truncated to `depth` blocks if given
    (written as a checkpoint and exported from there, so that the artifact can rebuild it)."""
    from .exporter.onnx_export import export
    from .model import build, load_checkpoint, preset, random_model, save_checkpoint

    if depth is None:
        loaded = build(name)
        label = name
    else:
        cfg = preset(name)
        if not 1 <= depth <= cfg.depth:
            raise Ps3EdgeError(f"--depth truncates {name} to its first N blocks: 1 to {cfg.depth}, got {depth}")
        cfg = cfg.replace(depth=depth, select_layers=tuple(min(l, depth - 1) for l in cfg.select_layers))
        ckpt = workdir / f"{name}-depth{depth}-checkpoint"
        save_checkpoint(random_model(cfg), ckpt)
        loaded = load_checkpoint(ckpt)
        label = f"{name}-depth{depth}"
    say(f"{label}: exporting")
    art = workdir / f"{label}-artifact"
    export(loaded, art)
    return art, loaded, label


def throughput_rows(name: str, *, backends, batches, steps_list, device: str, dtype: str, warmup: int,
                    repeat: int, depth: int | None = None, image=None, progress=None,
                    against_official: bool = True) -> list[dict]:
    """Rows for one PS3 model: one per backend, NUM_LOOK_CLOSE and batch size."""
    from .bench import DTYPES
    from .llm.vila import VILA_PRESETS, is_vila_checkpoint
    from .runtime.preprocess import preprocess

    say = progress or (lambda msg: None)
    if name in VILA_PRESETS or is_vila_checkpoint(name):
        raise Ps3EdgeError("--batch times PS3 models (a preset or checkpoint of ps3-*), not a VILA-HD model")
    if dtype not in DTYPES:
        raise Ps3EdgeError(f"--dtype must be one of {', '.join(DTYPES)}")
    dev = torch.device(device)
    if image is None:
        from .demo import sample_image
        image = sample_image()
    with tempfile.TemporaryDirectory(prefix="ps3edge-bench-") as tmp:
        art, loaded, label = _export(name, depth, Path(tmp), say)
        cfg = loaded.cfg
        views = batch_images(image, max(batches))
        pixels = [preprocess(v, cfg.max_size, cfg.image_mean, cfg.image_std) for v in views]   # (1,3,S,S) each
        official = None
        if against_official:            # before the torch backend takes the model to its device and dtype
            from .reference import VILA_HD_LAYERS_TO_RETURN, official_model
            official = official_model(loaded.model, VILA_HD_LAYERS_TO_RETURN).to(device=dev, dtype=DTYPES[dtype])
        rows, official_cols = [], {}
        for backend in backends:
            say(f"{label}: loading the {backend} backend")
            with _pipeline(art, loaded, backend, dev, dtype) as pipe:
                for steps in steps_list:
                    for b in batches:
                        say(f"{label}: {backend}, NUM_LOOK_CLOSE={steps}, batch {b}")
                        row = {"model": label, "backend": backend,
                               **_our_columns(pipe, dtype, steps, pixels[:b], warmup, repeat)}
                        if official is not None:
                            if (steps, b) not in official_cols:
                                say(f"{label}: official, NUM_LOOK_CLOSE={steps}, batch {b}")
                                official_cols[steps, b] = _official_batch(official, pixels[:b], steps, dev,
                                                                          warmup, repeat)
                            row.update(official_cols[steps, b])
                            row["speedup"] = round(row["ours_images_per_s"] / row["official_images_per_s"], 2)
                        rows.append(row)
        return rows


def _pipeline(art, loaded, backend: str, dev: torch.device, dtype: str):
    """The Pipeline a backend's rows run: on the bench's device where the backend takes a device
    (torch: the fast path on CUDA, given the model already built), in the bench's dtype where the
    backend makes it from the FP32 stages itself, else on the exported FP32 stages."""
    from .runtime.lookclose import Pipeline
    from .runtime.runners.registry import get_backend

    chosen = get_backend(backend)
    return Pipeline(art, backend, precision=dtype if dtype in chosen.cast_precisions else "fp32",
                    device=str(dev) if chosen.takes_device else None, loaded=loaded)


def _our_columns(pipe, dtype: str, steps: int, batch: list, warmup: int, repeat: int) -> dict:
    """One `run_batch` call on `batch`: time, per image, images/s, peak memory."""
    from .bench import Timer
    from .runtime.planning import LookCloseSettings

    settings = LookCloseSettings(num_look_close=steps, mode="after_image")
    clock = pipe.device.torch() if pipe.device.is_cuda else torch.device("cpu")   # host paths: host clocks

    def run():
        return pipe.run_batch(batch, settings)
    ms = Timer(clock).measure(run, warmup, repeat)
    results = run()
    b = len(batch)
    return {"device": pipe.session.device_label, "dtype": dtype,
            "precision": pipe.precision,              # what the backend ran: the dtype, or the FP32 stages
            "num_look_close": steps, "batch": b, "tokens": int(results[0].features.shape[1]),
            "ours_batch_ms": round(ms, 3), "ours_ms_per_image": round(ms / b, 3),
            "ours_images_per_s": round(1e3 * b / ms, 3), "ours_peak_gib": PeakMemory(clock).of(run),
            "ours_peak_kind": PeakMemory(clock).kind}


def _official_batch(official, batch: list, steps: int, dev: torch.device, warmup: int, repeat: int) -> dict:
    """The official forward on the B images stacked as one (B,3,S,S) batch, from host pixels."""
    from .bench import OFFICIAL_CONFIG, Timer

    stacked = torch.from_numpy(np.concatenate(batch, axis=0))
    dtype = next(official.parameters()).dtype

    def run():
        with torch.no_grad():
            return official(stacked.to(dev, dtype), num_look_close=steps)
    ms = Timer(dev).measure(run, warmup, repeat)
    out = run()
    b = len(batch)
    return {"official_batch_ms": round(ms, 3), "official_ms_per_image": round(ms / b, 3),
            "official_images_per_s": round(1e3 * b / ms, 3), "official_peak_gib": PeakMemory(dev).of(run),
            "official_peak_kind": PeakMemory(dev).kind,
            "official_tokens": int(out.hidden_states[-1].shape[1]), "official_config": OFFICIAL_CONFIG}


def summary(rows: list[dict]) -> list[str]:
    """Per model and backend: images/s at the smallest and largest B, their ratio, and the ratio
    to the official code at each B."""
    lines = []
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["model"], r["backend"], r["num_look_close"]), []).append(r)
    for (model, backend, steps), rs in groups.items():
        lo, hi = min(rs, key=lambda r: r["batch"]), max(rs, key=lambda r: r["batch"])
        line = (f"{model} {backend} NUM_LOOK_CLOSE={steps}: {lo['ours_images_per_s']:.2f} images/s at B={lo['batch']}, "
                f"{hi['ours_images_per_s']:.2f} at B={hi['batch']} ({hi['ours_images_per_s'] / lo['ours_images_per_s']:.2f}x)")
        if all("speedup" in r for r in rs):
            line += "; against the official code " + ", ".join(f"B={r['batch']} {r['speedup']:.2f}x" for r in rs)
        lines.append(line)
    return lines


def markdown(rows: list[dict]) -> str:
    """One line per model, backend, NUM_LOOK_CLOSE and B."""
    def fmt(value, spec):
        return "" if value is None else format(value, spec)

    columns = [
        ("model", lambda r: r["model"]), ("backend", lambda r: r["backend"]), ("device", lambda r: r["device"]),
        ("precision", lambda r: r["precision"]), ("steps", lambda r: r["num_look_close"]), ("B", lambda r: r["batch"]),
        ("tokens", lambda r: r["tokens"]),
        ("ours images/s", lambda r: f"{r['ours_images_per_s']:.2f}"),
        ("ours ms/image", lambda r: f"{r['ours_ms_per_image']:.1f}"),
        ("ours batch ms", lambda r: f"{r['ours_batch_ms']:.1f}"),
        ("ours peak GiB", lambda r: fmt(r["ours_peak_gib"], ".3f")),
        ("official images/s (VILA-HD: last 2 layers)", lambda r: fmt(r.get("official_images_per_s"), ".2f")),
        ("official ms/image", lambda r: fmt(r.get("official_ms_per_image"), ".1f")),
        ("official peak GiB", lambda r: fmt(r.get("official_peak_gib"), ".3f")),
        ("peak measures", lambda r: r["ours_peak_kind"] + ("" if "official_peak_kind" not in r or r["official_peak_kind"] == r["ours_peak_kind"]
                                                      else f" / official {r['official_peak_kind']}")),
        ("ours / official images/s", lambda r: fmt(r.get("speedup"), ".2f")),
    ]
    lines = ["| " + " | ".join(name for name, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(str(get(r)) for _, get in columns) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path) -> bool:
    """Images/s against B, one line per model and backend, the official code dashed. False
    without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    official_drawn = set()
    for key in dict.fromkeys((r["model"], r["backend"], r["num_look_close"]) for r in rows):
        rs = [r for r in rows if (r["model"], r["backend"], r["num_look_close"]) == key]
        x = [r["batch"] for r in rs]
        ax.plot(x, [r["ours_images_per_s"] for r in rs], "o-", label=f"{key[0]} ps3edge {key[1]}, NLC={key[2]}")
        if "official_images_per_s" in rs[0] and (key[0], key[2]) not in official_drawn:
            official_drawn.add((key[0], key[2]))
            ax.plot(x, [r["official_images_per_s"] for r in rs], "s--", label=f"{key[0]} official (VILA-HD config), NLC={key[2]}")
    ax.set_xlabel("images per batch (B)")
    ax.set_ylabel("images/s (median)")
    ax.set_xscale("log", base=2)
    ax.set_title(f"PS3 look-close throughput, {rows[0]['device']}, {rows[0]['dtype']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True
