//! vista3d: a deployment engine for NVIDIA/MONAI's VISTA3D 3D CT segmentation model.
//!
//! Modules follow the data flow: [`checkpoint`] (reading the bundle's `model.pt` and safetensors) ->
//! [`model`] (the network on libtorch, MONAI's names and semantics) ; [`runtime`] sets up libtorch.

pub mod batch;
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod engines;
pub mod fsutil;
pub mod inference;
pub mod io;
pub mod model;
pub mod numerics;
pub mod prompts;
pub mod runtime;
pub mod segmenter;
pub mod serve;
pub mod suggest;
pub mod training;
pub mod transforms;
pub mod volume;

use std::path::Path;

use anyhow::{Context, Result};
use tch::{nn, Device};

pub use model::{ForwardArgs, Vista3d, Vista3dConfig};

/// A network with its parameters, loaded from a checkpoint.
pub struct LoadedModel {
    pub vs: nn::VarStore,
    pub net: Vista3d,
    pub format: checkpoint::CheckpointFormat,
    pub report: model::LoadReport,
}

/// Loads a checkpoint (`.pt` as written by `torch.save(state_dict)`, or `.safetensors`), builds the network
/// of the width it holds on `device`, and copies the weights in (strict: every tensor must match).
pub fn load_model(path: &Path, device: Device, strict: bool) -> Result<LoadedModel> {
    let sd = checkpoint::read_checkpoint(path)?;
    let config = model::detect_config(&sd).with_context(|| format!("{}", path.display()))?;
    let vs = nn::VarStore::new(device);
    let net = Vista3d::new(&vs.root(), config)?;
    let report =
        model::load_weights(&vs, &sd, strict).with_context(|| format!("{}", path.display()))?;
    Ok(LoadedModel {
        vs,
        net,
        format: sd.format,
        report,
    })
}
