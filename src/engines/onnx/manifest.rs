//! `manifest.json` of an ONNX export directory: what was exported, from which weights, with which interface.
//! Engines (ONNX Runtime, TensorRT builds and runs) read it, and only it, to check they match the loaded model;
//! [`OnnxManifest::model`] maps a [`Part`] and a [`FloatType`] to its file.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::engines::EngineError;

/// File name of the manifest inside an export directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Value of [`OnnxManifest::format`].
pub const MANIFEST_FORMAT: &str = "vista3d-onnx";
/// Version of the manifest layout; bumped when a field changes meaning. v2: the encoder's `features` are the
/// class head's mapped features (`image_post_mapping` moved from the class head into the encoder, so it runs once
/// per window); a v1 export is stale.
pub const MANIFEST_VERSION: u32 = 2;

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

/// The floating-point type of an exported graph's weights and compute (a property of the file, not a request
/// method: [`crate::engines::Method`] is the only "precision" a request names). Graph inputs and outputs are
/// float32 in both: a float16 graph casts at its boundaries and computes every InstanceNormalization in float32.
/// Written as `fp32` / `fp16` in the manifest (its `precision` field).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
pub enum FloatType {
    /// float32 weights and compute (`encoder.onnx`, `class_head.onnx`).
    #[default]
    #[serde(rename = "fp32")]
    F32,
    /// float16 weights and compute (`encoder_fp16.onnx`, `class_head_fp16.onnx`): what a strongly typed
    /// TensorRT network (TensorRT 11) needs for an FP16 engine.
    #[serde(rename = "fp16")]
    F16,
}

impl FloatType {
    /// Both, in export order.
    pub const ALL: [FloatType; 2] = [FloatType::F32, FloatType::F16];

    /// `fp32` or `fp16`, as written in the manifest.
    pub fn name(self) -> &'static str {
        match self {
            FloatType::F32 => "fp32",
            FloatType::F16 => "fp16",
        }
    }
}

impl std::fmt::Display for FloatType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The two exported networks of the class path (each one ONNX file per [`FloatType`], and one TensorRT engine
/// per TensorRT method).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Part {
    /// `image` `[b,1,H,W,D]` -> `features` `[b,E,H,W,D]`: encoder, automatic decoder and the class head's
    /// `image_post_mapping` (everything computed once per window).
    Encoder,
    /// Mapped `features` `[b,E,H,W,D]`, `class_ids` `[B,1]` -> `logits` `[B,b,H,W,D]`: class embeddings, MLP and
    /// the per-voxel product (the prompt-dependent part).
    ClassHead,
}

impl Part {
    /// Both parts, in export and build order.
    pub const ALL: [Part; 2] = [Part::Encoder, Part::ClassHead];

    /// `encoder` or `class_head` (manifest keys, file names).
    pub fn name(self) -> &'static str {
        match self {
            Part::Encoder => "encoder",
            Part::ClassHead => "class_head",
        }
    }

    /// The input tensor names, in order.
    pub fn input_names(self) -> &'static [&'static str] {
        match self {
            Part::Encoder => &["image"],
            Part::ClassHead => &["features", "class_ids"],
        }
    }

    /// The output tensor name.
    pub fn output_name(self) -> &'static str {
        match self {
            Part::Encoder => "features",
            Part::ClassHead => "logits",
        }
    }
}

/// One exported ONNX file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelEntry {
    /// File name inside the export directory.
    pub file: String,
    /// Type of the weights and compute (`precision` in the file; absent in manifests written before fp16
    /// exports: fp32).
    #[serde(default, rename = "precision")]
    pub float_type: FloatType,
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
    /// `image [b,1,H,W,D]` -> mapped `features [b,E,H,W,D]` (see [`Part::Encoder`]).
    pub encoder: ModelEntry,
    /// Mapped `features [b,E,H,W,D]`, `class_ids [B,1]` -> `logits [B,b,H,W,D]` (see [`Part::ClassHead`]).
    pub class_head: ModelEntry,
    /// The encoder with float16 weights and compute (same interface); absent in older exports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder_fp16: Option<ModelEntry>,
    /// The class head with float16 weights and compute (same interface); absent in older exports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_head_fp16: Option<ModelEntry>,
}

