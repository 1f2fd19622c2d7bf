#!/usr/bin/env bash
# Fetches TensorRT 11.4 C++ headers (NvInfer.h, NvOnnxParser.h, ...) from the Apache-2.0 `trtx-sys` crate on
# crates.io, so that build.rs can compile the TensorRT shim (shim/trt_shim.cpp) on machines without TensorRT.
# Checks the crate's sha256 (the checksum crates.io's index lists for this version), extracts the headers and
# the crate's stub cuda_runtime_api.h into target/trt-headers/include, and prints that directory:
#
#   export TENSORRT_INCLUDE_DIR="$(bash scripts/fetch_trt_headers.sh)"
#
# Idempotent: an existing, complete extraction is reused without network access.
set -euo pipefail
cd "$(dirname "$0")/.."

crate="trtx-sys"
version="0.9.1+rtx1.7"
sha256="5480ee056292951daa1bc74532162d6cb75190f091e45d7d97c0c356916ae171"
headers="TensorRT-Headers/TRT-Enterprise-11.4"
url="https://static.crates.io/crates/$crate/$crate-$version.crate"

dest="$PWD/target/trt-headers"
include="$dest/include"
stamp="$dest/.complete-$sha256"
if [ -f "$stamp" ] && [ -f "$include/NvInfer.h" ] && [ -f "$include/NvOnnxParser.h" ]; then
    echo "$include"
    exit 0
fi

mkdir -p "$dest"
tmp="$(mktemp -d "$dest/.fetch.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
archive="$tmp/$crate.crate"
if command -v curl > /dev/null; then
    curl -sSfL --retry 3 -o "$archive" "$url"
else
    python3 -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' "$url" "$archive"
fi
actual="$(sha256sum "$archive" | cut -d' ' -f1)"
if [ "$actual" != "$sha256" ]; then
    echo "fetch_trt_headers: $url has sha256 $actual, expected $sha256" >&2
    exit 1
fi
tar -xzf "$archive" -C "$tmp" "$crate-$version/$headers" "$crate-$version/TensorRT-Headers/cuda_runtime_api.h"
rm -rf "$include"
mkdir -p "$include"
cp -R "$tmp/$crate-$version/$headers/." "$include/"
cp "$tmp/$crate-$version/TensorRT-Headers/cuda_runtime_api.h" "$include/"
rm -f "$dest"/.complete-*
touch "$stamp"
echo "$include"
