//! MONAI's `Orientation(axcodes="RAS")` (`monai/transforms/spatial/array.py` + `functional.py::orientation`):
//! nibabel's `io_orientation` (closest axis of the orthogonal polar factor, axis by axis) gives, per input axis, the
//! world axis it runs along and its sign; the data are flipped on the negative axes and transposed so that output
//! axis j runs along world axis j (R, A, S). The affine becomes `A @ inv_ornt_aff(ornt, shape)`. A pure
//! permutation/flip: exact, and exactly invertible.

use anyhow::{ensure, Context, Result};
use ndarray::{Array3, ArrayView3, ArrayViewMut2, Axis};
use rayon::prelude::*;

use super::linalg::polar3;
use crate::volume::{matmul, Affine, Volume, IDENTITY};

/// A reorientation, nibabel "ornt" style: input axis `i` becomes output axis `axes()[i]`, reversed when
/// `flips()[i]`. Built by [`Orientation::to_ras`], [`Orientation::new`] or [`Orientation::identity`], so the axes
/// are always a permutation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Orientation {
    axes: [usize; 3],
    flips: [bool; 3],
    in_dims: [usize; 3],
}

/// nibabel `io_orientation(affine)`: for each voxel axis, the world axis (0 = R, 1 = A, 2 = S) it is closest to and
/// whether it points the negative way. Errors on a singular affine.
pub fn io_orientation(affine: &Affine) -> Result<[(usize, bool); 3]> {
    let zooms = crate::volume::spacing(affine);
    let rs: [[f64; 3]; 3] = std::array::from_fn(|i| {
        std::array::from_fn(|j| affine[i][j] / if zooms[j] == 0.0 { 1.0 } else { zooms[j] })
    });
    let mut r = polar3(&rs).context("affine is singular: cannot determine its orientation")?;
    let mut out = [(0usize, false); 3];
    for (in_ax, o) in out.iter_mut().enumerate() {
        let col = [r[0][in_ax], r[1][in_ax], r[2][in_ax]];
        ensure!(
            col.iter().any(|c| c.abs() > 1e-8),
            "affine axis {in_ax} has no orientation"
        );
        let mut best = 0;
        for k in 1..3 {
            if col[k].abs() > col[best].abs() {
                best = k;
            }
        }
        *o = (best, col[best] < 0.0);
        r[best] = [0.0; 3];
    }
    Ok(out)
}

impl Orientation {
    /// A reorientation of a grid of `in_dims`: input axis `i` goes to output axis `axes[i]`, reversed if
    /// `flips[i]`. Errors unless `axes` is a permutation of 0, 1, 2.
    pub fn new(axes: [usize; 3], flips: [bool; 3], in_dims: [usize; 3]) -> Result<Orientation> {
        let mut seen = [false; 3];
        for &a in &axes {
            ensure!(
                a < 3 && !seen[a],
                "orientation axes {axes:?} are not a permutation of 0, 1, 2"
            );
            seen[a] = true;
        }
        Ok(Orientation {
            axes,
            flips,
            in_dims,
        })
    }

    /// Output axis of each input axis.
    pub fn axes(&self) -> [usize; 3] {
        self.axes
    }

    /// Whether each input axis is reversed.
    pub fn flips(&self) -> [bool; 3] {
        self.flips
    }

    /// Shape of the input.
    pub fn in_dims(&self) -> [usize; 3] {
        self.in_dims
    }

    /// The reorientation that brings a volume of `dims` with `affine` to RAS (MONAI `Orientation(axcodes="RAS")`).
    pub fn to_ras(affine: &Affine, dims: [usize; 3]) -> Result<Orientation> {
        let o = io_orientation(affine)?;
        Orientation::new([o[0].0, o[1].0, o[2].0], [o[0].1, o[1].1, o[2].1], dims)
            .with_context(|| format!("affine axes do not map to distinct world axes: {affine:?}"))
    }

    /// The identity on a grid of `dims`.
    pub fn identity(dims: [usize; 3]) -> Orientation {
        Orientation {
            axes: [0, 1, 2],
            flips: [false; 3],
            in_dims: dims,
        }
    }

    /// `true` when nothing moves.
    pub fn is_identity(&self) -> bool {
        self.axes == [0, 1, 2] && self.flips == [false; 3]
    }

    /// Shape of the output.
    pub fn out_dims(&self) -> [usize; 3] {
        let mut d = [0; 3];
        for i in 0..3 {
            d[self.axes[i]] = self.in_dims[i];
        }
        d
    }

