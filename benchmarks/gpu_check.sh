#!/usr/bin/env bash
# The GPU check: on a machine with PyTorch and a CUDA GPU but no network.
#   1. installs the parity reference from the wheels beside this script (benchmarks/wheels/,
#      made by fetch_wheels.sh on a networked machine, kept out of git);
#   2. checks parity on the GPU in fp32: our fast path against the official ps3-torch with its
#      top-k ties pinned to our rule, tiny and real-width (4-block) models, 1.5K and 4K scales;
#   3. checks `ps3edge run --backend torch` on CUDA (device preprocessing, CUDA graph) against
#      the CPU path on a 3840x2160 frame (gpu_run_parity.py; needs the onnx package there);
#   4. runs the bf16 sweep NUM_LOOK_CLOSE=1..6 for ps3-1.5k and ps3-4k against the official code
#      (as published, configured as VILA-HD configures it: the last 2 layers returned; its default
#      of every layer returned is the extra labelled column), with CUDA graphs, preprocessing timed
#      on a 3840x2160 frame both ways: JSON, markdown and a PNG plot; then vila-hd-tiny for the
#      projector / LLM columns (its rows join sweep_bf16.json);
#   4b. the batch sweep: ps3-4k NUM_LOOK_CLOSE=6 in bf16, B=1 and 8 images of the 3840x2160 frame
#      through Pipeline.run_batch (torch backend: the fast path), against the official code given
#      the same B images as one batch (VILA-HD's configuration): images/s, per-image latency,
#      peak memory and the ratio, into batch_bf16.json (its table is in the log);
#   5. splits the high-res time into matmuls, attention and the rest (gpu_diagnose.py floor), times
#      the attention alone per SDPA backend and with heads zero-padded to 80 / 96 / 128,
#      lists the GPU kernels that take the time (gpu_profile.py), and times the MLP half of a
#      block without its GELU / residual-add passes (gpu_epilogue.py), and the whole run with the
#      high-res blocks' products in FP8, with the error that brings (gpu_fp8.py), all into floor.txt.
# Results go to $OUT if set (the device tool's output folder), else benchmarks/results/.
# GPU_CHECK_DRY=1 runs every step with tiny models on whatever device there is (a CPU rehearsal).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
out="${OUT:-$here/results}"
mkdir -p "$out"
if [ "${GPU_CHECK_DRY:-0}" = 1 ]; then
    real=(--model ps3-tiny --model ps3-tiny-4k); sweep_steps=1,2; depth=(); floor_models="ps3-tiny"
    device=cpu; repeat=(--warmup 0 --repeat 1); export PYTHONPATH="$root"
    batch=(--model ps3-tiny-4k --num-look-close 2 --batch 1,2)
