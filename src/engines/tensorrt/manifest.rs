//! The exported ONNX models that engines are built from: a folder written by `vista3d export-onnx` with
//! `encoder.onnx`, `class_head.onnx` and `manifest.json`.
//!
//! `manifest.json` holds at least `{"weights_fingerprint": "<16 hex>", "embed_dim": N, "opset": 17,
//! "files": {...}}`. `files` maps a part name (`encoder`, `class_head`) to its file, either as a string or as an
//! object with a `path` (or `file`) key; a part it does not name is `<part>.onnx`. FP16 engines are built from
//! `<part>_fp16` when `files` has it (the float16 export that TensorRT 11's strongly typed networks need), else
//! from `<part>` as before (TensorRT 10's FP16 builder flag).

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use super::cache::{Part, Precision};

/// The ONNX model an engine is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnnxSource {
    pub path: PathBuf,
    /// The model itself is float16 (weights and compute; `files.<part>_fp16`): its types decide the engine's
    /// precision, no FP16 builder flag needed.
    pub fp16_model: bool,
}

/// The manifest of an ONNX export folder.
#[derive(Debug, Clone, PartialEq)]
pub struct OnnxManifest {
    /// The folder that holds the manifest and the models.
    pub dir: PathBuf,
    /// Identifies the checkpoint the models were exported from (16 lowercase hex digits).
    pub weights_fingerprint: String,
    /// The network width (`encoder_embed_dim`): channels of the encoder's features.
    pub embed_dim: i64,
    /// ONNX opset of the export.
    pub opset: i64,
    /// The `files` object as written.
    pub files: Value,
}

impl OnnxManifest {
    /// Reads and checks `<dir>/manifest.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("manifest.json");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "cannot read {} (export the models first: vista3d export-onnx --out {})",
                path.display(),
                dir.display()
            )
        })?;
        Self::parse(dir, &text).with_context(|| format!("{}", path.display()))
    }

    /// Parses manifest text for the export folder `dir`.
    pub fn parse(dir: &Path, text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text).context("not valid JSON")?;
        let fingerprint = value
            .get("weights_fingerprint")
            .and_then(Value::as_str)
            .context("no \"weights_fingerprint\" string")?;
        ensure!(
            fingerprint.len() == 16
                && fingerprint
                    .chars()
                    .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)),
            "\"weights_fingerprint\" must be 16 lowercase hex digits, got {fingerprint:?}"
        );
        let embed_dim = value
            .get("embed_dim")
            .and_then(Value::as_i64)
            .context("no integer \"embed_dim\"")?;
        ensure!(
            embed_dim > 0,
            "\"embed_dim\" must be positive, got {embed_dim}"
        );
        let opset = value
            .get("opset")
            .and_then(Value::as_i64)
            .context("no integer \"opset\"")?;
        let files = value.get("files").cloned().unwrap_or(Value::Null);
        ensure!(
            files.is_object() || files.is_null(),
            "\"files\" must be an object"
        );
        Ok(Self {
            dir: dir.to_path_buf(),
            weights_fingerprint: fingerprint.to_string(),
            embed_dim,
            opset,
            files,
        })
    }

    /// The ONNX file of `part`.
    pub fn onnx_path(&self, part: Part) -> Result<PathBuf> {
        Ok(self
            .listed(part.name())?
            .unwrap_or_else(|| self.dir.join(format!("{}.onnx", part.name()))))
    }

    /// The file `files.<key>` names (`None` when absent or null), resolved against the folder.
    fn listed(&self, key: &str) -> Result<Option<PathBuf>> {
        let name = match self.files.get(key) {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Object(o)) => match o.get("path").or_else(|| o.get("file")) {
                Some(Value::String(s)) => s.clone(),
                _ => bail!("\"files\".\"{key}\" has no \"path\" string"),
            },
            Some(other) => bail!("\"files\".\"{key}\" must be a file name, got {other}"),
        };
        let path = Path::new(&name);
        Ok(Some(if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.dir.join(path)
        }))
    }

    /// The ONNX model an engine of `part` in `precision` is built from: for FP16 the float16 export
    /// (`files.<part>_fp16`) when the manifest lists one, else the float32 `<part>` model.
    pub fn onnx_for(&self, part: Part, precision: Precision) -> Result<OnnxSource> {
        if precision == Precision::Fp16 {
            if let Some(path) = self.listed(&format!("{}_fp16", part.name()))? {
                return Ok(OnnxSource {
                    path,
                    fp16_model: true,
                });
            }
        }
        Ok(OnnxSource {
            path: self.onnx_path(part)?,
            fp16_model: false,
        })
    }

    /// [`OnnxManifest::onnx_for`], checked to exist and be non-empty.
    pub fn existing_onnx_for(&self, part: Part, precision: Precision) -> Result<OnnxSource> {
        let source = self.onnx_for(part, precision)?;
        check_model_file(&self.dir, part, &source.path)?;
        Ok(source)
    }

    /// The ONNX file of `part`, checked to exist and be non-empty.
    pub fn existing_onnx(&self, part: Part) -> Result<PathBuf> {
        let path = self.onnx_path(part)?;
        check_model_file(&self.dir, part, &path)?;
        Ok(path)
    }
}

