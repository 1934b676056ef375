"""The memory plan of examples/jetson/README.md, computed from the model definitions (no guessing).

    python examples/jetson/memory_plan.py            # prints the README's tables (markdown)

Weights: parameter counts of our PS3 (model/ps3.py) built on the meta device, split by the engine
that holds them. Both the lowres and the highres engine contain the 27 transformer blocks:
TensorRT engines do not share weights, so the trunk is counted twice. The highres engine also
holds the per-scale position table (P x C) as a constant. INT8 counts the matrices of the
transformer blocks and the patch embedding at 1 byte (what `ps3edge calibrate` quantizes by
default: MatMul / Conv inputs of the trunk) and everything else at 2 bytes for `--precision best`
(fp16 elsewhere) or 4 bytes for `--precision int8` (the strongly typed Q/DQ network keeps the
rest in fp32).

Tensors: the K/V cache (L x 2 x H x 729 x D), the highres_patches output (P x 588), the input
pixels, and the activations of one highres call of T steps x 2560 tokens, estimated per block as
the larger of its attention phase and its MLP phase; "unfused" adds the attention scores and
probabilities (T x H x N x (729 + N), twice) that an unfused attention materialises. The
figure TensorRT really reserves is each engine's device_memory_bytes, which `ps3edge build`
records in the manifest.
"""

from __future__ import annotations

import torch

from ps3edge import defaults
from ps3edge.model import PS3, preset

GiB, MiB = 2 ** 30, 2 ** 20
N = defaults.MAX_TOKENS_PER_HIGHRES_CALL
RETURNED = 2                                   # the exported layers (-2, -1)


def stage_params(name: str) -> dict:
    cfg = preset(name)
    with torch.device("meta"):
        model = PS3(cfg)
    groups = {}
    for key, p in model.named_parameters():
        groups[key] = p
    count = lambda pred: sum(p.numel() for k, p in groups.items() if pred(k))  # noqa: E731
    # matrices the INT8 calibration quantizes: the blocks' qkv / proj / fc1 / fc2 and the patch embedding
    quantizable = lambda k: (k.startswith("trunk.blocks.") and k.endswith(".weight")  # noqa: E731
                             and groups[k].ndim == 2) or k == "trunk.patch_embed.proj.weight"
    trunk = lambda k: k.startswith("trunk.patch_embed") or k.startswith("trunk.blocks")  # noqa: E731
    table = cfg.highres_patches_total * cfg.width                       # baked position table (P x C)
    stages = {
        "lowres": {"all": count(lambda k: trunk(k) or k in ("trunk.pos_embed",)
                                or k.startswith("selection_feature_proj")
                                or k.startswith("highres_selection_feature_module")),
                   "int8": count(quantizable)},
        "selector": {"all": count(lambda k: k.startswith("prompt_proj_for_highres")), "int8": 0},
        "highres": {"all": count(trunk) + table, "int8": count(quantizable)},
    }
    return {"cfg": cfg, "total": sum(p.numel() for p in groups.values()), "stages": stages}


def weight_bytes(stage: dict, precision: str) -> int:
    """fp32, fp16, best (quantized matrices int8, the rest fp16: `--precision best` on TensorRT 10)
    or int8 (the strongly typed Q/DQ network of `--precision int8`: the rest stays fp32)."""
    rest = stage["all"] - stage["int8"]
    return {"fp32": 4 * stage["all"], "fp16": 2 * stage["all"], "best": stage["int8"] + 2 * rest,
            "int8": stage["int8"] + 4 * rest}[precision]


def highres_activation_bytes(cfg, T: int, bytes_per: int = 2, unfused: bool = False) -> int:
    C, H, D, mlp = cfg.width, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
    M, K = T * N, cfg.lowres_tokens + N
    attention = M * C + M * C + 3 * M * C + 2 * T * H * K * D + M * C     # x, ln1, qkv, K/V with prefix, out
    if unfused:
        attention += 2 * T * H * N * K                                     # scores and probabilities
    mlp_phase = M * C + M * C + M * mlp + M * C                            # x, ln2, hidden, out
    return bytes_per * max(attention, mlp_phase)


def highres_io_bytes(cfg, T: int) -> int:
    M = T * N
    return 4 * M * cfg.patch_dim + 4 * M + 4 * RETURNED * M * cfg.width    # patches, positions, features (fp32)


