//! The bundle's postprocessing of stitched logits (`VistaPostTransformd`): removal of point-only components
//! without a positive point, then the argmax/threshold rule and the mapping to the prompt ids.

use anyhow::Result;
use tch::{Device, Kind, Tensor};

use crate::model::components;

/// Logits `[B, ...]` -> labels `[...]` (float32): the prompt id of the largest positive logit, 0 where no logit
/// is positive, NaN where the logits are NaN (not computed). Without a label prompt, ids are 1..B.
pub fn logits_to_labels(logits: &Tensor, label_prompt: Option<&[i64]>) -> Tensor {
    let b = logits.size()[0];
    let pred = logits.masked_fill(&logits.lt(0.0), 0.0);
    if b > 1 {
        // argmax + 1, background where every channel is <= 0 (NaN counts as the maximum, as in torch).
        let is_bk = pred.le(0.0).all_dim(0, false);
        let index = pred.argmax(0, false);
        let table: Vec<f32> = match label_prompt {
            Some(ids) => std::iter::once(0.0)
                .chain(ids.iter().map(|&i| i as f32))
                .collect(),
            None => (0..=b).map(|i| i as f32).collect(),
        };
        let table = Tensor::from_slice(&table).to_device(pred.device());
        let labels = table
            .index_select(0, &(index + 1).flatten(0, -1))
            .view_as(&is_bk);
        labels.masked_fill(&is_bk, 0.0)
    } else {
        let pred = pred.squeeze_dim(0);
        let id = label_prompt
            .and_then(|ids| ids.first().copied())
            .unwrap_or(1) as f64;
        // {0, 1, NaN} -> {0, id, NaN}.
        pred.masked_fill(&pred.gt(0.0), id)
    }
}

/// MONAI `keep_components_with_positive_points` for point-only requests: in each channel of `logits`
/// `[B, X, Y, Z]`, positive regions (26-connected) that contain no positive point (label 1 or 3) are set to the
/// mean of the non-NaN logits outside the kept components. `points` are in voxel coordinates of the logits.
pub fn keep_components_with_positive_points(
    logits: &Tensor,
    points: &[[f64; 3]],
    labels: &[i64],
) -> Result<Tensor> {
    let device = logits.device();
    let host = logits
        .to_device(Device::Cpu)
        .to_kind(Kind::Float)
        .contiguous();
    let size = host.size();
    let dims = [size[1] as usize, size[2] as usize, size[3] as usize];
    let positives: Vec<[i64; 3]> = points
        .iter()
        .zip(labels)
        .filter(|(_, &l)| l == 1 || l == 3)
        .map(|(p, _)| {
            std::array::from_fn(|a| components::round_half_even(p[a]).clamp(0, dims[a] as i64 - 1))
        })
        .collect();
    if positives.is_empty() {
        return Ok(logits.shallow_clone());
    }
    let mut channels = Vec::new();
    for c in 0..size[0] {
        let img = host.get(c);
        let values: Vec<f32> = Vec::try_from(img.flatten(0, -1))?;
        let mask: Vec<bool> = values.iter().map(|&v| v > 0.0).collect();
        let (features, _) = components::label(&mask, &dims, 3);
        let mut keep_ids: Vec<u32> = positives
            .iter()
            .map(|p| features[(p[0] as usize * dims[1] + p[1] as usize) * dims[2] + p[2] as usize])
            .filter(|&id| id != 0)
            .collect();
        keep_ids.sort_unstable();
        keep_ids.dedup();
        let kept: Vec<bool> = features
            .iter()
            .map(|f| *f != 0 && keep_ids.binary_search(f).is_ok())
            .collect();
        let kept = Tensor::from_slice(&kept).view_as(&img);
        let pos = Tensor::from_slice(&mask).view_as(&img);
        let outside = kept.logical_not().logical_and(&img.isnan().logical_not());
        let fill = img.masked_select(&outside).mean(Kind::Float);
        channels.push(img.where_self(&pos.logical_and(&kept.logical_not()).logical_not(), &fill));
    }
    Ok(Tensor::stack(&channels, 0).to_device(device))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_threshold_and_prompt_mapping() {
        // Two channels, four voxels: background, channel 0, channel 1, NaN.
        let logits =
            Tensor::from_slice(&[-1.0f32, 2.0, 0.5, f32::NAN, -2.0, 1.0, 3.0, 0.0]).view([2, 4]);
        let labels: Vec<f32> = Vec::try_from(logits_to_labels(&logits, Some(&[3, 14]))).unwrap();
        assert_eq!(&labels[..3], &[0.0, 3.0, 14.0]);
        assert_eq!(
            labels[3], 3.0,
            "NaN counts as the maximum in torch's argmax"
        );
        let labels: Vec<f32> = Vec::try_from(logits_to_labels(&logits, None)).unwrap();
        assert_eq!(&labels[..3], &[0.0, 1.0, 2.0]);
        // One channel: threshold at 0, NaN kept.
        let one = Tensor::from_slice(&[-1.0f32, 0.0, 0.1, f32::NAN]).view([1, 4]);
        let labels: Vec<f32> = Vec::try_from(logits_to_labels(&one, Some(&[140]))).unwrap();
        assert_eq!(&labels[..3], &[0.0, 0.0, 140.0]);
        assert!(labels[3].is_nan());
    }

    #[test]
    fn components_without_positive_points_are_filled() {
        // 1 x 1 x 1 x 6 line: two positive runs; the point is in the second.
        let logits = Tensor::from_slice(&[1.0f32, 2.0, -1.0, -3.0, 4.0, 5.0]).view([1, 1, 1, 6]);
        let out = keep_components_with_positive_points(&logits, &[[0.0, 0.0, 4.4]], &[1]).unwrap();
        let v: Vec<f32> = Vec::try_from(out.flatten(0, -1)).unwrap();
        // Mean of the voxels outside the kept component: (1 + 2 - 1 - 3) / 4 = -0.25.
        assert_eq!(v, vec![-0.25, -0.25, -1.0, -3.0, 4.0, 5.0]);
        // Only negative points: unchanged.
        let out = keep_components_with_positive_points(&logits, &[[0.0, 0.0, 4.0]], &[0]).unwrap();
        assert!(out.equal(&logits));
    }
}
