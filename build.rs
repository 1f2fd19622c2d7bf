//! Build script: lets the `vista3d` binary find libtorch at run time without LD_LIBRARY_PATH, and compiles the
//! TensorRT shim (`shim/trt_shim.cpp`) when TensorRT headers are available.
//!
//! Environment (all optional):
//! - `LIBTORCH`: the libtorch directory tch links against (scripts/env.sh sets it to the torch wheel inside
//!   the project's virtual environment). Its `lib/` is added to the binaries' rpath.
//! - `VISTA3D_NO_RPATH=1`: do not add an rpath (for packaging, where libtorch is installed system-wide or
//!   found through LD_LIBRARY_PATH).
//! - `TENSORRT_INCLUDE_DIR`, else `TENSORRT_ROOT/include`: the TensorRT headers (`NvInfer.h`, `NvOnnxParser.h`;
//!   `scripts/fetch_trt_headers.sh` fetches TensorRT 11.4's and prints their folder). When found, the shim
//!   is compiled and `cfg(vista3d_trt_shim)` is set; otherwise the crate builds without it and TensorRT is
//!   reported unavailable at run time. No TensorRT library is needed to build: it is loaded at run time.
//! - `LIBCLANG_PATH` (and `BINDGEN_EXTRA_CLANG_ARGS`): where bindgen finds libclang. When libclang loads, the
//!   shim's Rust bindings are generated from `shim/trt_shim.h` into `OUT_DIR` and used (`cfg(vista3d_trt_bindgen)`);
//!   otherwise the checked-in `src/engines/tensorrt/shim_bindings.rs` is used. A test checks that both agree.
//!   `VISTA3D_NO_BINDGEN=1` skips bindgen.

use std::path::{Path, PathBuf};

fn main() {
    println!("cargo::rustc-check-cfg=cfg(vista3d_trt_shim)");
    println!("cargo::rustc-check-cfg=cfg(vista3d_trt_bindgen)");
    rpath();
    let shim = trt_shim();
    let bindgen = trt_bindings();
    if shim {
        println!("cargo::rustc-cfg=vista3d_trt_shim");
    }
    if bindgen {
        println!("cargo::rustc-cfg=vista3d_trt_bindgen");
    }
    c10d_shims();
}

fn rpath() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=VISTA3D_NO_RPATH");
    if std::env::var_os("VISTA3D_NO_RPATH").is_some() {
        return;
    }
    if let Some(libtorch) = std::env::var_os("LIBTORCH") {
        let lib = Path::new(&libtorch).join("lib");
        if lib.is_dir() {
            // Applies to the binary, tests, benches and examples of this package.
            println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
        } else {
            println!(
                "cargo:warning=LIBTORCH={} has no lib/ directory; no rpath added",
                lib.display()
            );
        }
    }
}

/// The TensorRT include directory, with where it came from.
fn trt_include_dir() -> Option<(PathBuf, &'static str)> {
    println!("cargo:rerun-if-env-changed=TENSORRT_INCLUDE_DIR");
    println!("cargo:rerun-if-env-changed=TENSORRT_ROOT");
    if let Some(dir) = std::env::var_os("TENSORRT_INCLUDE_DIR").filter(|d| !d.is_empty()) {
        return Some((PathBuf::from(dir), "TENSORRT_INCLUDE_DIR"));
    }
    if let Some(root) = std::env::var_os("TENSORRT_ROOT").filter(|d| !d.is_empty()) {
        return Some((Path::new(&root).join("include"), "TENSORRT_ROOT/include"));
    }
    None
}

