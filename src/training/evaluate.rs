//! `vista3d evaluate`: the bundle's evaluation (`train.json` + `train_continual.json` + `evaluate.json`).
//!
//! For each validation item (or `testing` item): the image alone goes through the training-order preprocessing
//! (foreground crop margin 10 -> intensity scaling -> RAS -> `resample_to_spacing`, bilinear), the network
//! segments it by class prompts = the evaluation label set (sliding window, the bundle's effective overlap 0.25 /
//! constant blending), labels come from the bundle's postprocessing, are brought back to the original grid as
//! `Invertd(nearest)` does (spacing undone by nearest resampling, orientation, then the crop by zero padding), NaN
//! -> 255, and saved as `<output_dir>/<stem>/<stem>_trans.nii.gz` (float32, the image's geometry). The ground truth
//! stays on its own (= the image's) grid: `Relabeld(label_mappings)` to global ids, then prediction and ground truth
//! are relabelled `[[c, i + 1] for i, c in enumerate(label_set)]` and compared with `MeanDice(include_background=
//! False, num_classes)`. Reports: MONAI `MetricsSaver` files in `output_dir` (see [`super::metrics`]).
//!
//! `num_classes` is the config's `output_classes` when it is a number, else `len(label_set) + 1`, so that every
//! evaluated class counts. (The bundle derives `output_classes = len(label_set)` and, with more than one mapped
//! class, its DiceHelper then skips the last class; for the default single class both give class 1.)

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use ndarray::Array3;
use tch::Tensor;

use super::data::{label_to_u8, load_label_for, LabelMap, LabelMappings};
use super::datalist::{load_datalist, DataItem};
use super::metrics::{per_class_dice_labels, write_metrics_reports, MetricDetails};
use super::{cfg_usize, training_preprocess_config};
use crate::batch::{output_path, OutputSpec};
use crate::config::{Config, InferenceConfig};
use crate::engines::Method;
use crate::io::read_image;
use crate::segmenter::record::{self, build_record, file_identity, request_identity};
use crate::segmenter::{Pipeline, Request, Segmenter, WeightsSource};
use crate::volume::Volume;

/// The metric name the bundle's `MetricsSaver` writes.
pub const METRIC_NAME: &str = "val_mean_dice";

/// What the evaluation reads from the configuration beyond the inference settings.
#[derive(Debug, Clone)]
pub struct EvalSettings {
    /// Class prompts (global ids): the evaluation label set.
    pub label_set: Vec<i64>,
    /// `num_classes` of the Dice (see the module documentation).
    pub num_classes: usize,
    /// Where predictions go (`output_dir`, `output_postfix`, `output_dtype`).
    pub output: OutputSpec,
}

impl EvalSettings {
    /// Reads the label sets, `output_classes`, `output_dir`, `output_postfix`, `output_dtype`.
    pub fn from_config(
        cfg: &Config,
        inference: &InferenceConfig,
        mappings: &LabelMappings,
    ) -> Result<EvalSettings> {
        let label_set = mappings.eval_label_set();
        let num_classes = cfg_usize(cfg, "output_classes")?.unwrap_or(label_set.len() + 1);
        Ok(EvalSettings {
            label_set,
            num_classes,
            output: OutputSpec {
                dir: inference.output_dir.clone(),
                postfix: inference.output_postfix.clone(),
                dtype: inference.output_dtype,
                format: crate::config::OutputFormat::Nifti,
                preview: false,
            },
        })
    }

    /// The segmenter pipeline of `evaluate.json`: training-order preprocessing with `resample_to_spacing`.
    pub fn pipeline(&self, cfg: &Config) -> Result<Pipeline> {
        Ok(Pipeline::Evaluate {
            label_set: self.label_set.clone(),
            preprocess: training_preprocess_config(cfg)?,
        })
    }
}

/// One evaluated image.
#[derive(Debug, Clone)]
pub struct EvalItem {
    pub image: PathBuf,
    pub prediction: PathBuf,
    /// Dice per evaluated class (NaN: class absent from the ground truth); `None` without a label.
    pub dice: Option<Vec<f64>>,
}

/// The result of an evaluation run.
#[derive(Debug, Clone)]
pub struct EvalReport {
    pub items: Vec<EvalItem>,
    pub details: MetricDetails,
    /// The aggregated `val_mean_dice`.
    pub mean_dice: f64,
}

