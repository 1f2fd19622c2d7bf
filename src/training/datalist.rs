//! The bundle's datalist: a JSON file with `training` items `{"image", "label", "fold"}` (and optionally
//! `testing`), read as `monai.auto3dseg.utils.datafold_read(datalist, basedir=dataset_dir, fold)`: items whose
//! `fold` equals the configured fold are the validation split, all others (and items without a fold) training.
//!
//! Differences from `datafold_read`, on purpose: only `image` and `label` are joined to `dataset_dir` (MONAI joins
//! every string value, which would turn a `dataset_name` into a path), and every referenced file must exist.
//!
//! [`make_datalist`] writes such a file from an image folder and a label folder (`vista3d datalist`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::{json, Value};

use super::cfg_usize;
use crate::config::Config;

/// One image with its (optional) label.
#[derive(Debug, Clone, PartialEq)]
pub struct DataItem {
    /// Image path (joined to `dataset_dir`).
    pub image: PathBuf,
    /// Label path (joined to `dataset_dir`); `None` for unlabelled testing items.
    pub label: Option<PathBuf>,
    /// Cross-validation fold.
    pub fold: Option<i64>,
    /// Picks the `label_mappings` entry (`Relabeld`'s `dataset_name` key); `None` uses `"default"`.
    pub dataset_name: Option<String>,
}

impl DataItem {
    /// A short name for logs and reports: the image file name without `.nii.gz` / `.nii`.
    pub fn name(&self) -> String {
        let n = self
            .image
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        n.strip_suffix(".nii.gz")
            .or_else(|| n.strip_suffix(".nii"))
            .unwrap_or(&n)
            .to_string()
    }
}

/// The splits of a datalist for one fold.
#[derive(Debug, Clone, Default)]
pub struct Datalist {
    /// `training` items of the other folds (first `n_train_samples`).
    pub training: Vec<DataItem>,
    /// `training` items of the configured fold (first `n_val_samples`).
    pub validation: Vec<DataItem>,
    /// `testing` items (all of them).
    pub testing: Vec<DataItem>,
}

/// Joins `p` to `base` as `os.path.join` does (an absolute `p` stays as is).
fn join(base: &Path, p: &str) -> PathBuf {
    base.join(p)
}

fn parse_item(v: &Value, base: &Path, what: &str) -> Result<DataItem> {
    if let Some(s) = v.as_str() {
        return Ok(DataItem {
            image: join(base, s),
            label: None,
            fold: None,
            dataset_name: None,
        });
    }
    let obj = v.as_object().with_context(|| {
        format!("{what} must be an object with \"image\" (and \"label\"), got {v}")
    })?;
    let path_of = |key: &str| -> Result<Option<PathBuf>> {
        match obj.get(key).filter(|v| !v.is_null()) {
            None => Ok(None),
            Some(Value::String(s)) if !s.is_empty() => Ok(Some(join(base, s))),
            Some(other) => bail!("{what}: \"{key}\" must be a non-empty path string, got {other}"),
        }
    };
    let image = path_of("image")?.with_context(|| format!("{what} has no \"image\""))?;
    let fold = match obj.get("fold").filter(|v| !v.is_null()) {
        None => None,
        Some(f) => Some(
            f.as_i64()
                .with_context(|| format!("{what}: \"fold\" must be an integer, got {f}"))?,
        ),
    };
    let dataset_name = match obj.get("dataset_name").filter(|v| !v.is_null()) {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => bail!("{what}: \"dataset_name\" must be a string, got {other}"),
    };
    Ok(DataItem {
        image,
        label: path_of("label")?,
        fold,
        dataset_name,
    })
}

fn check_files(items: &[DataItem], split: &str) -> Result<()> {
    let mut missing = Vec::new();
    for it in items {
        for p in std::iter::once(&it.image).chain(it.label.as_ref()) {
            if !p.is_file() {
                missing.push(p.display().to_string());
            }
        }
    }
    ensure!(
        missing.is_empty(),
        "{} file(s) of the {split} split do not exist (check dataset_dir and data_list_file_path): {}",
        missing.len(),
        missing.join(", ")
    );
    Ok(())
}

/// Parses a datalist document; `base` is the directory relative paths are joined to.
pub fn parse_datalist(doc: &Value, base: &Path, fold: i64) -> Result<Datalist> {
    let obj = doc
        .as_object()
        .context("the datalist must be a JSON object with a \"training\" list")?;
    let list = |key: &str| -> Result<Vec<DataItem>> {
        match obj.get(key).filter(|v| !v.is_null()) {
            None => Ok(Vec::new()),
            Some(v) => v
                .as_array()
                .with_context(|| format!("datalist \"{key}\" must be a list"))?
                .iter()
                .enumerate()
                .map(|(i, v)| parse_item(v, base, &format!("datalist {key}[{i}]")))
                .collect(),
        }
    };
    let all = list("training")?;
    let (validation, training): (Vec<_>, Vec<_>) =
        all.into_iter().partition(|it| it.fold == Some(fold));
    Ok(Datalist {
        training,
        validation,
        testing: list("testing")?,
    })
}

