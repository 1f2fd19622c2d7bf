//! [`Method`]: how the network runs for one request. One vocabulary everywhere (CLI flags, config values,
//! records, bench tables, metrics): `auto`, `trt_fp16`, `trt_tf32`, `ort`, `amp`, `tf32`, `fp32`. The older
//! spellings `torch_fp32`, `torch_tf32`, `torch_amp` are accepted on input only.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// How the network runs for one request (`--precision`, `precision` in configs and batch lists).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
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
    Amp,
    /// libtorch in fp32 with TF32 tensor cores allowed for convolutions and matmuls (CUDA only).
    Tf32,
    /// libtorch in strict fp32 (TF32 disabled): the reference.
    Fp32,
    /// libtorch with autocast to bfloat16 (convolutions in bf16, norms in fp32), on CUDA or on a CPU with
    /// native bf16 (AVX512-BF16 or AMX); elsewhere it runs fp32.
    Bf16,
}

impl Method {
    /// Every concrete method, in the order `auto` tries them on a GPU.
    pub const ALL: [Method; 7] = [
        Method::TrtFp16,
        Method::TrtTf32,
        Method::Amp,
        Method::Tf32,
        Method::Bf16,
        Method::Fp32,
        Method::Ort,
    ];

    /// The name used on the command line, in configs, logs, records and tables.
    pub fn name(self) -> &'static str {
        match self {
            Method::Auto => "auto",
            Method::TrtFp16 => "trt_fp16",
            Method::TrtTf32 => "trt_tf32",
            Method::Ort => "ort",
            Method::Amp => "amp",
            Method::Tf32 => "tf32",
            Method::Fp32 => "fp32",
            Method::Bf16 => "bf16",
        }
    }

    /// Whether the network computes in 16-bit floats (its logits carry no more precision than float16 sums).
    pub fn reduced_precision(self) -> bool {
        matches!(self, Method::TrtFp16 | Method::Amp | Method::Bf16)
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
            Method::Amp | Method::Tf32 | Method::Fp32 | Method::Bf16 => self,
            Method::TrtFp16 if cuda => Method::Amp,
            Method::TrtTf32 if cuda => Method::Tf32,
            _ => Method::Fp32,
        }
    }

    /// The candidates `auto` tries, fastest first: TensorRT FP16, TensorRT TF32, then libtorch amp on a GPU; on a
    /// CPU ONNX Runtime then libtorch fp32 when `cpu_ort_first` (see [`AutoCpu::prefers_ort`]), else libtorch fp32
    /// alone (amp and TF32 act only on CUDA).
    pub fn auto_order(cuda: bool, cpu_ort_first: bool) -> &'static [Method] {
        if cuda {
            &[Method::TrtFp16, Method::TrtTf32, Method::Amp]
        } else if cpu_ort_first {
            &[Method::Ort, Method::Fp32]
        } else {
            &[Method::Fp32]
        }
    }
}

/// What `auto` runs on a CPU (`auto_cpu`). Which is faster depends on the CPU (`benches/RESULTS.md`, "Which engine
/// `auto` runs on a CPU" and "Winograd's convolutions on the CPU"): ONNX Runtime was 1.1-1.9x faster than libtorch on an
/// AVX-512 VM and 0.62-0.79x as fast on an AVX2-only one (AMD EPYC), where libtorch fp32 with Winograd's 3x3x3
/// convolutions is the fastest. So `detect` takes ONNX Runtime where `/proc/cpuinfo` lists `avx512f`, else
/// libtorch fp32 with Winograd's convolutions where the CPU has AVX2 and FMA, else plain libtorch fp32. The choice
/// depends on the machine, never on its load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AutoCpu {
    /// ONNX Runtime on CPUs with AVX-512, else libtorch fp32 with Winograd's convolutions (AVX2 and FMA), else
    /// libtorch fp32.
    #[default]
    Detect,
    /// ONNX Runtime (its export is made in the cache on first use), libtorch fp32 when it cannot run.
    Ort,
    /// libtorch fp32 with libtorch's own convolutions (MONAI's kernels: the reference's numbers bit for bit).
    Fp32,
    /// libtorch fp32 with Winograd's 3x3x3 convolutions (`crate::model::winograd`) and instance norms fused with
    /// their activation (`crate::model::fused_norm`) where the CPU has AVX2 and FMA, else libtorch's own kernels.
    Winograd,
}

impl AutoCpu {
    /// Whether `auto` tries ONNX Runtime first on a CPU that has (`avx512`) or lacks AVX-512.
    pub fn prefers_ort(self, avx512: bool) -> bool {
        match self {
            AutoCpu::Detect => avx512,
            AutoCpu::Ort => true,
            AutoCpu::Fp32 | AutoCpu::Winograd => false,
        }
    }

