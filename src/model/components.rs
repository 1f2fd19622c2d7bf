//! Connected-component labelling that numbers components exactly as `skimage.measure.label` does, and
//! MONAI's `keep_merge_components_with_points`, which the point/auto combination relies on.

/// Labels the foreground of a C-order boolean array of shape `dims` with full connectivity in at most
/// `connectivity` dimensions (skimage's `connectivity`: neighbours differ by at most 1 in every axis and in at
/// most `connectivity` axes). Labels start at 1 and follow the raster order of each component's first voxel,
/// as skimage numbers them; background is 0. Returns the labels and the number of components.
pub fn label(mask: &[bool], dims: &[usize], connectivity: usize) -> (Vec<u32>, u32) {
    let n: usize = dims.iter().product();
    assert_eq!(mask.len(), n, "mask length does not match its shape");
    let ndim = dims.len();
    let mut strides = vec![1usize; ndim];
    for i in (0..ndim.saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * dims[i + 1];
    }
    // Offsets to the already-visited half of the neighbourhood (lexicographically negative offsets).
    let mut offsets: Vec<Vec<i64>> = Vec::new();
    let total = 3usize.pow(ndim as u32);
    for code in 0..total {
        let mut c = code;
        let mut off = vec![0i64; ndim];
        for o in off.iter_mut().rev() {
            *o = (c % 3) as i64 - 1;
            c /= 3;
        }
        let nonzero = off.iter().filter(|&&v| v != 0).count();
        let first_nonzero = off.iter().find(|&&v| v != 0).copied();
        if nonzero >= 1 && nonzero <= connectivity && first_nonzero == Some(-1) {
            offsets.push(off);
        }
    }

    let mut parent: Vec<usize> = (0..n).collect();
    fn find(parent: &mut [usize], mut x: usize) -> usize {
        while parent[x] != x {
            parent[x] = parent[parent[x]];
            x = parent[x];
        }
        x
    }
    let mut coord = vec![0usize; ndim];
    for idx in 0..n {
        if idx > 0 {
            // Advance the multi-index in C order.
            let mut a = ndim;
            while a > 0 {
                a -= 1;
                coord[a] += 1;
                if coord[a] < dims[a] {
                    break;
                }
                coord[a] = 0;
            }
        }
        if !mask[idx] {
            continue;
        }
        'offsets: for off in &offsets {
            let mut j = idx as i64;
            for a in 0..ndim {
                let c = coord[a] as i64 + off[a];
                if c < 0 || c >= dims[a] as i64 {
                    continue 'offsets;
                }
                j += off[a] * strides[a] as i64;
            }
            let j = j as usize;
            if mask[j] {
                let (ra, rb) = (find(&mut parent, idx), find(&mut parent, j));
                if ra != rb {
                    // Keep the smallest index as the root: it is the component's first voxel in raster order.
                    let (lo, hi) = if ra < rb { (ra, rb) } else { (rb, ra) };
                    parent[hi] = lo;
                }
            }
        }
    }
    let mut labels = vec![0u32; n];
    let mut next = 0u32;
    for idx in 0..n {
        if !mask[idx] {
            continue;
        }
        let root = find(&mut parent, idx);
        if root == idx {
            next += 1;
            labels[idx] = next;
        } else {
            labels[idx] = labels[root];
        }
    }
    (labels, next)
}

/// Rounds half to even, as `torch.round` and `numpy.round` do.
pub fn round_half_even(v: f64) -> i64 {
    v.round_ties_even() as i64
}

