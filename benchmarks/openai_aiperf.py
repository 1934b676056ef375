"""Load benchmark of `ps3edge serve-openai` with NVIDIA AIPerf: a concurrency sweep of streamed chat
requests with synthetic images against VILA-HD, loopback only.

AIPerf (`pip install aiperf==0.13.*`) is large and pins its own transformers, so it lives in a
virtual environment of its own and this script runs its `aiperf` command; ps3edge's environment
runs this script and the server:

    python3 -m venv /work/venv-aiperf && /work/venv-aiperf/bin/pip install 'aiperf==0.13.*'
    python benchmarks/openai_aiperf.py --out benchmarks/measured/cpu-2core-2026-12-08
    python benchmarks/openai_aiperf.py --artifact art/ --aiperf ~/aiperf-env/bin/aiperf \
        --concurrency 1,4 --requests-per-client 4 --max-batch 4

The script exports vila-hd-tiny into a temporary folder (or uses --artifact, exporting into it when
it holds no vila.json), starts `ps3edge serve-openai ART --address 127.0.0.1 --port P` (a free
loopback port) and waits for GET /health, sends one streamed request of its own (its SSE events are
kept in the JSON as a sample of what the server answers), then for each concurrency N runs

    aiperf profile --endpoint-type chat --streaming --url http://127.0.0.1:P --model NAME
        --tokenizer ART/tokenizer --concurrency N --request-count N * --requests-per-client
        --image-width-mean W --image-height-mean H --image-format jpeg --isl I --osl O ...

(seeded synthetic noise images as base64 data: URLs, synthetic text prompts, max_completion_tokens
= O, and temperature / seed from --temperature / --seed) and reads its summary,
profile_export_aiperf.json: requests, errors (with AIPerf's error summary), time to first token
and inter-token latency p50 / p99, request latency p50, output tokens/s and requests/s. Around
each run it reads the server's GET /metrics: the vision batches it formed (count, mean size) and
the mean vision-batch, generation and queue-wait times. While AIPerf runs, the server's RSS and
CPU and the load average are sampled every second; AIPerf's own CPU seconds (its processes share
the cores with the server) are measured too. At the end the server gets SIGTERM and must exit 0.

Why these request settings, for vila-hd-tiny's random weights:
- token counts are the server's (`usage` of the last streamed chunk, --use-server-token-count):
  the model emits arbitrary byte tokens, many decoding to U+FFFD, which the client-side tokenizer
  would count as three tokens each;
- temperature 1 (the server's default) with top_p 0.3: plain sampling draws <|im_end|> or
  <|endoftext|> as the very first token about once in 100 requests (each has p ~ 0.005 there, at
  rank ~55 of 260), an empty answer (finish_reason "stop", completion_tokens 0) that AIPerf counts
  as an error ("No responses with actual content"); top_p 0.3 keeps the ~20 likeliest tokens, so a
  first token is never a stop token (later ones can be: some answers end before --osl). The seed
  makes the answers repeatable with AIPerf's --random-seed 0 (the images and prompts). Greedy
  (temperature 0) is no way out: it repeats one byte that never completes a UTF-8 character, so
  the server holds the text back to the end and the answer is one chunk (TTFT = latency, no ITL).

Every AIPerf run is bounded by --level-timeout-s and every request by --request-timeout-s.
Writes openai_aiperf.json and openai_aiperf.md into --out; exits 1 when any request failed or the
server did not stop cleanly. A benchmark, not a test: not part of CI.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import numpy as np

LOOPBACK = "127.0.0.1"
DEFAULT_AIPERF = "/work/venv-aiperf/bin/aiperf"


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def proc_sample(pid: int) -> tuple[int, float] | None:
    """VmRSS (KiB) and user + system CPU seconds (all threads) of a process."""
    try:
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, StopIteration):
        return None
    return rss, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Sampler(threading.Thread):
    """The server's RSS and CPU seconds and the 1-minute load average, once a second."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.samples, self.halt = pid, [], threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            s = proc_sample(self.pid)
            if s is not None:
                self.samples.append({"time": time.time(), "rss_kib": s[0], "cpu_s": s[1], "load1": os.getloadavg()[0]})
            self.halt.wait(1.0)

    def stop(self) -> list[dict]:
        self.halt.set()
        self.join()
        return self.samples


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    mem_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal:"))
    return {"arch": platform.machine(), "cpu": model, "cores": os.cpu_count(), "memory_gib": round(mem_kib / 2**20, 1),
            "gpu": None, "python": platform.python_version(), "kernel": platform.release()}


