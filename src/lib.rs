//! vista3d: a deployment engine for NVIDIA/MONAI's VISTA3D 3D CT segmentation model.
//!
//! Modules follow the data flow: [`checkpoint`] (reading the bundle's `model.pt` and safetensors) ->
//! [`model`] (the network on libtorch, MONAI's names and semantics) ; [`runtime`] sets up libtorch.

pub mod batch;
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod distributed;
pub mod engines;
pub mod fsutil;
pub mod inference;
pub mod io;
pub mod model;
pub mod numerics;
pub mod preview;
pub mod prompts;
pub mod runtime;
pub mod segmenter;
pub mod serve;
pub mod suggest;
pub mod training;
pub mod transforms;
pub mod volume;

use std::path::Path;

use tch::{nn, Device};

use checkpoint::{CheckpointError, TensorSource, WeightsError};
pub use model::{ForwardArgs, LoadOptions, Vista3d, Vista3dConfig};

/// A network with its parameters, loaded from a checkpoint.
pub struct LoadedModel {
    pub vs: nn::VarStore,
    pub net: Vista3d,
    pub format: checkpoint::CheckpointFormat,
    pub report: model::LoadReport,
    /// Tensors in the checkpoint's weights (for a training state: its network part).
    pub tensors: usize,
    /// Elements of those tensors.
    pub elements: usize,
}

/// Loads a checkpoint (`.pt` as written by `torch.save(state_dict)`, `.safetensors`, or the network part
/// of a `vista3d train` training state), builds the network of the width it holds on `device`, and copies
/// the weights in (strict by default: every tensor must match; see [`LoadOptions`]).
///
/// The file is memory-mapped and its tensors are copied one by one into the network, their pages released
/// as they go, so the checkpoint is never held in memory next to the network (see [`checkpoint::Checkpoint`]).
pub fn load_model(
    path: &Path,
    device: Device,
    options: &LoadOptions,
) -> Result<LoadedModel, CheckpointError> {
    let ckpt = checkpoint::Checkpoint::open(path)?;
    let config = model::detect_config(&ckpt).map_err(|e| e.in_file(path))?;
    options
        .check_width(config.embed_dim)
        .map_err(|e| e.in_file(path))?;
    let vs = nn::VarStore::new(device);
    let net = Vista3d::new(&vs.root(), config).map_err(|e| {
        WeightsError::UnsupportedNetwork {
            detail: format!("{e:#}"),
        }
        .in_file(path)
    })?;
    let report = model::load_weights(&vs, &ckpt, options).map_err(|e| e.in_file(path))?;
    let views = ckpt.tensor_views();
    Ok(LoadedModel {
        vs,
        net,
        format: ckpt.format(),
        report,
        tensors: views.len(),
        elements: views.iter().map(|v| v.numel()).sum(),
    })
}