/// Relabels a ground truth (`label_mappings`, then the sequential evaluation map) and warns about ids that the
/// mapping does not list (they keep their value, as `Relabeld` does, and may collide with evaluated classes).
fn prepare_ground_truth(
    label: &Volume,
    item: &DataItem,
    mappings: &LabelMappings,
    seq: &LabelMap,
) -> Result<Array3<u8>> {
    let mut gt = label_to_u8(&label.data, "label")?;
    if let Some(m) = mappings.map_for(item.dataset_name.as_deref()) {
        let counts = super::augment::class_counts(gt.view());
        let unlisted: Vec<usize> = (1..256)
            .filter(|&v| counts[v] > 0 && !m.pairs().iter().any(|p| p.0 as usize == v))
            .collect();
        if !unlisted.is_empty() {
            log::warn!(
                "{}: label ids {unlisted:?} are not in label_mappings and keep their values (Relabeld semantics); \
                 map them to 0 if they are not evaluated classes",
                item.image.display()
            );
        }
        m.apply(&mut gt);
    }
    seq.apply(&mut gt);
    Ok(gt)
}

fn u8_tensor(a: &Array3<u8>) -> Result<Tensor> {
    let s = a.shape();
    let std = a.as_standard_layout();
    Ok(
        Tensor::from_slice(std.as_slice().context("array layout")?).view([
            s[0] as i64,
            s[1] as i64,
            s[2] as i64,
        ]),
    )
}

/// Where the prediction of `item` goes: `<output_dir>/<stem>/<stem>_<postfix>.nii.gz`.
pub fn prediction_path(settings: &EvalSettings, item: &DataItem) -> PathBuf {
    output_path(
        &settings.output.dir,
        Path::new(item.image.file_name().unwrap_or_default()),
        &settings.output.postfix,
    )
}

/// Evaluates one item with a segmenter built for [`EvalSettings::pipeline`]: writes its prediction and record
/// and computes its Dice (when it has a label). `seq` is the sequential evaluation map of
/// [`EvalSettings::label_set`] (`LabelMap::sequential(label_set, 1)`).
pub fn evaluate_item(
    segmenter: &Segmenter,
    item: &DataItem,
    mappings: &LabelMappings,
    settings: &EvalSettings,
    seq: &LabelMap,
) -> Result<EvalItem> {
    let input = read_image(&item.image, &Default::default())?;
    let label = load_label_for(item, &input.volume)?;
    let name = item.image.display().to_string();
    let request = Request {
        name: &name,
        image: &input.volume,
        prompts: Default::default(),
        precision: None,
        image_kept: true,
    };
    let seg = segmenter
        .segment(&request)
        .with_context(|| format!("segmenting {}", item.image.display()))?;
    let out = prediction_path(settings, item);
    let identity = request_identity(
        segmenter,
        file_identity(&item.image),
        &request.prompts,
        segmenter.config().precision,
        settings.output.dtype,
    );
    let rec = build_record(segmenter, &seg, &input.volume, identity, &out, &seg.timings);
    record::save(
        &out,
        &seg.labels,
        &input.header,
        settings.output.dtype,
        &rec,
    )?;
    let dice = match &label {
        None => None,
        Some(l) => {
            let gt = prepare_ground_truth(l, item, mappings, seq)
                .with_context(|| format!("label of {}", item.image.display()))?;
            let mut p = label_to_u8(&seg.labels, "prediction")?;
            seq.apply(&mut p);
            Some(per_class_dice_labels(
                &u8_tensor(&p)?,
                &u8_tensor(&gt)?,
                settings.num_classes,
            ))
        }
    };
    Ok(EvalItem {
        image: item.image.clone(),
        prediction: out,
        dice,
    })
}