impl OnnxManifest {
    /// Reads and checks `<dir>/manifest.json`. Every problem is an error naming the directory: no directory or
    /// no manifest is [`EngineError::Unavailable`] (nothing exported yet), a manifest that does not parse or is
    /// not an export manifest is [`EngineError::Corrupt`], one of another layout version is
    /// [`EngineError::Stale`]. Manifests written before the `files` index was dropped still read (the index is
    /// ignored).
    pub fn read(dir: &Path) -> Result<Self, EngineError> {
        let path = dir.join(MANIFEST_FILE);
        if !dir.is_dir() {
            return Err(EngineError::Unavailable(format!(
                "no ONNX export: {} does not exist (create it with `vista3d export-onnx --checkpoint model.pt --out {}`)",
                path.display(),
                dir.display()
            )));
        }
        if !path.exists() {
            return Err(EngineError::Unavailable(format!(
                "{} has no {MANIFEST_FILE}: not a complete ONNX export (re-run `vista3d export-onnx --out {}`)",
                dir.display(),
                dir.display()
            )));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| {
            EngineError::Corrupt(format!(
                "{}: cannot read it ({e}): not a complete ONNX export (re-run `vista3d export-onnx`)",
                path.display()
            ))
        })?;
        Self::parse(&path, &text)
    }

    /// Parses the text of the manifest at `path` (named in errors).
    pub fn parse(path: &Path, text: &str) -> Result<Self, EngineError> {
        let m: OnnxManifest = serde_json::from_str(text).map_err(|e| {
            EngineError::Corrupt(format!(
                "{} is not a valid ONNX export manifest ({e}): re-run `vista3d export-onnx`",
                path.display()
            ))
        })?;
        if m.format != MANIFEST_FORMAT {
            return Err(EngineError::Corrupt(format!(
                "{}: format {:?} is not {MANIFEST_FORMAT}: not a vista3d ONNX export manifest",
                path.display(),
                m.format
            )));
        }
        if m.format_version != MANIFEST_VERSION {
            return Err(EngineError::Stale(format!(
                "{}: manifest layout v{} is not v{MANIFEST_VERSION}: re-run `vista3d export-onnx`",
                path.display(),
                m.format_version
            )));
        }
        Ok(m)
    }

    /// Checks that the export was made from the weights whose
    /// [`weights_fingerprint`](crate::engines::fingerprint::weights_fingerprint) is `expected`
    /// ([`EngineError::Stale`] naming both and the command that re-exports otherwise).
    pub fn check_fingerprint(&self, dir: &Path, expected: &str) -> Result<(), EngineError> {
        if self.weights_fingerprint == expected {
            return Ok(());
        }
        Err(EngineError::Stale(format!(
            "stale ONNX export in {}: it was exported from weights {} ({}), the loaded model's weights are {}; \
             re-run `vista3d export-onnx --checkpoint <model> --out {}`",
            dir.display(),
            self.weights_fingerprint,
            self.weights.describe(),
            expected,
            dir.display()
        )))
    }

    /// The encoder and class-head entries of `float_type` (`None` for fp16 in an export without fp16 files).
    pub fn models(&self, float_type: FloatType) -> Option<(&ModelEntry, &ModelEntry)> {
        Some((
            self.model(Part::Encoder, float_type)?,
            self.model(Part::ClassHead, float_type)?,
        ))
    }

    /// The entry of `part` in `float_type` (`None` for fp16 in an export without fp16 files).
    pub fn model(&self, part: Part, float_type: FloatType) -> Option<&ModelEntry> {
        match (part, float_type) {
            (Part::Encoder, FloatType::F32) => Some(&self.encoder),
            (Part::ClassHead, FloatType::F32) => Some(&self.class_head),
            (Part::Encoder, FloatType::F16) => self.encoder_fp16.as_ref(),
            (Part::ClassHead, FloatType::F16) => self.class_head_fp16.as_ref(),
        }
    }
}

