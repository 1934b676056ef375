"""`ps3edge serve`: a real Triton server (PyTriton's bundled tritonserver) on free loopback ports,
called with tritonclient over HTTP and gRPC. Every answer is checked against `Pipeline.run` on the
same image and settings. Skipped where the serve extra is not installed; `.ci/run` installs it.

The default run keeps one smoke test (a server costs ~15 s to start on 2 cores); the rest is slow.
"""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("pytriton", reason="the serve extra is not installed (pip install 'ps3edge[serve]')")
pytest.importorskip("tritonclient.grpc", reason="the serve extra is not installed (pip install 'ps3edge[serve]')")

from ps3edge.runtime.lookclose import Pipeline                    # noqa: E402
from ps3edge.runtime.planning import settings_from_env            # noqa: E402
from ps3edge.runtime.preprocess import open_image                 # noqa: E402
from serve_support import assert_matches, error_text, png_bytes, ps3_request, serving   # noqa: E402

CALL_BUDGET_S = 600                  # a whole concurrent round, on 2 busy cores


def reference(artifact, image: bytes, **settings):
    """`ps3edge run`'s result on the same bytes and settings."""
    pipeline = Pipeline(artifact)
    return pipeline.run(open_image(io.BytesIO(image)), settings_from_env(env={}, **settings))


def concurrently(calls) -> list:
    """Run the zero-argument calls at once; their results in order (bounded in time)."""
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
        return [f.result(timeout=CALL_BUDGET_S) for f in futures]


def batch_sizes(server, model: str = "ps3") -> dict[int, int]:
    """Triton's statistics: batch size -> how many executions had it."""
    import tritonclient.http as th

    client = th.InferenceServerClient(server.http)
    try:
        stats = client.get_inference_statistics(model)["model_stats"][0]
    finally:
        client.close()
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", [])}


def test_serve_answers_like_run_and_refuses_a_bad_request_alone(artifacts, tmp_path):
    """The core check: a served response equals `run`; an undecodable image in the same batch gets
    its own error; SIGTERM exits 0."""
    art = artifacts("ps3-tiny")
    good = png_bytes(seed=3)
    with serving(art, "--num-look-close", "1", "--max-queue-delay-us", "300000", tmp_path=tmp_path) as server:
        answers = concurrently([lambda: ps3_request(server, good),
                                lambda: ps3_request(server, b"not an image at all", protocol="grpc")])
        assert_matches(answers[0], reference(art, good, num_look_close="1"))
        assert error_text(answers[1]) == "the request's image is not an image file PIL can read"
        assert "features" not in answers[1]
        assert server.terminate() == 0
    assert "stopped" in server.output()


