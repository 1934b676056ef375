"""VILA-HD checkpoints: the `vila-hd-tiny` preset and the published directory layout (a local
directory, or a Hugging Face hub id resolved by model/hub.py to a snapshot of the files below).

    <dir>/config.json                  model_max_length (the context), look_close_mode, ... (optional)
    <dir>/llm/                         Hugging Face Qwen2: config.json, model.safetensors, tokenizer files
    <dir>/vision_tower/                PS3 (ps3edge.model.weights layout, keys vision_model.*)
    <dir>/mm_projector/                config.json + model.safetensors: layers.1 (LayerNorm),
                                       layers.2 / layers.4 (Linear), top_down_prompt_head (Linear,
                                       LLM hidden -> PS3 width; VILA keeps it in the projector)

A sharded LLM (`llm/model.safetensors.index.json`, as the 8B LLMs are stored) is loaded by transformers
shard by shard into the model, so the weights are never held twice.

`vila-hd-tiny` is ps3-tiny + projector(64 -> 64) + a 2-layer Qwen2 (hidden 64, 4 heads, 2 KV
heads, the 260-token byte-level tokenizer of `tokenizer.tiny_tokenizer`), all seeded; `save_vila`
writes it in the layout above, which is how the tests exercise `load_vila`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from .. import defaults
from ..errors import Ps3EdgeError
from ..artifact.io import found_at, publish_dir, temp_dir
from ..artifact.lock import writer_lock
from ..model.hub import Checkpoint, CheckpointFiles, locate
from ..model.projector import Projector, random_projector
from ..model.weights import (LoadedModel, build as build_ps3, file_sha256, load_checkpoint, read_json,
                             save_checkpoint, seeded_init_)
from .tokenizer import load_tokenizer, tiny_tokenizer

VILA_PRESETS = ("vila-hd-tiny",)
TINY_CONTEXT = 8192            # >= 6 * 2560 / 4 + 1024 = 4864, VILA-HD's rule for NUM_LOOK_CLOSE=6
TOP_DOWN_HEAD = "top_down_prompt_head"
VILA_LAYER = -2                # VILA-HD feeds PS3's second-to-last block to the projector
# What a hub snapshot of a VILA-HD checkpoint must hold: the layout above (tokenizer files included).
VILA_FILES = CheckpointFiles(
    "VILA-HD", ("config.json", "llm/*.json", "llm/*.safetensors", "llm/*.txt", "vision_tower/*.json",
                "vision_tower/*.safetensors", "mm_projector/*.json", "mm_projector/*.safetensors"),
    (("llm/config.json",), ("llm/model.safetensors", "llm/model.safetensors.index.json"),
     ("vision_tower/config.json",), ("vision_tower/model.safetensors", "vision_tower/model.safetensors.index.json"),
     ("mm_projector/*.safetensors",)))


@dataclass
class VilaHD:
    ps3: LoadedModel                       # vision tower
    projector: Projector                   # PS3 width -> LLM hidden
    top_down_head: nn.Linear | None        # LLM hidden -> PS3 width (None: bottom-up only)
    llm: nn.Module                         # transformers Qwen2ForCausalLM
    tokenizer: object
    context_length: int
    source: dict                           # {"kind": "preset", ...} or {"kind": "checkpoint", ...}


def _require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise Ps3EdgeError("VILA-HD needs transformers (pip install transformers tokenizers)") from None


def tiny_llm(vocab_size: int, seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=TINY_CONTEXT,
                      rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, sliding_window=None,
                      bos_token_id=None, eos_token_id=None, torch_dtype="float32")
    model = Qwen2ForCausalLM(cfg)
    seeded_init_(model, seed, unit_noise=("embed_tokens",))
    return model.eval()


def build_vila(spec: str, seed: int = defaults.DEFAULT_SEED, progress=None) -> VilaHD:
    """A preset name (seeded; it wins over a directory or hub id of that name), a VILA-HD checkpoint
    directory or a Hugging Face hub id."""
    _require_transformers()
    if spec in VILA_PRESETS:
        tok = tiny_tokenizer()
        ps3 = build_ps3("ps3-tiny", seed)
        projector = random_projector(ps3.cfg.width, 64, seed=seed + 1)
        head = nn.Linear(64, ps3.cfg.width)
        seeded_init_(head, seed + 2)
        llm = tiny_llm(len(tok), seed + 3)
        llm.config.eos_token_id = tok.eos_token_id
        return VilaHD(ps3, projector, head.eval(), llm, tok, TINY_CONTEXT,
                      {"kind": "preset", "name": spec, "seed": seed})
    return load_vila(locate_vila(spec, progress))


def locate_vila(spec: str, progress=None) -> Checkpoint:
    """The checkpoint `spec` names (not a preset): a directory, or a hub id's snapshot (fetched when needed)."""
    checkpoint = locate(spec, VILA_FILES, progress)
    if checkpoint is None:
        raise Ps3EdgeError(f"'{spec}' is neither a VILA-HD preset ({', '.join(VILA_PRESETS)}) nor a checkpoint "
                           "directory or Hugging Face hub id (owner/name)")
    return checkpoint


