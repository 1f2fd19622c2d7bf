#!/usr/bin/env bash
# Batch throughput in images per hour: one worker without prefetch, one worker with prefetch (the next image read
# and preprocessed while the current one computes, outputs written in the background), and two workers in one
# process (each with its own model and half the threads). N copies of TotalSegmentator's example CT, the demo
# weights, class prompts LABELS, RESAMPLE mm spacing and PATCH^3 windows; THREADS libtorch threads in all.
# Each configuration runs on a fresh output folder; `vista3d batch-report --json` gives the device idle time.
#
#   bash benches/batch_throughput.sh [N=8] [THREADS=2] [RESAMPLE=3] [PATCH=64] [LABELS=1,3,6]
#
# INPUT=dicom (environment) uses copies of the example's DICOM series (20 JPEG 2000 slices of 512 x 512, about
# 1 s of CPU to decode) with `batch --dicom` instead of the NIfTI file. On a GPU machine pass DEVICES=0,1 to add
# a `--devices` row. Prints a markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-8}" threads="${2:-2}" resample="${3:-3}" patch="${4:-64}" labels="${5:-1,3,6}"
. scripts/env.sh > /dev/null
export VISTA3D_DATA="${VISTA3D_DATA:-$PWD/target/data}"
bash scripts/fetch_data.sh > /dev/null
bin=target/release/vista3d
work=target/bench_batch
rm -rf "$work" && mkdir -p "$work/in"
input_flags=()
for i in $(seq -w 1 "$n"); do
    if [ "${INPUT:-nifti}" = dicom ]; then
        cp -r "$VISTA3D_DATA/totalsegmentator/example_ct_dicom" "$work/in/ct_$i"
        input_flags=(--dicom)
    else
        cp "$VISTA3D_DATA/totalsegmentator/example_ct.nii.gz" "$work/in/ct_$i.nii.gz"
    fi
done

run() { # run NAME ARGS... -> one table row
    local name="$1"; shift
    local out="$work/$name" t0 t1
    t0=$(date +%s.%N)
    "$bin" batch --input-dir "$work/in" "${input_flags[@]}" --output-dir "$out" --demo-weights --label-prompt "$labels" \
        --set "resample_spacing=[$resample,$resample,$resample]" --set "patch_size=[$patch,$patch,$patch]" \
        --threads "$threads" "$@" > "$work/$name.log" 2>&1
    t1=$(date +%s.%N)
    "$bin" batch-report --json "$out" > "$work/$name.json"
    "$VISTA3D_PYTHON" - "$name" "$t0" "$t1" "$n" "$work/$name.json" "$*" <<'EOF'
import json, sys
name, t0, t1, n, report, args = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]
r = json.load(open(report))
assert r["segmentations"] == n and r["failed"] == 0, r
wall = t1 - t0
stages = r["stage_seconds"]
print(f"| {name} (`{args}`) | {wall:.1f} | {n * 3600 / wall:.0f} | {r['device_idle_seconds'] / n:.2f} | "
      f"{stages.get('inference', 0) / n:.2f} | {len(r['per_worker'])} |")
EOF
}

echo "| configuration | wall s (process) | images/hour | device idle s/image | inference s/image | workers |"
echo "|---|---:|---:|---:|---:|---:|"
run no_prefetch --no-prefetch
run prefetch
run two_workers --workers 2
if [ -n "${DEVICES:-}" ]; then
    run devices --devices "$DEVICES"
fi
