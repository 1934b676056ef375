#!/usr/bin/env bash
# The GPU check: one call on a machine with PyTorch and a CUDA GPU but no network, ~9 minutes on an
# H100 (docs/performance.md "The GPU check" gives the expected time of each section). Sections,
# the essential first; each has a time guard: it starts only if its minimum is left of the
# budget (GPU_CHECK_BUDGET_S, default 540 s), and is stopped after its maximum or what is left.
#   0. installs the parity reference from the wheels beside this script (benchmarks/wheels/, made
#      by fetch_wheels.sh on a networked machine, kept out of git; carry it to the GPU machine);
#      the card's name, driver and torch;
#   1. fp32 parity: our fast path against the official ps3-torch with its top-k ties pinned to
#      our rule, tiny and real-width (4-block) models, 1.5K and 4K scales: identical selection and
#      min cosine >= 0.99999 asked for (parity_fp32.json);
#   2. the table (gpu_table.py): ps3-1.5k and ps3-4k, NUM_LOOK_CLOSE 1 and 6, B 1 and 8, ours (the
#      torch backend's fast path, bf16, CUDA graph) against the official code configured as
#      VILA-HD configures it (the last 2 layers returned) on the same B images as one batch, one
#      run: ms, images/s, torch.cuda.max_memory_allocated of each side's run, per-stage ms and
#      peaks; at B=1 the bf16 parity (min cosine >= 0.99 on our selection); then NUM_LOOK_CLOSE
#      2..5 at B=1 for the per-step cost, if time allows (table.json, table.png);
#   3. the public API (`ps3edge.load(..., backend="torch", device="cuda")`) on a 3840x2160 frame
#      against the CPU paths (onnxruntime on the one-trunk artifact, staged torch), fp32 / fp16 /
#      bf16, per-stage peak memory (gpu_run_parity.py: run_parity.json);
#      then report.md: the card, every verdict and the table (gpu_report.py);
#   4. vila-hd-tiny: projector, LLM prefill and decode columns (vila_tiny_bf16.json);
#   5. the candidates, each with its effect and its error (candidates.txt): attention per SDPA
#      backend and with heads zero-padded 72 -> 80 / 96 / 128 (gpu_diagnose.py); the MLP half's
#      GELU / residual add fused into its GEMMs (gpu_epilogue.py); the low-res side: the lowres
#      stage alone, and the selected patches cut against the whole-scale patch table they replaced
#      (gpu_lowres.py); the high-res blocks' products in FP8 (gpu_fp8.py);
#   6. the profiles (candidates.txt): where the high-res time goes, matmuls / attention / the rest
#      (gpu_diagnose.py floor), and the top kernels per stage (gpu_profile.py).
# Results go to $OUT if set (the device tool's output folder), else benchmarks/results/; at most 8
# files come back from the device tool: log.txt (the caller's tee), report.md, table.json,
# table.png, parity_fp32.json, run_parity.json, vila_tiny_bf16.json, candidates.txt.
# GPU_CHECK_DRY=1 runs every step with tiny models on the CPU (a rehearsal; no budget unless
# GPU_CHECK_BUDGET_S is set).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
out="${OUT:-$here/results}"
mkdir -p "$out"
if [ "${GPU_CHECK_DRY:-0}" = 1 ]; then
    device=cpu; budget="${GPU_CHECK_BUDGET_S:-0}"; export PYTHONPATH="$root"
    depth=(--model ps3-tiny --depth 2)
    table=(--models ps3-tiny,ps3-tiny-4k --num-look-close 1,2 --batch 1,2 --sweep 3 --dtype fp32
           --warmup 0 --repeat 1)
    vila=(--num-look-close 1 --dtype fp32 --warmup 0 --repeat 1)
    big=ps3-tiny-4k; fp8_models=ps3-tiny; floor_models="ps3-tiny"
else
    device=cuda; budget="${GPU_CHECK_BUDGET_S:-540}"
    depth=(--model ps3-1.5k --model ps3-4k --depth 4)
    table=(--models ps3-1.5k,ps3-4k --num-look-close 1,6 --batch 1,8 --sweep 2,3,4,5 --dtype bf16
           --warmup 3 --repeat 10)
    vila=(--num-look-close 1,6 --dtype bf16 --warmup 2 --repeat 5)
    big=ps3-4k; fp8_models=ps3-4k; floor_models="ps3-1.5k ps3-4k"
    wheels="${WHEELS:-$here/wheels}"
    if ! ls "$wheels"/ps3_torch-*.whl >/dev/null 2>&1; then
        echo "error: no parity reference wheels in $wheels: run benchmarks/fetch_wheels.sh on a networked machine and carry benchmarks/wheels"
        exit 2
    fi
    site="$(mktemp -d)/site"
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl
    export PYTHONPATH="$root:$site"