@pytest.mark.slow
def test_concurrent_requests_each_get_their_own_answer(artifacts, tmp_path):
    """16 different images at once over HTTP and gRPC, half with a per-request setting override and
    one corrupt: each answer belongs to its own image and settings, Triton formed batches > 1."""
    art = artifacts("ps3-tiny")
    images = [png_bytes(seed=100 + i, width=200 + 8 * i) for i in range(16)]
    steps = ["2" if i % 2 else None for i in range(16)]
    corrupt = 5
    images[corrupt] = images[corrupt][: len(images[corrupt]) // 3]          # a truncated PNG
    with serving(art, "--num-look-close", "1", "--max-queue-delay-us", "500000", tmp_path=tmp_path) as server:
        calls = [lambda i=i: ps3_request(server, images[i], protocol="grpc" if i % 3 else "http",
                                         parameters={"num_look_close": int(steps[i])} if steps[i] else None)
                 for i in range(16)]
        answers = concurrently(calls)
        sizes = batch_sizes(server)
    assert "corrupt or truncated" in error_text(answers[corrupt])
    for i, answer in enumerate(answers):
        if i != corrupt:
            assert_matches(answer, reference(art, images[i], num_look_close=steps[i] or "1"))
    assert max(sizes) > 1, sizes


@pytest.mark.slow
def test_bad_settings_and_prompts_are_answered_per_request(artifacts, tmp_path):
    """Out-of-range settings, unknown parameters and a prompt in bottom-up mode: each request gets
    its own one-line error; a top-down request with a prompt embedding matches `run` with it."""
    art = artifacts("ps3-tiny")
    image = png_bytes(seed=7)
    width = Pipeline(art).cfg.width
    prompt = np.random.default_rng(0).standard_normal(width).astype(np.float32)
    with serving(art, "--num-look-close", "1", "--max-queue-delay-us", "300000", tmp_path=tmp_path) as server:
        answers = concurrently([
            lambda: ps3_request(server, image, parameters={"num_look_close": 99}),
            lambda: ps3_request(server, image, parameters={"num_look_closes": 2}),
            lambda: ps3_request(server, image, parameters={"look_close_mode": "after_image"}, prompt=prompt),
            lambda: ps3_request(server, image, prompt=prompt),
            lambda: ps3_request(server, image, protocol="grpc", parameters={"select_num_each_scale": "1+2+3"}),
        ])
    assert "NUM_LOOK_CLOSE must be between 1 and" in error_text(answers[0])
    assert "unknown request parameter 'num_look_closes'" in error_text(answers[1])
    assert "LOOK_CLOSE_MODE is after_image" in error_text(answers[2])
    assert "SELECT_NUM_EACH_SCALE needs" in error_text(answers[4])
    pipeline = Pipeline(art)
    expected = pipeline.run(open_image(io.BytesIO(image)), settings_from_env(env={}, num_look_close="1"),
                            prompt_embedding=prompt)
    assert_matches(answers[3], expected)


@pytest.mark.slow
def test_overload_is_rejected_clearly(artifacts, tmp_path):
    """A queue of one and batches of one: the requests that do not fit are refused at once with
    Triton's queue message; the ones taken are answered."""
    art = artifacts("ps3-tiny")
    image = png_bytes(seed=9)
    with serving(art, "--num-look-close", "1", "--max-batch", "1", "--max-queue-size", "1",
                 "--max-queue-delay-us", "0", tmp_path=tmp_path) as server:
        answers = concurrently([lambda: ps3_request(server, image) for _ in range(6)])
    refused = [a for a in answers if "exception" in a]
    answered = [a for a in answers if "exception" not in a]
    assert refused and answered, answers
    assert all("queue" in a["exception"].lower() for a in refused), refused
    expected = reference(art, image, num_look_close="1")
    for answer in answered:
        assert_matches(answer, expected)


@pytest.mark.slow
def test_sigterm_drains_the_requests_in_flight(artifacts, tmp_path):
    """SIGTERM while requests run: every one is answered, then the server exits 0."""
    art = artifacts("ps3-tiny")
    images = [png_bytes(seed=20 + i) for i in range(4)]
    with serving(art, "--num-look-close", "1", "--max-batch", "2", tmp_path=tmp_path) as server:
        with ThreadPoolExecutor(max_workers=4) as pool:
            futures = [pool.submit(ps3_request, server, img) for img in images]
            deadline = time.monotonic() + 60
            while not any(batch_sizes(server).values()) and time.monotonic() < deadline:
                time.sleep(0.2)                   # one batch is done; the other requests are queued or running
            code = server.terminate()
            answers = [f.result(timeout=CALL_BUDGET_S) for f in futures]
    assert code == 0, server.output()[-3000:]
    for img, answer in zip(images, answers):
        assert_matches(answer, reference(art, img, num_look_close="1"))


def test_serve_refuses_bad_flags_in_one_line(artifacts):
    """Before anything loads: one `error:` line naming the flag."""
    from conftest import cli

    result = cli("serve", str(artifacts("ps3-tiny")), "--http-port", "9000", "--grpc-port", "9000")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == ["error: the HTTP, gRPC and metrics ports must differ, got 9000, 9000, 8002"]
