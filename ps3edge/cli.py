"""The `ps3edge` command line: demo, export, build, calibrate, run, chat, parity, inspect (--lint), bench, doctor.

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

SEED_MAX = 2 ** 63 - 1                  # seeds go to torch.Generator.manual_seed (a signed 64-bit int)

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
            _error_line(str(e))
            raise typer.Exit(2)
        except OSError as e:     # a file the command reads or writes: permissions, space, a directory in the way
            where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
            _error_line(f"{e.strerror or type(e).__name__}{': ' + where if where else ''}")
            raise typer.Exit(2)
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130)
    return wrapper


def _error_line(message: str) -> None:
    err_console.print(f"[red]error:[/red] {escape(' '.join(message.split()))}", highlight=False, soft_wrap=True)


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
        array = np.load(path, allow_pickle=False)
    except Exception as e:  # numpy raises ValueError / OSError / UnpicklingError for bad files
        raise Ps3EdgeError(f"{path} is not a .npy array ({type(e).__name__}: {e})") from None
    if not np.issubdtype(array.dtype, np.number) or not np.isfinite(array).all():
        raise Ps3EdgeError(f"the prompt embedding {path} must hold finite numbers (it has NaN, inf or non-numbers)")
    return array


def _settings(num_look_close, num_token_look_close, select_num_each_scale, look_close_mode, smooth):
    from .runtime.planning import settings_from_env
    for flag, value in (("--num-look-close", num_look_close), ("--num-token-look-close", num_token_look_close),
                        ("--select-num-each-scale", select_num_each_scale), ("--look-close-mode", look_close_mode)):
        if value is not None and not value.strip():    # an empty environment variable means unset; a flag must say
            raise Ps3EdgeError(f"{flag} is empty; leave it out to use the environment or the default")
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
    seed: int = typer.Option(defaults.DEFAULT_SEED, "--seed", min=0, max=SEED_MAX, help="Seed of a preset's random weights."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing artifact directory."),
):
    """Export the lowres, selector and highres stages to ONNX, with manifest.json."""
    from .exporter.onnx_export import export as do_export

    start = time.perf_counter()
    with console.status("exporting") as status:
        manifest = do_export(model, out, opset=opset, returned_layers=_parse_layers(layers), seed=seed,
                             overwrite=overwrite, progress=_progress(status))
    size = sum(f.stat().st_size for f in Path(out).iterdir()) / 2 ** 20
    console.print(f"wrote {escape(str(out))} ({len(manifest.files)} files, {size:.1f} MiB) "
                  f"in {time.perf_counter() - start:.1f} s", highlight=False)


@app.command()
@handle_errors
def build(
    artifacts: Path = typer.Argument(..., help="Artifact directory from 'ps3edge export', or a VILA-HD artifact (vila.json: its PS3 stages, projector and LLM)."),
    precision: str = typer.Option(defaults.DEFAULT_ENGINE_PRECISION, "--precision", help="fp32, fp16, int8 (the Q/DQ stages of 'ps3edge calibrate') or best."),
    max_look_close: Optional[str] = typer.Option(None, "--max-look-close", help="Most look-close steps one highres call takes (T_max of its profile): a number or 'all'. Default: the model's default steps (6), capped by 'all'."),
    workspace_gb: float = typer.Option(defaults.DEFAULT_WORKSPACE_GB, "--workspace-gb", help="Builder workspace limit, GiB."),
    optimization_level: int = typer.Option(defaults.DEFAULT_BUILDER_OPTIMIZATION_LEVEL, "--optimization-level", help="TensorRT builder optimization level, 0-5."),
    timing_cache: Optional[Path] = typer.Option(None, "--timing-cache", help="Timing-cache file: read before the build, replaced atomically after it."),
    via: str = typer.Option("onnx", "--via", help="onnx (TensorRT's ONNX parser) or torch-tensorrt (Torch-TensorRT dynamo on our PyTorch stages)."),
    engine_cache: Optional[Path] = typer.Option(None, "--engine-cache", help=f"Directory of built engines to reuse. Default ~/.cache/ps3edge/engines (env {defaults.ENV_ENGINE_CACHE})."),
    no_engine_cache: bool = typer.Option(False, "--no-engine-cache", help="Neither reuse nor keep engines outside the artifact."),
    force: bool = typer.Option(False, "--force", help="Rebuild even when an identical engine exists."),
    max_prompt: Optional[str] = typer.Option(None, "--max-prompt", help="VILA-HD artifacts: most positions one LLM prefill call takes (S max of its prefill profile; longer prompts are prefilled in chunks). Default: min(context - 1, 4096)."),
):
    """Build TensorRT engines for the stages and record them in the manifest (a VILA-HD artifact:
    its PS3 stages, then the projector and the LLM with prefill and decode profiles, in vila.json)."""
    from .engines.builder import BuildOptions, build as do_build
    from .engines.cache import default_engine_cache_dir
    from .engines.llm_engine import build_vila_engines, check_vila_options, is_vila_artifact

    options = BuildOptions(precision=precision, max_look_close=max_look_close, workspace_gb=workspace_gb,
                           optimization_level=optimization_level, timing_cache=timing_cache, via=via,
                           engine_cache=None if no_engine_cache else (engine_cache or default_engine_cache_dir()),
                           force=force).validate()
    vila = is_vila_artifact(artifacts)
    if vila:
        vila_checked = check_vila_options(artifacts, options, max_prompt)   # fails before any PS3 engine is written
    elif max_prompt is not None:
        raise Ps3EdgeError(f"--max-prompt applies to VILA-HD artifacts (with vila.json); {artifacts} is a PS3 artifact")
    start = time.perf_counter()
    with console.status("building engines") as status:
        ps3_dir = Path(artifacts) / "ps3" if vila else Path(artifacts)
        manifest = do_build(ps3_dir, options, progress=_progress(status))
        rows = [(name, ps3_dir, e.to_dict()) for name, e in manifest.engines.items()]
        if vila:
            vila_manifest = build_vila_engines(artifacts, options, max_prompt, progress=_progress(status),
                                               checked=vila_checked)
            rows += [(name, Path(artifacts), e) for name, e in vila_manifest["engines"].items()]
    table = Table(title=f"TensorRT engines in {escape(str(artifacts))}")
    for col in ("stage", "file", "precision", "MiB", "context MiB", "profile (max)"):
        table.add_column(col)
    for name, root, e in rows:
        size = (root / e["file"]).stat().st_size / 2 ** 20
        ctx = e.get("device_memory_bytes")
        dynamic = {k: tuple(v["max"]) for k, v in e["profiles"].items() if v["min"] != v["max"]}
        table.add_row(name, e["file"], e["precision"], f"{size:.1f}", "" if ctx is None else f"{ctx / 2 ** 20:.1f}",
                      ", ".join(f"{k} {v}" for k, v in dynamic.items()))
    console.print(table)
    first = rows[0][2]
    console.print(f"TensorRT {first['tensorrt_version']}, {escape(first['gpu_name'])} (SM{first['sm']}); "
                  f"done in {time.perf_counter() - start:.1f} s", highlight=False)


def _print_accuracy(report, title: str):
    """The accuracy report of calibration/report.py as a table, and the stage times."""
    tol = report.tolerance
    table = Table(title=f"{title} (min cosine >= {tol['min_cosine']}, max abs <= {tol['max_abs']}, "
                        f"selection IoU >= {tol['min_iou']}), {len(report.images)} images")
    for col in ("stage", "compared", "max abs", "min cosine", "selection", "ok"):
        table.add_column(col)
    for r in report.rows:
        sel = r.selection or ("" if r.iou is None else f"IoU {r.iou:.3f}")
        table.add_row(r.stage, r.compared, "" if r.max_abs is None else f"{r.max_abs:.2e}",
                      "" if r.min_cosine is None else f"{r.min_cosine:.6f}", sel,
                      "[green]ok[/green]" if r.ok else "[red]FAIL[/red]")
    console.print(table)
    for name, stages in report.timings_ms.items():
        console.print(f"{name:<22} " + "  ".join(f"{k} {v:.0f} ms" for k, v in stages.items()), highlight=False)
    for note in report.notes:
        console.print(f"note: {escape(note)}", highlight=False)


@app.command()
@handle_errors
def calibrate(
    artifacts: Path = typer.Argument(..., help="Artifact directory from 'ps3edge export'."),
    images: Optional[Path] = typer.Option(None, "--images", help="Image folder: INT8 calibrates on the first --samples (by name) and reports on the next ones; FP16 reports on it."),
    precision: str = typer.Option("int8", "--precision", help="int8 (explicit Q/DQ) or fp16 (the FP16 precision policy)."),
    method: str = typer.Option(defaults.DEFAULT_CALIBRATION_METHOD, "--method", help="INT8 calibration: max, entropy or percentile."),
    samples: int = typer.Option(defaults.DEFAULT_CALIBRATION_SAMPLES, "--samples", min=1, help="Calibration images."),
    exclude_blocks: str = typer.Option(defaults.DEFAULT_EXCLUDE_BLOCKS, "--exclude-blocks", help="Transformer blocks kept float in INT8: first, last, indices, e.g. first,last."),
    quantize_selector_inputs: bool = typer.Option(False, "--quantize-selector-inputs/--keep-selector-inputs", help="INT8 also for the layers that only feed the selector (selection_feature_proj, ShallowConvNet)."),
    tool: str = typer.Option("auto", "--tool", help="auto (NVIDIA Model Optimizer when installed, else onnxruntime), modelopt or onnxruntime."),
    holdout_images: Optional[Path] = typer.Option(None, "--holdout-images", help="Folder of held-out images for the accuracy report."),
    holdout: int = typer.Option(defaults.DEFAULT_HOLDOUT_SAMPLES, "--holdout", min=1, help="Held-out images the report runs on."),
    num_look_close: Optional[str] = typer.Option("1", "--num-look-close", help="Look-close steps of the report's runs."),
    with_torch: bool = typer.Option(False, "--with-torch", help="FP16: also compare our torch model in fp16 with itself in fp32 (slow on a CPU)."),
):
    """Write FP16 or INT8 (Q/DQ) stages next to the FP32 ones, register them, report their accuracy."""
    from .calibration.calibrate import CalibrationOptions, calibrate as do_calibrate

    settings = _settings(num_look_close, None, None, None, None)
    options = CalibrationOptions(precision, images, method=method, samples=samples, exclude_blocks=exclude_blocks,
                                 exclude_selection_branch=not quantize_selector_inputs, tool=tool,
                                 holdout_images=holdout_images, holdout=holdout, report_settings=settings,
                                 with_torch=with_torch)
    start = time.perf_counter()
    with console.status("calibrating") as status:
        report = do_calibrate(artifacts, options, progress=_progress(status))
    _print_accuracy(report, f"{precision} vs fp32")
    name = defaults.ACCURACY_REPORT.format(precision=precision)
    console.print(f"wrote {precision} stages and {name} into {escape(str(artifacts))} in "
                  f"{time.perf_counter() - start:.1f} s" + (f"; run them with --precision {precision}" if report.ok else
                  " (registered, but see the report before running them)"), highlight=False)
    if not report.ok:
        _error_line(f"{precision} accuracy outside tolerance")
        raise typer.Exit(1)


@app.command()
@handle_errors
def run(
    artifacts: Path = typer.Argument(..., help="Artifact directory from 'ps3edge export'."),
    image: Path = typer.Option(..., "--image", help="Input image."),
    out: Path = typer.Option(..., "--out", help="Output .safetensors (features, prob, selection maps)."),
    backend: str = typer.Option("onnxruntime", "--backend", help="onnxruntime, torch, or tensorrt (the engines of 'ps3edge build')."),
    num_look_close: Optional[str] = NumLookClose,
    num_token_look_close: Optional[str] = NumTokenLookClose,
    select_num_each_scale: Optional[str] = SelectNumEachScale,
    look_close_mode: Optional[str] = LookCloseMode,
    smooth_selection_prob: Optional[bool] = Smooth,
    prompt_embedding: Optional[Path] = PromptEmbedding,
    layer: int = Layer,
    overlay: Optional[Path] = typer.Option(None, "--overlay", help="Also write a PNG with the selected patches."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, or fp16 / int8: the stages of 'ps3edge calibrate'; torch backend: fp16 / bf16 (on CUDA the whole fast path runs in it)."),
    device: str = typer.Option("auto", "--device", help="torch backend: cuda (the device-resident fast path with CUDA graphs), cpu, or auto (cuda when there is one)."),
    preprocess_on: Optional[str] = typer.Option(None, "--preprocess", help="cpu (PIL) or device (the same resize on the torch device, bit-identical); default: device on the fast path."),
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
    paths = {"--image": image, "--out": out, **({"--overlay": overlay} if overlay is not None else {})}
    names = list(paths)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if paths[a].resolve() == paths[b].resolve():
                raise Ps3EdgeError(f"{a} and {b} are the same file ({paths[a]}); nothing was written")
    check_output_path(out, "--out")
    if overlay is not None:
        check_output_path(overlay, "--overlay")
        if overlay.suffix.lower() != ".png":
            raise Ps3EdgeError(f"--overlay is written as PNG: give a .png name, got {overlay}")
    pil = open_image(image)
    pipeline = Pipeline(artifacts, backend, precision=precision, device=device,
                        preprocess=preprocess_on)
    result = pipeline.run(pil, settings, prompt_embedding=prompt, layer=layer)
    write_outputs(result, pil, out, overlay)
    _print_run_table(result, backend if pipeline.fast is None else f"torch, {pipeline.device}, fast path")
    if precision != "fp32":
        console.print(f"precision {precision}", highlight=False)
    console.print(f"features {tuple(result.features.shape)} -> {escape(str(out))}", highlight=False)
    if overlay is not None:
        console.print(f"overlay -> {escape(str(overlay))}", highlight=False)


def _check_replaceable_artifact(artifacts: Path) -> None:
    """A rerun of `demo` replaces its previous artifact, and nothing else: the directory must hold
    a manifest and only the files it lists."""
    try:
        listed = set(json.loads((artifacts / defaults.MANIFEST_NAME).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        raise Ps3EdgeError(f"{artifacts} exists and is not a ps3edge artifact; choose another --out") from None
    extra = sorted(p.name for p in artifacts.iterdir() if p.name not in listed | {defaults.MANIFEST_NAME})
    if extra:
        raise Ps3EdgeError(f"{artifacts} holds files that are not part of its artifact ({', '.join(extra[:3])}); "
                           "choose another --out")


@app.command()
@handle_errors
def demo(
    out: Path = typer.Option(Path("ps3edge-demo"), "--out", help="Where to put the artifact, features and overlay (a rerun replaces a previous demo's)."),
):
    """Export ps3-tiny, run it on the sample image and write the selection overlay."""
    import os

    from .demo import sample_image
    from .exporter.onnx_export import export as do_export
    from .model import preset
    from .runtime.lookclose import Pipeline
    from .runtime.outputs import check_output_path, write_outputs
    from .runtime.planning import Geometry, resolve_steps, settings_from_env

    start = time.perf_counter()
    artifacts = out / "artifacts"
    if artifacts.exists():
        _check_replaceable_artifact(artifacts)
    for name in ("features.safetensors", "overlay.png"):
        check_output_path(out / name)
    # one look-close step unless the environment asks otherwise, so the overlay shows a choice;
    # settings the model cannot take fail here, before anything is written
    env_steps = os.environ.get(defaults.ENV_NUM_LOOK_CLOSE) or os.environ.get(defaults.ENV_NUM_TOKEN_LOOK_CLOSE)
    settings = settings_from_env(num_look_close=None if env_steps else 1)
    resolve_steps(settings, Geometry.of(preset("ps3-tiny")))
    with console.status("demo") as status:
        say = _progress(status)
        do_export("ps3-tiny", artifacts, overwrite=True, progress=say)
        say("running the look-close loop on the sample image")
        image = sample_image()
        pipeline = Pipeline(artifacts, "onnxruntime")
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
    seed: int = typer.Option(defaults.DEFAULT_SEED, "--seed", min=0, max=SEED_MAX),
    precision: str = typer.Option("fp32", "--precision", help="fp32: against the official code; fp16 / int8: those exported stages against the FP32 ones."),
    artifacts: Optional[Path] = typer.Option(None, "--artifacts", help="Use this artifact directory instead of exporting --model (fp16/int8: its calibrated stages)."),
    images: Optional[Path] = typer.Option(None, "--images", help="fp16/int8: folder of held-out images (without --artifacts, INT8 calibrates on the first --samples)."),
    samples: int = typer.Option(defaults.DEFAULT_CALIBRATION_SAMPLES, "--samples", min=1, help="int8 without --artifacts: calibration images."),
    method: str = typer.Option(defaults.DEFAULT_CALIBRATION_METHOD, "--method", help="int8 without --artifacts: max, entropy or percentile."),
    with_torch: bool = typer.Option(False, "--with-torch", help="fp16: also our torch model in fp16 against fp32."),
):
    """Compare the official ps3-torch model, our torch model and the exported stages (or, with --precision fp16/int8, those stages against the FP32 ones)."""
    from .demo import sample_image
    from .parity import run_parity, run_precision_parity

    settings = _settings(num_look_close, num_token_look_close, select_num_each_scale, look_close_mode,
                         smooth_selection_prob)
    if precision != "fp32":
        if backend != ["onnxruntime"]:
            raise Ps3EdgeError("--precision fp16/int8 compares onnxruntime stages (add --with-torch for torch fp16)")
        if prompt_embedding is not None:
            raise Ps3EdgeError("--precision fp16/int8 selects bottom-up (the learned prior); drop --prompt-embedding")
        if settings.num_look_close is None and settings.num_token_look_close is None:
            settings = _settings("1", None, select_num_each_scale, look_close_mode, smooth_selection_prob)
        with console.status("parity") as status:
            report = run_precision_parity(precision, settings, model_spec=model, artifact_dir=artifacts,
                                          images=images, image=image, layer=layer, seed=seed, samples=samples,
                                          method=method, with_torch=with_torch, progress=_progress(status))
        _print_accuracy(report, f"parity, {precision} vs fp32")
        if not report.ok:
            err_console.print(f"[red]error:[/red] {precision} parity outside tolerance")
            raise typer.Exit(1)
        return
    prompt = _load_prompt_embedding(prompt_embedding)
    pil = sample_image() if image is None else image
    with console.status("parity") as status:
        report = run_parity(model, pil, settings, prompt_embedding=prompt, layer=layer,
                            backends=tuple(backend), seed=seed, artifact_dir=artifacts, progress=_progress(status))
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


def _print_lint(artifacts: Path, manifest, trt_version: str, max_look_close, as_json: bool,
                precision: str = "fp32"):
    """`inspect --lint`: a table of findings (repeats of one finding folded into one row)."""
    from .exporter.lint import group_findings, lint_artifacts

    report, t_max = lint_artifacts(artifacts, trt_version, max_look_close, manifest=manifest, precision=precision)
    if as_json:
        print(json.dumps({**report.to_dict(), "precision": precision, "max_look_close": t_max}, indent=2))
    else:
        title = (f"TensorRT {report.trt_version} lint of {escape(str(artifacts))}, {precision} stages "
                 f"(highres profile T <= {t_max}, N <= {manifest.geometry.max_tokens_per_highres_call})")
        if report.findings:
            table = Table(title=title)
            for col in ("severity", "stage", "check", "op", "node", "message"):
                table.add_column(col, overflow="fold")
            for f, count in group_findings(report.findings):
                sev = "[red]error[/red]" if f.severity == "error" else "[yellow]warning[/yellow]"
                node = escape(f.node) + (f" (+{count - 1} more)" if count > 1 else "")
                table.add_row(sev, f.stage, f.check, f.op, node, escape(f.message))
            console.print(table)
        else:
            console.print(title, highlight=False)
        for note in report.notes:
            console.print(f"note: {escape(note)}", highlight=False)
        if report.largest_tensor:
            console.print(f"largest tensor at the profile max: {report.largest_tensor:.3g} elements "
                          f"({report.largest_tensor / 2 ** 31:.0%} of TensorRT's 2^31 limit)", highlight=False)
        console.print(f"{len(report.errors)} errors, {len(report.warnings)} warnings in "
                      f"{len(manifest.stages)} stages", highlight=False)
    if report.errors:
        raise typer.Exit(1)


@app.command()
@handle_errors
def inspect(
    artifacts: Path = typer.Argument(..., help="Artifact directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the raw manifest (with --lint: the findings)."),
    lint: bool = typer.Option(False, "--lint", help="Check every stage against the TensorRT ONNX parser; exit 1 on errors."),
    trt_version: str = typer.Option(defaults.DEFAULT_LINT_TRT_VERSION, "--trt-version", help="TensorRT the lint targets (10.3 = JetPack 6)."),
    max_look_close: Optional[str] = typer.Option(None, "--max-look-close", help="Lint: steps per highres call the profile bounds (int or 'all'; default: the manifest's)."),
    precision: str = typer.Option("fp32", "--precision", help="Lint: the stage files to check, fp32 or the fp16 / int8 ones 'ps3edge calibrate' wrote."),
):
    """Show what an artifact's manifest says (and check its files); --lint checks TensorRT compatibility."""
    from .artifact.manifest import load_manifest

    manifest = load_manifest(artifacts, verify=True)
    given = [flag for flag, on in (("--trt-version", trt_version != defaults.DEFAULT_LINT_TRT_VERSION),
                                   ("--max-look-close", max_look_close is not None),
                                   ("--precision", precision != "fp32")) if on]
    if given and not lint:
        raise Ps3EdgeError(f"{', '.join(given)} applies to --lint")
    if lint:
        _print_lint(artifacts, manifest, trt_version, max_look_close, as_json, precision)
        return
    if as_json:
        print(json.dumps(manifest.to_dict(), indent=2))
        return
    m, g = manifest.config, manifest.geometry
    console.print(f"[bold]{escape(str(artifacts))}[/bold]  schema v{manifest.schema_version}, "
                  f"ps3edge {manifest.producer.get('version', '?')}, opset {manifest.opset}, {manifest.precision}",
                  highlight=False)
    src = manifest.source
    origin = (f"preset {src['name']} (seed {src['seed']})" if src.get("kind") == "preset"
              else f"checkpoint {escape(str(src.get('path')))}")
    console.print(f"model  {escape(str(m.name))}: width {m.width}, depth {m.depth}, heads {m.num_heads}, "
                  f"mlp {m.mlp_dim}; weights from {origin}", highlight=False)
    console.print(f"scales {list(g.scales)} -> grids {list(g.grids)}; {g.lowres_tokens} low-res tokens, "
                  f"{g.highres_patches_total} high-res patches {list(g.highres_patches_each_scale)}", highlight=False)
    d = manifest.look_close_defaults
    steps = defaults.DEFAULT_NUM_LOOK_CLOSE if d.num_look_close is None else d.num_look_close
    console.print(f"look-close  {'+'.join(map(str, d.select_num_each_scale))} patches per step, "
                  f"default {steps} steps, at most {g.max_tokens_per_highres_call} "
                  f"tokens per highres call; returned layers {list(manifest.returned_layers)}", highlight=False)
    p = manifest.preprocessing
    console.print(f"preprocess  {p.resize} resize to {p.size} ({p.interpolation}), x{p.rescale}, "
                  f"mean {list(p.mean)}, std {list(p.std)}", highlight=False)
    table = Table(title="stages")
    for col in ("stage", "file", "inputs", "outputs"):
        table.add_column(col)
    fmt = lambda ts: "\n".join(f"{t.name} {t.dtype} {tuple(t.shape)}" for t in ts)
    for name, s in manifest.stages.items():
        files = s.file + "".join(f" + {x}" for x in s.external_data)
        table.add_row(name, files, fmt(s.inputs), fmt(s.outputs))
    console.print(table)
    for name, e in manifest.engines.items():
        console.print(f"engine {name}: {e.file}, {e.precision} via {e.built_via}, TensorRT "
                      f"{e.tensorrt_version} on SM{e.sm} ({escape(e.gpu_name)}), T <= {e.get('max_look_close', '?')}",
                      highlight=False)
    for name, p in manifest.precisions.items():
        how = ", ".join(str(x) for x in (p.get("tool"), p.get("method"),
                                         f"{p.samples} images" if "samples" in p else None) if x)
        console.print(f"precision {name}: {', '.join(s['file'] for s in p.stages.values())} ({escape(how)})"
                      + (f"; report {p.report}" if p.get("report") else ""), highlight=False)
    total = sum((Path(artifacts) / f).stat().st_size for f in manifest.files) / 2 ** 20
    console.print(f"{len(manifest.files)} files, {total:.1f} MiB, all sha256 match the manifest", highlight=False)


