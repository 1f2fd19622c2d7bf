//! Which engine and which libtorch method serve a request: [`choose`] and its result [`EngineChoice`].
//!
//! The policy, by [`EngineErrorKind`] of the reason an engine cannot be opened:
//!
//! | asked for | engine unavailable | engine stale, corrupt or failing |
//! |---|---|---|
//! | `auto` | skipped quietly (debug log), not recorded: the next candidate runs | warned once per process and recorded as a [`Fallback`], then the next candidate |
//! | an explicit method | warned once and recorded | warned once and recorded |
//!
//! A libtorch method that acts only on CUDA (`amp`, `tf32`) asked for on a CPU runs fp32 and is recorded as an
//! unavailable fallback. [`choose`] never fails: the last resort is always a libtorch method.

use std::collections::HashSet;
use std::fmt;
use std::path::Path;
use std::sync::Mutex;

use super::onnx::MANIFEST_FILE;
use super::{
    ort_engine, tensorrt, AutoCpu, EngineContext, EngineError, EngineErrorKind, Method,
    WindowEngine,
};

/// One step down from what a request asked for: the method that did not run, why (its kind and message).
///
/// Records and logs show it as one line, `<method> <kind>: <reason>` (e.g. `trt_fp16 unavailable: TensorRT
/// needs a CUDA device; ...`, `ort stale: stale ONNX export in ...`); it serializes as that line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fallback {
    /// The method that did not (fully) run.
    pub method: Method,
    /// Why, by kind.
    pub kind: EngineErrorKind,
    /// The error's message.
    pub reason: String,
}

impl Fallback {
    /// The fallback of `method` for `error`.
    pub fn new(method: Method, error: &EngineError) -> Self {
        Self {
            method,
            kind: error.kind(),
            reason: error.message().to_string(),
        }
    }
}

impl fmt::Display for Fallback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.method, self.kind, self.reason)
    }
}

impl serde::Serialize for Fallback {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// What serves a request: the engine for the class path (if one opened), the libtorch method for the rest
/// (point prompts, and everything once the engine fails or when there is none), and every step down from the
/// requested method, in order.
pub struct EngineChoice {
    /// The engine that runs the class path, if one opened.
    pub engine: Option<Box<dyn WindowEngine>>,
    /// The libtorch method for point prompts, and for everything when `engine` is `None` or fails.
    pub torch: Method,
    /// Why the requested method does not run as asked (recorded in the request's report).
    pub fallbacks: Vec<Fallback>,
    /// Whether libtorch fp32 on the CPU uses Winograd's 3x3x3 convolutions (`auto` only, see
    /// [`AutoCpu::winograd`]).
    pub winograd: bool,
}

impl EngineChoice {
    /// Plain libtorch `torch`, nothing stepped down.
    pub fn torch(torch: Method) -> Self {
        Self {
            engine: None,
            torch,
            fallbacks: Vec::new(),
            winograd: false,
        }
    }

    /// The method that runs the class path: the engine's, else the libtorch method.
    pub fn method(&self) -> Method {
        self.engine.as_ref().map_or(self.torch, |e| e.method())
    }
}

impl fmt::Debug for EngineChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EngineChoice")
            .field("engine", &self.engine.as_ref().map(|e| e.method()))
            .field("torch", &self.torch)
            .field("fallbacks", &self.fallbacks)
            .field("winograd", &self.winograd)
            .finish()
    }
}

/// Opens the engine of `method` (an engine method) for the request described by `ctx`. The error's kind says
/// why it cannot run here (see [`EngineError`]).
pub fn open_engine(
    method: Method,
    ctx: &EngineContext,
) -> Result<Box<dyn WindowEngine>, EngineError> {
    match method {
        Method::Ort => {
            let threads = tch::get_num_threads().max(1) as usize;
            Ok(Box::new(ort_engine::OrtEngine::load(
                &ctx.onnx_dir,
                &ctx.weights_fingerprint,
                threads,
            )?))
        }
        Method::TrtFp16 | Method::TrtTf32 => Ok(Box::new(tensorrt::TrtEngine::load(ctx, method)?)),
        other => Err(EngineError::Unavailable(format!(
            "{other} is a libtorch method, not an engine"
        ))),
    }
}

