//! MONAI's `Spacing` / `SpatialResample` (`monai/transforms/spatial/array.py`, `.../functional.py`,
//! `monai/data/utils.py`), reproduced to the last bit where MONAI's own arithmetic is deterministic.
//!
//! **Plan** ([`plan_spacing`]): the output spacing per axis is `pixdim`, except that an input spacing within
//! `AFFINE_TOL` (1e-3) of it is kept, and a `pixdim <= 0` keeps the input spacing (MONAI's `fall_back_tuple` in
//! `zoom_affine`). The new affine keeps the direction cosines (Cholesky-based `zoom_affine(diagonal=False)`, shears
//! dropped), the output shape is `round_half_even(extent + 1)` of the input corners in output voxel units, and the
//! origin is the input corner that is smallest along every output axis (else the centres are aligned).
//!
//! **Resampling** ([`resample_to_grid`]): MONAI does `AffineTransform(normalized=False, align_corners=False,
//! reverse_indexing=True)`, i.e. `affine_grid` + `grid_sample(padding_mode="border")` in float64. We rebuild the very
//! same float64 sampling coordinates without materialising the grid: `theta = S_src @ inv(A_src) A_dst @ inv(S_dst)`
//! (normalisation matrices, naive 4x4 products as torch's small `bmm`), torch's `linspace(-1, 1, n) * (n-1) / n`
//! (FMA formula of its CPU kernel), the per-voxel dot product in torch's order (z, y, x, 1 terms in the reversed
//! index convention), unnormalise `((g + 1) * n - 1) / 2`, clamp to the border, then either `nearbyint` (round half
//! to even: nearest) or torch's trilinear weights and accumulation order (bilinear), with the float32 input widened to
//! float64 and the result rounded to float32. For axis-aligned geometry (every off-diagonal of `theta` exactly zero)
//! the coordinates are separable and computed once per axis.

use anyhow::{bail, ensure, Context, Result};
use ndarray::{Array3, ArrayView3};
use rayon::prelude::*;

use super::linalg::{cholesky, eye, mm_fma, solve, transpose};
use crate::volume::{matmul, Affine, Volume};

/// MONAI's `AFFINE_TOL` (`monai/data/utils.py`).
pub const AFFINE_TOL: f64 = 1e-3;

/// Largest resampled grid accepted (2^33 voxels, 32 GiB of float32): a guard against absurd `pixdim` values.
pub const MAX_VOXELS: usize = 1 << 33;

/// Interpolation of a resampling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interp {
    /// Trilinear (`grid_sample` mode "bilinear"), for images.
    Bilinear,
    /// Nearest neighbour (`grid_sample` mode "nearest", ties to even), for label maps. NaN is carried over.
    Nearest,
}

/// What `Spacing` decides for one volume before touching voxels.
#[derive(Debug, Clone, PartialEq)]
pub struct SpacingPlan {
    /// Input affine.
    pub input_affine: Affine,
    /// Input spatial shape.
    pub input_dims: [usize; 3],
    /// Output voxel spacing actually used per axis (after the tolerance and `pixdim <= 0` rules).
    pub out_spacing: [f64; 3],
    /// The target affine MONAI computes (`zoom_affine` + `compute_shape_offset` origin).
    pub target_affine: Affine,
    /// Output spatial shape.
    pub out_dims: [usize; 3],
    /// `true` when MONAI skips the resampling (target within `AFFINE_TOL` of the input with the same shape):
    /// the data and affine are then passed through unchanged.
    pub unchanged: bool,
    /// The affine of the output as MONAI records it: `input_affine @ solve(input_affine, target_affine)`, or the
    /// input affine when `unchanged`.
    pub out_affine: Affine,
}

fn to3(a: &Affine) -> [[f64; 3]; 3] {
    std::array::from_fn(|i| std::array::from_fn(|j| a[i][j]))
}

