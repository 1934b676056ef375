"""The `ps3edge` command line: demo, export, run, parity, inspect.

Every command turns a `Ps3EdgeError` into one line `error: ...` on stderr and exit code 2.
Look-close settings default to the VILA-HD environment variables (NUM_LOOK_CLOSE,
NUM_TOKEN_LOOK_CLOSE, SELECT_NUM_EACH_SCALE, LOOK_CLOSE_MODE, SMOOTH_SELECTION_PROB); flags
override them.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import List, Optional

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__, defaults
from .errors import Ps3EdgeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="PS3 / VILA-HD from PyTorch to ONNX and TensorRT, and the look-close runtime.")
console = Console()
err_console = Console(stderr=True)


def handle_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Ps3EdgeError as e:
            err_console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130)
    return wrapper


def _progress(status):
    def say(msg: str):
        status.update(f"{escape(msg)} ...")
        console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {escape(msg)}", highlight=False)
    return say


def _parse_layers(text: str) -> list[int]:
    try:
        layers = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        layers = []
    if not layers:
        raise Ps3EdgeError(f"--layers must be comma-separated integers like -2,-1, got '{text}'")
    return layers


def _load_prompt_embedding(path: Optional[Path]):
    if path is None:
        return None
    if not path.is_file():
        raise Ps3EdgeError(f"prompt embedding file not found: {path}")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:  # numpy raises ValueError / OSError / UnpicklingError for bad files
        raise Ps3EdgeError(f"{path} is not a .npy array ({type(e).__name__}: {e})") from None


def _settings(num_look_close, num_token_look_close, select_num_each_scale, look_close_mode, smooth):
    from .runtime.planning import settings_from_env
    return settings_from_env(num_look_close=num_look_close, num_token_look_close=num_token_look_close,
                             select_num_each_scale=select_num_each_scale, mode=look_close_mode,
                             smooth_selection_prob=smooth)


# shared options --------------------------------------------------------------------------------
NumLookClose = typer.Option(None, "--num-look-close", help="Look-close steps (int or 'all'). Env: NUM_LOOK_CLOSE; default 6.")
NumTokenLookClose = typer.Option(None, "--num-token-look-close", help="High-res patches in total; overrides steps. Env: NUM_TOKEN_LOOK_CLOSE.")
SelectNumEachScale = typer.Option(None, "--select-num-each-scale", help="Patches per step per scale, e.g. 512+2048. Env: SELECT_NUM_EACH_SCALE.")
LookCloseMode = typer.Option(None, "--look-close-mode", help="after_prompt (top-down with --prompt-embedding) or after_image (bottom-up). Env: LOOK_CLOSE_MODE.")
Smooth = typer.Option(None, "--smooth-selection-prob/--no-smooth-selection-prob", help="Smooth the selection map on a 6x6 grid. Env: SMOOTH_SELECTION_PROB.")
PromptEmbedding = typer.Option(None, "--prompt-embedding", help="A .npy of C floats: select top-down for this prompt.")
Layer = typer.Option(defaults.DEFAULT_RUN_LAYER, "--layer", help="Which block's features to return (VILA-HD uses -2).")


def _print_run_table(result, backend: str):
    table = Table(title=f"look-close on {backend}", show_edge=False)
    table.add_column("tokens")
    table.add_column("count", justify="right")
    for name, n in result.tokens_each_scale.items():
        table.add_row(name if name == "lowres" else f"{name}px", str(n))
    table.add_row("[bold]total[/bold]", f"[bold]{result.features.shape[1]}[/bold]")
    times = Table(show_edge=False)
    times.add_column("stage")
    times.add_column("ms", justify="right")
    for stage, ms in result.timings_ms.items():
        times.add_row(stage, f"{ms:.1f}")
    times.add_row("[bold]total[/bold]", f"[bold]{sum(result.timings_ms.values()):.1f}[/bold]")
    console.print(table)
    console.print(times)
    console.print(f"highres calls (T steps x N tokens): {result.highres_calls}", highlight=False)


# commands --------------------------------------------------------------------------------------
@app.command()
@handle_errors
def export(
    model: str = typer.Option(..., "--model", help="Preset (ps3-1.5k, ps3-4k, ps3-tiny, ps3-tiny-4k) or checkpoint directory."),
    out: Path = typer.Option(..., "--out", help="Artifact directory to create."),
    opset: int = typer.Option(defaults.DEFAULT_OPSET, "--opset", help="ONNX opset (>= 17)."),
    layers: str = typer.Option(",".join(str(l) for l in defaults.DEFAULT_RETURNED_LAYERS), "--layers", help="Blocks whose features the stages return."),
    seed: int = typer.Option(defaults.DEFAULT_SEED, "--seed", help="Seed of a preset's random weights."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing artifact directory."),
):
    """Export the lowres, selector and highres stages to ONNX, with manifest.json."""
    from .exporter.onnx_export import export as do_export

    start = time.perf_counter()
    with console.status("exporting") as status:
        manifest = do_export(model, out, opset=opset, returned_layers=_parse_layers(layers), seed=seed,
                             overwrite=overwrite, progress=_progress(status))
    size = sum(f.stat().st_size for f in Path(out).iterdir()) / 2 ** 20
    console.print(f"wrote {escape(str(out))} ({len(manifest['files'])} files, {size:.1f} MiB) "
                  f"in {time.perf_counter() - start:.1f} s", highlight=False)


@app.command()
@handle_errors
def run(
    artifacts: Path = typer.Argument(..., help="Artifact directory from 'ps3edge export'."),
    image: Path = typer.Option(..., "--image", help="Input image."),
    out: Path = typer.Option(..., "--out", help="Output .safetensors (features, prob, selection maps)."),
    backend: str = typer.Option("onnxruntime", "--backend", help="onnxruntime or torch."),
    num_look_close: Optional[str] = NumLookClose,
    num_token_look_close: Optional[str] = NumTokenLookClose,
    select_num_each_scale: Optional[str] = SelectNumEachScale,
    look_close_mode: Optional[str] = LookCloseMode,
    smooth_selection_prob: Optional[bool] = Smooth,
    prompt_embedding: Optional[Path] = PromptEmbedding,
    layer: int = Layer,
    overlay: Optional[Path] = typer.Option(None, "--overlay", help="Also write a PNG with the selected patches."),
):
    """Run the look-close loop on one image."""
    from .runtime.lookclose import Pipeline
    from .runtime.outputs import check_output_path, write_outputs
    from .runtime.preprocess import open_image

    settings = _settings(num_look_close, num_token_look_close, select_num_each_scale, look_close_mode,
                         smooth_selection_prob)
    prompt = _load_prompt_embedding(prompt_embedding)
    if out.suffix != ".safetensors":
        raise Ps3EdgeError(f"--out must end in .safetensors, got {out}")
    check_output_path(out, "--out")
    if overlay is not None:
        check_output_path(overlay, "--overlay")
    pil = open_image(image)
    pipeline = Pipeline(artifacts, backend)
    result = pipeline.run(pil, settings, prompt_embedding=prompt, layer=layer)
    write_outputs(result, pil, out, overlay)
    _print_run_table(result, backend)
    console.print(f"features {tuple(result.features.shape)} -> {escape(str(out))}", highlight=False)
    if overlay is not None:
        console.print(f"overlay -> {escape(str(overlay))}", highlight=False)


@app.command()
@handle_errors
def demo(
    out: Path = typer.Option(Path("ps3edge-demo"), "--out", help="Where to put the artifact, features and overlay."),
):
    """Export ps3-tiny, run it on the sample image and write the selection overlay."""
    from .demo import sample_image
    from .exporter.onnx_export import export as do_export
    from .runtime.lookclose import Pipeline
    from .runtime.outputs import write_outputs
    from .runtime.planning import settings_from_env

    start = time.perf_counter()
    artifacts = out / "artifacts"
    if artifacts.exists() and not (artifacts / defaults.MANIFEST_NAME).is_file():
        raise Ps3EdgeError(f"{artifacts} exists and is not a ps3edge artifact; choose another --out")
    with console.status("demo") as status:
        say = _progress(status)
        do_export("ps3-tiny", artifacts, overwrite=True, progress=say)
        say("running the look-close loop on the sample image")
        image = sample_image()
        pipeline = Pipeline(artifacts, "onnxruntime")
        # one look-close step unless the environment asks otherwise, so the overlay shows a choice
        import os
        env_steps = os.environ.get(defaults.ENV_NUM_LOOK_CLOSE) or os.environ.get(defaults.ENV_NUM_TOKEN_LOOK_CLOSE)
        settings = settings_from_env(num_look_close=None if env_steps else 1)
        result = pipeline.run(image, settings, layer=defaults.DEFAULT_RUN_LAYER)
        write_outputs(result, image, out / "features.safetensors", out / "overlay.png")
    _print_run_table(result, "onnxruntime")
    console.print(f"artifact  {escape(str(artifacts))}\nfeatures  {escape(str(out / 'features.safetensors'))}\n"
                  f"overlay   {escape(str(out / 'overlay.png'))}\ndone in {time.perf_counter() - start:.1f} s",
                  highlight=False)


@app.command()
@handle_errors
def parity(
    model: str = typer.Option("ps3-tiny", "--model", help="Preset or checkpoint directory."),
    image: Optional[Path] = typer.Option(None, "--image", help="Input image (default: the sample image)."),
    backend: List[str] = typer.Option(["onnxruntime"], "--backend", help="Exported backends to check (repeatable)."),
    num_look_close: Optional[str] = NumLookClose,
    num_token_look_close: Optional[str] = NumTokenLookClose,
    select_num_each_scale: Optional[str] = SelectNumEachScale,
    look_close_mode: Optional[str] = LookCloseMode,
    smooth_selection_prob: Optional[bool] = Smooth,
    prompt_embedding: Optional[Path] = PromptEmbedding,
    layer: int = Layer,
    seed: int = typer.Option(defaults.DEFAULT_SEED, "--seed"),
):
    """Compare the official ps3-torch model, our torch model and the exported stages."""
    from .demo import sample_image
    from .parity import run_parity

    settings = _settings(num_look_close, num_token_look_close, select_num_each_scale, look_close_mode,
                         smooth_selection_prob)
    prompt = _load_prompt_embedding(prompt_embedding)
    pil = sample_image() if image is None else image
    with console.status("parity") as status:
        report = run_parity(model, pil, settings, prompt_embedding=prompt, layer=layer,
                            backends=tuple(backend), seed=seed, progress=_progress(status))
    tol = defaults.TOLERANCES["fp32"]
    table = Table(title=f"parity, fp32 (max abs <= {tol['max_abs']}, min cosine >= {tol['min_cosine']}), "
                        f"{report.tokens} tokens")
    for col in ("stage", "compared", "max abs", "min cosine", "selection", "ok"):
        table.add_column(col)
    for r in report.rows:
        table.add_row(r.stage, r.compared, "" if r.max_abs is None else f"{r.max_abs:.2e}",
                      "" if r.min_cosine is None else f"{r.min_cosine:.7f}", r.selection,
                      "[green]ok[/green]" if r.ok else "[red]FAIL[/red]")
    console.print(table)
    if not report.ok:
        err_console.print("[red]error:[/red] parity outside tolerance")
        raise typer.Exit(1)


@app.command()
@handle_errors
def inspect(
    artifacts: Path = typer.Argument(..., help="Artifact directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the raw manifest."),
):
    """Show what an artifact's manifest says (and check its files)."""
    from .exporter.manifest import load_manifest

    manifest = load_manifest(artifacts, verify=True)
    if as_json:
        print(json.dumps(manifest, indent=2))
        return
    m, g = manifest["model"], manifest["geometry"]
    console.print(f"[bold]{escape(str(artifacts))}[/bold]  schema v{manifest['schema_version']}, "
                  f"ps3edge {manifest['producer'].get('version', '?')}, opset {manifest['opset']}, {manifest['precision']}",
                  highlight=False)
    src = manifest["source"]
    origin = (f"preset {src['name']} (seed {src['seed']})" if src.get("kind") == "preset"
              else f"checkpoint {escape(str(src.get('path')))}")
    console.print(f"model  {escape(str(m['name']))}: width {m['width']}, depth {m['depth']}, heads {m['num_heads']}, "
                  f"mlp {m['mlp_dim']}; weights from {origin}", highlight=False)
    console.print(f"scales {g['scales']} -> grids {g['grids']}; {g['lowres_tokens']} low-res tokens, "
                  f"{g['highres_patches_total']} high-res patches {g['highres_patches_each_scale']}", highlight=False)
    d = manifest["defaults"]
    console.print(f"look-close  {'+'.join(map(str, d['select_num_each_scale']))} patches per step, "
                  f"default {d.get('num_look_close', defaults.DEFAULT_NUM_LOOK_CLOSE)} steps, at most {g['max_tokens_per_highres_call']} "
                  f"tokens per highres call; returned layers {manifest['returned_layers']}", highlight=False)
    p = manifest["preprocessing"]
    console.print(f"preprocess  {p['resize']} resize to {p['size']} ({p['interpolation']}), x{p['rescale']}, "
                  f"mean {p['mean']}, std {p['std']}", highlight=False)
    table = Table(title="stages")
    for col in ("stage", "file", "inputs", "outputs"):
        table.add_column(col)
    fmt = lambda ts: "\n".join(f"{t['name']} {t['dtype']} {tuple(t['shape'])}" for t in ts)
    for name, s in manifest["stages"].items():
        files = s["file"] + "".join(f" + {x}" for x in s.get("external_data", []))
        table.add_row(name, files, fmt(s["inputs"]), fmt(s["outputs"]))
    console.print(table)
    total = sum((Path(artifacts) / f).stat().st_size for f in manifest["files"]) / 2 ** 20
    console.print(f"{len(manifest['files'])} files, {total:.1f} MiB, all sha256 match the manifest", highlight=False)


