//! `vista3d export-onnx` and `vista3d build-engines`.

use std::path::PathBuf;

use anyhow::Result;
use vista3d::engines::onnx::{export_command, ExportRequest};
use vista3d::engines::tensorrt as trt;

/// Options of `vista3d export-onnx`.
#[derive(clap::Args)]
pub struct ExportOnnxArgs {
    /// The bundle's model.pt or a .safetensors checkpoint.
    #[arg(long, conflicts_with = "random_width")]
    checkpoint: Option<PathBuf>,
    /// Export seeded RANDOM weights of this width instead (tests and demos; labelled in the manifest).
    #[arg(long)]
    random_width: Option<i64>,
    /// Seed of --random-width.
    #[arg(long, default_value_t = 0)]
    seed: i64,
    /// Output directory (encoder.onnx, class_head.onnx, manifest.json).
    #[arg(long, default_value = "onnx")]
    out: PathBuf,
    /// Then run ONNX Runtime (ORT_DYLIB_PATH) on a random window and compare with libtorch.
    #[arg(long)]
    verify: bool,
    /// ONNX Runtime threads for --verify (0: its default).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

/// Options of `vista3d build-engines`.
#[derive(clap::Args)]
pub struct BuildEnginesArgs {
    /// Folder written by export-onnx (manifest.json, encoder.onnx, class_head.onnx).
    #[arg(long, default_value = "onnx")]
    onnx: PathBuf,
    /// Comma-separated precisions: fp16, tf32.
    #[arg(long, default_value = "fp16,tf32")]
    precision: String,
    /// Most class prompts per class-head call (more run in chunks); the engine profile that `max_prompt_size`
    /// selects at run time.
    #[arg(long, default_value_t = 4)]
    max_prompt_size: i64,
    /// Output folder for plans, sidecars and timing.cache.
    #[arg(long, default_value = "engines")]
    out: PathBuf,
    /// Window size H,W,D (the configuration's patch_size).
    #[arg(long, default_value = "128,128,128")]
    patch: String,
    /// Most windows per call (the configuration's sw_batch_size).
    #[arg(long, default_value_t = 1)]
    sw_batch_size: i64,
    /// CUDA device index.
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// TensorRT builder optimisation level 0..5.
    #[arg(long, default_value_t = 3)]
    optimization_level: i32,
}

pub fn export_onnx(a: ExportOnnxArgs) -> Result<()> {
    export_command(&ExportRequest {
        checkpoint: a.checkpoint,
        random_width: a.random_width,
        seed: a.seed,
        out: a.out,
        verify: a.verify,
        threads: a.threads,
    })
}

pub fn build_engines(a: BuildEnginesArgs) -> Result<()> {
    let opts = trt::BuildOptions {
        onnx_dir: a.onnx,
        out_dir: a.out,
        methods: trt::parse_methods(&a.precision)?,
        max_prompt_size: a.max_prompt_size,
        patch: trt::parse_patch(&a.patch)?,
        sw_batch_size: a.sw_batch_size,
        device: a.device,
        optimization_level: a.optimization_level,
    };
    trt::report(&trt::build_engines(&opts)?)
}
