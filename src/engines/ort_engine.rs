//! ONNX Runtime engine ([`Method::Ort`]): runs the exported `encoder.onnx` and `class_head.onnx` on the CPU
//! execution provider. ONNX Runtime is loaded at run time (the `load-dynamic` build of the `ort` crate) from the
//! first of [`crate::runtime::onnxruntime_candidates`] that exists: `ORT_DYLIB_PATH`, then beside the libtorch
//! the binary runs against (the same Python environment), then the install prefix; so the program builds and
//! runs without it and reports it unavailable, with how to get it, when it is asked for and missing. Loading
//! classifies every refusal as an [`EngineError`] kind.
//!
//! Sessions are tuned for the one-window-at-a-time workload ([`session_options`]): all graph optimisations,
//! `threads` intra-op threads and one inter-op thread (sequential execution), and neither the CPU memory arena nor
//! memory patterns: both keep the largest window's activations reserved for the process's life (measured on one
//! 128^3 window of "everything" at width 8: 3.27 GB peak with them, 1.90 GB without, 21.5 s vs 22.4 s), which
//! would sit on top of the stitching sums of a large CT.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{ensure, Result};
use ort::environment::Environment;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use tch::{Device, Kind, Tensor};

use super::onnx::{FloatType, ModelEntry, OnnxManifest, TensorSpec};
use super::{EngineError, Method, WindowEngine};
use crate::fsutil::sha256_file;
use crate::model::Vista3d;
use crate::numerics::relative_error;

/// The process's ONNX Runtime environment (ONNX Runtime allows one per process), made on first use.
static ORT_ENV: Mutex<Option<Environment>> = Mutex::new(None);

/// How to get ONNX Runtime, appended to "not found" errors.
const ORT_HINT: &str = "install ONNX Runtime 1.31 into the Python environment of the libtorch vista3d runs \
    against (`pip install onnxruntime==1.31.1`; scripts/setup.sh does), or set ORT_DYLIB_PATH to its \
    libonnxruntime.so (<site-packages>/onnxruntime/capi/libonnxruntime.so.1.31.1)";

/// The ONNX Runtime library this process uses: the first of [`crate::runtime::onnxruntime_candidates`] that
/// exists (`ORT_DYLIB_PATH` wins when set: a set variable naming a missing file is an error, not skipped).
pub fn ort_library() -> Result<PathBuf, EngineError> {
    let from_env = std::env::var_os("ORT_DYLIB_PATH")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from);
    if let Some(path) = from_env {
        return if path.is_file() {
            Ok(path)
        } else {
            Err(EngineError::Unavailable(format!(
                "ONNX Runtime not found: ORT_DYLIB_PATH={} does not exist; {ORT_HINT}",
                path.display()
            )))
        };
    }
    let candidates = crate::runtime::onnxruntime_candidates();
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| {
            EngineError::Unavailable(format!(
                "ONNX Runtime not found: ORT_DYLIB_PATH is not set and there is no libonnxruntime.so beside \
                 libtorch ({}) or in the install prefix; {ORT_HINT}",
                crate::runtime::libtorch_dir()
                    .map_or_else(|| "libtorch's folder unknown".into(), |d| d.display().to_string())
            ))
        })
}

/// Loads ONNX Runtime ([`ort_library`], once per process) and returns its environment. Errors, never panics,
/// when no library is found or it is not a usable ONNX Runtime >= 1.31: all [`EngineError::Unavailable`].
pub fn ort_environment() -> Result<Environment, EngineError> {
    let mut env = ORT_ENV.lock().map_err(|_| {
        EngineError::Unavailable(
            "ONNX Runtime initialisation failed earlier in this process".into(),
        )
    })?;
    if let Some(e) = env.as_ref() {
        return Ok(e.clone());
    }
    let path = ort_library()?;
    let built = ort::init_from(&path)
        .map_err(|e| {
            EngineError::Unavailable(format!(
                "ONNX Runtime not usable: {}: {e}; {ORT_HINT}",
                path.display()
            ))
        })?
        .with_name("vista3d")
        .build()
        .map_err(|e| {
            EngineError::Unavailable(format!(
                "cannot create an ONNX Runtime environment from {}: {e}",
                path.display()
            ))
        })?;
    log::debug!("ONNX Runtime loaded from {}", path.display());
    *env = Some(built.clone());
    Ok(built)
}

