#!/usr/bin/env bash
# The whole inference run (load, preprocess, infer, postprocess + invert, save) of vista3d against MONAI's
# bundle pipeline (tests/fixtures/monai_reference.py) on the same CPU, CT, weights and settings, stage by stage.
#   bash benches/pipeline_vs_monai.sh [CT=target/data/totalsegmentator/aorta_report/example_ct.nii.gz] \
#       [LABELS=3,1,5,14,6] [WIDTH=16] [PATCH=64] [THREADS=2]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh test
bash scripts/fetch_data.sh > /dev/null
ct="${1:-target/data/totalsegmentator/aorta_report/example_ct.nii.gz}"
labels="${2:-3,1,5,14,6}" width="${3:-16}" patch="${4:-64}" threads="${5:-2}"
dir=target/bench/pipeline_e${width}_p${patch}
mkdir -p "$dir"
"$VISTA3D_PYTHON" tests/fixtures/monai_reference.py --only-save-weights --weights random:0 --embed-dim "$width" \
    --save-weights "$dir/weights.pt" > /dev/null
cargo build --release --quiet
stem=$(basename "$ct" .nii.gz)
start=$EPOCHREALTIME
OMP_NUM_THREADS=$threads "$VISTA3D_PYTHON" tests/fixtures/monai_reference.py --image "$ct" --out-dir "$dir/monai" \
    --weights "$dir/weights.pt" --embed-dim "$width" --patch "$patch" --label-prompt "$labels" > /dev/null 2>&1
monai_total=$("$VISTA3D_PYTHON" -c "print($EPOCHREALTIME - $start)")
start=$EPOCHREALTIME
target/release/vista3d infer --image "$ct" --checkpoint "$dir/weights.pt" --label-prompt "$labels" \
    --output-dir "$dir/rust" --threads "$threads" --set "patch_size=[$patch,$patch,$patch]" > /dev/null
rust_total=$("$VISTA3D_PYTHON" -c "print($EPOCHREALTIME - $start)")
"$VISTA3D_PYTHON" - "$dir" "$stem" "$monai_total" "$rust_total" "$threads" <<'PY'
import json, sys
d, stem, monai_total, rust_total, threads = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
m = json.load(open(f"{d}/monai/timings.json"))
r = json.load(open(f"{d}/rust/{stem}/{stem}_trans.json"))["seconds"]
rows = [
    ("load model", m["network"], None),
    ("read image", m["load"], r["read"]),
    ("preprocess", m["preprocess"], r["preprocess"]),
    ("inference", m["inference"], r["inference"]),
    ("postprocess + invert", m["postprocess_invert"], r["postprocess"]),
    ("save", m["save"], r["write"]),
    ("whole process (wall)", monai_total, rust_total),
]
print(f"\n{threads} threads; seconds")
print("| stage | MONAI | vista3d | MONAI / vista3d |\n|---|---:|---:|---:|")
for name, a, b in rows:
    print(f"| {name} | {a:.2f} | {'' if b is None else f'{b:.2f}'} | {'' if b is None else f'{a / b:.2f}'} |")
PY
