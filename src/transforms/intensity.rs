//! MONAI's `ScaleIntensityRange` (`monai/transforms/intensity/array.py`) on a float32 tensor, with torch's float32
//! arithmetic: the Python-float constants become float32 scalars, and every step rounds to float32:
//! `y = (x - f32(a_min)) / f32(a_max - a_min)`, then `y * f32(b_max - b_min) + f32(b_min)`, then (if `clip`)
//! `clamp(y, b_min, b_max)`. NaN stays NaN. With `a_max == a_min` MONAI returns `x - a_min + b_min`.

use ndarray::Array3;
use rayon::prelude::*;

/// The constants of a `ScaleIntensityRange`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IntensityRange {
    /// Input value mapped to `b_min`.
    pub a_min: f64,
    /// Input value mapped to `b_max`.
    pub a_max: f64,
    /// Output lower value.
    pub b_min: f64,
    /// Output upper value.
    pub b_max: f64,
    /// Clamp the output to `[b_min, b_max]`.
    pub clip: bool,
}

impl IntensityRange {
    /// Maps one value exactly as MONAI/torch does on a float32 tensor.
    #[inline]
    pub fn apply(&self, x: f32) -> f32 {
        let a_min = self.a_min as f32;
        let b_min = self.b_min as f32;
        let diff = self.a_max - self.a_min;
        if diff == 0.0 {
            return (x - a_min) + b_min;
        }
        let y = (x - a_min) / diff as f32;
        let y = y * (self.b_max - self.b_min) as f32 + b_min;
        if self.clip {
            // torch.clamp(y, b_min, b_max) = min(max(y, lo), hi); NaN propagates.
            let v = if y < b_min { b_min } else { y };
            let hi = self.b_max as f32;
            if v > hi {
                hi
            } else {
                v
            }
        } else {
            y
        }
    }
}

/// Applies a `ScaleIntensityRange` in place (parallel over the first axis).
pub fn scale_intensity_range_inplace(data: &mut Array3<f32>, range: &IntensityRange) {
    let r = *range;
    match data.as_slice_mut() {
        Some(s) => s
            .par_chunks_mut(1 << 16)
            .for_each(|c| c.iter_mut().for_each(|v| *v = r.apply(*v))),
        None => data.iter_mut().for_each(|v| *v = r.apply(*v)),
    }
}

/// Returns a scaled copy (see [`scale_intensity_range_inplace`]).
pub fn scale_intensity_range(data: &Array3<f32>, range: &IntensityRange) -> Array3<f32> {
    let mut out = data.as_standard_layout().into_owned();
    scale_intensity_range_inplace(&mut out, range);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundle_constants() {
        let r = IntensityRange {
            a_min: -963.8247715525971,
            a_max: 1053.678477684517,
            b_min: 0.0,
            b_max: 1.0,
            clip: true,
        };
        assert_eq!(r.apply(-2000.0), 0.0);
        assert_eq!(r.apply(5000.0), 1.0);
        assert!(r.apply(f32::NAN).is_nan());
        let x = 40.0f32;
        assert_eq!(
            r.apply(x),
            (x - r.a_min as f32) / ((r.a_max - r.a_min) as f32)
        );
    }
}
