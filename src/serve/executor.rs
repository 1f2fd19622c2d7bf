//! The device executor: one thread owns the [`Segmenter`] (weights, engines, libtorch's process-wide TF32 and
//! autocast switches) and runs every network call of the server; request threads run the rest of the request
//! path and send it their windows through a [`RemoteBackend`].
//!
//! Dynamic batching: windows of concurrent requests with the same method, class prompts and window shape
//! (class-only windows; windows with points or a previous mask always run alone) are gathered into one network
//! call of up to `serve_max_batch_windows` windows. Once a window waits, the executor waits up to
//! `serve_batch_wait_ms` for companions, and stops waiting as soon as every request that is inside its
//! sliding window has a window waiting. The output is split and each caller gets its part with the method
//! report of the call (what ran, fallbacks), which its request merges into its own record. Only the owner thread
//! switches methods, between calls, never while another request's call runs.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use tch::{Device, Tensor};

use super::metrics::Metrics;
use crate::engines::runner::MethodReport;
use crate::engines::Method;
use crate::inference::WindowNetwork;
use crate::model::{ForwardArgs, Window};
use crate::segmenter::{guard, Computed, SegmentError, Segmenter, WindowBackend};

/// How the executor gathers windows.
#[derive(Debug, Clone, Copy)]
pub struct BatchSettings {
    /// Most windows in one network call (1: every window runs alone).
    pub max_windows: usize,
    /// How long a waiting window waits for companions.
    pub wait: Duration,
}

/// `ForwardArgs` that own their tensors (shallow copies), so a window call can cross threads.
struct OwnedArgs {
    point_coords: Option<Tensor>,
    point_labels: Option<Tensor>,
    class_vector: Option<Tensor>,
    prompt_class: Option<Tensor>,
    patch_coords: Option<Window>,
    prev_mask: Option<Tensor>,
    radius: Option<i64>,
    transpose: bool,
}

impl OwnedArgs {
    fn new(a: &ForwardArgs<'_>) -> Self {
        let own = |t: Option<&Tensor>| t.map(Tensor::shallow_clone);
        Self {
            point_coords: own(a.point_coords),
            point_labels: own(a.point_labels),
            class_vector: own(a.class_vector),
            prompt_class: own(a.prompt_class),
            patch_coords: a.patch_coords.clone(),
            prev_mask: own(a.prev_mask),
            radius: a.radius,
            transpose: a.transpose,
        }
    }

    fn borrow(&self) -> ForwardArgs<'_> {
        ForwardArgs {
            point_coords: self.point_coords.as_ref(),
            point_labels: self.point_labels.as_ref(),
            class_vector: self.class_vector.as_ref(),
            prompt_class: self.prompt_class.as_ref(),
            patch_coords: self.patch_coords.clone(),
            prev_mask: self.prev_mask.as_ref(),
            radius: self.radius,
            transpose: self.transpose,
        }
    }
}

/// What windows must share to run in one call.
#[derive(Debug, Clone, PartialEq, Eq)]
struct BatchKey {
    method: Method,
    classes: Vec<i64>,
    prompt_class: Option<Vec<i64>>,
    /// Input size without the batch dimension.
    shape: Vec<i64>,
    transpose: bool,
}

fn ids(t: &Tensor) -> Option<Vec<i64>> {
    Vec::<i64>::try_from(t.to_device(Device::Cpu).flatten(0, -1)).ok()
}

/// The key of a class-only window (`None`: the window runs alone).
fn batch_key(method: Method, input: &Tensor, a: &ForwardArgs<'_>) -> Option<BatchKey> {
    if a.point_coords.is_some()
        || a.point_labels.is_some()
        || a.prev_mask.is_some()
        || a.radius.is_some()
    {
        return None;
    }
    let classes = ids(a.class_vector?)?;
    let prompt_class = match a.prompt_class {
        Some(t) => Some(ids(t)?),
        None => None,
    };
    Some(BatchKey {
        method,
        classes,
        prompt_class,
        shape: input.size()[1..].to_vec(),
        transpose: a.transpose,
    })
}

/// What a window call gets back.
pub struct WindowReply {
    output: Tensor,
    report: MethodReport,
    /// Windows in the network call this window ran in.
    batch: usize,
}

