//! The one request path: a resident [`Segmenter`] that `infer`, `batch`, `evaluate`, `bench` and the server call.
//!
//! A segmenter is built once from a configuration: the weights on their device ([`Model`]), the engine choice
//! and fallback policy, cuDNN's autotuner switched per `cudnn_benchmark`. Each [`Request`] is an image (a
//! [`Volume`] with its geometry) with prompts and per-request overrides; [`Segmenter::segment`] returns the label
//! map on the image's own grid and what ran. Nothing is reloaded or re-hashed per request: engines opened for a
//! method are kept for the next request, and the weights fingerprint is computed at most once (only when an
//! engine needs it).
//!
//! Threading: a segmenter is `Send` but not `Sync`. It is owned by one thread (the CLI's, or one worker thread per
//! device in the server and multi-device batch) and requests reach it through that thread, because libtorch's
//! TF32 and autocast switches are process-wide: only the owner of a device may flip them, between requests.
//!
//! Failure isolation: bad input (prompts, points outside the image, unusable voxels) is an
//! [`SegmentError::InvalidRequest`]; a panic inside libtorch (tch panics on CUDA out-of-memory) is caught at the
//! request boundary and becomes that request's [`SegmentError::Panic`], so one image never takes a batch or a
//! server down.

pub mod model;
pub mod record;

use std::cell::RefCell;
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

use anyhow::{anyhow, Context};
use ndarray::Array3;
use tch::{Device, Tensor};

use crate::config::{FallbackPolicy, InferenceConfig};
use crate::engines::runner::{MethodReport, WindowRunner};
use crate::engines::{self, EngineChoice, EngineContext, EngineError, Method};
use crate::inference::memory::{self, RequestShape, StitchDevice};
use crate::inference::window::Accumulator;
use crate::inference::{
    infer_labels, tensor_to_array, volume_to_tensor, NetworkPrompts, WindowNetwork, WindowSettings,
};
use crate::prompts::{self, LabelTable, Prompts, RequestPrompts};
use crate::runtime::torch_switches;
use crate::transforms::{self, PreprocessConfig};
use crate::volume::Volume;
pub use model::{device_name, CheckpointIdentity, Model, WeightsSource};

/// How images are prepared for the network and how predictions return to their grid.
#[derive(Debug, Clone)]
pub enum Pipeline {
    /// The bundle's `inference.json`: spacing -> foreground crop -> intensity -> RAS; prompts resolved with class
    /// names, subclasses, zero-shot ids and "everything"; `Invertd` back to the input grid.
    Bundle,
    /// The bundle's `evaluate.json`: training-order preprocessing (crop -> intensity -> RAS -> spacing), the class
    /// prompts `label_set` exactly as given (no expansion, no zero-shot switch), inverted in training order.
    Evaluate {
        label_set: Vec<i64>,
        preprocess: PreprocessConfig,
    },
}

/// One segmentation request.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// What the request is called in logs and errors (usually the input path).
    pub name: &'a str,
    /// The image on its own grid (`[x, y, z]`, RAS affine).
    pub image: &'a Volume,
    /// Prompts as given (ignored by [`Pipeline::Evaluate`], whose prompts are its label set).
    pub prompts: RequestPrompts,
    /// Method of this request (the configuration's `precision` when `None`).
    pub precision: Option<Method>,
    /// Whether the caller keeps `image`'s voxels while the windows run (for a preview, or because it borrows
    /// them throughout, as [`RequestPath::segment`] does); they count in the memory estimate only then.
    pub image_kept: bool,
}

