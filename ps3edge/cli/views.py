"""What the command line prints: the two consoles, the one-line error, progress lines, and every
command's result tables (one table renderer for all of them)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable, Optional, Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .. import defaults

console = Console()
err_console = Console(stderr=True)


def error_line(message: str) -> None:
    """One line `error: ...` on stderr, however many lines the message had."""
    err_console.print(f"[red]error:[/red] {escape(' '.join(message.split()))}", highlight=False, soft_wrap=True)


def image_notes(image) -> None:
    """What opening the image did that the user should know (first frame only, EXIF orientation),
    one `note:` line each on stderr."""
    from ..runtime.preprocess import NOTES

    for note in image.info.get(NOTES, ()):
        err_console.print(f"note: {escape(note)}", highlight=False, soft_wrap=True)


def say(text: str, *, err: bool = False) -> None:
    """A plain line (rich markup in `text` is kept, highlighting is not added)."""
    (err_console if err else console).print(text, highlight=False)


def _stamped(msg: str) -> str:
    return f"[dim]{time.strftime('%H:%M:%S')}[/dim] {escape(msg)}"


def progress(status):
    """A progress callback: each message becomes the spinner's text and a time-stamped line."""
    def report(msg: str):
        status.update(f"{escape(msg)} ...")
        console.print(_stamped(msg), highlight=False)
    return report


def progress_line(msg: str) -> None:
    """A time-stamped progress line on stdout, where no spinner runs."""
    console.print(_stamped(msg), highlight=False)


def progress_to_stderr(msg: str) -> None:
    """A time-stamped progress line on stderr (where stdout carries the answer)."""
    err_console.print(_stamped(msg), highlight=False)


def print_table(columns: Sequence[str], rows: Iterable[Sequence], *, title: Optional[str] = None,
                show_edge: bool = True, right: Sequence[str] = (), overflow: str = "ellipsis") -> None:
    """The one table renderer: `columns` headers (those in `right` right-aligned), then the rows."""
    table = Table(title=title, show_edge=show_edge)
    for col in columns:
        table.add_column(col, justify="right" if col in right else "left", overflow=overflow)
    for row in rows:
        table.add_row(*row)
    console.print(table)


def _bold(text: str) -> str:
    return f"[bold]{text}[/bold]"


def _ok(ok: bool) -> str:
    return "[green]ok[/green]" if ok else "[red]FAIL[/red]"


# look-close runs and comparisons ----------------------------------------------------------------
def print_run(result, backend: str, images: int = 1, batch_size: int = 1) -> None:
    """Tokens per scale (per image), time per stage and the highres calls of a look-close run
    (with several images: of the last pass)."""
    tokens = [(name if name == "lowres" else f"{name}px", str(n)) for name, n in result.tokens_each_scale.items()]
    each = " each" if images > 1 else ""
    print_table(("tokens" + each, "count"), [*tokens, (_bold("total"), _bold(str(result.features.shape[1])))],
                title=f"look-close on {backend}" + (f", {images} images in passes of {batch_size}" if images > 1 else ""),
                show_edge=False, right=("count",))
    label = f"ms (pass of {result.batch})" if images > 1 else "ms"
    times = [(stage, f"{ms:.1f}") for stage, ms in result.timings_ms.items()]
    print_table(("stage", label), [*times, (_bold("total"), _bold(f"{sum(result.timings_ms.values()):.1f}"))],
                show_edge=False, right=(label,))
    say(f"highres calls (T steps x N tokens): {result.highres_calls}")


def print_comparison(title: str, rows, cosine_digits: int = 6) -> None:
    """Rows of parity.ParityRow: differences, selection agreement and whether each is in tolerance."""
    def cells(r):
        sel = r.selection or ("" if r.iou is None else f"IoU {r.iou:.3f}")
        return (r.stage, r.compared, "" if r.max_abs is None else f"{r.max_abs:.2e}",
                "" if r.min_cosine is None else f"{r.min_cosine:.{cosine_digits}f}", sel, _ok(r.ok))
    print_table(("stage", "compared", "max abs", "min cosine", "selection", "ok"), map(cells, rows), title=title)


def print_accuracy(report, title: str) -> None:
    """The accuracy report of calibration/report.py as a table, and the stage times."""
    tol = report.tolerance
    print_comparison(f"{title} (min cosine >= {tol['min_cosine']}, max abs <= {tol['max_abs']}, "
                     f"selection IoU >= {tol['min_iou']}), {len(report.images)} images", report.rows)
    for name, stages in report.timings_ms.items():
        say(f"{name:<22} " + "  ".join(f"{k} {v:.0f} ms" for k, v in stages.items()))
    for note in report.notes:
        say(f"note: {escape(note)}")