@app.command()
@handle_errors
def bench(
    model: List[str] = typer.Option(["ps3-tiny"], "--model", help="Preset (repeatable): ps3-1.5k ps3-4k ps3-tiny ps3-tiny-4k."),
    backend: str = typer.Option("torch", "--backend", help="torch: the device-resident fast path (runtime/fast.py)."),
    device: str = typer.Option("auto", "--device", help="cuda, cpu, or auto (cuda when there is one)."),
    dtype: str = typer.Option("bf16", "--dtype", help="fp32, fp16 or bf16."),
    num_look_close: str = typer.Option("1,2,3,4,5,6", "--num-look-close", help="Comma-separated sweep."),
    against: Optional[str] = typer.Option(None, "--against", help="'official': time ps3-torch in the same run."),
    warmup: int = typer.Option(3, "--warmup"),
    repeat: int = typer.Option(10, "--repeat"),
    graphs: bool = typer.Option(True, "--cuda-graphs/--no-cuda-graphs", help="Replay the run from a CUDA graph."),
    depth: Optional[int] = typer.Option(None, "--depth", help="Truncate the presets to their first N blocks."),
    official_ties: str = typer.Option("published", "--official-ties", help="published, or pinned: compare against the official run with top-k ties broken like ours."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the rows as JSON."),
    markdown_out: Optional[Path] = typer.Option(None, "--markdown", help="Write the table as markdown."),
    plot_out: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG of latency against NUM_LOOK_CLOSE."),
):
    """Time the look-close loop per stage (and the official code on the same device)."""
    from . import bench as benchmod

    if backend != "torch":
        raise Ps3EdgeError("bench times the torch fast path; for onnxruntime use benchmarks/cpu_stages.py")
    if official_ties not in ("published", "pinned"):
        raise Ps3EdgeError(f"--official-ties takes published or pinned, got '{official_ties}'")
    if against not in (None, "official"):
        raise Ps3EdgeError(f"--against takes 'official', got '{against}'")
    try:
        steps = [int(x) for x in num_look_close.split(",") if x.strip()]
    except ValueError:
        raise Ps3EdgeError(f"--num-look-close must be comma-separated integers, got '{num_look_close}'") from None
    if device == "auto":
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    with console.status("bench") as status:
        for name in model:
            rows += benchmod.bench_model(name, device=device, dtype=dtype, steps_list=steps,
                                         against_official=against == "official", warmup=warmup,
                                         repeat=repeat, graphs=graphs, depth=depth,
                                         pin_ties=official_ties == "pinned", progress=_progress(status))
    table = benchmod.markdown(rows)
    console.print(table, highlight=False, soft_wrap=True)
    for name in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == name]
        slope = benchmod.fit_per_step(rs, "ours_ms")
        if slope is not None:
            per_step_highres = [r["stages_ms"]["highres"] / r["num_look_close"] for r in rs]
            console.print(f"{name}: {slope:.2f} ms per look-close step (fit); highres stage alone "
                          f"{min(per_step_highres):.2f}-{max(per_step_highres):.2f} ms per step", highlight=False)
    if json_out:
        json_out.write_text(json.dumps(rows, indent=2))
    if markdown_out:
        markdown_out.write_text(table + "\n")
    if plot_out and not benchmod.plot(rows, plot_out):
        err_console.print("matplotlib is not installed: no plot written")


@app.command()
def version():
    """Print the ps3edge version."""
    print(__version__)


def main():
    app()


if __name__ == "__main__":
    main()
