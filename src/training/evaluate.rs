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
use tch::{Device, Tensor};

use super::data::{label_to_u8, load_label_for, LabelMap, LabelMappings};
use super::datalist::{load_datalist, DataItem};
use super::metrics::{per_class_dice_labels, write_metrics_reports, MetricDetails};
use super::{cfg_usize, training_preprocess_config};
use crate::config::{output_path, Config};
use crate::inference::{
    infer_labels, tensor_to_array, volume_to_tensor, NetworkPrompts, WindowSettings,
};
use crate::io::{read_nifti, write_nifti, OutputDtype};
use crate::model::Vista3d;
use crate::transforms::{
    apply_spacing_plan, crop, foreground_box, plan_spacing, resample_to_grid,
    scale_intensity_range_inplace, uncrop, validate_volume, CropBox, Interp, Orientation,
    PreprocessConfig, SpacingPlan,
};
use crate::volume::{Affine, Volume};

/// The metric name the bundle's `MetricsSaver` writes.
pub const METRIC_NAME: &str = "val_mean_dice";

/// What the training-order preprocessing did to an image, to invert a prediction.
#[derive(Debug, Clone)]
pub struct TrainOrderTrace {
    pub original_dims: [usize; 3],
    pub crop: CropBox,
    pub orientation: Orientation,
    /// Affine and shape after crop + RAS (the grid before resampling).
    pub oriented_affine: Affine,
    pub oriented_dims: [usize; 3],
    pub spacing: SpacingPlan,
}

/// The training pipeline's deterministic transforms on an image alone (`evaluate.json`): foreground crop ->
/// intensity scaling -> RAS -> spacing (bilinear). Returns the network input and the trace to invert predictions.
pub fn preprocess_train_order(
    image: &Volume,
    pre: &PreprocessConfig,
) -> Result<(Volume, TrainOrderTrace)> {
    validate_volume(image)?;
    let box_ = foreground_box(image.data.view(), pre.crop_margin).with_context(|| {
        format!(
            "no foreground: no voxel > 0 in the image of shape {:?} (MONAI would crop it to 0x0x0)",
            image.dims()
        )
    })?;
    let mut cur = crop(image, &box_)?;
    scale_intensity_range_inplace(&mut cur.data, &pre.intensity());
    let orientation = Orientation::to_ras(&cur.affine, cur.dims())?;
    if !orientation.is_identity() {
        cur.data = orientation.apply(cur.data.view())?;
    }
    cur.affine = orientation.apply_affine(&cur.affine);
    let plan = plan_spacing(&cur.affine, cur.dims(), pre.spacing)?;
    let trace = TrainOrderTrace {
        original_dims: image.dims(),
        crop: box_,
        orientation,
        oriented_affine: cur.affine,
        oriented_dims: cur.dims(),
        spacing: plan.clone(),
    };
    let out = apply_spacing_plan(&cur, &plan, Interp::Bilinear)?;
    Ok((out, trace))
}

/// `Invertd(nearest_interp=True)` of [`preprocess_train_order`]: spacing undone by nearest resampling onto the
/// oriented grid, orientation undone, crop undone by zero padding. NaN is carried over.
pub fn invert_train_order(pred: &Array3<f32>, trace: &TrainOrderTrace) -> Result<Array3<f32>> {
    let s = pred.shape();
    ensure!(
        [s[0], s[1], s[2]] == trace.spacing.out_dims,
        "prediction of shape {s:?} does not match the preprocessed grid {:?}",
        trace.spacing.out_dims
    );
    let vol = Volume {
        data: pred.as_standard_layout().into_owned(),
        affine: trace.spacing.out_affine,
    };
    let back = resample_to_grid(
        &vol,
        &trace.oriented_affine,
        trace.oriented_dims,
        Interp::Nearest,
    )?;
    let inv = trace.orientation.inverse();
    let data = if inv.is_identity() {
        back.data
    } else {
        inv.apply(back.data.view())?
    };
    uncrop(data.view(), &trace.crop, trace.original_dims)
}

