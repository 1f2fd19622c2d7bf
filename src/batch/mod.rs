//! `vista3d batch`: many images through one resident [`Segmenter`].
//!
//! - Items come from a folder (`--input-dir`, optionally recursive, suffix matched optionally ignoring case; with
//!   `--dicom`, every DICOM series of the folder tree), or a list (`--input-list`: one path per line, or a JSON
//!   list of paths and objects with their own prompts and method; unknown keys in an object are errors). A path
//!   may name a NIfTI file or a DICOM series (a folder or a `.zip`).
//! - An item's output mirrors its input's path relative to the input root (the folder, or the common folder of a
//!   list's images): `<output_dir>/<relative folder>/<stem>/<stem>_<postfix>.nii.gz`, so two patients' `ct.nii.gz`
//!   never collide; a DICOM series is named by its folder and its SeriesInstanceUID
//!   (`<output_dir>/<relative folder>/<uid>/<uid>_trans.nii.gz`). Two items that would still write the same output
//!   are refused before any work starts.
//! - The JSON record beside an output is the only "done" marker: it holds the request's identity (input size and
//!   mtime, prompts, weights, method, every setting that shapes the label map). An item whose record has the same
//!   identity is skipped; a different request recomputes and replaces the output (the new record names what it
//!   replaced); `--overwrite` recomputes everything. Extras asked for later (a DICOM SEG) are made from the current
//!   label map without running the network again.
//! - One failing item (unreadable file, bad prompts, a panic inside libtorch) is reported and the others go on;
//!   the run exits non-zero at the end. Each process appends one JSON line per item to its own log in
//!   `<output_dir>/.vista3d/` ([`report`] merges them: `vista3d batch-report`).
//! - Several processes (or machines) may run on one output folder: an item is claimed before it runs
//!   ([`claims`]: O_EXCL file beside the output with a heartbeat; stale claims of killed workers are taken over),
//!   and a process leaves only when every item of its shard is finished by someone. Static shards ([`shards`])
//!   split the items by a stable hash of their relative path.

pub mod claims;
pub mod report;
pub mod shards;
mod worker;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

use crate::config::{InferenceConfig, ListItem, Origin, OutputFormat};
use crate::engines::Method;
use crate::io::dicom::{self, DicomOptions};
use crate::io::{read_image, read_nifti, InputImage, OutputDtype};
use crate::prompts::{LabelTable, RequestPrompts};
pub use crate::segmenter::record::seg_path;
use crate::segmenter::record::{self, build_record_for, file_identity};
use crate::segmenter::record::{preview_path, write_preview_beside, ModelFacts};
use crate::segmenter::{Inferred, Prepared, Request, RequestPath, SegmentError, Segmenter};
use crate::volume::InputGeometry;
use claims::Claimer;
pub use shards::Shard;

/// One image to segment.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchItem {
    /// The input path.
    pub image: PathBuf,
    /// The input's path relative to the input root (what the output mirrors).
    pub relative: PathBuf,
    /// Prompts of this item.
    pub prompts: RequestPrompts,
    /// Method of this item (`None`: the configuration's).
    pub precision: Option<Method>,
    /// For a DICOM series item: its SeriesInstanceUID (`image` is the folder holding it).
    pub series_uid: Option<String>,
}

impl BatchItem {
    /// An item for one image path with the given prompts; the output mirrors `relative`.
    pub fn new(image: PathBuf, relative: PathBuf, prompts: RequestPrompts) -> Self {
        Self {
            image,
            relative,
            prompts,
            precision: None,
            series_uid: None,
        }
    }
}

/// Where the items come from.
#[derive(Debug, Clone)]
pub enum BatchInput {
    /// Every file of `dir` whose name ends with `suffix`.
    Dir {
        dir: PathBuf,
        suffix: String,
        recursive: bool,
        ignore_case: bool,
    },
    /// Every DICOM series of a folder tree, one item each.
    DicomTree(PathBuf),
    /// A list file.
    List(PathBuf),
}

