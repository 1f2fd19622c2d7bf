//! Engine keys, file names, sidecars and staleness (pure Rust: no TensorRT needed).
//!
//! A serialized engine (a "plan") is only valid for the TensorRT version and GPU architecture that built it, and
//! only computes the right thing for the ONNX model and optimisation profile it was built from. Every engine is
//! therefore stored under a key made of all of these:
//!
//! | field | why |
//! |---|---|
//! | TensorRT version | plans do not load across versions |
//! | GPU compute capability | kernels are chosen per architecture |
//! | precision (`fp16` = `trt_fp16`, `tf32` = `trt_tf32`) | different engines |
//! | profile: window size, window batch and prompt batch min/opt/max, builder optimisation level | what the engine accepts, how it was tuned |
//! | ONNX weights fingerprint and embed_dim (from `manifest.json`) | which checkpoint |
//! | sha256 of the ONNX file | the exact model that was compiled |
//!
//! File names: `<dir>/<part>_<precision>_<short key>.plan` with a JSON sidecar `<same>.json` holding every key
//! field plus the plan's size and sha256 (the sidecar is written last, so a plan without one is an interrupted
//! build). `short key` is the first 16 hex digits of the sha256 of the key's canonical JSON.
//!
//! Staleness: an engine whose key differs in any field, whose ONNX changed, or whose plan is missing, truncated
//! or altered is out of date for `build-engines`, which rebuilds it. At run time ([`select_engine`]) an engine is
//! judged by its sidecar alone ([`RunKey`]: schema, part, precision, TensorRT version, GPU, window,
//! `max_prompt_size` and the weights fingerprint; no ONNX file is read, so engines run where the export is
//! absent); one built for something else is an error of kind stale, a damaged one corrupt, and the caller falls
//! back to libtorch: it is never used.
//!
//! Profile choice (see [`EngineProfile::new`]): window batch 1..`sw_batch_size` with opt = `sw_batch_size`;
//! class-head prompt batch 1..`max_prompt_size` with opt = `max_prompt_size`, because the prompts that cost the
//! most are the many-class requests ("everything" is 117 classes), which run in chunks of `max_prompt_size`;
//! spatial dims fixed to the window (patch) size. `max_prompt_size` is part of the run's identity: a request
//! opens the class-head engine built for its own `max_prompt_size` (a run with another one is stale), and
//! chunks its prompts by it.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::engines::onnx::OnnxManifest;
pub use crate::engines::onnx::Part;
use crate::engines::{EngineError, Method};
use crate::fsutil::{hex, sha256_file};

/// Version of the key and sidecar layout, and of the exported graphs' interface; bumping it makes every older
/// engine stale. 2: the encoder engine includes the class head's `image_post_mapping` (ONNX manifest v2), so the
/// class-head engine is only the prompt-dependent part.
pub const KEY_SCHEMA: u32 = 2;

/// The TensorRT methods, in the order `build-engines` builds them.
pub const TRT_METHODS: [Method; 2] = [Method::TrtFp16, Method::TrtTf32];

/// The precision word of a TensorRT method in file names, sidecars and `--precision` of `build-engines`:
/// `fp16` ([`Method::TrtFp16`]) or `tf32` ([`Method::TrtTf32`]); other methods keep their own name.
pub fn precision_name(method: Method) -> &'static str {
    match method {
        Method::TrtFp16 => "fp16",
        Method::TrtTf32 => "tf32",
        other => other.name(),
    }
}

/// Parses `build-engines --precision`: a comma-separated list of `fp16`, `tf32` (`trt_fp16`, `trt_tf32`
/// accepted), without duplicates.
pub fn parse_methods(text: &str) -> Result<Vec<Method>> {
    let mut out = Vec::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let word = item.to_ascii_lowercase().replace('-', "_");
        let method = match word.strip_prefix("trt_").unwrap_or(&word) {
            "fp16" => Method::TrtFp16,
            "tf32" => Method::TrtTf32,
            _ => bail!("unknown TensorRT precision '{item}': use fp16 or tf32"),
        };
        if !out.contains(&method) {
            out.push(method);
        }
    }
    ensure!(
        !out.is_empty(),
        "no precision given: use fp16, tf32 or fp16,tf32"
    );
    Ok(out)
}

/// (De)serializes a TensorRT [`Method`] as its precision word (`fp16`, `tf32`): the on-disk form of engine keys
/// and sidecars, unchanged since they were written with a precision enum.
mod precision_word {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::{precision_name, Method};

    pub fn serialize<S: Serializer>(method: &Method, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(precision_name(*method))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Method, D::Error> {
        match String::deserialize(d)?.as_str() {
            "fp16" => Ok(Method::TrtFp16),
            "tf32" => Ok(Method::TrtTf32),
            other => Err(serde::de::Error::custom(format!(
                "unknown TensorRT precision '{other}'"
            ))),
        }
    }
}

/// The min, opt and max dims of one input in an optimisation profile.
pub type MinOptMax = [Vec<i64>; 3];

/// min/opt/max of one dynamic dimension in an optimisation profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BatchRange {
    pub min: i64,
    pub opt: i64,
    pub max: i64,
}

impl BatchRange {
    /// A range with `1 <= min <= opt <= max`.
    pub fn new(min: i64, opt: i64, max: i64) -> Result<Self> {
        ensure!(
            1 <= min && min <= opt && opt <= max,
            "bad batch range {min}/{opt}/{max}: need 1 <= min <= opt <= max"
        );
        Ok(Self { min, opt, max })
    }

    /// Whether `n` lies in the range.
    pub fn contains(&self, n: i64) -> bool {
        self.min <= n && n <= self.max
    }
}

/// What an engine accepts: the spatial window and the dynamic batch dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EngineProfile {
    /// The window (patch) size `[H, W, D]`; fixed.
    pub window: [i64; 3],
    /// Windows per call (`b`).
    pub window_batch: BatchRange,
    /// Prompts per class-head call (`B`); `None` for the encoder.
    pub prompt_batch: Option<BatchRange>,
}

