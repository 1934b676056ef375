"""A long `ps3edge stream` run on real network streams: N UDP MPEG-TS cameras over loopback for
minutes, and whether the stream stays steady - latency, memory, frame order - from its first
minute to its last.

Each camera is a sender in a process of its own: moving synthetic content (a seeded textured
background and objects moving across it, 640 x 480 by default) encoded as MPEG-2 in MPEG-TS and
sent to `udp://127.0.0.1:PORT`, paced at `--fps`. The stream is the real command,

    ps3edge stream ART --source udp://... (xN) --num-look-close 1 --duration S --jsonl FILE --quiet

in a process of its own, whose resident memory (VmRSS of /proc/<pid>/status) is sampled every
second, with the load average. From the JSON lines and the samples: processed fps and dropped
frames per source, latency p50 / p99 in the first and the last minute (goal: the last p99 at
most 1.5x the first), peak RSS in the first and the last minute (goal: within 10 %), whether a
source's frames were ever processed out of order, and per minute the latency, the loop step's
time and the frames' wait in their mailboxes (latency that grows with the step is a slower
machine, with the wait a queue), RSS, the stream's CPU share and the load, to show any drift.
The minutes are counted from the first frame's arrival, so loading the model is not in the first
minute. Writes stream_long.json (with every frame's record and every sample) and stream_long.md.

    python benchmarks/stream_long.py --out benchmarks/measured/cpu-2core-2026-12-07
    python benchmarks/stream_long.py --artifact art/ --sources 2 --seconds 120
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

# A camera: `python -c SENDER URL WIDTH HEIGHT FPS SECONDS SEED`. Frame i is a seeded texture with
# three objects moving across it (every frame differs, as a real scene's would), sent in real time.
SENDER = """
import sys, time
import av, numpy as np
url, w, h, fps, seconds, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
rng = np.random.default_rng(seed)
coarse = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
background = np.repeat(np.repeat(coarse, 16, 0), 16, 1)[:h, :w].copy()
objects = [((60, 80), (5, 2), (255, 40, 40), 60), ((300, 200), (-4, 3), (40, 220, 40), 80),
           ((420, 100), (6, -1), (30, 30, 30), 50)]
out = av.open(url, "w", format="mpegts")
stream = out.add_stream("mpeg2video", rate=int(round(fps)))
stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
stream.bit_rate = 2_000_000
stream.codec_context.gop_size = 15
start = time.monotonic()
i = 0
while time.monotonic() - start < seconds:
    rgb = background.copy()
    for (x0, y0), (dx, dy), color, size in objects:
        x, y = (x0 + dx * i) % (w - size), (y0 + dy * i) % (h - size)
        rgb[y: y + size, x: x + size] = color
    for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
        out.mux(packet)
    i += 1
    time.sleep(max(0.0, start + i / fps - time.monotonic()))
