# Source this file (". scripts/env.sh [test]") to create or reuse the project's Python environment and
# export the variables the build needs. With "test" it also installs the MONAI oracle used by the tests.
#
#   VISTA3D_VENV   where the virtual environment lives (default: <repo>/.venv)
#   PYTHON         the interpreter that creates it (default: python3, >= 3.10)
#
# Exports: LIBTORCH (libtorch inside the torch wheel, read by tch's build script and by ours for the rpath),
# ORT_DYLIB_PATH (ONNX Runtime shared library for the `ort` crate), VISTA3D_PYTHON (the venv's python);
# when present: LIBCLANG_PATH and BINDGEN_EXTRA_CLANG_ARGS (libclang wheel, for bindgen) and TENSORRT_INCLUDE_DIR
# (headers from scripts/fetch_trt_headers.sh).

_vista3d_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VISTA3D_VENV="${VISTA3D_VENV:-$_vista3d_root/.venv}"
_vista3d_py="${PYTHON:-python3}"

_vista3d_install() {
    local req="$1" stamp="$VISTA3D_VENV/.installed-$(basename "$1" .txt)"
    if [ -f "$stamp" ] && cmp -s "$req" "$stamp"; then
        return 0
    fi
    echo "[env] installing $(basename "$req") into $VISTA3D_VENV" >&2
    "$VISTA3D_VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req" || return 1
    cp "$req" "$stamp"
}

if [ ! -x "$VISTA3D_VENV/bin/python" ]; then
    echo "[env] creating virtual environment $VISTA3D_VENV" >&2
    "$_vista3d_py" -m venv "$VISTA3D_VENV" || return 1 2>/dev/null || exit 1
fi
_vista3d_install "$_vista3d_root/scripts/requirements.txt" || return 1 2>/dev/null || exit 1
if [ "${1:-}" = "test" ]; then
    _vista3d_install "$_vista3d_root/scripts/requirements-test.txt" || return 1 2>/dev/null || exit 1
    _vista3d_install "$_vista3d_root/scripts/requirements-build.txt" || return 1 2>/dev/null || exit 1
fi

_vista3d_site="$("$VISTA3D_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
export LIBTORCH="$_vista3d_site/torch"
export ORT_DYLIB_PATH="$(ls "$_vista3d_site"/onnxruntime/capi/libonnxruntime.so.* 2>/dev/null | head -n 1)"
export VISTA3D_PYTHON="$VISTA3D_VENV/bin/python"
# bindgen (the TensorRT shim's bindings) uses libclang from the libclang wheel when it is installed.
if [ -f "$_vista3d_site/clang/native/libclang.so" ]; then
    export LIBCLANG_PATH="${LIBCLANG_PATH:-$_vista3d_site/clang/native}"
    _vista3d_gcc_include="$(gcc -print-file-name=include 2>/dev/null || true)"
    if [ -z "${BINDGEN_EXTRA_CLANG_ARGS:-}" ] && [ -d "$_vista3d_gcc_include" ]; then
        export BINDGEN_EXTRA_CLANG_ARGS="-I$_vista3d_gcc_include"
    fi
    unset _vista3d_gcc_include
fi
# TensorRT headers fetched by scripts/fetch_trt_headers.sh: build the TensorRT shim against them.
if [ -z "${TENSORRT_INCLUDE_DIR:-}" ] && [ -f "$_vista3d_root/target/trt-headers/include/NvInfer.h" ]; then
    export TENSORRT_INCLUDE_DIR="$_vista3d_root/target/trt-headers/include"
fi
unset _vista3d_root _vista3d_py _vista3d_site
