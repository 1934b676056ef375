"""Reduced precision on this machine: FP16 and INT8 (each calibration method) against FP32.

For each model it exports the stages, writes a folder of synthetic calibration images and a
disjoint held-out folder, runs `ps3edge calibrate` for fp16 and for int8 with max, entropy and
percentile (and, with --selector-inputs, int8 max with the selector's input layers quantized
too), and prints the accuracy report's worst rows and the onnxruntime stage times (median over
the held-out images) as markdown; --json writes everything.

    python benchmarks/precision_cpu.py                                  # ps3-tiny
    python benchmarks/precision_cpu.py --model ps3-1.5k --depth 2 --selector-inputs

Random weights: activations are near-Gaussian, without the outlier channels of trained ViTs,
so the ranking of the methods here says little about a real checkpoint; run it on yours.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ps3edge.calibration.calibrate import CalibrationOptions, calibrate  # noqa: E402
from ps3edge.calibration.data import synthetic_image  # noqa: E402
from ps3edge.calibration.report import FEATURE_ROWS  # noqa: E402
from ps3edge.exporter.onnx_export import export  # noqa: E402
from ps3edge.model import random_model, save_checkpoint  # noqa: E402
from ps3edge.model.config import preset  # noqa: E402
from ps3edge.runtime.planning import LookCloseSettings  # noqa: E402


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ps3-tiny")
    ap.add_argument("--depth", type=int, default=None, help="truncate the preset to its first N blocks")
    ap.add_argument("--samples", type=int, default=8, help="calibration images")
    ap.add_argument("--holdout", type=int, default=4, help="held-out images")
    ap.add_argument("--selector-inputs", action="store_true", help="also int8 max with the selector's inputs quantized")
    ap.add_argument("--torch", action="store_true", help="fp16: also our torch model (slow on CPUs without fp16 units)")
    ap.add_argument("--json", type=Path, default=None)
    return ap.parse_args()


def prepare(args, tmp: Path) -> tuple[Path, Path]:
    """Calibration and held-out folders of synthetic images, and the exported artifact in tmp/art."""
    cal, held = tmp / "cal", tmp / "held"
    cal.mkdir()
    held.mkdir()
    for k in range(args.samples):
        synthetic_image(k).save(cal / f"cal{k:03d}.png")
    for k in range(args.holdout):
        synthetic_image(1000 + k).save(held / f"held{k:03d}.png")
    spec = args.model
    if args.depth is not None:
        cfg = preset(args.model)
        cfg = cfg.replace(depth=args.depth, select_layers=tuple(min(l, args.depth - 1) for l in cfg.select_layers))
        save_checkpoint(random_model(cfg, 0), tmp / "checkpoint")
        spec = str(tmp / "checkpoint")
    export(spec, tmp / "art")
    return cal, held


# the judged feature rows, then each pipeline on its own selection (informative: where the
# selections differ, swapped patches change their step mates; the report's docstring)
ROWS = FEATURE_ROWS + ("end-to-end (own selection)",)


def print_markdown(args, results: list[dict]) -> None:
    name = args.model + (f" depth {args.depth}" if args.depth else "")
    print(f"\n### {name}: worst over {args.holdout} held-out images (min per-token cosine / max abs)\n")
    print("| run | compared | " + " | ".join(ROWS) + " | selection IoU |")
    print("|---|---|" + "---|" * (len(ROWS) + 1))
    for res in results:
        for compared in dict.fromkeys(r["compared"] for r in res["rows"]):
            rows = {r["stage"]: r for r in res["rows"] if r["compared"] == compared}
            cells = [f"{rows[s]['min_cosine']:.6f} / {rows[s]['max_abs']:.3g}" for s in ROWS]
            print(f"| {res['run']} | {compared.split(' (')[1].rstrip(')')} | " + " | ".join(cells)
                  + f" | {rows['selection']['iou']:.3f} |")
    print("\n| run | onnxruntime ms: lowres | highres (1 step, 2560 tokens) |")
    print("|---|---|---|")
    shown = set()
    for res in results:
        for label, stages in res["timings_ms"].items():
            key = label if label.startswith("fp32") else f"{res['run']}"
            if key in shown or "torch" in label:
                continue
            shown.add(key)
            print(f"| {key} | {stages['lowres']:.0f} | {stages['highres']:.0f} |")


def main() -> None:
    args = parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="ps3edge-precision-") as tmp:
        tmp = Path(tmp)
        cal, held = prepare(args, tmp)
        runs = [("fp16", None, True)] + [("int8", m, True) for m in ("max", "entropy", "percentile")]
        if args.selector_inputs:
            runs.append(("int8", "max", False))
        for precision, method, keep_selector_inputs in runs:
            label = precision if method is None else f"int8 {method}" + ("" if keep_selector_inputs else " +selector inputs")
            print(f"{label} ...", file=sys.stderr, flush=True)
            options = CalibrationOptions(precision, cal if precision == "int8" else None, method=method or "max",
                                         samples=args.samples, holdout_images=held, holdout=args.holdout,
                                         exclude_selection_branch=keep_selector_inputs,
                                         report_settings=LookCloseSettings(num_look_close=1),
                                         with_torch=args.torch and precision == "fp16")
            report = calibrate(tmp / "art", options)
            results.append({"run": label, **report.to_dict()})
    print_markdown(args, results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
