//! Loading checkpoints (the bundle's `model.pt`, safetensors) into the network's parameters, width
//! detection, and per-module parameter counts.

use std::collections::{BTreeMap, HashMap};

use anyhow::{bail, Context, Result};
use tch::{nn, Kind, Tensor};

use super::Vista3dConfig;
use crate::checkpoint::{DType, RawTensor, StateDict};

/// Key whose shape `[E, in_channels, 3, 3, 3]` gives the width of a checkpoint.
const WIDTH_KEY: &str = "image_encoder.encoder.conv_init.weight";
/// Key whose first dim gives the number of class embeddings.
const CLASSES_KEY: &str = "class_head.class_embeddings.weight";

/// What a checkpoint load did.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Tensors copied into the model.
    pub loaded: usize,
    /// Model tensors absent from the checkpoint (kept at their initial values in non-strict loads).
    pub missing: Vec<String>,
    /// Checkpoint tensors the model does not have.
    pub unexpected: Vec<String>,
    /// `(name, checkpoint shape, model shape)` for tensors present in both with different shapes.
    pub mismatched: Vec<(String, Vec<usize>, Vec<i64>)>,
    /// A prefix such as `module.` (DistributedDataParallel) removed from every checkpoint key.
    pub stripped_prefix: Option<String>,
}

impl LoadReport {
    /// True when every model tensor was loaded and nothing was left over.
    pub fn is_exact(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.mismatched.is_empty()
    }

    fn describe(&self) -> String {
        fn list(names: &[String]) -> String {
            const SHOWN: usize = 12;
            let mut s = names
                .iter()
                .take(SHOWN)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ");
            if names.len() > SHOWN {
                s.push_str(&format!(", ... ({} more)", names.len() - SHOWN));
            }
            s
        }
        let mut lines = Vec::new();
        if !self.missing.is_empty() {
            lines.push(format!(
                "  missing from the checkpoint ({}): {}",
                self.missing.len(),
                list(&self.missing)
            ));
        }
        if !self.unexpected.is_empty() {
            lines.push(format!(
                "  not in the model ({}): {}",
                self.unexpected.len(),
                list(&self.unexpected)
            ));
        }
        if !self.mismatched.is_empty() {
            let shown: Vec<String> = self
                .mismatched
                .iter()
                .map(|(n, ck, m)| format!("{n}: checkpoint {ck:?} vs model {m:?}"))
                .collect();
            lines.push(format!(
                "  wrong shape ({}): {}",
                self.mismatched.len(),
                list(&shown)
            ));
        }
        lines.join("\n")
    }
}

/// Returns the checkpoint's keys with a common wrapper prefix (`module.`, `network.`, `model.`) removed when
/// that prefix is on every key and the bare names are VISTA3D's.
fn normalised_keys(sd: &StateDict) -> (HashMap<String, &RawTensor>, Option<String>) {
    let has_bare = sd.tensors.iter().any(|(k, _)| k == WIDTH_KEY);
    if !has_bare {
        for prefix in ["module.", "network.", "model."] {
            if !sd.tensors.is_empty() && sd.tensors.iter().all(|(k, _)| k.starts_with(prefix)) {
                let map = sd
                    .tensors
                    .iter()
                    .map(|(k, t)| (k[prefix.len()..].to_string(), t))
                    .collect();
                return (map, Some(prefix.to_string()));
            }
        }
    }
    (
        sd.tensors.iter().map(|(k, t)| (k.clone(), t)).collect(),
        None,
    )
}

/// Reads the network configuration (width, input channels, class-table size) from a checkpoint's shapes.
pub fn detect_config(sd: &StateDict) -> Result<Vista3dConfig> {
    let (keys, _) = normalised_keys(sd);
    let Some(conv_init) = keys.get(WIDTH_KEY) else {
        let examples: Vec<&str> = sd.tensors.iter().take(5).map(|(k, _)| k.as_str()).collect();
        bail!(
            "not a VISTA3D checkpoint: it has no '{WIDTH_KEY}' ({} tensors, first: {})",
            sd.tensors.len(),
            if examples.is_empty() {
                "none".to_string()
            } else {
                examples.join(", ")
            }
        );
    };
    let s = &conv_init.shape;
    if s.len() != 5 || s[2..] != [3, 3, 3] {
        bail!("'{WIDTH_KEY}' has shape {s:?}; VISTA3D's is [E, in_channels, 3, 3, 3]");
    }
    let mut config = Vista3dConfig::with_width(s[0] as i64);
    config.in_channels = s[1] as i64;
    if let Some(classes) = keys.get(CLASSES_KEY) {
        if classes.shape.len() == 2 {
            config.n_classes = classes.shape[0] as i64;
        }
    }
    config.validate().context("unsupported checkpoint width")?;
    Ok(config)
}

