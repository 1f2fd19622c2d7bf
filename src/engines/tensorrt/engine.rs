//! [`TrtEngine`]: the class path of a window (encoder + class head) on TensorRT engines.
//!
//! Loading reads the engines' sidecars only (no ONNX export is needed at run time) and classifies every refusal
//! (see [`EngineError`]): no TensorRT library or shim, a CPU request or no GPU, no engine built yet are
//! unavailable; engines built from other weights, for another TensorRT version, GPU, window size,
//! `max_prompt_size` or graph layout are stale; a damaged sidecar or plan is corrupt; a failure while running (or
//! creating the execution context) is a runtime error.
//!
//! Running: the encoder engine computes the mapped features once per window (chunks of the engine's window batch),
//! the class-head engine only the prompt-dependent part per chunk of `max_prompt_size` prompts. Each engine call
//! is ordered on libtorch's current CUDA stream through events ([`enqueue_ordered`]): no device-wide or host
//! synchronisation.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use super::cache::{
    chunk_ranges, precision_name, select_engine, EnginePaths, EngineProfile, MinOptMax, Part,
    Platform, RunKey, Sidecar,
};
use super::cuda::CudaDevice;
use super::library::{Context, DataType, IoTensor, Runtime, TrtLibrary};
use crate::engines::onnx::{FloatType, ModelEntry, OnnxManifest};
use crate::engines::{EngineContext, EngineError, Method, WindowEngine};

/// The ONNX model an engine of a part is built from (and keyed by).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnnxSource {
    /// The file, inside the export directory.
    pub path: PathBuf,
    /// Its manifest entry (size and sha256: the engine key holds the sha256).
    pub entry: ModelEntry,
    /// The model itself is float16 (weights and compute): its types decide the engine's precision, no FP16
    /// builder flag needed (what TensorRT 11's strongly typed networks require).
    pub fp16_model: bool,
}

/// The model of `part` that the TensorRT `method`'s engine is built from, in the export `manifest` of
/// `onnx_dir`: for [`Method::TrtFp16`] the float16 export when the manifest lists one (an older export without
/// it: the float32 model with TensorRT 10's FP16 flag), else the float32 model.
pub fn onnx_source(
    manifest: &OnnxManifest,
    onnx_dir: &Path,
    part: Part,
    method: Method,
) -> Result<OnnxSource, EngineError> {
    if !method.is_tensorrt() {
        return Err(EngineError::Unavailable(format!(
            "{method} is not a TensorRT method (trt_fp16 or trt_tf32)"
        )));
    }
    let fp16 = (method == Method::TrtFp16)
        .then(|| manifest.model(part, FloatType::F16))
        .flatten();
    let (entry, fp16_model) = match fp16 {
        Some(entry) => (entry, true),
        None => (
            manifest.model(part, FloatType::F32).ok_or_else(|| {
                EngineError::Corrupt(format!(
                    "the ONNX export in {} lists no {} model",
                    onnx_dir.display(),
                    part.name()
                ))
            })?,
            false,
        ),
    };
    Ok(OnnxSource {
        path: onnx_dir.join(&entry.file),
        entry: entry.clone(),
        fp16_model,
    })
}

/// The libtorch kind of a TensorRT data type.
fn kind_of(dtype: DataType) -> Result<Kind, String> {
    Ok(match dtype {
        DataType::Float => Kind::Float,
        DataType::Half => Kind::Half,
        DataType::Int32 => Kind::Int,
        DataType::Int64 => Kind::Int64,
        DataType::Unsupported(_) => return Err(format!("unsupported {dtype}")),
    })
}

/// Checks an engine's inputs and outputs against what `part` must have and the profile its sidecar records;
/// returns the libtorch kinds of the inputs (in [`Part::input_names`] order) and of the output. A mismatch
/// means the plan is not what its sidecar describes: [`EngineError::Corrupt`].
pub fn check_io(
    part: Part,
    io: &[IoTensor],
    profile_dims: &dyn Fn(&str) -> Result<MinOptMax, String>,
    profile: &EngineProfile,
    embed_dim: i64,
) -> Result<(Vec<Kind>, Kind), EngineError> {
    let corrupt = |m: String| EngineError::Corrupt(format!("the {} engine {m}", part.name()));
    let mut kinds = Vec::new();
    let expected = profile.input_dims(part, embed_dim);
    for (name, dims) in &expected {
        let t = io
            .iter()
            .find(|t| t.name == *name && t.is_input)
            .ok_or_else(|| {
                corrupt(format!(
                    "has no input '{name}' (it has {:?})",
                    io.iter().map(|t| &t.name).collect::<Vec<_>>()
                ))
            })?;
        let actual = profile_dims(name).map_err(&corrupt)?;
        if actual != *dims {
            return Err(corrupt(format!(
                "profile for '{name}' is {actual:?}, its sidecar says {dims:?}"
            )));
        }
        kinds.push(kind_of(t.dtype).map_err(|e| corrupt(format!("input '{name}': {e}")))?);
    }
    let inputs = io.iter().filter(|t| t.is_input).count();
    if inputs != expected.len() {
        return Err(corrupt(format!(
            "has {inputs} inputs, expected {}",
            expected.len()
        )));
    }
    let out_name = part.output_name();
    let out = io
        .iter()
        .find(|t| t.name == out_name && !t.is_input)
        .ok_or_else(|| corrupt(format!("has no output '{out_name}'")))?;
    let out_kind = kind_of(out.dtype).map_err(|e| corrupt(format!("output '{out_name}': {e}")))?;
    if !matches!(out_kind, Kind::Float | Kind::Half) {
        return Err(corrupt(format!(
            "output '{out_name}' is not floating point"
        )));
    }
    Ok((kinds, out_kind))
}

