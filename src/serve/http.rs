//! Routes (the VISTA-3D NIM's, plus `/metrics`), the bearer-token check, and the inference handler: admission
//! (a full server answers 503 with `Retry-After` before reading the body), receiving the image (JSON with a
//! path or URL, `application/octet-stream`, or multipart with a `request` JSON part and an `image` part, streamed
//! to the spool), queueing for a request thread, the request timeout, and streaming the result back.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;

use super::api::{InferenceBody, Query};
use super::error::ServeError;
use super::jobs::{ImageInput, Job, RequestDir, Slot};
use super::metrics::Metrics;
use super::source::{
    download, stem_of, stream_to_file, too_large, ImageRef, SourcePolicy, DRAIN_BYTES,
};
use super::viewer;
use crate::config::InferenceConfig;
use crate::prompts::LabelTable;

/// The most bytes of a JSON request body (images come as uploads, not inside JSON).
const JSON_LIMIT: usize = 1 << 20;

/// What the handlers share.
pub struct AppState {
    pub config: InferenceConfig,
    pub table: LabelTable,
    /// Weights loaded, engines opened, warm-up window run.
    pub ready: AtomicBool,
    /// SIGTERM/SIGINT received: finishing in-flight requests, admitting none.
    pub draining: AtomicBool,
    /// SHA-256 of the bearer token (`--token-file`).
    pub token: Option<[u8; 32]>,
    pub metrics_public: bool,
    pub policy: Arc<SourcePolicy>,
    /// The spool directory of this process.
    pub spool: std::path::PathBuf,
    /// Request threads + queue places.
    pub admission: Arc<Semaphore>,
    pub capacity: usize,
    pub jobs: Mutex<Option<std::sync::mpsc::Sender<Job>>>,
    pub metrics: Arc<Metrics>,
    /// `/v1/vista3d/info` (set when ready).
    pub info: RwLock<Value>,
    pub timeout: Duration,
    pub max_upload: u64,
    pub client: reqwest::Client,
    pub next_id: AtomicU64,
    /// Mean seconds of recent successful requests (for `Retry-After`).
    pub mean_seconds: Mutex<f64>,
}

/// SHA-256 of a token (compared in constant time; hashing first also hides the token's length).
pub fn token_digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The router of the server.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(viewer::index))
        .route("/index.html", get(viewer::index))
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .route("/v1/vista3d/images", get(viewer::images))
        .route("/v1/vista3d/image", get(viewer::image))
        .route("/v1/health/live", get(live))
        .route("/v1/health/ready", get(ready))
        .route("/v1/vista3d/info", get(info))
        .route("/v1/license", get(license))
        .route("/metrics", get(metrics))
        .route(
            "/v1/vista3d/inference",
            post(inference).layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth))
        .with_state(state)
}

/// Everything but the viewer page, `/v1/health/*` (and `/metrics` with `--metrics-public`) needs
/// `Authorization: Bearer` (the page asks for the token and sends it with its API calls).
async fn auth(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let Some(expected) = &state.token else {
        return next.run(req).await;
    };
    let path = req.uri().path();
    if path.starts_with("/v1/health/")
        || matches!(path, "/" | "/index.html" | "/favicon.ico")
        || (path == "/metrics" && state.metrics_public)
    {
        return next.run(req).await;
    }
    let valid: Option<bool> = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .map(|t| bool::from(token_digest(t).ct_eq(expected)));
    match valid {
        Some(true) => next.run(req).await,
        Some(false) => ServeError::Unauthorized("invalid bearer token".into()).into_response(),
        None => ServeError::Unauthorized(
            "this server needs a token: send Authorization: Bearer <token>".into(),
        )
        .into_response(),
    }
}

async fn live() -> Json<Value> {
    Json(json!({"status": "live"}))
}

async fn ready(State(state): State<Arc<AppState>>) -> Response {
    if state.draining.load(Ordering::SeqCst) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "draining"})),
        )
            .into_response()
    } else if state.ready.load(Ordering::SeqCst) {
        Json(json!({"status": "ready"})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not ready"})),
        )
            .into_response()
    }
}

async fn info(State(state): State<Arc<AppState>>) -> Response {
    let info = state.info.read().unwrap_or_else(|e| e.into_inner()).clone();
    if info.is_null() {
        return not_ready(&state).into_response();
    }
    Json(info).into_response()
}

