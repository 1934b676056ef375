"""Would FP8 matrix products in the high-res blocks pay on a Hopper card? Timed on the GPU (the
whole fast path, NUM_LOOK_CLOSE=6, batch 1, replayed from a CUDA graph), with the error FP8 brings.

The floor (gpu_diagnose.py, H200, 2026-11-26) put the four matrix products of the 26 high-res
blocks at 20.8 of a 51.5 ms 1.5K run and 19.2 of 55.2 ms at 4K, at about 620 TFLOP/s in bf16;
Hopper's FP8 tensor cores have twice bf16's peak. Here the high-res blocks' qkv, proj, fc1 and fc2
run as `torch._scaled_mm` in float8_e4m3fn: each weight quantised once per output channel, each
input per token at run time (scale = row amax / 448). Low-res, selector, attention, norms and
residual adds stay bf16, so the selection is the bf16 run's. Three runs of one image:

  bf16        the fast path as shipped (`FastLookClose`);
  fp8         the four products in FP8, each input's quantisation as separate eager kernels;
  fp8-fused   the same products, each input's quantisation compiled (torch.compile) together with
              the pass that produces the input (LayerNorm, GELU, the attention output's copy), so
              quantising costs no pass of its own.

For each: ms a run (median, CUDA graph), the high-res stage of an eager run, and the features
against the bf16 run and against the fp32 fast path made to take the bf16 run's steps (max |diff|,
min per-token cosine, relative error). The weights are seeded random: this
measures speed; how FP8 treats a trained checkpoint's activation outliers needs that checkpoint.

    python benchmarks/gpu_fp8.py [--models ps3-1.5k,ps3-4k]
    python benchmarks/gpu_fp8.py --device cpu            # a dry run on ps3-tiny (CPU _scaled_mm)
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ps3edge.bench import Timer, script_device                    # noqa: E402
from ps3edge.compare import feature_diff                          # noqa: E402
from ps3edge.demo import sample_image                             # noqa: E402
from ps3edge.model import preset, random_model                    # noqa: E402
from ps3edge.runtime.fast import FastLookClose                    # noqa: E402
from ps3edge.runtime.planning import LookCloseSettings            # noqa: E402
from ps3edge.runtime.preprocess import preprocess                 # noqa: E402

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max                                    # 448


def quantise(x: torch.Tensor):
    """(M,K) -> (M,K) e4m3 and (M,1) fp32 scales, one per row: x ~ q * scale."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    # the clamp keeps a value that rounds past 448 from becoming NaN (e4m3fn has no inf)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class Fp8Linear:
    """A linear layer's weight in e4m3, one scale per output channel, ready for _scaled_mm."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        q, scale = quantise(weight)                                # (N,K), (N,1)
        self.weight_t = q.t()                                      # (K,N) column-major, as _scaled_mm wants
        self.scale = scale.t().contiguous()                        # (1,N)
        self.bias = bias.to(torch.bfloat16)

    def __call__(self, q, scale, out=None):
        return torch._scaled_mm(q, self.weight_t, scale_a=scale, scale_b=self.scale, bias=self.bias,
                                out_dtype=torch.bfloat16, out=out)


class Fp8Block:
    """One block's four products; qkv split into its q and k/v halves as the fast path uses them."""

    def __init__(self, block):
        C = block.attn.proj.weight.shape[0]
        w, b = block.attn.qkv.weight, block.attn.qkv.bias
        self.q, self.kv = Fp8Linear(w[:C], b[:C]), Fp8Linear(w[C:], b[C:])
        self.proj = Fp8Linear(block.attn.proj.weight, block.attn.proj.bias)
        self.fc1 = Fp8Linear(block.mlp.fc1.weight, block.mlp.fc1.bias)
        self.fc2 = Fp8Linear(block.mlp.fc2.weight, block.mlp.fc2.bias)


def _norm_quantise(x, norm_weight, norm_bias, eps):
    return quantise(F.layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, eps).reshape(-1, x.shape[-1]))


def _gelu_quantise(y):
    return quantise(F.gelu(y))


def _rows_quantise(out):                           # (T,H,N,D) attention output -> (T*N, C) rows
    T, H, N, D = out.shape
    return quantise(out.transpose(1, 2).reshape(T * N, H * D))