/// What one request produced.
#[derive(Debug)]
pub struct Segmentation {
    /// Class ids on the image's grid (float32; 255 where nothing was computed).
    pub labels: Array3<f32>,
    /// The prompts after resolution (ids, subclasses, special point labels).
    pub prompts: Prompts,
    /// The method asked for, what ran, and every fallback.
    pub method: MethodReport,
    /// Seconds per stage (`preprocess`, `inference`, `postprocess`).
    pub timings: Vec<(&'static str, f64)>,
    /// Shape of the network's input grid after preprocessing.
    pub processed_shape: [usize; 3],
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    /// The request cannot be served as given: prompts, points, or the image itself (the client's to fix).
    #[error("{0}")]
    InvalidRequest(String),
    /// The requested method cannot run and `precision_fallback` is `deny`.
    #[error("{0}")]
    FallbackDenied(String),
    /// libtorch panicked (a bug, or CUDA running out of memory); caught at the request boundary.
    #[error("internal error while segmenting {name}: {message}")]
    Panic { name: String, message: String },
    /// Anything else that went wrong while computing.
    #[error("{0:#}")]
    Failed(anyhow::Error),
}

impl SegmentError {
    fn invalid(e: anyhow::Error) -> Self {
        SegmentError::InvalidRequest(format!("{e:#}"))
    }
}

/// What runs for a requested method ([`Segmenter::method_status`]).
#[derive(Debug, Clone, PartialEq)]
pub struct MethodStatus {
    /// The method that computes the class path (the engine's, else the libtorch fallback).
    pub runs_as: Method,
    /// Why the requested method steps down, if it does.
    pub notes: Vec<String>,
}

/// Environment variable of a test hook: a request whose name contains its value panics inside the request
/// (used by the test that checks that one failing image never takes a batch down).
pub const TEST_PANIC_ENV: &str = "VISTA3D_TEST_PANIC";

/// Where a request's windows run: the local model (a [`Segmenter`]) or, in the server, a device executor shared by
/// concurrent requests.
pub trait WindowBackend {
    /// The device the preprocessed image is put on (windows are cut from it there).
    fn input_device(&self) -> Device;

    /// Runs `f` with the network of `method` and returns its result with what ran.
    fn run_windows(
        &self,
        method: Method,
        f: &mut dyn FnMut(&dyn WindowNetwork) -> Result<Computed, SegmentError>,
    ) -> Result<(Computed, MethodReport), SegmentError>;
}

/// What a request's windows computed.
#[derive(Debug)]
pub struct Computed {
    /// Class ids on the network's grid (NaN where nothing was computed).
    pub labels: Array3<f32>,
    /// Seconds per stage.
    pub timings: Vec<(&'static str, f64)>,
    /// Shape of the network's input grid.
    pub processed_shape: [usize; 3],
}

/// The request logic every backend shares: prompts, checks, preprocessing, inference through the backend's
/// network, postprocessing and inversion. `Sync`: the server runs it on many request threads at once; a batch
/// worker clones it to prepare its next image on another thread.
#[derive(Clone)]
pub struct RequestPath {
    config: InferenceConfig,
    pipeline: Pipeline,
    table: LabelTable,
    test_panic: Option<String>,
    progress: bool,
    /// The network's weights and per-window activations (bytes), for the memory estimate.
    network_bytes: u64,
}

/// The resident request path on a local model (see the module documentation).
pub struct Segmenter {
    path: RequestPath,
    model: Model,
    engines: RefCell<HashMap<Method, EngineChoice>>,
}

impl Segmenter {
    /// A segmenter over loaded weights. Sets cuDNN's autotuner as `cudnn_benchmark` says (CUDA only).
    pub fn new(model: Model, config: InferenceConfig, pipeline: Pipeline) -> Self {
        if model.device.is_cuda() {
            torch_switches::set_cudnn_benchmark(config.cudnn_benchmark);
        }
        let mut path = RequestPath::new(config, pipeline);
        let patch = path.config.patch_size.0;
        path.set_network_bytes(memory::network_bytes(
            model.weight_bytes(),
            model.width().max(0) as usize,
            patch,
            // Window workers (CPU only) hold a call's activations each.
            path.config.sw_batch_size
                * if model.device.is_cuda() {
                    1
                } else {
                    path.config.window_workers
                },
        ));
        Self {
            path,
            model,
            engines: RefCell::new(HashMap::new()),
        }
    }

    /// Loads the weights on the configured device and builds a segmenter.
    pub fn load(
        config: InferenceConfig,
        weights: &WeightsSource,
        pipeline: Pipeline,
    ) -> anyhow::Result<Self> {
        let device = crate::runtime::parse_device(&config.device)?;
        let model = Model::load(weights, device, &config.cache_dir())?;
        Ok(Self::new(model, config, pipeline))
    }

    /// The loaded weights.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The settings every request starts from.
    pub fn config(&self) -> &InferenceConfig {
        &self.path.config
    }

    /// The request logic (shared with other backends).
    pub fn request_path(&self) -> &RequestPath {
        &self.path
    }

    /// Shows a progress bar of each request's windows on stderr.
    pub fn set_progress(&mut self, on: bool) {
        self.path.set_progress(on);
    }