/// An [`EngineError::Runtime`] unless `ok` (a bad input to an engine is a failure while running).
fn check_input(ok: bool, message: impl FnOnce() -> String) -> Result<(), EngineError> {
    if ok {
        Ok(())
    } else {
        Err(EngineError::Runtime(message()))
    }
}

/// Checks image windows `[b, 1, H, W, D]` against the engine's window.
pub fn check_image(image: &Tensor, window: [i64; 3]) -> Result<(), EngineError> {
    let s = image.size();
    check_input(
        s.len() == 5 && s[0] >= 1 && s[1] == 1 && s[2..] == window,
        || {
            format!(
                "TensorRT encoder: expected image windows [b, 1, {}, {}, {}], got {s:?}",
                window[0], window[1], window[2]
            )
        },
    )
}

/// Checks features `[b, E, H, W, D]` and class ids `[B, 1]`.
pub fn check_class_inputs(
    features: &Tensor,
    class_ids: &Tensor,
    embed_dim: i64,
    window: [i64; 3],
) -> Result<(), EngineError> {
    let f = features.size();
    check_input(
        f.len() == 5 && f[0] >= 1 && f[1] == embed_dim && f[2..] == window,
        || {
            format!(
                "TensorRT class head: expected features [b, {embed_dim}, {}, {}, {}], got {f:?}",
                window[0], window[1], window[2]
            )
        },
    )?;
    let c = class_ids.size();
    check_input(c.len() == 2 && c[0] >= 1 && c[1] == 1, || {
        format!("TensorRT class head: expected class ids [B, 1], got {c:?}")
    })?;
    check_input(!class_ids.is_floating_point(), || {
        format!(
            "TensorRT class head: class ids must be integers, got {:?}",
            class_ids.kind()
        )
    })
}

/// Runs `run` on windows `0..b` of `image` in chunks of at most `max_windows` and concatenates the results
/// along dim 0.
pub fn encode_chunked(
    image: &Tensor,
    max_windows: usize,
    mut run: impl FnMut(&Tensor) -> Result<Tensor, EngineError>,
) -> Result<Tensor, EngineError> {
    let b = image.size().first().copied().unwrap_or(0).max(0) as usize;
    let mut outs = Vec::new();
    for r in chunk_ranges(b, max_windows) {
        let chunk = image.f_narrow(0, r.start as i64, r.len() as i64)?;
        let out = run(&chunk)?;
        check_input(out.size().first() == Some(&(r.len() as i64)), || {
            format!(
                "the encoder returned {:?} for {} windows",
                out.size(),
                r.len()
            )
        })?;
        outs.push(out);
    }
    check_input(!outs.is_empty(), || "no image windows to encode".into())?;
    Ok(Tensor::f_cat(&outs, 0)?)
}

/// Runs `run(features, class_ids)` on chunks of at most `max_windows` windows and `max_prompts` prompts, and
/// assembles the logits `[B, b, ...]`: prompt chunks concatenated along dim 0, window chunks along dim 1.
pub fn classify_chunked(
    features: &Tensor,
    class_ids: &Tensor,
    max_windows: usize,
    max_prompts: usize,
    mut run: impl FnMut(&Tensor, &Tensor) -> Result<Tensor, EngineError>,
) -> Result<Tensor, EngineError> {
    let b = features.size().first().copied().unwrap_or(0).max(0) as usize;
    let prompts = class_ids.size().first().copied().unwrap_or(0).max(0) as usize;
    let mut per_window = Vec::new();
    for w in chunk_ranges(b, max_windows) {
        let f = features.f_narrow(0, w.start as i64, w.len() as i64)?;
        let mut per_prompt = Vec::new();
        for p in chunk_ranges(prompts, max_prompts) {
            let ids = class_ids.f_narrow(0, p.start as i64, p.len() as i64)?;
            let out = run(&f, &ids)?;
            check_input(
                out.size().get(..2) == Some(&[p.len() as i64, w.len() as i64][..]),
                || {
                    format!(
                        "the class head returned {:?} for {} prompts x {} windows",
                        out.size(),
                        p.len(),
                        w.len()
                    )
                },
            )?;
            per_prompt.push(out);
        }
        check_input(!per_prompt.is_empty(), || "no class prompts".into())?;
        per_window.push(Tensor::f_cat(&per_prompt, 0)?);
    }
    check_input(!per_window.is_empty(), || "no feature windows".into())?;
    Ok(Tensor::f_cat(&per_window, 1)?)
}

