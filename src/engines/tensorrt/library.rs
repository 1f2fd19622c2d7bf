//! TensorRT loaded at run time, and safe wrappers over the shim's handles.
//!
//! [`TrtLibrary::load`] finds `libnvinfer.so.N` (and `libnvonnxparser.so.N` for building), checks that its major
//! version is the one the shim was compiled for, and resolves the factory functions that the shim calls. Search
//! order: `VISTA3D_TRT_LIB` (the library file, or a folder holding it), `TENSORRT_ROOT/lib`, then the system
//! library path (`LD_LIBRARY_PATH`, ldconfig); the headers' major version first, then the other of 10 and 11.

use std::ffi::{c_char, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{bail, Result};

use super::cache::Precision;
use super::ffi;

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
    create_builder: unsafe extern "C" fn(*mut c_void, i32) -> *mut c_void,
    create_runtime: unsafe extern "C" fn(*mut c_void, i32) -> *mut c_void,
    /// The ONNX parser's factory, or why it is not available (only builds need it).
    create_parser:
        Result<unsafe extern "C" fn(*mut c_void, *mut c_void, i32) -> *mut c_void, String>,
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
    /// Loads TensorRT once per process (see the module documentation) and keeps it loaded; a clear error when
    /// it is absent, of another major version than the shim's headers, or when this build has no shim.
    pub fn load() -> Result<&'static Self> {
        static LOADED: OnceLock<std::result::Result<TrtLibrary, String>> = OnceLock::new();
        LOADED
            .get_or_init(|| {
                let explicit = std::env::var_os("VISTA3D_TRT_LIB").map(PathBuf::from);
                let root = std::env::var_os("TENSORRT_ROOT").map(PathBuf::from);
                Self::load_from(explicit.as_deref(), root.as_deref()).map_err(|e| format!("{e:#}"))
            })
            .as_ref()
            .map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// [`TrtLibrary::load`] with explicit search settings instead of the environment (not cached; leak it to
    /// create builders and runtimes, which need the library for the rest of the process).
    pub fn load_from(explicit: Option<&Path>, root: Option<&Path>) -> Result<Self> {
        if !shim_compiled() {
            bail!(NO_SHIM);
        }
        let header = TrtVersion::from_encoded(header_version());
        let majors = majors_to_try(Some(header.major));
        let candidates = library_candidates("libnvinfer", &majors, explicit, root);
        let (lib, path) = open_first(&candidates).map_err(|errors| {
            anyhow::anyhow!(
                "TensorRT unavailable: libnvinfer.so.10/11 not found (searched VISTA3D_TRT_LIB, TENSORRT_ROOT/lib \
                 and the library path{}{})",
                if errors.is_empty() { "" } else { ": " },
                errors.join("; ")
            )
        })?;
        // SAFETY: the symbols have these C signatures in every TensorRT 10/11 (NvInferRuntimeBase.h, NvInfer.h,
        // NvInferRuntime.h); the pointers are only used while `lib` is alive (it is stored with them).
        let (version, create_builder, create_runtime) = unsafe {
            let get_version = *lib
                .get::<unsafe extern "C" fn() -> i32>(b"getInferLibVersion\0")
                .map_err(|e| {
                    anyhow::anyhow!("{} is not TensorRT: {}", path.display(), dl_error(&e))
                })?;
            let create_builder = *lib
                .get::<unsafe extern "C" fn(*mut c_void, i32) -> *mut c_void>(
                    b"createInferBuilder_INTERNAL\0",
                )
                .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), dl_error(&e)))?;
            let create_runtime = *lib
                .get::<unsafe extern "C" fn(*mut c_void, i32) -> *mut c_void>(
                    b"createInferRuntime_INTERNAL\0",
                )
                .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), dl_error(&e)))?;
            (
                TrtVersion::from_encoded(get_version()),
                create_builder,
                create_runtime,
            )
        };
        if version.major != header.major {
            bail!(
                "TensorRT unavailable: {} is TensorRT {version}, but the shim was compiled against TensorRT {header} \
                 headers (the C++ ABI differs between major versions): set TENSORRT_INCLUDE_DIR to the headers of \
                 TensorRT {} and rebuild",
                path.display(),
                version.major
            );
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
                    plib.get::<unsafe extern "C" fn(*mut c_void, *mut c_void, i32) -> *mut c_void>(
                        b"createNvOnnxParser_INTERNAL\0",
                    )
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
    pub fn builder(&'static self) -> Result<Builder> {
        let parser = self
            .create_parser
            .as_ref()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Builder::with_factories(self.create_builder, *parser)
    }

    /// A runtime, to deserialize engines.
    pub fn runtime(&'static self) -> Result<Runtime> {
        Runtime::with_factory(self.create_runtime)
    }
}

