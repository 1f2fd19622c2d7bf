#!/usr/bin/env bash
# Peak memory of "everything" (117 classes) against one label, on CT sizes where MONAI's bundle runs out of
# memory, with /usr/bin/time -v's peak resident memory next to the request's own logged estimate.
#   bash benches/memory_everything.sh [WIDTH=8] [THREADS=2] [PARTS="333 1024"]
# - 333: a synthetic 333 x 333 x 603 CT at 1.5 mm (MONAI's bundle peaks at 32.7 GiB on this size, ../bench), body
#   over the whole box so the foreground crop keeps it whole; `vista3d infer` with seeded random weights of WIDTH,
#   128^3 windows: everything with float16 sums (stitch_memory_gb=2) with `auto` and with libtorch, one label, and
#   everything with float32 sums (MONAI's results bit for bit).
# - 1024: a synthetic 1024 x 1024 x 768 CT at 1.5 mm, everything with float16 sums (stitch_memory_gb=8) with the
#   real network (about 2.5 hours at 1 thread, width 8), then the whole request path with the network replaced by a
#   cheap stand-in (benches/stitch_memory.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
width="${1:-8}" threads="${2:-2}" parts="${3:-333 1024}"
dir=target/bench/memory
mkdir -p "$dir"
make_ct() { # make_ct SHAPE OUT
    "$VISTA3D_PYTHON" - "$1" "$2" <<'PY'
import sys, numpy as np, nibabel as nib
shape = tuple(int(s) for s in sys.argv[1].split(","))
rng = np.random.default_rng(0)
ct = np.empty(shape, np.int16)
x, y = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape[:2]], indexing="ij")
body = (x**2 + y**2) < 0.98
for k, z in enumerate(np.linspace(-1, 1, shape[2], dtype=np.float32)):  # slice by slice: bounded memory
    ct[:, :, k] = np.where(body, 40 + 30 * np.sin(7 * x) * np.cos(5 * y) + 20 * np.cos(3 * z), -1000)
    ct[:, :, k] += rng.integers(-20, 20, size=shape[:2], dtype=np.int16)
nib.save(nib.Nifti1Image(ct, np.diag([1.5, 1.5, 1.5, 1.0])), sys.argv[2])
PY
}
report() { # report NAME TIMEFILE LOGFILE
    local rss est
    rss=$(awk '/Maximum resident/ {print $6}' "$2")
    est=$(grep -o "estimated peak memory [0-9.]* GiB" "$3" | tail -n 1 | awk '{print $4}')
    printf '%s: peak RSS %s kB = %.2f GiB, estimate %s GiB, %s\n' "$1" "$rss" "$(echo "$rss / 1048576" | bc -l)" \
        "$est" "$(grep Elapsed "$2" | sed 's/.*): //')"
}
run() { # run CT NAME ARGS...: vista3d infer on $dir/CT.nii.gz with the random weights
    local ct="$1" name="$2"; shift 2
    RUST_LOG=info /usr/bin/time -v target/release/vista3d infer --image "$dir/$ct.nii.gz" \
        --checkpoint "$dir/random_e$width.safetensors" --output-dir "$dir/out_$name" --threads "$threads" \
        --set output_dtype=uint8 "$@" 2> "$dir/$name.log" > /dev/null
    report "$name" "$dir/$name.log" "$dir/$name.log"
}
cargo build --release --quiet --bin vista3d --bench stitch_memory
target/release/vista3d init-checkpoint --width "$width" --seed 0 --out "$dir/random_e$width.safetensors" > /dev/null
if [[ " $parts " == *" 333 "* ]]; then
    [ -f "$dir/ct_333x333x603.nii.gz" ] || make_ct 333,333,603 "$dir/ct_333x333x603.nii.gz"
    run ct_333x333x603 everything_f16 --set stitch_memory_gb=2
    run ct_333x333x603 everything_f16_libtorch --precision fp32 --set stitch_memory_gb=2
    run ct_333x333x603 one_label --label-prompt 1
    run ct_333x333x603 everything_f32 --precision fp32
fi
if [[ " $parts " == *" 1024 "* ]]; then
    [ -f "$dir/ct_1024x1024x768.nii.gz" ] || make_ct 1024,1024,768 "$dir/ct_1024x1024x768.nii.gz"
    run ct_1024x1024x768 real_1024 --precision fp32 --set stitch_memory_gb=8
    bin=$(ls -t target/release/deps/stitch_memory-* | grep -v '\.d$' | head -n 1)
    /usr/bin/time -v "$bin" --image "$dir/ct_1024x1024x768.nii.gz" --out "$dir/out_1024/labels.nii.gz" \
        --threads "$threads" > "$dir/standin_1024.out" 2> "$dir/standin_1024.log"
    report "1024_stand_in" "$dir/standin_1024.log" "$dir/standin_1024.log"
fi
