"""Load test for a running `ps3edge serve`: a concurrency sweep against the `ps3` model, loopback only.

    ps3edge serve ARTIFACTS --num-look-close 1 &            # wait for its "ready:" line
    python benchmarks/serve_load.py ARTIFACTS --clients 1,2,4,8,16 --requests 32

For each concurrency N, N clients send --requests requests in all (different images, round robin)
and the script reports images/s, p50 / p90 / p99 latency, errors, the batch sizes Triton formed
(from its statistics, the difference over the round) and lost responses: every answer is checked
against a standalone `Pipeline.run` of the same image and settings, and one that is missing, holds
an error, or does not match its own image counts as lost. The baseline row is sequential
`Pipeline.run` calls in this process (what sequential `ps3edge run`s cost without their start-up).
Every round is bounded by --requests and --round-timeout-s.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
from PIL import Image

LOOPBACK = "127.0.0.1"


def images(count: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (240 + 8 * i, 320, 3), dtype=np.uint8)).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def references(artifact: Path, encoded: list[bytes], num_look_close: str) -> tuple[list, float]:
    """Pipeline.run on every image: the expected answers and the sequential images/s."""
    from ps3edge.runtime.lookclose import Pipeline
    from ps3edge.runtime.planning import settings_from_env
    from ps3edge.runtime.preprocess import open_image

    pipeline = Pipeline(artifact)
    settings = settings_from_env(env={}, num_look_close=num_look_close)
    start = time.perf_counter()
    results = [pipeline.run(open_image(io.BytesIO(b)), settings) for b in encoded]
    return results, len(encoded) / (time.perf_counter() - start)


def one_request(url: str, image: bytes, num_look_close: str):
    import tritonclient.http as th

    client = th.InferenceServerClient(url, network_timeout=600, connection_timeout=600)
    inp = th.InferInput("image", [1, 1], "BYTES")
    inp.set_data_from_numpy(np.array([[image]], dtype=object))
    start = time.perf_counter()
    try:
        result = client.infer("ps3", [inp], parameters={"num_look_close": int(num_look_close)})
        return time.perf_counter() - start, result.as_numpy("features"), result.as_numpy("error")[0, 0].decode()
    except Exception as e:               # Triton's refusal (queue full, timeout): an error of the round
        return time.perf_counter() - start, None, str(e)
    finally:
        client.close()


def batch_counts(url: str) -> dict[int, int]:
    import tritonclient.http as th

    client = th.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics("ps3")["model_stats"][0].get("batch_stats", [])
    finally:
        client.close()
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats}


def round_of(url: str, clients: int, encoded: list[bytes], expected: list, requests: int, num_look_close: str,
             timeout_s: float) -> dict:
    before = batch_counts(url)
    jobs = [i % len(encoded) for i in range(requests)]
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        futures = [pool.submit(one_request, url, encoded[j], num_look_close) for j in jobs]
        done, pending = wait(futures, timeout=timeout_s)
    wall = time.perf_counter() - start
    latencies, errors, lost = [], 0, len(pending)
    for job, future in zip(jobs, futures):
        if future not in done:
            continue
        latency, features, error = future.result()
        if error:
            errors += 1
            lost += 1
        elif features is None or features.shape != expected[job].features.shape \
                or float(np.abs(features - expected[job].features).max()) > 1e-5:
            lost += 1
        else:
            latencies.append(latency)
    after = batch_counts(url)
    formed = {size: after.get(size, 0) - before.get(size, 0) for size in after if after.get(size, 0) > before.get(size, 0)}
    ms = np.percentile(latencies, [50, 90, 99]) * 1e3 if latencies else [float("nan")] * 3
    return {"clients": clients, "requests": requests, "images_per_s": len(latencies) / wall,
            "p50_ms": float(ms[0]), "p90_ms": float(ms[1]), "p99_ms": float(ms[2]), "errors": errors, "lost": lost,
            "batches": dict(sorted(formed.items()))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", type=Path, help="the artifact the server serves (for the reference answers)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--clients", default="1,2,4,8,16", help="comma-separated concurrency sweep")
    parser.add_argument("--requests", type=int, default=32, help="requests per round (at most 512)")
    parser.add_argument("--images", type=int, default=8, help="different images, sent round robin")
    parser.add_argument("--num-look-close", default="1")
    parser.add_argument("--round-timeout-s", type=float, default=900)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    if not 1 <= args.requests <= 512:
        parser.error("--requests must be between 1 and 512")
    url = f"{LOOPBACK}:{args.http_port}"
    encoded = images(args.images)
    expected, sequential = references(args.artifacts, encoded, args.num_look_close)
    rows = [{"clients": "sequential Pipeline.run", "images_per_s": sequential}]
    print(f"{'clients':>8} {'img/s':>7} {'x seq':>6} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'errors':>6} "
          f"{'lost':>4}  batches (size: count)")
    print(f"{'seq':>8} {sequential:7.2f} {1.0:6.2f}")
    for clients in (int(c) for c in args.clients.split(",")):
        row = round_of(url, clients, encoded, expected, args.requests, args.num_look_close, args.round_timeout_s)
        rows.append(row)
        print(f"{clients:>8} {row['images_per_s']:7.2f} {row['images_per_s'] / sequential:6.2f} {row['p50_ms']:8.0f} "
              f"{row['p90_ms']:8.0f} {row['p99_ms']:8.0f} {row['errors']:>6} {row['lost']:>4}  {row['batches']}",
              flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 1 if any(row.get("lost") for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
