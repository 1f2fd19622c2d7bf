//! `vista3d build-engines`: TensorRT engines from the exported ONNX models, cached by key (see [`super::cache`]).
//!
//! The export is read through its manifest ([`OnnxManifest`], the same reader ONNX Runtime uses); every ONNX
//! file is checked against the manifest's size before TensorRT is loaded and against its sha256 before it is
//! compiled (the hash is reused from an engine's sidecar when the file's size and mtime are unchanged).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context as _, Result};

use super::cache::{
    candidates, check_engine, precision_name, superseded, EngineKey, EngineProfile, Freshness,
    OnnxStat, Part, Platform, Sidecar,
};
use super::cuda::CudaDevice;
use super::engine::{onnx_source, OnnxSource};
use super::library::{Builder, TrtLibrary};
use crate::engines::onnx::OnnxManifest;
use crate::engines::{EngineError, Method};
use crate::fsutil::write_atomic;

/// The timing cache shared by all builds in an engines folder.
pub const TIMING_CACHE: &str = "timing.cache";

/// What to build.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildOptions {
    /// Folder with `manifest.json`, `encoder.onnx`, `class_head.onnx` (and their float16 variants).
    pub onnx_dir: PathBuf,
    /// Where plans, sidecars and the timing cache go.
    pub out_dir: PathBuf,
    /// [`Method::TrtFp16`] and/or [`Method::TrtTf32`] (`--precision fp16,tf32`, see
    /// [`parse_methods`](super::cache::parse_methods)).
    pub methods: Vec<Method>,
    /// Most prompts per class-head call (the bundle's `max_prompt_size`, 4).
    pub max_prompt_size: i64,
    /// The window size (the bundle's `patch_size`, 128^3).
    pub patch: [i64; 3],
    /// Most windows per call (the bundle's `sw_batch_size`, 1).
    pub sw_batch_size: i64,
    /// CUDA device index.
    pub device: usize,
    /// TensorRT builder optimisation level 0..=5 (3 is TensorRT's default; MONAI's trt_compile uses 5).
    pub optimization_level: i32,
}

impl BuildOptions {
    /// Checks the settings before anything is loaded.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            !self.methods.is_empty(),
            "no precision given: use --precision fp16,tf32"
        );
        if let Some(m) = self.methods.iter().find(|m| !m.is_tensorrt()) {
            bail!("{m} is not a TensorRT precision: use fp16 or tf32");
        }
        ensure!(
            (0..=5).contains(&self.optimization_level),
            "--optimization-level must be 0..5, got {}",
            self.optimization_level
        );
        for part in Part::ALL {
            EngineProfile::new(part, self.patch, self.sw_batch_size, self.max_prompt_size)?;
        }
        Ok(())
    }
}

/// Parses `--patch 128,128,128` (or a single number for a cube).
pub fn parse_patch(text: &str) -> Result<[i64; 3]> {
    let values: Vec<i64> = text
        .split(',')
        .map(|s| s.trim().parse::<i64>())
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("--patch must be H,W,D (e.g. 128,128,128), got '{text}'"))?;
    let patch = match values[..] {
        [s] => [s, s, s],
        [h, w, d] => [h, w, d],
        _ => bail!("--patch must be H,W,D (e.g. 128,128,128), got '{text}'"),
    };
    ensure!(
        patch.iter().all(|&s| s > 0),
        "--patch sizes must be positive, got '{text}'"
    );
    Ok(patch)
}

/// What happened to one engine.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildOutcome {
    pub part: Part,
    pub method: Method,
    /// The plan file (on success).
    pub plan: Option<PathBuf>,
    pub status: BuildStatus,
}

/// Built, already up to date, or failed (the other engines are still attempted).
#[derive(Debug, Clone, PartialEq)]
pub enum BuildStatus {
    UpToDate,
    Built { seconds: f64, bytes: u64 },
    Failed(String),
}

/// Builds (or keeps) the encoder and class-head engines of every precision. Fails before writing anything when
/// the manifest, TensorRT or the GPU is missing; a failing engine is reported in its outcome and the others are
/// still built.
pub fn build_engines(opts: &BuildOptions) -> Result<Vec<BuildOutcome>> {
    opts.validate()?;
    let manifest = OnnxManifest::read(&opts.onnx_dir)?;
    for &method in &opts.methods {
        for part in Part::ALL {
            check_present(&onnx_source(&manifest, &opts.onnx_dir, part, method)?)?;
        }
    }
    let library = TrtLibrary::load().context("cannot build TensorRT engines")?;
    let gpu = CudaDevice::open(opts.device).context("cannot build TensorRT engines")?;
    log::info!(
        "building with TensorRT {} ({}) on {} (GPU {}, sm {})",
        library.version(),
        library.nvinfer_path().display(),
        gpu.name(),
        gpu.ordinal(),
        gpu.compute_capability()
    );
    let platform = Platform {
        tensorrt_version: library.version().to_string(),
        compute_capability: gpu.compute_capability(),
    };
    std::fs::create_dir_all(&opts.out_dir)
        .with_context(|| format!("cannot create {}", opts.out_dir.display()))?;
    let cache_path = opts.out_dir.join(TIMING_CACHE);
    let mut timing_cache = std::fs::read(&cache_path).unwrap_or_default();
    let mut outcomes = Vec::new();
    for &method in &opts.methods {
        for part in Part::ALL {
            let result = build_one(
                library,
                &platform,
                &manifest,
                opts,
                part,
                method,
                &mut timing_cache,
            );
            let outcome = match result {
                Ok((plan, status)) => {
                    if matches!(status, BuildStatus::Built { .. }) && !timing_cache.is_empty() {
                        write_atomic(&cache_path, &timing_cache)?;
                    }
                    BuildOutcome {
                        part,
                        method,
                        plan: Some(plan),
                        status,
                    }
                }
                Err(e) => {
                    log::error!("{} {}: {e:#}", precision_name(method), part.name());
                    BuildOutcome {
                        part,
                        method,
                        plan: None,
                        status: BuildStatus::Failed(format!("{e:#}")),
                    }
                }
            };
            outcomes.push(outcome);
        }
    }
    Ok(outcomes)
}

