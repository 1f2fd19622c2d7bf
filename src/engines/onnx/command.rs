//! `vista3d export-onnx`: load a checkpoint (or seeded random weights), export, optionally check the export
//! on ONNX Runtime against libtorch.

use std::path::PathBuf;

use anyhow::{bail, ensure, Result};
use tch::{nn, Device};

use super::{export_onnx, FloatType, WeightsSource};
use crate::engines::fingerprint::weights_fingerprint;
use crate::engines::ort_engine::{compare_with_torch, ort_environment, OrtEngine};
use crate::fsutil::sha256_file;
use crate::{Vista3d, Vista3dConfig};

/// Largest relative error `--verify` accepts between ONNX Runtime and libtorch (fp32).
pub const VERIFY_TOLERANCE: f64 = 1e-4;
/// Largest relative error `--verify` accepts between the float16 export on ONNX Runtime and libtorch fp32.
pub const VERIFY_FP16_TOLERANCE: f64 = 1e-2;

/// Options of `vista3d export-onnx`.
#[derive(Debug, Clone)]
pub struct ExportRequest {
    /// The bundle's model.pt or a .safetensors checkpoint.
    pub checkpoint: Option<PathBuf>,
    /// Seeded random weights of this width instead of a checkpoint (tests and demos).
    pub random_width: Option<i64>,
    /// Seed of the random weights.
    pub seed: i64,
    /// Output directory.
    pub out: PathBuf,
    /// Run ONNX Runtime on one random window and compare with libtorch after exporting.
    pub verify: bool,
    /// ONNX Runtime intra-op threads for `verify` (0: its default).
    pub threads: usize,
}

/// Runs the subcommand: prints what was written (and the verification errors).
pub fn export_command(req: &ExportRequest) -> Result<()> {
    if req.verify {
        // Fail before the export when ONNX Runtime is missing.
        ort_environment()?;
    }
    let vs_holder;
    let (net, source) = match (&req.checkpoint, req.random_width) {
        (Some(path), None) => {
            let m = crate::load_model(path, Device::Cpu, &crate::LoadOptions::default())?;
            let sha256 = sha256_file(path)?;
            vs_holder = m.vs;
            let source = WeightsSource::Checkpoint {
                path: path.display().to_string(),
                sha256,
            };
            (m.net, source)
        }
        (None, Some(width)) => {
            log::warn!(
                "exporting seeded RANDOM weights (width {width}, seed {}): not a trained model",
                req.seed
            );
            tch::manual_seed(req.seed);
            vs_holder = nn::VarStore::new(Device::Cpu);
            let net = Vista3d::new(&vs_holder.root(), Vista3dConfig::with_width(width))?;
            (net, WeightsSource::random(width, req.seed))
        }
        (Some(_), Some(_)) => bail!("give either --checkpoint or --random-width, not both"),
        (None, None) => bail!(
            "no weights: pass --checkpoint model.pt (the bundle's models/model.pt) or --random-width N for seeded random weights"
        ),
    };
    let summary = export_onnx(&vs_holder, &source, &req.out)?;
    let m = &summary.manifest;
    let fp16 = [&m.encoder_fp16, &m.class_head_fp16];
    for entry in [&m.encoder, &m.class_head]
        .into_iter()
        .chain(fp16.into_iter().flatten())
    {
        println!(
            "wrote {} ({}, {:.1} MB)",
            summary.dir.join(&entry.file).display(),
            entry.float_type,
            entry.bytes as f64 / 1e6
        );
    }
    println!(
        "wrote {} (opset {}, embed_dim {}, weights fingerprint {}, {}) in {:.1} s",
        summary.dir.join(super::MANIFEST_FILE).display(),
        m.opset,
        m.embed_dim,
        m.weights_fingerprint,
        source.describe(),
        summary.seconds
    );
    if req.verify {
        let fingerprint = weights_fingerprint(&vs_holder);
        for (float_type, tolerance, what) in [
            (FloatType::F32, VERIFY_TOLERANCE, "ONNX Runtime vs libtorch"),
            (
                FloatType::F16,
                VERIFY_FP16_TOLERANCE,
                "float16 export on ONNX Runtime vs libtorch fp32",
            ),
        ] {
            let t0 = std::time::Instant::now();
            let mut engine =
                OrtEngine::load_models(&req.out, &fingerprint, req.threads, float_type)?;
            println!(
                "ONNX Runtime loaded the {float_type} export in {:.1} s",
                t0.elapsed().as_secs_f64()
            );
            let (features, logits) = compare_with_torch(&net, &mut engine, 32, &[1, 3, 5])?;
            println!(
                "{what} on a random 32^3 window: relative error {features:.2e} (features), {logits:.2e} (logits)"
            );
            ensure!(
                features <= tolerance && logits <= tolerance,
                "{what}: disagreement beyond {tolerance:e}"
            );
        }
    }
    Ok(())
}
