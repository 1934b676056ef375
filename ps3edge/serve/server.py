"""Start Triton (PyTriton's bundled tritonserver) with the artifact's models, warm each model up,
serve until SIGTERM or SIGINT, then drain: Triton stops taking requests, finishes the ones in
flight (up to `exit_timeout_s`), and the command exits 0.

Readiness: every model answers one warm-up request in process, and Triton loads the models from
its repository at start-up, so its ready endpoint never reports a cold model. The endpoints that
change or expose the server (model repository, shared memory, trace, logging) are locked
(lockdown.py): nothing on tritonserver's command line opens them; statistics and Prometheus metrics
stay readable (the load test reads the batch sizes).
"""

from __future__ import annotations

import io
import logging
import os
import signal
import socket
import sysconfig
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import Ps3EdgeError
from ..stopsignal import StopSignals
from .lockdown import locked_triton, start_locked
from .settings import LookCloseDefaults, ServeOptions

LOG = logging.getLogger("ps3edge.serve")
STREAM_MAX_BATCH = 1                   # a decoupled stream answers one request per call


def import_pytriton():
    """PyTriton's modules, or a one-line error naming the extra."""
    try:
        import pytriton.model_config as model_config
        import pytriton.triton as triton
    except ImportError as e:
        raise Ps3EdgeError(f"ps3edge serve needs the serve extra (pip install 'ps3edge[serve]'): {e}") from None
    return model_config, triton


def python_library_first() -> None:
    """Put this interpreter's libpython directory first on LD_LIBRARY_PATH (read by tritonserver's
    Python-backend stub): otherwise the stub can load another Python's libpython of the same
    version and fail inside the threading module."""
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        rest = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p and p != libdir]
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *rest])


def check_ports_free(options: ServeOptions) -> None:
    """Refuse, before anything loads, ports another process holds."""
    for flag, port in (("--http-port", options.http_port), ("--grpc-port", options.grpc_port),
                       ("--metrics-port", options.metrics_port)):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((options.address, port))
            except OSError as e:
                raise Ps3EdgeError(f"{flag} {port} on {options.address} is not free ({e.strerror or e})") from None


def warm_up_image() -> bytes:
    """A small PNG: what the warm-up requests send."""
    from PIL import Image

    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def load_models(artifact_dir: Path, options: ServeOptions, defaults: LookCloseDefaults, layer: int,
                progress: Callable[[str], None]) -> dict:
    """model name -> (its callables, one per instance), each warmed up. Their onnxruntime sessions
    have no CPU memory arena: Triton's batch size follows the traffic (clients that wait one by one
    form batches of 1, a burst fills --max-batch), and an arena would keep the memory of the largest
    batch ever run for the server's life, about 1.9 GB more for batches of 8 of ps3-tiny."""
    from ..artifact.vila import is_vila_artifact
    from ..exporter.ort_session import keep_cpu_arena
    from ..runtime.lookclose import Pipeline
    from .ps3_model import Ps3Model
    from .vila_model import VilaModel

    vila = is_vila_artifact(artifact_dir)
    ps3_dir = artifact_dir / "ps3" if vila else artifact_dir
    if not vila and options.llm_precision != "fp32":
        raise Ps3EdgeError(f"--llm-precision {options.llm_precision} is for a VILA-HD artifact; {artifact_dir} is PS3 only")
    keep_cpu_arena(False)
    image = warm_up_image()
    models: dict[str, list] = {Ps3Model.name: []}
    for i in range(options.instances):
        progress(f"loading ps3 instance {i + 1} of {options.instances} ({options.backend})")
        model = Ps3Model(Pipeline(ps3_dir, options.backend, precision=options.precision), defaults, layer)
        model.warm_up(image)
        models[Ps3Model.name].append(model)
    if vila:
        from ..llm.pipeline import VilaPipeline

        if options.precision != "fp32":
            raise Ps3EdgeError("a VILA-HD artifact is served in fp32 (--precision fp32)")
        models[VilaModel.name] = []
        for i in range(options.instances):
            progress(f"loading vila-hd instance {i + 1} of {options.instances} ({options.backend})")
            model = VilaModel(VilaPipeline(artifact_dir, options.backend, precision=options.llm_precision), defaults)
            model.warm_up(image)
            models[VilaModel.name].append(model)
    return models


def _tensors(model_config, declarations):
    return [model_config.Tensor(name=d.name, dtype=d.dtype, shape=d.shape, optional=d.optional)
            for d in declarations]


def _model_config(model_config, options: ServeOptions, max_batch: int, decoupled: bool = False):
    policy = model_config.QueuePolicy(timeout_action=model_config.TimeoutAction.REJECT,
                                      default_timeout_microseconds=options.queue_timeout_ms * 1000,
                                      max_queue_size=options.max_queue_size)
    batcher = model_config.DynamicBatcher(max_queue_delay_microseconds=options.max_queue_delay_us,
                                          default_queue_policy=policy)
    return model_config.ModelConfig(max_batch_size=max_batch, batcher=batcher, decoupled=decoupled)


def bind_models(triton, model_config, models: dict, options: ServeOptions) -> list[str]:
    """Bind every model (and VILA-HD's streaming twin); returns the names served."""
    from .vila_model import VilaModel

    names = []
    for name, instances in models.items():
        first = instances[0]
        max_batch = options.max_batch if name != VilaModel.name else 1
        triton.bind(model_name=name, infer_func=instances, inputs=_tensors(model_config, first.inputs()),
                    outputs=_tensors(model_config, first.outputs()), strict=False,
                    config=_model_config(model_config, options, max_batch))
        names.append(name)
        if name == VilaModel.name:
            triton.bind(model_name=VilaModel.stream_name, infer_func=[m.stream for m in instances],
                        inputs=_tensors(model_config, first.inputs()), outputs=_tensors(model_config, first.outputs()),
                        strict=False, config=_model_config(model_config, options, STREAM_MAX_BATCH, decoupled=True))
            names.append(VilaModel.stream_name)
    return names


def serve(artifact_dir: Path, options: ServeOptions, defaults: LookCloseDefaults, layer: int,
          progress: Callable[[str], None], on_ready: Callable[[list[str]], None],
          on_stop: Callable[[str], None]) -> None:
    """Load, warm up, serve until a stop signal (or Triton exits), drain and return."""
    model_config, triton_module = import_pytriton()
    options.check()
    check_ports_free(options)
    models = load_models(Path(artifact_dir), options, defaults, layer, progress)
    python_library_first()
    config = triton_module.TritonConfig(
        http_address=options.address, grpc_address=options.address, metrics_address=options.address,
        http_port=options.http_port, grpc_port=options.grpc_port, metrics_port=options.metrics_port,
        exit_timeout_secs=options.exit_timeout_s, strict_readiness=True)
    progress("starting Triton")
    # The signal is meant for this process alone (as `docker stop` and Kubernetes send it to a
    # container's first process): the Python-backend stub's helper processes die of a SIGTERM sent
    # to the whole process group, so a service manager should signal the main process only
    # (systemd: KillMode=mixed). The drain runs in this, the main, thread.
    with StopSignals() as stop:
        with locked_triton(triton_module, config) as triton:
            names = bind_models(triton, model_config, models, options)
            start_locked(triton)
            on_ready(names)
            while not stop.event.wait(1.0):
                if not triton.is_alive():
                    raise Ps3EdgeError("Triton stopped by itself; its log is above")
            on_stop(signal.Signals(stop.signal).name)
        # leaving the block stopped Triton: SIGINT to tritonserver, which finishes what is in flight
