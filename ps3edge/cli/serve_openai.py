"""The `serve-openai` command: a VILA-HD artifact behind an OpenAI-compatible chat-completions API
(FastAPI + uvicorn, the openai extra) until SIGTERM."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from .. import defaults as DEFAULTS
from . import views
from .options import LookCloseFlags, look_close_options
from .serve import _defaults

MODE_HELP = "after_prompt (top-down, default) or after_image (bottom-up); a request's look_close_mode overrides it. Env: LOOK_CLOSE_MODE."


@look_close_options(mode_help=MODE_HELP)
def serve_openai(
    artifacts: Path = typer.Argument(..., help="A VILA-HD artifact directory (ps3edge chat --artifacts DIR exports one)."),
    address: str = typer.Option("127.0.0.1", "--address", help="Where the server listens; 0.0.0.0 serves other machines."),
    port: int = typer.Option(DEFAULTS.OPENAI_PORT, "--port", min=1, max=65535, help="HTTP port."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar=DEFAULTS.ENV_OPENAI_API_KEY, show_envvar=True,
                                          help="Require 'Authorization: Bearer KEY' on /v1/* (a command line is visible to 'ps': prefer the environment variable)."),
    served_model_name: Optional[str] = typer.Option(None, "--served-model-name", help="The model name requests give (default: the artifact directory's name)."),
    backend: str = typer.Option("onnxruntime", "--backend", help="onnxruntime, torch, or tensorrt (the engines of 'ps3edge build')."),
    precision: str = typer.Option("fp32", "--precision", help="The PS3 stages' precision: fp32 (VILA-HD serves its PS3 in fp32)."),
    llm_precision: str = typer.Option("fp32", "--llm-precision", help="The LLM: fp32, or int4 (the weight-only INT4 LLM of 'ps3edge calibrate --precision int4'; onnxruntime backend)."),
    max_batch: int = typer.Option(DEFAULTS.DEFAULT_MAX_BATCH, "--max-batch", min=1, help="Most requests in one vision batch (run in chunks of the artifact's own bound)."),
    batch_delay_ms: int = typer.Option(DEFAULTS.OPENAI_BATCH_DELAY_MS, "--batch-delay-ms", min=0, help="How long a vision batch's first request waits for others."),
    max_queue: int = typer.Option(DEFAULTS.OPENAI_MAX_QUEUE, "--max-queue", min=1, help="Requests admitted at once (waiting or being answered); more are refused with 429."),
    max_image_bytes: int = typer.Option(DEFAULTS.OPENAI_MAX_IMAGE_BYTES, "--max-image-bytes", min=1, help="Largest encoded image a request may send or name; more is refused with 413."),
    allow_remote_images: bool = typer.Option(False, "--allow-remote-images", help="Fetch http(s) image URLs (the server then reaches whatever URL a client names); default: data: URLs only."),
    exit_timeout_s: int = typer.Option(DEFAULTS.OPENAI_EXIT_TIMEOUT_S, "--exit-timeout-s", min=1, help="On SIGTERM / SIGINT: how long the requests in flight may take to finish."),
    look_close: LookCloseFlags = None,
):
    """Serve a VILA-HD artifact with an OpenAI-compatible API (/v1/chat/completions, /v1/models, /health, /metrics) until SIGTERM."""
    from ..openai_api.server import OpenAIOptions, serve_openai as run_server

    options = OpenAIOptions(address=address, port=port, api_key=api_key, served_model_name=served_model_name,
                            backend=backend, precision=precision, llm_precision=llm_precision, max_batch=max_batch,
                            batch_delay_ms=batch_delay_ms, max_queue=max_queue, max_image_bytes=max_image_bytes,
                            allow_remote_images=allow_remote_images, exit_timeout_s=exit_timeout_s).check()
    defaults = _defaults(look_close)
    _check_backend(backend, llm_precision)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")

    def ready(name: str, url: str):      # one unwrapped line: scripts wait for it
        print(f"ready: {name} on {url} (health {url[:-3]}/health, metrics {url[:-3]}/metrics)", flush=True)

    def stopping(signal_name: str):
        views.say(f"{signal_name}: draining the requests in flight (up to {exit_timeout_s} s)")

    run_server(artifacts, options, defaults, progress=views.progress_to_stderr, on_ready=ready, on_stop=stopping)
    views.say("stopped")


def _check_backend(backend: str, llm_precision: str) -> None:
    """What chat refuses before loading anything: an unknown backend or LLM precision."""
    from ..errors import Ps3EdgeError
    from ..llm.implementations import get_implementation

    implementation = get_implementation(backend)
    implementation.require()
    if llm_precision not in DEFAULTS.LLM_PRECISIONS:
        raise Ps3EdgeError(f"unknown --llm-precision '{llm_precision}'; choose one of: {', '.join(DEFAULTS.LLM_PRECISIONS)}")
    if llm_precision not in implementation.llm_precisions:
        raise Ps3EdgeError(f"--llm-precision {llm_precision} runs on --backend onnxruntime; --backend {backend} runs "
                           f"the LLM in {', '.join(implementation.llm_precisions)}")
