"""The look-close loop over exported stages: image -> features, one clear path.

    image --preprocess--> pixels --lowres--> low-res features, K/V cache, selection inputs,
    all high-res patches --selector(prompt)--> prob (27x27) --plan--> patches per step
    --highres (all steps of equal length in one call)--> high-res features
    --assemble--> [low-res tokens ; high-res tokens in scale-major raster order]

The output order and values are those of the official `PS3VisionModel` with
`output_hidden_states=True` for the requested layer.

On a CUDA device the torch backend runs the same loop as one device-resident program
(`fast.FastLookClose`: preprocessing, planning and all steps on the GPU, replayed from a CUDA
graph); the stage-by-stage path below stays the reference and the CPU path.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .. import defaults
from ..errors import Ps3EdgeError
from ..artifact.manifest import load_manifest
from ..artifact.weights import rebuild_torch_model
from .runners.registry import load_stages
from .planning import Geometry, LookCloseSettings, Plan, plan, plan_from_steps, resolve_steps, step_counts
from .preprocess import open_image, preprocess, preprocess_on_device

DEVICES = ("auto", "cpu", "cuda")
FAST_PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass
class LookCloseResult:
    features: np.ndarray                 # (1, tokens, C) float32
    layer: int                           # the block the features come from (0-based)
    prob: np.ndarray                     # (G0, G0) selection probability
    plan: Plan
    scales: tuple[int, ...]              # the high-res scales, matching plan.selection_maps
    timings_ms: dict = field(default_factory=dict)
    highres_calls: list = field(default_factory=list)   # (T, N) of each highres call

    @property
    def tokens_each_scale(self) -> dict[str, int]:
        counts = {"lowres": self.features.shape[1] - self.plan.num_tokens}
        counts.update({str(s): n for s, n in zip(self.scales, self.plan.tokens_each_scale())})
        return counts


def resolve_device(backend: str, device: str | None) -> str:
    """'auto' / None -> where the backend runs: the torch backend on CUDA when torch sees a GPU,
    else the CPU; onnxruntime and TensorRT pick their own device (providers, engines)."""
    device = device or "auto"
    if device not in DEVICES and not device.startswith("cuda:"):
        raise Ps3EdgeError(f"--device takes {', '.join(DEVICES)} (or cuda:N), got '{device}'")
    if backend != "torch":
        if device != "auto":
            raise Ps3EdgeError(f"--device applies to the torch backend; {backend} chooses its own device")
        return "auto"
    import torch
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise Ps3EdgeError(f"--device {device} asked for, but torch sees no CUDA device here")
    if device.startswith("cuda:"):
        index = device[5:]
        if not index.isdigit() or int(index) >= torch.cuda.device_count():
            raise Ps3EdgeError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA device(s), "
                               f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def geometry_of(manifest) -> Geometry:
    """The look-close geometry an artifact's manifest describes."""
    cfg = manifest.config
    return Geometry(lowres_grid=cfg.lowres_grid, highres_grids=cfg.highres_grids,
                    select_num_each_scale=manifest.look_close_defaults.select_num_each_scale,
                    max_tokens_per_call=manifest.geometry.max_tokens_per_highres_call,
                    default_num_look_close=manifest.look_close_defaults.num_look_close)


def highres_feeds(the_plan: Plan, low: dict, geometry: Geometry, steps_per_call: int | None = None):
    """The highres stage's inputs for a plan, one call at a time: steps of equal length go
    through one call (T steps x N tokens), longest first, at most `steps_per_call` steps a call
    (None: no limit); steps are independent, so the grouping changes no result. `low` holds
    the lowres outputs."""
    steps_by_length = defaultdict(list)
    for t in range(len(the_plan.steps)):
        pos = the_plan.step_positions(geometry, t)
        if len(pos):
            steps_by_length[len(pos)].append(pos)
    all_patches = low["highres_patches"][0]                                        # (P,588)
    for n, group in sorted(steps_by_length.items(), reverse=True):
        chunk = steps_per_call or len(group)
        for t0 in range(0, len(group), chunk):
            pos = np.stack(group[t0: t0 + chunk])                                  # (T,N) int32
            yield {"patches": all_patches[pos], "positions": pos, "kv_cache": low["kv_cache"]}