/// `NV_TENSORRT_VERSION` of the headers the shim was compiled with (0 without a shim).
pub fn header_version() -> i32 {
    #[cfg(vista3d_trt_shim)]
    {
        // SAFETY: no arguments, returns a constant.
        unsafe { ffi::trt_shim_header_version() }
    }
    #[cfg(not(vista3d_trt_shim))]
    {
        0
    }
}

/// Forwards TensorRT's log messages to the `log` crate (target `tensorrt`).
#[cfg_attr(not(vista3d_trt_shim), allow(dead_code))]
unsafe extern "C" fn log_to_rust(_user: *mut c_void, severity: i32, message: *const c_char) {
    if message.is_null() {
        return;
    }
    // SAFETY: the shim passes a NUL-terminated string valid for the call.
    let text = unsafe { CStr::from_ptr(message) }.to_string_lossy();
    let level = match severity {
        ffi::TRT_SHIM_SEVERITY_INTERNAL_ERROR | ffi::TRT_SHIM_SEVERITY_ERROR => log::Level::Error,
        ffi::TRT_SHIM_SEVERITY_WARNING => log::Level::Warn,
        ffi::TRT_SHIM_SEVERITY_INFO => log::Level::Debug,
        _ => log::Level::Trace,
    };
    log::log!(target: "tensorrt", level, "{text}");
}

/// The most verbose TensorRT severity worth forwarding at the current log level.
#[cfg_attr(not(vista3d_trt_shim), allow(dead_code))]
fn min_severity() -> i32 {
    match log::max_level() {
        log::LevelFilter::Trace => ffi::TRT_SHIM_SEVERITY_VERBOSE,
        log::LevelFilter::Debug => ffi::TRT_SHIM_SEVERITY_INFO,
        _ => ffi::TRT_SHIM_SEVERITY_WARNING,
    }
}

/// A zeroed error buffer.
#[cfg_attr(not(vista3d_trt_shim), allow(dead_code))]
fn new_error() -> Box<ffi::TrtShimError> {
    Box::new(ffi::TrtShimError {
        message: [0; ffi::TRT_SHIM_ERROR_LEN as usize],
    })
}