def is_vila_checkpoint(path) -> bool:
    path = Path(path)
    return all((path / d).is_dir() for d in ("llm", "vision_tower", "mm_projector"))


def _load_projector(path: Path, vision_width: int, llm_width: int):
    cfg = read_json(path / "config.json") if (path / "config.json").is_file() else {}
    kind = cfg.get("mm_projector_type", "mlp_downsample")
    if kind not in ("mlp_downsample", "mlp_downsample_2x2_fix"):
        raise Ps3EdgeError(f"{path}: projector type '{kind}' is not supported (VILA-HD uses mlp_downsample)")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise Ps3EdgeError(f"{path} has no .safetensors weights")
    tensors = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                tensors.update({k: st.get_tensor(k) for k in st.keys()})
        except Exception as e:  # safetensors' own error types
            raise Ps3EdgeError(f"cannot read weights {f}: {e}") from None
    proj = Projector(vision_width, llm_width)
    head = nn.Linear(llm_width, vision_width)
    expected = {**proj.state_dict()}
    head_keys = {f"{TOP_DOWN_HEAD}.{k}": v for k, v in head.state_dict().items()}
    problems = [f"missing {k}" for k in expected if k not in tensors]
    problems += [f"{k} {tuple(tensors[k].shape)} != {tuple(v.shape)}" for k, v in {**expected, **head_keys}.items()
                 if k in tensors and tensors[k].shape != v.shape]
    unexpected = [k for k in tensors if k not in expected and k not in head_keys]
    problems += [f"unexpected {k}" for k in unexpected]
    if problems:
        raise Ps3EdgeError(f"{path} does not match a {vision_width}->{llm_width} VILA-HD projector: "
                           + ", ".join(problems[:8]))
    proj.load_state_dict({k: tensors[k].float() for k in expected})
    if all(k in tensors for k in head_keys):
        head.load_state_dict({k.split(".", 1)[1]: tensors[k].float() for k in head_keys})
    else:
        head = None
    return proj.eval(), (head.eval() if head is not None else None)


