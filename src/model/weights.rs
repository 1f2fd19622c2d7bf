//! Loading checkpoints (the bundle's `model.pt`, safetensors) into the network's parameters, width
//! detection, and per-module parameter counts.

use std::collections::{BTreeMap, HashMap};

use tch::{nn, Kind, Tensor};

use super::Vista3dConfig;
use crate::checkpoint::{
    describe_mismatch, DType, RawTensor, ShapeMismatch, TensorSource, TensorView, WeightsError,
};

/// Key whose shape `[E, in_channels, 3, 3, 3]` gives the width of a checkpoint.
const WIDTH_KEY: &str = "image_encoder.encoder.conv_init.weight";
/// Key whose first dim gives the number of class embeddings.
const CLASSES_KEY: &str = "class_head.class_embeddings.weight";

/// How to load a checkpoint's weights into the network.
///
/// The default is what the bundle does: strict loading, any width.
/// ```
/// let options = vista3d::LoadOptions::default().allow_partial(true).expect_width(48);
/// assert!(!options.strict);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    /// Every network tensor must be in the checkpoint with its shape, and the checkpoint must hold
    /// nothing else (default). Otherwise matching tensors are loaded and the rest is reported (and logged).
    pub strict: bool,
    /// Refuse a checkpoint of another width (`encoder_embed_dim`); `None` (default) takes the width the
    /// checkpoint has.
    pub expected_width: Option<i64>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            strict: true,
            expected_width: None,
        }
    }
}

impl LoadOptions {
    /// Loads what matches and reports the rest instead of failing (`strict: false`), as MONAI's
    /// `load_state_dict(strict=False)`.
    pub fn allow_partial(mut self, allow: bool) -> Self {
        self.strict = !allow;
        self
    }

    /// Requires this width (`encoder_embed_dim`), or any width with `None`.
    pub fn expect_width(mut self, width: impl Into<Option<i64>>) -> Self {
        self.expected_width = width.into();
        self
    }

    /// Checks the width found in a checkpoint against [`LoadOptions::expected_width`].
    pub fn check_width(&self, found: i64) -> Result<(), WeightsError> {
        match self.expected_width {
            Some(expected) if expected != found => {
                Err(WeightsError::WrongWidth { found, expected })
            }
            _ => Ok(()),
        }
    }
}

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
    pub mismatched: Vec<ShapeMismatch>,
    /// A prefix such as `module.` (DistributedDataParallel) removed from every checkpoint key.
    pub stripped_prefix: Option<String>,
}

impl LoadReport {
    /// True when every model tensor was loaded and nothing was left over.
    pub fn is_exact(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.mismatched.is_empty()
    }

    fn describe(&self) -> String {
        describe_mismatch(&self.missing, &self.unexpected, &self.mismatched)
    }
}

/// The checkpoint's tensors by name, with a common wrapper prefix (`module.`, `network.`, `model.`)
/// removed when that prefix is on every key and the bare names are VISTA3D's.
fn normalised_keys<'a>(
    views: &[TensorView<'a>],
) -> (HashMap<&'a str, TensorView<'a>>, Option<String>) {
    let has_bare = views.iter().any(|v| v.name == WIDTH_KEY);
    if !has_bare {
        for prefix in ["module.", "network.", "model."] {
            if !views.is_empty() && views.iter().all(|v| v.name.starts_with(prefix)) {
                let map = views
                    .iter()
                    .map(|v| (&v.name[prefix.len()..], *v))
                    .collect();
                return (map, Some(prefix.to_string()));
            }
        }
    }
    (views.iter().map(|v| (v.name, *v)).collect(), None)
}

/// Reads the network configuration (width, input channels, class-table size) from a checkpoint's shapes.
pub fn detect_config(source: &impl TensorSource) -> Result<Vista3dConfig, WeightsError> {
    config_of(&source.tensor_views())
}

fn config_of(views: &[TensorView<'_>]) -> Result<Vista3dConfig, WeightsError> {
    let (keys, _) = normalised_keys(views);
    let Some(conv_init) = keys.get(WIDTH_KEY) else {
        let examples: Vec<&str> = views.iter().take(5).map(|v| v.name).collect();
        return Err(WeightsError::NotVista3d {
            detail: format!(
                "it has no '{WIDTH_KEY}' ({} tensors, first: {})",
                views.len(),
                if examples.is_empty() {
                    "none".to_string()
                } else {
                    examples.join(", ")
                }
            ),
        });
    };
    let s = conv_init.shape;
    if s.len() != 5 || s[2..] != [3, 3, 3] {
        return Err(WeightsError::NotVista3d {
            detail: format!(
                "'{WIDTH_KEY}' has shape {s:?}; VISTA3D's is [E, in_channels, 3, 3, 3]"
            ),
        });
    }
    let mut config = Vista3dConfig::with_width(s[0] as i64);
    config.in_channels = s[1] as i64;
    if let Some(classes) = keys.get(CLASSES_KEY) {
        if classes.shape.len() == 2 {
            config.n_classes = classes.shape[0] as i64;
        }
    }
    config
        .validate()
        .map_err(|e| WeightsError::UnsupportedNetwork {
            detail: format!("{e:#}"),
        })?;
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
/// device). Strict loading ([`LoadOptions::strict`]) fails on any missing, unexpected or wrongly shaped
/// tensor, listing all of them, and changes nothing; otherwise matching tensors are loaded and the rest is
/// reported.
pub fn load_weights(
    vs: &nn::VarStore,
    source: &impl TensorSource,
    options: &LoadOptions,
) -> Result<LoadReport, WeightsError> {
    let views = source.tensor_views();
    let (keys, stripped_prefix) = normalised_keys(&views);
    if options.expected_width.is_some() {
        if let Some(conv_init) = keys.get(WIDTH_KEY) {
            if let Some(&width) = conv_init.shape.first() {
                options.check_width(width as i64)?;
            }
        }
    }
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
            Some(view) => {
                let model_shape = var.size();
                if view
                    .shape
                    .iter()
                    .map(|&d| d as i64)
                    .ne(model_shape.iter().copied())
                {
                    report
                        .mismatched
                        .push((name.clone(), view.shape.to_vec(), model_shape));
                } else {
                    to_copy.push((var, *view));
                }
            }
        }
    }
    let mut unexpected: Vec<String> = keys
        .keys()
        .filter(|k| !vars.contains_key(**k))
        .map(|k| k.to_string())
        .collect();
    unexpected.sort();
    report.unexpected = unexpected;
    if options.strict && !report.is_exact() {
        return Err(WeightsError::Mismatch {
            missing: report.missing,
            unexpected: report.unexpected,
            mismatched: report.mismatched,
        });
    }
    tch::no_grad(|| {
        for (var, view) in &to_copy {
            let shape: Vec<i64> = view.shape.iter().map(|&d| d as i64).collect();
            let src = Tensor::from_data_size(view.data, &shape, kind_of(view.dtype))
                .to_kind(var.kind())
                .to_device(var.device());
            var.shallow_clone().copy_(&src);
            source.release(view);
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
