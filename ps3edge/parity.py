"""Parity: the official `ps3-torch` model, our torch model and the exported stages, side by side.

For one model, image and look-close setting this measures, per stage and end to end:
max |difference|, the minimum per-token cosine similarity, and for the selection whether the
maps are identical (or, where ties make the official pick implementation-defined, their IoU and
whether the two picks are equivalent up to equal probabilities). Every row has a tolerance;
`ParityReport.ok` is False if any row is outside it.

Two official runs are made: as published, and with top-k ties pinned to our documented rule
(see runtime/planning.py). The first checks our selection against the real thing; the second
makes the selections identical so the features can be compared token for token.

A token count (NUM_TOKEN_LOOK_CLOSE) is split over the scales by a budget rule that changed
upstream (runtime/planning.py `BudgetRule`): the rule the installed reference follows is found
by running its code (reference.py `reference_budget_rules`), our pipelines plan by that same rule
for the comparison, and the report names it.

This module runs the sides and names the checks; measuring and judging them is compare.py's
(shared with the accuracy report of calibration/report.py, which `--precision fp16/int8` runs).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import defaults
from .artifact.manifest import load_manifest
from .calibration.calibrate import CalibrationOptions, calibrate
from .calibration.data import image_files
from .calibration.report import accuracy_report
from .compare import (BOUND, INFORMATIVE, Check, Measure, Measured, ParityRow, Tolerance, compare, difference,
                      feature_diff, features, identical_selection, selection_up_to_ties)
from .demo import sample_image
from .errors import Ps3EdgeError
from .exporter.onnx_export import export
from .reference import official_model, official_preprocess, reference_budget_rules, run_official
from .runtime.lookclose import Pipeline
from .runtime.planning import LookCloseSettings, resolve
from .runtime.preprocess import open_image


@dataclass
class ParityReport:
    rows: list[ParityRow] = field(default_factory=list)
    tokens: int = 0
    budget_rule: str = ""          # the reference's, which ours adopted: "floor-each-scale (ps3-torch 0.1.3)"

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)


def _pinned(key: str, note) -> Measure:
    """Features against the tie-pinned official run: only with the same selection are they comparable."""
    def measure(ref, test) -> Measured:
        same = identical_selection(test["selection_maps"], ref["selection_maps"])
        d, c = feature_diff(test[key], ref[key])
        return Measured(d, c, selection=note(same, test, ref), agrees=same)
    return measure


def _tokens(_, test, ref) -> str:
    """Our token count, and the official one where they differ (a token count split another way)."""
    ours, theirs = test["features"].shape[1], ref["features"].shape[1]
    return f"{ours} tokens" if ours == theirs else f"{ours} tokens, official {theirs}"


def _pixels(ref, test) -> Measured:
    return Measured(max_abs=feature_diff(test["pixels"], ref["pixels"])[0])


PREPROCESS = Check("preprocess", _pixels, BOUND, 1e-6)
# against the tie-pinned official run: same selection, same features, token for token
AGAINST_PINNED = (
    Check("highres", _pinned("highres tokens", lambda same, *_: "identical" if same else "DIFFERENT")),
    Check("end-to-end", _pinned("features", _tokens)),
)


def against_published(precision: str) -> tuple[Check, ...]:
    """The checks against the official code as published (its own pick among ties)."""
    prob_bound = defaults.PROB_MAX_ABS_FP32 if precision == "fp32" else None
    return (Check("lowres", features("lowres_features")), Check("lowres kv", features("kv_cache")),
            Check("selector", difference("prob"), BOUND, prob_bound),
            Check("selection", selection_up_to_ties, INFORMATIVE))


def _settings_kwargs(settings: LookCloseSettings) -> dict:
    return {"num_look_close": settings.num_look_close if settings.num_token_look_close is None else None,
            "num_token_look_close": settings.num_token_look_close,
            "select_num_each_scale": settings.select_num_each_scale,
            "smooth_selection_prob": settings.smooth_selection_prob}


def _with_default_steps(settings: LookCloseSettings, geometry) -> LookCloseSettings:
    """The settings checked against the model (before the slow official runs), with the step count
    spelled out for the official code: the one our runtime takes when none is asked."""
    schedule = resolve(settings, geometry)             # settings this model cannot take fail here
    nlc = settings.num_look_close
    if nlc is None and settings.num_token_look_close is None:
        nlc = schedule.steps
    return LookCloseSettings(
        num_look_close=nlc, num_token_look_close=settings.num_token_look_close,
        select_num_each_scale=settings.select_num_each_scale, mode=settings.mode,
        smooth_selection_prob=settings.smooth_selection_prob)


def _load_pipelines(artifact_dir, backends, say) -> dict[str, Pipeline]:
    say("loading our torch model and the exported stages")
    pipelines = {"ours-torch": Pipeline(artifact_dir, "torch", device="cpu")}   # the staged reference
    for backend in backends:
        pipelines[f"exported-{backend}"] = Pipeline(artifact_dir, backend)
    return pipelines


def _adopt_reference_rule(pipelines: dict, report: ParityReport, say) -> None:
    """Our pipelines plan a token count by the installed reference's budget rule; the report says which."""
    say("finding the official budget rule")
    rules = reference_budget_rules()
    for pipe in pipelines.values():
        pipe.budget_rule = rules.tokens
    report.budget_rule = rules.describe()
    report.rows.append(ParityRow("budget rule", "ours planned as the official", selection=report.budget_rule))


