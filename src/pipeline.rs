//! Request-level orchestration shared by `vista3d infer` and `vista3d batch`: model selection, one image in,
//! one label map (plus a JSON record of what was done) out.

use std::cell::{OnceCell, RefCell};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use tch::{nn, Device};

use crate::config::{output_path, Config};
use crate::engines::runner::{MethodReport, WindowRunner};
use crate::engines::{self, EngineContext, Method, WindowEngine};
use crate::inference::{self, WindowSettings};
use crate::io::{read_nifti, write_nifti, OutputDtype};
use crate::model::Vista3d;
use crate::prompts::{self, LabelTable, Prompts, RequestPrompts};
use crate::transforms::PreprocessConfig;
use crate::{runtime, Vista3dConfig};

/// Where the weights come from.
#[derive(Debug, Clone)]
pub enum Weights {
    /// A checkpoint file (`model.pt` or `.safetensors`).
    Checkpoint(PathBuf),
    /// Seeded random weights of the given width: for demos and tests only, the output means nothing.
    Random { width: i64, seed: i64 },
}

/// How a request method is served: an open engine (if any), the libtorch method, and why it stepped down.
struct Choice {
    engine: Option<Box<dyn WindowEngine>>,
    torch: Method,
    notes: Vec<String>,
}

/// A loaded network ready for requests, with the engines opened for it so far (kept across a batch).
pub struct Model {
    pub net: Vista3d,
    pub device: Device,
    pub weights: Weights,
    vs: nn::VarStore,
    fingerprint: OnceCell<String>,
    choices: RefCell<HashMap<Method, Choice>>,
}

impl Model {
    /// Loads the weights on `device` (strict checkpoint loading).
    pub fn load(weights: &Weights, device: Device) -> Result<Self> {
        let (vs, net) = match weights {
            Weights::Checkpoint(path) => {
                let m = crate::load_model(path, device, &crate::LoadOptions::default())?;
                (m.vs, m.net)
            }
            Weights::Random { width, seed } => {
                log::warn!("using seeded RANDOM weights (width {width}, seed {seed}): the segmentation is meaningless");
                tch::manual_seed(*seed);
                let vs = nn::VarStore::new(device);
                let net = Vista3d::new(&vs.root(), Vista3dConfig::with_width(*width))?;
                (vs, net)
            }
        };
        Ok(Self {
            net,
            device,
            weights: weights.clone(),
            vs,
            fingerprint: OnceCell::new(),
            choices: RefCell::new(HashMap::new()),
        })
    }

    /// The parameters, under MONAI's names.
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    /// The weights' fingerprint (computed once): what exported ONNX files and engines are keyed by.
    pub fn weights_fingerprint(&self) -> String {
        self.fingerprint
            .get_or_init(|| engines::fingerprint::weights_fingerprint(&self.vs))
            .clone()
    }

    /// Where this model's engines are and what they must match.
    pub fn engine_context_for(&self, settings: &Settings) -> EngineContext {
        EngineContext {
            onnx_dir: settings.onnx_dir.clone(),
            engines_dir: settings.engines_dir.clone(),
            weights_fingerprint: self.weights_fingerprint(),
            device: self.device,
            patch_size: settings.window.patch_size,
            max_prompt_size: settings.max_prompt_size,
            sw_batch_size: settings.window.sw_batch_size,
        }
    }

    /// The engine context for `method`, refusing early (before hashing the weights) when the export or
    /// engine folder is missing.
    pub fn engine_context_checked(
        &self,
        method: Method,
        settings: &Settings,
    ) -> Result<EngineContext> {
        if method == Method::Ort {
            let manifest = settings.onnx_dir.join("manifest.json");
            if !manifest.is_file() {
                bail!(
                    "no ONNX export: {} not found (run `vista3d export-onnx --checkpoint ... --out {}`)",
                    manifest.display(),
                    settings.onnx_dir.display()
                );
            }
        }
        if method.is_tensorrt() && !settings.engines_dir.is_dir() {
            bail!(
                "no TensorRT engines: {} not found (run `vista3d build-engines --out {}`)",
                settings.engines_dir.display(),
                settings.engines_dir.display()
            );
        }
        Ok(self.engine_context_for(settings))
    }

    /// Runs `f` with the network of a request for `method`: the engine is opened on first use and kept for
    /// the next requests; a method that cannot run steps down to libtorch (recorded in the report).
    pub fn with_runner<T>(
        &self,
        method: Method,
        settings: &Settings,
        f: impl FnOnce(&WindowRunner) -> Result<T>,
    ) -> Result<(T, MethodReport)> {
        let cached = self.choices.borrow_mut().remove(&method);
        let choice = cached.unwrap_or_else(|| {
            let (engine, torch, notes) = engines::choose(method, self.device.is_cuda(), &mut |m| {
                self.engine_context_checked(m, settings)
            });
            Choice {
                engine,
                torch,
                notes,
            }
        });
        let runner = WindowRunner::new(
            &self.net,
            self.device,
            method,
            choice.engine,
            choice.torch,
            choice.notes.clone(),
        );
        let out = f(&runner);
        let (engine, report) = runner.into_parts();
        self.choices.borrow_mut().insert(
            method,
            Choice {
                engine,
                torch: choice.torch,
                notes: choice.notes,
            },
        );
        Ok((out?, report))
    }
}