/// The message in an error buffer.
#[cfg_attr(not(vista3d_trt_shim), allow(dead_code))]
fn message(err: &ffi::TrtShimError) -> String {
    let bytes: Vec<u8> = err
        .message
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    if bytes.is_empty() {
        "TensorRT shim call failed without a message".into()
    } else {
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// `Ok` for TRT_SHIM_OK, the error's message otherwise.
#[cfg_attr(not(vista3d_trt_shim), allow(dead_code))]
fn status(code: i32, err: &ffi::TrtShimError) -> Result<()> {
    if code == ffi::TRT_SHIM_OK {
        Ok(())
    } else {
        bail!("{}", message(err))
    }
}

/// A C string for a tensor name or path.
#[cfg_attr(not(vista3d_trt_shim), allow(dead_code))]
fn c_string(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| anyhow::anyhow!("'{s}' contains a NUL byte"))
}

#[cfg_attr(not(vista3d_trt_shim), allow(dead_code))]
fn to_dims(shape: &[i64]) -> Result<ffi::TrtShimDims> {
    let max = ffi::TRT_SHIM_MAX_DIMS as usize;
    if shape.len() > max {
        bail!("a TensorRT tensor has at most {max} dims, got {shape:?}");
    }
    let mut d = [0i64; ffi::TRT_SHIM_MAX_DIMS as usize];
    d[..shape.len()].copy_from_slice(shape);
    Ok(ffi::TrtShimDims {
        nb_dims: shape.len() as i32,
        d,
    })
}

#[cfg_attr(not(vista3d_trt_shim), allow(dead_code))]
fn from_dims(dims: &ffi::TrtShimDims) -> Vec<i64> {
    let n = dims.nb_dims.clamp(0, ffi::TRT_SHIM_MAX_DIMS) as usize;
    dims.d[..n].to_vec()
}

#[cfg_attr(not(vista3d_trt_shim), allow(dead_code))]
fn zero_dims() -> ffi::TrtShimDims {
    ffi::TrtShimDims {
        nb_dims: 0,
        d: [0; ffi::TRT_SHIM_MAX_DIMS as usize],
    }
}

/// Copies the bytes of a shim blob and frees it.
#[cfg(vista3d_trt_shim)]
fn take_bytes(raw: *mut ffi::TrtShimBytes, err: &ffi::TrtShimError) -> Result<Vec<u8>> {
    if raw.is_null() {
        bail!("{}", message(err));
    }
    // SAFETY: `raw` is a live blob; data/size describe its bytes until it is destroyed below.
    unsafe {
        let data = ffi::trt_shim_bytes_data(raw) as *const u8;
        let size = ffi::trt_shim_bytes_size(raw);
        let out = if data.is_null() || size == 0 {
            Vec::new()
        } else {
            std::slice::from_raw_parts(data, size).to_vec()
        };
        ffi::trt_shim_bytes_destroy(raw);
        Ok(out)
    }
}

/// A network input as parsed from ONNX.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkInput {
    pub name: String,
    /// -1 for a dynamic dimension.
    pub dims: Vec<i64>,
    /// TensorRT DataType value (`ffi::TRT_SHIM_DTYPE_*`).
    pub dtype: i32,
}

/// An engine's input or output tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoTensor {
    pub name: String,
    pub is_input: bool,
    pub dtype: i32,
    /// -1 for a dynamic dimension.
    pub dims: Vec<i64>,
}

/// TensorRT builder + network + ONNX parser + builder config (one model per builder).
pub struct Builder {
    #[cfg(vista3d_trt_shim)]
    raw: *mut ffi::TrtShimBuilder,
    /// Without the shim no handle can exist.
    #[cfg(not(vista3d_trt_shim))]
    never: std::convert::Infallible,
}

/// A TensorRT runtime; engines keep it alive.
pub struct Runtime {
    #[cfg(vista3d_trt_shim)]
    raw: *mut ffi::TrtShimRuntime,
    #[cfg(not(vista3d_trt_shim))]
    never: std::convert::Infallible,
}

/// A deserialized engine; contexts keep it alive.
pub struct Engine {
    #[cfg(vista3d_trt_shim)]
    raw: *mut ffi::TrtShimEngine,
    #[cfg(vista3d_trt_shim)]
    _runtime: std::sync::Arc<Runtime>,
    #[cfg(not(vista3d_trt_shim))]
    never: std::convert::Infallible,
}

/// An execution context of an engine.
pub struct Context {
    #[cfg(vista3d_trt_shim)]
    raw: *mut ffi::TrtShimContext,
    #[cfg(vista3d_trt_shim)]
    engine: std::sync::Arc<Engine>,
    #[cfg(not(vista3d_trt_shim))]
    never: std::convert::Infallible,
}