async fn license() -> &'static str {
    "vista3d (this server) is licensed under the Apache License 2.0.\n\
     The VISTA3D weights it serves are NVIDIA's and come under their own licence (see the MONAI bundle's \
     LICENSE); seeded random demo weights carry no licence of their own.\n"
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        state.metrics.render(),
    )
        .into_response()
}

async fn not_found(req: Request) -> ServeError {
    ServeError::NotFound(format!(
        "no route {} {}: see / (the viewer page), /v1/vista3d/info, /v1/vista3d/inference, /v1/vista3d/images, \
         /v1/vista3d/image, /v1/health/live, /v1/health/ready, /metrics",
        req.method(),
        req.uri().path()
    ))
}

fn not_ready(state: &AppState) -> ServeError {
    if state.draining.load(Ordering::SeqCst) {
        ServeError::Unavailable {
            message: "the server is shutting down".into(),
            retry_after: 5,
        }
    } else {
        ServeError::Unavailable {
            message:
                "the server is not ready yet (loading weights, opening engines, warm-up window)"
                    .into(),
            retry_after: 5,
        }
    }
}

/// Counts a request's outcome once: by status when answered, as `cancelled` when the client went away first.
struct Outcome {
    metrics: Arc<Metrics>,
    started: Instant,
    answered: bool,
}

impl Drop for Outcome {
    fn drop(&mut self) {
        if !self.answered {
            self.metrics
                .requests
                .with_label_values(&["cancelled"])
                .inc();
        }
    }
}

/// Cancels the request's slot unless it finished (client gone, timeout, or an error before it ran).
struct SlotGuard {
    slot: Arc<Slot>,
    metrics: Arc<Metrics>,
    queued: bool,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        if self.slot.cancel() && self.queued {
            self.metrics.queue_depth.dec();
        }
    }
}

async fn inference(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let mut outcome = Outcome {
        metrics: state.metrics.clone(),
        started: Instant::now(),
        answered: false,
    };
    let response = match handle(&state, req, outcome.started).await {
        Ok(r) => r,
        Err(e) => {
            if e.status().is_server_error() && !matches!(e, ServeError::Unavailable { .. }) {
                log::error!("inference request: {e}");
            } else {
                log::info!("inference request refused ({}): {e}", e.status());
            }
            e.into_response()
        }
    };
    outcome.answered = true;
    let seconds = outcome.started.elapsed().as_secs_f64();
    state
        .metrics
        .requests
        .with_label_values(&[response.status().as_str()])
        .inc();
    state.metrics.request_seconds.observe(seconds);
    if response.status().is_success() {
        let mut mean = state.mean_seconds.lock().unwrap_or_else(|e| e.into_inner());
        *mean = if *mean == 0.0 {
            seconds
        } else {
            0.8 * *mean + 0.2 * seconds
        };
    }
    response
}

