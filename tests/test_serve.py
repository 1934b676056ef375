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
    with serving(art, "--num-look-close", "1", "--max-queue-delay-us", "500000", "--queue-timeout-ms", "600000",
                 tmp_path=tmp_path) as server:
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


@pytest.mark.slow
def test_vila_answers_whole_over_http_and_streams_over_grpc(vila_art, tmp_path):
    """vila-hd gives `chat`'s answer in one response; vila-hd-stream sends the same pieces as
    `chat` streams them; the ps3 model of the same artifact is served beside them."""
    from ps3edge.llm.generate import SamplingConfig
    from ps3edge.llm.pipeline import VilaPipeline
    from serve_support import vila_request, vila_stream

    image = png_bytes(seed=11)
    question = "What is in the picture?"
    sampling = {"max_tokens": 6, "temperature": 0.7, "top_p": 0.9, "seed": 3}
    expected_pieces = []
    expected = VilaPipeline(vila_art).answer(
        open_image(io.BytesIO(image)), question, settings_from_env(env={}, num_look_close="1"),
        SamplingConfig(max_new_tokens=6, temperature=0.7, top_p=0.9, seed=3), on_text=expected_pieces.append)
    with serving(vila_art, "--num-look-close", "1", tmp_path=tmp_path) as server:
        assert "ready: ps3, vila-hd, vila-hd-stream" in server.output()
        whole = vila_request(server, question, image, sampling)
        pieces = vila_stream(server, question, image, sampling)
        refused = vila_request(server, question, image, {"max_tokens": 0})
        assert server.terminate() == 0
    assert whole["error"][0, 0] == b"" and whole["answer"][0, 0].decode() == expected.text
    assert pieces == expected_pieces and "".join(pieces) == expected.text
    assert refused["error"][0, 0].decode() == "max new tokens must be at least 1, got 0"


def test_vila_serves_its_int4_llm_and_a_ps3_artifact_refuses_an_llm_precision(vila_art, artifacts, tmp_path):
    """--llm-precision int4 serves the LLM `calibrate --precision int4` wrote, answering as `chat
    --precision int4` does; on an artifact without an LLM the flag is one error line."""
    import shutil

    from conftest import cli
    from ps3edge.llm.generate import SamplingConfig
    from ps3edge.llm.pipeline import VilaPipeline
    from serve_support import vila_request

    art = shutil.copytree(vila_art, tmp_path / "vila")
    assert cli("calibrate", art, "--precision", "int4").returncode in (0, 1)    # 1: the report's bound, not an error
    image = png_bytes(seed=12)
    question = "What is in the picture?"
    expected = VilaPipeline(art, precision="int4").answer(
        open_image(io.BytesIO(image)), question, settings_from_env(env={}, num_look_close="1"),
        SamplingConfig(max_new_tokens=5))
    with serving(art, "--num-look-close", "1", "--llm-precision", "int4", tmp_path=tmp_path) as server:
        whole = vila_request(server, question, image, {"max_tokens": 5})
        assert server.terminate() == 0
    assert whole["error"][0, 0] == b"" and whole["answer"][0, 0].decode() == expected.text
    refused = cli("serve", artifacts("ps3-tiny"), "--llm-precision", "int4")
    assert refused.returncode == 2 and "is for a VILA-HD artifact" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_triton_repo_writes_a_valid_repository(artifacts, tmp_path):
    """config.pbtxt parses as Triton's ModelConfig with the served tensors, batching, queue policy
    and instances; model.py and the artifact are beside it; a second write into it is refused."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from conftest import cli

    repo = tmp_path / "repo"
    result = cli("triton-repo", str(artifacts("ps3-tiny")), "--out", str(repo), "--num-look-close", "1",
                 "--max-batch", "4", "--instances", "2", "--max-queue-size", "16")
    assert result.returncode == 0, result.stderr
    config = text_format.Parse((repo / "ps3" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert (config.name, config.backend, config.max_batch_size) == ("ps3", "python", 4)
    assert [i.name for i in config.input] == ["image", "prompt_embedding"] and config.input[1].optional
    assert [o.name for o in config.output][:2] == ["features", "prob"] and config.output[-1].name == "error"
    assert config.dynamic_batching.default_queue_policy.max_queue_size == 16
    assert config.dynamic_batching.default_queue_policy.timeout_action == model_config_pb2.ModelQueuePolicy.REJECT
    assert config.instance_group[0].count == 2
    assert config.parameters["num_look_close"].string_value == "1"
    assert "TritonPythonModel" in (repo / "ps3" / "1" / "model.py").read_text()
    assert (repo / "ps3" / "1" / "artifact" / "manifest.json").is_file()
    again = cli("triton-repo", str(artifacts("ps3-tiny")), "--out", str(repo))
    assert again.returncode == 2 and "is not an empty directory; nothing was written" in again.stderr


@pytest.mark.slow
def test_triton_repo_answers_in_the_shipped_tritonserver(artifacts, tmp_path):
    """The repository in PyTriton's own tritonserver binary: an answer equal to `run`, and a corrupt
    request refused with a real per-request error while its batch-mate is answered."""
    from conftest import cli
    from serve_support import make_checkout_importable, stock_tritonserver

    art = artifacts("ps3-tiny")
    repo = tmp_path / "repo"
    assert cli("triton-repo", str(art), "--out", str(repo), "--num-look-close", "1",
               "--max-queue-delay-us", "300000").returncode == 0
    make_checkout_importable(repo / "ps3" / "1")
    good = png_bytes(seed=4)
    work = tmp_path / "work"
    work.mkdir()
    with stock_tritonserver(repo, work) as server:
        answers = concurrently([lambda: ps3_request(server, good),
                                lambda: ps3_request(server, b"junk", protocol="grpc")])
    assert_matches(answers[0], reference(art, good, num_look_close="1"))
    assert "the request's image is not an image file PIL can read" in answers[1]["exception"]