#[cfg(test)]
impl OnnxManifest {
    /// A manifest of a width-8 export (with or without float16 entries) for unit tests; no files behind it.
    pub(crate) fn example(with_fp16: bool) -> Self {
        let entry = |file: &str, float_type| ModelEntry {
            file: file.into(),
            float_type,
            bytes: 4,
            sha256: "ab".repeat(32),
            inputs: vec![TensorSpec::float32(
                "image",
                vec![Dim::Symbolic("b".into())],
            )],
            outputs: Vec::new(),
        };
        OnnxManifest {
            format: MANIFEST_FORMAT.into(),
            format_version: MANIFEST_VERSION,
            vista3d_version: "0.1.0".into(),
            opset: 17,
            ir_version: 8,
            weights_fingerprint: "0123456789abcdef".into(),
            embed_dim: 8,
            n_classes: 512,
            weights: WeightsSource::random(8, 0),
            encoder: entry("encoder.onnx", FloatType::F32),
            class_head: entry("class_head.onnx", FloatType::F32),
            encoder_fp16: with_fp16.then(|| entry("encoder_fp16.onnx", FloatType::F16)),
            class_head_fp16: with_fp16.then(|| entry("class_head_fp16.onnx", FloatType::F16)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engines::EngineErrorKind;

    fn manifest() -> OnnxManifest {
        OnnxManifest::example(true)
    }

    #[test]
    fn parts_and_float_types_map_to_entries() {
        let m = manifest();
        assert_eq!(m.model(Part::Encoder, FloatType::F32), Some(&m.encoder));
        assert_eq!(
            m.model(Part::ClassHead, FloatType::F16),
            m.class_head_fp16.as_ref()
        );
        assert_eq!(
            m.models(FloatType::F16).unwrap().0.file,
            "encoder_fp16.onnx"
        );
        let old = OnnxManifest {
            encoder_fp16: None,
            class_head_fp16: None,
            ..m
        };
        assert!(old.models(FloatType::F16).is_none());
        assert!(old.model(Part::ClassHead, FloatType::F32).is_some());
        // The on-disk word stays `precision`.
        let json = serde_json::to_value(&old).unwrap();
        assert_eq!(json["encoder"]["precision"], "fp32");
        assert!(json.get("encoder_fp16").is_none());
    }

    #[test]
    fn reading_classifies_every_problem() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none");
        let err = OnnxManifest::read(&missing).unwrap_err();
        assert_eq!(err.kind(), EngineErrorKind::Unavailable);
        assert!(err.to_string().contains("none/manifest.json"), "{err}");
        let err = OnnxManifest::read(dir.path()).unwrap_err();
        assert_eq!(err.kind(), EngineErrorKind::Unavailable);
        assert!(
            err.to_string().contains("not a complete ONNX export"),
            "{err}"
        );

        let path = dir.path().join(MANIFEST_FILE);
        let write = |v: &serde_json::Value| std::fs::write(&path, v.to_string()).unwrap();
        let good = serde_json::to_value(manifest()).unwrap();
        write(&good);
        assert_eq!(OnnxManifest::read(dir.path()).unwrap(), manifest());
        // A manifest of an older vista3d with the `files` index: still read, the index ignored.
        let mut old = good.clone();
        old["files"] = serde_json::json!({"encoder": {"path": "encoder.onnx"}});
        write(&old);
        assert_eq!(OnnxManifest::read(dir.path()).unwrap(), manifest());

        for (value, kind, needle) in [
            (
                serde_json::json!({"weights_fingerprint": "x"}),
                EngineErrorKind::Corrupt,
                "not a valid",
            ),
            (
                {
                    let mut v = good.clone();
                    v["format"] = "other".into();
                    v
                },
                EngineErrorKind::Corrupt,
                "is not vista3d-onnx",
            ),
            (
                {
                    let mut v = good.clone();
                    v["format_version"] = 1.into();
                    v
                },
                EngineErrorKind::Stale,
                "layout v1",
            ),
        ] {
            write(&value);
            let err = OnnxManifest::read(dir.path()).unwrap_err();
            assert_eq!(err.kind(), kind, "{err}");
            assert!(err.to_string().contains(needle), "{err}");
        }
        std::fs::write(&path, b"{").unwrap();
        assert_eq!(
            OnnxManifest::read(dir.path()).unwrap_err().kind(),
            EngineErrorKind::Corrupt
        );
    }

    #[test]
    fn other_weights_are_stale() {
        let m = manifest();
        assert!(m
            .check_fingerprint(Path::new("onnx"), "0123456789abcdef")
            .is_ok());
        let err = m
            .check_fingerprint(Path::new("onnx"), "fedcba9876543210")
            .unwrap_err();
        assert_eq!(err.kind(), EngineErrorKind::Stale);
        let msg = err.to_string();
        assert!(
            msg.contains("0123456789abcdef") && msg.contains("fedcba9876543210"),
            "{msg}"
        );
        assert!(msg.contains("vista3d export-onnx"), "{msg}");
    }
}
