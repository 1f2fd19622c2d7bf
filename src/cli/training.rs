//! `vista3d train`, `vista3d evaluate`, `vista3d datalist`.

use std::path::PathBuf;

use anyhow::Result;
use vista3d::engines::Method;
use vista3d::training::datalist::{make_datalist, DatalistOptions};

use super::out;

/// Options of `vista3d train`.
#[derive(clap::Args)]
pub struct TrainArgs {
    /// JSON configuration files, layered in order (e.g. configs/train.json configs/train_continual.json).
    #[arg(long = "config")]
    configs: Vec<PathBuf>,
    /// Overrides applied last, e.g. --set epochs=10 --set patch_size=[64,64,64].
    #[arg(long = "set")]
    sets: Vec<String>,
    /// Continue from ckpt_dir/last.safetensors (same configuration).
    #[arg(long)]
    resume: bool,
    /// cpu, cuda, cuda:N or auto (overrides the configuration's device).
    #[arg(long)]
    device: Option<String>,
    /// CPU threads for libtorch (default: libtorch's choice).
    #[arg(long)]
    threads: Option<i32>,
}

/// Options of `vista3d datalist`.
#[derive(clap::Args)]
pub struct DatalistArgs {
    /// Folder of images (.nii/.nii.gz).
    #[arg(long)]
    images: PathBuf,
    /// Folder of labels with the same file names.
    #[arg(long)]
    labels: PathBuf,
    /// Output JSON file.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 5)]
    folds: usize,
    /// Fraction of the pairs held out as `testing`.
    #[arg(long, default_value_t = 0.2)]
    test_fraction: f64,
}

/// Options of `vista3d evaluate`.
#[derive(clap::Args)]
pub struct EvaluateArgs {
    /// Checkpoint (default: ckpt_path of the configuration).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Evaluate the datalist's `testing` items instead of the validation fold.
    #[arg(long)]
    testing: bool,
    /// JSON configuration files, layered in order (e.g. configs/train.json configs/train_continual.json
    /// configs/evaluate.json).
    #[arg(long = "config")]
    configs: Vec<PathBuf>,
    /// Overrides applied last, e.g. --set fold=1.
    #[arg(long = "set")]
    sets: Vec<String>,
    /// Output folder (default: output_dir of the configuration).
    #[arg(long)]
    output_dir: Option<PathBuf>,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long)]
    device: Option<String>,
    /// How the network runs, as for infer (default: precision of the configuration, auto).
    #[arg(long)]
    precision: Option<Method>,
}

pub fn train(a: TrainArgs) -> Result<()> {
    vista3d::training::trainer::run_cli(&a.configs, &a.sets, a.resume, a.device, a.threads)
}

pub fn datalist(a: DatalistArgs) -> Result<()> {
    let opts = DatalistOptions {
        images: a.images,
        labels: a.labels,
        out: a.out,
        seed: a.seed,
        folds: a.folds,
        test_fraction: a.test_fraction,
    };
    make_datalist(&opts)?;
    out!("wrote {}", opts.out.display());
    Ok(())
}

pub fn evaluate(a: EvaluateArgs) -> Result<()> {
    vista3d::training::evaluate::evaluate_command(
        &a.configs,
        &a.sets,
        a.checkpoint.as_deref(),
        a.output_dir.as_deref(),
        a.device.as_deref(),
        a.precision,
        a.testing,
    )
}
