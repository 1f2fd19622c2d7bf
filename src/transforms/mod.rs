//! The bundle's preprocessing and its inversion, in pure Rust, reproducing MONAI 1.6.1's arithmetic.
//!
//! Inference order (`configs/inference.json`): `Spacingd(1.5 mm, bilinear)` -> `CropForegroundd(x > 0, margin 10,
//! allow_smaller)` on the resampled raw HU -> `ScaleIntensityRanged(a_min, a_max, 0, 1, clip)` ->
//! `Orientationd("RAS")` -> float32 ([`preprocess`]). Postprocessing (`Invertd`, nearest) undoes the spatial steps
//! in reverse: orientation back, the crop by zero padding, the spacing by nearest resampling onto the original affine
//! and shape ([`invert_to_original`]). Training (`configs/train.json`) runs Crop -> Scale -> Orientation -> Spacing
//! with a nearest-resampled label ([`preprocess_training`]); every step is public for reuse.
//!
//! Exactness: spacing decisions, shapes, crop boxes, orientation and the intensity mapping are MONAI's to the bit;
//! resampling rebuilds MONAI's float64 sampling coordinates operation by operation (see [`spacing`]), so nearest
//! resampling picks the same voxels, ties at exact half-way points included, and bilinear values agree to float32
//! rounding.
//!
//! Input rules (errors, never panics): an empty volume, a non-finite / singular / degenerate affine, and NaN or
//! infinite voxels are rejected (MONAI would carry NaN through the bilinear resampling and the foreground crop,
//! silently producing NaN inputs; we name the count instead). A volume with no voxel > 0 after resampling is
//! rejected too: MONAI's bounding box is then (0, 0) and it crops to an empty 0x0x0 volume that the network cannot
//! run on.

pub mod crop;
pub mod intensity;
mod linalg;
pub mod orientation;
pub mod spacing;
pub mod train_order;

use anyhow::{bail, ensure, Context, Result};
use ndarray::Array3;
use rayon::prelude::*;

pub use crop::{crop, crop_affine, foreground_box, uncrop, uncrop_affine, CropBox};
pub use intensity::{scale_intensity_range, scale_intensity_range_inplace, IntensityRange};
pub use orientation::{io_orientation, orient_ras, Orientation};
pub use spacing::{
    apply_spacing_plan, plan_spacing, resample_to_grid, resample_to_spacing, validate_affine,
    Interp, SpacingPlan,
};
pub use train_order::{invert_train_order, preprocess_train_order, TrainOrderTrace};

use crate::volume::{Affine, Volume};

/// Parameters of the bundle's preprocessing.
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessConfig {
    /// Target voxel spacing in mm (`resample_spacing`); an entry `<= 0` keeps the input spacing on that axis.
    pub spacing: [f64; 3],
    /// Intensity mapped to `b_min`.
    pub a_min: f64,
    /// Intensity mapped to `b_max`.
    pub a_max: f64,
    /// Output lower value.
    pub b_min: f64,
    /// Output upper value.
    pub b_max: f64,
    /// Clamp the scaled intensities to `[b_min, b_max]`.
    pub clip: bool,
    /// Voxels added around the foreground box (CropForeground `margin`).
    pub crop_margin: usize,
}

impl Default for PreprocessConfig {
    /// The bundle's values (`configs/inference.json`).
    fn default() -> Self {
        PreprocessConfig {
            spacing: [1.5, 1.5, 1.5],
            a_min: -963.8247715525971,
            a_max: 1053.678477684517,
            b_min: 0.0,
            b_max: 1.0,
            clip: true,
            crop_margin: 10,
        }
    }
}

impl PreprocessConfig {
    /// The intensity mapping of this configuration.
    pub fn intensity(&self) -> IntensityRange {
        IntensityRange {
            a_min: self.a_min,
            a_max: self.a_max,
            b_min: self.b_min,
            b_max: self.b_max,
            clip: self.clip,
        }
    }
}

