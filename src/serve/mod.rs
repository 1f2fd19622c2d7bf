//! `vista3d serve`: an HTTP inference server with NVIDIA's VISTA-3D NIM API, one resident model per device
//! shared by all requests.
//!
//! Data flow: HTTP handlers (axum on tokio, [`http`]) admit a request into a bounded capacity (request threads +
//! queue; full: 503 with `Retry-After`), receive its image (a path or URL the operator allows, or an upload
//! streamed to the spool directory, [`source`]) and queue it for a request thread ([`jobs`]). Request threads run
//! the shared request path ([`crate::segmenter::RequestPath`]: prompts, checks, preprocessing, sliding window,
//! inversion) with their windows sent to the device executor ([`executor`]), the one thread that owns the
//! [`crate::segmenter::Segmenter`] and gathers windows of concurrent requests into batched network calls. The
//! label map and the CLI's JSON record are written to the request's spool folder and streamed back (a zip, or
//! the bare `.nii.gz`).
//!
//! Limits: the queue holds requests, not bytes (bodies go to disk); a memory budget (default: 80% of the cgroup
//! limit, else of the machine's memory, [`limits`]) bounds what running requests reserve; a request timeout;
//! a client that goes away frees its place. SIGTERM/SIGINT: readiness turns 503, no new requests, in-flight
//! ones finish, then the process exits 0. Readiness comes only after the weights are loaded, every method's
//! engine is opened and a warm-up window ran.

pub mod api;
pub mod error;
pub mod executor;
pub mod http;
pub mod jobs;
pub mod limits;
pub mod metrics;
pub mod source;
pub mod viewer;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::config::InferenceConfig;
use crate::prompts::LabelTable;
use crate::segmenter::{Pipeline, RequestPath, Segmenter, WeightsSource};
pub use error::ServeError;

/// How the server runs (the command line of `vista3d serve`).
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Address to listen on (`127.0.0.1:0` picks a free port; the bound address is printed).
    pub listen: SocketAddr,
    /// Request threads (requests computed at once).
    pub workers: usize,
    /// Requests that may wait for a request thread; beyond that: 503.
    pub queue: usize,
    /// Whole-request limit, from admission to the response.
    pub timeout: Duration,
    /// Largest upload or download (bytes).
    pub max_upload: u64,
    /// Bytes running requests may reserve (default: [`limits::default_budget_bytes`]).
    pub memory_budget: Option<u64>,
    /// Where uploads and results are spooled (default: the system's temporary folder).
    pub spool_dir: Option<PathBuf>,
    /// A file holding the bearer token.
    pub token_file: Option<PathBuf>,
    /// `/metrics` without the token.
    pub metrics_public: bool,
    /// Folders images may be read from by path.
    pub allow_dirs: Vec<PathBuf>,
    /// URL prefixes images may be fetched from.
    pub allow_url_prefixes: Vec<String>,
}

/// Everything checked before any weights are loaded (what `--check` prints).
pub struct Prepared {
    pub options: ServeOptions,
    pub config: InferenceConfig,
    pub weights: WeightsSource,
    pub policy: source::SourcePolicy,
    pub token: Option<[u8; 32]>,
    pub budget: u64,
}

/// Checks the options and reads the token (no weights loaded).
pub fn prepare(
    options: ServeOptions,
    config: InferenceConfig,
    weights: WeightsSource,
) -> Result<Prepared> {
    if options.workers == 0 {
        bail!("--workers must be at least 1");
    }
    if options.timeout.is_zero() {
        bail!("--timeout must be positive");
    }
    if options.max_upload == 0 {
        bail!("--max-upload-mb must be positive");
    }
    let policy = source::SourcePolicy::new(&options.allow_dirs, &options.allow_url_prefixes)?;
    let token = match &options.token_file {
        Some(f) => {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("cannot read --token-file {}", f.display()))?;
            let t = text.trim();
            if t.is_empty() {
                bail!("--token-file {} is empty", f.display());
            }
            if t.chars().any(char::is_whitespace) {
                bail!(
                    "--token-file {} must hold one token without spaces",
                    f.display()
                );
            }
            Some(http::token_digest(t))
        }
        None => None,
    };
    if let WeightsSource::Checkpoint(p) = &weights {
        if !p.is_file() {
            bail!("checkpoint {} not found", p.display());
        }
    }
    crate::runtime::parse_device(&config.device)?;
    let budget = options
        .memory_budget
        .unwrap_or_else(limits::default_budget_bytes);
    Ok(Prepared {
        options,
        config,
        weights,
        policy,
        token,
        budget,
    })
}

