//! Claims: "this item is in progress", so that several `vista3d batch` processes (on one machine or many, on one
//! shared output folder) never segment an item twice.
//!
//! - A claim is a small JSON file beside the item's output (`<stem>_<postfix>.claim`), created with `O_EXCL`
//!   (`create_new`): only one process can hold it. It names the claimer (host, pid, worker) and its heartbeat time.
//! - While the item runs, a thread rewrites the claim every quarter of the timeout, which refreshes its mtime.
//! - A claim whose mtime is older than the timeout *as seen by the reader* (its own clock against the file's mtime,
//!   so clocks of different hosts do not matter) is stale: its claimer died. It is taken over by renaming it away
//!   (only one reader's rename succeeds) and creating a fresh one.
//! - Claims mean "in progress" only; the JSON record beside the output stays the only "done" marker. A claim is
//!   removed when its item finishes or fails (and an empty output folder it left behind with it).

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use serde_json::json;

/// Errors of claiming.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("cannot create the claim {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The claim file of the label map `output`: `x_trans.nii.gz` -> `x_trans.claim`.
pub fn claim_path(output: &Path) -> PathBuf {
    output.with_extension("").with_extension("claim")
}

/// Who claims: written into the claim file (for people and `batch-report`; staleness uses the mtime only).
#[derive(Debug, Clone)]
pub struct Claimer {
    pub host: String,
    pub pid: u32,
    /// The worker inside the process (e.g. `0`).
    pub worker: String,
}

impl Claimer {
    /// This process's worker `worker`.
    pub fn this_process(worker: impl Into<String>) -> Self {
        Self {
            host: super::hostname(),
            pid: std::process::id(),
            worker: worker.into(),
        }
    }

    fn token(&self) -> String {
        format!("{}:{}:{}", self.host, self.pid, self.worker)
    }

    fn contents(&self, started: &str) -> String {
        json!({
            "host": self.host,
            "pid": self.pid,
            "worker": self.worker,
            "token": self.token(),
            "started": started,
            "heartbeat": humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        })
        .to_string()
    }
}

/// What [`try_claim`] found.
#[derive(Debug)]
pub enum ClaimOutcome {
    /// The item is ours until the guard is dropped.
    Claimed(ClaimGuard),
    /// Another live worker holds it (its claim is younger than the timeout); `holder` is the claim's contents.
    Busy { holder: String },
}

/// A held claim: its heartbeat thread refreshes it; dropping the guard stops the thread and removes the claim.
#[derive(Debug)]
pub struct ClaimGuard {
    path: PathBuf,
    token: String,
    stop: Option<Sender<()>>,
    heartbeat: Option<JoinHandle<()>>,
    /// The stale claim this one replaced (its contents), if any.
    pub took_over: Option<String>,
}

impl ClaimGuard {
    /// The claim file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(h) = self.heartbeat.take() {
            let _ = h.join();
        }
        // Remove the claim only while it is still ours (a taker's fresh claim stays).
        if read_token(&self.path).as_deref() == Some(self.token.as_str()) {
            let _ = std::fs::remove_file(&self.path);
        }
        // The output folder made for the claim goes too when nothing else is in it (a failed item leaves nothing).
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

fn read_token(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("token")?.as_str().map(str::to_string)
}

/// Age of `path`'s mtime on this machine's clock (zero for a file from the future).
fn age(path: &Path) -> std::io::Result<Duration> {
    let modified = std::fs::metadata(path)?.modified()?;
    Ok(SystemTime::now()
        .duration_since(modified)
        .unwrap_or(Duration::ZERO))
}

/// Claims the item whose label map is `output`, taking over a claim older than `timeout`. The heartbeat refreshes
/// the claim every `timeout / 4` (at least every 50 ms).
pub fn try_claim(
    output: &Path,
    claimer: &Claimer,
    timeout: Duration,
) -> Result<ClaimOutcome, ClaimError> {
    let path = claim_path(output);
    let io_err = |source| ClaimError::Io {
        path: path.clone(),
        source,
    };
    let mut took_over = None;
    // A few rounds: a folder removed under us, or a takeover raced by another reader, is retried.
    for _ in 0..8 {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_err)?;
        }
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(file) => {
                return start(path.clone(), file, claimer, timeout, took_over)
                    .map(ClaimOutcome::Claimed);
            }
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err(e)),
        }
        let holder = std::fs::read_to_string(&path).unwrap_or_default();
        match age(&path) {
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(e)),
            Ok(a) if a <= timeout => return Ok(ClaimOutcome::Busy { holder }),
            Ok(_) => {}
        }
        // Stale: move it aside under a name of our own; only one reader's rename succeeds.
        let aside = path.with_extension(format!(
            "claim.stale-{}-{}-{}",
            claimer.host, claimer.pid, claimer.worker
        ));
        match std::fs::rename(&path, &aside) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(e)),
        }
        // Between our look and the rename another reader may have taken it over and made a fresh claim: then
        // the file we moved is not the stale one; put it back (unless a newer claim exists) and report busy.
        let moved = std::fs::read_to_string(&aside).unwrap_or_default();
        let still_stale = age(&aside).map(|a| a > timeout).unwrap_or(true);
        if moved != holder || !still_stale {
            let _ = std::fs::hard_link(&aside, &path);
            let _ = std::fs::remove_file(&aside);
            return Ok(ClaimOutcome::Busy { holder: moved });
        }
        let _ = std::fs::remove_file(&aside);
        log::warn!(
            "{}: took over a stale claim (no heartbeat for more than {:.1} s): {holder}",
            output.display(),
            timeout.as_secs_f64()
        );
        remove_leftovers(&path);
        took_over = Some(holder);
    }
    Ok(ClaimOutcome::Busy {
        holder: std::fs::read_to_string(&path).unwrap_or_default(),
    })
}

