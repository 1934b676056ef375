"""The `chat` command: ask VILA-HD about an image, streaming the answer to stdout (progress and the
token counts go to stderr), or one JSON object with --json."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from .. import defaults
from ..errors import Ps3EdgeError
from . import views
from .options import SEED_MAX, ExifTranspose, LookCloseFlags, Revision, look_close_options


def _check_request(conv_mode: str, text: str, model_path: str, backend: str, precision: str = "fp32") -> None:
    """What can be refused before any progress line is printed or anything is exported."""
    from ..llm.vila import VILA_PRESETS
    from ..model.hub import parse_hub_id

    if conv_mode != "auto":
        raise Ps3EdgeError(f"--conv-mode '{conv_mode}' is not supported; use auto (the checkpoint's chat template)")
    if not text.strip():
        raise Ps3EdgeError("--text is empty: ask a question about the image")
    if model_path not in VILA_PRESETS and not Path(model_path).is_dir() and parse_hub_id(model_path) is None:
        raise Ps3EdgeError(f"--model-path '{model_path}' is neither a VILA-HD preset ({', '.join(VILA_PRESETS)}) "
                           "nor a checkpoint directory or Hugging Face hub id (owner/name)")
    from ..llm.implementations import get_implementation

    implementation = get_implementation(backend)
    implementation.require()                 # refused before anything is exported
    if precision not in defaults.LLM_PRECISIONS:
        raise Ps3EdgeError(f"unknown --precision '{precision}'; choose one of: {', '.join(defaults.LLM_PRECISIONS)}")
    if precision not in implementation.llm_precisions:
        raise Ps3EdgeError(f"--precision {precision} runs on --backend onnxruntime; --backend {backend} runs the "
                           f"LLM in {', '.join(implementation.llm_precisions)}")


def _artifact_dir(model_path: str, artifacts: Optional[Path], seed: int) -> Path:
    """The VILA-HD artifact to run: the cached export of --model-path, or --artifacts (exported
    into it first when it holds none)."""
    from ..artifact.vila import VILA_MANIFEST
    from ..llm.export import ensure_artifacts, export_vila

    if artifacts is None:
        return ensure_artifacts(model_path, seed=seed, progress=views.progress_to_stderr)
    if not (artifacts / VILA_MANIFEST).is_file():
        export_vila(model_path, artifacts, seed=seed, progress=views.progress_to_stderr)
    return artifacts


def _stream(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


@look_close_options(mode_help="after_prompt (top-down, default) or after_image (bottom-up). Env: LOOK_CLOSE_MODE.")
def chat(
    model_path: str = typer.Option(..., "--model-path", help="A VILA-HD checkpoint: a directory (llm/, vision_tower/, mm_projector/), a Hugging Face hub id (owner/name[@revision], e.g. Efficient-Large-Model/VILA-HD-8B-PS3-4K-SigLIP), or the preset vila-hd-tiny."),
    text: str = typer.Option(..., "--text", help="The question (not empty)."),
    media: Path = typer.Option(..., "--media", help="The image."),
    conv_mode: str = typer.Option("auto", "--conv-mode", help="Chat template: auto (the tokenizer's, Qwen2's for VILA-HD)."),
    backend: str = typer.Option("onnxruntime", "--backend", help="onnxruntime (exported stages), torch (transformers + our PyTorch PS3) or tensorrt (the engines of 'ps3edge build ARTIFACTS')."),
    precision: str = typer.Option("fp32", "--precision", help="The LLM's precision: fp32, or int4 (the weight-only INT4 LLM of 'ps3edge calibrate ARTIFACTS --precision int4'; --backend onnxruntime)."),
    artifacts: Optional[Path] = typer.Option(None, "--artifacts", help="Use (or export into) this VILA-HD artifact directory instead of the cache."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1, help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy; > 0 samples."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (with --temperature > 0)."),
    seed: int = typer.Option(0, "--seed", min=0, max=SEED_MAX, help="Sampling seed (and a preset's weights seed)."),
    look_close: LookCloseFlags = None,
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object: answer, token counts, stage times."),
    exif_transpose: bool = ExifTranspose,
    revision: Optional[str] = Revision,
):
    """Ask VILA-HD about an image (like vila-infer), streaming the answer."""
    from ..llm.generate import SamplingConfig
    from ..llm.pipeline import VilaPipeline
    from ..model.hub import with_revision
    from ..runtime.preprocess import open_image

    model_path = with_revision(model_path, revision)      # resolved (fetched if need be) by the export cache
    _check_request(conv_mode, text, model_path, backend, precision)
    settings = look_close.settings()
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed).validate()
    image = open_image(media, exif_transpose=exif_transpose)
    views.image_notes(image)
    art = _artifact_dir(model_path, artifacts, seed)
    pipeline = VilaPipeline(art, backend, precision=precision)
    result = pipeline.answer(image, text, settings, sampling, on_text=None if json_out else _stream)
    if json_out:
        print(json.dumps({**result.to_json(), "backend": backend, "precision": precision, "look_close_mode": settings.mode,
                          "artifacts": str(art)}, indent=2))
    else:
        sys.stdout.write("\n")
        views.print_chat_tokens(result)