/// The cheap check before an engine is tried: whether anything was exported (`ort`) or built (TensorRT) at
/// all, so that a caller can refuse before hashing the weights for an [`EngineContext`]. Missing is
/// [`EngineError::Unavailable`] naming the command that makes it; libtorch methods always pass. TensorRT
/// engines run from their sidecars alone: the ONNX export they were built from is not needed.
pub fn artifacts_present(
    method: Method,
    onnx_dir: &Path,
    engines_dir: &Path,
) -> Result<(), EngineError> {
    if method == Method::Ort {
        let manifest = onnx_dir.join(MANIFEST_FILE);
        if !manifest.is_file() {
            return Err(EngineError::Unavailable(format!(
                "no ONNX export: {} not found (run `vista3d export-onnx --checkpoint ... --out {}`)",
                manifest.display(),
                onnx_dir.display()
            )));
        }
    }
    if method.is_tensorrt() && !engines_dir.is_dir() {
        return Err(EngineError::Unavailable(format!(
            "no TensorRT engines: {} not found (run `vista3d build-engines --onnx {} --out {}`)",
            engines_dir.display(),
            onnx_dir.display(),
            engines_dir.display()
        )));
    }
    Ok(())
}

/// The engine (if any) and the libtorch method that serve a request for `requested`, with every step down
/// recorded under the policy of the module documentation. Never fails. `ctx` is asked only when the engine of a
/// method is tried (the caller may hash the weights lazily there, or refuse early, e.g. with
/// [`artifacts_present`]).
pub fn choose(
    requested: Method,
    cuda: bool,
    auto_cpu: AutoCpu,
    ctx: &mut dyn FnMut(Method) -> Result<EngineContext, EngineError>,
) -> EngineChoice {
    choose_with(requested, cuda, auto_cpu, &mut |m| {
        ctx(m).and_then(|c| open_engine(m, &c))
    })
}

/// [`choose`] with the engine opener given (tests use fakes).
fn choose_with(
    requested: Method,
    cuda: bool,
    auto_cpu: AutoCpu,
    open: &mut dyn FnMut(Method) -> Result<Box<dyn WindowEngine>, EngineError>,
) -> EngineChoice {
    let mut fallbacks = Vec::new();
    let candidates: Vec<Method> = match requested {
        Method::Auto => {
            Method::auto_order(cuda, auto_cpu.prefers_ort(crate::runtime::cpu_has_avx512()))
                .to_vec()
        }
        m => vec![m],
    };
    for m in candidates {
        if m.uses_engine() {
            match open(m) {
                Ok(engine) => {
                    return EngineChoice {
                        engine: Some(engine),
                        torch: m.torch_fallback(cuda),
                        fallbacks,
                        winograd: false,
                    }
                }
                Err(e) => {
                    let fallback = Fallback::new(m, &e);
                    if requested == Method::Auto && e.is_unavailable() {
                        log::debug!("auto: {fallback}");
                    } else {
                        warn_once(&format!(
                            "{fallback}; running {} instead",
                            if requested == Method::Auto {
                                "the next method".to_string()
                            } else {
                                format!("libtorch {}", m.torch_fallback(cuda))
                            }
                        ));
                        fallbacks.push(fallback);
                    }
                }
            }
        } else if !cuda
            && (matches!(m, Method::Amp | Method::Tf32)
                || (m == Method::Bf16 && !crate::runtime::cpu_has_native_bf16()))
        {
            let reason = if m == Method::Bf16 {
                "this CPU has no native bfloat16 (avx512_bf16 or amx_bf16): emulated bf16 is slower than fp32; \
                 running fp32"
            } else {
                "acts only on CUDA devices; running fp32 on the CPU"
            };
            let fallback = Fallback {
                method: m,
                kind: EngineErrorKind::Unavailable,
                reason: reason.into(),
            };
            warn_once(&fallback.to_string());
            fallbacks.push(fallback);
            return EngineChoice {
                engine: None,
                torch: Method::Fp32,
                fallbacks,
                winograd: false,
            };
        } else {
            // `auto` ends here on a CPU with libtorch fp32: Winograd's convolutions where `auto_cpu` says so.
            let winograd = requested == Method::Auto
                && !cuda
                && m == Method::Fp32
                && auto_cpu.winograd(crate::runtime::cpu_has_avx512());
            return EngineChoice {
                engine: None,
                torch: m,
                fallbacks,
                winograd,
            };
        }
    }
    // Only an explicit engine method gets here (`auto` always ends with a libtorch method).
    EngineChoice {
        engine: None,
        torch: requested.torch_fallback(cuda),
        fallbacks,
        winograd: false,
    }
}

