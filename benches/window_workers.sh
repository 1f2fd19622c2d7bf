#!/usr/bin/env bash
# `window_workers`: windows computed at once on the CPU, each on a share of the threads. PAIRED runs of
# `vista3d infer --precision fp32` with window_workers 1 and N (N first, then 1, repeated), whole process under
# `/usr/bin/time` (wall, user, peak RSS), and the label agreement between the two maps.
#   bash benches/window_workers.sh [WIDTH=24] [PATCH=64] [LABELS=1,3,4,6] [WORKERS=2] [THREADS=2] [PAIRS=2] \
#       [CT=$VISTA3D_DATA/totalsegmentator/example_ct.nii.gz] [CHECKPOINT]
# Weights: CHECKPOINT, else `vista3d init-checkpoint --seed 0` of that width.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh test > /dev/null
width="${1:-24}" patch="${2:-64}" labels="${3:-1,3,4,6}" workers="${4:-2}" threads="${5:-2}" pairs="${6:-2}"
ct="${7:-${VISTA3D_DATA:-target/data}/totalsegmentator/example_ct.nii.gz}" checkpoint="${8:-}"
dir=target/bench/window_workers/e${width}_p${patch}; mkdir -p "$dir"
cargo build --release --quiet --bin vista3d
bin=target/release/vista3d
if [ -z "$checkpoint" ]; then
    checkpoint="$dir/weights.safetensors"
    [ -f "$checkpoint" ] || "$bin" init-checkpoint --width "$width" --seed 0 --out "$checkpoint" > /dev/null
fi
stem=$(basename "$ct" .nii.gz)
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
for i in $(seq "$pairs"); do
    for w in "$workers" 1; do
        rm -rf "$dir/out$w"
        /usr/bin/time -f "pair $i, window_workers $w: wall %e s, user %U s, peak RSS %M kB" "$bin" infer \
            --image "$ct" --checkpoint "$checkpoint" --label-prompt "$labels" --precision fp32 \
            --threads "$threads" --output-dir "$dir/out$w" --set "patch_size=[$patch,$patch,$patch]" \
            --set "window_workers=$w" > "$dir/run$w.log" 2>&1 || { cat "$dir/run$w.log"; exit 1; }
        tail -1 "$dir/run$w.log"
    done
    "$VISTA3D_PYTHON" - "$dir/out$workers/$stem/${stem}_trans.nii.gz" "$dir/out1/$stem/${stem}_trans.nii.gz" <<'PY'
import sys
import nibabel as nib, numpy as np
a, b = (nib.load(p).get_fdata() for p in sys.argv[1:3])
print(f"label agreement: {np.mean(a == b) * 100:.4f}% of voxels, {int(np.sum(a != b))} differ")
PY
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
