//! The VISTA3D network (MONAI `vista3d132`) on libtorch, with MONAI's parameter names and forward semantics.
//!
//! Data flow of one window: [`ImageEncoder`] (SegResNetDS2) -> [`ClassHead`] for class prompts and/or
//! [`PointHead`] for point prompts -> combination of the two inside a window ([`Vista3d::forward`]).

mod class_head;
pub mod components;
mod encoder;
mod fused_norm;
mod layers;
mod openmp;
mod point_head;
mod weights;
pub mod winograd;

use std::ops::Range;

use anyhow::{bail, ensure, Result};
use tch::{nn, Device, Kind, Tensor};

pub use class_head::ClassHead;
pub use encoder::{ImageEncoder, BLOCKS_DOWN, SHAPE_FACTOR};
pub use point_head::{PointHead, MAX_PROMPT};
pub use weights::{
    detect_config, load_weights, parameter_counts, to_tensor, LoadOptions, LoadReport, ModuleCount,
};

/// Logit for "no prompt / no valid point in this window" (MONAI's `NINF_VALUE`).
pub const NINF: f64 = -9999.0;

/// Network hyper-parameters. Only the width varies between checkpoints; the rest is `vista3d132`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vista3dConfig {
    /// `encoder_embed_dim`: 48 for the released model; any multiple of 8 works (8 or 16 in tests).
    pub embed_dim: i64,
    /// Image channels (1 for CT).
    pub in_channels: i64,
    /// Rows of the class embedding tables.
    pub n_classes: i64,
    /// Largest supported class id; larger ids are zero-shot for the point head.
    pub last_supported: i64,
}

impl Vista3dConfig {
    /// The released model's configuration with another width.
    pub fn with_width(embed_dim: i64) -> Self {
        Self {
            embed_dim,
            in_channels: 1,
            n_classes: 512,
            last_supported: 132,
        }
    }

    /// Checks the width: a positive multiple of 8 (4 attention heads on width / 2).
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.embed_dim > 0 && self.embed_dim % 8 == 0,
            "encoder_embed_dim must be a positive multiple of 8, got {}",
            self.embed_dim
        );
        ensure!(
            self.in_channels > 0,
            "in_channels must be positive, got {}",
            self.in_channels
        );
        Ok(())
    }
}

impl Default for Vista3dConfig {
    fn default() -> Self {
        Self::with_width(48)
    }
}

/// The spatial extent of a sliding window inside the full (padded) image, as MONAI's `patch_coords`.
pub type Window = [Range<i64>; 3];

/// Prompts and options of one forward call (MONAI `VISTA3D.forward` keyword arguments).
#[derive(Default)]
pub struct ForwardArgs<'a> {
    /// `[B, N, 3]` point coordinates in voxels of the full image (x, y, z = array axes).
    pub point_coords: Option<&'a Tensor>,
    /// `[B, N]` point labels: -1 padding, 0/1 negative/positive, 2/3 negative/positive of a special class.
    pub point_labels: Option<&'a Tensor>,
    /// `[B, 1]` global class ids for the class head.
    pub class_vector: Option<&'a Tensor>,
    /// `[B, 1]` class ids of the point prompts (ids above 132 are zero-shot).
    pub prompt_class: Option<&'a Tensor>,
    /// The window the input was cut from; `None` means training (gaussian combination).
    pub patch_coords: Option<Window>,
    /// `[1, B, H, W, D]` full-size previous logits, merged with point results in point-only windows.
    pub prev_mask: Option<&'a Tensor>,
    /// Gaussian radius of the training combination (default: smallest spatial dim / 5).
    pub radius: Option<i64>,
    /// Return `[1, B, H, W, D]` instead of `[B, 1, H, W, D]` (what sliding-window inferers need).
    pub transpose: bool,
}

/// The VISTA3D network.
#[derive(Debug)]
pub struct Vista3d {
    pub config: Vista3dConfig,
    pub image_encoder: ImageEncoder,
    pub class_head: ClassHead,
    pub point_head: PointHead,
}

