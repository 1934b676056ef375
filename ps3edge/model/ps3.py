"""PS3 in plain PyTorch, written as the stages that ps3edge exports.

Weight-compatible with the official `ps3-torch` `PS3VisionEncoder`: every parameter has the
official name (without the `vision_model.` prefix), so a published checkpoint loads as is.

Notation (1.5K / 4K):  C = width (1152), L = depth (27), H = heads (16), D = C / H (72),
G0 = 27 low-res grid, N0 = G0*G0 = 729 low-res tokens, S_max = 1512 / 3780 input size,
g_s = 54, 108 (, 270) high-res grids, P = sum g_s^2 = 14580 / 87480 high-res patches,
R = number of returned layers, B = images in one pass, T = look-close steps in one call (of
any of the B images), N <= 2560 tokens per step.

The three stages:

  lowres(pixels (B,3,S_max,S_max))
      -> lowres_features (R,B,N0,C), kv_cache (L,2,B,H,N0,D),
         selection_features (B,C,G0,G0), conv_features (B,C',2*G0,2*G0)
  selector(selection_features, conv_features, prompt (B,C)) -> prob (B,G0,G0)
  highres(patches (T,N,588), positions (T,N) int32, step_image (T,) int32, kv_cache)
      -> highres_features (R,T,N,C)

The high-res patches a highres call reads are not a stage output: no stage resizes the image to
every high-res scale (at 4K that table, P x 588, was 196 MiB fp32 per image, of which one step
reads at most 2560 rows). model/patches.py cuts each selected patch from the normalised pixels
the lowres stage was given: patch (scale s, row r, col c) is rows r*14..r*14+13 and columns
c*14..c*14+13 of the image resized to s, and those output pixels read 56 source rows and 56
source columns (4 bicubic taps each), so it gathers that (3,56,56) window and applies the same
height-then-width 4-tap arithmetic as `separable_bicubic_resize`. Both write the 4-tap sum out
(x0*w0 + x1*w1 + x2*w2 + x3*w3, left to right), elementwise fp32 products and sums that torch,
numpy and onnxruntime all round as IEEE does, so a windowed patch equals the full resize's bit
for bit on every backend.

Each step row of a highres call names the image whose low-res K/V cache it attends to
(`step_image`), so one call holds the steps of several images; a step still sees only its own
image's N0 cached keys and its own N tokens.

Choosing which patches to look at (planning) is not a network: it lives in runtime/planning.py.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import PS3Config
from .. import defaults


# ------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------

class Mlp(nn.Module):
    """fc1 -> exact GELU -> (LayerNorm) -> fc2, as timm's Mlp."""

    def __init__(self, dim_in: int, dim_hidden: int, dim_out: int, norm_eps: float | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim_in, dim_hidden)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(dim_hidden, eps=norm_eps) if norm_eps is not None else nn.Identity()
        self.fc2 = nn.Linear(dim_hidden, dim_out)

    def forward(self, x):
        return self.fc2(self.norm(self.act(self.fc1(x))))


