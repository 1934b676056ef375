"""The commands that run the look-close loop: run (one image), demo (export, run, draw), parity
(against the official code, or reduced precision against FP32) and bench (timings)."""

from __future__ import annotations

import contextlib
import errno
import json
import time
from pathlib import Path
from typing import List, Optional

import numpy as np
import typer
from rich.markup import escape

from .. import defaults
from ..artifact.io import write_json_atomic
from ..errors import Ps3EdgeError
from . import views
from .options import (SEED_MAX, ExifTranspose, Layer, LookCloseFlags, PromptEmbedding, Revision, checkpoint_spec,
                      load_prompt_embedding, look_close_options, parse_steps)
from .views import console


def _check_run_paths(images: List[Path], out: Path, overlay: Optional[Path]) -> List[Path]:
    """Before any work: --out is a .safetensors, --overlay a .png (one image) or a directory
    (several), and no two of the files are one. Returns the overlay files to write."""
    from ..runtime.outputs import check_output_path

    if out.suffix != ".safetensors":
        raise Ps3EdgeError(f"--out must end in .safetensors, got {out}")
    overlays = [] if overlay is None else [overlay] if len(images) == 1 else _overlay_files(images, overlay)
    paths = [*((f"--image {p}", p) for p in images), ("--out", out), *((f"--overlay {p}", p) for p in overlays)]
    seen = {}
    for flag, path in paths:
        try:
            resolved = path.resolve()
        except (RuntimeError, OSError) as e:    # RuntimeError: pathlib's symlink loop before Python 3.13
            if isinstance(e, OSError) and e.errno != errno.ELOOP:
                raise
            raise Ps3EdgeError(f"{flag.split()[0]} {path} is a symlink loop") from None
        if resolved in seen and not (flag.startswith("--image") and seen[resolved].startswith("--image")):
            a, b = seen[resolved].split()[0], flag.split()[0]
            raise Ps3EdgeError(f"{a} and {b} are the same file ({path}); nothing was written")
        seen.setdefault(resolved, flag)
    check_output_path(out, "--out")
    for path in overlays:
        check_output_path(path, "--overlay")
    if len(images) == 1 and overlay is not None and overlay.suffix.lower() != ".png":
        raise Ps3EdgeError(f"--overlay is written as PNG: give a .png name, got {overlay}")
    return overlays


def _overlay_files(images: List[Path], directory: Path) -> List[Path]:
    """Several images: --overlay names a directory, one PNG per image, numbered in flag order."""
    if directory.suffix.lower() == ".png":
        raise Ps3EdgeError(f"with {len(images)} images --overlay names a directory (one PNG per image), "
                           f"got {directory}")
    if directory.exists() and not directory.is_dir():
        raise Ps3EdgeError(f"--overlay {directory} exists and is not a directory")
    digits = len(str(len(images)))
    return [directory / f"{i:0{digits}d}-{p.stem}.png" for i, p in enumerate(images)]


