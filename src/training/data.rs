//! Training and validation data: label mappings (`Relabeld`), the deterministic training transforms with a cache
//! (`CacheDataset(cache_rate)`), and random patches produced on worker threads while the trainer runs.
//!
//! Deterministic transforms (`configs/train.json`): load -> foreground crop (margin 10, on the image) -> intensity
//! scaling -> RAS -> 1.5 mm spacing (bilinear image, nearest label) -> uint8 label -> `SpatialPadd` to the patch
//! size. Random transforms: `RandCropByLabelClassesd` -> `ResizeWithPadOrCropd` -> (train.json only)
//! `RandScaleIntensityd` / `RandShiftIntensityd` -> (with `label_mappings`) `Relabeld` to global ids.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use anyhow::{bail, ensure, Context, Result};
use ndarray::Array3;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde_json::Value;
use tch::{Kind, Tensor};

use super::augment::{self, CropSettings, IntensityAugment};
use super::datalist::DataItem;
use super::{cfg_f64, cfg_i64_list, cfg_usize, cfg_usize3, cfg_value, training_preprocess_config};
use crate::config::Config;
use crate::io::read_nifti;
use crate::transforms::{preprocess_training, PreprocessConfig};
use crate::volume::{Affine, Volume};

/// Largest class id a label map can carry (255 is "not computed" in predictions).
pub const MAX_CLASS_ID: i64 = 254;

/// A value map `MapLabelValue(orig, target)`: listed values are replaced, unlisted values kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelMap {
    table: [u8; 256],
    pairs: Vec<(u8, u8)>,
}

impl LabelMap {
    /// From `[local, global]` pairs (ids in `0..=254`); a later pair for the same local id wins, as in MONAI.
    pub fn new(pairs: &[(i64, i64)]) -> Result<LabelMap> {
        let mut table: [u8; 256] = std::array::from_fn(|i| i as u8);
        let mut out = Vec::with_capacity(pairs.len());
        for &(a, b) in pairs {
            for v in [a, b] {
                ensure!(
                    (0..=MAX_CLASS_ID).contains(&v),
                    "label id {v} in mapping [{a}, {b}] is out of range: ids must be 0..={MAX_CLASS_ID} \
                     (255 marks voxels that were not computed)"
                );
            }
            table[a as usize] = b as u8;
            out.push((a as u8, b as u8));
        }
        Ok(LabelMap { table, pairs: out })
    }

    /// `[[c, i + offset] for i, c in enumerate(ids)]`: maps the listed ids to consecutive values (the bundle's
    /// `valid_remap` with offset 0, the evaluation's sequential relabel with offset 1).
    pub fn sequential(ids: &[i64], offset: i64) -> Result<LabelMap> {
        let pairs: Vec<(i64, i64)> = ids
            .iter()
            .enumerate()
            .map(|(i, &c)| (c, i as i64 + offset))
            .collect();
        LabelMap::new(&pairs)
    }

    /// The `(local, global)` pairs.
    pub fn pairs(&self) -> &[(u8, u8)] {
        &self.pairs
    }

    /// Maps one value.
    pub fn map(&self, v: u8) -> u8 {
        self.table[v as usize]
    }

    /// Maps every voxel in place.
    pub fn apply(&self, label: &mut Array3<u8>) {
        label.mapv_inplace(|v| self.table[v as usize]);
    }
}

/// `label_mappings` `{"default": [[local, global], ...], "<dataset_name>": ...}` with the label sets the bundle
/// derives from it:
/// - `label_set` = the config's `label_set`, else `[0] + globals of "default"`, else `0..output_classes`;
/// - `val_label_set` = the config's `val_label_set`, else `[0] + locals of "default"`, else `label_set`;
/// - evaluation label set (`evaluate.json`) = the config's `label_set`, else the globals of "default" (no 0).
///
/// Global ids above 132 are new structures (continual learning) and are allowed up to 254.
#[derive(Debug, Clone)]
pub struct LabelMappings {
    maps: BTreeMap<String, Option<LabelMap>>,
    label_set: Vec<i64>,
    val_label_set: Vec<i64>,
    eval_label_set: Vec<i64>,
}