def print_parity(report) -> None:
    """The FP32 parity report: the official model, our torch model and the exported stages."""
    tol = defaults.TOLERANCES["fp32"]
    print_comparison(f"parity, fp32 (max abs <= {tol['max_abs']}, min cosine >= {tol['min_cosine']}), "
                     f"{report.tokens} tokens", report.rows, cosine_digits=7)


# artifacts ---------------------------------------------------------------------------------------
def print_engines(artifacts: Path, rows, elapsed_s: float) -> None:
    """`build`: one row per engine (stage, root directory, its manifest's EngineEntry)."""
    def cells(row):
        name, root, e = row
        size = (root / e.file).stat().st_size / 2 ** 20
        ctx = e.device_memory_bytes
        dynamic = {k: tuple(v["max"]) for k, v in e.profiles.items() if v["min"] != v["max"]}
        return (name, e.file, e.precision, f"{size:.1f}", "" if ctx is None else f"{ctx / 2 ** 20:.1f}",
                ", ".join(f"{k} {v}" for k, v in dynamic.items()))
    print_table(("stage", "file", "precision", "MiB", "context MiB", "profile (max)"), map(cells, rows),
                title=f"TensorRT engines in {escape(str(artifacts))}")
    first = rows[0][2]
    say(f"TensorRT {first.tensorrt_version}, {escape(first.gpu_name)} (SM{first.sm}); "
        f"done in {elapsed_s:.1f} s")


def print_manifest(artifacts: Path, manifest) -> None:
    """`inspect`: what the manifest says, its stages, engines and precisions, and the files' total."""
    m, g = manifest.config, manifest.geometry
    say(f"[bold]{escape(str(artifacts))}[/bold]  schema v{manifest.schema_version}, "
        f"ps3edge {manifest.producer.get('version', '?')}, opset {manifest.opset}, {manifest.precision}")
    src = manifest.source
    origin = (f"preset {src['name']} (seed {src['seed']})" if src.get("kind") == "preset"
              else f"checkpoint {escape(str(src.get('path')))}")
    if src.get("repo_id"):                   # fetched from the Hugging Face hub: which published weights
        origin = (f"Hugging Face hub {escape(str(src['repo_id']))} revision {escape(str(src.get('revision')))}, "
                  f"commit {escape(str(src.get('commit')))} (files sha256 {escape(str(src.get('sha256')))})")
    say(f"model  {escape(str(m.name))}: width {m.width}, depth {m.depth}, heads {m.num_heads}, "
        f"mlp {m.mlp_dim}; weights from {origin}")
    say(f"scales {list(g.scales)} -> grids {list(g.grids)}; {g.lowres_tokens} low-res tokens, "
        f"{g.highres_patches_total} high-res patches {list(g.highres_patches_each_scale)}")
    d = manifest.look_close_defaults
    steps = defaults.DEFAULT_NUM_LOOK_CLOSE if d.num_look_close is None else d.num_look_close
    say(f"look-close  {'+'.join(map(str, d.select_num_each_scale))} patches per step, "
        f"default {steps} steps, at most {g.max_tokens_per_highres_call} "
        f"tokens per step; returned layers {list(manifest.returned_layers)}")
    say(f"batch  up to {g.max_batch} images per pass (export --max-batch)")
    p = manifest.preprocessing
    say(f"preprocess  {p.resize} resize to {p.size} ({p.interpolation}), x{p.rescale}, "
        f"mean {list(p.mean)}, std {list(p.std)}")
    tensors = lambda ts: "\n".join(f"{t.name} {t.dtype} {tuple(t.shape)}" for t in ts)  # noqa: E731
    print_table(("stage", "file", "inputs", "outputs"),
                [(name, s.file + "".join(f" + {x}" for x in s.external_data), tensors(s.inputs), tensors(s.outputs))
                 for name, s in manifest.stages.items()], title="stages")
    for name, e in manifest.engines.items():
        say(f"engine {name}: {e.file}, {e.precision} via {e.built_via}, TensorRT "
            f"{e.tensorrt_version} on SM{e.sm} ({escape(e.gpu_name)}), "
            f"T <= {'?' if e.max_look_close is None else e.max_look_close}")
    for name, p in manifest.precisions.items():
        c = p.calibration
        how = ", ".join(str(x) for x in (p.tool, c and c.method, c and f"{c.samples} images") if x)
        say(f"precision {name}: {', '.join(s.file for s in p.stages.values())} ({escape(how)})"
            + (f"; report {p.report}" if p.report else ""))
    total = sum((Path(artifacts) / f).stat().st_size for f in manifest.files) / 2 ** 20
    say(f"{len(manifest.files)} files, {total:.1f} MiB, all sha256 match the manifest")


