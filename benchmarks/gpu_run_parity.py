"""The public API's torch backend on CUDA (`ps3edge.load(art, backend="torch", device="cuda")`)
against the CPU paths, on a 3840x2160 frame.

Exports ps3-tiny-4k (the trunk written once, to trunk.onnx.data, as the real models are), then
runs the same frame through `Encoder.run`:
  - on the CPU: the onnxruntime backend (the exported stages, the trunk's initializers shared
    between the sessions) and the staged torch backend, the references;
  - on CUDA: the torch backend's fast path (device preprocessing, CUDA graph) in fp32, fp16 and
    bf16 (a dry run on the CPU: the staged torch backend in fp32 and bf16), with each stage's
    peak memory measured (`measure_memory=True`); the frame given as a numpy array and as a
    CUDA uint8 tensor (bit-identical results promised); `run_batch` of two frames against each
    run alone;
  - `ps3edge run --backend torch --device cuda --precision bf16 --json -`: its record, whose
    peak_memory_mib holds each stage's peaks.
Checks: device preprocessing bit-identical to PIL; fp32 selection identical to the CPU paths,
features within 1e-3 (min cosine 0.99999); fp16 / bf16 min per-token cosine >= 0.99 where the
selection is the same (else its IoU is reported: reduced-precision near ties); a CUDA tensor frame
gives the numpy frame's result bit for bit. Prints one JSON object with "ok" and "verdicts" (also
written to $OUT/run_parity.json when OUT is set).

    python benchmarks/gpu_run_parity.py            # on the GPU machine
    python benchmarks/gpu_run_parity.py --device cpu   # dry run of the same checks on the CPU
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ps3edge                                                      # noqa: E402
from ps3edge.compare import feature_diff, selection_iou              # noqa: E402
from ps3edge.demo import sample_image                                # noqa: E402
from ps3edge.runtime.preprocess import preprocess, preprocess_on_device   # noqa: E402

SETTINGS = dict(num_look_close=2, mode="after_image")


def against(out, ref) -> dict:
    """Selection and features of `out` against the reference result `ref`."""
    maps = [(out.selection_maps[s], ref.selection_maps[s]) for s in ref.selection_maps]
    row = {"selection_identical": all(np.array_equal(a, b) for a, b in maps),
           "selection_iou": min(selection_iou(a, b) for a, b in maps)}
    if row["selection_identical"]:
        max_abs, min_cos = feature_diff(out.features[0], ref.features[0])
        row.update(max_abs=max_abs, min_cosine=min_cos)
    return row


def timed(encoder, frame, settings, sync) -> tuple:
    """Three runs (on CUDA: eager, graph capture, replay); the result and ms of the last."""
    for _ in range(2):
        encoder.run(frame, settings)
    sync()
    t0 = time.perf_counter()
    out = encoder.run(frame, settings)
    sync()
    return out, round((time.perf_counter() - t0) * 1e3, 2)


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
    rgb = np.asarray(frame)                                         # (H,W,3) uint8, as a camera gives it
    settings = ps3edge.LookCloseSettings(**SETTINGS)
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "image": "3840x2160", "model": "ps3-tiny-4k", "settings": SETTINGS}
    verdicts = {}
    with tempfile.TemporaryDirectory() as tmp:
        art = Path(tmp) / "ps3-tiny-4k"
        t0 = time.perf_counter()
        export("ps3-tiny-4k", art, share_weights=True)
        report["export_s"] = round(time.perf_counter() - t0, 1)
        report["artifact_files"] = sorted(p.name for p in art.iterdir())
        pre = json.loads((art / "manifest.json").read_text())["preprocessing"]
        size, mean, std = pre["size"], pre["mean"], pre["std"]

        t0 = time.perf_counter()
        cpu_pixels = preprocess(frame, size, mean, std)
        report["preprocess_cpu_pil_ms"] = round((time.perf_counter() - t0) * 1e3, 1)
        for _ in range(2):
            sync()
            t0 = time.perf_counter()
            dev_pixels = preprocess_on_device(frame, size, mean, std, device)
            sync()
        report["preprocess_device_ms"] = round((time.perf_counter() - t0) * 1e3, 2)
        verdicts["preprocessing bit-identical to PIL"] = bool(np.array_equal(dev_pixels.cpu().numpy(), cpu_pixels))

        with ps3edge.load(art, backend="onnxruntime") as encoder:          # the GPU image's is a CPU build
            ref = encoder.run(rgb, settings)
            report["onnxruntime"] = repr(encoder)
        with ps3edge.load(art, backend="torch", device="cpu") as encoder:
            torch_cpu = encoder.run(rgb, settings)
        report["torch_cpu_vs_onnxruntime_cpu"] = against(torch_cpu, ref)

        # the torch backend takes fp16 on CUDA only (runners/torch.py TorchBackend.devices)
        for precision in ("fp32", "fp16", "bf16") if device == "cuda" else ("fp32", "bf16"):
            with ps3edge.load(art, backend="torch", device=device, precision=precision,
                              measure_memory=True) as encoder:
                out, wall = timed(encoder, rgb, settings, sync)
                row = {"encoder": repr(encoder), "tokens": int(out.features.shape[1]), "run_ms": wall,
                       "timings_ms": {k: round(v, 2) for k, v in out.timings_ms.items()},
                       "peak_memory_mib": {w: {k: round(v, 1) for k, v in s.items()} for w, s in out.memory_mib.items()},
                       "vs_onnxruntime_cpu": against(out, ref), "vs_torch_cpu": against(out, torch_cpu)}
                frame_t = torch.from_numpy(rgb.copy()).to(device)                # a CUDA uint8 (H,W,3) frame
                as_tensor = encoder.run(frame_t, settings)
                row["tensor_frame_identical"] = bool(np.array_equal(as_tensor.features, out.features))
                pair = encoder.run_batch([rgb, np.ascontiguousarray(rgb[:, ::-1])], settings)
                alone = encoder.run(np.ascontiguousarray(rgb[:, ::-1]), settings)
                row["batch_vs_alone"] = against(pair[1], alone)
            report[precision] = row
            vs = row["vs_onnxruntime_cpu"]
            verdicts[f"{precision}: a {device} uint8 tensor frame gives the numpy frame's result bit for bit"] = \
                row["tensor_frame_identical"]
            if precision == "fp32":
                verdicts["fp32: selection identical to the CPU paths"] = (
                    vs["selection_identical"] and row["vs_torch_cpu"]["selection_identical"])
                verdicts["fp32: features max abs <= 1e-3 and min cosine >= 0.99999"] = bool(
                    vs["selection_identical"] and vs["max_abs"] <= 1e-3 and vs["min_cosine"] >= 0.99999)
            else:
                # reduced precision may break near ties differently; features compare on a shared selection
                verdicts[f"{precision}: min cosine >= 0.99 (same selection) or a near-tie selection"] = bool(
                    vs["min_cosine"] >= 0.99 if vs["selection_identical"] else vs["selection_iou"] >= 0.9)
        # the command line on the same artifact: `run --json`'s record, peak memory per stage included
        frame_path = Path(tmp) / "frame.png"
        frame.save(frame_path)
        cli = subprocess.run([sys.executable, "-m", "ps3edge.cli", "run", str(art), "--image", str(frame_path),
                              "--out", str(Path(tmp) / "features.safetensors"), "--backend", "torch", "--device", device,
                              "--precision", "bf16", "--num-look-close", str(SETTINGS["num_look_close"]), "--json", "-"],
                             capture_output=True, text=True, timeout=300)
        try:
            record = json.JSONDecoder().raw_decode(cli.stdout[cli.stdout.index("{"):])[0]["images"][0]
            report["cli_run_json"] = {k: record[k] for k in ("features_shape", "timings_ms", "peak_memory_mib")}
        except (ValueError, KeyError, IndexError):
            record = None
            report["cli_run_json"] = {"exit": cli.returncode, "stderr": cli.stderr[-600:]}
        verdicts["`ps3edge run --backend torch --json` on this device writes peak_memory_mib"] = bool(
            cli.returncode == 0 and record is not None and record.get("peak_memory_mib"))
    report["verdicts"] = verdicts
    report["ok"] = all(verdicts.values())
    text = json.dumps(report, indent=2)
    print(text)
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "run_parity.json").write_text(text)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
