"""The accuracy report: a reduced-precision pipeline against the FP32 reference, per stage and
end to end, on a set of held-out images.

For each image both pipelines run; the rows are
  lowres, lowres kv, selection features, conv features   same pixels in, per-token comparison
  highres patches      the first reference step's patches as each pipeline feeds its highres
                       stage: must be bit-exact (they are cut from the FP32 pixels in every
                       precision, model/patches.py; for an FP16 highres stage, exact against the
                       FP32 patches rounded to float16, which its first layer does either way)
  selector (stage)     the reduced selector on the FP32 stage's inputs: |prob diff| (it is FP32 code,
                       so this is <= 1e-5 or something is wrong)
  selector (chained)   on the reduced lowres stage's outputs: |prob diff| (informative)
  selection            IoU of the selected patches per scale (the selector decides where PS3 looks,
                       so a wrong selection is the worst error); "near ties" when every swapped patch
                       was, in FP32, closer to the cut than twice the measured probability error
  highres (stage)      the reduced highres stage fed the FP32 run's patches, positions and K/V
                       (in the dtypes that stage declares: float16 for the FP16 stages)
  end-to-end           whole runs, token for token, on the reference's selection: the reduced
                       pipeline's own lowres outputs (K/V, low-res tokens) with the FP32 run's plan
                       (when the selections differ its highres stage runs again on that plan, and
                       the note says "fp32 selection pinned"). A selection that differs is the
                       selection row's to judge; without the pin a swapped patch shifts every
                       later token of its scale (tokens are in scale-major raster order), and the
                       token-by-token cosine compares different patches (0.38 on one FP16 image
                       of ps3-tiny-4k, docs/precision.md)
  end-to-end (own selection)   informative: each pipeline on its own selection, low-res tokens plus
                       the high-res tokens at the positions both picked. Those tokens still differ
                       by more than the precision's error where the selections differ: a step's
                       tokens attend to each other, and swapped patches change their step mates
Feature rows give max |diff| and the minimum per-token cosine. Every image gives its own rows;
the summary keeps the worst value of each row over the images and checks it against
defaults.TOLERANCES / SELECTION_MIN_IOU of the precision. Per-stage times (median over images)
of both pipelines come with it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .. import defaults
from ..version import __version__
from ..artifact.io import file_sha256, write_json_atomic
from ..compare import (BOUND, FEATURES, INFORMATIVE, SELECTION, Check, Measured, ParityRow, Tolerance, compare,
                       difference, feature_diff, features, identical_selection, selection_up_to_near_ties,
                       worst)
from ..errors import Ps3EdgeError
from ..model.patches import gather_patches
from ..runtime.batching import assemble, highres_feeds, patch_taps
from ..runtime.lookclose import Pipeline
from ..runtime.planning import LookCloseSettings
from ..runtime.preprocess import open_image


def _tokens(x: np.ndarray) -> np.ndarray:
    """(1,C,h,w) maps -> (h*w, C) tokens."""
    return x.reshape(x.shape[1], -1).T


PINNED_NOTE = "fp32 selection pinned"


def _on_reference_selection(ref, test) -> Measured:
    """Every token, the test's run on the reference's selection against the reference's run."""
    a, b = ref["features"], test["features (reference selection)"]
    d, c = feature_diff(b, a)
    note = f"{a.shape[1]} of {a.shape[1]} tokens compared"
    return Measured(d, c, selection=f"{note} ({PINNED_NOTE})" if test["selection pinned"] else note)


def _common_tokens(ref, test) -> Measured:
    """Low-res tokens plus the high-res tokens at the positions both selections picked."""
    n0 = ref["lowres tokens"]
    common, i_r, i_t = np.intersect1d(ref["positions"], test["positions"], assume_unique=True, return_indices=True)
    fa = np.concatenate([ref["features"][0, :n0], ref["features"][0, n0:][i_r]])
    fb = np.concatenate([test["features"][0, :n0], test["features"][0, n0:][i_t]])
    d, c = feature_diff(fb, fa)
    return Measured(d, c, selection=f"{n0 + len(common)} of {ref['features'].shape[1]} tokens compared")


