//! Request threads: each takes an admitted request from the queue and runs it through the shared
//! [`RequestPath`] with its windows on the device executor: open and check the image, reserve its memory
//! estimate, read it, segment it, and write the label map with the input's header and the CLI's JSON record
//! (zipped by default) into the request's spool folder.
//!
//! A request's [`Slot`] is its place in the server's capacity (request threads + queue). A client that goes away
//! (or times out) cancels its slot: a queued request gives its place back at once and never runs; a running one
//! stops at its next window.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::{json, Value};
use tokio::sync::OwnedSemaphorePermit;

use super::api::{Format, ParsedRequest};
use super::error::ServeError;
use super::executor::{ExecutorHandle, RemoteBackend};
use super::limits::{estimate_request_bytes, gib, MemoryBudget, ReserveError};
use super::metrics::Metrics;
use super::source::{peek_nifti, SourcePolicy};
use crate::engines::runner::MethodReport;
use crate::io::read_image;
use crate::segmenter::record::{self, build_record_for, request_identity_for, ModelFacts};
use crate::segmenter::{resolve_prompts, Request, RequestPath};

const QUEUED: u8 = 0;
const RUNNING: u8 = 1;
const CANCELLED: u8 = 2;
const DONE: u8 = 3;

/// A request's place in the server's capacity.
#[derive(Debug)]
pub struct Slot {
    state: AtomicU8,
    cancelled: AtomicBool,
    permit: Mutex<Option<OwnedSemaphorePermit>>,
}

impl Slot {
    /// A queued slot holding its admission permit.
    pub fn new(permit: OwnedSemaphorePermit) -> Self {
        Self {
            state: AtomicU8::new(QUEUED),
            cancelled: AtomicBool::new(false),
            permit: Mutex::new(Some(permit)),
        }
    }