    /// nibabel `inv_ornt_aff(ornt, in_dims)`: maps output voxel indices to input voxel indices.
    pub fn xform(&self) -> Affine {
        let mut m = [[0.0; 4]; 4];
        m[3][3] = 1.0;
        for i in 0..3 {
            m[i][self.axes[i]] = if self.flips[i] { -1.0 } else { 1.0 };
            m[i][3] = if self.flips[i] {
                self.in_dims[i] as f64 - 1.0
            } else {
                0.0
            };
        }
        m
    }

    /// The affine after reorientation: `A @ xform()` (MONAI's bookkeeping).
    pub fn apply_affine(&self, affine: &Affine) -> Affine {
        if self.is_identity() {
            return matmul(affine, &IDENTITY);
        }
        matmul(affine, &self.xform())
    }

    /// The reorientation that undoes this one.
    pub fn inverse(&self) -> Orientation {
        let mut axes = [0; 3];
        let mut flips = [false; 3];
        for i in 0..3 {
            axes[self.axes[i]] = i;
            flips[self.axes[i]] = self.flips[i];
        }
        Orientation {
            axes,
            flips,
            in_dims: self.out_dims(),
        }
    }

    /// Flips and transposes `data` (which must have shape `in_dims`).
    pub fn apply(&self, data: ArrayView3<f32>) -> Result<Array3<f32>> {
        let d = [
            data.len_of(Axis(0)),
            data.len_of(Axis(1)),
            data.len_of(Axis(2)),
        ];
        ensure!(
            d == self.in_dims,
            "orientation expects shape {:?}, got {d:?}",
            self.in_dims
        );
        let mut v = data;
        for i in 0..3 {
            if self.flips[i] {
                v.invert_axis(Axis(i));
            }
        }
        // Output axis j takes the input axis i with axes[i] == j.
        let mut perm = [0; 3];
        for i in 0..3 {
            perm[self.axes[i]] = i;
        }
        let v = v.permuted_axes(perm);
        let o = self.out_dims();
        let mut out = Array3::<f32>::zeros((o[0], o[1], o[2]));
        let plane = o[1] * o[2];
        if plane > 0 {
            let slice = out
                .as_slice_mut()
                .context("output array is not contiguous")?;
            slice
                .par_chunks_mut(plane)
                .enumerate()
                .try_for_each(|(i, chunk)| -> Result<()> {
                    ArrayViewMut2::from_shape((o[1], o[2]), chunk)?
                        .assign(&v.index_axis(Axis(0), i));
                    Ok(())
                })?;
        }
        Ok(out)
    }
}

/// Reorients a volume to RAS (MONAI `Orientation(axcodes="RAS")`); returns the reorientation for inverting it.
pub fn orient_ras(vol: &Volume) -> Result<(Volume, Orientation)> {
    let o = Orientation::to_ras(&vol.affine, vol.dims())?;
    let data = o.apply(vol.data.view())?;
    Ok((
        Volume {
            data,
            affine: o.apply_affine(&vol.affine),
        },
        o,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lps_and_permuted_axes() {
        let mut a = IDENTITY;
        a[0][0] = -1.5;
        a[1][1] = -1.5;
        a[2][2] = 2.0;
        assert_eq!(
            io_orientation(&a).unwrap(),
            [(0, true), (1, true), (2, false)]
        );
        // Axis 0 along S, axis 1 along -R, axis 2 along A.
        let mut b = [[0.0; 4]; 4];
        b[2][0] = 1.0;
        b[0][1] = -2.0;
        b[1][2] = 0.5;
        b[3][3] = 1.0;
        let o = Orientation::to_ras(&b, [4, 5, 6]).unwrap();
        assert_eq!(o.axes(), [2, 0, 1]);
        assert_eq!(o.flips(), [false, true, false]);
        assert_eq!(o.out_dims(), [5, 6, 4]);
        let data = Array3::from_shape_fn((4, 5, 6), |(i, j, k)| (i * 100 + j * 10 + k) as f32);
        let (v, o) = orient_ras(&Volume {
            data: data.clone(),
            affine: b,
        })
        .unwrap();
        // Output (r, a, s) = input (s, 4 - r, a).
        assert_eq!(v.data[[0, 2, 3]], (300 + 40 + 2) as f32);
        assert_eq!(
            io_orientation(&v.affine).unwrap(),
            [(0, false), (1, false), (2, false)]
        );
        let back = o.inverse().apply(v.data.view()).unwrap();
        assert_eq!(back, data);
        let back_aff = o.inverse().apply_affine(&v.affine);
        assert_eq!(back_aff, b);
    }
}
