//! The bundle's training loop (`Vista3dTrainer` + handlers of `configs/train.json`), on libtorch.
//!
//! Per step: [`sample_prompt_pairs`] on the patch's labels -> network forward without window (`patch_coords`) and
//! without `prompt_class`, so point results merge by gaussian weights -> per-prompt DiceCE -> backward -> AdamW
//! (with autocast fp16 and dynamic loss scaling on CUDA when `amp`). Per epoch: learning rate from the schedule,
//! validation every `val_interval` epochs (and before training with `val_at_start`) with class prompts
//! `label_set` through the sliding window, logits > 0, mean Dice without channel 0; the best model is written as a
//! PyTorch state dict (`key_metric_filename` in `ckpt_dir`, what the bundle's `CheckpointSaver` writes), and
//! after every epoch a resumable `last.safetensors` (weights, optimizer, loss scaler, history) replaces the
//! previous one atomically, followed by `metrics.jsonl`, `metrics.csv` and `training_curves.png` in
//! `output_dir`.
//!
//! Launched by torchrun or srun ([`crate::distributed`]), the same loop runs as one rank of a process group, as
//! the bundle's `multi_gpu_train.json` (see [`train_with`]): after every backward pass the gradients are averaged
//! across the ranks, the ranks agree on skipped steps and on Ctrl-C, and only rank 0 writes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tch::{nn, Device, Tensor};

use super::data::{validation_samples, LabelMappings, Sample, TrainLoader};
use super::datalist::load_datalist;
use super::loss::{per_prompt_loss, DiceCeSettings};
use super::metrics::{mean_reduction, per_class_dice};
use super::optim::{raw_f32, AdamW, AdamWSettings};
use super::plot::{write_plot, PlotData};
use super::sampler::{sample_prompt_pairs, PromptPairs, SamplerSettings};
use super::schedule::LrSchedule;
use super::{cfg_f64, cfg_usize, cfg_usize3, cfg_value};
use crate::checkpoint::{self, RawTensor};
use crate::config::Config;
use crate::distributed::ddp::{give_zero_gradients, GradientReducer, LocalStep};
use crate::distributed::{self, sampler, ProcessGroup};
use crate::inference::{sliding_window, NetworkPrompts, Stitched};
use crate::model::{self, ForwardArgs, Vista3d, Vista3dConfig};
use crate::{fsutil, runtime};

/// File name of the resumable checkpoint in `ckpt_dir`.
pub const LAST_CHECKPOINT: &str = "last.safetensors";
/// Prefix of the network tensors inside [`LAST_CHECKPOINT`].
const MODEL_PREFIX: &str = checkpoint::TRAINING_MODEL_PREFIX;
/// Metadata key of the training state inside [`LAST_CHECKPOINT`].
const STATE_KEY: &str = checkpoint::TRAINING_STATE_KEY;

/// Everything the training loop reads from the configuration.
#[derive(Debug, Clone)]
pub struct TrainSettings {
    pub epochs: usize,
    pub val_interval: usize,
    pub val_at_start: bool,
    pub seed: u64,
    pub device: String,
    pub amp: bool,
    pub encoder_embed_dim: i64,
    pub finetune: Option<PathBuf>,
    /// Strict loading of the finetuning checkpoint (`finetune_strict`, the bundle's handler default false).
    pub finetune_strict: bool,
    pub ckpt_dir: PathBuf,
    pub output_dir: PathBuf,
    pub key_metric_filename: String,
    pub optimizer: AdamWSettings,
    pub schedule: LrSchedule,
    pub loss: DiceCeSettings,
    pub sampler: SamplerSettings,
    pub early_stop: Option<(usize, f64)>,
    pub patch_size_valid: [usize; 3],
}

fn cfg_bool(cfg: &Config, key: &str, default: bool) -> Result<bool> {
    Ok(cfg.bool(key)?.unwrap_or(default))
}

fn nested_f64(cfg: &Config, group: &str, key: &str) -> Result<Option<f64>> {
    match cfg_value(cfg, group).and_then(|g| g.get(key)) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .with_context(|| format!("config '{group}#{key}' must be a number, got {v}")),
    }
}

fn nested_bool(cfg: &Config, group: &str, key: &str) -> Result<Option<bool>> {
    match cfg_value(cfg, group).and_then(|g| g.get(key)) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_bool()
            .map(Some)
            .with_context(|| format!("config '{group}#{key}' must be true or false, got {v}")),
    }
}

fn probability(cfg: &Config, key: &str, default: f64) -> Result<f64> {
    let p = cfg_f64(cfg, key)?.unwrap_or(default);
    ensure!(
        (0.0..=1.0).contains(&p),
        "config '{key}' must be a probability in [0, 1], got {p}"
    );
    Ok(p)
}