/// `torch.allclose(a, b, rtol=1e-5, atol)`: `|a - b| <= atol + rtol * |b|` elementwise.
fn allclose(a: &Affine, b: &Affine, atol: f64) -> bool {
    (0..4).all(|i| (0..4).all(|j| (a[i][j] - b[i][j]).abs() <= atol + 1e-5 * b[i][j].abs()))
}

/// Checks that an affine is usable: finite, last row `[0, 0, 0, 1]`, no zero-length axis, not degenerate.
pub fn validate_affine(a: &Affine) -> Result<()> {
    ensure!(
        a.iter().flatten().all(|v| v.is_finite()),
        "affine has non-finite entries: {a:?}"
    );
    ensure!(
        a[3] == [0.0, 0.0, 0.0, 1.0],
        "affine's last row must be [0, 0, 0, 1], got {:?}",
        a[3]
    );
    let sp = crate::volume::spacing(a);
    ensure!(
        sp.iter().all(|&s| s > 0.0),
        "affine has a zero-length voxel axis (spacing {sp:?}): {a:?}"
    );
    let m = to3(a);
    let det = super::linalg::det3(&m);
    ensure!(
        det.abs() > 1e-9 * sp[0] * sp[1] * sp[2],
        "affine is singular or degenerate (det {det:e}, spacing {sp:?}): {a:?}"
    );
    Ok(())
}

/// `monai.data.utils.zoom_affine(affine, scale, diagonal=False)`: the direction cosines of `affine` (shears
/// removed through a Cholesky factorisation, as MONAI does) scaled to `scale`; zero translation.
fn zoom_affine(affine: &Affine, scale: [f64; 3]) -> Result<Affine> {
    let rzs = to3(affine);
    let gram = mm_fma(&transpose(&rzs), &rzs);
    let zs = transpose(
        &cholesky(&gram).context("affine's rotation-zoom part is not positive definite")?,
    );
    let inv_zs = solve(&zs, &eye::<3>()).context("singular zoom in affine")?;
    let rotation = mm_fma(&rzs, &inv_zs);
    let diag: [[f64; 3]; 3] = std::array::from_fn(|i| {
        std::array::from_fn(|j| {
            if i == j {
                zs[i][i].signum() * scale[i].abs()
            } else {
                0.0
            }
        })
    });
    let m = mm_fma(&rotation, &diag);
    let mut out = eye::<4>();
    for i in 0..3 {
        out[i][..3].copy_from_slice(&m[i]);
    }
    Ok(out)
}

/// `monai.data.utils.compute_shape_offset(shape, in_affine, out_affine, scale_extent=False)`.
fn compute_shape_offset(
    dims: [usize; 3],
    in_affine: &Affine,
    out_affine: &Affine,
) -> Result<([usize; 3], [f64; 3])> {
    let x = solve(out_affine, in_affine).context("target affine is not invertible")?;
    // np.meshgrid(indexing="ij") of (0, n-1) per axis, flattened: corner c = 4 * c0 + 2 * c1 + c2.
    let mut corners = [[1.0f64; 8]; 4];
    for c in 0..8 {
        for (axis, row) in corners.iter_mut().take(3).enumerate() {
            let bit = (c >> (2 - axis)) & 1;
            row[c] = if bit == 1 {
                dims[axis] as f64 - 1.0
            } else {
                0.0
            };
        }
    }
    let dist = mm_fma(&x, &corners);
    let world = mm_fma(in_affine, &corners);
    let mut out_dims = [0usize; 3];
    for a in 0..3 {
        let vals: [f64; 8] = std::array::from_fn(|c| dist[a][c] / dist[3][c]);
        let max = vals.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let min = vals.iter().copied().fold(f64::INFINITY, f64::min);
        let n = ((max - min) + 1.0).round_ties_even();
        ensure!(
            (1.0..1e9).contains(&n),
            "output shape along axis {a} is invalid ({n})"
        );
        out_dims[a] = n as usize;
    }
    for i in 0..8 {
        let ok = (0..3).all(|a| {
            let m = (0..8)
                .map(|j| dist[a][j] - dist[a][i])
                .fold(f64::INFINITY, f64::min);
            m.abs() <= 1e-8
        });
        if ok {
            return Ok((out_dims, [world[0][i], world[1][i], world[2][i]]));
        }
    }
    // No corner is minimal on every axis (strong shear): align the centres, as MONAI does.
    let half_in = [
        [dims[0] as f64 / 2.0],
        [dims[1] as f64 / 2.0],
        [dims[2] as f64 / 2.0],
    ];
    let half_out = [
        [out_dims[0] as f64 / 2.0],
        [out_dims[1] as f64 / 2.0],
        [out_dims[2] as f64 / 2.0],
    ];
    let a = mm_fma(&to3(in_affine), &half_in);
    let b = mm_fma(&to3(out_affine), &half_out);
    let offset = std::array::from_fn(|r| (a[r][0] + in_affine[r][3]) - b[r][0]);
    Ok((out_dims, offset))
}