/// Finds the items; `prompts` are the prompts of items that do not give their own.
pub fn discover(input: &BatchInput, prompts: &RequestPrompts) -> Result<Vec<BatchItem>> {
    let items = match input {
        BatchInput::Dir {
            dir,
            suffix,
            recursive,
            ignore_case,
        } => {
            ensure!(
                dir.is_dir(),
                "--input-dir {} is not a folder",
                dir.display()
            );
            let mut files = Vec::new();
            list_files(dir, *recursive, &mut files)?;
            let matches = |p: &Path| {
                let name = p
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                if *ignore_case {
                    name.to_lowercase().ends_with(&suffix.to_lowercase())
                } else {
                    name.ends_with(suffix.as_str())
                }
            };
            let mut images: Vec<PathBuf> = files.into_iter().filter(|p| matches(p)).collect();
            images.sort();
            ensure!(
                !images.is_empty(),
                "no '*{suffix}' images in {}{}",
                dir.display(),
                if *recursive {
                    " or its subfolders"
                } else {
                    " (use --recursive to search subfolders)"
                }
            );
            images
                .into_iter()
                .map(|image| {
                    let relative = image.strip_prefix(dir).unwrap_or(&image).to_path_buf();
                    BatchItem::new(image, relative, prompts.clone())
                })
                .collect()
        }
        BatchInput::DicomTree(dir) => dicom_items(dir, prompts)?,
        BatchInput::List(list) => read_list(list, prompts)?,
    };
    Ok(items)
}

/// One item per DICOM series under `dir`: each top-most folder holding files is scanned (with its subfolders), and
/// an item is read from that folder and named by it (relative to `dir`) and its SeriesInstanceUID.
fn dicom_items(dir: &Path, prompts: &RequestPrompts) -> Result<Vec<BatchItem>> {
    ensure!(
        dir.is_dir(),
        "--input-dir {} is not a folder",
        dir.display()
    );
    // Each top-most folder that holds files is scanned on its own, so copies of one series in two folders (or
    // anonymised series without a SeriesInstanceUID) stay two items.
    let mut folders = Vec::new();
    folders_with_files(dir, &mut folders)?;
    let mut items = Vec::new();
    for folder in folders {
        let relative_folder = folder
            .strip_prefix(dir)
            .unwrap_or(Path::new(""))
            .to_path_buf();
        let series = match dicom::scan_series(&folder) {
            Ok(s) => s,
            Err(e) => {
                // An item of its own, so that the run reports it as failed (with the reader's message).
                log::warn!("{}: {e}", folder.display());
                items.push(BatchItem::new(
                    folder.clone(),
                    relative_folder,
                    prompts.clone(),
                ));
                continue;
            }
        };
        for s in series {
            let relative = relative_folder.join(&s.series_instance_uid);
            log::info!("DICOM series {s} in {}", folder.display());
            items.push(BatchItem {
                series_uid: Some(s.series_instance_uid),
                ..BatchItem::new(folder.clone(), relative, prompts.clone())
            });
        }
    }
    ensure!(
        !items.is_empty(),
        "no DICOM series in {} or its subfolders",
        dir.display()
    );
    Ok(items)
}

/// The top-most folders under `dir` (itself included) that directly hold a file (hidden entries ignored), in
/// name order; a folder's subfolders belong to its scan.
fn folders_with_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.path())
        .collect();
    entries.sort();
    if entries.iter().any(|p| p.is_file()) {
        out.push(dir.to_path_buf());
        return Ok(());
    }
    for p in entries.iter().filter(|p| p.is_dir()) {
        folders_with_files(p, out)?;
    }
    Ok(())
}

fn list_files(dir: &Path, recursive: bool, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    for e in entries {
        let e = e.with_context(|| format!("cannot list {}", dir.display()))?;
        let p = e.path();
        let name = e.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        if p.is_dir() {
            if recursive {
                list_files(&p, true, out)?;
            }
        } else if p.is_file() {
            out.push(p);
        }
    }
    Ok(())
}