/// Removes the temporary files (`.<name>.<pid>.<n>.tmp*`, see [`crate::fsutil::write_atomic`]) a dead worker left
/// in the item's folder: the folder belongs to this item only, and whoever holds the claim is its only writer.
fn remove_leftovers(claim: &Path) {
    let Some(dir) = claim.parent() else { return };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && name.contains(".tmp") && e.path().is_file() {
            log::warn!("removing {} (left by a dead worker)", e.path().display());
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// (Re)writes the claim through its handle; the write and `set_modified` refresh its mtime.
fn write_claim(file: &mut File, claimer: &Claimer, started: &str) -> std::io::Result<()> {
    use std::io::Seek;
    file.set_len(0)?;
    file.seek(std::io::SeekFrom::Start(0))?;
    file.write_all(claimer.contents(started).as_bytes())?;
    file.set_modified(SystemTime::now())?;
    file.flush()
}

fn start(
    path: PathBuf,
    mut file: File,
    claimer: &Claimer,
    timeout: Duration,
    took_over: Option<String>,
) -> Result<ClaimGuard, ClaimError> {
    let started = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
    if let Err(source) = write_claim(&mut file, claimer, &started) {
        let _ = std::fs::remove_file(&path);
        return Err(ClaimError::Io { path, source });
    }
    let (stop, stopped) = channel::<()>();
    let period = (timeout / 4).max(Duration::from_millis(50));
    let claimer = claimer.clone();
    let shown = path.display().to_string();
    // The heartbeat writes through the handle it created, so a claim taken over (renamed away) is never touched.
    let heartbeat = std::thread::Builder::new()
        .name("vista3d-claim".into())
        .spawn(move || loop {
            match stopped.recv_timeout(period) {
                Err(RecvTimeoutError::Timeout) => {
                    if let Err(e) = write_claim(&mut file, &claimer, &started) {
                        log::warn!("{shown}: heartbeat failed: {e}");
                    }
                }
                _ => return,
            }
        })
        .map_err(|source| ClaimError::Io {
            path: path.clone(),
            source,
        })?;
    let token = read_token(&path).unwrap_or_default();
    Ok(ClaimGuard {
        path,
        token,
        stop: Some(stop),
        heartbeat: Some(heartbeat),
        took_over,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claimed(o: ClaimOutcome) -> ClaimGuard {
        match o {
            ClaimOutcome::Claimed(g) => g,
            ClaimOutcome::Busy { holder } => panic!("busy: {holder}"),
        }
    }

    #[test]
    fn one_claimer_at_a_time_and_claims_go_when_done() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("a/a_trans.nii.gz");
        let long = Duration::from_secs(60);
        let g = claimed(try_claim(&out, &Claimer::this_process("0"), long).unwrap());
        assert_eq!(g.path(), dir.path().join("a/a_trans.claim"));
        let text = std::fs::read_to_string(g.path()).unwrap();
        assert!(
            text.contains("\"pid\"") && text.contains("\"heartbeat\""),
            "{text}"
        );
        match try_claim(&out, &Claimer::this_process("1"), long).unwrap() {
            ClaimOutcome::Busy { holder } => assert!(holder.contains(":0\""), "{holder}"),
            ClaimOutcome::Claimed(_) => panic!("claimed twice"),
        }
        drop(g);
        assert!(
            !dir.path().join("a").exists(),
            "claim and its empty folder removed"
        );
        let g = claimed(try_claim(&out, &Claimer::this_process("1"), long).unwrap());
        assert!(g.took_over.is_none());
    }

    #[test]
    fn heartbeats_keep_a_claim_alive_and_stale_ones_are_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("b/b_trans.nii.gz");
        let timeout = Duration::from_millis(400);
        let live = claimed(try_claim(&out, &Claimer::this_process("0"), timeout).unwrap());
        // Longer than the timeout, but the heartbeat keeps the mtime fresh.
        std::thread::sleep(Duration::from_millis(900));
        assert!(matches!(
            try_claim(&out, &Claimer::this_process("1"), timeout).unwrap(),
            ClaimOutcome::Busy { .. }
        ));
        drop(live);
        // A claim without a heartbeat (its claimer was killed): a plain file left behind.
        std::fs::create_dir_all(dir.path().join("b")).unwrap();
        let dead = claim_path(&out);
        std::fs::write(&dead, r#"{"token":"deadhost:1:0"}"#).unwrap();
        assert!(matches!(
            try_claim(&out, &Claimer::this_process("1"), timeout).unwrap(),
            ClaimOutcome::Busy { .. }
        ));
        std::thread::sleep(Duration::from_millis(600));
        let g = claimed(try_claim(&out, &Claimer::this_process("1"), timeout).unwrap());
        assert!(g.took_over.as_deref().unwrap().contains("deadhost"));
        assert!(read_token(&dead).unwrap().ends_with(":1"));
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("b"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 1, "{leftovers:?}");
    }
}