impl TrainSettings {
    /// Reads the training keys (defaults: `configs/train.json` of the bundle).
    pub fn from_config(cfg: &Config) -> Result<Self> {
        let epochs = cfg_usize(cfg, "epochs")?.unwrap_or(5);
        ensure!(epochs >= 1, "config 'epochs' must be at least 1");
        let val_interval = cfg_usize(cfg, "val_interval")?.unwrap_or(1);
        ensure!(
            val_interval >= 1,
            "config 'val_interval' must be at least 1"
        );
        let lr = cfg_f64(cfg, "learning_rate")?.unwrap_or(1e-4);
        ensure!(
            lr > 0.0 && lr.is_finite(),
            "config 'learning_rate' must be positive, got {lr}"
        );
        // `optimizer#weight_decay` (train.json 1e-5); absent: torch's AdamW default 0.01.
        let weight_decay = nested_f64(cfg, "optimizer", "weight_decay")?.unwrap_or(0.01);
        ensure!(
            weight_decay >= 0.0,
            "config 'optimizer#weight_decay' must be >= 0, got {weight_decay}"
        );
        let schedule = if nested_bool(cfg, "lr_schedule", "activate")?.unwrap_or(true) {
            let warmup = nested_f64(cfg, "lr_schedule", "warmup_steps")?.unwrap_or(3.0);
            let multiplier = nested_f64(cfg, "lr_schedule", "warmup_multiplier")?.unwrap_or(0.1);
            ensure!(
                (0.0..=1.0).contains(&multiplier),
                "config 'lr_schedule#warmup_multiplier' must be in [0, 1], got {multiplier}"
            );
            LrSchedule::WarmupCosine {
                base_lr: lr,
                t_total: epochs,
                warmup_steps: (warmup.max(0.0) as usize).min(epochs),
                warmup_multiplier: multiplier,
                end_lr: 0.0,
                cycles: 0.5,
            }
        } else {
            LrSchedule::Constant { base_lr: lr }
        };
        let loss = DiceCeSettings {
            smooth_nr: nested_f64(cfg, "loss", "smooth_nr")?.unwrap_or(0.0),
            smooth_dr: nested_f64(cfg, "loss", "smooth_dr")?.unwrap_or(1e-5),
            squared_pred: nested_bool(cfg, "loss", "squared_pred")?.unwrap_or(true),
            include_background: nested_bool(cfg, "loss", "include_background")?.unwrap_or(true),
            lambda_dice: nested_f64(cfg, "loss", "lambda_dice")?.unwrap_or(1.0),
            lambda_ce: nested_f64(cfg, "loss", "lambda_ce")?.unwrap_or(1.0),
        };
        let sampler = SamplerSettings {
            max_point: cfg_usize(cfg, "max_point")?.unwrap_or(5),
            max_prompt: cfg_usize(cfg, "max_prompt")?,
            max_foreprompt: cfg_usize(cfg, "max_foreprompt")?,
            max_backprompt: cfg_usize(cfg, "max_backprompt")?,
            drop_label_prob: probability(cfg, "drop_label_prob", 0.25)?,
            drop_point_prob: probability(cfg, "drop_point_prob", 0.25)?,
            include_background: !cfg_bool(cfg, "exclude_background", true)?,
        };
        let finetune = if cfg_bool(cfg, "finetune", false)? {
            Some(
                cfg.path("finetune_model_path")?
                    .context("config 'finetune' is true but 'finetune_model_path' is not set")?,
            )
        } else {
            None
        };
        let early_stop = if cfg_bool(cfg, "early_stop", false)? {
            Some((
                cfg_usize(cfg, "early_stop_patience")?.unwrap_or(2),
                cfg_f64(cfg, "early_stop_min_delta")?.unwrap_or(0.01),
            ))
        } else {
            None
        };
        let patch = cfg_usize3(cfg, "patch_size")?.unwrap_or([128; 3]);
        Ok(Self {
            epochs,
            val_interval,
            val_at_start: cfg_bool(cfg, "val_at_start", false)?,
            seed: cfg.int("seed")?.unwrap_or(0) as u64,
            device: cfg.string("device")?.unwrap_or_else(|| "auto".into()),
            amp: cfg_bool(cfg, "amp", true)?,
            encoder_embed_dim: cfg.int("encoder_embed_dim")?.unwrap_or(48),
            finetune,
            finetune_strict: cfg_bool(cfg, "finetune_strict", false)?,
            ckpt_dir: cfg.path("ckpt_dir")?.unwrap_or_else(|| "models".into()),
            output_dir: cfg.path("output_dir")?.unwrap_or_else(|| "eval".into()),
            key_metric_filename: cfg
                .string("key_metric_filename")?
                .unwrap_or_else(|| "model.pt".into()),
            optimizer: AdamWSettings {
                lr,
                weight_decay,
                ..Default::default()
            },
            schedule,
            loss,
            sampler,
            early_stop,
            patch_size_valid: cfg_usize3(cfg, "patch_size_valid")?.unwrap_or(patch),
        })
    }
}

/// One epoch (or the validation before training, epoch 0) in the metrics log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EpochRecord {
    /// 1-based epoch; 0 = validation before training.
    pub epoch: usize,
    /// Global optimizer steps done at the end of the epoch.
    pub step: usize,
    /// Mean training loss of the epoch (`None` for epoch 0).
    pub loss: Option<f64>,
    /// Learning rate used during the epoch.
    pub lr: f64,
    /// Mean validation Dice, when validated.
    pub val_dice: Option<f64>,
    /// Wall-clock seconds of the epoch (training and validation).
    pub seconds: f64,
    /// Steps skipped because the patch gave no prompt (in a process group: patches, summed over the ranks).
    pub skipped: usize,
    /// Seconds spent averaging gradients across ranks (multi-process runs only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allreduce_seconds: Option<f64>,
}

/// Dynamic loss scaling (PyTorch `GradScaler` defaults: 2^16, x2 every 2000 good steps, x0.5 on overflow).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LossScaler {
    pub scale: f64,
    pub growth_tracker: usize,
}