/// Reads `data_list_file_path`, joins relative paths to `dataset_dir` (default: the datalist's folder), splits
/// `training` by `fold` (fold == `fold` -> validation), keeps the first `n_train_samples` / `n_val_samples`, and
/// checks that the splits are not empty and every file exists.
pub fn load_datalist(cfg: &Config) -> Result<Datalist> {
    let path = cfg.path("data_list_file_path")?.context(
        "config 'data_list_file_path' is missing: give the datalist JSON (see `vista3d datalist`)",
    )?;
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read the datalist {}", path.display()))?;
    let doc: Value = serde_json::from_str(&text)
        .with_context(|| format!("datalist {} is not valid JSON", path.display()))?;
    let base = match cfg.path("dataset_dir")? {
        Some(d) => d,
        None => path.parent().map(Path::to_path_buf).unwrap_or_default(),
    };
    let fold = cfg.int("fold")?.unwrap_or(0);
    let mut dl = parse_datalist(&doc, &base, fold)
        .with_context(|| format!("datalist {}", path.display()))?;
    if let Some(n) = cfg_usize(cfg, "n_train_samples")? {
        dl.training.truncate(n);
    }
    if let Some(n) = cfg_usize(cfg, "n_val_samples")? {
        dl.validation.truncate(n);
    }
    ensure!(
        !dl.training.is_empty(),
        "datalist {}: no training items outside fold {fold} (or n_train_samples is 0)",
        path.display()
    );
    ensure!(
        !dl.validation.is_empty(),
        "datalist {}: no validation items: no \"training\" item has \"fold\": {fold} (or n_val_samples is 0)",
        path.display()
    );
    for (items, split) in [
        (&dl.training, "training"),
        (&dl.validation, "validation"),
        (&dl.testing, "testing"),
    ] {
        check_files(items, split)?;
    }
    Ok(dl)
}

/// MONAI's `partition_dataset(data, ratios=..., shuffle=..., seed)` on indices: shuffled (seeded), then cut into
/// consecutive parts of `int(r / sum * n + 0.5)` items.
///
/// The shuffle is a Fisher-Yates shuffle driven by `rand`'s `StdRng` seeded with `seed`, so the order differs
/// from numpy's `RandomState(seed).shuffle` (another generator) but is reproducible for a given seed.
pub fn partition_by_ratios(n: usize, ratios: &[f64], seed: u64) -> Vec<Vec<usize>> {
    let idx = shuffled(n, seed);
    let rsum: f64 = ratios.iter().sum();
    let mut next = 0usize;
    ratios
        .iter()
        .map(|r| {
            let start = next;
            next = (start + (r / rsum * n as f64 + 0.5) as usize).min(n);
            idx[start..next].to_vec()
        })
        .collect()
}

/// MONAI's `partition_dataset(data, num_partitions=k, shuffle=True, seed, even_divisible=False)` on indices:
/// shuffled, then partition `i` takes every `k`-th item from position `i`.
pub fn partition_even(n: usize, k: usize, seed: u64) -> Result<Vec<Vec<usize>>> {
    ensure!(k > 0, "the number of folds must be at least 1");
    ensure!(
        n >= k,
        "there are {n} training items, too few to make {k} folds"
    );
    let idx = shuffled(n, seed);
    Ok((0..k)
        .map(|i| idx.iter().skip(i).step_by(k).copied().collect())
        .collect())
}

fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    idx
}

/// `vista3d datalist` options.
#[derive(Debug, Clone)]
pub struct DatalistOptions {
    pub images: PathBuf,
    pub labels: PathBuf,
    pub out: PathBuf,
    pub seed: u64,
    pub folds: usize,
    pub test_fraction: f64,
}

