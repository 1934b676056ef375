"""Parity: the official `ps3-torch` model, our torch model and the exported stages, side by side.

For one model, image and look-close setting this measures, per stage and end to end:
max |difference|, the minimum per-token cosine similarity, and for the selection whether the
maps are identical (or, where ties make the official pick implementation-defined, their IoU and
whether the two picks are equivalent up to equal probabilities). Every row has a tolerance;
`ParityReport.ok` is False if any row is outside it.

Two official runs are made: as published, and with top-k ties pinned to our documented rule
(see runtime/planning.py). The first checks our selection against the real thing; the second
makes the selections identical so the features can be compared token for token.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import defaults
from .errors import Ps3EdgeError
from .exporter.onnx_export import export
from .reference import official_model, official_preprocess, run_official
from .runtime.lookclose import Pipeline
from .runtime.planning import LookCloseSettings, resolve_steps


@dataclass
class ParityRow:
    stage: str
    compared: str
    max_abs: float | None = None
    min_cosine: float | None = None
    iou: float | None = None           # selection IoU, where a row measures one
    selection: str = ""
    ok: bool = True


@dataclass
class ParityReport:
    rows: list[ParityRow] = field(default_factory=list)
    tokens: int = 0

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)


def feature_diff(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(max |a-b|, min cosine over tokens) for (..., tokens, C) arrays of equal shape."""
    a = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b = b.reshape(-1, b.shape[-1]).astype(np.float64)
    if a.shape != b.shape:
        return float("inf"), -1.0
    if a.size == 0:
        return 0.0, 1.0
    cos = (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)
    return float(np.abs(a - b).max()), float(cos.min())


def selection_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def tie_equivalent(ours: np.ndarray, theirs: np.ndarray, scale_prob: np.ndarray) -> bool:
    """Same number of patches and the same multiset of probabilities selected."""
    a = np.sort(scale_prob[ours.astype(bool)])
    b = np.sort(scale_prob[theirs.astype(bool)])
    return a.shape == b.shape and bool(np.array_equal(a, b))


def _settings_kwargs(settings: LookCloseSettings) -> dict:
    return {"num_look_close": settings.num_look_close if settings.num_token_look_close is None else None,
            "num_token_look_close": settings.num_token_look_close,
            "select_num_each_scale": settings.select_num_each_scale,
            "smooth_selection_prob": settings.smooth_selection_prob}