    /// Runs one window of `patch_size` through `method` (opening its engine), so that the first request does not
    /// pay for it; returns the method report of that window.
    pub fn warm_up(&self, method: Option<Method>) -> Result<MethodReport, SegmentError> {
        let method = method.unwrap_or(self.config().precision);
        let p = self.config().window().patch_size;
        self.forget_engines_on_panic(guard("warm-up", || {
            self.with_runner(method, |runner| {
                let x = Tensor::zeros(
                    [1, 1, p[0] as i64, p[1] as i64, p[2] as i64],
                    (tch::Kind::Float, self.model.device),
                );
                let ids = Tensor::from_slice(&[1i64])
                    .view([1, 1])
                    .to_device(self.model.device);
                let args = crate::model::ForwardArgs {
                    class_vector: Some(&ids),
                    transpose: true,
                    ..Default::default()
                };
                tch::no_grad(|| crate::inference::WindowNetwork::forward_window(runner, &x, &args))
                    .map(|_| ())
                    .map_err(SegmentError::Failed)
            })
            .map(|((), report)| report)
        }))
    }

    /// Segments one image (see the module documentation for what is guaranteed).
    pub fn segment(&self, req: &Request<'_>) -> Result<Segmentation, SegmentError> {
        self.forget_engines_on_panic(self.path.segment(self, req))
    }

    /// The windows of a request prepared (on any thread) by [`RequestPath::prepare`]; invert the result with
    /// [`RequestPath::finish`]. Together the three stages are [`Segmenter::segment`].
    pub fn infer(&self, prepared: Prepared) -> Result<Inferred, SegmentError> {
        self.forget_engines_on_panic(self.path.infer(self, prepared))
    }

    /// After a panic, engines that were in use are in an unknown state: open them again next time.
    pub(crate) fn forget_engines_on_panic<T>(
        &self,
        r: Result<T, SegmentError>,
    ) -> Result<T, SegmentError> {
        if matches!(r, Err(SegmentError::Panic { .. })) {
            if let Ok(mut e) = self.engines.try_borrow_mut() {
                e.clear();
            }
        }
        r
    }

    /// Runs `f` with the network of a request for `method`: the engine is opened on first use and kept for the
    /// next requests; a method that cannot run steps down to libtorch (recorded in the report), unless
    /// `precision_fallback` is `deny`.
    pub fn with_runner<T>(
        &self,
        method: Method,
        f: impl FnOnce(&WindowRunner) -> Result<T, SegmentError>,
    ) -> Result<(T, MethodReport), SegmentError> {
        let cached = self.engines.borrow_mut().remove(&method);
        let choice = cached.unwrap_or_else(|| self.open(method));
        let deny = self.config().precision_fallback == FallbackPolicy::Deny;
        if deny && !choice.fallbacks.is_empty() {
            let why = lines(&choice.fallbacks);
            self.engines.borrow_mut().insert(method, choice);
            return Err(SegmentError::FallbackDenied(format!(
                "precision {method} cannot run here and precision_fallback is deny: {why}"
            )));
        }
        let known = choice.fallbacks.len();
        let runner = WindowRunner::new(&self.model.net, self.model.device, method, choice);
        let out = f(&runner);
        let (choice, report) = runner.into_parts();
        self.engines.borrow_mut().insert(method, choice);
        let out = out?;
        if deny && report.fallbacks.len() > known {
            return Err(SegmentError::FallbackDenied(format!(
                "precision {method} failed while running and precision_fallback is deny: {}",
                lines(&report.fallbacks[known..])
            )));
        }
        Ok((out, report))
    }

    /// What runs here when `method` is asked for (its engine is opened and kept), and why it steps down when
    /// it does.
    pub fn method_status(&self, method: Method) -> MethodStatus {
        let mut engines = self.engines.borrow_mut();
        let choice = engines.entry(method).or_insert_with(|| self.open(method));
        MethodStatus {
            runs_as: choice.engine.as_ref().map_or(choice.torch, |e| e.method()),
            notes: choice.fallbacks.iter().map(ToString::to_string).collect(),
        }
    }

    /// Opens the engine of `method` (or records why it cannot run).
    fn open(&self, method: Method) -> EngineChoice {
        let cuda = self.model.device.is_cuda();
        engines::choose(method, cuda, self.config().auto_cpu, &mut |m| {
            self.engine_context(m)
        })
    }