/// Everything the inference subcommands read from the layered configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub window: WindowSettings,
    pub preprocess: PreprocessConfig,
    pub everything: Vec<i64>,
    pub subclass: std::collections::BTreeMap<i64, Vec<i64>>,
    pub output_dir: PathBuf,
    pub output_postfix: String,
    pub output_dtype: OutputDtype,
    pub device: String,
    pub ckpt_path: Option<PathBuf>,
    /// `precision`: how the network runs (`auto` by default).
    pub precision: Method,
    /// `onnx_dir`: where `vista3d export-onnx` wrote the ONNX models.
    pub onnx_dir: PathBuf,
    /// `engines_dir`: where `vista3d build-engines` wrote the TensorRT engines.
    pub engines_dir: PathBuf,
    /// `max_prompt_size`: the largest prompt batch of one class-head engine call.
    pub max_prompt_size: usize,
}

impl Settings {
    pub fn from_config(cfg: &Config) -> Result<Self> {
        let preprocess = PreprocessConfig {
            spacing: cfg.resample_spacing()?,
            ..PreprocessConfig::default()
        };
        let (output_dir, output_postfix, output_dtype) = cfg.output_settings()?;
        Ok(Self {
            window: cfg.window_settings()?,
            preprocess,
            everything: cfg.everything_labels()?,
            subclass: cfg.subclass()?,
            output_dir,
            output_postfix,
            output_dtype,
            device: cfg.string("device")?.unwrap_or_else(|| "auto".into()),
            ckpt_path: cfg.path("ckpt_path")?,
            precision: cfg
                .string("precision")?
                .as_deref()
                .unwrap_or("auto")
                .parse()
                .context("config key precision")?,
            onnx_dir: cfg
                .path("onnx_dir")?
                .unwrap_or_else(|| PathBuf::from("onnx")),
            engines_dir: cfg
                .path("engines_dir")?
                .unwrap_or_else(|| PathBuf::from("engines")),
            max_prompt_size: match cfg.int("max_prompt_size")? {
                None => 4,
                Some(n) if n >= 1 => n as usize,
                Some(n) => bail!("max_prompt_size must be at least 1, got {n}"),
            },
        })
    }

    /// The device named by `device`.
    pub fn device(&self) -> Result<Device> {
        runtime::parse_device(&self.device)
    }
}

/// Resolves a request's prompts with the configured everything labels and subclasses.
pub fn resolve_prompts(req: &RequestPrompts, settings: &Settings) -> Result<Prompts> {
    prompts::resolve(
        req,
        &LabelTable::bundle(),
        &settings.subclass,
        &settings.everything,
    )
}

/// What one request produced.
pub struct Outcome {
    pub output: PathBuf,
    pub seconds: f64,
}

/// Segments one image and writes `<output_dir>/<stem>/<stem>_<postfix>.nii.gz` plus `<stem>_<postfix>.json`
/// (prompts, weights, device, timings). Nothing is written when any step fails.
pub fn run_one(
    model: &Model,
    image: &Path,
    req: &RequestPrompts,
    precision: Option<Method>,
    settings: &Settings,
) -> Result<Outcome> {
    let t0 = Instant::now();
    let prompts = resolve_prompts(req, settings)?;
    let input = read_nifti(image)?;
    if let Some(points) = &prompts.points {
        let d = input.volume.dims();
        for p in points {
            if (0..3).any(|a| p[a] < 0.0 || p[a] > (d[a] - 1) as f64) {
                bail!(
                    "point {:?} is outside the image {}, whose voxel indices run from 0 to {:?}",
                    p,
                    image.display(),
                    d.map(|s| s - 1)
                );
            }
        }
    }
    let t_read = t0.elapsed().as_secs_f64();
    let method = precision.unwrap_or(settings.precision);
    let (seg, report) = model
        .with_runner(method, settings, |net| {
            inference::segment(
                net,
                model.device,
                &input.volume,
                &prompts,
                &settings.preprocess,
                &settings.window,
            )
        })
        .with_context(|| format!("segmenting {}", image.display()))?;
    log::info!(
        "{}: precision {} -> ran {}",
        image.display(),
        method,
        crate::engines::runner::used_names(&report)
    );
    let out = output_path(&settings.output_dir, image, &settings.output_postfix);
    let t = Instant::now();
    write_nifti(&out, &seg.labels, &input.header, settings.output_dtype)?;
    let t_write = t.elapsed().as_secs_f64();
    let mut timings: serde_json::Map<String, serde_json::Value> = serde_json::Map::new();
    timings.insert("read".into(), t_read.into());
    for (k, v) in &seg.timings {
        timings.insert((*k).into(), (*v).into());
    }
    timings.insert("write".into(), t_write.into());
    let weights = match &model.weights {
        Weights::Checkpoint(p) => serde_json::json!({"checkpoint": p.display().to_string()}),
        Weights::Random { width, seed } => {
            serde_json::json!({"random": true, "width": width, "seed": seed, "note": "seeded random weights: not a trained model"})
        }
    };
    let record = serde_json::json!({
        "image": image.display().to_string(),
        "output": out.display().to_string(),
        "label_prompt": prompts.label_prompt,
        "points": prompts.points,
        "point_labels": prompts.point_labels,
        "weights": weights,
        "device": format!("{:?}", model.device),
        "precision": report,
        "patch_size": settings.window.patch_size,
        "overlap": settings.window.overlap,
        "use_point_window": settings.window.use_point_window,
        "seconds": timings,
    });
    let json_path = out.with_extension("").with_extension("json");
    crate::fsutil::write_atomic(
        &json_path,
        serde_json::to_string_pretty(&record)?.as_bytes(),
    )?;
    Ok(Outcome {
        output: out,
        seconds: t0.elapsed().as_secs_f64(),
    })
}
