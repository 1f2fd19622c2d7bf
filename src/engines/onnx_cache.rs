//! The ONNX export of the loaded weights in the cache directory, made on first use: what lets `auto` (and
//! `ort`) run ONNX Runtime on a CPU without any manual step.
//!
//! The export lives in `<cache_dir>/<weights fingerprint>/onnx` (where the segmenter looks for it). When it is
//! missing, of another layout (a manifest of an older version: stale) or damaged, [`ensure_export`] writes a new
//! one into a temporary sibling folder and renames it into place, so a reader never sees half an export and two
//! processes exporting at once both end with a complete one (the loser of the rename uses the winner's).
//! `vista3d export-onnx --checkpoint ... --out <dir>` with `onnx_dir: <dir>` still works for an export made
//! elsewhere; an explicit `onnx_dir` is never written to.

use std::path::{Path, PathBuf};

use tch::nn::VarStore;

use super::onnx::{export_onnx, OnnxManifest, WeightsSource};
use super::EngineError;

/// Sub-folder of `<cache_dir>/<fingerprint>` holding the export.
pub const ONNX_SUBDIR: &str = "onnx";

/// Where the export of the weights with `fingerprint` is kept in `cache_dir`.
pub fn export_dir(cache_dir: &Path, fingerprint: &str) -> PathBuf {
    cache_dir.join(fingerprint).join(ONNX_SUBDIR)
}

/// Whether `dir` holds a current export (this manifest version, readable) of the weights `fingerprint`.
fn usable(dir: &Path, fingerprint: &str) -> Result<(), EngineError> {
    OnnxManifest::read(dir)?.check_fingerprint(dir, fingerprint)
}

