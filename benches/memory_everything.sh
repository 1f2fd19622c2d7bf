#!/usr/bin/env bash
# Peak memory of "everything" (117 classes) on a 333 x 333 x 603 CT at 1.5 mm: the volume on which MONAI's
# bundle peaks at 32.7 GiB (../bench, H200, stitching all 117 logit channels at full size).
#   bash benches/memory_everything.sh [WIDTH=8] [THREADS=2]
# A synthetic CT (body-like foreground over the whole box, so the foreground crop keeps it whole) is
# segmented by `vista3d infer` with 128^3 windows; /usr/bin/time reports the peak resident memory. The width
# only changes the network's own activations (about 1 GB at width 48 on a 128^3 window); the stitching memory,
# which is what grows with prompts x volume in MONAI, does not depend on it.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
width="${1:-8}" threads="${2:-2}"
dir=target/bench/memory
mkdir -p "$dir"
"$VISTA3D_PYTHON" - "$dir/ct_333x333x603.nii.gz" <<'PY'
import sys, numpy as np, nibabel as nib
rng = np.random.default_rng(0)
shape = (333, 333, 603)
x, y, z = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij")
body = (x**2 + y**2) < 0.98
ct = np.where(body, 40 + 30 * np.sin(7 * x) * np.cos(5 * y) + 20 * np.cos(3 * z), -1000).astype(np.int16)
ct += rng.integers(-20, 20, size=shape, dtype=np.int16)
affine = np.diag([1.5, 1.5, 1.5, 1.0])
nib.save(nib.Nifti1Image(ct, affine), sys.argv[1])
PY
cargo build --release --quiet
"target/release/vista3d" init-checkpoint --width "$width" --seed 0 --out "$dir/random_e$width.safetensors" > /dev/null
/usr/bin/time -v target/release/vista3d infer --image "$dir/ct_333x333x603.nii.gz" --checkpoint "$dir/random_e$width.safetensors" \
    --output-dir "$dir/out" --threads "$threads" --set output_dtype=uint8 2> "$dir/time.txt"
grep -E "Maximum resident|Elapsed" "$dir/time.txt"
