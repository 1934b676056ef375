"""The commands that make and show artifacts: export (ONNX stages), build (TensorRT engines),
calibrate (FP16 / INT8 stages and their accuracy report) and inspect (the manifest, or --lint)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from .. import defaults
from ..errors import Ps3EdgeError
from . import views
from .options import SEED_MAX, LookCloseFlags, Revision, checkpoint_spec, parse_layers
from .views import console


def export(
    model: str = typer.Option(..., "--model", help="Preset (ps3-1.5k, ps3-4k, ps3-tiny, ps3-tiny-4k), checkpoint directory or Hugging Face hub id (owner/name[@revision], e.g. nvidia/PS3-4K-SigLIP)."),
    out: Path = typer.Option(..., "--out", help="Artifact directory to create."),
    opset: int = typer.Option(defaults.DEFAULT_OPSET, "--opset", help="ONNX opset (>= 17)."),
    layers: str = typer.Option(",".join(str(l) for l in defaults.DEFAULT_RETURNED_LAYERS), "--layers", help="Blocks whose features the stages return."),
    seed: int = typer.Option(defaults.DEFAULT_SEED, "--seed", min=0, max=SEED_MAX, help="Seed of a preset's random weights."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing artifact directory."),
    max_batch: int = typer.Option(defaults.DEFAULT_MAX_BATCH, "--max-batch", min=1, help="Most images one pass takes (the batch axis of the stages' TensorRT profiles; 'run' and the server split longer lists)."),
    revision: Optional[str] = Revision,
):
    """Export the lowres, selector and highres stages to ONNX, with manifest.json. Each stage file is
    run in onnxruntime on the inputs it was traced with and checked against its PyTorch module
    (fp32 tolerance) before the artifact is written; a mismatch fails the export and leaves nothing."""
    from ..exporter.onnx_export import export as do_export
    from ..model.weights import PS3_FILES

    start = time.perf_counter()
    model = checkpoint_spec(model, revision, PS3_FILES, views.progress_line)
    with console.status("exporting") as status:
        manifest = do_export(model, out, opset=opset, returned_layers=parse_layers(layers), seed=seed,
                             overwrite=overwrite, progress=views.progress(status), max_batch=max_batch)
    size = sum(f.stat().st_size for f in Path(out).iterdir()) / 2 ** 20
    views.say(f"wrote {escape(str(out))} ({len(manifest.files)} files, {size:.1f} MiB) "
              f"in {time.perf_counter() - start:.1f} s")


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
    from ..engines.builder import BuildOptions, build as do_build
    from ..engines.cache import default_engine_cache_dir
    from ..artifact.vila import is_vila_artifact
    from ..engines.llm_engine import build_vila_engines, check_vila_options

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
        manifest = do_build(ps3_dir, options, progress=views.progress(status))
        rows = [(name, ps3_dir, e) for name, e in manifest.engines.items()]
        if vila:
            vila_json = build_vila_engines(artifacts, options, max_prompt, progress=views.progress(status),
                                           checked=vila_checked)
            rows += [(name, Path(artifacts), e) for name, e in vila_json.engines.items()]
    views.print_engines(artifacts, rows, time.perf_counter() - start)


def calibrate(
    artifacts: Path = typer.Argument(..., help="Artifact directory from 'ps3edge export' (int4: a VILA-HD artifact)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Image folder: INT8 calibrates on the first --samples (by name) and reports on the next ones; FP16 reports on it."),
    precision: str = typer.Option("int8", "--precision", help="int8 (explicit Q/DQ) or fp16 (the FP16 precision policy); int4: a VILA-HD artifact's weight-only INT4 LLM."),
    method: str = typer.Option(defaults.DEFAULT_CALIBRATION_METHOD, "--method", help="INT8 calibration: max, entropy or percentile."),
    samples: int = typer.Option(defaults.DEFAULT_CALIBRATION_SAMPLES, "--samples", min=1, help="Calibration images."),
    exclude_blocks: str = typer.Option(defaults.DEFAULT_EXCLUDE_BLOCKS, "--exclude-blocks", help="Transformer blocks kept float in INT8: first, last, indices, e.g. first,last."),
    quantize_selector_inputs: bool = typer.Option(False, "--quantize-selector-inputs/--keep-selector-inputs", help="INT8 also for the layers that only feed the selector (selection_feature_proj, ShallowConvNet)."),
    tool: str = typer.Option("auto", "--tool", help="auto (NVIDIA Model Optimizer when installed, else onnxruntime), modelopt or onnxruntime."),
    holdout_images: Optional[Path] = typer.Option(None, "--holdout-images", help="Folder of held-out images for the accuracy report."),
    holdout: int = typer.Option(defaults.DEFAULT_HOLDOUT_SAMPLES, "--holdout", min=1, help="Held-out images the report runs on."),
    num_look_close: Optional[str] = typer.Option("1", "--num-look-close", help="Look-close steps of the report's runs."),
    with_torch: bool = typer.Option(False, "--with-torch", help="FP16: also compare our torch model in fp16 with itself in fp32 (slow on a CPU)."),
    block_size: int = typer.Option(defaults.INT4_BLOCK_SIZE, "--block-size", help="INT4: weights per scale along K (a power of two >= 16)."),
):
    """Write FP16 or INT8 (Q/DQ) stages next to the FP32 ones (int4: a VILA-HD artifact's LLM), register them, report their accuracy."""
    from ..calibration.calibrate import CalibrationOptions, calibrate as do_calibrate

    if precision == "int4":
        _calibrate_int4(artifacts, tool, block_size, images, holdout_images)
        return

    settings = LookCloseFlags(num_look_close=num_look_close).settings()
    options = CalibrationOptions(precision, images, method=method, samples=samples, exclude_blocks=exclude_blocks,
                                 exclude_selection_branch=not quantize_selector_inputs, tool=tool,
                                 holdout_images=holdout_images, holdout=holdout, report_settings=settings,
                                 with_torch=with_torch)
    start = time.perf_counter()
    with console.status("calibrating") as status:
        report = do_calibrate(artifacts, options, progress=views.progress(status))
    views.print_accuracy(report, f"{precision} vs fp32")
    name = defaults.ACCURACY_REPORT.format(precision=precision)
    views.say(f"wrote {precision} stages and {name} into {escape(str(artifacts))} in "
              f"{time.perf_counter() - start:.1f} s" + (f"; run them with --precision {precision}" if report.ok else
              " (registered, but see the report before running them)"))
    if not report.ok:
        views.error_line(f"{precision} accuracy outside tolerance")
        raise typer.Exit(1)


def _calibrate_int4(artifacts: Path, tool: str, block_size: int, images, holdout_images) -> None:
    """`calibrate --precision int4`: the LLM of a VILA-HD artifact; its report printed, exit 1 outside tolerance."""
    from ..llm.int4 import Int4Settings
    from ..llm.int4_calibrate import calibrate_int4

    if images is not None or holdout_images is not None:
        raise Ps3EdgeError("--precision int4 quantizes the LLM's weights and reports on fixed text prompts: it "
                           "takes no --images or --holdout-images")
    start = time.perf_counter()
    with console.status("quantizing the LLM") as status:
        report = calibrate_int4(artifacts, Int4Settings(block_size=block_size), tool, progress=views.progress(status))
    s, tol = report.summary(), report.tolerance["min_logit_cosine"]
    for p in report.prompts:
        views.say(f"  {escape(p.text[:40]):<40}  min logit cosine {min(p.logit_cosine):.4f}  top-1 "
                  f"{sum(p.top1_agree)}/{len(p.top1_agree)}  greedy {'equal' if p.greedy_equal else 'differs'}"
                  + ("" if p.greedy_equal else f" from step {p.first_difference}"))
    mib = lambda n: n / 2 ** 20     # noqa: E731
    llm, emb = s["sizes"]["llm"], s["sizes"]["embed_tokens"]
    views.say(f"int4 vs fp32, {s['prompts']} prompts x {s['steps']} steps (teacher-forced): min logit cosine "
              f"{s['min_logit_cosine']:.4f} (>= {tol}: {'pass' if s['pass'] else 'FAIL'}), mean "
              f"{s['mean_logit_cosine']:.4f}, min hidden cosine {s['min_hidden_cosine']:.4f}, top-1 agreement "
              f"{s['top1_agreement']:.1%}, greedy answers equal {s['greedy_equal']}/{s['prompts']}")
    views.say(f"llm {mib(llm['fp32']):.2f} MiB -> {mib(llm['int4']):.2f} MiB, embed_tokens {mib(emb['fp32']):.2f} MiB "
              f"-> {mib(emb['int4']):.2f} MiB")
    name = defaults.ACCURACY_REPORT.format(precision="int4")
    views.say(f"wrote {defaults.INT4_FILE} and {name} into {escape(str(artifacts))} in "
              f"{time.perf_counter() - start:.1f} s" + ("; chat with --precision int4" if report.ok else
              " (registered, but see the report before using it)"))
    if not report.ok:
        views.error_line("int4 accuracy outside tolerance")
        raise typer.Exit(1)


def _check_lint_flags(lint: bool, trt_version: str, max_look_close: Optional[str], precision: str) -> None:
    """--trt-version, --max-look-close and --precision only mean something to --lint."""
    given = [flag for flag, on in (("--trt-version", trt_version != defaults.DEFAULT_LINT_TRT_VERSION),
                                   ("--max-look-close", max_look_close is not None),
                                   ("--precision", precision != "fp32")) if on]
    if given and not lint:
        raise Ps3EdgeError(f"{', '.join(given)} applies to --lint")


def _lint(artifacts: Path, manifest, trt_version: str, max_look_close, as_json: bool, precision: str) -> None:
    """`inspect --lint`: the findings as a table (repeats of one finding folded into one row) or JSON;
    exit 1 when there are errors."""
    from ..exporter.lint import group_findings, lint_artifacts

    report, t_max = lint_artifacts(artifacts, trt_version, max_look_close, manifest=manifest, precision=precision)
    if as_json:
        print(json.dumps({**report.to_dict(), "precision": precision, "max_look_close": t_max}, indent=2))
    else:
        views.print_lint(artifacts, manifest, report, t_max, precision, group_findings(report.findings))
    if report.errors:
        raise typer.Exit(1)


def inspect(
    artifacts: Path = typer.Argument(..., help="Artifact directory (a VILA-HD artifact: vila.json checked, its PS3 stages shown)."),
    as_json: bool = typer.Option(False, "--json", help="Print the raw manifest (with --lint: the findings)."),
    lint: bool = typer.Option(False, "--lint", help="Check every stage against the TensorRT ONNX parser; exit 1 on errors."),
    trt_version: str = typer.Option(defaults.DEFAULT_LINT_TRT_VERSION, "--trt-version", help="TensorRT the lint targets (10.3 = JetPack 6)."),
    max_look_close: Optional[str] = typer.Option(None, "--max-look-close", help="Lint: steps per highres call the profile bounds (int or 'all'; default: the manifest's)."),
    precision: str = typer.Option("fp32", "--precision", help="Lint: the stage files to check, fp32 or the fp16 / int8 ones 'ps3edge calibrate' wrote."),
):
    """Show what an artifact's manifest says (and check its files); --lint checks TensorRT compatibility."""
    from ..artifact.manifest import load_manifest
    from ..artifact.vila import VILA_MANIFEST, is_vila_artifact, load_vila_manifest

    vila = None
    if is_vila_artifact(artifacts) and (artifacts / "ps3").is_dir():
        vila = load_vila_manifest(artifacts, verify=True)     # its integrity record and the files outside ps3/
        artifacts = artifacts / "ps3"
    manifest = load_manifest(artifacts, verify=True)
    _check_lint_flags(lint, trt_version, max_look_close, precision)
    if lint:
        _lint(artifacts, manifest, trt_version, max_look_close, as_json, precision)
    elif as_json:
        print(json.dumps(manifest.to_dict() if vila is None
                         else {VILA_MANIFEST: vila.to_dict(), defaults.MANIFEST_NAME: manifest.to_dict()}, indent=2))
    else:
        views.print_manifest(artifacts, manifest)
        if vila is not None:
            views.say(f"VILA-HD {escape(str(artifacts.parent))}: context {vila.context_length}, LLM "
                      f"{vila.llm.num_layers} layers x {vila.llm.hidden_size}, engines "
                      f"{', '.join(vila.engines) or 'none'}; {len(vila.files)} files outside ps3/, all sha256 "
                      f"match {VILA_MANIFEST}")
            for name, entry in vila.precisions.items():      # the LLM's precisions beyond fp32
                summary = entry.summary or {}
                verdict = (f"report {entry.report}: min logit cosine {summary.get('min_logit_cosine')}, "
                           f"{'pass' if summary.get('pass') else 'FAIL'}") if entry.report else "no report"
                views.say(f"LLM {name}: {entry.llm} ({entry.format}, block {entry.settings.get('block_size')}, "
                          f"{'symmetric' if entry.settings.get('symmetric') else 'asymmetric'}), embedding "
                          f"{entry.embed_tokens or 'embed_tokens.npy'}; {verdict}")
