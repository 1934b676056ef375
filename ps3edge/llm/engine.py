"""LLM engines: prefill and decode on `inputs_embeds`, one interface (`LLMRunner`), four
implementations.

    engine.reset()
    out = engine.prefill(embeds)      # (S, H) float32 -> StepOutput(logits (V,), hidden (H,))
    out = engine.decode(embed)        # (H,) one new position against the cache so far
    engine.close()                    # or `with engine:`; a closed engine refuses further calls

`logits` and `hidden` are those of the last position (hidden = after the final RMSNorm, i.e.
transformers' hidden_states[-1]). A prefill after a prefill or decode continues the same cache
(chunked prefill); `reset()` starts a new sequence.

- `TorchLLM`: transformers' `Qwen2ForCausalLM` with its `DynamicCache` (the reference).
- `OnnxLLM`: the graph `export_llm` writes from our `Qwen2Decoder` (explicit KV tensors), run on
  onnxruntime; the cache lives in numpy between calls.
- `DecoderLLM`: our `Qwen2Decoder` in PyTorch (what the ONNX graph was traced from).
- `TensorRTLLM`: the engine `ps3edge build` makes of that graph (engines/llm_engine.py), with a
  prefill profile (index 0) and a decode profile (index 1) in one execution context; the cache
  stays on the GPU between calls in two full-context torch CUDA buffers used in turn (past in
  one, present written into the other, no copy).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import defaults
from ..errors import Ps3EdgeError
from ..artifact.spec import llm_spec
from .qwen2 import Qwen2Decoder


@dataclass
class StepOutput:
    logits: np.ndarray          # (V,) float32, last position
    hidden: np.ndarray          # (H,) float32, last position, after the final norm


class LLMRunner:
    """What every LLM engine provides: `reset`, `prefill`, `decode`, and the lifecycle of the
    stage runners (runtime/runners/base.py): `close()` frees the model / session / engine and
    its cache, `with engine:` closes on exit, and a closed engine refuses further calls.
    Implementations provide `reset()`, `_step(embeds)` and `_release()`."""

    closed = False

    def prefill(self, embeds) -> StepOutput:
        """(S, H) new positions against the cache so far (a chunk of a longer prompt, or all of it)."""
        self._refuse_if_closed()
        return self._step(embeds)

    def decode(self, embed) -> StepOutput:
        """One new position (H,) against the cache so far."""
        self._refuse_if_closed()
        return self._step(embed)

    def close(self) -> None:
        if not self.closed:
            self._release()
            self.closed = True

    def __enter__(self):
        self._refuse_if_closed()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _refuse_if_closed(self) -> None:
        if self.closed:
            raise Ps3EdgeError(f"this {type(self).__name__} is closed; load the LLM again")

    def reset(self) -> None:
        raise NotImplementedError

    def _step(self, embeds) -> StepOutput:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError


def _check_embeds(embeds: np.ndarray, hidden: int) -> np.ndarray:
    embeds = np.asarray(embeds, dtype=np.float32)
    if embeds.ndim == 1:
        embeds = embeds[None]
    if embeds.ndim != 2 or embeds.shape[1] != hidden or embeds.shape[0] == 0:
        raise Ps3EdgeError(f"LLM input must be (positions, {hidden}) embeddings, got {embeds.shape}")
    return embeds


class TorchLLM(LLMRunner):
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

    def _release(self) -> None:
        self.model = self.cache = None


class DecoderLLM(LLMRunner):
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

    def _release(self) -> None:
        self.decoder = self.kv = None

    @property
    def length(self) -> int:
        return int(self.kv.shape[4])


class OnnxLLM(LLMRunner):
    """The exported decoder on onnxruntime; the KV cache is passed in and out as numpy."""

    def __init__(self, path: Path, providers=None):
        from ..runtime.runners.onnxruntime import OnnxRuntimeRunner
        self.stage = OnnxRuntimeRunner.from_path(Path(path), providers=providers)
        inputs = self.stage.input_metadata()
        if set(inputs) != {"inputs_embeds", "past_kv"}:
            raise Ps3EdgeError(f"{Path(path).name} is not an exported ps3edge LLM (inputs {sorted(inputs)})")
        shape = inputs["past_kv"][1]
        self.kv_shape = (shape[0], 2, 1, shape[3], 0, shape[5])
        self.hidden_size = inputs["inputs_embeds"][1][2]
        self.reset()

    def reset(self):
        self.kv = np.zeros(self.kv_shape, dtype=np.float32)

    def _step(self, embeds) -> StepOutput:
        x = _check_embeds(embeds, self.hidden_size)[None]
        out = self.stage.infer({"inputs_embeds": x, "past_kv": self.kv})
        self.kv = out["present_kv"]
        return StepOutput(out["logits"][0], out["hidden"][0])

    def _release(self) -> None:
        self.stage.close()
        self.kv = None

    @property
    def length(self) -> int:
        return int(self.kv.shape[4])


def export_llm(hf_model, path, opset: int = defaults.DEFAULT_OPSET) -> Path:
    """Our decoder over `hf_model`'s weights to one ONNX graph (dynamic S and P), written atomically."""
    from ..exporter.onnx_export import export_single_file

    decoder = Qwen2Decoder(hf_model.float().eval()).eval()
    cfg = hf_model.config
    spec = llm_spec(decoder.num_layers, decoder.num_kv_heads, decoder.head_dim, cfg.hidden_size, cfg.vocab_size)
    gen = torch.Generator().manual_seed(0)
    # S=3 new positions after P=2 past ones: distinct sizes so the tracer keeps both axes symbolic
    example = (torch.randn(1, 3, cfg.hidden_size, generator=gen),
               torch.randn(decoder.num_layers, 2, 1, decoder.num_kv_heads, 2, decoder.head_dim, generator=gen))
    return export_single_file(decoder, example, spec, path, opset, "this LLM is too large for one ONNX file; "
                              "external-data LLM export is not implemented")


