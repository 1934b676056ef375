"""The Jetson memory plan of docs/tensorrt-and-jetson.md, computed from the model definitions.

    python examples/jetson/memory_plan.py                          # prints the page's tables (markdown)
    python examples/jetson/memory_plan.py --llm-config llm/config.json   # a checkpoint's own LLM config

PS3: parameter counts of our PS3 (model/ps3.py) built on the meta device, split by the engine
that holds them. Today the lowres and the highres engine each contain the 27 transformer blocks
(TensorRT engines do not share weights): the trunk is counted twice; the target design holds it
once. INT8 ("best") counts the blocks' matrices and the patch embedding at 1 byte (what
`ps3edge calibrate` quantizes) and the rest at 2 bytes; `--precision int8` keeps the rest fp32.

VILA-HD: the projector and the top-down prompt head from model/projector.py, the LLM as a
transformers Qwen2ForCausalLM built on the meta device from the published config (LLM_CONFIG).
INT4 is onnxruntime's weight-only block quantization (matmul_nbits_quantizer.py, its defaults:
asymmetric, block size 128): every MatMul, the output head included, becomes MatMulNBits (4-bit
codes, one fp16 scale and one 4-bit zero point per block of K); the embedding table, a Gather,
becomes GatherBlockQuantized (blocks along the hidden axis, same scales and zero points). Biases
and norms stay fp16. Image tokens follow VILA-HD's layout (model/projector.py): the 14 x 14 low-res
cells, the full 2x2 cells of the selected high-res patches (at most selected / 4 per scale, from
the look-close schedule of runtime/planning.py) and one newline token.

Activations are estimates per block (the larger of the attention and the MLP phase, plus the
attention scores and probabilities an unfused attention materialises); the figure TensorRT
really reserves is each engine's device_memory_bytes, which `ps3edge build` records.
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from ps3edge import defaults
from ps3edge.model import PS3, preset
from ps3edge.model.projector import Projector
from ps3edge.runtime.planning import Geometry, LookCloseSettings, resolve

GiB, MiB = 2 ** 30, 2 ** 20
N = defaults.MAX_TOKENS_PER_HIGHRES_CALL
RETURNED = len(defaults.DEFAULT_RETURNED_LAYERS)         # the exported layers (-2, -1)
MODELS = {"VILA-HD-8B-PS3-1.5K": "ps3-1.5k", "VILA-HD-8B-PS3-4K": "ps3-4k"}

# VILA-HD-8B's LLM: the Qwen2-7B geometry of NVILA-8B, whose training recipe the PS3 paper uses for its
# VILA-HD-8B models (section 5). Values of the llm_cfg in NVILA-8B's config.json (https://huggingface.co/Efficient-Large-Model/
# NVILA-8B), as read in https://github.com/NVIDIA/TensorRT-LLM/blob/main/tests/unittest/_torch/modeling/
# test_modeling_vila.py (NVILA_8B_CONFIG); Qwen2-7B-Instruct has the same values but
# vocab_size 152064. `--llm-config` reads a downloaded checkpoint's llm/config.json instead.
LLM_CONFIG = {"hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
              "intermediate_size": 18944, "vocab_size": 151648, "tie_word_embeddings": False}

BOARDS = {"Orin Nano 8 GB": 8, "Orin NX 16 GB": 16, "AGX Orin 32 GB": 32, "AGX Orin 64 GB": 64}   # GiB shared
# L4T without the desktop, the hardware carveouts (CMA is 512 MiB by default) and the process's CUDA
# context and TensorRT / cuDNN / cuBLAS / Python libraries. An ESTIMATE: "on an 8 GB Orin Nano the OS
# and runtime consume ~1.5-2 GB before inference" (https://edgeaistack.app/engines/memory-estimator);
# CMA 512 MB (https://proventusnova.com/blog/jetson-orin-high-ram-usage-idle). Measure with tegrastats.
SYSTEM_ALLOWANCE = 2 * GiB
PROMPT_TOKENS, GENERATED_TOKENS = 512, 128                 # the stated context, besides the image
NUM_LOOK_CLOSE = (2, 6)                                    # steps per image (the context and KV cache)
MAX_LOOK_CLOSE = 2                                         # steps per highres call (`--max-look-close`)
PREFILL_CHUNK = 512                                        # LLM prompt positions per prefill call
FRAME = (2160, 3840, 3)                                    # the decoded camera frame, uint8
INT4_BLOCK = 128                                           # onnxruntime's default block size


# ------------------------------------------------------------------------------------------
# parameter counts
# ------------------------------------------------------------------------------------------

def ps3_params(name: str) -> dict:
    """Our PS3 on the meta device: parameters per engine, the trunk, and what INT8 quantizes."""
    cfg = preset(name)
    with torch.device("meta"):
        params = dict(PS3(cfg).named_parameters())
    count = lambda pred: sum(p.numel() for k, p in params.items() if pred(k))  # noqa: E731
    # the matrices the INT8 calibration quantizes: the blocks' qkv / proj / fc1 / fc2 and the patch embedding
    quantizable = lambda k: (k.startswith("trunk.blocks.") and k.endswith(".weight")  # noqa: E731
                             and params[k].ndim == 2) or k == "trunk.patch_embed.proj.weight"
    trunk = lambda k: k.startswith("trunk.patch_embed") or k.startswith("trunk.blocks")  # noqa: E731
    table = cfg.highres_patches_total * cfg.width                       # baked position table (P x C)
    stages = {
        "lowres": {"all": count(lambda k: trunk(k) or k == "trunk.pos_embed"
                                or k.startswith("selection_feature_proj")
                                or k.startswith("highres_selection_feature_module")),
                   "int8": count(quantizable)},
        "selector": {"all": count(lambda k: k.startswith("prompt_proj_for_highres")), "int8": 0},
        "highres": {"all": count(trunk) + table, "int8": count(quantizable)},
    }
    return {"cfg": cfg, "total": sum(p.numel() for p in params.values()), "stages": stages,
            "trunk": {"all": count(trunk), "int8": count(quantizable)}}


def weight_bytes(stage: dict, precision: str) -> int:
    """fp32, fp16, best (quantized matrices int8, the rest fp16: `--precision best` on TensorRT 10)
    or int8 (the strongly typed Q/DQ network of `--precision int8`: the rest stays fp32)."""
    rest = stage["all"] - stage["int8"]
    return {"fp32": 4 * stage["all"], "fp16": 2 * stage["all"], "best": stage["int8"] + 2 * rest,
            "int8": stage["int8"] + 4 * rest}[precision]


def ps3_weight_bytes(m: dict, precision: str, trunks: int) -> int:
    """The three PS3 engines at `precision`, holding the trunk `trunks` times (today 2, target 1)."""
    both = sum(weight_bytes(s, precision) for s in m["stages"].values())
    return both - (2 - trunks) * weight_bytes(m["trunk"], precision)


def llm_params(config: dict) -> dict:
    """transformers' Qwen2ForCausalLM on the meta device: the (K, N) of every MatMul of the decoder
    layers, the output head and the embedding table (V, H), and the other (1-D) parameters."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(**config, use_sliding_window=False, sliding_window=None)
    with torch.device("meta"):
        params = dict(Qwen2ForCausalLM(cfg).named_parameters())
    head = params.get("lm_head.weight", params["model.embed_tokens.weight"])
    return {"cfg": cfg, "total": sum(p.numel() for p in params.values()),
            "matmuls": [tuple(p.shape[::-1]) for k, p in params.items() if p.ndim == 2 and ".layers." in k],
            "head": tuple(head.shape[::-1]), "embedding": tuple(params["model.embed_tokens.weight"].shape),
            "vectors": sum(p.numel() for p in params.values() if p.ndim == 1),
            "tied": bool(cfg.tie_word_embeddings)}


