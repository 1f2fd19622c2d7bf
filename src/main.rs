//! `vista3d` command-line interface.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tch::{nn, Device};

use vista3d::config::{output_path, Config};
use vista3d::engines::Method;
use vista3d::pipeline::{self, Model, Settings, Weights};
use vista3d::prompts::{self, RequestPrompts};
use vista3d::{checkpoint, model, runtime, Vista3d, Vista3dConfig};

#[derive(Parser)]
#[command(
    name = "vista3d",
    version,
    about = "VISTA3D CT segmentation: inference, engines, training"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Segment one CT (NIfTI) as the MONAI bundle does; writes <output_dir>/<stem>/<stem>_trans.nii.gz.
    Infer {
        /// Input image (.nii or .nii.gz).
        #[arg(long)]
        image: Option<PathBuf>,
        #[command(flatten)]
        request: RequestArgs,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Segment every image of a folder (everything by default); skips images whose output exists.
    Batch {
        /// Folder of images.
        #[arg(long, conflicts_with = "input_list")]
        input_dir: Option<PathBuf>,
        /// File name suffix of the images in --input-dir.
        #[arg(long)]
        input_suffix: Option<String>,
        /// A text file with one image path per line, or a JSON list of paths or input_dict objects.
        #[arg(long)]
        input_list: Option<PathBuf>,
        /// Recompute images whose output already exists.
        #[arg(long)]
        overwrite: bool,
        #[command(flatten)]
        request: RequestArgs,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Time the network per method as the bundle's benchmark table: model computation (one window, random
    /// input) and end to end (sliding window over a random volume), with speedups.
    Bench {
        #[command(flatten)]
        bench: BenchArgs,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Describe a checkpoint: format, detected width, parameter counts per module.
    Info {
        /// The bundle's model.pt (torch.save of a state dict) or a .safetensors file.
        #[arg(long)]
        checkpoint: PathBuf,
        /// Load what matches and report the rest instead of failing on any mismatch.
        #[arg(long)]
        non_strict: bool,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Fail unless the checkpoint has this encoder_embed_dim.
        #[arg(long)]
        width: Option<i64>,
    },
    /// Build TensorRT engines (encoder + class head per precision) from an ONNX export; skips up-to-date ones.
    BuildEngines {
        /// Folder written by export-onnx (manifest.json, encoder.onnx, class_head.onnx).
        #[arg(long, default_value = "onnx")]
        onnx: PathBuf,
        /// Comma-separated precisions: fp16, tf32.
        #[arg(long, default_value = "fp16,tf32")]
        precision: String,
        /// Most class prompts per class-head call (more run in chunks).
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
    },
    /// Train or finetune as the bundle's train.json (+ train_continual.json); writes the best model, a resumable
    /// last.safetensors, metrics.jsonl/csv and a loss/Dice plot.
    Train {
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
    },
    /// Write a checkpoint of seeded random weights (NOT a trained model: for tests and demos).
    InitCheckpoint {
        /// encoder_embed_dim (48 is the released model's width).
        #[arg(long, default_value_t = 48)]
        width: i64,
        #[arg(long, default_value_t = 0)]
        seed: i64,
        /// Output file: .safetensors, or .pt (PyTorch state dict that torch.load and MONAI read).
        #[arg(long)]
        out: PathBuf,
    },
    /// Export the class path (encoder + automatic decoder, class head) to ONNX (opset 17) with a manifest.
    ExportOnnx {
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
    },
    /// Write a bundle-format datalist (training items with 5 folds + testing) from an image and a label folder.
    Datalist {
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
    },
    /// Evaluate a checkpoint as the bundle's evaluate.json: predictions and Dice reports (MONAI MetricsSaver files).
    Evaluate {
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
    },
}

/// Options of `vista3d bench`.
#[derive(clap::Args, Clone)]
struct BenchArgs {
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
        default_value = "fp32,tf32,amp,trt_tf32,trt_fp16,ort"
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
}

/// Prompts on the command line (they override `input_dict` of the configuration).
#[derive(clap::Args, Clone, Default)]
struct RequestArgs {
    /// Class ids or names, e.g. 3,5 or "spleen,left kidney" (default: the 117 "everything" classes).
    #[arg(long)]
    label_prompt: Option<String>,
    /// Points "x,y,z;x,y,z" in voxel indices of the input image.
    #[arg(long)]
    points: Option<String>,
    /// One label per point: 1 positive, 0 negative (2/3 for special classes, -1 ignore).
    #[arg(long)]
    point_labels: Option<String>,
}

/// Options shared by the inference subcommands.
#[derive(clap::Args, Clone)]
struct CommonArgs {
    /// The bundle's model.pt or a .safetensors checkpoint (default: ckpt_path of the configuration).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Use seeded random weights of width 16 instead of a checkpoint (demo only: the output is meaningless).
    #[arg(long, conflicts_with = "checkpoint")]
    demo_weights: bool,
    /// Output folder (default: output_dir of the configuration).
    #[arg(long)]
    output_dir: Option<PathBuf>,
    /// JSON configuration files, layered in order over configs/inference.json.
    #[arg(long = "config")]
    configs: Vec<PathBuf>,
    /// Overrides applied last, e.g. --set overlap=0.5 --set patch_size=[96,96,96].
    #[arg(long = "set")]
    sets: Vec<String>,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long)]
    device: Option<String>,
    /// CPU threads for libtorch (default: libtorch's choice).
    #[arg(long)]
    threads: Option<i32>,
    /// How the network runs: auto, trt_fp16, trt_tf32, amp, tf32, fp32 or ort (default: precision of the
    /// configuration, auto). A method that cannot run here falls back to libtorch with a warning.
    #[arg(long)]
    precision: Option<Method>,
    /// `ort` runs the class path through ONNX Runtime (same as --precision ort); `torch` keeps libtorch.
    #[arg(long, value_parser = ["ort", "torch"], conflicts_with = "precision")]
    backend: Option<String>,
}