/// Decides output spacing, affine and shape for resampling a volume of `dims` with `affine` to `pixdim`
/// (MONAI `Spacing(pixdim, diagonal=False, scale_extent=False)`); a `pixdim` entry `<= 0` keeps that axis' spacing.
pub fn plan_spacing(affine: &Affine, dims: [usize; 3], pixdim: [f64; 3]) -> Result<SpacingPlan> {
    validate_affine(affine)?;
    ensure!(dims.iter().all(|&d| d > 0), "empty volume (shape {dims:?})");
    ensure!(
        pixdim.iter().all(|p| p.is_finite()),
        "pixdim must be finite, got {pixdim:?}"
    );
    let orig = crate::volume::spacing(affine);
    // Spacing.__call__: keep the input spacing when it is within AFFINE_TOL of the target.
    let out_d: [f64; 3] = std::array::from_fn(|i| {
        let t = pixdim[i];
        if t - AFFINE_TOL <= orig[i] && orig[i] <= t + AFFINE_TOL {
            orig[i]
        } else {
            t
        }
    });
    // zoom_affine: fall_back_tuple replaces non-positive entries with the input spacing.
    let scale: [f64; 3] = std::array::from_fn(|i| if out_d[i] > 0.0 { out_d[i] } else { orig[i] });
    let mut target = zoom_affine(affine, scale)?;
    let (out_dims, offset) = compute_shape_offset(dims, affine, &target)?;
    for r in 0..3 {
        target[r][3] = offset[r];
    }
    let xform = solve(affine, &target).context("input affine is not invertible")?;
    let unchanged = out_dims == dims
        && (allclose(affine, &target, AFFINE_TOL) || allclose(&xform, &eye(), AFFINE_TOL));
    let out_affine = if unchanged {
        *affine
    } else {
        matmul(affine, &xform)
    };
    Ok(SpacingPlan {
        input_affine: *affine,
        input_dims: dims,
        out_spacing: scale,
        target_affine: target,
        out_dims,
        unchanged,
        out_affine,
    })
}

/// Resamples `vol` to voxel spacing `pixdim` (MONAI `Spacing`, padding "border", align_corners False, float64
/// arithmetic, float32 result). A `pixdim` entry `<= 0` keeps that axis' spacing. Errors on an invalid affine or
/// an empty volume (NaN voxels propagate through the interpolation as in MONAI).
pub fn resample_to_spacing(vol: &Volume, pixdim: [f64; 3], mode: Interp) -> Result<Volume> {
    let plan = plan_spacing(&vol.affine, vol.dims(), pixdim)?;
    apply_spacing_plan(vol, &plan, mode)
}

/// Applies a plan made by [`plan_spacing`] for this volume's geometry.
pub fn apply_spacing_plan(vol: &Volume, plan: &SpacingPlan, mode: Interp) -> Result<Volume> {
    ensure!(
        vol.dims() == plan.input_dims && vol.affine == plan.input_affine,
        "spacing plan was made for another geometry ({:?} vs {:?})",
        plan.input_dims,
        vol.dims()
    );
    resample_to_grid(vol, &plan.target_affine, plan.out_dims, mode)
}

