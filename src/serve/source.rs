//! Where a request's image comes from, and what the operator allows.
//!
//! - A path or `file://` URL is read only under an `--allow-dir` folder: absolute paths only, `..` refused, and
//!   the file is checked after it is opened (through `/proc/self/fd`), so a symbolic link that leaves the folder,
//!   or one swapped in after the check, is refused.
//! - An http(s) URL is fetched only under an `--allow-url-prefix` (none by default: the server never fetches a
//!   URL a client names, so it cannot be made to probe the network). A prefix matches by scheme, host, port and
//!   whole path segments; redirects are followed only to allowed URLs (five at most).
//! - Uploads and downloads are streamed to the request's folder in the spool directory with a size limit; the
//!   folder is removed when the request ends.

use std::fs::File;
use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use axum::body::Bytes;
use futures_util::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use url::Url;

use super::error::ServeError;
use crate::fsutil::hex;

/// What the operator allows images to come from.
#[derive(Debug, Clone, Default)]
pub struct SourcePolicy {
    /// Allowed folders as given and resolved (symbolic links followed).
    dirs: Vec<(PathBuf, PathBuf)>,
    /// Allowed URL prefixes.
    prefixes: Vec<Url>,
}

/// An image reference from a request.
#[derive(Debug, Clone, PartialEq)]
pub enum ImageRef {
    /// A file under an allowed folder (checked again when opened).
    Path(PathBuf),
    /// A URL under an allowed prefix.
    Url(Url),
}

/// An image file opened for reading.
#[derive(Debug)]
pub struct OpenedImage {
    /// Keeps the file open while it is read through `read_path`.
    _file: File,
    /// A path that reads the opened file (`/proc/self/fd/N` on Linux).
    pub read_path: PathBuf,
    /// The file's real path.
    pub real_path: PathBuf,
}

impl OpenedImage {
    /// The opened file itself (already checked to be where it may be).
    pub fn into_file(self) -> File {
        self._file
    }
}

impl SourcePolicy {
    /// A policy with these folders (they must exist) and URL prefixes (http or https).
    pub fn new(dirs: &[PathBuf], prefixes: &[String]) -> anyhow::Result<Self> {
        let mut policy = SourcePolicy::default();
        for d in dirs {
            anyhow::ensure!(
                d.is_absolute(),
                "--allow-dir {} must be an absolute path",
                d.display()
            );
            let real = std::fs::canonicalize(d)
                .map_err(|e| anyhow::anyhow!("--allow-dir {}: {e}", d.display()))?;
            anyhow::ensure!(real.is_dir(), "--allow-dir {} is not a folder", d.display());
            policy.dirs.push((lexical(d), real));
        }
        for p in prefixes {
            let url = Url::parse(p)
                .map_err(|e| anyhow::anyhow!("--allow-url-prefix {p} is not a URL: {e}"))?;
            anyhow::ensure!(
                matches!(url.scheme(), "http" | "https") && url.host_str().is_some(),
                "--allow-url-prefix {p} must be an http:// or https:// URL with a host"
            );
            anyhow::ensure!(
                url.username().is_empty() && url.password().is_none(),
                "--allow-url-prefix {p} must not hold credentials"
            );
            policy.prefixes.push(url);
        }
        Ok(policy)
    }

    /// The allowed folders: as the operator gave them, and resolved.
    pub fn dirs(&self) -> impl Iterator<Item = (&Path, &Path)> {
        self.dirs.iter().map(|(g, r)| (g.as_path(), r.as_path()))
    }

