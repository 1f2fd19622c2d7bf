#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs the Python environment (libtorch for tch, plus the MONAI
# oracle), generates MONAI's golden fixtures when they are missing or out of date, then runs every cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh test

fixtures="${VISTA3D_FIXTURES:-$PWD/target/fixtures}"
export VISTA3D_FIXTURES="$fixtures"
stamp_value="$(cat tests/fixtures/make_fixtures.py scripts/requirements.txt scripts/requirements-test.txt | sha256sum | cut -c1-16)"
if [ "$(cat "$fixtures/network/.stamp" 2>/dev/null)" != "$stamp_value" ]; then
    echo "[test] generating MONAI golden fixtures in $fixtures/network" >&2
    rm -rf "$fixtures/network"
    "$VISTA3D_PYTHON" tests/fixtures/make_fixtures.py --out "$fixtures/network"
    echo "$stamp_value" > "$fixtures/network/.stamp"
fi

cargo test --release --no-fail-fast "$@"