def _official_outputs(official, ours: Pipeline, pixels, settings, prompt_embedding, layer, say) -> tuple[dict, dict]:
    """The official model's outputs: as published, and with top-k ties pinned to our rule."""
    prompt = ours.prompt(settings, prompt_embedding)
    official_prompt = None if prompt_embedding is None else torch.from_numpy(prompt)
    px = torch.from_numpy(pixels)
    say("official low-res pass")
    with torch.no_grad():
        low = official.vision_model.forward_low_res(px, output_hidden_states=True, return_kv_cache=True)
    lowres = np.stack([low["hidden_states"][l].numpy() for l in ours.manifest.returned_layers])

    say("official look-close (as published, and with ties pinned)")
    kwargs = _settings_kwargs(settings)
    published = run_official(official, px, prompt=official_prompt, layer=layer, **kwargs)
    pinned = run_official(official, px, prompt=official_prompt, layer=layer, tie_rule="stable", **kwargs)
    n0 = ours.cfg.lowres_tokens
    return ({"lowres_features": lowres, "kv_cache": low["output_kv_cache"].numpy(), "prob": published.prob,
             "selection_maps": published.selection_maps, "features": published.features},
            {"selection_maps": pinned.selection_maps, "features": pinned.features,
             "highres tokens": pinned.features[:, n0:]})


def _our_outputs(pipe: Pipeline, pixels, settings, prompt_embedding, layer) -> dict:
    low = pipe.stages["lowres"].infer({"pixels": pixels})
    result = pipe.run(pixels, settings, prompt_embedding=prompt_embedding, layer=layer)
    return {**low, "prob": result.prob, "plan": result.plan, "selection_maps": result.plan.selection_maps,
            "features": result.features, "highres tokens": result.features[:, pipe.cfg.lowres_tokens:]}


def _our_batch_outputs(pipe: Pipeline, pixels: list, settings, prompt_embedding, layer) -> list[dict]:
    """`_our_outputs` of every image of one batch run, and each image run alone."""
    low = pipe.stages["lowres"].infer({"pixels": np.concatenate(pixels)})
    batch = pipe.run_batch(pixels, settings, prompt_embeddings=None if prompt_embedding is None
                           else [prompt_embedding] * len(pixels), layer=layer)
    n0 = pipe.cfg.lowres_tokens
    outputs = []
    for i, (px, result) in enumerate(zip(pixels, batch)):
        alone = pipe.run(px, settings, prompt_embedding=prompt_embedding, layer=layer)
        outputs.append({"lowres_features": low["lowres_features"][:, i: i + 1], "kv_cache": low["kv_cache"][:, :, i: i + 1],
                        "prob": result.prob, "plan": result.plan, "selection_maps": result.plan.selection_maps,
                        "features": result.features, "highres tokens": result.features[:, n0:],
                        "alone": {"features": alone.features, "selection_maps": alone.plan.selection_maps}})
    return outputs


def _batch_vs_alone(ref, test) -> Measured:
    """An image of a batch against the same image run alone: same selection, same features."""
    same = identical_selection(test["selection_maps"], ref["alone"]["selection_maps"])
    d, c = feature_diff(test["features"], ref["alone"]["features"])
    return Measured(d, c, selection="identical" if same else "DIFFERENT", agrees=same)