# test: the reduced stages, each on its own outputs ("chained"); "(stage)": on the FP32 run's inputs
CHECKS = (
    Check("lowres", features("lowres_features")),
    Check("lowres kv", features("kv_cache")),
    Check("selection features", features("selection_features", view=_tokens)),
    Check("conv features", features("conv_features", view=_tokens)),
    Check("highres patches", difference("highres_patches (as given)", "highres_patches"), BOUND, 1e-6),
    Check("selector (stage)", difference("prob", "prob (stage)"), BOUND, defaults.PROB_MAX_ABS_FP32),
    Check("selector (chained)", difference("prob"), INFORMATIVE),
    Check("selection", selection_up_to_near_ties, SELECTION),
    Check("highres (stage)", features("first step", "first step (stage)")),
    Check("end-to-end", _on_reference_selection),
    Check("end-to-end (own selection)", _common_tokens, INFORMATIVE),
)
FEATURE_ROWS = tuple(c.stage for c in CHECKS if c.judge == FEATURES)


@dataclass
class AccuracyReport:
    precision: str
    tolerance: dict
    rows: list[ParityRow] = field(default_factory=list)              # worst over the images
    per_image: dict = field(default_factory=dict)              # image name -> its rows
    images: list[dict] = field(default_factory=list)           # name, sha256, held_out
    timings_ms: dict = field(default_factory=dict)             # pipeline label -> stage -> median ms
    settings: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    def to_dict(self) -> dict:
        return {"producer": f"ps3edge {__version__}", "precision": self.precision, "ok": self.ok,
                "tolerance": self.tolerance, "settings": self.settings, "images": self.images,
                "rows": [asdict(r) for r in self.rows],
                "per_image": {k: [asdict(r) for r in v] for k, v in self.per_image.items()},
                "timings_ms": self.timings_ms, "notes": self.notes}

    def write(self, path: Path) -> None:
        write_json_atomic(Path(path), self.to_dict())


def _positions(result, geometry) -> np.ndarray:
    """Global patch index of each high-res token of a run, in the order of result.features."""
    pos = [result.plan.step_positions(geometry, t) for t in range(len(result.plan.steps))]
    return np.sort(np.concatenate(pos)) if pos else np.zeros(0, np.int32)


def _run(pipe, pixels: np.ndarray, settings: LookCloseSettings, layer: int) -> tuple[dict, dict]:
    """One pipeline on `pixels`: its outputs by name, and its stage times (ms)."""
    t0 = time.perf_counter()
    low = dict(pipe.stages["lowres"].infer({"pixels": pixels}))
    times = {"lowres": (time.perf_counter() - t0) * 1e3}
    low["pixels"] = pixels
    res = pipe.run_from_lowres(low, settings, layer=layer)
    for k in ("selector", "planning", "highres"):
        times[k] = res.timings_ms.get(k, 0.0)
    return {**low, "prob": res.prob, "plan": res.plan, "selection_maps": res.plan.selection_maps,
            "features": res.features, "positions": _positions(res, pipe.geometry),
            "lowres tokens": pipe.cfg.lowres_tokens}, times


def features_on_plan(pipe, out: dict, the_plan, layer: int) -> np.ndarray:
    """(1, tokens, C): `pipe`'s highres stage on `out`'s lowres outputs (its pixels, its K/V and
    low-res tokens), stepping through `the_plan` instead of its own; assembled as a run does."""
    r, highres = pipe.layer_index(layer), pipe.stages["highres"]
    dtype = highres.input_metadata()["patches"][0]
    feeds = list(highres_feeds(the_plan, out, pipe.geometry, pipe.steps_per_call(), dtype=dtype))
    features = [highres.infer(feed)["highres_features"][r] for feed in feeds]
    return assemble(out["lowres_features"][r], feeds, features)[0][None].astype(np.float32, copy=False)


