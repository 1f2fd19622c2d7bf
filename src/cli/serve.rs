//! `vista3d serve`: the HTTP inference server (see `vista3d::serve`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use vista3d::serve::{self, ServeOptions};

use super::common::CommonArgs;
use super::out;

/// Options of `vista3d serve`.
#[derive(clap::Args)]
pub struct ServeArgs {
    /// Address to listen on (127.0.0.1:0 picks a free port; the bound address is printed).
    #[arg(long, default_value = "0.0.0.0:8000")]
    listen: SocketAddr,
    /// Request threads: requests computed at once (their windows share the device).
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Requests that may wait for a request thread; when full, requests get 503 with Retry-After.
    #[arg(long, default_value_t = 16)]
    queue: usize,
    /// Seconds a request may take from admission to response (504 after).
    #[arg(long, default_value_t = 600.0)]
    timeout: f64,
    /// Largest image upload or download, in MiB.
    #[arg(long, default_value_t = 2048)]
    max_upload_mb: u64,
    /// Memory running requests may reserve, e.g. 12GiB or 800MiB (default: 80% of the container's cgroup limit,
    /// else of the machine's memory).
    #[arg(long)]
    memory_budget: Option<String>,
    /// Folder for uploads and results in flight (default: the system's temporary folder).
    #[arg(long)]
    spool_dir: Option<PathBuf>,
    /// File holding a bearer token: every endpoint but /v1/health/* then needs "Authorization: Bearer <token>".
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Serve /metrics without the token.
    #[arg(long)]
    metrics_public: bool,
    /// A folder requests may name images in by path or file:// URL (repeatable; none: paths are refused).
    #[arg(long = "allow-dir")]
    allow_dirs: Vec<PathBuf>,
    /// An http(s) URL prefix requests may fetch images from (repeatable; none: URLs are refused).
    #[arg(long = "allow-url-prefix")]
    allow_url_prefixes: Vec<String>,
    /// Check the options and configuration, print them as JSON and exit (loads no weights).
    #[arg(long)]
    check: bool,
    #[command(flatten)]
    common: CommonArgs,
}

/// Parses `12GiB`, `800MiB`, `1.5GB`, `4096` (bytes).
fn parse_bytes(text: &str) -> Result<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number
        .parse()
        .with_context(|| format!("'{text}' is not a size like 12GiB or 800MiB"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "ki" | "kib" => 1024.0,
        "mi" | "mib" => 1024.0 * 1024.0,
        "gi" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "ti" | "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        other => bail!("unknown size unit '{other}' in '{text}': use B, KiB, MiB, GiB, TiB (or kB, MB, GB, TB)"),
    };
    let bytes = value * scale;
    if !bytes.is_finite() || bytes < 1.0 {
        bail!("'{text}' must be a positive size");
    }
    Ok(bytes as u64)
}

pub fn serve(args: ServeArgs) -> Result<()> {
    let config = args.common.config()?.inference()?;
    let weights = args.common.weights(&config)?;
    if !(args.timeout.is_finite() && args.timeout > 0.0) {
        bail!("--timeout must be a positive number of seconds");
    }
    let options = ServeOptions {
        listen: args.listen,
        workers: args.workers,
        queue: args.queue,
        timeout: Duration::from_secs_f64(args.timeout),
        max_upload: args
            .max_upload_mb
            .checked_mul(1 << 20)
            .context("--max-upload-mb is too large")?,
        memory_budget: args
            .memory_budget
            .as_deref()
            .map(parse_bytes)
            .transpose()
            .context("--memory-budget")?,
        spool_dir: args.spool_dir,
        token_file: args.token_file,
        metrics_public: args.metrics_public,
        allow_dirs: args.allow_dirs,
        allow_url_prefixes: args.allow_url_prefixes,
    };
    let prepared = serve::prepare(options, config, weights)?;
    if args.check {
        out!("{}", serde_json::to_string_pretty(&prepared.describe())?);
        return Ok(());
    }
    serve::run(prepared)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("12GiB").unwrap(), 12 << 30);
        assert_eq!(parse_bytes("800 MiB").unwrap(), 800 << 20);
        assert_eq!(parse_bytes("1.5GB").unwrap(), 1_500_000_000);
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert!(parse_bytes("12 parsecs").is_err());
        assert!(parse_bytes("0").is_err());
        assert!(parse_bytes("GiB").is_err());
    }
}
