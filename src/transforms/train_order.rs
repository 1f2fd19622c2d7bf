//! The training pipeline's deterministic transforms on an image alone (the bundle's `evaluate.json`):
//! foreground crop -> intensity scaling -> RAS -> spacing (bilinear), and `Invertd(nearest)` of them.

use anyhow::{ensure, Context, Result};
use ndarray::Array3;

use super::{
    apply_spacing_plan, crop, foreground_box, plan_spacing, resample_to_grid,
    scale_intensity_range_inplace, uncrop, validate_volume, CropBox, Interp, Orientation,
    PreprocessConfig, SpacingPlan,
};
use crate::volume::{Affine, Volume};

/// What the training-order preprocessing did to an image, to invert a prediction.
#[derive(Debug, Clone)]
pub struct TrainOrderTrace {
    pub original_dims: [usize; 3],
    pub crop: CropBox,
    pub orientation: Orientation,
    /// Affine and shape after crop + RAS (the grid before resampling).
    pub oriented_affine: Affine,
    pub oriented_dims: [usize; 3],
    pub spacing: SpacingPlan,
}

/// The training pipeline's deterministic transforms on an image alone (`evaluate.json`): foreground crop ->
/// intensity scaling -> RAS -> spacing (bilinear). Returns the network input and the trace to invert predictions.
pub fn preprocess_train_order(
    image: &Volume,
    pre: &PreprocessConfig,
) -> Result<(Volume, TrainOrderTrace)> {
    validate_volume(image)?;
    let box_ = foreground_box(image.data.view(), pre.crop_margin).with_context(|| {
        format!(
            "no foreground: no voxel > 0 in the image of shape {:?} (MONAI would crop it to 0x0x0)",
            image.dims()
        )
    })?;
    let mut cur = crop(image, &box_)?;
    scale_intensity_range_inplace(&mut cur.data, &pre.intensity());
    let orientation = Orientation::to_ras(&cur.affine, cur.dims())?;
    if !orientation.is_identity() {
        cur.data = orientation.apply(cur.data.view())?;
    }
    cur.affine = orientation.apply_affine(&cur.affine);
    let plan = plan_spacing(&cur.affine, cur.dims(), pre.spacing)?;
    let trace = TrainOrderTrace {
        original_dims: image.dims(),
        crop: box_,
        orientation,
        oriented_affine: cur.affine,
        oriented_dims: cur.dims(),
        spacing: plan.clone(),
    };
    let out = apply_spacing_plan(&cur, &plan, Interp::Bilinear)?;
    Ok((out, trace))
}

/// `Invertd(nearest_interp=True)` of [`preprocess_train_order`]: spacing undone by nearest resampling onto the
/// oriented grid, orientation undone, crop undone by zero padding. NaN is carried over.
pub fn invert_train_order(pred: &Array3<f32>, trace: &TrainOrderTrace) -> Result<Array3<f32>> {
    let s = pred.shape();
    ensure!(
        [s[0], s[1], s[2]] == trace.spacing.out_dims,
        "prediction of shape {s:?} does not match the preprocessed grid {:?}",
        trace.spacing.out_dims
    );
    let vol = Volume {
        data: pred.as_standard_layout().into_owned(),
        affine: trace.spacing.out_affine,
    };
    let back = resample_to_grid(
        &vol,
        &trace.oriented_affine,
        trace.oriented_dims,
        Interp::Nearest,
    )?;
    let inv = trace.orientation.inverse();
    let data = if inv.is_identity() {
        back.data
    } else {
        inv.apply(back.data.view())?
    };
    uncrop(data.view(), &trace.crop, trace.original_dims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::IDENTITY;

    #[test]
    fn train_order_round_trip() {
        let mut a = IDENTITY;
        a[0][0] = -3.0;
        a[1][1] = 3.0;
        a[2][2] = 2.0;
        let data = Array3::from_shape_fn((20, 16, 12), |(i, j, k)| {
            if (4..15).contains(&i) && (3..12).contains(&j) && (2..10).contains(&k) {
                100.0
            } else {
                -1000.0
            }
        });
        let vol = Volume { data, affine: a };
        let pre = PreprocessConfig {
            crop_margin: 1,
            ..PreprocessConfig::default()
        };
        let (out, trace) = preprocess_train_order(&vol, &pre).unwrap();
        assert_eq!(trace.crop.start, [3, 2, 1]);
        assert_eq!(out.dims(), trace.spacing.out_dims);
        // A constant prediction maps back to the crop box and zero outside it.
        let ones = Array3::from_elem(out.data.raw_dim(), 7.0f32);
        let back = invert_train_order(&ones, &trace).unwrap();
        assert_eq!(back.shape(), &[20, 16, 12]);
        for ((i, j, k), &v) in back.indexed_iter() {
            let inside = (3..16).contains(&i) && (2..13).contains(&j) && (1..11).contains(&k);
            assert_eq!(v, if inside { 7.0 } else { 0.0 }, "at {:?}", (i, j, k));
        }
        assert!(invert_train_order(&Array3::zeros((1, 1, 1)), &trace).is_err());
    }
}