def _declared(runner, feed: dict) -> dict:
    """`feed` in the dtypes `runner` declares (the FP16 stages take float16 buffers)."""
    declared = runner.input_metadata()
    return {k: v.astype(declared[k][0], copy=False) for k, v in feed.items()}


def _on_reference_inputs(ref, test, ref_out: dict, layer: int) -> dict:
    """The test's selector and highres stages fed what the reference's stages were fed."""
    selector, highres = test.stages["selector"], test.stages["highres"]
    prob = selector.infer(_declared(selector, {"selection_features": ref_out["selection_features"],
                                               "conv_features": ref_out["conv_features"],
                                               "prompt": ref.prior_prompt.astype(np.float32)}))["prob"][0]
    # the first step of the reference run, on the reference's inputs
    pos0 = ref_out["plan"].step_positions(ref.geometry, 0)[None]
    ref_out["highres_patches"] = _step_patches(ref, ref_out["pixels"], pos0)
    feed = {"patches": ref_out["highres_patches"], "positions": pos0, "step_image": np.zeros(1, np.int32),
            "kv_cache": ref_out["kv_cache"]}
    first = highres.infer(_declared(highres, feed))["highres_features"][ref.layer_index(layer), 0]
    return {"prob (stage)": prob, "first step (stage)": first, "first step positions": pos0[0],
            "highres_patches": _step_patches(test, ref_out["pixels"], pos0)}