impl EngineProfile {
    /// The profile of `part` (see the module documentation for the choice of opt).
    pub fn new(
        part: Part,
        window: [i64; 3],
        sw_batch_size: i64,
        max_prompt_size: i64,
    ) -> Result<Self> {
        ensure!(
            window.iter().all(|&s| s > 0),
            "the window size must be positive, got {window:?}"
        );
        ensure!(
            sw_batch_size >= 1,
            "sw_batch_size must be at least 1, got {sw_batch_size}"
        );
        let window_batch = BatchRange::new(1, sw_batch_size, sw_batch_size)?;
        let prompt_batch = match part {
            Part::Encoder => None,
            Part::ClassHead => {
                ensure!(
                    max_prompt_size >= 1,
                    "max_prompt_size must be at least 1, got {max_prompt_size}"
                );
                Some(BatchRange::new(1, max_prompt_size, max_prompt_size)?)
            }
        };
        Ok(Self {
            window,
            window_batch,
            prompt_batch,
        })
    }

    /// min/opt/max dims of every input of `part` (`embed_dim` channels of features), in input order.
    pub fn input_dims(&self, part: Part, embed_dim: i64) -> Vec<(&'static str, MinOptMax)> {
        let [h, w, d] = self.window;
        let b = self.window_batch;
        let spatial = |batch: i64, channels: i64| vec![batch, channels, h, w, d];
        match part {
            Part::Encoder => vec![(
                "image",
                [spatial(b.min, 1), spatial(b.opt, 1), spatial(b.max, 1)],
            )],
            Part::ClassHead => {
                let p = self.prompt_batch.unwrap_or(BatchRange {
                    min: 1,
                    opt: 1,
                    max: 1,
                });
                vec![
                    (
                        "features",
                        [
                            spatial(b.min, embed_dim),
                            spatial(b.opt, embed_dim),
                            spatial(b.max, embed_dim),
                        ],
                    ),
                    (
                        "class_ids",
                        [vec![p.min, 1], vec![p.opt, 1], vec![p.max, 1]],
                    ),
                ]
            }
        }
    }
}

/// What an engine is built for and runs on: a TensorRT version and a GPU architecture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    /// `major.minor.patch` of the loaded libnvinfer.
    pub tensorrt_version: String,
    /// `major.minor` of the GPU.
    pub compute_capability: String,
}

/// Everything an engine depends on; see the module documentation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineKey {
    pub schema: u32,
    pub part: Part,
    /// [`Method::TrtFp16`] or [`Method::TrtTf32`] (`"precision": "fp16"` / `"tf32"` on disk).
    #[serde(rename = "precision", with = "precision_word")]
    pub method: Method,
    /// `major.minor.patch` of the libnvinfer that builds/runs the engine.
    pub tensorrt_version: String,
    /// `major.minor` of the GPU.
    pub compute_capability: String,
    pub profile: EngineProfile,
    pub builder_optimization_level: i32,
    pub weights_fingerprint: String,
    pub embed_dim: i64,
    pub onnx_sha256: String,
}

impl EngineKey {
    /// The key of the engine of `part` for the TensorRT `method` on `platform`, compiled from the export
    /// `manifest`'s model with sha256 `onnx_sha256`, with `profile` and builder `optimization_level`.
    pub fn new(
        part: Part,
        method: Method,
        platform: &Platform,
        manifest: &OnnxManifest,
        onnx_sha256: &str,
        profile: EngineProfile,
        optimization_level: i32,
    ) -> Self {
        Self {
            schema: KEY_SCHEMA,
            part,
            method,
            tensorrt_version: platform.tensorrt_version.clone(),
            compute_capability: platform.compute_capability.clone(),
            profile,
            builder_optimization_level: optimization_level,
            weights_fingerprint: manifest.weights_fingerprint.clone(),
            embed_dim: manifest.embed_dim,
            onnx_sha256: onnx_sha256.to_string(),
        }
    }

    /// The first 16 hex digits of the sha256 of the key's JSON (fields in declaration order).
    pub fn short(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        hex(&Sha256::digest(&json))[..16].to_string()
    }

    /// `<part>_<precision>_<short key>`.
    pub fn file_stem(&self) -> String {
        format!(
            "{}_{}_{}",
            self.part.name(),
            precision_name(self.method),
            self.short()
        )
    }

    /// The plan and sidecar paths of this key in `dir`.
    pub fn paths(&self, dir: &Path) -> EnginePaths {
        let stem = self.file_stem();
        EnginePaths {
            plan: dir.join(format!("{stem}.plan")),
            sidecar: dir.join(format!("{stem}.json")),
        }
    }

    /// Human-readable differences from `other` ("field: other -> self"); empty when equal.
    pub fn differences(&self, other: &EngineKey) -> Vec<String> {
        let mut out = RunKey::of(self).differences(other);
        if self.profile != other.profile {
            out.push(format!(
                "profile: {} -> {}",
                describe_profile(&other.profile),
                describe_profile(&self.profile)
            ));
        }
        if self.builder_optimization_level != other.builder_optimization_level {
            out.push(format!(
                "builder optimisation level: {} -> {}",
                other.builder_optimization_level, self.builder_optimization_level
            ));
        }
        if self.embed_dim != other.embed_dim {
            out.push(format!(
                "embed_dim: {} -> {}",
                other.embed_dim, self.embed_dim
            ));
        }
        if self.onnx_sha256 != other.onnx_sha256 {
            out.push(format!(
                "ONNX sha256: {} -> {}",
                other.onnx_sha256, self.onnx_sha256
            ));
        }
        out
    }
}

