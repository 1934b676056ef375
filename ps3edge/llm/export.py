"""Exporting VILA-HD: a preset or checkpoint -> a VILA-HD artifact directory, and the export cache
of `ps3edge chat`.

Artifact: `vila.json` (artifact/vila.py: schema, source, LLM shape, context, sha256 of every
file), `ps3/` (a PS3 artifact, layer -2), `projector.onnx`, `llm.onnx`, `embed_tokens.npy`,
`prompt_head.npz` (the top-down head's weight / bias), `tokenizer/`. It is written like every
artifact: under the target's writer lock, staged in a temporary sibling and renamed into place.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from .. import defaults
from ..version import __version__
from ..errors import Ps3EdgeError
from ..artifact.io import file_sha256, found_at, publish_dir, temp_dir
from ..artifact.lock import writer_lock
from ..artifact.outdir import prepare_out_dir
from ..artifact.vila import LLMShape, VilaManifest, build_vila_manifest, is_vila_artifact, load_vila_manifest
from .engine import export_llm
from ..model.hub import Checkpoint
from .vila import VILA_LAYER, VILA_PRESETS, VilaHD, build_vila, checkpoint_sha256, load_vila, locate_vila


def export_vila(model_spec: str, out_dir, seed: int = defaults.DEFAULT_SEED, opset: int = defaults.DEFAULT_OPSET,
                progress: Callable[[str], None] | None = None) -> VilaManifest:
    """Export every stage VILA-HD needs into `out_dir`, which must be absent or empty."""
    say = progress or (lambda msg: None)
    target = prepare_out_dir(out_dir, overwrite=False)
    say(f"loading {model_spec}")
    model = build_vila(model_spec, seed, say)         # a bad model path fails before any directory is made
    with writer_lock(target.path):
        target = prepare_out_dir(out_dir, overwrite=False)     # again, now that no other writer runs
        return _export_locked(model, target.path, opset, say, target.publish)


def _export_locked(model: VilaHD, out_dir: Path, opset: int, say, publish: Callable[[Path], None]) -> VilaManifest:
    """Stage the whole artifact beside `out_dir` and rename it into place with `publish(staging)`.
    The caller holds `out_dir`'s writer lock."""
    from ..exporter.onnx_export import export as export_ps3, export_projector

    staging = temp_dir(out_dir.parent, out_dir.name, "export")
    try:
        say("exporting PS3 stages")
        ps3_manifest = export_ps3(model.ps3, staging / "ps3", opset=opset, returned_layers=(VILA_LAYER,))
        say("exporting the projector")
        export_projector(model.projector, staging / "projector.onnx", opset=opset)
        say("exporting the LLM")
        export_llm(model.llm, staging / "llm.onnx", opset=opset)
        np.save(staging / "embed_tokens.npy", model.llm.get_input_embeddings().weight.detach().float().numpy())
        if model.top_down_head is not None:
            np.savez(staging / "prompt_head.npz", weight=model.top_down_head.weight.detach().float().numpy(),
                     bias=model.top_down_head.bias.detach().float().numpy())
        model.tokenizer.save_pretrained(str(staging / "tokenizer"))
        files = {f.relative_to(staging).as_posix(): file_sha256(f)
                 for f in sorted(staging.rglob("*")) if f.is_file() and not f.relative_to(staging).parts[0] == "ps3"}
        manifest = build_vila_manifest(model.source, model.context_length, opset, llm_shape(model.llm.config),
                                       model.top_down_head is not None, files, ps3_manifest)
        manifest.write(staging)
        publish(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def llm_shape(cfg) -> LLMShape:
    """The dimensions vila.json records, from a transformers Qwen2 config."""
    return LLMShape(hidden_size=cfg.hidden_size, num_layers=cfg.num_hidden_layers, num_heads=cfg.num_attention_heads,
                    num_kv_heads=cfg.num_key_value_heads, vocab_size=cfg.vocab_size,
                    head_dim=cfg.hidden_size // cfg.num_attention_heads)


# ------------------------------------------------------------------------------------------
# the export cache of `ps3edge chat`
# ------------------------------------------------------------------------------------------

def cache_dir_for(model_spec: str, seed: int, checkpoint: Checkpoint | None = None) -> Path:
    """Where `ps3edge chat` keeps the export of a model: one directory per preset+seed or checkpoint
    (`checkpoint`: where `model_spec` was found; a hub snapshot's directory is its commit's)."""
    root = Path(os.environ.get("PS3EDGE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ps3edge")
    if model_spec in VILA_PRESETS:
        key = f"{model_spec}-seed{seed}"
    else:
        path = checkpoint.path if checkpoint is not None else Path(model_spec)
        name = checkpoint.hub.repo_id.replace("/", "--") if checkpoint is not None and checkpoint.hub else path.name
        key = f"{name}-{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]}"
    return root / f"vila-{__version__}" / key


def ensure_artifacts(model_spec: str, seed: int = defaults.DEFAULT_SEED, progress=None) -> Path:
    """The cached export of `model_spec`, exporting it first if absent or stale."""
    say = progress or (lambda msg: None)
    checkpoint = None if model_spec in VILA_PRESETS else locate_vila(model_spec, say)
    art = cache_dir_for(model_spec, seed, checkpoint)
    if _is_current(art, model_spec, checkpoint):
        return art
    say(f"loading {model_spec}")
    model = build_vila(model_spec, seed) if checkpoint is None else load_vila(checkpoint)
    with writer_lock(art):
        if _is_current(art, model_spec, checkpoint, model.source.get("sha256")):    # exported meanwhile
            return art
        stale = is_vila_artifact(art)                # a stale export: swapped out once the new one is in place
        if art.exists() and not stale:              # a cache directory without vila.json: not an artifact
            shutil.rmtree(art)
        start = found_at(art)                       # ps3edge's own cache: whatever is there is replaced
        _export_locked(model, art, defaults.DEFAULT_OPSET, say,
                       lambda staging: publish_dir(staging, art, replace=stale, start=start,
                                                   may_replace=lambda moved: None))
    return art


def _is_current(art: Path, model_spec: str, checkpoint: Checkpoint | None, sha256: str | None = None) -> bool:
    """Whether the cached export is of `model_spec` as it is now: a preset's export always is; a hub
    snapshot's when it is of the same commit (the hub's files of a commit never change); a
    directory's when its files' digest (`sha256`, computed here when not given) is the recorded one.
    A cached export whose vila.json is refused (an older schema, an edit by hand) is not current:
    the cache is ps3edge's own, so it is exported again."""
    if not is_vila_artifact(art):
        return False
    try:
        source = load_vila_manifest(art, verify=False).source
    except Ps3EdgeError:
        return False
    if checkpoint is None:
        return model_spec in VILA_PRESETS
    if checkpoint.commit is not None:
        return source.get("commit") == checkpoint.commit
    return source.get("sha256") == (sha256 or checkpoint_sha256(checkpoint.path))
