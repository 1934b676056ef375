"""Our own Qwen2 decoder, written against the Hugging Face Qwen2 weights, for ONNX export.

One forward serves prefill (past length 0, S prompt positions) and decode (S = 1), with the KV
cache as explicit tensors in and out, so the legacy exporter traces one graph with dynamic S and P:

    inputs_embeds (1, S, H), past_kv (L, 2, 1, Hkv, P, D)
      -> logits (1, V) and hidden (1, H) of the LAST position (hidden after the final RMSNorm,
         what transformers returns as hidden_states[-1]), present_kv (L, 2, 1, Hkv, P+S, D)

Per layer (pre-norm):  x += o_proj(attn(rope(q), rope(k), v))  with q/k/v = proj(RMSNorm(x)),
                       x += down(silu(gate(RMSNorm(x))) * up(RMSNorm(x)))
Attention is grouped-query (each of Hkv key/value heads serves H/Hkv query heads), causal over
[past ; new] positions; rotary embedding rotate-half style at absolute positions P..P+S-1.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def rms_norm(x, weight, eps: float):
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Qwen2Decoder(nn.Module):
    """Holds references to a transformers `Qwen2ForCausalLM`'s weights (no copy)."""

    def __init__(self, hf_model):
        super().__init__()
        cfg = hf_model.config
        if getattr(cfg, "use_sliding_window", False):
            raise NotImplementedError("Qwen2 sliding-window attention is not supported by the exported decoder")
        rope_scaling = getattr(cfg, "rope_scaling", None) or {}
        if rope_scaling.get("rope_type", rope_scaling.get("type", "default")) != "default":
            raise NotImplementedError(f"rope scaling {rope_scaling} is not supported by the exported decoder")
        self.num_layers = cfg.num_hidden_layers
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        self.model = hf_model.model                  # embed_tokens, layers, norm
        self.lm_head = hf_model.lm_head
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, inputs_embeds, past_kv):
        # inputs_embeds (1,S,H); past_kv (L,2,1,Hkv,P,D)
        S = inputs_embeds.shape[1]
        P = past_kv.shape[4]
        positions = torch.arange(S, device=inputs_embeds.device).float() + P          # (S,)
        freqs = positions[:, None] * self.inv_freq[None, :]                               # (S,D/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(inputs_embeds.dtype), emb.sin().to(inputs_embeds.dtype)  # (S,D)
        # causal mask over [past ; new]: query i (absolute P+i) sees key j <= P+i
        key_pos = torch.arange(S, device=inputs_embeds.device) + P                        # new keys
        all_keys = torch.cat([torch.arange(P, device=inputs_embeds.device), key_pos])     # (P+S,)
        allowed = all_keys[None, :] <= key_pos[:, None]                                    # (S,P+S)
        mask = torch.zeros(allowed.shape, dtype=inputs_embeds.dtype, device=inputs_embeds.device)
        mask = mask.masked_fill(~allowed, torch.finfo(inputs_embeds.dtype).min)

        group = self.num_heads // self.num_kv_heads
        x = inputs_embeds
        presents = []
        for i, layer in enumerate(self.model.layers):
            attn = layer.self_attn
            h = rms_norm(x, layer.input_layernorm.weight, self.eps)
            q = attn.q_proj(h).view(1, S, self.num_heads, self.head_dim).transpose(1, 2)     # (1,Hq,S,D)
            k = attn.k_proj(h).view(1, S, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (1,Hkv,S,D)
            v = attn.v_proj(h).view(1, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            k = torch.cat([past_kv[i, 0], k], dim=2)                                         # (1,Hkv,P+S,D)
            v = torch.cat([past_kv[i, 1], v], dim=2)
            presents.append(torch.stack([k, v]))                                             # (2,1,Hkv,P+S,D)
            # grouped-query: (1,Hkv,group,S,D) against (1,Hkv,1,P+S,D)
            qg = q.reshape(1, self.num_kv_heads, group, S, self.head_dim)
            scores = torch.matmul(qg, k.unsqueeze(2).transpose(-1, -2)) * (self.head_dim ** -0.5)
            probs = torch.softmax(scores.float() + mask.float(), dim=-1).to(q.dtype)
            out = torch.matmul(probs, v.unsqueeze(2))                                        # (1,Hkv,g,S,D)
            out = out.reshape(1, self.num_heads, S, self.head_dim).transpose(1, 2).reshape(1, S, -1)
            x = x + attn.o_proj(out)
            h = rms_norm(x, layer.post_attention_layernorm.weight, self.eps)
            mlp = layer.mlp
            x = x + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
        hidden = rms_norm(x[:, -1], self.model.norm.weight, self.eps)                       # (1,H)
        logits = self.lm_head(hidden)                                                        # (1,V)
        return logits, hidden, torch.stack(presents)                                         # (L,2,1,Hkv,P+S,D)

    def empty_cache(self, dtype=torch.float32):
        return torch.zeros(self.num_layers, 2, 1, self.num_kv_heads, 0, self.head_dim, dtype=dtype)
