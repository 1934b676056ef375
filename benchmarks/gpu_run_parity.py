"""`ps3edge run`'s CUDA fast path against the CPU reference, on a 3840x2160 frame.

Exports ps3-tiny-4k (needs the onnx package), then runs the same image through
  - the staged torch backend on the CPU (the reference path, equal to onnxruntime and to the
    official code in the CPU tests),
  - the torch backend on CUDA in fp32 and bf16 (Pipeline -> FastLookClose, device preprocessing,
    CUDA graph),
and checks: device preprocessing bit-identical to PIL; fp32 selection identical and features
within 1e-3 (min cosine 0.99999); bf16 min per-token cosine >= 0.99 on the same selection.
Prints one JSON object (also written to $OUT/run_parity.json when OUT is set).

    python benchmarks/gpu_run_parity.py            # on the GPU machine
    python benchmarks/gpu_run_parity.py --device cpu   # dry run of the same checks on the CPU
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ps3edge.demo import sample_image
from ps3edge.compare import feature_diff, selection_iou
from ps3edge.runtime.lookclose import Pipeline
from ps3edge.runtime.planning import settings_from_env
from ps3edge.runtime.preprocess import preprocess, preprocess_on_device


def main() -> int:
    device = sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check (--device cpu runs the same checks on the CPU)")
        return 0
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    try:
        from ps3edge.exporter.onnx_export import export
    except ImportError as e:
        print(f"skipped: exporting an artifact needs the onnx package ({e})")
        return 0
    frame = sample_image().resize((3840, 2160), Image.BICUBIC)
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "image": "3840x2160"}
    with tempfile.TemporaryDirectory() as tmp:
        art = Path(tmp) / "ps3-tiny-4k"
        export("ps3-tiny-4k", art)
        cfg_pre = json.loads((art / "manifest.json").read_text())["preprocessing"]
        size, mean, std = cfg_pre["size"], cfg_pre["mean"], cfg_pre["std"]

        t0 = time.perf_counter()
        cpu_pixels = preprocess(frame, size, mean, std)
        report["preprocess_cpu_pil_ms"] = round((time.perf_counter() - t0) * 1e3, 1)
        for _ in range(2):
            sync()
            t0 = time.perf_counter()
            dev_pixels = preprocess_on_device(frame, size, mean, std, device)
            sync()
        report["preprocess_device_ms"] = round((time.perf_counter() - t0) * 1e3, 2)
        report["preprocess_identical"] = bool(np.array_equal(dev_pixels.cpu().numpy(), cpu_pixels))

        settings = settings_from_env({}, num_look_close=2, mode="after_image")
        ref = Pipeline(art, "torch", device="cpu").run(frame, settings)
        for precision in ("fp32", "bf16"):
            pipe = Pipeline(art, "torch", precision=precision, device=device, fast=True)
            assert pipe.fast is not None
            for _ in range(2):                                          # eager, then the graph capture
                pipe.run(frame, settings)
            t0 = time.perf_counter()
            out = pipe.run(frame, settings)
            wall = (time.perf_counter() - t0) * 1e3
            same = all(np.array_equal(a, b) for a, b in zip(out.plan.selection_maps, ref.plan.selection_maps))
            row = {"selection_identical": same, "tokens": int(out.features.shape[1]),
                   "run_ms": round(wall, 2), "timings_ms": {k: round(v, 2) for k, v in out.timings_ms.items()}}
            row["selection_iou"] = min(selection_iou(a, b) for a, b in zip(out.plan.selection_maps,
                                                                           ref.plan.selection_maps))
            if same:
                max_abs, min_cos = feature_diff(out.features[0], ref.features[0])
                row.update(max_abs=max_abs, min_cosine=min_cos)
            report[precision] = row
    ok = (report["preprocess_identical"] and report["fp32"]["selection_identical"]
          and report["fp32"]["max_abs"] <= 1e-3 and report["fp32"]["min_cosine"] >= 0.99999
          and (not report["bf16"]["selection_identical"] or report["bf16"]["min_cosine"] >= 0.99))
    report["ok"] = bool(ok)
    text = json.dumps(report, indent=2)
    print(text)
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "run_parity.json").write_text(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
