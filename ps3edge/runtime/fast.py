"""The look-close loop as one device-resident torch program (the GPU fast path).

Same stages and same answer as `lookclose.Pipeline`, but nothing leaves the device between
the pixels and the features:

- the step schedule (how many patches each step takes from each scale, a token target's split
  and the spill included) depends only on the settings, so it is computed on the host before
  the run (`planning.resolve`'s `Schedule.counts`, by the same budget rule as the staged path);
- the ranking is a stable descending `torch.sort` of each scale's map on the device, and each
  step is a fixed slice of it, so planning needs no host round trip;
- all steps of equal length of all B images run as one `highres` call (T = steps x B rows of N
  tokens), each row reading its own image's low-res K/V (one image: the cache broadcast over
  T), each block writing its keys and values in place next to the low-res prefix
  (`highres_block`) instead of concatenating them;
- every shape is fixed for given settings and B, so on CUDA the whole run is captured as a
  CUDA graph per (B, settings, prompt kind, layer) on its second use and replayed after that.

The torch backend opens an artifact as this program on CUDA (runners/torch.py `FastSession`,
which `lookclose.Pipeline` runs for `ps3edge run --backend torch`, with the image preprocessed on
the device, `preprocess.preprocess_on_device`); `ps3edge bench` times it.

fp16 / bf16 run the network in that precision (as the official code does when cast); the
position table is computed in fp32 and then cast. Each step's high-res patches are cut from the
pixels (as the network's dtype gives them) per scale in fp32 and then cast
(model/patches.py: no full high-res image is made).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import defaults
from ..model.patches import PatchTaps, window_patches
from ..model.ps3 import PS3
from .planning import DEFAULT_BUDGET_RULE, BudgetRule, Geometry, LookCloseSettings, step_counts

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class FastResult:
    features: torch.Tensor          # (B, tokens, C) in the run's dtype, on the device
    prob: torch.Tensor              # (B, G0, G0)
    selection: torch.Tensor         # (B, P) uint8, 1 where a high-res patch was encoded
    steps: list                     # per step, (B, N_t) global patch indices, scale-major


def attention_kernels(device: torch.device):
    """On CUDA prefer cuDNN attention (faster than flash for 72-wide heads on Hopper)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
             SDPBackend.MATH]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:            # older torch: no priority order, plain allow-list
        return sdpa_kernel(order)