/// Checks that the model file is there with the manifest's size (cheap: before TensorRT is loaded).
fn check_present(source: &OnnxSource) -> Result<(), EngineError> {
    let meta = std::fs::metadata(&source.path).map_err(|_| {
        EngineError::Corrupt(format!(
            "corrupt ONNX export: {} is missing (re-run `vista3d export-onnx`)",
            source.path.display()
        ))
    })?;
    if meta.len() != source.entry.bytes {
        return Err(EngineError::Corrupt(format!(
            "corrupt ONNX export: {} has {} bytes, the manifest says {} (re-run `vista3d export-onnx`)",
            source.path.display(),
            meta.len(),
            source.entry.bytes
        )));
    }
    Ok(())
}

/// The ONNX file of `source` with its sha256, checked against the manifest's (the hash is reused from the
/// engines of `engines_dir` when the file is unchanged).
fn onnx_stat(
    source: &OnnxSource,
    part: Part,
    method: Method,
    engines_dir: &Path,
) -> Result<OnnxStat> {
    let known: Vec<OnnxStat> = candidates(engines_dir, part, method)
        .into_iter()
        .map(|(_, s)| s.onnx)
        .collect();
    let stat = OnnxStat::of(&source.path, &known)?;
    if stat.sha256 != source.entry.sha256 {
        return Err(EngineError::Corrupt(format!(
            "corrupt ONNX export: {} does not match its sha256 in the manifest (re-run `vista3d export-onnx`)",
            source.path.display()
        ))
        .into());
    }
    Ok(stat)
}

/// Builds one engine unless it is up to date; returns its plan path.
fn build_one(
    library: &'static TrtLibrary,
    platform: &Platform,
    manifest: &OnnxManifest,
    opts: &BuildOptions,
    part: Part,
    method: Method,
    timing_cache: &mut Vec<u8>,
) -> Result<(PathBuf, BuildStatus)> {
    let precision = precision_name(method);
    let source = onnx_source(manifest, &opts.onnx_dir, part, method)?;
    let onnx = onnx_stat(&source, part, method, &opts.out_dir)?;
    let profile = EngineProfile::new(part, opts.patch, opts.sw_batch_size, opts.max_prompt_size)?;
    let key = EngineKey::new(
        part,
        method,
        platform,
        manifest,
        &onnx.sha256,
        profile,
        opts.optimization_level,
    );
    let paths = key.paths(&opts.out_dir);
    match check_engine(&opts.out_dir, &key, true) {
        Freshness::UpToDate(p) => {
            log::info!(
                "{precision} {}: up to date ({})",
                part.name(),
                p.plan.display()
            );
            return Ok((p.plan, BuildStatus::UpToDate));
        }
        Freshness::Stale(reasons) => {
            log::info!(
                "{precision} {}: building {} ({})",
                part.name(),
                paths.plan.display(),
                reasons.join("; ")
            );
        }
    }
    let start = Instant::now();
    log::info!(
        "{precision} {}: from {}{}",
        part.name(),
        onnx.path.display(),
        if source.fp16_model {
            " (float16 model)"
        } else {
            ""
        }
    );
    let mut builder = library.builder()?;
    use_timing_cache(&mut builder, timing_cache)?;
    builder.parse_onnx(&onnx.path)?;
    check_inputs(&builder, part, &onnx.path)?;
    builder.set_precision(method, source.fp16_model)?;
    builder.set_optimization_level(opts.optimization_level)?;
    for (name, dims) in key.profile.input_dims(part, manifest.embed_dim) {
        builder
            .set_profile(name, &dims)
            .with_context(|| format!("profile of '{name}'"))?;
    }
    let plan = builder
        .build()
        .with_context(|| format!("building the {precision} {} engine", part.name()))?;
    match builder.timing_cache() {
        Ok(bytes) if !bytes.is_empty() => *timing_cache = bytes,
        Ok(_) => {}
        Err(e) => log::warn!("timing cache not saved: {e:#}"),
    }
    let seconds = start.elapsed().as_secs_f64();
    // The plan first, the sidecar last: a plan without a sidecar is an interrupted build, never used.
    write_atomic(&paths.plan, &plan)?;
    let sidecar = Sidecar::describe(&key, &plan, onnx, seconds);
    write_atomic(&paths.sidecar, &serde_json::to_vec_pretty(&sidecar)?)?;
    for old in superseded(&opts.out_dir, &key) {
        log::info!("removing superseded {}", old.plan.display());
        let _ = std::fs::remove_file(&old.sidecar);
        let _ = std::fs::remove_file(&old.plan);
    }
    log::info!(
        "{precision} {}: built {} ({} bytes, {seconds:.1} s)",
        part.name(),
        paths.plan.display(),
        plan.len()
    );
    Ok((
        paths.plan,
        BuildStatus::Built {
            seconds,
            bytes: plan.len() as u64,
        },
    ))
}