/// One part's engine as [`TrtEngine`] calls it: a deserialized TensorRT engine with its execution context
/// (`PartEngine`), or a stand-in in tests (the seam through which the chunking and the split are tested without
/// a GPU).
pub trait PartRun: Send {
    /// Runs the part on `inputs` ([`Part::input_names`] order, on the model's device); returns its f32 output.
    fn run(&mut self, inputs: &[&Tensor]) -> Result<Tensor, EngineError>;
    /// The most windows one call takes (the engine profile's window batch).
    fn max_windows(&self) -> usize;
}

/// How an engine's work is ordered with libtorch's without waiting on the host: the engine's stream waits for
/// what libtorch queued on its current stream (the inputs), and libtorch's stream waits for the engine's work (the
/// outputs), through events. No device-wide or host synchronisation.
pub trait StreamOrder {
    /// The stream the engine is enqueued on.
    fn engine_stream(&self) -> *mut std::ffi::c_void;
    /// Makes the engine's stream wait for everything queued so far on `torch_stream`.
    fn engine_waits_for(&self, torch_stream: *mut std::ffi::c_void) -> anyhow::Result<()>;
    /// Makes `torch_stream` wait for everything queued so far on the engine's stream.
    fn torch_waits_for_engine(&self, torch_stream: *mut std::ffi::c_void) -> anyhow::Result<()>;
}

impl StreamOrder for CudaDevice {
    fn engine_stream(&self) -> *mut std::ffi::c_void {
        self.raw_stream()
    }
    fn engine_waits_for(&self, torch_stream: *mut std::ffi::c_void) -> anyhow::Result<()> {
        self.stream_waits_for(torch_stream)
    }
    fn torch_waits_for_engine(&self, torch_stream: *mut std::ffi::c_void) -> anyhow::Result<()> {
        self.torch_stream_waits(torch_stream)
    }
}

/// Enqueues `enqueue` on the engine stream of `order`, after the work libtorch queued on `torch_stream` and
/// before any work libtorch queues there later: the outputs may be used by libtorch at once, without a wait.
pub fn enqueue_ordered(
    order: &dyn StreamOrder,
    torch_stream: *mut std::ffi::c_void,
    enqueue: impl FnOnce(*mut std::ffi::c_void) -> anyhow::Result<()>,
) -> Result<(), EngineError> {
    order
        .engine_waits_for(torch_stream)
        .map_err(EngineError::runtime)?;
    enqueue(order.engine_stream()).map_err(EngineError::runtime)?;
    order
        .torch_waits_for_engine(torch_stream)
        .map_err(EngineError::runtime)
}

/// One deserialized engine with its execution context.
struct PartEngine {
    part: Part,
    // Dropped before anything else of the part (it keeps its engine, which keeps the runtime, alive).
    context: Context,
    input_kinds: Vec<Kind>,
    output_kind: Kind,
    sidecar: Sidecar,
    device: Arc<CudaDevice>,
}

impl PartEngine {
    /// Reads, verifies (size and sha256 against the sidecar) and deserializes a plan, and checks its I/O: a
    /// plan that cannot be read, does not match its sidecar or that TensorRT refuses is corrupt; an execution
    /// context that cannot be created (out of GPU memory) is a runtime error.
    fn load(
        runtime: &Arc<Runtime>,
        device: &Arc<CudaDevice>,
        part: Part,
        paths: &EnginePaths,
        sidecar: Sidecar,
    ) -> Result<Self, EngineError> {
        let plan_name = paths.plan.display();
        let plan = std::fs::read(&paths.plan)
            .map_err(|e| EngineError::Corrupt(format!("cannot read {plan_name}: {e}")))?;
        sidecar.verify_plan(&plan).map_err(EngineError::corrupt)?;
        let engine = Arc::new(
            runtime
                .deserialize(&plan)
                .map_err(|e| EngineError::Corrupt(format!("cannot load {plan_name}: {e}")))?,
        );
        let io = engine
            .io_tensors()
            .map_err(|e| EngineError::Corrupt(format!("{plan_name}: {e}")))?;
        let (input_kinds, output_kind) = check_io(
            part,
            &io,
            &|name| engine.profile_dims(name).map_err(|e| e.to_string()),
            &sidecar.key.profile,
            sidecar.key.embed_dim,
        )
        .map_err(|e| e.context(&plan_name))?;
        let context = engine
            .context()
            .map_err(|e| EngineError::Runtime(format!("{plan_name}: {e}")))?;
        Ok(Self {
            part,
            context,
            input_kinds,
            output_kind,
            sidecar,
            device: Arc::clone(device),
        })
    }
}