/// Everything needed to map between the original grid and the preprocessed one, and to invert the preprocessing.
#[derive(Debug, Clone, PartialEq)]
pub struct SpatialTrace {
    /// Affine of the input volume.
    pub original_affine: Affine,
    /// Shape of the input volume.
    pub original_dims: [usize; 3],
    /// The spacing step: target/resampled affine (`spacing.out_affine`), shape (`spacing.out_dims`), and whether
    /// MONAI skipped the resampling.
    pub spacing: SpacingPlan,
    /// The foreground crop, in the resampled grid.
    pub crop: CropBox,
    /// Affine after the crop.
    pub cropped_affine: Affine,
    /// The reorientation to RAS applied to the cropped volume.
    pub orientation: Orientation,
    /// Affine of the preprocessed volume.
    pub final_affine: Affine,
    /// `inv(final_affine) @ original_affine`.
    to_processed: Affine,
}

impl SpatialTrace {
    /// Affine of the preprocessed volume.
    pub fn processed_affine(&self) -> Affine {
        self.final_affine
    }

    /// Shape of the preprocessed volume.
    pub fn processed_dims(&self) -> [usize; 3] {
        self.orientation.out_dims()
    }

    /// Affine of the resampled (not yet cropped) grid.
    pub fn resampled_affine(&self) -> Affine {
        self.spacing.out_affine
    }

    /// Shape of the resampled (not yet cropped) grid.
    pub fn resampled_dims(&self) -> [usize; 3] {
        self.spacing.out_dims
    }

    /// `M = inv(A_processed) @ A_original`: maps original voxel indices to (fractional) preprocessed voxel indices,
    /// as the bundle maps point prompts.
    pub fn original_to_processed(&self) -> Affine {
        self.to_processed
    }

    /// Maps a point in original voxel indices to preprocessed voxel indices (not rounded).
    /// Computed as numpy's `(M @ [p, 1].T).T` (an fma chain over `[x, y, z, 1]`), as the bundle does.
    pub fn map_point(&self, p: [f64; 3]) -> [f64; 3] {
        let h = [p[0], p[1], p[2], 1.0];
        std::array::from_fn(|i| {
            (0..4).fold(0.0f64, |acc, k| self.to_processed[i][k].mul_add(h[k], acc))
        })
    }
}

/// Rejects volumes the pipeline cannot process: empty, invalid affine, NaN or infinite voxels (with their counts).
pub fn validate_volume(vol: &Volume) -> Result<()> {
    let dims = vol.dims();
    ensure!(dims.iter().all(|&d| d > 0), "empty volume (shape {dims:?})");
    validate_affine(&vol.affine)?;
    let count = |data: &Array3<f32>| -> (usize, usize) {
        let f = |(n, i): (usize, usize), v: &f32| {
            (n + v.is_nan() as usize, i + v.is_infinite() as usize)
        };
        match data.as_slice() {
            Some(s) => s
                .par_chunks(1 << 16)
                .map(|c| c.iter().fold((0, 0), f))
                .reduce(|| (0, 0), |a, b| (a.0 + b.0, a.1 + b.1)),
            None => data.iter().fold((0, 0), f),
        }
    };
    let (nan, inf) = count(&vol.data);
    if nan + inf > 0 {
        bail!(
            "volume of shape {dims:?} has {nan} NaN and {inf} infinite voxels; they would propagate through the \
             resampling and the foreground crop (MONAI does not check), so they are rejected"
        );
    }
    Ok(())
}

