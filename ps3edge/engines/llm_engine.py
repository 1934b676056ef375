"""`ps3edge build` on a VILA-HD artifact: the projector and the LLM -> TensorRT engines.

The PS3 stages under `ps3/` are built by the stage builder (builder.build) as for any PS3
artifact; this module builds the two VILA-HD files next to them and records both in `vila.json`
(an `engines` section, and each engine file with its sha256 in `files`, so the artifact's
verification covers them). Everything else is the stage builder's: the plan (StagePlan), the
ONNX route (_build_from_onnx), the engine-cache key, the engine cache, the timing cache, the
machine facts (TensorRT version, SM, JetPack) and the manifest entry.

The LLM engine has two optimization profiles (S new positions, P past positions, C the
context length from vila.json, `--max-prompt` M, default min(C - 1, DEFAULT_LLM_MAX_PROMPT)):

    0 prefill   inputs_embeds (1, S, H)  S in [1, M], opt M
                past_kv       P in [0, C - 1], opt 0
    1 decode    inputs_embeds (1, 1, H)
                past_kv       P in [1, C - 1], opt M

Zero-length past at prefill: TensorRT supports empty tensors (a dimension of length 0) on
network inputs, and a profile minimum of 0 declares it, so a fresh sequence's prefill runs the
same engine with past_kv of shape (L, 2, 1, Hkv, 0, D) - no dummy position, no second graph, the
attention is exact. The runtime (llm/engine.py TensorRTLLM) keeps the KV buffers allocated at
full context, so even an empty past is bound to a valid address. The decode profile exists for
kernel selection at S = 1 (its shapes are a subset of prefill's); P + S <= C is checked by the
runtime, as a profile cannot express a sum. A prompt longer than M is prefilled in chunks of M.

The projector engine has one profile: cells (M_cells, 4C), M_cells in [1, M], opt 196 (the
low-res image; projected tokens must fit in a prompt anyway).

Precision: fp32 (TF32 off) or fp16 (TensorRT 10's FP16 flag; the LLM has no FP16 precision map
or FP16 ONNX, so TensorRT 11 refuses fp16 here). int8 and best are refused for VILA-HD artifacts.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable, Mapping

from ..errors import Ps3EdgeError
from ..artifact.engines import EngineEntry
from ..artifact.spec import StageSpec, llm_spec, projector_spec
from ..artifact.vila import VILA_MANIFEST, VilaManifest, load_vila_manifest
from ..artifact.vila import is_vila_artifact          # noqa: F401  (`ps3edge build` imports it from here)
from ..model.config import is_whole_number
from .builder import (BuildOptions, StagePlan, _build_from_onnx, engine_entry, inspect_engine,
                      reuse_or_build, workspace_bytes)
from .cache import EngineCache, engine_cache_key
from .platform import import_tensorrt, machine_facts, version_tuple

DEFAULT_LLM_MAX_PROMPT = 4096            # VILA-HD 1.5K with every patch selected: 3841 image tokens + text
PROJECTOR_OPT_CELLS = 196                # the low-res image: 14 x 14 cells
VILA_ENGINE_STAGES = ("projector", "llm")
LLM_PROFILE_NAMES = ("prefill", "decode")


def max_prompt_for(manifest: VilaManifest, max_prompt=None) -> int:
    """`--max-prompt`: at most C - 1 positions (one is left for the first generated token)."""
    context = manifest.context_length
    if context < 2:
        raise Ps3EdgeError(f"the VILA-HD artifact's context length {context} leaves no room for a prompt")
    if max_prompt is None:
        return min(context - 1, DEFAULT_LLM_MAX_PROMPT)
    if isinstance(max_prompt, str):
        try:
            max_prompt = int(max_prompt.strip())
        except ValueError:
            raise Ps3EdgeError(f"--max-prompt must be a whole number, got '{max_prompt}'") from None
    if not is_whole_number(max_prompt) or not 1 <= max_prompt <= context - 1:
        raise Ps3EdgeError(f"--max-prompt must be between 1 and {context - 1} (the context length {context} "
                           f"less one position to generate), got {max_prompt}")
    return max_prompt


def _shape(dims) -> list[int]:
    return [int(d) for d in dims]


def llm_profiles(manifest: VilaManifest, max_prompt=None) -> dict[str, dict[str, dict[str, list[int]]]]:
    """"prefill" / "decode" -> input -> {"min", "opt", "max"}, from vila.json's LLM and context."""
    m = max_prompt_for(manifest, max_prompt)
    c = manifest.context_length
    llm = manifest.llm
    hidden = llm.hidden_size
    kv = lambda p: _shape((llm.num_layers, 2, 1, llm.num_kv_heads, p, llm.head_dim))    # noqa: E731
    return {
        "prefill": {"inputs_embeds": {"min": [1, 1, hidden], "opt": [1, m, hidden], "max": [1, m, hidden]},
                    "past_kv": {"min": kv(0), "opt": kv(0), "max": kv(c - 1)}},
        "decode": {"inputs_embeds": {"min": [1, 1, hidden], "opt": [1, 1, hidden], "max": [1, 1, hidden]},
                   "past_kv": {"min": kv(1), "opt": kv(min(m, c - 1)), "max": kv(c - 1)}},
    }


