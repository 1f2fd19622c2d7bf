#!/usr/bin/env bash
# Training steps per second with 1 and 2 processes on the CPU (gloo), and the share of the step spent in the
# gradient all-reduce: the phantom demo (models/prep_phantoms.py: 4 training phantoms) at width WIDTH with
# PATCH^3 patches, EPOCHS epochs without validation. Runs: one process with THREADS threads, one process with
# 1 thread, two processes (started by torchrun) with THREADS/2 threads each. The first epoch is a warm-up and is
# not counted.
#
#   bash benches/distributed_cpu.sh [WIDTH=8] [PATCH=32] [EPOCHS=4] [THREADS=2]
#
# Prints a markdown table (for benches/RESULTS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
width="${1:-8}" patch="${2:-32}" epochs="${3:-4}" threads="${4:-2}"
. scripts/env.sh > /dev/null
bin=target/release/vista3d
work=target/bench_distributed
rm -rf "$work" && mkdir -p "$work"
"$VISTA3D_PYTHON" models/prep_phantoms.py --out "$work/phantoms" > /dev/null
torchrun="$(dirname "$VISTA3D_PYTHON")/torchrun"

config() { # config NAME -> path of a config writing into $work/NAME
    "$VISTA3D_PYTHON" - "$work" "$1" "$width" "$patch" "$epochs" <<'EOF'
import json, sys
work, name, width, patch, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
cfg = json.load(open("models/demo_phantom_train.json"))
cfg.update({
    "data_list_file_path": f"{work}/phantoms/datalist.json", "dataset_dir": f"{work}/phantoms",
    "ckpt_dir": f"{work}/{name}/models", "output_dir": f"{work}/{name}/logs", "device": "cpu", "seed": 123,
    "encoder_embed_dim": width, "patch_size": [patch] * 3, "patch_size_valid": [patch] * 3, "epochs": epochs,
    "val_interval": 1000000, "val_at_start": False, "lr_schedule": {"activate": False},
    "num_cache_workers": 1, "num_workers": 1,
})
path = f"{work}/{name}.json"
json.dump(cfg, open(path, "w"), indent=1)
print(path)
EOF
}

summary() { # summary NAME PROCESSES THREADS -> one table row
    "$VISTA3D_PYTHON" - "$work/$1/logs/metrics.jsonl" "$2" "$width" "$patch" "$3" <<'EOF'
import json, sys
path, procs, width, patch, threads = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
all_recs = [json.loads(l) for l in open(path)]
warm, recs = all_recs[0], all_recs[1:]  # the first epoch is a warm-up
steps = recs[-1]["step"] - warm["step"]
secs = sum(r["seconds"] for r in recs)
ar = sum(r.get("allreduce_seconds") or 0.0 for r in recs)
patches = steps * procs
print(f"| {procs} x {threads} thread(s) | {width} | {patch}^3 | {steps} | {secs:.1f} | {steps / secs:.3f} | "
      f"{patches / secs:.3f} | {100 * ar / secs:.1f}% |")
EOF
}

cfg1="$(config single)"
"$bin" train --config "$cfg1" --threads "$threads" > "$work/single.log" 2>&1
cfg0="$(config single1)"
"$bin" train --config "$cfg0" --threads 1 > "$work/single1.log" 2>&1
cfg2="$(config pair)"
"$torchrun" --no-python --standalone --nproc_per_node=2 "$bin" train --config "$cfg2" \
    --threads "$((threads / 2 > 0 ? threads / 2 : 1))" > "$work/pair.log" 2>&1
echo "| processes | width | patch | steps counted | seconds | optimizer steps/s | patches/s | all-reduce share |"
echo "|---|---:|---|---:|---:|---:|---:|---:|"
summary single 1 "$threads"
summary single1 1 1
summary pair 2 "$((threads / 2 > 0 ? threads / 2 : 1))"