/// Logs `message` as a warning the first time this process sees it (a request served by a cached choice does
/// not warn again; its record still lists the fallback).
fn warn_once(message: &str) {
    static WARNED: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    let first = match WARNED.lock() {
        Ok(mut seen) => seen
            .get_or_insert_with(HashSet::new)
            .insert(message.to_string()),
        Err(_) => true,
    };
    if first {
        log::warn!("{message}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Tensor};

    /// An engine that is never run: choosing only looks at its method.
    struct Opened(Method);

    impl WindowEngine for Opened {
        fn method(&self) -> Method {
            self.0
        }
        fn encode(&mut self, image: &Tensor) -> Result<Tensor, EngineError> {
            Ok(image.shallow_clone())
        }
        fn classify(&mut self, f: &Tensor, _: &Tensor) -> Result<Tensor, EngineError> {
            Ok(f.shallow_clone())
        }
    }

    /// An opener where each engine method fails with the given error, or opens when it has none.
    fn opener(
        errors: Vec<(Method, EngineError)>,
        tried: &mut Vec<Method>,
    ) -> impl FnMut(Method) -> Result<Box<dyn WindowEngine>, EngineError> + '_ {
        move |m| {
            tried.push(m);
            match errors.iter().find(|(em, _)| *em == m) {
                Some((_, e)) => Err(e.clone()),
                None => Ok(Box::new(Opened(m))),
            }
        }
    }

    fn all_fail(kind: fn(String) -> EngineError) -> Vec<(Method, EngineError)> {
        [Method::TrtFp16, Method::TrtTf32, Method::Ort]
            .into_iter()
            .map(|m| (m, kind(format!("{m} says no"))))
            .collect()
    }

    #[test]
    fn auto_skips_unavailable_engines_without_recording_them() {
        let mut tried = Vec::new();
        let c = choose_with(
            Method::Auto,
            true,
            AutoCpu::Ort,
            &mut opener(all_fail(EngineError::Unavailable), &mut tried),
        );
        assert!(c.engine.is_none());
        assert_eq!(c.torch, Method::Amp);
        assert!(c.fallbacks.is_empty(), "{:?}", c.fallbacks);
        assert_eq!(tried, vec![Method::TrtFp16, Method::TrtTf32]);
        // On a CPU: ONNX Runtime, then fp32.
        let mut tried = Vec::new();
        let c = choose_with(
            Method::Auto,
            false,
            AutoCpu::Ort,
            &mut opener(all_fail(EngineError::Unavailable), &mut tried),
        );
        assert_eq!((c.torch, c.fallbacks.len()), (Method::Fp32, 0));
        assert_eq!(tried, vec![Method::Ort]);
        // With auto_cpu = fp32 (or detect on a CPU without AVX-512) no engine is asked for.
        let mut tried = Vec::new();
        let c = choose_with(
            Method::Auto,
            false,
            AutoCpu::Fp32,
            &mut opener(Vec::new(), &mut tried),
        );
        assert!(c.engine.is_none());
        assert_eq!((c.torch, c.fallbacks.len()), (Method::Fp32, 0));
        assert!(tried.is_empty());
        // An explicit `ort` is tried whatever auto_cpu says.
        let c = choose_with(
            Method::Ort,
            false,
            AutoCpu::Fp32,
            &mut opener(Vec::new(), &mut tried),
        );
        assert_eq!(c.method(), Method::Ort);
    }

    #[test]
    fn only_auto_on_a_cpu_takes_winograd_convolutions() {
        let mut tried = Vec::new();
        let mut open = opener(Vec::new(), &mut tried);
        let available = crate::model::winograd::available();
        // auto_cpu = winograd: where the CPU can.
        let c = choose_with(Method::Auto, false, AutoCpu::Winograd, &mut open);
        assert_eq!((c.torch, c.winograd), (Method::Fp32, available));
        // The reference (fp32 asked for, or auto_cpu = fp32) and GPUs keep libtorch's convolutions.
        for (requested, cuda, auto_cpu) in [
            (Method::Fp32, false, AutoCpu::Winograd),
            (Method::Auto, false, AutoCpu::Fp32),
            (Method::Auto, true, AutoCpu::Winograd),
            (Method::Bf16, false, AutoCpu::Winograd),
        ] {
            let c = choose_with(requested, cuda, auto_cpu, &mut open);
            assert!(!c.winograd, "{requested} cuda {cuda} {auto_cpu}");
        }
        // Detect: only where ONNX Runtime is not preferred (no AVX-512).
        let c = choose_with(Method::Auto, false, AutoCpu::Detect, &mut open);
        assert_eq!(
            c.winograd,
            available && !crate::runtime::cpu_has_avx512() && c.engine.is_none()
        );
    }

    #[test]
    fn auto_records_stale_corrupt_and_failing_engines_and_goes_on() {
        for kind in [
            EngineError::Stale as fn(String) -> EngineError,
            EngineError::Corrupt,
            EngineError::Runtime,
        ] {
            let mut tried = Vec::new();
            let c = choose_with(
                Method::Auto,
                true,
                AutoCpu::Ort,
                &mut opener(all_fail(kind), &mut tried),
            );
            assert_eq!(c.torch, Method::Amp);
            let expected = kind(String::new()).kind();
            assert_eq!(
                c.fallbacks
                    .iter()
                    .map(|f| (f.method, f.kind))
                    .collect::<Vec<_>>(),
                vec![(Method::TrtFp16, expected), (Method::TrtTf32, expected)]
            );
            assert_eq!(
                c.fallbacks[0].to_string(),
                format!("trt_fp16 {expected}: trt_fp16 says no")
            );
        }
        // A stale fp16 engine is recorded, the tf32 one that opens is used.
        let mut tried = Vec::new();
        let c = choose_with(
            Method::Auto,
            true,
            AutoCpu::Ort,
            &mut opener(
                vec![(Method::TrtFp16, EngineError::Stale("other weights".into()))],
                &mut tried,
            ),
        );
        assert_eq!(c.method(), Method::TrtTf32);
        assert_eq!(c.torch, Method::Tf32);
        assert_eq!(c.fallbacks.len(), 1);
        assert_eq!(c.fallbacks[0].kind, EngineErrorKind::Stale);
        // Mixed: the unavailable one is not recorded, the corrupt one is.
        let mut tried = Vec::new();
        let c = choose_with(
            Method::Auto,
            true,
            AutoCpu::Ort,
            &mut opener(
                vec![
                    (
                        Method::TrtFp16,
                        EngineError::Unavailable("no TensorRT".into()),
                    ),
                    (
                        Method::TrtTf32,
                        EngineError::Corrupt("truncated plan".into()),
                    ),
                ],
                &mut tried,
            ),
        );
        assert_eq!(c.torch, Method::Amp);
        assert_eq!(c.fallbacks.len(), 1);
        assert_eq!(c.fallbacks[0].method, Method::TrtTf32);
        assert_eq!(c.fallbacks[0].kind, EngineErrorKind::Corrupt);
    }

    #[test]
    fn explicit_methods_record_every_step_down() {
        for kind in [
            EngineError::Unavailable as fn(String) -> EngineError,
            EngineError::Stale,
            EngineError::Corrupt,
            EngineError::Runtime,
        ] {
            let mut tried = Vec::new();
            let c = choose_with(
                Method::TrtFp16,
                true,
                AutoCpu::Ort,
                &mut opener(all_fail(kind), &mut tried),
            );
            assert!(c.engine.is_none());
            assert_eq!(c.torch, Method::Amp);
            assert_eq!(c.fallbacks.len(), 1);
            assert_eq!(c.fallbacks[0].kind, kind(String::new()).kind());
            let mut tried = Vec::new();
            let c = choose_with(
                Method::Ort,
                false,
                AutoCpu::Ort,
                &mut opener(all_fail(kind), &mut tried),
            );
            assert_eq!((c.torch, c.fallbacks.len()), (Method::Fp32, 1));
            assert_eq!(tried, vec![Method::Ort]);
        }
        // An engine that opens: no fallbacks, its libtorch partner for point prompts.
        let mut tried = Vec::new();
        let c = choose_with(
            Method::TrtTf32,
            true,
            AutoCpu::Ort,
            &mut opener(Vec::new(), &mut tried),
        );
        assert_eq!(c.method(), Method::TrtTf32);
        assert_eq!((c.torch, c.fallbacks.len()), (Method::Tf32, 0));
        // amp on a CPU runs fp32 and says so; no engine is asked for.
        let mut tried = Vec::new();
        let c = choose_with(
            Method::Amp,
            false,
            AutoCpu::Ort,
            &mut opener(Vec::new(), &mut tried),
        );
        assert_eq!((c.torch, c.fallbacks.len()), (Method::Fp32, 1));
        assert!(c.fallbacks[0].to_string().contains("only on CUDA"));
        assert!(tried.is_empty());
        let c = choose_with(
            Method::Fp32,
            true,
            AutoCpu::Ort,
            &mut opener(Vec::new(), &mut tried),
        );
        assert_eq!((c.torch, c.fallbacks.len()), (Method::Fp32, 0));
        assert!(tried.is_empty());
    }

    #[test]
    fn choose_asks_the_context_only_for_engine_methods_and_never_fails() {
        let mut asked = Vec::new();
        let mut ctx = |m: Method| -> Result<EngineContext, EngineError> {
            asked.push(m);
            Err(EngineError::Unavailable("no ONNX export in onnx/".into()))
        };
        let c = choose(Method::TrtFp16, true, AutoCpu::Ort, &mut ctx);
        assert!(c.engine.is_none());
        assert_eq!(c.torch, Method::Amp);
        assert!(c.fallbacks[0]
            .to_string()
            .starts_with("trt_fp16 unavailable: no ONNX export"));
        let c = choose(Method::Tf32, true, AutoCpu::Ort, &mut ctx);
        assert_eq!((c.torch, c.fallbacks.len()), (Method::Tf32, 0));
        assert_eq!(asked, vec![Method::TrtFp16]);
        // A real context on the CPU: TensorRT is unavailable there, whatever is installed.
        let dir = tempfile::tempdir().unwrap();
        let real = EngineContext {
            onnx_dir: dir.path().join("onnx"),
            engines_dir: dir.path().join("engines"),
            weights_fingerprint: "0123456789abcdef".into(),
            device: Device::Cpu,
            patch_size: [32, 32, 32],
            max_prompt_size: 4,
            sw_batch_size: 1,
        };
        let c = choose(Method::TrtTf32, false, AutoCpu::Ort, &mut |_| {
            Ok(real.clone())
        });
        assert_eq!(c.torch, Method::Fp32);
        assert_eq!(c.fallbacks[0].kind, EngineErrorKind::Unavailable);
        let err = open_engine(Method::Amp, &real)
            .err()
            .expect("not an engine");
        assert!(err.is_unavailable());
    }

    #[test]
    fn fallbacks_serialize_as_their_line() {
        let f = Fallback::new(
            Method::Ort,
            &EngineError::Stale("stale ONNX export in x".into()),
        );
        assert_eq!(
            serde_json::to_value(&f).unwrap(),
            serde_json::json!("ort stale: stale ONNX export in x")
        );
    }

    #[test]
    fn missing_artifacts_are_unavailable_before_anything_is_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let (onnx, engines) = (dir.path().join("onnx"), dir.path().join("engines"));
        assert!(artifacts_present(Method::Fp32, &onnx, &engines).is_ok());
        let err = artifacts_present(Method::Ort, &onnx, &engines).unwrap_err();
        assert!(err.is_unavailable());
        assert!(err.to_string().contains("manifest.json"), "{err}");
        std::fs::create_dir_all(&onnx).unwrap();
        std::fs::write(onnx.join(MANIFEST_FILE), b"{}").unwrap();
        assert!(artifacts_present(Method::Ort, &onnx, &engines).is_ok());
        let err = artifacts_present(Method::TrtFp16, &onnx, &engines).unwrap_err();
        assert!(err.to_string().contains("no TensorRT engines"), "{err}");
        std::fs::create_dir_all(&engines).unwrap();
        assert!(artifacts_present(Method::TrtFp16, &onnx, &engines).is_ok());
        // Engines need no export beside them.
        std::fs::remove_dir_all(&onnx).unwrap();
        assert!(artifacts_present(Method::TrtTf32, &onnx, &engines).is_ok());
    }
}