def ensure_artifact(artifact: Path) -> None:
    """Export vila-hd-tiny (seed 0) into `artifact` unless it already holds a VILA-HD artifact."""
    if (artifact / "vila.json").is_file():
        return
    from ps3edge.llm.export import export_vila

    print(f"exporting vila-hd-tiny into {artifact}", flush=True)
    export_vila("vila-hd-tiny", artifact)


def get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_healthy(base: str, server: subprocess.Popen, deadline_s: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < deadline_s:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited {server.returncode} before it was healthy")
        try:
            if get(base + "/health", timeout=2.0)[0] == 200:
                return time.monotonic() - start
        except OSError:
            pass                                  # not listening yet
        time.sleep(0.5)
    raise RuntimeError(f"the server was not healthy within {deadline_s:g} s")


def probe(base: str, model: str, width: int, height: int, max_tokens: int) -> dict:
    """One streamed chat request of our own, shaped like AIPerf's: the status, the content type and
    the first and last SSE events (a record of the wire format AIPerf parsed)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, "JPEG")
    body = {"model": model, "stream": True, "max_completion_tokens": max_tokens, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "What is in this image?"},
                {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()}}]}]}
    request = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
    start = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=300) as r:
            status, ctype, raw = r.status, r.headers.get("Content-Type"), r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return {"status": e.code, "body": e.read().decode("utf-8", "replace")[:2000]}
    events = [block for block in raw.split("\n\n") if block.strip()]
    return {"status": status, "content_type": ctype, "seconds": round(time.monotonic() - start, 3),
            "events": len(events), "first_events": events[:2], "last_events": events[-3:]}


def scrape(base: str) -> dict[str, float]:
    """The server's unlabelled Prometheus samples (GET /metrics), e.g. the histograms' _sum and
    _count; {} where it has none."""
    try:
        status, body = get(base + "/metrics")
    except OSError:
        return {}
    if status != 200:
        return {}
    out = {}
    for line in body.decode("utf-8", "replace").splitlines():
        parts = line.split()
        if len(parts) == 2 and not line.startswith("#") and "{" not in parts[0]:
            try:
                out[parts[0]] = float(parts[1])
            except ValueError:
                pass
    return out


HISTOGRAMS = {"vision_batch_size": "ps3edge_openai_vision_batch_size",
              "vision_batch_s": "ps3edge_openai_vision_batch_seconds",
              "generation_s": "ps3edge_openai_generation_seconds",
              "queue_wait_s": "ps3edge_openai_queue_wait_seconds"}


def server_side(before: dict, after: dict) -> dict:
    """Over one level, from the server's own histograms: how many vision batches it formed and
    their mean size, and the mean vision batch, generation and queue-wait times."""
    out = {}
    for key, name in HISTOGRAMS.items():
        count = after.get(name + "_count", 0.0) - before.get(name + "_count", 0.0)
        total = after.get(name + "_sum", 0.0) - before.get(name + "_sum", 0.0)
        if name + "_count" in after:
            out[key + "_count"] = int(count)
            out[key + "_mean"] = round(total / count, 4) if count else None
    return out


def window(samples: list[dict], t0: float, t1: float) -> dict:
    """The mean load average and the server's CPU (cores) between t0 and t1."""
    inside = [s for s in samples if t0 - 1.0 <= s["time"] <= t1 + 1.0]
    cores = None
    if len(inside) > 1 and inside[-1]["time"] > inside[0]["time"]:
        cores = round((inside[-1]["cpu_s"] - inside[0]["cpu_s"]) / (inside[-1]["time"] - inside[0]["time"]), 2)
    return {"load1_mean_during": round(float(np.mean([s["load1"] for s in inside])), 2) if inside else None,
            "server_cpu_cores": cores}


def stat(summary: dict, name: str, key: str) -> float | None:
    value = summary.get(name)
    return None if not isinstance(value, dict) or value.get(key) is None else float(value[key])


def run_level(args, aiperf: str, base: str, model: str, tokenizer: Path, concurrency: int, work: Path,
              server_pid: int, first: bool) -> dict:
    out = work / f"c{concurrency}"
    requests = concurrency * args.requests_per_client
    command = [aiperf, "profile", "--endpoint-type", "chat", "--streaming", "--url", base, "--model", model,
               "--tokenizer", str(tokenizer), "--use-server-token-count",
               "--concurrency", str(concurrency), "--request-count", str(requests),
               "--image-width-mean", str(args.image_width), "--image-height-mean", str(args.image_height),
               "--image-format", "jpeg", "--isl", str(args.isl), "--osl", str(args.osl),
               "--extra-inputs", json.dumps({"temperature": args.temperature, "top_p": args.top_p, "seed": args.seed}),
               "--request-timeout-seconds", str(args.request_timeout_s), "--random-seed", "0",
               "--artifact-dir", str(out), "--ui-type", "none", "--no-server-metrics", "--no-gpu-telemetry"]
    if first and args.warmup:                     # the first requests of a fresh server: not in the results
        command += ["--warmup-request-count", str(args.warmup)]
    # The tokenizer is a local folder, which AIPerf loads without the network; HF_HUB_OFFLINE=1 would
    # break it (AIPerf 0.13 then resolves every name through the hub cache, a path included).
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    load_before = os.getloadavg()
    metrics_before = scrape(base)
    sampler = Sampler(server_pid)
    sampler.start()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "aiperf_stdout.txt", "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=work, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=args.level_timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)   # AIPerf's own process group (its services): ours to end
            proc.wait(timeout=30)
            rc = None
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    samples = sampler.stop()
    metrics_after = scrape(base)
    row = {"concurrency": concurrency, "requests_asked": requests, "aiperf_exit_code": rc, "timed_out": rc is None,
           "wall_s": round(wall, 1), "command": command,
           "aiperf_cpu_s": round((after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime), 1),
           "load1_before": round(load_before[0], 2),
           "server_rss_peak_mib": round(max(s["rss_kib"] for s in samples) / 1024, 1) if samples else None,
           "server_metrics": server_side(metrics_before, metrics_after)}
    export = out / "profile_export_aiperf.json"
    if not export.is_file():
        row["missing_export"] = True
        row["aiperf_log_tail"] = (out / "aiperf_stdout.txt").read_text(errors="replace")[-3000:]
        row.update(window(samples, samples[0]["time"] if samples else 0.0, time.time()))
        return row
    s = json.loads(export.read_text())
    if s.get("benchmark_id"):                     # AIPerf 0.13 leaves its (emptied) dataset folder behind
        shutil.rmtree(Path(tempfile.gettempdir()) / f"aiperf_mmap_{s['benchmark_id']}", ignore_errors=True)
    try:                                          # AIPerf's profiling phase (local times): not its start-up
        t0, t1 = (datetime.fromisoformat(s[k]).timestamp() for k in ("start_time", "end_time"))
    except (KeyError, TypeError, ValueError):
        t0, t1 = samples[0]["time"] if samples else 0.0, time.time()
    row.update(window(samples, t0, t1))
    row.update({
        "aiperf_version": s.get("aiperf_version"),
        "requests": int(stat(s, "completed_request_count", "avg") or 0),
        "ok": int(stat(s, "request_count", "avg") or 0),
        "errors": int(stat(s, "error_request_count", "avg") or 0),
        "error_summary": s.get("error_summary", []),
        "was_cancelled": s.get("was_cancelled"),
        "ttft_p50_ms": stat(s, "time_to_first_token", "p50"), "ttft_p99_ms": stat(s, "time_to_first_token", "p99"),
        "itl_p50_ms": stat(s, "inter_token_latency", "p50"), "itl_p99_ms": stat(s, "inter_token_latency", "p99"),
        "latency_p50_ms": stat(s, "request_latency", "p50"), "latency_p99_ms": stat(s, "request_latency", "p99"),
        "output_tokens_per_s": stat(s, "output_token_throughput", "avg"),
        "requests_per_s": stat(s, "request_throughput", "avg"),
        "output_tokens_mean": stat(s, "output_sequence_length", "avg"),
        "input_tokens_mean": stat(s, "input_sequence_length", "avg"),
        "benchmark_duration_s": stat(s, "benchmark_duration", "avg"),
        "cli_command": (s.get("run_info") or {}).get("cli_command")})
    return row


def stop_server(server: subprocess.Popen, timeout_s: float = 60.0) -> dict:
    start = time.monotonic()
    server.send_signal(signal.SIGTERM)
    try:
        rc = server.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait(timeout=30)
        return {"exit_code": None, "stopped_by": "SIGKILL after SIGTERM went unanswered", "seconds": timeout_s}
    return {"exit_code": rc, "stopped_by": "SIGTERM", "seconds": round(time.monotonic() - start, 2)}


def fmt(value, digits=0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(result: dict) -> str:
    m, meta = result["machine"], result["meta"]
    lines = [f"`ps3edge serve-openai` with vila-hd-tiny (onnxruntime fp32, CPU) under AIPerf {meta['aiperf_version']}: "
             f"streamed chat requests, one synthetic {meta['image_width']} x {meta['image_height']} JPEG (noise) and "
             f"a synthetic {meta['isl']}-token prompt each, max_completion_tokens {meta['osl']}, temperature "
             f"{meta['temperature']:g}, top_p {meta['top_p']:g}, seed {meta['seed']}, "
             f"{meta['requests_per_client']} requests per concurrent client; token counts are the server's. "
             f"{m['arch']}, {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, no GPU, shared with others' work: "
             f"load average {result['load1_before_sweep']:.1f} before the sweep. Server flags: "
             f"`{' '.join(meta['server_flags']) or '(defaults)'}`.", "",
             "| concurrency | requests | errors | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | "
             "latency p50 ms | output tokens/s | requests/s | vision batch mean | load before / during | "
             "server CPU (cores) | AIPerf CPU s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["levels"]:
        lines.append(f"| {r['concurrency']} | {r.get('requests', '-')} | {r.get('errors', '-')} | {fmt(r.get('ttft_p50_ms'))} | "
                     f"{fmt(r.get('ttft_p99_ms'))} | {fmt(r.get('itl_p50_ms'), 1)} | {fmt(r.get('itl_p99_ms'), 1)} | "
                     f"{fmt(r.get('latency_p50_ms'))} | {fmt(r.get('output_tokens_per_s'), 1)} | "
                     f"{fmt(r.get('requests_per_s'), 2)} | {fmt(r['server_metrics'].get('vision_batch_size_mean'), 2)} | "
                     f"{fmt(r['load1_before'], 1)} / {fmt(r['load1_mean_during'], 1)} | "
                     f"{fmt(r['server_cpu_cores'], 2)} | {fmt(r['aiperf_cpu_s'])} |")
    stop = result["server_stop"]
    for r in result["levels"]:
        for e in r.get("error_summary") or []:
            d = e.get("error_details", {})
            lines += ["", f"Concurrency {r['concurrency']}: {e.get('count')} x {d.get('code')} {d.get('type')}: "
                          f"{str(d.get('message'))[:300]}"]
        if r.get("missing_export") or r.get("timed_out"):
            lines += ["", f"Concurrency {r['concurrency']}: AIPerf {'timed out' if r.get('timed_out') else 'wrote no summary'} "
                          f"(exit code {r['aiperf_exit_code']})."]
    lines += ["", f"Server: ready {result['server_ready_s']:.1f} s after start, peak RSS "
              f"{max((r['server_rss_peak_mib'] or 0) for r in result['levels']):.0f} MiB; "
              f"SIGTERM at the end: exit code {stop['exit_code']} after {stop['seconds']} s. "
              f"All requests answered without error: {'yes' if result['all_ok'] else 'NO'}.", ""]
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("--artifact", type=Path, help="a VILA-HD artifact (exported into when it holds no vila.json; "
                    "default: vila-hd-tiny exported into a temporary folder)")
    ap.add_argument("--aiperf", default=DEFAULT_AIPERF if Path(DEFAULT_AIPERF).exists() else shutil.which("aiperf"),
                    help=f"the aiperf command (default {DEFAULT_AIPERF}, else aiperf on PATH)")
    ap.add_argument("--concurrency", default="1,2,4,8", help="comma-separated concurrency levels")
    ap.add_argument("--requests-per-client", type=int, default=8, help="requests per level = this x concurrency")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up requests before the first level (not counted)")
    ap.add_argument("--image-width", type=int, default=512)
    ap.add_argument("--image-height", type=int, default=512)
    ap.add_argument("--isl", type=int, default=32, help="synthetic prompt tokens")
    ap.add_argument("--osl", type=int, default=32, help="max_completion_tokens")
    ap.add_argument("--temperature", type=float, default=1.0, help="sent with every request (the server's default)")
    ap.add_argument("--top-p", type=float, default=0.3, help="sent with every request (see above why)")
    ap.add_argument("--seed", type=int, default=0, help="sent with every request")
    ap.add_argument("--served-model-name", default="vila-hd-tiny")
    ap.add_argument("--max-batch", type=int, help="server flag (default: the server's)")
    ap.add_argument("--batch-delay-ms", type=int, help="server flag (default: the server's)")
    ap.add_argument("--max-queue", type=int, help="server flag (default: the server's)")
    ap.add_argument("--server-flag", action="append", default=[], metavar="FLAG",
                    help="one more argument for serve-openai, e.g. --server-flag=--num-look-close --server-flag=1")
    ap.add_argument("--request-timeout-s", type=float, default=600.0)
    ap.add_argument("--level-timeout-s", type=float, default=1800.0, help="bound on one AIPerf run")
    ap.add_argument("--ready-timeout-s", type=float, default=300.0)
    ap.add_argument("--keep-aiperf", type=Path, help="copy AIPerf's output folders here")
    ap.add_argument("--out", type=Path, help="folder for openai_aiperf.json and openai_aiperf.md")
    args = ap.parse_args()
    if not args.aiperf or not Path(args.aiperf).exists() and not shutil.which(args.aiperf):
        print("error: no aiperf command: install it into a venv of its own and pass --aiperf PATH", file=sys.stderr)
        return 2
    levels = [int(c) for c in args.concurrency.split(",")]

    with tempfile.TemporaryDirectory(prefix="openai-aiperf-") as tmp:
        work = Path(tmp)
        artifact = args.artifact or work / "art"
        ensure_artifact(artifact)
        flags = []
        for name in ("max_batch", "batch_delay_ms", "max_queue"):
            if getattr(args, name) is not None:
                flags += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        flags += args.server_flag
        port = free_tcp_port()
        base = f"http://{LOOPBACK}:{port}"
        command = [sys.executable, "-m", "ps3edge.cli", "serve-openai", str(artifact), "--address", LOOPBACK,
                   "--port", str(port), "--served-model-name", args.served_model_name, *flags]
        server_log = open(work / "server.log", "w")
        server = subprocess.Popen(command, stdout=server_log, stderr=subprocess.STDOUT)
        levels_out, stop, failed = [], None, None
        try:
            try:
                ready_s = wait_healthy(base, server, args.ready_timeout_s)
            except RuntimeError as e:             # its log (below) says why
                failed = str(e)
                return 1
            models = json.loads(get(base + "/v1/models")[1])
            sample = probe(base, args.served_model_name, args.image_width, args.image_height, args.osl)
            print(f"server ready in {ready_s:.1f} s; probe: {sample['status']}", flush=True)
            load_sweep = os.getloadavg()[0]
            for k, c in enumerate(levels):
                row = run_level(args, args.aiperf, base, args.served_model_name, artifact / "tokenizer", c, work,
                                server.pid, first=k == 0)
                levels_out.append(row)
                print(f"c={c}: {row.get('requests')} requests, {row.get('errors')} errors, TTFT p50 "
                      f"{fmt(row.get('ttft_p50_ms'))} ms, {fmt(row.get('requests_per_s'), 2)} req/s, {row['wall_s']} s",
                      flush=True)
                if server.poll() is not None:
                    break
            if args.keep_aiperf:
                shutil.copytree(work, args.keep_aiperf, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("art", "*.onnx", "*.npy"))
        finally:
            stop = stop_server(server) if server.poll() is None else {"exit_code": server.returncode,
                                                                     "stopped_by": "exited on its own", "seconds": 0}
            server_log.close()
            server_tail = (work / "server.log").read_text(errors="replace")[-4000:]
            if failed:
                print(f"error: {failed}; its log ends:\n{server_tail}", file=sys.stderr)

    version = next((r["aiperf_version"] for r in levels_out if r.get("aiperf_version")), None)
    all_ok = all(r.get("errors") == 0 and r.get("requests") == r["requests_asked"] and r["aiperf_exit_code"] == 0
                 for r in levels_out) and len(levels_out) == len(levels)
    result = {"meta": {"aiperf": args.aiperf, "aiperf_version": version, "server_command": ["python", *command[1:]],
                       "server_flags": flags, "served_model_name": args.served_model_name, "models": models,
                       "image_width": args.image_width, "image_height": args.image_height, "isl": args.isl,
                       "osl": args.osl, "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed,
                       "requests_per_client": args.requests_per_client, "warmup": args.warmup,
                       "date": time.strftime("%Y-%m-%d %H:%M:%S %z")},
              "machine": machine(), "load1_before_sweep": load_sweep, "server_ready_s": ready_s, "probe": sample,
              "levels": levels_out, "server_stop": stop, "server_log_tail": server_tail,
              "all_ok": all_ok and stop["exit_code"] == 0}
    text = markdown(result)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_atomic(args.out / "openai_aiperf.json", json.dumps(result, indent=1) + "\n")
        write_atomic(args.out / "openai_aiperf.md", text)
    return 0 if result["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