// SAFETY: TensorRT objects may be moved between threads. TensorRT documents IRuntime and ICudaEngine as safe to
// use from several threads at once (deserialization, queries, creating contexts); the shim's logger is
// mutex-protected (concurrent calls on one runtime could only attribute a logged error to the wrong call).
// Builders and contexts are not Sync: their calls never overlap.
unsafe impl Send for Builder {}
unsafe impl Send for Runtime {}
unsafe impl Sync for Runtime {}
unsafe impl Send for Engine {}
unsafe impl Sync for Engine {}
unsafe impl Send for Context {}

#[cfg(vista3d_trt_shim)]
mod imp {
    use super::*;
    use std::sync::Arc;

    type InferFactory = unsafe extern "C" fn(*mut c_void, i32) -> *mut c_void;
    type ParserFactory = unsafe extern "C" fn(*mut c_void, *mut c_void, i32) -> *mut c_void;

    impl Builder {
        /// A builder from factory functions (TensorRT's, or the shim's test factories).
        pub fn with_factories(create: InferFactory, parser: ParserFactory) -> Result<Self> {
            let mut err = new_error();
            // SAFETY: valid function pointers; the shim copies nothing from the log user pointer (null).
            let raw = unsafe {
                ffi::trt_shim_builder_create(
                    Some(create),
                    Some(parser),
                    Some(log_to_rust),
                    std::ptr::null_mut(),
                    min_severity(),
                    &mut *err,
                )
            };
            if raw.is_null() {
                bail!("{}", message(&err));
            }
            Ok(Self { raw })
        }

        /// Parses an ONNX file (NATIVE_INSTANCENORM).
        pub fn parse_onnx(&mut self, path: &Path) -> Result<()> {
            let c = c_string(&path.to_string_lossy())?;
            let mut err = new_error();
            // SAFETY: live builder, valid C string and error buffer.
            status(
                unsafe { ffi::trt_shim_builder_parse_onnx(self.raw, c.as_ptr(), &mut *err) },
                &err,
            )
        }

        /// The network's inputs (after parsing).
        pub fn inputs(&self) -> Result<Vec<NetworkInput>> {
            // SAFETY: live builder.
            let n = unsafe { ffi::trt_shim_builder_num_inputs(self.raw) };
            let mut out = Vec::new();
            for i in 0..n {
                let mut name: *const c_char = std::ptr::null();
                let mut dims = zero_dims();
                let mut dtype = 0;
                let mut err = new_error();
                // SAFETY: live builder, valid out pointers; the name lives as long as the builder.
                status(
                    unsafe {
                        ffi::trt_shim_builder_input(
                            self.raw, i, &mut name, &mut dims, &mut dtype, &mut *err,
                        )
                    },
                    &err,
                )?;
                // SAFETY: non-null NUL-terminated name owned by the network.
                let name = if name.is_null() {
                    String::new()
                } else {
                    unsafe { CStr::from_ptr(name) }
                        .to_string_lossy()
                        .into_owned()
                };
                out.push(NetworkInput {
                    name,
                    dims: from_dims(&dims),
                    dtype,
                });
            }
            Ok(out)
        }

        /// Builder flags for `precision`; `fp16_model`: the parsed model is the float16 export (its types give
        /// the engine's precision: required for FP16 with TensorRT 11, whose networks are strongly typed).
        pub fn set_precision(&mut self, precision: Precision, fp16_model: bool) -> Result<()> {
            let p = match (precision, fp16_model) {
                (Precision::Fp16, true) => ffi::TRT_SHIM_PRECISION_FP16_MODEL,
                (Precision::Fp16, false) => ffi::TRT_SHIM_PRECISION_FP16,
                (Precision::Tf32, false) => ffi::TRT_SHIM_PRECISION_TF32,
                (Precision::Tf32, true) => {
                    bail!("a TF32 engine must be built from the float32 ONNX model, not the float16 one")
                }
            };
            let mut err = new_error();
            // SAFETY: live builder.
            status(
                unsafe { ffi::trt_shim_builder_set_precision(self.raw, p, &mut *err) },
                &err,
            )
        }

