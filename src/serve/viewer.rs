//! The viewer page at `/` and the two endpoints only it needs.
//!
//! - `GET /` (and `/index.html`): one HTML file with its `<style>` and `<script>` (`viewer/index.html`, compiled
//!   into the binary: no build step, nothing fetched from elsewhere), served without the token: the page asks
//!   for it and sends it with its API calls. Its Content-Security-Policy allows exactly that style and script
//!   (by SHA-256) and connections to this server.
//! - `GET /v1/vista3d/images`: the NIfTI files (`.nii`, `.nii.gz`) under the `--allow-dir` folders, so the page
//!   can offer them. Bounded ([`MAX_LIST_DEPTH`] folders deep, [`MAX_LIST_IMAGES`] files, [`MAX_LIST_ENTRIES`]
//!   entries looked at); hidden entries and links that leave their folder are skipped.
//! - `GET /v1/vista3d/image?path=...`: the bytes of one NIfTI file, under exactly the rules an inference request
//!   by path follows ([`SourcePolicy::classify`], then [`SourcePolicy::open`]), up to `--max-upload-mb`.
//!
//! The page then talks to the same API as any client (`/v1/vista3d/info` for the class table and the display
//! colours, `POST /v1/vista3d/inference?format=nifti`). The colours, the CT window and the overlay opacity come
//! from the PNG previews' settings ([`display_json`], part of `/v1/vista3d/info`), so page and previews agree.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::error::ServeError;
use super::http::AppState;
use super::source::{too_large, ImageRef, SourcePolicy};
use crate::preview::{
    palette, PreviewOptions, HATCH_COLOR, HATCH_PERIOD, NEGATIVE_POINT, POSITIVE_POINT,
};

/// The page (HTML with one inline `<style>` and one inline `<script>`).
pub const INDEX_HTML: &str = include_str!("viewer/index.html");

/// How many folders deep below an allowed folder the image list looks.
pub const MAX_LIST_DEPTH: usize = 6;
/// The most files the image list returns (then `truncated`).
pub const MAX_LIST_IMAGES: usize = 500;
/// The most directory entries the image list looks at, over all folders (then `truncated`).
pub const MAX_LIST_ENTRIES: usize = 20_000;

/// Whether a file name is a NIfTI file the page can read.
pub fn is_nifti_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.ends_with(".nii") || lower.ends_with(".nii.gz")
}

/// `/v1/vista3d/info`'s `display`: how the PNG previews draw (CT window, overlay opacity, one colour per class
/// id 1..=254, the point markers' colours, the hatch of label 255 "not computed"), so that the page draws the
/// same way.
pub fn display_json() -> Value {
    let options = PreviewOptions::default();
    let hex = |c: [u8; 3]| format!("#{:02x}{:02x}{:02x}", c[0], c[1], c[2]);
    let colors: serde_json::Map<String, Value> = (1..=254u8)
        .map(|id| (id.to_string(), json!(hex(palette::class_color(id)))))
        .collect();
    json!({
        "window": {"width": options.window.width, "level": options.window.level},
        "overlay_alpha": options.overlay_alpha,
        "colors": colors,
        "point_colors": {"positive": hex(POSITIVE_POINT), "negative": hex(NEGATIVE_POINT)},
        "not_computed": {"color": hex(HATCH_COLOR), "hatch_period": HATCH_PERIOD},
    })
}

/// The text between `<tag>` and `</tag>` (the first such block).
fn inline_block<'a>(html: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let start = html.find(&open)? + open.len();
    let end = start + html[start..].find(&format!("</{tag}>"))?;
    Some(&html[start..end])
}

/// Standard base64 (for CSP hashes).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The page's Content-Security-Policy: its own style and script (by hash), connections to this server only.
pub fn content_security_policy() -> &'static str {
    static CSP: OnceLock<String> = OnceLock::new();
    CSP.get_or_init(|| {
        let hash = |tag: &str| {
            let text = inline_block(INDEX_HTML, tag).unwrap_or("");
            format!("'sha256-{}'", base64(&Sha256::digest(text.as_bytes())))
        };
        format!(
            "default-src 'none'; script-src {}; style-src {}; img-src 'self' data: blob:; connect-src 'self'; \
             base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            hash("script"),
            hash("style")
        )
    })
}