def projector_params(vision_width: int, llm_width: int) -> int:
    """VILA-HD's mm_projector (PS3 width -> LLM hidden) plus the top-down prompt head (back)."""
    with torch.device("meta"):
        modules = (Projector(vision_width, llm_width), torch.nn.Linear(llm_width, vision_width))
    return sum(p.numel() for m in modules for p in m.parameters())


# ------------------------------------------------------------------------------------------
# LLM weights: fp16 and onnxruntime's block-wise INT4
# ------------------------------------------------------------------------------------------

def matmul_nbits_bytes(k: int, n: int, block: int) -> int:
    """MatMulNBits of a (K, N) weight: 4-bit codes (N, K/block, block/2), fp16 scales (N, K/block),
    zero points packed two per byte (N, ceil(K/block / 2))."""
    blocks = math.ceil(k / block)
    return n * blocks * block // 2 + 2 * n * blocks + n * math.ceil(blocks / 2)


def gather_block_bytes(rows: int, cols: int, block: int) -> int:
    """GatherBlockQuantized of a (V, H) table, blocks along H: uint4 codes, fp16 scales (V, H/block),
    uint4 zero points (V, H/block)."""
    blocks = rows * math.ceil(cols / block)
    return rows * cols // 2 + 2 * blocks + math.ceil(blocks / 2)