/// The folder of a current export of the weights in `vs` (whose fingerprint is `fingerprint`) in `cache_dir`,
/// exported now when there is none (see the module documentation). Errors: [`EngineError::Runtime`] when the
/// export cannot be written (the caller falls back to libtorch and records why).
pub fn ensure_export(
    cache_dir: &Path,
    fingerprint: &str,
    vs: &VarStore,
    source: &WeightsSource,
) -> Result<PathBuf, EngineError> {
    let dir = export_dir(cache_dir, fingerprint);
    match usable(&dir, fingerprint) {
        Ok(()) => return Ok(dir),
        Err(e) if dir.exists() => {
            log::info!("replacing the cached ONNX export: {e}")
        }
        Err(_) => {}
    }
    let parent = dir
        .parent()
        .ok_or_else(|| EngineError::Runtime(format!("{} has no parent", dir.display())))?;
    let write_error = |what: &str, e: &dyn std::fmt::Display| {
        EngineError::Runtime(format!(
            "cannot {what} the ONNX export in the cache ({}): {e}",
            dir.display()
        ))
    };
    std::fs::create_dir_all(parent).map_err(|e| write_error("create", &e))?;
    let t0 = std::time::Instant::now();
    log::info!(
        "exporting the weights to ONNX for ONNX Runtime (once per weights) into {}",
        dir.display()
    );
    let tmp = crate::fsutil::temporary_sibling(&dir);
    let exported =
        export_onnx(vs, source, &tmp).map_err(|e| write_error("write", &format!("{e:#}")));
    let exported = exported.and_then(|summary| {
        if summary.manifest.weights_fingerprint == fingerprint {
            Ok(())
        } else {
            Err(EngineError::Runtime(format!(
                "the ONNX export of the loaded weights has fingerprint {}, not {fingerprint}",
                summary.manifest.weights_fingerprint
            )))
        }
    });
    if let Err(e) = exported {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    // Move a stale or damaged export out of the way first (a rename onto a non-empty folder fails).
    if dir.exists() && usable(&dir, fingerprint).is_err() {
        let old = crate::fsutil::temporary_sibling(&dir);
        if std::fs::rename(&dir, &old).is_ok() {
            let _ = std::fs::remove_dir_all(&old);
        }
    }
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => {
            log::info!("ONNX export written in {:.1} s", t0.elapsed().as_secs_f64());
            Ok(dir)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            // Another process put its export there first: use it if it is current.
            usable(&dir, fingerprint)
                .map(|()| dir.clone())
                .map_err(|_| write_error("move into place", &e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engines::fingerprint::weights_fingerprint;
    use crate::engines::onnx::MANIFEST_FILE;
    use crate::engines::EngineErrorKind;
    use crate::{Vista3d, Vista3dConfig};
    use tch::{nn, Device};

    fn weights(seed: i64) -> (VarStore, String) {
        tch::manual_seed(seed);
        let vs = nn::VarStore::new(Device::Cpu);
        Vista3d::new(&vs.root(), Vista3dConfig::with_width(8)).unwrap();
        let fp = weights_fingerprint(&vs);
        (vs, fp)
    }

    #[test]
    fn exports_once_into_the_fingerprint_folder_and_replaces_stale_exports() {
        let cache = tempfile::tempdir().unwrap();
        let (vs, fp) = weights(3);
        let source = WeightsSource::random(8, 3);
        let dir = ensure_export(cache.path(), &fp, &vs, &source).unwrap();
        assert_eq!(dir, cache.path().join(&fp).join("onnx"));
        let manifest = OnnxManifest::read(&dir).unwrap();
        assert_eq!(manifest.weights_fingerprint, fp);
        // Nothing else is left beside it (the temporary folder was renamed).
        let siblings: Vec<_> = std::fs::read_dir(cache.path().join(&fp))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(siblings, vec![std::ffi::OsString::from("onnx")]);
        // A second call uses it as it is (not rewritten).
        let before = std::fs::metadata(dir.join(MANIFEST_FILE))
            .unwrap()
            .modified()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(ensure_export(cache.path(), &fp, &vs, &source).unwrap(), dir);
        let after = std::fs::metadata(dir.join(MANIFEST_FILE))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(before, after);
        // An export of an older layout (manifest v1) is stale: replaced by a current one.
        let text = std::fs::read_to_string(dir.join(MANIFEST_FILE)).unwrap();
        let mut old: serde_json::Value = serde_json::from_str(&text).unwrap();
        old["format_version"] = 1.into();
        std::fs::write(dir.join(MANIFEST_FILE), old.to_string()).unwrap();
        assert_eq!(
            OnnxManifest::read(&dir).unwrap_err().kind(),
            EngineErrorKind::Stale
        );
        assert_eq!(ensure_export(cache.path(), &fp, &vs, &source).unwrap(), dir);
        assert_eq!(
            OnnxManifest::read(&dir).unwrap().format_version,
            crate::engines::onnx::manifest::MANIFEST_VERSION
        );
        // Other weights get their own folder.
        let (other, other_fp) = weights(4);
        let other_dir = ensure_export(cache.path(), &other_fp, &other, &source).unwrap();
        assert_ne!(other_dir, dir);
        assert!(usable(&dir, &fp).is_ok() && usable(&other_dir, &other_fp).is_ok());
    }

    #[test]
    fn an_unwritable_cache_is_a_runtime_error_and_leaves_nothing() {
        let cache = tempfile::tempdir().unwrap();
        let (vs, fp) = weights(3);
        // The fingerprint folder is a file: nothing can be created under it.
        std::fs::write(cache.path().join(&fp), b"not a folder").unwrap();
        let err = ensure_export(cache.path(), &fp, &vs, &WeightsSource::random(8, 3)).unwrap_err();
        assert_eq!(err.kind(), EngineErrorKind::Runtime, "{err}");
        assert!(err.to_string().contains("cannot create"), "{err}");
        // A wrong fingerprint is refused and its temporary export removed.
        let err =
            ensure_export(cache.path(), "0000", &vs, &WeightsSource::random(8, 3)).unwrap_err();
        assert!(err.to_string().contains("not 0000"), "{err}");
        let left: Vec<_> = std::fs::read_dir(cache.path().join("0000"))
            .unwrap()
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
}