class FastLookClose:
    def __init__(self, model: PS3, layer: int = defaults.DEFAULT_RUN_LAYER, device="cpu", dtype="fp32"):
        cfg = model.cfg
        self.cfg = cfg
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        self.layer = layer % cfg.depth
        with torch.no_grad():
            table = model.highres_position_table()                     # fp32, then cast
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.position_table = table.to(device=self.device, dtype=self.dtype)
        self.prior_prompt = self.model.prior_prompt.detach().reshape(1, -1)
        self.geometry = Geometry.of(cfg)
        offsets = self.geometry.scale_offsets
        self.scale_offsets = [torch.tensor(o, device=self.device) for o in offsets]
        self.taps = PatchTaps.of(cfg)
        self.taps.on(self.device)      # made before any CUDA graph capture
        self._graphs = {}              # key -> (graph, static inputs, static outputs)
        self._seen = set()             # keys run once eagerly: the second run captures

    # --- one run, eager ---------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, pixels: torch.Tensor, counts: list[list[int]], smooth: bool = False,
                prompt: torch.Tensor | None = None, timer=None, layer: int | None = None) -> FastResult:
        """pixels (B,3,S,S) on the device; counts[t][s] from planning.resolve (the same for
        every image); prompt (B,C) or None (the learned prior for all); layer: the block whose
        features come back (default: the one given at construction)."""
        layer = self.layer if layer is None else layer % self.cfg.depth
        with attention_kernels(self.device):
            return self._forward(pixels, counts, smooth, prompt, timer, layer)

    def _forward(self, pixels, counts, smooth, prompt, timer, layer) -> FastResult:
        mark = timer or (lambda name: None)
        m, cfg = self.model, self.cfg
        B = pixels.shape[0]
        pixels = pixels.to(self.dtype)
        low_feats, kv, sel, conv = m.lowres(pixels, (layer,))
        pixels = pixels.float()                                                # the patches: cut in fp32, then cast
        mark("lowres")
        prompt = self.prior_prompt.expand(B, -1) if prompt is None else prompt.to(self.dtype).reshape(B, -1)
        prob = m.selector(sel, conv, prompt)                                   # (B,G0,G0)
        mark("selector")

        # planning: one stable ranking per scale and image, each step a fixed slice of it
        rankings = []
        for g in cfg.highres_grids:
            p = F.interpolate(prob[:, None], size=(g, g), mode="nearest")      # (B,1,g,g)
            if smooth:
                s = defaults.SMOOTH_SELECTION_GRID
                p = F.interpolate(F.interpolate(p, size=(s, s), mode="area"), size=(g, g), mode="nearest")
            rankings.append(torch.sort(p.reshape(B, -1), dim=1, descending=True, stable=True).indices)
        taken = [0] * len(rankings)
        steps, step_patches = [], []                                           # each (B,N_t), (B,N_t,588)
        images = torch.arange(B, device=self.device)
        for step in counts:
            parts, patches = [], []
            for s, k in enumerate(step):
                local = rankings[s][:, taken[s]: taken[s] + k]                 # (B,k) within scale s
                parts.append(local + self.scale_offsets[s])
                cut = window_patches(pixels, images[:, None].expand(B, k).reshape(-1), local.reshape(-1), self.taps, s)
                patches.append(cut.to(self.dtype).reshape(B, k, cfg.patch_dim))
                taken[s] += k
            steps.append(torch.cat(parts, dim=1))
            step_patches.append(torch.cat(patches, dim=1))
        selection = torch.zeros(B, cfg.highres_patches_total, dtype=torch.uint8, device=self.device)
        for s, r in enumerate(rankings):
            selection.scatter_(1, r[:, : taken[s]] + self.scale_offsets[s], 1)
        mark("planning")

        # high-res: the steps of equal length of all images in one call, rows step-major
        by_length = {}
        for pos, cut in zip(steps, step_patches):
            if pos.shape[1]:
                by_length.setdefault(pos.shape[1], []).append((pos, cut))
        positions, feats = [], []
        for n in sorted(by_length, reverse=True):
            group = torch.stack([pos for pos, _ in by_length[n]])              # (T_n,B,N)
            pos = group.reshape(-1, n)                                         # (T_n*B,N)
            patches = torch.stack([cut for _, cut in by_length[n]]).reshape(pos.shape[0], n, -1)   # (T_n*B,N,588)
            step_image = images.repeat(group.shape[0])                         # (T_n*B,)
            # one image: every row reads the one prefix (a broadcast, no gather)
            out = self._highres(patches, pos, kv, layer,
                                step_image if B > 1 else None)                # (T_n*B,N,C)
            positions.append(group.permute(1, 0, 2).reshape(B, -1))           # (B,T_n*N)
            feats.append(out.reshape(group.shape[0], B, n, cfg.width).permute(1, 0, 2, 3).reshape(B, -1, cfg.width))
            mark(f"highres[{pos.shape[0]}x{n}]")                               # one per call: T x N

        lowres_tokens = low_feats[0]                                           # (B,N0,C)
        if positions:
            order = torch.argsort(torch.cat(positions, dim=1), dim=1)          # (B,M) scale-major raster order
            high = torch.cat(feats, dim=1).gather(1, order[..., None].expand(-1, -1, cfg.width))
            tokens = torch.cat([lowres_tokens, high], dim=1)
        else:
            tokens = lowres_tokens
        mark("assemble")
        return FastResult(features=tokens, prob=prob, selection=selection, steps=steps)

    def _highres(self, patches, positions, kv_cache, layer, step_image):
        """`PS3.highres` for one call (T step rows x N tokens, row t of image step_image[t]) ->
        block `layer`'s output (T,N,C)."""
        m, cfg = self.model, self.cfg
        T, N = positions.shape
        N0 = kv_cache.shape[-2]
        x = m.trunk.patch_embed.forward_patches(patches) + self.position_table[positions]   # (T,N,C)
        kv_buffer = torch.empty(T, N0 + N, 2 * cfg.width, dtype=x.dtype, device=x.device)
        for i, block in enumerate(m.trunk.blocks[: layer + 1]):
            x = self.highres_block(block, x, kv_cache[i], kv_buffer, step_image)
        return x

    def highres_block(self, block, x, kv_prefix, kv_buffer, step_image=None):
        """One high-res block, the same arithmetic as `Block.forward(x, kv_prefix, step_image)`.

        x (T,N,C); kv_prefix (2,B,H,N0,D), the block's low-res K/V of the B images; step_image
        (T,) the image of each row (None: B is 1); kv_buffer (T,N0+N,2C) scratch.
        One layout change: the keys and values are written straight into kv_buffer, the low-res
        prefix of each row's image copied into its first N0 rows and each step's own K/V
        produced in place by the K/V half of the qkv projection (one matmul per step, `out=`),
        so nothing is concatenated (the concatenation took ~6 ms of a 53 ms 1.5K run on an
        H100). The attention reads K and V as strided (T,H,N0+N,D) views of the buffer.
        """
        T, N, C = x.shape
        N0 = self.write_prefix(kv_buffer, kv_prefix, step_image)
        w, b = block.attn.qkv.weight, block.attn.qkv.bias                            # (3C,C), (3C,)
        h = block.norm1(x)                                                           # (T,N,C)
        q = F.linear(h, w[:C], b[:C])                                                # (T,N,C)
        for t in range(T):
            torch.addmm(b[C:], h[t], w[C:].t(), out=kv_buffer[t, N0:])              # (N,2C)
        out = self.attend(q, kv_buffer)                                              # (T,H,N,D)
        x = x + block.attn.proj(out.transpose(1, 2).reshape(T, N, C))
        return x + block.mlp(block.norm2(x))

    @staticmethod
    def write_prefix(kv_buffer, kv_prefix, step_image=None) -> int:
        """Copy each row's image's low-res K/V, (2,B,H,N0,D), into the first N0 rows of its
        buffer row as [k | v] of 2C (step_image None: B is 1, broadcast); returns N0."""
        T, N0 = kv_buffer.shape[0], kv_prefix.shape[-2]
        prefix = kv_prefix.permute(1, 3, 0, 2, 4).reshape(-1, N0, kv_buffer.shape[-1])   # (B,N0,2C)
        if step_image is None:
            kv_buffer[:, :N0].copy_(prefix.expand(T, -1, -1))
        else:
            kv_buffer[:, :N0].copy_(prefix.index_select(0, step_image))
        return N0

    def attend(self, q, kv_buffer):
        """q (T,N,C) over the K and V that kv_buffer (T,N0+N,2C) holds, read as strided
        (T,H,N0+N,D) views -> (T,H,N,D)."""
        C = q.shape[-1]
        heads = lambda t: t.unflatten(-1, (self.cfg.num_heads, -1)).transpose(1, 2)   # noqa: E731
        return F.scaled_dot_product_attention(heads(q), heads(kv_buffer[..., :C]), heads(kv_buffer[..., C:]))

    # --- CUDA graphs --------------------------------------------------------------------------
    def graphed(self, pixels: torch.Tensor, counts, smooth=False, prompt=None, layer=None) -> FastResult:
        """Like forward, replayed from a CUDA graph for these shapes. The first run of a key is
        eager (a one-off image pays no capture), the second captures the graph, later ones
        replay it. A replayed result's tensors belong to the graph: the next replay overwrites them."""
        if self.device.type != "cuda":
            return self.forward(pixels, counts, smooth, prompt, layer=layer)
        layer = self.layer if layer is None else layer % self.cfg.depth
        key = (pixels.shape[0], tuple(map(tuple, counts)), smooth, prompt is None, layer)
        entry = self._graphs.get(key)
        if entry is None and key not in self._seen:
            self._seen.add(key)
            return self.forward(pixels, counts, smooth, prompt, layer=layer)
        if entry is None:
            static_pixels = pixels.to(self.dtype).clone()
            static_prompt = None if prompt is None else prompt.to(self.device, self.dtype).reshape(len(pixels), -1).clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):                                   # warm up kernels and allocator
                    self.forward(static_pixels, counts, smooth, static_prompt, layer=layer)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self.forward(static_pixels, counts, smooth, static_prompt, layer=layer)
            entry = self._graphs[key] = (graph, static_pixels, static_prompt, static_out)
        graph, static_pixels, static_prompt, static_out = entry
        static_pixels.copy_(pixels)
        if prompt is not None:
            static_prompt.copy_(prompt.reshape(len(pixels), -1))
        graph.replay()
        return static_out

    def counts(self, settings: LookCloseSettings, rule: BudgetRule | str = DEFAULT_BUDGET_RULE) -> list[list[int]]:
        """counts[t][s] for `forward`: the planner's, split by `rule` (planning.BudgetRule)."""
        return step_counts(settings, self.geometry, rule)
