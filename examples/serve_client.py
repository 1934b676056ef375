"""A client for `ps3edge serve`: PS3 features over HTTP, and a VILA-HD answer streamed over gRPC.

    python examples/serve_client.py examples/sample.png                    # ps3 over HTTP
    python examples/serve_client.py examples/sample.png --ask "What is shown?"   # vila-hd-stream over gRPC
"""

from __future__ import annotations

import argparse
import queue
import sys

import numpy as np


def features(image: bytes, url: str, num_look_close: int | None) -> None:
    import tritonclient.http as th

    client = th.InferenceServerClient(url, network_timeout=600)
    inp = th.InferInput("image", [1, 1], "BYTES")
    inp.set_data_from_numpy(np.array([[image]], dtype=object))
    params = {"num_look_close": num_look_close} if num_look_close else None
    result = client.infer("ps3", [inp], parameters=params)
    error = result.as_numpy("error")[0, 0].decode()
    if error:                                  # this request's own problem; the server kept serving
        sys.exit(f"error: {error}")
    print("features", result.as_numpy("features").shape, "prob", result.as_numpy("prob").shape)


def ask(image: bytes, question: str, url: str, max_tokens: int) -> None:
    import tritonclient.grpc as tg

    client = tg.InferenceServerClient(url)
    inputs = [tg.InferInput("text", [1, 1], "BYTES"), tg.InferInput("image", [1, 1], "BYTES")]
    inputs[0].set_data_from_numpy(np.array([[question.encode()]], dtype=object))
    inputs[1].set_data_from_numpy(np.array([[image]], dtype=object))
    pieces: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: pieces.put((result, error)))
    client.async_stream_infer("vila-hd-stream", inputs, parameters={"max_tokens": max_tokens},
                              enable_empty_final_response=True)
    for _ in range(max_tokens + 2):            # one response per piece, then the final one
        result, error = pieces.get(timeout=600)
        if error is not None:
            sys.exit(f"error: {error}")
        if result.as_numpy("error") is not None and result.as_numpy("error")[0, 0]:
            sys.exit(f"error: {result.as_numpy('error')[0, 0].decode()}")
        if result.as_numpy("answer") is not None:
            print(result.as_numpy("answer")[0, 0].decode(), end="", flush=True)
        if result.get_response().parameters["triton_final_response"].bool_param:
            break
    print()
    client.stop_stream()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image")
    parser.add_argument("--ask", help="a question for vila-hd-stream (a VILA-HD artifact's server)")
    parser.add_argument("--http", default="127.0.0.1:8000")
    parser.add_argument("--grpc", default="127.0.0.1:8001")
    parser.add_argument("--num-look-close", type=int)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    with open(args.image, "rb") as f:
        image = f.read()
    if args.ask:
        ask(image, args.ask, args.grpc, args.max_tokens)
    else:
        features(image, args.http, args.num_look_close)


if __name__ == "__main__":
    main()
