//! The command line: one `clap::Args` struct per subcommand, turned into the library's request types.
//! Command bodies live in the library; these modules only parse, build configurations and print.

mod batch;
mod common;
mod engines;
mod infer;
mod model;
mod serve;
mod training;

use clap::{Parser, Subcommand};

/// Prints a line to stdout; a closed pipe (`vista3d ... | head`) ends the process quietly with status 0.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::print_line(format_args!($($arg)*))
    };
}
pub(crate) use out;

/// Writes one line to stdout, exiting quietly when the reader has gone away.
pub fn print_line(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = writeln!(stdout, "{args}").and_then(|()| stdout.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: cannot write to stdout: {e}");
        std::process::exit(1);
    }
}

#[derive(Parser)]
#[command(
    name = "vista3d",
    version,
    about = "VISTA3D CT segmentation: inference, engines, training"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Segment one CT (NIfTI) as the MONAI bundle does; writes <output_dir>/<stem>/<stem>_trans.nii.gz.
    Infer(infer::InferArgs),
    /// Segment every image of a folder or list (everything by default); skips images whose output answers the
    /// same request.
    Batch(batch::BatchArgs),
    /// Summarise a batch output folder from the logs of every process that worked on it: done / failed /
    /// pending items, throughput, slowest items, failures with their errors; exits non-zero when an item failed.
    BatchReport(batch::BatchReportArgs),
    /// Time the network per method as the bundle's benchmark table: model computation (one window, random
    /// input) and end to end (a request on a random volume), with speedups.
    Bench(infer::BenchArgs),
    /// Describe a checkpoint: format, detected width, parameter counts per module.
    Info(model::InfoArgs),
    /// Build TensorRT engines (encoder + class head per precision) from an ONNX export; skips up-to-date ones.
    BuildEngines(engines::BuildEnginesArgs),
    /// Train or finetune as the bundle's train.json (+ train_continual.json); writes the best model, a resumable
    /// last.safetensors, metrics.jsonl/csv and a loss/Dice plot.
    Train(training::TrainArgs),
    /// Write a checkpoint of seeded random weights (NOT a trained model: for tests and demos).
    InitCheckpoint(model::InitCheckpointArgs),
    /// Export the class path (encoder + automatic decoder, class head) to ONNX (opset 17) with a manifest.
    ExportOnnx(engines::ExportOnnxArgs),
    /// Write a bundle-format datalist (training items with 5 folds + testing) from an image and a label folder.
    Datalist(training::DatalistArgs),
    /// Evaluate a checkpoint as the bundle's evaluate.json: predictions and Dice reports (MONAI MetricsSaver files).
    Evaluate(training::EvaluateArgs),
    /// HTTP inference server with NVIDIA's VISTA-3D NIM API: one resident model, requests queued and their
    /// windows batched on the device; health, info and Prometheus metrics endpoints.
    Serve(serve::ServeArgs),
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Infer(a) => infer::infer(a),
        Command::Batch(a) => batch::batch(a),
        Command::BatchReport(a) => batch::batch_report(a),
        Command::Bench(a) => infer::bench(a),
        Command::Info(a) => model::info(a),
        Command::BuildEngines(a) => engines::build_engines(a),
        Command::Train(a) => training::train(a),
        Command::InitCheckpoint(a) => model::init_checkpoint(a),
        Command::ExportOnnx(a) => engines::export_onnx(a),
        Command::Datalist(a) => training::datalist(a),
        Command::Evaluate(a) => training::evaluate(a),
        Command::Serve(a) => serve::serve(a),
    }
}