/// `GET /`: the page.
pub async fn index() -> Response {
    let mut response = INDEX_HTML.into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    if let Ok(v) = HeaderValue::from_str(content_security_policy()) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// One listed image.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ListedImage {
    /// The path to send back (`image` of an inference request, `path` of `/v1/vista3d/image`): the allowed
    /// folder as the operator gave it, then the path inside it.
    pub path: String,
    /// The path inside the allowed folder (what the page shows).
    pub name: String,
    /// File size in bytes.
    pub bytes: u64,
}

/// The image list.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct ImageList {
    pub images: Vec<ListedImage>,
    /// A limit was reached: there may be more files.
    pub truncated: bool,
}

/// The NIfTI files under the allowed folders (blocking; see the module documentation for the bounds).
pub fn list_images(policy: &SourcePolicy) -> ImageList {
    let mut list = ImageList::default();
    let mut entries = 0usize;
    for (given, real) in policy.dirs() {
        let mut seen = HashSet::new();
        seen.insert(real.to_path_buf());
        let several = policy.dirs().count() > 1;
        let prefix = if several {
            given
                .file_name()
                .map(|n| PathBuf::from(n.to_string_lossy().into_owned()))
        } else {
            None
        };
        walk(
            given,
            Path::new(""),
            real,
            0,
            &mut seen,
            &mut entries,
            &prefix,
            &mut list,
        );
    }
    list.images.sort_by(|a, b| a.path.cmp(&b.path));
    list
}

#[allow(clippy::too_many_arguments)]
fn walk(
    given: &Path,
    relative: &Path,
    root: &Path,
    depth: usize,
    seen: &mut HashSet<PathBuf>,
    entries: &mut usize,
    prefix: &Option<PathBuf>,
    list: &mut ImageList,
) {
    let Ok(read) = std::fs::read_dir(given.join(relative)) else {
        return;
    };
    let mut names: Vec<String> = read
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    for name in names {
        if list.truncated {
            return;
        }
        *entries += 1;
        if *entries > MAX_LIST_ENTRIES || list.images.len() >= MAX_LIST_IMAGES {
            list.truncated = true;
            return;
        }
        let rel = relative.join(&name);
        let path = given.join(&rel);
        // Links are followed only when they stay inside the allowed folder (as `SourcePolicy::open` checks).
        let Ok(real) = std::fs::canonicalize(&path) else {
            continue;
        };
        if !real.starts_with(root) {
            continue;
        }
        let Ok(meta) = std::fs::metadata(&real) else {
            continue;
        };
        if meta.is_dir() {
            if depth < MAX_LIST_DEPTH && seen.insert(real) {
                walk(given, &rel, root, depth + 1, seen, entries, prefix, list);
            }
        } else if meta.is_file() && is_nifti_name(&name) {
            let shown = match prefix {
                Some(p) => p.join(&rel),
                None => rel.clone(),
            };
            list.images.push(ListedImage {
                path: path.to_string_lossy().into_owned(),
                name: shown.to_string_lossy().into_owned(),
                bytes: meta.len(),
            });
        }
    }
}

/// `GET /v1/vista3d/images`.
pub async fn images(State(state): State<Arc<AppState>>) -> Result<Json<ImageList>, ServeError> {
    let policy = state.policy.clone();
    let list = tokio::task::spawn_blocking(move || list_images(&policy))
        .await
        .map_err(|e| ServeError::Internal(format!("listing the images failed: {e}")))?;
    Ok(Json(list))
}

