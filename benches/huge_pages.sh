#!/usr/bin/env bash
# Transparent huge pages for libtorch's CPU tensors (THP_MEM_ALLOC_ENABLE, which vista3d sets to 1 at start unless
# the environment sets it): `vista3d infer --precision fp32` with it off and on, whole process under
# `/usr/bin/time -v` (wall, peak RSS, minor page faults, system time), 2 threads:
# - "window": one 128^3 window of everything (117 classes), seeded random weights of width 8, a synthetic 128^3 CT;
# - "request": TotalSegmentator's example_ct, labels 1,3,4,6, seeded random width 24, 64^3 windows, 1.5 mm.
#   bash benches/huge_pages.sh [REPEATS=2]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh test > /dev/null
repeats="${1:-2}"
dir=target/bench/huge_pages; mkdir -p "$dir"
cargo build --release --quiet --bin vista3d
bin=target/release/vista3d
"$VISTA3D_PYTHON" - "$dir/ct128.nii.gz" <<'PY'
import sys, numpy as np, nibabel as nib
rng = np.random.default_rng(0)
x, y, z = np.meshgrid(*[np.linspace(-1, 1, 128, dtype=np.float32)] * 3, indexing="ij")
ct = np.where(x**2 + y**2 < 0.98, 40 + 30 * np.sin(7 * x) * np.cos(5 * y) + 20 * np.cos(3 * z), -1000)
ct = (ct + rng.integers(-20, 20, size=ct.shape)).astype(np.int16)
nib.save(nib.Nifti1Image(ct, np.diag([1.5, 1.5, 1.5, 1.0])), sys.argv[1])
PY
"$bin" init-checkpoint --width 8 --seed 0 --out "$dir/random_e8.safetensors" > /dev/null
"$bin" init-checkpoint --width 24 --seed 0 --out "$dir/random_e24.safetensors" > /dev/null
ct="${VISTA3D_DATA:-target/data}/totalsegmentator/example_ct.nii.gz"
run() { # run NAME THP ARGS...
    local name="$1" thp="$2"; shift 2
    THP_MEM_ALLOC_ENABLE="$thp" /usr/bin/time -v "$bin" infer --precision fp32 --threads 2 \
        --output-dir "$dir/out_$name" "$@" > /dev/null 2> "$dir/$name.log"
    printf '%s: THP %s, wall %s, peak RSS %s kB, minor faults %s, system %s s\n' "$name" "$thp" \
        "$(grep Elapsed "$dir/$name.log" | sed 's/.*): //')" "$(awk '/Maximum resident/ {print $6}' "$dir/$name.log")" \
        "$(awk '/Minor/ {print $NF}' "$dir/$name.log")" "$(awk '/System time/ {print $NF}' "$dir/$name.log")"
}
for i in $(seq "$repeats"); do
    for thp in 0 1; do
        run "window_thp${thp}_$i" "$thp" --image "$dir/ct128.nii.gz" --checkpoint "$dir/random_e8.safetensors" \
            --set output_dtype=uint8
    done
done
for thp in 0 1; do
    run "request_thp$thp" "$thp" --image "$ct" --checkpoint "$dir/random_e24.safetensors" --label-prompt 1,3,4,6 \
        --set "patch_size=[64,64,64]"
done
