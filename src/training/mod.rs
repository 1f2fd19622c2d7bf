//! Finetuning, continual learning and evaluation (the bundle's `configs/train.json`, `train_continual.json`,
//! `evaluate.json`).
//!
//! Data side (this module's [`datalist`], [`data`], [`augment`], [`metrics`], [`evaluate`]): the bundle's datalist
//! format and folds, label mappings (`Relabeld`), the deterministic training transforms with a cache, random
//! label-class patches on worker threads, Dice metrics with MONAI's semantics and the evaluation command with
//! MONAI `MetricsSaver` reports. The trainer side (sampler, loss, optimiser, schedule, trainer) lives next to it.
//!
//! Configuration keys that the bundle derives with Python expressions (`label_set`, `val_label_set`,
//! `output_classes`, the datalist splits) are plain values in our JSON files or `null`, and `null` means "derive
//! as the bundle does" (see [`data::LabelMappings`]).

pub mod augment;
pub mod data;
pub mod datalist;
pub mod evaluate;
pub mod loss;
pub mod metrics;
pub mod optim;
pub mod plot;
pub mod sampler;
pub mod schedule;
pub mod trainer;

use anyhow::{ensure, Context, Result};
use serde_json::Value;

use crate::config::Config;

/// A config value that is present and not `null`.
pub(crate) fn cfg_value<'a>(cfg: &'a Config, key: &str) -> Option<&'a Value> {
    cfg.value.get(key).filter(|v| !v.is_null())
}

/// A number (`None` when absent or `null`).
pub fn cfg_f64(cfg: &Config, key: &str) -> Result<Option<f64>> {
    cfg_value(cfg, key)
        .map(|v| {
            v.as_f64()
                .with_context(|| format!("config '{key}' must be a number, got {v}"))
        })
        .transpose()
}

/// A list of integers (`None` when absent or `null`).
pub fn cfg_i64_list(cfg: &Config, key: &str) -> Result<Option<Vec<i64>>> {
    cfg_value(cfg, key)
        .map(|v| {
            v.as_array()
                .and_then(|a| a.iter().map(Value::as_i64).collect::<Option<Vec<_>>>())
                .with_context(|| format!("config '{key}' must be a list of integers, got {v}"))
        })
        .transpose()
}

/// Three positive integers (a single integer is repeated), e.g. `patch_size`.
pub fn cfg_usize3(cfg: &Config, key: &str) -> Result<Option<[usize; 3]>> {
    let Some(v) = cfg_value(cfg, key) else {
        return Ok(None);
    };
    let err =
        || format!("config '{key}' must be three positive integers like [128, 128, 128], got {v}");
    if let Some(n) = v.as_u64() {
        ensure!(n > 0, "{}", err());
        return Ok(Some([n as usize; 3]));
    }
    let n: Vec<usize> = v
        .as_array()
        .filter(|a| a.len() == 3)
        .and_then(|a| a.iter().map(|x| x.as_u64().map(|n| n as usize)).collect())
        .with_context(err)?;
    ensure!(n.iter().all(|&x| x > 0), "{}", err());
    Ok(Some([n[0], n[1], n[2]]))
}

/// Three numbers, e.g. `resample_to_spacing`.
pub fn cfg_f64_3(cfg: &Config, key: &str) -> Result<Option<[f64; 3]>> {
    let Some(v) = cfg_value(cfg, key) else {
        return Ok(None);
    };
    let n: Vec<f64> = v
        .as_array()
        .filter(|a| a.len() == 3)
        .and_then(|a| a.iter().map(Value::as_f64).collect())
        .with_context(|| {
            format!("config '{key}' must be three numbers like [1.5, 1.5, 1.5], got {v}")
        })?;
    Ok(Some([n[0], n[1], n[2]]))
}

/// A non-negative integer count (`None` when absent or `null`).
pub fn cfg_usize(cfg: &Config, key: &str) -> Result<Option<usize>> {
    match cfg.int(key)? {
        None => Ok(None),
        Some(n) => {
            ensure!(n >= 0, "config '{key}' must be >= 0, got {n}");
            Ok(Some(n as usize))
        }
    }
}

/// The deterministic-transform parameters of the training configs: `resample_to_spacing` (default 1.5 mm) and
/// the bundle's intensity window and crop margin.
pub fn training_preprocess_config(cfg: &Config) -> Result<crate::transforms::PreprocessConfig> {
    let mut p = crate::transforms::PreprocessConfig::default();
    if let Some(s) = cfg_f64_3(cfg, "resample_to_spacing")? {
        p.spacing = s;
    }
    Ok(p)
}
