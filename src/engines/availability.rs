//! What this binary can run on this machine, and why not (`vista3d info --engines`).
//!
//! [`probe`] looks at the machine once (CUDA devices libtorch sees, the ONNX Runtime library it would load, the
//! TensorRT shim and library); [`assess`] turns those facts into one line per method and what `auto` picks, so
//! the policy is tested with made-up facts. Nothing here needs weights: whether engines are built or exports
//! made for a checkpoint is decided per request (the cache directory, [`super::onnx_cache`]).

use std::path::PathBuf;

use serde::Serialize;

use super::{ort_engine, tensorrt, AutoCpu, EngineError, Method};

/// The facts [`assess`] judges, gathered by [`probe`].
#[derive(Debug, Clone)]
pub struct Probes {
    /// CUDA devices libtorch can use.
    pub cuda_devices: usize,
    /// The ONNX Runtime library loaded (and its version checked), or why not.
    pub ort: Result<PathBuf, EngineError>,
    /// The TensorRT library loaded (`version at path`), or why not (including a build without the shim).
    pub tensorrt: Result<String, EngineError>,
    /// Whether this binary compiled the TensorRT shim.
    pub shim_compiled: bool,
    /// Whether the CPU has AVX-512 (where `auto` prefers ONNX Runtime: [`AutoCpu`]).
    pub cpu_avx512: bool,
    /// Whether the CPU runs Winograd's convolutions (AVX2 and FMA: [`crate::model::winograd::available`]).
    pub cpu_winograd: bool,
}

/// One method: whether it runs here, and the reason or the library it uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MethodAvailability {
    pub method: Method,
    pub available: bool,
    pub detail: String,
}

/// What this binary can run here.
#[derive(Debug, Clone, Serialize)]
pub struct EngineReport {
    pub cuda_devices: usize,
    pub tensorrt_shim_compiled: bool,
    pub methods: Vec<MethodAvailability>,
    /// What `auto` runs on the CPU here (with the default `auto_cpu = detect`).
    pub auto_cpu: Method,
    /// Whether the CPU has AVX-512.
    pub cpu_avx512: bool,
    /// Whether `auto`'s libtorch fp32 on the CPU uses Winograd's convolutions here.
    pub auto_cpu_winograd: bool,
    /// What `auto` tries on a GPU here, in order (empty without a GPU).
    pub auto_gpu: Vec<Method>,
}

/// Looks at this machine: loads ONNX Runtime and TensorRT if they are found (as a request would).
pub fn probe() -> Probes {
    crate::runtime::init_cuda();
    let cuda_devices = if tch::Cuda::is_available() {
        tch::Cuda::device_count().max(0) as usize
    } else {
        0
    };
    let ort = ort_engine::ort_environment().and_then(|_| ort_engine::ort_library());
    let tensorrt = tensorrt::TrtLibrary::load()
        .map(|lib| format!("{} at {}", lib.version(), lib.nvinfer_path().display()));
    Probes {
        cuda_devices,
        ort,
        tensorrt,
        shim_compiled: tensorrt::shim_compiled(),
        cpu_avx512: crate::runtime::cpu_has_avx512(),
        cpu_winograd: crate::model::winograd::available(),
    }
}