/// MONAI `SpatialResample` from `vol`'s grid onto the grid `dst_affine` / `dst_dims` (border padding,
/// align_corners False). When the target is within `AFFINE_TOL` of the source and the shape is the same, MONAI
/// passes the data through untouched, and so does this. The returned affine is `A_src @ solve(A_src, A_dst)`
/// (MONAI's bookkeeping), or `A_src` when passed through.
pub fn resample_to_grid(
    vol: &Volume,
    dst_affine: &Affine,
    dst_dims: [usize; 3],
    mode: Interp,
) -> Result<Volume> {
    validate_affine(&vol.affine)?;
    validate_affine(dst_affine)?;
    let src_dims = vol.dims();
    ensure!(
        src_dims.iter().all(|&d| d > 0),
        "empty volume (shape {src_dims:?})"
    );
    ensure!(
        dst_dims.iter().all(|&d| d > 0),
        "empty target grid (shape {dst_dims:?})"
    );
    let xform = solve(&vol.affine, dst_affine).context("source affine is not invertible")?;
    let unchanged = dst_dims == src_dims
        && (allclose(&vol.affine, dst_affine, AFFINE_TOL) || allclose(&xform, &eye(), AFFINE_TOL));
    if unchanged {
        return Ok(vol.clone());
    }
    let data = sample(vol.data.view(), &xform, dst_dims, mode)?;
    Ok(Volume {
        data,
        affine: matmul(&vol.affine, &xform),
    })
}

/// `monai.networks.utils.normalize_transform(shape, align_corners=False)`: voxel -> [-1, 1] coordinates.
fn normalize_transform(dims: [usize; 3]) -> Affine {
    let mut m = eye::<4>();
    for a in 0..3 {
        let n = dims[a] as f64;
        m[a][a] = 2.0 / n;
        m[a][3] = 1.0 / n - 1.0;
    }
    m
}

/// torch `linspace(-1, 1, n) * (n - 1) / n` (affine_grid's base coordinates, align_corners False), with the
/// FMA formula of torch's CPU linspace kernel (`start + step * i` below halfway, `end - step * (n - 1 - i)` above).
fn base_coords(n: usize) -> Vec<f64> {
    if n <= 1 {
        return vec![0.0; n];
    }
    let step = 2.0 / (n as f64 - 1.0);
    let half = n / 2;
    (0..n)
        .map(|i| {
            let l = if i < half {
                step.mul_add(i as f64, -1.0)
            } else {
                (-step).mul_add((n - i - 1) as f64, 1.0)
            };
            l * (n as f64 - 1.0) / n as f64
        })
        .collect()
}

/// grid_sample's unnormalisation (align_corners False) and border clamp: source voxel coordinate.
#[inline(always)]
fn unnormalize_border(g: f64, n: usize) -> f64 {
    let u = ((g + 1.0) * n as f64 - 1.0) / 2.0;
    let hi = n as f64 - 1.0;
    // std::min(n - 1, std::max(u, 0)) as torch's clip_coordinates.
    let u = if u < 0.0 { 0.0 } else { u };
    if u < hi {
        u
    } else {
        hi
    }
}

/// One source coordinate `u` (already clamped to `[0, n - 1]`), split for both interpolations.
#[derive(Debug, Clone, Copy)]
struct Tap {
    /// `floor(u)`.
    i0: usize,
    /// `u - floor(u)` (torch's `ix - ix_tnw`, exact).
    f0: f64,
    /// `(floor(u) + 1) - u` (torch's `ix_bse - ix`).
    f1: f64,
    /// `floor(u) + 1 < n`: the upper neighbour exists.
    next: bool,
    /// `nearbyint(u)`: round half to even.
    nearest: usize,
}