    /// Where the engines of `m` are and what they must match. Refuses early (before hashing any weights) when the
    /// folder is missing.
    fn engine_context(&self, m: Method) -> Result<EngineContext, EngineError> {
        let cache = self.config().cache_dir();
        let in_cache = |sub: &str| {
            self.model
                .known_fingerprint()
                .map(|fp| cache.join(&fp).join(sub))
        };
        let onnx_dir = self.config().onnx_dir.clone().or_else(|| in_cache("onnx"));
        let engines_dir = self
            .config()
            .engines_dir
            .clone()
            .or_else(|| in_cache("engines"));
        if m.is_tensorrt() && !self.model.device.is_cuda() {
            return Err(EngineError::Unavailable(
                "TensorRT needs a CUDA device; this request runs on the CPU".into(),
            ));
        }
        let missing = |what: &str, extra: &str| {
            EngineError::Unavailable(format!(
                "no {what} for these weights in the cache {} (run `vista3d export-onnx`{extra} with the same \
                 checkpoint, or set onnx_dir / engines_dir)",
                cache.display()
            ))
        };
        // `ort` (and `auto` on a CPU) exports the weights into the cache on first use (engines::onnx_cache);
        // TensorRT engines run from their sidecars alone and need no export.
        let onnx_dir = match (onnx_dir, m) {
            (Some(d), _) if self.config().onnx_dir.is_some() => d,
            (_, Method::Ort) => self.cached_onnx_export(&cache)?,
            (d, _) if m.is_tensorrt() => d.unwrap_or_default(),
            (d, _) => d.ok_or_else(|| missing("ONNX export", ""))?,
        };
        let engines_dir = match (m.is_tensorrt(), engines_dir) {
            (true, None) => {
                return Err(missing("TensorRT engines", " and `vista3d build-engines`"))
            }
            (_, d) => d.unwrap_or_default(),
        };
        engines::artifacts_present(m, &onnx_dir, &engines_dir)?;
        let window = self.config().window();
        Ok(EngineContext {
            onnx_dir,
            engines_dir,
            weights_fingerprint: self.model.weights_fingerprint(),
            device: self.model.device,
            patch_size: window.patch_size,
            max_prompt_size: self.config().max_prompt_size,
            sw_batch_size: window.sw_batch_size,
        })
    }

    /// The ONNX export of the loaded weights in `cache`, exported now if there is none (once per weights;
    /// `engines::onnx_cache`). Without ONNX Runtime nothing is exported (unavailable: `auto` moves on quietly).
    fn cached_onnx_export(
        &self,
        cache: &std::path::Path,
    ) -> Result<std::path::PathBuf, EngineError> {
        engines::ort_engine::ort_environment()?;
        let source = match (&self.model.source, self.model.identity()) {
            (WeightsSource::Random { width, seed }, _) => {
                engines::onnx::WeightsSource::random(*width, *seed)
            }
            (WeightsSource::Checkpoint(path), id) => engines::onnx::WeightsSource::Checkpoint {
                path: path.display().to_string(),
                sha256: id.map(|i| i.sha256.clone()).unwrap_or_default(),
            },
        };
        engines::onnx_cache::ensure_export(
            cache,
            &self.model.weights_fingerprint(),
            self.model.var_store(),
            &source,
        )
    }

    /// The class table requests are resolved against.
    pub fn label_table(&self) -> &LabelTable {
        self.path.label_table()
    }
}

impl WindowBackend for Segmenter {
    fn input_device(&self) -> Device {
        self.model.device
    }

    fn run_windows(
        &self,
        method: Method,
        f: &mut dyn FnMut(&dyn WindowNetwork) -> Result<Computed, SegmentError>,
    ) -> Result<(Computed, MethodReport), SegmentError> {
        self.with_runner(method, |runner| f(runner))
    }
}

impl RequestPath {
    /// The request logic for `config` and `pipeline` (reads the test hook [`TEST_PANIC_ENV`]).
    pub fn new(config: InferenceConfig, pipeline: Pipeline) -> Self {
        Self {
            config,
            pipeline,
            table: LabelTable::bundle(),
            test_panic: std::env::var(TEST_PANIC_ENV).ok().filter(|s| !s.is_empty()),
            progress: false,
            network_bytes: 0,
        }
    }

    /// Shows a progress bar of the windows of each request on stderr (for long single images on a terminal).
    pub fn set_progress(&mut self, on: bool) {
        self.progress = on;
    }

    /// The network's own memory (weights and one batch of window activations), counted in each request's
    /// memory estimate.
    pub fn set_network_bytes(&mut self, bytes: u64) {
        self.network_bytes = bytes;
    }

    /// The settings every request starts from.
    pub fn config(&self) -> &InferenceConfig {
        &self.config
    }

    /// The class table requests are resolved against.
    pub fn label_table(&self) -> &LabelTable {
        &self.table
    }

    /// Segments one image with the windows running on `backend`; a panic fails this request only.
    pub fn segment(
        &self,
        backend: &dyn WindowBackend,
        req: &Request<'_>,
    ) -> Result<Segmentation, SegmentError> {
        guard(req.name, || self.segment_inner(backend, req))
    }

