#!/usr/bin/env bash
# Whole-process time of `vista3d infer` (precision `auto`: on a CPU ONNX Runtime, its export made on first use in
# the cache) against MONAI's bundle pipeline (tests/fixtures/monai_reference.py) on the same CPU, CT, weights and
# settings: PAIRED runs (MONAI then vista3d, repeated), so machine load affects both sides alike; prints each pair,
# the medians and the load averages. The first vista3d run (export into a fresh cache) is timed apart.
#   bash benches/auto_vs_monai.sh [CT=$VISTA3D_DATA/totalsegmentator/example_ct.nii.gz] [LABELS=1,3,4,6] \
#       [WIDTH=24] [PATCH=64] [THREADS=2] [PAIRS=3] [more vista3d infer arguments, e.g. --set window_workers=2]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh test > /dev/null
ct="${1:-${VISTA3D_DATA:-target/data}/totalsegmentator/example_ct.nii.gz}"
labels="${2:-1,3,4,6}" width="${3:-24}" patch="${4:-64}" threads="${5:-2}" pairs="${6:-3}"
extra=("${@:7}")
dir=target/bench/auto_vs_monai_e${width}_p${patch}
rm -rf "$dir" && mkdir -p "$dir"
"$VISTA3D_PYTHON" tests/fixtures/monai_reference.py --only-save-weights --weights random:0 --embed-dim "$width" \
    --save-weights "$dir/weights.pt" > /dev/null
bin=target/release/vista3d
now() { "$VISTA3D_PYTHON" -c 'import time; print(time.time())'; }
monai() {
    OMP_NUM_THREADS=$threads "$VISTA3D_PYTHON" tests/fixtures/monai_reference.py --image "$ct" --out-dir "$dir/monai" \
        --weights "$dir/weights.pt" --embed-dim "$width" --patch "$patch" --label-prompt "$labels" > /dev/null 2>&1
}
rust() {
    "$bin" infer --image "$ct" --checkpoint "$dir/weights.pt" --label-prompt "$labels" --precision auto \
        --cache-dir "$dir/cache" --output-dir "$dir/rust" --threads "$threads" \
        --set "patch_size=[$patch,$patch,$patch]" "${extra[@]}" > /dev/null 2>&1
}
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
t0=$(now); rust; t1=$(now)
first=$("$VISTA3D_PYTHON" -c "print(f'{$t1 - $t0:.2f}')")
echo "vista3d first run (exports ONNX into the cache): $first s"
m=() r=()
for i in $(seq "$pairs"); do
    t0=$(now); monai; t1=$(now); rust; t2=$(now)
    m+=("$("$VISTA3D_PYTHON" -c "print(f'{$t1 - $t0:.2f}')")")
    r+=("$("$VISTA3D_PYTHON" -c "print(f'{$t2 - $t1:.2f}')")")
    echo "pair $i: MONAI ${m[-1]} s, vista3d auto ${r[-1]} s (load $(cut -d' ' -f1-3 /proc/loadavg))"
done
stem=$(basename "$ct" .nii.gz)
used=$("$VISTA3D_PYTHON" -c "import json,sys; print(json.load(open(sys.argv[1]))['precision']['used'])" \
    "$dir/rust/$stem/${stem}_trans.json")
"$VISTA3D_PYTHON" - "$used" "${m[*]}" "${r[*]}" <<'PY'
import statistics, sys
used, m, r = sys.argv[1], [float(x) for x in sys.argv[2].split()], [float(x) for x in sys.argv[3].split()]
mm, rm = statistics.median(m), statistics.median(r)
print(f"vista3d ran {used}; median MONAI {mm:.2f} s, vista3d {rm:.2f} s: vista3d {mm / rm:.2f}x faster")
PY
"$VISTA3D_PYTHON" - "$dir/monai" "$dir/rust/$stem" "$stem" <<'PY'
import glob, sys
import nibabel as nib, numpy as np
monai = nib.load(glob.glob(f"{sys.argv[1]}/**/*.nii.gz", recursive=True)[0]).get_fdata()
rust = nib.load(f"{sys.argv[2]}/{sys.argv[3]}_trans.nii.gz").get_fdata()
print(f"label agreement vista3d auto vs MONAI: {np.mean(monai.squeeze() == rust.squeeze()) * 100:.4f}% of voxels")
PY
