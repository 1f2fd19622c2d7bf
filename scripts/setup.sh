#!/usr/bin/env bash
# Installs everything (Python environment with libtorch and ONNX Runtime, release build, example data) and runs
# the main job on the embedded default: `vista3d infer` with the shipped demo model (models/demo_e8.safetensors,
# width 8, trained by `vista3d train` on synthetic phantoms: models/README.md) on a held-out phantom.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
# Optional: gloo for multi-process training on CPUs (GPUs use NCCL from the torch wheel).
bash scripts/install_gloo.sh || echo "[setup] no gloo: multi-process runs on CPUs will be unavailable" >&2
# TensorRT headers (checksum-checked, scripts/fetch_trt_headers.sh): the binary is built with the TensorRT shim,
# so it uses TensorRT wherever libnvinfer.so.10/11 is installed (nothing links against it at build time).
if [ -z "${TENSORRT_INCLUDE_DIR:-}" ]; then
    if TENSORRT_INCLUDE_DIR="$(bash scripts/fetch_trt_headers.sh)"; then
        export TENSORRT_INCLUDE_DIR
    else
        unset TENSORRT_INCLUDE_DIR
        echo "[setup] TensorRT headers not fetched: building without the TensorRT shim (TensorRT unavailable)" >&2
    fi
fi
cargo build --release
# What this binary can run here (ONNX Runtime, TensorRT, CUDA) and why not.
target/release/vista3d info --engines
bash scripts/fetch_data.sh > /dev/null
bin=target/release/vista3d
# models/demo_phantoms/phantom_4_ct.nii.gz: held out from training (models/prep_phantoms.py, seed 4), 3 mm.
"$bin" infer --image models/demo_phantoms/phantom_4_ct.nii.gz --checkpoint models/demo_e8.safetensors \
    --label-prompt liver,spleen --set 'resample_spacing=[3,3,3]' --set 'patch_size=[32,32,32]' \
    --output-dir target/demo/eval
echo
echo "Label map: target/demo/eval/phantom_4_ct/phantom_4_ct_trans.nii.gz (1 = liver, 3 = spleen; ground truth"
echo "models/demo_phantoms/phantom_4_seg.nii.gz uses local ids 1/2; measured Dice 0.92 / 0.92, models/README.md)."
echo "With the bundle's weights: $bin infer --image CT.nii.gz --checkpoint models/model.pt [--label-prompt ...]"