    fn segment_inner(
        &self,
        backend: &dyn WindowBackend,
        req: &Request<'_>,
    ) -> Result<Segmentation, SegmentError> {
        let prepared = self.prepare_inner(req)?;
        let inferred = self.infer_inner(backend, prepared)?;
        self.finish_inner(inferred)
    }

    /// The CPU part before the windows: prompts resolved and checked, the image validated and preprocessed. A
    /// batch worker prepares the next image with it while its device runs the current one.
    pub fn prepare(&self, req: &Request<'_>) -> Result<Prepared, SegmentError> {
        guard(req.name, || self.prepare_inner(req))
    }

    /// The device part: the windows of a prepared request on `backend`, labels on the network's grid.
    pub fn infer(
        &self,
        backend: &dyn WindowBackend,
        prepared: Prepared,
    ) -> Result<Inferred, SegmentError> {
        let name = prepared.name.clone();
        guard(&name, || self.infer_inner(backend, prepared))
    }

    /// The CPU part after the windows: the labels inverted to the image's grid.
    pub fn finish(&self, inferred: Inferred) -> Result<Segmentation, SegmentError> {
        let name = inferred.name.clone();
        guard(&name, || self.finish_inner(inferred))
    }

    /// Estimates the request's peak memory before any work (logged at info level), picks the stitching sums'
    /// type (float16 for networks in reduced precision or when float32 would not fit `stitch_memory_gb`) and
    /// refuses a request that cannot fit the machine.
    fn plan_memory(
        &self,
        req: &Request<'_>,
        prompts: &Prompts,
        resampled: [usize; 3],
        method: Method,
    ) -> Result<Accumulator, SegmentError> {
        let points = prompts.points.is_some();
        let as_labels =
            !points || (!self.config.use_point_window && prompts.label_prompt.is_some());
        let classes = prompts.label_prompt.as_ref().map_or(1, Vec::len);
        let shape = RequestShape {
            input_dims: req.image.dims(),
            resampled_dims: resampled,
            classes,
            as_labels,
            output_bytes: self.config.output_dtype.size() as u64,
            image_kept: req.image_kept,
        };
        let estimate_with = |accumulator| {
            memory::estimate(
                &shape,
                &self.config.window(),
                accumulator,
                self.network_bytes,
            )
            .map_err(|e| SegmentError::invalid(e.context(format!("image {}", req.name))))
        };
        let full = estimate_with(Accumulator::Float32)?;
        let configured = self
            .config
            .stitch_memory_gb
            .map(|g| (g * (1u64 << 30) as f64) as u64);
        let budget = configured.unwrap_or_else(|| {
            memory::available_bytes().map_or(u64::MAX, |free| {
                free.saturating_sub(full.total() - full.accumulators)
            })
        });
        // Budget alone decides here; a network that turns out to run in 16-bit floats gets float16 sums too
        // (see `infer_inner`), which the estimate assumes when such a method is asked for.
        let accumulator = if full.accumulators > budget {
            Accumulator::Float16
        } else {
            Accumulator::Float32
        };
        let estimate = if accumulator == Accumulator::Float16 || method.reduced_precision() {
            estimate_with(Accumulator::Float16)?
        } else {
            full
        };
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        log::info!(
            "{}: estimated peak memory {estimate}; stitching budget {:.2} GiB",
            req.name,
            gib(budget)
        );
        let limit = memory::memory_limit_bytes();
        if let Some(limit) = limit.filter(|&l| estimate.total() > l) {
            return Err(SegmentError::InvalidRequest(format!(
                "image {}: its estimated peak memory, {estimate}, is more than this machine's {:.2} GiB \
                 (resampled grid {resampled:?}, {classes} classes); use a coarser resample_spacing, fewer \
                 classes or a machine with more memory",
                req.name,
                gib(limit)
            )));
        }
        if configured.is_some() && estimate.accumulators > budget {
            return Err(SegmentError::InvalidRequest(format!(
                "image {}: its stitching sums need {:.2} GiB even in float16, more than stitch_memory_gb = {:.2} \
                 (resampled grid {resampled:?}, {classes} classes)",
                req.name,
                gib(estimate.accumulators),
                gib(budget)
            )));
        }
        Ok(accumulator)
    }