@app.command()
@handle_errors
def bench(
    model: List[str] = typer.Option(["ps3-tiny"], "--model", help="Repeatable: a PS3 preset (ps3-1.5k ps3-4k ps3-tiny ps3-tiny-4k), or a VILA-HD model (vila-hd-tiny or a checkpoint directory) to also time the projector and the LLM."),
    backend: str = typer.Option("torch", "--backend", help="torch: the device-resident fast path (runtime/fast.py)."),
    device: str = typer.Option("auto", "--device", help="cuda, cpu, or auto (cuda when there is one)."),
    dtype: str = typer.Option("bf16", "--dtype", help="fp32, fp16 or bf16."),
    num_look_close: str = typer.Option("1,2,3,4,5,6", "--num-look-close", help="Comma-separated sweep."),
    against: Optional[str] = typer.Option(None, "--against", help="'official': time ps3-torch in the same run."),
    warmup: int = typer.Option(3, "--warmup", min=0),
    repeat: int = typer.Option(10, "--repeat", min=1),
    graphs: bool = typer.Option(True, "--cuda-graphs/--no-cuda-graphs", help="Replay the run from a CUDA graph."),
    depth: Optional[int] = typer.Option(None, "--depth", min=1, help="Truncate the presets to their first N blocks."),
    official_ties: str = typer.Option("published", "--official-ties", help="published, or pinned: compare against the official run with top-k ties broken like ours."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the rows as JSON."),
    markdown_out: Optional[Path] = typer.Option(None, "--markdown", help="Write the table as markdown."),
    plot_out: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG of latency against NUM_LOOK_CLOSE."),
    image: Optional[Path] = typer.Option(None, "--image", help="Input image (default: the 1600x1000 sample); preprocessing is timed on it."),
    decode_tokens: int = typer.Option(16, "--decode-tokens", help="VILA-HD: greedy tokens to time the LLM decode on."),
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
        steps = [int(x) for x in num_look_close.split(",")]
    except ValueError:
        steps = []
    if not steps or min(steps) < 1 or len(set(steps)) != len(steps):
        raise Ps3EdgeError(f"--num-look-close must be distinct whole numbers >= 1, comma-separated like 1,2,6; "
                           f"got '{num_look_close}'")
    if decode_tokens < 1:
        raise Ps3EdgeError(f"--decode-tokens must be at least 1, got {decode_tokens}")
    from .runtime.lookclose import resolve_device
    from .runtime.outputs import check_output_path
    device = resolve_device("torch", device)
    for path, flag in ((json_out, "--json"), (markdown_out, "--markdown"), (plot_out, "--plot")):
        if path is not None:                 # before the benchmark, not after it
            check_output_path(path, flag)
            path.parent.mkdir(parents=True, exist_ok=True)
    pil = None
    if image is not None:
        from .runtime.preprocess import open_image
        pil = open_image(image)
    rows = []
    with console.status("bench") as status:
        for name in model:
            rows += benchmod.bench_model(name, device=device, dtype=dtype, steps_list=steps,
                                         against_official=against == "official", warmup=warmup,
                                         repeat=repeat, graphs=graphs, depth=depth,
                                         pin_ties=official_ties == "pinned", image=pil,
                                         decode_tokens=decode_tokens, progress=_progress(status))
    table = benchmod.markdown(rows)
    console.print(table, highlight=False, soft_wrap=True)
    for line in benchmod.summary(rows):
        console.print(line, highlight=False)
    if json_out:
        json_out.write_text(json.dumps(rows, indent=2))
    if markdown_out:
        markdown_out.write_text(table + "\n")
    if plot_out and not benchmod.plot(rows, plot_out):
        err_console.print("matplotlib is not installed: no plot written")


@app.command()
@handle_errors
def chat(
    model_path: str = typer.Option(..., "--model-path", help="A VILA-HD checkpoint directory (llm/, vision_tower/, mm_projector/) or the preset vila-hd-tiny."),
    text: str = typer.Option(..., "--text", help="The question (not empty)."),
    media: Path = typer.Option(..., "--media", help="The image."),
    conv_mode: str = typer.Option("auto", "--conv-mode", help="Chat template: auto (the tokenizer's, Qwen2's for VILA-HD)."),
    backend: str = typer.Option("onnxruntime", "--backend", help="onnxruntime (exported stages), torch (transformers + our PyTorch PS3) or tensorrt (the engines of 'ps3edge build ARTIFACTS')."),
    artifacts: Optional[Path] = typer.Option(None, "--artifacts", help="Use (or export into) this VILA-HD artifact directory instead of the cache."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1, help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy; > 0 samples."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (with --temperature > 0)."),
    seed: int = typer.Option(0, "--seed", min=0, max=SEED_MAX, help="Sampling seed (and a preset's weights seed)."),
    num_look_close: Optional[str] = NumLookClose,
    num_token_look_close: Optional[str] = NumTokenLookClose,
    select_num_each_scale: Optional[str] = SelectNumEachScale,
    look_close_mode: Optional[str] = typer.Option(None, "--look-close-mode", help="after_prompt (top-down, default) or after_image (bottom-up). Env: LOOK_CLOSE_MODE."),
    smooth_selection_prob: Optional[bool] = Smooth,
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object: answer, token counts, stage times."),
):
    """Ask VILA-HD about an image (like vila-infer), streaming the answer."""
    import sys

    from .llm.generate import SamplingConfig
    from .llm.pipeline import VILA_MANIFEST, VilaPipeline, ensure_artifacts, export_vila
    from .runtime.preprocess import open_image

    if conv_mode != "auto":
        raise Ps3EdgeError(f"--conv-mode '{conv_mode}' is not supported; use auto (the checkpoint's chat template)")
    if not text.strip():
        raise Ps3EdgeError("--text is empty: ask a question about the image")
    from .llm.vila import VILA_PRESETS
    if model_path not in VILA_PRESETS and not Path(model_path).is_dir():    # before any progress line
        raise Ps3EdgeError(f"--model-path '{model_path}' is neither a VILA-HD preset ({', '.join(VILA_PRESETS)}) "
                           "nor a checkpoint directory")
    if backend == "tensorrt":
        from .engines.platform import import_tensorrt
        import_tensorrt()                    # before anything is exported: no TensorRT, nothing written
    settings = _settings(num_look_close, num_token_look_close, select_num_each_scale, look_close_mode,
                         smooth_selection_prob)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed).validate()
    image = open_image(media)
    say = lambda msg: err_console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {escape(msg)}", highlight=False)  # noqa: E731
    if artifacts is None:
        art = ensure_artifacts(model_path, seed=seed, progress=say)
    elif (artifacts / VILA_MANIFEST).is_file():
        art = artifacts
    else:
        export_vila(model_path, artifacts, seed=seed, progress=say)
        art = artifacts
    pipeline = VilaPipeline(art, backend)

    def stream(piece: str):
        sys.stdout.write(piece)
        sys.stdout.flush()

    result = pipeline.answer(image, text, settings, sampling, on_text=None if json_out else stream)
    if json_out:
        print(json.dumps({**result.to_json(), "backend": backend, "look_close_mode": settings.mode,
                          "artifacts": str(art)}, indent=2))
    else:
        sys.stdout.write("\n")
        t = result.tokens
        highres = " ".join(f"{k}px {v}" for k, v in t["highres"].items())
        err_console.print(f"tokens: low-res {t['lowres']}, high-res {highres}, text {t['text']}, "
                          f"generated {t['generated']}; {sum(result.timings_ms.values()):.0f} ms", highlight=False)


@app.command()
@handle_errors
def doctor(
    as_json: bool = typer.Option(False, "--json", help="Print everything as one JSON object."),
):
    """What this machine can do: packages, CUDA / GPU, Jetson, and which backends and precisions work."""
    from .doctor import collect

    info = collect()
    if as_json:
        print(json.dumps(info, indent=2))
        return
    py = info["python"]
    console.print(f"[bold]ps3edge {info['ps3edge']}[/bold]  Python {py['version']} on {escape(py['platform'])}",
                  highlight=False)
    packages = Table(title="packages", show_edge=False)
    for col in ("package", "version"):
        packages.add_column(col)
    for name, p in info["packages"].items():
        state = (escape(f"{p['version'] or '?'}, fails to import: {p['error']}") if p["error"]
                 else p["version"] or "installed" if p["installed"] else "[dim]not installed[/dim]")
        packages.add_row(name, state)
    console.print(packages)
    if info["onnxruntime_providers"]:
        console.print(f"onnxruntime providers: {', '.join(info['onnxruntime_providers'])}", highlight=False)
    cuda = info["cuda"]
    if cuda["available"]:
        for d in cuda["devices"]:
            memory = (f"{d['free_gib']:.1f} / {d['total_gib']:.1f} GiB free" if d.get("total_gib") is not None
                      else "memory unknown")
            shared = " (unified, shared with the CPU)" if d.get("unified_memory") else ""
            console.print(f"GPU {d['index']}: {escape(d['name'])}, SM {d['sm']}, {memory}{shared}; "
                          f"torch CUDA {cuda['torch_cuda']}, cuDNN {cuda['cudnn']}", highlight=False)
    else:
        console.print(f"CUDA: not available ({escape(cuda['reason'] or 'unknown')})", highlight=False)
    j = info["jetson"]
    if j["is_jetson"]:
        console.print(f"Jetson: {escape(j['model'] or 'unknown board')}, L4T {j['l4t'] or '?'}, "
                      f"JetPack {j['jetpack'] or '?'}", highlight=False)
    else:
        console.print("Jetson: no (/etc/nv_tegra_release absent)", highlight=False)
    precisions = ("fp32", "fp16", "bf16", "int8")
    grid: dict[tuple, dict] = {}
    for r in info["backends"]:
        grid.setdefault((r["backend"], r["device"]), {})[r["precision"]] = r
    table = Table(title="what works here", show_edge=False)
    for col in ("backend", "device", *precisions, "why not"):
        table.add_column(col)
    for (backend, device), cells in grid.items():
        marks = [("[green]yes[/green]" if cells[p]["ok"] else "[red]no[/red]") if p in cells else "-"
                 for p in precisions]
        why = "; ".join(dict.fromkeys(c["reason"] for c in cells.values() if not c["ok"]))
        table.add_row(backend, device, *marks, escape(why))
    console.print(table)


@app.command()
def version():
    """Print the ps3edge version."""
    print(__version__)


def main():
    """The console script: typer's usage errors (bad option values, unknown options, missing
    arguments) become one `error:` line too, with the exit code 2 click gives them."""
    import sys

    # click's exceptions, wherever this typer takes click from (its own copy since 0.29)
    click_exceptions = sys.modules[typer.BadParameter.__module__]
    try:
        code = app(standalone_mode=False)
    except click_exceptions.ClickException as e:     # UsageError, BadParameter, NoSuchOption, ...
        command = e.ctx.command_path if getattr(e, "ctx", None) is not None else "ps3edge"
        if e.format_message():                       # (no arguments at all: the help was printed)
            _error_line(f"{e.format_message()} (see '{command} --help')")
        sys.exit(e.exit_code)
    except click_exceptions.Abort:
        err_console.print("interrupted")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