/// The session options of every engine session: all graph optimisations (constant folding, node fusions, layout
/// transformations), `threads` intra-op threads (0: ONNX Runtime's default, one per core) with one inter-op
/// thread and sequential execution (the graphs are chains); no CPU memory arena and no memory-pattern planning, so
/// that activations are returned after each window instead of staying reserved (see the module's note).
fn session_options(
    env: &Environment,
    threads: usize,
) -> ort::Result<ort::session::builder::SessionBuilder> {
    let mut builder = Session::builder(env)?
        .with_optimization_level(GraphOptimizationLevel::All)?
        .with_parallel_execution(false)?
        .with_inter_threads(1)?
        .with_memory_pattern(false)?
        .with_execution_providers([ort::ep::CPU::default().with_arena_allocator(false).build()])?;
    if threads > 0 {
        builder = builder.with_intra_threads(threads)?;
    }
    Ok(builder)
}

/// Checks an exported file against its manifest entry (present, same size, same sha256); every mismatch is
/// [`EngineError::Corrupt`].
fn check_file(dir: &Path, entry: &ModelEntry) -> Result<PathBuf, EngineError> {
    let path = dir.join(&entry.file);
    let corrupt = |what: String| {
        EngineError::Corrupt(format!(
            "corrupt ONNX export: {} {what} (re-run `vista3d export-onnx`)",
            path.display()
        ))
    };
    let meta = std::fs::metadata(&path).map_err(|_| corrupt("is missing".into()))?;
    if meta.len() != entry.bytes {
        return Err(corrupt(format!(
            "has {} bytes, the manifest says {}",
            meta.len(),
            entry.bytes
        )));
    }
    let sha = sha256_file(&path).map_err(|e| corrupt(format!("cannot be read: {e:#}")))?;
    if sha != entry.sha256 {
        return Err(corrupt(
            "does not match its sha256 in the manifest".to_string(),
        ));
    }
    Ok(path)
}

/// A CPU session on one exported file, checked to have the manifest's input and output names. A file ONNX
/// Runtime refuses, or whose interface differs from the manifest's, is [`EngineError::Corrupt`].
fn open_session(
    env: &Environment,
    dir: &Path,
    entry: &ModelEntry,
    threads: usize,
) -> Result<Session, EngineError> {
    let path = check_file(dir, entry)?;
    let what = |e: &dyn std::fmt::Display| {
        format!("cannot load {} into ONNX Runtime: {e}", path.display())
    };
    let mut builder = session_options(env, threads).map_err(|e| EngineError::Runtime(what(&e)))?;
    let session = builder
        .commit_from_file(&path)
        .map_err(|e| EngineError::Corrupt(what(&e)))?;
    let names = |outlets: &[ort::value::Outlet]| -> Vec<String> {
        outlets.iter().map(|o| o.name().to_string()).collect()
    };
    let want =
        |specs: &[TensorSpec]| -> Vec<String> { specs.iter().map(|s| s.name.clone()).collect() };
    if names(session.inputs()) != want(&entry.inputs)
        || names(session.outputs()) != want(&entry.outputs)
    {
        return Err(EngineError::Corrupt(format!(
            "{}: inputs {:?} / outputs {:?} differ from the manifest's",
            path.display(),
            names(session.inputs()),
            names(session.outputs())
        )));
    }
    Ok(session)
}

/// The class path on ONNX Runtime (CPU), from an export directory made by `vista3d export-onnx`.
pub struct OrtEngine {
    encoder: Session,
    class_head: Session,
    manifest: OnnxManifest,
    dir: PathBuf,
}

