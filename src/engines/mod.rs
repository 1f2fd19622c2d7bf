//! Deployment engines for the class path of a window: the image encoder's automatic branch
//! (`image_encoder.encoder` + `up_layers_auto`) and the class head. This is what every sliding window runs
//! for class prompts, so it is what TensorRT and ONNX Runtime accelerate; point prompts always run in libtorch.
//!
//! Every engine implements [`WindowEngine`]; [`Method`] names what a request asks for (`--precision`).

pub mod error;
pub mod fingerprint;
mod method;
pub mod onnx;
pub mod ort_engine;
pub mod runner;
pub mod tensorrt;

pub use error::EngineError;
pub use method::Method;

use std::path::PathBuf;

use anyhow::{bail, Result};
use tch::Tensor;

/// An accelerated class path for one window.
///
/// Tensors stay on the model's device; the engine copies in and out as it needs. Any error makes the caller
/// fall back to libtorch for the rest of the request (one warning), so an engine reports problems as errors
/// and never panics.
pub trait WindowEngine {
    /// What runs ([`Method::TrtFp16`], [`Method::TrtTf32`] or [`Method::Ort`]).
    fn method(&self) -> Method;

    /// Image windows `[b, 1, H, W, D]` (f32) -> automatic-branch features `[b, E, H, W, D]` (f32).
    fn encode(&mut self, image: &Tensor) -> Result<Tensor>;

    /// Features `[b, E, H, W, D]` and global class ids `[B, 1]` (i64) -> logits `[B, b, H, W, D]` (f32), as
    /// MONAI's `class_head` returns them.
    fn classify(&mut self, features: &Tensor, class_ids: &Tensor) -> Result<Tensor>;
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
    /// Largest prompt batch of the class-head engine (config `max_prompt_size`).
    pub max_prompt_size: usize,
    /// Windows per network call (config `sw_batch_size`).
    pub sw_batch_size: usize,
}

/// Opens the engine of `method` (an engine method). Errors say why it cannot run here.
pub fn open_engine(method: Method, ctx: &EngineContext) -> Result<Box<dyn WindowEngine>> {
    match method {
        Method::Ort => {
            let threads = tch::get_num_threads().max(1) as usize;
            Ok(Box::new(ort_engine::OrtEngine::load(
                &ctx.onnx_dir,
                &ctx.weights_fingerprint,
                threads,
            )?))
        }
        Method::TrtFp16 | Method::TrtTf32 => {
            let tch::Device::Cuda(gpu) = ctx.device else {
                bail!("TensorRT needs a CUDA device; this request runs on the CPU");
            };
            let manifest = tensorrt::OnnxManifest::read(&ctx.onnx_dir)?;
            if manifest.weights_fingerprint != ctx.weights_fingerprint {
                bail!(
                    "stale ONNX export in {}: exported from weights {}, the loaded weights are {} \
                     (re-run vista3d export-onnx and vista3d build-engines)",
                    ctx.onnx_dir.display(),
                    manifest.weights_fingerprint,
                    ctx.weights_fingerprint
                );
            }
            let precision = if method == Method::TrtFp16 {
                tensorrt::Precision::Fp16
            } else {
                tensorrt::Precision::Tf32
            };
            let patch = ctx.patch_size.map(|v| v as i64);
            let engine =
                tensorrt::TrtEngine::load(&ctx.engines_dir, &manifest, precision, patch, gpu)?;
            Ok(Box::new(engine))
        }
        other => bail!("{other} is a libtorch method, not an engine"),
    }
}

/// The engine (if any) and the libtorch method that serve a request for `requested`, with the reasons for
/// every step down. `ctx` is asked for only when the engine of a method is tried (hashing the weights takes a
/// moment, so it may refuse early, e.g. when no export exists).
pub fn choose(
    requested: Method,
    cuda: bool,
    ctx: &mut dyn FnMut(Method) -> Result<EngineContext>,
) -> (Option<Box<dyn WindowEngine>>, Method, Vec<String>) {
    let mut notes = Vec::new();
    let candidates: Vec<Method> = match requested {
        Method::Auto => Method::auto_order(cuda).to_vec(),
        m => vec![m],
    };
    for m in candidates {
        if m.uses_engine() {
            match ctx(m).and_then(|c| open_engine(m, &c)) {
                Ok(engine) => return (Some(engine), m.torch_fallback(cuda), notes),
                Err(e) => {
                    let msg = format!("{m} unavailable: {e:#}");
                    if requested == Method::Auto {
                        log::debug!("{msg}");
                    } else {
                        log::warn!("{msg}; running libtorch {} instead", m.torch_fallback(cuda));
                    }
                    notes.push(msg);
                }
            }
        } else if !cuda && matches!(m, Method::Amp | Method::Tf32) {
            let msg = format!("{m} acts only on CUDA devices; running fp32 on the CPU");
            log::warn!("{msg}");
            notes.push(msg);
            return (None, Method::Fp32, notes);
        } else {
            return (None, m, notes);
        }
    }
    let fallback = match requested {
        Method::Auto => Method::auto_order(cuda)
            .iter()
            .copied()
            .find(|m| !m.uses_engine())
            .unwrap_or(Method::Fp32),
        m => m.torch_fallback(cuda),
    };
    (None, fallback, notes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_context(_: Method) -> Result<EngineContext> {
        bail!("no ONNX export in onnx/")
    }

    #[test]
    fn choose_never_fails() {
        // A missing engine falls back to libtorch with the reason recorded.
        let (engine, torch, notes) = choose(Method::TrtFp16, true, &mut no_context);
        assert!(engine.is_none());
        assert_eq!(torch, Method::Amp);
        assert!(notes[0].contains("no ONNX export"), "{notes:?}");
        let (_, torch, notes) = choose(Method::Ort, false, &mut no_context);
        assert_eq!(torch, Method::Fp32);
        assert_eq!(notes.len(), 1);
        // auto on a GPU steps down to amp; on a CPU it tries ONNX Runtime, then fp32.
        let (_, torch, notes) = choose(Method::Auto, true, &mut no_context);
        assert_eq!((torch, notes.len()), (Method::Amp, 2));
        let mut tried = Vec::new();
        let (_, torch, notes) = choose(Method::Auto, false, &mut |m| {
            tried.push(m);
            no_context(m)
        });
        assert_eq!((torch, notes.len()), (Method::Fp32, 1));
        assert_eq!(tried, vec![Method::Ort]);
        // amp on a CPU runs fp32, said so.
        let (_, torch, notes) = choose(Method::Amp, false, &mut no_context);
        assert_eq!((torch, notes.len()), (Method::Fp32, 1));
    }
}
