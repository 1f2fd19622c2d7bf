#!/usr/bin/env bash
# The GPU check to run on a lent device machine (H100/H200, torch 2.11.0+cu130 at $TORCH_LIB, no TensorRT, no cargo):
# carry target/release/vista3d and this script; results land in $OUT (or target/bench/gpu).
#   run: bash benches/gpu_check.sh
# 1. the bundle's table for the libtorch methods (fp32 / tf32 / amp) on the released width, 128^3 windows, the
#    333x333x603 volume of ../shared/bench, with each method's logits compared against fp32;
# 2. the same with 117 labels (everything) for the class head's share.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_LIB="${TORCH_LIB:-/opt/torch/.venv/lib/python3.12/site-packages/torch/lib}"
export LD_LIBRARY_PATH="$TORCH_LIB:${LD_LIBRARY_PATH:-}"
out="${OUT:-target/bench/gpu}"; mkdir -p "$out"
bin="${VISTA3D_BIN:-target/release/vista3d}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1 || true
"$bin" bench --random-width 48 --device cuda --methods fp32,tf32,amp,trt_tf32,trt_fp16 \
    --volume 333,333,603 --runs 10 --warmup 3 --e2e-runs 3 --json "$out/bench_1label.json" 2>&1 | tee "$out/bench_1label.txt"
"$bin" bench --random-width 48 --device cuda --methods fp32,amp \
    --labels "$(seq -s, 1 117)" --volume none --runs 5 --warmup 2 --json "$out/bench_117labels.json" 2>&1 | tee "$out/bench_117labels.txt"