def run_parity(model_spec: str, image, settings: LookCloseSettings, *, prompt_embedding=None,
               layer: int = defaults.DEFAULT_RUN_LAYER, backends=("onnxruntime",), precision: str = "fp32",
               seed: int = defaults.DEFAULT_SEED, artifact_dir=None, progress=None) -> ParityReport:
    say = progress or (lambda msg: None)
    if precision not in defaults.TOLERANCES:
        raise Ps3EdgeError(f"unknown precision '{precision}'")
    tol = defaults.TOLERANCES[precision]
    with tempfile.TemporaryDirectory(prefix="ps3edge-parity-") as tmp:
        if artifact_dir is None:
            say(f"exporting {model_spec}")
            artifact_dir = Path(tmp) / "artifact"
            export(model_spec, artifact_dir, seed=seed, returned_layers=sorted({layer, -1}))
        say("loading our torch model and the exported stages")
        pipelines = {"ours-torch": Pipeline(artifact_dir, "torch", device="cpu")}   # the staged reference
        for backend in backends:
            pipelines[f"exported-{backend}"] = Pipeline(artifact_dir, backend)
        ours = pipelines["ours-torch"]
        model = ours.stages["lowres"].model
        cfg = model.cfg
        geometry = ours.geometry
        nlc = settings.num_look_close if settings.num_look_close is not None else defaults.DEFAULT_NUM_LOOK_CLOSE
        settings = LookCloseSettings(
            num_look_close=nlc, num_token_look_close=settings.num_token_look_close,
            select_num_each_scale=settings.select_num_each_scale, mode=settings.mode,
            smooth_selection_prob=settings.smooth_selection_prob)
        resolve_steps(settings, geometry)           # validate before the slow official runs

        say("building the official model")
        official = official_model(model)
        report = ParityReport()

        pil = image if not isinstance(image, (str, Path)) else None
        if pil is None:
            from .runtime.preprocess import open_image
            pil = open_image(image)
        pixels = ours.pixels(pil)
        official_pixels = official_preprocess(pil, cfg).numpy()
        d, _ = feature_diff(pixels, official_pixels)
        report.rows.append(ParityRow("preprocess", "ours vs official processor", max_abs=d,
                                     ok=d <= 1e-6))

        prompt = ours.prompt(settings, prompt_embedding)
        official_prompt = None if prompt_embedding is None else torch.from_numpy(prompt)
        px = torch.from_numpy(pixels)

        say("official low-res pass")
        with torch.no_grad():
            low = official.vision_model.forward_low_res(px, output_hidden_states=True, return_kv_cache=True)
        official_lowres = np.stack([low["hidden_states"][l].numpy() for l in ours.manifest.returned_layers])
        official_kv = low["output_kv_cache"].numpy()

        say("official look-close (as published, and with ties pinned)")
        kwargs = _settings_kwargs(settings)
        published = run_official(official, px, prompt=official_prompt, layer=layer, **kwargs)
        pinned = run_official(official, px, prompt=official_prompt, layer=layer, tie_rule="stable", **kwargs)
        report.tokens = published.features.shape[1]

        for label, pipe in pipelines.items():
            say(f"running {label}")
            low_ours = pipe.stages["lowres"].infer({"pixels": pixels})
            for name, a, b in (("lowres", low_ours["lowres_features"], official_lowres),
                               ("lowres kv", low_ours["kv_cache"], official_kv)):
                d, c = feature_diff(a, b)
                report.rows.append(ParityRow(name, f"{label} vs official", d, c,
                                             ok=d <= tol["max_abs"] and c >= tol["min_cosine"]))
            result = pipe.run(pixels, settings, prompt_embedding=prompt_embedding, layer=layer)
            d = float(np.abs(result.prob - published.prob).max())
            report.rows.append(ParityRow("selector", f"{label} vs official", max_abs=d,
                                         ok=d <= defaults.PROB_MAX_ABS_FP32 or precision != "fp32"))

            # selection against the code as published: identical, or equivalent up to ties
            parts, sel_ok = [], True
            for s, (mine, theirs, sp) in enumerate(zip(result.plan.selection_maps, published.selection_maps,
                                                       result.plan.scale_probs)):
                if np.array_equal(mine, theirs):
                    parts.append("identical")
                elif tie_equivalent(mine, theirs, sp):
                    parts.append(f"IoU {selection_iou(mine, theirs):.3f} (ties)")
                else:
                    parts.append(f"IoU {selection_iou(mine, theirs):.3f} DIFFERENT")
                    sel_ok = False
            report.rows.append(ParityRow("selection", f"{label} vs official", selection=", ".join(parts),
                                         ok=sel_ok))

            # end to end against the tie-pinned official run: same selection, same features
            same = all(np.array_equal(m, t) for m, t in zip(result.plan.selection_maps, pinned.selection_maps))
            n0 = cfg.lowres_tokens
            d, c = feature_diff(result.features[:, n0:], pinned.features[:, n0:])
            report.rows.append(ParityRow("highres", f"{label} vs official (ties pinned)", d, c,
                                         selection="identical" if same else "DIFFERENT",
                                         ok=same and d <= tol["max_abs"] and c >= tol["min_cosine"]))
            d, c = feature_diff(result.features, pinned.features)
            report.rows.append(ParityRow("end-to-end", f"{label} vs official (ties pinned)", d, c,
                                         selection=f"{result.features.shape[1]} tokens",
                                         ok=same and d <= tol["max_abs"] and c >= tol["min_cosine"]))
        for pipe in pipelines.values():
            pipe.close()                 # before the exported files go with the temporary directory
        return report


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
    from .calibration.calibrate import calibrate
    from .calibration.data import image_files
    from .calibration.report import accuracy_report
    from .artifact.manifest import load_manifest
    say = progress or (lambda msg: None)
    if precision not in defaults.CALIBRATION_PRECISIONS:
        raise Ps3EdgeError(f"unknown precision '{precision}' for this comparison; choose one of: "
                           f"{', '.join(defaults.CALIBRATION_PRECISIONS)}")
    with tempfile.TemporaryDirectory(prefix="ps3edge-parity-") as tmp:
        if artifact_dir is None:
            if model_spec is None:
                raise Ps3EdgeError("give --artifacts DIR or --model")
            if precision == "int8" and images is None:
                raise Ps3EdgeError("INT8 parity without --artifacts calibrates first: give --images DIR")
            say(f"exporting {model_spec}")
            artifact_dir = Path(tmp) / "artifact"
            export(model_spec, artifact_dir, seed=seed, returned_layers=sorted({layer, -1}))
            held = None
            if image is not None and images is None:
                held = Path(tmp) / "held"
                held.mkdir()
                _copy_image(image, held)
            return calibrate(artifact_dir, precision, images, method=method, samples=samples,
                             exclude_blocks=exclude_blocks, holdout_images=held, report_settings=settings,
                             layer=layer, with_torch=with_torch, progress=say)
        manifest = load_manifest(artifact_dir, verify=True)
        entry = manifest.precisions[precision].to_dict() if precision in manifest.precisions else {}
        if images is not None:
            files = image_files(images, limit=defaults.DEFAULT_HOLDOUT_SAMPLES, what="held-out image folder")
        else:
            held = Path(tmp) / "held"
            held.mkdir()
            files = [_copy_image(image, held)]
        calibration = {i["sha256"] for i in entry.get("calibration_images", [])}
        return accuracy_report(artifact_dir, precision, files, settings, layer=layer, held_out=calibration,
                               with_torch=with_torch, progress=say)


def _copy_image(image, folder: Path) -> Path:
    """A path, a PIL image or None (the sample image) -> a file in `folder`."""
    from .demo import sample_image

    if image is None:
        image = sample_image()
    if isinstance(image, (str, Path)):
        from .runtime.preprocess import open_image
        open_image(image)                                   # a one-line error for a bad file
        target = folder / Path(image).name
        target.write_bytes(Path(image).read_bytes())
        return target
    target = folder / "image.png"
    image.save(target)
    return target