/// Compiles shim/trt_shim.cpp when TensorRT headers are found; true when it was.
fn trt_shim() -> bool {
    println!("cargo:rerun-if-changed=shim/trt_shim.cpp");
    println!("cargo:rerun-if-changed=shim/trt_shim.h");
    println!("cargo:rerun-if-changed=shim/fallback-include/cuda_runtime_api.h");
    let Some((include, source)) = trt_include_dir() else {
        return false;
    };
    for header in ["NvInfer.h", "NvOnnxParser.h"] {
        if !include.join(header).is_file() {
            println!(
                "cargo:warning={source}={} has no {header}: building without the TensorRT shim",
                include.display()
            );
            return false;
        }
    }
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .file("shim/trt_shim.cpp")
        .include("shim")
        .include(&include)
        // TensorRT's headers include <cuda_runtime_api.h> for two pointer types; a real one on the include
        // path wins over this fallback.
        .flag("-idirafter")
        .flag(
            manifest_dir
                .join("shim/fallback-include")
                .to_string_lossy()
                .as_ref(),
        )
        .flag_if_supported("-Wno-deprecated-declarations")
        .warnings(true);
    for dir in ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(std::env::var_os)
        .map(|root| Path::new(&root).join("include"))
        .filter(|d| d.join("cuda_runtime_api.h").is_file())
    {
        build.include(dir);
    }
    if let Err(e) = build.try_compile("vista3d_trt_shim") {
        // A broken TensorRT install must not break the whole crate: report and build without TensorRT.
        println!(
            "cargo:warning=TensorRT shim not compiled against {} ({source}): {e}",
            include.display()
        );
        return false;
    }
    println!(
        "cargo:rustc-env=VISTA3D_TRT_INCLUDE_DIR={}",
        include.display()
    );
    true
}

/// Generates the shim's bindings with bindgen when libclang can be loaded; true when it did.
fn trt_bindings() -> bool {
    println!("cargo:rerun-if-env-changed=LIBCLANG_PATH");
    println!("cargo:rerun-if-env-changed=BINDGEN_EXTRA_CLANG_ARGS");
    println!("cargo:rerun-if-env-changed=VISTA3D_NO_BINDGEN");
    if std::env::var_os("VISTA3D_NO_BINDGEN").is_some() {
        return false;
    }
    let Some(out) = std::env::var_os("OUT_DIR").map(PathBuf::from) else {
        return false;
    };
    // bindgen panics when libclang cannot be loaded; that only means "use the checked-in bindings".
    let previous_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let generated = std::panic::catch_unwind(shim_bindgen_builder);
    std::panic::set_hook(previous_hook);
    match generated {
        Ok(Ok(bindings)) => match bindings.write_to_file(out.join("trt_shim_bindings.rs")) {
            Ok(()) => true,
            Err(e) => {
                println!("cargo:warning=cannot write the shim bindings: {e}");
                false
            }
        },
        Ok(Err(e)) => {
            println!("cargo:warning=bindgen failed on shim/trt_shim.h: {e}");
            false
        }
        Err(_) => false, // no libclang: the checked-in bindings are used
    }
}

/// bindgen over shim/trt_shim.h, with the settings that produced src/engines/tensorrt/shim_bindings.rs.
fn shim_bindgen_builder() -> Result<bindgen::Bindings, bindgen::BindgenError> {
    bindgen::Builder::default()
        .header("shim/trt_shim.h")
        .allowlist_function("trt_shim_.*")
        .allowlist_type("TrtShim.*")
        .allowlist_var("TRT_SHIM_.*")
        .default_macro_constant_type(bindgen::MacroTypeVariation::Signed)
        .layout_tests(false)
        .generate_comments(true)
        .formatter(bindgen::Formatter::Prettyplease)
        .raw_line("// Generated by bindgen from shim/trt_shim.h (build.rs: shim_bindgen_builder). Do not edit:")
        .raw_line("// regenerate with LIBCLANG_PATH set and copy $OUT_DIR/trt_shim_bindings.rs here.")
        .generate()
}

/// The multi-process shims (`shim/c10d/`, see `src/distributed/`):
/// - `store_shim.cpp` (libtorch's TCPStore behind a C API), compiled into the crate when `$LIBTORCH/include` has
///   the c10d headers: `cfg(vista3d_c10d_store)`;
/// - `gloo_shim.cpp` (gloo's collectives), built as a shared object linked with Debian's `libgloo.so` when gloo's
///   headers are found (`GLOO_INCLUDE_DIR`, else `/usr/include`): `cfg(vista3d_gloo_shim)`, and
///   `VISTA3D_GLOO_SHIM_SO` names the object that the binary embeds and loads at run time with `RTLD_DEEPBIND`
///   (libtorch_cpu exports an incompatible copy of gloo's symbols). `VISTA3D_NO_GLOO=1` skips it;
///   `VISTA3D_NO_C10D=1` skips both (to check the build without them).
///
/// Either one missing only disables multi-process runs (with an error at run time), never the build.
fn c10d_shims() {
    println!("cargo::rustc-check-cfg=cfg(vista3d_c10d_store)");
    println!("cargo::rustc-check-cfg=cfg(vista3d_gloo_shim)");
    println!("cargo:rerun-if-changed=shim/c10d/store_shim.cpp");
    println!("cargo:rerun-if-changed=shim/c10d/store_shim.h");
    println!("cargo:rerun-if-changed=shim/c10d/gloo_shim.cpp");
    println!("cargo:rerun-if-changed=shim/c10d/gloo_shim.h");
    println!("cargo:rerun-if-env-changed=GLOO_INCLUDE_DIR");
    println!("cargo:rerun-if-env-changed=VISTA3D_NO_GLOO");
    println!("cargo:rerun-if-env-changed=VISTA3D_NO_C10D");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    if std::env::var_os("VISTA3D_NO_C10D").is_some() {
        return;
    }
    if c10d_store_shim() {
        println!("cargo::rustc-cfg=vista3d_c10d_store");
    }
    if std::env::var_os("VISTA3D_NO_GLOO").is_none() {
        if let Some(so) = gloo_shim_object() {
            println!("cargo::rustc-cfg=vista3d_gloo_shim");
            println!("cargo:rustc-env=VISTA3D_GLOO_SHIM_SO={}", so.display());
        }
    }
}

