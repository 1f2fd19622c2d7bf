//! `vista3d infer`, `vista3d bench` (`vista3d batch` is in [`super::batch`]).

use std::path::PathBuf;

use anyhow::{Context, Result};
use vista3d::batch::{self, BatchItem, OutputSpec};
use vista3d::bench::{self, BenchOptions};
use vista3d::engines::Method;
use vista3d::segmenter::{resolve_prompts, Pipeline, Segmenter, WeightsSource};

use super::common::{CommonArgs, RequestArgs};
use super::out;

/// Options of `vista3d infer`.
#[derive(clap::Args)]
pub struct InferArgs {
    /// Input image: a NIfTI file (.nii, .nii.gz) or a DICOM series (a folder searched recursively, or a .zip).
    #[arg(long)]
    image: Option<PathBuf>,
    /// Also write a QC preview PNG beside the label map (`<stem>_trans.png`: CT with coloured class overlays in
    /// three planes, legend, point markers).
    #[arg(long)]
    preview: bool,
    #[command(flatten)]
    request: RequestArgs,
    #[command(flatten)]
    common: CommonArgs,
}

/// Options of `vista3d bench`.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// Seeded random weights of this width instead of a checkpoint (default: 48 when no --checkpoint).
    #[arg(long, conflicts_with = "checkpoint")]
    random_width: Option<i64>,
    /// Processed volume size of the end-to-end run (the bundle's 333x333x603 CT), or "none".
    #[arg(long, default_value = "333,333,603")]
    volume: String,
    /// Methods, in table order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "fp32,tf32,amp,bf16,trt_tf32,trt_fp16,ort"
    )]
    methods: Vec<Method>,
    /// Class prompts of each call (the bundle's table uses one label).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    labels: Vec<i64>,
    /// Timed runs of the model computation (median reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Timed end-to-end runs.
    #[arg(long, default_value_t = 3)]
    e2e_runs: usize,
    /// Untimed runs first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Also write the results as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    #[command(flatten)]
    common: CommonArgs,
}

/// Where and how label maps (and their extras) are written.
pub(super) fn output_spec(config: &vista3d::config::InferenceConfig, preview: bool) -> OutputSpec {
    OutputSpec {
        dir: config.output_dir.clone(),
        postfix: config.output_postfix.clone(),
        dtype: config.output_dtype,
        format: config.output_format,
        preview,
    }
}

/// With `precision_fallback: deny`, refuses before any image is read when the configured method cannot run here.
pub(super) fn insist_on_method(segmenter: &Segmenter) -> Result<()> {
    let c = segmenter.config();
    if c.precision_fallback == vista3d::config::FallbackPolicy::Deny {
        let status = segmenter.method_status(c.precision);
        anyhow::ensure!(
            status.notes.is_empty(),
            "precision {} cannot run here and precision_fallback is deny: {}",
            c.precision,
            status.notes.join("; ")
        );
    }
    Ok(())
}

pub fn infer(args: InferArgs) -> Result<()> {
    let config = args.common.config()?.inference()?;
    let image = args
        .image
        .clone()
        .or_else(|| config.input_dict.image.as_ref().map(PathBuf::from))
        .context("no image: pass --image CT.nii.gz (or input_dict#image in a config)")?;
    let prompts = args.request.apply(config.input_dict.prompts())?;
    // Check the prompts and the output folder before loading anything.
    resolve_prompts(&prompts, &config)?;
    batch::check_writable(&config.output_dir)?;
    let weights = args.common.weights(&config)?;
    let output = output_spec(&config, args.preview);
    let mut segmenter = Segmenter::load(config, &weights, Pipeline::Bundle)?;
    segmenter.set_progress(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    insist_on_method(&segmenter)?;
    let relative = PathBuf::from(image.file_name().unwrap_or_default());
    let item = BatchItem::new(image, relative, prompts);
    let out = batch::output_path(&output.dir, &item.relative, &output.postfix);
    let identity = vista3d::segmenter::record::request_identity(
        &segmenter,
        batch::input_identity(&item),
        &item.prompts,
        segmenter.config().precision,
        output.dtype,
    );
    let run = batch::run_item(&segmenter, &item, &out, &output, identity, None)?;
    out!("wrote {} ({:.1} s)", out.display(), run.seconds);
    Ok(())
}

pub fn bench(args: BenchArgs) -> Result<()> {
    let config = args.common.config()?.inference()?;
    let weights = match args.random_width {
        Some(width) => WeightsSource::Random { width, seed: 0 },
        None if args.common.checkpoint.is_some()
            || args.common.demo_weights
            || config.ckpt_path.is_some() =>
        {
            args.common.weights(&config)?
        }
        None => WeightsSource::Random { width: 48, seed: 0 },
    };
    let volume = match args.volume.trim() {
        "none" | "" => None,
        v => {
            let dims: Vec<usize> = v
                .split(',')
                .map(|d| d.trim().parse::<usize>())
                .collect::<Result<_, _>>()
                .with_context(|| format!("--volume {v}: expected X,Y,Z or none"))?;
            anyhow::ensure!(
                dims.len() == 3 && dims.iter().all(|&d| d > 0),
                "--volume {v}: expected three positive sizes X,Y,Z"
            );
            Some([dims[0], dims[1], dims[2]])
        }
    };
    let mut segmenter = Segmenter::load(config, &weights, Pipeline::Bundle)?;
    // A bar of windows for each end-to-end run (minutes on a CPU).
    segmenter.set_progress(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let opts = BenchOptions {
        methods: args.methods.clone(),
        volume,
        labels: args.labels.clone(),
        runs: args.runs,
        e2e_runs: args.e2e_runs,
        warmup: args.warmup,
    };
    let report = bench::run(&segmenter, &opts)?;
    for line in bench::format_table(&report).lines() {
        out!("{line}");
    }
    if let Some(path) = &args.json {
        vista3d::fsutil::write_atomic(path, serde_json::to_string_pretty(&report)?.as_bytes())?;
        out!("wrote {}", path.display());
    }
    Ok(())
}