BATCH_VS_ALONE = (Check("batch vs alone", _batch_vs_alone, BOUND, defaults.BATCH_MAX_ABS_FP32),)


def batch_images(image, count: int) -> list:
    """`count` different images for a batch parity run: the image, then its mirror, its upside-down
    and its 90-degree turns, then crops of them (each a real, differently selected image)."""
    from PIL import Image

    views = [image, image.transpose(Image.FLIP_LEFT_RIGHT), image.transpose(Image.FLIP_TOP_BOTTOM),
             image.transpose(Image.ROTATE_90), image.transpose(Image.ROTATE_270), image.transpose(Image.ROTATE_180)]
    out = []
    for i in range(count):
        view = views[i % len(views)]
        k = i // len(views)                  # past the six views: central crops, smaller each round
        if k:
            w, h = view.size
            dw, dh = w * k // 10, h * k // 10
            view = view.crop((dw, dh, w - dw, h - dh))
        out.append(view)
    return out


def run_parity(model_spec: str, image, settings: LookCloseSettings, *, prompt_embedding=None,
               layer: int = defaults.DEFAULT_RUN_LAYER, backends=("onnxruntime",), precision: str = "fp32",
               seed: int = defaults.DEFAULT_SEED, artifact_dir=None, progress=None, batch: int = 1) -> ParityReport:
    """The official model against our staged torch model and the exported backends. With
    `batch` > 1, `batch` different images (`batch_images`) run as one batch on each pipeline:
    each image against the official code on it, and against the same image run alone."""
    say = progress or (lambda msg: None)
    if precision not in defaults.TOLERANCES:
        raise Ps3EdgeError(f"unknown precision '{precision}'")
    tol = Tolerance.of(precision)
    with tempfile.TemporaryDirectory(prefix="ps3edge-parity-") as tmp:
        if artifact_dir is None:
            artifact_dir = _export(model_spec, Path(tmp), seed, layer, say)
        pipelines = _load_pipelines(artifact_dir, backends, say)
        try:
            if batch > 1:
                return _compare_batch(pipelines, image, settings, prompt_embedding, layer, precision, tol, say, batch)
            return _compare_all(pipelines, image, settings, prompt_embedding, layer, precision, tol, say)
        finally:
            for pipe in pipelines.values():
                pipe.close()             # before the exported files go with the temporary directory


def _compare_all(pipelines: dict, image, settings, prompt_embedding, layer, precision, tol, say) -> ParityReport:
    """The official model against every pipeline (the first is our staged torch model)."""
    ours = pipelines["ours-torch"]
    settings = _with_default_steps(settings, ours.geometry)      # validated before the slow official runs

    report = ParityReport()
    _adopt_reference_rule(pipelines, report, say)
    say("building the official model")
    model = ours.stages["lowres"].model
    official = official_model(model)
    pil = open_image(image) if isinstance(image, (str, Path)) else image
    pixels = ours.pixels(pil)
    report.rows += compare([PREPROCESS], {"pixels": official_preprocess(pil, model.cfg).numpy()},
                           {"pixels": pixels}, "ours vs official processor", tol)
    published, pinned = _official_outputs(official, ours, pixels, settings, prompt_embedding, layer, say)
    report.tokens = published["features"].shape[1]
    for label, pipe in pipelines.items():
        say(f"running {label}")
        mine = _our_outputs(pipe, pixels, settings, prompt_embedding, layer)
        report.rows += compare(against_published(precision), published, mine, f"{label} vs official", tol)
        report.rows += compare(AGAINST_PINNED, pinned, mine, f"{label} vs official (ties pinned)", tol)
    return report


def _compare_batch(pipelines: dict, image, settings, prompt_embedding, layer, precision, tol, say,
                   count: int) -> ParityReport:
    """`_compare_all` for `count` images run as one batch on each pipeline."""
    ours = pipelines["ours-torch"]
    settings = _with_default_steps(settings, ours.geometry)
    ours.check_batch(count)
    report = ParityReport()
    _adopt_reference_rule(pipelines, report, say)
    say("building the official model")
    official = official_model(ours.stages["lowres"].model)
    pil = open_image(image) if isinstance(image, (str, Path)) else image
    pixels = [ours.pixels(view) for view in batch_images(pil, count)]
    refs = []
    for i, px in enumerate(pixels):
        say(f"official run, image {i + 1} of {count}")
        refs.append(_official_outputs(official, ours, px, settings, prompt_embedding, layer, lambda _: None))
    report.tokens = refs[0][0]["features"].shape[1]
    for label, pipe in pipelines.items():
        say(f"running {label}, a batch of {count}")
        for i, mine in enumerate(_our_batch_outputs(pipe, pixels, settings, prompt_embedding, layer)):
            where = f"{label} image {i + 1}/{count}"
            published, pinned = refs[i]
            report.rows += compare(against_published(precision), published, mine, f"{where} vs official", tol)
            report.rows += compare(AGAINST_PINNED, pinned, mine, f"{where} vs official (ties pinned)", tol)
            report.rows += compare(BATCH_VS_ALONE, mine, mine, f"{where} in the batch vs alone", tol)
    return report