impl Default for LossScaler {
    fn default() -> Self {
        Self {
            scale: 65536.0,
            growth_tracker: 0,
        }
    }
}

/// The training state saved with the weights and the optimizer in [`LAST_CHECKPOINT`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    /// Epochs completed.
    pub epochs_done: usize,
    pub global_step: usize,
    /// Best mean validation Dice so far and its epoch.
    pub best_metric: Option<f64>,
    pub best_epoch: Option<usize>,
    /// The seed every random draw derives from (with the epoch).
    pub seed: u64,
    pub encoder_embed_dim: i64,
    pub scaler: LossScaler,
    /// Validations without improvement (early stopping).
    pub stale_validations: usize,
    pub history: Vec<EpochRecord>,
    /// `(global step, loss)` of every step.
    pub step_losses: Vec<(usize, f64)>,
    /// Parameters that had a gradient when the state was saved. With `zero_grad(set_to_none=False)` a parameter
    /// keeps a (zeroed) gradient once it had one, and AdamW steps every parameter with a gradient, even a zero
    /// one; a resumed run gives these parameters zero gradients again so that it continues exactly.
    #[serde(default)]
    pub with_grad: Vec<String>,
}

/// What a training run did.
#[derive(Debug)]
pub struct TrainOutcome {
    pub state: TrainState,
    /// The best model (`key_metric_filename`), when a validation ran.
    pub best_checkpoint: Option<PathBuf>,
    pub last_checkpoint: PathBuf,
    /// `true` when Ctrl-C stopped the run before its last epoch.
    pub interrupted: bool,
}

/// Set by Ctrl-C: finish the current step, keep the last completed epoch, stop.
static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);

fn install_interrupt_handler() {
    static PRESSES: AtomicUsize = AtomicUsize::new(0);
    let result = ctrlc::set_handler(|| {
        if PRESSES.fetch_add(1, Ordering::SeqCst) > 0 {
            eprintln!("\ninterrupted again: exiting now (the last checkpoint on disk is intact)");
            std::process::exit(130);
        }
        eprintln!("\ninterrupt: stopping after this step; the last completed epoch stays in the checkpoint (Ctrl-C again to exit now)");
        STOP_REQUESTED.store(true, Ordering::SeqCst);
    });
    if let Err(e) = result {
        log::debug!("no Ctrl-C handler: {e}");
    }
}

/// Tensors with their parameter names.
type NamedTensors = Vec<(String, Tensor)>;

/// The network's variables by name (sorted), and the trainable subset.
fn named_variables(vs: &nn::VarStore) -> (NamedTensors, NamedTensors) {
    let mut all: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    let trainable = all
        .iter()
        .filter(|(_, t)| t.requires_grad())
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    (all, trainable)
}

/// The network's tensors as a state dict (MONAI names, float32, host).
pub fn state_dict(vs: &nn::VarStore) -> Result<Vec<(String, RawTensor)>> {
    named_variables(vs)
        .0
        .iter()
        .map(|(n, t)| Ok((n.clone(), raw_f32(t)?)))
        .collect()
}

/// The model: from scratch (seeded), or the finetuning checkpoint loaded non-strictly.
fn build_model(settings: &TrainSettings, device: Device) -> Result<(nn::VarStore, Vista3d)> {
    tch::manual_seed(settings.seed as i64);
    let (config, sd) = match &settings.finetune {
        Some(path) => {
            let sd = checkpoint::read_checkpoint(path)
                .with_context(|| format!("finetune_model_path {}", path.display()))?;
            let config =
                model::detect_config(&sd).with_context(|| format!("{}", path.display()))?;
            (config, Some(sd))
        }
        None => (Vista3dConfig::with_width(settings.encoder_embed_dim), None),
    };
    let vs = nn::VarStore::new(device);
    let net = Vista3d::new(&vs.root(), config)?;
    if let (Some(sd), Some(path)) = (&sd, &settings.finetune) {
        let options = model::LoadOptions::default().allow_partial(!settings.finetune_strict);
        let report = model::load_weights(&vs, sd, &options)
            .with_context(|| format!("finetune_model_path {}", path.display()))?;
        ensure!(
            report.loaded > 0,
            "finetune_model_path {}: no tensor matches the network",
            path.display()
        );
        log::info!(
            "finetuning from {} (width {}, {} tensors loaded)",
            path.display(),
            config.embed_dim,
            report.loaded
        );
    } else {
        log::info!("training from scratch (width {})", config.embed_dim);
    }
    Ok((vs, net))
}

/// Restores weights, optimizer and state from the bytes of a [`LAST_CHECKPOINT`] (read from `path` by rank 0 and,
/// in a multi-process run, sent to the others).
fn load_last(bytes: &[u8], path: &Path, vs: &nn::VarStore, opt: &mut AdamW) -> Result<TrainState> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| anyhow::anyhow!("{}: not a safetensors file: {e}", path.display()))?;
    let state_json = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(STATE_KEY))
        .with_context(|| {
            format!(
                "{}: not a training checkpoint of `vista3d train` (no training state)",
                path.display()
            )
        })?;
    let state: TrainState = serde_json::from_str(state_json)
        .with_context(|| format!("{}: unreadable training state", path.display()))?;
    let tensors = checkpoint::safetensors_from_bytes(bytes, path)?;
    let weights = checkpoint::StateDict {
        format: checkpoint::CheckpointFormat::Safetensors,
        tensors: tensors
            .iter()
            .filter_map(|(n, t)| {
                n.strip_prefix(MODEL_PREFIX)
                    .map(|n| (n.to_string(), t.clone()))
            })
            .collect(),
    };
    model::load_weights(vs, &weights, &model::LoadOptions::default()).with_context(|| {
        format!(
            "{}: the weights do not fit the configured network",
            path.display()
        )
    })?;
    let (_, trainable) = named_variables(vs);
    opt.load_state(tensors.iter().map(|(n, t)| (n.as_str(), t)), &trainable)
        .with_context(|| format!("{}: optimizer state", path.display()))?;
    Ok(state)
}