    /// Classifies the `image` of a request, refusing what the operator does not allow (403) and what is not an
    /// image reference at all (422).
    pub fn classify(&self, image: &str) -> Result<ImageRef, ServeError> {
        let image = image.trim();
        if image.is_empty() {
            return Err(ServeError::Unprocessable("image is empty".into()));
        }
        let lower = image.to_ascii_lowercase();
        if lower.starts_with("http://") || lower.starts_with("https://") {
            let url = Url::parse(image).map_err(|e| {
                ServeError::Unprocessable(format!("image URL '{image}' is invalid: {e}"))
            })?;
            if !self.url_allowed(&url) {
                return Err(ServeError::Forbidden(if self.prefixes.is_empty() {
                    format!(
                        "image URL {url} is not allowed: this server fetches no URLs (the operator can allow \
                         prefixes with --allow-url-prefix); upload the image in the request body instead"
                    )
                } else {
                    format!("image URL {url} is not under an allowed prefix (--allow-url-prefix)")
                }));
            }
            return Ok(ImageRef::Url(url));
        }
        let path = if lower.starts_with("file:") {
            let url = Url::parse(image).map_err(|e| {
                ServeError::Unprocessable(format!("image URL '{image}' is invalid: {e}"))
            })?;
            if url
                .host_str()
                .is_some_and(|h| !h.is_empty() && h != "localhost")
            {
                return Err(ServeError::Forbidden(format!(
                    "image URL {url}: file:// URLs must name a local file (no host)"
                )));
            }
            if has_dot_dot(url.path()) {
                return Err(traversal(image));
            }
            url.to_file_path().map_err(|_| {
                ServeError::Unprocessable(format!("image URL {url} is not a file path"))
            })?
        } else if image.contains("://") {
            return Err(ServeError::Unprocessable(format!(
                "image '{image}': only paths, file://, http:// and https:// are supported"
            )));
        } else {
            PathBuf::from(image)
        };
        if has_dot_dot(image) || path.components().any(|c| c == Component::ParentDir) {
            return Err(traversal(image));
        }
        if self.dirs.is_empty() {
            return Err(ServeError::Forbidden(
                "image paths are not allowed on this server (the operator can allow folders with --allow-dir); \
                 upload the image in the request body instead"
                    .into(),
            ));
        }
        if !path.is_absolute() {
            return Err(ServeError::Unprocessable(format!(
                "image path '{image}' must be absolute"
            )));
        }
        let path = lexical(&path);
        if !self
            .dirs
            .iter()
            .any(|(given, real)| path.starts_with(given) || path.starts_with(real))
        {
            return Err(outside(image));
        }
        Ok(ImageRef::Path(path))
    }

    /// Opens an image file and checks where it really is (blocking).
    pub fn open(&self, path: &Path) -> Result<OpenedImage, ServeError> {
        let shown = path.display();
        let file = File::open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                ServeError::Unprocessable(format!("image {shown} not found"))
            }
            _ => ServeError::Unprocessable(format!("cannot open the image {shown}: {e}")),
        })?;
        let (read_path, real_path) = real_path_of(&file, path)
            .map_err(|e| ServeError::Internal(format!("cannot resolve {shown}: {e}")))?;
        if !self
            .dirs
            .iter()
            .any(|(_, real)| real_path.starts_with(real))
        {
            return Err(ServeError::Forbidden(format!(
                "image {shown} resolves outside the allowed folders (symbolic links may not leave --allow-dir)"
            )));
        }
        let meta = file.metadata().map_err(|e| {
            ServeError::Unprocessable(format!("cannot open the image {shown}: {e}"))
        })?;
        if meta.is_dir() {
            // A DICOM series folder: everything in it must stay inside the allowed folder too.
            let root = self
                .dirs
                .iter()
                .map(|(_, real)| real)
                .find(|real| real_path.starts_with(real))
                .cloned()
                .unwrap_or_else(|| real_path.clone());
            check_tree_inside(&real_path, &root, 0).map_err(|e| match e {
                TreeError::Escapes(p) => ServeError::Forbidden(format!(
                    "image {shown}: {} resolves outside the allowed folders (symbolic links may not leave \
                     --allow-dir)",
                    p.display()
                )),
                TreeError::Io(p, e) => {
                    ServeError::Unprocessable(format!("image {shown}: cannot read {}: {e}", p.display()))
                }
                TreeError::TooDeep => ServeError::Unprocessable(format!(
                    "image {shown}: folders nested more than {MAX_DEPTH} deep"
                )),
            })?;
            return Ok(OpenedImage {
                _file: file,
                read_path: real_path.clone(),
                real_path,
            });
        }
        if !meta.is_file() {
            return Err(ServeError::Unprocessable(format!(
                "image {shown} is neither a file nor a folder"
            )));
        }
        Ok(OpenedImage {
            _file: file,
            read_path,
            real_path,
        })
    }

    /// Whether `url` lies under an allowed prefix (scheme, host, port, whole path segments; no credentials).
    pub fn url_allowed(&self, url: &Url) -> bool {
        if !url.username().is_empty() || url.password().is_some() {
            return false;
        }
        self.prefixes.iter().any(|p| {
            p.scheme() == url.scheme()
                && p.host_str() == url.host_str()
                && p.port_or_known_default() == url.port_or_known_default()
                && path_under(url.path(), p.path())
        })
    }
}