impl OrtEngine {
    /// Opens the float32 models of `onnx_dir` for the model whose
    /// [`weights_fingerprint`](super::fingerprint::weights_fingerprint) is `expected_fingerprint`, with `threads`
    /// intra-op threads (0: ONNX Runtime's default). Errors are classified as [`EngineError`] documents: no ONNX
    /// Runtime or no export is unavailable, an export of other weights stale, a damaged one corrupt.
    pub fn load(
        onnx_dir: &Path,
        expected_fingerprint: &str,
        threads: usize,
    ) -> Result<OrtEngine, EngineError> {
        Self::load_models(onnx_dir, expected_fingerprint, threads, FloatType::F32)
    }

    /// As [`OrtEngine::load`], on the export's models of `float_type` (the float16 models of an export that has
    /// none are [`EngineError::Stale`]: an older export). Inputs and outputs are float32 either way.
    pub fn load_models(
        onnx_dir: &Path,
        expected_fingerprint: &str,
        threads: usize,
        float_type: FloatType,
    ) -> Result<OrtEngine, EngineError> {
        let env = ort_environment()?;
        let manifest = OnnxManifest::read(onnx_dir)?;
        manifest.check_fingerprint(onnx_dir, expected_fingerprint)?;
        let (encoder, class_head) = manifest.models(float_type).ok_or_else(|| {
            EngineError::Stale(format!(
                "the ONNX export in {} has no {float_type} models (re-run `vista3d export-onnx`)",
                onnx_dir.display()
            ))
        })?;
        let encoder = open_session(&env, onnx_dir, encoder, threads)?;
        let class_head = open_session(&env, onnx_dir, class_head, threads)?;
        Ok(OrtEngine {
            encoder,
            class_head,
            manifest,
            dir: onnx_dir.to_path_buf(),
        })
    }

    /// The manifest of the loaded export.
    pub fn manifest(&self) -> &OnnxManifest {
        &self.manifest
    }

