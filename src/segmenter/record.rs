//! The JSON record written beside every label map, and the atomic save of both.
//!
//! The record says what was asked (the request's identity: input, prompts, weights, method and every setting that
//! shapes the label map), what ran (methods, fallbacks, device) and how long each stage took. It is written after
//! the label map, atomically, so it is the "done" marker of batch jobs: an output without its record is not done.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use super::{device_name, Segmentation, Segmenter};
use crate::config::InferenceConfig;
use crate::io::{write_nifti, NiftiHeader, OutputDtype};
use crate::prompts::RequestPrompts;

/// Record format version (bumped when a field changes meaning).
pub const RECORD_VERSION: u32 = 2;

/// The identity of an input file: path, size and modification time (cheap; a changed file gets a new identity).
pub fn file_identity(path: &Path) -> Value {
    let meta = std::fs::metadata(path).ok();
    let mtime_ns = meta
        .as_ref()
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    json!({
        "path": path.display().to_string(),
        "size": meta.map_or(0, |m| m.len()),
        "mtime_ns": mtime_ns.to_string(),
    })
}

/// What records say about the resident model: the weights' description and checksum and the device. Cheap to
/// clone, so request threads that do not own the [`Segmenter`] (the server's) can write records too.
#[derive(Debug, Clone)]
pub struct ModelFacts {
    /// [`super::Model::describe`].
    pub weights: Value,
    /// SHA-256 of the checkpoint file (`None` for random weights).
    pub sha256: Option<String>,
    /// `cpu` or `cuda:N`.
    pub device: String,
}

impl ModelFacts {
    /// The facts of `segmenter`'s model.
    pub fn of(segmenter: &Segmenter) -> Self {
        let model = segmenter.model();
        Self {
            weights: model.describe(),
            sha256: model.identity().map(|id| id.sha256.clone()),
            device: device_name(model.device),
        }
    }
}

/// What a request is, for deciding whether an existing output answers it: input identity, prompts as given,
/// weights, requested method and every setting that changes the label map.
pub fn request_identity(
    segmenter: &Segmenter,
    input: Value,
    prompts: &RequestPrompts,
    method: crate::engines::Method,
    output_dtype: OutputDtype,
) -> Value {
    request_identity_for(
        segmenter.config(),
        &ModelFacts::of(segmenter),
        input,
        prompts,
        method,
        output_dtype,
    )
}

/// [`request_identity`] from the settings and the model's facts.
pub fn request_identity_for(
    c: &InferenceConfig,
    model: &ModelFacts,
    input: Value,
    prompts: &RequestPrompts,
    method: crate::engines::Method,
    output_dtype: OutputDtype,
) -> Value {
    let w = c.window();
    let weights = match &model.sha256 {
        Some(sha256) => json!({"sha256": sha256}),
        None => model.weights.clone(),
    };
    let mut identity = json!({
        "input": input,
        "prompts": {
            "label_prompt": prompts.label_prompt,
            "points": prompts.points,
            "point_labels": prompts.point_labels,
        },
        "weights": weights,
        "precision": method,
        "settings": {
            "resample_spacing": c.resample_spacing,
            "patch_size": w.patch_size,
            "overlap": w.overlap,
            "mode": w.mode,
            "sw_batch_size": w.sw_batch_size,
            "use_point_window": w.use_point_window,
            "everything_labels": c.everything_labels,
            "subclass": c.subclass,
            "output_dtype": output_dtype.name(),
        },
    });
    // Window workers compute each window on a share of the threads, which rounds differently (recorded only
    // when set, so that earlier records keep their identity).
    if w.window_workers > 1 {
        identity["settings"]["window_workers"] = json!(w.window_workers);
    }
    // What `auto` runs on a CPU is a setting too (an explicit method ignores it).
    if method == crate::engines::Method::Auto {
        identity["settings"]["auto_cpu"] = json!(c.auto_cpu);
        // Winograd's convolutions round differently from libtorch's: recorded where `auto` takes them.
        let cpu = crate::runtime::parse_device(&c.device).is_ok_and(|d| d == tch::Device::Cpu);
        if cpu && c.auto_cpu.winograd(crate::runtime::cpu_has_avx512()) {
            identity["settings"]["convolutions"] = json!("winograd");
        }
    }
    identity
}

/// The record of one segmentation written to `output`.
pub fn build_record(
    segmenter: &Segmenter,
    seg: &Segmentation,
    image: &crate::volume::Volume,
    identity: Value,
    output: &Path,
    seconds: &[(&str, f64)],
) -> Value {
    build_record_for(
        segmenter.config(),
        &ModelFacts::of(segmenter),
        seg,
        image.geometry(),
        identity,
        output,
        seconds,
    )
}