/// The report for the facts `p`.
pub fn assess(p: &Probes) -> EngineReport {
    let gpu = p.cuda_devices > 0;
    let no_gpu = "needs a CUDA device; libtorch sees none here".to_string();
    let mut methods = Vec::new();
    for method in [Method::TrtFp16, Method::TrtTf32] {
        let (available, detail) = match (&p.tensorrt, gpu) {
            (Ok(lib), true) => (
                true,
                format!(
                    "TensorRT {lib}; runs once engines are built for the weights (`vista3d build-engines`)"
                ),
            ),
            (Ok(lib), false) => (false, format!("TensorRT {lib}, but it {no_gpu}")),
            (Err(e), _) => (false, e.message().to_string()),
        };
        methods.push(MethodAvailability {
            method,
            available,
            detail,
        });
    }
    methods.push(match &p.ort {
        Ok(lib) => MethodAvailability {
            method: Method::Ort,
            available: true,
            detail: format!(
                "ONNX Runtime {}; the export of the weights is made on first use in <cache_dir>/<fingerprint>/onnx",
                lib.display()
            ),
        },
        Err(e) => MethodAvailability {
            method: Method::Ort,
            available: false,
            detail: e.message().to_string(),
        },
    });
    for (method, what) in [
        (Method::Amp, "libtorch autocast to fp16"),
        (Method::Tf32, "libtorch fp32 with TF32 tensor cores"),
    ] {
        methods.push(MethodAvailability {
            method,
            available: gpu,
            detail: if gpu {
                format!("{what} on {} CUDA device(s)", p.cuda_devices)
            } else {
                format!("{what}: {no_gpu} (runs fp32 on the CPU)")
            },
        });
    }
    let native_bf16 = crate::runtime::cpu_has_native_bf16();
    methods.push(MethodAvailability {
        method: Method::Bf16,
        available: gpu || native_bf16,
        detail: match (gpu, native_bf16) {
            (true, _) => "libtorch autocast to bfloat16 on CUDA (and on this CPU)".into(),
            (false, true) => {
                "libtorch autocast to bfloat16 on this CPU (native bf16: avx512_bf16/amx_bf16)"
                    .into()
            }
            (false, false) => {
                "this CPU has no native bfloat16 and no GPU is visible (runs fp32)".into()
            }
        },
    });
    methods.push(MethodAvailability {
        method: Method::Fp32,
        available: true,
        detail: "libtorch fp32 (the reference), CPU and CUDA".into(),
    });
    let runs = |m: Method| methods.iter().any(|a| a.method == m && a.available);
    let auto_cpu = Method::auto_order(false, AutoCpu::Detect.prefers_ort(p.cpu_avx512))
        .iter()
        .copied()
        .find(|m| runs(*m) || !m.uses_engine())
        .unwrap_or(Method::Fp32);
    let auto_gpu = if gpu {
        Method::auto_order(true, false)
            .iter()
            .copied()
            .filter(|m| runs(*m))
            .collect()
    } else {
        Vec::new()
    };
    EngineReport {
        cuda_devices: p.cuda_devices,
        tensorrt_shim_compiled: p.shim_compiled,
        methods,
        auto_cpu,
        cpu_avx512: p.cpu_avx512,
        auto_cpu_winograd: auto_cpu == Method::Fp32 && !p.cpu_avx512 && p.cpu_winograd,
        auto_gpu,
    }
}

