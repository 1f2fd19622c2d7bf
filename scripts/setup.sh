#!/usr/bin/env bash
# Installs everything (Python environment with libtorch and ONNX Runtime, release build, example CTs) and runs
# the main job on the embedded default: `vista3d infer` on a real abdominal CT with the demo weights.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
cargo build --release
data="$(bash scripts/fetch_data.sh)"
bin=target/release/vista3d
ct="$data/totalsegmentator/example_ct.nii.gz"
# The embedded default until a trained demo model ships: seeded RANDOM weights (--demo-weights, width 16).
# The output is a valid, correctly aligned label map of meaningless classes.
"$bin" infer --image "$ct" --label-prompt "spleen,liver,left kidney,right kidney" --demo-weights --output-dir target/demo/eval
echo
echo "Label map: target/demo/eval/example_ct/example_ct_trans.nii.gz (what was run: example_ct_trans.json beside it)."
echo "With the bundle's weights: $bin infer --image CT.nii.gz --checkpoint models/model.pt [--label-prompt ...]"