impl Tap {
    #[inline(always)]
    fn new(u: f64, n: usize) -> Tap {
        // u is in [0, n - 1], so truncation is floor and the fractional part is exact.
        let i0 = u as usize;
        let fl = i0 as f64;
        let f0 = u - fl;
        let nearest = if f0 > 0.5 || (f0 == 0.5 && i0 % 2 == 1) {
            i0 + 1
        } else {
            i0
        };
        Tap {
            i0,
            f0,
            f1: (fl + 1.0) - u,
            next: i0 + 1 < n,
            nearest,
        }
    }
}

/// Source coordinates for every output voxel: separable (per axis, for axis-aligned geometry) or per voxel.
enum Coords {
    Separable([Vec<Tap>; 3]),
    General {
        /// `b_z * theta[a][2]` per output z, `b_y * theta[a][1]` per output y, `b_x * theta[a][0]` per output x.
        pz: [Vec<f64>; 3],
        py: [Vec<f64>; 3],
        px: [Vec<f64>; 3],
        t: [f64; 3],
        src_dims: [usize; 3],
    },
}

impl Coords {
    fn new(xform: &Affine, src_dims: [usize; 3], dst_dims: [usize; 3]) -> Result<Coords> {
        let s = normalize_transform(src_dims);
        let d_inv = solve(&normalize_transform(dst_dims), &eye::<4>())
            .context("normalisation is singular")?;
        let theta = matmul(&matmul(&s, xform), &d_inv);
        ensure!(
            theta.iter().flatten().all(|v| v.is_finite()),
            "non-finite resampling transform"
        );
        let base: [Vec<f64>; 3] = std::array::from_fn(|a| base_coords(dst_dims[a]));
        let separable = (0..3).all(|a| (0..3).all(|b| a == b || theta[a][b] == 0.0));
        if separable {
            // g = ((0 + 0) + b * theta_aa) + theta_a3: the zero products contribute exact zeros.
            let per_axis = std::array::from_fn(|a| {
                let n = src_dims[a];
                base[a]
                    .iter()
                    .map(|&b| Tap::new(unnormalize_border(b * theta[a][a] + theta[a][3], n), n))
                    .collect()
            });
            return Ok(Coords::Separable(per_axis));
        }
        let prod = |axis: usize| -> [Vec<f64>; 3] {
            std::array::from_fn(|a| base[axis].iter().map(|&b| b * theta[a][axis]).collect())
        };
        Ok(Coords::General {
            pz: prod(2),
            py: prod(1),
            px: prod(0),
            t: [theta[0][3], theta[1][3], theta[2][3]],
            src_dims,
        })
    }
}

/// Resamples `src` onto a `dst_dims` grid whose voxel p samples source voxel position `xform @ p`.
fn sample(
    src: ArrayView3<f32>,
    xform: &Affine,
    dst_dims: [usize; 3],
    mode: Interp,
) -> Result<Array3<f32>> {
    match dst_dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
    {
        Some(n) if n <= MAX_VOXELS => {}
        _ => bail!("output grid {dst_dims:?} is too large (more than {MAX_VOXELS} voxels)"),
    }
    let sd = src.shape();
    let src_dims = [sd[0], sd[1], sd[2]];
    let coords = Coords::new(xform, src_dims, dst_dims)?;
    let src = src.as_standard_layout();
    let src = src.as_slice().context("source array is not contiguous")?;
    let mut out = Array3::<f32>::zeros((dst_dims[0], dst_dims[1], dst_dims[2]));
    let slice_len = dst_dims[1] * dst_dims[2];
    let out_slice = out
        .as_slice_mut()
        .context("output array is not contiguous")?;
    let (sy, sz) = (src_dims[1] * src_dims[2], src_dims[2]);
    out_slice
        .par_chunks_mut(slice_len)
        .enumerate()
        .for_each(|(i, plane)| {
            for (j, row) in plane.chunks_mut(dst_dims[2]).enumerate() {
                match (&coords, mode) {
                    (Coords::Separable(c), Interp::Nearest) => {
                        let base = c[0][i].nearest * sy + c[1][j].nearest * sz;
                        for (o, tz) in row.iter_mut().zip(&c[2]) {
                            *o = src[base + tz.nearest];
                        }
                    }
                    (Coords::Separable(c), Interp::Bilinear) => {
                        for (o, tz) in row.iter_mut().zip(&c[2]) {
                            *o = trilinear(src, sy, sz, [c[0][i], c[1][j], *tz]);
                        }
                    }
                    (
                        Coords::General {
                            pz,
                            py,
                            px,
                            t,
                            src_dims,
                        },
                        _,
                    ) => {
                        for (k, o) in row.iter_mut().enumerate() {
                            let tap: [Tap; 3] = std::array::from_fn(|a| {
                                let g = ((pz[a][k] + py[a][j]) + px[a][i]) + t[a];
                                Tap::new(unnormalize_border(g, src_dims[a]), src_dims[a])
                            });
                            *o = match mode {
                                Interp::Nearest => {
                                    src[tap[0].nearest * sy + tap[1].nearest * sz + tap[2].nearest]
                                }
                                Interp::Bilinear => trilinear(src, sy, sz, tap),
                            };
                        }
                    }
                }
            }
        });
    Ok(out)
}