        /// Builder optimisation level (0..=5).
        pub fn set_optimization_level(&mut self, level: i32) -> Result<()> {
            let mut err = new_error();
            // SAFETY: live builder.
            status(
                unsafe { ffi::trt_shim_builder_set_optimization_level(self.raw, level, &mut *err) },
                &err,
            )
        }

        /// min/opt/max dims of one input in the optimisation profile.
        pub fn set_profile(&mut self, input: &str, dims: &[Vec<i64>; 3]) -> Result<()> {
            let c = c_string(input)?;
            let (min, opt, max) = (to_dims(&dims[0])?, to_dims(&dims[1])?, to_dims(&dims[2])?);
            let mut err = new_error();
            // SAFETY: live builder, valid pointers for the call.
            status(
                unsafe {
                    ffi::trt_shim_builder_set_profile_dims(
                        self.raw,
                        c.as_ptr(),
                        &min,
                        &opt,
                        &max,
                        &mut *err,
                    )
                },
                &err,
            )
        }

        /// Uses the serialized timing cache `bytes` (empty: a new cache).
        pub fn set_timing_cache(&mut self, bytes: &[u8]) -> Result<()> {
            let mut err = new_error();
            // SAFETY: live builder; `bytes` outlives the call (TensorRT copies it).
            status(
                unsafe {
                    ffi::trt_shim_builder_set_timing_cache(
                        self.raw,
                        bytes.as_ptr() as *const c_void,
                        bytes.len(),
                        &mut *err,
                    )
                },
                &err,
            )
        }

        /// The builder's timing cache, serialized.
        pub fn timing_cache(&self) -> Result<Vec<u8>> {
            let mut err = new_error();
            // SAFETY: live builder.
            let raw = unsafe { ffi::trt_shim_builder_serialize_timing_cache(self.raw, &mut *err) };
            take_bytes(raw, &err)
        }

        /// Builds the serialized engine.
        pub fn build(&mut self) -> Result<Vec<u8>> {
            let mut err = new_error();
            // SAFETY: live builder.
            let raw = unsafe { ffi::trt_shim_builder_build(self.raw, &mut *err) };
            take_bytes(raw, &err)
        }
    }

    impl Drop for Builder {
        fn drop(&mut self) {
            // SAFETY: created by trt_shim_builder_create, destroyed once.
            unsafe { ffi::trt_shim_builder_destroy(self.raw) }
        }
    }

    impl Runtime {
        /// A runtime from a factory function (TensorRT's, or the shim's test factories).
        pub fn with_factory(create: InferFactory) -> Result<Self> {
            let mut err = new_error();
            // SAFETY: valid function pointer and error buffer.
            let raw = unsafe {
                ffi::trt_shim_runtime_create(
                    Some(create),
                    Some(log_to_rust),
                    std::ptr::null_mut(),
                    min_severity(),
                    &mut *err,
                )
            };
            if raw.is_null() {
                bail!("{}", message(&err));
            }
            Ok(Self { raw })
        }

        /// Deserializes a plan.
        pub fn deserialize(self: &Arc<Self>, plan: &[u8]) -> Result<Engine> {
            let mut err = new_error();
            // SAFETY: live runtime; TensorRT copies what it needs from `plan` during the call.
            let raw = unsafe {
                ffi::trt_shim_engine_deserialize(
                    self.raw,
                    plan.as_ptr() as *const c_void,
                    plan.len(),
                    &mut *err,
                )
            };
            if raw.is_null() {
                bail!("{}", message(&err));
            }
            Ok(Engine {
                raw,
                _runtime: self.clone(),
            })
        }
    }

    impl Drop for Runtime {
        fn drop(&mut self) {
            // SAFETY: created by trt_shim_runtime_create; engines hold an Arc, so none is left.
            unsafe { ffi::trt_shim_runtime_destroy(self.raw) }
        }
    }