class Fp8LookClose(FastLookClose):
    """The fast path with the high-res blocks' products in FP8; everything else as shipped."""

    def __init__(self, model, device, fused: bool):
        super().__init__(model, device=device, dtype="bf16")
        self.fp8 = {id(b): Fp8Block(b) for b in self.model.trunk.blocks}
        wrap = (lambda f: torch.compile(f, dynamic=False, fullgraph=True)) if fused else (lambda f: f)
        self.norm_quantise, self.gelu_quantise, self.rows_quantise = (
            wrap(_norm_quantise), wrap(_gelu_quantise), wrap(_rows_quantise))

    def highres_block(self, block, x, kv_prefix, kv_buffer, step_image=None):
        """`FastLookClose.highres_block` with its products through `Fp8Block`."""
        T, N, C = x.shape
        N0 = self.write_prefix(kv_buffer, kv_prefix, step_image)
        f8 = self.fp8[id(block)]
        h, hs = self.norm_quantise(x, block.norm1.weight, block.norm1.bias, block.norm1.eps)  # (T*N,C)
        q = f8.q(h, hs).reshape(T, N, C)
        for t in range(T):
            f8.kv(h[t * N:(t + 1) * N], hs[t * N:(t + 1) * N], out=kv_buffer[t, N0:])    # (N,2C)
        out = self.attend(q, kv_buffer)                                              # (T,H,N,D)
        x = x + f8.proj(*self.rows_quantise(out)).reshape(T, N, C)
        h, hs = self.norm_quantise(x, block.norm2.weight, block.norm2.bias, block.norm2.eps)
        return x + f8.fc2(*self.gelu_quantise(f8.fc1(h, hs))).reshape(T, N, C)


def errors(test: torch.Tensor, ref: torch.Tensor) -> str:
    a, b = test[0].float().cpu().numpy(), ref[0].float().cpu().numpy()
    max_abs, min_cos = feature_diff(a, b)
    rel = np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64))
    return f"max |diff| {max_abs:.3g}  min cos {min_cos:.5f}  rel {rel:.2e}"


def fp32_on_the_same_steps(model, device, px, counts, prob: torch.Tensor) -> torch.Tensor:
    """The fp32 fast path made to rank the bf16 run's probability map: the same steps, so every
    token has the same step-mates and the features compare token for token."""
    fast32 = FastLookClose(model, device=device, dtype="fp32")
    fast32.model.selector = lambda *_: prob.float()
    return fast32.forward(px, counts).features


def run_variant(label: str, weights, device, px, timer: Timer, warmup: int, repeat: int):
    """One variant on a copy of the weights: (its eager result, ms a run from the CUDA graph,
    the eager run's high-res ms, the first run's seconds, the step counts)."""
    model = copy.deepcopy(weights)
    fast = (FastLookClose(model, device=device, dtype="bf16") if label == "bf16"
            else Fp8LookClose(model, device, fused=label == "fp8-fused"))
    counts = fast.counts(LookCloseSettings(num_look_close=6, mode="after_image"))
    pixels = px.to(fast.dtype)
    t0 = time.perf_counter()
    result = fast.forward(pixels, counts)                         # compiles the fused variant
    first = time.perf_counter() - t0
    ms = timer.measure(lambda: fast.graphed(pixels, counts), warmup, repeat)
    highres = timer.stages(fast, pixels, counts)[0]["highres"]      # (ms, peaks): the ms
    return result, ms, highres, first, counts


def bench(name: str, device: torch.device, timer: Timer, warmup: int, repeat: int):
    cfg = preset(name)
    image = preprocess(sample_image(), cfg.max_size, cfg.image_mean, cfg.image_std)
    px = torch.from_numpy(image).to(device)
    weights = random_model(cfg)                                  # fp32 on the CPU; each run takes a copy
    result, base_ms, highres, first, counts = run_variant("bf16", weights, device, px, timer, warmup, repeat)
    base = result.features
    ref32 = fp32_on_the_same_steps(copy.deepcopy(weights), device, px, counts, result.prob)
    print(f"\n{name} NUM_LOOK_CLOSE=6, batch 1, steps of {[sum(c) for c in counts]} patches\n"
          f"  {'bf16':<10} {base_ms:7.2f} ms a run (high-res {highres:6.2f} ms eager; first run {first:5.1f} s)\n"
          f"             vs fp32: {errors(base, ref32)}")
    for label in ("fp8", "fp8-fused"):
        try:
            result, ms, highres, first, _ = run_variant(label, weights, device, px, timer, warmup, repeat)
        except Exception as e:                    # e.g. no compiler for the fused kernels: say so, go on
            print(f"  {label:<10} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
            continue
        print(f"  {label:<10} {ms:7.2f} ms a run (high-res {highres:6.2f} ms eager; first run {first:5.1f} s)"
              f"  {ms / base_ms:.3f}x bf16's time\n"
              f"             vs bf16: {errors(result.features, base)}\n"
              f"             vs fp32: {errors(result.features, ref32)}")
        del result
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="ps3-1.5k,ps3-4k")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    device = script_device(args.device)
    cuda = device.type == "cuda"
    print(torch.__version__, torch.cuda.get_device_name() if cuda else "cpu (dry run: ps3-tiny, one repeat)")
    timer = Timer(device)
    for name in args.models.split(",") if cuda else ["ps3-tiny"]:
        bench(name, device, timer, *((3, 10) if cuda else (0, 1)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