def _step_patches(pipe, pixels: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """(1,N) positions of image 0 -> (1,N,588): the patches `pipe` feeds its highres stage there."""
    taps = patch_taps(pixels.shape[-1], tuple(pipe.geometry.highres_grids))
    patches = gather_patches(pixels, np.zeros(positions.size, np.int64), positions.reshape(-1), taps,
                             defaults.PATCH_WINDOW_CHUNK)
    return patches.reshape(*positions.shape, -1).astype(pipe.stages["highres"].input_metadata()["patches"][0])


def compare_pipelines(ref, test, pixels: np.ndarray, settings: LookCloseSettings, layer: int,
                      label: str) -> tuple[list[ParityRow], dict, dict]:
    """Rows for one image (only their fixed bounds judged: the tolerance judges the worst over the
    images); and the stage times (ms) of `ref` and `test`."""
    ref_out, times_ref = _run(ref, pixels, settings, layer)
    test_out, times_test = _run(test, pixels, settings, layer)
    test_out.update(_on_reference_inputs(ref, test, ref_out, layer))
    # the end-to-end row compares token for token on one selection, the reference's (the module docstring)
    same = identical_selection(test_out["selection_maps"], ref_out["selection_maps"])
    test_out["selection pinned"] = not same
    test_out["features (reference selection)"] = (
        test_out["features"] if same else features_on_plan(test, test_out, ref_out["plan"], layer))
    # the FP32 patches in the dtype the test's highres stage takes them in
    ref_out["highres_patches (as given)"] = ref_out["highres_patches"].astype(test_out["highres_patches"].dtype)
    # the reference's own tokens at those positions (already in its run)
    n0 = ref_out["lowres tokens"]
    ref_out["first step"] = ref_out["features"][0, n0 + np.searchsorted(ref_out["positions"],
                                                                         test_out["first step positions"])]
    return compare(CHECKS, ref_out, test_out, label, tol=None), times_ref, times_test


def _pairs(artifact_dir, precision: str, with_torch: bool) -> list[tuple[str, Pipeline, Pipeline]]:
    """(label, fp32 pipeline, `precision` pipeline) for onnxruntime, and with `with_torch` for torch."""
    pairs = [(f"{precision} vs fp32 (onnxruntime)", Pipeline(artifact_dir, "onnxruntime"),
              Pipeline(artifact_dir, "onnxruntime", precision=precision))]
    if with_torch:
        if precision not in ("fp16", "bf16"):
            raise Ps3EdgeError("the torch comparison exists for fp16 (our torch model has no INT8 path)")
        pairs.append((f"{precision} vs fp32 (torch)", Pipeline(artifact_dir, "torch", device="cpu"),
                      Pipeline(artifact_dir, "torch", precision=precision, device="cpu")))
    return pairs


def _measure_image(report: AccuracyReport, pairs, path: Path, settings, layer, times: dict, held_out,
                   say, where: str) -> None:
    """One image's rows (report.per_image) and stage times (`times`: name -> stage -> list of ms)."""
    digest = file_sha256(path)
    report.images.append({"name": path.name, "sha256": digest,
                          "held_out": held_out is None or digest not in held_out})
    pil = open_image(path)
    rows = []
    for label, ref, test in pairs:
        say(f"{label}: {where}")
        pixels = ref.pixels(pil)
        r, t_ref, t_test = compare_pipelines(ref, test, pixels, settings, layer, label)
        rows += r
        backend = label.rsplit("(", 1)[1].rstrip(")")
        for name, tt in ((f"fp32 {backend}", t_ref), (f"{report.precision} {backend}", t_test)):
            for stage, ms in tt.items():
                times.setdefault(name, {}).setdefault(stage, []).append(ms)
    report.per_image[path.name] = rows


def _say_where_pinned(report: AccuracyReport) -> None:
    """The merged end-to-end rows keep their worst image's note: say on how many images the
    reference's selection was pinned, whichever image was the worst."""
    for row in report.rows:
        if row.stage != "end-to-end":
            continue
        mine = [r for rows in report.per_image.values() for r in rows
                if r.stage == row.stage and r.compared == row.compared]
        pinned = sum(r.selection.endswith(f"({PINNED_NOTE})") for r in mine)
        if pinned:
            row.selection = (row.selection.removesuffix(f" ({PINNED_NOTE})")
                             + f" ({PINNED_NOTE} on {pinned} of {len(mine)} images)")


def accuracy_report(artifact_dir, precision: str, images: list[Path], settings: LookCloseSettings,
                    layer: int = defaults.DEFAULT_RUN_LAYER, held_out: set[str] | None = None,
                    with_torch: bool = False, progress=None) -> AccuracyReport:
    """`precision`'s stages against the FP32 stages (onnxruntime), on `images`; with
    `with_torch` also our torch model at that precision against itself in fp32."""
    say = progress or (lambda msg: None)
    if precision not in defaults.CALIBRATION_PRECISIONS:
        raise Ps3EdgeError(f"the accuracy report compares {', '.join(defaults.CALIBRATION_PRECISIONS)} "
                           f"against fp32, got '{precision}'")
    if not images:
        raise Ps3EdgeError("the accuracy report needs at least one image")
    tol = Tolerance.of(precision)
    say(f"loading the fp32 and {precision} stages")
    pairs = _pairs(artifact_dir, precision, with_torch)
    report = AccuracyReport(precision, tol.to_dict(), settings={
        "num_look_close": settings.num_look_close, "num_token_look_close": settings.num_token_look_close,
        "select_num_each_scale": list(settings.select_num_each_scale or []) or None, "layer": layer,
        "prompt": "prior (bottom-up)"})
    times: dict[str, dict[str, list[float]]] = {}
    for k, path in enumerate(images):
        path = Path(path)
        _measure_image(report, pairs, path, settings, layer, times, held_out, say,
                       where=f"image {k + 1}/{len(images)} ({path.name})")
    report.rows = worst(report.per_image, CHECKS, tol)
    _say_where_pinned(report)
    report.timings_ms = {name: {s: float(np.median(v)) for s, v in st.items()} for name, st in times.items()}
    if not all(i["held_out"] for i in report.images):
        report.notes.append("some report images were also calibration images: the figures are not held-out")
    return report