/// Reads a list file: a JSON list of paths or objects, else one path per line (`#` comments).
fn read_list(list: &Path, prompts: &RequestPrompts) -> Result<Vec<BatchItem>> {
    let text = std::fs::read_to_string(list)
        .with_context(|| format!("cannot read --input-list {}", list.display()))?;
    let base = list.parent().unwrap_or(Path::new("."));
    let resolve = |p: &str| {
        let p = PathBuf::from(p);
        if p.is_absolute() {
            p
        } else {
            base.join(p)
        }
    };
    let trimmed = text.trim_start();
    let mut items: Vec<(PathBuf, RequestPrompts, Option<Method>)> = Vec::new();
    if trimmed.starts_with('[') {
        let values: Vec<Value> = serde_json::from_str(&text)
            .with_context(|| format!("--input-list {} is not a valid JSON list", list.display()))?;
        for (index, v) in values.iter().enumerate() {
            match v {
                Value::String(s) => items.push((resolve(s), prompts.clone(), None)),
                Value::Object(_) => {
                    let item = ListItem::parse(
                        v,
                        Origin::ListItem {
                            list: list.to_path_buf(),
                            index,
                        },
                    )?;
                    let own = item.prompts();
                    let p = if own.label_prompt.is_none() && own.points.is_none() {
                        RequestPrompts {
                            point_labels: own.point_labels.or(prompts.point_labels.clone()),
                            ..prompts.clone()
                        }
                    } else {
                        own
                    };
                    items.push((resolve(&item.image), p, item.precision));
                }
                other => bail!(
                    "item {index} of {} must be a path or an object with \"image\", got {other}",
                    list.display()
                ),
            }
        }
    } else {
        for line in text.lines().map(str::trim) {
            if !line.is_empty() && !line.starts_with('#') {
                items.push((resolve(line), prompts.clone(), None));
            }
        }
    }
    ensure!(
        !items.is_empty(),
        "--input-list {} holds no image",
        list.display()
    );
    let root = common_folder(items.iter().map(|(p, _, _)| p.as_path()));
    Ok(items
        .into_iter()
        .map(|(image, prompts, precision)| {
            let relative = root
                .as_ref()
                .and_then(|r| image.strip_prefix(r).ok())
                .map(Path::to_path_buf)
                .unwrap_or_else(|| strip_root(&image));
            BatchItem {
                precision,
                ..BatchItem::new(image, relative, prompts)
            }
        })
        .collect())
}

/// The deepest folder that holds every path (`None` when they share nothing, e.g. relative and absolute).
fn common_folder<'a>(paths: impl Iterator<Item = &'a Path>) -> Option<PathBuf> {
    let mut common: Option<Vec<Component<'a>>> = None;
    for p in paths {
        let parent: Vec<Component<'a>> = p.parent()?.components().collect();
        common = Some(match common {
            None => parent,
            Some(c) => c
                .iter()
                .zip(parent.iter())
                .take_while(|(a, b)| a == b)
                .map(|(a, _)| *a)
                .collect(),
        });
    }
    let c = common?;
    (!c.is_empty()).then(|| c.iter().collect())
}

/// A path without its root or `..` parts, so that it can be placed under the output folder.
fn strip_root(p: &Path) -> PathBuf {
    p.components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect()
}

/// The file stem of an image path without `.nii.gz` / `.nii` / `.zip` (any case).
pub fn image_stem(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let lower = name.to_lowercase();
    for ext in [".nii.gz", ".nii", ".zip"] {
        if lower.ends_with(ext) {
            return name[..name.len() - ext.len()].to_string();
        }
    }
    name
}

/// `<output_dir>/<relative folder>/<stem>/<stem>_<postfix>.nii.gz`.
pub fn output_path(output_dir: &Path, relative: &Path, postfix: &str) -> PathBuf {
    let stem = image_stem(relative);
    let folder = relative.parent().unwrap_or(Path::new(""));
    output_dir
        .join(folder)
        .join(&stem)
        .join(format!("{stem}_{postfix}.nii.gz"))
}

/// Refuses a batch where two items would write the same output (checked before any work).
pub fn check_collisions(items: &[BatchItem], output_dir: &Path, postfix: &str) -> Result<()> {
    let mut seen: HashMap<PathBuf, &BatchItem> = HashMap::new();
    for item in items {
        let out = output_path(output_dir, &item.relative, postfix);
        if let Some(first) = seen.insert(out.clone(), item) {
            bail!(
                "{} and {} would both be written to {}: rename one, or split the batch",
                first.image.display(),
                item.image.display(),
                out.display()
            );
        }
    }
    Ok(())
}

