//! Deployment engines for the class path of a window: the image encoder's automatic branch
//! (`image_encoder.encoder` + `up_layers_auto`) and the class head. This is what every sliding window runs
//! for class prompts, so it is what TensorRT and ONNX Runtime accelerate; point prompts always run in libtorch.
//!
//! Every engine implements [`WindowEngine`]; [`Method`] names what a request asks for (`--precision`).

use std::fmt;
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
    /// libtorch fp32 on a CPU (amp and TF32 act only on CUDA).
    pub fn auto_order(cuda: bool) -> &'static [Method] {
        if cuda {
            &[Method::TrtFp16, Method::TrtTf32, Method::TorchAmp]
        } else {
            &[Method::TorchFp32]
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
}