def main() -> None:
    models = {name: stage_params(name) for name in ("ps3-1.5k", "ps3-4k")}
    print("### Weights (MiB)\n")
    kinds = ("fp32", "fp16", "best", "int8")
    print("| model | parameters | engine | parameters in engine | fp32 | fp16 | best (int8 + fp16) | int8 (+ fp32) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, m in models.items():
        for stage, s in m["stages"].items():
            print(f"| {name} | {m['total'] / 1e6:.1f} M | {stage} | {s['all'] / 1e6:.1f} M | "
                  + " | ".join(f"{weight_bytes(s, p) / MiB:.0f}" for p in kinds) + " |")
        print(f"| {name} | | **all three** | {sum(s['all'] for s in m['stages'].values()) / 1e6:.1f} M | "
              + " | ".join(f"**{sum(weight_bytes(s, p) for s in m['stages'].values()) / MiB:.0f}**"
                           for p in kinds) + " |")
    print("\n### Tensors between the stages (MiB, fp32 as the engines' inputs and outputs are)\n")
    print("| model | tensor | shape | elements | MiB |")
    print("|---|---|---|---|---|")
    for name, m in models.items():
        cfg = m["cfg"]
        kv = (cfg.depth, 2, 1, cfg.num_heads, cfg.lowres_tokens, cfg.head_dim)
        rows = [("K/V cache", kv), ("highres_patches", (1, cfg.highres_patches_total, cfg.patch_dim)),
                ("pixels", (1, 3, cfg.max_size, cfg.max_size)),
                ("lowres_features", (RETURNED, 1, cfg.lowres_tokens, cfg.width))]
        for label, shape in rows:
            n = 1
            for d in shape:
                n *= d
            print(f"| {name} | {label} | {' x '.join(map(str, shape))} | {n:,} | {4 * n / MiB:.1f} |")
    print("\n### One highres call of T steps x 2560 tokens (MiB, fp16 activations)\n")
    print("| model | T | tokens | activations, fused attention | activations, unfused attention | I/O buffers (fp32) |")
    print("|---|---|---|---|---|---|")
    for name, m in models.items():
        cfg = m["cfg"]
        for T in (1, 2, 3, 6):
            print(f"| {name} | {T} | {T * N} | {highres_activation_bytes(cfg, T) / MiB:.0f} | "
                  f"{highres_activation_bytes(cfg, T, unfused=True) / MiB:.0f} | {highres_io_bytes(cfg, T) / MiB:.0f} |")

    print("\n### Orin Nano 8 GB budget, ps3-4k, `--max-look-close 2`, `--workspace-gb 1` (MiB)\n")
    cfg, stages = models["ps3-4k"]["cfg"], models["ps3-4k"]["stages"]
    kv = 4 * cfg.depth * 2 * cfg.num_heads * cfg.lowres_tokens * cfg.head_dim
    patches = 4 * cfg.highres_patches_total * cfg.patch_dim
    pixels = 4 * 3 * cfg.max_size ** 2
    common = [
        ("K/V cache: lowres output buffer, host copy, highres input buffer", 3 * kv),
        ("highres_patches: lowres output buffer, host copy", 2 * patches),
        ("pixels: host array, lowres input buffer", 2 * pixels),
        ("highres I/O buffers at T = 2 (device) + host copy of its output", highres_io_bytes(cfg, 2)
         + 4 * RETURNED * 2 * N * cfg.width),
        ("workspace limit (upper bound of TensorRT scratch)", 1 * GiB),
    ]
    print("| item | fp16, fused attention | fp16, unfused attention | best (int8 + fp16), unfused attention |")
    print("|---|---|---|---|")
    columns = [("fp16", False), ("fp16", True), ("best", True)]
    totals = [0, 0, 0]
    rows = [("weights, three engines", [sum(weight_bytes(s, p) for s in stages.values()) for p, _ in columns]),
            *[(label, [b] * 3) for label, b in common],
            ("highres activations at T = 2", [highres_activation_bytes(cfg, 2, unfused=u) for _, u in columns])]
    for label, values in rows:
        totals = [t + v for t, v in zip(totals, values)]
        print(f"| {label} | " + " | ".join(f"{v / MiB:.0f}" for v in values) + " |")
    print("| **total** | " + " | ".join(f"**{t / MiB:.0f}**" for t in totals) + " |")
    print("| left of 8 GiB for L4T, the CUDA / TensorRT / torch runtime and the lowres activations | "
          + " | ".join(f"{(8 * GiB - t) / MiB:.0f}" for t in totals) + " |")


if __name__ == "__main__":
    main()