    /// The export directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// A tch tensor as an ONNX Runtime tensor of element type `T` (copied through a flat CPU buffer).
fn to_ort<T>(t: &Tensor, kind: Kind) -> Result<ort::value::Tensor<T>, EngineError>
where
    T: ort::value::PrimitiveTensorElementType
        + tch::kind::Element
        + Clone
        + std::fmt::Debug
        + 'static,
{
    let t = t
        .detach()
        .f_to_device(Device::Cpu)?
        .f_to_kind(kind)?
        .f_contiguous()?;
    let shape = t.size();
    let numel = t.numel();
    let mut data = vec![T::ZERO; numel];
    t.f_copy_data(&mut data, numel)?;
    ort::value::Tensor::from_array((shape, data))
        .map_err(|e| EngineError::Runtime(format!("cannot make an ONNX Runtime tensor: {e}")))
}

/// Runs `session` on named inputs and returns its one f32 output `output` as a tch tensor on `device`.
fn run_one(
    session: &mut Session,
    inputs: Vec<(&'static str, ort::value::DynValue)>,
    output: &str,
    device: Device,
) -> Result<Tensor, EngineError> {
    let inputs: Vec<(
        std::borrow::Cow<'static, str>,
        ort::session::SessionInputValue<'_>,
    )> = inputs
        .into_iter()
        .map(|(n, v)| (n.into(), v.into()))
        .collect();
    let outputs = session
        .run(inputs)
        .map_err(|e| EngineError::Runtime(format!("ONNX Runtime failed: {e}")))?;
    let value = outputs
        .get(output)
        .ok_or_else(|| EngineError::Runtime(format!("ONNX Runtime returned no '{output}'")))?;
    let (shape, data) = value
        .try_extract_tensor::<f32>()
        .map_err(|e| EngineError::Runtime(format!("ONNX Runtime output '{output}': {e}")))?;
    let dims: Vec<i64> = shape.iter().copied().collect();
    Ok(Tensor::f_from_slice(data)?
        .f_view(dims.as_slice())?
        .f_to_device(device)?)
}

/// An [`EngineError::Runtime`] unless `ok` (a bad input to an engine is a failure while running).
fn check_input(ok: bool, message: impl FnOnce() -> String) -> Result<(), EngineError> {
    if ok {
        Ok(())
    } else {
        Err(EngineError::Runtime(message()))
    }
}

impl WindowEngine for OrtEngine {
    fn method(&self) -> Method {
        Method::Ort
    }

    fn encode(&mut self, image: &Tensor) -> Result<Tensor, EngineError> {
        let size = image.size();
        check_input(size.len() == 5, || {
            format!("ONNX Runtime encoder: image must be [b, C, H, W, D], got {size:?}")
        })?;
        let input = to_ort::<f32>(image, Kind::Float)?.into_dyn();
        run_one(
            &mut self.encoder,
            vec![("image", input)],
            "features",
            image.device(),
        )
    }

    fn classifies_slabs(&self) -> bool {
        true
    }

    fn classify(&mut self, features: &Tensor, class_ids: &Tensor) -> Result<Tensor, EngineError> {
        let (f, c) = (features.size(), class_ids.size());
        let embed_dim = self.manifest.embed_dim;
        check_input(f.len() == 5 && f[1] == embed_dim, || {
            format!(
                "ONNX Runtime class head: features must be [b, {embed_dim}, H, W, D], got {f:?}"
            )
        })?;
        check_input(c.len() == 2 && c[1] == 1 && c[0] > 0, || {
            format!("ONNX Runtime class head: class ids must be [B, 1] with B >= 1, got {c:?}")
        })?;
        let ids_cpu = class_ids.f_to_device(Device::Cpu)?.f_to_kind(Kind::Int64)?;
        let (lo, hi) = (
            ids_cpu.f_min()?.f_int64_value(&[])?,
            ids_cpu.f_max()?.f_int64_value(&[])?,
        );
        let n_classes = self.manifest.n_classes;
        check_input(lo >= 0 && hi < n_classes, || {
            format!("ONNX Runtime class head: class ids must be in 0..{n_classes}, got {lo}..={hi}")
        })?;
        let features_in = to_ort::<f32>(features, Kind::Float)?.into_dyn();
        let ids = to_ort::<i64>(&ids_cpu, Kind::Int64)?.into_dyn();
        run_one(
            &mut self.class_head,
            vec![("features", features_in), ("class_ids", ids)],
            "logits",
            features.device(),
        )
    }
}

/// Relative errors of ONNX Runtime against libtorch on one seeded random window `[1, 1, size^3]`: encoder
/// (mapped) features, and class-head logits for `class_ids` (see [`super::split`]).
pub fn compare_with_torch(
    net: &Vista3d,
    engine: &mut OrtEngine,
    size: i64,
    class_ids: &[i64],
) -> Result<(f64, f64)> {
    ensure!(
        size > 0 && size % crate::model::SHAPE_FACTOR == 0,
        "window size must be a positive multiple of {}",
        crate::model::SHAPE_FACTOR
    );
    tch::manual_seed(0);
    let image = Tensor::randn(
        [1, net.config.in_channels, size, size, size],
        (Kind::Float, Device::Cpu),
    );
    let ids = Tensor::from_slice(class_ids).view([-1, 1]);
    let (torch_features, torch_logits) = tch::no_grad(|| -> Result<(Tensor, Tensor)> {
        let features = super::split::encode(net, &image)?;
        let logits = super::split::classify(net, &features, &ids);
        Ok((features, logits))
    })?;
    let features = engine.encode(&image)?;
    let logits = engine.classify(&torch_features, &ids)?;
    ensure!(
        features.size() == torch_features.size() && logits.size() == torch_logits.size(),
        "ONNX Runtime shapes {:?}/{:?} differ from libtorch {:?}/{:?}",
        features.size(),
        logits.size(),
        torch_features.size(),
        torch_logits.size()
    );
    Ok((
        relative_error(&features, &torch_features),
        relative_error(&logits, &torch_logits),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_can_move_between_threads() {
        fn assert_send<T: Send>() {}
        assert_send::<OrtEngine>();
    }
}