/// Writes [`LAST_CHECKPOINT`] atomically: weights, optimizer state and the training state.
pub fn save_last(path: &Path, vs: &nn::VarStore, opt: &AdamW, state: &TrainState) -> Result<()> {
    let mut tensors: Vec<(String, RawTensor)> = state_dict(vs)?
        .into_iter()
        .map(|(n, t)| (format!("{MODEL_PREFIX}{n}"), t))
        .collect();
    tensors.extend(opt.state_tensors()?);
    let meta = HashMap::from([
        (STATE_KEY.to_string(), serde_json::to_string(state)?),
        (
            "vista3d.encoder_embed_dim".to_string(),
            state.encoder_embed_dim.to_string(),
        ),
    ]);
    Ok(checkpoint::write_safetensors(path, &tensors, Some(meta))?)
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or(String::new(), |v| format!("{v}"))
}

/// Writes `metrics.jsonl`, `metrics.csv` and `training_curves.png` from the state (each atomically).
fn write_logs(dir: &Path, state: &TrainState, steps_per_epoch: usize) -> Result<()> {
    let mut jsonl = String::new();
    let mut csv = String::from("epoch,step,loss,lr,val_dice,seconds,skipped_steps\n");
    for r in &state.history {
        jsonl.push_str(&serde_json::to_string(r)?);
        jsonl.push('\n');
        csv.push_str(&format!(
            "{},{},{},{},{},{:.3},{}\n",
            r.epoch,
            r.step,
            fmt_opt(r.loss),
            r.lr,
            fmt_opt(r.val_dice),
            r.seconds,
            r.skipped
        ));
    }
    fsutil::write_atomic(&dir.join("metrics.jsonl"), jsonl.as_bytes())?;
    fsutil::write_atomic(&dir.join("metrics.csv"), csv.as_bytes())?;
    let plot = PlotData {
        step_loss: state
            .step_losses
            .iter()
            .map(|&(s, l)| (s as f64, l))
            .collect(),
        epoch_loss: state
            .history
            .iter()
            .filter_map(|r| r.loss.map(|l| (r.epoch as f64, l)))
            .collect(),
        val_dice: state
            .history
            .iter()
            .filter_map(|r| r.val_dice.map(|d| (r.epoch as f64, d)))
            .collect(),
        steps_per_epoch: steps_per_epoch as f64,
    };
    write_plot(&dir.join("training_curves.png"), &plot)
}

/// Validation Dice per sample (one row each: the Dice of every class but channel 0): class prompts `label_set`
/// through the sliding window, logits > 0, against the `valid_remap`ped labels.
pub fn validation_rows(
    net: &Vista3d,
    samples: &[Sample],
    label_set: &[i64],
    window: &crate::inference::WindowSettings,
    device: Device,
) -> Result<Vec<Vec<f64>>> {
    let column = Tensor::from_slice(label_set).view([-1, 1]);
    let prompts = NetworkPrompts {
        class_vector: Some(column.shallow_clone()),
        prompt_class: Some(column),
        point_coords: None,
        point_labels: None,
        label_prompt: Some(label_set.to_vec()),
        points: Vec::new(),
    };
    let mut rows = Vec::with_capacity(samples.len());
    for s in samples {
        let image = s.image.unsqueeze(0).to_device(device);
        let logits = match sliding_window(net, &image, &prompts, window, false)?.0 {
            Stitched::Logits(l) | Stitched::Labels(l) => l,
        };
        let pred = logits.gt(0.0);
        let dice = per_class_dice(&pred, &s.label, label_set.len());
        log::debug!("validation {}: Dice {dice:?}", s.name);
        rows.push(dice);
    }
    Ok(rows)
}

/// Mean validation Dice: [`validation_rows`] reduced as MONAI's `MeanDice` (NaN classes skipped per image, then
/// the mean over images).
pub fn validate(
    net: &Vista3d,
    samples: &[Sample],
    label_set: &[i64],
    window: &crate::inference::WindowSettings,
    device: Device,
) -> Result<f64> {
    Ok(mean_reduction(&validation_rows(
        net, samples, label_set, window, device,
    )?))
}