/// Loads the timing cache into the builder; a cache TensorRT rejects (another version or GPU) is replaced by
/// a new one.
fn use_timing_cache(builder: &mut Builder, cache: &mut Vec<u8>) -> Result<()> {
    if !cache.is_empty() {
        match builder.set_timing_cache(cache) {
            Ok(()) => return Ok(()),
            Err(e) => {
                log::warn!("{TIMING_CACHE} not usable, starting a new one: {e:#}");
                cache.clear();
            }
        }
    }
    Ok(builder.set_timing_cache(&[])?)
}

/// Checks that the parsed network has exactly the inputs of `part`.
fn check_inputs(builder: &Builder, part: Part, onnx: &Path) -> Result<()> {
    let inputs = builder.inputs()?;
    let names: Vec<&str> = inputs.iter().map(|i| i.name.as_str()).collect();
    let mut expected = part.input_names().to_vec();
    let mut actual = names.clone();
    expected.sort_unstable();
    actual.sort_unstable();
    ensure!(
        actual == expected,
        "{} has inputs {names:?}, but a {} model must have {:?}",
        onnx.display(),
        part.name(),
        part.input_names()
    );
    Ok(())
}

/// Prints the outcomes; an error when any engine failed.
pub fn report(outcomes: &[BuildOutcome]) -> Result<()> {
    let mut failed = 0;
    for o in outcomes {
        let what = format!("{} {}", precision_name(o.method), o.part.name());
        match &o.status {
            BuildStatus::UpToDate => println!(
                "{what:<18} up to date  {}",
                o.plan
                    .as_deref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            ),
            BuildStatus::Built { seconds, bytes } => println!(
                "{what:<18} built       {} ({:.1} MB, {seconds:.1} s)",
                o.plan
                    .as_deref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                *bytes as f64 / 1e6
            ),
            BuildStatus::Failed(e) => {
                failed += 1;
                println!("{what:<18} FAILED      {e}");
            }
        }
    }
    ensure!(failed == 0, "{failed} of {} engines failed", outcomes.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(dir: &Path) -> BuildOptions {
        BuildOptions {
            onnx_dir: dir.join("onnx"),
            out_dir: dir.join("engines"),
            methods: vec![Method::TrtFp16],
            max_prompt_size: 4,
            patch: [128, 128, 128],
            sw_batch_size: 1,
            device: 0,
            optimization_level: 3,
        }
    }

    #[test]
    fn patches_parse() {
        assert_eq!(parse_patch("128,128,128").unwrap(), [128, 128, 128]);
        assert_eq!(parse_patch("96").unwrap(), [96, 96, 96]);
        assert_eq!(parse_patch(" 64, 96 ,32").unwrap(), [64, 96, 32]);
        for bad in ["", "1,2", "a,b,c", "0,1,1", "1,2,3,4"] {
            assert!(parse_patch(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_options_fail_before_anything_is_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = opts(dir.path());
        o.max_prompt_size = 0;
        assert!(build_engines(&o)
            .unwrap_err()
            .to_string()
            .contains("max_prompt_size"));
        let mut o = opts(dir.path());
        o.optimization_level = 6;
        assert!(build_engines(&o).is_err());
        let mut o = opts(dir.path());
        o.methods = vec![Method::Amp];
        let err = build_engines(&o).unwrap_err().to_string();
        assert!(err.contains("not a TensorRT precision"), "{err}");
        // No manifest: named.
        let err = format!("{:#}", build_engines(&opts(dir.path())).unwrap_err());
        assert!(err.contains("manifest.json"), "{err}");
        assert!(!dir.path().join("engines").exists());
    }

    #[test]
    fn report_fails_when_an_engine_failed() {
        let ok = BuildOutcome {
            part: Part::Encoder,
            method: Method::TrtTf32,
            plan: Some("e.plan".into()),
            status: BuildStatus::UpToDate,
        };
        assert!(report(std::slice::from_ref(&ok)).is_ok());
        let bad = BuildOutcome {
            status: BuildStatus::Failed("boom".into()),
            plan: None,
            ..ok.clone()
        };
        assert!(report(&[ok, bad])
            .unwrap_err()
            .to_string()
            .contains("1 of 2"));
    }
}