def _export(model_spec: str, tmp: Path, seed: int, layer: int, say) -> Path:
    say(f"exporting {model_spec}")
    artifact_dir = tmp / "artifact"
    export(model_spec, artifact_dir, seed=seed, returned_layers=sorted({layer, -1}))
    return artifact_dir


def run_precision_parity(precision: str, settings: LookCloseSettings, *, model_spec: str | None = None,
                         artifact_dir=None, images=None, image=None, layer: int = defaults.DEFAULT_RUN_LAYER,
                         seed: int = defaults.DEFAULT_SEED, samples: int = defaults.DEFAULT_CALIBRATION_SAMPLES,
                         method: str = defaults.DEFAULT_CALIBRATION_METHOD, exclude_blocks=defaults.DEFAULT_EXCLUDE_BLOCKS,
                         with_torch: bool = False, progress=None):
    """`precision`'s exported stages (fp16, int8) against the FP32 stages: calibration/report.py.

    With `artifact_dir`, its registered stages are measured on `images` (a folder of held-out
    images; else `image`, else the sample image). Without, `model_spec` is exported to a temporary
    artifact and calibrated first; INT8 then takes its calibration images from `images` (the
    first `samples` by name) and reports on the rest.
    """
    say = progress or (lambda msg: None)
    if precision not in defaults.CALIBRATION_PRECISIONS:
        raise Ps3EdgeError(f"unknown precision '{precision}' for this comparison; choose one of: "
                           f"{', '.join(defaults.CALIBRATION_PRECISIONS)}")
    with tempfile.TemporaryDirectory(prefix="ps3edge-parity-") as tmp:
        tmp = Path(tmp)
        if artifact_dir is not None:
            return _registered_accuracy(artifact_dir, precision, images, image, settings, layer, with_torch, tmp, say)
        if model_spec is None:
            raise Ps3EdgeError("give --artifacts DIR or --model")
        if precision == "int8" and images is None:
            raise Ps3EdgeError("INT8 parity without --artifacts calibrates first: give --images DIR")
        artifact_dir = _export(model_spec, tmp, seed, layer, say)
        held = None
        if image is not None and images is None:
            held = tmp / "held"
            held.mkdir()
            _copy_image(image, held)
        options = CalibrationOptions(precision, images, method=method, samples=samples, exclude_blocks=exclude_blocks,
                                     holdout_images=held, report_settings=settings, layer=layer,
                                     with_torch=with_torch)
        return calibrate(artifact_dir, options, progress=say)


def _registered_accuracy(artifact_dir, precision, images, image, settings, layer, with_torch, tmp: Path, say):
    """The accuracy report of the stages `artifact_dir` already registers for `precision`."""
    manifest = load_manifest(artifact_dir, verify=True)
    entry = manifest.precisions.get(precision)
    if images is not None:
        files = image_files(images, limit=defaults.DEFAULT_HOLDOUT_SAMPLES, what="held-out image folder")
    else:
        held = tmp / "held"
        held.mkdir()
        files = [_copy_image(image, held)]
    calibration = {i.sha256 for i in entry.calibration.calibration_images} if entry and entry.calibration else set()
    return accuracy_report(artifact_dir, precision, files, settings, layer=layer, held_out=calibration,
                           with_torch=with_torch, progress=say)


def _copy_image(image, folder: Path) -> Path:
    """A path, a PIL image or None (the sample image) -> a file in `folder`."""
    if image is None:
        image = sample_image()
    if isinstance(image, (str, Path)):
        open_image(image)                                   # a one-line error for a bad file
        target = folder / Path(image).name
        target.write_bytes(Path(image).read_bytes())
        return target
    target = folder / "image.png"
    image.save(target)
    return target
