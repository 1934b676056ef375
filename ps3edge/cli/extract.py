"""`ps3edge extract`: PS3 features for a dataset or video log, in resumable shards, on this
machine or a Ray cluster; the progress bar, the warnings and the closing summary."""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn
from rich.text import Text

from ..errors import Ps3EdgeError
from .options import ExifTranspose, Layer, LookCloseFlags, PromptEmbedding, load_prompt_embedding, look_close_options
from .views import err_console, error_line, say

PARTIAL_EXIT = 1                    # the job finished, but errors.jsonl lists inputs not read (in full)


class _ItemsPerSecond(ProgressColumn):
    def render(self, task) -> Text:
        rate = task.fields.get("rate")
        return Text("-- items/s" if rate is None else f"{rate:.2f} items/s")


class _Remaining(ProgressColumn):
    def render(self, task) -> Text:
        eta = task.fields.get("eta")
        if eta is None:
            return Text("-:--:--")
        minutes, seconds = divmod(int(round(eta)), 60)
        return Text(f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}")


class _Bar:
    """The job's progress (job.py's start / advance) as a rich bar on stderr: items, items/s, ETA.
    The rate is the job's own (this run's items over the time since it started, as the summary
    line states it), not a window over arrivals, which come in bursts from Ray. Shown from the
    first item done, so a refusal before any prints only its error line."""

    COLUMNS = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _ItemsPerSecond(),
               TextColumn("eta"), _Remaining())

    def __init__(self):
        self.progress, self.task = Progress(*self.COLUMNS, console=err_console), None
        self.counts, self.started, self.done = (0, 0), time.perf_counter(), 0

    def start(self, total: int, completed: int) -> None:
        self.counts, self.started, self.done = (total, completed), time.perf_counter(), 0

    def advance(self, count: int) -> None:
        total, completed = self.counts
        if self.task is None:
            self.progress.start()
            self.task = self.progress.add_task("extract", total=total, completed=completed, rate=None, eta=None)
        self.done += count
        elapsed = time.perf_counter() - self.started
        rate = self.done / elapsed if elapsed > 0 else None
        eta = (total - completed - self.done) / rate if rate else None
        self.progress.update(self.task, advance=count, rate=rate, eta=eta)

    def __enter__(self) -> "_Bar":
        return self

    def __exit__(self, *exc) -> None:
        if self.task is not None:
            self.progress.stop()


@look_close_options()
def extract(
    artifacts: Path = typer.Argument(..., help="Artifact directory from 'ps3edge export'."),
    input: List[Path] = typer.Option(..., "--input", help="An image folder (recursive), a .txt list of paths, an image or a video (repeatable)."),
    out: Path = typer.Option(..., "--out", help="Output directory: shards, index.jsonl, errors.jsonl, run.json. Rerun the same command to continue it."),
    fps: Optional[float] = typer.Option(None, "--fps", help="Videos: frames per second to sample (default: every frame)."),
    shard_size: int = typer.Option(64, "--shard-size", min=1, help="Items per shard file."),
    dtype: str = typer.Option("fp32", "--dtype", help="Features stored as fp32 or fp16 (prob and selection maps keep theirs)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Images per run_batch call (default: the artifact's bound, export --max-batch)."),
    ray: Optional[str] = typer.Option(None, "--ray", help="Run on Ray Data: auto (the running cluster), local (start one here) or a cluster ADDRESS. Needs the ray extra."),
    actors: Optional[int] = typer.Option(None, "--actors", min=1, help="--ray: actors, each with the artifact loaded (default: one per GPU, else one per 4 CPUs)."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Local engine: decode threads (default: up to 4)."),
    backend: str = typer.Option("onnxruntime", "--backend", help="onnxruntime, torch, or tensorrt (the engines of 'ps3edge build')."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, or the fp16 / int8 stages of 'ps3edge calibrate'."),
    device: str = typer.Option("auto", "--device", help="torch backend: cuda, cpu, or auto."),
    look_close: LookCloseFlags = None,
    prompt_embedding: Optional[Path] = PromptEmbedding,
    layer: int = Layer,
    exif_transpose: bool = ExifTranspose,
):
    """Extract features for every image and sampled video frame of the inputs into shards (resumable)."""
    from ..extract.job import Engine, run_extract
    from ..extract.sources import display
    from ..extract.work import Work

    settings = look_close.settings()
    prompt = load_prompt_embedding(prompt_embedding)
    if actors is not None and ray is None:
        raise Ps3EdgeError("--actors sizes the Ray actor pool; add --ray local (or auto, or an address)")
    work = Work(artifact_dir=artifacts, backend=backend, precision=precision, device=device, settings=settings,
                prompt=prompt, layer=layer, dtype=dtype, exif_transpose=exif_transpose, batch_size=batch_size)
    with _Bar() as bar:
        summary = run_extract(artifact_dir=artifacts, inputs=list(input), out=out, work=work, fps=fps,
                              shard_size=shard_size, prompt_path=prompt_embedding,
                              engine=Engine(ray=ray, actors=actors, workers=workers), progress=bar)
    for video in summary.cut_short:
        err_console.print(f"[yellow]warning:[/yellow] {escape(' '.join(display(video.reason).split()))}",
                          highlight=False, soft_wrap=True)
    rate = f", {summary.ran / summary.seconds:.2f} items/s" if summary.ran and summary.seconds > 0 else ""
    resumed = f" ({summary.resumed_shards} finished before)" if summary.resumed_shards else ""
    say(f"extracted {summary.extracted} of {summary.inputs} inputs into {summary.shards} shards{resumed}"
        f"{rate} -> {escape(str(out))}")
    cut = len(summary.cut_short)
    videos = f"{cut} video{'s were' if cut > 1 else ' was'} cut short"
    if summary.failed:
        also = f" and {videos}" if cut else ""
        error_line(f"{summary.failed} of {summary.inputs} inputs could not be read{also}; see {summary.errors_file}")
    elif cut:
        error_line(f"{videos} (the frames read are extracted); see {summary.errors_file}")
    if summary.failed or cut:
        raise typer.Exit(PARTIAL_EXIT)