/// What a run needs of an engine: everything that decides whether it computes the right thing here, and nothing
/// that needs the ONNX export, so engines are usable with their sidecar alone (the export may be deleted or live
/// on another machine). The weights fingerprint stands for the weights (and so for `embed_dim`); the key schema
/// for the exported graph's layout. The build choices (window batch range, optimisation level) are read from the
/// sidecar; the class head's largest prompt batch is identity: it is the request's `max_prompt_size`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunKey {
    pub schema: u32,
    pub part: Part,
    /// [`Method::TrtFp16`] or [`Method::TrtTf32`].
    pub method: Method,
    /// `major.minor.patch` of the loaded libnvinfer.
    pub tensorrt_version: String,
    /// `major.minor` of the GPU.
    pub compute_capability: String,
    /// The window (patch) size.
    pub window: [i64; 3],
    /// The class head's prompt batch (the request's `max_prompt_size`); `None` for the encoder.
    pub max_prompt_size: Option<i64>,
    /// [`crate::engines::fingerprint`] of the loaded weights.
    pub weights_fingerprint: String,
}

impl RunKey {
    /// What a request needs of the engine of `part` for the TensorRT `method` on `platform`, for the weights
    /// `weights_fingerprint`, `window` and (class head) `max_prompt_size`. An impossible window or prompt size is
    /// [`EngineError::Unavailable`] naming it.
    pub fn new(
        part: Part,
        method: Method,
        platform: &Platform,
        weights_fingerprint: &str,
        window: [i64; 3],
        max_prompt_size: i64,
    ) -> Result<Self, EngineError> {
        let profile = EngineProfile::new(part, window, 1, max_prompt_size)
            .map_err(EngineError::unavailable)?;
        Ok(Self {
            schema: KEY_SCHEMA,
            part,
            method,
            tensorrt_version: platform.tensorrt_version.clone(),
            compute_capability: platform.compute_capability.clone(),
            window,
            max_prompt_size: profile.prompt_batch.map(|p| p.max),
            weights_fingerprint: weights_fingerprint.to_string(),
        })
    }

    /// The run identity of a built engine's key.
    pub fn of(key: &EngineKey) -> Self {
        Self {
            schema: key.schema,
            part: key.part,
            method: key.method,
            tensorrt_version: key.tensorrt_version.clone(),
            compute_capability: key.compute_capability.clone(),
            window: key.profile.window,
            max_prompt_size: key.profile.prompt_batch.map(|p| p.max),
            weights_fingerprint: key.weights_fingerprint.clone(),
        }
    }

    /// Why the engine built for `built` cannot serve this run ("field: built -> wanted"); empty when it can.
    pub fn differences(&self, built: &EngineKey) -> Vec<String> {
        let other = RunKey::of(built);
        let mut out = Vec::new();
        let mut field = |name: &str, old: String, new: String| {
            if old != new {
                out.push(format!("{name}: {old} -> {new}"));
            }
        };
        field(
            "key schema",
            other.schema.to_string(),
            self.schema.to_string(),
        );
        field("part", other.part.name().into(), self.part.name().into());
        field(
            "precision",
            precision_name(other.method).into(),
            precision_name(self.method).into(),
        );
        field(
            "TensorRT version",
            other.tensorrt_version,
            self.tensorrt_version.clone(),
        );
        field(
            "GPU compute capability",
            other.compute_capability,
            self.compute_capability.clone(),
        );
        field(
            "window size",
            format!("{:?}", other.window),
            format!("{:?}", self.window),
        );
        let prompts = |p: Option<i64>| p.map_or_else(|| "none".to_string(), |p| p.to_string());
        field(
            "max_prompt_size",
            prompts(other.max_prompt_size),
            prompts(self.max_prompt_size),
        );
        field(
            "weights fingerprint",
            other.weights_fingerprint,
            self.weights_fingerprint.clone(),
        );
        out
    }
}

/// `window 128x128x128, windows 1/1/1, prompts 1/4/4`.
pub fn describe_profile(p: &EngineProfile) -> String {
    let [h, w, d] = p.window;
    let b = p.window_batch;
    let mut s = format!("window {h}x{w}x{d}, windows {}/{}/{}", b.min, b.opt, b.max);
    if let Some(q) = p.prompt_batch {
        s.push_str(&format!(", prompts {}/{}/{}", q.min, q.opt, q.max));
    }
    s
}

/// Where an engine's files live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnginePaths {
    pub plan: PathBuf,
    pub sidecar: PathBuf,
}

/// The ONNX file an engine was built from, with what is needed to notice that it changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OnnxStat {
    /// Absolute path at build time.
    pub path: PathBuf,
    pub bytes: u64,
    /// Modification time in nanoseconds since the Unix epoch.
    pub mtime_ns: u128,
    pub sha256: String,
}

impl OnnxStat {
    /// Size and mtime of `path`, with its sha256 taken from `known` when one of them has the same absolute path,
    /// size and mtime (as git's index does), computed otherwise.
    pub fn of(path: &Path, known: &[OnnxStat]) -> Result<Self> {
        let abs = std::path::absolute(path)
            .with_context(|| format!("cannot resolve {}", path.display()))?;
        let meta =
            std::fs::metadata(&abs).with_context(|| format!("cannot stat {}", abs.display()))?;
        let mtime_ns = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let bytes = meta.len();
        if let Some(k) = known
            .iter()
            .find(|k| k.path == abs && k.bytes == bytes && k.mtime_ns == mtime_ns && mtime_ns != 0)
        {
            return Ok(Self {
                path: abs,
                bytes,
                mtime_ns,
                sha256: k.sha256.clone(),
            });
        }
        let sha256 = sha256_file(&abs)?;
        Ok(Self {
            path: abs,
            bytes,
            mtime_ns,
            sha256,
        })
    }
}

/// The JSON sidecar next to a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sidecar {
    pub key: EngineKey,
    /// [`EngineKey::short`] of `key`, for people reading the file.
    pub short_key: String,
    /// The plan's file name (in the same folder).
    pub plan_file: String,
    pub plan_bytes: u64,
    pub plan_sha256: String,
    pub onnx: OnnxStat,
    /// Which program built it (`vista3d <version>`).
    pub built_by: String,
    pub build_seconds: f64,
}

