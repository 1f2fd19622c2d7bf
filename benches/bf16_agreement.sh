#!/usr/bin/env bash
# bf16 (libtorch CPU autocast) against fp32: label agreement and whole-process time of `vista3d infer` on
# TotalSegmentator's example CTs, for several weights: the shipped demo model (models/demo_e8.safetensors, width
# 8, trained on phantoms), seeded random width 16 (`--demo-weights`) and 24. WINDOW^3 windows, RESAMPLE mm, THREADS threads, LABELS ("" = everything).
#
#   bash benches/bf16_agreement.sh [WINDOW=64] [RESAMPLE=3] [THREADS=2] [LABELS=]
#
# Prints a markdown table (for benches/RESULTS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
window="${1:-64}" resample="${2:-3}" threads="${3:-2}" labels="${4:-}"
. scripts/env.sh > /dev/null
export VISTA3D_DATA="${VISTA3D_DATA:-$PWD/target/data}"
bash scripts/fetch_data.sh > /dev/null
bin=target/release/vista3d
work=target/bench_bf16
rm -rf "$work" && mkdir -p "$work"
"$bin" init-checkpoint --width 16 --seed 0 --out "$work/e16.safetensors" > /dev/null
"$bin" init-checkpoint --width 24 --seed 0 --out "$work/e24.safetensors" > /dev/null
prompt=()
[ -n "$labels" ] && prompt=(--label-prompt "$labels")
echo "| CT | weights | fp32 s | bf16 s | speed-up | label agreement | voxels differing |"
echo "|---|---|---:|---:|---:|---:|---:|"
for ct in example_ct_sm example_ct; do
    for w in demo e16 e24; do
        case "$w" in
            demo) weights=(--checkpoint models/demo_e8.safetensors) ;;
            *) weights=(--checkpoint "$work/$w.safetensors") ;;
        esac
        for m in fp32 bf16; do
            t0=$(date +%s.%N)
            "$bin" infer --image "$VISTA3D_DATA/totalsegmentator/$ct.nii.gz" "${weights[@]}" "${prompt[@]}" \
                --precision "$m" --precision-fallback deny --threads "$threads" --output-dir "$work/$ct-$w-$m" \
                --set "patch_size=[$window,$window,$window]" --set "resample_spacing=[$resample,$resample,$resample]" \
                > "$work/$ct-$w-$m.log" 2>&1
            t1=$(date +%s.%N)
            echo "$t0 $t1" > "$work/$ct-$w-$m.time"
        done
        "$VISTA3D_PYTHON" - "$work" "$ct" "$w" <<'PY'
import sys, nibabel as nib, numpy as np
work, ct, w = sys.argv[1:4]
def load(m):
    t0, t1 = map(float, open(f"{work}/{ct}-{w}-{m}.time").read().split())
    return nib.load(f"{work}/{ct}-{w}-{m}/{ct}/{ct}_trans.nii.gz").get_fdata(), t1 - t0
a, ta = load("fp32")
b, tb = load("bf16")
diff = int((a != b).sum())
print(f"| {ct} {a.shape} | {w} | {ta:.1f} | {tb:.1f} | {ta / tb:.2f} | {100 * (1 - diff / a.size):.4f}% | {diff} of {a.size} |")
PY
    done
done