    /// Whether the stitching sums go to host memory: `stitch_device = cpu`, or `auto` on a GPU whose free
    /// memory would not hold them.
    fn stitch_on_host(
        &self,
        device: Device,
        window: &WindowSettings,
        classes: usize,
        dims: [usize; 3],
    ) -> bool {
        match (device, self.config.stitch_device) {
            (Device::Cpu, _) | (_, StitchDevice::Device) => false,
            (_, StitchDevice::Cpu) => true,
            (device, StitchDevice::Auto) => {
                let shape = RequestShape {
                    input_dims: dims,
                    resampled_dims: dims,
                    classes,
                    as_labels: true,
                    output_bytes: 1,
                    image_kept: false,
                };
                let sums = memory::estimate(&shape, window, window.accumulator, 0)
                    .map_or(u64::MAX, |e| e.accumulators);
                let free = memory::device_free_bytes(device).unwrap_or(0);
                let on_host = sums > free / 10 * 8;
                if on_host {
                    log::info!(
                        "stitching sums ({sums} bytes) do not fit the free memory of {device:?} ({free} bytes): \
                         kept in host memory"
                    );
                }
                on_host
            }
        }
    }

    fn prepare_inner(&self, req: &Request<'_>) -> Result<Prepared, SegmentError> {
        let prompts = match &self.pipeline {
            Pipeline::Bundle => {
                resolve_prompts(&req.prompts, &self.config).map_err(SegmentError::invalid)?
            }
            Pipeline::Evaluate { label_set, .. } => Prompts {
                label_prompt: Some(label_set.clone()),
                points: None,
                point_labels: None,
            },
        };
        check_points(&prompts, req.image, req.name)?;
        transforms::validate_volume(req.image)
            .map_err(|e| SegmentError::invalid(e.context(format!("image {}", req.name))))?;
        let method = req.precision.unwrap_or(self.config.precision);
        let mut window = self.config.window();
        if let Pipeline::Bundle = &self.pipeline {
            let resampled = check_resampled_grid(req.image, &self.config, req.name)?;
            window.accumulator = self.plan_memory(req, &prompts, resampled, method)?;
        }
        let t = Instant::now();
        let prepared = match &self.pipeline {
            Pipeline::Bundle => transforms::preprocess(req.image, &self.config.preprocess())
                .map(|(v, trace)| (v, Trace::Bundle(Box::new(trace)))),
            Pipeline::Evaluate { preprocess, .. } => {
                transforms::preprocess_train_order(req.image, preprocess)
                    .map(|(v, trace)| (v, Trace::TrainOrder(Box::new(trace))))
            }
        };
        let (processed, trace) = prepared
            .map_err(|e| SegmentError::invalid(e.context(format!("preprocessing {}", req.name))))?;
        let net_prompts = match (&trace, &self.pipeline) {
            (Trace::Bundle(trace), _) => NetworkPrompts::new(&prompts, trace),
            (Trace::TrainOrder(_), Pipeline::Evaluate { label_set, .. }) => {
                // Vista3dEvaluator without user prompts: class_vector = prompt_class = label_set.
                let ids = Tensor::from_slice(label_set).view([-1, 1]);
                NetworkPrompts {
                    class_vector: Some(ids.shallow_clone()),
                    prompt_class: Some(ids),
                    point_coords: None,
                    point_labels: None,
                    label_prompt: Some(label_set.clone()),
                    points: Vec::new(),
                }
            }
            (Trace::TrainOrder(_), Pipeline::Bundle) => {
                return Err(SegmentError::Failed(anyhow!(
                    "internal: training-order trace in the bundle pipeline"
                )))
            }
        };
        // The network's input as a tensor; the volume is dropped so that only one copy stays for the windows.
        let image = volume_to_tensor(&processed).map_err(SegmentError::Failed)?;
        let processed_dims = processed.dims();
        drop(processed);
        Ok(Prepared {
            name: req.name.to_string(),
            prompts,
            net_prompts,
            image,
            processed_dims,
            trace,
            method,
            window,
            timings: vec![("preprocess", t.elapsed().as_secs_f64())],
        })
    }