impl Vista3d {
    /// Builds the network with its parameters registered under MONAI's names in `vs` (freshly initialised).
    pub fn new(vs: &nn::Path, config: Vista3dConfig) -> Result<Self> {
        config.validate()?;
        let e = config.embed_dim;
        Ok(Self {
            config,
            image_encoder: ImageEncoder::new(vs / "image_encoder", config.in_channels, e),
            class_head: ClassHead::new(vs / "class_head", config.n_classes, e),
            point_head: PointHead::new(
                vs / "point_head",
                e,
                config.n_classes,
                config.last_supported,
            ),
        })
    }

    /// Checks an image patch `[1, C, H, W, D]` and returns its spatial dims.
    fn check_input(&self, input: &Tensor) -> Result<[i64; 3]> {
        let size = input.size();
        ensure!(
            size.len() == 5,
            "network input must be [1, C, H, W, D], got {size:?}"
        );
        ensure!(
            size[1] == self.config.in_channels,
            "network input has {} channels, the model expects {}",
            size[1],
            self.config.in_channels
        );
        ensure!(
            size[2..].iter().all(|&s| s > 0 && s % SHAPE_FACTOR == 0),
            "network input spatial dims {:?} must be positive multiples of {SHAPE_FACTOR}",
            &size[2..]
        );
        Ok([size[2], size[3], size[4]])
    }

    /// Where the weights are.
    pub fn device(&self) -> Device {
        self.image_encoder.encoder.device()
    }

    /// The class path up to where prompts start to matter: the encoder, the automatic decoder and the class
    /// head's post mapping, `[b, C, H, W, D]` for an image patch `[b, 1, H, W, D]` (then
    /// [`ClassHead::masks`] per chunk of class embeddings).
    pub fn class_features(&self, input: &Tensor) -> Result<Tensor> {
        self.check_input(input)?;
        let (_, auto) = self.image_encoder.forward(input, false, true);
        let auto =
            auto.ok_or_else(|| anyhow::anyhow!("internal: the encoder made no class features"))?;
        Ok(self.class_head.post_mapping(&auto))
    }