    /// The client went away or timed out: a queued request gives its place back now; a running one stops at
    /// its next window. Returns true when the request was still queued.
    pub fn cancel(&self) -> bool {
        self.cancelled.store(true, Ordering::SeqCst);
        let was_queued = self
            .state
            .compare_exchange(QUEUED, CANCELLED, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok();
        if was_queued {
            self.release();
        }
        was_queued
    }

    /// Whether the request should stop.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }

    /// Moves a queued request to running (false: it was cancelled while queued).
    fn start(&self) -> bool {
        self.state
            .compare_exchange(QUEUED, RUNNING, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    fn finish(&self) {
        self.state.store(DONE, Ordering::SeqCst);
        self.release();
    }

    fn release(&self) {
        drop(self.permit.lock().unwrap_or_else(|e| e.into_inner()).take());
    }
}

/// A request's folder in the spool directory, removed when the last holder drops it.
#[derive(Debug)]
pub struct RequestDir {
    pub path: PathBuf,
}

impl Drop for RequestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Where a request's image is.
#[derive(Debug, Clone)]
pub enum ImageInput {
    /// A file under an allowed folder (opened and checked by the request thread).
    Path(PathBuf),
    /// An upload or download in the request's spool folder, with its identity for the record.
    Spooled { path: PathBuf, identity: Value },
}

/// An admitted request.
pub struct Job {
    pub id: u64,
    /// What the request is called in messages and logs (the client's path or URL, or `upload`).
    pub name: String,
    /// Stem of the output file names.
    pub stem: String,
    pub input: ImageInput,
    pub request: ParsedRequest,
    pub format: Format,
    /// Add the QC preview to the zip.
    pub preview: bool,
    pub dir: Arc<RequestDir>,
    pub slot: Arc<Slot>,
    pub queued: Instant,
    pub reply: tokio::sync::oneshot::Sender<Result<JobOutput, ServeError>>,
}

/// What a finished request sends back.
#[derive(Debug)]
pub struct JobOutput {
    /// The response body (in the request's spool folder).
    pub file: PathBuf,
    /// Its name for `Content-Disposition`.
    pub filename: String,
    pub content_type: &'static str,
    /// What ran.
    pub method: MethodReport,
}

/// What every request thread shares.
pub struct Worker {
    pub path: Arc<RequestPath>,
    pub exec: ExecutorHandle,
    pub policy: Arc<SourcePolicy>,
    pub budget: Arc<MemoryBudget>,
    pub metrics: Arc<Metrics>,
    pub facts: ModelFacts,
}

/// Starts `n` request threads taking jobs from `jobs`; they end when every sender is dropped.
pub fn spawn_workers(
    n: usize,
    worker: Arc<Worker>,
    jobs: Arc<Mutex<Receiver<Job>>>,
) -> std::io::Result<Vec<std::thread::JoinHandle<()>>> {
    (0..n)
        .map(|i| {
            let worker = worker.clone();
            let jobs = jobs.clone();
            std::thread::Builder::new()
                .name(format!("vista3d-request-{i}"))
                .spawn(move || loop {
                    let job = {
                        let rx = jobs.lock().unwrap_or_else(|e| e.into_inner());
                        rx.recv()
                    };
                    match job {
                        Ok(job) => worker.run(job),
                        Err(_) => break,
                    }
                })
        })
        .collect()
}

impl Worker {
    /// Runs one job and answers it (unless it was cancelled while queued).
    fn run(&self, job: Job) {
        if !job.slot.start() {
            log::debug!("request {}: cancelled while queued", job.id);
            return;
        }
        self.metrics.queue_depth.dec();
        self.metrics.running.inc();
        self.metrics
            .stage_seconds
            .with_label_values(&["queue"])
            .observe(job.queued.elapsed().as_secs_f64());
        let result = self.compute(&job);
        self.metrics.running.dec();
        self.metrics.memory_reserved.set(self.budget.used() as i64);
        job.slot.finish();
        if let Err(e) = &result {
            // Client errors are logged once by the handler; failures of the server here, with the request.
            if !job.slot.is_cancelled() && e.status().is_server_error() {
                log::error!("request {} ({}): {e}", job.id, job.name);
            }
        }
        let _ = job.reply.send(result);
    }

    fn cancelled_error(job: &Job) -> ServeError {
        ServeError::Internal(format!("request {} was cancelled", job.id))
    }

    fn compute(&self, job: &Job) -> Result<JobOutput, ServeError> {
        let config = self.path.config();
        let t = Instant::now();
        // Where the bytes are (a checked path, or the spooled upload).
        let (opened, read_path, input_identity) = match &job.input {
            ImageInput::Path(p) => {
                let o = self.policy.open(p)?;
                let mut identity = record::file_identity(&o.real_path);
                identity["path"] = json!(p.display().to_string());
                let read = o.read_path.clone();
                (Some(o), read, identity)
            }
            ImageInput::Spooled { path, identity } => (None, path.clone(), identity.clone()),
        };
        // Memory: reserve the estimate before reading the voxels.
        let classes = resolve_prompts(&job.request.prompts, config)
            .map_err(|e| ServeError::Unprocessable(format!("{e:#}")))?
            .label_prompt
            .map_or(1, |l| l.len());
        let reserve = |dims: [usize; 3], spacing: [f64; 3]| {
            let needed = estimate_request_bytes(dims, spacing, config, classes);
            match self.budget.reserve(needed, &|| job.slot.is_cancelled()) {
                Ok(r) => Ok(Some(r)),
                Err(ReserveError::Cancelled) => Err(Self::cancelled_error(job)),
                Err(ReserveError::TooLarge { needed, total }) => {
                    Err(ServeError::TooLarge(format!(
                        "image {} ({} x {} x {} voxels, {classes} classes) needs about {} by the server's \
                         estimate, more than its whole memory budget of {}: ask the operator to raise \
                         --memory-budget, or ask for fewer classes",
                        job.name,
                        dims[0],
                        dims[1],
                        dims[2],
                        gib(needed),
                        gib(total)
                    )))
                }
            }
        };
        let mut reservation = match peek_nifti(&read_path) {
            Some((dims, spacing)) => reserve(dims, spacing)?,
            // Not a readable NIfTI header (a DICOM series, or a file the full read refuses): after the read.
            None => None,
        };
        self.metrics.memory_reserved.set(self.budget.used() as i64);
        let input = read_image(&read_path, &config.dicom_options()).map_err(|e| {
            let message = format!("{e:#}").replace(&read_path.display().to_string(), &job.name);
            ServeError::Unprocessable(message)
        })?;
        drop(opened);
        if reservation.is_none() {
            reservation = reserve(input.volume.dims(), input.volume.spacing())?;
            self.metrics.memory_reserved.set(self.budget.used() as i64);
        }
        // A SEG is made on the grid of the series it segments: refuse before the network runs.
        let wants_seg = match job.format {
            Format::DicomSeg => true,
            Format::Zip => config.output_format.wants_seg(),
            Format::Nifti => false,
        };
        if wants_seg && input.dicom.is_none() {
            return Err(ServeError::Unprocessable(format!(
                "{} is not a DICOM series: a DICOM SEG (format=dicom-seg, or output_format {:?}) segments a \
                 DICOM series; send one (a folder under an allowed directory, or a zip of it) or ask for \
                 format=zip or format=nifti",
                job.name, config.output_format
            )));
        }
        let t_read = t.elapsed().as_secs_f64();
        self.metrics
            .stage_seconds
            .with_label_values(&["read"])
            .observe(t_read);
        if job.slot.is_cancelled() {
            return Err(Self::cancelled_error(job));
        }

        let backend = RemoteBackend::new(&self.exec, job.id, &job.slot.cancelled);
        let seg = self
            .path
            .segment(
                &backend,
                &Request {
                    name: &job.name,
                    image: &input.volume,
                    prompts: job.request.prompts.clone(),
                    precision: job.request.precision,
                    image_kept: true,
                },
            )
            .map_err(|e| {
                if job.slot.is_cancelled() {
                    Self::cancelled_error(job)
                } else {
                    ServeError::from_segment(e, job.request.precision.is_some())
                }
            })?;
        for (stage, seconds) in &seg.timings {
            self.metrics
                .stage_seconds
                .with_label_values(&[*stage])
                .observe(*seconds);
        }

        // The label map with the input's header and the CLI's record, then the response body.
        let t_write = Instant::now();
        let dtype = job.request.output_dtype.unwrap_or(config.output_dtype);
        let method = job.request.precision.unwrap_or(config.precision);
        let label_name = format!("{}_{}.nii.gz", job.stem, config.output_postfix);
        let label_path = job.dir.path.join(&label_name);
        let identity = request_identity_for(
            config,
            &self.facts,
            input_identity,
            &job.request.prompts,
            method,
            dtype,
        );
        let mut seconds: Vec<(&str, f64)> = vec![("read", t_read)];
        seconds.extend(seg.timings.iter().map(|(k, v)| (*k, *v)));
        let mut rec = build_record_for(
            config,
            &self.facts,
            &seg,
            input.volume.geometry(),
            identity,
            Path::new(&label_name),
            &seconds,
        );
        let (windows, shared) = backend.window_counts();
        rec["server"] = json!({
            "request_id": job.id,
            "serve_max_batch_windows": config.serve_max_batch_windows,
            "windows": windows,
            "windows_batched_with_other_requests": shared,
            "memory_reserved_bytes": reservation.as_ref().map(|r| r.bytes()),
        });
        rec["seconds"]["total_before_write"] = json!(t.elapsed().as_secs_f64());
        drop(reservation);
        let seg_file = match (&input.dicom, wants_seg) {
            (Some(series), true) => record::write_seg_beside(
                &label_path,
                &seg.labels,
                series,
                self.path.label_table(),
                &mut rec,
            )
            .map_err(|e| ServeError::Internal(format!("{e:#}")))?,
            _ => None,
        };
        if let Some(p) = &seg_file {
            // The record names files as the client receives them.
            rec["outputs"]["dicom_seg"] = json!(p.file_name().map(|n| n.to_string_lossy()));
        }
        let preview_file = if job.preview {
            let written = record::write_preview_beside(
                &label_path,
                &input.volume,
                &seg.labels,
                &job.request.prompts,
                self.path.label_table(),
                &mut rec,
            );
            if let Some(p) = &written {
                rec["outputs"]["preview"] = json!(p.file_name().map(|n| n.to_string_lossy()));
            }
            written
        } else {
            None
        };
        let record_path = record::save(&label_path, &seg.labels, &input.header, dtype, &rec)
            .map_err(|e| ServeError::Internal(format!("{e:#}")))?;
        let out = match job.format {
            Format::Nifti => JobOutput {
                file: label_path,
                filename: label_name,
                content_type: "application/gzip",
                method: seg.method,
            },
            Format::DicomSeg => {
                let file = seg_file.ok_or_else(|| {
                    ServeError::Unprocessable(format!(
                        "nothing was found in {} for the requested classes, and a DICOM SEG needs at least \
                         one segment: ask for format=zip or format=nifti to receive the empty label map",
                        job.name
                    ))
                })?;
                JobOutput {
                    filename: format!("{}_{}.dcm", job.stem, config.output_postfix),
                    file,
                    content_type: "application/dicom",
                    method: seg.method,
                }
            }
            Format::Zip => {
                let zip_name = format!("{}_{}.zip", job.stem, config.output_postfix);
                let zip_path = job.dir.path.join(&zip_name);
                let mut files = vec![label_path.as_path(), record_path.as_path()];
                files.extend(seg_file.as_deref());
                files.extend(preview_file.as_deref());
                write_zip(&zip_path, &files).map_err(|e| ServeError::Internal(format!("{e:#}")))?;
                JobOutput {
                    file: zip_path,
                    filename: zip_name,
                    content_type: "application/zip",
                    method: seg.method,
                }
            }
        };
        self.metrics
            .stage_seconds
            .with_label_values(&["write"])
            .observe(t_write.elapsed().as_secs_f64());
        Ok(out)
    }
}

/// A zip of `files` (by file name; `.gz` stored as is, the rest deflated), written atomically.
fn write_zip(path: &Path, files: &[&Path]) -> anyhow::Result<()> {
    use zip::write::SimpleFileOptions;
    use zip::CompressionMethod;
    crate::fsutil::write_atomic_with(path, |w| {
        let mut z = zip::ZipWriter::new(w);
        for f in files {
            let name = f
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let method = if name.ends_with(".gz") {
                CompressionMethod::Stored
            } else {
                CompressionMethod::Deflated
            };
            z.start_file(
                name,
                SimpleFileOptions::default()
                    .compression_method(method)
                    .large_file(std::fs::metadata(f)?.len() >= u32::MAX as u64),
            )?;
            let mut src = std::fs::File::open(f)?;
            std::io::copy(&mut src, &mut z)?;
        }
        z.finish()?;
        Ok(())
    })
}
