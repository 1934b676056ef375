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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from conftest import SCRIPT, clean_env, random_image

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
    command = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "ps3edge.cli"]
    command += ["serve", str(artifact), "--http-port", str(http), "--grpc-port", str(grpc),
                "--metrics-port", str(metrics), *map(str, flags)]
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=clean_env())
    server = Server(process, http, grpc, metrics, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while "ready: " not in server.output():
            if process.poll() is not None:
                raise AssertionError(f"ps3edge serve exited {process.returncode}:\n{server.output()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"ps3edge serve not ready after {START_TIMEOUT_S} s:\n{server.output()[-4000:]}")
            time.sleep(0.5)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)


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
