//! `vista3d batch` and `vista3d batch-report`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use vista3d::batch::{self, report, shards, BatchInput, BatchOptions, Shard};
use vista3d::segmenter::{Pipeline, Segmenter};

use super::common::{CommonArgs, RequestArgs};
use super::{infer, out};

/// Options of `vista3d batch`.
#[derive(clap::Args)]
pub struct BatchArgs {
    /// Folder of images.
    #[arg(long, conflicts_with = "input_list")]
    input_dir: Option<PathBuf>,
    /// File name suffix of the images in --input-dir (default: input_suffix of the configuration, .nii.gz).
    #[arg(long)]
    input_suffix: Option<String>,
    /// Also search the subfolders of --input-dir (outputs mirror the folder structure).
    #[arg(long)]
    recursive: bool,
    /// Match --input-suffix ignoring case (CT.NII.GZ).
    #[arg(long)]
    ignore_case: bool,
    /// Treat every DICOM series under --input-dir as one item (named by its folder and SeriesInstanceUID).
    #[arg(long, conflicts_with_all = ["input_suffix", "ignore_case"])]
    dicom: bool,
    /// A text file with one image path per line, or a JSON list of paths or objects with "image" and their own
    /// prompts and "precision".
    #[arg(long)]
    input_list: Option<PathBuf>,
    /// Recompute images whose output already answers the same request.
    #[arg(long)]
    overwrite: bool,
    /// Also write a QC preview PNG beside the label map (`<stem>_trans.png`: CT with coloured class overlays in
    /// three planes, legend, point markers).
    #[arg(long)]
    preview: bool,
    /// Only the items of static shard I of N (by a stable hash of each item's relative path), e.g. 0/4.
    #[arg(long, value_name = "I/N")]
    shard: Option<Shard>,
    /// Number of shards when the index comes from the environment: a Kubernetes Indexed Job's
    /// JOB_COMPLETION_INDEX (pass the Job's completions). Slurm arrays need neither (SLURM_ARRAY_TASK_ID and
    /// SLURM_ARRAY_TASK_COUNT are read).
    #[arg(long, value_name = "N", conflicts_with = "shard")]
    shards: Option<u64>,
    /// Seconds without a heartbeat after which another worker's claim on an item is taken over (its worker is
    /// presumed dead). Claims are refreshed every quarter of this.
    #[arg(long, value_name = "SECONDS", default_value_t = 120.0)]
    claim_timeout: f64,
    /// One worker per GPU, each with its own resident model, pulling from one queue: CUDA ordinals (0,1,3) or
    /// `all`.
    #[arg(long, value_name = "LIST", conflicts_with = "workers")]
    devices: Option<String>,
    /// Workers on the CPU (or on the configured device), each with its own resident model and an equal share of
    /// the threads (--threads, default: all cores).
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
    /// Run each item's stages one after another instead of reading and preprocessing the next image while the
    /// device computes the current one (and writing in the background).
    #[arg(long)]
    no_prefetch: bool,
    #[command(flatten)]
    request: RequestArgs,
    #[command(flatten)]
    common: CommonArgs,
}

pub fn batch(args: BatchArgs) -> Result<()> {
    let config = args.common.config()?.inference()?;
    let prompts = args.request.apply(config.input_dict.prompts())?;
    let input = match (
        &args.input_list,
        args.input_dir.clone().or(config.input_dir.clone()),
    ) {
        (Some(list), _) => BatchInput::List(list.clone()),
        (None, Some(dir)) if args.dicom => BatchInput::DicomTree(dir),
        (None, Some(dir)) => BatchInput::Dir {
            dir,
            suffix: args
                .input_suffix
                .clone()
                .or(config.input_suffix.clone())
                .unwrap_or_else(|| ".nii.gz".into()),
            recursive: args.recursive,
            ignore_case: args.ignore_case,
        },
        (None, None) => anyhow::bail!("no input: pass --input-dir DIR or --input-list FILE"),
    };
    anyhow::ensure!(
        args.claim_timeout.is_finite() && args.claim_timeout > 0.0,
        "--claim-timeout must be a positive number of seconds, got {}",
        args.claim_timeout
    );
    let claim_timeout = Duration::from_secs_f64(args.claim_timeout);
    let shard = shards::detect(args.shard, args.shards, |k| std::env::var(k).ok())?;
    let items = batch::discover(&input, &prompts)?;
    let output = infer::output_spec(&config, args.preview);
    // Refuse colliding outputs and an unwritable folder before loading anything.
    batch::check_collisions(&items, &output.dir, &output.postfix)?;
    batch::check_writable(&output.dir)?;
    let weights = args.common.weights(&config)?;
    let devices = worker_devices(args.devices.as_deref(), args.workers, &config.device)?;
    if devices.len() > 1 && args.devices.is_none() {
        // --workers: split the threads between the workers.
        let share = (tch::get_num_threads().max(1) as usize / devices.len()).max(1);
        tch::set_num_threads(share as i32);
        log::info!(
            "{} workers on {} with {share} threads each",
            devices.len(),
            config.device
        );
    }
    let mut workers = Vec::with_capacity(devices.len());
    for device in devices {
        let mut config = config.clone();
        config.device = device;
        let segmenter = Segmenter::load(config, &weights, Pipeline::Bundle)?;
        infer::insist_on_method(&segmenter)?;
        workers.push(segmenter);
    }
    let opts = BatchOptions {
        shard,
        claim_timeout,
        prefetch: !args.no_prefetch,
        ..BatchOptions::new(
            output,
            args.overwrite,
            std::io::IsTerminal::is_terminal(&std::io::stderr()),
        )
    };
    let summary = batch::run(workers, &items, &opts)?;
    out!("{}", summary.line());
    if !summary.failed.is_empty() {
        for (image, err) in &summary.failed {
            eprintln!("failed: {}: {err}", image.display());
        }
        anyhow::bail!(
            "{} of {} images failed",
            summary.failed.len(),
            summary.total
        );
    }
    Ok(())
}