class Attention(nn.Module):
    """Multi-head self-attention whose keys/values may be prefixed by a cached set.

    x (B,N,C), kv_prefix (2,B',H,N0,D) with B' = B or 1 (broadcast over the steps of a call), or
    any B' with prefix_index (B,) naming the prefix row each of the B sequences attends to.
    Returns the output (B,N,C) and this call's own keys and values, each (B,H,N,D).

    Keys and values are concatenated token-major, (B,N0+N,C) with rows of C contiguous, and
    the attention reads them as (B,H,N0+N,D) views (on an H100 this built K/V in 0.20 ms per
    5x2560 block against 0.22 ms heads-first; the GPU fast path avoids the copy altogether,
    `runtime/fast.py: FastLookClose.highres_block`).
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def _heads(self, x):                                      # (B,L,C) -> (B,H,L,D), a view
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(self, x, kv_prefix=None, prefix_index=None, keep_kv: bool = True):
        """keep_kv=False returns None for this call's keys and values: theirs are views of the
        qkv projection, which would otherwise stay alive through the block's MLP."""
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, C).unbind(2)   # each (B,N,C), token-major
        k_all, v_all = k, v
        if kv_prefix is not None:
            n_prefix = kv_prefix.shape[1]
            k_prefix = kv_prefix[0].transpose(1, 2).reshape(n_prefix, -1, C)   # (B',N0,C)
            v_prefix = kv_prefix[1].transpose(1, 2).reshape(n_prefix, -1, C)
            if prefix_index is not None:                                        # (B,N0,C)
                k_prefix, v_prefix = k_prefix.index_select(0, prefix_index), v_prefix.index_select(0, prefix_index)
            k_all = torch.cat([k_prefix.expand(B, -1, -1), k], dim=1)         # (B,N0+N,C)
            v_all = torch.cat([v_prefix.expand(B, -1, -1), v], dim=1)
        out = F.scaled_dot_product_attention(self._heads(q), self._heads(k_all), self._heads(v_all))
        out = out.transpose(1, 2).reshape(B, N, C)            # (B,H,N,D) -> (B,N,C)
        if not keep_kv:
            return self.proj(out), None, None
        return self.proj(out), self._heads(k), self._heads(v)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)); x + mlp(norm2(x))."""

    def __init__(self, cfg: PS3Config):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.attn = Attention(cfg.width, cfg.num_heads)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.mlp = Mlp(cfg.width, cfg.mlp_dim, cfg.width)

    def forward(self, x, kv_prefix=None, prefix_index=None, keep_kv: bool = True):
        attn_out, k, v = self.attn(self.norm1(x), kv_prefix, prefix_index, keep_kv)
        x = x + attn_out
        del attn_out                                          # freed before the MLP's activations
        x = x + self.mlp(self.norm2(x))
        return x, k, v


class PatchEmbed(nn.Module):
    """14x14 patches -> C channels. The weight is the official Conv2d's (C,3,14,14)."""

    def __init__(self, cfg: PS3Config):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward_image(self, image):                 # (B,3,S,S) -> (B,(S/14)^2,C)
        return self.proj(image).flatten(2).transpose(1, 2)

    def forward_patches(self, patches):             # (..., 588) -> (..., C)
        weight = self.proj.weight.reshape(self.proj.weight.shape[0], -1)   # (C, 588), (c,kh,kw) order
        return patches @ weight.t() + self.proj.bias


class Trunk(nn.Module):
    """The SigLIP ViT: patch embedding, learned G0 x G0 position table, L blocks, no final norm."""

    def __init__(self, cfg: PS3Config):
        super().__init__()
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.lowres_tokens, cfg.width))   # (1,N0,C)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7 -> LayerNorm -> Mlp(4x) -> per-channel scale (named `weight`) + shortcut."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim, dim)
        self.weight = nn.Parameter(torch.ones(dim))   # the official ConvNeXt "gamma", renamed

    def forward(self, x):                             # (B,c,h,w)
        y = self.conv_dw(x).permute(0, 2, 3, 1)       # (B,h,w,c)
        y = self.mlp(self.norm(y)).permute(0, 3, 1, 2)
        return x + y * self.weight.reshape(1, -1, 1, 1)


class ShallowConvNet(nn.Module):
    """The selector's high-res eye: (B,3,1512,1512) -> (B,C',54,54) with a stride-28 stem."""

    def __init__(self, cfg: PS3Config):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, cfg.conv_hidden, kernel_size=cfg.conv_kernel, stride=cfg.conv_kernel),
            LayerNorm2d(cfg.conv_hidden, eps=1e-6),
        )
        self.blocks = nn.Sequential(*[ConvNeXtBlock(cfg.conv_hidden) for _ in range(cfg.conv_depth)])
        self.out_proj = nn.Conv2d(cfg.conv_hidden, cfg.conv_out, kernel_size=1)

    def forward(self, x):
        return self.out_proj(self.blocks(self.stem(x)))


# ------------------------------------------------------------------------------------------
# PS3
# ------------------------------------------------------------------------------------------

def bicubic_resize(image, size: int):
    """The official resize between scales: bicubic in fp32, no antialias. Same size = identity."""
    if image.shape[-1] == size and image.shape[-2] == size:
        return image
    return F.interpolate(image.float(), size=(size, size), mode="bicubic", align_corners=False).to(image.dtype)


