//! The exported ONNX models that engines are built from: a folder written by `vista3d export-onnx` with
//! `encoder.onnx`, `class_head.onnx` and `manifest.json`.
//!
//! `manifest.json` holds at least `{"weights_fingerprint": "<16 hex>", "embed_dim": N, "opset": 17,
//! "files": {...}}`. `files` maps a part name (`encoder`, `class_head`) to its file, either as a string or as an
//! object with a `path` (or `file`) key; a part it does not name is `<part>.onnx`.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use super::cache::Part;

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
        let name = match self.files.get(part.name()) {
            None | Some(Value::Null) => format!("{}.onnx", part.name()),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Object(o)) => match o.get("path").or_else(|| o.get("file")) {
                Some(Value::String(s)) => s.clone(),
                _ => bail!("\"files\".\"{}\" has no \"path\" string", part.name()),
            },
            Some(other) => bail!(
                "\"files\".\"{}\" must be a file name, got {other}",
                part.name()
            ),
        };
        let path = Path::new(&name);
        Ok(if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.dir.join(path)
        })
    }

    /// The ONNX file of `part`, checked to exist and be non-empty.
    pub fn existing_onnx(&self, part: Part) -> Result<PathBuf> {
        let path = self.onnx_path(part)?;
        let meta = std::fs::metadata(&path).with_context(|| {
            format!(
                "the {} model {} is missing (listed by {})",
                part.name(),
                path.display(),
                self.dir.join("manifest.json").display()
            )
        })?;
        ensure!(
            meta.is_file() && meta.len() > 0,
            "{} is empty or not a file",
            path.display()
        );
        Ok(path)
    }
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
