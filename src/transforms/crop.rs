//! MONAI's `CropForeground` (`monai/transforms/croppad/array.py`, `generate_spatial_bounding_box` in
//! `monai/transforms/utils.py`) with the bundle's settings (select_fn `x > 0`, allow_smaller True, k_divisible 1),
//! and its inverse (zero padding back to the uncropped grid, as `Invertd` does with `BorderPad`).

use anyhow::{ensure, Result};
use ndarray::{s, Array3, ArrayView3, Axis};
use rayon::prelude::*;

use crate::volume::{matmul, Affine, Volume, IDENTITY};

/// A box of voxels, `start..end` (end exclusive) per axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropBox {
    /// First voxel per axis.
    pub start: [usize; 3],
    /// One past the last voxel per axis.
    pub end: [usize; 3],
}

impl CropBox {
    /// The whole of a grid of `dims`.
    pub fn full(dims: [usize; 3]) -> CropBox {
        CropBox {
            start: [0; 3],
            end: dims,
        }
    }

    /// Size of the box per axis.
    pub fn dims(&self) -> [usize; 3] {
        std::array::from_fn(|a| self.end[a].saturating_sub(self.start[a]))
    }

    /// `true` when some axis has no voxel.
    pub fn is_empty(&self) -> bool {
        self.dims().contains(&0)
    }
}

/// `generate_spatial_bounding_box(select_fn = x > 0, margin, allow_smaller=True)`: the bounding box of the voxels
/// `> 0` (NaN is not foreground), widened by `margin` voxels on every side and clipped to the volume.
/// `None` when no voxel is foreground (MONAI then returns the empty box (0, 0) and crops to a 0x0x0 volume).
pub fn foreground_box(data: ArrayView3<f32>, margin: usize) -> Option<CropBox> {
    let dims = [
        data.len_of(Axis(0)),
        data.len_of(Axis(1)),
        data.len_of(Axis(2)),
    ];
    // Per x slice: (y_min, y_max, z_min, z_max) of the foreground, if any.
    let per_slice: Vec<Option<[usize; 4]>> = (0..dims[0])
        .into_par_iter()
        .map(|i| {
            let plane = data.index_axis(Axis(0), i);
            let mut b: Option<[usize; 4]> = None;
            for (j, row) in plane.axis_iter(Axis(0)).enumerate() {
                let mut first = None;
                let mut last = 0;
                for (k, &v) in row.iter().enumerate() {
                    if v > 0.0 {
                        if first.is_none() {
                            first = Some(k);
                        }
                        last = k;
                    }
                }
                if let Some(f) = first {
                    b = Some(match b {
                        None => [j, j, f, last],
                        Some(o) => [o[0].min(j), o[1].max(j), o[2].min(f), o[3].max(last)],
                    });
                }
            }
            b
        })
        .collect();
    let mut lo = [usize::MAX; 3];
    let mut hi = [0usize; 3];
    for (i, b) in per_slice.iter().enumerate() {
        if let Some(b) = b {
            lo = [lo[0].min(i), lo[1].min(b[0]), lo[2].min(b[2])];
            hi = [hi[0].max(i), hi[1].max(b[1]), hi[2].max(b[3])];
        }
    }
    if lo[0] == usize::MAX {
        return None;
    }
    Some(CropBox {
        start: std::array::from_fn(|a| lo[a].saturating_sub(margin)),
        end: std::array::from_fn(|a| (hi[a] + margin + 1).min(dims[a])),
    })
}

/// Translation by `shift` voxels (MONAI `create_translate`).
fn translate(shift: [f64; 3]) -> Affine {
    let mut t = IDENTITY;
    for a in 0..3 {
        t[a][3] = shift[a];
    }
    t
}

/// The affine of the cropped grid: `A @ T(start)` (MONAI's bookkeeping).
pub fn crop_affine(affine: &Affine, b: &CropBox) -> Affine {
    matmul(affine, &translate(b.start.map(|s| s as f64)))
}