def projector_width(art: Path) -> int:
    """4C, the projector's input channels, read from the ONNX graph (no weights loaded)."""
    import onnx

    model = onnx.load(str(Path(art) / "projector.onnx"), load_external_data=False)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return int(dims[1].dim_value)


def _stage_specs(manifest: VilaManifest, width4: int) -> dict[str, StageSpec]:
    """The inputs / outputs of the two engines (what inspect_engine matches an engine's tensors to)."""
    llm = manifest.llm
    return {"projector": projector_spec(width4 // 4, llm.hidden_size),
            "llm": llm_spec(llm.num_layers, llm.num_kv_heads, llm.head_dim, llm.hidden_size, llm.vocab_size)}


def vila_stage_specs(manifest: VilaManifest, width4: int) -> dict[str, dict]:
    """The same in the stage-manifest form (the runtime makes the projector's StageEntry of it)."""
    return {name: spec.to_dict() for name, spec in _stage_specs(manifest, width4).items()}


def plan_vila_build(manifest: VilaManifest, options: BuildOptions, tensorrt_version: str, sm: int, width4: int,
                    max_prompt=None) -> list[StagePlan]:
    """The projector's and the LLM's StagePlan (pure: no TensorRT needed)."""
    options.validate()
    if options.via != "onnx":
        raise Ps3EdgeError("the VILA-HD projector and LLM engines are built from their ONNX files; use --via onnx")
    if options.precision not in ("fp32", "fp16"):
        raise Ps3EdgeError(f"--precision {options.precision}: the VILA-HD projector and LLM are built at fp32 or "
                           "fp16 (ps3edge calibrate quantizes PS3 stages only)")
    if options.precision == "fp16" and version_tuple(tensorrt_version)[0] >= 11:
        raise Ps3EdgeError(f"TensorRT {tensorrt_version} has no FP16 builder flag and the VILA-HD LLM has no FP16 "
                           "ONNX; build it at fp32, or with TensorRT 10")
    m = max_prompt_for(manifest, max_prompt)
    llm = llm_profiles(manifest, m)
    projector = {"cells": {"min": [1, width4], "opt": [min(PROJECTOR_OPT_CELLS, m), width4], "max": [m, width4]}}
    fp16 = options.precision == "fp16"
    plans = []
    for stage, profile, extra in (("projector", projector, ()), ("llm", llm["prefill"], (llm["decode"],))):
        onnx_file = f"{stage}.onnx"
        if onnx_file not in manifest.files:
            raise Ps3EdgeError(f"the VILA-HD artifact's {VILA_MANIFEST} does not list {onnx_file}")
        plan = StagePlan(stage=stage, onnx_file=onnx_file, source_files=[onnx_file], precision=options.precision,
                         strongly_typed=False, flags=("FP16",) if fp16 else (),
                         clear_flags=() if fp16 else ("TF32",), fp32_nodes=(), fp32_tensors=(),
                         profile=profile, max_look_close=0, extra_profiles=extra,
                         note=f"stage '{stage}': fp16 without a precision map (every layer may run in fp16)"
                         if fp16 else "")
        plan.key_inputs = {
            "onnx_hashes": {onnx_file: manifest.files[onnx_file]},
            "flags": {"stage": stage, "via": "onnx", "precision": plan.precision, "strongly_typed": False,
                      "set": sorted(plan.flags), "clear": sorted(plan.clear_flags),
                      "profiles": [profile, *extra], "workspace_bytes": workspace_bytes(options.workspace_gb),
                      "optimization_level": options.optimization_level},
        }
        plan.key = engine_cache_key(plan.key_inputs["onnx_hashes"], plan.key_inputs["flags"], tensorrt_version, sm)
        plans.append(plan)
    return plans


def _entry(plan: StagePlan, options: BuildOptions, facts: dict, sha256: str, inspected: dict,
           manifest: VilaManifest, max_prompt: int) -> EngineEntry:
    """A PS3 stage's entry without T_max, with the max prompt (and for the LLM, the context and
    both profiles by name)."""
    llm = plan.stage == "llm"
    return replace(engine_entry(plan, options, facts, sha256, inspected), max_look_close=None, max_prompt=max_prompt,
                   context_length=manifest.context_length if llm else None,
                   optimization_profiles=dict(zip(LLM_PROFILE_NAMES, (plan.profile, *plan.extra_profiles)))
                   if llm else None)


def check_vila_options(art: Path, options: BuildOptions, max_prompt=None) -> VilaManifest:
    """Everything about a VILA-HD build that can fail without TensorRT; returns vila.json."""
    manifest = load_vila_manifest(Path(art), verify=True)
    plan_vila_build(manifest, options, "10.0.0", 0, projector_width(art), max_prompt)
    return manifest


def build_vila_engines(art, options: BuildOptions, max_prompt=None,
                       progress: Callable[[str], None] | None = None,
                       checked: VilaManifest | None = None) -> VilaManifest:
    """Build (or reuse) the projector and LLM engines of a VILA-HD artifact; returns vila.json.

    `checked`: vila.json as `check_vila_options` returned it for these options, when the caller
    has checked already (its files are hashed once: an LLM's ONNX can be tens of GB).
    Engine files are written atomically, then vila.json is replaced in one rename; files of
    engines a rebuild replaced are removed after that, new files again if the build fails."""
    say = progress or (lambda msg: None)
    art = Path(art)
    # nothing written, no TensorRT yet
    manifest = checked if checked is not None else check_vila_options(art, options, max_prompt)
    trt = import_tensorrt()
    facts = machine_facts(trt)
    width4 = projector_width(art)
    m = max_prompt_for(manifest, max_prompt)
    plans = plan_vila_build(manifest, options, facts["tensorrt_version"], facts["sm"], width4, m)
    specs = _stage_specs(manifest, width4)
    for plan in plans:
        if plan.note:
            say(plan.note)
    cache = EngineCache(options.engine_cache) if options.engine_cache else None

    def build_one(plan, timing):
        say(f"stage '{plan.stage}': building {plan.precision} engine from {plan.onnx_file}"
            + (f" (profiles prefill S <= {m}, decode; context {manifest.context_length})"
               if plan.stage == "llm" else f" (cells <= {m})"))
        engine_bytes, timing, _ = _build_from_onnx(trt, art, plan, options, timing, say)
        inspected = inspect_engine(trt, engine_bytes, specs[plan.stage])
        return engine_bytes, timing, lambda sha256: _entry(plan, options, facts, sha256, inspected, manifest, m)

    return reuse_or_build(art, plans, manifest.engines, options, cache, say, build_one, record_vila_engines)


def record_vila_engines(art: Path, entries: Mapping[str, EngineEntry]) -> VilaManifest:
    """vila.json with an `engines` section and every engine file's sha256 in `files`, replaced
    atomically (re-read first, so other sections written meanwhile are kept)."""
    manifest = load_vila_manifest(art, verify=False).with_engines(entries)
    manifest.write(art)
    return manifest

