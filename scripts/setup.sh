#!/usr/bin/env bash
# Installs everything (Python environment with libtorch and ONNX Runtime, release build) and runs the main job
# on the embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
cargo build --release
bin=target/release/vista3d
demo=target/demo/vista3d_random_e16.safetensors
mkdir -p "$(dirname "$demo")"
# The embedded default until a trained demo model ships: seeded random weights (NOT a trained model).
[ -f "$demo" ] || "$bin" init-checkpoint --width 16 --seed 0 --out "$demo"
"$bin" info --checkpoint "$demo"
echo
echo "vista3d is built at $bin; run '$bin --help' for the subcommands."
