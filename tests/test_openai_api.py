"""`ps3edge serve-openai`: a real server (`python -m ps3edge.cli serve-openai` in a subprocess, on a
free loopback port) over the vila-hd-tiny artifact, called with the official `openai` client and
plain HTTP. Answers are checked against `ps3edge chat --json` and `VilaPipeline.answer` for the same
image, question, settings and sampling. Skipped where the openai extra is not installed; `.ci/run`
installs it.

The default run keeps one server (module fixture) for the answers and every error path; servers
with other flags (a tiny queue, remote images, concurrent batches, the SIGTERM drain) are slow.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import io
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

REASON = "the openai extra is not installed (pip install 'ps3edge[openai]')"
for _module in ("fastapi", "uvicorn", "prometheus_client", "openai"):
    pytest.importorskip(_module, reason=REASON)

import openai                                                       # noqa: E402

from conftest import clean_env, cli, random_image                  # noqa: E402
from serve_support import free_ports, png_bytes, stop, wait_ready    # noqa: E402

KEY = "test-key-0123"
MODEL = "vila-hd-tiny"
QUESTION = "What is in the picture?"
REQUEST_TIMEOUT_S = 300
STOP_TIMEOUT_S = 120


@dataclass
class OpenAIServer:
    process: subprocess.Popen
    port: int
    log: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, key: str | None = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key=key or "none", max_retries=0,
                             timeout=REQUEST_TIMEOUT_S)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def openai_server(artifact: Path, *flags, log_dir: Path, key: str | None = KEY):
    """`python -m ps3edge.cli serve-openai ARTIFACT --port P FLAGS` (the key from PS3EDGE_API_KEY, as
    the docs advise), ready; stopped (killed if it must be) after."""
    (port,) = free_ports(1)
    log = log_dir / f"serve-openai-{port}.log"
    env = clean_env(**({"PS3EDGE_API_KEY": key} if key else {}))
    command = [sys.executable, "-m", "ps3edge.cli", "serve-openai", str(artifact), "--port", str(port),
               "--served-model-name", MODEL, *map(str, flags)]
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
    server = OpenAIServer(process, port, log)
    try:
        wait_ready(server, "ps3edge serve-openai", lambda: "ready: " in server.output())
        yield server
    finally:
        stop(process)


def data_url(image: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(image).decode()


def messages(url: str, question: str = QUESTION, image_first: bool = False) -> list:
    parts = [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": url}}]
    return [{"role": "user", "content": parts[::-1] if image_first else parts}]


def call(server: OpenAIServer, method: str, path: str, body=None, key: str | None = KEY, raw: bytes | None = None):
    """(status, JSON body) of one plain HTTP request."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(server.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as reply:
            return reply.status, json.loads(reply.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def declared_but_not_sent(server: OpenAIServer, size: int):
    """A body announced as `size` bytes of which one is sent: (status, JSON body) of the answer,
    which must come from the headers alone (the server does not wait for the rest)."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        connection.putrequest("POST", "/v1/chat/completions")
        for name, value in (("Authorization", f"Bearer {KEY}"), ("Content-Type", "application/json"),
                            ("Content-Length", str(size))):
            connection.putheader(name, value)
        connection.endheaders(b"{")
        reply = connection.getresponse()
        return reply.status, json.loads(reply.read())
    finally:
        connection.close()


def chat_json(art: Path, image_file: Path, question: str, max_tokens: int) -> dict:
    """`ps3edge chat --json` on the same artifact, image and question (greedy, NUM_LOOK_CLOSE=1)."""
    result = cli("chat", "--model-path", "vila-hd-tiny", "--artifacts", art, "--text", question, "--media", image_file,
                 "--max-new-tokens", str(max_tokens), "--num-look-close", "1", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def reference(art: Path, image: bytes, question: str, **sampling):
    """VilaPipeline.answer for the same bytes, question and sampling (NUM_LOOK_CLOSE=1)."""
    from ps3edge.llm.generate import SamplingConfig
    from ps3edge.llm.pipeline import VilaPipeline
    from ps3edge.runtime.planning import settings_from_env
    from ps3edge.runtime.preprocess import open_image

    return VilaPipeline(art).answer(open_image(io.BytesIO(image)), question, settings_from_env(env={}, num_look_close="1"),
                                    SamplingConfig(**sampling))


@pytest.fixture(scope="module")
def server(vila_art, tmp_path_factory):
    with openai_server(vila_art, "--num-look-close", "1", "--max-image-bytes", "400000", "--batch-delay-ms", "20",
                       "--max-batch", "8", log_dir=tmp_path_factory.mktemp("openai")) as running:
        yield running


# --- pieces, without a server ----------------------------------------------------------------------

def test_stop_strings_hold_back_what_could_still_become_one():
    from ps3edge.openai_api.batcher import Job, StopStrings

    sent = []
    job = Job(None, None, ("END", "xyz"), emit=sent.append, finish=lambda o: None)
    pieces = StopStrings(job)
    assert [pieces(p) for p in ("ab", "cE", "N", "x", "q")] == [False] * 5
    assert sent == ["ab", "c", "EN", "xq"]                  # "E", "EN", "x" waited for the next piece
    assert pieces("E") is False and pieces("ND tail") is True and pieces.hit
    assert "".join(sent) == "abcENxq" and pieces.text == "abcENxq"
    plain = StopStrings(Job(None, None, ("zz",), emit=sent.append, finish=lambda o: None))
    sent.clear()
    assert plain("az") is False and sent == ["a"]
    plain.close()
    assert sent == ["a", "z"]


def test_a_request_inside_a_batch_of_3_answers_as_alone(vila_art):
    """look_batch over 3 different images and questions, then each answer: the tokens, the
    selection and the usage counts of VilaPipeline.answer on each alone."""
    from ps3edge.llm.generate import SamplingConfig
    from ps3edge.llm.pipeline import VilaPipeline
    from ps3edge.runtime.planning import settings_from_env

    pipeline = VilaPipeline(vila_art)
    settings = settings_from_env(env={}, num_look_close="1")
    imgs = [random_image(300 + 16 * i, 200 + 8 * i, seed=40 + i) for i in range(3)]
    questions = ["What is in the picture?", "Describe the colours.", "Is there text?"]
    samplings = [SamplingConfig(max_new_tokens=6 + i, temperature=0.9, seed=i) for i in range(3)]
    requests = [pipeline.request(q, settings, s) for q, s in zip(questions, samplings)]
    looked = pipeline.look_batch(imgs, requests)
    assert len({id(x.result) for x in looked}) == 3 and looked[0].result.batch == 3
    for i in range(3):
        batched = pipeline.generate_answer(requests[i], looked[i])
        alone = pipeline.answer(imgs[i], questions[i], settings, samplings[i])
        assert batched.token_ids == alone.token_ids and batched.text == alone.text
        assert batched.tokens == alone.tokens
        for a, b in zip(batched.selection_maps, alone.selection_maps):
            assert (a == b).all()


# --- one server: answers and errors ------------------------------------------------------------------

def test_answers_equal_chat_whole_and_streamed(server, vila_art, tmp_path):
    """Non-streaming and streaming answers (greedy, max tokens) equal `ps3edge chat --json`; usage
    counts the text, low-res and high-res tokens; a stop string cuts the answer; /v1/models, /health
    and /metrics answer."""
    image = png_bytes(seed=3)
    image_file = tmp_path / "img.png"
    image_file.write_bytes(image)
    expected = chat_json(vila_art, image_file, QUESTION, 8)
    client = server.client()

    whole = client.chat.completions.create(model=MODEL, messages=messages(data_url(image)), max_tokens=8,
                                           temperature=0)
    assert whole.choices[0].message.content == expected["answer"]
    assert whole.choices[0].finish_reason == "length" and whole.object == "chat.completion"
    tokens = expected["tokens"]
    assert tokens["prompt"] == tokens["text"] + tokens["lowres"] + sum(tokens["highres"].values()) + tokens["newline"]
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens) == \
        (tokens["prompt"], 8, tokens["prompt"] + 8)

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages(data_url(image), image_first=True),
                                                 max_completion_tokens=8, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected["answer"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == tokens["prompt"]

    cut = expected["answer"].find(":")
    assert cut > 0, expected["answer"]                      # the seeded tiny model's answer has one
    stopped = client.chat.completions.create(model=MODEL, messages=messages(data_url(image)), max_tokens=8,
                                             temperature=0, stop=[":", "never"])
    assert stopped.choices[0].message.content == expected["answer"][:cut]
    assert stopped.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model=MODEL, messages=messages(data_url(image)), max_tokens=8,
                                              temperature=0, stop=":", stream=True)
    pieces = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in pieces if c.choices) == expected["answer"][:cut]

    assert [m.id for m in client.models.list().data] == [MODEL]
    assert call(server, "GET", "/health", key=None) == (200, {"status": "ready"})
    with urllib.request.urlopen(server.base + "/metrics", timeout=30) as reply:
        metrics = reply.read().decode()
    assert 'ps3edge_openai_requests_total{route="/v1/chat/completions",status="200"}' in metrics
    for name in ("ps3edge_openai_queue_depth", "ps3edge_openai_vision_batch_size_bucket",
                 "ps3edge_openai_request_seconds_bucket", "ps3edge_openai_time_to_first_token_seconds_count"):
        assert name in metrics, name


def test_every_error_is_an_openai_error_object(server):
    """400 (bad image, remote URL, n=2, look-close value, unknown field, two images, bad JSON), 413,
    401, 404 (model, path), 405: each an {"error": {message, type, param, code}} the openai client
    raises as its own exception class."""
    good = data_url(png_bytes(seed=5))
    client = server.client()
    refused = {
        "bad image": dict(messages=messages("data:image/png;base64," + base64.b64encode(b"not a png").decode())),
        "remote": dict(messages=messages("https://example.com/cat.png")),
        "n=2": dict(messages=messages(good), n=2),
        "look-close": dict(messages=messages(good), extra_body={"num_look_close": 99}),
        "mode": dict(messages=messages(good), extra_body={"look_close_mode": "sideways"}),
        "unknown field": dict(messages=messages(good), extra_body={"num_look_closes": 2}),
        "no image": dict(messages=[{"role": "user", "content": QUESTION}]),
        "two images": dict(messages=[{"role": "user", "content": [
            {"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": good}},
            {"type": "image_url", "image_url": {"url": good}}]}]),
        "gif": dict(messages=messages("data:image/gif;base64,R0lGODlhAQABAAAAACw=")),
        "penalty": dict(messages=messages(good), frequency_penalty=0.5),
    }
    for what, kwargs in refused.items():
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, max_tokens=2, **kwargs)
        assert e.value.status_code == 400, what
        assert set(e.value.body) >= {"message", "type", "param", "code"}, (what, e.value.body)
        assert e.value.body["type"] == "invalid_request_error", what
    bodies = {}
    for what, kwargs in (("remote", refused["remote"]), ("n=2", refused["n=2"]),
                         ("look-close", refused["look-close"]), ("unknown field", refused["unknown field"])):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, max_tokens=2, **kwargs)
        bodies[what] = e.value.body
    assert "--allow-remote-images" in bodies["remote"]["message"]
    assert bodies["n=2"]["param"] == "n"
    assert bodies["look-close"]["param"] == "num_look_close" and "NUM_LOOK_CLOSE must be between" in \
        bodies["look-close"]["message"]
    assert bodies["unknown field"]["param"] == "num_look_closes"

    big = png_bytes(seed=6, width=640, height=480)          # a noisy PNG well over --max-image-bytes 400000
    assert len(big) > 400_000
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model=MODEL, messages=messages(data_url(big)), max_tokens=2)
    assert e.value.status_code == 413 and e.value.body["code"] == "image_too_large"
    status, body = declared_but_not_sent(server, 2_000_000)
    assert status == 413 and body["error"]["code"] == "request_too_large"

    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong-key").chat.completions.create(model=MODEL, messages=messages(good), max_tokens=2)
    status, body = call(server, "POST", "/v1/chat/completions", {"model": MODEL, "messages": messages(good)}, key=None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert call(server, "GET", "/v1/models", key=None)[0] == 401
    assert call(server, "GET", "/health", key=None)[0] == 200            # probes need no key

    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=messages(good), max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    status, body = call(server, "GET", "/v1/chat/completions")
    assert status == 405 and body["error"]["code"] == "method_not_allowed"
    status, body = call(server, "POST", "/v1/completions", {"model": MODEL, "prompt": "x"})
    assert status == 404 and body["error"]["code"] == "not_found"
    status, body = call(server, "POST", "/v1/chat/completions", raw=b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]


def test_serve_openai_refuses_bad_flags_in_one_line(vila_art, tmp_path):
    """Before anything loads or listens: one `error:` line, exit 2. (The port is held here, so a
    case that slipped through would be refused too rather than serve inside the test.)"""
    import socket

    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    port = str(held.getsockname()[1])
    cases = [
        ((vila_art / "ps3",), "is not a VILA-HD artifact"),          # its PS3 part: a PS3 artifact
        ((tmp_path / "missing",), "artifact directory not found"),
        ((vila_art, "--precision", "fp16"), "served in fp32"),
        ((vila_art, "--llm-precision", "int8"), "unknown --llm-precision 'int8'"),
        ((vila_art, "--num-look-close", "0"), "NUM_LOOK_CLOSE"),
        ((vila_art, "--served-model-name", " "), "--served-model-name is empty"),
        ((vila_art,), f"--port {port} on 127.0.0.1 is not free"),
    ]
    for args, message in cases:
        result = cli("serve-openai", *args, "--port", port)
        assert result.returncode == 2 and "Traceback" not in result.stderr, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], (args, lines)
    empty_key = cli("serve-openai", vila_art, "--port", port, env=clean_env(PS3EDGE_API_KEY=" "))
    assert empty_key.returncode == 2 and "is empty" in empty_key.stderr
    held.close()


# --- servers of their own (slow) ---------------------------------------------------------------------

def concurrently(calls) -> list:
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        futures = [pool.submit(c) for c in calls]
        return [f.result(timeout=REQUEST_TIMEOUT_S) for f in futures]


def outcome(fn):
    """The call's result, or the exception it raised (for requests that may be refused)."""
    try:
        return fn()
    except openai.APIError as e:
        return e


@pytest.mark.slow
def test_concurrent_requests_share_vision_batches_and_keep_their_own_answers(vila_art, tmp_path):
    """4 clients at once, each its own image, question, length and seed (two streaming): each
    answer and usage is VilaPipeline.answer's for its own request; the vision side ran a batch > 1."""
    imgs = [png_bytes(seed=60 + i, width=280 + 24 * i) for i in range(4)]
    questions = [f"Question {i}: what is shown?" + " more" * i for i in range(4)]
    sampling = [dict(max_new_tokens=5 + 2 * i, temperature=0.8, top_p=0.95, seed=10 + i) for i in range(4)]
    with openai_server(vila_art, "--num-look-close", "1", "--batch-delay-ms", "1500", "--max-batch", "4",
                       log_dir=tmp_path) as srv:
        client = srv.client()

        def ask(i):
            kwargs = dict(model=MODEL, messages=messages(data_url(imgs[i]), questions[i]),
                          max_tokens=sampling[i]["max_new_tokens"], temperature=0.8, top_p=0.95, seed=10 + i)
            if i % 2:
                chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True},
                                                             **kwargs))
                return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[-1].usage
            reply = client.chat.completions.create(**kwargs)
            return reply.choices[0].message.content, reply.usage

        answers = concurrently([lambda i=i: ask(i) for i in range(4)])
        with urllib.request.urlopen(srv.base + "/metrics", timeout=30) as reply:
            metrics = reply.read().decode()
    count = float(next(line.split()[-1] for line in metrics.splitlines()
                       if line.startswith("ps3edge_openai_vision_batch_size_count")))
    total = float(next(line.split()[-1] for line in metrics.splitlines()
                       if line.startswith("ps3edge_openai_vision_batch_size_sum")))
    assert total == 4 and count < 4, metrics                  # fewer batches than requests: some shared one
    for i, (text, use) in enumerate(answers):
        expected = reference(vila_art, imgs[i], questions[i], **sampling[i])
        assert text == expected.text, i
        assert (use.prompt_tokens, use.completion_tokens) == (expected.tokens["prompt"], expected.tokens["generated"])
    assert len({a[1].prompt_tokens for a in answers}) > 1      # the requests differ, so nothing was mixed up