    impl Engine {
        /// The engine's inputs and outputs.
        pub fn io_tensors(&self) -> Result<Vec<IoTensor>> {
            // SAFETY: live engine.
            let n = unsafe { ffi::trt_shim_engine_num_io(self.raw) };
            let mut out = Vec::new();
            for i in 0..n {
                // SAFETY: live engine, index in range; the name lives as long as the engine.
                let name = unsafe { ffi::trt_shim_engine_io_name(self.raw, i) };
                if name.is_null() {
                    bail!("the engine has no I/O tensor {i}");
                }
                let name = unsafe { CStr::from_ptr(name) }
                    .to_string_lossy()
                    .into_owned();
                let c = c_string(&name)?;
                let (mut is_input, mut dtype, mut dims) = (0, 0, zero_dims());
                let mut err = new_error();
                // SAFETY: live engine, valid pointers.
                status(
                    unsafe {
                        ffi::trt_shim_engine_io_info(
                            self.raw,
                            c.as_ptr(),
                            &mut is_input,
                            &mut dtype,
                            &mut dims,
                            &mut *err,
                        )
                    },
                    &err,
                )?;
                out.push(IoTensor {
                    name,
                    is_input: is_input != 0,
                    dtype,
                    dims: from_dims(&dims),
                });
            }
            Ok(out)
        }

        /// min/opt/max dims of input `name` in profile 0.
        pub fn profile_dims(&self, name: &str) -> Result<[Vec<i64>; 3]> {
            let c = c_string(name)?;
            let mut out: [Vec<i64>; 3] = Default::default();
            for (i, sel) in [
                ffi::TRT_SHIM_PROFILE_MIN,
                ffi::TRT_SHIM_PROFILE_OPT,
                ffi::TRT_SHIM_PROFILE_MAX,
            ]
            .into_iter()
            .enumerate()
            {
                let mut dims = zero_dims();
                let mut err = new_error();
                // SAFETY: live engine, valid pointers.
                status(
                    unsafe {
                        ffi::trt_shim_engine_profile_dims(
                            self.raw,
                            c.as_ptr(),
                            sel,
                            &mut dims,
                            &mut *err,
                        )
                    },
                    &err,
                )?;
                out[i] = from_dims(&dims);
            }
            Ok(out)
        }

        /// An execution context (allocates the engine's activation memory).
        pub fn context(self: &Arc<Self>) -> Result<Context> {
            let mut err = new_error();
            // SAFETY: live engine.
            let raw = unsafe { ffi::trt_shim_context_create(self.raw, &mut *err) };
            if raw.is_null() {
                bail!("{}", message(&err));
            }
            Ok(Context {
                raw,
                engine: self.clone(),
            })
        }
    }

    impl Drop for Engine {
        fn drop(&mut self) {
            // SAFETY: created by trt_shim_engine_deserialize; contexts hold an Arc, so none is left.
            unsafe { ffi::trt_shim_engine_destroy(self.raw) }
        }
    }

    impl Context {
        /// The engine this context runs.
        pub fn engine(&self) -> &Arc<Engine> {
            &self.engine
        }

        /// Sets the shape of an input for the next run.
        pub fn set_input_shape(&mut self, name: &str, shape: &[i64]) -> Result<()> {
            let c = c_string(name)?;
            let dims = to_dims(shape)?;
            let mut err = new_error();
            // SAFETY: live context, valid pointers.
            status(
                unsafe {
                    ffi::trt_shim_context_set_input_shape(self.raw, c.as_ptr(), &dims, &mut *err)
                },
                &err,
            )
        }

        /// The shape of a tensor given the input shapes set.
        pub fn tensor_shape(&self, name: &str) -> Result<Vec<i64>> {
            let c = c_string(name)?;
            let mut dims = zero_dims();
            let mut err = new_error();
            // SAFETY: live context, valid pointers.
            status(
                unsafe {
                    ffi::trt_shim_context_tensor_shape(self.raw, c.as_ptr(), &mut dims, &mut *err)
                },
                &err,
            )?;
            Ok(from_dims(&dims))
        }

