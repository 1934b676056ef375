"""The public Python API: load an artifact once, run camera frames through PS3's look-close loop.

    import ps3edge

    with ps3edge.load("art/") as encoder:                  # backend, device, precision: as `ps3edge run`
        result = encoder.run(frame, channels="bgr")          # an OpenCV / ROS bgr8 frame
        results = encoder.run_batch([cam0, cam1, cam2], channels="bgr",
                                    settings=ps3edge.LookCloseSettings(num_look_close=2))

A frame is a path, a PIL image, a numpy uint8 (H, W, 3) / (H, W) array or a torch uint8 tensor on
the CPU or CUDA (runtime/frames.py); the same pixels give bit-identical results in every form.
A result is a `LookCloseResult` (runtime/result.py). `settings=None` runs the artifact's own
defaults: the VILA-HD environment variables are read by the command line, and from Python only
through `settings_from_env()`, so a library call does not change with its caller's shell.

This is the layer the command line, serving, extraction and streams call; everything under it
(runtime, runners, artifact) may change shape, this does not without a deprecation.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np
from PIL import Image

from . import defaults
from .artifact.vila import VILA_MANIFEST, load_vila_manifest
from .errors import Ps3EdgeError
from .runtime.frames import Frame, is_tensor
from .runtime.lookclose import Pipeline
from .runtime.planning import LookCloseSettings, settings_from_env
from .runtime.result import LookCloseResult

__all__ = ["Encoder", "load"]

PromptEmbedding = Union[np.ndarray, Sequence[float]]


class Encoder:
    """A PS3 artifact loaded on one backend, device and precision: frames in, results out.

    Made by `ps3edge.load`. `run` takes one frame, `run_batch` a list of them (passes of at
    most `max_batch` frames each, the artifact's bound). `close()` frees the sessions, engines
    and the device program; `with` closes on exit; a closed encoder refuses further calls."""

    def __init__(self, pipeline: Pipeline):
        self._pipeline = pipeline

    # --- what was loaded ---------------------------------------------------------------------
    @property
    def pipeline(self) -> Pipeline:
        """The runtime's Pipeline under this encoder: its stages one by one (run_lowres,
        run_from_lowres, run_known), for tools built on ps3edge such as the stream's reuse of work
        between frames. Frames go through `run` / `run_batch`; this is the lower, staged face."""
        return self._pipeline

    @property
    def artifact(self) -> Path:
        return self._pipeline.artifact_dir

    @property
    def backend(self) -> str:
        return self._pipeline.backend

    @property
    def device(self) -> str:
        """Where it computes: cpu / cuda:N for the torch backend; what the runners chose for
        the others (onnxruntime: its execution provider, e.g. "CPU EP")."""
        device = self._pipeline.device
        return self._pipeline.session.device_label if device.is_auto else str(device)

    @property
    def precision(self) -> str:
        return self._pipeline.precision

    @property
    def manifest(self):
        """The artifact's checked manifest (artifact/manifest.py)."""
        return self._pipeline.manifest

    @property
    def max_batch(self) -> int:
        """Most frames one pass takes; `run_batch` splits longer lists into passes of this size."""
        return self._pipeline.max_batch

    # --- running -------------------------------------------------------------------------------
    def run(self, frame: Frame, settings: Optional[LookCloseSettings] = None,
            prompt_embedding: Optional[PromptEmbedding] = None, *, channels: str = "rgb",
            layer: int = defaults.DEFAULT_RUN_LAYER) -> LookCloseResult:
        """One frame -> its result. prompt_embedding: None selects bottom-up with the learned
        prior; C numbers (the LLM's prompt) select top-down."""
        return self.run_batch([frame], settings, None if prompt_embedding is None else [prompt_embedding],
                              channels=channels, layer=layer)[0]

    def run_batch(self, frames: Iterable[Frame], settings: Optional[LookCloseSettings] = None,
                  prompt_embeddings=None, *, channels: str = "rgb",
                  layer: int = defaults.DEFAULT_RUN_LAYER) -> list[LookCloseResult]:
        """Frames -> one result each, in order, equal to running each alone. One look-close
        setting for all; prompt_embeddings: None, one embedding shared by all, or one per frame
        (a list, or an (n, C) array)."""
        frames = _frame_list(frames)
        settings = checked_settings(settings)
        if len(frames) <= self.max_batch:                     # one pass: frames stay where they are
            return self._pipeline.run_batch(frames, settings, prompt_embeddings, layer, channels)
        results = []                                          # passes, the next decoded while one runs
        for batch in self._pipeline.run_batches(frames, settings, prompt_embeddings, layer, self.max_batch,
                                                channels):
            results.extend(batch)
        return results

    # --- lifecycle -----------------------------------------------------------------------------
    def close(self) -> None:
        self._pipeline.close()

    def __enter__(self) -> "Encoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<ps3edge.Encoder {str(self.artifact)!r} on {self.backend}, {self.device}, {self.precision}>"


def load(artifact: Union[str, os.PathLike], backend: str = "onnxruntime", device: str = "auto",
         precision: str = "fp32", *, verify: bool = True, measure_memory: bool = False) -> Encoder:
    """Open an artifact directory (`ps3edge export`'s, or a VILA-HD artifact's PS3 part).

    backend: onnxruntime, torch or tensorrt. device: auto, cpu, cuda or cuda:N (the torch
    backend; on CUDA it runs the device-resident fast path). precision: fp32, or fp16 / int8
    stages that `ps3edge calibrate` added, or fp16 / bf16 on the torch backend. verify: check
    every file's sha256 against the manifest (as `ps3edge run` does); a manifest's integrity
    record is checked either way. measure_memory: each result's `memory_mib` holds the peak
    resident memory (and torch's peak CUDA allocation on the fast path) of each stage; it resets
    the process's peak-RSS mark (/proc/self/clear_refs) at every stage, so it is off unless asked."""
    path = Path(artifact)
    if (path / VILA_MANIFEST).is_file() and (path / "ps3").is_dir():
        load_vila_manifest(path, verify=False)               # its integrity record; its LLM files never run here
        path = path / "ps3"                                  # a VILA-HD artifact: its PS3 encoder
    pipeline = Pipeline(path, backend, verify=verify, precision=precision, device=device)
    pipeline.measure_memory = bool(measure_memory)
    return Encoder(pipeline)


def checked_settings(settings) -> LookCloseSettings:
    """None -> the artifact's defaults; a LookCloseSettings -> the same, each field parsed as
    the command line parses it (so "2", 2 and "all" mean what NUM_LOOK_CLOSE does)."""
    if settings is None:
        return LookCloseSettings()
    if not isinstance(settings, LookCloseSettings):
        raise Ps3EdgeError(f"settings must be a ps3edge.LookCloseSettings or None, got {type(settings).__name__}")
    return settings_from_env(env={}, **asdict(settings))


def _frame_list(frames) -> list:
    """A list of frames; one frame passed where a list was meant is refused, not iterated."""
    if isinstance(frames, (str, os.PathLike, np.ndarray, Image.Image)) or is_tensor(frames):
        raise Ps3EdgeError("run_batch takes a list of frames; use run() for one frame")
    try:
        frames = list(frames)
    except TypeError:
        raise Ps3EdgeError(f"run_batch takes a list of frames, got {type(frames).__name__}") from None
    if not frames:
        raise Ps3EdgeError("run_batch needs at least one frame")
    return frames
