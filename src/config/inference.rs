//! [`InferenceConfig`]: the typed settings of inference, batch, bench and the server (the bundle's
//! `inference.json` / `batch_inference.json` keys plus vista3d's own), deserialized once from the merged layers.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};

use super::{ConfigError, Origin};
use crate::engines::{AutoCpu, Method};
use crate::inference::memory::StitchDevice;
use crate::inference::window::BlendMode;
use crate::inference::WindowSettings;
use crate::io::OutputDtype;
use crate::prompts::{LabelSpec, RequestPrompts};
use crate::transforms::PreprocessConfig;

/// What happens when the requested method cannot run (`precision_fallback`, `--precision-fallback`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FallbackPolicy {
    /// Fall back to libtorch with a warning, recorded in the output's record (the default: never crash).
    #[default]
    Allow,
    /// Fail the request instead (benchmarks, strict batch jobs): no output is written.
    Deny,
}

impl FromStr for FallbackPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "allow" => Ok(Self::Allow),
            "deny" => Ok(Self::Deny),
            other => Err(format!(
                "unknown precision_fallback '{other}': use allow or deny"
            )),
        }
    }
}

/// Which files a request writes beside its record (`output_format`, `--output-format`). The NIfTI label map is
/// always written (it identifies a finished item and extras are made from it); `dicom-seg` and `both` add a DICOM
/// Segmentation object, which needs a DICOM input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum OutputFormat {
    #[default]
    #[serde(rename = "nifti")]
    Nifti,
    #[serde(rename = "dicom-seg")]
    DicomSeg,
    #[serde(rename = "both")]
    Both,
}

impl OutputFormat {
    /// True when a DICOM SEG is written.
    pub fn wants_seg(self) -> bool {
        matches!(self, OutputFormat::DicomSeg | OutputFormat::Both)
    }
}

impl FromStr for OutputFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().replace('_', "-").as_str() {
            "nifti" => Ok(Self::Nifti),
            "dicom-seg" | "seg" => Ok(Self::DicomSeg),
            "both" => Ok(Self::Both),
            other => Err(format!(
                "unknown output_format '{other}': use nifti, dicom-seg or both"
            )),
        }
    }
}

/// `patch_size`: three sizes, or one size for all axes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PatchSize(pub [usize; 3]);

impl<'de> Deserialize<'de> for PatchSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            One(usize),
            Three([usize; 3]),
        }
        match Raw::deserialize(d) {
            Ok(Raw::One(n)) => Ok(PatchSize([n; 3])),
            Ok(Raw::Three(a)) => Ok(PatchSize(a)),
            Err(_) => Err(serde::de::Error::custom(
                "patch_size must be three positive integers like [128, 128, 128]",
            )),
        }
    }
}

/// Deserializes a type through its `FromStr` (case-insensitive names with helpful errors).
fn from_str<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: std::fmt::Display,
{
    let s = String::deserialize(d)?;
    s.parse().map_err(serde::de::Error::custom)
}

/// The request of a configuration (`input_dict`): image and prompts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InputDict {
    /// Input image path.
    #[serde(default)]
    pub image: Option<String>,
    /// Class ids or names.
    #[serde(default)]
    pub label_prompt: Option<Vec<LabelSpec>>,
    /// Points `[[x, y, z], ...]` in voxel indices of the input image.
    #[serde(default)]
    pub points: Option<Vec<[f64; 3]>>,
    /// One label per point.
    #[serde(default)]
    pub point_labels: Option<Vec<i64>>,
}

impl InputDict {
    /// The prompts of the request.
    pub fn prompts(&self) -> RequestPrompts {
        RequestPrompts {
            label_prompt: self.label_prompt.clone(),
            points: self.points.clone(),
            point_labels: self.point_labels.clone(),
        }
    }
}

/// One item of a batch `--input-list` JSON: an image with its own prompts and method.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListItem {
    /// Input image path (relative paths are relative to the list file).
    pub image: String,
    #[serde(default)]
    pub label_prompt: Option<Vec<LabelSpec>>,
    #[serde(default)]
    pub points: Option<Vec<[f64; 3]>>,
    #[serde(default)]
    pub point_labels: Option<Vec<i64>>,
    /// Method of this item (overrides the configuration's `precision`).
    #[serde(default)]
    pub precision: Option<Method>,
}

