//! Small dense linear algebra that reproduces the floating-point behaviour of the numpy / torch calls MONAI makes.
//!
//! Measured on numpy 2.4 (OpenBLAS 0.3.31, Haswell kernels) and torch 2.11 (MKL):
//! - `np.linalg.solve` / `np.linalg.inv` (LAPACK `gesv`): LU with partial pivoting whose triangular solves multiply
//!   by the reciprocal of the pivot instead of dividing. [`solve`] does the same; it is bit-identical to numpy for
//!   diagonal / permuted affines (every off-diagonal update is an exact zero) and agrees to ~1 ulp otherwise.
//! - numpy `@` on small matrices (OpenBLAS dgemm): a fused multiply-add chain over k, see [`mm_fma`].
//! - torch `@` on 4x4 float64 (`mm`, and `bmm` below 400 multiply-adds): a plain sequential sum over k,
//!   which is what [`crate::volume::matmul`] computes.
//!
//! The loops index like the LAPACK routines they mirror, so the order of every operation stays visible.
#![allow(clippy::needless_range_loop)]

/// `a @ b` as numpy computes small float64 matrix products: `acc = fma(a[i][k], b[k][j], acc)` for k = 0.., from 0.
pub(crate) fn mm_fma<const N: usize, const K: usize, const M: usize>(
    a: &[[f64; K]; N],
    b: &[[f64; M]; K],
) -> [[f64; M]; N] {
    std::array::from_fn(|i| {
        std::array::from_fn(|j| {
            let mut acc = 0.0f64;
            for k in 0..K {
                acc = a[i][k].mul_add(b[k][j], acc);
            }
            acc
        })
    })
}

/// Solves `a x = b` like LAPACK `gesv` (LU with partial pivoting, the first largest pivot; the row updates and
/// substitutions subtract plain products; divisions by a pivot are multiplications by its reciprocal).
/// `None` when a pivot is exactly zero (LAPACK's "singular matrix") or the result is not finite.
pub(crate) fn solve<const N: usize, const M: usize>(
    a: &[[f64; N]; N],
    b: &[[f64; M]; N],
) -> Option<[[f64; M]; N]> {
    let mut a = *a;
    let mut b = *b;
    for col in 0..N {
        let mut p = col;
        for r in col + 1..N {
            if a[r][col].abs() > a[p][col].abs() {
                p = r;
            }
        }
        if a[p][col] == 0.0 || !a[p][col].is_finite() {
            return None;
        }
        a.swap(col, p);
        b.swap(col, p);
        let r = 1.0 / a[col][col];
        for i in col + 1..N {
            let l = a[i][col] * r;
            a[i][col] = l;
            for j in col + 1..N {
                a[i][j] -= l * a[col][j];
            }
        }
    }
    // Forward substitution with the unit lower factor.
    for i in 0..N {
        for j in 0..M {
            let mut acc = b[i][j];
            for k in 0..i {
                acc -= a[i][k] * b[k][j];
            }
            b[i][j] = acc;
        }
    }
    // Back substitution with the upper factor.
    for i in (0..N).rev() {
        let r = 1.0 / a[i][i];
        for j in 0..M {
            let mut acc = b[i][j];
            for k in i + 1..N {
                acc -= a[i][k] * b[k][j];
            }
            b[i][j] = acc * r;
        }
    }
    b.iter().flatten().all(|v| v.is_finite()).then_some(b)
}

/// The N x N identity.
pub(crate) fn eye<const N: usize>() -> [[f64; N]; N] {
    std::array::from_fn(|i| std::array::from_fn(|j| if i == j { 1.0 } else { 0.0 }))
}

/// Transpose.
pub(crate) fn transpose<const N: usize, const M: usize>(a: &[[f64; M]; N]) -> [[f64; N]; M] {
    std::array::from_fn(|i| std::array::from_fn(|j| a[j][i]))
}