impl Sidecar {
    /// Reads a sidecar file.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not an engine sidecar", path.display()))
    }

    /// The sidecar of `plan` built for `key`.
    pub fn describe(key: &EngineKey, plan: &[u8], onnx: OnnxStat, build_seconds: f64) -> Self {
        Self {
            short_key: key.short(),
            plan_file: format!("{}.plan", key.file_stem()),
            plan_bytes: plan.len() as u64,
            plan_sha256: hex(&Sha256::digest(plan)),
            onnx,
            key: key.clone(),
            built_by: format!("vista3d {}", env!("CARGO_PKG_VERSION")),
            build_seconds,
        }
    }

    /// Checks plan bytes (read from disk) against the sidecar: size, then sha256.
    pub fn verify_plan(&self, plan: &[u8]) -> Result<()> {
        ensure!(
            plan.len() as u64 == self.plan_bytes,
            "plan {} is truncated or altered: {} bytes, the sidecar says {}",
            self.plan_file,
            plan.len(),
            self.plan_bytes
        );
        let actual = hex(&Sha256::digest(plan));
        ensure!(
            actual == self.plan_sha256,
            "plan {} is corrupt: sha256 {actual}, the sidecar says {}",
            self.plan_file,
            self.plan_sha256
        );
        Ok(())
    }
}

/// Whether the engine of a key can be used as it is.
#[derive(Debug, Clone, PartialEq)]
pub enum Freshness {
    /// Plan and sidecar match the key (plan size checked; sha256 too when asked for).
    UpToDate(EnginePaths),
    /// Something is there but unusable, or nothing is: the reasons, for the log.
    Stale(Vec<String>),
}

/// Checks the engine of `key` in `dir`. With `verify_hash`, the plan's sha256 is compared too (reads the plan).
/// Reasons name what differs from other engines of the same part and precision found in `dir`.
pub fn check_engine(dir: &Path, key: &EngineKey, verify_hash: bool) -> Freshness {
    let paths = key.paths(dir);
    let mut reasons = Vec::new();
    match Sidecar::read(&paths.sidecar) {
        Err(_) if !paths.sidecar.exists() => {
            let others = candidates(dir, key.part, key.method);
            if others.is_empty() {
                reasons.push(format!(
                    "no {} {} engine in {}",
                    precision_name(key.method),
                    key.part.name(),
                    dir.display()
                ));
            }
            for (path, other) in others {
                reasons.push(format!(
                    "{} is stale ({})",
                    path.display(),
                    key.differences(&other.key).join("; ")
                ));
            }
        }
        Err(e) => reasons.push(format!("{e:#}")),
        Ok(sidecar) => {
            if let Err(e) = check_sidecar(&paths, key, &sidecar, verify_hash) {
                reasons.push(format!("{e:#}"));
            }
        }
    }
    if reasons.is_empty() {
        Freshness::UpToDate(paths)
    } else {
        Freshness::Stale(reasons)
    }
}

/// Checks that `sidecar` describes `key` and that its plan is there with the recorded size (and hash).
fn check_sidecar(
    paths: &EnginePaths,
    key: &EngineKey,
    sidecar: &Sidecar,
    verify_hash: bool,
) -> Result<()> {
    let diff = key.differences(&sidecar.key);
    ensure!(
        diff.is_empty(),
        "{} does not match its name ({})",
        paths.sidecar.display(),
        diff.join("; ")
    );
    let meta = std::fs::metadata(&paths.plan)
        .with_context(|| format!("plan {} is missing", paths.plan.display()))?;
    ensure!(
        meta.len() == sidecar.plan_bytes,
        "plan {} is truncated or altered: {} bytes, the sidecar says {}",
        paths.plan.display(),
        meta.len(),
        sidecar.plan_bytes
    );
    if verify_hash {
        let plan = std::fs::read(&paths.plan)
            .with_context(|| format!("cannot read {}", paths.plan.display()))?;
        sidecar.verify_plan(&plan)?;
    }
    Ok(())
}

/// The sidecar files in `dir` named for `part` and the TensorRT `method` (any key), sorted by path.
fn sidecar_files(dir: &Path, part: Part, method: Method) -> Vec<PathBuf> {
    let prefix = format!("{}_{}_", part.name(), precision_name(method));
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|e| e == "json")
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
        })
        .collect();
    out.sort();
    out
}

/// Reads a sidecar found under the name of `part` and `method`, checked to be one of theirs.
fn read_candidate(path: &Path, part: Part, method: Method) -> Result<Sidecar> {
    let sidecar = Sidecar::read(path)?;
    ensure!(
        sidecar.key.part == part && sidecar.key.method == method,
        "{} is named for a {} {} engine but describes a {} {} one",
        path.display(),
        precision_name(method),
        part.name(),
        precision_name(sidecar.key.method),
        sidecar.key.part.name()
    );
    Ok(sidecar)
}

/// Sidecars in `dir` for `part` and the TensorRT `method` (any key), sorted by path; unreadable ones are
/// skipped (what `build-engines` replaces).
pub fn candidates(dir: &Path, part: Part, method: Method) -> Vec<(PathBuf, Sidecar)> {
    sidecar_files(dir, part, method)
        .into_iter()
        .filter_map(|p| read_candidate(&p, part, method).ok().map(|s| (p, s)))
        .collect()
}

