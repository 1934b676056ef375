"""The low-res side of a run on the GPU: the lowres stage alone, and the high-res patches cut
only where the selection needs them against the full-resize patch table they replaced.

Before schema 3 every high-res scale was resized whole and cut into a table of all its patches
(4K: P x 588 values per image, 196 MiB fp32), of which a run uses one step's worth per call.
Now each selected patch is cut from the pixels with the full resize's arithmetic
(`model/patches.py` window_patches, inside the fast path's planning stage). For one model on the
device, B = 1 and 8 images of the 3840x2160 frame:

  lowres      the lowres stage alone (`PS3.lowres`: resize to 378, 27 blocks), bf16, eager;
  table       every high-res scale resized whole (`separable_bicubic_resize`) and cut into all
              its patches (`image_to_patches`), fp32: what the patch table cost;
  windowed    the NUM_LOOK_CLOSE=6 selection's patches cut by `window_patches`, fp32;

each with ms (median) and torch's peak CUDA allocation above what was allocated before it; and
whether the windowed patches equal the table's rows bit for bit on this device, and how far they
are from F.interpolate's bicubic (the official code's full resize).

    python benchmarks/gpu_lowres.py [--model ps3-4k]
    python benchmarks/gpu_lowres.py --model ps3-tiny-4k --device cpu      # a dry run
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ps3edge.bench import Timer, script_device                    # noqa: E402
from ps3edge.demo import sample_image                             # noqa: E402
from ps3edge.model import preset, random_model                    # noqa: E402
from ps3edge.model.patches import PatchTaps, window_patches       # noqa: E402
from ps3edge.model.ps3 import image_to_patches, separable_bicubic_resize   # noqa: E402
from ps3edge.runtime.planning import Geometry, LookCloseSettings, step_counts   # noqa: E402
from ps3edge.runtime.preprocess import preprocess                 # noqa: E402
from ps3edge.throughput import batch_images                       # noqa: E402


def peak_mib(dev, fn) -> float | None:
    """torch's peak CUDA allocation during fn(), above what was allocated before it, MiB."""
    if dev.type != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2 ** 20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="ps3-4k")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    dev = script_device(args.device)
    cuda = dev.type == "cuda"
    timer = Timer(dev)
    warmup, repeat = (3, 10) if cuda else (0, 1)
    cfg = preset(args.model)
    model = random_model(cfg).to(dev, torch.bfloat16 if cuda else torch.float32)
    taps = PatchTaps.of(cfg)
    counts = step_counts(LookCloseSettings(num_look_close=6, mode="after_image"), Geometry.of(cfg))
    per_scale = [sum(step[s] for step in counts) for s in range(len(taps.scales))]
    batches = [int(b) for b in args.batch.split(",")]
    views = batch_images(sample_image().resize((3840, 2160)), max(batches))
    pixels = torch.cat([torch.from_numpy(preprocess(v, cfg.max_size, cfg.image_mean, cfg.image_std)) for v in views]).to(dev)
    print(f"{args.model} on {torch.cuda.get_device_name() if cuda else 'cpu'}: scales {taps.scales}, "
          f"NUM_LOOK_CLOSE=6 takes {per_scale} patches per scale and image")
    g = torch.Generator().manual_seed(0)
    for b in batches:
        px = pixels[:b]
        low_px = px.to(next(model.parameters()).dtype)
        with torch.no_grad():
            lowres = lambda: model.lowres(low_px, (cfg.depth - 2,))        # noqa: E731
            low_ms, low_mib = timer.measure(lowres, warmup, repeat), peak_mib(dev, lowres)

            def table():
                return [image_to_patches(separable_bicubic_resize(px, s), taps.patch_size) for s in taps.scales]
            table_ms, table_mib = timer.measure(table, warmup, repeat), peak_mib(dev, table)
            # a selection: per scale, each image's first k of a random ranking
            picks = [torch.stack([torch.randperm(gs * gs, generator=g)[:k] for _ in range(b)]).to(dev)
                     for gs, k in zip(taps.grids, per_scale)]
            images = [torch.arange(b, device=dev)[:, None].expand(b, k).reshape(-1) for k in per_scale]

            def windowed():
                return [window_patches(px, im, p.reshape(-1), taps, s) for s, (im, p) in enumerate(zip(images, picks))]
            win_ms, win_mib = timer.measure(windowed, warmup, repeat), peak_mib(dev, windowed)
            cut, full = windowed(), table()
            rows = [t[im, p.reshape(-1)] for t, im, p in zip(full, images, picks)]
            identical = all(torch.equal(a, r) for a, r in zip(cut, rows))
            official = max((window - image_to_patches(F.interpolate(px, size=(s, s), mode="bicubic", align_corners=False),
                                                       taps.patch_size)[im, p.reshape(-1)]).abs().max().item()
                           for window, s, im, p in zip(cut, taps.scales, images, picks))

        def mib(x):
            return "" if x is None else f", peak +{x:.0f} MiB"
        print(f"  B={b}: lowres stage {low_ms:.2f} ms{mib(low_mib)}; patch table (every scale resized) "
              f"{table_ms:.2f} ms{mib(table_mib)}; selected patches cut {win_ms:.2f} ms{mib(win_mib)}: "
              f"{table_ms / max(win_ms, 1e-6):.1f}x faster")
        print(f"        cut patches equal the table's rows bit for bit: {identical}; "
              f"max |diff| from F.interpolate's bicubic (the official resize) {official:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