/// Checks that `dir` can be created and written (before any inference).
pub fn check_writable(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the output folder {}", dir.display()))?;
    let probe = dir.join(format!(".vista3d-write-test-{}", std::process::id()));
    std::fs::write(&probe, b"")
        .with_context(|| format!("the output folder {} is not writable", dir.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// How a batch writes its outputs.
#[derive(Debug, Clone)]
pub struct OutputSpec {
    pub dir: PathBuf,
    pub postfix: String,
    pub dtype: OutputDtype,
    /// Extras beside the NIfTI label map (a DICOM SEG).
    pub format: OutputFormat,
    /// Write a QC preview PNG beside the label map (`--preview`).
    pub preview: bool,
}

/// The extras `spec` asks for that are missing beside `out`.
fn missing_extras(out: &Path, spec: &OutputSpec, record: &Value) -> bool {
    missing_seg(out, spec, record) || missing_preview(out, spec, record)
}

fn missing_seg(out: &Path, spec: &OutputSpec, record: &Value) -> bool {
    spec.format.wants_seg()
        && !seg_path(out).is_file()
        && record["outputs"]["dicom_seg_skipped"].is_null()
}

fn missing_preview(out: &Path, spec: &OutputSpec, record: &Value) -> bool {
    spec.preview && !preview_path(out).is_file() && record["outputs"]["preview_error"].is_null()
}

/// What happened to one item.
#[derive(Debug, Clone, PartialEq)]
pub enum ItemStatus {
    /// Segmented and written.
    Done(ItemRun),
    /// An up-to-date output answers the same request.
    Skipped,
    /// An up-to-date output got the extras it lacked (no network run).
    Completed,
    /// Failed with this error.
    Failed(String),
}

/// What running one item did: seconds per stage, the methods that ran, the device.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemRun {
    /// Fallbacks of its method (0: the requested method ran throughout).
    pub fallbacks: usize,
    /// Seconds from reading the input to the record written.
    pub seconds: f64,
    /// Seconds per stage (`read`, `preprocess`, `inference`, `postprocess`, `write`).
    pub stages: Vec<(String, f64)>,
    /// The method report (`requested`, `used`, `fallbacks`) as recorded.
    pub method: Value,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// Seconds the worker's device waited between its previous item's windows and this item's (reading,
    /// preprocessing and writing that did not overlap with computing); `None` outside a batch worker.
    pub device_idle: Option<f64>,
}

/// An item's input as read, with what writing its outputs needs to know about the read.
pub struct ReadInput {
    /// The image (its header and DICOM series are needed to write the outputs). Its voxels are released after
    /// preprocessing unless a preview draws them (`geometry` keeps what the record needs).
    pub image: InputImage,
    /// The image's shape and spacing as read.
    pub geometry: InputGeometry,
    /// Seconds spent reading it.
    pub seconds: f64,
    /// When reading started (the item's clock).
    pub started: Instant,
}

/// Reads `item` and prepares its request (prompts, checks, preprocessing) with `path`: the CPU part that a
/// worker runs for the next item while its device computes the current one.
pub fn load_item(
    path: &RequestPath,
    item: &BatchItem,
    spec: &OutputSpec,
) -> Result<(ReadInput, Prepared), SegmentError> {
    let started = Instant::now();
    let name = item.image.display().to_string();
    let image = read_image(&item.image, &dicom_options(path.config(), item))
        .map_err(|e| SegmentError::InvalidRequest(format!("{e:#}")))?;
    if spec.format.wants_seg() && image.dicom.is_none() {
        return Err(SegmentError::InvalidRequest(format!(
            "output_format {:?} writes a DICOM SEG, which needs a DICOM input; {name} is not a DICOM series",
            spec.format
        )));
    }
    let seconds = started.elapsed().as_secs_f64();
    let prepared = path.prepare(&Request {
        name: &name,
        image: &image.volume,
        prompts: item.prompts.clone(),
        precision: item.precision,
        image_kept: spec.preview,
    })?;
    let geometry = image.volume.geometry();
    let mut image = image;
    if !spec.preview {
        // The network's input is made: the voxels as read (float32, as large as the CT) are not needed again.
        image.volume.data = ndarray::Array3::zeros((0, 0, 0));
    }
    Ok((
        ReadInput {
            image,
            geometry,
            seconds,
            started,
        },
        prepared,
    ))
}

/// Inverts the windows' labels of a loaded item to its grid and writes its label map, its extras (a DICOM SEG,
/// a preview when asked) and its record. `replaced` is the identity of the record it replaces, if any.
#[allow(clippy::too_many_arguments)]
pub fn write_item(
    path: &RequestPath,
    model: &ModelFacts,
    item: &BatchItem,
    read: &ReadInput,
    inferred: Inferred,
    out: &Path,
    spec: &OutputSpec,
    identity: Value,
    replaced: Option<Value>,
) -> Result<ItemRun, SegmentError> {
    let (input, started) = (&read.image, read.started);
    let seg = path.finish(inferred)?;
    let mut seconds: Vec<(&str, f64)> = vec![("read", read.seconds)];
    seconds.extend(seg.timings.iter().map(|(k, v)| (*k, *v)));
    let mut rec = build_record_for(
        path.config(),
        model,
        &seg,
        read.geometry,
        identity,
        out,
        &seconds,
    );
    if let Some(old) = replaced {
        rec["replaced"] = old;
    }
    let t_write = Instant::now();
    rec["seconds"]["total_before_write"] = json!(started.elapsed().as_secs_f64());
    crate::io::write_nifti(out, &seg.labels, &input.header, spec.dtype)
        .map_err(SegmentError::Failed)?;
    if let (true, Some(series)) = (spec.format.wants_seg(), &input.dicom) {
        write_extra_seg(path.label_table(), out, &seg.labels, series, &mut rec)?;
    }
    if spec.preview {
        write_preview_beside(
            out,
            &input.volume,
            &seg.labels,
            &item.prompts,
            path.label_table(),
            &mut rec,
        );
    }
    record::save_record(out, &rec).map_err(SegmentError::Failed)?;
    let mut stages: Vec<(String, f64)> = seconds.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    stages.push(("write".into(), t_write.elapsed().as_secs_f64()));
    Ok(ItemRun {
        fallbacks: seg.method.fallbacks.len(),
        seconds: started.elapsed().as_secs_f64(),
        stages,
        method: rec["precision"].clone(),
        device: rec["device"].as_str().unwrap_or_default().to_string(),
        device_idle: None,
    })
}

/// Segments one item and writes its outputs and record, all on this thread (`vista3d infer`, and a batch worker
/// without prefetch). `replaced` is the identity of the record it replaces, if any.
pub fn run_item(
    segmenter: &Segmenter,
    item: &BatchItem,
    out: &Path,
    spec: &OutputSpec,
    identity: Value,
    replaced: Option<Value>,
) -> Result<ItemRun, SegmentError> {
    let path = segmenter.request_path();
    let (read, prepared) = load_item(path, item, spec)?;
    let inferred = segmenter.infer(prepared)?;
    write_item(
        path,
        &ModelFacts::of(segmenter),
        item,
        &read,
        inferred,
        out,
        spec,
        identity,
        replaced,
    )
}

/// How the DICOM series of `item` is read.
fn dicom_options(config: &InferenceConfig, item: &BatchItem) -> DicomOptions {
    let mut o = config.dicom_options();
    if item.series_uid.is_some() {
        o.series_uid = item.series_uid.clone();
    }
    o
}

/// Writes the DICOM SEG of `labels` beside `out` and notes it in the record (see [`record::write_seg_beside`]).
fn write_extra_seg(
    table: &LabelTable,
    out: &Path,
    labels: &ndarray::Array3<f32>,
    series: &dicom::SeriesInfo,
    rec: &mut Value,
) -> Result<(), SegmentError> {
    record::write_seg_beside(out, labels, series, table, rec)
        .map(|_| ())
        .map_err(SegmentError::Failed)
}

/// Makes the extras an up-to-date output lacks from its label map, without the network (e.g. a DICOM SEG asked for
/// after a NIfTI-only run).
fn complete_extras(
    path: &RequestPath,
    item: &BatchItem,
    out: &Path,
    spec: &OutputSpec,
    mut rec: Value,
) -> Result<(), SegmentError> {
    let input = read_image(&item.image, &dicom_options(path.config(), item))
        .map_err(|e| SegmentError::InvalidRequest(format!("{e:#}")))?;
    let labels = read_nifti(out).map_err(SegmentError::Failed)?.volume.data;
    if missing_seg(out, spec, &rec) {
        let Some(series) = &input.dicom else {
            return Err(SegmentError::InvalidRequest(format!(
                "output_format {:?} writes a DICOM SEG, which needs a DICOM input; {} is not a DICOM series",
                spec.format,
                item.image.display()
            )));
        };
        write_extra_seg(path.label_table(), out, &labels, series, &mut rec)?;
    }
    if missing_preview(out, spec, &rec) {
        write_preview_beside(
            out,
            &input.volume,
            &labels,
            &item.prompts,
            path.label_table(),
            &mut rec,
        );
    }
    record::save_record(out, &rec).map_err(SegmentError::Failed)?;
    Ok(())
}

/// Counts of a finished batch.
#[derive(Debug, Clone, Default)]
pub struct BatchSummary {
    /// Items of this process's shard.
    pub total: usize,
    /// Items left to other shards.
    pub other_shards: usize,
    pub done: usize,
    pub skipped: usize,
    /// Items that ran but needed a fallback of their method.
    pub fell_back: usize,
    /// Stale claims of other workers taken over.
    pub taken_over: usize,
    /// Failed items with their errors.
    pub failed: Vec<(PathBuf, String)>,
}

impl BatchSummary {
    /// One line for the terminal.
    pub fn line(&self) -> String {
        let mut line = format!(
            "{} segmented ({} with a fallback), {} skipped (up to date), {} failed, of {}",
            self.done,
            self.fell_back,
            self.skipped,
            self.failed.len(),
            self.total
        );
        if self.other_shards > 0 {
            line.push_str(&format!(" ({} in other shards)", self.other_shards));
        }
        if self.taken_over > 0 {
            line.push_str(&format!("; {} stale claims taken over", self.taken_over));
        }
        line
    }
}

/// The default `--claim-timeout`: a claim without a heartbeat for this long is taken over.
pub const DEFAULT_CLAIM_TIMEOUT: Duration = Duration::from_secs(120);

/// Options of a batch run.
#[derive(Debug, Clone)]
pub struct BatchOptions {
    pub output: OutputSpec,
    /// Recompute items whose output answers the same request (once per run: an output rewritten after this run
    /// started, by any process, counts as recomputed).
    pub overwrite: bool,
    /// Show a progress bar (on a terminal).
    pub progress: bool,
    /// Only the items of this static shard.
    pub shard: Option<Shard>,
    /// A claim without a heartbeat for this long belongs to a dead worker and is taken over.
    pub claim_timeout: Duration,
    /// Prepare the next item (read, preprocess) on another thread while the device runs the current one, and
    /// write results on a third (a pipeline per worker); off: each item's stages run one after another.
    pub prefetch: bool,
}

impl BatchOptions {
    /// Options with no shard, the default claim timeout and prefetch on.
    pub fn new(output: OutputSpec, overwrite: bool, progress: bool) -> Self {
        Self {
            output,
            overwrite,
            progress,
            shard: None,
            claim_timeout: DEFAULT_CLAIM_TIMEOUT,
            prefetch: true,
        }
    }
}

/// Runs every item (of the shard) on `workers`: one resident segmenter per device (or per group of CPU
/// threads), each on its own thread pulling from one queue ([`worker`]); one failure never stops the others.
/// Items claimed by other live workers are looked at again until they are finished (by them, or by this
/// process after their claim went stale).
pub fn run(
    workers: Vec<Segmenter>,
    items: &[BatchItem],
    opts: &BatchOptions,
) -> Result<BatchSummary> {
    ensure!(!workers.is_empty(), "a batch needs at least one worker");
    check_collisions(items, &opts.output.dir, &opts.output.postfix)?;
    check_writable(&opts.output.dir)?;
    let discovered = items.len();
    let items: Vec<&BatchItem> = items
        .iter()
        .filter(|i| opts.shard.is_none_or(|s| s.holds(&i.relative)))
        .collect();
    let log = ItemLog::open(&opts.output.dir)?;
    let total = items.len();
    let bar = opts.progress.then(|| {
        let bar = indicatif::ProgressBar::new(total as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} images, elapsed {elapsed}, ETA {eta} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let mut summary = BatchSummary {
        total,
        ..Default::default()
    };
    if let Some(s) = opts.shard {
        summary.other_shards = discovered - total;
        log::info!("shard {s}: {total} items");
    }
    if workers.len() > 1 {
        log::info!(
            "{} workers ({}), prefetch {}",
            workers.len(),
            workers
                .iter()
                .map(|w| ModelFacts::of(w).device)
                .collect::<Vec<_>>()
                .join(", "),
            if opts.prefetch { "on" } else { "off" }
        );
    }
    // Each worker's share of the threads was set by the caller (`--workers`); worker threads set it again for
    // themselves, as libtorch's count is per thread.
    let threads = tch::get_num_threads().max(1);
    let shared = worker::Shared::new(items, opts, log, summary, bar.clone());
    std::thread::scope(|scope| {
        for (index, segmenter) in workers.into_iter().enumerate() {
            let shared = &shared;
            scope.spawn(move || worker::run_worker(index, segmenter, threads, shared));
        }
    });
    if let Some(bar) = bar {
        bar.finish();
    }
    Ok(shared.into_summary())
}

/// The identity of an item's input: its file (size, mtime), or for a DICOM series its folder, UID and the sizes
/// and mtimes of the folder's files.
pub fn input_identity(item: &BatchItem) -> Value {
    if !item.image.is_dir() {
        return file_identity(&item.image);
    }
    let mut files = Vec::new();
    let _ = list_files(&item.image, true, &mut files);
    files.sort();
    let (mut size, mut newest) = (0u64, 0u128);
    for f in &files {
        if let Ok(m) = std::fs::metadata(f) {
            size += m.len();
            let t = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            newest = newest.max(t);
        }
    }
    json!({
        "path": item.image.display().to_string(),
        "series_uid": item.series_uid,
        "files": files.len(),
        "size": size,
        "mtime_ns": newest.to_string(),
    })
}

/// This process's JSONL log of items in `<output_dir>/.vista3d/` (one file per process: no shared writes). Each
/// line is one event of one item: `started` (claimed and running), then `done`, `failed`, `skipped` or
/// `completed`; see [`report`] for the fields.
struct ItemLog {
    file: Option<std::fs::File>,
    /// Stale claims taken over by this process.
    taken_over: usize,
}

/// Who wrote a log line: the worker's claim name and device.
struct LogSource<'a> {
    claimer: &'a Claimer,
    device: &'a str,
}

impl ItemLog {
    fn open(output_dir: &Path) -> Result<Self> {
        let dir = output_dir.join(report::LOG_DIR);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let host = hostname();
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let path = dir.join(format!("items-{host}-{}-{start}.jsonl", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot create the item log {}", path.display()))?;
        Ok(Self {
            file: Some(file),
            taken_over: 0,
        })
    }

    fn base(item: &BatchItem, out: &Path, src: &LogSource, status: &str) -> Value {
        json!({
            "time": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            "host": src.claimer.host,
            "pid": src.claimer.pid,
            "worker": format!("{}:{}:{}", src.claimer.host, src.claimer.pid, src.claimer.worker),
            "device": src.device,
            "input": item.image.display().to_string(),
            "relative": item.relative.display().to_string(),
            "output": out.display().to_string(),
            "status": status,
        })
    }

    fn started(&mut self, item: &BatchItem, out: &Path, src: &LogSource, took_over: Option<&str>) {
        let mut line = Self::base(item, out, src, "started");
        if let Some(old) = took_over {
            line["took_over"] = json!(old);
        }
        self.write(&line);
    }

    fn append(&mut self, item: &BatchItem, out: &Path, status: &ItemStatus, src: &LogSource) {
        let name = match status {
            ItemStatus::Done(_) => "done",
            ItemStatus::Skipped => "skipped",
            ItemStatus::Completed => "completed",
            ItemStatus::Failed(_) => "failed",
        };
        let mut line = Self::base(item, out, src, name);
        match status {
            ItemStatus::Done(run) => {
                line["seconds"] = json!(run.seconds);
                line["stages"] = Value::Object(
                    run.stages
                        .iter()
                        .map(|(k, v)| (k.clone(), json!(v)))
                        .collect(),
                );
                line["method"] = run.method.clone();
                line["fallbacks"] = json!(run.fallbacks);
                line["device"] = json!(run.device);
                if let Some(idle) = run.device_idle {
                    line["device_idle"] = json!(idle);
                }
            }
            ItemStatus::Failed(e) => line["error"] = json!(e),
            ItemStatus::Skipped | ItemStatus::Completed => {}
        }
        self.write(&line);
    }

    fn write(&mut self, line: &Value) {
        if let Some(f) = &mut self.file {
            if let Err(e) = writeln!(f, "{line}") {
                log::warn!("cannot append to the item log: {e}; logging stops");
                self.file = None;
            }
        }
    }
}

/// This machine's host name (for logs and claims).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(image: &str, relative: &str) -> BatchItem {
        BatchItem::new(image.into(), relative.into(), RequestPrompts::default())
    }

    #[test]
    fn outputs_mirror_relative_paths_and_collisions_are_refused() {
        let out = Path::new("out");
        assert_eq!(
            output_path(out, Path::new("p1/ct.nii.gz"), "trans"),
            PathBuf::from("out/p1/ct/ct_trans.nii.gz")
        );
        assert_eq!(
            output_path(out, Path::new("ct_01.nii.gz"), "trans"),
            PathBuf::from("out/ct_01/ct_01_trans.nii.gz")
        );
        assert_eq!(
            output_path(out, Path::new("CT.NII.GZ"), "trans"),
            PathBuf::from("out/CT/CT_trans.nii.gz")
        );
        let ok = [
            item("/d/p1/ct.nii.gz", "p1/ct.nii.gz"),
            item("/d/p2/ct.nii.gz", "p2/ct.nii.gz"),
        ];
        check_collisions(&ok, out, "trans").unwrap();
        let clash = [item("/d/a.nii", "a.nii"), item("/d/a.nii.gz", "a.nii.gz")];
        let e = check_collisions(&clash, out, "trans")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/d/a.nii and /d/a.nii.gz"), "{e}");
    }

    #[test]
    fn discovery_recursive_and_case_insensitive() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("p1")).unwrap();
        std::fs::create_dir_all(d.join("p2")).unwrap();
        std::fs::write(d.join("p1/ct.nii.gz"), b"").unwrap();
        std::fs::write(d.join("p2/ct.nii.gz"), b"").unwrap();
        std::fs::write(d.join("TOP.NII.GZ"), b"").unwrap();
        std::fs::write(d.join("notes.txt"), b"").unwrap();
        let find = |recursive, ignore_case| {
            discover(
                &BatchInput::Dir {
                    dir: d.to_path_buf(),
                    suffix: ".nii.gz".into(),
                    recursive,
                    ignore_case,
                },
                &RequestPrompts::default(),
            )
        };
        assert!(
            find(false, false).is_err(),
            "nothing matches at the top, case-sensitive"
        );
        assert_eq!(find(false, true).unwrap().len(), 1);
        let all = find(true, true).unwrap();
        let rel: Vec<_> = all.iter().map(|i| i.relative.clone()).collect();
        assert_eq!(
            rel,
            vec![
                PathBuf::from("TOP.NII.GZ"),
                PathBuf::from("p1/ct.nii.gz"),
                PathBuf::from("p2/ct.nii.gz")
            ]
        );
    }

    #[test]
    fn lists_mirror_their_common_folder() {
        let dir = tempfile::tempdir().unwrap();
        let list = dir.path().join("list.txt");
        std::fs::write(&list, "# comment\na/ct.nii.gz\nb/ct.nii.gz\n").unwrap();
        let items = discover(&BatchInput::List(list.clone()), &RequestPrompts::default()).unwrap();
        assert_eq!(items[0].relative, PathBuf::from("a/ct.nii.gz"));
        assert_eq!(items[1].relative, PathBuf::from("b/ct.nii.gz"));
        std::fs::write(&list, r#"[{"image": "x.nii.gz", "lable_prompt": [3]}]"#).unwrap();
        let e = discover(&BatchInput::List(list), &RequestPrompts::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("lable_prompt") && e.contains("label_prompt"),
            "{e}"
        );
    }
}