def print_lint(artifacts: Path, manifest, report, t_max, precision: str, grouped) -> None:
    """`inspect --lint`: a table of findings (`grouped`: each finding and how often it repeats)."""
    from ..artifact.profiles import highres_rows

    title = (f"TensorRT {report.trt_version} lint of {escape(str(artifacts))}, {precision} stages "
             f"(B <= {manifest.geometry.max_batch} images, highres profile T <= {highres_rows(manifest, t_max)} "
             f"step rows ({t_max} steps per image), N <= {manifest.geometry.max_tokens_per_highres_call})")
    if report.findings:
        def cells(item):
            f, count = item
            sev = "[red]error[/red]" if f.severity == "error" else "[yellow]warning[/yellow]"
            node = escape(f.node) + (f" (+{count - 1} more)" if count > 1 else "")
            return sev, f.stage, f.check, f.op, node, escape(f.message)
        print_table(("severity", "stage", "check", "op", "node", "message"), map(cells, grouped),
                    title=title, overflow="fold")
    else:
        say(title)
    for note in report.notes:
        say(f"note: {escape(note)}")
    if report.largest_tensor:
        say(f"largest tensor at the profile max: {report.largest_tensor:.3g} elements "
            f"({report.largest_tensor / 2 ** 31:.0%} of TensorRT's 2^31 limit)")
    say(f"{len(report.errors)} errors, {len(report.warnings)} warnings in {len(manifest.stages)} stages")


# the machine ------------------------------------------------------------------------------------
def _package_state(p: dict) -> str:
    if p["error"]:
        return escape(f"{p['version'] or '?'}, fails to import: {p['error']}")
    return p["version"] or "installed" if p["installed"] else "[dim]not installed[/dim]"


def _print_devices(info: dict) -> None:
    cuda = info["cuda"]
    if cuda["available"]:
        for d in cuda["devices"]:
            memory = (f"{d['free_gib']:.1f} / {d['total_gib']:.1f} GiB free" if d.get("total_gib") is not None
                      else "memory unknown")
            shared = " (unified, shared with the CPU)" if d.get("unified_memory") else ""
            say(f"GPU {d['index']}: {escape(d['name'])}, SM {d['sm']}, {memory}{shared}; "
                f"torch CUDA {cuda['torch_cuda']}, cuDNN {cuda['cudnn']}")
    else:
        say(f"CUDA: not available ({escape(cuda['reason'] or 'unknown')})")
    j = info["jetson"]
    if j["is_jetson"]:
        say(f"Jetson: {escape(j['model'] or 'unknown board')}, L4T {j['l4t'] or '?'}, JetPack {j['jetpack'] or '?'}")
    else:
        say("Jetson: no (/etc/nv_tegra_release absent)")


def print_doctor(info: dict) -> None:
    """`doctor`: packages, onnxruntime providers, GPUs, Jetson, and a grid of what works here."""
    py = info["python"]
    say(f"[bold]ps3edge {info['ps3edge']}[/bold]  Python {py['version']} on {escape(py['platform'])}")
    print_table(("package", "version"), [(name, _package_state(p)) for name, p in info["packages"].items()],
                title="packages", show_edge=False)
    if info["onnxruntime_providers"]:
        say(f"onnxruntime providers: {', '.join(info['onnxruntime_providers'])}")
    _print_devices(info)
    precisions = ("fp32", "fp16", "bf16", "int8")
    grid: dict[tuple, dict] = {}
    for r in info["backends"]:
        grid.setdefault((r["backend"], r["device"]), {})[r["precision"]] = r
    rows = []
    for (backend, device), cells in grid.items():
        marks = [("[green]yes[/green]" if cells[p]["ok"] else "[red]no[/red]") if p in cells else "-"
                 for p in precisions]
        why = "; ".join(dict.fromkeys(c["reason"] for c in cells.values() if not c["ok"]))
        rows.append((backend, device, *marks, escape(why)))
    print_table(("backend", "device", *precisions, "why not"), rows, title="what works here", show_edge=False)


# bench and chat ----------------------------------------------------------------------------------
def print_bench(table: str, summary: Iterable[str]) -> None:
    """`bench`: its markdown table as it is, then the summary lines."""
    console.print(table, highlight=False, soft_wrap=True)
    for line in summary:
        console.print(line, highlight=False)


def print_chat_tokens(result) -> None:
    """`chat`: token counts and the total time, on stderr after the streamed answer."""
    t = result.tokens
    highres = " ".join(f"{k}px {v}" for k, v in t["highres"].items())
    err_console.print(f"tokens: low-res {t['lowres']}, high-res {highres}, text {t['text']}, "
                      f"generated {t['generated']}; {sum(result.timings_ms.values()):.0f} ms", highlight=False)