/// `path` equals `prefix` or continues it after a `/`.
fn path_under(path: &str, prefix: &str) -> bool {
    if prefix.ends_with('/') {
        path.starts_with(prefix)
    } else {
        path == prefix
            || path
                .strip_prefix(prefix)
                .is_some_and(|rest| rest.starts_with('/'))
    }
}

fn has_dot_dot(s: &str) -> bool {
    s.split(['/', '\\']).any(|seg| {
        let seg = seg.to_ascii_lowercase();
        seg == ".." || seg == "%2e%2e" || seg == ".%2e" || seg == "%2e."
    })
}

fn traversal(image: &str) -> ServeError {
    ServeError::Forbidden(format!(
        "image '{image}' contains '..': parent-folder references are refused"
    ))
}

fn outside(image: &str) -> ServeError {
    ServeError::Forbidden(format!(
        "image '{image}' is not under a folder this server allows (--allow-dir)"
    ))
}

/// `.` components removed (no file-system access; `..` is refused before this).
fn lexical(p: &Path) -> PathBuf {
    p.components().filter(|c| *c != Component::CurDir).collect()
}

/// A path that reads the opened file and its real location.
/// How deep a DICOM folder given by path may nest.
const MAX_DEPTH: usize = 32;

enum TreeError {
    Escapes(PathBuf),
    Io(PathBuf, std::io::Error),
    TooDeep,
}

/// Checks that every entry under `dir` (links followed) resolves inside `root`.
fn check_tree_inside(dir: &Path, root: &Path, depth: usize) -> Result<(), TreeError> {
    if depth > MAX_DEPTH {
        return Err(TreeError::TooDeep);
    }
    let entries = std::fs::read_dir(dir).map_err(|e| TreeError::Io(dir.to_path_buf(), e))?;
    for entry in entries {
        let entry = entry.map_err(|e| TreeError::Io(dir.to_path_buf(), e))?;
        let path = entry.path();
        let real = std::fs::canonicalize(&path).map_err(|e| TreeError::Io(path.clone(), e))?;
        if !real.starts_with(root) {
            return Err(TreeError::Escapes(path));
        }
        if real.is_dir() {
            check_tree_inside(&real, root, depth + 1)?;
        }
    }
    Ok(())
}

fn real_path_of(file: &File, path: &Path) -> std::io::Result<(PathBuf, PathBuf)> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let fd_path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        if let Ok(real) = std::fs::read_link(&fd_path) {
            return Ok((fd_path, real));
        }
    }
    let _ = file;
    let real = std::fs::canonicalize(path)?;
    Ok((real.clone(), real))
}

/// What a streamed body came to.
#[derive(Debug, Clone)]
pub struct Spooled {
    pub bytes: u64,
    pub sha256: String,
}

/// Streams `stream` into a new file `path`, refusing more than `limit` bytes (413). The file is removed on
/// error.
pub async fn stream_to_file<S, E>(
    stream: S,
    path: &Path,
    limit: u64,
    what: &str,
) -> Result<Spooled, ServeError>
where
    S: Stream<Item = Result<Bytes, E>>,
    E: std::fmt::Display,
{
    let mut stream = std::pin::pin!(stream);
    let result = async {
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .await
            .map_err(|e| ServeError::Internal(format!("cannot create {}: {e}", path.display())))?;
        let mut out = tokio::io::BufWriter::with_capacity(1 << 20, file);
        let mut hasher = Sha256::new();
        let mut total = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk =
                chunk.map_err(|e| ServeError::BadRequest(format!("reading {what}: {e}")))?;
            total += chunk.len() as u64;
            if total > limit {
                drain(&mut stream).await;
                return Err(too_large(what, limit));
            }
            hasher.update(&chunk);
            out.write_all(&chunk)
                .await
                .map_err(|e| ServeError::Internal(format!("cannot spool {what}: {e}")))?;
        }
        out.flush()
            .await
            .map_err(|e| ServeError::Internal(format!("cannot spool {what}: {e}")))?;
        if total == 0 {
            return Err(ServeError::Unprocessable(format!("{what} is empty")));
        }
        Ok(Spooled {
            bytes: total,
            sha256: hex(&hasher.finalize()),
        })
    }
    .await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(path).await;
    }
    result
}