        /// Sets the device address of a tensor.
        ///
        /// # Safety
        /// `address` must point to device memory large enough for the tensor's shape and type, valid until the
        /// run that uses it has completed.
        pub unsafe fn set_tensor_address(
            &mut self,
            name: &str,
            address: *mut c_void,
        ) -> Result<()> {
            let c = c_string(name)?;
            let mut err = new_error();
            status(
                // SAFETY: the caller guarantees the address; live context.
                unsafe {
                    ffi::trt_shim_context_set_tensor_address(
                        self.raw,
                        c.as_ptr(),
                        address,
                        &mut *err,
                    )
                },
                &err,
            )
        }

        /// Queues a run on `stream`.
        ///
        /// # Safety
        /// Every tensor address must be set and valid until the stream has finished the run; `stream` must be a
        /// live CUDA stream of the engine's device.
        pub unsafe fn enqueue(&mut self, stream: *mut c_void) -> Result<()> {
            let mut err = new_error();
            status(
                // SAFETY: guaranteed by the caller.
                unsafe { ffi::trt_shim_context_enqueue(self.raw, stream, &mut *err) },
                &err,
            )
        }
    }

    impl Drop for Context {
        fn drop(&mut self) {
            // SAFETY: created by trt_shim_context_create, destroyed once, before its engine (held by the Arc).
            unsafe { ffi::trt_shim_context_destroy(self.raw) }
        }
    }
}

#[cfg(not(vista3d_trt_shim))]
mod imp {
    //! Without the shim no handle can be made: constructors report why, and the other methods cannot be
    //! reached (the handles are uninhabited).
    use super::*;
    use std::sync::Arc;

    type InferFactory = unsafe extern "C" fn(*mut c_void, i32) -> *mut c_void;
    type ParserFactory = unsafe extern "C" fn(*mut c_void, *mut c_void, i32) -> *mut c_void;

    impl Builder {
        /// Unavailable without the shim.
        pub fn with_factories(_create: InferFactory, _parser: ParserFactory) -> Result<Self> {
            bail!(NO_SHIM)
        }
        pub fn parse_onnx(&mut self, _path: &Path) -> Result<()> {
            match self.never {}
        }
        pub fn inputs(&self) -> Result<Vec<NetworkInput>> {
            match self.never {}
        }
        pub fn set_precision(&mut self, _precision: Precision, _fp16_model: bool) -> Result<()> {
            match self.never {}
        }
        pub fn set_optimization_level(&mut self, _level: i32) -> Result<()> {
            match self.never {}
        }
        pub fn set_profile(&mut self, _input: &str, _dims: &[Vec<i64>; 3]) -> Result<()> {
            match self.never {}
        }
        pub fn set_timing_cache(&mut self, _bytes: &[u8]) -> Result<()> {
            match self.never {}
        }
        pub fn timing_cache(&self) -> Result<Vec<u8>> {
            match self.never {}
        }
        pub fn build(&mut self) -> Result<Vec<u8>> {
            match self.never {}
        }
    }

    impl Runtime {
        /// Unavailable without the shim.
        pub fn with_factory(_create: InferFactory) -> Result<Self> {
            bail!(NO_SHIM)
        }
        pub fn deserialize(self: &Arc<Self>, _plan: &[u8]) -> Result<Engine> {
            match self.never {}
        }
    }

    impl Engine {
        pub fn io_tensors(&self) -> Result<Vec<IoTensor>> {
            match self.never {}
        }
        pub fn profile_dims(&self, _name: &str) -> Result<[Vec<i64>; 3]> {
            match self.never {}
        }
        pub fn context(self: &Arc<Self>) -> Result<Context> {
            match self.never {}
        }
    }

