"""The look-close loop over exported stages: image -> features, one clear path.

    B images --preprocess (threads)--> pixels (B,3,S,S) --lowres--> low-res features, K/V
    caches, selection inputs --selector(B prompts)--> prob (B,27,27) --plan, per image-->
    positions per step --highres (step rows of equal length from any image in one call, their
    patches cut from the pixels for that call only, batching.py)--> high-res features
    --assemble--> per image [low-res tokens ; high-res tokens in scale-major raster order]

One image is a batch of one: `run` is `run_batch` of one image.

The output order and values are those of the official `PS3VisionModel` with
`output_hidden_states=True` for the requested layer.

The arrays between the stages keep the dtype the stage files declare: with the FP16 stages
(`--precision fp16`) the K/V cache and the features stay float16 from the stage that gives them
to the one that reads them, and a call's high-res patches are cast to float16 once cut; a result's features are float32, cast once
when the tokens are assembled.

The backend decides how it runs an artifact, and says so in the session it opens
(runners/session.py): a staged session hands out its stage runners, which the loop below drives;
a whole-loop session (the torch backend on CUDA: `fast.FastLookClose`, preprocessing, planning
and all steps on the GPU, replayed from a CUDA graph) runs the same loop as one program. The
stage-by-stage path stays the reference and the CPU path. The look-close settings are resolved
once per pass into a schedule (planning.resolve) that every plan and the device program follow;
the stage times come from the runners and the session, which time themselves (timing.py).
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from .. import defaults
from ..errors import Ps3EdgeError
from ..artifact.manifest import load_manifest
from .batching import assemble, highres_feeds, planned_given
from .device import CPU
from .runners.registry import open_session
from .planning import DEFAULT_BUDGET_RULE, Geometry, LookCloseSettings, Schedule, plan, plan_from_steps, resolve
from .result import LookCloseResult
from .memory import StageMemory
from .timing import StageTimes
from . import frames
from .preprocess import preprocess, preprocess_levels_on_device, preprocess_on_device


def is_pixels(x) -> bool:
    """A preprocessed (B,3,S,S) float32 array (the lowres stage's input), not a camera frame."""
    return (isinstance(x, np.ndarray) and x.dtype == np.float32 and x.ndim == 4 and x.shape[1] == 3
            and x.shape[2] == x.shape[3])


def checked_prompt(manifest, settings: LookCloseSettings, prompt_embedding) -> np.ndarray:
    """A caller's prompt embedding as (1,C) float32, refused unless it is C finite numbers, not all
    zero, and the settings select top-down. From the manifest alone, so a job can check it
    before any model loads."""
    width = manifest.config.width
    if settings.mode == "after_image":
        raise Ps3EdgeError("a prompt embedding selects top-down, but LOOK_CLOSE_MODE is after_image")
    p = np.asarray(prompt_embedding)
    if p.dtype.kind not in "fiu" or p.size != width or (p.ndim > 1 and p.shape[0] != 1):
        raise Ps3EdgeError(f"prompt embedding must hold {width} numbers (shape ({width},) "
                           f"or (1, {width})), got shape {p.shape} of {p.dtype}")
    p = p.astype(np.float32).reshape(1, -1)
    if not np.all(np.isfinite(p)) or not np.any(p):
        raise Ps3EdgeError("prompt embedding must be finite and not all zero")
    return p


def layer_index(manifest, layer: int) -> int:
    """Where block `layer` (negative counts from the end) is among the artifact's returned layers;
    refused if the model has no such block or the artifact did not export it."""
    depth = manifest.config.depth
    if not -depth <= layer < depth:
        raise Ps3EdgeError(f"layer {layer} does not exist in a {depth}-block model")
    wanted = layer % depth
    returned = list(manifest.returned_layers)
    if wanted not in returned:
        raise Ps3EdgeError(f"layer {layer} was not exported (returned layers: {returned}); "
                           f"re-export with --layers including it")
    return returned.index(wanted)


def geometry_of(manifest) -> Geometry:
    """The look-close geometry an artifact's manifest describes."""
    cfg = manifest.config
    return Geometry(lowres_grid=cfg.lowres_grid, highres_grids=cfg.highres_grids,
                    select_num_each_scale=manifest.look_close_defaults.select_num_each_scale,
                    max_tokens_per_call=manifest.geometry.max_tokens_per_highres_call,
                    default_num_look_close=manifest.look_close_defaults.num_look_close)


class Pipeline:
    """An artifact directory loaded on one backend, ready to run images.

    device: --device text or a device.Device (auto: the backend chooses; the torch backend takes
    CUDA when there is one). fast: True or False asks for or against the whole loop as one
    device-resident program (`fast.FastLookClose`); None lets the backend choose (the torch
    backend on CUDA). preprocess: 'device' resizes on the session's device (bit-identical to
    PIL), 'cpu' with PIL; by default as the session prefers (on the device for the fast path).
    loaded: for the torch backend, the artifact's PS3 model when the caller already holds it (a
    weights.LoadedModel; checked against the manifest). It is used, not copied: the fast path
    moves it to its device and dtype.

    `session` is what the backend opened (runners/session.py). `close()` (or `with Pipeline(...)
    as p:`) frees its stage runners' sessions and engines, or its device program.
    """

    # how a token target is split over the scales (planning.BudgetRule): upstream's; parity sets the
    # installed reference's rule on the pipelines it compares with it
    budget_rule = DEFAULT_BUDGET_RULE
    # peak memory per stage into each result's memory_mib (memory.py): it resets the process's
    # peak-RSS mark, so only the command line and callers who ask turn it on
    measure_memory = False

    def __init__(self, artifact_dir, backend: str = "onnxruntime", verify: bool = True, precision: str = "fp32",
                 device: str | None = None, fast: bool | None = None, preprocess: str | None = None,
                 loaded=None):
        self.artifact_dir = Path(artifact_dir)
        self.manifest = load_manifest(self.artifact_dir, verify=verify)
        self.cfg = self.manifest.config
        self.backend = backend
        self.geometry = geometry_of(self.manifest)
        self.precision = precision             # fp32, or a precision of the manifest's "precisions"
        if preprocess not in (None, "cpu", "device"):
            raise Ps3EdgeError(f"--preprocess takes cpu or device, got '{preprocess}'")
        self.session = open_session(self.artifact_dir, self.manifest, backend, device, precision, fast, loaded)
        self.device = self.session.device      # a device.Device
        self.preprocess_on = preprocess or ("device" if self.session.preprocesses_on_device else "cpu")
        self._closed = False
        self.prior_prompt = np.load(self.artifact_dir / defaults.PRIOR_PROMPT_FILE).reshape(1, -1)
        self._memory: StageMemory | None = None          # the pass's, while measure_memory is on

    def _measured(self, stage: str):
        """The block counts to `stage`'s peak memory, when this pass measures it."""
        return self._memory.measure(stage) if self._memory is not None else contextlib.nullcontext()

    @property
    def stages(self) -> dict:
        """name -> StageRunner (runners/base.py) of the three stages; a whole-loop session loads
        them on first use."""
        self._refuse_if_closed()
        return self.session.stages

    def _refuse_if_closed(self) -> None:
        if self._closed:
            raise Ps3EdgeError(f"this pipeline of {self.artifact_dir} is closed; load it again")

    @property
    def fast(self):
        """The device-resident program (fast.FastLookClose) when the session runs the whole loop
        as one, else None."""
        return self.session.program

    def close(self) -> None:
        """Close the session (stage runners' sessions, engines, buffers; the fast path's program);
        the pipeline refuses to run afterwards."""
        self.session.close()
        self._closed = True

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- inputs --------------------------------------------------------------------------
    def pixels(self, image, channels: str = "rgb") -> np.ndarray:
        """A frame (frames.py: a path, PIL image, uint8 numpy array or torch tensor) -> the
        (1,3,S,S) normalised input of the lowres stage."""
        device = self.session.preprocess_device if self.preprocess_on == "device" else CPU
        return self._pixels_on(image, device.torch(), channels).cpu().numpy()

    def _pixels_on(self, image, device, channels: str = "rgb"):
        """`pixels` as a float32 tensor on `device`, preprocessed where --preprocess says. A frame
        that is a torch tensor on `device` already stays there (no host round trip)."""
        import torch

        levels = frames.levels(image, channels)          # PIL RGB, or (3,H,W) uint8 on the frame's device
        pre = self.manifest.preprocessing
        if isinstance(levels, torch.Tensor):
            if self.preprocess_on == "device":
                return preprocess_levels_on_device(levels.to(device), pre.size, pre.mean, pre.std)
            levels = Image.fromarray(levels.permute(1, 2, 0).cpu().numpy(), mode="RGB")
        if self.preprocess_on == "device":
            return preprocess_on_device(levels, pre.size, pre.mean, pre.std, device)
        return torch.from_numpy(preprocess(levels, pre.size, pre.mean, pre.std)).to(device)

    def prompt(self, settings: LookCloseSettings, prompt_embedding) -> np.ndarray:
        """(1,C): the learned prior (bottom-up) or the caller's embedding (top-down)."""
        if prompt_embedding is None:
            return self.prior_prompt.astype(np.float32)
        return checked_prompt(self.manifest, settings, prompt_embedding)

    def layer_index(self, layer: int) -> int:
        return layer_index(self.manifest, layer)

    @property
    def max_batch(self) -> int:
        """Most images one `run_batch` call takes: the bound the artifact was exported with."""
        return self.manifest.geometry.max_batch

    def prompts(self, settings: LookCloseSettings, prompt_embeddings, count: int) -> np.ndarray:
        """(B,C): the prompt of every image of a batch, each checked as `prompt` checks one.

        prompt_embeddings: None (every image bottom-up), one embedding of C numbers shared by
        all images, a (B, C) array, or a sequence of B entries each None or C numbers."""
        return np.concatenate([self.prompt(settings, p) for p in self._given_prompts(prompt_embeddings, count)])

    def _given_prompts(self, prompt_embeddings, count: int) -> list:
        """The caller's embedding of each image, or None where the learned prior is meant."""
        if prompt_embeddings is None:
            return [None] * count
        if isinstance(prompt_embeddings, (list, tuple)):
            if len(prompt_embeddings) != count:
                raise Ps3EdgeError(f"got {len(prompt_embeddings)} prompt embeddings for {count} images")
            return list(prompt_embeddings)
        p = np.asarray(prompt_embeddings)
        if p.ndim == 2 and p.shape[0] == count and count > 1:
            return list(p)
        if p.ndim == 2 and p.shape[0] != 1:
            raise Ps3EdgeError(f"prompt embeddings of shape {p.shape} do not match {count} images: give "
                               f"({count}, {self.cfg.width}), or ({self.cfg.width},) shared by all")
        return [p] * count

    def check_batch(self, count: int) -> None:
        """One line for a batch this artifact cannot take."""
        if count < 1:
            raise Ps3EdgeError("a batch needs at least one image")
        if count > self.max_batch:
            raise Ps3EdgeError(f"a batch of {count} images is over this artifact's bound of {self.max_batch}: "
                               f"use --batch-size {self.max_batch} or less, or re-export with "
                               f"`ps3edge export --max-batch {count}`")

    def pixels_batch(self, images, workers: int | None = None, channels: str = "rgb") -> np.ndarray:
        """Frames (frames.py) or (1,3,S,S) float32 pixel arrays -> (B,3,S,S), decoded and resized
        in threads (PIL and numpy release the GIL). A frame that cannot be read fails the batch."""
        def one(image):
            return image if is_pixels(image) else self.pixels(image, channels)
        if len(images) == 1:
            return one(images[0])
        with ThreadPoolExecutor(max_workers=workers or min(len(images), defaults.PREPROCESS_THREADS)) as pool:
            return np.concatenate(list(pool.map(one, images)))

    def run_batch(self, images, settings: LookCloseSettings, prompt_embeddings=None,
                  layer: int = defaults.DEFAULT_RUN_LAYER, channels: str = "rgb") -> list[LookCloseResult]:
        """Several images through one pass: one result per image, in order.

        images: a list of frames (frames.py; `channels` says how their arrays are ordered) or
        (1,3,S,S) float32 pixel arrays, or a (B,3,S,S) float32 array; at most `max_batch`. One
        look-close setting for all; prompt_embeddings as `prompts` takes them. Planning is per
        image; the step rows of all images share the highres calls (batching.py)."""
        self._refuse_if_closed()
        frames.check_channels(channels)
        batch = images if is_pixels(images) else list(images)
        count = len(batch)
        self.check_batch(count)
        self.layer_index(layer)
        prompts = self.prompts(settings, prompt_embeddings, count)     # refuse bad prompts before any work
        schedule = resolve(settings, self.geometry, self.budget_rule)  # and settings this model cannot take
        self._memory = StageMemory(self.device.torch() if self.session.whole_loop else None) \
            if self.measure_memory else None
        if self.session.whole_loop:
            bottom_up = all(p is None for p in self._given_prompts(prompt_embeddings, count))
            results = self._run_fast(batch, settings, None if bottom_up else prompts, layer, channels, schedule)
        else:
            low, times = self.run_lowres(batch, channels)
            results = self._from_lowres(low, settings, schedule, prompts, layer, times)
        for i, result in enumerate(results):
            for name, values in (("selection probabilities", result.prob), ("features", result.features)):
                if not np.isfinite(values).all():
                    which = f" for image {i + 1} of {count}" if count > 1 else ""
                    raise Ps3EdgeError(f"the model gave non-finite {name} (NaN or inf){which}: look at the prompt "
                                       f"embedding's scale and the checkpoint's weights; nothing was written")
        if self._memory is not None:
            memory, self._memory = self._memory.mib(), None
            for result in results:
                result.memory_mib = memory
        return results

    def run_batches(self, images, settings: LookCloseSettings, prompt_embeddings=None,
                    layer: int = defaults.DEFAULT_RUN_LAYER, batch_size: int | None = None,
                    channels: str = "rgb"):
        """`run_batch` over a longer list in passes of `batch_size` (default `max_batch`),
        decoding the next pass in a thread while the current one runs. Yields each pass's
        results; prompt_embeddings None, one shared, or one per image (a list or (len, C))."""
        images = list(images)
        size = batch_size or self.max_batch
        self.check_batch(size)
        given = self._given_prompts(prompt_embeddings, len(images))
        passes = [(images[i: i + size], given[i: i + size]) for i in range(0, len(images), size)]
        if not passes:
            return
        with ThreadPoolExecutor(max_workers=1) as ahead:
            pending = ahead.submit(self.pixels_batch, passes[0][0], None, channels)
            for k, (_, prompts) in enumerate(passes):
                pixels = pending.result()
                if k + 1 < len(passes):
                    pending = ahead.submit(self.pixels_batch, passes[k + 1][0], None, channels)
                yield self.run_batch(pixels, settings, prompts, layer)

    # --- the loop ------------------------------------------------------------------------
    def run(self, image, settings: LookCloseSettings, prompt_embedding=None,
            layer: int = defaults.DEFAULT_RUN_LAYER, channels: str = "rgb") -> LookCloseResult:
        """One image: a batch of one."""
        return self.run_batch([image], settings, None if prompt_embedding is None else [prompt_embedding], layer,
                              channels)[0]

    def run_lowres(self, images, channels: str = "rgb") -> tuple[dict, dict]:
        """Preprocess + the lowres stage: (the stage's outputs, times in seconds).

        images: one frame (frames.py), a list of them (or of (1,3,S,S) float32 arrays), or a
        (B,3,S,S) float32 array. The outputs, and the pixels under "pixels", can be run through `run_from_lowres` more than once (e.g. VILA-HD
        looks at the low-res tokens first to build its top-down prompt, then selects with it).
        """
        times = StageTimes()
        with times.measure("preprocess"), self._measured("preprocess"):
            if is_pixels(images):
                pixels = images
            else:
                pixels = self.pixels_batch(images if isinstance(images, (list, tuple)) else [images], None, channels)
        lowres = self.stages["lowres"]
        with self._measured("lowres"):
            low = dict(lowres.infer({"pixels": pixels}))
        times.add("lowres", lowres.last_inference_time())
        low["pixels"] = pixels            # the highres calls cut their patches from these (batching.py)
        return low, times.seconds

    def run_from_lowres(self, low: dict, settings: LookCloseSettings, prompt_embedding=None,
                        layer: int = defaults.DEFAULT_RUN_LAYER, times: dict | None = None) -> LookCloseResult:
        """Selector, planning, highres and assembly from `run_lowres`'s outputs of one image."""
        self.layer_index(layer)
        schedule = resolve(settings, self.geometry, self.budget_rule)
        return self._from_lowres(low, settings, schedule, self.prompt(settings, prompt_embedding), layer, times)[0]

    def run_batch_from_lowres(self, low: dict, settings: LookCloseSettings, prompt_embeddings=None,
                              layer: int = defaults.DEFAULT_RUN_LAYER, times: dict | None = None) -> list[LookCloseResult]:
        """`run_from_lowres` for every image of `run_lowres`'s batch: one selector call (prompts
        as `prompts` takes them: one per image, e.g. VILA-HD's top-down prompt of each request),
        the step rows of all images sharing the highres calls, as `run_batch` runs them."""
        self._refuse_if_closed()
        self.layer_index(layer)
        schedule = resolve(settings, self.geometry, self.budget_rule)
        prompts = self.prompts(settings, prompt_embeddings, len(low["pixels"]))
        return self._from_lowres(low, settings, schedule, prompts, layer, times)

    def run_known(self, low: dict, settings: LookCloseSettings, known: list, layer: int = defaults.DEFAULT_RUN_LAYER,
                  times: dict | None = None) -> list[LookCloseResult]:
        """`run_from_lowres` for a batch (bottom-up), where `known[b]` is None or the features
        of some high-res patches of image b: (global positions (n,), features (n,C) of `layer`).
        A known patch its plan takes is not encoded; its given features stand in its place
        (runtime/reuse.py: the patches unchanged since the previous frame). Images whose entry
        is None run as `run_batch` runs them."""
        self._refuse_if_closed()
        schedule = resolve(settings, self.geometry, self.budget_rule)
        count = len(low["pixels"])
        return self._from_lowres(low, settings, schedule, self.prompts(settings, None, count), layer, times, known)

    def _from_lowres(self, low: dict, settings: LookCloseSettings, schedule: Schedule, prompts: np.ndarray,
                     layer: int, times: dict | None, known: list | None = None) -> list[LookCloseResult]:
        """The batch's selector call, its plans (one per image, cut by `schedule`), highres calls
        and assembly; the runners' own times, and the pipeline's work between them. `known`:
        as `run_known` takes it (None: every planned patch is encoded)."""
        r = self.layer_index(layer)
        times = StageTimes(times)
        selector, highres = self.stages["selector"], self.stages["highres"]
        with self._measured("selector"):
            prob = selector.infer({
                "selection_features": low["selection_features"], "conv_features": low["conv_features"],
                "prompt": prompts})["prob"]                                        # (B,G0,G0)
        times.add("selector", selector.last_inference_time())
        with times.measure("planning"), self._measured("planning"):
            plans = [plan(p, schedule, self.geometry) for p in prob]

        given = None if known is None else planned_given(plans, known, self.geometry)
        dtype = highres.input_metadata()["patches"][0]                            # float16 for FP16 stages
        feeds, features = [], []
        times.add("highres", 0.0)                                 # the stage is reported when no step has patches
        # each call's patches are cut when it comes and dropped after it (assemble reads only the
        # positions and step images), so the pass never holds all of its calls' patches at once
        for feed in highres_feeds(plans, low, self.geometry, self.steps_per_call(), given, dtype):
            with self._measured("highres"):
                out = highres.infer(feed)["highres_features"]                     # (R,T,N,C)
                # the one layer, not a view that keeps every returned layer of the call alive
                features.append(out[r].copy() if len(out) > 1 else out[r])        # (T,N,C)
                del out
            times.add("highres", highres.last_inference_time())
            feeds.append({"positions": feed["positions"], "step_image": feed["step_image"]})
            del feed
        with times.measure("assemble"), self._measured("assemble"):
            tokens = assemble(low["lowres_features"][r], feeds, features, given)

        calls = [tuple(feed["positions"].shape) for feed in feeds]
        timings = times.ms()
        return [LookCloseResult(
            features=t[None].astype(np.float32, copy=False), layer=self.manifest.returned_layers[r],
            prob=p, plan=pl, scales=tuple(self.cfg.scales[1:]), timings_ms=dict(timings),
            highres_calls=list(calls), batch=len(plans), settings=settings)
            for t, p, pl in zip(tokens, prob, plans)]

    def _run_fast(self, batch, settings: LookCloseSettings, prompts, layer: int,
                  channels: str = "rgb", schedule: Schedule | None = None) -> list[LookCloseResult]:
        """The whole batch through the session's one device program (`run_loop`), which copies
        the results to the host once. prompts: (B,C), or None for the learned prior everywhere."""
        import torch

        r = self.layer_index(layer)
        schedule = schedule or resolve(settings, self.geometry, self.budget_rule)
        device = self.session.device.torch()
        times = StageTimes()
        with times.measure("preprocess", self.session.synchronize), self._measured("preprocess"):
            if is_pixels(batch):
                pixels = torch.from_numpy(batch).to(device)
            else:
                pixels = torch.cat([torch.from_numpy(im).to(device) if is_pixels(im)
                                    else self._pixels_on(im, device, channels) for im in batch])
        with self._measured("look-close"):
            features, prob, steps = self.session.run_loop(pixels, schedule, prompts, self.manifest.returned_layers[r])
        times.update(self.session.last_timings)
        lengths = sorted({s.shape[1] for s in steps if s.shape[1]}, reverse=True)
        calls = [(len(features) * sum(s.shape[1] == n for s in steps), n) for n in lengths]
        timings = times.ms()
        return [LookCloseResult(
            features=features[b: b + 1], layer=self.manifest.returned_layers[r], prob=prob[b],
            plan=plan_from_steps([s[b] for s in steps], prob[b], schedule, self.geometry),
            scales=tuple(self.cfg.scales[1:]), timings_ms=dict(timings), highres_calls=list(calls),
            batch=len(features), settings=settings) for b in range(len(features))]

    def steps_per_call(self) -> int:
        """Most look-close step rows (of any images) in one highres call, as the session states
        it (runners/session.py: the highres runner's limit, else the artifact's profile bound)."""
        return self.session.steps_per_call(self.manifest)