@pytest.mark.slow
def test_a_full_queue_is_refused_with_429_and_remote_images_are_fetched_when_allowed(vila_art, tmp_path):
    """--max-queue 1: of 4 requests at once the ones that find it taken get 429 at once, the rest
    are answered. --allow-remote-images: an http image (a loopback server) answers as its data:
    URL does; a missing one is 400, one over --max-image-bytes 413."""
    image = png_bytes(seed=8)
    files = {"/cat.png": image, "/big.png": png_bytes(seed=9, width=900, height=700)}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = files.get(self.path)
            self.send_response(200 if body else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    images = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=images.serve_forever, daemon=True).start()
    remote = f"http://127.0.0.1:{images.server_address[1]}"
    try:
        with openai_server(vila_art, "--num-look-close", "1", "--max-queue", "1", "--batch-delay-ms", "0",
                           "--allow-remote-images", "--max-image-bytes", "600000", log_dir=tmp_path) as srv:
            client = srv.client()

            def ask(url, tokens=16):
                return client.chat.completions.create(model=MODEL, messages=messages(url), max_tokens=tokens,
                                                      temperature=0)

            results = concurrently([lambda: outcome(lambda: ask(data_url(image))) for _ in range(4)])
            fetched = ask(remote + "/cat.png", 6)
            inline = ask(data_url(image), 6)
            with pytest.raises(openai.BadRequestError) as missing:
                ask(remote + "/nope.png")
            with pytest.raises(openai.APIStatusError) as big:
                ask(remote + "/big.png")
    finally:
        images.shutdown()
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    answered = [r for r in results if not isinstance(r, Exception)]
    assert refused and answered and len(refused) + len(answered) == 4, results
    assert all(r.body["code"] == "queue_full" for r in refused)
    assert len({a.choices[0].message.content for a in answered}) == 1
    assert fetched.choices[0].message.content == inline.choices[0].message.content
    assert fetched.usage.prompt_tokens == inline.usage.prompt_tokens
    assert "404" in missing.value.body["message"]
    assert big.value.status_code == 413