def cubic_taps(in_size: int, out_size: int):
    """Source rows (out,4) int32 and weights (out,4) float32 of PyTorch's bicubic: A = -0.75,
    half-pixel centres, edge indices clamped, no antialias.

    Computed in numpy (float64), so that a traced export sees two constants (int32 Gather
    indices, TensorRT-friendly) instead of a float64 / int64 subgraph. Under tracing the sizes
    arrive as traced scalars; int() fixes them, as the lowres stage's input shape is static."""
    in_size, out_size = int(in_size), int(out_size)
    A = -0.75
    x = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5
    x0 = np.floor(x)
    t = (x - x0)[:, None]
    d = np.concatenate([t + 1, t, 1 - t, 2 - t], axis=1)             # distance to each tap
    near = ((A + 2) * d - (A + 3)) * d * d + 1                         # |d| <= 1
    far = ((A * d - 5 * A) * d + 8 * A) * d - 4 * A                    # 1 < |d| < 2
    weights = np.where(d <= 1, near, far)
    rows = np.clip(x0[:, None] + np.array([-1.0, 0.0, 1.0, 2.0]), 0, in_size - 1).astype(np.int32)
    return torch.from_numpy(rows), torch.from_numpy(weights.astype(np.float32))


def separable_bicubic_resize(image, size: int):
    """`bicubic_resize` written as two 1-D 4-tap gathers (height, then width).

    Same arithmetic as F.interpolate(mode="bicubic") up to float rounding (~1e-6). The exporter
    uses it because onnxruntime's CPU Resize(cubic) takes seconds on a 3780 x 3780 image. Both
    passes gather whole rows, since onnxruntime's Gather along the innermost axis copies one
    element at a time: the height taps as rows of the image, then the width taps as rows of the
    transposed result (ps3-tiny-4k's whole lowres stage went from 2120 to 626 ms on this 2-core
    CPU). Height goes first so that the one transpose is of the image already shrunk to `size`
    rows: transposing the whole 3780 x 3780 image cost more than both gathers (torch, 1 thread:
    a resize to 378 took 1.58 s that way, 0.26 s this way; onnxruntime's 4K lowres stage on 2
    threads went from 700 to 609 ms).
    """
    B, C, H, W = image.shape
    if H == size and W == size:
        return image
    rows, weights = cubic_taps(H, size)                                # (size,4)
    x = four_taps([image.index_select(2, rows[:, a]) for a in range(4)], weights[:, :, None])   # (B,C,size,W)
    x = x.transpose(2, 3).contiguous()                                 # (B,C,W,size)
    rows, weights = cubic_taps(W, size)
    x = four_taps([x.index_select(2, rows[:, a]) for a in range(4)], weights[:, :, None])       # (B,C,size,size)
    return x.transpose(2, 3)


def four_taps(taps, weights):
    """taps[a] * weights[:, a] summed left to right: x0*w0 + x1*w1 + x2*w2 + x3*w3.

    Written out rather than a sum over an axis, whose order no backend promises: these are
    elementwise fp32 products and sums, rounded alike by torch, numpy and onnxruntime, so the
    windowed patches (model/patches.py) equal the full resize bit for bit. `weights` is (n,4,...)
    with whatever trailing axes broadcast against the taps."""
    return taps[0] * weights[:, 0] + taps[1] * weights[:, 1] + taps[2] * weights[:, 2] + taps[3] * weights[:, 3]


def image_to_patches(image, patch_size: int):
    """(B,3,S,S) -> (B,(S/p)^2,3*p*p) in raster order, each patch flattened as (c, kh, kw)."""
    B, C, S, _ = image.shape
    g = S // patch_size
    x = image.reshape(B, C, g, patch_size, g, patch_size)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, C * patch_size * patch_size)


def cosine_map(feature_map, prompt):
    """cos(feature at every position, prompt): (B,c,h,w), (B,c) -> (B,h,w)."""
    f = F.normalize(feature_map, dim=1)
    p = F.normalize(prompt, dim=-1)
    return (f * p[:, :, None, None]).sum(dim=1)