impl PartRun for PartEngine {
    /// Stages the inputs on the engine's GPU (libtorch's current stream), then runs the engine on its own stream
    /// ordered after them, with libtorch's stream ordered after it ([`enqueue_ordered`]): no host waits.
    fn run(&mut self, inputs: &[&Tensor]) -> Result<Tensor, EngineError> {
        let device = &self.device;
        device.bind().map_err(EngineError::runtime)?;
        let cuda = Device::Cuda(device.ordinal());
        let torch_stream =
            crate::runtime::current_cuda_stream(device.ordinal()).map_err(EngineError::runtime)?;
        let names = self.part.input_names();
        let mut staged = Vec::with_capacity(inputs.len());
        for ((name, t), kind) in names.iter().zip(inputs).zip(&self.input_kinds) {
            let t = t.f_to_device(cuda)?.f_to_kind(*kind)?.f_contiguous()?;
            self.context
                .set_input_shape(name, &t.size())
                .map_err(EngineError::runtime)?;
            staged.push(t);
        }
        let out_name = self.part.output_name();
        let shape = self
            .context
            .tensor_shape(out_name)
            .map_err(EngineError::runtime)?;
        let out = Tensor::f_empty(shape.as_slice(), (self.output_kind, cuda))?;
        // SAFETY: every address is a contiguous CUDA tensor of the engine's device with the shape and type the
        // context expects (set above). The inputs and the output were allocated on libtorch's current stream,
        // and that stream waits for the engine's work before anything queued on it later runs, so memory that
        // libtorch's caching allocator reuses after `staged` is dropped is only written once TensorRT is done.
        unsafe {
            for (name, t) in names.iter().zip(&staged) {
                self.context
                    .set_tensor_address(name, t.data_ptr())
                    .map_err(EngineError::runtime)?;
            }
            self.context
                .set_tensor_address(out_name, out.data_ptr())
                .map_err(EngineError::runtime)?;
            let context = &mut self.context;
            enqueue_ordered(device.as_ref(), torch_stream, |stream| {
                context.enqueue(stream).map_err(anyhow::Error::from)
            })?;
        }
        drop(staged);
        Ok(if self.output_kind == Kind::Float {
            out
        } else {
            out.f_to_kind(Kind::Float)?
        })
    }

    fn max_windows(&self) -> usize {
        self.sidecar.key.profile.window_batch.max.max(1) as usize
    }
}

/// The class path of a window on TensorRT: an encoder engine (encoder, automatic decoder and the class head's
/// `image_post_mapping`, once per window) and a class-head engine (the prompt-dependent rest) of one TensorRT
/// method (see [`crate::engines::split`]).
///
/// Windows beyond the engines' window batch and prompts beyond the class head's prompt batch (the request's
/// `max_prompt_size`) run in chunks; results are concatenated. Only the cheap prompt-dependent part runs per
/// prompt chunk. Every failure is an error (the caller falls back to libtorch).
pub struct TrtEngine {
    method: Method,
    window: [i64; 3],
    embed_dim: i64,
    max_prompts: usize,
    encoder: Box<dyn PartRun>,
    class_head: Box<dyn PartRun>,
    description: String,
}

impl std::fmt::Debug for TrtEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.description)
    }
}

impl TrtEngine {
    /// Loads the engines of the TensorRT `method` for the request described by `ctx`, from their sidecars alone
    /// (no ONNX export is read): engines in `ctx.engines_dir` built from the loaded weights (their fingerprint),
    /// for this TensorRT, this GPU, `ctx.patch_size` windows and `ctx.max_prompt_size` prompts per class-head
    /// call, by this graph layout (key schema). Checks run from the cheapest and most basic (library, GPU) to
    /// the engines themselves; the error kind says what is wrong (see the module documentation) and the caller
    /// falls back to libtorch.
    pub fn load(ctx: &EngineContext, method: Method) -> Result<Self, EngineError> {
        if !method.is_tensorrt() {
            return Err(EngineError::Unavailable(format!(
                "{method} is not a TensorRT method (trt_fp16 or trt_tf32)"
            )));
        }
        let Device::Cuda(gpu) = ctx.device else {
            return Err(EngineError::Unavailable(
                "TensorRT needs a CUDA device; this request runs on the CPU".into(),
            ));
        };
        let library = TrtLibrary::load()?;
        let device = Arc::new(CudaDevice::open(gpu).map_err(EngineError::unavailable)?);
        let platform = Platform {
            tensorrt_version: library.version().to_string(),
            compute_capability: device.compute_capability(),
        };
        let window = ctx.patch_size.map(|v| v as i64);
        let mut selected = Vec::new();
        for part in Part::ALL {
            let want = RunKey::new(
                part,
                method,
                &platform,
                &ctx.weights_fingerprint,
                window,
                ctx.max_prompt_size as i64,
            )?;
            selected.push(select_engine(&ctx.engines_dir, &want)?);
        }
        let embed_dims: Vec<i64> = selected.iter().map(|(_, s)| s.key.embed_dim).collect();
        if embed_dims.windows(2).any(|w| w[0] != w[1]) {
            return Err(EngineError::Corrupt(format!(
                "the encoder and class-head engines in {} disagree on embed_dim ({embed_dims:?}) although they \
                 name the same weights",
                ctx.engines_dir.display()
            )));
        }
        let embed_dim = embed_dims[0];
        let runtime = Arc::new(
            library
                .runtime()
                .map_err(|e| EngineError::Unavailable(format!("TensorRT unavailable: {e}")))?,
        );
        let plans: Vec<PathBuf> = selected.iter().map(|(p, _)| p.plan.clone()).collect();
        let mut parts: Vec<Box<dyn PartRun>> = Vec::new();
        for (part, (paths, sidecar)) in Part::ALL.into_iter().zip(selected) {
            parts.push(Box::new(PartEngine::load(
                &runtime, &device, part, &paths, sidecar,
            )?));
        }
        let (Some(class_head), Some(encoder)) = (parts.pop(), parts.pop()) else {
            return Err(EngineError::Runtime("an engine part was not loaded".into()));
        };
        let max_prompts = ctx.max_prompt_size.max(1);
        let description = format!(
            "TensorRT {} {} on {} (GPU {}, sm {}): encoder {}, class head {} (up to {} prompts, {} windows per call)",
            platform.tensorrt_version,
            precision_name(method),
            device.name(),
            device.ordinal(),
            device.compute_capability(),
            plans[0].display(),
            plans[1].display(),
            max_prompts,
            encoder.max_windows()
        );
        let engine = Self::from_parts(
            method,
            window,
            embed_dim,
            max_prompts,
            encoder,
            class_head,
            description,
        );
        log::info!("{}", engine.describe());
        Ok(engine)
    }

