"""The serving commands: `serve` (Triton through PyTriton, in the serve extra) and `triton-repo`
(a model repository for a stock tritonserver)."""

from __future__ import annotations

import logging
from pathlib import Path

import typer
from rich.markup import escape

from .. import defaults as DEFAULTS     # `defaults` names the server's look-close defaults here
from ..errors import Ps3EdgeError
from . import views
from .options import Layer, LookCloseFlags, look_close_options


def _defaults(look_close: LookCloseFlags):
    """The server's look-close settings: checked now as `run` checks them, handed on as given."""
    from ..serve.settings import LookCloseDefaults

    look_close.settings()
    return LookCloseDefaults(num_look_close=look_close.num_look_close,
                             num_token_look_close=look_close.num_token_look_close,
                             select_num_each_scale=look_close.select_num_each_scale, mode=look_close.look_close_mode,
                             smooth_selection_prob=look_close.smooth_selection_prob)


def _check_artifact(artifacts: Path) -> None:
    if not artifacts.is_dir():
        raise Ps3EdgeError(f"artifact directory not found: {artifacts}")


@look_close_options()
def serve(
    artifacts: Path = typer.Argument(..., help="Artifact directory from 'ps3edge export' (a VILA-HD artifact also serves vila-hd and vila-hd-stream)."),
    backend: str = typer.Option("onnxruntime", "--backend", help="onnxruntime, torch, or tensorrt (the engines of 'ps3edge build')."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, or fp16 / int8: the stages of 'ps3edge calibrate'."),
    llm_precision: str = typer.Option("fp32", "--llm-precision", help="A VILA-HD artifact's LLM: fp32, or int4 (the weight-only INT4 LLM of 'ps3edge calibrate --precision int4'; onnxruntime backend)."),
    address: str = typer.Option("127.0.0.1", "--address", help="Where the HTTP, gRPC and metrics endpoints listen; 0.0.0.0 serves other machines."),
    http_port: int = typer.Option(8000, "--http-port", help="KServe v2 HTTP/REST port."),
    grpc_port: int = typer.Option(8001, "--grpc-port", help="KServe v2 gRPC port (streaming: vila-hd-stream)."),
    metrics_port: int = typer.Option(8002, "--metrics-port", help="Prometheus metrics port (/metrics)."),
    max_batch: int = typer.Option(DEFAULTS.DEFAULT_MAX_BATCH, "--max-batch", help="Most requests Triton batches into one call (run in chunks of the artifact's own bound)."),
    max_queue_delay_us: int = typer.Option(DEFAULTS.SERVE_MAX_QUEUE_DELAY_US, "--max-queue-delay-us", help="How long a request may wait for others to batch with."),
    instances: int = typer.Option(1, "--instances", help="Model instances (each with its own pipeline) working at once."),
    max_queue_size: int = typer.Option(DEFAULTS.SERVE_MAX_QUEUE_SIZE, "--max-queue-size", help="Requests a model queues; more are rejected at once."),
    queue_timeout_ms: int = typer.Option(DEFAULTS.SERVE_QUEUE_TIMEOUT_MS, "--queue-timeout-ms", help="A request still queued after this is rejected."),
    exit_timeout_s: int = typer.Option(20, "--exit-timeout-s", help="On SIGTERM / SIGINT: how long the requests in flight may take to finish."),
    look_close: LookCloseFlags = None,
    layer: int = Layer,
):
    """Serve the artifact on NVIDIA Triton Inference Server (model ps3; with VILA-HD also vila-hd and vila-hd-stream) until SIGTERM."""
    from ..serve.server import serve as run_server
    from ..serve.settings import ServeOptions

    options = ServeOptions(backend=backend, precision=precision, llm_precision=llm_precision, address=address,
                           http_port=http_port,
                           grpc_port=grpc_port, metrics_port=metrics_port, max_batch=max_batch,
                           max_queue_delay_us=max_queue_delay_us, instances=instances, max_queue_size=max_queue_size,
                           queue_timeout_ms=queue_timeout_ms, exit_timeout_s=exit_timeout_s).check()
    defaults = _defaults(look_close)
    _check_artifact(artifacts)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")

    def ready(names):      # one unwrapped line: scripts wait for it
        print(f"ready: {', '.join(names)} on http://{address}:{http_port} grpc://{address}:{grpc_port} "
              f"metrics http://{address}:{metrics_port}/metrics", flush=True)

    def stopping(signal_name):
        views.say(f"{signal_name}: draining the requests in flight (up to {exit_timeout_s} s)")

    run_server(artifacts, options, defaults, layer, progress=views.progress_to_stderr, on_ready=ready, on_stop=stopping)
    views.say("stopped")


@look_close_options()
def triton_repo(
    artifacts: Path = typer.Argument(..., help="Artifact directory from 'ps3edge export' (of a VILA-HD artifact, its PS3 part)."),
    out: Path = typer.Option(..., "--out", help="The model repository to write (absent or an empty directory)."),
    backend: str = typer.Option("onnxruntime", "--backend", help="What the model runs on: onnxruntime, torch, or tensorrt (instance group KIND_GPU)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, or fp16 / int8: the stages of 'ps3edge calibrate'."),
    max_batch: int = typer.Option(DEFAULTS.DEFAULT_MAX_BATCH, "--max-batch", help="config.pbtxt max_batch_size."),
    max_queue_delay_us: int = typer.Option(DEFAULTS.SERVE_MAX_QUEUE_DELAY_US, "--max-queue-delay-us", help="Dynamic batching delay."),
    instances: int = typer.Option(1, "--instances", help="Instance group count."),
    max_queue_size: int = typer.Option(DEFAULTS.SERVE_MAX_QUEUE_SIZE, "--max-queue-size", help="Queue policy: most requests queued."),
    queue_timeout_ms: int = typer.Option(DEFAULTS.SERVE_QUEUE_TIMEOUT_MS, "--queue-timeout-ms", help="Queue policy: a request queued longer is rejected."),
    look_close: LookCloseFlags = None,
    layer: int = Layer,
):
    """Write a Triton model repository (config.pbtxt, a Python-backend model.py, the artifact) for a stock tritonserver."""
    from ..serve.repo import write_repository
    from ..serve.settings import ServeOptions

    options = ServeOptions(backend=backend, precision=precision, max_batch=max_batch,
                           max_queue_delay_us=max_queue_delay_us, instances=instances, max_queue_size=max_queue_size,
                           queue_timeout_ms=queue_timeout_ms).check()
    defaults = _defaults(look_close)
    _check_artifact(artifacts)
    names = write_repository(artifacts, out, options, defaults, layer)
    views.say(f"models {', '.join(names)} -> {escape(str(out))}")
