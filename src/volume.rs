//! A 3-D image and its voxel-to-world affine: what flows between [`crate::io`] and [`crate::transforms`].
//!
//! Arrays are indexed `[x, y, z]` by voxel index along the file's axes (as nibabel and MONAI index them) and
//! stored in standard (C) order, so a volume maps directly onto a libtorch tensor `[X, Y, Z]`.

use ndarray::Array3;

/// Voxel-to-world (RAS+ millimetres, NIfTI convention) 4x4 affine, row-major: `world = A * [i, j, k, 1]`.
pub type Affine = [[f64; 4]; 4];

/// The identity affine.
pub const IDENTITY: Affine = [
    [1.0, 0.0, 0.0, 0.0],
    [0.0, 1.0, 0.0, 0.0],
    [0.0, 0.0, 1.0, 0.0],
    [0.0, 0.0, 0.0, 1.0],
];

/// The six orders of the three axes, the identity first.
pub const AXIS_PERMUTATIONS: [[usize; 3]; 6] = [
    [0, 1, 2],
    [0, 2, 1],
    [1, 0, 2],
    [1, 2, 0],
    [2, 0, 1],
    [2, 1, 0],
];

/// A scalar volume with its affine.
#[derive(Debug, Clone)]
pub struct Volume {
    /// Voxel values, indexed `[x, y, z]`.
    pub data: Array3<f32>,
    /// Voxel-to-world affine.
    pub affine: Affine,
}

/// An image's shape and spacing, what records keep of it once its voxels are released.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InputGeometry {
    pub shape: [usize; 3],
    pub spacing: [f64; 3],
}

impl Volume {
    /// Its shape and spacing.
    pub fn geometry(&self) -> InputGeometry {
        InputGeometry {
            shape: self.dims(),
            spacing: self.spacing(),
        }
    }

    /// Spatial shape `[X, Y, Z]`.
    pub fn dims(&self) -> [usize; 3] {
        let s = self.data.shape();
        [s[0], s[1], s[2]]
    }

    /// Voxel spacing: the norms of the affine's first three columns.
    pub fn spacing(&self) -> [f64; 3] {
        spacing(&self.affine)
    }
}

/// Voxel spacing of an affine: the norms of its first three columns.
pub fn spacing(a: &Affine) -> [f64; 3] {
    std::array::from_fn(|c| (0..3).map(|r| a[r][c] * a[r][c]).sum::<f64>().sqrt())
}

/// Matrix product `a * b`.
pub fn matmul(a: &Affine, b: &Affine) -> Affine {
    std::array::from_fn(|i| std::array::from_fn(|j| (0..4).map(|k| a[i][k] * b[k][j]).sum()))
}

/// `a * [p, 1]` for a point `p`.
pub fn apply(a: &Affine, p: [f64; 3]) -> [f64; 3] {
    std::array::from_fn(|i| a[i][0] * p[0] + a[i][1] * p[1] + a[i][2] * p[2] + a[i][3])
}

/// Inverse of a 4x4 matrix by Gauss-Jordan elimination with partial pivoting; `None` when singular.
pub fn inverse(a: &Affine) -> Option<Affine> {
    let mut m = *a;
    let mut inv = IDENTITY;
    for col in 0..4 {
        let pivot = (col..4).max_by(|&r1, &r2| m[r1][col].abs().total_cmp(&m[r2][col].abs()))?;
        if m[pivot][col].abs() < 1e-12 {
            return None;
        }
        m.swap(col, pivot);
        inv.swap(col, pivot);
        let d = m[col][col];
        for j in 0..4 {
            m[col][j] /= d;
            inv[col][j] /= d;
        }
        for r in 0..4 {
            if r != col {
                let f = m[r][col];
                if f != 0.0 {
                    for j in 0..4 {
                        m[r][j] -= f * m[col][j];
                        inv[r][j] -= f * inv[col][j];
                    }
                }
            }
        }
    }
    Some(inv)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inverse_of_an_affine_round_trips() {
        let a: Affine = [
            [-0.9, 0.1, 0.0, 10.0],
            [0.0, 1.1, 0.2, -5.0],
            [0.05, 0.0, 2.5, 3.0],
            [0.0, 0.0, 0.0, 1.0],
        ];
        let inv = inverse(&a).unwrap();
        let id = matmul(&a, &inv);
        for i in 0..4 {
            for j in 0..4 {
                assert!((id[i][j] - IDENTITY[i][j]).abs() < 1e-12);
            }
        }
        assert!(inverse(&[[0.0; 4]; 4]).is_none());
        let p = apply(&a, [1.0, 2.0, 3.0]);
        let back = apply(&inv, p);
        assert!((back[0] - 1.0).abs() < 1e-12 && (back[2] - 3.0).abs() < 1e-12);
        assert_eq!(spacing(&IDENTITY), [1.0, 1.0, 1.0]);
    }
}