    fn infer_inner(
        &self,
        backend: &dyn WindowBackend,
        prepared: Prepared,
    ) -> Result<Inferred, SegmentError> {
        let Prepared {
            name,
            prompts,
            net_prompts,
            image,
            processed_dims,
            trace,
            method,
            mut window,
            mut timings,
        } = prepared;
        let classes = net_prompts.label_prompt.as_ref().map_or(1, Vec::len);
        window.stitch_on_host =
            self.stitch_on_host(backend.input_device(), &window, classes, processed_dims);
        // Taken by the windows and dropped after them, before the labels are converted.
        let mut image = Some(image);
        let (out, report) = backend.run_windows(method, &mut |net| {
            let t = Instant::now();
            if let Some(needle) = &self.test_panic {
                if name.contains(needle.as_str()) {
                    panic!("test hook {TEST_PANIC_ENV}: forced panic in {name}");
                }
            }
            let image = image
                .take()
                .ok_or_else(|| SegmentError::Failed(anyhow!("internal: the windows ran twice")))?
                .to_device(backend.input_device());
            let progress = self
                .progress
                .then(|| WindowProgress::new(net, &processed_dims, &window, &net_prompts));
            let net: &dyn WindowNetwork = match &progress {
                Some(p) => p,
                None => net,
            };
            // Float16 sums where the network itself runs in 16-bit floats (known once its engine is chosen).
            let mut window = window.clone();
            if net.reduced_precision() {
                window.accumulator = Accumulator::Float16;
            }
            let labels = infer_labels(net, &image, &net_prompts, &window)
                .with_context(|| format!("segmenting {name}"))
                .map_err(SegmentError::Failed)?;
            if let Some(p) = progress {
                p.bar.finish_and_clear();
            }
            drop(image);
            let labels = tensor_to_array(&labels).map_err(SegmentError::Failed)?;
            Ok(Computed {
                labels,
                timings: vec![("inference", t.elapsed().as_secs_f64())],
                processed_shape: processed_dims,
            })
        })?;
        log::info!(
            "{name}: precision {method} -> ran {}",
            engines::runner::used_names(&report)
        );
        timings.extend(out.timings);
        Ok(Inferred {
            name,
            prompts,
            trace,
            labels: out.labels,
            method: report,
            timings,
            processed_shape: out.processed_shape,
        })
    }