/// One window call (one or more windows of one request).
struct WindowCall {
    request: u64,
    method: Method,
    input: Tensor,
    args: OwnedArgs,
    key: Option<BatchKey>,
    reply: SyncSender<Result<WindowReply, SegmentError>>,
}

struct Pending {
    call: WindowCall,
    arrived: Instant,
}

/// What the executor found at start-up (after loading the weights and running a warm-up window).
pub struct Startup {
    /// What runs for each method here, and why a method steps down.
    pub methods: Vec<(Method, crate::segmenter::MethodStatus)>,
    /// The warm-up window's report.
    pub warm_up: MethodReport,
    /// `encoder_embed_dim` of the weights.
    pub width: i64,
    /// Facts for records.
    pub facts: crate::segmenter::record::ModelFacts,
}

/// A handle request threads send windows through (cheap to clone).
#[derive(Clone)]
pub struct ExecutorHandle {
    tx: Sender<WindowCall>,
    /// Requests inside their sliding window (the executor stops waiting for companions when all have a window
    /// waiting).
    active: Arc<AtomicUsize>,
    device: Device,
}

/// Starts the executor thread: `load` builds the segmenter on that thread, which warms it up and reports
/// through the returned receiver before it serves windows.
pub fn spawn(
    load: impl FnOnce() -> anyhow::Result<Segmenter> + Send + 'static,
    device: Device,
    settings: BatchSettings,
    metrics: Arc<Metrics>,
) -> anyhow::Result<(
    ExecutorHandle,
    Receiver<anyhow::Result<Startup>>,
    std::thread::JoinHandle<()>,
)> {
    let (tx, rx) = mpsc::channel::<WindowCall>();
    let (started_tx, started_rx) = mpsc::channel();
    let active = Arc::new(AtomicUsize::new(0));
    let handle = ExecutorHandle {
        tx,
        active: active.clone(),
        device,
    };
    let thread = std::thread::Builder::new()
        .name("vista3d-device".into())
        .spawn(move || {
            let segmenter = match load().and_then(|s| start(&s).map(|info| (s, info))) {
                Ok((s, info)) => {
                    let _ = started_tx.send(Ok(info));
                    s
                }
                Err(e) => {
                    let _ = started_tx.send(Err(e));
                    return;
                }
            };
            Executor {
                segmenter,
                rx,
                active,
                settings,
                metrics,
                cuda: None,
            }
            .run();
        })?;
    Ok((handle, started_rx, thread))
}

/// Opens the engines of every method (so readiness means "engines loaded") and runs the warm-up window.
fn start(s: &Segmenter) -> anyhow::Result<Startup> {
    let mut methods = Vec::new();
    for m in std::iter::once(Method::Auto).chain(Method::ALL) {
        methods.push((m, s.method_status(m)));
    }
    let warm_up = s
        .warm_up(None)
        .map_err(|e| anyhow!("the warm-up window failed: {e}"))?;
    log::info!(
        "warm-up window ran {}",
        crate::engines::runner::used_names(&warm_up)
    );
    Ok(Startup {
        methods,
        warm_up,
        width: s.model().width(),
        facts: crate::segmenter::record::ModelFacts::of(s),
    })
}

struct Executor {
    segmenter: Segmenter,
    rx: Receiver<WindowCall>,
    active: Arc<AtomicUsize>,
    settings: BatchSettings,
    metrics: Arc<Metrics>,
    cuda: Option<Arc<cudarc::driver::CudaContext>>,
}

fn windows_of(call: &WindowCall) -> usize {
    call.input.size().first().copied().unwrap_or(1).max(1) as usize
}

impl Executor {
    /// Serves window calls until every handle is dropped.
    fn run(mut self) {
        let mut pending: VecDeque<Pending> = VecDeque::new();
        loop {
            if pending.is_empty() {
                match self.rx.recv() {
                    Ok(call) => pending.push_back(Pending {
                        call,
                        arrived: Instant::now(),
                    }),
                    Err(_) => break,
                }
            }
            while let Ok(call) = self.rx.try_recv() {
                pending.push_back(Pending {
                    call,
                    arrived: Instant::now(),
                });
            }
            let batch = self.take_batch(&mut pending);
            self.run_batch(batch);
        }
        log::debug!("device executor stopped");
    }

