#!/usr/bin/env bash
# The GPU check to run on a lent device machine (H100/H200, torch 2.11.0+cu130 at $TORCH_LIB, no TensorRT, no cargo):
# carry target/release/vista3d and this script; results land in $OUT (or target/bench/gpu).
#   run: bash benches/gpu_check.sh
# 1. the bundle's table for the libtorch methods (fp32 / tf32 / amp) on the released width, 128^3 windows, the
#    333x333x603 volume of ../shared/bench, with each method's logits compared against fp32;
# 2. the same with 117 labels (everything) for the class head's share;
# 3. everything end to end on a 333x333x603 volume (issue 12), amp then fp32, with the GPU's peak used memory
#    sampled by nvidia-smi every 0.2 s (CUDA context and libtorch's cached blocks included, so at least what
#    torch.cuda.max_memory_allocated would say; MONAI's bundle: 32.7 GiB, ../shared/bench).
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
peak_gpu_memory() { # peak_gpu_memory NAME CMD...: CMD's output in $out/NAME.txt, the idle and peak used MiB appended
    local name="$1" peak=0 idle used pid; shift
    idle=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -n 1)
    "$@" > "$out/$name.txt" 2>&1 &
    pid=$!
    while kill -0 "$pid" 2> /dev/null; do
        used=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -n 1)
        [ "${used:-0}" -gt "$peak" ] && peak="$used"
        sleep 0.2
    done
    wait "$pid" || echo "$name failed" >> "$out/$name.txt"
    echo "$name: peak GPU memory used $peak MiB ($idle MiB before it started)" | tee -a "$out/$name.txt"
}
for method in amp fp32; do
    peak_gpu_memory "everything_333_$method" "$bin" bench --random-width 48 --device cuda --methods "$method" \
        --labels "$(seq -s, 1 117)" --volume 333,333,603 --runs 1 --warmup 1 --e2e-runs 1
done