    fn finish_inner(&self, inferred: Inferred) -> Result<Segmentation, SegmentError> {
        let Inferred {
            prompts,
            trace,
            labels,
            method,
            mut timings,
            processed_shape,
            ..
        } = inferred;
        let t = Instant::now();
        let mut original = match &trace {
            Trace::Bundle(trace) => transforms::invert_to_original(&labels, trace),
            Trace::TrainOrder(trace) => transforms::invert_train_order(&labels, trace),
        }
        .map_err(SegmentError::Failed)?;
        drop(labels);
        original.mapv_inplace(|v| if v.is_nan() { 255.0 } else { v });
        timings.push(("postprocess", t.elapsed().as_secs_f64()));
        Ok(Segmentation {
            labels: original,
            prompts,
            method,
            timings,
            processed_shape,
        })
    }
}

/// A request prepared for its windows ([`RequestPath::prepare`]): resolved prompts, the preprocessed image and
/// its trace. `Send`: it is made on one thread and run on the device's.
pub struct Prepared {
    name: String,
    prompts: Prompts,
    net_prompts: NetworkPrompts,
    /// The network's input `[1, 1, X, Y, Z]` on the host.
    image: Tensor,
    processed_dims: [usize; 3],
    trace: Trace,
    method: Method,
    /// Window settings with this request's stitching sums.
    window: WindowSettings,
    timings: Vec<(&'static str, f64)>,
}

impl Prepared {
    /// The shape of the network's input grid.
    pub fn processed_shape(&self) -> [usize; 3] {
        self.processed_dims
    }
}

/// A request whose windows ran ([`RequestPath::infer`]): labels on the network's grid, not yet inverted.
pub struct Inferred {
    name: String,
    prompts: Prompts,
    trace: Trace,
    labels: Array3<f32>,
    method: MethodReport,
    timings: Vec<(&'static str, f64)>,
    processed_shape: [usize; 3],
}

impl Inferred {
    /// The method asked for, what ran, and every fallback.
    pub fn method(&self) -> &MethodReport {
        &self.method
    }
}

/// A network that ticks a progress bar for every window it runs (the bar's length is the sliding-window count;
/// point windows run without a known total). `N` is a reference to the network, or its shared form when the
/// windows run on several threads ([`WindowNetwork::concurrent`]).
struct WindowProgress<N> {
    inner: N,
    bar: indicatif::ProgressBar,
}

impl<'a> WindowProgress<&'a dyn WindowNetwork> {
    fn new(
        inner: &'a dyn WindowNetwork,
        dims: &[usize; 3],
        window: &crate::inference::WindowSettings,
        prompts: &NetworkPrompts,
    ) -> Self {
        let sliding = prompts.point_coords.is_none() || !window.use_point_window;
        let total =
            crate::inference::window::WindowGrid::new(*dims, window.patch_size, window.overlap)
                .map(|g| g.windows().len() as u64)
                .ok()
                .filter(|_| sliding);
        let bar = match total {
            Some(n) => indicatif::ProgressBar::new(n).with_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {pos}/{len} windows, elapsed {elapsed}, ETA {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            ),
            None => indicatif::ProgressBar::new_spinner(),
        };
        Self { inner, bar }
    }
}

impl<N> WindowNetwork for WindowProgress<N>
where
    N: std::ops::Deref,
    N::Target: WindowNetwork,
{
    fn forward_window(
        &self,
        input: &Tensor,
        args: &crate::model::ForwardArgs,
    ) -> anyhow::Result<Tensor> {
        let out = self.inner.forward_window(input, args);
        self.bar
            .inc(input.size().first().copied().unwrap_or(1).max(1) as u64);
        out
    }

    fn forward_window_in_slabs(
        &self,
        input: &Tensor,
        args: &crate::model::ForwardArgs,
        slab_x: usize,
        sink: &mut crate::inference::network::SlabSink<'_>,
    ) -> anyhow::Result<()> {
        let out = self
            .inner
            .forward_window_in_slabs(input, args, slab_x, sink);
        self.bar
            .inc(input.size().first().copied().unwrap_or(1).max(1) as u64);
        out
    }

    fn reduced_precision(&self) -> bool {
        self.inner.reduced_precision()
    }

    /// The shared form of the inner network, ticking the same bar.
    fn concurrent(&self) -> Option<Box<dyn WindowNetwork + Sync + '_>> {
        let inner = self.inner.concurrent()?;
        Some(Box::new(WindowProgress {
            inner,
            bar: self.bar.clone(),
        }))
    }
}

/// Fallbacks as one `; `-separated line.
fn lines(fallbacks: &[engines::Fallback]) -> String {
    fallbacks
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Runs `f`, turning a panic into [`SegmentError::Panic`] (the request boundary).
pub fn guard<T>(
    name: &str,
    f: impl FnOnce() -> Result<T, SegmentError>,
) -> Result<T, SegmentError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let message = crate::runtime::panic_message(payload.as_ref());
            log::error!("{name}: panic caught at the request boundary: {message}");
            Err(SegmentError::Panic {
                name: name.to_string(),
                message,
            })
        }
    }
}

/// The preprocessing trace of either pipeline.
enum Trace {
    Bundle(Box<transforms::SpatialTrace>),
    TrainOrder(Box<transforms::TrainOrderTrace>),
}

/// Resolves a request's prompts with the configured everything labels and subclasses (checks only: no weights
/// needed, so front ends call it before loading anything).
pub fn resolve_prompts(req: &RequestPrompts, config: &InferenceConfig) -> anyhow::Result<Prompts> {
    prompts::resolve(
        req,
        &LabelTable::bundle(),
        &config.subclass,
        &config.everything_labels,
    )
}

/// Refuses an image whose resampled grid would exceed `max_resampled_voxels`, before any work (a wrong header
/// geometry, e.g. a sheared sform, can make a tiny image resample onto billions of voxels).
fn check_resampled_grid(
    image: &Volume,
    config: &InferenceConfig,
    name: &str,
) -> Result<[usize; 3], SegmentError> {
    let plan = transforms::plan_spacing(&image.affine, image.dims(), config.resample_spacing)
        .map_err(|e| SegmentError::invalid(e.context(format!("image {name}"))))?;
    let voxels: u128 = plan.out_dims.iter().map(|&d| d as u128).product();
    if voxels > config.max_resampled_voxels as u128 {
        return Err(SegmentError::InvalidRequest(format!(
            "image {name}: resampling its {:?} voxels (spacing {:.3?} mm) to {:?} mm makes a grid of {:?} = {voxels} \
             voxels ({:.1} GiB as float32), more than max_resampled_voxels = {}; the header's geometry (sform/qform) \
             is probably wrong (look for shear or absurd spacing), or raise the limit with --set \
             max_resampled_voxels=N",
            image.dims(),
            image.spacing(),
            config.resample_spacing,
            plan.out_dims,
            voxels as f64 * 4.0 / (1u64 << 30) as f64,
            config.max_resampled_voxels
        )));
    }
    Ok(plan.out_dims)
}

/// Points must lie inside the image (voxel indices from 0 to size - 1).
fn check_points(prompts: &Prompts, image: &Volume, name: &str) -> Result<(), SegmentError> {
    let d = image.dims();
    for p in prompts.points.iter().flatten() {
        if (0..3).any(|a| p[a] < 0.0 || p[a] > (d[a] - 1) as f64) {
            return Err(SegmentError::InvalidRequest(format!(
                "point {p:?} is outside the image {name}, whose voxel indices run from 0 to {:?}",
                d.map(|s| s.saturating_sub(1))
            )));
        }
    }
    Ok(())
}