/// The Dice values of an item as the log shows them.
pub fn dice_text(dice: &Option<Vec<f64>>) -> String {
    match dice {
        None => "no label".to_string(),
        Some(d) => d
            .iter()
            .map(|v| format!("{v:.4}"))
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// The report of evaluated items (in datalist order): per-image Dice of the labelled ones and their aggregate
/// (nothing is written).
pub fn build_report(items: Vec<EvalItem>) -> Result<EvalReport> {
    let mut details = MetricDetails {
        name: METRIC_NAME.into(),
        images: Vec::new(),
        values: Vec::new(),
    };
    for it in &items {
        if let Some(d) = &it.dice {
            details.images.push(it.image.display().to_string());
            details.values.push(d.clone());
        }
    }
    ensure!(
        !details.values.is_empty(),
        "no evaluated item has a label: nothing to compute Dice on"
    );
    let mean_dice = details.aggregate();
    Ok(EvalReport {
        items,
        details,
        mean_dice,
    })
}

/// Evaluates `items` with a segmenter built for [`EvalSettings::pipeline`]: writes one prediction (and its
/// record) per image and the MONAI metric reports.
pub fn evaluate_items(
    segmenter: &Segmenter,
    items: &[DataItem],
    mappings: &LabelMappings,
    settings: &EvalSettings,
) -> Result<EvalReport> {
    ensure!(!items.is_empty(), "nothing to evaluate: the split is empty");
    let seq = LabelMap::sequential(&settings.label_set, 1)?;
    let mut out_items = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let t = std::time::Instant::now();
        let done = evaluate_item(segmenter, item, mappings, settings, &seq)?;
        log::info!(
            "[{}/{}] {}: dice {} ({:.1} s) -> {}",
            i + 1,
            items.len(),
            item.name(),
            dice_text(&done.dice),
            t.elapsed().as_secs_f64(),
            done.prediction.display()
        );
        out_items.push(done);
    }
    let report = build_report(out_items)?;
    write_metrics_reports(&settings.output.dir, &report.details)?;
    Ok(report)
}

/// `vista3d evaluate`: loads the datalist and the checkpoint (`checkpoint`, else `ckpt_path`), evaluates the
/// validation split of `fold` (or `testing`) through a [`Segmenter`] (so `precision` applies as in `infer`), and
/// writes predictions, their records and the reports to `output_dir`.
pub fn run_evaluate(cfg: &Config, checkpoint: Option<&Path>, testing: bool) -> Result<EvalReport> {
    let mappings = LabelMappings::from_config(cfg)?;
    let inference = cfg.inference()?;
    let settings = EvalSettings::from_config(cfg, &inference, &mappings)?;
    let dl = load_datalist(cfg)?;
    let items = if testing { dl.testing } else { dl.validation };
    ensure!(
        !items.is_empty(),
        "the {} split is empty",
        if testing { "testing" } else { "validation" }
    );
    let ckpt = checkpoint
        .map(Path::to_path_buf)
        .or(cfg.path("ckpt_path")?)
        .context("no checkpoint: pass --checkpoint or set ckpt_path")?;
    let pipeline = settings.pipeline(cfg)?;
    let mut inference = inference;
    let device = crate::runtime::parse_device(&inference.device)?;
    // Under torchrun / srun (mgpu_evaluate.json): each rank evaluates its share, rank 0 writes the reports.
    let (group, device) = match crate::distributed::ProcessGroup::from_env(cfg, device)? {
        Some((g, d)) => (Some(g), d),
        None => (None, device),
    };
    inference.device = crate::segmenter::device_name(device);
    crate::distributed::run_in_group(group, |group| {
        let segmenter = Segmenter::load(
            inference,
            &WeightsSource::Checkpoint(ckpt.clone()),
            pipeline,
        )?;
        log::info!(
            "evaluating {} item(s) with {} (label set {:?}, {} Dice classes) on {}",
            items.len(),
            ckpt.display(),
            settings.label_set,
            crate::training::metrics::evaluated_classes(settings.num_classes).len(),
            crate::segmenter::device_name(device)
        );
        match group {
            None => evaluate_items(&segmenter, &items, &mappings, &settings),
            Some(g) => crate::distributed::evaluate::evaluate_items(
                g, cfg, &segmenter, &items, &mappings, &settings,
            ),
        }
    })
}

/// The `vista3d evaluate` command: layered configs, `--set`s, then `--output-dir` / `--device`; prints the mean
/// Dice and where the reports are.
pub fn evaluate_command(
    configs: &[PathBuf],
    sets: &[String],
    checkpoint: Option<&Path>,
    output_dir: Option<&Path>,
    device: Option<&str>,
    precision: Option<Method>,
    testing: bool,
) -> Result<()> {
    let mut cfg = Config::load(configs, sets)?;
    if let Some(d) = output_dir {
        cfg.set_flag("--output-dir", "output_dir", d.display().to_string().into())?;
    }
    if let Some(d) = device {
        cfg.set_flag("--device", "device", d.into())?;
    }
    if let Some(p) = precision {
        cfg.set_flag("--precision", "precision", p.name().into())?;
    }
    let report = run_evaluate(&cfg, checkpoint, testing)?;
    let dir = cfg
        .path("output_dir")?
        .unwrap_or_else(|| PathBuf::from("eval"));
    println!(
        "{METRIC_NAME} {:.4} over {} image(s); reports in {}",
        report.mean_dice,
        report.details.values.len(),
        dir.display()
    );
    Ok(())
}