impl CommonArgs {
    /// The layered configuration with the command-line options applied as the last layer.
    fn config(&self, extra_sets: &[String]) -> Result<Config> {
        let mut sets = extra_sets.to_vec();
        sets.extend(self.sets.iter().cloned());
        let mut cfg = Config::load(&self.configs, &sets)?;
        if let Some(d) = &self.output_dir {
            cfg.set(&format!(
                "output_dir={}",
                serde_json::Value::String(d.display().to_string())
            ))?;
        }
        if let Some(d) = &self.device {
            cfg.set(&format!("device={d}"))?;
        }
        let precision = match self.backend.as_deref() {
            Some("ort") => Some(Method::Ort),
            Some(_) => Some(Method::Auto),
            None => self.precision,
        };
        if let Some(p) = precision {
            cfg.set(&format!("precision={}", p.name()))?;
        }
        Ok(cfg)
    }

    fn weights(&self, settings: &Settings) -> Result<Weights> {
        if self.demo_weights {
            return Ok(Weights::Random { width: 16, seed: 0 });
        }
        match self.checkpoint.clone().or_else(|| settings.ckpt_path.clone()) {
            Some(p) => Ok(Weights::Checkpoint(p)),
            None => anyhow::bail!(
                "no checkpoint: pass --checkpoint model.pt (the bundle's models/model.pt), set ckpt_path in a config, \
                 or use --demo-weights for seeded random weights (meaningless output)"
            ),
        }
    }
}

impl RequestArgs {
    /// Command-line prompts over the configuration's `input_dict`.
    fn apply(&self, mut req: RequestPrompts) -> Result<RequestPrompts> {
        if let Some(l) = &self.label_prompt {
            req.label_prompt = Some(prompts::parse_label_prompt(l)?);
        }
        if let Some(p) = &self.points {
            req.points = Some(prompts::parse_points(p)?);
        }
        if let Some(l) = &self.point_labels {
            req.point_labels = Some(prompts::parse_point_labels(l)?);
        }
        Ok(req)
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    runtime::init_cuda();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Info {
            checkpoint,
            non_strict,
            json,
            width,
        } => info(&checkpoint, !non_strict, json, width),
        Command::InitCheckpoint { width, seed, out } => init_checkpoint(width, seed, &out),
        Command::Bench { bench, common } => run_bench(&bench, &common),
        Command::ExportOnnx {
            checkpoint,
            random_width,
            seed,
            out,
            verify,
            threads,
        } => vista3d::engines::onnx::export_command(&vista3d::engines::onnx::ExportRequest {
            checkpoint,
            random_width,
            seed,
            out,
            verify,
            threads,
        }),
        Command::BuildEngines {
            onnx,
            precision,
            max_prompt_size,
            out,
            patch,
            sw_batch_size,
            device,
            optimization_level,
        } => {
            use vista3d::engines::tensorrt as trt;
            let opts = trt::BuildOptions {
                onnx_dir: onnx,
                out_dir: out,
                precisions: trt::Precision::parse_list(&precision)?,
                max_prompt_size,
                patch: trt::parse_patch(&patch)?,
                sw_batch_size,
                device,
                optimization_level,
            };
            trt::report(&trt::build_engines(&opts)?)
        }
        Command::Train {
            configs,
            sets,
            resume,
            device,
            threads,
        } => vista3d::training::trainer::run_cli(&configs, &sets, resume, device, threads),
        Command::Datalist {
            images,
            labels,
            out,
            seed,
            folds,
            test_fraction,
        } => {
            let opts = vista3d::training::datalist::DatalistOptions {
                images,
                labels,
                out,
                seed,
                folds,
                test_fraction,
            };
            vista3d::training::datalist::make_datalist(&opts)?;
            println!("wrote {}", opts.out.display());
            Ok(())
        }
        Command::Evaluate {
            checkpoint,
            testing,
            configs,
            sets,
            output_dir,
            device,
        } => vista3d::training::evaluate::evaluate_command(
            &configs,
            &sets,
            checkpoint.as_deref(),
            output_dir.as_deref(),
            device.as_deref(),
            testing,
        ),
        Command::Infer {
            image,
            request,
            common,
        } => infer(image, &request, &common),
        Command::Batch {
            input_dir,
            input_suffix,
            input_list,
            overwrite,
            request,
            common,
        } => batch(
            input_dir,
            input_suffix,
            input_list,
            overwrite,
            &request,
            &common,
        ),
    }
}