/// Everything the evaluation reads from the configuration.
#[derive(Debug, Clone)]
pub struct EvalSettings {
    pub preprocess: PreprocessConfig,
    pub window: WindowSettings,
    /// Class prompts (global ids): the evaluation label set.
    pub label_set: Vec<i64>,
    /// `num_classes` of the Dice (see the module documentation).
    pub num_classes: usize,
    pub output_dir: PathBuf,
    pub output_postfix: String,
    pub output_dtype: OutputDtype,
}

impl EvalSettings {
    /// Reads `resample_to_spacing`, `patch_size` / `overlap` / `mode` / `sw_batch_size`, the label sets,
    /// `output_classes`, `output_dir`, `output_postfix`, `output_dtype`.
    pub fn from_config(cfg: &Config, mappings: &LabelMappings) -> Result<EvalSettings> {
        let label_set = mappings.eval_label_set();
        let num_classes = cfg_usize(cfg, "output_classes")?.unwrap_or(label_set.len() + 1);
        let (output_dir, output_postfix, output_dtype) = cfg.output_settings()?;
        Ok(EvalSettings {
            preprocess: training_preprocess_config(cfg)?,
            window: cfg.window_settings()?,
            label_set,
            num_classes,
            output_dir,
            output_postfix,
            output_dtype,
        })
    }
}

