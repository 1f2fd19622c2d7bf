//! TensorRT loaded at run time, and safe wrappers over the shim's handles.
//!
//! [`TrtLibrary::load`] finds `libnvinfer.so.N` (and `libnvonnxparser.so.N` for building), checks that its major
//! version is the one the shim was compiled for, and resolves the factory functions that the shim calls. Search
//! order: `VISTA3D_TRT_LIB` (the library file, or a folder holding it), `TENSORRT_ROOT/lib`, then the system
//! library path (`LD_LIBRARY_PATH`, ldconfig); the headers' major version first, then the other of 10 and 11.
//!
//! The handles it hands out ([`Builder`], [`Runtime`], [`Engine`], [`Context`]) come from `handles.rs` when the
//! shim was compiled, and from `dummy.rs` (same API, uninhabited types) when it was not: the choice is made
//! once, here, at module level.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::engines::EngineError;

#[cfg(not(vista3d_trt_shim))]
#[path = "dummy.rs"]
mod handles;
#[cfg(vista3d_trt_shim)]
#[path = "handles.rs"]
mod handles;

pub use super::shim::{DataType, InferFactory, IoTensor, NetworkInput, ParserFactory, ShimError};
pub use handles::{header_version, Builder, Context, Engine, Runtime};

/// Why TensorRT cannot be used by a build without the shim.
pub const NO_SHIM: &str =
    "TensorRT unavailable: built without TensorRT headers: set TENSORRT_INCLUDE_DIR \
     (or TENSORRT_ROOT) or run scripts/fetch_trt_headers.sh, then rebuild";

/// True when this build compiled the TensorRT shim (TensorRT headers were found at build time).
pub fn shim_compiled() -> bool {
    cfg!(vista3d_trt_shim)
}

/// The TensorRT major versions this crate can load.
pub const SUPPORTED_MAJORS: [i32; 2] = [10, 11];

/// A TensorRT version (`getInferLibVersion`, `NV_TENSORRT_VERSION`: major * 10000 + minor * 100 + patch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TrtVersion {
    pub major: i32,
    pub minor: i32,
    pub patch: i32,
}

impl TrtVersion {
    /// Decodes `major * 10000 + minor * 100 + patch`.
    pub fn from_encoded(v: i32) -> Self {
        Self {
            major: v / 10000,
            minor: (v / 100) % 100,
            patch: v % 100,
        }
    }
}

impl std::fmt::Display for TrtVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// Where to look for a TensorRT library `stem` (`libnvinfer`, `libnvonnxparser`), in order: `explicit`
/// (`VISTA3D_TRT_LIB`: a file is taken as the libnvinfer itself; a folder is searched), `root/lib`
/// (`TENSORRT_ROOT`), then bare sonames for the dynamic loader; majors in the order given.
pub fn library_candidates(
    stem: &str,
    majors: &[i32],
    explicit: Option<&Path>,
    root: Option<&Path>,
) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = Vec::new();
    if let Some(e) = explicit {
        if e.is_dir() {
            dirs.push(e.to_path_buf());
        } else if stem == "libnvinfer" {
            out.push(e.to_path_buf());
        } else if let Some(parent) = e.parent().filter(|p| !p.as_os_str().is_empty()) {
            // The parser next to an explicitly named libnvinfer.
            dirs.push(parent.to_path_buf());
        }
    }
    if let Some(r) = root {
        dirs.push(r.join("lib"));
    }
    for dir in &dirs {
        for m in majors {
            out.push(dir.join(format!("{stem}.so.{m}")));
        }
    }
    for m in majors {
        out.push(PathBuf::from(format!("{stem}.so.{m}")));
    }
    out
}

/// The majors to try: the shim's first.
fn majors_to_try(header_major: Option<i32>) -> Vec<i32> {
    let mut majors: Vec<i32> = header_major.into_iter().collect();
    majors.extend(
        SUPPORTED_MAJORS
            .iter()
            .rev()
            .filter(|m| Some(**m) != header_major),
    );
    majors
}

/// The dynamic loader's own message (it names the file and the reason) rather than "dlopen failed".
fn dl_error(e: &libloading::Error) -> String {
    match std::error::Error::source(e) {
        Some(source) => source.to_string(),
        None => e.to_string(),
    }
}

/// `dlopen(path, RTLD_NOW | RTLD_GLOBAL)`; the first candidate that loads, or every error.
fn open_first(candidates: &[PathBuf]) -> Result<(libloading::Library, PathBuf), Vec<String>> {
    let mut errors = Vec::new();
    for c in candidates {
        // A bare soname goes to the dynamic loader's search; a path must exist.
        if c.components().count() > 1 && !c.exists() {
            continue;
        }
        // SAFETY: loading TensorRT runs its initialisers, which have no preconditions.
        match unsafe {
            libloading::os::unix::Library::open(
                Some(c),
                libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL,
            )
        } {
            Ok(lib) => return Ok((lib.into(), c.clone())),
            Err(e) => errors.push(dl_error(&e)),
        }
    }
    Err(errors)
}