/// The bundle's inference preprocessing: spacing (bilinear) -> foreground crop -> intensity scaling -> RAS.
/// Returns the network input and the trace to map points and invert predictions.
pub fn preprocess(volume: &Volume, cfg: &PreprocessConfig) -> Result<(Volume, SpatialTrace)> {
    validate_volume(volume)?;
    let plan = plan_spacing(&volume.affine, volume.dims(), cfg.spacing)?;
    let mut cur = apply_spacing_plan(volume, &plan, Interp::Bilinear)?;
    let box_ = foreground_box(cur.data.view(), cfg.crop_margin).with_context(|| {
        format!(
            "no foreground: no voxel > 0 in the resampled volume of shape {:?} (MONAI would crop it to an empty \
             0x0x0 volume)",
            cur.dims()
        )
    })?;
    if box_ == CropBox::full(cur.dims()) {
        cur.affine = crop_affine(&cur.affine, &box_);
    } else {
        cur = crop(&cur, &box_)?;
    }
    let cropped_affine = cur.affine;
    scale_intensity_range_inplace(&mut cur.data, &cfg.intensity());
    let orientation = Orientation::to_ras(&cur.affine, cur.dims())?;
    if !orientation.is_identity() {
        cur.data = orientation.apply(cur.data.view())?;
    }
    cur.affine = orientation.apply_affine(&cropped_affine);
    // As the bundle's evaluator: np.linalg.inv(A_processed) @ A_original, with numpy's rounding (LAPACK gesv,
    // OpenBLAS fma chains), so that points land exactly where MONAI puts them (window rules compare exactly).
    let inv = linalg::solve(&cur.affine, &linalg::eye::<4>())
        .context("preprocessed affine is singular")?;
    let to_processed = linalg::mm_fma(&inv, &volume.affine);
    let trace = SpatialTrace {
        original_affine: volume.affine,
        original_dims: volume.dims(),
        spacing: plan,
        crop: box_,
        cropped_affine,
        orientation,
        final_affine: cur.affine,
        to_processed,
    };
    Ok((cur, trace))
}

/// Brings a map on the preprocessed grid (e.g. the label map) back to the original grid, as the bundle's
/// `Invertd(nearest_interp=True)`: orientation undone, the crop undone by zero padding, the spacing undone by nearest
/// resampling (border padding) onto the original affine and shape. NaN values are carried over unchanged.
pub fn invert_to_original(pred: &Array3<f32>, trace: &SpatialTrace) -> Result<Array3<f32>> {
    let shape = pred.shape();
    let d = [shape[0], shape[1], shape[2]];
    ensure!(
        d == trace.processed_dims(),
        "prediction of shape {d:?} does not match the preprocessed grid {:?}",
        trace.processed_dims()
    );
    let inv = trace.orientation.inverse();
    let data = if inv.is_identity() {
        pred.as_standard_layout().into_owned()
    } else {
        inv.apply(pred.view())?
    };
    let affine = inv.apply_affine(&trace.final_affine);
    let (data, affine) = if trace.crop == CropBox::full(trace.resampled_dims()) {
        (data, uncrop_affine(&affine, &trace.crop))
    } else {
        (
            uncrop(data.view(), &trace.crop, trace.resampled_dims())?,
            uncrop_affine(&affine, &trace.crop),
        )
    };
    let vol = Volume { data, affine };
    let out = resample_to_grid(
        &vol,
        &trace.original_affine,
        trace.original_dims,
        Interp::Nearest,
    )?;
    Ok(out.data)
}