/// Automatic segmentation of one image with class prompts `label_set`, on the original grid (255 = not computed).
pub fn segment_for_eval(
    net: &Vista3d,
    device: Device,
    image: &Volume,
    settings: &EvalSettings,
) -> Result<Array3<f32>> {
    let t = std::time::Instant::now();
    let (processed, trace) = preprocess_train_order(image, &settings.preprocess)?;
    log::debug!(
        "preprocessed to {:?} in {:.2} s",
        processed.dims(),
        t.elapsed().as_secs_f64()
    );
    let ids = Tensor::from_slice(&settings.label_set).view([-1, 1]);
    // Vista3dEvaluator without user prompts: class_vector = prompt_class = label_set (no zero-shot switch).
    let prompts = NetworkPrompts {
        class_vector: Some(ids.shallow_clone()),
        prompt_class: Some(ids),
        point_coords: None,
        point_labels: None,
        label_prompt: Some(settings.label_set.clone()),
        points: Vec::new(),
    };
    let input = volume_to_tensor(&processed)?.to_device(device);
    let t = std::time::Instant::now();
    let labels = infer_labels(net, &input, &prompts, &settings.window)?;
    log::debug!("inference in {:.2} s", t.elapsed().as_secs_f64());
    let t = std::time::Instant::now();
    let labels = tensor_to_array(&labels)?;
    let mut original = invert_train_order(&labels, &trace)?;
    log::debug!("inverted in {:.2} s", t.elapsed().as_secs_f64());
    original.mapv_inplace(|v| if v.is_nan() { 255.0 } else { v });
    Ok(original)
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

/// Evaluates one item with a loaded network: writes its prediction and computes its Dice (when it has a label).
/// `seq` is the sequential evaluation map of [`EvalSettings::label_set`] (`LabelMap::sequential(label_set, 1)`).
pub fn evaluate_item(
    net: &Vista3d,
    device: Device,
    item: &DataItem,
    mappings: &LabelMappings,
    settings: &EvalSettings,
    seq: &LabelMap,
) -> Result<EvalItem> {
    let input = read_nifti(&item.image)?;
    let (header, image) = (input.header, input.volume);
    let label = load_label_for(item, &image)?;
    let pred = segment_for_eval(net, device, &image, settings)
        .with_context(|| format!("segmenting {}", item.image.display()))?;
    let out = output_path(&settings.output_dir, &item.image, &settings.output_postfix);
    write_nifti(&out, &pred, &header, settings.output_dtype)?;
    let dice = match &label {
        None => None,
        Some(l) => {
            let gt = prepare_ground_truth(l, item, mappings, seq)
                .with_context(|| format!("label of {}", item.image.display()))?;
            let mut p = label_to_u8(&pred, "prediction")?;
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

/// Evaluates `items` with a loaded network: writes one prediction per image and the MONAI metric reports.
pub fn evaluate_items(
    net: &Vista3d,
    device: Device,
    items: &[DataItem],
    mappings: &LabelMappings,
    settings: &EvalSettings,
) -> Result<EvalReport> {
    ensure!(!items.is_empty(), "nothing to evaluate: the split is empty");
    let seq = LabelMap::sequential(&settings.label_set, 1)?;
    let mut out_items = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let t = std::time::Instant::now();
        let done = evaluate_item(net, device, item, mappings, settings, &seq)?;
        log::info!(
            "[{}/{}] {}: dice {:?} ({:.1} s) -> {}",
            i + 1,
            items.len(),
            item.name(),
            done.dice,
            t.elapsed().as_secs_f64(),
            done.prediction.display()
        );
        out_items.push(done);
    }
    let report = build_report(out_items)?;
    write_metrics_reports(&settings.output_dir, &report.details)?;
    Ok(report)
}

/// `vista3d evaluate`: loads the datalist and the checkpoint (`checkpoint`, else `ckpt_path`), evaluates the
/// validation split of `fold` (or `testing`), and writes predictions and reports to `output_dir`.
pub fn run_evaluate(cfg: &Config, checkpoint: Option<&Path>, testing: bool) -> Result<EvalReport> {
    let mappings = LabelMappings::from_config(cfg)?;
    let settings = EvalSettings::from_config(cfg, &mappings)?;
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
    let device =
        crate::runtime::parse_device(&cfg.string("device")?.unwrap_or_else(|| "auto".into()))?;
    // Under torchrun / srun (mgpu_evaluate.json): each rank evaluates its share, rank 0 writes the reports.
    let (group, device) = match crate::distributed::ProcessGroup::from_env(cfg, device)? {
        Some((g, d)) => (Some(g), d),
        None => (None, device),
    };
    crate::distributed::run_in_group(group, |group| {
        let model = crate::load_model(&ckpt, device, true)?;
        log::info!(
            "evaluating {} item(s) with {} (label set {:?}, {} Dice classes) on {device:?}",
            items.len(),
            ckpt.display(),
            settings.label_set,
            crate::training::metrics::evaluated_classes(settings.num_classes).len()
        );
        match group {
            None => evaluate_items(&model.net, device, &items, &mappings, &settings),
            Some(g) => crate::distributed::evaluate::evaluate_items(
                g, cfg, &model.net, device, &items, &mappings, &settings,
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
    testing: bool,
) -> Result<()> {
    let mut cfg = Config::load(configs, sets)?;
    if let Some(d) = output_dir {
        cfg.value["output_dir"] = serde_json::Value::String(d.display().to_string());
    }
    if let Some(d) = device {
        cfg.value["device"] = serde_json::Value::String(d.to_string());
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::IDENTITY;

    #[test]
    fn train_order_round_trip() {
        let mut a = IDENTITY;
        a[0][0] = -3.0;
        a[1][1] = 3.0;
        a[2][2] = 2.0;
        let data = Array3::from_shape_fn((20, 16, 12), |(i, j, k)| {
            if (4..15).contains(&i) && (3..12).contains(&j) && (2..10).contains(&k) {
                100.0
            } else {
                -1000.0
            }
        });
        let vol = Volume { data, affine: a };
        let pre = PreprocessConfig {
            crop_margin: 1,
            ..PreprocessConfig::default()
        };
        let (out, trace) = preprocess_train_order(&vol, &pre).unwrap();
        assert_eq!(trace.crop.start, [3, 2, 1]);
        assert_eq!(out.dims(), trace.spacing.out_dims);
        // A constant prediction maps back to the crop box and zero outside it.
        let ones = Array3::from_elem(out.data.raw_dim(), 7.0f32);
        let back = invert_train_order(&ones, &trace).unwrap();
        assert_eq!(back.shape(), &[20, 16, 12]);
        for ((i, j, k), &v) in back.indexed_iter() {
            let inside = (3..16).contains(&i) && (2..13).contains(&j) && (1..11).contains(&k);
            assert_eq!(v, if inside { 7.0 } else { 0.0 }, "at {:?}", (i, j, k));
        }
        assert!(invert_train_order(&Array3::zeros((1, 1, 1)), &trace).is_err());
    }
}