/// The loaded TensorRT libraries and the factory functions the shim needs.
pub struct TrtLibrary {
    version: TrtVersion,
    nvinfer_path: PathBuf,
    create_builder: InferFactory,
    create_runtime: InferFactory,
    /// The ONNX parser's factory, or why it is not available (only builds need it).
    create_parser: Result<ParserFactory, String>,
    // Kept last: the function pointers above point into these.
    _parser_lib: Option<libloading::Library>,
    _nvinfer_lib: libloading::Library,
}

impl std::fmt::Debug for TrtLibrary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrtLibrary")
            .field("version", &self.version)
            .field("nvinfer_path", &self.nvinfer_path)
            .field("parser", &self.create_parser.as_ref().map(|_| "loaded"))
            .finish()
    }
}

impl TrtLibrary {
    /// Loads TensorRT once per process (see the module documentation) and keeps it loaded. Absent, of another
    /// major version than the shim's headers, or a build without the shim: [`EngineError::Unavailable`] with
    /// the reason (TensorRT is not usable on this machine as built).
    pub fn load() -> Result<&'static Self, EngineError> {
        static LOADED: OnceLock<Result<TrtLibrary, EngineError>> = OnceLock::new();
        LOADED
            .get_or_init(|| {
                let explicit = std::env::var_os("VISTA3D_TRT_LIB").map(PathBuf::from);
                let root = std::env::var_os("TENSORRT_ROOT").map(PathBuf::from);
                Self::load_from(explicit.as_deref(), root.as_deref())
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// [`TrtLibrary::load`] with explicit search settings instead of the environment (not cached; leak it to
    /// create builders and runtimes, which need the library for the rest of the process).
    pub fn load_from(explicit: Option<&Path>, root: Option<&Path>) -> Result<Self, EngineError> {
        if !shim_compiled() {
            return Err(EngineError::Unavailable(NO_SHIM.into()));
        }
        let header = TrtVersion::from_encoded(header_version());
        let majors = majors_to_try(Some(header.major));
        let candidates = library_candidates("libnvinfer", &majors, explicit, root);
        let (lib, path) = open_first(&candidates).map_err(|errors| {
            EngineError::Unavailable(format!(
                "TensorRT unavailable: libnvinfer.so.10/11 not found (searched VISTA3D_TRT_LIB, TENSORRT_ROOT/lib \
                 and the library path{}{})",
                if errors.is_empty() { "" } else { ": " },
                errors.join("; ")
            ))
        })?;
        let not_tensorrt = |e: libloading::Error| {
            EngineError::Unavailable(format!(
                "TensorRT unavailable: {} is not TensorRT: {}",
                path.display(),
                dl_error(&e)
            ))
        };
        // SAFETY: the symbols have these C signatures in every TensorRT 10/11 (NvInferRuntimeBase.h, NvInfer.h,
        // NvInferRuntime.h); the pointers are only used while `lib` is alive (it is stored with them).
        let (version, create_builder, create_runtime) = unsafe {
            let get_version = *lib
                .get::<unsafe extern "C" fn() -> i32>(b"getInferLibVersion\0")
                .map_err(not_tensorrt)?;
            let create_builder = *lib
                .get::<InferFactory>(b"createInferBuilder_INTERNAL\0")
                .map_err(not_tensorrt)?;
            let create_runtime = *lib
                .get::<InferFactory>(b"createInferRuntime_INTERNAL\0")
                .map_err(not_tensorrt)?;
            (
                TrtVersion::from_encoded(get_version()),
                create_builder,
                create_runtime,
            )
        };
        if version.major != header.major {
            return Err(EngineError::Unavailable(format!(
                "TensorRT unavailable: {} is TensorRT {version}, but the shim was compiled against TensorRT {header} \
                 headers (the C++ ABI differs between major versions): set TENSORRT_INCLUDE_DIR to the headers of \
                 TensorRT {} and rebuild",
                path.display(),
                version.major
            )));
        }
        let parser_candidates = library_candidates(
            "libnvonnxparser",
            &[version.major],
            explicit.or_else(|| path.parent().filter(|p| !p.as_os_str().is_empty())),
            root,
        );
        let (parser_lib, create_parser) = match open_first(&parser_candidates) {
            Ok((plib, ppath)) => {
                // SAFETY: as above, for NvOnnxParser.h's factory.
                let f = unsafe {
                    plib.get::<ParserFactory>(b"createNvOnnxParser_INTERNAL\0")
                        .map(|s| *s)
                        .map_err(|e| format!("{}: {}", ppath.display(), dl_error(&e)))
                };
                (Some(plib), f)
            }
            Err(errors) => (
                None,
                Err(format!(
                    "libnvonnxparser.so.{} not found (needed to build engines): {}",
                    version.major,
                    errors.join("; ")
                )),
            ),
        };
        Ok(Self {
            version,
            nvinfer_path: path,
            create_builder,
            create_runtime,
            create_parser,
            _parser_lib: parser_lib,
            _nvinfer_lib: lib,
        })
    }

    /// The loaded TensorRT's version.
    pub fn version(&self) -> TrtVersion {
        self.version
    }

    /// The libnvinfer that was loaded (as found: a path or a soname).
    pub fn nvinfer_path(&self) -> &Path {
        &self.nvinfer_path
    }

    /// A builder with an ONNX parser (needs libnvonnxparser).
    pub fn builder(&'static self) -> Result<Builder, ShimError> {
        let parser = self
            .create_parser
            .as_ref()
            .map_err(|e| ShimError(e.clone()))?;
        Builder::with_factories(self.create_builder, *parser)
    }

    /// A runtime, to deserialize engines.
    pub fn runtime(&'static self) -> Result<Runtime, ShimError> {
        Runtime::with_factory(self.create_runtime)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_decode() {
        let v = TrtVersion::from_encoded(101300);
        assert_eq!((v.major, v.minor, v.patch), (10, 13, 0));
        assert_eq!(v.to_string(), "10.13.0");
        assert_eq!(TrtVersion::from_encoded(110400).to_string(), "11.4.0");
    }

    #[test]
    fn candidates_follow_the_search_order() {
        let dir = tempfile::tempdir().unwrap();
        let lib = dir.path().join("libnvinfer.so.10");
        std::fs::write(&lib, b"").unwrap();
        // A file: taken as libnvinfer; the parser is looked for next to it.
        let c = library_candidates(
            "libnvinfer",
            &[11, 10],
            Some(&lib),
            Some(Path::new("/opt/trt")),
        );
        assert_eq!(
            c,
            vec![
                lib.clone(),
                PathBuf::from("/opt/trt/lib/libnvinfer.so.11"),
                PathBuf::from("/opt/trt/lib/libnvinfer.so.10"),
                PathBuf::from("libnvinfer.so.11"),
                PathBuf::from("libnvinfer.so.10"),
            ]
        );
        let p = library_candidates("libnvonnxparser", &[10], Some(&lib), None);
        assert_eq!(
            p,
            vec![
                dir.path().join("libnvonnxparser.so.10"),
                PathBuf::from("libnvonnxparser.so.10")
            ]
        );
        // A folder: searched.
        let d = library_candidates("libnvinfer", &[10], Some(dir.path()), None);
        assert_eq!(d[0], dir.path().join("libnvinfer.so.10"));
        assert_eq!(majors_to_try(Some(10)), vec![10, 11]);
        assert_eq!(majors_to_try(Some(11)), vec![11, 10]);
    }

    #[test]
    fn load_fails_clearly_without_tensorrt() {
        let dir = tempfile::tempdir().unwrap();
        // An empty folder and root: nothing to load (and no system TensorRT on test machines).
        let err = TrtLibrary::load_from(Some(dir.path()), Some(dir.path())).unwrap_err();
        assert!(err.is_unavailable(), "{err:?}");
        let err = err.to_string();
        if shim_compiled() {
            assert!(err.contains("libnvinfer.so.10/11 not found"), "{err}");
        } else {
            assert_eq!(err, NO_SHIM);
        }
        // A file that is not a library is reported with the loader's reason.
        let bogus = dir.path().join("libnvinfer.so.11");
        std::fs::write(&bogus, b"not an ELF file").unwrap();
        let err = TrtLibrary::load_from(Some(&bogus), None).unwrap_err();
        assert!(err.is_unavailable(), "{err:?}");
        let err = err.to_string();
        if shim_compiled() {
            assert!(err.contains(&bogus.display().to_string()), "{err}");
        }
    }

    #[test]
    fn checked_in_bindings_match_bindgen() {
        match super::super::ffi::GENERATED_BINDINGS {
            Some(generated) => assert!(
                generated == super::super::ffi::CHECKED_IN_BINDINGS,
                "src/engines/tensorrt/shim_bindings.rs differs from bindgen's output for shim/trt_shim.h: copy \
                 $OUT_DIR/trt_shim_bindings.rs (target/release/build/vista3d-*/out/) over it"
            ),
            None => eprintln!("libclang not available to this build: bindings not regenerated, nothing compared"),
        }
    }
}
