"""`ps3edge calibrate VILA_ARTIFACT --precision int4`: write the weight-only INT4 LLM and token
embedding next to the FP32 ones, register them in vila.json, and measure them.

    VILA_ARTIFACT/llm.int4.onnx (+ llm.int4.onnx.data when large)    int4.py
    VILA_ARTIFACT/embed_tokens.int4.npz                               int4.py (Int4Embedding)
    VILA_ARTIFACT/vila.json   "precisions": {"int4": {...}}           artifact/vila.py
    VILA_ARTIFACT/accuracy.int4.json                                  int4_report.py

As the PS3 side's calibrate: under the artifact's writer lock, the new files are written under
temporary names first; vila.json then drops any previous int4 entry, the files are renamed into
place, and vila.json gains the new entry with every sha256 (VilaManifest.replace writes its
integrity record afresh). An interruption at any point leaves a consistent artifact, at worst
without int4. Running it again replaces the entry; the onnxruntime route is deterministic, so the
files come out the same. The FP32 files are never touched.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from .. import defaults
from ..version import __version__
from ..artifact.io import apply_default_mode, file_sha256, temp_file
from ..artifact.lock import writer_lock
from ..artifact.precisions import register_precision
from ..artifact.vila import LLMPrecision, VilaManifest, is_vila_artifact, load_vila_manifest
from ..calibration.calibrate import save_model
from ..errors import Ps3EdgeError
from .int4 import (FORMATS, Int4Embedding, Int4Settings, check_quantized, quantize_embedding, quantize_modelopt,
                   quantize_onnxruntime, resolve_tool, tool_version, weight_matmuls)
from .int4_report import Int4Report, llm_report, prompt_ids
from .tokenizer import load_tokenizer

PRECISION = "int4"


def calibrate_int4(artifact_dir, settings: Int4Settings | None = None, tool: str = "auto", report: bool = True,
                   progress: Callable[[str], None] | None = None) -> Int4Report | None:
    """Write and register the INT4 LLM of a VILA-HD artifact; returns its accuracy report (None
    without `report`)."""
    say = progress or (lambda msg: None)
    art = Path(artifact_dir)
    settings = (settings or Int4Settings()).validate()
    if not is_vila_artifact(art):
        raise Ps3EdgeError(f"--precision int4 quantizes the LLM of a VILA-HD artifact (with vila.json); {art} "
                           f"is not one")
    tool = resolve_tool(tool)
    load_vila_manifest(art, verify=True)
    if not os.access(art, os.W_OK):
        raise Ps3EdgeError(f"{art} is not writable")
    with writer_lock(art, "calibrating"):
        manifest = load_vila_manifest(art, verify=True)        # as it is now that no other writer runs
        staged: list[tuple[Path, str]] = []                    # (temporary path, final name) until registered
        try:
            entry = _write_int4(art, manifest, settings, tool, staged, say)
            say("registering the int4 LLM in vila.json")
            manifest = register_precision(art, manifest, PRECISION, entry, staged)
            staged = []
        finally:
            for tmp, _ in staged:
                tmp.unlink(missing_ok=True)
        if not report:
            return None
        rep = _report(art, manifest, manifest.precisions[PRECISION], say)
        _attach_report(art, manifest, rep)
        return rep


def _write_int4(art: Path, manifest: VilaManifest, settings: Int4Settings, tool: str, staged: list,
                say) -> LLMPrecision:
    """Quantize the LLM graph and the token embedding (their files added to `staged`); the entry."""
    src = art / "llm.onnx"
    say(f"quantizing llm.onnx to int4 ({FORMATS[tool]}, block {settings.block_size}, "
        f"{'symmetric' if settings.symmetric else 'asymmetric'})")
    model = onnx.load(str(src))
    expected = weight_matmuls(model)
    if tool == "modelopt":
        del model
        quantized = quantize_modelopt(src, settings, _calibration_feeds(art, manifest))
    else:
        quantized = quantize_onnxruntime(model, settings)
    nodes = check_quantized(quantized, expected, FORMATS[tool])
    say(f"{len(nodes)} MatMul weights in int4 (the output head among them)")
    staged += save_model(quantized, temp_file(art, defaults.INT4_FILE), defaults.INT4_FILE)
    llm_file, *external = [final for _, final in staged]

    say("quantizing the token embedding to int4")
    arrays = quantize_embedding(np.load(art / "embed_tokens.npy"), settings)
    tmp = temp_file(art, defaults.INT4_EMBED_FILE)
    staged.append((tmp, defaults.INT4_EMBED_FILE))
    with open(tmp, "wb") as f:                       # a file object: np.savez would add ".npz" to a name
        np.savez(f, **arrays)
    return LLMPrecision(producer=f"ps3edge {__version__}", tool=tool_version(tool), format=FORMATS[tool],
                        llm=llm_file, external_data=tuple(external), embed_tokens=defaults.INT4_EMBED_FILE,
                        settings={**settings.to_dict(), "quantized_nodes": len(nodes)})


def _calibration_feeds(art: Path, manifest: VilaManifest) -> list[Callable[[], dict]]:
    """Model Optimizer's AWQ inputs: the calibration prompts' embeddings, an empty cache."""
    tokenizer = load_tokenizer(art / "tokenizer")
    table = np.load(art / "embed_tokens.npy", mmap_mode="r")
    shape = manifest.llm
    empty = np.zeros((shape.num_layers, 2, 1, shape.num_kv_heads, 0, shape.head_dim), np.float32)

    def feed(text: str) -> Callable[[], dict]:
        return lambda: {"inputs_embeds": np.asarray(table[prompt_ids(tokenizer, text)], np.float32)[None],
                        "past_kv": empty}
    return [feed(t) for t in defaults.INT4_CALIBRATION_PROMPTS]


def _size(art: Path, names) -> int:
    return sum((art / n).stat().st_size for n in names)


def _report(art: Path, manifest: VilaManifest, entry: LLMPrecision, say) -> Int4Report:
    sizes = {"llm": {"fp32": _size(art, ["llm.onnx"]), PRECISION: _size(art, [entry.llm, *entry.external_data])},
             "embed_tokens": {"fp32": _size(art, ["embed_tokens.npy"]),
                              PRECISION: _size(art, [entry.embed_tokens or "embed_tokens.npy"])}}
    int4_table = (Int4Embedding.load(art / entry.embed_tokens) if entry.embed_tokens
                  else np.load(art / "embed_tokens.npy"))
    return llm_report(art / "llm.onnx", art / entry.llm, np.load(art / "embed_tokens.npy"), int4_table,
                      load_tokenizer(art / "tokenizer"), dict(entry.settings), sizes, progress=say)


def _attach_report(art: Path, manifest: VilaManifest, rep: Int4Report) -> None:
    name = defaults.ACCURACY_REPORT.format(precision=PRECISION)
    rep.write(art / name)
    apply_default_mode(art / name)
    entry = replace(manifest.precisions[PRECISION], report=name, summary=rep.summary())
    manifest.replace(files={**manifest.files, name: file_sha256(art / name)},
                     precisions={**manifest.precisions, PRECISION: entry}).write(art)