    /// Whether libtorch fp32, when `auto` runs it on a CPU that has (`avx512`) or lacks AVX-512, uses Winograd's
    /// convolutions (where the CPU can: [`crate::model::winograd::available`]).
    pub fn winograd(self, avx512: bool) -> bool {
        let wanted = match self {
            AutoCpu::Detect => !avx512,
            AutoCpu::Winograd => true,
            AutoCpu::Ort | AutoCpu::Fp32 => false,
        };
        wanted && crate::model::winograd::available()
    }

    /// The name used in configs.
    pub fn name(self) -> &'static str {
        match self {
            AutoCpu::Detect => "detect",
            AutoCpu::Ort => "ort",
            AutoCpu::Fp32 => "fp32",
            AutoCpu::Winograd => "winograd",
        }
    }
}

impl FromStr for AutoCpu {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "detect" => Ok(AutoCpu::Detect),
            "ort" | "onnxruntime" => Ok(AutoCpu::Ort),
            "fp32" | "torch_fp32" => Ok(AutoCpu::Fp32),
            "winograd" => Ok(AutoCpu::Winograd),
            other => Err(format!(
                "unknown auto_cpu '{other}': use detect, ort, fp32 or winograd"
            )),
        }
    }
}

impl fmt::Display for AutoCpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for AutoCpu {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown method name.
#[derive(Debug, Clone, thiserror::Error)]
#[error("unknown precision '{0}': use auto, trt_fp16, trt_tf32, amp, tf32, bf16, fp32 or ort")]
pub struct UnknownMethod(pub String);

impl FromStr for Method {
    type Err = UnknownMethod;

    /// Accepts the names of [`Method::name`], the aliases `torch_fp32`, `torch_tf32`, `torch_amp`, `fp16`
    /// (= trt_fp16), `trt`, `onnxruntime`; case and `-`/`_` do not matter.
    fn from_str(s: &str) -> Result<Self, UnknownMethod> {
        Ok(
            match s.trim().to_ascii_lowercase().replace('-', "_").as_str() {
                "auto" => Method::Auto,
                "trt_fp16" | "fp16" | "trt" => Method::TrtFp16,
                "trt_tf32" => Method::TrtTf32,
                "ort" | "onnxruntime" => Method::Ort,
                "amp" | "torch_amp" => Method::Amp,
                "tf32" | "torch_tf32" => Method::Tf32,
                "fp32" | "torch_fp32" => Method::Fp32,
                "bf16" | "torch_bf16" | "bfloat16" => Method::Bf16,
                _ => return Err(UnknownMethod(s.trim().to_string())),
            },
        )
    }
}

impl Serialize for Method {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for Method {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_aliases_are_input_only() {
        for m in Method::ALL.into_iter().chain([Method::Auto]) {
            assert_eq!(m.name().parse::<Method>().unwrap(), m);
            let json = serde_json::to_string(&m).unwrap();
            assert_eq!(json, format!("\"{}\"", m.name()));
            assert_eq!(serde_json::from_str::<Method>(&json).unwrap(), m);
        }
        assert_eq!("torch_amp".parse::<Method>().unwrap(), Method::Amp);
        assert_eq!("TORCH-FP32".parse::<Method>().unwrap(), Method::Fp32);
        assert_eq!(Method::Amp.to_string(), "amp");
        assert_eq!("bfloat16".parse::<Method>().unwrap(), Method::Bf16);
        let err = "fp8".parse::<Method>().unwrap_err().to_string();
        assert!(err.contains("'fp8'"), "{err}");
        assert!(serde_json::from_str::<Method>("\"fp8\"").is_err());
    }

    #[test]
    fn fallbacks_are_torch() {
        for m in Method::ALL {
            assert!(!m.torch_fallback(true).uses_engine());
            assert!(!m.torch_fallback(false).uses_engine());
        }
        assert_eq!(Method::TrtFp16.torch_fallback(false), Method::Fp32);
        assert_eq!(Method::TrtFp16.torch_fallback(true), Method::Amp);
    }

    #[test]
    fn auto_on_a_cpu_takes_onnx_runtime_only_where_asked_or_with_avx512() {
        assert!(AutoCpu::Detect.prefers_ort(true));
        assert!(!AutoCpu::Detect.prefers_ort(false));
        assert!(AutoCpu::Ort.prefers_ort(false));
        assert!(!AutoCpu::Fp32.prefers_ort(true));
        assert_eq!(Method::auto_order(false, true), [Method::Ort, Method::Fp32]);
        assert_eq!(Method::auto_order(false, false), [Method::Fp32]);
        let gpu = [Method::TrtFp16, Method::TrtTf32, Method::Amp];
        assert_eq!(Method::auto_order(true, false), gpu);
        for a in [AutoCpu::Detect, AutoCpu::Ort, AutoCpu::Fp32] {
            assert_eq!(a.name().parse::<AutoCpu>().unwrap(), a);
        }
        let err = "gpu".parse::<AutoCpu>().unwrap_err();
        assert!(err.contains("'gpu'") && err.contains("detect"), "{err}");
    }
}
