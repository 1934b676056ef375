"""GPU diagnostics behind the bench numbers: bf16 accuracy, attention kernels, compiled blocks.

1. Accuracy. For each model at NUM_LOOK_CLOSE=6, forces ONE selection (ours) on every run, so
   the features are comparable token for token, and compares against the official model in
   fp32: our bf16 fast path, the official code in bf16, and our fp32 fast path.
   Per-token cosine: min, 0.1 % quantile and median.
2. Attention. Times each SDPA backend alone on the high-res shape (6 steps x 2560 queries
   over 729 + 2560 keys, 16 heads of 72), bf16; then cuDNN and flash with the heads zero-padded
   to 80, 96 and 128 (exact), in case a native head width runs faster than 72.
3. Floor. For one model at NUM_LOOK_CLOSE=6, times one high-res block (the fast path's form,
   `FastLookClose.highres_block`) on each highres call's real shape, and inside it the four
   matrix products alone (cuBLAS, bf16) and the attention alone (the kernel the fast path
   uses), times the blocks the run needs; next to the whole fast path and the official code
   (configured as VILA-HD configures it: the last 2 blocks' hidden states returned).
   official / (our run - our blocks + matmuls + attention) is the best ratio these kernels
   allow, whatever else is fused away.
(A third part, torch.compile of each block, was dropped after it measured 52.95 vs 53.38 ms at
1.5K and 56.50 vs 57.19 ms at 4K on an H200: no gain worth a compile step.)

    python benchmarks/gpu_diagnose.py [--models ps3-1.5k,ps3-4k] [--depth N] [--skip accuracy,attention,floor]
    python benchmarks/gpu_diagnose.py --skip accuracy --floor-model ps3-tiny --device cpu   # dry run
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ps3edge.bench import Timer                                   # noqa: E402
from ps3edge.demo import sample_image                             # noqa: E402
from ps3edge.model import preset, random_model                    # noqa: E402
from ps3edge.reference import VILA_HD_LAYERS_TO_RETURN, official_model, run_official_with_selection   # noqa: E402
from ps3edge.runtime.fast import FastLookClose, attention_kernels  # noqa: E402
from ps3edge.runtime.planning import LookCloseSettings, plan, resolve, step_counts   # noqa: E402
from ps3edge.runtime.preprocess import preprocess                 # noqa: E402


def cos_stats(a: np.ndarray, b: np.ndarray) -> str:
    a, b = a.astype(np.float64), b.astype(np.float64)
    cos = (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)
    rel = np.linalg.norm(a - b) / np.linalg.norm(b)
    return (f"min {cos.min():.5f}  q0.1% {np.quantile(cos, 0.001):.5f}  median {np.median(cos):.6f}  "
            f"rel-err {rel:.2e}  max-abs {np.abs(a - b).max():.3g}")


def accuracy(name: str, depth, steps: int = 6):
    cfg = preset(name)
    if depth:
        cfg = cfg.replace(depth=depth, select_layers=tuple(min(l, depth - 1) for l in cfg.select_layers))
    model = random_model(cfg)
    official32 = official_model(model).cuda()
    official16 = official_model(model).cuda().to(torch.bfloat16)
    fast16 = FastLookClose(random_model(cfg), device="cuda", dtype="bf16")
    fast32 = FastLookClose(random_model(cfg), device="cuda", dtype="fp32")
    px = torch.from_numpy(preprocess(sample_image(), cfg.max_size, cfg.image_mean, cfg.image_std)).cuda()
    settings = LookCloseSettings(num_look_close=steps, mode="after_image")
    ours16 = fast16.forward(px.bfloat16(), step_counts(settings, fast16.geometry))
    the_plan = plan(ours16.prob[0].float().cpu().numpy(), resolve(settings, fast16.geometry), fast16.geometry)
    maps = the_plan.step_maps(fast16.geometry)
    ref = run_official_with_selection(official32, px, maps)
    off16 = run_official_with_selection(official16, px.bfloat16(), maps)
    # our fp32 run: comparable only if its own plan has the same steps as the bf16 plan
    run32 = fast32.forward(px, step_counts(settings, fast32.geometry))
    ours32 = run32.features[0].float().cpu().numpy()
    plan32 = plan(run32.prob[0].float().cpu().numpy(), resolve(settings, fast32.geometry), fast32.geometry)
    same32 = all(np.array_equal(a, b) for s32, s16 in zip(plan32.steps, the_plan.steps) for a, b in zip(s32, s16))
    o16 = ours16.features[0].float().cpu().numpy()
    print(f"\n{name}{'' if not depth else f'-depth{depth}'} NUM_LOOK_CLOSE={steps}, {o16.shape[0]} tokens, "
          f"one forced selection")
    print(f"  ours bf16     vs official fp32: {cos_stats(o16, ref)}")
    print(f"  official bf16 vs official fp32: {cos_stats(off16, ref)}")
    print(f"  ours bf16     vs official bf16: {cos_stats(o16, off16)}")
    if same32:
        print(f"  ours fp32     vs official fp32: {cos_stats(ours32, ref)}")
    else:
        print("  ours fp32 selects differently from the bf16 plan (bf16 prob ties); not compared")
    worst = np.argsort(((o16 * ref).sum(-1) / np.linalg.norm(o16, axis=-1) / np.linalg.norm(ref, axis=-1)))[:3]
    print(f"  worst tokens {worst.tolist()}, their fp32 norms {np.linalg.norm(ref[worst], axis=-1).round(2).tolist()}, "
          f"median norm {np.median(np.linalg.norm(ref, axis=-1)):.2f}")


def attention_backends(device: str):
    from torch.nn.attention import SDPBackend
    import torch.nn.functional as F
    # a dry run on the CPU takes one small step; flash has a CPU kernel, the others say unavailable
    T, H, N, K, D = (6, 16, 2560, 729 + 2560, 72) if device == "cuda" else (1, 2, 64, 128, 72)
    q = torch.randn(T, H, N, D, device=device, dtype=torch.bfloat16)
    k = torch.randn(T, H, K, D, device=device, dtype=torch.bfloat16)
    v = torch.randn(T, H, K, D, device=device, dtype=torch.bfloat16)
    timer = Timer(torch.device(device))
    print(f"\nSDPA, bf16, {T} steps x {N} queries over {K} keys, {H} heads of {D}:")
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        time_sdpa(f"{backend.name:22s}", backend, q, k, v, ref, timer)
    # Heads of 72 are no kernel's native width. Zero columns appended to q, k and v change no
    # score and give zero output columns, so a wider head is exact; if a kernel runs 80 / 96 /
    # 128 faster than 72, the fast path can produce padded heads straight from its projections
    # (zero rows in the q / kv weights, zero columns in proj) at no copy.
    print(f"  the same attention with heads zero-padded from {D} (the scale kept at 1/sqrt({D})):")
    for width in (80, 96, 128):
        qp, kp, vp = (F.pad(t, (0, width - D)) for t in (q, k, v))
        for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
            time_sdpa(f"{width:3d} {backend.name:18s}", backend, qp, kp, vp, ref, timer)


def time_sdpa(label: str, backend, q, k, v, ref, timer: Timer):
    """One SDPA backend on (q, k, v), scaled by the unpadded head width ref has: ms and the error
    of its first D output columns against ref; or why the backend is unavailable."""
    from torch.nn.attention import sdpa_kernel
    import torch.nn.functional as F
    D = ref.shape[-1]
    run = lambda: F.scaled_dot_product_attention(q, k, v, scale=D ** -0.5)       # noqa: E731
    try:
        with sdpa_kernel([backend]):
            out = run()[..., :D]
            ms = timer.measure(run, 5, 20)
    except RuntimeError as e:
        print(f"  {label} unavailable: {str(e).splitlines()[0][:100]}")
        return
    err = ((out.float() - ref).norm() / ref.norm()).item()
    print(f"  {label} {ms:7.3f} ms per block  (x27 = {27 * ms:6.1f} ms)  rel-err {err:.1e}")


def floor(name: str, device: str, steps: int = 6, dtype=torch.bfloat16):
    """Where the high-res time goes, per block and per call, against the official code."""
    import torch.nn.functional as F
    from ps3edge.defaults import DEFAULT_RUN_LAYER

    cfg = preset(name)
    model = random_model(cfg)
    # the official code as VILA-HD configures it (the last 2 blocks' hidden states returned)
    official = official_model(model, VILA_HD_LAYERS_TO_RETURN).to(device=device, dtype=dtype)
    fast = FastLookClose(model, device=device, dtype="bf16" if dtype == torch.bfloat16 else "fp32")
    dev = torch.device(device)
    timer = Timer(dev)
    px = torch.from_numpy(preprocess(sample_image(), cfg.max_size, cfg.image_mean, cfg.image_std)).to(dev, dtype)
    settings = LookCloseSettings(num_look_close=steps, mode="after_image")
    counts = step_counts(settings, fast.geometry)
    ours_ms = timer.measure(lambda: fast.graphed(px, counts), 3, 10)
    stages, _ = timer.stages(fast, px, counts)                     # ms per stage (and peaks)

    def official_run():
        with torch.no_grad():
            return official(px, num_look_close=steps)
    official_ms = timer.measure(official_run, 2, 5)

    blocks = DEFAULT_RUN_LAYER % cfg.depth + 1                      # high-res blocks the run needs
    block = fast.model.trunk.blocks[0]
    C, H, D, N0 = cfg.width, cfg.num_heads, cfg.width // cfg.num_heads, cfg.lowres_tokens
    lengths = [sum(c) for c in counts]
    groups = {n: lengths.count(n) for n in sorted(set(lengths), reverse=True) if n}
    print(f"\nfloor: {name} NUM_LOOK_CLOSE={steps}, {torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}, "
          f"{str(dtype)[6:]}, {blocks} high-res blocks, calls {groups} (N: T)")
    total = {"block": 0.0, "matmuls": 0.0, "attention": 0.0}
    with torch.no_grad(), attention_kernels(dev):
        for n, t in groups.items():
            x = torch.randn(t, n, C, device=dev, dtype=dtype)
            kv = torch.randn(2, 1, H, N0, D, device=dev, dtype=dtype)
            xs = x.reshape(-1, C)
            hidden = torch.randn(t * n, cfg.mlp_dim, device=dev, dtype=dtype)
            a, m = block.attn, block.mlp
            q = torch.randn(t, H, n, D, device=dev, dtype=dtype)
            k = torch.randn(t, H, N0 + n, D, device=dev, dtype=dtype)
            v = torch.randn(t, H, N0 + n, D, device=dev, dtype=dtype)
            kv_buffer = torch.empty(t, N0 + n, 2 * C, device=dev, dtype=dtype)
            ms = {
                "block": timer.measure(lambda: fast.highres_block(block, x, kv, kv_buffer), 3, 20),
                "matmuls": sum(timer.measure(f, 3, 20) for f in (
                    lambda: F.linear(xs, a.qkv.weight, a.qkv.bias), lambda: F.linear(xs, a.proj.weight, a.proj.bias),
                    lambda: F.linear(xs, m.fc1.weight, m.fc1.bias), lambda: F.linear(hidden, m.fc2.weight, m.fc2.bias))),
                "attention": timer.measure(lambda: F.scaled_dot_product_attention(q, k, v), 3, 20),
            }
            flops = 2 * t * n * (C * 3 * C + C * C + 2 * C * cfg.mlp_dim)
            attn_flops = 4 * t * H * n * (N0 + n) * D
            print(f"  call {t}x{n}: block {ms['block']:.3f} ms = matmuls {ms['matmuls']:.3f} "
                  f"({flops / ms['matmuls'] / 1e9:.0f} TFLOP/s) + attention {ms['attention']:.3f} "
                  f"({attn_flops / ms['attention'] / 1e9:.0f} TFLOP/s) + the rest {ms['block'] - ms['matmuls'] - ms['attention']:.3f}")
            for key in total:
                total[key] += ms[key] * blocks
    outside = ours_ms - total["block"]
    best = outside + total["matmuls"] + total["attention"]
    print(f"  x{blocks} blocks: {total['block']:.1f} ms = matmuls {total['matmuls']:.1f} + attention "
          f"{total['attention']:.1f} + the rest {total['block'] - total['matmuls'] - total['attention']:.1f}")
    print(f"  ours {ours_ms:.1f} ms (CUDA graph; eager stages {stages}), of which outside the high-res blocks "
          f"{outside:.1f} ms; official {official_ms:.1f} ms: {official_ms / ours_ms:.2f}x")
    print(f"  with every non-matmul, non-attention op of the blocks free: {best:.1f} ms, "
          f"{official_ms / best:.2f}x at most with these kernels")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="ps3-1.5k,ps3-4k")
    ap.add_argument("--depth", type=int, default=None)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: accuracy,attention,floor")
    ap.add_argument("--floor-model", default="ps3-1.5k", help="the model of the floor part")
    ap.add_argument("--device", default="cuda", help="attention and floor parts: cpu for a dry run")
    args = ap.parse_args()
    skip = set(args.skip.split(","))
    print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA")
    if "attention" not in skip:
        attention_backends(args.device)
    if "floor" not in skip:
        floor(args.floor_model, args.device, dtype=torch.bfloat16 if args.device == "cuda" else torch.float32)
    if "accuracy" not in skip:
        for name in args.models.split(","):
            accuracy(name, args.depth)


if __name__ == "__main__":
    main()