    /// MONAI `VISTA3D.forward`: logits `[B, 1, H, W, D]` (or `[1, B, H, W, D]` with `transpose`) for one
    /// image patch `[1, C, H, W, D]` whose spatial dims are multiples of 16.
    pub fn forward(&self, input: &Tensor, args: &ForwardArgs) -> Result<Tensor> {
        let spatial = self.check_input(input)?;
        let device = input.device();
        if args.point_coords.is_some() != args.point_labels.is_some() {
            bail!("point_coords and point_labels must be given together");
        }
        if args.point_coords.is_none() && args.class_vector.is_none() {
            return Ok(Tensor::full(
                [1, 1, spatial[0], spatial[1], spatial[2]],
                NINF,
                (Kind::Float, device),
            ));
        }
        let bs = match (args.class_vector, args.point_coords) {
            (Some(cv), _) => cv.size()[0],
            (None, Some(pc)) => pc.size()[0],
            (None, None) => unreachable!("handled above"),
        };
        if let Some(pc) = args.point_coords {
            let pcs = pc.size();
            ensure!(
                pcs.len() == 3 && pcs[2] == 3,
                "point_coords must be [B, N, 3], got {pcs:?}"
            );
            let pls = args.point_labels.map(|t| t.size()).unwrap_or_default();
            ensure!(
                pls == pcs[..2],
                "point_labels must be [B, N] = {:?}, got {pls:?}",
                &pcs[..2]
            );
        }

        // Points: localise to the window, then drop objects whose points are all padding.
        let mut points = match (args.point_coords, args.point_labels) {
            (Some(pc), Some(pl)) => match &args.patch_coords {
                Some(window) => points_in_window(window, pc, pl),
                None => Some((pc.shallow_clone(), pl.shallow_clone())),
            },
            _ => None,
        };
        let mut prompt_class = args.prompt_class.map(|t| t.shallow_clone());
        let mut mapping_index = Tensor::ones([bs], (Kind::Bool, device));
        if let Some((pc, pl)) = points.take() {
            let keep = pl.ne(-1).sum_dim_intlist(1, false, Kind::Int64).gt(0);
            if keep.any().int64_value(&[]) != 0 {
                let idx = keep.nonzero().squeeze_dim(1);
                prompt_class = prompt_class.map(|c| c.index_select(0, &idx.to_device(c.device())));
                points = Some((
                    pc.index_select(0, &idx.to_device(pc.device())),
                    pl.index_select(0, &idx),
                ));
                mapping_index = keep;
            } else if args.class_vector.is_none() && args.patch_coords.is_none() {
                points = Some((pc, pl));
            } else {
                mapping_index = keep;
            }
        }

        if points.is_none() && args.class_vector.is_none() {
            let logits = Tensor::full(
                [bs, 1, spatial[0], spatial[1], spatial[2]],
                NINF,
                (Kind::Float, device),
            );
            return Ok(if args.transpose {
                logits.transpose(1, 0)
            } else {
                logits
            });
        }

        let (point_feats, auto_feats) =
            self.image_encoder
                .forward(input, points.is_some(), args.class_vector.is_some());
        let logits = if let (Some(cv), Some(auto)) = (args.class_vector, auto_feats) {
            let logits = self.class_head.forward(&auto, cv);
            match (&points, point_feats) {
                (Some((pc, pl)), Some(feats)) => {
                    let point_logits =
                        self.point_head
                            .forward(&feats, pc, pl, prompt_class.as_ref());
                    if args.patch_coords.is_none() {
                        gaussian_combine(
                            &logits,
                            &point_logits,
                            pc,
                            pl,
                            &mapping_index,
                            args.radius,
                        )
                    } else {
                        connected_components_combine(
                            &logits,
                            &point_logits,
                            pc,
                            pl,
                            &mapping_index,
                        )?
                    }
                }
                _ => logits,
            }
        } else {
            let (pc, pl) = points
                .as_ref()
                .expect("points are present when there is no class vector");
            let feats = point_feats.expect("point features were requested");
            let point_logits = self
                .point_head
                .forward(&feats, pc, pl, prompt_class.as_ref());
            let kind = point_logits.kind();
            let logits = Tensor::full(
                [bs, 1, spatial[0], spatial[1], spatial[2]],
                NINF,
                (kind, device),
            );
            let idx = mapping_index.nonzero().squeeze_dim(1);
            let logits = logits.index_copy(0, &idx, &point_logits);
            match (args.prev_mask, &args.patch_coords) {
                (Some(prev), Some(window)) => {
                    let prev = crop_window(prev, window)
                        .transpose(1, 0)
                        .to_device(device)
                        .to_kind(kind);
                    let point_logits = logits.index_select(0, &idx);
                    connected_components_combine(&prev, &point_logits, pc, pl, &mapping_index)?
                }
                _ => logits,
            }
        };
        Ok(if args.transpose {
            logits.transpose(1, 0)
        } else {
            logits
        })
    }
}

/// `[..., H, W, D]` -> the window's part of the last three dims.
fn crop_window(t: &Tensor, window: &Window) -> Tensor {
    let n = t.dim() as i64;
    let mut out = t.shallow_clone();
    for (i, r) in window.iter().enumerate() {
        out = out.narrow(n - 3 + i as i64, r.start, r.end - r.start);
    }
    out
}

