#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs the Python environment (libtorch for tch, plus the MONAI
# oracle), fetches the real test data (scripts/fetch_data.sh), generates MONAI's golden fixtures when they are
# missing or out of date, then runs every cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."
# The suite needs about 15 GB of disk (the torch wheel 5 GB, fixtures 2 GB, builds 6 GB): say what is free, so
# that a full disk is recognised as such.
echo "[test] free disk: $(df -h --output=avail . 2>/dev/null | tail -n 1 | tr -d ' ') in $PWD" >&2
. scripts/env.sh test
# gloo (Debian's libgloo-dev) for the multi-process tests: built into vista3d's CPU process group.
bash scripts/install_gloo.sh
export VISTA3D_DATA="${VISTA3D_DATA:-$PWD/target/data}"
bash scripts/fetch_data.sh > /dev/null
# DICOM oracles from Debian: dcm2niix (the reference geometry) and dicom3tools' dciodvfy (SEG validation).
if ! command -v dcm2niix > /dev/null || ! command -v dciodvfy > /dev/null; then
    echo "[test] installing Debian's dcm2niix and dicom3tools" >&2
    { apt-get update -qq > /dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dcm2niix dicom3tools > /dev/null; } \
        || echo "[test] could not install dcm2niix/dicom3tools: tests/dicom_io.rs and tests/dicom_seg.rs will fail" >&2
fi
# Headless Chromium and chromedriver from Debian: tests/viewer.rs drives the server's viewer page with them.
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
    echo "[test] installing Debian's chromium and chromium-driver" >&2
    { apt-get update -qq > /dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver > /dev/null; } \
        || echo "[test] could not install chromium/chromium-driver: tests/viewer.rs will fail" >&2
fi
# TensorRT headers, so that the TensorRT shim is compiled and tested (no TensorRT library is needed).
if [ -z "${TENSORRT_INCLUDE_DIR:-}" ]; then
    TENSORRT_INCLUDE_DIR="$(bash scripts/fetch_trt_headers.sh)"
fi
export TENSORRT_INCLUDE_DIR

fixtures="${VISTA3D_FIXTURES:-$PWD/target/fixtures}"
export VISTA3D_FIXTURES="$fixtures"

# generate NAME INPUTS... -- COMMAND...: reruns COMMAND (which writes $fixtures/NAME) when INPUTS changed.
generate() {
    local name="$1"; shift
    local inputs=()
    while [ "$1" != "--" ]; do inputs+=("$1"); shift; done
    shift
    local stamp
    stamp="$(cat "${inputs[@]}" scripts/requirements.txt scripts/requirements-test.txt | sha256sum | cut -c1-16)"
    if [ "$(cat "$fixtures/$name/.stamp" 2>/dev/null)" != "$stamp" ]; then
        echo "[test] generating MONAI fixtures: $name" >&2
        rm -rf "${fixtures:?}/$name"
        "$@"
        echo "$stamp" > "$fixtures/$name/.stamp"
    fi
}

generate network tests/fixtures/make_fixtures.py -- \
    "$VISTA3D_PYTHON" tests/fixtures/make_fixtures.py --out "$fixtures/network"
generate pipeline tests/fixtures/make_fixtures.py tests/fixtures/make_pipeline_fixtures.py tests/fixtures/monai_reference.py -- \
    "$VISTA3D_PYTHON" tests/fixtures/make_pipeline_fixtures.py --data "$VISTA3D_DATA" \
    --weights "$fixtures/network/weights_e16.pt" --out "$fixtures/pipeline"
generate transforms tests/fixtures/make_transform_fixtures.py -- \
    "$VISTA3D_PYTHON" tests/fixtures/make_transform_fixtures.py --data "$VISTA3D_DATA" --out "$fixtures/transforms"
generate training tests/fixtures/make_training_fixtures.py -- \
    "$VISTA3D_PYTHON" tests/fixtures/make_training_fixtures.py --out "$fixtures/training"
generate dicom tests/fixtures/make_dicom_cases.py -- \
    "$VISTA3D_PYTHON" tests/fixtures/make_dicom_cases.py --ct-small "$VISTA3D_DATA/pydicom/CT_small.dcm" \
    --example "$VISTA3D_DATA/totalsegmentator/example_ct_dicom" --out "$fixtures/dicom"
generate ddp tests/fixtures/make_ddp_fixtures.py -- \
    "$VISTA3D_PYTHON" tests/fixtures/make_ddp_fixtures.py --out "$fixtures/ddp"

cargo test --release --no-fail-fast "$@"