/// torch's 3-D `grid_sample` bilinear kernel (float64), in its own naming: x = W = our axis 2, y = H = our axis 1,
/// z = D = our axis 0. Weights are `(fx * fy) * fz` and the taps are accumulated in torch's order (tnw, tne, tsw,
/// tse, bnw, bne, bsw, bse); taps beyond the far border (weight 0) are skipped as torch does.
#[inline(always)]
fn trilinear(src: &[f32], sy: usize, sz: usize, t: [Tap; 3]) -> f32 {
    let [tz, ty, tx] = t;
    let at = |z: usize, y: usize, x: usize| f64::from(src[z * sy + y * sz + x]);
    let (x0, y0, z0) = (tx.i0, ty.i0, tz.i0);
    let mut out = 0.0f64;
    out += at(z0, y0, x0) * (tx.f1 * ty.f1 * tz.f1);
    if tx.next {
        out += at(z0, y0, x0 + 1) * (tx.f0 * ty.f1 * tz.f1);
    }
    if ty.next {
        out += at(z0, y0 + 1, x0) * (tx.f1 * ty.f0 * tz.f1);
    }
    if tx.next && ty.next {
        out += at(z0, y0 + 1, x0 + 1) * (tx.f0 * ty.f0 * tz.f1);
    }
    if tz.next {
        out += at(z0 + 1, y0, x0) * (tx.f1 * ty.f1 * tz.f0);
        if tx.next {
            out += at(z0 + 1, y0, x0 + 1) * (tx.f0 * ty.f1 * tz.f0);
        }
        if ty.next {
            out += at(z0 + 1, y0 + 1, x0) * (tx.f1 * ty.f0 * tz.f0);
        }
        if tx.next && ty.next {
            out += at(z0 + 1, y0 + 1, x0 + 1) * (tx.f0 * ty.f0 * tz.f0);
        }
    }
    out as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn diag(s: [f64; 3], t: [f64; 3]) -> Affine {
        let mut a = eye::<4>();
        for i in 0..3 {
            a[i][i] = s[i];
            a[i][3] = t[i];
        }
        a
    }

    #[test]
    fn shape_and_origin_rules() {
        // 3 mm -> 1.5 mm: n -> 2n - 1, origin kept.
        let a = diag(
            [3.0, 3.0, 3.0],
            [-177.95632934570312, 11.319000244140625, 94.3017578125],
        );
        let p = plan_spacing(&a, [122, 101, 112], [1.5; 3]).unwrap();
        assert_eq!(p.out_dims, [243, 201, 223]);
        assert!(!p.unchanged);
        assert_eq!(p.target_affine, diag([1.5; 3], [a[0][3], a[1][3], a[2][3]]));
        // Flipped axes: directions kept, origin is the corner with the smallest output index (the same voxel 0).
        let b = diag([-0.75, -2.25, 0.78125], [120.3, 98.6, -310.25]);
        let p = plan_spacing(&b, [64, 30, 73], [1.5; 3]).unwrap();
        // 63*0.5+1 = 32.5 -> 32 (ties to even), 29*1.5+1 = 44.5 -> 44, 72*25/48+1 = 38.5 -> 38.
        assert_eq!(p.out_dims, [32, 44, 38]);
        assert_eq!(p.target_affine[0][0], -1.5);
        assert_eq!(p.target_affine[1][1], -1.5);
        assert_eq!(
            [
                p.target_affine[0][3],
                p.target_affine[1][3],
                p.target_affine[2][3]
            ],
            [120.3, 98.6, -310.25]
        );
        // pixdim <= 0 keeps the axis; a spacing within 1e-3 of the target is kept as is (no resampling at all).
        let p = plan_spacing(&a, [122, 101, 112], [1.5, 1.5, -1.0]).unwrap();
        assert_eq!(p.out_dims, [243, 201, 112]);
        assert_eq!(p.out_spacing, [1.5, 1.5, 3.0]);
        let c = diag([-1.5004, -1.5, 1.5], [1.0, 2.0, 3.0]);
        let p = plan_spacing(&c, [10, 11, 12], [1.5; 3]).unwrap();
        assert!(p.unchanged);
        assert_eq!(p.out_affine, c);
    }

    #[test]
    fn base_coords_match_torch() {
        // torch.linspace(-1, 1, 7) * 6 / 7 (values printed by torch 2.11).
        let b = base_coords(7);
        assert_eq!(b[3], 5.551115123125783e-17 * 6.0 / 7.0);
        assert_eq!(b[0], -6.0 / 7.0);
        assert_eq!(base_coords(1), vec![0.0]);
    }

    #[test]
    fn nearest_half_way_ties_follow_monai() {
        // 3 mm -> 1.5 mm nearest: output voxel 2m+1 lies exactly between input voxels m and m+1. MONAI's float64
        // coordinate chain lands on 0.5, 1.5, 2.5 exactly (ties to even: 0, 2, 2) but on 3.4999999999999996 for
        // output 7 (-> 3) and 4.5 (-> 4): values printed by MONAI 1.6.1's Spacing(mode="nearest").
        let a = diag([3.0, 3.0, 3.0], [0.0, 0.0, 0.0]);
        let data = Array3::from_shape_fn((6, 1, 1), |(i, _, _)| i as f32);
        let v = resample_to_spacing(
            &Volume { data, affine: a },
            [1.5, 3.0, 3.0],
            Interp::Nearest,
        )
        .unwrap();
        let got: Vec<f32> = v.data.iter().copied().collect();
        assert_eq!(
            got,
            vec![0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0, 5.0]
        );
        let v = resample_to_spacing(
            &Volume {
                data: Array3::from_shape_fn((6, 1, 1), |(i, _, _)| i as f32),
                affine: a,
            },
            [1.5, 3.0, 3.0],
            Interp::Bilinear,
        )
        .unwrap();
        let got: Vec<f32> = v.data.iter().copied().collect();
        assert_eq!(
            got,
            vec![0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0]
        );
    }

    #[test]
    fn rejects_degenerate_affines() {
        let mut a = eye::<4>();
        a[1][1] = 0.0;
        assert!(validate_affine(&a).is_err());
        let mut b = eye::<4>();
        b[0] = [1.0, 1.0, 0.0, 0.0];
        b[1] = [1.0, 1.0, 0.0, 0.0];
        assert!(validate_affine(&b).is_err());
        let mut c = eye::<4>();
        c[2][3] = f64::NAN;
        assert!(validate_affine(&c).is_err());
        let v = Volume {
            data: Array3::zeros((2, 2, 2)),
            affine: eye(),
        };
        assert!(resample_to_spacing(&v, [f64::NAN, 1.0, 1.0], Interp::Bilinear).is_err());
        let e = Volume {
            data: Array3::zeros((0, 2, 2)),
            affine: eye(),
        };
        assert!(resample_to_spacing(&e, [1.5; 3], Interp::Bilinear).is_err());
    }
}