/// MONAI `update_point_to_patch`: points move into window coordinates; a point is kept only when it lies
/// strictly inside the window on every axis; others become label -1 at coordinate 0, and point columns
/// that are padding for every object are dropped. `None` when no point is inside.
fn points_in_window(window: &Window, coords: &Tensor, labels: &Tensor) -> Option<(Tensor, Tensor)> {
    let device = coords.device();
    let starts = Tensor::from_slice(&window.each_ref().map(|r| r.start))
        .to_device(device)
        .view([1, 1, 3]);
    let ends = Tensor::from_slice(&window.each_ref().map(|r| r.end))
        .to_device(device)
        .view([1, 1, 3]);
    let after_start = (coords - &starts).gt(0).all_dim(2, false);
    let before_end = (&ends - coords).gt(0).all_dim(2, false);
    let inside = after_start.logical_and(&before_end);
    if inside.any().int64_value(&[]) == 0 {
        return None;
    }
    let outside = inside.logical_not();
    let coords = (coords - &starts).masked_fill(&outside.unsqueeze(-1), 0.0);
    let labels = labels.masked_fill(&outside.to_device(labels.device()), -1);
    let used = labels.ne(-1).any_dim(0, false).nonzero().squeeze_dim(1);
    Some((
        coords.index_select(1, &used.to_device(device)),
        labels.index_select(1, &used),
    ))
}

/// MONAI `gaussian_combine` (training): near each point the point logits take over from the class logits,
/// with weight `1 - sum(exp(-d^2 / (2 r^2)))` clamped at 0 for the class logits.
fn gaussian_combine(
    logits: &Tensor,
    point_logits: &Tensor,
    coords: &Tensor,
    labels: &Tensor,
    mapping_index: &Tensor,
    radius: Option<i64>,
) -> Tensor {
    let size = point_logits.size();
    let spatial = [size[2], size[3], size[4]];
    let radius = radius.unwrap_or(*spatial.iter().min().expect("3 spatial dims") / 5);
    let discs = points_to_gaussian_discs(spatial, coords, labels, radius, logits.device());
    let weight: Tensor = 1 - discs.sum_dim_intlist(1, true, Kind::Float);
    let weight = weight.clamp_min(0.0);
    let idx = mapping_index.nonzero().squeeze_dim(1);
    let selected = logits.index_select(0, &idx);
    let keep_point: Tensor = 1 - &weight;
    let combined = &selected * &weight + keep_point * point_logits;
    logits.index_copy(0, &idx, &combined)
}

/// MONAI `convert_points_to_disc(..., disc=False)`: `[B, 2, H, W, D]`, channel 0 for negative points (0, 2),
/// channel 1 for positive points (1, 3), each point adding `exp(-d^2 / (2 r^2))`.
fn points_to_gaussian_discs(
    spatial: [i64; 3],
    coords: &Tensor,
    labels: &Tensor,
    radius: i64,
    device: Device,
) -> Tensor {
    let (b, n) = (coords.size()[0], coords.size()[1]);
    let axes: Vec<Tensor> = spatial
        .iter()
        .map(|&s| Tensor::arange(s, (Kind::Float, device)))
        .collect();
    let grid = Tensor::meshgrid_indexing(&axes, "ij");
    let grid = Tensor::stack(&grid, 0); // [3, H, W, D]
    let labels_host: Vec<i64> =
        Vec::try_from(labels.to_device(Device::Cpu).flatten(0, -1)).unwrap_or_default();
    let masks = Tensor::zeros(
        [b, 2, spatial[0], spatial[1], spatial[2]],
        (Kind::Float, device),
    );
    let denom = (2 * radius * radius) as f64;
    for bi in 0..b {
        for ni in 0..n {
            let label = labels_host[(bi * n + ni) as usize];
            if label <= -1 {
                continue;
            }
            let channel = if label == 0 || label == 2 { 0 } else { 1 };
            let p = coords.get(bi).get(ni).to_device(device).view([3, 1, 1, 1]);
            let dist2 = (&grid - p)
                .pow_tensor_scalar(2)
                .sum_dim_intlist(0, false, None::<Kind>);
            let g = (-dist2 / denom).exp();
            // In-place add into the float32 masks, as MONAI's `masks[b, channel] += ...`.
            let _ = masks.get(bi).get(channel).f_add_(&g);
        }
    }
    masks
}

