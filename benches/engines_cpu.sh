#!/usr/bin/env bash
# `vista3d bench` on the CPU: libtorch fp32 against ONNX Runtime (the GPU methods are listed as not runnable).
# Usage: bash benches/engines_cpu.sh [WIDTH] [PATCH] [VOLUME] [BENCH ARGS...]   (defaults 16, 64, 128,128,128;
# VOLUME none: the model computation only; e.g. `--labels "$(seq -s, 1 117)"` after it for everything)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh > /dev/null
width="${1:-16}"; patch="${2:-64}"; volume="${3:-128,128,128}"
work=target/bench/engines_cpu; mkdir -p "$work"
cargo build --release --quiet
bin=target/release/vista3d
"$bin" export-onnx --random-width "$width" --seed 0 --out "$work/onnx_e$width"
"$bin" bench --random-width "$width" --threads 2 --device cpu \
    --set "patch_size=[$patch,$patch,$patch]" --set "onnx_dir=\"$work/onnx_e$width\"" \
    --volume "$volume" --runs 3 --warmup 1 --e2e-runs 1 "${@:4}" --json "$work/bench_e${width}_p$patch.json"