fn kind_of(dtype: DType) -> Kind {
    match dtype {
        DType::F32 => Kind::Float,
        DType::F64 => Kind::Double,
        DType::F16 => Kind::Half,
        DType::BF16 => Kind::BFloat16,
        DType::I64 => Kind::Int64,
        DType::I32 => Kind::Int,
        DType::I16 => Kind::Int16,
        DType::I8 => Kind::Int8,
        DType::U8 => Kind::Uint8,
        DType::Bool => Kind::Bool,
    }
}

/// A checkpoint tensor as a CPU libtorch tensor of its own dtype.
pub fn to_tensor(raw: &RawTensor) -> Tensor {
    let shape: Vec<i64> = raw.shape.iter().map(|&d| d as i64).collect();
    Tensor::from_data_size(&raw.data, &shape, kind_of(raw.dtype))
}

/// Copies the checkpoint's tensors into the variables of `vs` (converted to each variable's dtype and
/// device). With `strict`, any missing, unexpected or wrongly shaped tensor is an error listing all of them
/// and nothing is changed; otherwise matching tensors are loaded and the rest is reported.
pub fn load_weights(vs: &nn::VarStore, sd: &StateDict, strict: bool) -> Result<LoadReport> {
    let (keys, stripped_prefix) = normalised_keys(sd);
    let vars = vs.variables();
    let mut report = LoadReport {
        stripped_prefix,
        ..Default::default()
    };
    let mut to_copy = Vec::new();
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    for name in names {
        let var = &vars[name];
        match keys.get(name.as_str()) {
            None => report.missing.push(name.clone()),
            Some(raw) => {
                let model_shape = var.size();
                if raw
                    .shape
                    .iter()
                    .map(|&d| d as i64)
                    .ne(model_shape.iter().copied())
                {
                    report
                        .mismatched
                        .push((name.clone(), raw.shape.clone(), model_shape));
                } else {
                    to_copy.push((var, *raw));
                }
            }
        }
    }
    let mut unexpected: Vec<String> = keys
        .keys()
        .filter(|k| !vars.contains_key(k.as_str()))
        .cloned()
        .collect();
    unexpected.sort();
    report.unexpected = unexpected;
    if strict && !report.is_exact() {
        bail!(
            "the checkpoint does not match the model (strict loading):\n{}",
            report.describe()
        );
    }
    tch::no_grad(|| {
        for (var, raw) in &to_copy {
            let src = to_tensor(raw).to_kind(var.kind()).to_device(var.device());
            var.shallow_clone().copy_(&src);
        }
    });
    report.loaded = to_copy.len();
    if !report.is_exact() {
        log::warn!(
            "non-strict checkpoint load, {} tensors loaded:\n{}",
            report.loaded,
            report.describe()
        );
    }
    Ok(report)
}

/// Number of parameters (trainable tensors) and buffer elements of one module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleCount {
    /// Dotted module path, e.g. `image_encoder.encoder`; `total` for the whole network.
    pub module: String,
    pub parameters: i64,
    pub buffer_elements: i64,
}

/// Parameter counts of the network and of the modules MONAI's measurements list, in display order.
pub fn parameter_counts(vs: &nn::VarStore) -> Vec<ModuleCount> {
    let modules = [
        "image_encoder",
        "image_encoder.encoder",
        "image_encoder.up_layers",
        "image_encoder.up_layers_auto",
        "class_head",
        "class_head.image_post_mapping",
        "class_head.class_embeddings",
        "class_head.mlp",
        "point_head",
        "point_head.transformer",
        "point_head.feat_downsample",
        "point_head.output_upscaling",
        "point_head.class_embeddings",
        "point_head.output_hypernetworks_mlps",
        "point_head.mask_downsample",
        "point_head.pe_layer",
    ];
    let mut totals: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
    let mut total = (0i64, 0i64);
    // Buffers are the variables that were created as non-trainable (freezing does not change this set).
    let trainable_ptrs: std::collections::HashSet<usize> = vs
        .trainable_variables()
        .iter()
        .map(|t| t.data_ptr() as usize)
        .collect();
    for (name, t) in vs.variables() {
        let n = t.numel() as i64;
        let trainable = trainable_ptrs.contains(&(t.data_ptr() as usize));
        let add = |acc: &mut (i64, i64)| if trainable { acc.0 += n } else { acc.1 += n };
        add(&mut total);
        for m in modules {
            if name.starts_with(m) && name.as_bytes().get(m.len()) == Some(&b'.') {
                add(totals.entry(m).or_default());
            }
        }
    }
    let mut out = vec![ModuleCount {
        module: "total".into(),
        parameters: total.0,
        buffer_elements: total.1,
    }];
    for m in modules {
        let (p, b) = totals.get(m).copied().unwrap_or_default();
        out.push(ModuleCount {
            module: m.to_string(),
            parameters: p,
            buffer_elements: b,
        });
    }
    out
}