/// MONAI `connected_components_combine` (inside a window): the point result replaces the auto result on the
/// connected components of the disagreement that the points touch, and wherever the auto result is NaN.
fn connected_components_combine(
    logits: &Tensor,
    point_logits: &Tensor,
    coords: &Tensor,
    labels: &Tensor,
    mapping_index: &Tensor,
) -> Result<Tensor> {
    const THRESHOLD: f64 = 0.5;
    let idx = mapping_index.nonzero().squeeze_dim(1);
    let selected = logits.index_select(0, &idx);
    let size = selected.size();
    let (b1, h, w, d) = (size[0], size[2], size[3], size[4]);

    let host_coords: Vec<f64> = Vec::try_from(
        coords
            .to_device(Device::Cpu)
            .to_kind(Kind::Double)
            .flatten(0, -1),
    )?;
    let host_labels: Vec<i64> = Vec::try_from(
        labels
            .to_device(Device::Cpu)
            .to_kind(Kind::Int64)
            .flatten(0, -1),
    )?;
    let n = coords.size()[1] as usize;
    let points: Vec<Vec<[f64; 3]>> = (0..b1 as usize)
        .map(|b| {
            (0..n)
                .map(|i| std::array::from_fn(|a| host_coords[(b * n + i) * 3 + a]))
                .collect()
        })
        .collect();
    let point_labels: Vec<Vec<i64>> = (0..b1 as usize)
        .map(|b| host_labels[b * n..(b + 1) * n].to_vec())
        .collect();

    // `inside`: any point of the object (numpy-rounded, all labels) where the auto logit is > 0.
    let host_selected = selected.to_device(Device::Cpu).to_kind(Kind::Float);
    let mut inside = Vec::with_capacity(b1 as usize);
    for (b, pts) in points.iter().enumerate() {
        let hit = pts.iter().any(|p| {
            let [x, y, z] = [(p[0], h), (p[1], w), (p[2], d)]
                .map(|(c, s)| components::round_half_even(c).clamp(0, s - 1));
            host_selected.double_value(&[b as i64, 0, x, y, z]) > 0.0
        });
        inside.push(hit);
    }
    let inside = Tensor::from_slice(&inside)
        .to_device(logits.device())
        .view([b1, 1, 1, 1, 1]);

    let nan_mask = selected.isnan();
    let auto_prob = selected.nan_to_num(NINF, None, None).sigmoid();
    let pos_region = point_logits.sigmoid().gt(THRESHOLD);
    let diff_pos = auto_prob
        .le(THRESHOLD)
        .logical_or(&inside)
        .logical_and(&pos_region);
    let diff_neg = auto_prob
        .gt(THRESHOLD)
        .logical_and(&pos_region.logical_not());

    let to_host = |t: &Tensor| -> Result<Vec<bool>> {
        Ok(Vec::try_from(t.to_device(Device::Cpu).flatten(0, -1))?)
    };
    let dims = [b1 as usize, h as usize, w as usize, d as usize];
    let kept = components::keep_merge_components_with_points(
        &to_host(&diff_pos)?,
        &to_host(&diff_neg)?,
        dims,
        &points,
        &point_labels,
    );
    let cc = Tensor::from_slice(&kept)
        .view([b1, 1, h, w, d])
        .to_device(logits.device());

    let unkept_pos = pos_region.logical_and(&cc.logical_not());
    let fill = nan_mask.logical_and(&unkept_pos);
    let point_logits = point_logits.masked_fill(&fill, -1.0);
    let cc = nan_mask.logical_or(&cc).to_kind(selected.kind());
    let keep_auto: Tensor = 1 - &cc;
    let combined = &selected * keep_auto + &cc * point_logits;
    Ok(logits.index_copy(0, &idx, &combined))
}