@pytest.mark.slow
def test_sigterm_drains_the_requests_in_flight(vila_art, tmp_path):
    """SIGTERM while three streams run: /health and new requests answer 503, every stream in flight
    finishes whole, then the server exits 0."""
    image = data_url(png_bytes(seed=21))
    with openai_server(vila_art, "--num-look-close", "1", "--exit-timeout-s", "120", log_dir=tmp_path) as srv:
        client = srv.client()
        started = []                                            # one entry per stream admitted

        def stream():
            text, last = "", None
            for c in client.chat.completions.create(model=MODEL, messages=messages(image), max_tokens=24,
                                                    temperature=0, stream=True):
                if not text and last is None and c.choices and c.choices[0].delta.role:
                    started.append(1)
                if c.choices:
                    text += c.choices[0].delta.content or ""
                    last = c.choices[0].finish_reason or last
            return text, last

        with ThreadPoolExecutor(max_workers=3) as pool:
            futures = [pool.submit(stream) for _ in range(3)]
            deadline = time.monotonic() + REQUEST_TIMEOUT_S
            while len(started) < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(started) == 3
            srv.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 30
            health = None
            while time.monotonic() < deadline and health != 503:
                try:
                    health = call(srv, "GET", "/health", key=None)[0]
                except OSError:
                    break                                       # already stopped: the drain was quicker
                time.sleep(0.05)
            late = outcome(lambda: client.chat.completions.create(model=MODEL, messages=messages(image),
                                                                  max_tokens=2))
            results = [f.result(timeout=REQUEST_TIMEOUT_S) for f in futures]
        code = srv.process.wait(timeout=STOP_TIMEOUT_S)
    assert code == 0, srv.output()[-3000:]
    assert health == 503
    assert isinstance(late, (openai.APIStatusError, openai.APIConnectionError)), late
    assert not isinstance(late, openai.APIStatusError) or late.status_code == 503
    assert len({r[0] for r in results}) == 1 and all(r[1] == "length" for r in results), results
    assert "SIGTERM: draining" in srv.output() and "stopped" in srv.output()