out.close()
"""


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_s(pid: int) -> float | None:
    """The process's user + system CPU seconds so far (all its threads)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Sampler(threading.Thread):
    """VmRSS and CPU seconds of a process and the 1-minute load average, once a second, with the
    wall time."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.samples, self.halt = pid, [], threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            kib, cpu = rss_kib(self.pid), cpu_s(self.pid)
            if kib is not None and cpu is not None:
                self.samples.append({"time": time.time(), "rss_kib": kib, "cpu_s": cpu, "load1": os.getloadavg()[0]})
            self.halt.wait(1.0)


def pct(values, q) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def analyse(records: list[dict], samples: list[dict], names: list[str]) -> dict:
    t0 = min(r["arrival"] for r in records)                       # the first frame's arrival
    t_end = max(r["result_time"] for r in records)
    span = t_end - t0
    per_source = {}
    for name in names:
        recs = [r for r in records if r["source"] == name]
        frames = [r["frame"] for r in recs]
        given = (max(frames) + 1) if frames else 0                  # frame numbers count every frame it gave
        per_source[name] = {
            "processed": len(recs), "given": given, "dropped": given - len(recs),
            "processed_fps": len(recs) / span, "input_fps": given / span,
            "in_order": all(b > a for a, b in zip(frames, frames[1:])),
            "p50_ms": pct([r["latency_ms"] for r in recs], 50), "p99_ms": pct([r["latency_ms"] for r in recs], 99)}

    # A loop step's time: from the previous step's result to its own (the loop takes the waiting
    # frames at once, with every source at 15 fps there always are some); a frame's wait in its
    # mailbox is then its latency less its step's time. Latency that grows with the step time is
    # a slower machine; latency that grows with the wait would be a queue.
    step_done = {}
    for r in records:
        step_done[r["step"]] = r["result_time"]
    steps = sorted(step_done)
    step_ms = {b: (step_done[b] - step_done[a]) * 1000.0 for a, b in zip(steps, steps[1:])}
    batches = [sum(1 for r in records if r["step"] == s) for s in steps]

    def window(lo, hi):
        recs = [r for r in records if lo <= r["result_time"] < hi]
        lat = [r["latency_ms"] for r in recs]
        stepped = [r for r in recs if r["step"] in step_ms]
        wait = [r["latency_ms"] - step_ms[r["step"]] for r in stepped]
        took = [step_ms[s] for s in steps if s in step_ms and lo <= step_done[s] < hi]
        inside = [s for s in samples if lo <= s["time"] < hi]
        rss, load = [s["rss_kib"] for s in inside], [s["load1"] for s in inside]
        cores = ((inside[-1]["cpu_s"] - inside[0]["cpu_s"]) / (inside[-1]["time"] - inside[0]["time"])
                 if len(inside) > 1 else None)
        return {"from_s": lo - t0, "to_s": hi - t0, "frames": len(lat), "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99),
                "max_ms": max(lat) if lat else None, "step_p50_ms": pct(took, 50), "wait_p50_ms": pct(wait, 50),
                "rss_peak_mib": max(rss) / 1024 if rss else None,
                "rss_median_mib": float(np.median(rss)) / 1024 if rss else None,
                "cpu_cores": cores, "load1_mean": float(np.mean(load)) if load else None}

    first, last = window(t0, t0 + 60.0), window(t_end - 60.0, t_end + 1e-6)
    whole = max(1, int(span // 60.0))                                # the last minute row takes the few seconds over
    minutes = [window(t0 + 60.0 * k, t0 + 60.0 * (k + 1) if k < whole - 1 else t_end + 1e-6) for k in range(whole)]
    p99_ratio = last["p99_ms"] / first["p99_ms"]
    rss_ratio = last["rss_peak_mib"] / first["rss_peak_mib"]
    return {"span_s": span, "frames": len(records), "loop_steps": len(steps),
            "mean_batch": float(np.mean(batches)), "per_source": per_source, "first_minute": first,
            "last_minute": last, "minutes": minutes,
            "p99_last_over_first": p99_ratio, "p99_goal_met": p99_ratio <= 1.5,
            "rss_last_over_first": rss_ratio, "rss_goal_met": abs(rss_ratio - 1.0) <= 0.10,
            "all_in_order": all(s["in_order"] for s in per_source.values()),
            "rss_start_mib": samples[0]["rss_kib"] / 1024 if samples else None,
            "load1_start": samples[0]["load1"] if samples else None,
            "load1_mean": float(np.mean([s["load1"] for s in samples])) if samples else None}


def markdown(res: dict, meta: dict) -> str:
    f, l = res["first_minute"], res["last_minute"]
    lines = [f"{meta['sources']} UDP MPEG-TS senders over loopback ({meta['width']} x {meta['height']}, "
             f"{meta['fps']:g} fps, moving objects), `ps3edge stream` with ps3-tiny, onnxruntime fp32, "
             f"`--num-look-close {meta['num_look_close']}`, {meta['seconds']:g} s; {meta['machine']}.", "",
             "| source | frames given | processed | dropped | input fps | processed fps | p50 ms | p99 ms | in order |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, s in res["per_source"].items():
        lines.append(f"| {name} | {s['given']} | {s['processed']} | {s['dropped']} | {s['input_fps']:.1f} | "
                     f"{s['processed_fps']:.2f} | {s['p50_ms']:.0f} | {s['p99_ms']:.0f} | "
                     f"{'yes' if s['in_order'] else 'NO'} |")
    lines += ["", "| minute | frames | latency p50 ms | p99 ms | max ms | loop step p50 ms | mailbox wait p50 ms | "
              "peak RSS MiB | median RSS MiB | stream CPU (cores) | load (1 min) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for k, m in enumerate(res["minutes"]):
        lines.append(f"| {k + 1} ({m['from_s']:.0f}-{m['to_s']:.0f} s) | {m['frames']} | {m['p50_ms']:.0f} | "
                     f"{m['p99_ms']:.0f} | {m['max_ms']:.0f} | {m['step_p50_ms']:.0f} | {m['wait_p50_ms']:.0f} | "
                     f"{m['rss_peak_mib']:.1f} | {m['rss_median_mib']:.1f} | {m['cpu_cores']:.2f} | "
                     f"{m['load1_mean']:.1f} |")
    lines += ["", "| goal | first minute | last minute | ratio | met |", "| --- | --- | --- | --- | --- |",
              f"| latency p99 (last <= 1.5x first) | {f['p99_ms']:.0f} ms | {l['p99_ms']:.0f} ms | "
              f"{res['p99_last_over_first']:.2f}x | {'yes' if res['p99_goal_met'] else 'no'} |",
              f"| latency p50 | {f['p50_ms']:.0f} ms | {l['p50_ms']:.0f} ms | {l['p50_ms'] / f['p50_ms']:.2f}x | - |",
              f"| peak RSS (within 10 %) | {f['rss_peak_mib']:.1f} MiB | {l['rss_peak_mib']:.1f} MiB | "
              f"{res['rss_last_over_first']:.3f}x | {'yes' if res['rss_goal_met'] else 'no'} |",
              f"| frames strictly increasing per source | | | | {'yes' if res['all_in_order'] else 'no'} |"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", help="an exported artifact (default: ps3-tiny exported to a temporary folder)")
    ap.add_argument("--sources", type=int, default=4)
    ap.add_argument("--fps", type=float, default=15.0)
    ap.add_argument("--seconds", type=float, default=300.0)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--num-look-close", type=int, default=1)
    ap.add_argument("--out", type=Path, help="folder for stream_long.json and stream_long.md")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        artifact = args.artifact
        if artifact is None:
            artifact = str(Path(tmp) / "art")
            subprocess.run([sys.executable, "-m", "ps3edge.cli", "export", "--model", "ps3-tiny", "--out", artifact],
                           check=True)
        ports = [free_udp_port() for _ in range(args.sources)]
        names = [f"cam{k}" for k in range(args.sources)]
        senders = [subprocess.Popen([sys.executable, "-c", SENDER, f"udp://127.0.0.1:{port}?pkt_size=1316",
                                     str(args.width), str(args.height), str(args.fps), str(args.seconds + 120), str(k)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                   for k, port in enumerate(ports)]
        jsonl = Path(tmp) / "frames.jsonl"
        command = [sys.executable, "-m", "ps3edge.cli", "stream", artifact]
        for name, port in zip(names, ports):
            command += ["--source", f"{name}=udp://127.0.0.1:{port}"]
        command += ["--num-look-close", str(args.num_look_close), "--duration", f"{args.seconds:g}",
                    "--jsonl", str(jsonl), "--quiet"]
        load_before = os.getloadavg()
        try:
            time.sleep(1.0)                                              # the senders are up
            proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
            sampler = Sampler(proc.pid)
            sampler.start()
            _, stderr = proc.communicate(timeout=args.seconds + 180)
            sampler.halt.set()
            sampler.join()
        finally:
            for s in senders:
                if s.poll() is None:
                    s.kill()
                s.wait(timeout=10)
        if proc.returncode != 0:
            sys.exit(f"ps3edge stream exited {proc.returncode}: {stderr.strip()}")
        records = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    res = analyse(records, sampler.samples, names)
    meta = {"sources": args.sources, "fps": args.fps, "seconds": args.seconds, "width": args.width,
            "height": args.height, "num_look_close": args.num_look_close, "command": " ".join(command[2:]),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores shared with others' work, load average "
                       f"{load_before[0]:.1f} before the run and {res['load1_mean']:.1f} on average during it",
            "load_before": load_before, "stream_stderr": stderr.strip()[-2000:]}
    text = markdown(res, meta)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        frames = [{k: r[k] for k in ("source", "frame", "step", "batch", "arrival", "result_time", "latency_ms")}
                  for r in records]
        (args.out / "stream_long.json").write_text(json.dumps({"meta": meta, "results": res, "samples": sampler.samples,
                                                               "frames": frames}))
        (args.out / "stream_long.md").write_text(text)


if __name__ == "__main__":
    main()