    /// An engine from its two parts: `encoder` computes mapped features from image windows, `class_head` logits
    /// from mapped features and at most `max_prompts` class ids per call (see [`crate::engines::split`]).
    /// [`TrtEngine::load`] makes them from TensorRT plans; tests from stand-ins.
    pub fn from_parts(
        method: Method,
        window: [i64; 3],
        embed_dim: i64,
        max_prompts: usize,
        encoder: Box<dyn PartRun>,
        class_head: Box<dyn PartRun>,
        description: String,
    ) -> Self {
        Self {
            method,
            window,
            embed_dim,
            max_prompts: max_prompts.max(1),
            encoder,
            class_head,
            description,
        }
    }

    /// The most prompts one class-head call takes (more run in chunks): the request's `max_prompt_size`, which
    /// selected the class-head engine.
    pub fn max_prompts(&self) -> usize {
        self.max_prompts
    }

    /// One line for logs and records.
    pub fn describe(&self) -> String {
        self.description.clone()
    }
}

impl WindowEngine for TrtEngine {
    fn method(&self) -> Method {
        self.method
    }

    fn encode(&mut self, image: &Tensor) -> Result<Tensor, EngineError> {
        check_image(image, self.window)?;
        let max_windows = self.encoder.max_windows();
        let encoder = &mut self.encoder;
        let out = encode_chunked(image, max_windows, |chunk| encoder.run(&[chunk]))?;
        Ok(out.f_to_device(image.device())?)
    }