impl Prepared {
    /// The settings as `--check` prints them.
    pub fn describe(&self) -> Value {
        let o = &self.options;
        json!({
            "listen": o.listen.to_string(),
            "workers": o.workers,
            "queue": o.queue,
            "timeout_s": o.timeout.as_secs_f64(),
            "max_upload_bytes": o.max_upload,
            "memory_budget_bytes": self.budget,
            "memory_limit_bytes": limits::memory_limit_bytes(),
            "spool_dir": o.spool_dir.as_ref().map(|p| p.display().to_string()),
            "token": self.token.is_some(),
            "metrics_public": o.metrics_public,
            "allow_dirs": o.allow_dirs,
            "allow_url_prefixes": o.allow_url_prefixes,
            "device": self.config.device,
            "precision": self.config.precision,
            "serve_max_batch_windows": self.config.serve_max_batch_windows,
            "serve_batch_wait_ms": self.config.serve_batch_wait_ms,
        })
    }
}

/// Runs the server until SIGTERM/SIGINT; prints `listening on http://ADDR` once bound.
pub fn run(prepared: Prepared) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("vista3d-http")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(prepared))
}

async fn serve(prepared: Prepared) -> Result<()> {
    let Prepared {
        options,
        config,
        weights,
        policy,
        token,
        budget,
    } = prepared;
    // TLS for image URLs (rustls with ring); installing twice is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let policy = Arc::new(policy);
    let metrics = Arc::new(metrics::Metrics::new());
    let spool_root = options.spool_dir.clone().unwrap_or_else(std::env::temp_dir);
    let spool = spool_root.join(format!(
        "vista3d-serve-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
    ));
    std::fs::create_dir_all(&spool)
        .with_context(|| format!("cannot create the spool folder {}", spool.display()))?;
    let _spool_cleanup = RemoveOnDrop(spool.clone());

    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(10))
        .timeout(options.timeout)
        .build()
        .context("cannot build the HTTP client for image URLs")?;
    let capacity = options.workers + options.queue;
    let (jobs_tx, jobs_rx) = std::sync::mpsc::channel::<jobs::Job>();
    let state = Arc::new(http::AppState {
        config: config.clone(),
        table: LabelTable::bundle(),
        ready: AtomicBool::new(false),
        draining: AtomicBool::new(false),
        token,
        metrics_public: options.metrics_public,
        policy: policy.clone(),
        spool: spool.clone(),
        admission: Arc::new(tokio::sync::Semaphore::new(capacity)),
        capacity,
        jobs: Mutex::new(Some(jobs_tx)),
        metrics: metrics.clone(),
        info: RwLock::new(Value::Null),
        timeout: options.timeout,
        max_upload: options.max_upload,
        client,
        next_id: AtomicU64::new(1),
        mean_seconds: Mutex::new(0.0),
    });

    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .with_context(|| format!("cannot listen on {}", options.listen))?;
    let bound = listener.local_addr()?;
    {
        // Scripts and tests read the bound address from this line (`--listen 127.0.0.1:0`).
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "vista3d serve: listening on http://{bound}");
        let _ = out.flush();
    }
    if options.listen.ip().is_unspecified() && state.token.is_none() {
        log::warn!(
            "listening on all interfaces without --token-file: anyone who reaches port {} can use the server",
            bound.port()
        );
    }

    // The device executor loads the weights and warms up while the server already answers health checks.
    let device = crate::runtime::parse_device(&config.device)?;
    let batch = executor::BatchSettings {
        max_windows: config.serve_max_batch_windows,
        wait: Duration::from_millis(config.serve_batch_wait_ms),
    };
    let load_config = config.clone();
    let (exec, started, exec_thread) = executor::spawn(
        move || Segmenter::load(load_config, &weights, Pipeline::Bundle),
        device,
        batch,
        metrics.clone(),
    )?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let startup_failed = Arc::new(Mutex::new(None::<anyhow::Error>));
    let worker_threads = Arc::new(Mutex::new(Vec::new()));
    {
        let state = state.clone();
        let stop_tx = stop_tx.clone();
        let startup_failed = startup_failed.clone();
        let worker_threads = worker_threads.clone();
        let jobs_rx = Arc::new(Mutex::new(jobs_rx));
        let config = config.clone();
        let options = options.clone();
        let budget_total = budget;
        tokio::spawn(async move {
            let started = tokio::task::spawn_blocking(move || started.recv()).await;
            let startup = match started {
                Ok(Ok(Ok(s))) => s,
                Ok(Ok(Err(e))) => {
                    *startup_failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    let _ = stop_tx.send(true);
                    return;
                }
                _ => {
                    *startup_failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(
                        anyhow::anyhow!("the device executor stopped while starting"),
                    );
                    let _ = stop_tx.send(true);
                    return;
                }
            };
            let info = info_json(&config, &options, &startup, budget_total);
            let worker = Arc::new(jobs::Worker {
                path: Arc::new(RequestPath::new(config.clone(), Pipeline::Bundle)),
                exec,
                policy,
                budget: Arc::new(limits::MemoryBudget::new(budget_total)),
                metrics: state.metrics.clone(),
                facts: startup.facts.clone(),
            });
            match jobs::spawn_workers(options.workers, worker, jobs_rx) {
                Ok(handles) => {
                    *worker_threads.lock().unwrap_or_else(|p| p.into_inner()) = handles;
                }
                Err(e) => {
                    *startup_failed.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(anyhow::anyhow!("cannot start the request threads: {e}"));
                    let _ = stop_tx.send(true);
                    return;
                }
            }
            *state.info.write().unwrap_or_else(|p| p.into_inner()) = info;
            state.ready.store(true, Ordering::SeqCst);
            log::info!("ready: weights loaded, engines opened, warm-up window ran");
        });
    }

    let shutdown = {
        let state = state.clone();
        let mut stop_rx = stop_rx.clone();
        async move {
            tokio::select! {
                _ = termination() => {}
                _ = stop_rx.changed() => {}
            }
            state.draining.store(true, Ordering::SeqCst);
            state.ready.store(false, Ordering::SeqCst);
            log::info!("shutting down: no new requests; finishing the ones in flight");
        }
    };
    axum::serve(listener, http::router(state.clone()))
        .with_graceful_shutdown(shutdown)
        .await
        .context("the HTTP server failed")?;

    // In-flight requests are answered: stop the request threads, then the device executor.
    drop(state.jobs.lock().unwrap_or_else(|p| p.into_inner()).take());
    let handles = std::mem::take(&mut *worker_threads.lock().unwrap_or_else(|p| p.into_inner()));
    for h in handles {
        let _ = tokio::task::spawn_blocking(move || h.join()).await;
    }
    let _ = tokio::task::spawn_blocking(move || exec_thread.join()).await;
    if let Some(e) = startup_failed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
    {
        return Err(e.context("the server could not start"));
    }
    log::info!("stopped");
    Ok(())
}

