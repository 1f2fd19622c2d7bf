//! TensorRT engines for the class path of a window (encoder + class head), built from the exported ONNX models.
//!
//! - [`library`]: TensorRT loaded at run time (`libnvinfer.so.10/11`, `libnvonnxparser`) and the safe owning
//!   handles over the C++ shim (`shim/trt_shim.{h,cpp}`, compiled by build.rs when TensorRT headers are found):
//!   `handles.rs` with the shim, `dummy.rs` (same API, uninhabited) without it, chosen once at module level;
//! - `shim` (private): the one call helper for the shim's error-buffer/status/null convention, dims, [`DataType`];
//! - `ffi` (private): the raw bindings of `shim/trt_shim.h` (bindgen's output, or the checked-in copy);
//! - [`cache`]: engine keys, file names, sidecars, staleness, profiles and prompt chunking (pure Rust);
//! - [`build_engines`]: `vista3d build-engines`;
//! - [`engine`]: [`TrtEngine`], the [`WindowEngine`](crate::engines::WindowEngine) on TensorRT;
//! - [`cuda`]: the GPU and the stream (CUDA driver loaded at run time).
//!
//! The export is read through [`crate::engines::onnx::OnnxManifest`] (the one manifest reader); TensorRT methods
//! are [`Method::TrtFp16`](crate::engines::Method::TrtFp16) and [`Method::TrtTf32`](crate::engines::Method::TrtTf32)
//! (`fp16` / `tf32` in file names, sidecars and `build-engines --precision`).
//!
//! Nothing links against TensorRT or CUDA: a build without TensorRT headers, or a machine without TensorRT or a
//! GPU, reports TensorRT as unavailable with the reason, and callers fall back to libtorch.
//!
//! Tested here (no TensorRT, no GPU): keys, staleness, `max_prompt_size` selection, sidecars and chunking in
//! `cache.rs` and `engine.rs` unit tests; the shim's failure paths through its test factories (`handles.rs`);
//! the call helper, dims and data types (`shim.rs`); library search order (`library.rs`); the checked-in
//! bindings against bindgen's; and, end to end, `tests/tensorrt.rs` (build-engines and loading without TensorRT).
//! Building and running real engines needs a GPU with TensorRT and is not tested yet (engines/README.md).

pub mod build_engines;
pub mod cache;
pub mod cuda;
pub mod engine;
mod ffi;
pub mod library;
mod shim;

pub use build_engines::{
    build_engines, parse_patch, report, BuildOptions, BuildOutcome, BuildStatus,
};
pub use cache::{chunk_ranges, parse_methods, precision_name, Part, Platform, TRT_METHODS};
pub use engine::{onnx_source, OnnxSource, TrtEngine};
pub use library::{shim_compiled, DataType, ShimError, TrtLibrary, TrtVersion};