impl ListItem {
    /// Parses one list item, rejecting unknown keys with a suggestion (`lable_prompt` is not ignored).
    pub fn parse(value: &serde_json::Value, origin: Origin) -> Result<Self, ConfigError> {
        let mut unknown = Vec::new();
        let item: Result<ListItem, _> =
            serde_ignored::deserialize(value.clone(), |p| unknown.push(p.to_string()));
        let item = item.map_err(|e| ConfigError::Invalid {
            origin: origin.clone(),
            detail: e.to_string(),
        })?;
        if let Some(key) = unknown.into_iter().next() {
            return Err(ConfigError::UnknownKey {
                suggestion: crate::suggest::closest(
                    &key,
                    super::keys::struct_fields::<ListItem>().iter().copied(),
                ),
                key,
                origin,
            });
        }
        Ok(item)
    }

    /// The prompts of this item.
    pub fn prompts(&self) -> RequestPrompts {
        RequestPrompts {
            label_prompt: self.label_prompt.clone(),
            points: self.points.clone(),
            point_labels: self.point_labels.clone(),
        }
    }
}

/// The settings of inference, batch, bench and the server (defaults: `configs/inference.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InferenceConfig {
    /// Free text (the shipped configs explain themselves here).
    #[serde(rename = "_comment", default, skip_serializing)]
    pub comment: Option<String>,
    /// The request of `vista3d infer` when no flag gives it.
    #[serde(default)]
    pub input_dict: InputDict,
    /// The checkpoint (`--checkpoint` wins).
    #[serde(default)]
    pub ckpt_path: Option<PathBuf>,
    /// Where label maps go: `<output_dir>/<stem>/<stem>_<output_postfix>.nii.gz`.
    pub output_dir: PathBuf,
    pub output_postfix: String,
    /// `float32` (the bundle's), `uint8` or `int16`.
    #[serde(deserialize_with = "from_str")]
    pub output_dtype: OutputDtype,
    /// `nifti` (default), `dicom-seg` or `both` (see [`OutputFormat`]).
    #[serde(default, deserialize_with = "from_str")]
    pub output_format: OutputFormat,
    /// DICOM inputs: the SeriesInstanceUID to read (default: the CT series with the most slices).
    #[serde(default)]
    pub series_uid: Option<String>,
    /// DICOM inputs: modalities accepted besides CT (e.g. `["MR"]`).
    #[serde(default)]
    pub allow_modalities: Vec<String>,
    /// `cpu`, `cuda`, `cuda:N` or `auto`.
    pub device: String,
    /// How the network runs (see [`Method`]).
    pub precision: Method,
    /// `allow` (default) or `deny`: whether a method that cannot run may fall back to libtorch.
    #[serde(default, deserialize_with = "from_str")]
    pub precision_fallback: FallbackPolicy,
    /// What `auto` runs on a CPU: `detect` (default: ONNX Runtime where the CPU has AVX-512, else libtorch fp32
    /// with Winograd's 3x3x3 convolutions where it has AVX2 and FMA), `ort`, `fp32` (libtorch's own convolutions)
    /// or `winograd` (see [`AutoCpu`]).
    #[serde(default, deserialize_with = "from_str")]
    pub auto_cpu: AutoCpu,
    /// Cache of generated artefacts (ONNX exports, TensorRT engines, fingerprints); default
    /// `$XDG_CACHE_HOME/vista3d`, else `~/.cache/vista3d`.
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
    /// ONNX export folder (default: in the cache, keyed by the weights fingerprint).
    #[serde(default)]
    pub onnx_dir: Option<PathBuf>,
    /// TensorRT engine folder (default: in the cache, keyed by the weights fingerprint).
    #[serde(default)]
    pub engines_dir: Option<PathBuf>,
    /// Largest prompt batch of one class-head engine call; selects the engine profile (the bundle's
    /// `inference_trt.json` key).
    pub max_prompt_size: usize,
    /// Target spacing in mm (`<= 0` keeps an axis' spacing).
    pub resample_spacing: [f64; 3],
    pub patch_size: PatchSize,
    /// Effective bundle value 0.25 (its 0.3 never reaches MONAI's inferer).
    pub overlap: f64,
    #[serde(deserialize_with = "from_str")]
    pub mode: BlendMode,
    pub sw_batch_size: usize,
    pub use_point_window: bool,
    /// The classes of a request without prompts ("everything").
    pub everything_labels: Vec<i64>,
    /// Prompts that expand into their parts (kidney, lung, bone).
    pub subclass: BTreeMap<i64, Vec<i64>>,
    /// Largest grid (voxels) an image may be resampled to before any work: a header with a wrong geometry (a
    /// sheared or mis-scaled sform) can turn a small image into billions of voxels. Default 2^30 (4 GiB as
    /// float32; a 1024 x 1024 x 768 CT at 0.5 mm resampled to 1.5 mm has 30 M).
    #[serde(default = "default_max_resampled_voxels")]
    pub max_resampled_voxels: u64,
    /// Memory (GiB) the live stitching sums may take in float32; above it they are kept in float16 (half the
    /// memory, labels agree on >= 99.99% of voxels). Default: what the stitching device has free now, less the
    /// rest of the request.
    #[serde(default)]
    pub stitch_memory_gb: Option<f64>,
    /// Where the stitching sums live when the network runs on a GPU: `auto` (on the GPU when they fit in its free
    /// memory, else in host memory), `device` or `cpu`.
    #[serde(default, deserialize_with = "from_str")]
    pub stitch_device: StitchDevice,
    /// cuDNN autotuning on CUDA (`torch.backends.cudnn.benchmark`); the first windows of each shape are slower.
    #[serde(default = "default_true")]
    pub cudnn_benchmark: bool,
    /// Windows computed at once on the CPU (libtorch fp32), each with an equal share of the threads; their
    /// logits are stitched one window after another in the plan's order. 1 (the default) runs one window at a
    /// time on every thread; 2 was measured 1.03-1.07x faster on a 2-core CPU (README, "Speed and memory"), at
    /// the price of a second window's activations. Engines, GPUs, bf16 and `vista3d serve` run one window at a
    /// time.
    #[serde(default = "default_window_workers")]
    pub window_workers: usize,
    /// `vista3d serve`: the most windows of concurrent requests gathered into one network call (same method and
    /// class prompts only). 1 (the default) runs every window alone, so a served label map equals `vista3d
    /// infer`'s bit for bit whatever the load; larger values trade that for throughput (batched convolutions
    /// round differently: see README, "Server").
    #[serde(default = "default_serve_max_batch_windows")]
    pub serve_max_batch_windows: usize,
    /// `vista3d serve`: how long (milliseconds) the device waits for windows of other requests to fill a batch
    /// once one window is waiting (only when `serve_max_batch_windows` > 1).
    #[serde(default = "default_serve_batch_wait_ms")]
    pub serve_batch_wait_ms: u64,
    /// `vista3d batch`: folder of images (`batch_inference.json`).
    #[serde(default)]
    pub input_dir: Option<PathBuf>,
    /// `vista3d batch`: file name suffix of the images in `input_dir`.
    #[serde(default)]
    pub input_suffix: Option<String>,
}

