"""The server's lifecycle: listen at once (/health answers 503 "starting"), load the VILA-HD
artifact and answer one warm-up request through the batcher's path, then ready (/health 200,
the `ready:` line). SIGTERM or SIGINT: /health and new chat requests answer 503 "draining", the
requests in flight finish (up to --exit-timeout-s), uvicorn stops, the command exits 0.

uvicorn runs in a thread of its own (so it installs no signal handlers); the main thread owns
the signals and the drain, as `ps3edge serve` does (serve/server.py).
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .. import defaults as DEFAULTS
from ..errors import Ps3EdgeError
from ..stopsignal import StopSignals
from ..serve.settings import LOOPBACK, LookCloseDefaults
from . import require_extra

LOG = logging.getLogger("ps3edge.openai")
START_TIMEOUT_S = 30                   # uvicorn's socket up
POLL_S = 0.2


@dataclass(frozen=True)
class OpenAIOptions:
    """What `ps3edge serve-openai` was started with (each field has the flag of the same name)."""
    address: str = LOOPBACK
    port: int = DEFAULTS.OPENAI_PORT
    api_key: Optional[str] = None
    served_model_name: Optional[str] = None
    backend: str = "onnxruntime"
    precision: str = "fp32"
    llm_precision: str = "fp32"
    max_batch: int = DEFAULTS.DEFAULT_MAX_BATCH
    batch_delay_ms: int = DEFAULTS.OPENAI_BATCH_DELAY_MS
    max_queue: int = DEFAULTS.OPENAI_MAX_QUEUE
    max_image_bytes: int = DEFAULTS.OPENAI_MAX_IMAGE_BYTES
    allow_remote_images: bool = False
    exit_timeout_s: int = DEFAULTS.OPENAI_EXIT_TIMEOUT_S

    def check(self) -> "OpenAIOptions":
        if not 1 <= self.port <= 65535:
            raise Ps3EdgeError(f"--port must be a port between 1 and 65535, got {self.port}")
        for flag, value, least in (("--max-batch", self.max_batch, 1), ("--batch-delay-ms", self.batch_delay_ms, 0),
                                   ("--max-queue", self.max_queue, 1), ("--max-image-bytes", self.max_image_bytes, 1),
                                   ("--exit-timeout-s", self.exit_timeout_s, 1)):
            if value < least:
                raise Ps3EdgeError(f"{flag} must be at least {least}, got {value}")
        if self.api_key is not None and not self.api_key.strip():
            raise Ps3EdgeError(f"--api-key (or {DEFAULTS.ENV_OPENAI_API_KEY}) is empty; leave it out to serve without a key")
        if self.served_model_name is not None and not self.served_model_name.strip():
            raise Ps3EdgeError("--served-model-name is empty; leave it out to use the artifact directory's name")
        if self.precision != "fp32":
            raise Ps3EdgeError("a VILA-HD artifact's PS3 stages are served in fp32 (--precision fp32); "
                               "--llm-precision int4 picks the INT4 LLM")
        return self

    def model_name(self, artifact_dir: Path) -> str:
        return self.served_model_name or Path(artifact_dir).resolve().name


def check_artifact(artifact_dir: Path) -> None:
    from ..artifact.vila import is_vila_artifact

    if not artifact_dir.is_dir():
        raise Ps3EdgeError(f"artifact directory not found: {artifact_dir}")
    if not is_vila_artifact(artifact_dir):
        raise Ps3EdgeError(f"{artifact_dir} is not a VILA-HD artifact (no vila.json): serve-openai answers questions "
                           f"about images; export one with `ps3edge chat --artifacts DIR` or serve PS3 with `ps3edge serve`")


def check_settings(artifact_dir: Path, look_close: LookCloseDefaults) -> None:
    """The server's look-close settings against the artifact's PS3 geometry and the LLM's context,
    from the manifests alone (before listening), as `run` and `chat` check them."""
    from ..artifact.manifest import load_manifest
    from ..artifact.vila import load_vila_manifest
    from ..llm.pipeline import CONTEXT_MARGIN
    from ..runtime.lookclose import geometry_of
    from ..runtime.planning import resolve
    from ..serve.settings import checked_settings

    geometry = geometry_of(load_manifest(artifact_dir / "ps3", verify=False))
    settings = checked_settings(look_close, None, geometry)
    need = resolve(settings, geometry).patches_asked // 4 + CONTEXT_MARGIN
    context = load_vila_manifest(artifact_dir, verify=False).context_length
    if need > context:
        raise Ps3EdgeError(f"context length {context} is too short for these look-close settings: VILA-HD needs at "
                           f"least {need} (high-res patches / 4 + {CONTEXT_MARGIN}); lower --num-look-close or "
                           f"--num-token-look-close")


def check_port_free(address: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
        except OSError as e:
            raise Ps3EdgeError(f"--port {port} on {address} is not free ({e.strerror or e})") from None


def load(state, artifact_dir: Path, options: OpenAIOptions, progress: Callable[[str], None]) -> None:
    """The pipeline and the batcher, warmed up by one request through look_batch and generation."""
    import numpy as np
    from PIL import Image

    from ..llm.generate import SamplingConfig
    from ..llm.pipeline import VilaPipeline
    from .batcher import Batcher

    progress(f"loading {artifact_dir} ({options.backend}, LLM {options.llm_precision})")
    pipeline = VilaPipeline(artifact_dir, options.backend, precision=options.llm_precision)
    progress("warming up")
    request = pipeline.request("Describe the image.", state.defaults.settings(), SamplingConfig(max_new_tokens=1))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8))
    try:
        pipeline.generate_answer(request, pipeline.look_batch([image], [request])[0])
    except Ps3EdgeError as e:
        raise Ps3EdgeError(f"the warm-up request failed: {e}") from None
    state.pipeline = pipeline
    state.batcher = Batcher(pipeline, options.max_batch, options.batch_delay_ms / 1e3, options.max_queue, state.metrics)
    state.batcher.start()


def serve_openai(artifact_dir: Path, options: OpenAIOptions, look_close: LookCloseDefaults,
                 progress: Callable[[str], None], on_ready: Callable[[str, str], None],
                 on_stop: Callable[[str], None]) -> None:
    """Listen, load, serve until a stop signal, drain and return (raises Ps3EdgeError when the
    artifact cannot be served)."""
    require_extra()
    import uvicorn

    from .app import ServerState, create_app
    from .metrics import make_metrics

    options.check()
    artifact_dir = Path(artifact_dir)
    check_artifact(artifact_dir)
    check_settings(artifact_dir, look_close)
    check_port_free(options.address, options.port)
    state = ServerState(options.model_name(artifact_dir), look_close, make_metrics(options.max_batch),
                        api_key=options.api_key, max_image_bytes=options.max_image_bytes,
                        allow_remote_images=options.allow_remote_images,
                        remote_timeout_s=DEFAULTS.OPENAI_REMOTE_IMAGE_TIMEOUT_S,
                        body_limit=options.max_image_bytes * 4 // 3 + 4 + DEFAULTS.OPENAI_BODY_MARGIN_BYTES)
    config = uvicorn.Config(create_app(state), host=options.address, port=options.port, log_level="warning",
                            access_log=False, lifespan="off", timeout_graceful_shutdown=options.exit_timeout_s)
    server = uvicorn.Server(config)
    web = threading.Thread(target=server.run, name="ps3edge-openai-http", daemon=True)
    failure: dict = {}

    def load_in_thread():
        try:
            load(state, artifact_dir, options, progress)
        except BaseException as e:              # noqa: B036 - reported by the main thread
            failure["error"] = e

    with StopSignals() as stop:
        web.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not server.started and web.is_alive() and time.monotonic() < deadline:
            time.sleep(POLL_S / 4)
        if not server.started:
            server.should_exit = True
            raise Ps3EdgeError(f"the HTTP server did not start on {options.address}:{options.port}; its log is above")
        loader = threading.Thread(target=load_in_thread, name="ps3edge-openai-load", daemon=True)
        loader.start()
        while loader.is_alive() and not stop.event.wait(POLL_S):
            pass
        if not stop.event.is_set():
            if "error" in failure:
                _shut(server, web, state, 1)
                error = failure["error"]
                raise error if isinstance(error, Ps3EdgeError) else Ps3EdgeError(
                    f"loading {artifact_dir} failed ({type(error).__name__}: {error})")
            state.status = "ready"
            on_ready(state.model_name, f"http://{options.address}:{options.port}/v1")
            while not stop.event.wait(POLL_S):
                if not web.is_alive():
                    raise Ps3EdgeError("the HTTP server stopped by itself; its log is above")
                if not state.batcher.alive:
                    _shut(server, web, state, 1)
                    raise Ps3EdgeError("the batcher thread stopped by itself; its log is above")
        state.status = "draining"
        on_stop(signal.Signals(stop.signal).name)
        deadline = time.monotonic() + options.exit_timeout_s
        while (state.active or (state.batcher and state.batcher.admitted)) and time.monotonic() < deadline:
            time.sleep(POLL_S / 2)
        left = state.active + (state.batcher.admitted if state.batcher else 0)
        if left:
            LOG.warning("%d requests still running after --exit-timeout-s %d s; stopping anyway", left,
                        options.exit_timeout_s)
        _shut(server, web, state, 5 if not left else 1)


def _shut(server, web: threading.Thread, state, timeout_s: float) -> None:
    server.should_exit = True
    if timeout_s <= 1:
        server.force_exit = True
    web.join(timeout_s + 1)
    if state.batcher is not None:
        state.batcher.stop(timeout_s)
