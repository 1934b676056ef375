"""`ps3edge serve` under hostile conditions: what a local user can read off the process table, and
clients that go away mid-request. A real Triton server (PyTriton's tritonserver) on free loopback
ports; every request loop is bounded in count and time. Skipped where the serve extra is not
installed; `.ci/run` installs it.
"""

from __future__ import annotations

import io
import json
import socket
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pytriton", reason="the serve extra is not installed (pip install 'ps3edge[serve]')")
pytest.importorskip("tritonclient.grpc", reason="the serve extra is not installed (pip install 'ps3edge[serve]')")

from ps3edge.runtime.lookclose import Pipeline                    # noqa: E402
from ps3edge.runtime.planning import settings_from_env            # noqa: E402
from ps3edge.runtime.preprocess import open_image                 # noqa: E402
from ps3edge.serve.lockdown import LOCKED_APIS                    # noqa: E402
from serve_support import assert_matches, png_bytes, ps3_request, serving   # noqa: E402

ROUND_BUDGET_S = 300                 # one concurrent round, on 2 busy cores
DISCONNECTS = 20
DISCONNECT_BUDGET_S = 240            # the 20 disconnects together
RSS_GROWTH_MAX_MB = 150              # the server's tree, after 20 disconnects, over its size after a warm round
# over its size when ready, after batches of up to 8: Triton's and the clients' buffers, not the
# memory of the largest batch (an onnxruntime CPU arena kept about 1.9 GB of it)
RSS_FROM_READY_MAX_MB = 400
THREAD_GROWTH_MAX = 8


# --- the process tree, as any local user reads it -----------------------------------------------

def process_tree(root: int) -> list[int]:
    """`root` and every process below it (from /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue                      # gone meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def status_field(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {name} in /proc/{pid}/status")


def tree_usage(root: int) -> tuple[float, int]:
    """(resident MB, threads) of the server's whole process tree."""
    rss, threads = 0, 0
    for pid in process_tree(root):
        try:
            rss += status_field(pid, "VmRSS")
            threads += status_field(pid, "Threads")
        except (OSError, AssertionError):
            continue                      # gone, or a zombie without VmRSS
    return rss / 1024, threads


def restricted_settings(root: int) -> dict[str, str]:
    """tritonserver's restricted-API flags as its command line shows them: flag -> value."""
    found = {}
    for pid in process_tree(root):
        args = cmdline(pid)
        for i, arg in enumerate(args):
            for flag in ("--http-restricted-api", "--grpc-restricted-protocol"):
                if arg == flag and i + 1 < len(args):
                    found[flag] = args[i + 1]
                elif arg.startswith(flag + "="):
                    found[flag] = arg.split("=", 1)[1]
    return found


# --- raw HTTP -------------------------------------------------------------------------------------

