"""The accuracy report of an INT4 LLM: the INT4 precision (LLM graph and token embedding) against
the FP32 LLM of the same artifact, on a fixed set of held-out text prompts.

For each prompt (chat-templated, defaults.INT4_REPORT_PROMPTS) the FP32 LLM answers greedily for
`steps` tokens (stop tokens ignored, so every prompt gives the same number of steps). Then
- teacher-forced: both LLMs are fed the FP32 answer token by token; at each step the logits are
  compared (cosine, and whether the arg-max agrees: top-1 agreement) and the final-norm hidden
  states too (cosine: the top-down prompt head reads that hidden state);
- free-running: the INT4 precision answers greedily on its own; equal or not, and the first step
  where it differs.
The summary keeps the worst cosine over prompts and steps and checks it against
defaults.INT4_MIN_LOGIT_COSINE (pass / fail); top-1 agreement and equal answers are reported, not
judged (a seeded random model's logits are flat, so its arg-max flips on small errors). The file
sizes of both LLMs and both embeddings come with it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .. import defaults
from ..version import __version__
from ..artifact.io import write_json_atomic
from .engine import OnnxLLM


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denom) if denom > 0 else float(np.array_equal(a, b))


@dataclass
class PromptResult:
    text: str
    prompt_tokens: int
    logit_cosine: list[float]               # per step, teacher-forced
    hidden_cosine: list[float]
    top1_agree: list[bool]
    fp32_tokens: list[int]
    int4_tokens: list[int]                  # free-running greedy

    @property
    def greedy_equal(self) -> bool:
        return self.fp32_tokens == self.int4_tokens

    @property
    def first_difference(self) -> int | None:
        return next((i for i, (a, b) in enumerate(zip(self.fp32_tokens, self.int4_tokens)) if a != b), None)

    def to_dict(self) -> dict:
        return {**asdict(self), "min_logit_cosine": min(self.logit_cosine),
                "top1_agreement": float(np.mean(self.top1_agree)), "greedy_equal": self.greedy_equal,
                "first_difference": self.first_difference}


@dataclass
class Int4Report:
    settings: dict
    tolerance: dict = field(default_factory=lambda: {"min_logit_cosine": defaults.INT4_MIN_LOGIT_COSINE})
    prompts: list[PromptResult] = field(default_factory=list)
    sizes: dict = field(default_factory=dict)          # bytes: {"llm": {"fp32", "int4"}, "embed_tokens": {...}}
    steps: int = defaults.INT4_REPORT_STEPS
    precision: str = "int4"

    @property
    def ok(self) -> bool:
        return self.summary()["min_logit_cosine"] >= self.tolerance["min_logit_cosine"]

    def summary(self) -> dict:
        """What vila.json records of the report (and calibrate prints)."""
        cos = [c for p in self.prompts for c in p.logit_cosine]
        hid = [c for p in self.prompts for c in p.hidden_cosine]
        agree = [a for p in self.prompts for a in p.top1_agree]
        return {"min_logit_cosine": round(min(cos), 6), "mean_logit_cosine": round(float(np.mean(cos)), 6),
                "min_hidden_cosine": round(min(hid), 6), "top1_agreement": round(float(np.mean(agree)), 4),
                "greedy_equal": sum(p.greedy_equal for p in self.prompts), "prompts": len(self.prompts),
                "steps": self.steps, "pass": min(cos) >= self.tolerance["min_logit_cosine"],
                "sizes": self.sizes}

    def to_dict(self) -> dict:
        return {"precision": self.precision, "producer": f"ps3edge {__version__}", "reference": "fp32",
                "settings": self.settings, "tolerance": self.tolerance, "summary": self.summary(),
                "prompts": [p.to_dict() for p in self.prompts]}

    def write(self, path: Path) -> None:
        write_json_atomic(Path(path), self.to_dict())


def _greedy(llm, embed, prompt: np.ndarray, steps: int) -> list[int]:
    llm.reset()
    out, tokens = llm.prefill(prompt), []
    for _ in range(steps):
        tokens.append(int(np.argmax(out.logits)))
        if len(tokens) < steps:
            out = llm.decode(embed([tokens[-1]])[0])
    return tokens


def _teacher_forced(ref, test, ref_embed, test_embed, prompt_ids, tokens: list[int]):
    """Per-step (logit cosine, hidden cosine, top-1 agrees) of `test` against `ref`, both fed `tokens`."""
    ref.reset()
    test.reset()
    a, b = ref.prefill(ref_embed(prompt_ids)), test.prefill(test_embed(prompt_ids))
    rows = []
    for i, token in enumerate(tokens):
        rows.append((_cosine(a.logits, b.logits), _cosine(a.hidden, b.hidden),
                     int(np.argmax(a.logits)) == int(np.argmax(b.logits))))
        if i + 1 < len(tokens):
            a, b = ref.decode(ref_embed([token])[0]), test.decode(test_embed([token])[0])
    return rows


def prompt_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                              tokenize=True))


def llm_report(fp32_llm: Path, int4_llm: Path, fp32_table, int4_table, tokenizer, settings: dict, sizes: dict,
               prompts=defaults.INT4_REPORT_PROMPTS, steps: int = defaults.INT4_REPORT_STEPS,
               progress: Callable[[str], None] | None = None) -> Int4Report:
    """The report of `int4_llm` (with `int4_table`) against `fp32_llm` (with `fp32_table`)."""
    say = progress or (lambda msg: None)
    ref_embed = lambda ids: np.asarray(fp32_table[np.asarray(ids, np.int64)], np.float32)    # noqa: E731
    test_embed = lambda ids: np.asarray(int4_table[np.asarray(ids, np.int64)], np.float32)   # noqa: E731
    report = Int4Report(settings=settings, sizes=sizes, steps=steps)
    with OnnxLLM(fp32_llm) as ref, OnnxLLM(int4_llm) as test:
        for n, text in enumerate(prompts, 1):
            say(f"int4 report: prompt {n} of {len(prompts)}")
            ids = prompt_ids(tokenizer, text)
            fp32_tokens = _greedy(ref, ref_embed, ref_embed(ids), steps)
            rows = _teacher_forced(ref, test, ref_embed, test_embed, ids, fp32_tokens)
            int4_tokens = _greedy(test, test_embed, test_embed(ids), steps)
            report.prompts.append(PromptResult(text, len(ids), [round(r[0], 6) for r in rows],
                                               [round(r[1], 6) for r in rows], [r[2] for r in rows],
                                               fp32_tokens, int4_tokens))
    return report