/// [`build_record`] from the settings and the model's facts.
pub fn build_record_for(
    config: &InferenceConfig,
    model: &ModelFacts,
    seg: &Segmentation,
    input: crate::volume::InputGeometry,
    identity: Value,
    output: &Path,
    seconds: &[(&str, f64)],
) -> Value {
    let w = config.window();
    let mut timings = Map::new();
    for (k, v) in seconds {
        timings.insert((*k).to_string(), json!(v));
    }
    json!({
        "record_version": RECORD_VERSION,
        "tool": format!("vista3d {}", env!("CARGO_PKG_VERSION")),
        "created": humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        "image": identity["input"]["path"],
        "output": output.display().to_string(),
        "request": identity,
        "input_shape": input.shape,
        "input_spacing": input.spacing,
        "processed_shape": seg.processed_shape,
        "outputs": {"label_map": output.display().to_string()},
        "label_prompt": seg.prompts.label_prompt,
        "points": seg.prompts.points,
        "point_labels": seg.prompts.point_labels,
        "weights": model.weights,
        "device": model.device,
        "precision": seg.method,
        "patch_size": w.patch_size,
        "overlap": w.overlap,
        "use_point_window": w.use_point_window,
        "seconds": timings,
    })
}

/// Writes the label map (with the input's header: its geometry is kept) and then its JSON record beside it
/// (`<output without .nii.gz>.json`), both atomically. Returns the record's path.
pub fn save(
    output: &Path,
    labels: &ndarray::Array3<f32>,
    header: &NiftiHeader,
    dtype: OutputDtype,
    record: &Value,
) -> anyhow::Result<std::path::PathBuf> {
    write_nifti(output, labels, header, dtype)?;
    save_record(output, record)
}

/// Writes the JSON record of the label map `output` atomically (last: it marks the output as done).
pub fn save_record(output: &Path, record: &Value) -> anyhow::Result<std::path::PathBuf> {
    let json_path = record_path(output);
    crate::fsutil::write_atomic(&json_path, serde_json::to_string_pretty(record)?.as_bytes())?;
    Ok(json_path)
}

/// The record beside a label map: `x_trans.nii.gz` -> `x_trans.json`.
pub fn record_path(output: &Path) -> std::path::PathBuf {
    output.with_extension("").with_extension("json")
}

/// The record beside `output`, if it exists and parses.
pub fn read_record(output: &Path) -> Option<Value> {
    let text = std::fs::read_to_string(record_path(output)).ok()?;
    serde_json::from_str(&text).ok()
}

/// The DICOM SEG beside a label map: `x_trans.nii.gz` -> `x_trans.dcm`.
pub fn seg_path(label_map: &Path) -> std::path::PathBuf {
    label_map.with_extension("").with_extension("dcm")
}

/// Writes the DICOM SEG of `labels` (on the grid of `series`) beside the label map `out` ([`seg_path`]) and notes
/// it in the record (`outputs.dicom_seg`). A label map without any class is noted as skipped
/// (`outputs.dicom_seg_skipped`: a SEG needs at least one segment) and gives `Ok(None)`.
pub fn write_seg_beside(
    out: &Path,
    labels: &ndarray::Array3<f32>,
    series: &crate::io::dicom::SeriesInfo,
    classes: &crate::prompts::LabelTable,
    rec: &mut Value,
) -> anyhow::Result<Option<std::path::PathBuf>> {
    if !labels.iter().any(|&v| v > 0.0 && v != 255.0) {
        log::warn!("{}: nothing found, no DICOM SEG written", out.display());
        rec["outputs"]["dicom_seg_skipped"] =
            json!("no class found: a SEG needs at least one segment");
        return Ok(None);
    }
    let path = seg_path(out);
    crate::io::dicom::write_seg(
        &path,
        labels,
        series,
        classes,
        &crate::io::dicom::SegOptions::default(),
    )?;
    rec["outputs"]["dicom_seg"] = json!(path.display().to_string());
    Ok(Some(path))
}

/// The QC preview beside a label map: `x_trans.nii.gz` -> `x_trans.png`.
pub fn preview_path(output: &Path) -> PathBuf {
    output.with_extension("").with_extension("png")
}

/// Writes the QC preview of `labels` over `ct` beside the label map `out` ([`preview_path`]; point prompts as
/// markers) and notes it in the record (`outputs.preview`). A preview that cannot be made does not fail the
/// segmentation: the reason is logged and recorded (`outputs.preview_error`).
pub fn write_preview_beside(
    out: &Path,
    ct: &crate::volume::Volume,
    labels: &ndarray::Array3<f32>,
    prompts: &crate::prompts::RequestPrompts,
    table: &crate::prompts::LabelTable,
    rec: &mut Value,
) -> Option<PathBuf> {
    let path = preview_path(out);
    let opts = crate::preview::PreviewOptions {
        title: out
            .file_name()
            .map(|n| n.to_string_lossy().trim_end_matches(".nii.gz").to_string()),
        point_labels: prompts.point_labels.clone().unwrap_or_default(),
        ..Default::default()
    };
    let points = prompts.points.clone().unwrap_or_default();
    match crate::preview::write_png(&path, ct, labels, &points, table, &opts) {
        Ok(_) => {
            rec["outputs"]["preview"] = json!(path.display().to_string());
            Some(path)
        }
        Err(e) => {
            log::warn!("{}: no preview: {e}", out.display());
            rec["outputs"]["preview_error"] = json!(e.to_string());
            None
        }
    }
}