@look_close_options()
def run(
    artifacts: Path = typer.Argument(..., help="Artifact directory from 'ps3edge export'."),
    image: List[Path] = typer.Option(..., "--image", help="Input image; repeat for several images, run as batches (every tensor of --out then has a leading batch axis, in flag order)."),
    out: Path = typer.Option(..., "--out", help="Output .safetensors (features, prob, selection maps)."),
    backend: str = typer.Option("onnxruntime", "--backend", help="onnxruntime, torch, or tensorrt (the engines of 'ps3edge build')."),
    look_close: LookCloseFlags = None,
    prompt_embedding: Optional[Path] = PromptEmbedding,
    layer: int = Layer,
    overlay: Optional[Path] = typer.Option(None, "--overlay", help="Also draw the selected patches: a PNG for one image, a directory (one PNG per image) for several."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Images per pass (default: all of them, up to the artifact's bound from 'export --max-batch')."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, or fp16 / int8: the stages of 'ps3edge calibrate'; torch backend: fp16 / bf16 (on CUDA the whole fast path runs in it)."),
    device: str = typer.Option("auto", "--device", help="torch backend: cuda (the device-resident fast path with CUDA graphs), cpu, or auto (cuda when there is one)."),
    preprocess_on: Optional[str] = typer.Option(None, "--preprocess", help="cpu (PIL) or device (the same resize on the torch device, bit-identical); default: device on the fast path."),
    exif_transpose: bool = ExifTranspose,
    json_out: Optional[str] = typer.Option(None, "--json", help="Also write a JSON record per image (tokens per scale, steps, stage times, peak memory per stage: host resident, and CUDA on the fast path) to this file, or '-' for stdout (then the only thing printed there)."),
):
    """Run the look-close loop on one image, or on several as batches."""
    from ..runtime.lookclose import Pipeline
    from ..runtime.outputs import write_batch_outputs, write_outputs
    from ..runtime.preprocess import open_image

    settings = look_close.settings()
    prompts = _batch_prompts(load_prompt_embedding(prompt_embedding), len(image))
    overlays = _check_run_paths(image, out, overlay)
    json_path = _check_json_path(json_out, out, overlays)
    pils = [open_image(path, exif_transpose=exif_transpose) for path in image]   # every file readable first
    for pil in pils:
        views.image_notes(pil)
    with Pipeline(artifacts, backend, precision=precision, device=device, preprocess=preprocess_on) as pipeline:
        pipeline.measure_memory = json_out is not None
        size = batch_size or min(len(pils), pipeline.max_batch)
        pipeline.check_batch(size)
        with console.status(f"{len(pils)} images") if len(pils) > 1 else contextlib.nullcontext():
            results = [r for batch in pipeline.run_batches(pils, settings, prompts, layer, size) for r in batch]
        ran_on = pipeline.session.label                    # the backend, or the fast path and its device
    if len(pils) == 1:
        write_outputs(results[0], pils[0], out, overlays[0] if overlays else None)
    else:
        write_batch_outputs(results, pils, out, overlays)
    if json_out is not None:
        record = run_record(results, image, ran_on, precision, size)
        if json_path is None:
            print(json.dumps(record, indent=2))
            return
        write_json_atomic(json_path, record)
    views.print_run(results[0], ran_on, len(results), size)
    if precision != "fp32":
        views.say(f"precision {precision}")
    shape = (len(results), *results[0].features.shape[1:]) if len(results) > 1 else results[0].features.shape
    views.say(f"features {tuple(shape)} -> {escape(str(out))}")
    if overlay is not None:
        views.say(f"overlay{'s' if len(overlays) > 1 else ''} -> {escape(str(overlay))}")


def _check_json_path(json_out: Optional[str], out: Path, overlays: List[Path]) -> Optional[Path]:
    """--json: '-' (stdout: None here) or a .json file that is none of the other outputs."""
    from ..runtime.outputs import check_output_path

    if json_out is None or json_out == "-":
        return None
    path = Path(json_out)
    if path.suffix.lower() != ".json":
        raise Ps3EdgeError(f"--json writes JSON: give a .json name or '-' for stdout, got {path}")
    if any(path.resolve() == other.resolve() for other in (out, *overlays)):
        raise Ps3EdgeError(f"--json {path} is also another output of this run; nothing was written")
    check_output_path(path, "--json")
    return path


def run_record(results, images: List[Path], ran_on: str, precision: str, batch_size: int) -> dict:
    """What --json writes: the run, then one record per image in flag order."""
    return {
        "backend": ran_on, "precision": precision, "batch_size": batch_size,
        "images": [{
            "image": str(path), "features_shape": list(r.features.shape), "layer": r.layer,
            "tokens_each_scale": r.tokens_each_scale, "num_steps": r.num_steps,
            "highres_calls": [list(c) for c in r.highres_calls], "batch": r.batch,
            "timings_ms": {k: round(v, 3) for k, v in r.timings_ms.items()},
            "peak_memory_mib": {where: {k: round(v, 1) for k, v in stages.items()}
                                for where, stages in r.memory_mib.items()},
        } for path, r in zip(images, results)],
    }


def _batch_prompts(prompt, count: int):
    """--prompt-embedding with several images: (C,) or (1,C) shared by all, or (B,C), one per image."""
    if prompt is None or count == 1:
        return None if prompt is None else [prompt]
    p = np.asarray(prompt)
    if p.ndim == 2 and p.shape[0] not in (1, count):
        raise Ps3EdgeError(f"--prompt-embedding holds {p.shape[0]} prompts for {count} images: give one row per "
                           f"--image, or a single prompt shared by all")
    return list(p) if p.ndim == 2 and p.shape[0] == count else p


def demo(
    out: Path = typer.Option(Path("ps3edge-demo"), "--out", help="Where to put the artifact, features and overlay (a rerun replaces a previous demo's)."),
):
    """Export ps3-tiny, run it on the sample image and write the selection overlay."""
    from ..demo import FEATURES_NAME, OVERLAY_NAME, demo_settings, run_demo

    start = time.perf_counter()
    settings = demo_settings(out)
    with console.status("demo") as status:
        result = run_demo(out, settings, progress=views.progress(status))
    views.print_run(result, "onnxruntime")
    views.say(f"artifact  {escape(str(out / 'artifacts'))}\nfeatures  {escape(str(out / FEATURES_NAME))}\n"
              f"overlay   {escape(str(out / OVERLAY_NAME))}\ndone in {time.perf_counter() - start:.1f} s")


def _precision_parity(precision: str, backend: List[str], prompt_embedding, look_close: LookCloseFlags,
                      settings, **kwargs) -> None:
    """parity --precision fp16/int8: those stages against the FP32 ones, on held-out images."""
    from ..parity import run_precision_parity
    from ..runtime.runners.registry import get_backend

    if not all(get_backend(name).runs_calibrated_stages for name in backend):
        raise Ps3EdgeError("--precision fp16/int8 compares onnxruntime stages (add --with-torch for torch fp16)")
    if prompt_embedding is not None:
        raise Ps3EdgeError("--precision fp16/int8 selects bottom-up (the learned prior); drop --prompt-embedding")
    if settings.num_look_close is None and settings.num_token_look_close is None:
        settings = look_close.with_steps("1").settings()      # neither flag nor environment: one step
    with console.status("parity") as status:
        report = run_precision_parity(precision, settings, progress=views.progress(status), **kwargs)
    views.print_accuracy(report, f"parity, {precision} vs fp32")
    if not report.ok:
        views.error_line(f"{precision} parity outside tolerance")
        raise typer.Exit(1)


@look_close_options()
def parity(
    model: str = typer.Option("ps3-tiny", "--model", help="Preset, checkpoint directory or Hugging Face hub id (owner/name[@revision])."),
    image: Optional[Path] = typer.Option(None, "--image", help="Input image (default: the sample image)."),
    backend: List[str] = typer.Option(["onnxruntime"], "--backend", help="Exported backends to check (repeatable)."),
    look_close: LookCloseFlags = None,
    prompt_embedding: Optional[Path] = PromptEmbedding,
    layer: int = Layer,
    seed: int = typer.Option(defaults.DEFAULT_SEED, "--seed", min=0, max=SEED_MAX),
    precision: str = typer.Option("fp32", "--precision", help="fp32: against the official code; fp16 / int8: those exported stages against the FP32 ones."),
    artifacts: Optional[Path] = typer.Option(None, "--artifacts", help="Use this artifact directory instead of exporting --model (fp16/int8: its calibrated stages)."),
    images: Optional[Path] = typer.Option(None, "--images", help="fp16/int8: folder of held-out images (without --artifacts, INT8 calibrates on the first --samples)."),
    samples: int = typer.Option(defaults.DEFAULT_CALIBRATION_SAMPLES, "--samples", min=1, help="int8 without --artifacts: calibration images."),
    method: str = typer.Option(defaults.DEFAULT_CALIBRATION_METHOD, "--method", help="int8 without --artifacts: max, entropy or percentile."),
    with_torch: bool = typer.Option(False, "--with-torch", help="fp16: also our torch model in fp16 against fp32."),
    batch: int = typer.Option(1, "--batch", min=1, help="fp32: run N different images (the image, its mirrors, turns and crops) as one batch; each is checked against the official code and against itself run alone."),
    revision: Optional[str] = Revision,
):
    """Compare the official ps3-torch model, our torch model and the exported stages (or, with --precision fp16/int8, those stages against the FP32 ones)."""
    from ..demo import sample_image
    from ..model.weights import PS3_FILES
    from ..parity import run_parity

    settings = look_close.settings()
    if artifacts is None:                    # with --artifacts, --model is not read
        model = checkpoint_spec(model, revision, PS3_FILES, views.progress_line)
    elif revision is not None:
        raise Ps3EdgeError("--revision applies to --model; with --artifacts the artifact's own weights are compared")
    if precision != "fp32":
        if batch != 1:
            raise Ps3EdgeError("--batch checks fp32 batches against the official code; drop it with --precision")
        return _precision_parity(precision, backend, prompt_embedding, look_close, settings, model_spec=model,
                                 artifact_dir=artifacts, images=images, image=image, layer=layer, seed=seed,
                                 samples=samples, method=method, with_torch=with_torch)
    prompt = load_prompt_embedding(prompt_embedding)
    pil = sample_image() if image is None else image
    with console.status("parity") as status:
        report = run_parity(model, pil, settings, prompt_embedding=prompt, layer=layer,
                            backends=tuple(backend), seed=seed, artifact_dir=artifacts, progress=views.progress(status),
                            batch=batch)
    views.print_parity(report)
    if not report.ok:
        views.error_line("parity outside tolerance")
        raise typer.Exit(1)


def _check_bench_flags(backend: str, official_ties: str, against: Optional[str], num_look_close: str,
                       decode_tokens: int, batched: bool = False) -> list[int]:
    """The flags typer cannot check; returns the step counts of the sweep."""
    from ..runtime.runners.registry import BACKENDS, get_backend

    if not batched and (backend not in BACKENDS or not get_backend(backend).runs_whole_loop):
        raise Ps3EdgeError("bench times the torch fast path; for onnxruntime use benchmarks/cpu_stages.py")
    if official_ties not in ("published", "pinned"):
        raise Ps3EdgeError(f"--official-ties takes published or pinned, got '{official_ties}'")
    if against not in (None, "official"):
        raise Ps3EdgeError(f"--against takes 'official', got '{against}'")
    steps = parse_steps(num_look_close)
    if decode_tokens < 1:
        raise Ps3EdgeError(f"--decode-tokens must be at least 1, got {decode_tokens}")
    return steps


def bench(
    model: List[str] = typer.Option(["ps3-tiny"], "--model", help="Repeatable: a PS3 preset (ps3-1.5k ps3-4k ps3-tiny ps3-tiny-4k), vila-hd-tiny, or a PS3 or VILA-HD checkpoint (a directory or Hugging Face hub id owner/name[@revision]); for VILA-HD the projector and the LLM are timed too."),
    backend: str = typer.Option("torch", "--backend", help="torch: the device-resident fast path (runtime/fast.py); with --batch, torch and / or onnxruntime, comma-separated."),
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
    plot_out: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG of latency against NUM_LOOK_CLOSE (with --batch: images/s against B)."),
    image: Optional[Path] = typer.Option(None, "--image", help="Input image (default: the 1600x1000 sample); preprocessing is timed on it."),
    decode_tokens: int = typer.Option(16, "--decode-tokens", help="VILA-HD: greedy tokens to time the LLM decode on."),
    revision: Optional[str] = Revision,
    batch: Optional[str] = typer.Option(None, "--batch", help="Throughput instead: comma-separated images per Pipeline.run_batch call (e.g. 1,2,4,8) on each --backend (torch,onnxruntime), against the official code given the same images as one batch."),
    official_all_layers: bool = typer.Option(False, "--official-all-layers", help="Also time the official code in its default configuration (every layer's hidden states returned), as an extra column."),
):
    """Time the look-close loop per stage (and the official code on the same device, configured as VILA-HD configures it)."""
    from .. import bench as benchmod
    from ..llm.vila import VILA_FILES
    from ..model.weights import PS3_FILES
    from .. import throughput
    from ..runtime.device import Device
    from ..runtime.outputs import check_output_path
    from ..runtime.runners.registry import get_backend

    steps = _check_bench_flags(backend, official_ties, against, num_look_close, decode_tokens, batch is not None)
    batches = throughput.parse_batches(batch) if batch is not None else None
    backends = throughput.parse_backends(backend) if batch is not None else None
    device = str(get_backend("torch").resolve_device(Device.parse(device)))     # bench times torch
    outputs = {"--json": json_out, "--markdown": markdown_out, "--plot": plot_out}
    for flag, path in outputs.items():
        if path is not None:                 # before the benchmark, not after it
            check_output_path(path, flag)
            path.parent.mkdir(parents=True, exist_ok=True)
    model = [checkpoint_spec(name, revision, PS3_FILES.either(VILA_FILES), views.progress_line) for name in model]
    pil = None
    if image is not None:
        from ..runtime.preprocess import open_image
        pil = open_image(image)
    rows = []
    with console.status("bench") as status:
        for name in model:
            if batches:
                rows += throughput.throughput_rows(name, backends=backends, batches=batches, steps_list=steps,
                                                   device=device, dtype=dtype, warmup=warmup, repeat=repeat,
                                                   depth=depth, image=pil, progress=views.progress(status),
                                                   against_official=against == "official")
                continue
            rows += benchmod.bench_model(name, device=device, dtype=dtype, steps_list=steps,
                                         against_official=against == "official", warmup=warmup,
                                         repeat=repeat, graphs=graphs, depth=depth,
                                         pin_ties=official_ties == "pinned", image=pil,
                                         decode_tokens=decode_tokens, progress=views.progress(status),
                                         official_all_layers=official_all_layers)
    report = throughput if batches else benchmod
    table = report.markdown(rows)
    views.print_bench(table, report.summary(rows))
    if json_out:
        json_out.write_text(json.dumps(rows, indent=2))
    if markdown_out:
        markdown_out.write_text(table + "\n")
    if plot_out and not report.plot(rows, plot_out):
        views.say("matplotlib is not installed: no plot written", err=True)