else
    real=(--model ps3-1.5k --model ps3-4k); sweep_steps=1,2,3,4,5,6; depth=(--depth 4); floor_models="ps3-1.5k ps3-4k"
    device=cuda; repeat=(--warmup 3 --repeat 10)
    batch=(--model ps3-4k --num-look-close 6 --batch 1,8)
    site="$(mktemp -d)/site"
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "${WHEELS:-$here/wheels}"/*.whl
    export PYTHONPATH="$root:$site"
fi
export PYTHONUNBUFFERED=1 COLUMNS=200
ps3edge() { python3 -m ps3edge.cli "$@"; }
# each section says how far into the check it starts, so a run cut off by the device's limit
# still shows where the time went
section() { echo "== [${SECONDS}s] $*"; }

# at most 8 files come back from the device tool: log.txt (the caller's), parity_fp32.json,
# run_parity.json, sweep_bf16.{json,md,png} (vila-hd-tiny's rows in the JSON too), batch_bf16.json,
# floor.txt
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.total --format=csv 2>/dev/null || true
scratch="$(mktemp -d)"
frame="$scratch/frame_3840x2160.png"
python3 -c "from PIL import Image; from ps3edge.demo import sample_image; sample_image().resize((3840, 2160), Image.BICUBIC).save('$frame')"

section "fp32 parity on the GPU (official ties pinned)"
ps3edge bench --model ps3-tiny --model ps3-tiny-4k --device "$device" --dtype fp32 --num-look-close 1,2 \
    --against official --official-ties pinned --warmup 1 --repeat 3 --json "$scratch/parity_fp32_tiny.json"
parts=("$scratch/parity_fp32_tiny.json")
if [ ${#depth[@]} -gt 0 ]; then
    ps3edge bench "${real[@]}" "${depth[@]}" --device "$device" --dtype fp32 --num-look-close 2 --against official \
        --official-ties pinned --warmup 1 --repeat 3 --json "$scratch/parity_fp32_depth4.json"
    parts+=("$scratch/parity_fp32_depth4.json")
fi
python3 -c "import json, sys; json.dump([r for f in sys.argv[2:] for r in json.load(open(f))], open(sys.argv[1], 'w'), indent=2)" \
    "$out/parity_fp32.json" "${parts[@]}"

section "ps3edge run on CUDA against the CPU path"
OUT="$out" python3 "$here/gpu_run_parity.py" --device "$device" || echo "gpu_run_parity.py FAILED (exit $?)"

section "bf16 sweep against the official code (VILA-HD's configuration; every layer returned as the extra column)"
ps3edge bench "${real[@]}" --device "$device" --dtype bf16 --num-look-close "$sweep_steps" --against official \
    --official-all-layers --image "$frame" "${repeat[@]}" --json "$out/sweep_bf16.json" \
    --markdown "$out/sweep_bf16.md" --plot "$out/sweep_bf16.png"
ps3edge bench --model vila-hd-tiny --device "$device" --dtype bf16 --num-look-close 1,6 --image "$frame" \
    --warmup 2 --repeat 5 --json "$scratch/vila_tiny_bf16.json" \
    && python3 -c "import json, sys; json.dump(json.load(open(sys.argv[1])) + json.load(open(sys.argv[2])), open(sys.argv[1], 'w'), indent=2)" \
        "$out/sweep_bf16.json" "$scratch/vila_tiny_bf16.json" \
    || echo "vila-hd-tiny bench FAILED (exit $?)"

section "batch sweep: B images through one run_batch call against the official code at the same B"
ps3edge bench "${batch[@]}" --backend torch --device "$device" --dtype bf16 --against official --image "$frame" \
    "${repeat[@]}" --json "$out/batch_bf16.json" || echo "batch sweep FAILED (exit $?)"

section "where the high-res time goes (matmuls, attention, the rest) and the best ratio these kernels allow"
for m in $floor_models; do
    python3 "$here/gpu_diagnose.py" --skip accuracy,attention --floor-model "$m" --device "$device" \
        | tee -a "$out/floor.txt" || echo "gpu_diagnose.py floor $m FAILED"
done
section "attention alone: each SDPA backend, and heads zero-padded from 72 to 80 / 96 / 128"
python3 "$here/gpu_diagnose.py" --skip accuracy,floor --device "$device" | tee -a "$out/floor.txt" \
    || echo "gpu_diagnose.py attention FAILED"
section "kernel time per stage and the top kernels (torch.profiler, one eager run)"
python3 "$here/gpu_profile.py" --models "${floor_models// /,}" --device "$device" --top 15 2>&1 \
    | grep -v -e USDT -e "Profiler clears" -e "_warn_once" | tee -a "$out/floor.txt" || echo "gpu_profile.py FAILED"
section "the MLP half without separate GELU / residual-add passes (cuBLASLt epilogue, residual in the GEMM)"
python3 "$here/gpu_epilogue.py" --device "$device" 2>&1 | tee -a "$out/floor.txt" || echo "gpu_epilogue.py FAILED"
section "the high-res blocks' matrix products in FP8 (rowwise _scaled_mm), the whole run timed, its error"
python3 "$here/gpu_fp8.py" --device "$device" 2>&1 | grep -v -e "No CUDA runtime" | tee -a "$out/floor.txt" || echo "gpu_fp8.py FAILED"
section "done"