impl std::fmt::Display for EngineReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "CUDA devices: {}; TensorRT shim compiled: {}",
            self.cuda_devices,
            if self.tensorrt_shim_compiled {
                "yes"
            } else {
                "no"
            }
        )?;
        for m in &self.methods {
            writeln!(
                f,
                "  {:<9} {:<3} {}",
                m.method.name(),
                if m.available { "yes" } else { "no" },
                m.detail
            )?;
        }
        write!(
            f,
            "auto on the CPU: {}{} (auto_cpu = detect: ONNX Runtime only with AVX-512, which this CPU {})",
            self.auto_cpu,
            if self.auto_cpu_winograd {
                " with Winograd's 3x3x3 convolutions and fused instance norms (AVX2 and FMA)"
            } else {
                ""
            },
            if self.cpu_avx512 { "has" } else { "lacks" }
        )?;
        if !self.auto_gpu.is_empty() {
            let order: Vec<&str> = self.auto_gpu.iter().map(|m| m.name()).collect();
            write!(f, "; auto on a GPU tries: {}", order.join(", "))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(cuda_devices: usize, ort: bool, trt: bool) -> Probes {
        Probes {
            cpu_avx512: true,
            cpu_winograd: true,
            cuda_devices,
            ort: if ort {
                Ok(PathBuf::from("/x/libonnxruntime.so.1.31.1"))
            } else {
                Err(EngineError::Unavailable(
                    "ONNX Runtime not found: hint".into(),
                ))
            },
            tensorrt: if trt {
                Ok("10.13.0 at /y/libnvinfer.so.10".into())
            } else {
                Err(EngineError::Unavailable(
                    tensorrt::library::NO_SHIM.to_string(),
                ))
            },
            shim_compiled: trt,
        }
    }

    fn line(r: &EngineReport, m: Method) -> &MethodAvailability {
        r.methods.iter().find(|a| a.method == m).unwrap()
    }

    #[test]
    fn cpu_machines_run_ort_when_found_and_say_why_not_otherwise() {
        let r = assess(&facts(0, true, false));
        assert_eq!(r.auto_cpu, Method::Ort);
        assert!(r.auto_gpu.is_empty());
        assert!(line(&r, Method::Ort).available);
        assert!(line(&r, Method::Ort).detail.contains("libonnxruntime"));
        for m in [Method::TrtFp16, Method::TrtTf32] {
            assert!(!line(&r, m).available);
            assert!(
                line(&r, m).detail.contains("TENSORRT_INCLUDE_DIR"),
                "{:?}",
                line(&r, m)
            );
        }
        assert!(!line(&r, Method::Amp).available);
        assert!(line(&r, Method::Fp32).available);
        let r = assess(&facts(0, false, false));
        assert_eq!(r.auto_cpu, Method::Fp32);
        assert!(line(&r, Method::Ort).detail.contains("not found"));
        let text = r.to_string();
        assert!(
            text.contains("ort       no  ONNX Runtime not found"),
            "{text}"
        );
        assert!(text.contains("auto on the CPU: fp32 ("), "{text}");
        // ONNX Runtime found, but a CPU without AVX-512: libtorch fp32, and the report says why.
        let r = assess(&Probes {
            cpu_avx512: false,
            ..facts(0, true, false)
        });
        assert_eq!(r.auto_cpu, Method::Fp32);
        assert!(line(&r, Method::Ort).available);
        assert!(r.to_string().ends_with("which this CPU lacks)"), "{r}");
        assert!(r.to_string().contains("fp32 with Winograd's"), "{r}");
        // Neither AVX-512 nor AVX2/FMA: plain libtorch fp32.
        let r = assess(&Probes {
            cpu_avx512: false,
            cpu_winograd: false,
            ..facts(0, true, false)
        });
        assert!(
            r.to_string().contains("auto on the CPU: fp32 (auto_cpu"),
            "{r}"
        );
        // TensorRT installed but no GPU: named as such.
        let r = assess(&facts(0, true, true));
        assert!(!line(&r, Method::TrtFp16).available);
        assert!(line(&r, Method::TrtFp16)
            .detail
            .contains("needs a CUDA device"));
    }

    #[test]
    fn gpu_machines_try_tensorrt_then_amp() {
        let r = assess(&facts(1, true, true));
        assert_eq!(
            r.auto_gpu,
            vec![Method::TrtFp16, Method::TrtTf32, Method::Amp]
        );
        let r = assess(&facts(2, false, false));
        assert_eq!(r.auto_gpu, vec![Method::Amp]);
        assert!(line(&r, Method::Tf32).available);
        assert!(r.to_string().contains("auto on a GPU tries: amp"));
    }

    #[test]
    fn probing_this_machine_finds_onnx_runtime_without_environment() {
        // The test environment has ONNX Runtime beside libtorch and no GPU or TensorRT.
        let p = probe();
        let r = assess(&p);
        assert!(line(&r, Method::Ort).available, "{r}");
        assert_eq!(r.tensorrt_shim_compiled, tensorrt::shim_compiled());
        if p.tensorrt.is_err() {
            assert!(!line(&r, Method::TrtFp16).available);
        }
    }
}