/// Lower Cholesky factor `L` of a symmetric positive definite matrix (`np.linalg.cholesky`); `None` if not SPD.
pub(crate) fn cholesky<const N: usize>(a: &[[f64; N]; N]) -> Option<[[f64; N]; N]> {
    let mut l = [[0.0f64; N]; N];
    for j in 0..N {
        let mut d = a[j][j];
        for k in 0..j {
            d -= l[j][k] * l[j][k];
        }
        if d.is_nan() || d <= 0.0 {
            return None;
        }
        let ljj = d.sqrt();
        l[j][j] = ljj;
        for i in j + 1..N {
            let mut s = a[i][j];
            for k in 0..j {
                s -= l[i][k] * l[j][k];
            }
            l[i][j] = s / ljj;
        }
    }
    Some(l)
}

/// Determinant of a 3x3 matrix.
pub(crate) fn det3(m: &[[f64; 3]; 3]) -> f64 {
    m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
        - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
}

/// Orthogonal polar factor `U V^T` of a nonsingular 3x3 matrix (what nibabel's `io_orientation` builds from an SVD),
/// by Newton's iteration `X <- (X + X^-T) / 2`. `None` for a singular matrix.
pub(crate) fn polar3(m: &[[f64; 3]; 3]) -> Option<[[f64; 3]; 3]> {
    let mut x = *m;
    for _ in 0..100 {
        let inv_t = transpose(&solve(&x, &eye::<3>())?);
        let next: [[f64; 3]; 3] =
            std::array::from_fn(|i| std::array::from_fn(|j| 0.5 * (x[i][j] + inv_t[i][j])));
        let delta = (0..3)
            .flat_map(|i| (0..3).map(move |j| (i, j)))
            .map(|(i, j)| (next[i][j] - x[i][j]).abs());
        let done = delta.fold(0.0f64, f64::max) < 1e-15;
        x = next;
        if done {
            break;
        }
    }
    x.iter().flatten().all(|v| v.is_finite()).then_some(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solve_inverts_and_rejects_singular() {
        let a = [[2.0, 1.0, 0.5], [0.0, 3.0, -1.0], [1.0, 0.0, 4.0]];
        let x = solve(&a, &eye::<3>()).unwrap();
        let id = mm_fma(&a, &x);
        for (i, row) in id.iter().enumerate() {
            for (j, v) in row.iter().enumerate() {
                assert!((v - if i == j { 1.0 } else { 0.0 }).abs() < 1e-14);
            }
        }
        assert!(solve(&[[1.0, 2.0], [2.0, 4.0]], &eye::<2>()).is_none());
    }

    #[test]
    fn diagonal_solve_uses_reciprocals() {
        // numpy: np.linalg.solve(diag(3), diag(1.5)) multiplies by 1/3.
        let a = [[3.0, 0.0], [0.0, 1.0]];
        let b = [[0.8, 0.0], [0.0, 1.0]];
        assert_eq!(solve(&a, &b).unwrap()[0][0], 0.8 * (1.0 / 3.0));
    }

    #[test]
    fn cholesky_and_polar() {
        let a = [[4.0, 2.0, 0.0], [2.0, 5.0, 1.0], [0.0, 1.0, 3.0]];
        let l = cholesky(&a).unwrap();
        let back = mm_fma(&l, &transpose(&l));
        for i in 0..3 {
            for j in 0..3 {
                assert!((back[i][j] - a[i][j]).abs() < 1e-14);
            }
        }
        let r = polar3(&[[0.0, -2.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.1, 3.0]]).unwrap();
        let rtr = mm_fma(&transpose(&r), &r);
        for i in 0..3 {
            for j in 0..3 {
                assert!((rtr[i][j] - if i == j { 1.0 } else { 0.0 }).abs() < 1e-12);
            }
        }
        assert!(r[1][0] > 0.99 && r[0][1] < -0.99);
        assert!((det3(&r) - 1.0).abs() < 1e-12);
    }
}