class PS3(nn.Module):
    """The PS3 vision encoder. Parameter names follow the official `PS3VisionEncoder`."""

    def __init__(self, cfg: PS3Config):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        C, num_hr = cfg.width, len(cfg.scales) - 1
        self.trunk = Trunk(cfg)
        select_dim = C * len(cfg.select_layers)
        # Mlp(4C -> 4C -> C * num_hr) with a LayerNorm (eps 1e-5, torch's default) in the middle.
        self.selection_feature_proj = Mlp(select_dim, select_dim, C * num_hr, norm_eps=1e-5)
        self.prior_prompt = nn.Parameter(torch.zeros(C))                            # (C,)
        self.pos_emb_residual = nn.ParameterList(
            [nn.Parameter(torch.zeros(1, g * g, C)) for g in cfg.highres_grids])    # (1,g_s^2,C)
        self.highres_selection_feature_module = ShallowConvNet(cfg)
        self.prompt_proj_for_highres = nn.Linear(C, cfg.conv_out * num_hr)

    # --- stage 1: low-res pass ------------------------------------------------------------
    def lowres(self, pixels, returned_layers, resize=bicubic_resize, kv_in_place: bool = False):
        """pixels (B,3,S_max,S_max), normalised. See the module docstring for the outputs.

        `resize` is `bicubic_resize`, or its gather form `separable_bicubic_resize` for export.
        `kv_in_place` (the torch runtime) writes each block's K/V straight into the cache instead
        of stacking the blocks' copies at the end (traced graphs keep the stack), so the cache
        (4K: 173 MiB) is not held twice; the same values.
        """
        cfg = self.cfg
        x = resize(pixels, cfg.scales[0])                               # (B,3,378,378)
        x = self.trunk.patch_embed.forward_image(x)                     # (B,N0,C)
        x = x + self.trunk.pos_embed

        depth = len(self.trunk.blocks)
        kept = {i % depth for i in (*returned_layers, *cfg.select_layers)}    # the hidden states read below
        hidden, kv, kv_cache = {}, [], None
        for i, block in enumerate(self.trunk.blocks):
            x, k, v = block(x)                                          # k, v: (B,H,N0,D)
            if i in kept:
                hidden[i] = x
            if not kv_in_place:
                kv.append(torch.stack([k, v]))                          # (2,B,H,N0,D)
                continue
            if kv_cache is None:
                kv_cache = k.new_empty((depth, 2) + tuple(k.shape))
            kv_cache[i, 0], kv_cache[i, 1] = k, v
        if not kv_in_place:
            kv_cache = torch.stack(kv)                                  # (L,2,B,H,N0,D)
        lowres_features = torch.stack([hidden[i % depth] for i in returned_layers])   # (R,B,N0,C)

        # Selection features: the chosen layers side by side, projected; scale 0's slice only,
        # because the official code gives every high-res scale the map of the first one.
        g0 = cfg.lowres_grid
        sel = torch.cat([hidden[i % depth] for i in cfg.select_layers], dim=-1)   # (B,N0,4C)
        sel = self.selection_feature_proj(sel)[..., : cfg.width]             # (B,N0,C)
        selection_features = sel.transpose(1, 2).unflatten(2, (g0, g0))     # (B,C,G0,G0)

        conv_input = resize(pixels, defaults.SELECTOR_CONV_INPUT_SIZE)         # (B,3,1512,1512)
        conv_features = self.highres_selection_feature_module(conv_input)       # (B,C',54,54)
        # the high-res patches are cut from `pixels` where a call needs them (model/patches.py)
        return lowres_features, kv_cache, selection_features, conv_features

    # --- stage 2: selector ----------------------------------------------------------------
    def selector(self, selection_features, conv_features, prompt):
        """Selection probability on the G0 x G0 grid: (B,C,G0,G0), (B,C',54,54), (B,C) -> (B,G0,G0)."""
        cfg = self.cfg
        lowres_logits = cosine_map(selection_features, prompt)              # (B,G0,G0)
        conv_prompt = self.prompt_proj_for_highres(prompt)[:, : cfg.conv_out]   # (B,C')
        conv_logits = cosine_map(conv_features, conv_prompt)                # (B,54,54)
        conv_logits = F.max_pool2d(conv_logits[:, None], kernel_size=2)[:, 0]   # (B,G0,G0)
        logits = ((lowres_logits + conv_logits) / 2 * 5.0).clamp(-10, 10)
        # sigmoid, written as the official softmax over [logit, 0] so that values match bit for bit
        return F.softmax(F.pad(logits[..., None], (0, 1)), dim=-1)[..., 0]

    # --- stage 3: high-res pass -----------------------------------------------------------
    def _pos_grid(self):
        """pos_embed as the (1,C,G0,G0) image the high-res scales resize."""
        g0 = self.cfg.lowres_grid
        return self.trunk.pos_embed.detach().float().reshape(1, g0, g0, self.cfg.width).permute(0, 3, 1, 2)

    def highres_position_table(self):
        """(P,C): for each scale, pos_embed resized to g_s (bicubic, antialiased) + its residual."""
        cfg = self.cfg
        grid = self._pos_grid()
        tables = []
        for g, residual in zip(cfg.highres_grids, self.pos_emb_residual):
            pos = F.interpolate(grid, size=(g, g), mode="bicubic", antialias=True)   # (1,C,g,g)
            pos = pos.permute(0, 2, 3, 1).reshape(g * g, cfg.width)
            tables.append(pos + residual.detach()[0])
        return torch.cat(tables, dim=0)

    def highres_position_rows(self, positions, channels: int = defaults.POSITION_ROWS_CHANNELS):
        """`highres_position_table()[positions]` without the (P,C) table, bit for bit: (T,N) -> (T,N,C).

        The table is the size of the residuals it is built from (4K: 87480 x 1152, 385 MiB), so
        holding both would keep every residual twice. Here each scale that `positions` reach is
        resized again, `channels` channels at a time (a 270 x 270 scale: 53 MiB for 192), and
        only the rows asked for are kept. The antialiased resize computes each channel on its own,
        so a slice of channels gives the full resize's values exactly, and the rows add the same
        two float32 numbers the table adds."""
        cfg = self.cfg
        flat = positions.reshape(-1).long()
        out = torch.empty(flat.shape[0], cfg.width, dtype=torch.float32, device=flat.device)
        grid = self._pos_grid().contiguous()          # channels first: the resize runs faster on it
        start = 0
        for g, residual in zip(cfg.highres_grids, self.pos_emb_residual):
            where = ((flat >= start) & (flat < start + g * g)).nonzero().squeeze(1)
            local = flat[where] - start
            start += g * g
            if not len(where):
                continue
            rows = residual.detach()[0].index_select(0, local).float()                  # (n,C)
            for c in range(0, cfg.width, channels):
                pos = F.interpolate(grid[:, c: c + channels], size=(g, g), mode="bicubic", antialias=True)
                pos = pos.flatten(2)[0].index_select(1, local).t()                        # (n,channels)
                rows[:, c: c + channels] = pos + rows[:, c: c + channels]
            out.index_copy_(0, where, rows)
        return out.reshape(*positions.shape, cfg.width)

    def highres(self, patches, positions, step_image, kv_cache, position_table, returned_layers):
        """patches (T,N,588), positions (T,N) int, step_image (T,) int, kv_cache (L,2,B,H,N0,D)
        -> (R,T,N,C).

        The T steps are independent: step t attends to [image step_image[t]'s low-res K/V ; its
        own N tokens]. position_table: the (P,C) `highres_position_table()`, or None to build
        just the rows `positions` name (`highres_position_rows`).
        """
        x = self.trunk.patch_embed.forward_patches(patches)                # (T,N,C)
        x = x + (self.highres_position_rows(positions) if position_table is None else position_table[positions])
        outputs = {}
        last = max(returned_layers)            # blocks after the last returned layer are not run
        for i, block in enumerate(self.trunk.blocks[: last + 1]):
            x, _, _ = block(x, kv_prefix=kv_cache[i], prefix_index=step_image, keep_kv=False)
            if i in returned_layers:
                outputs[i] = x
        return torch.stack([outputs[i] for i in returned_layers])          # (R,T,N,C)