class TensorRTLLM(LLMRunner):
    """The LLM engine of `ps3edge build` on one execution context, same interface as OnnxLLM.

    Profile 0 (prefill) serves a fresh sequence (past length 0: an empty tensor, see
    engines/llm_engine.py) and every call with more than one new position; profile 1 (decode)
    serves S = 1 against a non-empty cache. The context switches profile with
    set_optimization_profile_async only when the next call needs the other one. Input shapes and
    tensor addresses are set on every call (the KV buffers alternate). A prefill longer than the
    engine's max prompt runs in chunks (a prefill continues the cache)."""

    def __init__(self, path: Path, entry, trt=None, stream=None):
        from ..engines.platform import import_tensorrt
        from ..runtime.runners.tensorrt import open_engine, torch_dtype

        trt = trt or import_tensorrt()
        self.path = Path(path)
        self.bindings = dict(entry.bindings or {})
        for name in ("inputs_embeds", "past_kv", "logits", "hidden", "present_kv"):
            self.bindings.setdefault(name, name)
        profiles = entry.optimization_profiles or {}
        if set(profiles) != {"prefill", "decode"}:
            raise Ps3EdgeError(f"{self.path.name} has no prefill and decode profiles in its manifest entry; "
                               "rebuild it with 'ps3edge build'")
        self.context_length = int(entry.context_length)
        self.max_prompt = int(profiles["prefill"]["inputs_embeds"]["max"][1])
        self.hidden_size = int(profiles["prefill"]["inputs_embeds"]["max"][2])
        kv_max = tuple(profiles["prefill"]["past_kv"]["max"])
        self.kv_shape = kv_max[:4] + (0,) + kv_max[5:]
        self.decode_min_past = int(profiles["decode"]["past_kv"]["min"][4])
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.stream = stream or torch.cuda.Stream()
        self._runtime, self.engine, self.context = open_engine(trt, self.path)
        if self.engine.num_optimization_profiles != 2:
            raise Ps3EdgeError(f"{self.path.name} has {self.engine.num_optimization_profiles} optimization "
                               "profiles, expected 2 (prefill, decode); rebuild it with 'ps3edge build'")
        dtype = lambda name: torch_dtype(self.engine.get_tensor_dtype(self.bindings[name]))   # noqa: E731
        full = int(np.prod(kv_max[:4] + (self.context_length,) + kv_max[5:]))
        # two cache buffers at full context: one holds the past, the engine writes the present into the other
        self.kv = [torch.empty(full, dtype=dtype("past_kv"), device=self.device) for _ in range(2)]
        if dtype("present_kv") != dtype("past_kv"):
            raise Ps3EdgeError(f"{self.path.name} takes past_kv as {dtype('past_kv')} but returns {dtype('present_kv')}")
        self.embeds = torch.empty(self.max_prompt * self.hidden_size, dtype=dtype("inputs_embeds"), device=self.device)
        vocab = int(self.engine.get_tensor_shape(self.bindings["logits"])[-1])
        self.logits = torch.empty(vocab, dtype=dtype("logits"), device=self.device)
        self.hidden = torch.empty(self.hidden_size, dtype=dtype("hidden"), device=self.device)
        self.profile = 0                       # a new context starts on profile 0
        self.reset()

    def reset(self):
        self.length = 0
        self.current = 0                       # which kv buffer holds the past

    def _set_shape(self, name: str, shape: tuple) -> None:
        if not self.context.set_input_shape(self.bindings[name], shape):
            raise Ps3EdgeError(f"the LLM engine does not take {name} of shape {shape} (profile {self.profile})")

    def _address(self, name: str, tensor: torch.Tensor) -> None:
        if not self.context.set_tensor_address(self.bindings[name], tensor.data_ptr()):
            raise Ps3EdgeError(f"TensorRT refused the buffer of '{name}' in {self.path.name}")

    def _run(self, x: torch.Tensor) -> None:
        """One engine call: x (S, H) on the GPU, S <= max_prompt, against the cache so far."""
        s, p = int(x.shape[0]), self.length
        if p + s > self.context_length:
            raise Ps3EdgeError(f"{p + s} positions do not fit the LLM engine's context of {self.context_length}")
        profile = 1 if (s == 1 and p >= self.decode_min_past) else 0
        if profile != self.profile:
            try:      # the binding raises RuntimeError on failure (it returns True otherwise)
                self.context.set_optimization_profile_async(profile, self.stream.cuda_stream)
            except RuntimeError as e:
                raise Ps3EdgeError(f"TensorRT cannot switch {self.path.name} to its "
                                   f"{('prefill', 'decode')[profile]} profile: {str(e).splitlines()[0]}") from None
            self.profile = profile
        past, present = self.kv[self.current], self.kv[1 - self.current]
        self.embeds[: x.numel()].view(1, s, self.hidden_size).copy_(x[None])
        self._set_shape("inputs_embeds", (1, s, self.hidden_size))
        self._set_shape("past_kv", self.kv_shape[:4] + (p,) + self.kv_shape[5:])
        for name, buf in (("inputs_embeds", self.embeds), ("past_kv", past), ("present_kv", present),
                          ("logits", self.logits), ("hidden", self.hidden)):
            self._address(name, buf)
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise Ps3EdgeError(f"TensorRT failed to run the LLM engine ({self.path.name})")
        got = tuple(self.context.get_tensor_shape(self.bindings["present_kv"]))
        if got[4] != p + s:
            raise Ps3EdgeError(f"the LLM engine returned a cache of {got[4]} positions, expected {p + s}")
        self.current, self.length = 1 - self.current, p + s

    def _step(self, embeds) -> StepOutput:
        x = _check_embeds(embeds, self.hidden_size)
        with torch.cuda.stream(self.stream):
            src = torch.from_numpy(x).to(self.device, non_blocking=False)
            for start in range(0, len(src), self.max_prompt):
                self._run(src[start: start + self.max_prompt])
            logits, hidden = self.logits.float().cpu(), self.hidden.float().cpu()
        self.stream.synchronize()
        return StepOutput(logits.numpy(), hidden.numpy())

    def _release(self) -> None:
        # the buffers and the context go before their engine, the engine before its runtime
        self.kv = self.embeds = self.logits = self.hidden = None
        self.context = None
        self.engine = None
        self._runtime = None

    def present(self) -> torch.Tensor:
        """The cache so far on the GPU, (L, 2, 1, Hkv, length, D) (a view, valid until the next call)."""
        shape = self.kv_shape[:4] + (self.length,) + self.kv_shape[5:]
        return self.kv[self.current][: int(np.prod(shape))].view(shape)