/// The most windows `window_workers` may compute at once.
pub const MAX_WINDOW_WORKERS: usize = 64;

fn default_true() -> bool {
    true
}

fn default_window_workers() -> usize {
    1
}

fn default_max_resampled_voxels() -> u64 {
    1 << 30
}

fn default_serve_max_batch_windows() -> usize {
    1
}

fn default_serve_batch_wait_ms() -> u64 {
    5
}

impl InferenceConfig {
    /// The built-in defaults.
    pub fn defaults() -> Self {
        super::Config::defaults(super::Schema::Inference)
            .inference()
            .unwrap_or_else(|e| panic!("built-in configs/inference.json: {e}"))
    }

    /// Range checks that types cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |detail: String| {
            Err(ConfigError::Invalid {
                origin: Origin::Builtin("merged configuration"),
                detail,
            })
        };
        let p = self.patch_size.0;
        if p.iter().any(|&x| x == 0 || x % 16 != 0) {
            return bad(format!(
                "patch_size {p:?}: every side must be a positive multiple of 16"
            ));
        }
        if !(0.0..1.0).contains(&self.overlap) {
            return bad(format!("overlap must be in [0, 1), got {}", self.overlap));
        }
        if self.sw_batch_size == 0 {
            return bad("sw_batch_size must be at least 1".into());
        }
        if !(1..=MAX_WINDOW_WORKERS).contains(&self.window_workers) {
            return bad(format!(
                "window_workers must be from 1 to {MAX_WINDOW_WORKERS}, got {}",
                self.window_workers
            ));
        }
        if self.serve_max_batch_windows == 0 {
            return bad(
                "serve_max_batch_windows must be at least 1 (1: no batching across requests)"
                    .into(),
            );
        }
        if self.serve_batch_wait_ms > 10_000 {
            return bad(format!(
                "serve_batch_wait_ms must be at most 10000, got {}",
                self.serve_batch_wait_ms
            ));
        }
        if self
            .stitch_memory_gb
            .is_some_and(|g| !g.is_finite() || g <= 0.0)
        {
            return bad(format!(
                "stitch_memory_gb must be a positive number of GiB, got {:?}",
                self.stitch_memory_gb
            ));
        }
        if self.max_resampled_voxels == 0 {
            return bad("max_resampled_voxels must be at least 1".into());
        }
        if self.max_prompt_size == 0 {
            return bad("max_prompt_size must be at least 1".into());
        }
        if self.resample_spacing.iter().any(|s| !s.is_finite()) {
            return bad(format!(
                "resample_spacing must be finite numbers, got {:?}",
                self.resample_spacing
            ));
        }
        if self.everything_labels.is_empty() {
            return bad("everything_labels is empty".into());
        }
        if self.output_postfix.contains(['/', '\\']) {
            return bad(format!(
                "output_postfix '{}' must not contain a path separator",
                self.output_postfix
            ));
        }
        Ok(())
    }

    /// Sliding-window settings.
    pub fn window(&self) -> WindowSettings {
        WindowSettings {
            patch_size: self.patch_size.0,
            overlap: self.overlap,
            mode: self.mode,
            sw_batch_size: self.sw_batch_size,
            use_point_window: self.use_point_window,
            window_workers: self.window_workers,
            ..WindowSettings::default()
        }
    }

    /// The bundle's preprocessing with this `resample_spacing`.
    pub fn preprocess(&self) -> PreprocessConfig {
        PreprocessConfig {
            spacing: self.resample_spacing,
            ..PreprocessConfig::default()
        }
    }

    /// How DICOM series are chosen and checked.
    pub fn dicom_options(&self) -> crate::io::dicom::DicomOptions {
        crate::io::dicom::DicomOptions {
            series_uid: self.series_uid.clone(),
            allow_modalities: self.allow_modalities.clone(),
            ..Default::default()
        }
    }

    /// The cache of generated artefacts: `cache_dir`, else `$XDG_CACHE_HOME/vista3d`, else
    /// `$HOME/.cache/vista3d`, else `.vista3d-cache` in the working directory.
    pub fn cache_dir(&self) -> PathBuf {
        if let Some(d) = &self.cache_dir {
            return d.clone();
        }
        default_cache_dir()
    }
}

