"""LLM engines: prefill and decode on `inputs_embeds`, one interface, three implementations.

    engine.reset()
    out = engine.prefill(embeds)      # (S, H) float32 -> StepOutput(logits (V,), hidden (H,))
    out = engine.decode(embed)        # (H,) one new position against the cache so far

`logits` and `hidden` are those of the last position (hidden = after the final RMSNorm, i.e.
transformers' hidden_states[-1]). A prefill after a prefill or decode continues the same cache
(chunked prefill); `reset()` starts a new sequence.

- `TorchLLM`: transformers' `Qwen2ForCausalLM` with its `DynamicCache` (the reference).
- `OnnxLLM`: the graph `export_llm` writes from our `Qwen2Decoder` (explicit KV tensors), run on
  onnxruntime; the cache lives in numpy between calls.
- `DecoderLLM`: our `Qwen2Decoder` in PyTorch (what the ONNX graph was traced from).
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import defaults
from ..errors import Ps3EdgeError
from ..exporter.spec import StageSpec, TensorSpec
from .qwen2 import Qwen2Decoder


@dataclass
class StepOutput:
    logits: np.ndarray          # (V,) float32, last position
    hidden: np.ndarray          # (H,) float32, last position, after the final norm


def llm_spec(num_layers: int, num_kv_heads: int, head_dim: int, hidden: int, vocab: int) -> StageSpec:
    """The exported decoder: dynamic new positions S and past length P; P+S is `T`."""
    kv = lambda length: (num_layers, 2, 1, num_kv_heads, length, head_dim)      # noqa: E731
    return StageSpec("llm",
                     inputs=(TensorSpec("inputs_embeds", "float32", (1, "S", hidden)),
                             TensorSpec("past_kv", "float32", kv("P"))),
                     outputs=(TensorSpec("logits", "float32", (1, vocab)),
                              TensorSpec("hidden", "float32", (1, hidden)),
                              TensorSpec("present_kv", "float32", kv("T"))))


def _check_embeds(embeds: np.ndarray, hidden: int) -> np.ndarray:
    embeds = np.asarray(embeds, dtype=np.float32)
    if embeds.ndim == 1:
        embeds = embeds[None]
    if embeds.ndim != 2 or embeds.shape[1] != hidden or embeds.shape[0] == 0:
        raise Ps3EdgeError(f"LLM input must be (positions, {hidden}) embeddings, got {embeds.shape}")
    return embeds


class TorchLLM:
    """transformers' Qwen2ForCausalLM; the cache is its DynamicCache."""

    def __init__(self, hf_model):
        self.model = hf_model.eval()
        self.hidden_size = hf_model.config.hidden_size
        self.reset()

    def reset(self):
        from transformers import DynamicCache
        self.cache = DynamicCache()
        self.length = 0

    def _step(self, embeds) -> StepOutput:
        x = torch.from_numpy(_check_embeds(embeds, self.hidden_size))[None]
        positions = torch.arange(self.length, self.length + x.shape[1])[None]
        with torch.inference_mode():
            out = self.model(inputs_embeds=x, past_key_values=self.cache, use_cache=True,
                             output_hidden_states=True, position_ids=positions,
                             cache_position=positions[0], logits_to_keep=1)
        self.cache = out.past_key_values
        self.length += x.shape[1]
        return StepOutput(out.logits[0, -1].float().numpy(), out.hidden_states[-1][0, -1].float().numpy())

    prefill = _step
    decode = _step


class DecoderLLM:
    """Our Qwen2Decoder in PyTorch, with the same explicit cache the ONNX graph uses."""

    def __init__(self, hf_model):
        self.decoder = Qwen2Decoder(hf_model).eval()
        self.hidden_size = hf_model.config.hidden_size
        self.reset()

    def reset(self):
        self.kv = self.decoder.empty_cache()

    def _step(self, embeds) -> StepOutput:
        x = torch.from_numpy(_check_embeds(embeds, self.hidden_size))[None]
        with torch.inference_mode():
            logits, hidden, self.kv = self.decoder(x, self.kv)
        return StepOutput(logits[0].numpy(), hidden[0].numpy())

    prefill = _step
    decode = _step

    @property
    def length(self) -> int:
        return int(self.kv.shape[4])


class OnnxLLM:
    """The exported decoder on onnxruntime; the KV cache is passed in and out as numpy."""

    def __init__(self, path: Path, providers=None):
        from ..runtime.backends import OnnxRuntimeStage
        self.stage = OnnxRuntimeStage(Path(path), providers)
        inputs = {i.name: i for i in self.stage.session.get_inputs()}
        if set(inputs) != {"inputs_embeds", "past_kv"}:
            raise Ps3EdgeError(f"{Path(path).name} is not an exported ps3edge LLM (inputs {sorted(inputs)})")
        shape = inputs["past_kv"].shape
        self.kv_shape = (shape[0], 2, 1, shape[3], 0, shape[5])
        self.hidden_size = inputs["inputs_embeds"].shape[2]
        self.reset()

    def reset(self):
        self.kv = np.zeros(self.kv_shape, dtype=np.float32)

    def _step(self, embeds) -> StepOutput:
        x = _check_embeds(embeds, self.hidden_size)[None]
        out = self.stage.infer({"inputs_embeds": x, "past_kv": self.kv})
        self.kv = out["present_kv"]
        return StepOutput(out["logits"][0], out["hidden"][0])

    prefill = _step
    decode = _step

    @property
    def length(self) -> int:
        return int(self.kv.shape[4])


def export_llm(hf_model, path, opset: int = defaults.DEFAULT_OPSET) -> Path:
    """Our decoder over `hf_model`'s weights to one ONNX graph (dynamic S and P), written atomically."""
    from ..exporter.onnx_export import _export_stage

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    decoder = Qwen2Decoder(hf_model.float().eval()).eval()
    cfg = hf_model.config
    spec = llm_spec(decoder.num_layers, decoder.num_kv_heads, decoder.head_dim, cfg.hidden_size, cfg.vocab_size)
    gen = torch.Generator().manual_seed(0)
    # S=3 new positions after P=2 past ones: distinct sizes so the tracer keeps both axes symbolic
    example = (torch.randn(1, 3, cfg.hidden_size, generator=gen),
               torch.randn(decoder.num_layers, 2, 1, decoder.num_kv_heads, 2, decoder.head_dim, generator=gen))
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.export-"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            written = _export_stage(decoder, example, spec, opset, staging / "scratch", staging / spec.file)
        if len(written) != 1:
            raise Ps3EdgeError("this LLM is too large for one ONNX file; external-data LLM export is not implemented")
        written[0].chmod(0o644)
        written[0].replace(path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path