fn parse_pairs(v: &Value, name: &str) -> Result<Option<Vec<(i64, i64)>>> {
    if v.is_null() {
        return Ok(None);
    }
    let err =
        || format!("label_mappings#{name} must be a list of [local, global] id pairs, got {v}");
    let a = v.as_array().with_context(err)?;
    a.iter()
        .map(|p| {
            let p = p.as_array().filter(|p| p.len() == 2).with_context(err)?;
            let (l, g) = (
                p[0].as_i64().with_context(err)?,
                p[1].as_i64().with_context(err)?,
            );
            Ok((l, g))
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

fn check_ids(ids: &[i64], key: &str) -> Result<()> {
    for &c in ids {
        ensure!(
            (0..=MAX_CLASS_ID).contains(&c),
            "config '{key}' has id {c}: ids must be 0..={MAX_CLASS_ID} (255 marks voxels that were not computed)"
        );
    }
    Ok(())
}

impl LabelMappings {
    /// Reads `label_mappings`, `label_set`, `val_label_set` and `output_classes` (see the type's documentation).
    pub fn from_config(cfg: &Config) -> Result<LabelMappings> {
        let mut maps = BTreeMap::new();
        if let Some(v) = cfg_value(cfg, "label_mappings") {
            let obj = v.as_object().with_context(|| {
                format!("config 'label_mappings' must map dataset names to [[local, global], ...], got {v}")
            })?;
            for (name, pairs) in obj {
                let map = parse_pairs(pairs, name)?
                    .map(|p| LabelMap::new(&p))
                    .transpose()
                    .with_context(|| format!("config 'label_mappings#{name}'"))?;
                maps.insert(name.clone(), map);
            }
        }
        let default = maps.get("default").cloned().flatten();
        let globals: Option<Vec<i64>> = default
            .as_ref()
            .map(|m| m.pairs().iter().map(|p| p.1 as i64).collect());
        let locals: Option<Vec<i64>> = default
            .as_ref()
            .map(|m| m.pairs().iter().map(|p| p.0 as i64).collect());
        let cfg_label_set = cfg_i64_list(cfg, "label_set")?;
        let label_set = match (&cfg_label_set, &globals) {
            (Some(s), _) => s.clone(),
            (None, Some(g)) => std::iter::once(0).chain(g.iter().copied()).collect(),
            (None, None) => {
                let k = cfg_usize(cfg, "output_classes")?.context(
                    "config needs 'label_set', 'label_mappings' (with a \"default\" entry) or 'output_classes'",
                )?;
                ensure!(k >= 1, "config 'output_classes' must be at least 1");
                (0..k as i64).collect()
            }
        };
        check_ids(&label_set, "label_set")?;
        ensure!(!label_set.is_empty(), "config 'label_set' is empty");
        let val_label_set = match (cfg_i64_list(cfg, "val_label_set")?, &locals) {
            (Some(s), _) => s,
            (None, Some(l)) => std::iter::once(0).chain(l.iter().copied()).collect(),
            (None, None) => label_set.clone(),
        };
        check_ids(&val_label_set, "val_label_set")?;
        let eval_label_set = match (&cfg_label_set, &globals) {
            (Some(s), _) => s.clone(),
            (None, Some(g)) => g.clone(),
            (None, None) => label_set.iter().copied().filter(|&c| c != 0).collect(),
        };
        ensure!(
            !eval_label_set.is_empty(),
            "no class to evaluate: label_set {label_set:?} has only background"
        );
        Ok(LabelMappings {
            maps,
            label_set,
            val_label_set,
            eval_label_set,
        })
    }

    /// The training label set (global ids, 0 first when derived).
    pub fn label_set(&self) -> Vec<i64> {
        self.label_set.clone()
    }

    /// The validation label set (local ids of the ground truth, 0 first when derived).
    pub fn val_label_set(&self) -> Vec<i64> {
        self.val_label_set.clone()
    }

    /// The evaluation label set (`evaluate.json`: the globals, without 0, when derived).
    pub fn eval_label_set(&self) -> Vec<i64> {
        self.eval_label_set.clone()
    }

    /// `true` when a `label_mappings` entry exists (the continual-learning configs).
    pub fn has_mappings(&self) -> bool {
        !self.maps.is_empty()
    }

    /// The map `Relabeld` uses for a dataset: `dataset_name`'s entry, or "default" when the item has none; `None`
    /// (no relabel) when that entry is missing or `null`.
    pub fn map_for(&self, dataset_name: Option<&str>) -> Option<&LabelMap> {
        let name = dataset_name.unwrap_or("default");
        let m = self.maps.get(name).and_then(Option::as_ref);
        if m.is_none() && dataset_name.is_some() && !self.maps.is_empty() {
            log::warn!("label_mappings has no entry \"{name}\": its labels are not relabelled");
        }
        m
    }

    /// `Relabeld` on a label map: local ids to global ids (unlisted values unchanged).
    pub fn relabel(&self, label: &mut Array3<u8>, dataset_name: Option<&str>) -> Result<()> {
        if let Some(m) = self.map_for(dataset_name) {
            m.apply(label);
        }
        Ok(())
    }

    /// The bundle's `valid_remap`: `[[c, i] for i, c in enumerate(val_label_set)]`.
    pub fn valid_remap(&self) -> Result<LabelMap> {
        LabelMap::sequential(&self.val_label_set, 0)
    }
}

/// One preprocessed sample: a training patch or a whole validation image on the training grid.
pub struct Sample {
    /// Image name (file name without extension).
    pub name: String,
    /// `[1, X, Y, Z]` float32.
    pub image: Tensor,
    /// `[1, X, Y, Z]` uint8 (global ids for training patches, `valid_remap`ped ids for validation).
    pub label: Tensor,
}

impl Sample {
    fn from_arrays(name: String, image: &Array3<f32>, label: &Array3<u8>) -> Result<Sample> {
        let d = image.shape();
        let shape = [1, d[0] as i64, d[1] as i64, d[2] as i64];
        let img = image.as_standard_layout();
        let lab = label.as_standard_layout();
        Ok(Sample {
            name,
            image: Tensor::from_slice(img.as_slice().context("image layout")?).view(shape),
            label: Tensor::from_slice(lab.as_slice().context("label layout")?)
                .view(shape)
                .to_kind(Kind::Uint8),
        })
    }
}

/// Converts a label volume to uint8 ids, rejecting values that are not integers in `0..=255`.
pub fn label_to_u8(data: &Array3<f32>, what: &str) -> Result<Array3<u8>> {
    let bad = data
        .iter()
        .filter(|v| !(v.fract() == 0.0 && (0.0..=255.0).contains(*v)))
        .count();
    if bad > 0 {
        let example = data
            .iter()
            .find(|v| !(v.fract() == 0.0 && (0.0..=255.0).contains(*v)))
            .copied()
            .unwrap_or(f32::NAN);
        bail!("{what}: {bad} voxel(s) are not label ids 0..=255 (e.g. {example})");
    }
    Ok(data.mapv(|v| v as u8))
}

fn affines_match(a: &Affine, b: &Affine) -> bool {
    (0..3).all(|i| {
        (0..4).all(|j| (a[i][j] - b[i][j]).abs() <= 1e-3 * (1.0 + a[i][j].abs().max(b[i][j].abs())))
    })
}

/// Reads an image and its label and checks that they share a grid (shape and affine).
pub fn load_pair(item: &DataItem) -> Result<(Volume, Option<Volume>)> {
    let image = read_nifti(&item.image)?.volume;
    let label = load_label_for(item, &image)?;
    Ok((image, label))
}

/// Reads an item's label (if any) and checks that it shares the image's grid (shape and affine).
pub fn load_label_for(item: &DataItem, image: &Volume) -> Result<Option<Volume>> {
    let Some(p) = &item.label else {
        return Ok(None);
    };
    let l = read_nifti(p)?.volume;
    ensure!(
        l.dims() == image.dims(),
        "label {} has shape {:?} but image {} has {:?}: they must share a grid",
        p.display(),
        l.dims(),
        item.image.display(),
        image.dims()
    );
    ensure!(
        affines_match(&l.affine, &image.affine),
        "label {} and image {} have different affines ({:?} vs {:?}): they must share a grid",
        p.display(),
        item.image.display(),
        l.affine,
        image.affine
    );
    Ok(Some(l))
}

/// A sample after the deterministic transforms (what the cache holds).
#[derive(Debug, Clone)]
pub struct Prepared {
    pub name: String,
    pub dataset_name: Option<String>,
    /// Image on the training grid, padded to at least the patch size.
    pub image: Array3<f32>,
    /// Label ids (local, not yet relabelled), same shape.
    pub label: Array3<u8>,
    /// Voxels per label value.
    pub counts: [usize; 256],
}

/// Runs the deterministic training transforms on one labelled item.
pub fn prepare(item: &DataItem, pre: &PreprocessConfig, patch: [usize; 3]) -> Result<Prepared> {
    let run = || -> Result<Prepared> {
        let (image, label) = load_pair(item)?;
        let label =
            label.with_context(|| "the item has no label (training and validation need one)")?;
        let (img, lab) = preprocess_training(&image, Some(&label), pre)?;
        let lab = lab.context("label lost in preprocessing")?;
        let lab = label_to_u8(&lab.data, "label")?;
        let image = augment::spatial_pad(img.data.view(), patch, 0.0);
        let label = augment::spatial_pad(lab.view(), patch, 0u8);
        let counts = augment::class_counts(label.view());
        Ok(Prepared {
            name: item.name(),
            dataset_name: item.dataset_name.clone(),
            image,
            label,
            counts,
        })
    };
    run().with_context(|| format!("preparing {}", item.image.display()))
}

/// Settings of the training loader, read from the config.
#[derive(Debug, Clone)]
pub struct LoaderSettings {
    pub preprocess: PreprocessConfig,
    pub crop: CropSettings,
    /// `num_patches_per_image`.
    pub patches_per_image: usize,
    /// `RandScale/ShiftIntensityd` (train.json); `None` when `rand_intensity` is `null` (train_continual.json).
    pub intensity: Option<IntensityAugment>,
    /// `train_dataset_cache_rate`: the first `int(n * rate)` items are prepared once and kept.
    pub cache_rate: f64,
    /// Threads filling the cache (`num_cache_workers`).
    pub cache_workers: usize,
    /// Threads producing patches (`num_workers`).
    pub workers: usize,
}

impl LoaderSettings {
    /// Reads `patch_size`, `num_classes` (else `output_classes`, else `len(label_set)`), `crop_ratios`,
    /// `cache_cls_idx#activate` (then `max_samples_per_class = 10 * epochs`), `num_patches_per_image`,
    /// `rand_intensity`, `train_dataset_cache_rate`, `num_cache_workers`, `num_workers`, `resample_to_spacing`.
    pub fn from_config(cfg: &Config, mappings: &LabelMappings) -> Result<LoaderSettings> {
        let patch = cfg_usize3(cfg, "patch_size")?.unwrap_or([128; 3]);
        let num_classes = match cfg_usize(cfg, "num_classes")? {
            Some(n) => n,
            None => cfg_usize(cfg, "output_classes")?.unwrap_or(mappings.label_set.len()),
        };
        ensure!(
            (1..=256).contains(&num_classes),
            "config 'num_classes' (classes that can centre a patch) must be 1..=256, got {num_classes}"
        );
        let ratios = match cfg_value(cfg, "crop_ratios") {
            None => None,
            Some(v) => Some(
                v.as_array()
                    .and_then(|a| a.iter().map(Value::as_f64).collect::<Option<Vec<_>>>())
                    .with_context(|| {
                        format!("config 'crop_ratios' must be a list of numbers, got {v}")
                    })?,
            ),
        };
        let cls_idx = cfg_value(cfg, "cache_cls_idx")
            .and_then(|v| v.get("activate"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let max_samples_per_class = if cls_idx {
            let epochs = cfg_usize(cfg, "epochs")?.unwrap_or(1).max(1);
            Some(10 * epochs)
        } else {
            None
        };
        let intensity = match cfg_value(cfg, "rand_intensity") {
            None => None,
            Some(v) => {
                let get = |k: &str| -> Result<f64> {
                    v.get(k).and_then(Value::as_f64).with_context(|| {
                        format!("config 'rand_intensity#{k}' must be a number (or set rand_intensity to null), got {v}")
                    })
                };
                Some(IntensityAugment {
                    scale_prob: get("scale_prob")?,
                    scale_factor: get("scale_factors")?,
                    shift_prob: get("shift_prob")?,
                    shift_offset: get("shift_offsets")?,
                })
            }
        };
        let cache_rate = cfg_f64(cfg, "train_dataset_cache_rate")?.unwrap_or(0.0);
        ensure!(
            (0.0..=1.0).contains(&cache_rate),
            "config 'train_dataset_cache_rate' must be in [0, 1], got {cache_rate}"
        );
        let patches_per_image = cfg_usize(cfg, "num_patches_per_image")?.unwrap_or(1);
        ensure!(
            patches_per_image >= 1,
            "config 'num_patches_per_image' must be at least 1"
        );
        Ok(LoaderSettings {
            preprocess: training_preprocess_config(cfg)?,
            crop: CropSettings {
                patch,
                num_classes,
                ratios,
                max_samples_per_class,
            },
            patches_per_image,
            intensity,
            cache_rate,
            cache_workers: cfg_usize(cfg, "num_cache_workers")?.unwrap_or(4).max(1),
            workers: cfg_usize(cfg, "num_workers")?.unwrap_or(4).max(1),
        })
    }
}

struct Shared {
    items: Vec<DataItem>,
    cache: Vec<Option<Arc<Prepared>>>,
    settings: LoaderSettings,
    mappings: LabelMappings,
}

impl Shared {
    /// All patches of one item (the job of one worker).
    fn patches(&self, index: usize, seed: u64) -> Job {
        let prepared = match &self.cache[index] {
            Some(p) => p.clone(),
            None => Arc::new(prepare(
                &self.items[index],
                &self.settings.preprocess,
                self.settings.crop.patch,
            )?),
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..self.settings.patches_per_image)
            .map(|_| {
                let (mut img, mut lab, _) = augment::rand_crop_by_label_classes(
                    prepared.image.view(),
                    prepared.label.view(),
                    &prepared.counts,
                    &self.settings.crop,
                    &mut rng,
                )
                .with_context(|| format!("cropping a patch of {}", prepared.name))?;
                if let Some(aug) = &self.settings.intensity {
                    aug.apply(&mut img, &mut rng);
                }
                self.mappings
                    .relabel(&mut lab, prepared.dataset_name.as_deref())?;
                Ok((prepared.name.clone(), img, lab))
            })
            .collect()
    }
}

/// The training loader: deterministic transforms cached for the first `int(n * train_dataset_cache_rate)` items,
/// random patches made on `num_workers` threads, items shuffled every epoch. Every random draw is derived from
/// `(seed, epoch, position)`, so an epoch's patches do not depend on thread timing.
pub struct TrainLoader {
    shared: Arc<Shared>,
    seed: u64,
    /// This process's rank and the number of ranks (DistributedSampler); `(0, 1)` alone.
    rank: usize,
    world: usize,
}

impl TrainLoader {
    /// Prepares the cache (in parallel on `num_cache_workers` threads) and checks the settings.
    pub fn new(
        cfg: &Config,
        items: &[DataItem],
        mappings: &LabelMappings,
        seed: u64,
    ) -> Result<TrainLoader> {
        let settings = LoaderSettings::from_config(cfg, mappings)?;
        Self::with_settings(settings, items, mappings, seed)
    }

    /// As [`TrainLoader::new`] with explicit settings.
    pub fn with_settings(
        settings: LoaderSettings,
        items: &[DataItem],
        mappings: &LabelMappings,
        seed: u64,
    ) -> Result<TrainLoader> {
        ensure!(!items.is_empty(), "no training items");
        for it in items {
            ensure!(
                it.label.is_some(),
                "training item {} has no label",
                it.image.display()
            );
        }
        let n_cache = ((items.len() as f64 * settings.cache_rate) as usize).min(items.len());
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(settings.cache_workers)
            .build()
            .context("cannot start the cache threads")?;
        if n_cache > 0 {
            log::info!("caching {n_cache} of {} training items", items.len());
        }
        let cached: Vec<Arc<Prepared>> = pool.install(|| {
            items[..n_cache]
                .par_iter()
                .map(|it| prepare(it, &settings.preprocess, settings.crop.patch).map(Arc::new))
                .collect::<Result<Vec<_>>>()
        })?;
        let mut cache: Vec<Option<Arc<Prepared>>> = cached.into_iter().map(Some).collect();
        cache.resize(items.len(), None);
        Ok(TrainLoader {
            shared: Arc::new(Shared {
                items: items.to_vec(),
                cache,
                settings,
                mappings: mappings.clone(),
            }),
            seed,
            rank: 0,
            world: 1,
        })
    }

    /// The loader of rank `rank` of `world`: each epoch's shuffled list is padded to a multiple of `world` and rank
    /// `r` takes positions `r, r + world, ...` (`DistributedSampler(even_divisible=True, shuffle=True)` with
    /// `set_epoch`), so every rank runs the same number of steps and together they cover every item.
    pub fn sharded(mut self, rank: usize, world: usize) -> TrainLoader {
        self.world = world.max(1);
        self.rank = rank.min(self.world - 1);
        self
    }

    /// Patches per epoch on this rank (`items * num_patches_per_image` alone; `ceil(items / world)` items per rank).
    pub fn len(&self) -> usize {
        crate::distributed::sampler::shard_len(self.shared.items.len(), self.rank, self.world, true)
            * self.shared.settings.patches_per_image
    }

    /// `true` when there is nothing to train on (never, once constructed).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of items whose deterministic transforms are cached.
    pub fn cached(&self) -> usize {
        self.shared.cache.iter().filter(|c| c.is_some()).count()
    }

    /// The loader's settings.
    pub fn settings(&self) -> &LoaderSettings {
        &self.shared.settings
    }

    /// This rank's item order and per-item seeds of an epoch: a seeded shuffle of all items (as
    /// `DataLoader(shuffle=True)`, the same on every rank), padded to a multiple of the world size, one seed per
    /// padded position (a repeated item gets other random crops), and this rank's share of it.
    pub fn epoch_plan(&self, epoch: usize) -> Vec<(usize, u64)> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(
            self.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let mut order: Vec<usize> = (0..self.shared.items.len()).collect();
        rand::seq::SliceRandom::shuffle(order.as_mut_slice(), &mut rng);
        let plan: Vec<(usize, u64)> = crate::distributed::sampler::padded(&order, self.world, true)
            .into_iter()
            .map(|i| (i, rng.gen::<u64>()))
            .collect();
        crate::distributed::sampler::shard(&plan, self.rank, self.world, false)
    }

    /// The patches of one epoch `[1, P, P, P]`, in a seeded shuffled order, produced ahead by worker threads.
    pub fn epoch(&mut self, epoch: usize) -> impl Iterator<Item = Result<Sample>> + '_ {
        EpochIter::start(self.shared.clone(), self.epoch_plan(epoch))
    }
}

/// One random patch before conversion to tensors: name, image, label.
type Patch = (String, Array3<f32>, Array3<u8>);

/// The patches of one item, or why they could not be made.
type Job = Result<Vec<Patch>>;

/// Bounds how far workers run ahead of the consumer.
struct Gate {
    consumed: Mutex<usize>,
    moved: Condvar,
}

struct EpochIter {
    rx: Option<Receiver<(usize, Job)>>,
    pending: BTreeMap<usize, Job>,
    ready: VecDeque<Result<Sample>>,
    next: usize,
    total: usize,
    stop: Arc<AtomicBool>,
    gate: Arc<Gate>,
    threads: Vec<JoinHandle<()>>,
}

impl EpochIter {
    fn start(shared: Arc<Shared>, plan: Vec<(usize, u64)>) -> EpochIter {
        let total = plan.len();
        let workers = shared.settings.workers.min(total).max(1);
        let ahead = 2 * workers;
        let (tx, rx) = sync_channel::<(usize, Job)>(ahead);
        let stop = Arc::new(AtomicBool::new(false));
        let gate = Arc::new(Gate {
            consumed: Mutex::new(0),
            moved: Condvar::new(),
        });
        let next_job = Arc::new(Mutex::new(0usize));
        let plan = Arc::new(plan);
        let threads = (0..workers)
            .map(|_| {
                let (shared, tx, stop, gate, next_job, plan) = (
                    shared.clone(),
                    tx.clone(),
                    stop.clone(),
                    gate.clone(),
                    next_job.clone(),
                    plan.clone(),
                );
                std::thread::spawn(move || loop {
                    let job = {
                        let mut n = next_job.lock().unwrap_or_else(|e| e.into_inner());
                        if *n >= plan.len() {
                            return;
                        }
                        *n += 1;
                        *n - 1
                    };
                    {
                        let mut c = gate.consumed.lock().unwrap_or_else(|e| e.into_inner());
                        while job >= *c + ahead && !stop.load(Ordering::Relaxed) {
                            c = gate.moved.wait(c).unwrap_or_else(|e| e.into_inner());
                        }
                    }
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let (index, seed) = plan[job];
                    let out = shared.patches(index, seed);
                    if tx.send((job, out)).is_err() {
                        return;
                    }
                })
            })
            .collect();
        EpochIter {
            rx: Some(rx),
            pending: BTreeMap::new(),
            ready: VecDeque::new(),
            next: 0,
            total,
            stop,
            gate,
            threads,
        }
    }
}

impl Iterator for EpochIter {
    type Item = Result<Sample>;

    fn next(&mut self) -> Option<Result<Sample>> {
        loop {
            if let Some(s) = self.ready.pop_front() {
                return Some(s);
            }
            if self.next >= self.total {
                return None;
            }
            let job = match self.pending.remove(&self.next) {
                Some(j) => j,
                None => {
                    let rx = self.rx.as_ref()?;
                    match rx.recv() {
                        Ok((i, j)) => {
                            self.pending.insert(i, j);
                            continue;
                        }
                        Err(_) => {
                            self.next = self.total;
                            return Some(Err(anyhow::anyhow!("a data worker thread stopped")));
                        }
                    }
                }
            };
            self.next += 1;
            {
                let mut c = self.gate.consumed.lock().unwrap_or_else(|e| e.into_inner());
                *c = self.next;
                self.gate.moved.notify_all();
            }
            match job {
                Ok(patches) => {
                    for (name, img, lab) in patches {
                        self.ready.push_back(Sample::from_arrays(name, &img, &lab));
                    }
                }
                Err(e) => self.ready.push_back(Err(e)),
            }
        }
    }
}

impl Drop for EpochIter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.gate.moved.notify_all();
        self.rx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Validation samples: the deterministic training transforms (padding to the patch size included) on whole
/// images, then the bundle's `valid_remap` (`[[c, i] for i, c in enumerate(val_label_set)]`) when
/// `label_mappings` is configured. Prepared in parallel on `num_cache_workers` threads.
pub fn validation_samples(
    cfg: &Config,
    items: &[DataItem],
    mappings: &LabelMappings,
) -> Result<Vec<Sample>> {
    let pre = training_preprocess_config(cfg)?;
    let patch = cfg_usize3(cfg, "patch_size")?.unwrap_or([128; 3]);
    let remap = if mappings.has_mappings() {
        Some(mappings.valid_remap()?)
    } else {
        None
    };
    let workers = cfg_usize(cfg, "num_cache_workers")?.unwrap_or(4).max(1);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(workers)
        .build()
        .context("cannot start the validation threads")?;
    let prepared: Vec<Prepared> = pool.install(|| {
        items
            .par_iter()
            .map(|it| prepare(it, &pre, patch))
            .collect::<Result<Vec<_>>>()
    })?;
    prepared
        .into_iter()
        .map(|mut p| {
            if let Some(m) = &remap {
                m.apply(&mut p.label);
            }
            Sample::from_arrays(p.name, &p.image, &p.label)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(json: &str) -> Config {
        let mut c = Config::load(&[], &[]).unwrap();
        let v: Value = serde_json::from_str(json).unwrap();
        for (k, v) in v.as_object().unwrap() {
            c.value[k] = v.clone();
        }
        c
    }

    #[test]
    fn label_sets_are_derived_as_the_bundle_does() {
        let m = LabelMappings::from_config(&cfg(
            r#"{"label_mappings": {"default": [[1, 3], [2, 140]]}}"#,
        ))
        .unwrap();
        assert_eq!(m.label_set(), vec![0, 3, 140]);
        assert_eq!(m.val_label_set(), vec![0, 1, 2]);
        assert_eq!(m.eval_label_set(), vec![3, 140]);
        assert_eq!(m.valid_remap().unwrap().pairs(), &[(0, 0), (1, 1), (2, 2)]);
        let m = LabelMappings::from_config(&cfg(
            r#"{"label_mappings": {"default": [[1, 3]]}, "label_set": [0, 3, 5], "val_label_set": [0, 1]}"#,
        ))
        .unwrap();
        assert_eq!(m.label_set(), vec![0, 3, 5]);
        assert_eq!(m.eval_label_set(), vec![0, 3, 5]);
        let m = LabelMappings::from_config(&cfg(r#"{"output_classes": 2}"#)).unwrap();
        assert_eq!(
            (m.label_set(), m.val_label_set(), m.eval_label_set()),
            (vec![0, 1], vec![0, 1], vec![1])
        );
        assert!(!m.has_mappings());
    }

    #[test]
    fn bad_ids_are_errors() {
        for bad in [
            r#"{"label_mappings": {"default": [[1, 255]]}}"#,
            r#"{"label_mappings": {"default": [[-1, 3]]}}"#,
            r#"{"label_mappings": {"default": [[1]]}}"#,
            r#"{"label_mappings": {"default": [[1, 3]]}, "label_set": [0, 300]}"#,
            r#"{"label_mappings": [1, 3]}"#,
            r#"{}"#,
        ] {
            let e = LabelMappings::from_config(&cfg(bad));
            assert!(e.is_err(), "{bad}");
        }
        let e = format!(
            "{:#}",
            LabelMappings::from_config(&cfg(r#"{"label_mappings": {"default": [[1, 255]]}}"#))
                .unwrap_err()
        );
        assert!(e.contains("255") && e.contains("out of range"), "{e}");
    }

    #[test]
    fn relabel_keeps_unlisted_values() {
        let m = LabelMappings::from_config(&cfg(
            r#"{"label_mappings": {"default": [[1, 3], [3, 7]], "other": [[2, 9]], "none": null}}"#,
        ))
        .unwrap();
        let orig = Array3::from_shape_vec((1, 1, 6), vec![0u8, 1, 2, 3, 4, 255]).unwrap();
        let mut l = orig.clone();
        m.relabel(&mut l, None).unwrap();
        // no chaining: 1 -> 3 and 3 -> 7 read the original values
        assert_eq!(l.as_slice().unwrap(), &[0, 3, 2, 7, 4, 255]);
        let mut l = orig.clone();
        m.relabel(&mut l, Some("other")).unwrap();
        assert_eq!(l.as_slice().unwrap(), &[0, 1, 9, 3, 4, 255]);
        let mut l = orig.clone();
        m.relabel(&mut l, Some("none")).unwrap();
        assert_eq!(l, orig);
        let seq = LabelMap::sequential(&[3, 140], 1).unwrap();
        assert_eq!(
            (seq.map(3), seq.map(140), seq.map(255), seq.map(0)),
            (1, 2, 255, 0)
        );
    }

    #[test]
    fn label_values_must_be_ids() {
        let ok = Array3::from_shape_vec((1, 1, 3), vec![0.0f32, 3.0, 255.0]).unwrap();
        assert_eq!(
            label_to_u8(&ok, "l").unwrap().as_slice().unwrap(),
            &[0, 3, 255]
        );
        for bad in [-1.0f32, 2.5, 256.0, f32::NAN] {
            let a = Array3::from_shape_vec((1, 1, 2), vec![0.0, bad]).unwrap();
            assert!(label_to_u8(&a, "l").is_err(), "{bad}");
        }
    }
}