def load_vila(path) -> VilaHD:
    """Load a VILA-HD directory (llm/, vision_tower/, mm_projector/): a path, or a hub.Checkpoint
    whose repo and commit the source records too."""
    _require_transformers()
    from transformers import Qwen2ForCausalLM

    checkpoint = path if isinstance(path, Checkpoint) else Checkpoint(Path(path))
    checkpoint.check(VILA_FILES)           # before transformers reads the LLM's shards (hub.py's rule)
    path = checkpoint.path
    missing = [d for d in ("llm", "vision_tower", "mm_projector") if not (path / d).is_dir()]
    if missing:
        raise Ps3EdgeError(f"{path} is not a VILA-HD checkpoint: no {', '.join(d + '/' for d in missing)}")
    top = read_json(path / "config.json") if (path / "config.json").is_file() else {}
    ps3 = load_checkpoint(checkpoint.sub("vision_tower"))
    llm_cfg = read_json(path / "llm" / "config.json") if (path / "llm" / "config.json").is_file() else None
    if llm_cfg is None:
        raise Ps3EdgeError(f"{path / 'llm'} has no config.json")
    if llm_cfg.get("model_type") != "qwen2":
        raise Ps3EdgeError(f"{path / 'llm'} holds a '{llm_cfg.get('model_type')}' model; ps3edge runs Qwen2 LLMs")
    try:
        llm = Qwen2ForCausalLM.from_pretrained(str(path / "llm"), local_files_only=True, torch_dtype=torch.float32)
    except Exception as e:  # transformers raises OSError / ValueError / RuntimeError for bad files
        raise Ps3EdgeError(f"cannot load the LLM in {path / 'llm'}: {str(e).splitlines()[0]}") from None
    tok = load_tokenizer(path / "llm")
    projector, head = _load_projector(path / "mm_projector", ps3.cfg.width, llm.config.hidden_size)
    if len(tok) > llm.config.vocab_size:
        raise Ps3EdgeError(f"the tokenizer has {len(tok)} tokens but the LLM's vocabulary only {llm.config.vocab_size}")
    limits = [int(llm.config.max_position_embeddings)]
    if isinstance(top.get("model_max_length"), int):
        limits.append(top["model_max_length"])
    source = {"kind": "checkpoint", "path": str(path.resolve()), "sha256": checkpoint_sha256(path),
              **checkpoint.source_fields()}
    return VilaHD(ps3, projector, head, llm.eval(), tok, min(limits), source)


def checkpoint_sha256(path) -> str:
    """One digest over every .json / .safetensors file of a checkpoint (names and contents)."""
    path = Path(path)
    digest = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file() and f.suffix in (".safetensors", ".json"):
            digest.update(f.relative_to(path).as_posix().encode())
            digest.update(file_sha256(f).encode())
    return digest.hexdigest()


def save_vila(model: VilaHD, path) -> Path:
    """Write `model` as a VILA-HD directory (absent or empty): under its writer lock, staged in a
    temporary sibling and renamed into place."""
    path = Path(path)
    _check_empty(path)
    with writer_lock(path):
        _check_empty(path)                    # again, now that no other writer runs
        start = found_at(path)                # a directory made meanwhile is someone else's: kept
        staging = temp_dir(path.parent, path.name, "save")
        try:
            _write_checkpoint(model, staging)
            publish_dir(staging, path, start=start)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return path


def _check_empty(path: Path) -> None:
    if path.exists() and any(path.iterdir()):
        raise Ps3EdgeError(f"{path} is not empty")


def _write_checkpoint(model: VilaHD, out: Path) -> None:
    """The checkpoint layout of the module docstring, written into the directory `out`."""
    model.llm.save_pretrained(str(out / "llm"), safe_serialization=True)
    model.tokenizer.save_pretrained(str(out / "llm"))
    save_checkpoint(model.ps3.model, out / "vision_tower")
    (out / "mm_projector").mkdir()
    state = {k: v.detach().contiguous() for k, v in model.projector.state_dict().items()}
    if model.top_down_head is not None:
        state.update({f"{TOP_DOWN_HEAD}.{k}": v.detach().contiguous()
                      for k, v in model.top_down_head.state_dict().items()})
    save_file(state, str(out / "mm_projector" / "model.safetensors"))
    (out / "mm_projector" / "config.json").write_text(json.dumps(
        {"model_type": "v2l_projector", "mm_projector_type": "mlp_downsample",
         "top_down_prompt_head_type": "linear"}, indent=2))
    (out / "config.json").write_text(json.dumps(
        {"model_type": "vila_hd", "model_max_length": model.context_length, "ps3": True,
         "look_close_mode": "after_prompt", "top_down_prompt_head_type": "linear",
         "mm_hidden_size": model.ps3.cfg.width, "hidden_size": model.llm.config.hidden_size}, indent=2))
