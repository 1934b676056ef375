"""Where the GPU's time goes in one look-close run: kernel time per stage and the top kernels.

`ps3edge bench` gives wall times per stage from an eager run, which on a GPU include launch
overhead; the CUDA-graph total hides the split. This profiles one eager run of the fast path
(bf16, NUM_LOOK_CLOSE=6 by default) with torch.profiler and reports, per stage, its span on the
GPU (first kernel to last, idle gaps of the eager run included), then the total time the GPU
spent in kernels (what a CUDA graph or a TensorRT engine cannot remove, only fuse) and the
kernels that take the most of it; then the same list for the low-res stage profiled alone.
Run on a GPU machine:

    python benchmarks/gpu_profile.py [--models ps3-1.5k,ps3-4k] [--steps 6]
    python benchmarks/gpu_profile.py --models ps3-tiny --device cpu          # dry run (CPU op times)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ps3edge.bench import script_device                           # noqa: E402
from ps3edge.demo import sample_image                             # noqa: E402
from ps3edge.model import preset, random_model                    # noqa: E402
from ps3edge.runtime.fast import FastLookClose                    # noqa: E402
from ps3edge.runtime.planning import LookCloseSettings, step_counts   # noqa: E402
from ps3edge.runtime.preprocess import preprocess                 # noqa: E402


class StageRanges:
    """A profiler range per stage of `FastLookClose.forward`, which calls this after each stage
    with the stage's name; ranges are numbered, the names kept in order."""

    def __init__(self):
        self.names = []
        self._open = record_function("stage:0")
        self._open.__enter__()

    def __call__(self, name: str):
        self._open.__exit__(None, None, None)
        self.names.append(name)
        self._open = record_function(f"stage:{len(self.names)}")
        self._open.__enter__()

    def close(self):
        self._open.__exit__(None, None, None)


def profile_model(name: str, device: str, steps: int, top: int):
    cfg = preset(name)
    cuda = device == "cuda"
    fast = FastLookClose(random_model(cfg), device=device, dtype="bf16")
    pixels = torch.from_numpy(preprocess(sample_image(), cfg.max_size, cfg.image_mean, cfg.image_std))
    pixels = pixels.to(device, torch.bfloat16)
    counts = step_counts(LookCloseSettings(num_look_close=steps, mode="after_image"), fast.geometry)
    for _ in range(2):
        fast.forward(pixels, counts)                              # warm: allocator, cuDNN plans
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        ranges = StageRanges()
        fast.forward(pixels, counts, timer=ranges)
        ranges.close()
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    unit = "GPU kernel" if cuda else "CPU op"

    def stage_ms(e):
        return (e.device_time_total if cuda else e.cpu_time_total) / 1e3

    per_stage = "span on the GPU (eager, gaps included)" if cuda else "CPU op time"
    print(f"\n{name} NUM_LOOK_CLOSE={steps}, {torch.cuda.get_device_name() if cuda else 'cpu'}, bf16: "
          f"{per_stage} per stage")
    by_range = {e.key: e for e in events if e.key.startswith("stage:")}
    total = 0.0
    for i, stage in enumerate(ranges.names):
        e = by_range.get(f"stage:{i}")
        ms = stage_ms(e) if e is not None else 0.0
        total += ms
        print(f"  {stage:<22} {ms:8.3f} ms")
    print(f"  {'total':<22} {total:8.3f} ms")

    print_top(events, cuda, top, f"top {top} {unit}s")

    # the low-res stage alone: at batch 1 it is latency-bound (729 tokens), and the run's
    # ranking above is dominated by the high-res blocks, so its own kernels are listed apart
    with profile(activities=activities) as prof:
        fast.model.lowres(pixels, (fast.layer,))
        if cuda:
            torch.cuda.synchronize()
    print_top(prof.key_averages(), cuda, min(top, 10), f"the lowres stage alone: top {min(top, 10)} {unit}s")


def print_top(events, cuda: bool, top: int, title: str):
    if cuda:
        kernels = [e for e in events if e.device_type == DeviceType.CUDA and not e.key.startswith("stage:")]
        key = "self_device_time_total"
    else:
        kernels = [e for e in events if not e.key.startswith("stage:")]
        key = "self_cpu_time_total"
    kernels.sort(key=lambda e: getattr(e, key), reverse=True)
    busy = sum(getattr(e, key) for e in kernels) / 1e3
    print(f"  {title} of {busy:.3f} ms ({len(kernels)} distinct):")
    for e in kernels[:top]:
        ms = getattr(e, key) / 1e3
        print(f"  {ms:8.3f} ms {ms / busy * 100:5.1f}% x{e.count:<4} {e.key[:110]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="ps3-1.5k,ps3-4k")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    script_device(args.device)
    print("torch", torch.__version__)
    for name in args.models.split(","):
        profile_model(name, args.device, args.steps, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
