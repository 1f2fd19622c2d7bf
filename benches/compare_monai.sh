#!/usr/bin/env bash
# Times the Rust network against MONAI's on this CPU: same weights (seeded random, width W), same input
# (1 x 1 x P^3), same thread count; per module. Prints both JSON results and a comparison table.
#   bash benches/compare_monai.sh [WIDTH=48] [PATCH=64] [THREADS=2] [REPS=3]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh test
width="${1:-48}" patch="${2:-64}" threads="${3:-2}" reps="${4:-3}"
dir=target/bench/network_e${width}_p${patch}
mkdir -p "$dir"
"$VISTA3D_PYTHON" - "$dir" "$width" "$patch" <<'PY'
import sys, torch, safetensors.torch
from monai.networks.nets import vista3d132
d, w, p = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
torch.save(vista3d132(encoder_embed_dim=w).state_dict(), f"{d}/weights.pt")
safetensors.torch.save_file({"input": torch.rand(1, 1, p, p, p, generator=torch.Generator().manual_seed(1))}, f"{d}/input.safetensors")
PY
cargo bench --bench network_forward -- --weights "$dir/weights.pt" --input "$dir/input.safetensors" \
    --threads "$threads" --reps "$reps" --json "$dir/rust.json"
"$VISTA3D_PYTHON" benches/monai_forward.py --weights "$dir/weights.pt" --input "$dir/input.safetensors" \
    --threads "$threads" --reps "$reps" --json "$dir/monai.json" > /dev/null
"$VISTA3D_PYTHON" - "$dir" <<'PY'
import json, sys
d = sys.argv[1]
r, m = (json.load(open(f"{d}/{n}.json")) for n in ("rust", "monai"))
print(f"\nwidth {r['width']}, patch {r['patch']}, {r['threads']} threads, median of {r['reps']} (seconds)")
print(f"| stage | Rust (tch) | MONAI | Rust / MONAI |\n|---|---:|---:|---:|")
for k, v in r["seconds"].items():
    print(f"| {k} | {v:.3f} | {m['seconds'][k]:.3f} | {v / m['seconds'][k]:.2f} |")
PY