def llm_weight_bytes(llm: dict, scheme: str) -> dict:
    """Bytes of the decoder layers (with biases and norms), the output head and the embedding table.
    scheme: fp16 | fp32-embedding (today: fp16 engine, fp32 host table) | int4-B (all three int4,
    block size B) | int4-B-fp16-ends (embedding and head fp16)."""
    vectors = 2 * llm["vectors"]
    (hk, hn), (ev, eh) = llm["head"], llm["embedding"]
    if scheme.startswith("fp"):
        layers = vectors + sum(2 * k * n for k, n in llm["matmuls"])
        embedding = (4 if scheme == "fp32-embedding" else 2) * ev * eh
        return {"layers": layers, "head": 2 * hk * hn, "embedding": embedding}
    block = int(scheme.split("-")[1])
    layers = vectors + sum(matmul_nbits_bytes(k, n, block) for k, n in llm["matmuls"])
    if scheme.endswith("fp16-ends"):
        return {"layers": layers, "head": 2 * hk * hn, "embedding": 2 * ev * eh}
    return {"layers": layers, "head": matmul_nbits_bytes(hk, hn, block),
            "embedding": gather_block_bytes(ev, eh, block)}


# ------------------------------------------------------------------------------------------
# tokens, caches and activations
# ------------------------------------------------------------------------------------------