    fn classify(&mut self, features: &Tensor, class_ids: &Tensor) -> Result<Tensor, EngineError> {
        check_class_inputs(features, class_ids, self.embed_dim, self.window)?;
        let (max_windows, max_prompts) = (self.class_head.max_windows(), self.max_prompts);
        let head = &mut self.class_head;
        let out = classify_chunked(features, class_ids, max_windows, max_prompts, |f, ids| {
            head.run(&[f, ids])
        })?;
        Ok(out.f_to_device(features.device())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engines::runner::WindowRunner;
    use crate::engines::{split, EngineChoice, EngineErrorKind};
    use crate::inference::WindowNetwork;
    use crate::model::{ForwardArgs, Vista3d};
    use crate::Vista3dConfig;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tch::nn;

    /// A stand-in class head: logits[p, w] = class_id[p] * (w-th window's mean feature) + p-independent bias.
    fn fake_head(f: &Tensor, ids: &Tensor) -> Result<Tensor, EngineError> {
        let b = f.size()[0];
        let spatial = &f.size()[2..];
        let mean = f.mean_dim(&[1i64][..], true, Kind::Float); // [b,1,H,W,D]
        let ids = ids.to_kind(Kind::Float).view([-1, 1, 1, 1, 1]); // [B,1,1,1,1]
        let logits = ids * mean.view([1, b, spatial[0], spatial[1], spatial[2]]);
        Ok(logits)
    }

    #[test]
    fn classify_in_chunks_equals_one_call() {
        let features = Tensor::randn([3, 4, 2, 3, 2], (Kind::Float, Device::Cpu));
        let ids = Tensor::from_slice(&[1i64, 5, 7, 2, 9, 11, 3]).view([7, 1]);
        let whole = fake_head(&features, &ids).unwrap();
        for (mw, mp) in [(1, 1), (2, 3), (3, 7), (1, 4), (5, 10)] {
            let mut calls = 0;
            let chunked = classify_chunked(&features, &ids, mw, mp, |f, i| {
                calls += 1;
                assert!(f.size()[0] as usize <= mw && i.size()[0] as usize <= mp);
                fake_head(f, i)
            })
            .unwrap();
            assert_eq!(chunked.size(), vec![7, 3, 2, 3, 2]);
            assert!(chunked.allclose(&whole, 0.0, 0.0, false), "{mw} {mp}");
            assert_eq!(calls, 3usize.div_ceil(mw) * 7usize.div_ceil(mp));
        }
    }

    #[test]
    fn encode_in_chunks_equals_one_call() {
        let image = Tensor::randn([5, 1, 2, 2, 2], (Kind::Float, Device::Cpu));
        let run = |x: &Tensor| Ok(x.repeat([1, 3, 1, 1, 1]) * 2.0);
        let whole = run(&image).unwrap();
        for max in [1, 2, 5, 8] {
            let out = encode_chunked(&image, max, run).unwrap();
            assert!(out.allclose(&whole, 0.0, 0.0, false), "{max}");
        }
    }

    #[test]
    fn a_failing_engine_is_an_error_not_a_panic() {
        let features = Tensor::zeros([2, 4, 2, 2, 2], (Kind::Float, Device::Cpu));
        let ids = Tensor::from_slice(&[1i64, 2, 3]).view([3, 1]);
        let mut calls = 0;
        let err = classify_chunked(&features, &ids, 1, 2, |f, i| {
            calls += 1;
            if calls == 2 {
                return Err(EngineError::Runtime("enqueueV3 failed: simulated".into()));
            }
            fake_head(f, i)
        })
        .unwrap_err();
        assert!(err.to_string().contains("simulated"));
        assert_eq!(err.kind(), EngineErrorKind::Runtime);
        // An engine returning the wrong shape is caught too.
        let err =
            classify_chunked(&features, &ids, 2, 3, |f, _| Ok(f.shallow_clone())).unwrap_err();
        assert!(err.to_string().contains("returned"), "{err}");
        let image = Tensor::zeros([2, 1, 2, 2, 2], (Kind::Float, Device::Cpu));
        let err = encode_chunked(&image, 1, |_| {
            Err(EngineError::Runtime("out of GPU memory".into()))
        })
        .unwrap_err();
        assert!(err.to_string().contains("out of GPU memory"));
        let err = encode_chunked(&image, 2, |x| Ok(x.narrow(0, 0, 1))).unwrap_err();
        assert!(err.to_string().contains("returned"), "{err}");
        assert_eq!(err.kind(), EngineErrorKind::Runtime);
    }

    #[test]
    fn input_shapes_are_checked() {
        let w = [4, 4, 2];
        assert!(check_image(
            &Tensor::zeros([2, 1, 4, 4, 2], (Kind::Float, Device::Cpu)),
            w
        )
        .is_ok());
        let err = check_image(
            &Tensor::zeros([2, 1, 4, 4, 4], (Kind::Float, Device::Cpu)),
            w,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("[b, 1, 4, 4, 2]"), "{err}");
        assert!(check_image(
            &Tensor::zeros([1, 2, 4, 4, 2], (Kind::Float, Device::Cpu)),
            w
        )
        .is_err());
        let f = Tensor::zeros([2, 8, 4, 4, 2], (Kind::Float, Device::Cpu));
        let ids = Tensor::zeros([3, 1], (Kind::Int64, Device::Cpu));
        assert!(check_class_inputs(&f, &ids, 8, w).is_ok());
        assert!(check_class_inputs(&f, &ids, 16, w).is_err());
        assert!(check_class_inputs(&f, &ids.view([3]), 8, w).is_err());
        assert!(check_class_inputs(&f, &ids.to_kind(Kind::Float), 8, w).is_err());
    }

    #[test]
    fn engine_io_is_checked_against_the_sidecar_profile() {
        let profile = EngineProfile::new(Part::ClassHead, [4, 4, 2], 1, 4).unwrap();
        let dims = profile.input_dims(Part::ClassHead, 8);
        let good = |name: &str| -> Result<[Vec<i64>; 3], String> {
            Ok(dims.iter().find(|(n, _)| *n == name).unwrap().1.clone())
        };
        let io = vec![
            IoTensor {
                name: "features".into(),
                is_input: true,
                dtype: DataType::Float,
                dims: vec![-1, 8, 4, 4, 2],
            },
            IoTensor {
                name: "class_ids".into(),
                is_input: true,
                dtype: DataType::Int64,
                dims: vec![-1, 1],
            },
            IoTensor {
                name: "logits".into(),
                is_input: false,
                dtype: DataType::Float,
                dims: vec![-1, -1, 4, 4, 2],
            },
        ];
        let (kinds, out) = check_io(Part::ClassHead, &io, &good, &profile, 8).unwrap();
        assert_eq!(kinds, vec![Kind::Float, Kind::Int64]);
        assert_eq!(out, Kind::Float);
        // A profile that differs from the sidecar's.
        let other = |name: &str| -> Result<[Vec<i64>; 3], String> {
            let mut d = good(name)?;
            d[2][0] += 1;
            Ok(d)
        };
        let err = check_io(Part::ClassHead, &io, &other, &profile, 8).unwrap_err();
        assert_eq!(err.kind(), EngineErrorKind::Corrupt);
        let err = err.to_string();
        assert!(err.contains("sidecar says"), "{err}");
        // Missing input, wrong output.
        let err = check_io(Part::ClassHead, &io[1..], &good, &profile, 8)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no input 'features'"), "{err}");
        let mut bad = io.clone();
        bad[2].name = "out".into();
        let err = check_io(Part::ClassHead, &bad, &good, &profile, 8)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no output 'logits'"), "{err}");
    }

    fn context(dir: &Path, device: Device) -> EngineContext {
        EngineContext {
            onnx_dir: dir.join("onnx"),
            engines_dir: dir.join("engines"),
            weights_fingerprint: "0123456789abcdef".into(),
            device,
            patch_size: [128, 128, 128],
            max_prompt_size: 4,
            sw_batch_size: 1,
        }
    }

    #[test]
    fn load_without_tensorrt_or_a_gpu_is_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        // A CPU request never looks further.
        let err = TrtEngine::load(&context(dir.path(), Device::Cpu), Method::TrtFp16).unwrap_err();
        assert_eq!(err.kind(), EngineErrorKind::Unavailable);
        assert!(err.to_string().contains("CUDA device"), "{err}");
        // No TensorRT on this machine (or no shim in this build): unavailable, before any export is read.
        if TrtLibrary::load().is_err() {
            let err = TrtEngine::load(&context(dir.path(), Device::Cuda(0)), Method::TrtTf32)
                .unwrap_err();
            assert_eq!(err.kind(), EngineErrorKind::Unavailable);
            assert!(err.to_string().contains("TensorRT unavailable"), "{err}");
        }
        // Not a TensorRT method.
        let err = TrtEngine::load(&context(dir.path(), Device::Cuda(0)), Method::Amp).unwrap_err();
        assert_eq!(err.kind(), EngineErrorKind::Unavailable);
    }

    fn manifest(with_fp16: bool) -> OnnxManifest {
        OnnxManifest::example(with_fp16)
    }

    #[test]
    fn engines_are_keyed_by_the_manifest_entry_they_are_built_from() {
        let dir = Path::new("/e");
        let m = manifest(true);
        for part in Part::ALL {
            let fp16 = onnx_source(&m, dir, part, Method::TrtFp16).unwrap();
            assert!(fp16.fp16_model);
            assert_eq!(fp16.path, dir.join(format!("{}_fp16.onnx", part.name())));
            assert_eq!(Some(&fp16.entry), m.model(part, FloatType::F16));
            let tf32 = onnx_source(&m, dir, part, Method::TrtTf32).unwrap();
            assert!(!tf32.fp16_model);
            assert_eq!(tf32.path, dir.join(format!("{}.onnx", part.name())));
        }
        // An older export without float16 files: FP16 engines from the float32 models (TensorRT 10's flag).
        let old = manifest(false);
        let fp16 = onnx_source(&old, dir, Part::Encoder, Method::TrtFp16).unwrap();
        assert!(!fp16.fp16_model);
        assert_eq!(fp16.entry, old.encoder);
        assert!(onnx_source(&old, dir, Part::Encoder, Method::Ort).is_err());
        // The run key of a request needs no export: the weights fingerprint and, for the class head,
        // max_prompt_size.
        let platform = Platform {
            tensorrt_version: "10.13.0".into(),
            compute_capability: "9.0".into(),
        };
        let key = RunKey::new(
            Part::ClassHead,
            Method::TrtFp16,
            &platform,
            &m.weights_fingerprint,
            [64, 64, 64],
            6,
        )
        .unwrap();
        assert_eq!(key.max_prompt_size, Some(6));
        assert_eq!(key.weights_fingerprint, m.weights_fingerprint);
        let err = RunKey::new(
            Part::ClassHead,
            Method::TrtFp16,
            &platform,
            &m.weights_fingerprint,
            [64; 3],
            0,
        )
        .unwrap_err();
        assert!(err.to_string().contains("max_prompt_size"), "{err}");
    }

    /// A network of width 8 with the weights of seed 3 (the same weights at every call).
    fn seeded_net() -> (nn::VarStore, Vista3d) {
        tch::manual_seed(3);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = Vista3d::new(&vs.root(), Vista3dConfig::with_width(8)).unwrap();
        (vs, net)
    }

    /// A second network with the weights of `reference` (copied: the global RNG is shared with tests running
    /// in parallel, so seeding again would not reproduce them).
    fn copy_of(reference: &nn::VarStore) -> (nn::VarStore, Vista3d) {
        let mut vs = nn::VarStore::new(Device::Cpu);
        let net = Vista3d::new(&vs.root(), Vista3dConfig::with_width(8)).unwrap();
        vs.copy(reference).unwrap();
        (vs, net)
    }

    /// Counts of what the stand-in parts computed.
    #[derive(Default)]
    struct Counts {
        /// Windows that went through `image_post_mapping` (only the encoder part computes it).
        post_mapped_windows: AtomicUsize,
        encoder_calls: AtomicUsize,
        class_head_calls: AtomicUsize,
    }

    /// A stand-in for a TensorRT part: the libtorch split ([`crate::engines::split`]) on its own copy of the
    /// weights, within the profile limits a real engine has.
    struct FakePart {
        part: Part,
        net: Vista3d,
        _vs: nn::VarStore,
        max_windows: usize,
        max_prompts: usize,
        counts: Arc<Counts>,
    }

    impl PartRun for FakePart {
        fn run(&mut self, inputs: &[&Tensor]) -> Result<Tensor, EngineError> {
            assert_eq!(inputs.len(), self.part.input_names().len());
            let windows = inputs[0].size()[0] as usize;
            assert!(windows <= self.max_windows, "{windows} windows");
            tch::no_grad(|| match self.part {
                Part::Encoder => {
                    self.counts.encoder_calls.fetch_add(1, Ordering::SeqCst);
                    self.counts
                        .post_mapped_windows
                        .fetch_add(windows, Ordering::SeqCst);
                    split::encode(&self.net, inputs[0])
                }
                Part::ClassHead => {
                    self.counts.class_head_calls.fetch_add(1, Ordering::SeqCst);
                    assert!(inputs[1].size()[0] as usize <= self.max_prompts);
                    Ok(split::classify(&self.net, inputs[0], inputs[1]))
                }
            })
        }
        fn max_windows(&self) -> usize {
            self.max_windows
        }
    }

    fn fake_engine(
        weights: &nn::VarStore,
        max_windows: usize,
        max_prompts: usize,
        counts: &Arc<Counts>,
    ) -> TrtEngine {
        let part = |part| {
            let (vs, net) = copy_of(weights);
            Box::new(FakePart {
                part,
                net,
                _vs: vs,
                max_windows,
                max_prompts,
                counts: Arc::clone(counts),
            }) as Box<dyn PartRun>
        };
        let embed_dim = copy_of(weights).1.config.embed_dim;
        TrtEngine::from_parts(
            Method::TrtFp16,
            [32; 3],
            embed_dim,
            max_prompts,
            part(Part::Encoder),
            part(Part::ClassHead),
            "fake TensorRT engine".into(),
        )
    }

    #[test]
    fn image_post_mapping_runs_once_per_window_whatever_the_prompt_count() {
        let (vs, net) = seeded_net();
        let windows = Tensor::randn([2, 1, 32, 32, 32], (Kind::Float, Device::Cpu));
        let everything = crate::prompts::everything_labels();
        for (prompts, max_windows) in [(vec![3i64], 1), (vec![1, 3, 4, 6], 2), (everything, 1)] {
            let ids = Tensor::from_slice(&prompts).view([-1, 1]);
            let args = ForwardArgs {
                class_vector: Some(&ids),
                transpose: true,
                ..Default::default()
            };
            let reference = tch::no_grad(|| net.forward(&windows, &args)).unwrap();
            let counts = Arc::new(Counts::default());
            let engine = fake_engine(&vs, max_windows, 4, &counts);
            // Through the engine seam the sliding window uses (the runner), as a request would.
            let runner = WindowRunner::new(
                &net,
                Device::Cpu,
                Method::TrtFp16,
                EngineChoice {
                    engine: Some(Box::new(engine)),
                    torch: Method::Fp32,
                    fallbacks: Vec::new(),
                    winograd: false,
                },
            );
            let out = tch::no_grad(|| runner.forward_window(&windows, &args)).unwrap();
            assert_eq!(runner.report().used, vec![Method::TrtFp16]);
            // The split computes the network's class path (post mapping not repeated per prompt chunk)...
            assert_eq!(out.size(), reference.size());
            // (the same up to rounding: the stand-in runs one window per call where the network runs both at once)
            let err = crate::numerics::relative_error(&out, &reference);
            assert!(
                err < 1e-5,
                "{} prompts: relative error {err:e}",
                prompts.len()
            );
            // ... with image_post_mapping computed once per window, however many prompt chunks there are.
            let chunks = prompts.len().div_ceil(4);
            assert_eq!(counts.post_mapped_windows.load(Ordering::SeqCst), 2);
            assert_eq!(counts.encoder_calls.load(Ordering::SeqCst), 2 / max_windows);
            assert_eq!(
                counts.class_head_calls.load(Ordering::SeqCst),
                chunks * (2 / max_windows)
            );
        }
    }
}