/// MONAI `keep_merge_components_with_points` on `[B, 1, H, W, D]` masks given as flat C-order slices with
/// `dims = [B, H, W, D]`: for every positive (1, 3) or negative (0, 2) point of object `b`, the component of
/// `pos` (or `neg`) found in the cube of half-size 0, 1, then 2 around the rounded point (the largest label
/// in the first non-empty cube) is kept. Points are `[B][N]` of `(x, y, z)` and labels `[B][N]`.
pub fn keep_merge_components_with_points(
    pos: &[bool],
    neg: &[bool],
    dims: [usize; 4],
    points: &[Vec<[f64; 3]>],
    labels: &[Vec<i64>],
) -> Vec<bool> {
    // skimage labels the whole [B, 1, H, W, D] array with connectivity 3; the singleton channel axis makes
    // that a 4-D labelling of [B, H, W, D] with at most 3 non-zero offsets.
    let (features_pos, _) = label(pos, &dims, 3);
    let (features_neg, _) = label(neg, &dims, 3);
    let [nb, h, w, d] = dims;
    let vol = h * w * d;
    let mut out = vec![false; pos.len()];
    for b in 0..nb.min(points.len()) {
        for (i, p) in points[b].iter().enumerate() {
            let features = match labels[b][i] {
                1 | 3 => &features_pos,
                0 | 2 => &features_neg,
                _ => continue,
            };
            let fb = &features[b * vol..(b + 1) * vol];
            // MONAI rounds `p.float().round()`: float32 first, then half to even.
            let [x, y, z] = p.map(|c| round_half_even(c as f32 as f64));
            for margin in 0..3i64 {
                let range =
                    |c: i64, size: usize| ((c - margin).max(0), (c + margin + 1).min(size as i64));
                let ((x0, x1), (y0, y1), (z0, z1)) = (range(x, h), range(y, w), range(z, d));
                let mut best = 0u32;
                for xi in x0..x1 {
                    for yi in y0..y1 {
                        for zi in z0..z1 {
                            best = best.max(fb[(xi as usize * w + yi as usize) * d + zi as usize]);
                        }
                    }
                }
                if best > 0 {
                    for (o, &f) in out[b * vol..(b + 1) * vol].iter_mut().zip(fb) {
                        if f == best {
                            *o = true;
                        }
                    }
                    break;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_follow_raster_order_of_first_voxel() {
        // 1-D: two components.
        let (l, n) = label(&[false, true, true, false, true], &[5], 1);
        assert_eq!((l, n), (vec![0, 1, 1, 0, 2], 2));
        // 2-D: a component whose first voxel comes later in raster order than another component's voxels.
        #[rustfmt::skip]
        let m = [
            false, false, true,
            true,  false, true,
            true,  true,  true,
        ];
        let (l4, n4) = label(&m, &[3, 3], 1);
        assert_eq!(n4, 1);
        assert!(l4.iter().zip(m.iter()).all(|(&v, &b)| (v == 1) == b));
        // Diagonal neighbours join with connectivity 2 but not with 1.
        let diag = [true, false, false, true];
        assert_eq!(label(&diag, &[2, 2], 1).1, 2);
        assert_eq!(label(&diag, &[2, 2], 2).1, 1);
    }

    #[test]
    fn connectivity_limits_the_number_of_changing_axes() {
        // Corner neighbours in 3-D differ in 3 axes: joined with connectivity 3, not 2.
        let mut m = vec![false; 8];
        m[0] = true;
        m[7] = true;
        assert_eq!(label(&m, &[2, 2, 2], 2).1, 2);
        assert_eq!(label(&m, &[2, 2, 2], 3).1, 1);
        // In 4-D, a 4-axis diagonal is not a neighbour with connectivity 3.
        let mut m = vec![false; 16];
        m[0] = true;
        m[15] = true;
        assert_eq!(label(&m, &[2, 2, 2, 2], 3).1, 2);
    }

    #[test]
    fn round_half_even_matches_numpy() {
        for (v, r) in [
            (0.5, 0),
            (1.5, 2),
            (2.5, 2),
            (-0.5, 0),
            (-1.5, -2),
            (2.4, 2),
            (2.6, 3),
            (-2.6, -3),
        ] {
            assert_eq!(round_half_even(v), r, "{v}");
        }
    }

    #[test]
    fn keeps_the_component_under_a_positive_point_only() {
        // One object, 1 x 4 x 4 x 1 volume with two separate positive components.
        let dims = [1, 4, 4, 1];
        let mut pos = vec![false; 16];
        for i in [0, 1, 4] {
            pos[i] = true;
        }
        for i in [14, 15] {
            pos[i] = true;
        }
        let neg = vec![false; 16];
        let out = keep_merge_components_with_points(
            &pos,
            &neg,
            dims,
            &[vec![[3.0, 3.0, 0.0]]],
            &[vec![1]],
        );
        let kept: Vec<usize> = out
            .iter()
            .enumerate()
            .filter(|(_, &v)| v)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(kept, vec![14, 15]);
        // A padding point (-1) keeps nothing; a negative point looks at `neg`.
        let out = keep_merge_components_with_points(
            &pos,
            &neg,
            dims,
            &[vec![[0.0, 0.0, 0.0]]],
            &[vec![-1]],
        );
        assert!(out.iter().all(|&v| !v));
        let out = keep_merge_components_with_points(
            &pos,
            &neg,
            dims,
            &[vec![[0.0, 0.0, 0.0]]],
            &[vec![0]],
        );
        assert!(out.iter().all(|&v| !v));
        // Nothing within one voxel of (2, 2): the cube of half-size 2 holds both components, and MONAI keeps
        // the one with the largest label, i.e. the one whose first voxel comes last in raster order.
        let out = keep_merge_components_with_points(
            &pos,
            &neg,
            dims,
            &[vec![[2.0, 2.0, 0.0]]],
            &[vec![1]],
        );
        assert!(out[14] && out[15] && !out[0]);
    }
}
