//! Deployment engines for the class path of a window: the image encoder's automatic branch
//! (`image_encoder.encoder` + `up_layers_auto`) and the class head. This is what every sliding window runs
//! for class prompts, so it is what TensorRT and ONNX Runtime accelerate; point prompts always run in libtorch.
//!
//! Every engine implements [`WindowEngine`]; [`Method`] names what a request asks for (`--precision`).

pub mod fingerprint;
pub mod onnx;
pub mod ort_engine;
pub mod runner;
pub mod tensorrt;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tch::Tensor;

/// How the network runs for one request (`--precision`, `precision` in configs and batch lists).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// The fastest method available on this machine (see [`Method::auto_order`]).
    Auto,
    /// TensorRT engines built with FP16 (and TF32) enabled.
    TrtFp16,
    /// TensorRT engines built with TF32 only.
    TrtTf32,
    /// ONNX Runtime on the exported ONNX models (CPU execution provider).
    Ort,
    /// libtorch with autocast to fp16 on CUDA (the bundle's default `amp: true`).
    TorchAmp,
    /// libtorch in fp32 with TF32 tensor cores allowed for convolutions and matmuls (CUDA only).
    TorchTf32,
    /// libtorch in strict fp32 (TF32 disabled): the reference.
    TorchFp32,
}

impl Method {
    /// Every concrete method, in the order `auto` tries them on a GPU.
    pub const ALL: [Method; 6] = [
        Method::TrtFp16,
        Method::TrtTf32,
        Method::TorchAmp,
        Method::TorchTf32,
        Method::TorchFp32,
        Method::Ort,
    ];

    /// The name used on the command line, in configs, logs and JSON records.
    pub fn name(self) -> &'static str {
        match self {
            Method::Auto => "auto",
            Method::TrtFp16 => "trt_fp16",
            Method::TrtTf32 => "trt_tf32",
            Method::Ort => "ort",
            Method::TorchAmp => "torch_amp",
            Method::TorchTf32 => "torch_tf32",
            Method::TorchFp32 => "torch_fp32",
        }
    }

    /// True for the methods that run the class path through a serialized engine rather than libtorch.
    pub fn uses_engine(self) -> bool {
        matches!(self, Method::TrtFp16 | Method::TrtTf32 | Method::Ort)
    }

    /// True for TensorRT methods.
    pub fn is_tensorrt(self) -> bool {
        matches!(self, Method::TrtFp16 | Method::TrtTf32)
    }

    /// The libtorch method a request falls back to when its engine cannot run.
    pub fn torch_fallback(self, cuda: bool) -> Method {
        match self {
            Method::TorchAmp | Method::TorchTf32 | Method::TorchFp32 => self,
            Method::TrtFp16 if cuda => Method::TorchAmp,
            Method::TrtTf32 if cuda => Method::TorchTf32,
            _ => Method::TorchFp32,
        }
    }

    /// The candidates `auto` tries, fastest first: TensorRT FP16, TensorRT TF32, then libtorch amp on a GPU;
    /// on a CPU ONNX Runtime (about 2x libtorch there, benches/RESULTS.md) when an export of the same weights
    /// exists, then libtorch fp32 (amp and TF32 act only on CUDA).
    pub fn auto_order(cuda: bool) -> &'static [Method] {
        if cuda {
            &[Method::TrtFp16, Method::TrtTf32, Method::TorchAmp]
        } else {
            &[Method::Ort, Method::TorchFp32]
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Method {
    type Err = anyhow::Error;

    /// Accepts the names of [`Method::name`] and the short forms `amp`, `tf32`, `fp32`, `fp16` (= trt_fp16).
    fn from_str(s: &str) -> Result<Self> {
        Ok(
            match s.trim().to_ascii_lowercase().replace('-', "_").as_str() {
                "auto" => Method::Auto,
                "trt_fp16" | "fp16" | "trt" => Method::TrtFp16,
                "trt_tf32" => Method::TrtTf32,
                "ort" | "onnxruntime" => Method::Ort,
                "amp" | "torch_amp" => Method::TorchAmp,
                "tf32" | "torch_tf32" => Method::TorchTf32,
                "fp32" | "torch_fp32" => Method::TorchFp32,
                other => bail!(
                "unknown precision '{other}': use auto, trt_fp16, trt_tf32, amp, tf32, fp32 or ort"
            ),
            },
        )
    }
}

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
        } else if !cuda && matches!(m, Method::TorchAmp | Method::TorchTf32) {
            let msg = format!("{m} acts only on CUDA devices; running torch_fp32 on the CPU");
            log::warn!("{msg}");
            notes.push(msg);
            return (None, Method::TorchFp32, notes);
        } else {
            return (None, m, notes);
        }
    }
    let fallback = match requested {
        Method::Auto => Method::auto_order(cuda)
            .iter()
            .copied()
            .find(|m| !m.uses_engine())
            .unwrap_or(Method::TorchFp32),
        m => m.torch_fallback(cuda),
    };
    (None, fallback, notes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for m in Method::ALL.into_iter().chain([Method::Auto]) {
            assert_eq!(m.name().parse::<Method>().unwrap(), m);
        }
        assert_eq!("amp".parse::<Method>().unwrap(), Method::TorchAmp);
        assert!("fp8".parse::<Method>().is_err());
    }

    #[test]
    fn fallbacks_are_torch() {
        for m in Method::ALL {
            assert!(!m.torch_fallback(true).uses_engine());
            assert!(!m.torch_fallback(false).uses_engine());
        }
        assert_eq!(Method::TrtFp16.torch_fallback(false), Method::TorchFp32);
        assert_eq!(Method::TrtFp16.torch_fallback(true), Method::TorchAmp);
    }

    fn no_context(_: Method) -> Result<EngineContext> {
        bail!("no ONNX export in onnx/")
    }

    #[test]
    fn choose_never_fails() {
        // A missing engine falls back to libtorch with the reason recorded.
        let (engine, torch, notes) = choose(Method::TrtFp16, true, &mut no_context);
        assert!(engine.is_none());
        assert_eq!(torch, Method::TorchAmp);
        assert!(notes[0].contains("no ONNX export"), "{notes:?}");
        let (_, torch, notes) = choose(Method::Ort, false, &mut no_context);
        assert_eq!(torch, Method::TorchFp32);
        assert_eq!(notes.len(), 1);
        // auto on a GPU steps down to amp; on a CPU it tries ONNX Runtime, then fp32.
        let (_, torch, notes) = choose(Method::Auto, true, &mut no_context);
        assert_eq!((torch, notes.len()), (Method::TorchAmp, 2));
        let mut tried = Vec::new();
        let (_, torch, notes) = choose(Method::Auto, false, &mut |m| {
            tried.push(m);
            no_context(m)
        });
        assert_eq!((torch, notes.len()), (Method::TorchFp32, 1));
        assert_eq!(tried, vec![Method::Ort]);
        // amp on a CPU runs fp32, said so.
        let (_, torch, notes) = choose(Method::TorchAmp, false, &mut no_context);
        assert_eq!((torch, notes.len()), (Method::TorchFp32, 1));
    }
}
