//! Deployment engines for the class path of a window: the image encoder's automatic branch
//! (`image_encoder.encoder` + `up_layers_auto`) and the class head. This is what every sliding window runs
//! for class prompts, so it is what TensorRT and ONNX Runtime accelerate; point prompts always run in libtorch.
//! Engines split it in two ([`split`]): an encoder part computed once per window (including the class head's
//! prompt-independent `image_post_mapping`) and a class-head part computed per chunk of prompts.
//!
//! - [`Method`] names what a request asks for (`--precision`): the one method/precision vocabulary;
//! - [`WindowEngine`] is what an engine implements ([`ort_engine::OrtEngine`], [`tensorrt::TrtEngine`]);
//! - [`choose`] picks the engine and libtorch method of a request under the fallback policy ([`EngineChoice`]);
//! - [`runner::WindowRunner`] runs one request's windows: the engine for the class path, libtorch for the rest
//!   and after an engine failure;
//! - [`EngineError`] says why an engine cannot run, by kind (unavailable, stale, corrupt, runtime);
//! - [`onnx`] exports the class path to ONNX (the one `manifest.json` reader for every engine); [`fingerprint`]
//!   identifies the weights exports and engines were made from; [`onnx_cache`] finds (or makes, on first use) the
//!   export of the loaded weights in the cache directory;
//! - [`availability`] says which methods this binary can run here, and why not (`vista3d info --engines`).

pub mod availability;
mod choice;
pub mod error;
pub mod fingerprint;
mod method;
pub mod onnx;
pub mod onnx_cache;
pub mod ort_engine;
pub mod runner;
pub mod split;
mod tensor_bytes;
pub mod tensorrt;

pub use choice::{artifacts_present, choose, open_engine, EngineChoice, Fallback};
pub use error::{EngineError, EngineErrorKind};
pub use method::{AutoCpu, Method};

use std::path::PathBuf;

use tch::Tensor;

/// An accelerated class path for one window.
///
/// Tensors stay on the model's device; the engine copies in and out as it needs. Any error makes the caller
/// fall back to libtorch for the rest of the request (one warning), so an engine reports problems as errors
/// ([`EngineError::Runtime`] while running) and never panics. Engines are `Send`: a request's engine may be
/// owned by the worker thread that serves requests.
pub trait WindowEngine: Send {
    /// What runs ([`Method::TrtFp16`], [`Method::TrtTf32`] or [`Method::Ort`]).
    fn method(&self) -> Method;

    /// Image windows `[b, 1, H, W, D]` (f32) -> mapped features `[b, E, H, W, D]` (f32): the encoder, the
    /// automatic decoder and the class head's `image_post_mapping` ([`split::encode`]), once per window.
    fn encode(&mut self, image: &Tensor) -> Result<Tensor, EngineError>;

    /// Mapped features `[b, E, H, W, D]` (from [`WindowEngine::encode`]) and global class ids `[B, 1]` (i64) ->
    /// logits `[B, b, H, W, D]` (f32), as MONAI's `class_head` returns them ([`split::classify`]).
    fn classify(&mut self, features: &Tensor, class_ids: &Tensor) -> Result<Tensor, EngineError>;

    /// Whether [`WindowEngine::classify`] takes features of any spatial size, such as a slab of a window along x
    /// (ONNX Runtime: dynamic spatial dims), so that a window's logits for every class never exist at once. A
    /// TensorRT engine is built for the window's shape and takes the window whole.
    fn classifies_slabs(&self) -> bool {
        false
    }
}

/// Where engines live and what they must match, for opening one for a request.
#[derive(Debug, Clone)]
pub struct EngineContext {
    /// Directory of `vista3d export-onnx` (config `onnx_dir`).
    pub onnx_dir: PathBuf,
    /// Directory of `vista3d build-engines` (config `engines_dir`).
    pub engines_dir: PathBuf,
    /// [`fingerprint`] of the loaded weights: engines built from other weights are stale.
    pub weights_fingerprint: String,
    /// The device the request runs on.
    pub device: tch::Device,
    /// The sliding-window size the engines were built for.
    pub patch_size: [usize; 3],
    /// Prompts per class-head call (config `max_prompt_size`): selects the TensorRT class-head engine built
    /// for it (`build-engines --max-prompt-size`), and more prompts run in chunks of it.
    pub max_prompt_size: usize,
    /// Windows per network call (config `sw_batch_size`).
    pub sw_batch_size: usize,
}