/// Every rank's validation rows, in the order of the validation list (`indices[i]` is the list position of this
/// rank's row `i`), so that the mean is computed exactly as a single process would.
fn gather_validation_rows(
    group: &ProcessGroup,
    indices: &[usize],
    rows: Vec<Vec<f64>>,
    total: usize,
) -> Result<Vec<Vec<f64>>> {
    // IEEE bits: NaN (a class absent from an image) must survive, and every bit must be kept.
    let mine: Vec<(usize, Vec<u64>)> = indices
        .iter()
        .zip(&rows)
        .map(|(&i, r)| (i, r.iter().map(|v| v.to_bits()).collect()))
        .collect();
    let gathered = group.all_gather_bytes(&serde_json::to_vec(&mine)?)?;
    let mut out: Vec<Option<Vec<f64>>> = vec![None; total];
    for (rank, bytes) in gathered.iter().enumerate() {
        let rows: Vec<(usize, Vec<u64>)> = serde_json::from_slice(bytes)
            .with_context(|| format!("validation results of {}", group.describe_rank(rank)))?;
        for (i, bits) in rows {
            ensure!(
                i < total && out[i].is_none(),
                "{} sent validation image {i} twice or out of range",
                group.describe_rank(rank)
            );
            out[i] = Some(bits.into_iter().map(f64::from_bits).collect());
        }
    }
    out.into_iter()
        .enumerate()
        .map(|(i, r)| r.with_context(|| format!("no rank validated image {i}")))
        .collect()
}

/// The per-epoch RNG of the prompt sampler, derived from the seed, the epoch and the rank (so a resumed run draws
/// the same, and ranks draw differently; rank 0 draws as a single process does).
fn epoch_rng(seed: u64, epoch: usize, rank: usize) -> ChaCha8Rng {
    let rank_mix = (rank as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ChaCha8Rng::seed_from_u64(
        seed ^ rank_mix ^ (epoch as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03),
    )
}

/// Multiplies every gradient by `factor`; returns `false` when one is not finite.
fn unscale_gradients(params: &[(String, Tensor)], factor: f64) -> bool {
    tch::no_grad(|| {
        let mut finite = true;
        for (_, p) in params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.g_mul_scalar_(factor);
                if finite && g.isfinite().all().int64_value(&[]) == 0 {
                    finite = false;
                }
            }
        }
        finite
    })
}

/// One patch's forward and backward pass (the bundle trainer's `_iteration` up to `loss.backward()`): the network
/// in training mode on the prompt pairs, per-prompt DiceCE, and, when the loss is finite, backward of the loss
/// (times `amp_scale`, the loss scaler's scale, under autocast). Gradients accumulate into the parameters'
/// `.grad`. Returns the loss.
pub fn forward_backward(
    net: &Vista3d,
    image: &Tensor,
    label: &Tensor,
    pairs: &PromptPairs,
    loss: &DiceCeSettings,
    amp_scale: Option<f64>,
) -> Result<f64> {
    let device = image.device();
    let dev = |t: &Option<Tensor>| t.as_ref().map(|t| t.to_device(device));
    let (label_prompt, points, point_labels) = (
        dev(&pairs.label_prompt),
        dev(&pairs.points),
        dev(&pairs.point_labels),
    );
    let amp = amp_scale.is_some();
    let loss = crate::runtime::torch_switches::autocast(amp, || -> Result<Tensor> {
        let out = net.forward(
            image,
            &ForwardArgs {
                point_coords: points.as_ref(),
                point_labels: point_labels.as_ref(),
                class_vector: label_prompt.as_ref(),
                ..Default::default()
            },
        )?;
        per_prompt_loss(&out, label, &pairs.classes, loss)
    })?;
    let value = loss.double_value(&[]);
    if value.is_finite() {
        match amp_scale {
            Some(scale) => (&loss * scale).backward(),
            None => loss.backward(),
        }
    }
    Ok(value)
}

/// The optimizer step on the final (in a process group: averaged) gradients: AdamW, with amp after unscaling
/// and skipped when a gradient overflowed (PyTorch's `GradScaler`). Returns `false` when skipped.
fn optimizer_step(
    trainable: &[(String, Tensor)],
    opt: &mut AdamW,
    scaler: &mut LossScaler,
    amp: bool,
) -> bool {
    if !amp {
        opt.step(trainable);
        return true;
    }
    if unscale_gradients(trainable, 1.0 / scaler.scale) {
        opt.step(trainable);
        scaler.growth_tracker += 1;
        if scaler.growth_tracker == 2000 {
            scaler.scale *= 2.0;
            scaler.growth_tracker = 0;
        }
        true
    } else {
        log::debug!(
            "amp: gradient overflow, step skipped, scale {}",
            scaler.scale * 0.5
        );
        scaler.scale *= 0.5;
        scaler.growth_tracker = 0;
        false
    }
}

/// DDP's start: every rank takes rank 0's parameters.
fn broadcast_parameters(group: &ProcessGroup, vars: &[(String, Tensor)]) -> Result<()> {
    tch::no_grad(|| -> Result<()> {
        for (name, t) in vars {
            let mut t = t.shallow_clone();
            group
                .broadcast(&mut t, 0)
                .with_context(|| format!("broadcasting parameter {name} from rank 0"))?;
        }
        Ok(())
    })
}

/// SHA-256 of every parameter (names and float32 bytes), first 16 hex digits: equal on every rank while the
/// ranks stay identical.
fn parameter_digest(vars: &[(String, Tensor)]) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for (name, t) in vars {
        h.update(name.as_bytes());
        h.update(raw_f32(t)?.data);
    }
    Ok(fsutil::hex(&h.finalize())[..16].to_string())
}

/// Options of one `vista3d train` run besides the configuration.
#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    /// Continue from `ckpt_dir/last.safetensors`.
    pub resume: bool,
    /// Show a progress bar (on a terminal).
    pub progress: bool,
}

/// Runs the training described by `cfg` (train.json keys) in this process.
pub fn train(cfg: &Config, options: &TrainOptions) -> Result<TrainOutcome> {
    train_with(cfg, options, None)
}