def image_tokens(cfg, num_look_close: int) -> dict:
    """The most LLM positions one image takes: the low-res 2x2 cells, at most selected / 4 full cells
    per high-res scale (VILA-HD keeps only cells whose 4 patches were all selected) and the newline
    (one token: Qwen2's tokenizer encodes "\\n" as one)."""
    schedule = resolve(LookCloseSettings(num_look_close=num_look_close), Geometry.of(cfg))
    per_scale = [sum(step[s] for step in schedule.counts) for s in range(len(cfg.highres_grids))]
    lowres = math.ceil(cfg.lowres_grid / 2) ** 2
    highres = sum(n // 4 for n in per_scale)
    return {"lowres": lowres, "highres": highres, "newline": 1, "image": lowres + highres + 1,
            "patches": sum(per_scale)}


def llm_kv_bytes(llm: dict, positions: int, bytes_per: int) -> int:
    """K and V of every layer for `positions` tokens: L x 2 x Hkv x positions x D."""
    c = llm["cfg"]
    head_dim = c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers * 2 * c.num_key_value_heads * positions * head_dim * bytes_per


def highres_activation_bytes(cfg, T: int, bytes_per: int = 2, unfused: bool = False) -> int:
    """One highres call of T steps x 2560 tokens, per block: residual, LayerNorm, qkv, the keys and
    values with the 729 cached ones, output; or the MLP phase; unfused adds scores + probabilities."""
    C, H, D, mlp = cfg.width, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
    M, K = T * N, cfg.lowres_tokens + N
    attention = M * C + M * C + 3 * M * C + 2 * T * H * K * D + M * C
    if unfused:
        attention += 2 * T * H * N * K
    mlp_phase = M * C + M * C + M * mlp + M * C
    return bytes_per * max(attention, mlp_phase)


def lowres_activation_bytes(cfg, bytes_per: int = 2) -> int:
    """The lowres trunk's activations (729 tokens, unfused attention) per block, as for highres."""
    M, C = cfg.lowres_tokens, cfg.width
    return bytes_per * max(6 * M * C + 2 * cfg.num_heads * M * M, 3 * M * C + M * cfg.mlp_dim)


def llm_prefill_activation_bytes(llm: dict, past: int, bytes_per: int = 2) -> int:
    """One prefill call of PREFILL_CHUNK positions against `past` cached ones, per layer: residual,
    RMSNorm, q / k / v, output, unfused scores + probabilities; or the gated MLP (gate, up, product)."""
    c, S = llm["cfg"], PREFILL_CHUNK
    H, I, Hq = c.hidden_size, c.intermediate_size, c.num_attention_heads
    kv = 2 * c.num_key_value_heads * (H // Hq)
    attention = S * (3 * H + kv) + S * H + 2 * Hq * S * (past + S)
    return bytes_per * max(attention, S * (2 * H + 3 * I + H)) + 4 * c.vocab_size   # + fp32 logits


def highres_io_bytes(cfg, T: int, bytes_per: int = 4) -> int:
    """A highres call's inputs and outputs: patches, positions (int32), features of the returned layers."""
    M = T * N
    return bytes_per * M * cfg.patch_dim + 4 * M + bytes_per * RETURNED * M * cfg.width


# ------------------------------------------------------------------------------------------
# the budget
# ------------------------------------------------------------------------------------------

DESIGNS = {   # name -> (PS3 engines' precision, trunk copies, LLM weights, inter-stage bytes per value)
    "today": ("fp16", 2, "fp32-embedding", 4),
    "target, LLM fp16": ("fp16", 1, "fp16", 2),
    "target, LLM int4": ("fp16", 1, f"int4-{INT4_BLOCK}", 2),
    "target, LLM int4, PS3 int8": ("best", 1, f"int4-{INT4_BLOCK}", 2),
}


def budget(ps3: dict, llm: dict, design: str, num_look_close: int, max_look_close: int = MAX_LOOK_CLOSE,
           unfused: bool = True) -> list[tuple[str, str, int]]:
    """(item, precision or "", bytes) of one VILA-HD model answering one image at NUM_LOOK_CLOSE =
    num_look_close with highres calls of max_look_close steps (unfused: the highres attention
    materialises its scores, the upper bound). Today: every buffer fp32, the K/V
    cache in three places (lowres output, host, highres input), all high-res patches (P x 588) in
    two; target: fp16 buffers where the stages run fp16, only the patches of a call travel."""
    precision, trunks, llm_scheme, b = DESIGNS[design]
    cfg, c, T = ps3["cfg"], llm["cfg"], max_look_close
    tokens = image_tokens(cfg, num_look_close)
    context = tokens["image"] + PROMPT_TOKENS + GENERATED_TOKENS
    cells = tokens["image"] - tokens["newline"]
    lw = llm_weight_bytes(llm, llm_scheme)
    kv = cfg.depth * 2 * cfg.num_heads * cfg.lowres_tokens * cfg.head_dim
    features = (cfg.lowres_tokens + tokens["patches"]) * RETURNED * cfg.width
    today = design == "today"
    llm_kind = "int4" if llm_scheme.startswith("int4") else "fp16"
    return [
        ("PS3 weights (three engines)", f"{precision}, trunk x {trunks}", ps3_weight_bytes(ps3, precision, trunks)),
        ("projector + top-down head", "fp16", 2 * projector_params(cfg.width, c.hidden_size)),
        ("LLM decoder layers + output head", llm_kind, lw["layers"] + lw["head"]),
        ("LLM embedding table", "host fp32" if today else llm_kind, lw["embedding"]),
        ("camera frame (uint8) + resized pixels (host, lowres input; fp32)", "",
         math.prod(FRAME) + 2 * 4 * 3 * cfg.max_size ** 2),
        ("PS3 K/V cache x 3 (lowres out, host, highres in)", "", 3 * b * kv),
        ("all high-res patches x 2 (lowres out, host)", "",
         2 * 4 * cfg.highres_patches_total * cfg.patch_dim if today else 0),
        (f"highres I/O at T = {T} (+ host copy of its features)", "",
         highres_io_bytes(cfg, T, b) + b * RETURNED * T * N * cfg.width),
        ("PS3 features of every step (host)", "", b * features),
        ("projector I/O + image and prompt embeddings (host, LLM input)", "",
         b * cells * (4 * cfg.width + c.hidden_size) + 2 * b * (context - GENERATED_TOKENS) * c.hidden_size),
        (f"LLM KV cache, 2 buffers x {context} positions", "", 2 * llm_kv_bytes(llm, context, b)),
        ("lowres activations (unfused attention)", "", lowres_activation_bytes(cfg)),
        (f"highres activations at T = {T} ({'un' if unfused else ''}fused attention)", "",
         highres_activation_bytes(cfg, T, unfused=unfused)),
        (f"LLM prefill activations, {PREFILL_CHUNK}-position chunk (unfused attention)", "",
         llm_prefill_activation_bytes(llm, context - PREFILL_CHUNK)),
        ("OS, carveouts, CUDA context, runtime libraries (estimate)", "", SYSTEM_ALLOWANCE),
    ]


def left_bytes(ps3: dict, llm: dict, gib: int, *args, **kwargs) -> int:
    """What a board of `gib` GiB has left after `budget(ps3, llm, *args, **kwargs)` (negative: over)."""
    return gib * GiB - sum(b for *_, b in budget(ps3, llm, *args, **kwargs))


def verdict(ps3: dict, llm: dict, gib: int, num_look_close: int) -> str:
    """The first design (fewest changes first; `--max-look-close` 2, then 1) that fits the board,
    or how far the last one is over, and whether a fused highres attention would make it fit."""
    for design in DESIGNS:
        for T in (MAX_LOOK_CLOSE, 1):
            left = left_bytes(ps3, llm, gib, design, num_look_close, T)
            if left >= 0:
                return f"fits: {design}, `--max-look-close {T}` ({left / MiB:.0f} MiB left)"
    text = f"over by {-left / MiB:.0f} MiB ({design}, `--max-look-close 1`)"
    fused = left_bytes(ps3, llm, gib, design, num_look_close, MAX_LOOK_CLOSE, unfused=False)
    if fused >= 0:
        text += (f"; with fused highres attention it fits at `--max-look-close {MAX_LOOK_CLOSE}` "
                 f"({fused / MiB:.0f} MiB left)")
    return text


# ------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------

def row(*cells) -> None:
    print("| " + " | ".join(str(c) for c in cells) + " |")


def table(title: str, header: tuple) -> None:
    print(f"\n### {title}\n")
    row(*header)
    row(*["---"] * len(header))


def print_ps3_tables(ps3s: dict) -> None:
    """Weights per engine and precision, the inter-stage tensors, one highres call."""
    kinds = ("fp32", "fp16", "best", "int8")
    table("PS3 weights per engine (MiB)", ("model", "parameters", "engine", "parameters in engine", "fp32",
                                           "fp16", "best (int8 + fp16)", "int8 (+ fp32)"))
    for name, m in ps3s.items():
        for stage, s in m["stages"].items():
            row(name, f"{m['total'] / 1e6:.1f} M", stage, f"{s['all'] / 1e6:.1f} M",
                *(f"{weight_bytes(s, p) / MiB:.0f}" for p in kinds))
        for trunks, label in ((2, "**all three, today (trunk x 2)**"), (1, "**all three, target (trunk x 1)**")):
            params = sum(s["all"] for s in m["stages"].values()) - (2 - trunks) * m["trunk"]["all"]
            row(name, "", label, f"{params / 1e6:.1f} M",
                *(f"**{ps3_weight_bytes(m, p, trunks) / MiB:.0f}**" for p in kinds))
    table("PS3 tensors between the stages (MiB at fp32; fp16 halves them)",
          ("model", "tensor", "shape", "elements", "MiB"))
    for name, m in ps3s.items():
        cfg = m["cfg"]
        for label, shape in (("K/V cache", (cfg.depth, 2, 1, cfg.num_heads, cfg.lowres_tokens, cfg.head_dim)),
                             ("highres_patches", (1, cfg.highres_patches_total, cfg.patch_dim)),
                             ("pixels", (1, 3, cfg.max_size, cfg.max_size)),
                             ("lowres_features", (RETURNED, 1, cfg.lowres_tokens, cfg.width))):
            n = math.prod(shape)
            row(name, label, " x ".join(map(str, shape)), f"{n:,}", f"{4 * n / MiB:.1f}")
    table("One highres call of T steps x 2560 tokens (MiB, fp16 activations)",
          ("model", "T", "tokens", "activations, fused attention", "activations, unfused attention",
           "I/O buffers (fp32)"))
    for name, m in ps3s.items():
        cfg = m["cfg"]
        for T in (1, 2, 3, 6):
            row(name, T, T * N, f"{highres_activation_bytes(cfg, T) / MiB:.0f}",
                f"{highres_activation_bytes(cfg, T, unfused=True) / MiB:.0f}", f"{highres_io_bytes(cfg, T) / MiB:.0f}")


def print_llm_tables(llm: dict, ps3s: dict) -> None:
    """The LLM's config and weights, the image tokens and the KV cache per NUM_LOOK_CLOSE."""
    c = llm["cfg"]
    table("VILA-HD-8B LLM (Qwen2) config", ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                             "num_key_value_heads", "intermediate_size", "vocab_size",
                                             "tie_word_embeddings", "parameters"))
    row(c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size,
        c.vocab_size, str(llm["tied"]).lower(), f"{llm['total'] / 1e9:.3f} B")
    table("LLM weights (MiB)", ("scheme", "decoder layers", "output head", "embedding table", "total"))
    for scheme, label in (("fp16", "fp16"), ("fp32-embedding", "today: fp16 engine, fp32 host embedding table"),
                          ("int4-32", "int4, block 32 (embedding + head int4)"),
                          ("int4-128", "int4, block 128 (embedding + head int4)"),
                          ("int4-128-fp16-ends", "int4, block 128, embedding + head fp16")):
        w = llm_weight_bytes(llm, scheme)
        row(label, *(f"{w[k] / MiB:.0f}" for k in ("layers", "head", "embedding")), f"{sum(w.values()) / MiB:.0f}")
    table(f"Image tokens and LLM KV cache (context = image + {PROMPT_TOKENS} prompt + {GENERATED_TOKENS} generated)",
          ("model", "NUM_LOOK_CLOSE", "high-res patches", "image tokens (low-res + high-res + newline)",
           "context", "KV cache, fp16 (MiB)", "KV cache today: 2 x fp32 (MiB)"))
    for model, name in MODELS.items():
        for nlc in NUM_LOOK_CLOSE:
            t = image_tokens(ps3s[name]["cfg"], nlc)
            context = t["image"] + PROMPT_TOKENS + GENERATED_TOKENS
            row(model, nlc, t["patches"], f"{t['image']} ({t['lowres']} + {t['highres']} + {t['newline']})", context,
                f"{llm_kv_bytes(llm, context, 2) / MiB:.0f}", f"{2 * llm_kv_bytes(llm, context, 4) / MiB:.0f}")


def print_budget_tables(llm: dict, ps3s: dict) -> None:
    """The whole budget per model, NUM_LOOK_CLOSE and design, then the verdict per board."""
    for model, name in MODELS.items():
        for nlc in NUM_LOOK_CLOSE:
            table(f"{model}, NUM_LOOK_CLOSE={nlc}, `--max-look-close {MAX_LOOK_CLOSE}` (MiB)", ("item", *DESIGNS))
            items = {d: budget(ps3s[name], llm, d, nlc) for d in DESIGNS}
            for i, (label, *_) in enumerate(items["today"]):
                row(label, *(f"{items[d][i][2] / MiB:.0f}" + (f" ({items[d][i][1]})" if items[d][i][1] else "")
                             for d in DESIGNS))
            row("**total**", *(f"**{sum(b for *_, b in items[d]) / MiB:.0f}**" for d in DESIGNS))
    table("Verdict per board", ("board", *(f"{m}, NUM_LOOK_CLOSE={n}" for m in MODELS for n in NUM_LOOK_CLOSE)))
    for board, gib in BOARDS.items():
        row(board, *(verdict(ps3s[name], llm, gib, n) for name in MODELS.values() for n in NUM_LOOK_CLOSE))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llm-config", help="a VILA-HD checkpoint's llm/config.json (default: LLM_CONFIG)")
    args = parser.parse_args(argv)
    config = LLM_CONFIG
    if args.llm_config:
        with open(args.llm_config) as f:
            published = json.load(f)
        config = {k: published[k] for k in LLM_CONFIG}
    ps3s = {name: ps3_params(name) for name in MODELS.values()}
    llm = llm_params(config)
    print_ps3_tables(ps3s)
    print_llm_tables(llm, ps3s)
    print_budget_tables(llm, ps3s)


if __name__ == "__main__":
    main()