/// Compiles shim/c10d/store_shim.cpp against libtorch's headers; true when it did.
fn c10d_store_shim() -> bool {
    let Some(libtorch) = std::env::var_os("LIBTORCH").map(PathBuf::from) else {
        println!("cargo:warning=LIBTORCH is not set: building without the c10d store (no multi-process runs)");
        return false;
    };
    let include = libtorch.join("include");
    if !include
        .join("torch/csrc/distributed/c10d/TCPStore.hpp")
        .is_file()
    {
        println!(
            "cargo:warning={} has no c10d headers: building without the c10d store (no multi-process runs)",
            include.display()
        );
        return false;
    }
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    let result = cc::Build::new()
        .cpp(true)
        .std("c++17")
        .file("shim/c10d/store_shim.cpp")
        .include("shim/c10d")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .define("_GLIBCXX_USE_CXX11_ABI", abi.as_str())
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations")
        .try_compile("vista3d_store_shim");
    match result {
        Ok(()) => {
            // The shim calls into libtorch_cpu / libc10, which tch links too.
            println!("cargo:rustc-link-lib=dylib=torch_cpu");
            println!("cargo:rustc-link-lib=dylib=c10");
            println!(
                "cargo:rustc-link-search=native={}",
                libtorch.join("lib").display()
            );
            true
        }
        Err(e) => {
            println!("cargo:warning=c10d store shim not compiled: {e}");
            false
        }
    }
}

/// Builds shim/c10d/gloo_shim.cpp into `$OUT_DIR/libvista3d_gloo_shim.so` linked with `-lgloo`; its path when
/// it did.
fn gloo_shim_object() -> Option<PathBuf> {
    let include = std::env::var_os("GLOO_INCLUDE_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/include"));
    if !include.join("gloo/allreduce.h").is_file() {
        println!(
            "cargo:warning=gloo headers not found in {} (Debian: apt-get install libgloo-dev; or set \
             GLOO_INCLUDE_DIR): building without the CPU process group",
            include.display()
        );
        return None;
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR")?).join("libvista3d_gloo_shim.so");
    let compiler = cc::Build::new()
        .cpp(true)
        .std("c++17")
        .opt_level(2)
        .try_get_compiler()
        .ok()?;
    let mut cmd = compiler.to_command();
    cmd.args(["-shared", "-fPIC", "-fvisibility=hidden", "-Wl,-z,defs"])
        .arg("-I")
        .arg("shim/c10d")
        .arg("-I")
        .arg(&include)
        .arg("shim/c10d/gloo_shim.cpp")
        .arg("-o")
        .arg(&out);
    if let Some(lib) = std::env::var_os("GLOO_LIB_DIR").filter(|d| !d.is_empty()) {
        cmd.arg("-L").arg(lib);
    }
    cmd.arg("-lgloo");
    println!("cargo:rerun-if-env-changed=GLOO_LIB_DIR");
    match cmd.output() {
        Ok(o) if o.status.success() => Some(out),
        Ok(o) => {
            println!(
                "cargo:warning=gloo shim not built (building without the CPU process group): {}",
                String::from_utf8_lossy(&o.stderr)
                    .lines()
                    .take(5)
                    .collect::<Vec<_>>()
                    .join(" | ")
            );
            None
        }
        Err(e) => {
            println!("cargo:warning=gloo shim not built: cannot run the C++ compiler: {e}");
            None
        }
    }
}