fn prepare(common: &CommonArgs, extra_sets: &[String]) -> Result<(Config, Settings, Model)> {
    if let Some(n) = common.threads {
        anyhow::ensure!(n > 0, "--threads must be positive");
        tch::set_num_threads(n);
    }
    let cfg = common.config(extra_sets)?;
    let settings = Settings::from_config(&cfg)?;
    let model = Model::load(&common.weights(&settings)?, settings.device()?)?;
    Ok((cfg, settings, model))
}

fn infer(image: Option<PathBuf>, request: &RequestArgs, common: &CommonArgs) -> Result<()> {
    let cfg = common.config(&[])?;
    let (cfg_image, req) = cfg.input_dict()?;
    let image = image
        .or(cfg_image)
        .context("no image: pass --image CT.nii.gz (or input_dict#image in a config)")?;
    let req = request.apply(req)?;
    // Check the prompts before loading anything.
    pipeline::resolve_prompts(&req, &Settings::from_config(&cfg)?)?;
    let (_, settings, model) = prepare(common, &[])?;
    let out = pipeline::run_one(&model, &image, &req, None, &settings)?;
    println!("wrote {} ({:.1} s)", out.output.display(), out.seconds);
    Ok(())
}

fn run_bench(args: &BenchArgs, common: &CommonArgs) -> Result<()> {
    if let Some(n) = common.threads {
        anyhow::ensure!(n > 0, "--threads must be positive");
        tch::set_num_threads(n);
    }
    let cfg = common.config(&[])?;
    let settings = Settings::from_config(&cfg)?;
    let weights = match args.random_width {
        Some(width) => Weights::Random { width, seed: 0 },
        None if common.checkpoint.is_some()
            || common.demo_weights
            || settings.ckpt_path.is_some() =>
        {
            common.weights(&settings)?
        }
        None => Weights::Random { width: 48, seed: 0 },
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
    let model = Model::load(&weights, settings.device()?)?;
    vista3d::runtime::torch_switches::set_cudnn_benchmark(true);
    let opts = vista3d::bench::BenchOptions {
        methods: args.methods.clone(),
        volume,
        labels: args.labels.clone(),
        runs: args.runs,
        e2e_runs: args.e2e_runs,
        warmup: args.warmup,
    };
    let report = vista3d::bench::run(&model, &settings, &opts)?;
    print!("{}", vista3d::bench::format_table(&report));
    if let Some(path) = &args.json {
        vista3d::fsutil::write_atomic(path, serde_json::to_string_pretty(&report)?.as_bytes())?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// One batch item: an image and its prompts.
struct BatchItem {
    image: PathBuf,
    request: RequestPrompts,
    /// `precision` of a JSON list item (overrides the configuration's).
    precision: Option<Method>,
}

fn batch_items(
    input_dir: Option<PathBuf>,
    input_suffix: Option<String>,
    input_list: Option<PathBuf>,
    cfg: &Config,
    request: &RequestArgs,
) -> Result<Vec<BatchItem>> {
    let (_, base_req) = cfg.input_dict()?;
    let base_req = request.apply(base_req)?;
    if let Some(list) = input_list {
        let text = std::fs::read_to_string(&list)
            .with_context(|| format!("cannot read --input-list {}", list.display()))?;
        let base = list.parent().unwrap_or(std::path::Path::new("."));
        let resolve = |p: &str| {
            let p = PathBuf::from(p);
            if p.is_absolute() {
                p
            } else {
                base.join(p)
            }
        };
        if let Ok(serde_json::Value::Array(items)) =
            serde_json::from_str::<serde_json::Value>(&text)
        {
            return items
                .iter()
                .enumerate()
                .map(|(i, item)| match item {
                    serde_json::Value::String(s) => {
                        Ok(BatchItem { image: resolve(s), request: base_req.clone(), precision: None })
                    }
                    serde_json::Value::Object(fields) => {
                        let precision = match fields.get("precision") {
                            None => None,
                            Some(serde_json::Value::String(p)) => Some(
                                p.parse::<Method>().with_context(|| format!("--input-list item {i}"))?,
                            ),
                            Some(other) => anyhow::bail!(
                                "--input-list item {i}: \"precision\" must be a string, got {other}"
                            ),
                        };
                        let mut fields = fields.clone();
                        fields.remove("precision");
                        let c = Config { value: serde_json::json!({ "input_dict": fields }) };
                        let (image, req) = c.input_dict()?;
                        let image = image.with_context(|| format!("--input-list item {i} has no \"image\""))?;
                        Ok(BatchItem { image: resolve(&image.to_string_lossy()), request: req, precision })
                    }
                    other => anyhow::bail!("--input-list item {i} must be a path or an object with \"image\", got {other}"),
                })
                .collect();
        }
        return Ok(text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| BatchItem {
                image: resolve(l),
                request: base_req.clone(),
                precision: None,
            })
            .collect());
    }
    let dir = input_dir
        .or(cfg.path("input_dir")?)
        .context("no input: pass --input-dir DIR or --input-list FILE")?;
    let suffix = input_suffix
        .or(cfg.string("input_suffix")?)
        .unwrap_or_else(|| ".nii.gz".into());
    let mut images: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("cannot list --input-dir {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().ends_with(suffix.as_str()))
        })
        .collect();
    images.sort();
    anyhow::ensure!(
        !images.is_empty(),
        "no '*{suffix}' images in {}",
        dir.display()
    );
    Ok(images
        .into_iter()
        .map(|image| BatchItem {
            image,
            request: base_req.clone(),
            precision: None,
        })
        .collect())
}

fn batch(
    input_dir: Option<PathBuf>,
    input_suffix: Option<String>,
    input_list: Option<PathBuf>,
    overwrite: bool,
    request: &RequestArgs,
    common: &CommonArgs,
) -> Result<()> {
    let cfg = common.config(&[])?;
    let items = batch_items(input_dir, input_suffix, input_list, &cfg, request)?;
    let (_, settings, model) = prepare(common, &[])?;
    let total = items.len();
    let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        let bar = indicatif::ProgressBar::new(total as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} images, elapsed {elapsed}, ETA {eta} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Some(bar)
    } else {
        None
    };
    let (mut done, mut skipped, mut failed) = (0usize, 0usize, Vec::new());
    for (i, item) in items.iter().enumerate() {
        let out = output_path(&settings.output_dir, &item.image, &settings.output_postfix);
        if !overwrite && out.is_file() {
            skipped += 1;
            log::info!(
                "[{}/{total}] {}: output exists, skipped",
                i + 1,
                item.image.display()
            );
        } else {
            match pipeline::run_one(
                &model,
                &item.image,
                &item.request,
                item.precision,
                &settings,
            ) {
                Ok(o) => {
                    done += 1;
                    if bar.is_none() {
                        log::info!(
                            "[{}/{total}] {} -> {} ({:.1} s)",
                            i + 1,
                            item.image.display(),
                            o.output.display(),
                            o.seconds
                        );
                    }
                }
                Err(e) => {
                    log::error!("[{}/{total}] {}: {e:#}", i + 1, item.image.display());
                    failed.push((item.image.clone(), format!("{e:#}")));
                }
            }
        }
        if let Some(bar) = &bar {
            bar.inc(1);
        }
    }
    if let Some(bar) = bar {
        bar.finish();
    }
    println!(
        "{done} segmented, {skipped} skipped (output exists), {} failed, of {total}",
        failed.len()
    );
    if !failed.is_empty() {
        for (image, err) in &failed {
            eprintln!("failed: {}: {err}", image.display());
        }
        anyhow::bail!("{} of {total} images failed", failed.len());
    }
    Ok(())
}

