"""Can the MLP half of a high-res block lose its separate GELU and residual-add passes? Timed on
the GPU (bf16, the real shapes of a 1.5K / 4K highres call), with the error each change brings.

The kernel profile of a 1.5K NUM_LOOK_CLOSE=6 run on an H100 (gpu_profile.py, 2026-11-26) put
2.5 ms in exact GELU and 2.3 ms in residual adds, next to ~17 ms of matmuls and ~17 ms of
attention; the ratio asked for at 1.5K (2.7x) needs about 3-5 ms of that gone. The MLP half,
x + fc2(gelu(fc1(norm2(x)))), is timed here four ways:

  exact            what the fast path runs: fc1 (bias in the GEMM epilogue), exact GELU, fc2, add;
  gelu-epilogue    fc1 with cuBLASLt's GELU epilogue (torch._addmm_activation): no GELU pass, but
                   on CUDA it is the tanh approximation (|diff| <= 4.7e-4 from the exact GELU);
  residual-gemm    exact GELU, then fc2 as one GEMM that also adds the residual (beta = 1) and
                   its bias: fc1 gets 8 extra output columns, one with weight 0 and bias 8
                   (GELU(8) = 8 exactly, in fp32, bf16 and fp16), seven zero; fc2 gets 8 extra
                   input columns, b2 / 8 in the first (exact: a power of two), zeros after;
  both             the GELU epilogue and the residual GEMM together.

For each: ms per block, times the blocks of a run (x27), saved against exact, and the error
against the fp32 exact MLP (max |diff| and relative norm), next to the bf16 exact path's own.

    python benchmarks/gpu_epilogue.py [--models ps3-1.5k,ps3-4k]
    python benchmarks/gpu_epilogue.py --device cpu           # a dry run on small shapes
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ps3edge.bench import Timer, script_device                    # noqa: E402
from ps3edge.defaults import DEFAULT_RUN_LAYER                    # noqa: E402
from ps3edge.model import preset                                  # noqa: E402
from ps3edge.model.ps3 import Block                               # noqa: E402
from ps3edge.runtime.planning import Geometry, LookCloseSettings, step_counts   # noqa: E402

PAD = 8                     # extra fc1 outputs / fc2 inputs: keeps the widths multiples of 8
ONE = 8.0                   # GELU(8) == 8 exactly in fp32 / bf16 / fp16 (exact and tanh forms)


def extended_weights(block: Block):
    """fc1 (F,C) -> (F+8,C) whose output F is always 8; fc2 (C,F) -> (C,F+8) with b2 / 8 there."""
    fc1, fc2 = block.mlp.fc1, block.mlp.fc2
    F_, C = fc1.weight.shape
    w1 = torch.cat([fc1.weight, fc1.weight.new_zeros(PAD, C)])
    b1 = torch.cat([fc1.bias, fc1.bias.new_zeros(PAD)])
    b1[F_] = ONE
    w2 = torch.cat([fc2.weight, fc2.weight.new_zeros(C, PAD)], dim=1)
    w2[:, F_] = fc2.bias / ONE
    return w1.contiguous(), b1, w2.contiguous()


def mlp_exact(block, x):
    return x + block.mlp(block.norm2(x))


def mlp_gelu_epilogue(block, x):
    m = block.mlp
    h = block.norm2(x).reshape(-1, x.shape[-1])
    g = torch._addmm_activation(m.fc1.bias, h, m.fc1.weight.t(), use_gelu=True)
    return x + F.linear(g, m.fc2.weight, m.fc2.bias).reshape(x.shape)


def mlp_residual_gemm(block, x, ext):
    w1, b1, w2 = ext
    h = block.norm2(x).reshape(-1, x.shape[-1])
    g = F.gelu(F.linear(h, w1, b1))
    return torch.addmm(x.reshape(-1, x.shape[-1]), g, w2.t()).reshape(x.shape)


def mlp_both(block, x, ext):
    w1, b1, w2 = ext
    h = block.norm2(x).reshape(-1, x.shape[-1])
    g = torch._addmm_activation(b1, h, w1.t(), use_gelu=True)
    return torch.addmm(x.reshape(-1, x.shape[-1]), g, w2.t()).reshape(x.shape)


def errors(out: torch.Tensor, ref: torch.Tensor) -> str:
    d = out.float() - ref
    return f"max |diff| {d.abs().max().item():.3g}  rel {(d.norm() / ref.norm()).item():.2e}"


def run_call(cfg, T, N, device, dtype, timer, blocks, totals):
    """One call shape: every variant timed and checked; adds its time x blocks to totals."""
    ref_block = Block(cfg).eval()
    with torch.no_grad():                  # weights at the scale of a trained block
        for p in ref_block.parameters():
            p.normal_(0.0, 0.02) if p.ndim > 1 else p.normal_(0.0, 0.05)
    block32 = ref_block.to(device)
    x32 = torch.randn(T, N, cfg.width, device=device)
    with torch.no_grad():
        ref = mlp_exact(block32, x32)
    block = Block(cfg).eval().to(device)
    block.load_state_dict(block32.state_dict())
    block = block.to(dtype)
    x = x32.to(dtype)
    ext = extended_weights(block)
    variants = {
        "exact": lambda: mlp_exact(block, x),
        "gelu-epilogue": lambda: mlp_gelu_epilogue(block, x),
        "residual-gemm": lambda: mlp_residual_gemm(block, x, ext),
        "both": lambda: mlp_both(block, x, ext),
    }
    print(f"  call {T}x{N}")
    base = None
    with torch.no_grad():
        for label, fn in variants.items():
            ms = timer.measure(fn, 3, 20)
            base = ms if base is None else base
            totals[label] = totals.get(label, 0.0) + ms * blocks
            print(f"    {label:<14} {ms:7.3f} ms a block, x{blocks} = {ms * blocks:6.2f} ms, "
                  f"saves {(base - ms) * blocks:5.2f} ms   vs fp32 exact: {errors(fn(), ref)}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="ps3-1.5k,ps3-4k")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    device = script_device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    timer = Timer(device)
    print(torch.__version__, torch.cuda.get_device_name() if cuda else "cpu", str(dtype)[6:])
    torch.manual_seed(0)
    for name in args.models.split(",") if cuda else ["ps3-tiny"]:
        cfg = preset(name)
        blocks = DEFAULT_RUN_LAYER % cfg.depth + 1
        lengths = [sum(c) for c in step_counts(LookCloseSettings(num_look_close=6), Geometry.of(cfg))]
        # the calls of a NUM_LOOK_CLOSE=6 run, (T, N); the dry run takes one small call
        calls = [(lengths.count(n), n) for n in sorted(set(lengths), reverse=True)] if cuda else [(2, 64)]
        print(f"\n{name}: MLP half of the high-res blocks, C={cfg.width}, hidden {cfg.mlp_dim}; "
              f"NUM_LOOK_CLOSE=6 makes calls {calls} (T, N) through {blocks} blocks")
        totals = {}
        for T, N in calls:
            run_call(cfg, T, N, device, dtype, timer, blocks, totals)
        base = totals["exact"]
        print("  a run: " + ", ".join(f"{k} {v:.2f} ms (saves {base - v:.2f})" for k, v in totals.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