/// The engine a run uses: the sidecar of an intact engine in `dir` built for `want` (see [`RunKey`]: the sidecar
/// alone decides, no ONNX file is read); the largest window batch wins when there are several, then the most
/// recently built. The error's kind tells the caller what to do:
/// [`Unavailable`](EngineError::Unavailable) when no engine of this part and method was built here,
/// [`Corrupt`](EngineError::Corrupt) when a sidecar does not parse or the matching engine's plan is missing,
/// truncated or does not match its sidecar, [`Stale`](EngineError::Stale) when every engine there was built for something else (other
/// weights, TensorRT version, GPU, window size or `max_prompt_size`): the message names each difference and
/// the `build-engines` command that makes the wanted one.
pub fn select_engine(dir: &Path, want: &RunKey) -> Result<(EnginePaths, Sidecar), EngineError> {
    let rebuild = build_command(dir, want);
    let files = sidecar_files(dir, want.part, want.method);
    if files.is_empty() {
        return Err(EngineError::Unavailable(format!(
            "no {} {} engine in {}: run `{rebuild}`",
            precision_name(want.method),
            want.part.name(),
            dir.display(),
        )));
    }
    let (mut stale, mut corrupt, mut usable) = (Vec::new(), Vec::new(), Vec::new());
    for path in files {
        let sidecar = match read_candidate(&path, want.part, want.method) {
            Ok(sidecar) => sidecar,
            Err(e) => {
                corrupt.push(format!("{e:#}"));
                continue;
            }
        };
        let diff = want.differences(&sidecar.key);
        if !diff.is_empty() {
            stale.push(format!("{} is stale ({})", path.display(), diff.join("; ")));
            continue;
        }
        let paths = sidecar.key.paths(dir);
        match check_sidecar(&paths, &sidecar.key, &sidecar, false) {
            Ok(()) => usable.push((paths, sidecar)),
            Err(e) => corrupt.push(format!("{e:#}")),
        }
    }
    usable.sort_by(|(pa, a), (pb, b)| {
        let built = |p: &EnginePaths| {
            std::fs::metadata(&p.sidecar)
                .and_then(|m| m.modified())
                .ok()
        };
        (a.key.profile.window_batch.max, built(pa))
            .cmp(&(b.key.profile.window_batch.max, built(pb)))
    });
    if let Some(found) = usable.pop() {
        return Ok(found);
    }
    let what = format!(
        "no up-to-date {} {} engine in {}",
        precision_name(want.method),
        want.part.name(),
        dir.display()
    );
    if corrupt.is_empty() {
        Err(EngineError::Stale(format!(
            "{what} (rebuild with `{rebuild}`): {}",
            stale.join("; ")
        )))
    } else {
        corrupt.extend(stale);
        Err(EngineError::Corrupt(format!(
            "{what} (rebuild with `{rebuild}`): {}",
            corrupt.join("; ")
        )))
    }
}

/// The `build-engines` command that makes the engine `want` asks for in `dir`.
fn build_command(dir: &Path, want: &RunKey) -> String {
    let [h, w, d] = want.window;
    let mut cmd = format!(
        "vista3d build-engines --onnx <export dir> --precision {} --patch {h},{w},{d}",
        precision_name(want.method)
    );
    if let Some(p) = want.max_prompt_size {
        cmd.push_str(&format!(" --max-prompt-size {p}"));
    }
    cmd.push_str(&format!(" --out {}", dir.display()));
    cmd
}

/// Engines of the same part, precision, TensorRT version, GPU and `max_prompt_size` as `key` but another key:
/// superseded by `key`'s engine (a new ONNX, window or build choice), so `build-engines` removes them. Engines
/// for other GPUs, TensorRT versions or `max_prompt_size` are kept (one folder can serve several machines and
/// configurations).
pub fn superseded(dir: &Path, key: &EngineKey) -> Vec<EnginePaths> {
    candidates(dir, key.part, key.method)
        .into_iter()
        .filter(|(_, s)| {
            s.key != *key
                && s.key.tensorrt_version == key.tensorrt_version
                && s.key.compute_capability == key.compute_capability
                && s.key.profile.prompt_batch.map(|p| p.max)
                    == key.profile.prompt_batch.map(|p| p.max)
        })
        .map(|(sidecar, s)| EnginePaths {
            plan: dir.join(&s.plan_file),
            sidecar,
        })
        .collect()
}