class Pipeline:
    """An artifact directory loaded on one backend, ready to run images.

    device: the torch backend's device (auto: CUDA when there is one). fast: run the loop as one
    device-resident program (`fast.FastLookClose`); by default on CUDA only. preprocess:
    'device' resizes on the run's device (bit-identical to PIL), 'cpu' with PIL; by default on
    the device when the fast path runs. loaded: for the torch backend, the artifact's PS3 model
    when the caller already holds it (a weights.LoadedModel; checked against the manifest). It
    is used, not copied: the fast path moves it to its device and dtype.

    `close()` (or `with Pipeline(...) as p:`) frees the stage runners' sessions and engines.
    """

    def __init__(self, artifact_dir, backend: str = "onnxruntime", verify: bool = True, precision: str = "fp32",
                 device: str | None = None, fast: bool | None = None, preprocess: str | None = None,
                 loaded=None):
        self.artifact_dir = Path(artifact_dir)
        self.manifest = load_manifest(self.artifact_dir, verify=verify)
        self.cfg = self.manifest.config
        self.backend = backend
        self.geometry = geometry_of(self.manifest)
        self.precision = precision             # fp32, or a precision of the manifest's "precisions"
        self.device = resolve_device(backend, device)
        if preprocess not in (None, "cpu", "device"):
            raise Ps3EdgeError(f"--preprocess takes cpu or device, got '{preprocess}'")
        self.fast = None
        if fast is None:
            fast = backend == "torch" and self.device.startswith("cuda")
        if fast:
            if backend != "torch":
                raise Ps3EdgeError("the device-resident fast path runs on the torch backend only")
            if precision not in FAST_PRECISIONS:
                raise Ps3EdgeError(f"the torch fast path runs in {', '.join(FAST_PRECISIONS)}, not {precision} "
                                   f"(--device cpu runs the staged torch path)")
            from .fast import FastLookClose
            self.fast = FastLookClose(rebuild_torch_model(self.manifest, loaded), device=self.device, dtype=precision)
        elif backend == "torch" and self.device != "cpu":
            if device not in (None, "auto"):
                raise Ps3EdgeError("the staged torch backend runs on the CPU; on CUDA the torch backend is the fast path")
            self.device = "cpu"
        self.preprocess_on = preprocess or ("device" if self.fast else "cpu")
        # the stage runners; with the fast path they load only if the staged API is used
        self._loaded, self._closed = loaded, False
        self._stages = None if self.fast else load_stages(self.artifact_dir, self.manifest, backend, precision, loaded)
        self.prior_prompt = np.load(self.artifact_dir / defaults.PRIOR_PROMPT_FILE).reshape(1, -1)

    @property
    def stages(self) -> dict:
        """name -> StageRunner (runners/base.py) of the three stages, loaded on first use."""
        if self._closed:
            raise Ps3EdgeError(f"this pipeline of {self.artifact_dir} is closed; load it again")
        if self._stages is None:
            self._stages = load_stages(self.artifact_dir, self.manifest, self.backend, self.precision, self._loaded)
        return self._stages

    def close(self) -> None:
        """Close the stage runners (sessions, engines, buffers) and drop the fast path's program;
        the pipeline refuses to run afterwards."""
        for runner in (self._stages or {}).values():
            runner.close()
        self._stages, self.fast, self._loaded, self._closed = None, None, None, True

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- inputs --------------------------------------------------------------------------
    def pixels(self, image) -> np.ndarray:
        """A path or PIL image -> the (1,3,S,S) normalised input of the lowres stage."""
        on_device = self.backend == "torch" and self.preprocess_on == "device"
        return self._pixels_on(image, self.device if on_device else "cpu").cpu().numpy()

    def _pixels_on(self, image, device):
        """`pixels` as a float32 tensor on `device`, preprocessed where --preprocess says."""
        import torch

        if not isinstance(image, Image.Image):
            image = open_image(image)
        pre = self.manifest.preprocessing
        if self.preprocess_on == "device":
            return preprocess_on_device(image, pre.size, pre.mean, pre.std, device)
        return torch.from_numpy(preprocess(image, pre.size, pre.mean, pre.std)).to(device)

    def prompt(self, settings: LookCloseSettings, prompt_embedding) -> np.ndarray:
        """(1,C): the learned prior (bottom-up) or the caller's embedding (top-down)."""
        if prompt_embedding is None:
            return self.prior_prompt.astype(np.float32)
        if settings.mode == "after_image":
            raise Ps3EdgeError("a prompt embedding selects top-down, but LOOK_CLOSE_MODE is after_image")
        p = np.asarray(prompt_embedding)
        if p.dtype.kind not in "fiu" or p.size != self.cfg.width or (p.ndim > 1 and p.shape[0] != 1):
            raise Ps3EdgeError(f"prompt embedding must hold {self.cfg.width} numbers (shape ({self.cfg.width},) "
                               f"or (1, {self.cfg.width})), got shape {p.shape} of {p.dtype}")
        p = p.astype(np.float32).reshape(1, -1)
        if not np.all(np.isfinite(p)) or not np.any(p):
            raise Ps3EdgeError("prompt embedding must be finite and not all zero")
        return p

    def layer_index(self, layer: int) -> int:
        depth = self.cfg.depth
        if not -depth <= layer < depth:
            raise Ps3EdgeError(f"layer {layer} does not exist in a {depth}-block model")
        wanted = layer % depth
        returned = list(self.manifest.returned_layers)
        if wanted not in returned:
            raise Ps3EdgeError(f"layer {layer} was not exported (returned layers: {returned}); "
                               f"re-export with --layers including it")
        return returned.index(wanted)

    # --- the loop ------------------------------------------------------------------------
    def run(self, image, settings: LookCloseSettings, prompt_embedding=None,
            layer: int = defaults.DEFAULT_RUN_LAYER) -> LookCloseResult:
        self.layer_index(layer)
        self.prompt(settings, prompt_embedding)                  # refuse a bad prompt before any work
        resolve_steps(settings, self.geometry)                   # and settings this model cannot take
        if self.fast is not None:
            result = self._run_fast(image, settings, prompt_embedding, layer)
        else:
            low, times = self.run_lowres(image)
            result = self.run_from_lowres(low, settings, prompt_embedding, layer, times)
        for name, values in (("selection probabilities", result.prob), ("features", result.features)):
            if not np.isfinite(values).all():
                raise Ps3EdgeError(f"the model gave non-finite {name} (NaN or inf): look at the prompt embedding's "
                                   f"scale and the checkpoint's weights; nothing was written")
        return result

    @property
    def max_batch(self) -> int:
        """Most images one `run_batch` call takes: the bound the artifact was exported with."""
        return getattr(self.manifest.geometry, "max_batch", defaults.DEFAULT_MAX_BATCH)

    def prompts(self, settings: LookCloseSettings, prompt_embeddings, count: int) -> list:
        """One prompt embedding (or None: the learned prior) per image of a batch.

        prompt_embeddings: None (every image bottom-up), one embedding of C numbers shared by
        all images, a (B, C) array, or a sequence of B entries each None or C numbers."""
        if prompt_embeddings is None:
            return [None] * count
        if isinstance(prompt_embeddings, (list, tuple)):
            if len(prompt_embeddings) != count:
                raise Ps3EdgeError(f"got {len(prompt_embeddings)} prompt embeddings for {count} images")
            return list(prompt_embeddings)
        p = np.asarray(prompt_embeddings)
        if p.ndim == 2 and p.shape[0] == count and count > 1:
            return list(p)
        if p.ndim == 2 and p.shape[0] not in (1, count):
            raise Ps3EdgeError(f"prompt embeddings of shape {p.shape} do not match {count} images: "
                               f"give ({count}, {self.cfg.width}) or one ({self.cfg.width},) shared by all")
        return [p] * count

    def run_batch(self, images, settings: LookCloseSettings, prompt_embeddings=None,
                  layer: int = defaults.DEFAULT_RUN_LAYER) -> list[LookCloseResult]:
        """Several images through one pass: one result per image, in order.

        images: paths, PIL images or (1,3,S,S) pixel arrays; one look-close setting for all;
        prompt_embeddings as `prompts` takes them. At most `max_batch` images."""
        images = list(images)
        if not images:
            raise Ps3EdgeError("run_batch needs at least one image")
        if len(images) > self.max_batch:
            raise Ps3EdgeError(f"a batch of {len(images)} images is over this artifact's bound of {self.max_batch}; "
                               f"split it (--batch-size) or re-export with `ps3edge export --max-batch {len(images)}`")
        prompts = self.prompts(settings, prompt_embeddings, len(images))
        return [self.run(image, settings, prompt, layer) for image, prompt in zip(images, prompts)]

    def run_lowres(self, image) -> tuple[dict, dict]:
        """Preprocess + the lowres stage: (the stage's outputs, times in seconds).

        The outputs can be run through `run_from_lowres` more than once (e.g. VILA-HD looks at
        the low-res tokens first to build its top-down prompt, then selects with it).
        """
        times = {}
        t0 = time.perf_counter()
        pixels = image if isinstance(image, np.ndarray) else self.pixels(image)
        times["preprocess"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        low = self.stages["lowres"].infer({"pixels": pixels})
        times["lowres"] = time.perf_counter() - t0
        return low, times

    def run_from_lowres(self, low: dict, settings: LookCloseSettings, prompt_embedding=None,
                        layer: int = defaults.DEFAULT_RUN_LAYER, times: dict | None = None) -> LookCloseResult:
        """Selector, planning, highres and assembly from `run_lowres`'s outputs."""
        r = self.layer_index(layer)
        prompt = self.prompt(settings, prompt_embedding)
        times = dict(times or {})

        t0 = time.perf_counter()
        prob = self.stages["selector"].infer({
            "selection_features": low["selection_features"], "conv_features": low["conv_features"],
            "prompt": prompt})["prob"][0]                                          # (G0,G0)
        times["selector"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        the_plan = plan(prob, settings, self.geometry)
        times["planning"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        positions, features, calls = self._run_highres(the_plan, low, r)
        times["highres"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        order = np.argsort(positions, kind="stable")                  # scale-major raster order
        tokens = np.concatenate([low["lowres_features"][r, 0], features[order]], axis=0)
        times["assemble"] = time.perf_counter() - t0

        return LookCloseResult(
            features=tokens[None].astype(np.float32, copy=False), layer=self.manifest.returned_layers[r],
            prob=prob, plan=the_plan, scales=tuple(self.cfg.scales[1:]),
            timings_ms={k: v * 1e3 for k, v in times.items()}, highres_calls=calls)

    def _run_fast(self, image, settings: LookCloseSettings, prompt_embedding, layer: int) -> LookCloseResult:
        """The whole loop on the device (fast.FastLookClose), then one copy of the results to the host."""
        import torch

        r = self.layer_index(layer)
        counts = step_counts(settings, self.geometry)           # validates the settings
        device = self.fast.device
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        times = {}
        t0 = time.perf_counter()
        if isinstance(image, np.ndarray):
            pixels = torch.from_numpy(image).to(device)
        else:
            pixels = self._pixels_on(image, device)
        sync()
        times["preprocess"] = time.perf_counter() - t0

        prompt = None
        if prompt_embedding is not None:
            prompt = torch.from_numpy(self.prompt(settings, prompt_embedding)).to(device)
        t0 = time.perf_counter()
        out = self.fast.graphed(pixels, counts, smooth=settings.smooth_selection_prob, prompt=prompt,
                                layer=self.manifest.returned_layers[r])
        sync()
        times["look-close (device)"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        features = out.features.float().cpu().numpy()
        prob = out.prob.float().cpu().numpy()
        steps = [s.cpu().numpy() for s in out.steps]
        times["to host"] = time.perf_counter() - t0
        the_plan = plan_from_steps(steps, prob, settings, self.geometry)
        calls = sorted({len(s) for s in steps if len(s)}, reverse=True)
        return LookCloseResult(
            features=features, layer=self.manifest.returned_layers[r], prob=prob, plan=the_plan,
            scales=tuple(self.cfg.scales[1:]), timings_ms={k: v * 1e3 for k, v in times.items()},
            highres_calls=[(sum(len(s) == n for s in steps), n) for n in calls])

    def steps_per_call(self) -> int:
        """Most look-close steps in one highres call: the highres runner's own limit (a TensorRT
        engine's T_max), else the profile bound of artifact/profiles.py (the default step count,
        at most what one call's attention scores allow). Bounds memory on the CPU too: at 4K one
        step's scores take 16 x 2560 x 3289 floats = 539 MB per block."""
        from ..artifact.profiles import axis_bounds
        return self.stages["highres"].max_steps_per_call or axis_bounds(self.manifest)["T"][2]

    def _run_highres(self, the_plan: Plan, low: dict, r: int):
        """The plan's highres calls (`highres_feeds`), at most `steps_per_call` steps a call."""
        positions, features, calls = [], [], []
        for feed in highres_feeds(the_plan, low, self.geometry, self.steps_per_call()):
            out = self.stages["highres"].infer(feed)
            positions.append(feed["positions"].reshape(-1))
            features.append(out["highres_features"][r].reshape(-1, self.cfg.width))
            calls.append(tuple(feed["positions"].shape))
        if not positions:
            return np.zeros(0, np.int32), np.zeros((0, self.cfg.width), np.float32), calls
        return np.concatenate(positions), np.concatenate(features), calls