fn nifti_files(dir: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let e = e.with_context(|| format!("cannot list {}", dir.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if (name.ends_with(".nii.gz") || name.ends_with(".nii")) && e.path().is_file() {
            out.insert(name, e.path());
        }
    }
    Ok(out)
}

/// Builds a datalist from an image folder and a label folder whose files have the same names: the pairs (sorted
/// by name) are split `1 - test_fraction` / `test_fraction` into `training` / `testing` with
/// [`partition_by_ratios`], and the training part into `folds` folds with [`partition_even`] (both seeded with
/// `seed`). Paths are written absolute, so the file works with any `dataset_dir` (`os.path.join` keeps absolute
/// paths). Written atomically.
pub fn make_datalist(opts: &DatalistOptions) -> Result<Value> {
    ensure!(
        (0.0..1.0).contains(&opts.test_fraction),
        "--test-fraction must be in [0, 1), got {}",
        opts.test_fraction
    );
    let images = nifti_files(&opts.images)?;
    let labels = nifti_files(&opts.labels)?;
    ensure!(
        !images.is_empty(),
        "no .nii/.nii.gz images in {}",
        opts.images.display()
    );
    let unpaired: Vec<&String> = images.keys().filter(|k| !labels.contains_key(*k)).collect();
    ensure!(
        unpaired.is_empty(),
        "{} image(s) in {} have no label of the same name in {}: {}",
        unpaired.len(),
        opts.images.display(),
        opts.labels.display(),
        unpaired
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let pairs: Vec<(PathBuf, PathBuf)> = images
        .iter()
        .map(|(k, p)| (abs(p), abs(&labels[k])))
        .collect();
    let parts = partition_by_ratios(
        pairs.len(),
        &[1.0 - opts.test_fraction, opts.test_fraction],
        opts.seed,
    );
    let (train_idx, test_idx) = (&parts[0], &parts[1]);
    let folds = partition_even(train_idx.len(), opts.folds, opts.seed)?;
    let mut fold_of = BTreeMap::new();
    for (f, members) in folds.iter().enumerate() {
        for &m in members {
            fold_of.insert(train_idx[m], f);
        }
    }
    let s = |p: &Path| p.display().to_string();
    let training: Vec<Value> = train_idx
        .iter()
        .map(|&i| json!({"image": s(&pairs[i].0), "label": s(&pairs[i].1), "fold": fold_of[&i]}))
        .collect();
    let testing: Vec<Value> = test_idx
        .iter()
        .map(|&i| json!({"image": s(&pairs[i].0), "label": s(&pairs[i].1)}))
        .collect();
    let doc = json!({
        "_comment": format!(
            "made by vista3d datalist: seed {}, {} folds, test fraction {} (MONAI partition_dataset semantics, \
             shuffled with rand's StdRng, not numpy's RandomState)",
            opts.seed, opts.folds, opts.test_fraction
        ),
        "training": training,
        "testing": testing,
    });
    crate::fsutil::write_atomic(&opts.out, serde_json::to_string_pretty(&doc)?.as_bytes())?;
    Ok(doc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_follow_monai_sizes() {
        // int(0.8 * 10 + 0.5) = 8, int(0.2 * 10 + 0.5) = 2
        let p = partition_by_ratios(10, &[0.8, 0.2], 0);
        assert_eq!((p[0].len(), p[1].len()), (8, 2));
        let mut all: Vec<usize> = p.concat();
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        assert_eq!(p, partition_by_ratios(10, &[0.8, 0.2], 0));
        assert_ne!(p, partition_by_ratios(10, &[0.8, 0.2], 1));
        // 7 items in 5 folds: sizes 2, 2, 1, 1, 1 (every 5th item)
        let f = partition_even(7, 5, 3).unwrap();
        assert_eq!(
            f.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![2, 2, 1, 1, 1]
        );
        assert!(partition_even(3, 5, 0).is_err());
    }

    #[test]
    fn folds_split_training_and_validation() {
        let doc = json!({"training": [
            {"image": "a.nii.gz", "label": "la.nii.gz", "fold": 0},
            {"image": "/abs/b.nii.gz", "label": "lb.nii.gz", "fold": 1, "dataset_name": "x"},
            {"image": "c.nii.gz", "label": "lc.nii.gz"}
        ], "testing": ["t.nii.gz"]});
        let dl = parse_datalist(&doc, Path::new("/data"), 0).unwrap();
        assert_eq!(dl.validation.len(), 1);
        assert_eq!(dl.validation[0].image, PathBuf::from("/data/a.nii.gz"));
        assert_eq!(dl.training.len(), 2);
        assert_eq!(dl.training[0].image, PathBuf::from("/abs/b.nii.gz"));
        assert_eq!(dl.training[0].dataset_name.as_deref(), Some("x"));
        assert_eq!(dl.testing[0].label, None);
        assert_eq!(dl.training[0].name(), "b");
        let bad = json!({"training": [{"label": "x"}]});
        assert!(
            format!("{:#}", parse_datalist(&bad, Path::new("."), 0).unwrap_err())
                .contains("no \"image\"")
        );
        let bad = json!({"training": [{"image": "x", "fold": "one"}]});
        assert!(parse_datalist(&bad, Path::new("."), 0).is_err());
    }
}
