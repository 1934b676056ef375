"""Helpers for the serving tests: free loopback ports, a `ps3edge serve` process that is waited on
(ready line) and always stopped, encoded test images, and Triton requests over HTTP and gRPC."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from conftest import cli_command, clean_env, random_image

START_TIMEOUT_S = 300              # loading, warm-up and Triton's start, on 2 busy cores
STOP_TIMEOUT_S = 90
REQUEST_TIMEOUT_S = 300


def free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def png_bytes(seed: int, width: int = 320, height: int = 240) -> bytes:
    buffer = io.BytesIO()
    random_image(width, height, seed=seed).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Server:
    process: subprocess.Popen
    http_port: int
    grpc_port: int
    metrics_port: int
    log: Path

    @property
    def http(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def terminate(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM to the server process alone; its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)


@contextlib.contextmanager
def serving(artifact: Path, *flags, tmp_path: Path):
    """`ps3edge serve ARTIFACT FLAGS` on free loopback ports, ready; stopped (killed if it must be) after."""
    http, grpc, metrics = free_ports(3)
    log = tmp_path / f"serve-{http}.log"
    command = cli_command() + ["serve", str(artifact), "--http-port", str(http), "--grpc-port", str(grpc),
                "--metrics-port", str(metrics), *map(str, flags)]
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=clean_env())
    server = Server(process, http, grpc, metrics, log)
    try:
        wait_ready(server, "ps3edge serve", lambda: "ready: " in server.output())
        yield server
    finally:
        stop(process)


def ps3_request(server: Server, image: bytes, protocol: str = "http", parameters: dict | None = None,
                prompt: np.ndarray | None = None) -> dict:
    """One `ps3` request; its outputs by name (absent outputs left out), or {'exception': text}."""
    if protocol == "http":
        import tritonclient.http as client_module
        client = client_module.InferenceServerClient(server.http, network_timeout=REQUEST_TIMEOUT_S,
                                                     connection_timeout=REQUEST_TIMEOUT_S)
    else:
        import tritonclient.grpc as client_module
        client = client_module.InferenceServerClient(server.grpc)
    inputs = [client_module.InferInput("image", [1, 1], "BYTES")]
    inputs[0].set_data_from_numpy(np.array([[image]], dtype=object))
    if prompt is not None:
        inputs.append(client_module.InferInput("prompt_embedding", [1, len(prompt)], "FP32"))
        inputs[1].set_data_from_numpy(np.asarray(prompt, np.float32)[None])
    try:
        kwargs = {"client_timeout": REQUEST_TIMEOUT_S} if protocol == "grpc" else {}
        result = client.infer("ps3", inputs, parameters=parameters, **kwargs)
    except Exception as e:          # tritonclient's InferenceServerException: Triton refused or failed it
        return {"exception": str(e)}
    finally:
        client.close()
    names = [o["name"] if isinstance(o, dict) else o.name for o in
             (result.get_response()["outputs"] if protocol == "http" else result.get_response().outputs)]
    return {name: result.as_numpy(name) for name in names}


def error_text(outputs: dict) -> str:
    return outputs["error"][0, 0].decode() if "error" in outputs else outputs.get("exception", "")


def assert_matches(outputs: dict, reference) -> None:
    """A served response against `Pipeline.run` on the same image and settings."""
    assert error_text(outputs) == "", error_text(outputs)
    assert outputs["features"].shape == reference.features.shape
    assert float(np.abs(outputs["features"] - reference.features).max()) <= 1e-5
    assert float(np.abs(outputs["prob"][0] - reference.prob).max()) <= 1e-5
    for scale, m in zip(reference.scales, reference.plan.selection_maps):
        assert np.array_equal(outputs[f"selection_map_{scale}"][0], m)


def vila_request(server: Server, question: str, image: bytes, parameters: dict | None = None) -> dict:
    """One whole-answer `vila-hd` request over HTTP: its outputs by name."""
    import tritonclient.http as th

    client = th.InferenceServerClient(server.http, network_timeout=REQUEST_TIMEOUT_S,
                                      connection_timeout=REQUEST_TIMEOUT_S)
    inputs = [th.InferInput("text", [1, 1], "BYTES"), th.InferInput("image", [1, 1], "BYTES")]
    inputs[0].set_data_from_numpy(np.array([[question.encode()]], dtype=object))
    inputs[1].set_data_from_numpy(np.array([[image]], dtype=object))
    try:
        result = client.infer("vila-hd", inputs, parameters=parameters)
    finally:
        client.close()
    return {name: result.as_numpy(name) for name in ("answer", "error") if result.as_numpy(name) is not None}


def vila_stream(server: Server, question: str, image: bytes, parameters: dict | None = None) -> list:
    """`vila-hd-stream` over gRPC streaming: the pieces of text as they came, then any error text."""
    import queue

    import tritonclient.grpc as tg

    received: queue.Queue = queue.Queue()
    client = tg.InferenceServerClient(server.grpc)
    inputs = [tg.InferInput("text", [1, 1], "BYTES"), tg.InferInput("image", [1, 1], "BYTES")]
    inputs[0].set_data_from_numpy(np.array([[question.encode()]], dtype=object))
    inputs[1].set_data_from_numpy(np.array([[image]], dtype=object))
    pieces = []
    client.start_stream(callback=lambda result, error: received.put((result, error)))
    try:
        client.async_stream_infer("vila-hd-stream", inputs, parameters=parameters, enable_empty_final_response=True)
        deadline = time.monotonic() + REQUEST_TIMEOUT_S
        for _ in range(10_000):                      # bounded: max_tokens pieces and one final response
            result, error = received.get(timeout=max(1.0, deadline - time.monotonic()))
            if error is not None:
                pieces.append(f"exception: {error}")
                break
            response = result.get_response()
            for name in ("answer", "error"):
                value = result.as_numpy(name)
                if value is not None and value[0, 0]:
                    pieces.append(value[0, 0].decode() if name == "answer" else f"error: {value[0, 0].decode()}")
            if response.parameters["triton_final_response"].bool_param:
                break
    finally:
        client.stop_stream()
        client.close()
    return pieces


def stock_backends(work: Path) -> Path:
    """A backend directory for the tritonserver PyTriton ships: its backends, with the Python
    backend stub of this interpreter's version (PyTriton prepares its own the same way)."""
    import shutil

    import pytriton
    from pytriton.utils.distribution import get_stub_path

    dist = Path(pytriton.__file__).parent / "tritonserver"
    backends = work / "backends"
    shutil.copytree(dist / "backends", backends, ignore=shutil.ignore_patterns("python_backend_stubs",
                                                                              "triton_python_backend_stub"))
    shutil.copy(get_stub_path(f"{sys.version_info[0]}.{sys.version_info[1]}"),
                backends / "python" / "triton_python_backend_stub")
    return backends