/// Formats an integer with thousands separators.
fn thousands(n: i64) -> String {
    let s = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

fn info(path: &std::path::Path, strict: bool, json: bool, width: Option<i64>) -> Result<()> {
    let options = vista3d::LoadOptions::default()
        .allow_partial(!strict)
        .expect_width(width);
    let loaded = vista3d::load_model(path, Device::Cpu, &options)?;
    let (vs, config, report) = (&loaded.vs, loaded.net.config, &loaded.report);
    let counts = model::parameter_counts(vs);
    let elements = loaded.elements;
    if json {
        let modules: Vec<_> = counts
            .iter()
            .map(|c| serde_json::json!({"module": c.module, "parameters": c.parameters, "buffer_elements": c.buffer_elements}))
            .collect();
        let out = serde_json::json!({
            "checkpoint": path.display().to_string(),
            "format": loaded.format.to_string(),
            "tensors": loaded.tensors,
            "elements": elements,
            "encoder_embed_dim": config.embed_dim,
            "in_channels": config.in_channels,
            "n_classes": config.n_classes,
            "strict": strict,
            "loaded": report.loaded,
            "missing": report.missing,
            "unexpected": report.unexpected,
            "mismatched": report.mismatched.iter().map(|(n, _, _)| n).collect::<Vec<_>>(),
            "stripped_prefix": report.stripped_prefix,
            "modules": modules,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("checkpoint:        {}", path.display());
    println!("format:            {}", loaded.format);
    println!(
        "tensors:           {} ({} elements)",
        loaded.tensors,
        thousands(elements as i64)
    );
    println!(
        "encoder_embed_dim: {}{}",
        config.embed_dim,
        if config.embed_dim == 48 {
            " (the released VISTA3D width)"
        } else {
            ""
        }
    );
    println!("in_channels:       {}", config.in_channels);
    println!("class embeddings:  {}", config.n_classes);
    println!("libtorch CUDA:     {} device(s)", tch::Cuda::device_count());
    if let Some(p) = &report.stripped_prefix {
        println!("key prefix:        '{p}' removed from every key");
    }
    if report.is_exact() {
        println!(
            "load:              all {} tensors match vista3d132(encoder_embed_dim={})",
            report.loaded, config.embed_dim
        );
    } else {
        println!(
            "load:              non-strict: {} loaded, {} missing, {} unexpected, {} wrong shape",
            report.loaded,
            report.missing.len(),
            report.unexpected.len(),
            report.mismatched.len()
        );
    }
    println!();
    println!("{:<40} {:>14} {:>8}", "module", "parameters", "buffers");
    for c in &counts {
        let indent = if c.module == "total" {
            0
        } else {
            c.module.matches('.').count() * 2
        };
        let name = format!("{}{}", " ".repeat(indent), c.module);
        println!(
            "{:<40} {:>14} {:>8}",
            name,
            thousands(c.parameters),
            thousands(c.buffer_elements)
        );
    }
    Ok(())
}

fn init_checkpoint(width: i64, seed: i64, out: &std::path::Path) -> Result<()> {
    tch::manual_seed(seed);
    let vs = nn::VarStore::new(Device::Cpu);
    Vista3d::new(&vs.root(), Vista3dConfig::with_width(width))?;
    let mut tensors: Vec<(String, checkpoint::RawTensor)> = Vec::new();
    let mut vars: Vec<(String, tch::Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, t) in vars {
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        let values: Vec<f32> = Vec::try_from(t.detach().flatten(0, -1).to_kind(tch::Kind::Float))?;
        tensors.push((name, checkpoint::RawTensor::from_f32(shape, &values)));
    }
    let is_pt = out.extension().is_some_and(|e| e == "pt" || e == "pth");
    if is_pt {
        checkpoint::write_torch_state_dict(out, &tensors)?;
    } else {
        let meta = std::collections::HashMap::from([
            (
                "vista3d.weights".to_string(),
                format!("seeded random initialisation (seed {seed}), not trained"),
            ),
            ("vista3d.encoder_embed_dim".to_string(), width.to_string()),
        ]);
        checkpoint::write_safetensors(out, &tensors, Some(meta))?;
    }
    println!(
        "wrote {} (random weights, width {width}, seed {seed}; not a trained model)",
        out.display()
    );
    Ok(())
}