async fn handle(
    state: &Arc<AppState>,
    req: Request,
    started: Instant,
) -> Result<Response, ServeError> {
    let params: Vec<(String, String)> = req
        .uri()
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    let query = Query::parse(&params)?;
    if state.draining.load(Ordering::SeqCst) || !state.ready.load(Ordering::SeqCst) {
        return Err(not_ready(state));
    }
    let permit = state.admission.clone().try_acquire_owned().map_err(|_| {
        let mean = *state.mean_seconds.lock().unwrap_or_else(|e| e.into_inner());
        ServeError::Unavailable {
            message: format!(
                "the server is full ({} requests running or queued): try again later",
                state.capacity
            ),
            retry_after: (mean.ceil() as u64).clamp(1, 60),
        }
    })?;
    let id = state.next_id.fetch_add(1, Ordering::SeqCst);
    let slot = Arc::new(Slot::new(permit));
    let mut guard = SlotGuard {
        slot: slot.clone(),
        metrics: state.metrics.clone(),
        queued: false,
    };
    let dir_path = state.spool.join(format!("request-{id}"));
    std::fs::create_dir_all(&dir_path)
        .map_err(|e| ServeError::Internal(format!("cannot create {}: {e}", dir_path.display())))?;
    let dir = Arc::new(RequestDir { path: dir_path });
    let deadline = tokio::time::Instant::from_std(started + state.timeout);
    let timeout_error = |what: &str| {
        ServeError::Timeout(format!(
            "{what} took longer than the server's request timeout of {} s",
            state.timeout.as_secs_f64()
        ))
    };

    // Receive the request (and its image, when it comes in the body or from a URL).
    let received = tokio::time::timeout_at(deadline, receive(state, req, &query, &dir.path))
        .await
        .map_err(|_| timeout_error("receiving the request"))??;
    state
        .metrics
        .stage_seconds
        .with_label_values(&["receive"])
        .observe(started.elapsed().as_secs_f64());
    let parsed = received.body.request(&state.table)?;
    crate::segmenter::resolve_prompts(&parsed.prompts, &state.config)
        .map_err(|e| ServeError::Unprocessable(format!("{e:#}")))?;

    // Queue it for a request thread and wait.
    let (reply, answer) = tokio::sync::oneshot::channel();
    let job = Job {
        id,
        name: received.name,
        stem: received.stem,
        input: received.input,
        request: parsed,
        format: query.format,
        preview: query.preview,
        dir: dir.clone(),
        slot: slot.clone(),
        queued: Instant::now(),
        reply,
    };
    {
        let jobs = state.jobs.lock().unwrap_or_else(|e| e.into_inner());
        let sender = jobs.as_ref().ok_or_else(|| not_ready(state))?;
        state.metrics.queue_depth.inc();
        guard.queued = true;
        if sender.send(job).is_err() {
            return Err(ServeError::Internal(
                "the request threads have stopped".into(),
            ));
        }
    }
    let out = match tokio::time::timeout_at(deadline, answer).await {
        Err(_) => return Err(timeout_error("the request")),
        Ok(Err(_)) => {
            return Err(ServeError::Internal(
                "the request thread dropped the request".into(),
            ))
        }
        Ok(Ok(result)) => result?,
    };

    // Stream the result; the spool folder goes when the request ends (the open file stays readable).
    let file = tokio::fs::File::open(&out.file)
        .await
        .map_err(|e| ServeError::Internal(format!("cannot open the result: {e}")))?;
    let len = file
        .metadata()
        .await
        .map_err(|e| ServeError::Internal(format!("cannot open the result: {e}")))?
        .len();
    drop(dir);
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(file));
    let used = crate::engines::runner::used_names(&out.method);
    let mut response = Response::new(body);
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(out.content_type),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{}\"", out.filename)) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    if let Ok(v) = HeaderValue::from_str(&used) {
        h.insert("x-vista3d-precision-used", v);
    }
    h.insert("x-vista3d-request-id", HeaderValue::from(id));
    Ok(response)
}

/// A received request: its JSON, where its image is, and how to name it.
struct Received {
    body: InferenceBody,
    input: ImageInput,
    name: String,
    stem: String,
}