/// Runs the training described by `cfg`; with a process group, as one rank of the bundle's `multi_gpu_train.json`:
/// the configuration and the network checked equal on all ranks, rank 0's parameters (or checkpoint, with
/// `--resume`) on every rank, training items split by a DistributedSampler (even, shuffled with the epoch),
/// gradients averaged after every step, validation items split unevenly and the Dice rows gathered, and
/// checkpoints, logs, plot and progress bar on rank 0 only. The parameters are compared across ranks after every
/// epoch.
pub fn train_with(
    cfg: &Config,
    options: &TrainOptions,
    group: Option<&ProcessGroup>,
) -> Result<TrainOutcome> {
    let settings = TrainSettings::from_config(cfg)?;
    let device = match group {
        Some(g) => g.device(),
        None => runtime::parse_device(&settings.device)?,
    };
    let amp = settings.amp && device.is_cuda();
    let (rank, world) = group.map_or((0, 1), |g| (g.rank(), g.world_size()));
    let main = rank == 0;
    if let Some(g) = group {
        g.check_config(cfg)?;
    }
    let mappings = LabelMappings::from_config(cfg)?;
    let label_set = mappings.label_set();
    let datalist = load_datalist(cfg)?;
    ensure!(
        !datalist.training.is_empty(),
        "the datalist has no training items (all are in the validation fold?)"
    );
    if main {
        std::fs::create_dir_all(&settings.ckpt_dir)
            .with_context(|| format!("cannot create ckpt_dir {}", settings.ckpt_dir.display()))?;
        std::fs::create_dir_all(&settings.output_dir).with_context(|| {
            format!("cannot create output_dir {}", settings.output_dir.display())
        })?;
    }
    let last_path = settings.ckpt_dir.join(LAST_CHECKPOINT);
    let best_path = settings.ckpt_dir.join(&settings.key_metric_filename);

    let (vs, net) = build_model(&settings, device)?;
    let (all_vars, trainable) = named_variables(&vs);
    ensure!(
        !trainable.is_empty(),
        "the network has no trainable parameter"
    );
    if let Some(g) = group {
        let count: i64 = all_vars.iter().map(|(_, t)| t.numel() as i64).sum();
        g.check_same(
            "network",
            &format!("width {} ({count} parameters)", net.config.embed_dim),
        )?;
    }
    let mut opt = AdamW::new(settings.optimizer);
    let mut state = TrainState {
        epochs_done: 0,
        global_step: 0,
        best_metric: None,
        best_epoch: None,
        seed: settings.seed,
        encoder_embed_dim: net.config.embed_dim,
        scaler: LossScaler::default(),
        stale_validations: 0,
        history: Vec::new(),
        step_losses: Vec::new(),
        with_grad: Vec::new(),
    };
    if options.resume {
        // Rank 0 reads the checkpoint and sends it to the others: only rank 0 needs ckpt_dir.
        let bytes = if main {
            ensure!(
                last_path.is_file(),
                "--resume: no {} in ckpt_dir {} (nothing to resume)",
                LAST_CHECKPOINT,
                settings.ckpt_dir.display()
            );
            Some(
                std::fs::read(&last_path)
                    .with_context(|| format!("cannot read {}", last_path.display()))?,
            )
        } else {
            None
        };
        let bytes = match group {
            Some(g) => g.broadcast_blob(bytes)?,
            None => bytes.unwrap_or_default(),
        };
        state = load_last(&bytes, &last_path, &vs, &mut opt)?;
        drop(bytes);
        // The gradients the uninterrupted run would hold (older checkpoints: the parameters AdamW has a state for).
        let with_grad: Vec<&Tensor> = trainable
            .iter()
            .filter(|(n, _)| {
                if state.with_grad.is_empty() {
                    opt.step_count(n) > 0.0
                } else {
                    state.with_grad.contains(n)
                }
            })
            .map(|(_, t)| t)
            .collect();
        give_zero_gradients(&with_grad);
        ensure!(
            state.seed == settings.seed,
            "--resume: the checkpoint was trained with seed {}, the configuration says {}",
            state.seed,
            settings.seed
        );
        log::info!(
            "resuming from {} after epoch {} (step {}, best Dice {})",
            last_path.display(),
            state.epochs_done,
            state.global_step,
            fmt_opt(state.best_metric)
        );
        if state.epochs_done >= settings.epochs {
            log::info!(
                "already trained {} of {} epochs: nothing to do (raise epochs to continue)",
                state.epochs_done,
                settings.epochs
            );
            return Ok(TrainOutcome {
                best_checkpoint: best_path.is_file().then_some(best_path),
                last_checkpoint: last_path,
                state,
                interrupted: false,
            });
        }
    } else if main && last_path.exists() {
        log::warn!(
            "{} exists and will be replaced (use --resume to continue it)",
            last_path.display()
        );
    }
    if let Some(g) = group {
        broadcast_parameters(g, &all_vars)?;
    }

    log::info!(
        "{} training / {} validation images, label_set {label_set:?}, device {}{}{}",
        datalist.training.len(),
        datalist.validation.len(),
        crate::segmenter::device_name(device),
        if amp { ", amp" } else { "" },
        group.map_or(String::new(), |g| format!(
            ", rank {rank} of {world} ({})",
            g.backend().map_or("?", |b| b.name())
        ))
    );
    let mut loader =
        TrainLoader::new(cfg, &datalist.training, &mappings, settings.seed)?.sharded(rank, world);
    // Validation: rank r validates images r, r + world, ... (DistributedSampler(even_divisible=False)).
    let all_val: Vec<usize> = (0..datalist.validation.len()).collect();
    let val_indices = sampler::shard(&all_val, rank, world, false);
    let val_items: Vec<_> = val_indices
        .iter()
        .map(|&i| datalist.validation[i].clone())
        .collect();
    let val_samples = if datalist.validation.is_empty() {
        log::warn!("no validation items: no validation Dice and no best checkpoint");
        Vec::new()
    } else if val_items.is_empty() {
        Vec::new()
    } else {
        validation_samples(cfg, &val_items, &mappings)?
    };
    let mut window = cfg.window_settings()?;
    window.patch_size = settings.patch_size_valid;
    window.use_point_window = false;
    let steps_per_epoch = loader.len();
    let reducer = group.map(|g| GradientReducer::new(&trainable, g.settings().bucket_cap_mb));

    let run_validation = |net: &Vista3d| -> Result<Option<f64>> {
        if datalist.validation.is_empty() {
            return Ok(None);
        }
        let t = Instant::now();
        let rows = tch::no_grad(|| {
            crate::runtime::torch_switches::autocast(amp, || {
                validation_rows(net, &val_samples, &label_set, &window, device)
            })
        })?;
        let rows = match group {
            Some(g) => gather_validation_rows(g, &val_indices, rows, datalist.validation.len())?,
            None => rows,
        };
        let d = mean_reduction(&rows);
        log::info!(
            "validation mean Dice {d:.4} ({:.1} s)",
            t.elapsed().as_secs_f64()
        );
        Ok(Some(d))
    };
    let save_best = |vs: &nn::VarStore| -> Result<()> {
        if main {
            Ok(checkpoint::write_torch_state_dict(
                &best_path,
                &state_dict(vs)?,
            )?)
        } else {
            Ok(())
        }
    };

    install_interrupt_handler();
    STOP_REQUESTED.store(false, Ordering::SeqCst);

    if settings.val_at_start && state.epochs_done == 0 && state.history.is_empty() {
        let t = Instant::now();
        let dice = run_validation(&net)?;
        if let Some(d) = dice {
            state.best_metric = Some(d);
            state.best_epoch = Some(0);
            save_best(&vs)?;
        }
        state.history.push(EpochRecord {
            epoch: 0,
            step: 0,
            loss: None,
            lr: settings.schedule.lr(0),
            val_dice: dice,
            seconds: t.elapsed().as_secs_f64(),
            skipped: 0,
            allreduce_seconds: None,
        });
        if main {
            write_logs(&settings.output_dir, &state, steps_per_epoch)?;
        }
    }

    let mut interrupted = false;
    while state.epochs_done < settings.epochs {
        let epoch = state.epochs_done; // 0-based
        let t_epoch = Instant::now();
        opt.lr = settings.schedule.lr(epoch);
        let mut rng = epoch_rng(settings.seed, epoch, rank);
        let bar = progress_bar(
            options.progress && main,
            steps_per_epoch,
            epoch + 1,
            settings.epochs,
        );
        let (mut loss_sum, mut n_steps, mut skipped) = (0.0, 0usize, 0usize);
        let mut allreduce_seconds = 0.0;
        let mut new_losses = Vec::new();
        let mut scaler = state.scaler.clone();
        let mut step = state.global_step;
        for sample in loader.epoch(epoch) {
            // Alone, stop at once; in a group, the ranks agree on stopping through the step's all-reduce.
            if group.is_none() && STOP_REQUESTED.load(Ordering::SeqCst) {
                interrupted = true;
                break;
            }
            let sample = sample?;
            for (_, p) in &trainable {
                p.shallow_clone().zero_grad();
            }
            let local_loss = match sample_prompt_pairs(
                &sample.label,
                &label_set,
                &settings.sampler,
                &mut rng,
            )? {
                None => {
                    log::debug!("step skipped: no prompt in patch {}", sample.name);
                    None
                }
                Some(pairs) => {
                    let image = sample.image.unsqueeze(0).to_device(device);
                    let label = sample.label.unsqueeze(0).to_device(device);
                    let value = forward_backward(
                        &net,
                        &image,
                        &label,
                        &pairs,
                        &settings.loss,
                        amp.then_some(scaler.scale),
                    )?;
                    ensure!(
                        value.is_finite(),
                        "the training loss is {value} at epoch {} step {} (TerminateOnNan); lower learning_rate",
                        epoch + 1,
                        step + 1
                    );
                    Some(value)
                }
            };
            let (loss_value, stop_now) = match (group, &reducer) {
                (Some(g), Some(r)) => {
                    let global = r.reduce(
                        g,
                        LocalStep {
                            loss: local_loss,
                            stop: STOP_REQUESTED.load(Ordering::SeqCst),
                        },
                    )?;
                    allreduce_seconds += global.seconds;
                    skipped += world - global.contributors;
                    (global.mean_loss, global.stop)
                }
                _ => {
                    if local_loss.is_none() {
                        skipped += 1;
                    }
                    (local_loss, false)
                }
            };
            if let Some(value) = loss_value {
                optimizer_step(&trainable, &mut opt, &mut scaler, amp);
                step += 1;
                n_steps += 1;
                loss_sum += value;
                new_losses.push((step, value));
                bar.set_message(format!("loss {value:.4}"));
            }
            bar.inc(1);
            if stop_now {
                interrupted = true;
                break;
            }
        }
        bar.finish_and_clear();
        if interrupted {
            break;
        }
        ensure!(
            n_steps > 0,
            "epoch {}: every patch was skipped (no prompt); check label_set {label_set:?} against the labels",
            epoch + 1
        );
        let mean_loss = loss_sum / n_steps as f64;
        let validate_now = (epoch + 1).is_multiple_of(settings.val_interval);
        let dice = if validate_now {
            run_validation(&net)?
        } else {
            None
        };
        let mut stop_early = false;
        if let Some(d) = dice {
            let improved = state.best_metric.is_none_or(|b| d > b);
            let significant = state
                .best_metric
                .is_none_or(|b| d > b + settings.early_stop.map_or(0.0, |e| e.1));
            if improved {
                state.best_metric = Some(d);
                state.best_epoch = Some(epoch + 1);
                save_best(&vs)?;
                if main {
                    log::info!("new best Dice {d:.4}: saved {}", best_path.display());
                }
            }
            state.stale_validations = if significant {
                0
            } else {
                state.stale_validations + 1
            };
            if let Some((patience, _)) = settings.early_stop {
                stop_early = state.stale_validations >= patience;
            }
        }
        if let Some(g) = group {
            let digest = parameter_digest(&all_vars)?;
            g.check_same(&format!("parameters after epoch {}", epoch + 1), &digest)?;
            if main {
                log::info!(
                    "epoch {}: parameters identical on all {world} ranks (digest {digest}); all-reduce {:.2} s",
                    epoch + 1,
                    allreduce_seconds
                );
            }
        }
        state.epochs_done = epoch + 1;
        state.global_step = step;
        state.with_grad = trainable
            .iter()
            .filter(|(_, t)| t.grad().defined())
            .map(|(n, _)| n.clone())
            .collect();
        state.scaler = scaler;
        state.step_losses.extend(new_losses);
        state.history.push(EpochRecord {
            epoch: epoch + 1,
            step,
            loss: Some(mean_loss),
            lr: opt.lr,
            val_dice: dice,
            seconds: t_epoch.elapsed().as_secs_f64(),
            skipped,
            allreduce_seconds: group.map(|_| allreduce_seconds),
        });
        if main {
            save_last(&last_path, &vs, &opt, &state)?;
            write_logs(&settings.output_dir, &state, steps_per_epoch)?;
            log::info!(
                "epoch {}/{}: loss {mean_loss:.4}, lr {:.3e}{}, {:.1} s",
                epoch + 1,
                settings.epochs,
                opt.lr,
                dice.map_or(String::new(), |d| format!(", val Dice {d:.4}")),
                t_epoch.elapsed().as_secs_f64()
            );
        }
        if stop_early {
            log::info!(
                "early stop: no Dice gain above {} for {} validations",
                settings.early_stop.map_or(0.0, |e| e.1),
                state.stale_validations
            );
            break;
        }
    }
    if interrupted && main {
        log::warn!(
            "interrupted during epoch {}: {} holds epoch {}; continue with --resume",
            state.epochs_done + 1,
            last_path.display(),
            state.epochs_done
        );
    }
    Ok(TrainOutcome {
        best_checkpoint: best_path.is_file().then_some(best_path),
        last_checkpoint: last_path,
        state,
        interrupted,
    })
}