/// The affine of the re-padded (uncropped) grid: `A_cropped @ T(-start)` (what `Invertd`'s `BorderPad` records).
pub fn uncrop_affine(affine: &Affine, b: &CropBox) -> Affine {
    matmul(affine, &translate(b.start.map(|s| -(s as f64))))
}

/// Crops a volume to a box (which must lie inside it and be non-empty); the affine is shifted accordingly.
pub fn crop(vol: &Volume, b: &CropBox) -> Result<Volume> {
    let dims = vol.dims();
    ensure!(
        (0..3).all(|a| b.start[a] < b.end[a] && b.end[a] <= dims[a]),
        "crop box {b:?} is empty or outside the volume {dims:?}"
    );
    let data = vol
        .data
        .slice(s![
            b.start[0]..b.end[0],
            b.start[1]..b.end[1],
            b.start[2]..b.end[2]
        ])
        .to_owned();
    Ok(Volume {
        data,
        affine: crop_affine(&vol.affine, b),
    })
}

/// Undoes a crop: places `data` (of the box's size) at the box inside a zero volume of `full_dims`.
pub fn uncrop(data: ArrayView3<f32>, b: &CropBox, full_dims: [usize; 3]) -> Result<Array3<f32>> {
    let d = [
        data.len_of(Axis(0)),
        data.len_of(Axis(1)),
        data.len_of(Axis(2)),
    ];
    ensure!(
        d == b.dims(),
        "data of shape {d:?} does not fit the crop box {b:?}"
    );
    ensure!(
        (0..3).all(|a| b.end[a] <= full_dims[a]),
        "crop box {b:?} exceeds the grid {full_dims:?}"
    );
    let mut out = Array3::<f32>::zeros((full_dims[0], full_dims[1], full_dims[2]));
    out.slice_mut(s![
        b.start[0]..b.end[0],
        b.start[1]..b.end[1],
        b.start[2]..b.end[2]
    ])
    .assign(&data);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn box_margin_clipping_and_empty() {
        let mut a = Array3::<f32>::from_elem((20, 30, 40), -5.0);
        a[[3, 15, 20]] = 1.0;
        a[[12, 16, 39]] = 0.5;
        a[[19, 0, 0]] = f32::NAN;
        let b = foreground_box(a.view(), 10).unwrap();
        assert_eq!(
            b,
            CropBox {
                start: [0, 5, 10],
                end: [20, 27, 40]
            }
        );
        let b = foreground_box(a.view(), 0).unwrap();
        assert_eq!(
            b,
            CropBox {
                start: [3, 15, 20],
                end: [13, 17, 40]
            }
        );
        assert!(foreground_box(Array3::<f32>::zeros((3, 3, 3)).view(), 10).is_none());
    }

    #[test]
    fn crop_and_uncrop_round_trip() {
        let data = Array3::from_shape_fn((5, 6, 7), |(i, j, k)| (i * 100 + j * 10 + k) as f32);
        let mut aff = IDENTITY;
        aff[0][0] = -1.5;
        aff[0][3] = 10.0;
        let vol = Volume {
            data: data.clone(),
            affine: aff,
        };
        let b = CropBox {
            start: [1, 2, 3],
            end: [4, 6, 7],
        };
        let c = crop(&vol, &b).unwrap();
        assert_eq!(c.dims(), [3, 4, 4]);
        assert_eq!(c.data[[0, 0, 0]], 123.0);
        assert_eq!(c.affine[0][3], 10.0 - 1.5);
        assert_eq!(uncrop_affine(&c.affine, &b), aff);
        let back = uncrop(c.data.view(), &b, [5, 6, 7]).unwrap();
        assert_eq!(back[[1, 2, 3]], 123.0);
        assert_eq!(back[[0, 0, 0]], 0.0);
        assert!(crop(
            &vol,
            &CropBox {
                start: [0, 0, 0],
                end: [0, 6, 7]
            }
        )
        .is_err());
    }
}