/// Waits for SIGTERM or SIGINT.
async fn termination() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                log::warn!("cannot listen for SIGTERM ({e}); stopping on SIGINT only");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// Removes a folder when dropped (the spool of this process).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `/v1/vista3d/info`: version, model, device, methods, the class table and the limits.
fn info_json(
    config: &InferenceConfig,
    options: &ServeOptions,
    startup: &executor::Startup,
    budget: u64,
) -> Value {
    let table = LabelTable::bundle();
    let labels: serde_json::Map<String, Value> = (0..=crate::prompts::LAST_SUPPORTED)
        .filter_map(|id| table.name(id).map(|n| (id.to_string(), json!(n))))
        .collect();
    let methods: serde_json::Map<String, Value> = startup
        .methods
        .iter()
        .map(|(m, s)| {
            (
                m.name().to_string(),
                json!({"runs_as": s.runs_as, "available": s.notes.is_empty(), "notes": s.notes}),
            )
        })
        .collect();
    json!({
        "name": "vista3d",
        "version": env!("CARGO_PKG_VERSION"),
        "api": "VISTA-3D NIM compatible (POST /v1/vista3d/inference)",
        "model": {
            "name": "VISTA3D (vista3d132)",
            "width": startup.width,
            "weights": startup.facts.weights,
        },
        "device": startup.facts.device,
        "precision": {
            "default": config.precision,
            "fallback": config.precision_fallback,
            "warm_up_ran": startup.warm_up.used,
            "methods": methods,
        },
        "labels": labels,
        "everything_labels": config.everything_labels,
        "subclass": config.subclass,
        "zero_shot_ids": format!("{}..254 (with points)", crate::prompts::LAST_SUPPORTED + 1),
        "formats": ["zip", "nifti"],
        "display": viewer::display_json(),
        "limits": {
            "workers": options.workers,
            "queue": options.queue,
            "timeout_s": options.timeout.as_secs_f64(),
            "max_upload_bytes": options.max_upload,
            "memory_budget_bytes": budget,
            "serve_max_batch_windows": config.serve_max_batch_windows,
            "serve_batch_wait_ms": config.serve_batch_wait_ms,
        },
    })
}