def raw_http(port: int, method: str, path: str, headers: dict | None = None, body: bytes = b"",
             timeout: float = 30) -> tuple[int, bytes]:
    """One HTTP/1.1 request on a fresh socket, header lines written as given: (status, body)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close",
             f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        reply = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    head, _, rest = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), rest


def infer_body(image: bytes) -> tuple[bytes, int]:
    """A KServe v2 binary-tensor `ps3` request for one image: (body, JSON header length)."""
    tensor = struct.pack("<I", len(image)) + image          # a BYTES element: 4-byte length, then the bytes
    header = json.dumps({"inputs": [{"name": "image", "shape": [1, 1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(tensor)}}],
                         "outputs": [{"name": "features", "parameters": {"binary_data": True}}]}).encode()
    return header + tensor, len(header)


def send_and_vanish(port: int, image: bytes, fraction: float = 1.0, linger_s: float = 0.05) -> None:
    """Send a `ps3` request (or the first `fraction` of its body), then close the socket before any answer."""
    body, header_length = infer_body(image)
    head = (f"POST /v2/models/ps3/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: {header_length}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head + body[: max(1, int(len(body) * fraction))])
        time.sleep(linger_s)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))   # RST: gone, no goodbye


def reference(artifact, image: bytes):
    return Pipeline(artifact).run(open_image(io.BytesIO(image)), settings_from_env(env={}, num_look_close="1"))


# --- the tests --------------------------------------------------------------------------------------

def test_no_process_command_line_opens_the_locked_endpoints(artifacts, tmp_path):
    """Every process of the server's tree, read as any local user reads it (/proc/PID/cmdline): no
    PyTriton access token, and the restricted-API settings shown there open nothing, over HTTP or
    gRPC; the serving endpoints (inference, health, metadata, statistics) stay open."""
    import tritonclient.grpc as tg
    from tritonclient.utils import InferenceServerException

    art = artifacts("ps3-tiny")
    with serving(art, "--num-look-close", "1", tmp_path=tmp_path) as server:
        root = server.process.pid
        every_arg = [arg for pid in process_tree(root) for arg in cmdline(pid)]
        assert any("tritonserver" in arg for arg in every_arg), "tritonserver is not in the server's tree"
        assert not any("triton-access-token" in arg for arg in every_arg)
        flags = restricted_settings(root)
        assert set(flags) == {"--http-restricted-api", "--grpc-restricted-protocol"}, flags
        apis, _, lock = next(iter(flags.values())).partition(":")
        assert sorted(apis.split(",")) == sorted(LOCKED_APIS)
        header, _, value = lock.rpartition("=")
        assert ":" in header                     # a name no HTTP/1.1 or HTTP/2 client can send

        # what a holder of the command line would try: the header as shown, and split at its colon
        attempts = [{header: value}, {header.split(":", 1)[0]: header.split(":", 1)[1] + "=" + value},
                    {"triton-access-token": value}]
        locked = [("POST", "/v2/repository/index"), ("POST", "/v2/repository/models/ps3/unload"),
                  ("GET", "/v2/logging"), ("GET", "/v2/systemsharedmemory/status"), ("GET", "/v2/trace/setting")]
        for method, path in locked:
            for headers in attempts:
                status, body = raw_http(server.http_port, method, path, headers, b"{}" if method == "POST" else b"")
                assert status in (400, 401, 403), (method, path, headers, status, body[:200])
        client = tg.InferenceServerClient(server.grpc)
        try:
            for call in (lambda h: client.get_model_repository_index(headers=h),
                         lambda h: client.get_log_settings(headers=h),
                         lambda h: client.get_system_shared_memory_status(headers=h),
                         lambda h: client.unload_model("ps3", headers=h)):
                for headers in ({"triton-grpc-protocol-" + header: value},
                                {"triton-grpc-protocol-" + header.split(":", 1)[0]: value}, None):
                    with pytest.raises((InferenceServerException, ValueError)):
                        call(headers)
            assert client.is_model_ready("ps3")
        finally:
            client.close()
        status, stats = raw_http(server.http_port, "GET", "/v2/models/ps3/stats")
        assert status == 200 and b"model_stats" in stats
        assert raw_http(server.http_port, "GET", "/v2/models/ps3/config")[0] == 200
        assert ps3_request(server, png_bytes(seed=1)).get("features") is not None
        assert server.terminate() == 0


def test_a_client_that_vanishes_leaves_its_batch_mates_answered_and_nothing_behind(artifacts, tmp_path):
    """Clients that send a request (or half of one) and drop the connection, inside the same dynamic
    batch as three ordinary clients: those three get `run`'s answers. Then 20 more disconnects, sent
    back to back so that Triton fills its batches of 8: the server still answers correctly, and its
    process tree's memory and threads did not grow with them, nor kept what the largest batch needed."""
    import tritonclient.grpc as tg

    art = artifacts("ps3-tiny")
    images = [png_bytes(seed=40 + i) for i in range(3)]
    vanishing = png_bytes(seed=50)
    with serving(art, "--num-look-close", "1", "--max-batch", "8", "--max-queue-delay-us", "800000",
                 "--queue-timeout-ms", "600000", tmp_path=tmp_path) as server:
        rss_ready, _ = tree_usage(server.process.pid)         # warmed up, no batch larger than 1 run yet

        def grpc_gives_up():
            """A gRPC client whose deadline passes while its request waits in the batch."""
            client = tg.InferenceServerClient(server.grpc)
            inputs = [tg.InferInput("image", [1, 1], "BYTES")]
            inputs[0].set_data_from_numpy(np.array([[vanishing]], dtype=object))
            try:
                client.infer("ps3", inputs, client_timeout=0.3)
                return "answered"
            except Exception as e:          # tritonclient's deadline error: what this client expects
                return str(e)
            finally:
                client.close()

        with ThreadPoolExecutor(max_workers=6) as pool:
            vanished = [pool.submit(send_and_vanish, server.http_port, vanishing),
                        pool.submit(send_and_vanish, server.http_port, vanishing, 0.5),
                        pool.submit(grpc_gives_up)]
            answers = [pool.submit(ps3_request, server, img, protocol) for img, protocol in
                       zip(images, ("http", "grpc", "http"))]
            answers = [f.result(timeout=ROUND_BUDGET_S) for f in answers]
            [f.result(timeout=ROUND_BUDGET_S) for f in vanished]
        for img, answer in zip(images, answers):
            assert_matches(answer, reference(art, img))

        time.sleep(2)                                         # the first round's work is over
        rss_before, threads_before = tree_usage(server.process.pid)
        deadline = time.monotonic() + DISCONNECT_BUDGET_S
        for i in range(DISCONNECTS):
            assert time.monotonic() < deadline, f"{i} disconnects took over {DISCONNECT_BUDGET_S} s"
            send_and_vanish(server.http_port, vanishing, fraction=(0.5 if i % 4 == 3 else 1.0))
        for _ in range(60):                                   # bounded: the server answers its health check
            if raw_http(server.http_port, "GET", "/v2/health/ready")[0] == 200:
                break
            time.sleep(1)
        time.sleep(3)
        again = ps3_request(server, images[0])                # queued behind the vanished ones: they are done
        rss_after, threads_after = tree_usage(server.process.pid)
        stats = json.loads(raw_http(server.http_port, "GET", "/v2/models/ps3/stats")[1])["model_stats"][0]
        largest = max(b["batch_size"] for b in stats["batch_stats"])
        assert largest >= 4, f"Triton formed no batch larger than {largest}: the memory check saw no large batch"
        assert_matches(again, reference(art, images[0]))
        assert server.process.poll() is None
        assert threads_after - threads_before <= THREAD_GROWTH_MAX, (threads_before, threads_after)
        assert server.terminate() == 0, server.output()[-3000:]
    print(f"\nafter {DISCONNECTS} disconnects: RSS {rss_ready:.0f} (ready) -> {rss_before:.0f} -> {rss_after:.0f} MB, "
          f"threads {threads_before} -> {threads_after}")
    assert rss_after - rss_ready <= RSS_FROM_READY_MAX_MB, (
        f"the server's processes kept {rss_after - rss_ready:.0f} MB over their size when ready "
        f"({rss_ready:.0f} -> {rss_after:.0f} MB)")
    assert rss_after - rss_before <= RSS_GROWTH_MAX_MB, (
        f"the server's processes grew {rss_after - rss_before:.0f} MB over {DISCONNECTS} disconnects: "
        f"{rss_before:.0f} -> {rss_after:.0f} MB")