/// How much of an over-limit body is read and dropped before the 413 goes out.
pub const DRAIN_BYTES: u64 = 64 << 20;

/// Reads and drops the rest of an over-limit body (up to [`DRAIN_BYTES`] or 5 s), so that the client, still
/// sending, gets to read the 413 instead of a reset connection (a lingering close, as nginx does).
async fn drain<S, E>(stream: &mut std::pin::Pin<&mut S>)
where
    S: Stream<Item = Result<Bytes, E>>,
{
    let until = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut drained = 0u64;
    while drained < DRAIN_BYTES {
        match tokio::time::timeout_at(until, stream.next()).await {
            Ok(Some(Ok(chunk))) => drained += chunk.len() as u64,
            _ => break,
        }
    }
}

/// The 413 of an upload or download over the limit.
pub fn too_large(what: &str, limit: u64) -> ServeError {
    ServeError::TooLarge(format!(
        "{what} is larger than the server's limit of {limit} bytes (--max-upload-mb)"
    ))
}

/// Downloads `url` into `path` (redirects only to allowed URLs, at most `limit` bytes).
pub async fn download(
    client: &reqwest::Client,
    policy: &Arc<SourcePolicy>,
    url: &Url,
    path: &Path,
    limit: u64,
) -> Result<Spooled, ServeError> {
    let mut current = url.clone();
    for _ in 0..=5 {
        let response = client
            .get(current.clone())
            .send()
            .await
            .map_err(|e| ServeError::BadGateway(format!("cannot fetch {current}: {e}")))?;
        let status = response.status();
        if status.is_redirection() {
            let location = response
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| {
                    ServeError::BadGateway(format!("{current} redirects without a Location"))
                })?;
            let next = current.join(location).map_err(|e| {
                ServeError::BadGateway(format!("{current} redirects to a bad URL: {e}"))
            })?;
            if !policy.url_allowed(&next) {
                return Err(ServeError::Forbidden(format!(
                    "image URL {url} redirects to {next}, which is not under an allowed prefix"
                )));
            }
            current = next;
            continue;
        }
        if !status.is_success() {
            return Err(ServeError::BadGateway(format!(
                "fetching {current} answered {status}"
            )));
        }
        if response.content_length().is_some_and(|n| n > limit) {
            return Err(too_large(&format!("the image at {current}"), limit));
        }
        return stream_to_file(
            response.bytes_stream(),
            path,
            limit,
            &format!("the image at {current}"),
        )
        .await;
    }
    Err(ServeError::BadGateway(format!(
        "{url}: more than 5 redirects"
    )))
}

