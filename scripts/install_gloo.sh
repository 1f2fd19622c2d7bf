#!/usr/bin/env bash
# Makes gloo's headers and library available for the CPU process group of `vista3d train` / `evaluate` on several
# processes (src/distributed/gloo.rs): Debian's libgloo-dev (build) pulls libgloo0 (run time). Installs it with
# apt-get when it is missing (as root, or through sudo). Exit 0 when gloo is there afterwards.
set -euo pipefail
if [ -f "${GLOO_INCLUDE_DIR:-/usr/include}/gloo/allreduce.h" ]; then
    exit 0
fi
if ! command -v apt-get > /dev/null; then
    echo "[gloo] gloo's headers are missing and this is not a Debian-like system: install gloo (headers and" \
         "libgloo.so) and set GLOO_INCLUDE_DIR / GLOO_LIB_DIR" >&2
    exit 1
fi
sudo=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo > /dev/null; then
        sudo="sudo"
    else
        echo "[gloo] apt-get install libgloo-dev needs root" >&2
        exit 1
    fi
fi
echo "[gloo] installing Debian's libgloo-dev (the CPU process group of multi-process training)" >&2
$sudo apt-get install -y --no-install-recommends libgloo-dev > /dev/null \
    || { $sudo apt-get update > /dev/null && $sudo apt-get install -y --no-install-recommends libgloo-dev > /dev/null; }
test -f /usr/include/gloo/allreduce.h
