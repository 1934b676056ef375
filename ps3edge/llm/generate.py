"""Token generation over an LLM engine: greedy or sampled, max new tokens, stop tokens, streaming.

    prefill(prompt embeddings) -> logits -> pick a token -> (stop?) -> decode(embedding of it) -> ...

Greedy takes the arg-max (ties: the lowest id). Sampling divides the logits by `temperature`, keeps
the smallest set of most likely tokens whose probability reaches `top_p` (nucleus) and draws from
it with a numpy generator seeded by `seed`, so a (prompt, seed) pair always gives the same answer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import Ps3EdgeError


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0          # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()

    def validate(self) -> "SamplingConfig":
        if self.max_new_tokens < 1:
            raise Ps3EdgeError(f"max new tokens must be at least 1, got {self.max_new_tokens}")
        if not 0 <= self.temperature < float("inf"):
            raise Ps3EdgeError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise Ps3EdgeError(f"top-p must be in (0, 1], got {self.top_p}")
        return self


@dataclass
class Generation:
    token_ids: list[int]
    stop_reason: str                  # "stop_token" | "max_new_tokens" | "stopped" (on_token returned true)
    timings_ms: dict = field(default_factory=dict)


def pick_token(logits: np.ndarray, cfg: SamplingConfig, rng: np.random.Generator) -> int:
    if cfg.temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / cfg.temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    cumulative = np.cumsum(probs[order])
    keep = order[: int(np.searchsorted(cumulative, cfg.top_p) + 1)]      # reaches top_p
    p = probs[keep] / probs[keep].sum()
    return int(keep[rng.choice(len(keep), p=p)])


def generate(engine, prompt_embeds: np.ndarray, embed: Callable[[int], np.ndarray], cfg: SamplingConfig,
             on_token: Callable[[int], object] | None = None, context_length: int | None = None) -> Generation:
    """Prefill `prompt_embeds` (S, H) on a reset engine, then decode token by token; `on_token`
    sees each token kept, and a true return ends the generation after it."""
    cfg = cfg.validate()
    rng = np.random.default_rng(cfg.seed)
    engine.reset()
    t0 = time.perf_counter()
    out = engine.prefill(prompt_embeds)
    times = {"llm_prefill": (time.perf_counter() - t0) * 1e3}
    length = len(prompt_embeds)
    ids, reason = [], "max_new_tokens"
    t0 = time.perf_counter()
    while True:
        token = pick_token(out.logits, cfg, rng)
        if token in cfg.stop_token_ids:
            reason = "stop_token"
            break
        ids.append(token)
        if on_token is not None and on_token(token):
            reason = "stopped"                 # the caller has what it asked for (a stop string, a client gone)
            break
        if len(ids) >= cfg.max_new_tokens or (context_length is not None and length >= context_length):
            break
        out = engine.decode(embed(token))
        length += 1
    times["llm_decode"] = (time.perf_counter() - t0) * 1e3
    return Generation(ids, reason, times)
