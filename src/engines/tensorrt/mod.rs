//! TensorRT engines for the class path of a window (encoder + class head), built from the exported ONNX models.
//!
//! - [`library`]: TensorRT loaded at run time (`libnvinfer.so.10/11`, `libnvonnxparser`) and safe wrappers over
//!   the C++ shim (`shim/trt_shim.{h,cpp}`, compiled by build.rs when TensorRT headers are found);
//! - [`cache`]: engine keys, file names, sidecars, staleness, profiles and prompt chunking (pure Rust);
//! - [`manifest`]: the ONNX export folder (`manifest.json`);
//! - [`build_engines`]: `vista3d build-engines`;
//! - [`engine`]: [`TrtEngine`], the [`WindowEngine`](crate::engines::WindowEngine) on TensorRT;
//! - [`cuda`]: the GPU and the stream (CUDA driver loaded at run time).
//!
//! Nothing links against TensorRT or CUDA: a build without TensorRT headers, or a machine without TensorRT or a
//! GPU, reports TensorRT as unavailable with the reason, and callers fall back to libtorch.

pub mod build_engines;
pub mod cache;
pub mod cuda;
pub mod engine;
pub mod ffi;
pub mod library;
pub mod manifest;

pub use build_engines::{
    build_engines, parse_patch, report, BuildOptions, BuildOutcome, BuildStatus,
};
pub use cache::{chunk_ranges, Part, Precision};
pub use engine::TrtEngine;
pub use library::{shim_compiled, TrtLibrary, TrtVersion};
pub use manifest::OnnxManifest;
