"""`ps3edge demo`: export the tiny preset, run the look-close loop on the sample image, draw it.

`demo_settings` checks, before anything is written, that the output directory may be written (a
rerun replaces the previous demo's artifact and nothing else); `run_demo` does the work.

The sample image lives in `examples/sample.png`; it is a drawn street-like scene with small text
and signs, the kind of detail PS3 looks closer at. If the file is absent (a wheel install without
the repository), the same picture is drawn again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image, ImageDraw

from . import defaults
from .errors import Ps3EdgeError
from .runtime.preprocess import open_image

SAMPLE_PATH = Path(__file__).resolve().parent.parent / "examples" / "sample.png"


def draw_sample_image(width: int = 1600, height: int = 1000) -> Image.Image:
    img = Image.new("RGB", (width, height), (135, 180, 225))
    d = ImageDraw.Draw(img)
    d.rectangle((0, height * 0.6, width, height), fill=(70, 70, 75))              # road
    for x in range(0, width, 160):                                                 # lane marks
        d.rectangle((x, height * 0.8 - 4, x + 80, height * 0.8 + 4), fill=(240, 240, 240))
    for i, (x0, w, h, c) in enumerate([(40, 300, 420, (150, 90, 70)), (380, 260, 520, (190, 180, 160)),
                                       (700, 340, 380, (110, 120, 140)), (1100, 420, 480, (170, 120, 90))]):
        top = height * 0.6 - h
        d.rectangle((x0, top, x0 + w, height * 0.6), fill=c)                      # buildings
        for wx in range(x0 + 20, x0 + w - 30, 50):
            for wy in range(int(top) + 20, int(height * 0.6) - 40, 60):
                d.rectangle((wx, wy, wx + 25, wy + 35), fill=(250, 240, 180) if (wx + wy) % 3 else (60, 70, 90))
    d.rectangle((1320, 420, 1480, 500), fill=(20, 110, 50))                       # exit sign
    d.text((1335, 440), "EXIT 42", fill=(255, 255, 255))
    d.text((1335, 465), "Airport ->", fill=(255, 255, 255))
    d.ellipse((560, 640, 620, 700), fill=(200, 30, 30))                            # stop sign
    d.text((572, 662), "STOP", fill=(255, 255, 255))
    d.rectangle((860, 650, 1060, 760), fill=(30, 60, 160))                         # a car
    d.text((900, 700), "KX-2931", fill=(255, 255, 255))
    return img


def sample_image() -> Image.Image:
    return open_image(SAMPLE_PATH) if SAMPLE_PATH.is_file() else draw_sample_image()


DEMO_PRESET = "ps3-tiny"
FEATURES_NAME, OVERLAY_NAME = "features.safetensors", "overlay.png"


def check_replaceable_artifact(artifacts: Path) -> None:
    """A rerun of `demo` replaces its previous artifact, and nothing else: the directory must hold
    a manifest and only the files it lists."""
    # only the file list, not load_manifest: a demo written by another ps3edge version (another
    # manifest schema) is still the demo's own artifact and may be replaced
    try:
        listed = set(json.loads((artifacts / defaults.MANIFEST_NAME).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        raise Ps3EdgeError(f"{artifacts} exists and is not a ps3edge artifact; choose another --out") from None
    extra = sorted(p.name for p in artifacts.iterdir() if p.name not in listed | {defaults.MANIFEST_NAME})
    if extra:
        raise Ps3EdgeError(f"{artifacts} holds files that are not part of its artifact ({', '.join(extra[:3])}); "
                           "choose another --out")


def demo_settings(out: Path):
    """Check `out` and the look-close settings before anything is written; returns the settings:
    one look-close step unless the environment asks otherwise, so the overlay shows a choice."""
    from .model import preset
    from .runtime.outputs import check_output_path
    from .runtime.planning import Geometry, resolve, settings_from_env

    artifacts = out / "artifacts"
    if artifacts.exists():
        check_replaceable_artifact(artifacts)
    for name in (FEATURES_NAME, OVERLAY_NAME):
        check_output_path(out / name)
    env_steps = os.environ.get(defaults.ENV_NUM_LOOK_CLOSE) or os.environ.get(defaults.ENV_NUM_TOKEN_LOOK_CLOSE)
    settings = settings_from_env(num_look_close=None if env_steps else 1)
    resolve(settings, Geometry.of(preset(DEMO_PRESET)))      # settings the model cannot take fail before the export
    return settings


def run_demo(out: Path, settings, progress=print):
    """Export the preset into out/artifacts, run it on the sample image, write the features and the
    overlay into `out`; returns the look-close result."""
    from .exporter.onnx_export import export
    from .runtime.lookclose import Pipeline
    from .runtime.outputs import write_outputs

    artifacts = out / "artifacts"
    export(DEMO_PRESET, artifacts, overwrite=True, progress=progress)
    progress("running the look-close loop on the sample image")
    image = sample_image()
    result = Pipeline(artifacts, "onnxruntime").run(image, settings, layer=defaults.DEFAULT_RUN_LAYER)
    write_outputs(result, image, out / FEATURES_NAME, out / OVERLAY_NAME)
    return result