/// The dimensions and voxel spacing of a NIfTI file from its header (reads only the header; `None` when the
/// file is not a NIfTI the reader would take: the full read then gives the reason).
pub fn peek_nifti(path: &Path) -> Option<([usize; 3], [f64; 3])> {
    let mut file = File::open(path).ok()?;
    let mut magic = [0u8; 2];
    file.read_exact(&mut magic).ok()?;
    let file = File::open(path).ok()?;
    let mut reader: Box<dyn Read> = if magic == [0x1f, 0x8b] {
        Box::new(flate2::read::MultiGzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let mut head = vec![0u8; 540];
    reader.read_exact(&mut head[..4]).ok()?;
    let size = match (
        i32::from_le_bytes(head[..4].try_into().ok()?),
        i32::from_be_bytes(head[..4].try_into().ok()?),
    ) {
        (348, _) | (_, 348) => 348,
        (540, _) | (_, 540) => 540,
        _ => return None,
    };
    reader.read_exact(&mut head[4..size]).ok()?;
    let header = crate::io::NiftiHeader::parse(&head[..size]).ok()?;
    let shape = header.shape().ok()?;
    let pixdim = header.fixed_pixdim();
    let dim = |i: usize| shape.get(i).copied().unwrap_or(1).max(1);
    Some((
        [dim(0), dim(1), dim(2)],
        [pixdim[1].abs(), pixdim[2].abs(), pixdim[3].abs()],
    ))
}

/// A file-name stem from a path or URL (letters, digits, `.`, `_`, `-`; `image` when nothing is left).
pub fn stem_of(name: &str) -> String {
    let last = name
        .rsplit(['/', '\\'])
        .find(|s| !s.is_empty())
        .unwrap_or("");
    let last = last.split(['?', '#']).next().unwrap_or("");
    let stem = crate::batch::image_stem(Path::new(last));
    let clean: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(100)
        .collect();
    let clean = clean.trim_start_matches('.').to_string();
    if clean.is_empty() {
        "image".into()
    } else {
        clean
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_only_under_allowed_folders() {
        let d = tempfile::tempdir().unwrap();
        let allowed = d.path().join("allowed");
        let secret = d.path().join("secret");
        std::fs::create_dir_all(&allowed).unwrap();
        std::fs::create_dir_all(&secret).unwrap();
        std::fs::write(allowed.join("ct.nii.gz"), b"x").unwrap();
        std::fs::write(secret.join("s.nii.gz"), b"x").unwrap();
        std::os::unix::fs::symlink(secret.join("s.nii.gz"), allowed.join("link.nii.gz")).unwrap();
        let p = SourcePolicy::new(std::slice::from_ref(&allowed), &[]).unwrap();
        let ok = allowed.join("ct.nii.gz");
        assert_eq!(
            p.classify(ok.to_str().unwrap()).unwrap(),
            ImageRef::Path(ok.clone())
        );
        assert!(p.open(&ok).is_ok());
        let file_url = format!("file://{}", ok.display());
        assert_eq!(p.classify(&file_url).unwrap(), ImageRef::Path(ok.clone()));
        let code = |s: &str| p.classify(s).unwrap_err().status().as_u16();
        assert_eq!(
            code(&format!("{}/../secret/s.nii.gz", allowed.display())),
            403
        );
        assert_eq!(code(&format!("{}/s.nii.gz", secret.display())), 403);
        assert_eq!(code("relative/ct.nii.gz"), 422);
        assert_eq!(code("ftp://host/x"), 422);
        assert_eq!(code("http://example.org/ct.nii.gz"), 403);
        assert_eq!(code("file://otherhost/ct.nii.gz"), 403);
        // A symbolic link inside the folder that points out of it is refused when opened.
        let link = allowed.join("link.nii.gz");
        assert!(p.classify(link.to_str().unwrap()).is_ok());
        assert_eq!(p.open(&link).unwrap_err().status().as_u16(), 403);
        assert_eq!(
            p.open(&allowed.join("missing.nii.gz"))
                .unwrap_err()
                .status()
                .as_u16(),
            422
        );
        // No folder allowed: every path is refused.
        let none = SourcePolicy::new(&[], &[]).unwrap();
        assert_eq!(
            none.classify(ok.to_str().unwrap())
                .unwrap_err()
                .status()
                .as_u16(),
            403
        );
    }

    #[test]
    fn url_prefixes_match_whole_segments() {
        let p = SourcePolicy::new(
            &[],
            &[
                "https://data.example.org/ct/".into(),
                "http://127.0.0.1:9000/scans".into(),
            ],
        )
        .unwrap();
        let allowed = |s: &str| p.url_allowed(&Url::parse(s).unwrap());
        assert!(allowed("https://data.example.org/ct/a.nii.gz"));
        assert!(allowed("https://data.example.org:443/ct/a.nii.gz"));
        assert!(!allowed("https://data.example.org/ct2/a.nii.gz"));
        assert!(!allowed("https://data.example.org/ct/../admin"));
        assert!(!allowed("http://data.example.org/ct/a.nii.gz"));
        assert!(!allowed("https://data.example.org.evil.com/ct/a.nii.gz"));
        assert!(!allowed("https://user:pw@data.example.org/ct/a.nii.gz"));
        assert!(allowed("http://127.0.0.1:9000/scans/x.nii.gz"));
        assert!(allowed("http://127.0.0.1:9000/scans"));
        assert!(!allowed("http://127.0.0.1:9000/scansx"));
        assert!(!allowed("http://127.0.0.1:9001/scans/x.nii.gz"));
        assert!(SourcePolicy::new(&[], &["ftp://x/".into()]).is_err());
    }

    #[test]
    fn stems_are_safe_file_names() {
        assert_eq!(stem_of("/data/p1/ct_01.nii.gz"), "ct_01");
        assert_eq!(stem_of("https://h/a/b/scan.nii?x=1"), "scan");
        assert_eq!(stem_of("../../etc/passwd"), "passwd");
        assert_eq!(stem_of("we ird$name.nii.gz"), "we_ird_name");
        assert_eq!(stem_of(""), "image");
        assert_eq!(stem_of("..."), "image");
    }
}
