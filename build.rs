//! Build script: lets the `vista3d` binary find libtorch at run time without LD_LIBRARY_PATH.
//!
//! Environment (all optional):
//! - `LIBTORCH`: the libtorch directory tch links against (scripts/env.sh sets it to the torch wheel inside
//!   the project's virtual environment). Its `lib/` is added to the binaries' rpath.
//! - `VISTA3D_NO_RPATH=1`: do not add an rpath (for packaging, where libtorch is installed system-wide or
//!   found through LD_LIBRARY_PATH).

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=VISTA3D_NO_RPATH");
    if std::env::var_os("VISTA3D_NO_RPATH").is_some() {
        return;
    }
    if let Some(libtorch) = std::env::var_os("LIBTORCH") {
        let lib = std::path::Path::new(&libtorch).join("lib");
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