@contextlib.contextmanager
def stock_tritonserver(repository: Path, work: Path):
    """The shipped `tritonserver --model-repository REPOSITORY` on free loopback ports, ready."""
    import sysconfig

    import pytriton
    from pytriton.utils.distribution import get_libs_path

    http, grpc, metrics = free_ports(3)
    env = clean_env()
    # the stub loads libpython from the library path: this interpreter's first
    env["LD_LIBRARY_PATH"] = os.pathsep.join([sysconfig.get_config_var("LIBDIR"), str(get_libs_path()),
                                              env.get("LD_LIBRARY_PATH", "")])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]])
    binary = Path(pytriton.__file__).parent / "tritonserver" / "bin" / "tritonserver"
    log = work / "tritonserver.log"
    with open(log, "wb") as sink:
        process = subprocess.Popen([str(binary), "--model-repository", str(repository),
                                    "--backend-directory", str(stock_backends(work)),
                                    "--http-address", "127.0.0.1", "--grpc-address", "127.0.0.1",
                                    "--metrics-address", "127.0.0.1", "--http-port", str(http),
                                    "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
                                   stdout=sink, stderr=subprocess.STDOUT, env=env)
    server = Server(process, http, grpc, metrics, log)
    try:
        wait_ready(server, "tritonserver", lambda: _health_ready(server))
        yield server
    finally:
        stop(process)


def wait_ready(server: Server, name: str, ready) -> None:
    """Poll `ready()` until it holds; one AssertionError with the server's output if the process
    exits first or START_TIMEOUT_S passes."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready():
        if server.process.poll() is not None:
            raise AssertionError(f"{name} exited {server.process.returncode}:\n{server.output()[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} not ready after {START_TIMEOUT_S} s:\n{server.output()[-4000:]}")
        time.sleep(0.5)


def _health_ready(server: Server) -> bool:
    """Triton's KServe readiness endpoint answers 200."""
    try:
        with urllib.request.urlopen(f"http://{server.http}/v2/health/ready", timeout=5) as reply:
            return reply.status == 200
    except OSError:
        return False


def stop(process: subprocess.Popen) -> None:
    """SIGTERM (the server drains), then SIGKILL if it has not exited in STOP_TIMEOUT_S."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def make_checkout_importable(version_dir: Path) -> None:
    """The Python-backend stub runs isolated (no PYTHONPATH): where the ps3edge its site-packages
    gives is not this checkout (an editable install of another one), put this checkout's package in
    the model's version directory, which the stub puts on its path."""
    import ps3edge

    here = Path(ps3edge.__file__).resolve().parent
    found = subprocess.run([sys.executable, "-I", "-c", "import ps3edge; print(ps3edge.__file__)"],
                           capture_output=True, text=True, timeout=120, cwd="/")
    if found.returncode != 0 or Path(found.stdout.strip()).resolve().parent != here:
        (version_dir / "ps3edge").symlink_to(here, target_is_directory=True)