    impl Context {
        pub fn engine(&self) -> &Arc<Engine> {
            match self.never {}
        }
        pub fn set_input_shape(&mut self, _name: &str, _shape: &[i64]) -> Result<()> {
            match self.never {}
        }
        pub fn tensor_shape(&self, _name: &str) -> Result<Vec<i64>> {
            match self.never {}
        }
        /// # Safety
        /// See the shim build's documentation.
        pub unsafe fn set_tensor_address(
            &mut self,
            _name: &str,
            _address: *mut c_void,
        ) -> Result<()> {
            match self.never {}
        }
        /// # Safety
        /// See the shim build's documentation.
        pub unsafe fn enqueue(&mut self, _stream: *mut c_void) -> Result<()> {
            match self.never {}
        }
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
        let err = TrtLibrary::load_from(Some(dir.path()), Some(dir.path()))
            .unwrap_err()
            .to_string();
        if shim_compiled() {
            assert!(err.contains("libnvinfer.so.10/11 not found"), "{err}");
        } else {
            assert_eq!(err, NO_SHIM);
        }
        // A file that is not a library is reported with the loader's reason.
        let bogus = dir.path().join("libnvinfer.so.11");
        std::fs::write(&bogus, b"not an ELF file").unwrap();
        let err = TrtLibrary::load_from(Some(&bogus), None)
            .unwrap_err()
            .to_string();
        if shim_compiled() {
            assert!(err.contains(&bogus.display().to_string()), "{err}");
        }
    }

    #[cfg(vista3d_trt_shim)]
    #[test]
    fn shim_reports_its_header_version() {
        let v = TrtVersion::from_encoded(header_version());
        assert!(SUPPORTED_MAJORS.contains(&v.major), "{v}");
    }

    #[cfg(vista3d_trt_shim)]
    #[test]
    fn an_error_logged_by_tensorrt_fails_the_call() {
        // As TensorRT without a GPU: an error is logged and a non-null, unusable pointer returned.
        let err = Runtime::with_factory(ffi::trt_shim_test_factory_logs_error)
            .err()
            .expect("must fail")
            .to_string();
        assert!(err.contains("createInferRuntime"), "{err}");
        assert!(err.contains("CUDA initialization failure"), "{err}");
        let err = Builder::with_factories(
            ffi::trt_shim_test_factory_logs_error,
            ffi::trt_shim_test_factory_null_parser,
        )
        .err()
        .expect("must fail")
        .to_string();
        assert!(err.contains("createInferBuilder"), "{err}");
    }

    #[cfg(vista3d_trt_shim)]
    #[test]
    fn a_null_factory_result_fails_the_call() {
        let err = Runtime::with_factory(ffi::trt_shim_test_factory_null)
            .err()
            .expect("must fail")
            .to_string();
        assert!(err.contains("createInferRuntime returned null"), "{err}");
    }

    #[test]
    fn checked_in_bindings_match_bindgen() {
        match ffi::GENERATED_BINDINGS {
            Some(generated) => assert!(
                generated == ffi::CHECKED_IN_BINDINGS,
                "src/engines/tensorrt/shim_bindings.rs differs from bindgen's output for shim/trt_shim.h: copy \
                 $OUT_DIR/trt_shim_bindings.rs (target/release/build/vista3d-*/out/) over it"
            ),
            None => eprintln!("libclang not available to this build: bindings not regenerated, nothing compared"),
        }
    }

    #[test]
    fn dims_round_trip_and_reject_too_many() {
        let d = to_dims(&[2, 16, 128, 128, 128]).unwrap();
        assert_eq!(from_dims(&d), vec![2, 16, 128, 128, 128]);
        assert!(to_dims(&[1; 9]).is_err());
        let mut e = new_error();
        assert!(message(&e).contains("without a message"));
        for (i, b) in b"boom".iter().enumerate() {
            e.message[i] = *b as c_char;
        }
        assert_eq!(message(&e), "boom");
        assert!(status(ffi::TRT_SHIM_FAILED, &e).unwrap_err().to_string() == "boom");
        assert!(status(ffi::TRT_SHIM_OK, &e).is_ok());
    }
}
