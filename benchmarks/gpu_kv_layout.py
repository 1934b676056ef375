"""How the high-res attention's inputs are laid out, timed on the GPU (bf16, the real shapes).

Each high-res block attends with [low-res K/V prefix ; the step's own K/V]. The profile
(gpu_profile.py) showed the K/V concatenation taking ~6 ms of a 53 ms run on an H100: the
own K/V are strided views of the qkv output, permuted to heads-first, and torch.cat copies them
element by element. This times, from the qkv output to the attention output (B,N,C):

  heads-first  the original: permute to (B,H,N,D), cat along N, SDPA, transpose back;
  token-major  cat in (B,N,C) (rows of C contiguous), SDPA on (B,H,N,D) views of it;
  token-major-copy  the same, written with empty + two copy_ instead of cat;

and the concatenation alone for each, plus the largest difference from the original's output.
On an H100 (2026-11-26) building the K/V took 0.222 / 0.202 / 0.152 ms per 5x2560 block: the
layouts alone save little, so the fast path went further and writes each step's K/V in place,
next to the prefix (`FastLookClose.highres_block`), with no concatenation at all.

    python benchmarks/gpu_kv_layout.py [--device cpu]       # cpu: a dry run on small shapes
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ps3edge.bench import Timer, script_device                    # noqa: E402
from ps3edge.runtime.fast import attention_kernels                # noqa: E402


def heads_first(qkv, prefix, H):
    B, N, C3 = qkv.shape
    C = C3 // 3
    qkv = qkv.reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    k = torch.cat([prefix[0].expand(B, -1, -1, -1), k], dim=2)
    v = torch.cat([prefix[1].expand(B, -1, -1, -1), v], dim=2)
    return q, k, v


def token_major(qkv, prefix_tm, H):
    B, N, C3 = qkv.shape
    C = C3 // 3
    q, k, v = qkv.reshape(B, N, 3, C).unbind(2)                         # (B,N,C) row-strided views
    k = torch.cat([prefix_tm[0].expand(B, -1, -1), k], dim=1)           # (B,N0+N,C)
    v = torch.cat([prefix_tm[1].expand(B, -1, -1), v], dim=1)
    heads = lambda t: t.unflatten(-1, (H, C // H)).transpose(1, 2)      # noqa: E731
    return heads(q), heads(k), heads(v)


def token_major_copy(qkv, prefix_tm, H):
    B, N, C3 = qkv.shape
    C = C3 // 3
    N0 = prefix_tm.shape[2]
    q, k, v = qkv.reshape(B, N, 3, C).unbind(2)
    kv = torch.empty(2, B, N0 + N, C, dtype=qkv.dtype, device=qkv.device)
    kv[:, :, :N0].copy_(prefix_tm.expand(2, B, -1, -1))
    kv[0, :, N0:].copy_(k)
    kv[1, :, N0:].copy_(v)
    heads = lambda t: t.unflatten(-1, (H, C // H)).transpose(1, 2)      # noqa: E731
    return heads(q), heads(kv[0]), heads(kv[1])


def attend(build, qkv, prefix, H):
    q, k, v = build(qkv, prefix, H)
    out = F.scaled_dot_product_attention(q, k, v)
    B, _, N, _ = out.shape
    return out.transpose(1, 2).reshape(B, N, -1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    device = script_device(args.device)
    cuda = device.type == "cuda"
    H, D, N0 = (16, 72, 729) if cuda else (4, 16, 49)
    shapes = [(5, 2560), (6, 2560), (1, 1780)] if cuda else [(2, 256)]
    timer = Timer(device)
    print(torch.__version__, torch.cuda.get_device_name() if cuda else "cpu", f"H={H} D={D} N0={N0} bf16")
    g = torch.Generator(device="cpu").manual_seed(0)
    for B, N in shapes:
        C = H * D
        qkv = torch.randn(B, N, 3 * C, generator=g).to(device, torch.bfloat16)
        prefix = torch.randn(2, 1, H, N0, D, generator=g).to(device, torch.bfloat16)     # (2,1,H,N0,D)
        prefix_tm = prefix.transpose(2, 3).reshape(2, 1, N0, C).contiguous()            # (2,1,N0,C)
        with attention_kernels(device):
            ref = attend(heads_first, qkv, prefix, H)
            rows = [("heads-first", heads_first, prefix), ("token-major", token_major, prefix_tm),
                    ("token-major-copy", token_major_copy, prefix_tm)]
            print(f"\ncall {B}x{N}: keys {N0}+{N}")
            for name, build, pre in rows:
                whole = timer.measure(lambda: attend(build, qkv, pre, H), warmup=3, repeat=20)
                inputs = timer.measure(lambda: build(qkv, pre, H), warmup=3, repeat=20)
                diff = (attend(build, qkv, pre, H).float() - ref.float()).abs().max().item()
                print(f"  {name:<18} attention from qkv {whole:7.3f} ms   building its K/V inputs {inputs:7.3f} ms   "
                      f"max |diff| vs heads-first {diff:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