async fn receive(
    state: &Arc<AppState>,
    req: Request,
    query: &Query,
    dir: &std::path::Path,
) -> Result<Received, ServeError> {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let upload_only = |what: &str| -> Result<(), ServeError> {
        if query.request.is_some() {
            return Err(ServeError::BadRequest(format!(
                "the 'request' query parameter is for application/octet-stream uploads; {what}"
            )));
        }
        Ok(())
    };
    match essence.as_str() {
        "application/json" | "" => {
            upload_only("put the request in the JSON body")?;
            if declared.is_some_and(|n| n > JSON_LIMIT as u64) {
                return Err(json_too_large());
            }
            let bytes = axum::body::to_bytes(req.into_body(), JSON_LIMIT)
                .await
                .map_err(|_| json_too_large())?;
            let body = InferenceBody::parse(&bytes)?;
            let image = body.image.clone().ok_or_else(|| {
                ServeError::Unprocessable(
                    "image is required: a path under an allowed folder, a file:// or allowed http(s) URL, or \
                     upload the image (application/octet-stream or multipart)"
                        .into(),
                )
            })?;
            match state.policy.classify(&image)? {
                ImageRef::Path(p) => Ok(Received {
                    body,
                    input: ImageInput::Path(p),
                    stem: stem_of(&image),
                    name: image,
                }),
                ImageRef::Url(url) => {
                    let path = dir.join("download");
                    let got =
                        download(&state.client, &state.policy, &url, &path, state.max_upload).await?;
                    Ok(Received {
                        body,
                        input: ImageInput::Spooled {
                            path,
                            identity: json!({"url": url.as_str(), "size": got.bytes, "sha256": got.sha256}),
                        },
                        stem: stem_of(url.path()),
                        name: url.to_string(),
                    })
                }
            }
        }
        "application/octet-stream" => {
            let body = match &query.request {
                Some(j) => InferenceBody::parse(j.as_bytes())?,
                None => InferenceBody::default(),
            };
            if body.image.is_some() {
                return Err(image_twice());
            }
            if declared.is_some_and(|n| n > state.max_upload + DRAIN_BYTES) {
                return Err(too_large("the upload", state.max_upload));
            }
            let path = dir.join("upload");
            let got = stream_to_file(
                req.into_body().into_data_stream(),
                &path,
                state.max_upload,
                "the upload",
            )
            .await?;
            Ok(Received {
                body,
                input: ImageInput::Spooled {
                    path,
                    identity: json!({"upload": true, "size": got.bytes, "sha256": got.sha256}),
                },
                name: "upload".into(),
                stem: "image".into(),
            })
        }
        "multipart/form-data" => {
            upload_only("send the request as the multipart 'request' part")?;
            if declared.is_some_and(|n| n > state.max_upload + DRAIN_BYTES) {
                return Err(too_large("the upload", state.max_upload));
            }
            let mut multipart = Multipart::from_request(req, &())
                .await
                .map_err(|e| ServeError::BadRequest(format!("bad multipart body: {}", e.body_text())))?;
            let bad_part = |e: axum::extract::multipart::MultipartError| {
                ServeError::BadRequest(format!("bad multipart body: {}", e.body_text()))
            };
            let mut body: Option<InferenceBody> = None;
            let mut upload = None;
            while let Some(field) = multipart.next_field().await.map_err(bad_part)? {
                match field.name().unwrap_or("") {
                    "request" => {
                        if body.is_some() {
                            return Err(ServeError::BadRequest(
                                "the multipart body has two 'request' parts".into(),
                            ));
                        }
                        let mut text = Vec::new();
                        let mut field = field;
                        while let Some(chunk) = field.chunk().await.map_err(bad_part)? {
                            text.extend_from_slice(&chunk);
                            if text.len() > JSON_LIMIT {
                                return Err(json_too_large());
                            }
                        }
                        body = Some(InferenceBody::parse(&text)?);
                    }
                    "image" => {
                        if upload.is_some() {
                            return Err(ServeError::BadRequest(
                                "the multipart body has two 'image' parts".into(),
                            ));
                        }
                        let filename = field.file_name().map(str::to_string);
                        let path = dir.join("upload");
                        let got =
                            stream_to_file(field, &path, state.max_upload, "the uploaded image")
                                .await?;
                        upload = Some((path, got, filename));
                    }
                    other => {
                        return Err(ServeError::BadRequest(format!(
                            "unknown multipart part '{other}': send 'request' (the JSON request) and 'image' \
                             (the NIfTI file)"
                        )))
                    }
                }
            }
            let body = body.unwrap_or_default();
            if body.image.is_some() {
                return Err(image_twice());
            }
            let (path, got, filename) = upload.ok_or_else(|| {
                ServeError::Unprocessable(
                    "the multipart body has no 'image' part (the NIfTI file)".into(),
                )
            })?;
            let shown = filename.clone().unwrap_or_else(|| "upload".into());
            Ok(Received {
                body,
                input: ImageInput::Spooled {
                    path,
                    identity: json!({"upload": true, "filename": filename, "size": got.bytes, "sha256": got.sha256}),
                },
                stem: stem_of(&shown),
                name: shown,
            })
        }
        other => Err(ServeError::UnsupportedMediaType(format!(
            "content type '{other}' is not supported: send application/json (image by path or URL), \
             application/octet-stream (the image; the request in ?request=) or multipart/form-data ('request' \
             and 'image' parts)"
        ))),
    }
}

fn json_too_large() -> ServeError {
    ServeError::TooLarge(format!(
        "the JSON request is larger than {JSON_LIMIT} bytes: send images as application/octet-stream or multipart \
         uploads, not inside JSON"
    ))
}

fn image_twice() -> ServeError {
    ServeError::Unprocessable(
        "the image is given twice (an 'image' field and an upload): send one".into(),
    )
}