/// `$XDG_CACHE_HOME/vista3d`, else `$HOME/.cache/vista3d`, else `.vista3d-cache`.
pub fn default_cache_dir() -> PathBuf {
    let nonempty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(x) = nonempty("XDG_CACHE_HOME") {
        return PathBuf::from(x).join("vista3d");
    }
    if let Some(h) = nonempty("HOME") {
        return PathBuf::from(h).join(".cache").join("vista3d");
    }
    PathBuf::from(".vista3d-cache")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_are_the_bundles() {
        let c = InferenceConfig::defaults();
        assert_eq!(c.patch_size.0, [128; 3]);
        assert_eq!(c.overlap, 0.25);
        assert_eq!(c.precision, Method::Auto);
        assert_eq!(c.precision_fallback, FallbackPolicy::Allow);
        assert_eq!(c.output_dtype, OutputDtype::Float32);
        assert_eq!(c.max_prompt_size, 4);
        assert!(c.cudnn_benchmark);
        assert_eq!(c.window().window_workers, 1);
        assert_eq!(c.auto_cpu, AutoCpu::Detect);
        assert_eq!(c.window().sw_batch_size, 1);
    }

    #[test]
    fn window_workers_out_of_range_are_refused() {
        for (n, ok) in [
            (0, false),
            (1, true),
            (2, true),
            (MAX_WINDOW_WORKERS + 1, false),
        ] {
            let mut c = InferenceConfig::defaults();
            c.window_workers = n;
            match c.validate() {
                Ok(()) => assert!(ok, "{n} accepted"),
                Err(e) => {
                    assert!(!ok, "{n} refused: {e}");
                    assert!(e.to_string().contains("window_workers"), "{e}");
                }
            }
        }
    }

    #[test]
    fn list_items_reject_unknown_keys() {
        let origin = || Origin::ListItem {
            list: "l.json".into(),
            index: 2,
        };
        let ok = ListItem::parse(
            &json!({"image": "a.nii.gz", "label_prompt": ["spleen", 5], "precision": "torch_fp32"}),
            origin(),
        )
        .unwrap();
        assert_eq!(ok.precision, Some(Method::Fp32));
        let e = ListItem::parse(&json!({"image": "a.nii.gz", "lable_prompt": [3]}), origin())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("'lable_prompt'") && e.contains("item 2 of l.json"),
            "{e}"
        );
        assert!(e.contains("did you mean 'label_prompt'"), "{e}");
        let e = ListItem::parse(&json!({"label_prompt": [3]}), origin())
            .unwrap_err()
            .to_string();
        assert!(e.contains("image"), "{e}");
        let e = ListItem::parse(&json!({"image": "a", "precision": "fp8"}), origin())
            .unwrap_err()
            .to_string();
        assert!(e.contains("fp8"), "{e}");
    }
}