/// Checks a `path` for `/v1/vista3d/image` and opens it (blocking): the inference rules, NIfTI names only, at
/// most `limit` bytes.
pub fn open_image(
    policy: &SourcePolicy,
    path: &str,
    limit: u64,
) -> Result<(std::fs::File, u64), ServeError> {
    let path = match policy.classify(path)? {
        ImageRef::Path(p) => p,
        ImageRef::Url(url) => {
            return Err(ServeError::Unprocessable(format!(
                "{url}: /v1/vista3d/image reads files under --allow-dir only"
            )))
        }
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !is_nifti_name(&name) {
        return Err(ServeError::Unprocessable(format!(
            "{}: the viewer shows NIfTI files (.nii, .nii.gz) only",
            path.display()
        )));
    }
    let opened = policy.open(&path)?;
    let file = opened.into_file();
    let meta = file
        .metadata()
        .map_err(|e| ServeError::Unprocessable(format!("cannot read {}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(ServeError::Unprocessable(format!(
            "{} is not a file",
            path.display()
        )));
    }
    if meta.len() > limit {
        return Err(too_large(&format!("the image {}", path.display()), limit));
    }
    Ok((file, meta.len()))
}

/// `GET /v1/vista3d/image?path=...`.
pub async fn image(
    State(state): State<Arc<AppState>>,
    req: Request,
) -> Result<Response, ServeError> {
    let mut path = None;
    for (k, v) in url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "path" => path = Some(v.into_owned()),
            other => {
                return Err(ServeError::BadRequest(format!(
                    "unknown query parameter '{other}': /v1/vista3d/image takes path"
                )))
            }
        }
    }
    let path = path.ok_or_else(|| {
        ServeError::BadRequest(
            "/v1/vista3d/image needs ?path=<a NIfTI file under --allow-dir>".into(),
        )
    })?;
    let policy = state.policy.clone();
    let limit = state.max_upload;
    let (file, len) = tokio::task::spawn_blocking(move || open_image(&policy, &path, limit))
        .await
        .map_err(|e| ServeError::Internal(format!("opening the image failed: {e}")))??;
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(
        tokio::fs::File::from_std(file),
    ));
    let mut response = Response::new(body);
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_and_csp_hashes() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        let script = inline_block(INDEX_HTML, "script").unwrap();
        assert!(script.contains("vista3dViewer"));
        assert!(inline_block(INDEX_HTML, "style").is_some());
        let csp = content_security_policy();
        assert!(csp.starts_with("default-src 'none'; script-src 'sha256-"));
        assert!(csp.contains("connect-src 'self'"));
        // One script and one style: the policy covers everything the page runs.
        assert_eq!(INDEX_HTML.matches("<script").count(), 1);
        assert_eq!(INDEX_HTML.matches("<style").count(), 1);
        assert!(!INDEX_HTML.contains("http://") && !INDEX_HTML.contains("https://"));
        assert!(
            !INDEX_HTML.contains(" style=\""),
            "inline style attributes break the CSP"
        );
    }

    #[test]
    fn display_json_has_the_preview_palette() {
        let d = display_json();
        let c = palette::class_color(3);
        assert_eq!(
            d["colors"]["3"],
            json!(format!("#{:02x}{:02x}{:02x}", c[0], c[1], c[2]))
        );
        assert_eq!(d["colors"].as_object().unwrap().len(), 254);
        assert_eq!(d["window"], json!({"width": 400.0, "level": 40.0}));
    }

    fn touch(p: &Path) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"x").unwrap();
    }

    #[test]
    fn the_list_has_nifti_files_inside_the_allowed_folders_only() {
        let d = tempfile::tempdir().unwrap();
        let allowed = d.path().join("allowed");
        let secret = d.path().join("secret");
        touch(&allowed.join("b.nii.gz"));
        touch(&allowed.join("a/ct.nii"));
        touch(&allowed.join("a/notes.txt"));
        touch(&allowed.join(".hidden/h.nii.gz"));
        touch(&secret.join("s.nii.gz"));
        // Links: one leaving the folder (skipped), one inside it (listed), a loop (bounded).
        std::os::unix::fs::symlink(secret.join("s.nii.gz"), allowed.join("out.nii.gz")).unwrap();
        std::os::unix::fs::symlink(&secret, allowed.join("outdir")).unwrap();
        std::os::unix::fs::symlink(allowed.join("b.nii.gz"), allowed.join("in.nii.gz")).unwrap();
        std::os::unix::fs::symlink(&allowed, allowed.join("a/loop")).unwrap();
        let deep = (0..MAX_LIST_DEPTH).fold(allowed.join("deep"), |p, i| p.join(format!("d{i}")));
        touch(&deep.join("too_deep.nii.gz"));
        touch(&allowed.join("deep/d0/shallow.nii.gz"));
        let policy = SourcePolicy::new(std::slice::from_ref(&allowed), &[]).unwrap();
        let list = list_images(&policy);
        let names: Vec<&str> = list.images.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "a/ct.nii",
                "b.nii.gz",
                "deep/d0/shallow.nii.gz",
                "in.nii.gz"
            ]
        );
        assert!(!list.truncated);
        // Every listed path is one the inference rules accept.
        for im in &list.images {
            assert!(policy.classify(&im.path).is_ok(), "{}", im.path);
            assert!(
                open_image(&policy, &im.path, 1 << 20).is_ok(),
                "{}",
                im.path
            );
        }
        // No folder allowed: an empty list.
        assert_eq!(
            list_images(&SourcePolicy::new(&[], &[]).unwrap()),
            ImageList::default()
        );
    }

    #[test]
    fn the_list_is_bounded() {
        let d = tempfile::tempdir().unwrap();
        for i in 0..(MAX_LIST_IMAGES + 5) {
            std::fs::write(d.path().join(format!("ct{i:04}.nii.gz")), b"x").unwrap();
        }
        let policy = SourcePolicy::new(&[d.path().to_path_buf()], &[]).unwrap();
        let list = list_images(&policy);
        assert_eq!(list.images.len(), MAX_LIST_IMAGES);
        assert!(list.truncated);
    }

    #[test]
    fn image_paths_follow_the_inference_rules() {
        let d = tempfile::tempdir().unwrap();
        let allowed = d.path().join("allowed");
        let secret = d.path().join("secret");
        touch(&allowed.join("ct.nii.gz"));
        touch(&allowed.join("big.nii"));
        std::fs::write(allowed.join("big.nii"), vec![0u8; 100]).unwrap();
        touch(&allowed.join("notes.txt"));
        touch(&secret.join("s.nii.gz"));
        std::os::unix::fs::symlink(secret.join("s.nii.gz"), allowed.join("link.nii.gz")).unwrap();
        let policy = SourcePolicy::new(std::slice::from_ref(&allowed), &[]).unwrap();
        let code = |p: &Path| {
            open_image(&policy, &p.to_string_lossy(), 50)
                .err()
                .map(|e| e.status().as_u16())
        };
        assert_eq!(code(&allowed.join("ct.nii.gz")), None);
        assert_eq!(code(&secret.join("s.nii.gz")), Some(403));
        assert_eq!(code(&allowed.join("../secret/s.nii.gz")), Some(403));
        assert_eq!(code(&allowed.join("link.nii.gz")), Some(403));
        assert_eq!(code(&allowed.join("notes.txt")), Some(422));
        assert_eq!(code(&allowed.join("missing.nii.gz")), Some(422));
        assert_eq!(code(&allowed.join("big.nii")), Some(413));
        assert_eq!(code(Path::new("relative/ct.nii.gz")), Some(422));
        let url = open_image(&policy, "http://example.org/ct.nii.gz", 50).unwrap_err();
        assert_eq!(url.status().as_u16(), 403);
    }

    /// The router with this policy and token, served on 127.0.0.1 (no model: these routes need none).
    fn serve_router(
        policy: SourcePolicy,
        token: &str,
    ) -> (tokio::runtime::Runtime, String, tempfile::TempDir) {
        use std::sync::atomic::{AtomicBool, AtomicU64};
        use std::sync::{Mutex, RwLock};
        let spool = tempfile::tempdir().unwrap();
        let state = Arc::new(AppState {
            config: crate::config::InferenceConfig::defaults(),
            table: crate::prompts::LabelTable::bundle(),
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            token: Some(super::super::http::token_digest(token)),
            metrics_public: false,
            policy: Arc::new(policy),
            spool: spool.path().to_path_buf(),
            admission: Arc::new(tokio::sync::Semaphore::new(1)),
            capacity: 1,
            jobs: Mutex::new(None),
            metrics: Arc::new(super::super::metrics::Metrics::new()),
            info: RwLock::new(Value::Null),
            timeout: std::time::Duration::from_secs(10),
            max_upload: 1 << 20,
            client: reqwest::Client::new(),
            next_id: AtomicU64::new(1),
            mean_seconds: Mutex::new(0.0),
        });
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        runtime.spawn(async move {
            let _ = axum::serve(listener, super::super::http::router(state)).await;
        });
        (runtime, base, spool)
    }

    #[test]
    fn the_page_is_public_and_the_image_routes_need_the_token() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let d = tempfile::tempdir().unwrap();
        let allowed = d.path().join("allowed");
        let secret = d.path().join("secret");
        std::fs::create_dir_all(&allowed).unwrap();
        std::fs::create_dir_all(&secret).unwrap();
        std::fs::write(allowed.join("ct.nii.gz"), b"not really a CT").unwrap();
        std::fs::write(secret.join("s.nii.gz"), b"secret").unwrap();
        let policy = SourcePolicy::new(std::slice::from_ref(&allowed), &[]).unwrap();
        let (runtime, base, _spool) = serve_router(policy, "tok");
        let client = reqwest::Client::new();
        let get = |path: String, token: Option<&str>| {
            let mut r = client.get(format!("{base}{path}"));
            if let Some(t) = token {
                r = r.bearer_auth(t);
            }
            runtime.block_on(async {
                let r = r.send().await.unwrap();
                let status = r.status().as_u16();
                let headers = r.headers().clone();
                (status, headers, r.bytes().await.unwrap().to_vec())
            })
        };
        let (status, headers, body) = get("/".into(), None);
        assert_eq!(status, 200);
        assert_eq!(headers["content-type"], "text/html; charset=utf-8");
        assert_eq!(
            headers["content-security-policy"],
            content_security_policy()
        );
        assert_eq!(body, INDEX_HTML.as_bytes());
        assert_eq!(get("/index.html".into(), None).0, 200);
        assert_eq!(get("/v1/vista3d/images".into(), None).0, 401);
        assert_eq!(get("/v1/vista3d/images".into(), Some("wrong")).0, 401);
        let (status, _, body) = get("/v1/vista3d/images".into(), Some("tok"));
        assert_eq!(status, 200);
        let list: Value = serde_json::from_slice(&body).unwrap();
        let ct = allowed.join("ct.nii.gz").display().to_string();
        assert_eq!(list["images"][0]["path"], json!(ct));
        assert_eq!(list["images"][0]["name"], "ct.nii.gz");
        assert_eq!(list["truncated"], false);
        let query = |p: &str| {
            format!(
                "/v1/vista3d/image?path={}",
                url::form_urlencoded::byte_serialize(p.as_bytes()).collect::<String>()
            )
        };
        assert_eq!(get(query(&ct), None).0, 401);
        let (status, headers, body) = get(query(&ct), Some("tok"));
        assert_eq!(status, 200);
        assert_eq!(headers["content-type"], "application/octet-stream");
        assert_eq!(body, b"not really a CT");
        let (status, _, body) = get(
            query(&secret.join("s.nii.gz").display().to_string()),
            Some("tok"),
        );
        assert_eq!(status, 403);
        let error: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(error["status"], 403);
        assert_eq!(get("/v1/vista3d/image".into(), Some("tok")).0, 400);
        assert_eq!(get(format!("{}&x=1", query(&ct)), Some("tok")).0, 400);
    }
}