fi
export PYTHONUNBUFFERED=1 COLUMNS=200
# each section says how far into the check it starts, so a run cut off still shows where the time went
section() { echo "== [${SECONDS}s] $*"; }
# guard MIN MAX command...: run it if MIN seconds of the budget are left, stop it (SIGINT, then
# KILL 10 s later) after MAX seconds or what is left; a failure or a stop is said, never fatal
guard() {
    local min=$1 max=$2 rc=0
    shift 2
    if [ "$budget" -gt 0 ]; then
        local left=$((budget - SECONDS))
        if [ "$left" -lt "$min" ]; then
            echo "SKIPPED by the time guard: ${left}s left of ${budget}s, this step needs ${min}s: $*"
            return 0
        fi
        [ "$max" -le "$left" ] || max=$left
        timeout --signal=INT --kill-after=10 "$max" "$@" || rc=$?
    else
        "$@" || rc=$?
    fi
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        echo "STOPPED by the time guard after ${max}s: $*"
    elif [ "$rc" != 0 ]; then
        echo "FAILED (exit $rc): $*"
    fi
    return 0
}
# gpu_table.py's own deadline: 30 s before the guard would stop it, so that the row in flight
# finishes and is written (no budget: none)
deadline() {
    if [ "$budget" -le 0 ]; then echo 1e9; return; fi
    local max=$1 left=$((budget - SECONDS))
    [ "$max" -le "$left" ] || max=$left
    echo $((max - 30))
}

section "the card"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.total --format=csv 2>/dev/null || true
scratch="$(mktemp -d)"
frame="$scratch/frame_3840x2160.png"
python3 -c "from PIL import Image; from ps3edge.demo import sample_image; sample_image().resize((3840, 2160), Image.BICUBIC).save('$frame')"

section "1. fp32 parity on the GPU (official ties pinned): tiny models, then the real widths at depth 4"
guard 30 75 python3 -m ps3edge.cli bench --model ps3-tiny --model ps3-tiny-4k --device "$device" --dtype fp32 \
    --num-look-close 1,2 --against official --official-ties pinned --warmup 1 --repeat 3 \
    --json "$scratch/parity_fp32_tiny.json"
guard 40 90 python3 -m ps3edge.cli bench "${depth[@]}" --device "$device" --dtype fp32 --num-look-close 2 \
    --against official --official-ties pinned --warmup 1 --repeat 3 --json "$scratch/parity_fp32_depth.json"
python3 -c "import json, os, sys; json.dump([r for f in sys.argv[2:] if os.path.exists(f) for r in json.load(open(f))], open(sys.argv[1], 'w'), indent=2)" \
    "$out/parity_fp32.json" "$scratch/parity_fp32_tiny.json" "$scratch/parity_fp32_depth.json"

section "2. the table: 1.5K and 4K, NUM_LOOK_CLOSE 1 and 6, B 1 and 8, ours against the official code (VILA-HD's configuration), peaks, bf16 parity"
guard 120 300 python3 "$here/gpu_table.py" "${table[@]}" --device "$device" --image "$frame" \
    --deadline-s "$(deadline 300)" --json "$out/table.json" --plot "$out/table.png"

section "3. the public API's torch backend on CUDA against the CPU paths (3840x2160 frame)"
OUT="$out" guard 40 90 python3 "$here/gpu_run_parity.py" --device "$device"
python3 "$here/gpu_report.py" "$out" || echo "gpu_report.py FAILED"

section "4. vila-hd-tiny: the projector and LLM columns"
guard 20 45 python3 -m ps3edge.cli bench --model vila-hd-tiny --device "$device" --image "$frame" "${vila[@]}" \
    --json "$out/vila_tiny_bf16.json"

section "5. candidates, each with its effect and its error (candidates.txt)"
{
    section "5a. attention alone: each SDPA backend, and heads zero-padded from 72 to 80 / 96 / 128"
    guard 15 40 python3 "$here/gpu_diagnose.py" --skip accuracy,floor --device "$device"
    section "5b. the MLP half without separate GELU / residual-add passes (cuBLASLt epilogue, residual in the GEMM)"
    guard 15 45 python3 "$here/gpu_epilogue.py" --device "$device"
    section "5c. the low-res side: the lowres stage alone; the selected patches cut against the whole-scale patch table"
    guard 25 60 python3 "$here/gpu_lowres.py" --model "$big" --device "$device"
    section "5d. the high-res blocks' matrix products in FP8 (rowwise _scaled_mm), the whole run timed, its error"
    guard 60 120 python3 "$here/gpu_fp8.py" --models "$fp8_models" --device "$device"
} 2>&1 | { grep --line-buffered -v -e "No CUDA runtime" || true; } | tee -a "$out/candidates.txt"

section "6. profiles: where the high-res time goes, and the top kernels (candidates.txt)"
{
    for m in $floor_models; do
        section "6a. $m: matmuls, attention, the rest of the high-res blocks, and the best ratio these kernels allow"
        guard 30 60 python3 "$here/gpu_diagnose.py" --skip accuracy,attention --floor-model "$m" --device "$device"
    done
    section "6b. kernel time per stage and the top kernels (torch.profiler, one eager run)"
    guard 30 60 python3 "$here/gpu_profile.py" --models "$big" --device "$device" --top 15
} 2>&1 | { grep --line-buffered -v -e USDT -e "Profiler clears" -e "_warn_once" || true; } | tee -a "$out/candidates.txt"

python3 "$here/gpu_report.py" "$out" > /dev/null || true
section "done (budget ${budget}s; files in $out: $(ls "$out" | tr '\n' ' '))"