    /// The oldest waiting call and the calls that can share its network call.
    fn take_batch(&self, pending: &mut VecDeque<Pending>) -> Vec<WindowCall> {
        let max = self.settings.max_windows.max(1);
        let Some(key) = pending[0].call.key.clone().filter(|_| max > 1) else {
            return pending.pop_front().map(|p| p.call).into_iter().collect();
        };
        let deadline = pending[0].arrived + self.settings.wait;
        loop {
            let windows: usize = pending
                .iter()
                .filter(|p| p.call.key.as_ref() == Some(&key))
                .map(|p| windows_of(&p.call))
                .sum();
            let mut waiting: Vec<u64> = pending.iter().map(|p| p.call.request).collect();
            waiting.sort_unstable();
            waiting.dedup();
            let now = Instant::now();
            if windows >= max
                || waiting.len() >= self.active.load(Ordering::SeqCst)
                || now >= deadline
            {
                break;
            }
            match self.rx.recv_timeout(deadline - now) {
                Ok(call) => pending.push_back(Pending {
                    call,
                    arrived: Instant::now(),
                }),
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        let mut taken = Vec::new();
        let mut total = 0;
        let mut i = 0;
        while i < pending.len() {
            let call = &pending[i].call;
            if call.key.as_ref() == Some(&key) {
                let n = windows_of(call);
                if taken.is_empty() || total + n <= max {
                    total += n;
                    if let Some(p) = pending.remove(i) {
                        taken.push(p.call);
                    }
                    continue;
                }
            }
            i += 1;
        }
        taken
    }

    /// Runs one network call for `calls` and answers each caller.
    fn run_batch(&mut self, calls: Vec<WindowCall>) {
        let Some(first) = calls.first() else { return };
        let method = first.method;
        let sizes: Vec<i64> = calls.iter().map(|c| windows_of(c) as i64).collect();
        let total: i64 = sizes.iter().sum();
        let transpose = first.args.transpose;
        let input = if calls.len() == 1 {
            first.input.shallow_clone()
        } else {
            let inputs: Vec<Tensor> = calls.iter().map(|c| c.input.shallow_clone()).collect();
            Tensor::cat(&inputs, 0)
        };
        let args = first.args.borrow();
        let s = &self.segmenter;
        let result = s.forget_engines_on_panic(guard("network call", || {
            s.with_runner(method, |runner| {
                tch::no_grad(|| runner.forward_window(&input, &args)).map_err(SegmentError::Failed)
            })
        }));
        self.metrics.network_call(total as usize);
        self.device_memory();
        match result {
            Ok((out, report)) => {
                let parts = if calls.len() == 1 {
                    vec![out]
                } else {
                    out.split_with_sizes(sizes.as_slice(), if transpose { 0 } else { 1 })
                };
                for (call, output) in calls.into_iter().zip(parts) {
                    let _ = call.reply.send(Ok(WindowReply {
                        output,
                        report: report.clone(),
                        batch: total as usize,
                    }));
                }
            }
            Err(e) => {
                for call in calls {
                    let _ = call.reply.send(Err(copy_error(&e)));
                }
            }
        }
    }

    /// Updates the device-memory gauges (CUDA only).
    fn device_memory(&mut self) {
        let Device::Cuda(ordinal) = self.segmenter.model().device else {
            return;
        };
        if self.cuda.is_none() {
            self.cuda = cudarc::driver::CudaContext::new(ordinal).ok();
        }
        if let Some(Ok((free, total))) = self.cuda.as_ref().map(|c| c.mem_get_info()) {
            self.metrics
                .device_memory
                .with_label_values(&["free"])
                .set(free as i64);
            self.metrics
                .device_memory
                .with_label_values(&["total"])
                .set(total as i64);
        }
    }
}

/// The same error for another caller of a shared network call.
fn copy_error(e: &SegmentError) -> SegmentError {
    match e {
        SegmentError::InvalidRequest(m) => SegmentError::InvalidRequest(m.clone()),
        SegmentError::FallbackDenied(m) => SegmentError::FallbackDenied(m.clone()),
        SegmentError::Panic { name, message } => SegmentError::Panic {
            name: name.clone(),
            message: message.clone(),
        },
        SegmentError::Failed(a) => SegmentError::Failed(anyhow!("{a:#}")),
    }
}

/// Adds what a network call ran to a request's report (methods in order of first use, fallbacks once each).
fn merge(into: &mut MethodReport, from: &MethodReport) {
    for m in &from.used {
        if !into.used.contains(m) {
            into.used.push(*m);
        }
    }
    for f in &from.fallbacks {
        if !into.fallbacks.contains(f) {
            into.fallbacks.push(f.clone());
        }
    }
    into.winograd |= from.winograd;
}

/// The windows of one request, sent to the executor (a [`WindowBackend`] for [`crate::segmenter::RequestPath`]).
pub struct RemoteBackend<'a> {
    exec: &'a ExecutorHandle,
    request: u64,
    cancelled: &'a AtomicBool,
    /// Windows of this request that ran in a network call shared with other requests.
    shared_windows: Cell<usize>,
    /// Windows of this request.
    windows: Cell<usize>,
}

impl<'a> RemoteBackend<'a> {
    /// The backend of request `request`; its windows stop (with an error) once `cancelled` is set.
    pub fn new(exec: &'a ExecutorHandle, request: u64, cancelled: &'a AtomicBool) -> Self {
        Self {
            exec,
            request,
            cancelled,
            shared_windows: Cell::new(0),
            windows: Cell::new(0),
        }
    }

