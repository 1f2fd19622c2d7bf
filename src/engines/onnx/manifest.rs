//! `manifest.json` of an ONNX export directory: what was exported, from which weights, with which interface.
//! Engines (ONNX Runtime here, TensorRT builds) read it to check they match the loaded model.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

/// File name of the manifest inside an export directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Value of [`OnnxManifest::format`].
pub const MANIFEST_FORMAT: &str = "vista3d-onnx";
/// Version of the manifest layout; bumped when a field changes meaning.
pub const MANIFEST_VERSION: u32 = 1;

/// One tensor dimension: a fixed size or a symbolic (dynamic) name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Dim {
    Fixed(i64),
    Symbolic(String),
}

/// Name, element type (`float32` or `int64`) and dims of a graph input or output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: String,
    pub dims: Vec<Dim>,
}

impl TensorSpec {
    /// A float32 tensor.
    pub fn float32(name: &str, dims: Vec<Dim>) -> Self {
        Self {
            name: name.into(),
            dtype: "float32".into(),
            dims,
        }
    }
}

/// Where the exported weights came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WeightsSource {
    /// A checkpoint file, with the sha256 of its bytes.
    Checkpoint { path: String, sha256: String },
    /// Seeded random weights (tests and demos): NOT a trained model.
    Random { width: i64, seed: i64, note: String },
}

impl WeightsSource {
    /// Random weights of `width` from `seed`, labelled as such.
    pub fn random(width: i64, seed: i64) -> Self {
        WeightsSource::Random {
            width,
            seed,
            note: "seeded RANDOM weights: not a trained model, the output means nothing".into(),
        }
    }

    /// One line for logs and ONNX metadata.
    pub fn describe(&self) -> String {
        match self {
            WeightsSource::Checkpoint { path, sha256 } => {
                format!("checkpoint {path} (sha256 {sha256})")
            }
            WeightsSource::Random { width, seed, .. } => {
                format!("seeded random weights (width {width}, seed {seed}): not a trained model")
            }
        }
    }
}

/// The floating-point type an exported graph's weights and compute are in. Graph inputs and outputs are
/// float32 in both (an fp16 graph casts at its boundaries and computes every InstanceNormalization in float32).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum OnnxPrecision {
    /// float32 weights and compute (`encoder.onnx`, `class_head.onnx`).
    #[default]
    Fp32,
    /// float16 weights and compute (`encoder_fp16.onnx`, `class_head_fp16.onnx`): what a strongly typed
    /// TensorRT network (TensorRT 11) needs for an FP16 engine.
    Fp16,
}

impl OnnxPrecision {
    /// Both, in export order.
    pub const ALL: [OnnxPrecision; 2] = [OnnxPrecision::Fp32, OnnxPrecision::Fp16];

    /// `fp32` or `fp16`, as written in the manifest.
    pub fn name(self) -> &'static str {
        match self {
            OnnxPrecision::Fp32 => "fp32",
            OnnxPrecision::Fp16 => "fp16",
        }
    }

    /// Suffix of file names and `files` keys: empty for fp32, `_fp16` for fp16.
    pub fn suffix(self) -> &'static str {
        match self {
            OnnxPrecision::Fp32 => "",
            OnnxPrecision::Fp16 => "_fp16",
        }
    }
}

impl std::fmt::Display for OnnxPrecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One exported ONNX file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelEntry {
    /// File name inside the export directory.
    pub file: String,
    /// Type of the weights and compute (absent in manifests written before fp16 exports: fp32).
    #[serde(default)]
    pub precision: OnnxPrecision,
    /// Size in bytes.
    pub bytes: u64,
    /// sha256 of the file (hex).
    pub sha256: String,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

/// Contents of `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OnnxManifest {
    /// Always [`MANIFEST_FORMAT`].
    pub format: String,
    /// [`MANIFEST_VERSION`].
    pub format_version: u32,
    /// Version of the vista3d that exported.
    pub vista3d_version: String,
    /// ONNX default-domain opset.
    pub opset: i64,
    /// ONNX IR version of the files.
    pub ir_version: i64,
    /// [`crate::engines::fingerprint::weights_fingerprint`] of the exported model's parameters.
    pub weights_fingerprint: String,
    /// `encoder_embed_dim` (E).
    pub embed_dim: i64,
    /// Rows of the class-embedding table (valid class ids are `0..n_classes`).
    pub n_classes: i64,
    pub weights: WeightsSource,
    /// `image [b,1,H,W,D]` -> `features [b,E,H,W,D]`.
    pub encoder: ModelEntry,
    /// `features [b,E,H,W,D]`, `class_ids [B,1]` -> `logits [B,b,H,W,D]`.
    pub class_head: ModelEntry,
    /// The encoder with float16 weights and compute (same interface); absent in older exports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder_fp16: Option<ModelEntry>,
    /// The class head with float16 weights and compute (same interface); absent in older exports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_head_fp16: Option<ModelEntry>,
    /// Every exported file by key (`encoder`, `class_head`, `encoder_fp16`, `class_head_fp16`): the index that
    /// TensorRT's reader ([`crate::engines::tensorrt::manifest`]) resolves. Derived from the entries above.
    #[serde(default)]
    pub files: BTreeMap<String, FileRef>,
}

/// An entry of [`OnnxManifest::files`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRef {
    /// File name inside the export directory.
    pub path: String,
    pub sha256: String,
    pub bytes: u64,
    pub precision: OnnxPrecision,
}

impl FileRef {
    /// The index entry of a model.
    pub fn of(entry: &ModelEntry) -> Self {
        Self {
            path: entry.file.clone(),
            sha256: entry.sha256.clone(),
            bytes: entry.bytes,
            precision: entry.precision,
        }
    }
}

/// The `files` key of a part (`encoder` or `class_head`) in `precision`.
pub fn files_key(part: &str, precision: OnnxPrecision) -> String {
    format!("{part}{}", precision.suffix())
}

impl OnnxManifest {
    /// Reads and checks `<dir>/manifest.json`; every problem is an error naming the directory.
    pub fn read(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!(
                "ONNX export directory {} does not exist (create it with `vista3d export-onnx --checkpoint model.pt --out {}`)",
                dir.display(),
                dir.display()
            );
        }
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "{} has no readable {MANIFEST_FILE}: not a complete ONNX export (re-run `vista3d export-onnx`)",
                dir.display()
            )
        })?;
        let m: OnnxManifest = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a valid ONNX export manifest", path.display()))?;
        ensure!(
            m.format == MANIFEST_FORMAT && m.format_version == MANIFEST_VERSION,
            "{}: format {} v{} is not {MANIFEST_FORMAT} v{MANIFEST_VERSION}: re-run `vista3d export-onnx`",
            path.display(),
            m.format,
            m.format_version
        );
        Ok(m)
    }

    /// The encoder and class-head entries of `precision` (`None` for fp16 in an export without fp16 files).
    pub fn models(&self, precision: OnnxPrecision) -> Option<(&ModelEntry, &ModelEntry)> {
        match precision {
            OnnxPrecision::Fp32 => Some((&self.encoder, &self.class_head)),
            OnnxPrecision::Fp16 => self
                .encoder_fp16
                .as_ref()
                .zip(self.class_head_fp16.as_ref()),
        }
    }
}
