//! Helpers shared by the integration tests: where fixtures and data live, and the parity metric.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};

/// `$VISTA3D_FIXTURES/<name>` (default `target/fixtures/<name>`), asserting that `marker` exists in it: the
/// fixtures come from MONAI through scripts/test.sh, and a test without them must fail, not pass.
pub fn fixtures(name: &str, marker: &str) -> PathBuf {
    let root = std::env::var_os("VISTA3D_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fixtures"));
    let dir = root.join(name);
    assert!(
        dir.join(marker).is_file(),
        "MONAI golden fixtures missing: {} not found; run `bash scripts/test.sh` (it generates them with pip monai)",
        dir.join(marker).display()
    );
    dir
}

/// A file of the real test data (`$VISTA3D_DATA`, default `target/data`, filled by scripts/fetch_data.sh).
pub fn data(rel: &str) -> PathBuf {
    let root = std::env::var_os("VISTA3D_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/data"));
    let p = root.join(rel);
    assert!(
        p.is_file(),
        "{} missing: run `bash scripts/test.sh` (scripts/fetch_data.sh fetches it)",
        p.display()
    );
    p
}

/// The parity metric: `max |actual - expected| / max |expected|` over finite values that are not the -9999
/// "no prompt" sentinel, after checking that shapes, NaN positions and sentinel positions are identical.
pub fn rel_error(actual: &Tensor, expected: &Tensor) -> Result<f64, String> {
    if actual.size() != expected.size() {
        return Err(format!(
            "shape {:?} vs MONAI {:?}",
            actual.size(),
            expected.size()
        ));
    }
    let a = actual.to_kind(Kind::Double);
    let b = expected.to_kind(Kind::Double);
    let count = |t: Tensor| t.sum(Kind::Int64).int64_value(&[]);
    let nan_mismatch = count(a.isnan().logical_xor(&b.isnan()));
    if nan_mismatch > 0 {
        return Err(format!("{nan_mismatch} NaN positions differ"));
    }
    let sentinel = b.eq(vista3d::model::NINF);
    let sentinel_mismatch = count(sentinel.logical_xor(&a.eq(vista3d::model::NINF)));
    if sentinel_mismatch > 0 {
        return Err(format!(
            "{sentinel_mismatch} positions differ in being -9999 (no prompt)"
        ));
    }
    let valid = b.isnan().logical_not().logical_and(&sentinel.logical_not());
    if count(valid.shallow_clone()) == 0 {
        return Ok(0.0);
    }
    let diff = (&a - &b)
        .abs()
        .masked_select(&valid)
        .max()
        .double_value(&[]);
    let scale = b.abs().masked_select(&valid).max().double_value(&[]);
    Ok(if scale > 0.0 { diff / scale } else { diff })
}

/// Small and fast inference for CLI tests: the demo weights, 3 mm resampling, 32^3 windows, 2 threads.
pub const FAST: [&str; 7] = [
    "--demo-weights",
    "--set",
    "resample_spacing=[3,3,3]",
    "--set",
    "patch_size=[32,32,32]",
    "--threads",
    "2",
];

/// An empty scratch folder `<CARGO_TARGET_TMPDIR>/<scope>/<name>` (removed first if it exists).
pub fn scratch(scope: &str, name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(scope)
        .join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs the `vista3d` binary with `args` and extra environment variables.
pub fn vista3d_with_env(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_vista3d"));
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

/// Runs the `vista3d` binary with `args`.
pub fn vista3d(args: &[&str]) -> std::process::Output {
    vista3d_with_env(args, &[])
}

/// What a process printed: stdout then stderr.
pub fn output_text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Every file under `dir`, recursively (none when it does not exist).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// The network tensors of a training checkpoint (`last.safetensors`; the reader gives its network part without the
/// `model.` prefix), sorted by name, as raw bytes.
pub fn model_tensors(path: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = vista3d::checkpoint::read_checkpoint(path)
        .unwrap()
        .tensors
        .into_iter()
        .map(|(n, t)| (n, t.data))
        .collect();
    assert!(!v.is_empty(), "{}: no network tensors", path.display());
    v.sort();
    v
}

/// A running `vista3d serve` on 127.0.0.1 (a port the system picks), its stderr in `log`; killed when dropped,
/// with the end of its log printed when the test is failing.
pub struct ServeProcess {
    pub child: std::process::Child,
    /// `http://127.0.0.1:<port>`, as the server printed it.
    pub base: String,
    pub log: PathBuf,
}

impl ServeProcess {
    /// Starts `vista3d serve --listen 127.0.0.1:0 ARGS` and waits (60 s at most) for the address it prints on
    /// stdout; readiness is the caller's to wait for.
    pub fn start(args: &[String], log: PathBuf) -> Self {
        use std::io::{BufRead, BufReader};
        use std::process::{Command, Stdio};
        let mut child = Command::new(env!("CARGO_BIN_EXE_vista3d"))
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("vista3d serve: listening on ") {
                    let _ = tx.send(addr.to_string());
                }
            }
        });
        match rx.recv_timeout(std::time::Duration::from_secs(60)) {
            Ok(base) => Self { child, base, log },
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the server did not print its address: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Everything the server logged so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let text = self.stderr();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!(
                "--- server log (last lines)\n{}",
                lines[lines.len().saturating_sub(40)..].join("\n")
            );
        }
    }
}