/// The device of each worker: `--devices 0,1` or `all` (CUDA ordinals), else `--workers N` times the configured
/// device.
fn worker_devices(
    devices: Option<&str>,
    workers: Option<usize>,
    configured: &str,
) -> Result<Vec<String>> {
    if let Some(n) = workers {
        anyhow::ensure!(n > 0, "--workers must be at least 1, got {n}");
        return Ok(vec![configured.to_string(); n]);
    }
    let Some(list) = devices else {
        return Ok(vec![configured.to_string()]);
    };
    let available = if tch::Cuda::is_available() {
        tch::Cuda::device_count().max(0) as usize
    } else {
        0
    };
    parse_devices(list, available)
}

/// Parses `--devices` against the number of CUDA devices present.
fn parse_devices(list: &str, available: usize) -> Result<Vec<String>> {
    anyhow::ensure!(
        available > 0,
        "--devices {list} needs CUDA GPUs, and this machine has none visible to libtorch; on a CPU use \
         --workers N"
    );
    if list.trim() == "all" {
        return Ok((0..available).map(|i| format!("cuda:{i}")).collect());
    }
    let mut out = Vec::new();
    for part in list.split(',').map(str::trim) {
        let part = part.strip_prefix("cuda:").unwrap_or(part);
        let i: usize = part.parse().map_err(|_| {
            anyhow::anyhow!(
                "--devices {list}: '{part}' is not a CUDA ordinal (use e.g. 0,1 or all)"
            )
        })?;
        anyhow::ensure!(
            i < available,
            "--devices {list}: GPU {i} does not exist (this machine has {available}: 0..{})",
            available - 1
        );
        let name = format!("cuda:{i}");
        anyhow::ensure!(!out.contains(&name), "--devices {list} names GPU {i} twice");
        out.push(name);
    }
    anyhow::ensure!(!out.is_empty(), "--devices is empty");
    Ok(out)
}

/// Options of `vista3d batch-report`.
#[derive(clap::Args)]
pub struct BatchReportArgs {
    /// The output folder of the batch (holding `.vista3d/items-*.jsonl`).
    output_dir: PathBuf,
    /// Print the summary as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Also write a contact sheet (PNG): each item's preview (`batch --preview`), failed items with their errors.
    #[arg(long, value_name = "PNG")]
    contact_sheet: Option<PathBuf>,
}

pub fn batch_report(args: BatchReportArgs) -> Result<()> {
    let r = report::read(&args.output_dir)?;
    if args.json {
        out!("{}", serde_json::to_string_pretty(&r.to_json())?);
    } else {
        for line in r.table().lines() {
            out!("{line}");
        }
    }
    if let Some(sheet) = &args.contact_sheet {
        let n = report::write_sheet(&r, sheet)
            .map_err(|e| anyhow::anyhow!("contact sheet {}: {e}", sheet.display()))?;
        out!("wrote {} ({n} items)", sheet.display());
    }
    let failed = r.count(&report::ItemState::Failed(String::new()));
    anyhow::ensure!(failed == 0, "{failed} of {} items failed", r.items.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_are_parsed_against_what_is_present() {
        assert_eq!(parse_devices("all", 2).unwrap(), ["cuda:0", "cuda:1"]);
        assert_eq!(parse_devices("1, cuda:0", 4).unwrap(), ["cuda:1", "cuda:0"]);
        for (list, n, needle) in [
            ("0", 0, "has none"),
            ("2", 2, "does not exist"),
            ("0,0", 2, "twice"),
            ("x", 2, "not a CUDA ordinal"),
        ] {
            let e = parse_devices(list, n).unwrap_err().to_string();
            assert!(e.contains(needle), "{list}: {e}");
        }
        assert_eq!(worker_devices(None, Some(3), "cpu").unwrap(), ["cpu"; 3]);
        assert!(worker_devices(None, Some(0), "cpu").is_err());
        assert_eq!(worker_devices(None, None, "cpu").unwrap(), ["cpu"]);
    }
}
