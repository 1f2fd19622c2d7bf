//! Options shared by the inference subcommands, and how they become a configuration and weights.

use std::path::PathBuf;

use anyhow::{bail, Result};
use serde_json::Value;
use vista3d::config::{Config, FallbackPolicy, InferenceConfig, OutputFormat, Schema};
use vista3d::engines::Method;
use vista3d::prompts::{self, RequestPrompts};
use vista3d::segmenter::WeightsSource;

/// Prompts on the command line (they override `input_dict` of the configuration).
#[derive(clap::Args, Clone, Default)]
pub struct RequestArgs {
    /// Class ids or names, e.g. 3,5 or "spleen,left kidney" (default: the 117 "everything" classes).
    #[arg(long)]
    pub label_prompt: Option<String>,
    /// Points "x,y,z;x,y,z" in voxel indices of the input image.
    #[arg(long)]
    pub points: Option<String>,
    /// One label per point: 1 positive, 0 negative (2/3 for special classes, -1 ignore).
    #[arg(long)]
    pub point_labels: Option<String>,
}

impl RequestArgs {
    /// Command-line prompts over `req` (the configuration's `input_dict`).
    pub fn apply(&self, mut req: RequestPrompts) -> Result<RequestPrompts> {
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

/// Options shared by the inference subcommands.
#[derive(clap::Args, Clone)]
pub struct CommonArgs {
    /// The bundle's model.pt, a .safetensors checkpoint, or the trainer's last.safetensors (default: ckpt_path
    /// of the configuration).
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Use seeded random weights of width 16 instead of a checkpoint (demo only: the output is meaningless).
    #[arg(long, conflicts_with = "checkpoint")]
    pub demo_weights: bool,
    /// Output folder (default: output_dir of the configuration).
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// JSON configuration files, layered in order over configs/inference.json.
    #[arg(long = "config")]
    pub configs: Vec<PathBuf>,
    /// Overrides applied last, e.g. --set overlap=0.5 --set patch_size=[96,96,96].
    #[arg(long = "set")]
    pub sets: Vec<String>,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long)]
    pub device: Option<String>,
    /// CPU threads for libtorch (default: libtorch's choice).
    #[arg(long)]
    pub threads: Option<i32>,
    /// How the network runs: auto, trt_fp16, trt_tf32, amp, tf32, fp32 or ort (default: precision of the
    /// configuration, auto). A method that cannot run here falls back to libtorch with a warning, unless
    /// --precision-fallback deny.
    #[arg(long)]
    pub precision: Option<Method>,
    /// `ort` runs the class path through ONNX Runtime (same as --precision ort); `torch` keeps libtorch.
    #[arg(long, value_parser = ["ort", "torch"], conflicts_with = "precision")]
    pub backend: Option<String>,
    /// allow (default): a method that cannot run falls back to libtorch; deny: the request fails instead.
    #[arg(long)]
    pub precision_fallback: Option<FallbackPolicy>,
    /// Cache of ONNX exports, TensorRT engines and fingerprints (default: $XDG_CACHE_HOME/vista3d).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// ONNX export folder (default: in the cache, keyed by the weights).
    #[arg(long)]
    pub onnx_dir: Option<PathBuf>,
    /// TensorRT engine folder (default: in the cache, keyed by the weights).
    #[arg(long)]
    pub engines_dir: Option<PathBuf>,
    /// nifti (default), dicom-seg or both: a DICOM SEG beside the NIfTI label map (DICOM inputs).
    #[arg(long)]
    pub output_format: Option<OutputFormat>,
    /// DICOM inputs: the SeriesInstanceUID to read (default: the CT series with the most slices).
    #[arg(long)]
    pub series_uid: Option<String>,
    /// DICOM inputs: a modality accepted besides CT (repeatable), e.g. --allow-modality MR.
    #[arg(long = "allow-modality")]
    pub allow_modalities: Vec<String>,
}

fn path_value(p: &std::path::Path) -> Value {
    Value::String(p.display().to_string())
}

impl CommonArgs {
    /// The layered configuration (`configs/inference.json`, `--config` files, `--set`s, then the flags), each
    /// layer checked for unknown keys.
    pub fn config(&self) -> Result<Config> {
        if let Some(n) = self.threads {
            anyhow::ensure!(n > 0, "--threads must be positive, got {n}");
            tch::set_num_threads(n);
        }
        let mut cfg = Config::load_for(Schema::Inference, &self.configs, &self.sets)?;
        if let Some(d) = &self.output_dir {
            cfg.set_flag("--output-dir", "output_dir", path_value(d))?;
        }
        if let Some(d) = &self.device {
            cfg.set_flag("--device", "device", d.as_str().into())?;
        }
        let precision = match self.backend.as_deref() {
            Some("ort") => Some(Method::Ort),
            Some(_) => Some(Method::Auto),
            None => self.precision,
        };
        if let Some(p) = precision {
            cfg.set_flag("--precision", "precision", p.name().into())?;
        }
        if let Some(p) = self.precision_fallback {
            let name = match p {
                FallbackPolicy::Allow => "allow",
                FallbackPolicy::Deny => "deny",
            };
            cfg.set_flag("--precision-fallback", "precision_fallback", name.into())?;
        }
        if let Some(f) = self.output_format {
            cfg.set_flag("--output-format", "output_format", serde_json::to_value(f)?)?;
        }
        if let Some(u) = &self.series_uid {
            cfg.set_flag("--series-uid", "series_uid", u.as_str().into())?;
        }
        if !self.allow_modalities.is_empty() {
            cfg.set_flag(
                "--allow-modality",
                "allow_modalities",
                serde_json::to_value(&self.allow_modalities)?,
            )?;
        }
        for (flag, key, v) in [
            ("--cache-dir", "cache_dir", &self.cache_dir),
            ("--onnx-dir", "onnx_dir", &self.onnx_dir),
            ("--engines-dir", "engines_dir", &self.engines_dir),
        ] {
            if let Some(d) = v {
                cfg.set_flag(flag, key, path_value(d))?;
            }
        }
        Ok(cfg)
    }

    /// Where the weights come from: `--demo-weights`, `--checkpoint`, else `ckpt_path`.
    pub fn weights(&self, config: &InferenceConfig) -> Result<WeightsSource> {
        if self.demo_weights {
            return Ok(WeightsSource::Random { width: 16, seed: 0 });
        }
        match self.checkpoint.clone().or_else(|| config.ckpt_path.clone()) {
            Some(p) => Ok(WeightsSource::Checkpoint(p)),
            None => bail!(
                "no checkpoint: pass --checkpoint model.pt (the bundle's models/model.pt), set ckpt_path in a config, \
                 or use --demo-weights for seeded random weights (meaningless output)"
            ),
        }
    }
}