/// The training pipeline's deterministic spatial/intensity steps (`configs/train.json`): foreground crop (source:
/// the raw image) -> intensity scaling (image) -> RAS -> spacing (bilinear image, nearest label). The label must
/// have the image's shape; it is cropped by the same box and transformed with its own affine, as MONAI does.
pub fn preprocess_training(
    image: &Volume,
    label: Option<&Volume>,
    cfg: &PreprocessConfig,
) -> Result<(Volume, Option<Volume>)> {
    validate_volume(image)?;
    if let Some(l) = label {
        ensure!(
            l.dims() == image.dims(),
            "label shape {:?} differs from image shape {:?}",
            l.dims(),
            image.dims()
        );
        validate_affine(&l.affine)?;
    }
    let box_ = foreground_box(image.data.view(), cfg.crop_margin).with_context(|| {
        format!(
            "no foreground: no voxel > 0 in the image of shape {:?} (MONAI would crop it to 0x0x0)",
            image.dims()
        )
    })?;
    let mut img = crop(image, &box_)?;
    scale_intensity_range_inplace(&mut img.data, &cfg.intensity());
    let (img, _) = orient_ras(&img)?;
    let img = resample_to_spacing(&img, cfg.spacing, Interp::Bilinear)?;
    let lab = match label {
        Some(l) => {
            let (l, _) = orient_ras(&crop(l, &box_)?)?;
            Some(resample_to_spacing(&l, cfg.spacing, Interp::Nearest)?)
        }
        None => None,
    };
    Ok((img, lab))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::IDENTITY;

    fn phantom(dims: [usize; 3], affine: Affine) -> Volume {
        let data = Array3::from_shape_fn((dims[0], dims[1], dims[2]), |(i, j, k)| {
            let r =
                ((i as f32 - 8.0).powi(2) + (j as f32 - 7.0).powi(2) + (k as f32 - 5.0).powi(2))
                    .sqrt();
            if r < 5.0 {
                100.0 + (i * 7 + j * 3 + k) as f32
            } else {
                -1000.0
            }
        });
        Volume { data, affine }
    }

    #[test]
    fn round_trip_restores_the_original_grid() {
        let mut a = IDENTITY;
        a[0][0] = -3.0;
        a[1][1] = -3.0;
        a[2][2] = 3.0;
        a[0][3] = 50.0;
        let vol = phantom([18, 15, 11], a);
        let cfg = PreprocessConfig {
            crop_margin: 2,
            ..PreprocessConfig::default()
        };
        let (out, trace) = preprocess(&vol, &cfg).unwrap();
        assert_eq!(out.dims(), trace.processed_dims());
        assert_eq!(trace.resampled_dims(), [35, 29, 21]);
        assert!(trace.crop != CropBox::full(trace.resampled_dims()));
        assert_eq!(trace.orientation.flips(), [true, true, false]);
        assert!(out.data.iter().all(|&v| (0.0..=1.0).contains(&v)));
        // The processed grid's voxel centres coincide with every other original voxel: a label map on the
        // processed grid maps back exactly onto the original voxels.
        let m = trace.original_to_processed();
        let p = trace.map_point([8.0, 7.0, 5.0]);
        assert!(
            p.iter().all(|c| (c - c.round()).abs() < 1e-9),
            "{p:?} {m:?}"
        );
        let ids = Array3::from_shape_fn(out.data.raw_dim(), |(i, j, k)| {
            (i * 1000 + j * 10 + k) as f32
        });
        let back = invert_to_original(&ids, &trace).unwrap();
        assert_eq!(back.shape(), &[18, 15, 11]);
        for (idx, &v) in back.indexed_iter() {
            let q = trace.map_point([idx.0 as f64, idx.1 as f64, idx.2 as f64]);
            let inside =
                (0..3).all(|a| q[a] > -0.5 && q[a] < trace.processed_dims()[a] as f64 - 0.5);
            if inside {
                let (i, j, k) = (
                    q[0].round() as usize,
                    q[1].round() as usize,
                    q[2].round() as usize,
                );
                assert_eq!(v, (i * 1000 + j * 10 + k) as f32, "at {idx:?}");
            } else {
                assert_eq!(v, 0.0, "outside the crop at {idx:?}");
            }
        }
        let mut nan = ids.clone();
        nan.fill(f32::NAN);
        assert!(invert_to_original(&nan, &trace)
            .unwrap()
            .iter()
            .any(|v| v.is_nan()));
        assert!(invert_to_original(&Array3::zeros((2, 2, 2)), &trace).is_err());
    }

    #[test]
    fn bad_inputs_are_errors() {
        let cfg = PreprocessConfig::default();
        let mut vol = phantom([18, 15, 11], IDENTITY);
        vol.data[[1, 1, 1]] = f32::NAN;
        vol.data[[1, 1, 2]] = f32::NAN;
        vol.data[[1, 2, 2]] = f32::INFINITY;
        let e = preprocess(&vol, &cfg).unwrap_err().to_string();
        assert!(e.contains("2 NaN and 1 infinite"), "{e}");
        let empty = Volume {
            data: Array3::from_elem((4, 4, 4), -5.0),
            affine: IDENTITY,
        };
        let e = format!("{:#}", preprocess(&empty, &cfg).unwrap_err());
        assert!(e.contains("no foreground"), "{e}");
        let mut sing = phantom([18, 15, 11], IDENTITY);
        sing.affine[2][2] = 0.0;
        assert!(preprocess(&sing, &cfg).is_err());
        let none = Volume {
            data: Array3::zeros((0, 3, 3)),
            affine: IDENTITY,
        };
        assert!(preprocess(&none, &cfg).is_err());
        assert!(preprocess_training(&empty, None, &cfg).is_err());
    }
}