/// Splits `0..total` into consecutive ranges of at most `max` items (`max` 0 counts as 1).
pub fn chunk_ranges(total: usize, max: usize) -> Vec<Range<usize>> {
    let max = max.max(1);
    (0..total)
        .step_by(max)
        .map(|start| start..(start + max).min(total))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engines::EngineErrorKind;
    use crate::fsutil::write_atomic;

    fn key(part: Part) -> EngineKey {
        EngineKey {
            schema: KEY_SCHEMA,
            part,
            method: Method::TrtFp16,
            tensorrt_version: "10.13.0".into(),
            compute_capability: "9.0".into(),
            profile: EngineProfile::new(part, [128, 128, 128], 1, 4).unwrap(),
            builder_optimization_level: 3,
            weights_fingerprint: "0123456789abcdef".into(),
            embed_dim: 48,
            onnx_sha256: "aa".repeat(32),
        }
    }

    /// Writes a plan and its sidecar for `key` into `dir`, as build-engines does.
    fn store(dir: &Path, key: &EngineKey, plan: &[u8]) -> EnginePaths {
        let paths = key.paths(dir);
        write_atomic(&paths.plan, plan).unwrap();
        let onnx = OnnxStat {
            path: "/x/encoder.onnx".into(),
            bytes: 4,
            mtime_ns: 1,
            sha256: key.onnx_sha256.clone(),
        };
        let sidecar = Sidecar::describe(key, plan, onnx, 1.0);
        write_atomic(
            &paths.sidecar,
            &serde_json::to_vec_pretty(&sidecar).unwrap(),
        )
        .unwrap();
        paths
    }

    #[test]
    fn precision_names_and_lists() {
        assert_eq!(
            parse_methods("fp16, tf32,fp16").unwrap(),
            vec![Method::TrtFp16, Method::TrtTf32]
        );
        assert_eq!(parse_methods("trt_tf32").unwrap(), vec![Method::TrtTf32]);
        assert!(parse_methods("").is_err());
        let err = parse_methods("fp16,int8").unwrap_err().to_string();
        assert!(err.contains("unknown TensorRT precision 'int8'"), "{err}");
        // libtorch methods are not TensorRT precisions, even where Method's own parser knows the word.
        assert!(parse_methods("amp").is_err());
        assert!(parse_methods("trt_amp").is_err());
        assert_eq!(
            TRT_METHODS.map(precision_name),
            ["fp16", "tf32"],
            "the on-disk words"
        );
        // Keys keep their on-disk form: "precision": "fp16".
        let json = serde_json::to_value(key(Part::Encoder)).unwrap();
        assert_eq!(json["precision"], "fp16");
        assert!(json.get("method").is_none());
        let mut bad = json.clone();
        bad["precision"] = "amp".into();
        assert!(serde_json::from_value::<EngineKey>(bad).is_err());
        assert_eq!(
            serde_json::from_value::<EngineKey>(json).unwrap(),
            key(Part::Encoder)
        );
    }

    #[test]
    fn profiles_follow_the_settings() {
        let enc = EngineProfile::new(Part::Encoder, [96, 96, 64], 2, 4).unwrap();
        assert_eq!(
            enc.window_batch,
            BatchRange {
                min: 1,
                opt: 2,
                max: 2
            }
        );
        assert_eq!(enc.prompt_batch, None);
        assert_eq!(
            enc.input_dims(Part::Encoder, 16),
            vec![(
                "image",
                [
                    vec![1, 1, 96, 96, 64],
                    vec![2, 1, 96, 96, 64],
                    vec![2, 1, 96, 96, 64]
                ]
            )]
        );
        let head = EngineProfile::new(Part::ClassHead, [128, 128, 128], 1, 8).unwrap();
        assert_eq!(
            head.prompt_batch,
            Some(BatchRange {
                min: 1,
                opt: 8,
                max: 8
            })
        );
        let dims = head.input_dims(Part::ClassHead, 48);
        assert_eq!(dims[0].0, "features");
        assert_eq!(dims[0].1[2], vec![1, 48, 128, 128, 128]);
        assert_eq!(dims[1], ("class_ids", [vec![1, 1], vec![8, 1], vec![8, 1]]));
        assert!(EngineProfile::new(Part::ClassHead, [128, 128, 128], 1, 0).is_err());
        assert!(EngineProfile::new(Part::Encoder, [128, 0, 128], 1, 4).is_err());
        assert!(EngineProfile::new(Part::Encoder, [128, 128, 128], 0, 4).is_err());
        // The encoder ignores the prompt size.
        assert!(EngineProfile::new(Part::Encoder, [128, 128, 128], 1, 0).is_ok());
        assert!(BatchRange::new(2, 1, 3).is_err());
        assert!(BatchRange::new(1, 2, 3).unwrap().contains(3));
    }

    #[test]
    fn every_key_field_changes_the_file_name() {
        let base = key(Part::ClassHead);
        let stem = base.file_stem();
        assert!(stem.starts_with("class_head_fp16_"), "{stem}");
        assert_eq!(stem.len(), "class_head_fp16_".len() + 16);
        assert_eq!(base.short(), key(Part::ClassHead).short(), "deterministic");
        let variants: Vec<EngineKey> = vec![
            EngineKey {
                schema: KEY_SCHEMA - 1,
                ..base.clone()
            },
            EngineKey {
                method: Method::TrtTf32,
                ..base.clone()
            },
            EngineKey {
                tensorrt_version: "10.14.0".into(),
                ..base.clone()
            },
            EngineKey {
                compute_capability: "8.0".into(),
                ..base.clone()
            },
            EngineKey {
                profile: EngineProfile::new(Part::ClassHead, [128, 128, 128], 1, 8).unwrap(),
                ..base.clone()
            },
            EngineKey {
                profile: EngineProfile::new(Part::ClassHead, [128, 128, 128], 2, 4).unwrap(),
                ..base.clone()
            },
            EngineKey {
                profile: EngineProfile::new(Part::ClassHead, [96, 128, 128], 1, 4).unwrap(),
                ..base.clone()
            },
            EngineKey {
                builder_optimization_level: 5,
                ..base.clone()
            },
            EngineKey {
                weights_fingerprint: "fedcba9876543210".into(),
                ..base.clone()
            },
            EngineKey {
                embed_dim: 16,
                ..base.clone()
            },
            EngineKey {
                onnx_sha256: "bb".repeat(32),
                ..base.clone()
            },
        ];
        let mut seen = std::collections::HashSet::from([base.short()]);
        for v in &variants {
            assert!(seen.insert(v.short()), "{v:?} collides");
            assert!(!base.differences(v).is_empty(), "{v:?}");
        }
        // A run judges by the sidecar alone: build choices (window batch, optimisation level) and what only
        // the export knows (its file's sha256, embed_dim, which the fingerprint stands for) are not its business.
        let run = RunKey::of(&base);
        for i in [5, 7, 9, 10] {
            assert!(
                run.differences(&variants[i]).is_empty(),
                "{:?}",
                variants[i]
            );
        }
        // max_prompt_size is: a run opens the class-head engine built for its own (DECISIONS.md).
        assert_eq!(
            run.differences(&variants[4]),
            vec!["max_prompt_size: 8 -> 4".to_string()]
        );
        for i in [0, 1, 2, 3, 6, 8] {
            assert_eq!(run.differences(&variants[i]).len(), 1, "{:?}", variants[i]);
        }
        // build-engines sees every field.
        assert_eq!(
            base.differences(&variants[10]),
            vec![format!(
                "ONNX sha256: {} -> {}",
                "bb".repeat(32),
                "aa".repeat(32)
            )]
        );
        // The run key a request makes is the built key's run identity.
        let platform = Platform {
            tensorrt_version: "10.13.0".into(),
            compute_capability: "9.0".into(),
        };
        let want = RunKey::new(
            Part::ClassHead,
            Method::TrtFp16,
            &platform,
            "0123456789abcdef",
            [128; 3],
            4,
        )
        .unwrap();
        assert_eq!(want, run);
        assert!(RunKey::new(
            Part::ClassHead,
            Method::TrtFp16,
            &platform,
            "x",
            [128; 3],
            0
        )
        .is_err());
    }

    #[test]
    fn fresh_engine_is_up_to_date_and_damage_makes_it_stale() {
        let dir = tempfile::tempdir().unwrap();
        let k = key(Part::Encoder);
        match check_engine(dir.path(), &k, true) {
            Freshness::Stale(r) => assert!(r[0].contains("no fp16 encoder engine"), "{r:?}"),
            other => panic!("{other:?}"),
        }
        let paths = store(dir.path(), &k, b"plan bytes");
        assert_eq!(
            check_engine(dir.path(), &k, true),
            Freshness::UpToDate(paths.clone())
        );
        // Same size, other content: only the hash check sees it.
        std::fs::write(&paths.plan, b"PLAN bytes").unwrap();
        assert!(matches!(
            check_engine(dir.path(), &k, false),
            Freshness::UpToDate(_)
        ));
        match check_engine(dir.path(), &k, true) {
            Freshness::Stale(r) => assert!(r[0].contains("corrupt"), "{r:?}"),
            other => panic!("{other:?}"),
        }
        // Truncated.
        std::fs::write(&paths.plan, b"plan").unwrap();
        match check_engine(dir.path(), &k, false) {
            Freshness::Stale(r) => assert!(r[0].contains("truncated"), "{r:?}"),
            other => panic!("{other:?}"),
        }
        // Missing.
        std::fs::remove_file(&paths.plan).unwrap();
        match check_engine(dir.path(), &k, false) {
            Freshness::Stale(r) => assert!(r[0].contains("missing"), "{r:?}"),
            other => panic!("{other:?}"),
        }
        // Unreadable sidecar.
        std::fs::write(&paths.sidecar, b"{").unwrap();
        match check_engine(dir.path(), &k, false) {
            Freshness::Stale(r) => assert!(r[0].contains("not an engine sidecar"), "{r:?}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn changed_onnx_is_stale_for_build_engines_but_runs_need_only_the_sidecar() {
        let dir = tempfile::tempdir().unwrap();
        let old = key(Part::Encoder);
        store(dir.path(), &old, b"old plan");
        let new = EngineKey {
            onnx_sha256: "cc".repeat(32),
            ..old.clone()
        };
        match check_engine(dir.path(), &new, false) {
            Freshness::Stale(r) => {
                assert_eq!(r.len(), 1, "{r:?}");
                assert!(r[0].contains("ONNX sha256"), "{r:?}");
            }
            other => panic!("{other:?}"),
        }
        // At run time the engine of the same weights is used as it is: no ONNX file is needed (or read).
        let (paths, sidecar) = select_engine(dir.path(), &RunKey::of(&new)).unwrap();
        assert_eq!((paths, sidecar.key), (old.paths(dir.path()), old.clone()));
        // Other weights are stale there, naming the difference.
        let other_weights = EngineKey {
            weights_fingerprint: "fedcba9876543210".into(),
            ..new.clone()
        };
        let err = select_engine(dir.path(), &RunKey::of(&other_weights)).unwrap_err();
        assert_eq!(err.kind(), EngineErrorKind::Stale);
        let err = err.to_string();
        assert!(err.contains("no up-to-date fp16 encoder engine"), "{err}");
        assert!(err.contains("weights fingerprint"), "{err}");
        // So is an engine of the older graph layout (key schema 1: post mapping in the class head).
        let schema1 = tempfile::tempdir().unwrap();
        store(
            schema1.path(),
            &EngineKey {
                schema: 1,
                ..old.clone()
            },
            b"v1",
        );
        let err = select_engine(schema1.path(), &RunKey::of(&old)).unwrap_err();
        assert_eq!(err.kind(), EngineErrorKind::Stale);
        assert!(err.to_string().contains("key schema: 1 -> 2"), "{err}");
        // build-engines replaces it.
        assert_eq!(superseded(dir.path(), &new), vec![old.paths(dir.path())]);
        // An engine for another GPU is kept.
        let other_gpu = EngineKey {
            compute_capability: "8.6".into(),
            ..old.clone()
        };
        store(dir.path(), &other_gpu, b"other gpu");
        assert_eq!(superseded(dir.path(), &new).len(), 1);
    }

    #[test]
    fn run_time_selection_reads_the_build_choices_from_the_sidecar() {
        let dir = tempfile::tempdir().unwrap();
        let err = select_engine(dir.path(), &RunKey::of(&key(Part::ClassHead))).unwrap_err();
        assert_eq!(err.kind(), EngineErrorKind::Unavailable, "{err}");
        assert!(
            err.to_string().contains("run `vista3d build-engines"),
            "{err}"
        );
        let small = key(Part::ClassHead);
        let large = EngineKey {
            profile: EngineProfile::new(Part::ClassHead, [128, 128, 128], 2, 4).unwrap(),
            builder_optimization_level: 5,
            ..small.clone()
        };
        store(dir.path(), &small, b"small");
        let large_paths = store(dir.path(), &large, b"large");
        // The run asks with its own window batch and level: the build choices come from the sidecars; the
        // largest window batch wins.
        let want = EngineKey {
            profile: EngineProfile::new(Part::ClassHead, [128, 128, 128], 1, 4).unwrap(),
            builder_optimization_level: 0,
            ..small.clone()
        };
        let (paths, sidecar) = select_engine(dir.path(), &RunKey::of(&want)).unwrap();
        assert_eq!(paths, large_paths);
        assert_eq!(sidecar.key, large);
        // A damaged plan is skipped, the other one used.
        std::fs::write(&large_paths.plan, b"lar").unwrap();
        let (_, sidecar) = select_engine(dir.path(), &RunKey::of(&want)).unwrap();
        assert_eq!(sidecar.key, small);
        // Another window size is not usable: stale, naming it.
        let want96 = EngineKey {
            profile: EngineProfile::new(Part::ClassHead, [96, 96, 96], 1, 4).unwrap(),
            ..small.clone()
        };
        let err = select_engine(dir.path(), &RunKey::of(&want96)).unwrap_err();
        assert_eq!(err.kind(), EngineErrorKind::Stale, "{err}");
        assert!(err.to_string().contains("window size"), "{err}");
    }

    #[test]
    fn max_prompt_size_selects_the_class_head_engine() {
        let dir = tempfile::tempdir().unwrap();
        let with_prompts = |n: i64| EngineKey {
            profile: EngineProfile::new(Part::ClassHead, [128, 128, 128], 1, n).unwrap(),
            ..key(Part::ClassHead)
        };
        let four = store(dir.path(), &with_prompts(4), b"four");
        let sixteen = store(dir.path(), &with_prompts(16), b"sixteen");
        // Each request opens the engine of its own max_prompt_size, not the largest one.
        assert_eq!(
            select_engine(dir.path(), &RunKey::of(&with_prompts(4)))
                .unwrap()
                .0,
            four
        );
        let (paths, sidecar) = select_engine(dir.path(), &RunKey::of(&with_prompts(16))).unwrap();
        assert_eq!(paths, sixteen);
        assert_eq!(sidecar.key.profile.prompt_batch.unwrap().max, 16);
        // None built for 8: stale, naming both values and the command that builds it.
        let err = select_engine(dir.path(), &RunKey::of(&with_prompts(8))).unwrap_err();
        assert_eq!(err.kind(), EngineErrorKind::Stale, "{err}");
        let msg = err.to_string();
        assert!(msg.contains("max_prompt_size: 4 -> 8"), "{msg}");
        assert!(msg.contains("max_prompt_size: 16 -> 8"), "{msg}");
        assert!(msg.contains("--max-prompt-size 8"), "{msg}");
        assert!(msg.contains("vista3d build-engines"), "{msg}");
        // The encoder does not depend on it.
        let encoder = store(dir.path(), &key(Part::Encoder), b"enc");
        assert_eq!(
            select_engine(dir.path(), &RunKey::of(&key(Part::Encoder)))
                .unwrap()
                .0,
            encoder
        );
        // Building for 8 supersedes neither of the others (they serve other configurations); a rebuild for 4
        // from a new ONNX supersedes the old 4.
        let eight = with_prompts(8);
        assert!(superseded(dir.path(), &eight).is_empty());
        let new_four = EngineKey {
            onnx_sha256: "cc".repeat(32),
            ..with_prompts(4)
        };
        assert_eq!(superseded(dir.path(), &new_four), vec![four.clone()]);
        // The matching engine damaged: corrupt, not stale.
        std::fs::write(&four.plan, b"fo").unwrap();
        let err = select_engine(dir.path(), &RunKey::of(&with_prompts(4))).unwrap_err();
        assert_eq!(err.kind(), EngineErrorKind::Corrupt, "{err}");
        assert!(err.to_string().contains("truncated"), "{err}");
        // A sidecar that does not parse is corrupt too (not "nothing built").
        let other = tempfile::tempdir().unwrap();
        let paths = store(other.path(), &with_prompts(4), b"four");
        std::fs::write(&paths.sidecar, b"{\"key\": 1").unwrap();
        let err = select_engine(other.path(), &RunKey::of(&with_prompts(4))).unwrap_err();
        assert_eq!(err.kind(), EngineErrorKind::Corrupt, "{err}");
        assert!(err.to_string().contains("not an engine sidecar"), "{err}");
    }

    #[test]
    fn sidecar_verifies_plan_bytes() {
        let k = key(Part::Encoder);
        let onnx = OnnxStat {
            path: "/o".into(),
            bytes: 1,
            mtime_ns: 1,
            sha256: String::new(),
        };
        let s = Sidecar::describe(&k, b"abc", onnx, 0.5);
        assert!(s.verify_plan(b"abc").is_ok());
        assert!(s
            .verify_plan(b"ab")
            .unwrap_err()
            .to_string()
            .contains("truncated"));
        assert!(s
            .verify_plan(b"abd")
            .unwrap_err()
            .to_string()
            .contains("corrupt"));
        assert_eq!(s.plan_file, format!("{}.plan", k.file_stem()));
    }

    #[test]
    fn onnx_hash_is_reused_only_for_an_unchanged_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("encoder.onnx");
        std::fs::write(&path, b"model v1").unwrap();
        let first = OnnxStat::of(&path, &[]).unwrap();
        assert_eq!(first.sha256, hex(&Sha256::digest(b"model v1")));
        // A recorded stat with the same size and mtime is trusted (no re-hash): prove it with a fake hash.
        let fake = OnnxStat {
            sha256: "ff".repeat(32),
            ..first.clone()
        };
        assert_eq!(
            OnnxStat::of(&path, std::slice::from_ref(&fake))
                .unwrap()
                .sha256,
            "ff".repeat(32)
        );
        // Any change of size or mtime means hashing again.
        std::fs::write(&path, b"model v2 longer").unwrap();
        assert_eq!(
            OnnxStat::of(&path, &[fake]).unwrap().sha256,
            hex(&Sha256::digest(b"model v2 longer"))
        );
    }

    #[test]
    fn chunks_cover_everything_in_order() {
        assert_eq!(chunk_ranges(0, 4), Vec::<Range<usize>>::new());
        assert_eq!(chunk_ranges(3, 4), vec![0..3]);
        assert_eq!(chunk_ranges(4, 4), vec![0..4]);
        assert_eq!(chunk_ranges(117, 4).len(), 30);
        assert_eq!(chunk_ranges(117, 4).last(), Some(&(116..117)));
        assert_eq!(chunk_ranges(5, 2), vec![0..2, 2..4, 4..5]);
        assert_eq!(chunk_ranges(2, 0), vec![0..1, 1..2]);
        for total in 0..20 {
            for max in 1..6 {
                let c = chunk_ranges(total, max);
                let flat: Vec<usize> = c.iter().flat_map(|r| r.clone()).collect();
                assert_eq!(flat, (0..total).collect::<Vec<_>>());
                assert!(c.iter().all(|r| !r.is_empty() && r.len() <= max));
            }
        }
    }
}