fn progress_bar(enabled: bool, len: usize, epoch: usize, epochs: usize) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len as u64);
    let style = ProgressStyle::with_template(
        "epoch {prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed} < {eta})",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_prefix(format!("{epoch}/{epochs}"));
    bar
}

/// `vista3d train`: loads the layered configuration, trains (as one rank of a process group when launched by
/// torchrun or srun), and prints where the results are (rank 0).
pub fn run_cli(
    configs: &[PathBuf],
    sets: &[String],
    resume: bool,
    device: Option<String>,
    threads: Option<i32>,
) -> Result<()> {
    let mut cfg = Config::load(configs, sets)?;
    if let Some(d) = device {
        cfg.set(&format!("device={d}"))?;
    }
    if let Some(n) = threads {
        ensure!(n > 0, "--threads must be positive, got {n}");
        tch::set_num_threads(n);
    }
    let requested = runtime::parse_device(&cfg.string("device")?.unwrap_or_else(|| "auto".into()))?;
    let group = ProcessGroup::from_env(&cfg, requested)?.map(|(g, _)| g);
    let main = group.as_ref().is_none_or(|g| g.is_main());
    let options = TrainOptions {
        resume,
        progress: main && std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let out = distributed::run_in_group(group, |g| train_with(&cfg, &options, g))?;
    let s = &out.state;
    if main {
        println!(
            "trained {} epochs ({} steps){}; best validation Dice {} (epoch {})",
            s.epochs_done,
            s.global_step,
            if out.interrupted { ", interrupted" } else { "" },
            fmt_opt(s.best_metric),
            s.best_epoch.map_or(String::new(), |e| e.to_string())
        );
        if let Some(b) = &out.best_checkpoint {
            println!("best model: {}", b.display());
        }
        println!("resumable checkpoint: {}", out.last_checkpoint.display());
    }
    if out.interrupted {
        anyhow::bail!("training interrupted; continue with --resume");
    }
    Ok(())
}