/// Checks that the model `path` of `part` listed by the manifest in `dir` exists and is non-empty.
fn check_model_file(dir: &Path, part: Part, path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path).with_context(|| {
        format!(
            "the {} model {} is missing (listed by {})",
            part.name(),
            path.display(),
            dir.join("manifest.json").display()
        )
    })?;
    ensure!(
        meta.is_file() && meta.len() > 0,
        "{} is empty or not a file",
        path.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"weights_fingerprint": "0123456789abcdef", "embed_dim": 16, "opset": 17,
        "files": {"encoder": "enc.onnx", "class_head": {"path": "head.onnx", "sha256": "x"}}}"#;

    #[test]
    fn parses_and_resolves_files() {
        let m = OnnxManifest::parse(Path::new("/x"), GOOD).unwrap();
        assert_eq!(m.weights_fingerprint, "0123456789abcdef");
        assert_eq!(m.embed_dim, 16);
        assert_eq!(m.opset, 17);
        assert_eq!(
            m.onnx_path(Part::Encoder).unwrap(),
            PathBuf::from("/x/enc.onnx")
        );
        assert_eq!(
            m.onnx_path(Part::ClassHead).unwrap(),
            PathBuf::from("/x/head.onnx")
        );
        let plain = OnnxManifest::parse(
            Path::new("d"),
            r#"{"weights_fingerprint": "0123456789abcdef", "embed_dim": 48, "opset": 17, "files": {}}"#,
        )
        .unwrap();
        assert_eq!(
            plain.onnx_path(Part::ClassHead).unwrap(),
            PathBuf::from("d/class_head.onnx")
        );
    }

    #[test]
    fn rejects_bad_manifests() {
        for (text, needle) in [
            ("[]", "weights_fingerprint"),
            (
                r#"{"weights_fingerprint": "XYZ", "embed_dim": 16, "opset": 17}"#,
                "16 lowercase hex",
            ),
            (
                r#"{"weights_fingerprint": "0123456789abcdef", "opset": 17}"#,
                "embed_dim",
            ),
            (
                r#"{"weights_fingerprint": "0123456789abcdef", "embed_dim": 0, "opset": 17}"#,
                "positive",
            ),
            (
                r#"{"weights_fingerprint": "0123456789abcdef", "embed_dim": 8}"#,
                "opset",
            ),
            (
                r#"{"weights_fingerprint": "0123456789abcdef", "embed_dim": 8, "opset": 17, "files": 3}"#,
                "object",
            ),
            ("{", "JSON"),
        ] {
            let err = OnnxManifest::parse(Path::new("."), text).unwrap_err();
            assert!(format!("{err:#}").contains(needle), "{text}: {err:#}");
        }
    }

    #[test]
    fn fp16_engines_use_the_fp16_export_when_listed() {
        // An export with fp16 files (as `vista3d export-onnx` writes it).
        let with_fp16 = OnnxManifest::parse(
            Path::new("/e"),
            r#"{"weights_fingerprint": "0123456789abcdef", "embed_dim": 16, "opset": 17, "files": {
                "encoder": {"path": "encoder.onnx", "sha256": "a", "precision": "fp32"},
                "class_head": {"path": "class_head.onnx", "sha256": "b", "precision": "fp32"},
                "encoder_fp16": {"path": "encoder_fp16.onnx", "sha256": "c", "precision": "fp16"},
                "class_head_fp16": {"path": "class_head_fp16.onnx", "sha256": "d", "precision": "fp16"}}}"#,
        )
        .unwrap();
        for (part, file) in [(Part::Encoder, "encoder"), (Part::ClassHead, "class_head")] {
            assert_eq!(
                with_fp16.onnx_for(part, Precision::Fp16).unwrap(),
                OnnxSource {
                    path: PathBuf::from(format!("/e/{file}_fp16.onnx")),
                    fp16_model: true
                }
            );
            assert_eq!(
                with_fp16.onnx_for(part, Precision::Tf32).unwrap(),
                OnnxSource {
                    path: PathBuf::from(format!("/e/{file}.onnx")),
                    fp16_model: false
                }
            );
        }
        // An older export (no fp16 files, or no `files` at all): fp16 builds from the fp32 model as before.
        for text in [
            GOOD,
            r#"{"weights_fingerprint": "0123456789abcdef", "embed_dim": 16, "opset": 17}"#,
        ] {
            let old = OnnxManifest::parse(Path::new("/e"), text).unwrap();
            for part in Part::ALL {
                let fp16 = old.onnx_for(part, Precision::Fp16).unwrap();
                assert!(!fp16.fp16_model);
                assert_eq!(fp16.path, old.onnx_path(part).unwrap());
                assert_eq!(old.onnx_for(part, Precision::Tf32).unwrap(), fp16);
            }
        }
        // A malformed fp16 entry is an error naming it, not a silent fallback.
        let bad = OnnxManifest::parse(
            Path::new("/e"),
            r#"{"weights_fingerprint": "0123456789abcdef", "embed_dim": 16, "opset": 17,
                "files": {"encoder_fp16": 5}}"#,
        )
        .unwrap();
        let err = bad.onnx_for(Part::Encoder, Precision::Fp16).unwrap_err();
        assert!(format!("{err:#}").contains("encoder_fp16"), "{err:#}");
        // Existence is checked on the file actually chosen.
        let dir = tempfile::tempdir().unwrap();
        let m = OnnxManifest::parse(
            dir.path(),
            r#"{"weights_fingerprint": "0123456789abcdef", "embed_dim": 16, "opset": 17,
                "files": {"encoder_fp16": {"path": "encoder_fp16.onnx"}}}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("encoder.onnx"), b"onnx").unwrap();
        assert!(m.existing_onnx_for(Part::Encoder, Precision::Tf32).is_ok());
        let err = m
            .existing_onnx_for(Part::Encoder, Precision::Fp16)
            .unwrap_err();
        assert!(format!("{err:#}").contains("encoder_fp16.onnx"), "{err:#}");
    }

    #[test]
    fn missing_model_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let m = OnnxManifest::parse(dir.path(), GOOD).unwrap();
        let err = m.existing_onnx(Part::Encoder).unwrap_err();
        assert!(format!("{err:#}").contains("enc.onnx"), "{err:#}");
        std::fs::write(dir.path().join("enc.onnx"), b"").unwrap();
        let err = m.existing_onnx(Part::Encoder).unwrap_err();
        assert!(format!("{err:#}").contains("empty"), "{err:#}");
        std::fs::write(dir.path().join("enc.onnx"), b"onnx").unwrap();
        assert!(m.existing_onnx(Part::Encoder).is_ok());
    }
}
