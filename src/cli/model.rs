//! `vista3d info` and `vista3d init-checkpoint`.

use std::path::PathBuf;

use anyhow::Result;
use tch::{nn, Device};
use vista3d::{checkpoint, model, Vista3d, Vista3dConfig};

use super::out;

/// Options of `vista3d info`.
#[derive(clap::Args)]
pub struct InfoArgs {
    /// The bundle's model.pt (torch.save of a state dict) or a .safetensors file.
    #[arg(long, required_unless_present = "engines")]
    checkpoint: Option<PathBuf>,
    /// Say which methods (`--precision`) this binary can run on this machine, and why not (ONNX Runtime and
    /// TensorRT libraries found, CUDA devices); needs no checkpoint.
    #[arg(long)]
    engines: bool,
    /// Load what matches and report the rest instead of failing on any mismatch.
    #[arg(long)]
    non_strict: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Fail unless the checkpoint has this encoder_embed_dim.
    #[arg(long)]
    width: Option<i64>,
}

/// Options of `vista3d init-checkpoint`.
#[derive(clap::Args)]
pub struct InitCheckpointArgs {
    /// encoder_embed_dim (48 is the released model's width).
    #[arg(long, default_value_t = 48)]
    width: i64,
    #[arg(long, default_value_t = 0)]
    seed: i64,
    /// Output file: .safetensors, or .pt (PyTorch state dict that torch.load and MONAI read).
    #[arg(long)]
    out: PathBuf,
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

pub fn info(args: InfoArgs) -> Result<()> {
    if args.engines {
        let report =
            vista3d::engines::availability::assess(&vista3d::engines::availability::probe());
        if args.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            println!("{report}");
        }
    }
    let Some(path) = &args.checkpoint else {
        return Ok(());
    };
    let strict = !args.non_strict;
    let options = vista3d::LoadOptions::default()
        .allow_partial(!strict)
        .expect_width(args.width);
    let loaded = vista3d::load_model(path, Device::Cpu, &options)?;
    let (vs, config, report) = (&loaded.vs, loaded.net.config, &loaded.report);
    let counts = model::parameter_counts(vs);
    let elements = loaded.elements;
    if args.json {
        let modules: Vec<_> = counts
            .iter()
            .map(|c| serde_json::json!({"module": c.module, "parameters": c.parameters, "buffer_elements": c.buffer_elements}))
            .collect();
        let json = serde_json::json!({
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
        out!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(());
    }
    out!("checkpoint:        {}", path.display());
    out!("format:            {}", loaded.format);
    out!(
        "tensors:           {} ({} elements)",
        loaded.tensors,
        thousands(elements as i64)
    );
    out!(
        "encoder_embed_dim: {}{}",
        config.embed_dim,
        if config.embed_dim == 48 {
            " (the released VISTA3D width)"
        } else {
            ""
        }
    );
    out!("in_channels:       {}", config.in_channels);
    out!("class embeddings:  {}", config.n_classes);
    out!("libtorch CUDA:     {} device(s)", tch::Cuda::device_count());
    if let Some(p) = &report.stripped_prefix {
        out!("key prefix:        '{p}' removed from every key");
    }
    if report.is_exact() {
        out!(
            "load:              all {} tensors match vista3d132(encoder_embed_dim={})",
            report.loaded,
            config.embed_dim
        );
    } else {
        out!(
            "load:              non-strict: {} loaded, {} missing, {} unexpected, {} wrong shape",
            report.loaded,
            report.missing.len(),
            report.unexpected.len(),
            report.mismatched.len()
        );
    }
    out!("");
    out!("{:<40} {:>14} {:>8}", "module", "parameters", "buffers");
    for c in &counts {
        let indent = if c.module == "total" {
            0
        } else {
            c.module.matches('.').count() * 2
        };
        let name = format!("{}{}", " ".repeat(indent), c.module);
        out!(
            "{:<40} {:>14} {:>8}",
            name,
            thousands(c.parameters),
            thousands(c.buffer_elements)
        );
    }
    Ok(())
}

pub fn init_checkpoint(args: InitCheckpointArgs) -> Result<()> {
    let (width, seed, out) = (args.width, args.seed, &args.out);
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
    out!(
        "wrote {} (random weights, width {width}, seed {seed}; not a trained model)",
        out.display()
    );
    Ok(())
}
