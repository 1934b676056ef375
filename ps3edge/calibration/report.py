"""The accuracy report: a reduced-precision pipeline against the FP32 reference, per stage and
end to end, on a set of held-out images.

For each image both pipelines run; the rows are
  lowres, lowres kv, selection features, conv features   same pixels in, per-token comparison
  highres patches      must be bit-exact (the image-space region stays FP32 in every precision)
  selector (stage)     the reduced selector on the FP32 stage's inputs: |prob diff| (it is FP32 code,
                       so this is <= 1e-5 or something is wrong)
  selector (chained)   on the reduced lowres stage's outputs: |prob diff| (informative)
  selection            IoU of the selected patches per scale (the selector decides where PS3 looks,
                       so a wrong selection is the worst error); "near ties" when every swapped patch
                       was, in FP32, closer to the cut than twice the measured probability error
  highres (stage)      the reduced highres stage fed the FP32 run's patches, positions and K/V
  end-to-end           whole runs; low-res tokens plus the high-res tokens at the positions that
                       both selections picked (all of them when the selections are identical)
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

from .. import __version__, defaults
from ..errors import Ps3EdgeError
from ..artifact.io import write_json_atomic
from ..parity import ParityRow, feature_diff, selection_iou
from ..runtime.planning import LookCloseSettings
from ..runtime.preprocess import open_image

FEATURE_ROWS = ("lowres", "lowres kv", "selection features", "conv features", "highres (stage)", "end-to-end")


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


def tolerance(precision: str) -> dict:
    tol = dict(defaults.TOLERANCES[precision])
    tol["min_iou"] = defaults.SELECTION_MIN_IOU.get(precision, 1.0)
    tol["near_ties"] = precision in defaults.SELECTION_NEAR_TIES_ACCEPTED
    return tol


def _tokens(x: np.ndarray) -> np.ndarray:
    """(1,C,h,w) maps -> (h*w, C) tokens."""
    return x.reshape(x.shape[1], -1).T


def _positions(result, geometry) -> np.ndarray:
    """Global patch index of each high-res token of a run, in the order of result.features."""
    pos = [result.plan.step_positions(geometry, t) for t in range(len(result.plan.steps))]
    return np.sort(np.concatenate(pos)) if pos else np.zeros(0, np.int32)


def near_ties_only(plan_ref, plan_test, prob_error: float) -> bool:
    """True when every patch that one selection has and the other lacks had, in the reference,
    a probability within 2 x `prob_error` of the reference's cut - the swap is what the measured
    probability error can do to near-tied patches, not a change of what the model looks at."""
    for ref_map, test_map, prob in zip(plan_ref.selection_maps, plan_test.selection_maps, plan_ref.scale_probs):
        ref_sel, test_sel = ref_map.astype(bool), test_map.astype(bool)
        moved = ref_sel != test_sel
        if not moved.any():
            continue
        cut = float(prob[ref_sel].min()) if ref_sel.any() else float(prob.max())
        if np.any(np.abs(prob[moved] - cut) > 2 * prob_error):
            return False
    return True


def compare_pipelines(ref, test, pixels: np.ndarray, settings: LookCloseSettings, layer: int,
                      label: str) -> tuple[list[ParityRow], dict, dict]:
    """Rows for one image; and the stage times (ms) of `ref` and `test`."""
    prompt = ref.prior_prompt.astype(np.float32)
    times_ref, times_test = {}, {}
    t0 = time.perf_counter()
    low_r = ref.stages["lowres"].infer({"pixels": pixels})
    times_ref["lowres"] = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    low_t = test.stages["lowres"].infer({"pixels": pixels})
    times_test["lowres"] = (time.perf_counter() - t0) * 1e3

    rows = []
    for stage, key, shape in (("lowres", "lowres_features", None), ("lowres kv", "kv_cache", None),
                              ("selection features", "selection_features", _tokens),
                              ("conv features", "conv_features", _tokens)):
        a, b = low_r[key], low_t[key]
        if shape is not None:
            a, b = shape(a), shape(b)
        d, c = feature_diff(b, a)
        rows.append(ParityRow(stage, label, d, c))
    d = float(np.abs(low_t["highres_patches"] - low_r["highres_patches"]).max())
    rows.append(ParityRow("highres patches", label, max_abs=d, ok=d <= 1e-6))

    sel_in = lambda low: {"selection_features": low["selection_features"],
                          "conv_features": low["conv_features"], "prompt": prompt}
    # each pipeline on its own lowres outputs and selection (used below and end to end)
    res_r = ref.run_from_lowres(low_r, settings, layer=layer)
    res_t = test.run_from_lowres(low_t, settings, layer=layer)
    prob_r, prob_t = res_r.prob, res_t.prob
    prob_iso = test.stages["selector"].infer(sel_in(low_r))["prob"][0]
    d = float(np.abs(prob_iso - prob_r).max())
    rows.append(ParityRow("selector (stage)", label, max_abs=d, ok=d <= defaults.PROB_MAX_ABS_FP32))
    rows.append(ParityRow("selector (chained)", label, max_abs=float(np.abs(prob_t - prob_r).max())))

    plan_r, plan_t = res_r.plan, res_t.plan
    ious = [selection_iou(a, b) for a, b in zip(plan_t.selection_maps, plan_r.selection_maps)]
    same = all(np.array_equal(a, b) for a, b in zip(plan_t.selection_maps, plan_r.selection_maps))
    iou_text = "IoU " + ", ".join(f"{x:.3f}" for x in ious)
    if same:
        text = "identical"
    elif near_ties_only(plan_r, plan_t, float(np.abs(prob_t - prob_r).max())):
        text = f"{iou_text} (near ties)"
    else:
        text = iou_text
    rows.append(ParityRow("selection", label, iou=min(ious), selection=text))

    for times, res in ((times_ref, res_r), (times_test, res_t)):
        for k in ("selector", "planning", "highres"):
            times[k] = res.timings_ms.get(k, 0.0)
    n0 = ref.cfg.lowres_tokens
    pos_r, pos_t = _positions(res_r, ref.geometry), _positions(res_t, test.geometry)

    # the highres stage alone: the first step of the reference run, on the reference's inputs
    # (its reference output is already in res_r: the tokens at those positions)
    pos0 = plan_r.step_positions(ref.geometry, 0)[None]
    feed = {"patches": low_r["highres_patches"][0][pos0], "positions": pos0, "kv_cache": low_r["kv_cache"]}
    b = test.stages["highres"].infer(feed)["highres_features"][ref.layer_index(layer), 0]
    a = res_r.features[0, n0 + np.searchsorted(pos_r, pos0[0])]
    d, c = feature_diff(b, a)
    rows.append(ParityRow("highres (stage)", label, d, c))

    common, i_r, i_t = np.intersect1d(pos_r, pos_t, assume_unique=True, return_indices=True)
    fa = np.concatenate([res_r.features[0, :n0], res_r.features[0, n0:][i_r]])
    fb = np.concatenate([res_t.features[0, :n0], res_t.features[0, n0:][i_t]])
    d, c = feature_diff(fb, fa)
    rows.append(ParityRow("end-to-end", label, d, c,
                    selection=f"{n0 + len(common)} of {res_r.features.shape[1]} tokens compared"))
    return rows, times_ref, times_test


def _kind(selection: str) -> int:
    return 0 if selection == "identical" else 1 if selection.endswith("(near ties)") else 2


def _worst(rows_by_image: dict[str, list[ParityRow]], tol: dict) -> list[ParityRow]:
    order, merged = [], {}
    for rows in rows_by_image.values():
        for r in rows:
            key = (r.stage, r.compared)
            if key not in merged:
                order.append(key)
                merged[key] = ParityRow(r.stage, r.compared, r.max_abs, r.min_cosine, r.iou, r.selection, r.ok)
                continue
            m = merged[key]
            if r.max_abs is not None:
                m.max_abs = max(m.max_abs, r.max_abs)
            if r.min_cosine is not None:
                m.min_cosine = min(m.min_cosine, r.min_cosine)
            if r.stage == "selection":
                # the worst image: a real difference over near ties over identical, then the lower IoU
                if (_kind(r.selection), -r.iou) > (_kind(m.selection), -m.iou):
                    m.selection = r.selection
                m.iou = min(m.iou, r.iou)
            if r.stage == "end-to-end" and r.min_cosine is not None and r.min_cosine <= m.min_cosine:
                m.selection = r.selection               # the worst image's token count
            m.ok = m.ok and r.ok
    rows = [merged[k] for k in order]
    for m in rows:
        if m.stage in FEATURE_ROWS:
            m.ok = m.ok and m.max_abs <= tol["max_abs"] and m.min_cosine >= tol["min_cosine"]
        elif m.stage == "selection":
            m.ok = m.iou >= tol["min_iou"] - 1e-12 or (tol["near_ties"] and m.selection.endswith("(near ties)"))
    return rows


def accuracy_report(artifact_dir, precision: str, images: list[Path], settings: LookCloseSettings,
                    layer: int = defaults.DEFAULT_RUN_LAYER, held_out: set[str] | None = None,
                    with_torch: bool = False, progress=None) -> AccuracyReport:
    """`precision`'s stages against the FP32 stages (onnxruntime), on `images`; with
    `with_torch` also our torch model at that precision against itself in fp32."""
    from ..runtime.lookclose import Pipeline
    from ..artifact.io import file_sha256

    say = progress or (lambda msg: None)
    if precision not in defaults.CALIBRATION_PRECISIONS:
        raise Ps3EdgeError(f"the accuracy report compares {', '.join(defaults.CALIBRATION_PRECISIONS)} "
                           f"against fp32, got '{precision}'")
    if not images:
        raise Ps3EdgeError("the accuracy report needs at least one image")
    tol = tolerance(precision)
    say(f"loading the fp32 and {precision} stages")
    pairs = [(f"{precision} vs fp32 (onnxruntime)", Pipeline(artifact_dir, "onnxruntime"),
              Pipeline(artifact_dir, "onnxruntime", precision=precision))]
    if with_torch:
        if precision not in ("fp16", "bf16"):
            raise Ps3EdgeError("the torch comparison exists for fp16 (our torch model has no INT8 path)")
        pairs.append((f"{precision} vs fp32 (torch)", Pipeline(artifact_dir, "torch", device="cpu"),
                      Pipeline(artifact_dir, "torch", precision=precision, device="cpu")))
    report = AccuracyReport(precision, tol, settings={
        "num_look_close": settings.num_look_close, "num_token_look_close": settings.num_token_look_close,
        "select_num_each_scale": list(settings.select_num_each_scale or []) or None, "layer": layer,
        "prompt": "prior (bottom-up)"})
    times: dict[str, dict[str, list[float]]] = {}
    for k, path in enumerate(images):
        path = Path(path)
        digest = file_sha256(path)
        report.images.append({"name": path.name, "sha256": digest,
                              "held_out": held_out is None or digest not in held_out})
        pil = open_image(path)
        rows = []
        for label, ref, test in pairs:
            say(f"{label}: image {k + 1}/{len(images)} ({path.name})")
            pixels = ref.pixels(pil)
            r, t_ref, t_test = compare_pipelines(ref, test, pixels, settings, layer, label)
            rows += r
            backend = label.rsplit("(", 1)[1].rstrip(")")
            for name, tt in ((f"fp32 {backend}", t_ref), (f"{precision} {backend}", t_test)):
                for stage, ms in tt.items():
                    times.setdefault(name, {}).setdefault(stage, []).append(ms)
        report.per_image[path.name] = rows
    report.rows = _worst(report.per_image, tol)
    report.timings_ms = {name: {s: float(np.median(v)) for s, v in st.items()} for name, st in times.items()}
    if not all(i["held_out"] for i in report.images):
        report.notes.append("some report images were also calibration images: the figures are not held-out")
    return report
