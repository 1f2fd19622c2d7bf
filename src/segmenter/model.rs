//! [`Model`]: the network's weights resident on a device, with the identity of where they came from.
//!
//! A checkpoint is identified cheaply (path, size, mtime and the SHA-256 of its bytes, computed once and cached in
//! the cache directory keyed by path, size and mtime). The tensor fingerprint that ONNX exports and TensorRT engines
//! are keyed by is computed only when an engine needs it, once per process, and cached beside that entry, so the
//! next process does not hash the weights again.

use std::cell::OnceCell;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::{nn, Device};

use crate::engines::fingerprint::weights_fingerprint;
use crate::fsutil::{hex, sha256_file, write_atomic};
use crate::model::Vista3d;
use crate::Vista3dConfig;

/// Where the weights come from.
#[derive(Debug, Clone, PartialEq)]
pub enum WeightsSource {
    /// A checkpoint file (`model.pt`, `.safetensors`, or the trainer's `last.safetensors`).
    Checkpoint(PathBuf),
    /// Seeded random weights of the given width: for demos and tests only, the output means nothing.
    Random { width: i64, seed: i64 },
}

/// A checkpoint file as records identify it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointIdentity {
    pub path: PathBuf,
    pub size: u64,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: u128,
    /// SHA-256 of the file's bytes.
    pub sha256: String,
}

/// What the cache remembers about one checkpoint file (`<cache>/checkpoints/<key>.json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct CacheEntry {
    path: PathBuf,
    size: u64,
    mtime_ns: u128,
    sha256: String,
    #[serde(default)]
    weights_fingerprint: Option<String>,
}

/// A loaded network ready for requests.
pub struct Model {
    pub net: Vista3d,
    pub device: Device,
    pub source: WeightsSource,
    vs: nn::VarStore,
    identity: Option<CheckpointIdentity>,
    cache_dir: PathBuf,
    fingerprint: OnceCell<String>,
}

impl Model {
    /// Bytes of the weights on their device.
    pub fn weight_bytes(&self) -> u64 {
        self.vs
            .variables()
            .values()
            .map(|t| t.numel() as u64 * t.kind().elt_size_in_bytes() as u64)
            .sum()
    }

    /// Loads the weights on `device` (strict checkpoint loading). `cache_dir` holds the checkpoint identities
    /// and fingerprints computed before.
    pub fn load(source: &WeightsSource, device: Device, cache_dir: &Path) -> Result<Self> {
        let (vs, net, identity) = match source {
            WeightsSource::Checkpoint(path) => {
                log::info!(
                    "loading weights from {} on {}",
                    path.display(),
                    device_name(device)
                );
                let m = crate::load_model(path, device, &crate::LoadOptions::default())?;
                let identity = checkpoint_identity(path, cache_dir)?;
                (m.vs, m.net, Some(identity))
            }
            WeightsSource::Random { width, seed } => {
                log::warn!(
                    "using seeded RANDOM weights (width {width}, seed {seed}): the segmentation is meaningless"
                );
                tch::manual_seed(*seed);
                let vs = nn::VarStore::new(device);
                let net = Vista3d::new(&vs.root(), Vista3dConfig::with_width(*width))?;
                (vs, net, None)
            }
        };
        Ok(Self {
            net,
            device,
            source: source.clone(),
            vs,
            identity,
            cache_dir: cache_dir.to_path_buf(),
            fingerprint: OnceCell::new(),
        })
    }

    /// The parameters, under MONAI's names.
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    /// `encoder_embed_dim` of the network.
    pub fn width(&self) -> i64 {
        self.net.config.embed_dim
    }

    /// The checkpoint file's identity (`None` for random weights).
    pub fn identity(&self) -> Option<&CheckpointIdentity> {
        self.identity.as_ref()
    }

    /// The weights' fingerprint if it is known without hashing the tensors (computed earlier in this process or
    /// cached by an earlier one).
    pub fn known_fingerprint(&self) -> Option<String> {
        if let Some(fp) = self.fingerprint.get() {
            return Some(fp.clone());
        }
        let id = self.identity.as_ref()?;
        let fp = read_entry(&self.cache_dir, id)?.weights_fingerprint?;
        let _ = self.fingerprint.set(fp.clone());
        Some(fp)
    }

    /// The weights' fingerprint (what ONNX exports and engines are keyed by): from the cache when an earlier
    /// process computed it, else computed now (once per process) and cached.
    pub fn weights_fingerprint(&self) -> String {
        if let Some(fp) = self.known_fingerprint() {
            return fp;
        }
        self.fingerprint
            .get_or_init(|| {
                let t = std::time::Instant::now();
                log::info!("computing the weights fingerprint (once per checkpoint)");
                let fp = weights_fingerprint(&self.vs);
                log::debug!(
                    "weights fingerprint {fp} in {:.2} s",
                    t.elapsed().as_secs_f64()
                );
                if let Some(id) = &self.identity {
                    let mut entry = read_entry(&self.cache_dir, id).unwrap_or_else(|| entry_of(id));
                    entry.weights_fingerprint = Some(fp.clone());
                    write_entry(&self.cache_dir, &entry);
                }
                fp
            })
            .clone()
    }