    /// (windows of this request, of which ran in a network call shared with other requests).
    pub fn window_counts(&self) -> (usize, usize) {
        (self.windows.get(), self.shared_windows.get())
    }
}

/// Counts a request as inside its sliding window while alive.
struct Active<'a>(&'a AtomicUsize);

impl<'a> Active<'a> {
    fn new(c: &'a AtomicUsize) -> Self {
        c.fetch_add(1, Ordering::SeqCst);
        Self(c)
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

struct RemoteNetwork<'a, 'b> {
    backend: &'b RemoteBackend<'a>,
    method: Method,
    report: RefCell<MethodReport>,
    /// The typed error of a failed call (the request path only sees it as an `anyhow` error).
    error: RefCell<Option<SegmentError>>,
}

impl WindowNetwork for RemoteNetwork<'_, '_> {
    fn forward_window(&self, input: &Tensor, args: &ForwardArgs) -> anyhow::Result<Tensor> {
        let b = self.backend;
        if b.cancelled.load(Ordering::SeqCst) {
            anyhow::bail!("request cancelled");
        }
        let (reply, answer) = mpsc::sync_channel(1);
        let call = WindowCall {
            request: b.request,
            method: self.method,
            input: input.shallow_clone(),
            key: batch_key(self.method, input, args),
            args: OwnedArgs::new(args),
            reply,
        };
        let n = windows_of(&call);
        b.exec
            .tx
            .send(call)
            .map_err(|_| anyhow!("the device executor has stopped"))?;
        match answer.recv() {
            Ok(Ok(r)) => {
                merge(&mut self.report.borrow_mut(), &r.report);
                b.windows.set(b.windows.get() + n);
                if r.batch > n {
                    b.shared_windows.set(b.shared_windows.get() + n);
                }
                Ok(r.output)
            }
            Ok(Err(e)) => {
                let message = e.to_string();
                *self.error.borrow_mut() = Some(e);
                Err(anyhow!(message))
            }
            Err(_) => Err(anyhow!("the device executor has stopped")),
        }
    }
}

impl WindowBackend for RemoteBackend<'_> {
    fn input_device(&self) -> Device {
        self.exec.device
    }

    fn run_windows(
        &self,
        method: Method,
        f: &mut dyn FnMut(&dyn WindowNetwork) -> Result<Computed, SegmentError>,
    ) -> Result<(Computed, MethodReport), SegmentError> {
        let _active = Active::new(&self.exec.active);
        let net = RemoteNetwork {
            backend: self,
            method,
            report: RefCell::new(MethodReport {
                requested: Some(method),
                ..Default::default()
            }),
            error: RefCell::new(None),
        };
        let out = f(&net);
        let typed = net.error.take();
        let report = net.report.into_inner();
        match out {
            Ok(c) => Ok((c, report)),
            Err(e) => Err(typed.unwrap_or(e)),
        }
    }
}