    /// The record's description of the weights.
    pub fn describe(&self) -> serde_json::Value {
        match (&self.source, &self.identity) {
            (WeightsSource::Checkpoint(p), Some(id)) => serde_json::json!({
                "checkpoint": p.display().to_string(),
                "size": id.size,
                "mtime_ns": id.mtime_ns.to_string(),
                "sha256": id.sha256,
                "width": self.width(),
            }),
            (WeightsSource::Checkpoint(p), None) => {
                serde_json::json!({"checkpoint": p.display().to_string(), "width": self.width()})
            }
            (WeightsSource::Random { width, seed }, _) => serde_json::json!({
                "random": true, "width": width, "seed": seed,
                "note": "seeded random weights: not a trained model"
            }),
        }
    }
}

/// `cpu` or `cuda:N`.
pub fn device_name(d: Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        Device::Mps => "mps".into(),
        Device::Vulkan => "vulkan".into(),
    }
}

fn entry_of(id: &CheckpointIdentity) -> CacheEntry {
    CacheEntry {
        path: id.path.clone(),
        size: id.size,
        mtime_ns: id.mtime_ns,
        sha256: id.sha256.clone(),
        weights_fingerprint: None,
    }
}

/// `<cache>/checkpoints/<sha256 of (path, size, mtime)>.json`.
fn entry_path(cache_dir: &Path, path: &Path, size: u64, mtime_ns: u128) -> PathBuf {
    let key = Sha256::digest(format!("{}\n{size}\n{mtime_ns}", path.display()).as_bytes());
    cache_dir
        .join("checkpoints")
        .join(format!("{}.json", &hex(&key)[..24]))
}

fn read_entry(cache_dir: &Path, id: &CheckpointIdentity) -> Option<CacheEntry> {
    let p = entry_path(cache_dir, &id.path, id.size, id.mtime_ns);
    let e: CacheEntry = serde_json::from_slice(&std::fs::read(p).ok()?).ok()?;
    (e.path == id.path && e.size == id.size && e.mtime_ns == id.mtime_ns && e.sha256 == id.sha256)
        .then_some(e)
}

/// Writes a cache entry; a cache that cannot be written (read-only home, full disk) only costs time later.
fn write_entry(cache_dir: &Path, e: &CacheEntry) {
    let p = entry_path(cache_dir, &e.path, e.size, e.mtime_ns);
    let result = serde_json::to_vec_pretty(e)
        .map_err(anyhow::Error::from)
        .and_then(|bytes| write_atomic(&p, &bytes));
    if let Err(err) = result {
        log::warn!("cannot write the cache entry {}: {err:#}", p.display());
    }
}

/// The identity of a checkpoint file: its SHA-256 from the cache when path, size and mtime match an entry,
/// else computed (and cached).
pub fn checkpoint_identity(path: &Path, cache_dir: &Path) -> Result<CheckpointIdentity> {
    let abs =
        std::fs::canonicalize(path).with_context(|| format!("cannot open {}", path.display()))?;
    let meta = std::fs::metadata(&abs).with_context(|| format!("cannot stat {}", abs.display()))?;
    let mtime_ns = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let size = meta.len();
    let cached = std::fs::read(entry_path(cache_dir, &abs, size, mtime_ns))
        .ok()
        .and_then(|b| serde_json::from_slice::<CacheEntry>(&b).ok())
        .filter(|e| e.path == abs && e.size == size && e.mtime_ns == mtime_ns);
    if let Some(e) = cached {
        return Ok(CheckpointIdentity {
            path: abs,
            size,
            mtime_ns,
            sha256: e.sha256,
        });
    }
    let t = std::time::Instant::now();
    let sha256 = sha256_file(&abs)?;
    log::debug!(
        "sha256 of {} in {:.2} s",
        abs.display(),
        t.elapsed().as_secs_f64()
    );
    let id = CheckpointIdentity {
        path: abs,
        size,
        mtime_ns,
        sha256,
    };
    write_entry(cache_dir, &entry_of(&id));
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_cached_by_path_size_and_mtime() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let f = dir.path().join("w.bin");
        std::fs::write(&f, b"abc").unwrap();
        let a = checkpoint_identity(&f, &cache).unwrap();
        assert_eq!(
            a.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        // The cached hash is used while path, size and mtime match (proved by a doctored entry) ...
        let p = entry_path(&cache, &a.path, a.size, a.mtime_ns);
        let mut e: CacheEntry = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        e.sha256 = "cached".into();
        std::fs::write(&p, serde_json::to_vec(&e).unwrap()).unwrap();
        assert_eq!(checkpoint_identity(&f, &cache).unwrap().sha256, "cached");
        // ... and a changed file is hashed again.
        std::fs::write(&f, b"abcd").unwrap();
        let b = checkpoint_identity(&f, &cache).unwrap();
        assert_eq!(b.size, 4);
        assert_ne!(b.sha256, "cached");
        // An unwritable cache does not fail the identity.
        let ro = dir.path().join("file-not-dir");
        std::fs::write(&ro, b"x").unwrap();
        assert!(checkpoint_identity(&f, &ro).is_ok());
    }
}
